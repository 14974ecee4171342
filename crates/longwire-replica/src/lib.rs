//! Layers that keep one volume in two places, built on any two
//! [`Volume`](longwire_core::Volume)s — in practice a local store and a
//! remote one reached through longwire's reconnecting NBD client:
//!
//! - [`bitmap`]: a persistent region bitmap (dirty regions of a mirror,
//!   hydrated regions of a clone), one bit per region, kept in a small file
//!   beside the volume.
//! - [`clone`]: clone / live migration: a local volume served at once and
//!   filled from a remote source on demand and in the background.
//! - [`mirror`]: RAID 1 of a local volume and a replica, with a persistent
//!   dirty-region bitmap, generation checks and a throttled resync.
#![forbid(unsafe_code)]

pub mod bitmap;
pub mod clone;
pub mod mirror;

pub use bitmap::RegionBitmap;
