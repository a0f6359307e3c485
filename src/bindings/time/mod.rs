//! Clocks as Python classes and datetimes to and from Python.

pub mod clock;
pub mod datetime;
