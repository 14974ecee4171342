//! Stores: the [`Volume`](longwire_core::Volume) implementations that hold
//! the bytes.
//!
//! - [`MemoryVolume`]: sparse RAM, for tests, scratch disks and benchmarks
//!   that should not measure a disk.
//! - [`FileVolume`]: a raw image file (or block device) on Linux, using the
//!   filesystem's own sparseness so holes cost nothing and are reported.
//! - [`SqliteVolume`]: named volumes stored as (optionally zstd-compressed)
//!   chunks in one SQLite database file.
//! - [`S3Volume`]: a volume as chunk objects in an S3 bucket, behind a
//!   local write-back cache.
//!
//! [`open_uri`] turns a one-line volume description (`file:disk.img?size=10G`,
//! `memory:?size=1G`, `sqlite:vols.db?volume=a&size=1G`) into a volume, so
//! the command line and config files share one syntax and one set of error
//! messages.
//!
//! [`manage`] creates, lists, describes and deletes volumes by URI without
//! serving them (`longwire create/list/info/delete`).
//!
//! Errors from opening are human-readable `String`s (they end up in front of
//! an operator); errors from I/O are [`VolumeError`](longwire_core::VolumeError)s
//! (they end up as errno values on the wire).

pub mod file;
mod io_pool;
pub mod manage;
pub mod memory;
pub mod s3;
mod sparse;
pub mod sqlite;
mod uri;

pub use file::FileVolume;
pub use io_pool::{set_io_threads, DEFAULT_IO_THREADS};
pub use memory::MemoryVolume;
pub use s3::S3Volume;
pub use sqlite::SqliteVolume;
pub use uri::{open_uri, parse_size, OpenedVolume};
