//! Volumes built on other volumes (like nbdkit's filters): each layer has one
//! job and its own file.

mod composite;
mod concat;
mod read_only;
mod stripe;

pub use composite::{Composite, Layout, Piece};
pub use concat::{Concat, ConcatLayout};
pub use read_only::ReadOnly;
pub use stripe::{Stripe, StripeLayout};
