//! Retry bookkeeping: how many times a task failed, when it may run again,
//! when to give up.

pub mod backoff;
pub mod budget;
pub mod failure_policy;
pub mod jitter;
pub mod manager;
pub mod slot_index;
pub mod snapshot;
pub mod state;
