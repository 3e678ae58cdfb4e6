//! How much of anything knock does per interval, so one node, user or server cannot take more than its share:
//! [`coalesce`] folds a burst of publishes to one node into one push, and [`registration`] caps how many
//! registrations one user and one server may write per hour.

pub mod coalesce;
pub mod registration;

pub use self::coalesce::Coalescer;
pub use self::registration::{Refused, RegistrationLimiter, Scope};
