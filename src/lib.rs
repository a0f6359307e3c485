//! necrocode-dispatch: the Rust core of NecroCode's task dispatcher.
//!
//! The modules at the top are pure Rust and know nothing of Python: they hold
//! the state and make the decisions. `bindings` is the thin layer that exposes
//! them to Python as `necrocode_dispatch._core`, and mirrors this layout.
//!
//! - `retry`: retry bookkeeping — backoff, jitter, failure policy, budget,
//!   the per-task records, the thread-safe manager, snapshots.
//! - `dispatch`: the dispatcher — queue, pools, runners, scheduling, the
//!   state machine, its outbox of reports, dependencies, snapshots.
//! - `time`: naive local wall time and the clocks.
//! - `metrics`: failure statistics and the Prometheus text format.
//! - `persist`: atomic, safe file writes; `hashing`: the id maps' hasher;
//!   `huge_pages`: large tables probed at random, in 2 MiB pages;
//!   `id`: task and runner ids, kept inline when short;
//!   `interning`: spec, repo and skill names held once, however many tasks
//!   carry them.
//! - `directory`: emptying a slot's directory; `events`: the local event
//!   log's JSON lines.
//! - `process`: starting a task's shell for the local launcher (Unix).

pub mod directory;
pub mod dispatch;
pub mod events;
pub mod hashing;
pub mod huge_pages;
pub mod id;
pub mod interning;
pub mod metrics;
pub mod persist;
#[cfg(unix)]
pub mod process;
pub mod retry;
pub mod time;

mod bindings;
