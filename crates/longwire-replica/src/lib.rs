//! Layers that keep one volume in two places, built on any two
//! [`Volume`](longwire_core::Volume)s — in practice a local store and a
//! remote one reached through longwire's reconnecting NBD client:
//!
//! - [`bitmap`]: a persistent region bitmap (dirty regions of a mirror,
//!   hydrated regions of a clone), one bit per region, kept in a small file
//!   beside the volume.
#![forbid(unsafe_code)]

pub mod bitmap;

pub use bitmap::RegionBitmap;
