//! necrocode-dispatch: the Rust core of NecroCode's task dispatcher.
//!
//! The modules at the top are pure Rust and know nothing of Python: they hold
//! the state and make the decisions. `bindings` is the thin layer that exposes
//! them to Python as `necrocode_dispatch._core`.

pub mod backoff;
pub mod clock;
pub mod dispatcher;
pub mod hashing;
pub mod pools;
pub mod queue;
pub mod retry_manager;
pub mod retry_state;
pub mod runners;
pub mod scheduling;
pub mod wall_time;

mod bindings;
