//! The dispatcher: which task runs where, and what is reported about it.

pub mod dependencies;
pub mod finished;
pub mod keyed_slab;
pub mod outbox;
pub mod pools;
pub mod queue;
pub mod runners;
pub mod saved_reports;
pub mod scheduling;
pub mod snapshot;
pub mod sorted_chunks;
pub mod state;
pub mod task_names;
pub mod time_index;
