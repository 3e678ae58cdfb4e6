//! How much of anything knock does per interval, so one node, user or server cannot take more than its share:
//! [`coalesce`] folds a burst of publishes to one node into one push, [`registration`] caps how many
//! registrations one user and one server may write per hour, and [`budget`] how many wake-ups of a kind
//! one device or token gets per hour. [`bucket`] is what the caps are made of.

mod bucket;
pub mod budget;
pub mod coalesce;
pub mod registration;

pub use self::budget::Budget;
pub use self::coalesce::Coalescer;
pub use self::registration::{Refused, RegistrationLimiter, Scope};
