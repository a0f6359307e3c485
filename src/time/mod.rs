//! Time: naive local wall-clock datetimes (what is reported) and clocks with
//! a monotonic reading (what decides).

pub mod clock;
pub mod wall;
