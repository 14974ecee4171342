//! The one interface every longwire front-end and store meets at.
//!
//! Front-ends (NBD, iSCSI) translate wire commands into [`Volume`] calls;
//! stores (file, memory, …) and layers (read-only, mirror, …) implement it.
//! Nothing protocol-specific crosses this line, so a volume can be served
//! over several protocols at once with one truth.
#![forbid(unsafe_code)]

pub mod access;
mod error;
mod export;
mod extent;
pub mod gate;
pub mod layers;
pub mod stats;
mod status;
mod volume;

pub use access::{AddressPolicy, AllowList, IpNet};
pub use error::{VolumeError, VolumeResult};
pub use export::{Export, ExportRegistry};
pub use extent::{Extent, ExtentKind, ReadSegment};
pub use stats::Stats;
pub use status::{Gauge, LayerStatus};
pub use volume::{check_range, Capabilities, Volume, ZeroFlags};
