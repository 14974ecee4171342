//! Volumes built on other volumes (like nbdkit's filters): each layer has one
//! job and its own file.

mod read_only;

pub use read_only::ReadOnly;
