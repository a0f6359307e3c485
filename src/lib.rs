//! necrocode-dispatch: the Rust core of NecroCode's task dispatcher.
//!
//! The modules at the top are pure Rust and know nothing of Python: they hold
//! the state and make the decisions. `bindings` is the thin layer that exposes
//! them to Python as `necrocode_dispatch._core`.

pub mod backoff;
pub mod clock;
pub mod dependencies;
pub mod dispatcher;
pub mod dispatcher_snapshot;
pub mod failure_policy;
pub mod finished;
pub mod hashing;
pub mod jitter;
pub mod metrics;
pub mod outbox;
pub mod persist;
pub mod pools;
pub mod prometheus;
pub mod queue;
pub mod retry_budget;
pub mod retry_manager;
pub mod retry_snapshot;
pub mod retry_state;
pub mod runners;
pub mod saved_reports;
pub mod scheduling;
pub mod wall_time;

mod bindings;
