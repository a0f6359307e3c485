//! The dispatcher state machine.
//!
//! [`DispatcherState`] holds every task the dispatcher knows — queued, delayed
//! for a retry, or running — with the pools, the runners and the counts. Its
//! methods decide and update in one step and return the side effects for the
//! caller to perform on the outside world (registry, repo pool, event recorder)
//! after releasing the lock. `T` is the caller's handle of a task (a Python
//! object in the bindings); the state never inspects it, and hands it back in
//! [`Effect::Discard`] when it lets go, so it is never dropped under the lock.

use std::fmt;
use std::sync::Arc;

use crate::dispatch::finished::RecentlyFinished;
use crate::dispatch::keyed_slab::{Keyed, KeyedSlab};
use crate::dispatch::outbox::{Outbox, OutboxStats, Report};
use crate::dispatch::pools::{PoolIndex, PoolState, Pools};
use crate::dispatch::queue::{QueueKey, QueueOrder, ReadyQueue, Route};
use crate::dispatch::runners::{RunnerDetails, RunnerSlot, Runners, TrackedRunner};
use crate::dispatch::scheduling::{Policy, Scheduler, SkillMapping};
use crate::dispatch::task_names::TaskNames;
use crate::dispatch::time_index::TimeIndex;
use crate::hashing::FastMap;
use crate::id::{RunnerId, SlotId};
use crate::interning::shared_name;
use crate::metrics::FailureStats;
use crate::retry::state::{RecordIndex, RecordedFailure, RetryBook, TaskId};
use crate::time::clock::{nanos_to_seconds, MonoNanos, Now};
use crate::time::wall::WallTime;

/// What the dispatcher needs to know of a task.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskMeta {
    pub id: TaskId,
    /// Spec, repo and skill, shared with the tasks that carry the same.
    pub names: Arc<TaskNames>,
    pub priority: i64,
    /// When the task was created; for a held task that did not say, when
    /// the dispatcher first held it. Its age in the queue.
    pub created_at: Option<WallTime>,
}

impl TaskMeta {
    /// A task known only by its id and spec (a retry restored, a failure
    /// of a task not held): its repo is named after its spec.
    fn of_spec(id: TaskId, spec: Arc<str>) -> TaskMeta {
        TaskMeta {
            id,
            names: TaskNames::shared(spec.clone(), spec, None),
            priority: 0,
            created_at: None,
        }
    }

    pub fn spec_name(&self) -> &Arc<str> {
        &self.names.spec
    }

    pub fn repo_name(&self) -> &Arc<str> {
        &self.names.repo
    }

    pub fn required_skill(&self) -> Option<&str> {
        self.names.skill.as_deref()
    }
}

/// Where a held task is. A task is in exactly one place (SPEC §4.5 #4).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Place {
    Queued,
    Delayed {
        due: Due,
    },
    /// Capacity reserved in `pool`; the slot and runner are being set up.
    /// Counts as running.
    /// An outcome reported meanwhile waits in
    /// [`DispatcherState::early_reports`].
    Assigning {
        pool: ReservedPool,
    },
    Running {
        runner: RunnerSlot,
    },
}

impl Place {
    pub fn delayed(due: MonoNanos) -> Place {
        Place::Delayed { due: Due::new(due) }
    }
}

/// A due time in two 4-byte halves: every variant of a place then aligns to
/// 4 bytes, so a place takes 12 bytes, not 16, in every held task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Due([u32; 2]);

impl Due {
    pub fn new(at: MonoNanos) -> Due {
        Due([at as u32, (at >> 32) as u32])
    }

    pub fn get(self) -> MonoNanos {
        u64::from(self.0[0]) | (u64::from(self.0[1]) << 32)
    }
}

/// A pool's index in 4 bytes, as the other places' data: a place takes 12
/// bytes in every held task. (Pools are configured objects, never 2^32 of
/// them.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReservedPool(u32);

impl ReservedPool {
    fn new(pool: PoolIndex) -> Self {
        debug_assert!(u32::try_from(pool).is_ok());
        ReservedPool(pool as u32)
    }

    pub fn index(self) -> PoolIndex {
        self.0 as PoolIndex
    }
}

/// An outcome reported while the task's runner was still being launched (a
/// fast runner can finish before `launch` returns). Applied once the runner
/// is tracked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EarlyReport {
    Completion {
        runner_id: RunnerId,
        success: bool,
        timed_out: bool,
        reason: Option<Arc<str>>,
    },
    Failure {
        runner_id: Option<RunnerId>,
        reason: Arc<str>,
    },
}

#[derive(Debug)]
struct HeldTask<T> {
    meta: TaskMeta,
    payload: Option<T>,
    place: Place,
    /// Arrival order, unique per task: ties of priority and age keep it.
    /// 4 bytes: when the numbers run out the held tasks are numbered afresh,
    /// in the same order ([`DispatcherState::renumber`]).
    seq: u32,
}

impl<T> HeldTask<T> {
    /// Its place in the queue: priority, then age (`created_at`, which a
    /// held task always has), then arrival.
    fn order(&self) -> QueueOrder {
        QueueOrder {
            priority: self.meta.priority,
            age: self.meta.created_at.map_or(0, WallTime::micros),
            seq: u64::from(self.seq),
        }
    }
}

impl<T> Keyed for HeldTask<T> {
    fn key(&self) -> &str {
        &self.meta.id
    }
}

/// The state reported to the task registry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReportedState {
    Running,
    Ready,
    Done,
    Failed,
}

impl ReportedState {
    pub fn value(self) -> &'static str {
        match self {
            ReportedState::Running => "running",
            ReportedState::Ready => "ready",
            ReportedState::Done => "done",
            ReportedState::Failed => "failed",
        }
    }
}

/// The metadata reported with a state.
#[derive(Clone, Debug, PartialEq)]
pub enum StateMetadata {
    Running {
        runner_id: RunnerId,
        assigned_slot: Option<SlotId>,
        pool_name: Arc<str>,
        started_at: WallTime,
    },
    Retry {
        retry_count: u64,
        next_retry_at: WallTime,
        failure_reason: Arc<str>,
    },
    Interrupted,
    Done {
        runner_id: RunnerId,
        completed_at: WallTime,
    },
    Failed {
        reason: Arc<str>,
        retries: u64,
        runner_id: Option<RunnerId>,
    },
}

/// A side effect to perform after the lock is released, in order.
#[derive(Clone, Debug)]
pub enum Effect<T> {
    ReleaseSlot {
        task_id: TaskId,
        slot_id: SlotId,
    },
    ReportState {
        spec_name: Arc<str>,
        task_id: TaskId,
        state: ReportedState,
        metadata: StateMetadata,
    },
    RunnerFinished {
        spec_name: Arc<str>,
        task_id: TaskId,
        runner_id: RunnerId,
        slot_id: Option<SlotId>,
        success: bool,
        execution_time_seconds: f64,
        failure_reason: Option<Arc<str>>,
    },
    TaskCompleted {
        spec_name: Arc<str>,
        task_id: TaskId,
        runner_id: RunnerId,
        execution_time_seconds: f64,
    },
    TaskFailed {
        spec_name: Arc<str>,
        task_id: TaskId,
        runner_id: Option<RunnerId>,
        failure_reason: Arc<str>,
        retry_count: u64,
    },
    StopRunner {
        task_id: TaskId,
        runner_id: RunnerId,
    },
    TaskAssigned {
        spec_name: Arc<str>,
        task_id: TaskId,
        runner_id: RunnerId,
        slot_id: Option<SlotId>,
        pool_name: Arc<str>,
        timestamp: WallTime,
    },
    RunnerStarted {
        spec_name: Arc<str>,
        task_id: TaskId,
        runner_id: RunnerId,
        slot_id: Option<SlotId>,
        pool_name: Arc<str>,
        details: RunnerDetails,
        timestamp: WallTime,
    },
    /// A confirmed launch's reports in one (see [`Start`]).
    Started(Start),
    /// A successful completion's reports in one (see [`Completion`]).
    Completed(Completion),
    /// A task handle the state no longer holds.
    Discard(T),
}

impl<T> Report for Effect<T> {
    fn parts(&self) -> usize {
        match self {
            Effect::Started(start) => start.parts_left(),
            Effect::Completed(c) => c.parts_left().len(),
            Effect::Discard(_) => 0,
            _ => 1,
        }
    }
}

/// A confirmed launch's three reports, in order: the state RUNNING, the
/// task assigned, the runner started. One report for the three, as for a
/// [`Completion`] (which see): the names are copied once, not per call.
#[derive(Clone, Debug)]
pub struct Start {
    pub spec_name: Arc<str>,
    pub task_id: TaskId,
    pub runner_id: RunnerId,
    pub slot_id: Option<SlotId>,
    pub pool_name: Arc<str>,
    pub details: RunnerDetails,
    /// When the runner started (RUNNING's `started_at`).
    pub started_at: WallTime,
    /// When the launch was confirmed (the events' `timestamp`).
    pub confirmed_at: WallTime,
    pub delivered: u8,
}

impl Start {
    /// RUNNING, the task assigned, the runner started.
    pub const PARTS: u8 = 3;

    /// The port calls not made yet.
    pub fn parts_left(&self) -> usize {
        usize::from(Self::PARTS.saturating_sub(self.delivered))
    }

    /// The parts not delivered yet, as the single reports they stand for
    /// (what a snapshot saves).
    pub fn remaining_reports<T>(&self) -> Vec<Effect<T>> {
        let all = [
            Effect::ReportState {
                spec_name: self.spec_name.clone(),
                task_id: self.task_id.clone(),
                state: ReportedState::Running,
                metadata: StateMetadata::Running {
                    runner_id: self.runner_id.clone(),
                    assigned_slot: self.slot_id.clone(),
                    pool_name: self.pool_name.clone(),
                    started_at: self.started_at,
                },
            },
            Effect::TaskAssigned {
                spec_name: self.spec_name.clone(),
                task_id: self.task_id.clone(),
                runner_id: self.runner_id.clone(),
                slot_id: self.slot_id.clone(),
                pool_name: self.pool_name.clone(),
                timestamp: self.confirmed_at,
            },
            Effect::RunnerStarted {
                spec_name: self.spec_name.clone(),
                task_id: self.task_id.clone(),
                runner_id: self.runner_id.clone(),
                slot_id: self.slot_id.clone(),
                pool_name: self.pool_name.clone(),
                details: self.details.clone(),
                timestamp: self.confirmed_at,
            },
        ];
        all.into_iter().skip(usize::from(self.delivered)).collect()
    }
}

/// A successful completion's four reports, in order: the runner finished,
/// the task completed, its slot released (when it had one), its state DONE.
/// One report instead of four, so the finished runner's names are moved in
/// rather than copied once per port call (a completion is on every task's
/// path). `delivered` counts the parts that have landed: a port that raises
/// leaves the report at the front of its lane, to resume at that part.
#[derive(Clone, Debug)]
pub struct Completion {
    pub spec_name: Arc<str>,
    pub task_id: TaskId,
    pub runner_id: RunnerId,
    pub slot_id: Option<SlotId>,
    pub execution_time_seconds: f64,
    pub completed_at: WallTime,
    pub delivered: u8,
}

/// One part of a [`Completion`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompletionPart {
    RunnerFinished,
    TaskCompleted,
    ReleaseSlot,
    Done,
}

impl Completion {
    /// The parts not delivered yet, in order.
    pub fn parts_left(&self) -> &'static [CompletionPart] {
        use CompletionPart::*;
        let all: &'static [CompletionPart] = if self.slot_id.is_some() {
            &[RunnerFinished, TaskCompleted, ReleaseSlot, Done]
        } else {
            &[RunnerFinished, TaskCompleted, Done]
        };
        all.get(usize::from(self.delivered)..).unwrap_or_default()
    }

    /// The parts not delivered yet, as the single reports they stand for
    /// (what a snapshot saves).
    pub fn remaining_reports<T>(&self) -> Vec<Effect<T>> {
        self.parts_left()
            .iter()
            .filter_map(|part| {
                Some(match part {
                    CompletionPart::RunnerFinished => Effect::RunnerFinished {
                        spec_name: self.spec_name.clone(),
                        task_id: self.task_id.clone(),
                        runner_id: self.runner_id.clone(),
                        slot_id: self.slot_id.clone(),
                        success: true,
                        execution_time_seconds: self.execution_time_seconds,
                        failure_reason: None,
                    },
                    CompletionPart::TaskCompleted => Effect::TaskCompleted {
                        spec_name: self.spec_name.clone(),
                        task_id: self.task_id.clone(),
                        runner_id: self.runner_id.clone(),
                        execution_time_seconds: self.execution_time_seconds,
                    },
                    CompletionPart::ReleaseSlot => Effect::ReleaseSlot {
                        task_id: self.task_id.clone(),
                        slot_id: self.slot_id.clone()?,
                    },
                    CompletionPart::Done => Effect::ReportState {
                        spec_name: self.spec_name.clone(),
                        task_id: self.task_id.clone(),
                        state: ReportedState::Done,
                        metadata: StateMetadata::Done {
                            runner_id: self.runner_id.clone(),
                            completed_at: self.completed_at,
                        },
                    },
                })
            })
            .collect()
    }
}

impl<T> Effect<T> {
    /// The task whose lane the report goes to; None for a handle to drop.
    pub fn task_id(&self) -> Option<&TaskId> {
        match self {
            Effect::ReleaseSlot { task_id, .. }
            | Effect::ReportState { task_id, .. }
            | Effect::RunnerFinished { task_id, .. }
            | Effect::TaskCompleted { task_id, .. }
            | Effect::TaskFailed { task_id, .. }
            | Effect::StopRunner { task_id, .. }
            | Effect::TaskAssigned { task_id, .. }
            | Effect::RunnerStarted { task_id, .. } => Some(task_id),
            Effect::Started(start) => Some(&start.task_id),
            Effect::Completed(c) => Some(&c.task_id),
            Effect::Discard(_) => None,
        }
    }

    /// As single reports, one per port call not yet made.
    pub fn into_single_reports(self) -> Vec<Effect<T>> {
        match self {
            Effect::Started(start) => start.remaining_reports(),
            Effect::Completed(c) => c.remaining_reports(),
            other => vec![other],
        }
    }
}

/// Effects filed in the outbox: the lanes to deliver now, and the handles
/// to drop once the lock is released.
#[derive(Debug)]
pub struct Filed<T> {
    pub lanes: Vec<TaskId>,
    pub discards: Vec<T>,
}

/// What [`DispatcherState::file_and_take`] did with an outcome's effects.
#[derive(Debug)]
pub enum Filing<T> {
    /// Every report was for `task`, which had no lane: taken for delivery.
    /// The handle, if any, is dropped once the lock is released.
    Taken {
        task: TaskId,
        reports: std::collections::VecDeque<Effect<T>>,
        discard: Option<T>,
    },
    Filed(Filed<T>),
}

/// What a failure, completion or timeout did.
#[derive(Debug)]
pub struct Outcome<T> {
    /// False when the runner's outcome had already been applied: nothing changed.
    pub applied: bool,
    pub effects: Vec<Effect<T>>,
    /// The task's id and its retry record, when a failure was recorded.
    pub failure: Option<(TaskId, RecordedFailure)>,
}

impl<T> Default for Outcome<T> {
    fn default() -> Self {
        Outcome::ignored()
    }
}

impl<T> Outcome<T> {
    fn ignored() -> Self {
        Outcome {
            applied: false,
            effects: Vec::new(),
            failure: None,
        }
    }

    fn accepted() -> Self {
        Outcome {
            applied: true,
            ..Outcome::ignored()
        }
    }

    /// Nothing applied; the handle goes back to the caller to drop.
    fn returning(payload: T) -> Self {
        Outcome {
            effects: vec![Effect::Discard(payload)],
            ..Outcome::ignored()
        }
    }
}

/// Capacity reserved for a queued task by a scheduling pass. The caller
/// allocates a slot and launches a runner, then reports back with
/// `confirm_assignment`, `abort_assignment` or `fail_assignment`.
#[derive(Debug)]
pub struct Reservation<T> {
    pub meta: TaskMeta,
    pub payload: T,
    pub pool: PoolIndex,
    pub pool_name: Arc<str>,
}

/// A request the state refuses; nothing changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    UnknownPool(String),
    PoolFull(String),
    GlobalLimitReached(u64),
    RunnerAlreadyTracked(String),
    TaskAlreadyHeld { task_id: String, place: String },
    RunnerOfAnotherTask { runner_id: String, task_id: String },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::UnknownPool(p) => write!(f, "pool_name: no pool named {p:?}"),
            Refusal::PoolFull(p) => write!(f, "pool {p:?} is at its max_concurrency"),
            Refusal::GlobalLimitReached(n) => {
                write!(f, "the global limit max_global_concurrency={n} is reached")
            }
            Refusal::RunnerAlreadyTracked(r) => {
                write!(f, "runner_id: runner {r:?} is already tracked")
            }
            Refusal::TaskAlreadyHeld { task_id, place } => {
                write!(f, "task_id: task {task_id:?} is already {place}")
            }
            Refusal::RunnerOfAnotherTask { runner_id, task_id } => write!(
                f,
                "runner_id: runner {runner_id:?} does not run task {task_id:?}"
            ),
        }
    }
}

/// Counters for `get_status()["metrics"]`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Metrics {
    pub tasks_enqueued: u64,
    pub tasks_assigned: u64,
    pub tasks_completed: u64,
    pub tasks_failed: u64,
    pub retries_scheduled: u64,
    pub runner_timeouts: u64,
    pub runners_force_stopped: u64,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limits {
    pub max_global_concurrency: u64,
    pub heartbeat_timeout: MonoNanos,
}

/// A snapshot of the whole state, for `get_status()`.
#[derive(Clone, Debug, PartialEq)]
pub struct StatusSnapshot {
    pub queue_size: usize,
    /// The delayed tasks, earliest first; empty unless asked for.
    pub delayed: Vec<DelayedTask>,
    pub delayed_count: usize,
    pub running_tasks: usize,
    pub global_running: u64,
    pub max_global_concurrency: u64,
    pub pools: Vec<PoolState>,
    pub metrics: Metrics,
    pub failure_stats: FailureStats,
    /// Reports not yet delivered, and the tasks they are for (SPEC §9).
    pub pending_reports: usize,
    pub pending_report_tasks: usize,
    pub delivery: OutboxStats,
}

/// A delayed task in a [`StatusSnapshot`].
#[derive(Clone, Debug, PartialEq)]
pub struct DelayedTask {
    pub task_id: TaskId,
    /// `WallTime::MAX` when the task has no retry record.
    pub next_retry_at: WallTime,
    /// Its retry record in the book the snapshot was taken with.
    pub record: Option<RecordIndex>,
}

/// A runner as the caller describes it when it starts running a task.
#[derive(Clone, Debug)]
pub struct NewRunner {
    pub runner_id: RunnerId,
    pub slot_id: Option<SlotId>,
    pub started_at: Option<WallTime>,
    pub details: RunnerDetails,
}

#[derive(Debug)]
pub struct DispatcherState<T> {
    limits: Limits,
    tasks: KeyedSlab<HeldTask<T>>,
    /// Queued tasks by their slot in `tasks` (see `delayed`).
    queue: ReadyQueue<u32>,
    /// Delayed tasks by due time, then by their slot in `tasks`: a number
    /// rather than the id, so no `Arc` is copied to file or find one, and
    /// ties compare integers (as the heartbeat index does).
    delayed: TimeIndex,
    pools: Pools,
    runners: Runners,
    /// Tracked runners plus reservations (SPEC §4.5 #2).
    global_running: u64,
    metrics: Metrics,
    failure_stats: FailureStats,
    next_seq: u32,
    scheduler: Scheduler,
    /// False once stopping: scheduling passes assign nothing.
    accepting: bool,
    /// Set by `force_stop`: a runner launched afterwards is stopped at once.
    forced: bool,
    /// Reports decided and not yet delivered, one lane per task (SPEC §9).
    outbox: Outbox<Effect<T>>,
    /// Tasks whose terminal outcome was decided lately (SPEC §4.5 #4).
    finished: RecentlyFinished,
    /// Completions reported while launches were in progress, for runners
    /// not tracked yet and without a task id: applied if a launch returns
    /// one of these runners. Only kept while an assignment is in progress.
    orphan_completions: Vec<EarlyReport>,
    /// Outcomes reported for tasks being assigned (a fast runner can finish
    /// before `launch` returns), applied when the launch is confirmed. At
    /// most one a task, only while it is `Assigning`: kept apart, as they
    /// are rare, so that a place stays 12 bytes.
    early_reports: FastMap<TaskId, EarlyReport>,
}

/// At most this many orphan completions are kept.
const MAX_ORPHAN_COMPLETIONS: usize = 1024;

impl<T> DispatcherState<T> {
    pub fn new(limits: Limits, pools: Pools, scheduler: Scheduler) -> Self {
        DispatcherState {
            limits,
            tasks: KeyedSlab::default(),
            queue: ReadyQueue::new(
                scheduler.policy.orders_by_priority(),
                scheduler.policy == Policy::FairShare,
            ),
            delayed: TimeIndex::default(),
            pools,
            runners: Runners::default(),
            global_running: 0,
            metrics: Metrics::default(),
            failure_stats: FailureStats::default(),
            next_seq: 0,
            scheduler,
            accepting: true,
            forced: false,
            outbox: Outbox::default(),
            finished: RecentlyFinished::default(),
            orphan_completions: Vec::new(),
            early_reports: FastMap::default(),
        }
    }

    /// Files each effect in its task's lane of the outbox, in order. Returns
    /// the lanes touched and the handles to drop after the lock.
    pub fn file(&mut self, effects: Vec<Effect<T>>) -> Filed<T> {
        let mut filed = Filed {
            lanes: Vec::new(),
            discards: Vec::new(),
        };
        for effect in effects {
            match effect {
                Effect::Discard(handle) => filed.discards.push(handle),
                effect => {
                    let task = effect.task_id().expect("reports name a task").clone();
                    if !filed.lanes.contains(&task) {
                        filed.lanes.push(task.clone());
                    }
                    self.outbox.push(&task, effect);
                }
            }
        }
        filed
    }

    /// [`Self::file`], but when every report is for one task that has no
    /// lane yet (the usual case) they are taken for delivery at once, the
    /// lane busy until [`Self::finish_reports`].
    pub fn file_and_take(&mut self, mut effects: Vec<Effect<T>>) -> Filing<T> {
        // An outcome hands back its task's handle, if at all, as its last
        // effect; any other shape takes the general path below.
        let discard = match effects.last() {
            Some(Effect::Discard(_)) => match effects.pop() {
                Some(Effect::Discard(handle)) => Some(handle),
                _ => None,
            },
            _ => None,
        };
        // An outcome's reports carry copies of one id: equal words, compared
        // without reading the text.
        let single = effects.first().and_then(Effect::task_id).filter(|first| {
            effects
                .iter()
                .all(|e| e.task_id().is_some_and(|id| id == *first))
        });
        if let Some(task) = single.cloned() {
            match self.outbox.push_and_take(&task, effects.into()) {
                Ok(reports) => {
                    return Filing::Taken {
                        task,
                        reports,
                        discard,
                    }
                }
                Err(back) => effects = back.into(),
            }
        }
        effects.extend(discard.map(Effect::Discard));
        Filing::Filed(self.file(effects))
    }

    /// Takes `task`'s pending reports for delivery (see [`Outbox::take`]).
    pub fn take_reports(
        &mut self,
        task: &str,
        now: MonoNanos,
        force: bool,
    ) -> Option<std::collections::VecDeque<Effect<T>>> {
        self.outbox.take(task, now, force)
    }

    /// Ends a delivery (see [`Outbox::finish`]).
    pub fn finish_reports(
        &mut self,
        task: &str,
        delivered: usize,
        undelivered: std::collections::VecDeque<Effect<T>>,
        now: MonoNanos,
    ) -> bool {
        self.outbox.finish(task, delivered, undelivered, now)
    }

    /// Files reports restored from a snapshot; their lanes are due at `now`,
    /// so the next pass delivers them.
    pub fn restore_reports(&mut self, reports: Vec<Effect<T>>, now: MonoNanos) {
        let filed = self.file(reports);
        for lane in &filed.lanes {
            self.outbox.schedule(lane, now);
        }
        drop(filed.discards);
    }

    /// Lanes whose delivery retry is due; with `all`, every idle lane.
    pub fn lanes_to_deliver(&self, now: MonoNanos, all: bool) -> Vec<TaskId> {
        if all {
            self.outbox.idle_lanes()
        } else {
            self.outbox.due(now)
        }
    }

    /// When the earliest failed delivery may be retried.
    pub fn next_delivery_retry(&self) -> Option<MonoNanos> {
        self.outbox.next_retry()
    }

    /// Reports not yet delivered, and the tasks they are for.
    pub fn pending_reports(&self) -> (usize, usize) {
        (self.outbox.pending(), self.outbox.pending_tasks())
    }

    pub fn outbox(&self) -> &Outbox<Effect<T>> {
        &self.outbox
    }

    pub fn delivery_stats(&self) -> OutboxStats {
        self.outbox.stats()
    }

    /// Whether `task_id` reached its terminal outcome lately and has not been
    /// handed back by a poll since.
    pub fn finished_lately(&self, task_id: &str) -> bool {
        self.finished.contains(task_id)
    }

    pub fn policy(&self) -> Policy {
        self.scheduler.policy
    }

    /// Switches the policy; the queue reorders when the order changes.
    pub fn set_policy(&mut self, policy: Policy) {
        self.scheduler.policy = policy;
        self.requeue();
    }

    /// Sets the skill mapping; queued tasks are routed anew when it changed.
    pub fn set_skill_mapping(&mut self, mapping: SkillMapping) {
        if self.scheduler.mapping != mapping {
            self.scheduler.mapping = mapping;
            self.requeue();
        }
    }

    /// Rebuilds the queue for the current policy and mapping; O(n log n),
    /// and nothing when neither the order nor the routes change.
    fn requeue(&mut self) {
        let by_priority = self.scheduler.policy.orders_by_priority();
        let by_spec = self.scheduler.policy == Policy::FairShare;
        self.queue.reset(by_priority, by_spec);
        for (slot, _) in self
            .tasks
            .entries()
            .filter(|(_, t)| t.place == Place::Queued)
        {
            enqueue(&mut self.queue, &self.scheduler, &self.tasks, slot);
        }
    }

    /// `start()`: assign again, and let launched runners run.
    pub fn resume(&mut self) {
        self.accepting = true;
        self.forced = false;
    }

    /// `stop()`: assign nothing more; running runners go on.
    pub fn stop_assigning(&mut self) {
        self.accepting = false;
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    pub fn pools(&self) -> &Pools {
        &self.pools
    }

    pub fn runners(&self) -> &Runners {
        &self.runners
    }

    pub fn global_running(&self) -> u64 {
        self.global_running
    }

    /// Tasks held in any place (queued, delayed, being launched, running).
    pub fn held_tasks(&self) -> usize {
        self.tasks.len()
    }

    pub fn can_accept_globally(&self) -> bool {
        self.global_running < self.limits.max_global_concurrency
    }

    /// The id of the runner running `task_id`, if one is.
    pub fn runner_of(&self, task_id: &str) -> Option<&RunnerId> {
        match self.tasks.get(task_id)?.place {
            Place::Running { runner } => Some(&self.runners.at(runner)?.runner_id),
            _ => None,
        }
    }

    pub fn place_of(&self, task_id: &str) -> Option<&Place> {
        self.tasks.get(task_id).map(|t| &t.place)
    }

    /// When the earliest delayed retry becomes due.
    pub fn next_due(&mut self) -> Option<MonoNanos> {
        self.delayed.earliest(delayed_at(&self.tasks))
    }

    pub fn queued_ids(&self) -> Vec<TaskId> {
        let ids = self.queue.ids_in_order(order_in(&self.tasks)).into_iter();
        ids.filter_map(|slot| Some(self.tasks.at(slot)?.meta.id.clone()))
            .collect()
    }

    /// A new task's arrival number; a task that did not say when it was
    /// created is aged from now, when it is first held.
    fn arrive(&mut self, meta: &mut TaskMeta, now: Now) -> u32 {
        meta.created_at.get_or_insert(now.wall);
        if self.next_seq == u32::MAX {
            self.renumber();
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    /// Numbers the held tasks 0, 1, ... in their arrival order: after 2^32 - 1
    /// arrivals, O(n log n) once. Orders compare as before, so the ready
    /// queue stays as it is. (More than 2^32 - 1 held at once cannot be:
    /// slots are 4-byte numbers too.)
    fn renumber(&mut self) {
        let mut by_arrival: Vec<(u32, u32)> = self
            .tasks
            .entries()
            .map(|(slot, t)| (t.seq, slot))
            .collect();
        by_arrival.sort_unstable();
        self.next_seq = 0;
        for (_, slot) in by_arrival {
            if let Some(held) = self.tasks.at_mut(slot) {
                held.seq = self.next_seq;
                self.next_seq += 1;
            }
        }
    }

    /// Whether [`Self::offer`] would ignore a polled task with this id (it is
    /// held, or its reports are on their way), so the caller can skip
    /// reading the rest of it.
    pub fn ignores_offer(&self, id: &str) -> bool {
        if self.outbox.holds(id) {
            return true;
        }
        match self.tasks.get(id) {
            Some(held) => !(matches!(held.place, Place::Delayed { .. }) && held.payload.is_none()),
            None => false,
        }
    }

    /// Makes room for `additional` tasks about to be offered (a poll's).
    pub fn expect_offers(&mut self, additional: usize) {
        self.tasks.reserve(additional);
    }

    /// A task from a poll. Queued unless already held (queued, delayed or
    /// running), in which case the poll is ignored and the handle comes back —
    /// except that a delayed task held without a handle keeps this one.
    pub fn offer(&mut self, mut meta: TaskMeta, payload: T, now: Now) -> Result<(), T> {
        // Its reports are still on their way: the registry's view is stale.
        if self.outbox.holds(&meta.id) {
            return Err(payload);
        }
        if let Some(slot) = self.tasks.slot_of(&meta.id) {
            let placeholder = self.tasks.at(slot).is_some_and(|held| {
                matches!(held.place, Place::Delayed { .. }) && held.payload.is_none()
            });
            if !placeholder {
                return Err(payload);
            }
            let seq = self.arrive(&mut meta, now);
            let Some(held) = self.tasks.at_mut(slot) else {
                return Err(payload);
            };
            // The task as polled replaces what the placeholder knew of it.
            held.meta = meta;
            held.seq = seq;
            held.payload = Some(payload);
            return Ok(());
        }
        // The registry handed a finished task back: it runs anew.
        self.finished.remove(&meta.id);
        let seq = self.arrive(&mut meta, now);
        let held = HeldTask {
            meta,
            payload: Some(payload),
            place: Place::Queued,
            seq,
        };
        let slot = self.tasks.insert_absent(held);
        enqueue(&mut self.queue, &self.scheduler, &self.tasks, slot);
        self.metrics.tasks_enqueued += 1;
        Ok(())
    }

    /// The delayed tasks: (id, spec name, due), earliest first.
    pub fn delayed_tasks(&self) -> Vec<(TaskId, Arc<str>, MonoNanos)> {
        self.delayed
            .live_sorted(delayed_at(&self.tasks))
            .into_iter()
            .filter_map(|(due, slot)| {
                let held = self.tasks.at(slot)?;
                Some((held.meta.id.clone(), held.meta.spec_name().clone(), due))
            })
            .collect()
    }

    /// Holds a task as delayed until `due` without its handle (a restored
    /// retry): the next poll that returns it attaches the handle, and it is
    /// queued when due. False, and no change, for a task already held.
    pub fn hold_delayed(
        &mut self,
        id: TaskId,
        spec_name: Arc<str>,
        due: MonoNanos,
        now: Now,
    ) -> bool {
        if self.tasks.contains_key(&id) {
            return false;
        }
        let mut meta = TaskMeta::of_spec(id.clone(), spec_name);
        let seq = self.arrive(&mut meta, now);
        let (slot, _) = self.tasks.insert_in_slot(HeldTask {
            meta,
            payload: None,
            place: Place::delayed(due),
            seq,
        });
        self.delayed.insert(due, slot);
        true
    }

    /// Moves retries whose backoff has elapsed back to the ready queue. A
    /// delayed task held without a handle is forgotten instead, so the next
    /// poll that returns it queues it anew. Returns how many were queued.
    pub fn promote_due(&mut self, now: MonoNanos) -> usize {
        let mut queued = 0;
        while let Some((_, slot)) = self.delayed.pop_due(now, delayed_at(&self.tasks)) {
            let Some(held) = self.tasks.at_mut(slot) else {
                continue;
            };
            if held.payload.is_some() {
                held.place = Place::Queued;
                enqueue(&mut self.queue, &self.scheduler, &self.tasks, slot);
                queued += 1;
            } else {
                let id = held.meta.id.clone();
                self.tasks.remove(&id);
            }
        }
        queued
    }

    /// Starts tracking `runner` as running `meta`'s task in a pool: reserves
    /// the pool's and the global capacity. Refused, changing nothing, when the
    /// pool is unknown or full, the global limit is reached, the runner is
    /// already tracked or the task is already held.
    pub fn track_running(
        &mut self,
        mut meta: TaskMeta,
        payload: Option<T>,
        pool_name: &str,
        runner: NewRunner,
        now: Now,
    ) -> Result<(), Refusal> {
        let pool = self
            .pools
            .index(pool_name)
            .ok_or_else(|| Refusal::UnknownPool(pool_name.to_owned()))?;
        if let Some(held) = self.tasks.get(&meta.id) {
            return Err(Refusal::TaskAlreadyHeld {
                task_id: meta.id.to_string(),
                place: describe_place(&held.place, &self.runners),
            });
        }
        if self.runners.get(&runner.runner_id).is_some() {
            return Err(Refusal::RunnerAlreadyTracked(runner.runner_id.to_string()));
        }
        if !self.can_accept_globally() {
            return Err(Refusal::GlobalLimitReached(
                self.limits.max_global_concurrency,
            ));
        }
        if !self.pools.reserve(pool) {
            return Err(Refusal::PoolFull(pool_name.to_owned()));
        }
        self.global_running += 1;
        let seq = self.arrive(&mut meta, now);
        let runner = self.track_runner(meta.id.clone(), pool, runner, now);
        self.tasks.insert(HeldTask {
            meta,
            payload,
            place: Place::Running { runner },
            seq,
        });
        Ok(())
    }

    /// Tracks `runner` as running the task `task_id` in `pool`; the caller,
    /// who checked that the runner is not tracked yet, places the task.
    /// Returns the runner's slot.
    fn track_runner(
        &mut self,
        task_id: TaskId,
        pool: PoolIndex,
        runner: NewRunner,
        now: Now,
    ) -> RunnerSlot {
        let tracked = TrackedRunner {
            runner_id: runner.runner_id,
            task_id,
            slot_id: runner.slot_id,
            pool,
            started_mono: now.mono,
            last_heartbeat: now.mono,
        };
        debug_assert!(self.runners.get(&tracked.runner_id).is_none());
        self.metrics.tasks_assigned += 1;
        match self.runners.insert(tracked) {
            Some(slot) => slot,
            // Not reached (the callers check first); a slot no runner has.
            None => RunnerSlot::MAX,
        }
    }

    /// Takes a task out of whatever place it is in.
    fn take_task(&mut self, task_id: &str) -> Option<HeldTask<T>> {
        let (slot, held) = self.tasks.remove_from_slot(task_id)?;
        match &held.place {
            Place::Queued => dequeue(&mut self.queue, &self.scheduler, &self.tasks, &held, slot),
            Place::Delayed { .. } => self.delayed.forget(delayed_at(&self.tasks)),
            Place::Assigning { .. } => drop(self.take_early(task_id)),
            Place::Running { .. } => {}
        }
        Some(held)
    }

    /// Frees the pool and global capacity a runner held.
    fn free_capacity(&mut self, runner: &TrackedRunner) {
        self.pools.release(runner.pool);
        self.global_running = self.global_running.saturating_sub(1);
    }

    /// Gives back the capacity a runner held; counts never go below zero.
    fn release_runner(&mut self, runner: &TrackedRunner, effects: &mut Vec<Effect<T>>) {
        self.free_capacity(runner);
        if let Some(slot_id) = &runner.slot_id {
            effects.push(Effect::ReleaseSlot {
                task_id: runner.task_id.clone(),
                slot_id: slot_id.clone(),
            });
        }
    }

    /// `handle_task_failure`: the failure of `task_id`, run by `runner_id` if
    /// given (else by whichever runner runs it, if any).
    pub fn fail_task(
        &mut self,
        task_id: &str,
        spec_name: Option<&str>,
        reason: &str,
        runner_id: Option<&str>,
        book: &mut RetryBook,
        now: Now,
    ) -> Result<Outcome<T>, Refusal> {
        let runner = match runner_id {
            // One lookup: the runner is taken unless it runs another task
            // (rare: then it stays tracked and the report is refused).
            Some(rid) => match self.runners.take_if(rid, |r| &*r.task_id == task_id) {
                None => {
                    let early = EarlyReport::Failure {
                        runner_id: Some(RunnerId::from(rid)),
                        reason: Arc::from(reason),
                    };
                    return Ok(self.note_early(task_id, early));
                }
                Some(Err(_)) => {
                    return Err(Refusal::RunnerOfAnotherTask {
                        runner_id: rid.to_owned(),
                        task_id: task_id.to_owned(),
                    });
                }
                Some(Ok(r)) => Some(r),
            },
            None => match self.tasks.get(task_id).map(|t| &t.place) {
                // A stale report for a task that finished: nothing changes.
                None if self.finished.contains(task_id) => return Ok(Outcome::ignored()),
                Some(&Place::Running { runner }) => self.runners.take_at(runner),
                Some(Place::Assigning { .. }) => {
                    let early = EarlyReport::Failure {
                        runner_id: None,
                        reason: Arc::from(reason),
                    };
                    return Ok(self.note_early(task_id, early));
                }
                _ => None,
            },
        };
        let mut effects = Vec::with_capacity(4);
        let failure =
            self.apply_failure(task_id, spec_name, reason, runner, book, now, &mut effects);
        Ok(Outcome {
            applied: true,
            effects,
            failure: Some(failure),
        })
    }

    /// The failure path shared by failures, failed completions and timeouts.
    #[allow(clippy::too_many_arguments)]
    fn apply_failure(
        &mut self,
        task_id: &str,
        spec_name: Option<&str>,
        reason: &str,
        runner: Option<TrackedRunner>,
        book: &mut RetryBook,
        now: Now,
        effects: &mut Vec<Effect<T>>,
    ) -> (TaskId, RecordedFailure) {
        // The runner's ids are moved where they go, not copied.
        let runner_id = runner.map(|r| {
            self.free_capacity(&r);
            if let Some(slot_id) = r.slot_id {
                effects.push(Effect::ReleaseSlot {
                    task_id: r.task_id,
                    slot_id,
                });
            }
            r.runner_id
        });
        // The task leaves the queue or the delayed set but keeps its entry:
        // below the limit it is only re-placed, not removed and re-inserted.
        let slot = self.tasks.slot_of(task_id);
        let held = match slot.and_then(|slot| Some((slot, self.tasks.at(slot)?))) {
            Some((slot, h)) => {
                match &h.place {
                    Place::Queued => {
                        dequeue(&mut self.queue, &self.scheduler, &self.tasks, h, slot)
                    }
                    // Stale once the task is re-placed below.
                    Place::Delayed { .. } => self.delayed.forget(delayed_at(&self.tasks)),
                    Place::Assigning { .. } | Place::Running { .. } => {}
                }
                Some((h.meta.spec_name().clone(), h.meta.id.clone()))
            }
            None => None,
        };
        // A runner's task is always held (`check_invariants`): only a
        // failure reported for a task not held comes here without one.
        let (spec, id): (Arc<str>, TaskId) = match held {
            Some(known) => known,
            None => (
                spec_name
                    .map(shared_name)
                    .unwrap_or_else(|| shared_name("unknown")),
                TaskId::from(task_id),
            ),
        };
        let recorded = book.record_failure(&id, Some(reason), now);
        // The book keeps one copy of each reason text: shared, not copied.
        let reason = match &recorded.info.failure_reason {
            Some(kept) => kept.clone(),
            None => Arc::from(reason),
        };
        if recorded.limit_reached {
            self.failure_stats.permanent_failures.add(&reason);
            let reason = recorded.final_reason(&reason);
            effects.push(Effect::TaskFailed {
                spec_name: spec.clone(),
                task_id: id.clone(),
                runner_id: runner_id.clone(),
                failure_reason: reason.clone(),
                retry_count: recorded.info.retry_count,
            });
            effects.push(Effect::ReportState {
                spec_name: spec,
                task_id: id.clone(),
                state: ReportedState::Failed,
                metadata: StateMetadata::Failed {
                    reason,
                    retries: recorded.info.retry_count,
                    runner_id,
                },
            });
            book.clear(&id);
            self.finished.insert(&id);
            if let Some(payload) = self.tasks.remove(task_id).and_then(|h| h.payload) {
                effects.push(Effect::Discard(payload));
            }
            self.metrics.tasks_failed += 1;
        } else {
            self.failure_stats.retries.add(&reason);
            self.failure_stats.delays.observe(recorded.delay_seconds);
            let due = recorded.due;
            // Nothing was filed in or taken from `tasks` since `slot` was read.
            match slot.and_then(|slot| Some((slot, self.tasks.at_mut(slot)?))) {
                Some((slot, h)) => {
                    h.place = Place::delayed(due);
                    self.delayed.insert(due, slot);
                }
                None => {
                    let mut meta = TaskMeta::of_spec(id.clone(), spec.clone());
                    let seq = self.arrive(&mut meta, now);
                    let (slot, _) = self.tasks.insert_in_slot(HeldTask {
                        meta,
                        payload: None,
                        place: Place::delayed(due),
                        seq,
                    });
                    self.delayed.insert(due, slot);
                }
            }
            effects.push(Effect::ReportState {
                spec_name: spec,
                task_id: id.clone(),
                state: ReportedState::Ready,
                metadata: StateMetadata::Retry {
                    retry_count: recorded.info.retry_count,
                    next_retry_at: recorded.info.next_retry_at,
                    failure_reason: reason,
                },
            });
            self.metrics.retries_scheduled += 1;
        }
        (id, recorded)
    }

    /// `handle_runner_completion`: the first report for a runner wins; later
    /// ones are ignored. A report for `task_id` while its runner is still
    /// being launched is kept and applied once the runner is tracked.
    #[allow(clippy::too_many_arguments)] // the report's fields, as the port gives them
    pub fn complete(
        &mut self,
        runner_id: &str,
        task_id: Option<&str>,
        success: bool,
        timed_out: bool,
        failure_reason: Option<&str>,
        book: &mut RetryBook,
        now: Now,
    ) -> Outcome<T> {
        let Some(runner) = self.runners.take(runner_id) else {
            let early = EarlyReport::Completion {
                runner_id: RunnerId::from(runner_id),
                success,
                timed_out,
                reason: failure_reason.map(Arc::from),
            };
            return match task_id {
                Some(task_id) => self.note_early(task_id, early),
                None => self.note_orphan(early),
            };
        };
        let execution_time = nanos_to_seconds(now.mono.saturating_sub(runner.started_mono));
        if !success {
            // A failure makes up to five effects; one allocation for all.
            let mut effects = Vec::with_capacity(5);
            let reason = failure_reason.map(Arc::from);
            effects.push(Effect::RunnerFinished {
                spec_name: self.spec_of(&runner.task_id),
                task_id: runner.task_id.clone(),
                runner_id: runner.runner_id.clone(),
                slot_id: runner.slot_id.clone(),
                success,
                execution_time_seconds: execution_time,
                failure_reason: reason.clone(),
            });
            if timed_out {
                // Stopped at its time limit by the runner's own watcher.
                self.metrics.runner_timeouts += 1;
            }
            let task_id = runner.task_id.clone();
            let reason = reason.unwrap_or_else(|| Arc::from("unknown"));
            let failure = self.apply_failure(
                &task_id,
                None,
                &reason,
                Some(runner),
                book,
                now,
                &mut effects,
            );
            return Outcome {
                applied: true,
                effects,
                failure: Some(failure),
            };
        }
        self.free_capacity(&runner);
        let held = self.take_task(&runner.task_id);
        book.record_success(&runner.task_id);
        self.finished.insert(&runner.task_id);
        self.metrics.tasks_completed += 1;
        // The runner's task is held while it runs (`check_invariants`).
        let (spec_name, handle) = match held {
            Some(held) => (held.meta.names.spec.clone(), held.payload),
            None => (shared_name("unknown"), None),
        };
        let TrackedRunner {
            runner_id,
            task_id,
            slot_id,
            ..
        } = runner;
        let mut effects = Vec::with_capacity(2);
        effects.push(Effect::Completed(Completion {
            spec_name,
            task_id,
            runner_id,
            slot_id,
            execution_time_seconds: execution_time,
            completed_at: now.wall,
            delivered: 0,
        }));
        effects.extend(handle.map(Effect::Discard));
        Outcome {
            applied: true,
            effects,
            failure: None,
        }
    }

    /// One scheduling pass: picks queued tasks and pools by the policy and
    /// reserves their capacity (pool and global) before any port is called.
    /// Nothing is picked once stopping.
    pub fn schedule(&mut self) -> Vec<Reservation<T>> {
        let budget = self
            .limits
            .max_global_concurrency
            .saturating_sub(self.global_running);
        if !self.accepting || budget == 0 || self.queue.is_empty() {
            return Vec::new();
        }
        let picks =
            self.scheduler
                .plan(&mut self.queue, order_in(&self.tasks), &self.pools, budget);
        // Each reservation that launches becomes a tracked runner.
        self.runners.reserve(picks.len());
        let mut reservations = Vec::with_capacity(picks.len());
        for (slot, pool) in picks {
            let Some(held) = self.tasks.at_mut(slot) else {
                continue;
            };
            // Queued tasks always have a handle (they came from a poll), and
            // the plan kept to the pools' room: neither check fails, but a
            // task that cannot be reserved goes back to the queue.
            let reserved = held.payload.is_some() && self.pools.reserve(pool);
            let Some(payload) = held.payload.take().filter(|_| reserved) else {
                enqueue(&mut self.queue, &self.scheduler, &self.tasks, slot);
                continue;
            };
            held.place = Place::Assigning {
                pool: ReservedPool::new(pool),
            };
            self.global_running += 1;
            reservations.push(Reservation {
                meta: held.meta.clone(),
                payload,
                pool,
                pool_name: self.pools.get(pool).name.clone(),
            });
        }
        reservations
    }

    /// The pool a task's reservation holds, if it is being assigned.
    fn reserved_pool(&self, task_id: &str) -> Option<PoolIndex> {
        match self.tasks.get(task_id).map(|t| &t.place) {
            Some(Place::Assigning { pool, .. }) => Some(pool.index()),
            _ => None,
        }
    }

    fn release_reservation(&mut self, pool: PoolIndex) {
        self.pools.release(pool);
        self.global_running = self.global_running.saturating_sub(1);
    }

    /// Keeps the first outcome reported for a task whose runner is being
    /// launched; anything else is ignored.
    fn note_early(&mut self, task_id: &str, report: EarlyReport) -> Outcome<T> {
        match self.tasks.get(task_id) {
            Some(held)
                if matches!(held.place, Place::Assigning { .. })
                    && !self.early_reports.contains_key(task_id) =>
            {
                self.early_reports.insert(held.meta.id.clone(), report);
                Outcome::accepted()
            }
            _ => Outcome::ignored(),
        }
    }

    /// The early report of a task leaving `Assigning`, if one came.
    fn take_early(&mut self, task_id: &str) -> Option<EarlyReport> {
        if self.early_reports.is_empty() {
            return None;
        }
        self.early_reports.remove(task_id)
    }

    /// A completion for a runner not tracked, without a task id: while a
    /// launch is in progress it may be for the runner being launched, so it
    /// is kept for `confirm_assignment`; otherwise it is stale.
    fn note_orphan(&mut self, report: EarlyReport) -> Outcome<T> {
        let assigning = self.global_running > self.runners.len() as u64;
        if !assigning || self.orphan_completions.len() >= MAX_ORPHAN_COMPLETIONS {
            return Outcome::ignored();
        }
        self.orphan_completions.push(report);
        Outcome::accepted()
    }

    /// The orphan completion for `runner_id`, if one came; orphans are
    /// dropped once no launch is in progress.
    fn take_orphan(&mut self, runner_id: &str) -> Option<EarlyReport> {
        let found = self
            .orphan_completions
            .iter()
            .position(|r| matches!(r, EarlyReport::Completion { runner_id: rid, .. } if &**rid == runner_id))
            .map(|i| self.orphan_completions.swap_remove(i));
        found
    }

    fn prune_orphans(&mut self) {
        if self.global_running <= self.runners.len() as u64 {
            self.orphan_completions.clear();
        }
    }

    /// No slot for a reservation: the capacity is given back and the task
    /// returns to its place in the queue; nothing is counted.
    pub fn abort_assignment(&mut self, task_id: &str, payload: T) -> Outcome<T> {
        let Some(pool) = self.reserved_pool(task_id) else {
            return Outcome::returning(payload);
        };
        // What its runner reported is moot: it was never started.
        self.take_early(task_id);
        self.release_reservation(pool);
        self.prune_orphans();
        let Some((slot, held)) = self.tasks.get_mut_in_slot(task_id) else {
            return Outcome::returning(payload);
        };
        held.payload = Some(payload);
        held.place = Place::Queued;
        enqueue(&mut self.queue, &self.scheduler, &self.tasks, slot);
        Outcome::accepted()
    }

    /// The launch failed: the capacity and the slot (if any) are released
    /// and the task takes the failure path with `reason`.
    pub fn fail_assignment(
        &mut self,
        task_id: &str,
        payload: T,
        slot_id: Option<SlotId>,
        reason: &str,
        book: &mut RetryBook,
        now: Now,
    ) -> Outcome<T> {
        let Some(pool) = self.reserved_pool(task_id) else {
            return Outcome::returning(payload);
        };
        self.take_early(task_id);
        self.release_reservation(pool);
        self.prune_orphans();
        let mut effects = Vec::new();
        if let Some(slot_id) = slot_id {
            effects.push(Effect::ReleaseSlot {
                task_id: TaskId::from(task_id),
                slot_id,
            });
        }
        if let Some(held) = self.tasks.get_mut(task_id) {
            held.payload = Some(payload);
        }
        let failure = self.apply_failure(task_id, None, reason, None, book, now, &mut effects);
        Outcome {
            applied: true,
            effects,
            failure: Some(failure),
        }
    }

    /// The runner is launched: it is tracked, RUNNING is reported and the
    /// events recorded. An outcome reported meanwhile is applied now; after
    /// a forced stop the runner is stopped at once.
    pub fn confirm_assignment(
        &mut self,
        task_id: &str,
        payload: T,
        runner: NewRunner,
        book: &mut RetryBook,
        now: Now,
    ) -> Outcome<T> {
        let Some(slot) = self.tasks.slot_of(task_id) else {
            return Outcome::returning(payload);
        };
        let pool = match self.tasks.at(slot).map(|t| &t.place) {
            Some(Place::Assigning { pool, .. }) => pool.index(),
            _ => return Outcome::returning(payload),
        };
        if self.runners.get(&runner.runner_id).is_some() {
            let reason = format!(
                "launch failed: runner id {:?} is already tracked",
                runner.runner_id
            );
            return self.fail_assignment(task_id, payload, runner.slot_id, &reason, book, now);
        }
        // The task stays in its slot: only its place and handle change.
        let Some(held) = self.tasks.at_mut(slot) else {
            return Outcome::returning(payload);
        };
        // It was `Assigning` (checked above): its early report, if any,
        // leaves the side table now. Its place names the runner once it is
        // tracked, below.
        held.payload = Some(payload);
        let id = held.meta.id.clone();
        let names = held.meta.names.clone();
        let early = self
            .take_early(&id)
            .or_else(|| self.take_orphan(&runner.runner_id));
        let runner_id = runner.runner_id.clone();
        let mut effects = Vec::with_capacity(2);
        effects.push(Effect::Started(Start {
            spec_name: names.spec.clone(),
            task_id: id.clone(),
            runner_id: runner_id.clone(),
            slot_id: runner.slot_id.clone(),
            pool_name: self.pools.get(pool).name.clone(),
            details: runner.details.clone(),
            started_at: runner.started_at.unwrap_or(now.wall),
            confirmed_at: now.wall,
            delivered: 0,
        }));
        let tracked = self.track_runner(id.clone(), pool, runner, now);
        if let Some(held) = self.tasks.at_mut(slot) {
            held.place = Place::Running { runner: tracked };
        }
        let mut failure = None;
        if self.forced {
            self.interrupt(&runner_id, now, &mut effects);
        } else if let Some(report) = early {
            let later = match report {
                EarlyReport::Completion {
                    runner_id: rid,
                    success,
                    timed_out,
                    reason,
                } if rid == runner_id => {
                    self.complete(&rid, None, success, timed_out, reason.as_deref(), book, now)
                }
                EarlyReport::Failure {
                    runner_id: rid,
                    reason,
                } if rid.as_ref().is_none_or(|r| *r == runner_id) => self
                    .fail_task(&id, None, &reason, Some(&runner_id), book, now)
                    .unwrap_or_else(|_| Outcome::ignored()),
                // Reported for some other runner: not this one's outcome.
                _ => Outcome::ignored(),
            };
            effects.extend(later.effects);
            failure = later.failure;
        }
        self.prune_orphans();
        Outcome {
            applied: true,
            effects,
            failure,
        }
    }

    /// Forces one runner to stop: the launcher stops it, its capacity and
    /// slot are released, its task is reported READY (`interrupted`) and
    /// queued again for when the dispatcher restarts. Not a failure: the
    /// retry count is unchanged.
    fn interrupt(&mut self, runner_id: &str, now: Now, effects: &mut Vec<Effect<T>>) {
        let Some(runner) = self.runners.take(runner_id) else {
            return;
        };
        let spec_name = self.spec_of(&runner.task_id);
        effects.push(Effect::StopRunner {
            task_id: runner.task_id.clone(),
            runner_id: runner.runner_id.clone(),
        });
        effects.push(Effect::RunnerFinished {
            spec_name: spec_name.clone(),
            task_id: runner.task_id.clone(),
            runner_id: runner.runner_id.clone(),
            slot_id: runner.slot_id.clone(),
            success: false,
            execution_time_seconds: nanos_to_seconds(now.mono.saturating_sub(runner.started_mono)),
            failure_reason: Some(Arc::from("interrupted")),
        });
        self.release_runner(&runner, effects);
        effects.push(Effect::ReportState {
            spec_name,
            task_id: runner.task_id.clone(),
            state: ReportedState::Ready,
            metadata: StateMetadata::Interrupted,
        });
        match self.tasks.get_mut_in_slot(&runner.task_id) {
            Some((slot, held)) if held.payload.is_some() => {
                held.place = Place::Queued;
                enqueue(&mut self.queue, &self.scheduler, &self.tasks, slot);
            }
            _ => {
                self.tasks.remove(&runner.task_id);
            }
        }
        self.metrics.runners_force_stopped += 1;
    }

    /// The spec name of a held task (a runner's task always is; see
    /// `check_invariants`).
    fn spec_of(&self, task_id: &str) -> Arc<str> {
        match self.tasks.get(task_id) {
            Some(held) => held.meta.names.spec.clone(),
            None => shared_name("unknown"),
        }
    }

    /// `stop()` after the grace period: every runner still tracked is forced
    /// to stop, and any launched later is stopped as soon as it is tracked.
    pub fn force_stop(&mut self, now: Now) -> Outcome<T> {
        self.accepting = false;
        self.forced = true;
        let mut ids = self.runners.ids();
        ids.sort();
        let mut effects = Vec::new();
        for id in &ids {
            self.interrupt(id, now, &mut effects);
        }
        Outcome {
            applied: !ids.is_empty(),
            effects,
            failure: None,
        }
    }

    pub fn heartbeat(&mut self, runner_id: &str, now: Now) -> bool {
        self.runners.heartbeat(runner_id, now.mono)
    }

    /// One runner's timeout: the failure path with reason `timeout`.
    pub fn time_out(&mut self, runner_id: &str, book: &mut RetryBook, now: Now) -> Outcome<T> {
        let Some(runner) = self.runners.take(runner_id) else {
            return Outcome::ignored();
        };
        self.metrics.runner_timeouts += 1;
        let task_id = runner.task_id.clone();
        let mut effects = Vec::new();
        let failure = self.apply_failure(
            &task_id,
            None,
            "timeout",
            Some(runner),
            book,
            now,
            &mut effects,
        );
        Outcome {
            applied: true,
            effects,
            failure: Some(failure),
        }
    }

    /// Every runner silent for longer than the heartbeat timeout, timed out.
    pub fn check_heartbeats(&mut self, book: &mut RetryBook, now: Now) -> Vec<Outcome<T>> {
        let silent = self
            .runners
            .silent_since(now.mono, self.limits.heartbeat_timeout);
        silent
            .iter()
            .map(|id| self.time_out(id, book, now))
            .collect()
    }

    /// Changes a held task's priority (reordering the queue if it is queued).
    pub fn set_priority(&mut self, task_id: &str, priority: i64) -> bool {
        let Some((slot, held)) = self
            .tasks
            .slot_of(task_id)
            .and_then(|slot| Some((slot, self.tasks.at(slot)?)))
        else {
            return false;
        };
        // The queue reads a task's order from its entry: out while it changes.
        let queued = held.place == Place::Queued;
        if queued {
            dequeue(&mut self.queue, &self.scheduler, &self.tasks, held, slot);
        }
        if let Some(held) = self.tasks.at_mut(slot) {
            held.meta.priority = priority;
        }
        if queued {
            enqueue(&mut self.queue, &self.scheduler, &self.tasks, slot);
        }
        true
    }

    pub fn set_pool_enabled(&mut self, name: &str, enabled: bool) -> Result<(), Refusal> {
        let index = self
            .pools
            .index(name)
            .ok_or_else(|| Refusal::UnknownPool(name.to_owned()))?;
        self.pools.set_enabled(index, enabled);
        Ok(())
    }

    /// The counts and pools, O(pools); with `per_task`, also each delayed
    /// task's next retry time, O(delayed).
    pub fn status(&self, book: &RetryBook, per_task: bool) -> StatusSnapshot {
        let listed = match per_task {
            true => self.delayed.live_sorted(delayed_at(&self.tasks)),
            false => Vec::new(),
        };
        let delayed = listed
            .into_iter()
            .filter_map(|(_, slot)| {
                let id = &self.tasks.at(slot)?.meta.id;
                let due = book.due_of(id);
                Some(DelayedTask {
                    task_id: id.clone(),
                    next_retry_at: due.map_or(WallTime::MAX, |(at, _)| at),
                    record: due.map(|(_, index)| index),
                })
            })
            .collect();
        StatusSnapshot {
            queue_size: self.queue.len(),
            delayed,
            delayed_count: self.delayed.len(),
            running_tasks: self.runners.len(),
            global_running: self.global_running,
            max_global_concurrency: self.limits.max_global_concurrency,
            pools: self.pools.iter().map(|(_, p)| p.clone()).collect(),
            metrics: self.metrics,
            failure_stats: self.failure_stats.clone(),
            pending_reports: self.outbox.pending(),
            pending_report_tasks: self.outbox.pending_tasks(),
            delivery: self.outbox.stats(),
        }
    }

    /// Checks every invariant of SPEC §4.5 that the state alone can see;
    /// `Err` names the first one broken. Used by tests.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut per_pool = vec![0u64; self.pools.len()];
        let mut reserved = 0u64;
        for t in self.tasks.values() {
            if let Place::Assigning { pool, .. } = t.place {
                per_pool[pool.index()] += 1;
                reserved += 1;
            }
        }
        for (slot, r) in self.runners.entries() {
            per_pool[r.pool] += 1;
            match self.tasks.get(&r.task_id).map(|t| &t.place) {
                Some(&Place::Running { runner }) if runner == slot => {}
                other => return Err(format!("runner {} but task place {other:?}", r.runner_id)),
            }
        }
        for (i, pool) in self.pools.iter() {
            if pool.running != per_pool[i] {
                return Err(format!(
                    "pool {} count {} != {}",
                    pool.name, pool.running, per_pool[i]
                ));
            }
            if pool.running > pool.max_concurrency {
                return Err(format!("pool {} over its limit", pool.name));
            }
        }
        for task_id in self.early_reports.keys() {
            match self.tasks.get(task_id).map(|t| &t.place) {
                Some(Place::Assigning { .. }) => {}
                other => {
                    return Err(format!(
                        "early report for task {task_id} in place {other:?}"
                    ))
                }
            }
        }
        if self.global_running != self.runners.len() as u64 + reserved {
            return Err(format!(
                "global count {} != runners {} + reservations {reserved}",
                self.global_running,
                self.runners.len()
            ));
        }
        let queued = self
            .tasks
            .values()
            .filter(|t| t.place == Place::Queued)
            .count();
        let delayed = self
            .tasks
            .values()
            .filter(|t| matches!(t.place, Place::Delayed { .. }))
            .count();
        if queued != self.queue.len() || delayed != self.delayed.len() {
            return Err("queue or delayed index out of step with task places".to_owned());
        }
        for slot in self.queue.ids_in_order(order_in(&self.tasks)) {
            if self.tasks.at(slot).is_none_or(|t| t.place != Place::Queued) {
                return Err(format!("queue entry for slot {slot} is stale"));
            }
        }
        if !self.queue.in_order(order_in(&self.tasks)) {
            return Err("a queued task's order changed while it was queued".to_owned());
        }
        let listed = self.delayed.live_sorted(delayed_at(&self.tasks));
        if listed.len() != self.delayed.len() {
            return Err("delayed index holds a task twice or misses one".to_owned());
        }
        for (due, slot) in listed {
            match self.tasks.at(slot) {
                Some(t) if t.place == Place::delayed(due) => {}
                _ => return Err(format!("delayed index entry ({due}, slot {slot}) is stale")),
            }
        }
        Ok(())
    }
}

/// Whether `tasks` holds a task delayed until `due` in `slot`: a live entry
/// of the delayed index.
fn delayed_at<T>(tasks: &KeyedSlab<HeldTask<T>>) -> impl Fn(MonoNanos, u32) -> bool + '_ {
    move |due, slot| {
        tasks
            .at(slot)
            .is_some_and(|t| t.place == Place::delayed(due))
    }
}

/// Puts a queued task, held in `slot`, in the ready queue on its route.
fn enqueue<T>(
    queue: &mut ReadyQueue<u32>,
    scheduler: &Scheduler,
    tasks: &KeyedSlab<HeldTask<T>>,
    slot: u32,
) {
    let Some(held) = tasks.at(slot) else {
        return;
    };
    let route = scheduler.route_of(held.meta.required_skill());
    queue.push(slot, queue_key(held, &route), order_in(tasks));
}

/// Takes a queued task out of the ready queue: `held`, which was in `slot`
/// (and may have left `tasks` already).
fn dequeue<T>(
    queue: &mut ReadyQueue<u32>,
    scheduler: &Scheduler,
    tasks: &KeyedSlab<HeldTask<T>>,
    held: &HeldTask<T>,
    slot: u32,
) {
    let route = scheduler.route_of(held.meta.required_skill());
    queue.remove(&slot, queue_key(held, &route), order_in(tasks));
}

/// The queue order of the task in a slot, read from its entry. The queue
/// holds only slot numbers; a slot without a task (a queue out of step,
/// which `check_invariants` reports) sorts last.
fn order_in<T>(tasks: &KeyedSlab<HeldTask<T>>) -> impl Fn(&u32) -> QueueOrder + '_ {
    |&slot| match tasks.at(slot) {
        Some(held) => held.order(),
        None => QueueOrder {
            priority: i64::MIN,
            age: i64::MAX,
            seq: u64::MAX,
        },
    }
}

fn queue_key<'a, T>(held: &'a HeldTask<T>, route: &'a Route) -> QueueKey<'a> {
    QueueKey {
        order: held.order(),
        route,
        spec: held.meta.spec_name(),
    }
}

fn describe_place(place: &Place, runners: &Runners) -> String {
    match place {
        Place::Queued => "queued".to_owned(),
        Place::Delayed { .. } => "waiting for a retry".to_owned(),
        Place::Assigning { .. } => "being assigned".to_owned(),
        Place::Running { runner } => match runners.at(*runner) {
            Some(r) => format!("running on runner {:?}", r.runner_id),
            None => "running".to_owned(),
        },
    }
}

#[cfg(test)]
mod tests;
