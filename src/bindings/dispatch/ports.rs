//! Calling the ports: the effects the core decided, and the slot allocation
//! and launch of an assignment. Every call here happens with no lock held.

use std::borrow::Cow;
use std::cell::RefCell;
use std::sync::Arc;

use log::Level;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};
use pyo3::IntoPyObjectExt;

use super::delivery::is_interrupt;
use super::settings::{attr_opt, optional_arc};
use super::{PyDispatcherCore, LOG_TARGET};
use crate::bindings::call::{call_method, KeywordNames};
use crate::bindings::logging;
use crate::bindings::names::name;
use crate::bindings::{args, time::datetime};
use crate::dispatch::runners::RunnerDetails;
use crate::dispatch::state::{
    Completion, CompletionPart, Effect, NewRunner, ReportedState, Reservation, Start,
    StateMetadata, TaskMeta,
};
use crate::id::{Id, RunnerId, SlotId, TaskId};
use crate::time::wall::WallTime;

/// The outside world, injected. Each may be None (its calls are skipped).
pub struct Ports {
    pub config: Py<PyAny>,
    pub task_source: Py<PyAny>,
    pub task_registry: Py<PyAny>,
    pub repo_pool_manager: Py<PyAny>,
    pub runner_launcher: Py<PyAny>,
    pub event_recorder: Py<PyAny>,
    pub task_state_type: Py<PyAny>,
    /// The configured pool objects, by pool index, for `launch`.
    pub pool_objects: Vec<Py<PyAny>>,
    /// The pools' names as `str`, by pool index, made once for every report.
    pub pool_names: Vec<Py<PyString>>,
    /// `task_state_type` applied to each state, when it accepts them all.
    pub states: Option<[Py<PyAny>; 4]>,
}

impl Ports {
    fn clone_ref(&self, py: Python<'_>) -> Ports {
        Ports {
            config: self.config.clone_ref(py),
            task_source: self.task_source.clone_ref(py),
            task_registry: self.task_registry.clone_ref(py),
            repo_pool_manager: self.repo_pool_manager.clone_ref(py),
            runner_launcher: self.runner_launcher.clone_ref(py),
            event_recorder: self.event_recorder.clone_ref(py),
            task_state_type: self.task_state_type.clone_ref(py),
            pool_objects: self.pool_objects.iter().map(|p| p.clone_ref(py)).collect(),
            pool_names: self.pool_names.iter().map(|p| p.clone_ref(py)).collect(),
            states: self
                .states
                .as_ref()
                .map(|s| s.each_ref().map(|v| v.clone_ref(py))),
        }
    }
}

/// How one assignment ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Assigned {
    Launched,
    /// No slot (or the allocation raised): the task is queued again.
    NoSlot,
    /// The launch raised: the task took the failure path.
    LaunchFailed,
}

/// What the slot allocation gave: the slot object for `launch` and its id.
struct Slot<'py> {
    object: Bound<'py, PyAny>,
    id: Option<SlotId>,
    /// The id as the port gave it, passed on to the reports unchanged.
    id_text: Option<Bound<'py, PyString>>,
}

/// `str` objects for the spec and repo names assignments pass, kept across
/// calls: a job has a few names and many tasks. Each entry holds its name's
/// `Arc`, so no other text can come to have that address.
#[derive(Default)]
pub(super) struct NameTexts {
    entries: Vec<(Arc<str>, Py<PyString>)>,
    /// The entry a new name replaces once all are taken.
    next: usize,
}

impl NameTexts {
    const CAPACITY: usize = 16;

    fn find<'py>(&self, py: Python<'py>, name: &Arc<str>) -> Option<Bound<'py, PyString>> {
        self.entries
            .iter()
            .find(|(kept, _)| Arc::ptr_eq(kept, name) || **kept == **name)
            .map(|(_, text)| text.bind(py).clone())
    }

    /// Keeps `text` for `name`; returns the entry it replaced, to be
    /// dropped once the lock is released.
    fn keep(&mut self, name: Arc<str>, text: Py<PyString>) -> Option<(Arc<str>, Py<PyString>)> {
        if self.entries.len() < Self::CAPACITY {
            self.entries.push((name, text));
            return None;
        }
        let at = self.next % Self::CAPACITY;
        self.next = at + 1;
        Some(std::mem::replace(&mut self.entries[at], (name, text)))
    }
}

impl PyDispatcherCore {
    /// The `str` for a spec or repo name, made once while it stays in use.
    fn name_text<'py>(&self, py: Python<'py>, name: &Arc<str>) -> Bound<'py, PyString> {
        if let Some(text) = self.name_texts.lock().find(py, name) {
            return text;
        }
        let text = PyString::new(py, name);
        let replaced = self
            .name_texts
            .lock()
            .keep(name.clone(), text.clone().unbind());
        drop(replaced);
        text
    }
}

/// The texts an assignment passes to several ports, made once for all of
/// them: the slot request's metadata and the launch's reports.
struct AssignmentTexts<'py> {
    task_id: Bound<'py, PyString>,
    spec_name: Bound<'py, PyString>,
    pool_name: Bound<'py, PyString>,
}

impl PyDispatcherCore {
    pub(super) fn port(&self, py: Python<'_>, pick: fn(&Ports) -> &Py<PyAny>) -> Py<PyAny> {
        pick(&self.ports.read()).clone_ref(py)
    }

    /// Replaces one port. The ports are an immutable snapshot behind an
    /// `Arc`, so an outcome in progress keeps the ones it started with.
    pub(super) fn set_port(
        &self,
        pick: fn(&mut Ports) -> &mut Py<PyAny>,
        value: &Bound<'_, PyAny>,
    ) {
        self.update_ports(value.py(), |ports| {
            *pick(ports) = value.clone().unbind();
        });
    }

    pub(super) fn update_ports(&self, py: Python<'_>, change: impl FnOnce(&mut Ports)) {
        let old = {
            let mut guard = self.ports.write();
            let mut ports = guard.clone_ref(py);
            change(&mut ports);
            std::mem::replace(&mut *guard, Arc::new(ports))
        };
        drop(old); // after the lock: dropping may run Python code
    }

    /// The ports effects use: the current snapshot, taken once per outcome.
    pub(super) fn effect_ports<'a, 'py>(
        &self,
        py: Python<'py>,
        known: KnownTexts<'a, 'py>,
    ) -> EffectPorts<'a, 'py> {
        EffectPorts {
            py,
            ports: Arc::clone(&self.ports.read()),
            texts: RefCell::new(TextMemo::default()),
            known,
        }
    }

    /// Carries out one reservation: allocate a slot, launch, and report back
    /// to the core. The capacity stays reserved throughout, and is released
    /// on every path that does not end in a tracked runner. Ctrl-C or
    /// `SystemExit` in a port puts the task back in the queue (slot
    /// released), then reaches the caller.
    pub(super) fn assign(
        &self,
        py: Python<'_>,
        reservation: Reservation<Py<PyAny>>,
    ) -> PyResult<Assigned> {
        let Reservation {
            meta,
            payload,
            pool,
            pool_name,
        } = reservation;
        let (pool_object, pool_text) = {
            let ports = self.ports.read();
            (
                ports.pool_objects.get(pool).map(|p| p.clone_ref(py)),
                ports.pool_names.get(pool).map(|p| p.clone_ref(py)),
            )
        };
        let texts = AssignmentTexts {
            task_id: PyString::new(py, &meta.id),
            spec_name: self.name_text(py, meta.spec_name()),
            pool_name: match pool_text {
                Some(text) => text.into_bound(py),
                None => PyString::new(py, &pool_name),
            },
        };
        let slot = match self.allocate_slot(py, &meta, &texts) {
            Ok(Some(slot)) => slot,
            result => {
                let interrupt = match result {
                    Err(e) if is_interrupt(py, &e) => Some(e),
                    Err(e) => {
                        log::error!(
                            target: LOG_TARGET,
                            "allocate_slot for task {:?} (repo {:?}) failed: {e}",
                            meta.id,
                            meta.repo_name()
                        );
                        None
                    }
                    Ok(_) => {
                        log::debug!(
                            target: LOG_TARGET,
                            "no slot free for task {:?} (repo {:?}); it stays queued",
                            meta.id,
                            meta.repo_name()
                        );
                        None
                    }
                };
                self.settle(py, KnownTexts::default(), |state, _, _| {
                    state.abort_assignment(&meta.id, payload)
                })?;
                return match interrupt {
                    Some(e) => Err(e),
                    None => Ok(Assigned::NoSlot),
                };
            }
        };
        let pool_object = pool_object.unwrap_or_else(|| py.None());
        match self.launch(py, &payload, &slot, pool_object) {
            Ok((runner, runner_text)) => {
                if logging::may_want(py, LOG_TARGET, Level::Info) {
                    log::info!(
                        target: LOG_TARGET,
                        "assigned task {:?} to pool {pool_name:?} (runner {:?}, slot {:?})",
                        meta.id,
                        runner.runner_id,
                        runner.slot_id
                    );
                }
                // The launch's reports pass on these texts: the same objects,
                // not new copies of them.
                let mut known = KnownTexts::default();
                for text in [&texts.task_id, &texts.spec_name, &texts.pool_name]
                    .into_iter()
                    .chain(&slot.id_text)
                    .chain(&runner_text)
                {
                    known.remember(text);
                }
                self.settle(py, known, |state, book, now| {
                    state.confirm_assignment(&meta.id, payload, runner, book, now)
                })?;
                Ok(Assigned::Launched)
            }
            Err(e) if is_interrupt(py, &e) => {
                // Not the task's failure: it goes back to the queue, its
                // slot is released, and the interrupt reaches the caller.
                self.settle(py, KnownTexts::default(), |state, _, _| {
                    let mut outcome = state.abort_assignment(&meta.id, payload);
                    if let Some(slot_id) = slot.id.clone() {
                        outcome.effects.push(Effect::ReleaseSlot {
                            task_id: meta.id.clone(),
                            slot_id,
                        });
                    }
                    outcome
                })?;
                Err(e)
            }
            Err(e) => {
                let reason = format!("launch failed: {e}");
                log::error!(target: LOG_TARGET, "task {:?}: {reason}", meta.id);
                self.settle(py, KnownTexts::default(), |state, book, now| {
                    state.fail_assignment(&meta.id, payload, slot.id, &reason, book, now)
                })?;
                Ok(Assigned::LaunchFailed)
            }
        }
    }

    /// `allocate_slot(repo_name, metadata=...)`; without a repo pool manager
    /// the runner gets no slot.
    fn allocate_slot<'py>(
        &self,
        py: Python<'py>,
        meta: &TaskMeta,
        texts: &AssignmentTexts<'py>,
    ) -> PyResult<Option<Slot<'py>>> {
        let manager = self.port(py, |p| &p.repo_pool_manager).into_bound(py);
        if manager.is_none() {
            return Ok(Some(Slot {
                object: py.None().into_bound(py),
                id: None,
                id_text: None,
            }));
        }
        static METADATA: KeywordNames = KeywordNames::new(&["metadata"]);
        let metadata = PyDict::new(py);
        metadata.set_item(name!(py, "task_id"), &texts.task_id)?;
        metadata.set_item(name!(py, "spec_name"), &texts.spec_name)?;
        metadata.set_item(name!(py, "pool_name"), &texts.pool_name)?;
        let slot = call_method(
            &manager,
            name!(py, "allocate_slot"),
            &[self.name_text(py, meta.repo_name()).into_any()],
            &METADATA,
            &[metadata.into_any()],
        )?;
        if slot.is_none() {
            return Ok(None);
        }
        let (raw_id, id) = id_attribute(&slot, name!(py, "slot_id"), "slot", "the allocated slot")?;
        let id = match id {
            Ok(id) => id,
            Err(e) => {
                // A slot the core cannot track is given back at once, so
                // the pool does not lose it.
                if let Some(raw) = raw_id {
                    let kwargs = PyDict::new(py);
                    kwargs.set_item("cleanup", true)?;
                    if let Err(release) =
                        manager.call_method("release_slot", (&raw,), Some(&kwargs))
                    {
                        log::error!(target: LOG_TARGET, "release_slot({raw}) of an unusable slot failed: {release}");
                    }
                }
                return Err(e);
            }
        };
        Ok(Some(Slot {
            object: slot,
            id: Some(id),
            id_text: exact_str(raw_id),
        }))
    }

    /// `launch(task, slot, pool)`, and what the returned runner tells.
    fn launch<'py>(
        &self,
        py: Python<'py>,
        task: &Py<PyAny>,
        slot: &Slot<'py>,
        pool: Py<PyAny>,
    ) -> PyResult<(NewRunner, Option<Bound<'py, PyString>>)> {
        let launcher = self.port(py, |p| &p.runner_launcher).into_bound(py);
        let runner = launcher.call_method1(name!(py, "launch"), (task, &slot.object, pool))?;
        let (raw_id, runner_id) = id_attribute(
            &runner,
            name!(py, "runner_id"),
            "runner",
            "the launched runner",
        )?;
        let runner_id = match runner_id {
            Ok(id) => id,
            Err(e) => {
                // A runner the core cannot track is stopped, so it does not
                // run on unwatched.
                let stop = name!(py, "stop");
                match raw_id {
                    Some(raw) if launcher.hasattr(stop).unwrap_or(false) => {
                        if let Err(stop_err) = launcher.call_method1(stop, (&raw,)) {
                            log::error!(target: LOG_TARGET, "stop({raw}) of an untrackable runner failed: {stop_err}");
                        }
                    }
                    _ => log::error!(
                        target: LOG_TARGET,
                        "a launched runner cannot be tracked nor stopped: {e}"
                    ),
                }
                return Err(e);
            }
        };
        // The optional details are informational: a malformed one is dropped
        // (and logged) rather than losing track of a runner that is running.
        let optional = |name: &Bound<'py, PyString>| -> Option<Bound<'py, PyAny>> {
            attr_opt(&runner, name)
                .ok()
                .flatten()
                .filter(|v| !v.is_none())
        };
        let pid = optional(name!(py, "pid"))
            .and_then(|p| lenient("pid", args::saturating_int("runner.pid", &p).map(Some)));
        let container_id = lenient(
            "container_id",
            optional_arc(
                "runner.container_id",
                optional(name!(py, "container_id")).as_ref(),
            ),
        );
        let job_name = lenient(
            "job_name",
            optional_arc("runner.job_name", optional(name!(py, "job_name")).as_ref()),
        );
        let started_at = optional(name!(py, "started_at")).and_then(|s| {
            lenient(
                "started_at",
                datetime::optional_from_py("runner.started_at", &s),
            )
        });
        let runner = NewRunner {
            runner_id,
            slot_id: slot.id.clone(),
            started_at,
            details: RunnerDetails::new(pid, container_id, job_name),
        };
        Ok((runner, exact_str(raw_id)))
    }
}

/// A port's id as a `str` to pass on, when it is exactly one (a subclass
/// would carry its own behaviour into the other ports).
fn exact_str(raw: Option<Bound<'_, PyAny>>) -> Option<Bound<'_, PyString>> {
    raw.and_then(|r| r.cast_into_exact::<PyString>().ok())
}

/// An id attribute of a port's result (`slot.slot_id`, `runner.runner_id`):
/// what it holds, and the id when it is a `str`. The outer error is the
/// attribute read raising; the inner one says why the id cannot be used.
#[allow(clippy::type_complexity)]
fn id_attribute<'py, I: for<'t> From<&'t str>>(
    object: &Bound<'py, PyAny>,
    attribute: &Bound<'py, PyString>,
    name: &str,
    description: &str,
) -> PyResult<(Option<Bound<'py, PyAny>>, PyResult<I>)> {
    let raw = attr_opt(object, attribute)?;
    let id = match &raw {
        // The argument's name is formatted only for an error message.
        Some(value) => match value
            .cast::<PyString>()
            .ok()
            .and_then(|s| args::text(s).ok())
        {
            Some(id) => Ok(I::from(id.as_ref())),
            None => {
                args::string(&format!("{name}.{attribute}"), value).map(|id| I::from(id.as_ref()))
            }
        },
        None => Err(args::type_error(
            description,
            &format!("an object with a {attribute}"),
            object,
        )),
    };
    Ok((raw, id))
}

/// The task states as `task_state_type` gives them, made once: calling an
/// enum type costs more than the rest of a report.
pub fn task_states(state_type: &Bound<'_, PyAny>) -> Option<[Py<PyAny>; 4]> {
    let make = |state: ReportedState| state_type.call1((state.value(),)).ok().map(Bound::unbind);
    Some([
        make(ReportedState::Running)?,
        make(ReportedState::Ready)?,
        make(ReportedState::Done)?,
        make(ReportedState::Failed)?,
    ])
}

fn state_index(state: ReportedState) -> usize {
    match state {
        ReportedState::Running => 0,
        ReportedState::Ready => 1,
        ReportedState::Done => 2,
        ReportedState::Failed => 3,
    }
}

/// The caller's `str` arguments with their text: an effect passing the same
/// text on reuses the caller's object instead of making a new one.
#[derive(Default)]
pub struct KnownTexts<'a, 'py> {
    entries: [Option<(&'a str, &'a Bound<'py, PyString>)>; 8],
}

impl<'a, 'py> KnownTexts<'a, 'py> {
    /// [`args::string`], remembering the argument when its text was read
    /// from the `str` itself (no second read of each argument's UTF-8).
    pub fn string(&mut self, name: &str, obj: &'a Bound<'py, PyAny>) -> PyResult<Cow<'a, str>> {
        let text = args::string(name, obj)?;
        if let (Cow::Borrowed(borrowed), Ok(string)) = (&text, obj.cast::<PyString>()) {
            if let Some(free) = self.entries.iter_mut().find(|e| e.is_none()) {
                *free = Some((*borrowed, string));
            }
        }
        Ok(text)
    }

    /// [`Self::string`] for an argument that may be absent or None.
    pub fn optional_string(
        &mut self,
        name: &str,
        obj: Option<&'a Bound<'py, PyAny>>,
    ) -> PyResult<Option<Cow<'a, str>>> {
        match obj {
            Some(o) if !o.is_none() => self.string(name, o).map(Some),
            _ => Ok(None),
        }
    }

    /// Remembers a `str` the reports may pass on.
    pub fn remember(&mut self, string: &'a Bound<'py, PyString>) {
        if let (Ok(Cow::Borrowed(text)), Some(free)) = (
            args::text(string),
            self.entries.iter_mut().find(|e| e.is_none()),
        ) {
            *free = Some((text, string));
        }
    }

    fn find(&self, text: &str) -> Option<&'a Bound<'py, PyString>> {
        self.entries
            .iter()
            .map_while(|e| *e)
            .find(|(known, _)| *known == text)
            .map(|(_, s)| s)
    }
}

/// The Python strings made for a batch of reports so far, by the address of
/// the `Arc` they came from. Sound only while every `Arc` seen is one of
/// the batch's: those were all alive together when the batch was taken, so
/// no two of them shared an address, whichever is dropped first. Cleared
/// for each batch ([`EffectPorts::start_batch`]). Fixed-size: a batch
/// carries a handful of distinct texts, and one that does not fit is simply
/// made again.
struct TextMemo<'py> {
    /// The `Arc`s' addresses, the first `len` in use; `made[i]` is the `str`
    /// for `addresses[i]`. Kept apart: a lookup scans a few 8-byte words.
    addresses: [*const u8; MEMO_TEXTS],
    made: [Option<Bound<'py, PyString>>; MEMO_TEXTS],
    len: usize,
    /// The last event time made: a launch's two events share theirs.
    timestamp: Option<(WallTime, Bound<'py, PyAny>)>,
    /// The `str`s made for the batch's ids, by the ids' words (equal words,
    /// equal ids while the batch lives): a batch is one task's lane, with
    /// its task's id and mostly one runner's and one slot's.
    ids: [Option<([u64; 2], Bound<'py, PyString>)>; MEMO_IDS],
}

const MEMO_TEXTS: usize = 8;
const MEMO_IDS: usize = 3;

impl Default for TextMemo<'_> {
    fn default() -> Self {
        TextMemo {
            addresses: [std::ptr::null(); MEMO_TEXTS],
            made: Default::default(),
            len: 0,
            timestamp: None,
            ids: Default::default(),
        }
    }
}

impl TextMemo<'_> {
    /// Forgets every text and time (dropping only the entries in use).
    fn clear(&mut self) {
        for made in &mut self.made[..self.len] {
            *made = None;
        }
        self.len = 0;
        self.timestamp = None;
        self.ids = Default::default();
    }
}

/// The ports an outcome's effects call.
pub(super) struct EffectPorts<'a, 'py> {
    py: Python<'py>,
    ports: Arc<Ports>,
    texts: RefCell<TextMemo<'py>>,
    known: KnownTexts<'a, 'py>,
}

impl<'a, 'py> EffectPorts<'a, 'py> {
    /// A port, unless it is None.
    fn port(&self, pick: fn(&Ports) -> &Py<PyAny>) -> Option<&Bound<'py, PyAny>> {
        Some(pick(&self.ports).bind(self.py)).filter(|p| !p.is_none())
    }

    /// Starts a batch of reports taken together: the texts of the reports
    /// before it are forgotten (their `Arc`s may be gone, and their
    /// addresses reused).
    pub(super) fn start_batch(&self) {
        self.texts.borrow_mut().clear();
    }

    /// The Python string for an id or name of the current batch's reports:
    /// made once per batch, however many reports carry it (an outcome's
    /// reports share their `Arc`s).
    fn text(&self, py: Python<'py>, text: &Arc<str>) -> Bound<'py, PyString> {
        let address = Arc::as_ptr(text).cast::<u8>();
        let mut memo = self.texts.borrow_mut();
        let len = memo.len;
        if let Some(i) = memo.addresses[..len].iter().position(|&a| a == address) {
            if let Some(made) = &memo.made[i] {
                return made.clone();
            }
        }
        let s = match self.known.find(text) {
            Some(known) => known.clone(),
            None => PyString::new(py, text),
        };
        if len < MEMO_TEXTS {
            memo.addresses[len] = address;
            memo.made[len] = Some(s.clone());
            memo.len += 1;
        }
        s
    }

    /// The Python string for one of the batch's ids: made once per batch.
    fn id_text(&self, py: Python<'py>, id: &Id) -> Bound<'py, PyString> {
        let words = id.words();
        let mut memo = self.texts.borrow_mut();
        for (seen, made) in memo.ids.iter().flatten() {
            if *seen == words {
                return made.clone();
            }
        }
        let made = match self.known.find(id) {
            Some(known) => known.clone(),
            None => PyString::new(py, id),
        };
        // A fourth id takes the last one's place.
        let free = memo
            .ids
            .iter()
            .position(Option::is_none)
            .unwrap_or(MEMO_IDS - 1);
        memo.ids[free] = Some((words, made.clone()));
        made
    }

    fn optional_id_text(&self, py: Python<'py>, id: &Option<Id>) -> Option<Bound<'py, PyString>> {
        id.as_ref().map(|id| self.id_text(py, id))
    }

    /// An event's `datetime`, shared with the batch's previous event of the
    /// same time (`datetime` objects are immutable).
    fn timestamp(&self, py: Python<'py>, at: WallTime) -> PyResult<Bound<'py, PyAny>> {
        let mut memo = self.texts.borrow_mut();
        if let Some((seen, made)) = &memo.timestamp {
            if *seen == at {
                return Ok(made.clone());
            }
        }
        let made = datetime::to_py(py, at)?.into_any();
        memo.timestamp = Some((at, made.clone()));
        Ok(made)
    }

    fn optional_text(
        &self,
        py: Python<'py>,
        text: &Option<Arc<str>>,
    ) -> Option<Bound<'py, PyString>> {
        text.as_ref().map(|t| self.text(py, t))
    }

    /// RUNNING's metadata: `{"runner_id", "assigned_slot", "pool_name",
    /// "started_at"}`.
    fn running_metadata(
        &self,
        py: Python<'py>,
        runner_id: &RunnerId,
        assigned_slot: &Option<SlotId>,
        pool_name: &Arc<str>,
        started_at: WallTime,
    ) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item(name!(py, "runner_id"), self.id_text(py, runner_id))?;
        d.set_item(
            name!(py, "assigned_slot"),
            self.optional_id_text(py, assigned_slot),
        )?;
        d.set_item(name!(py, "pool_name"), self.text(py, pool_name))?;
        d.set_item(name!(py, "started_at"), datetime::iso_str(py, started_at)?)?;
        Ok(d)
    }

    /// DONE's metadata: `{"runner_id", "completed_at"}`.
    fn done_metadata(
        &self,
        py: Python<'py>,
        runner_id: &RunnerId,
        completed_at: WallTime,
    ) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item(name!(py, "runner_id"), self.id_text(py, runner_id))?;
        d.set_item(
            name!(py, "completed_at"),
            datetime::iso_str(py, completed_at)?,
        )?;
        Ok(d)
    }

    fn metadata_dict(
        &self,
        py: Python<'py>,
        metadata: &StateMetadata,
    ) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        match metadata {
            StateMetadata::Running {
                runner_id,
                assigned_slot,
                pool_name,
                started_at,
            } => {
                return self.running_metadata(py, runner_id, assigned_slot, pool_name, *started_at)
            }
            StateMetadata::Retry {
                retry_count,
                next_retry_at,
                failure_reason,
            } => {
                d.set_item(name!(py, "retry_count"), retry_count)?;
                d.set_item(
                    name!(py, "next_retry_at"),
                    datetime::iso_str(py, *next_retry_at)?,
                )?;
                d.set_item(name!(py, "failure_reason"), self.text(py, failure_reason))?;
            }
            StateMetadata::Interrupted => d.set_item(name!(py, "interrupted"), true)?,
            StateMetadata::Done {
                runner_id,
                completed_at,
            } => return self.done_metadata(py, runner_id, *completed_at),
            StateMetadata::Failed {
                reason,
                retries,
                runner_id,
            } => {
                d.set_item(name!(py, "reason"), self.text(py, reason))?;
                d.set_item(name!(py, "retries"), retries)?;
                d.set_item(name!(py, "runner_id"), self.optional_id_text(py, runner_id))?;
            }
        }
        Ok(d)
    }

    /// Makes `report`'s port calls in order, adding each that lands to
    /// `delivered`. On a failure the report keeps what is left to do.
    pub(super) fn perform(
        &self,
        py: Python<'py>,
        report: &mut Effect<Py<PyAny>>,
        delivered: &mut usize,
    ) -> Result<(), FailedReport> {
        match report {
            Effect::Started(start) => return self.perform_start(py, start, delivered),
            Effect::Completed(completion) => {
                return self.perform_completion(py, completion, delivered)
            }
            _ => {}
        }
        self.perform_single(py, report)?;
        *delivered += 1;
        Ok(())
    }

    /// A launch's parts from the first not delivered; each one that lands
    /// is counted in the report, so a retry resumes after it.
    fn perform_start(
        &self,
        py: Python<'py>,
        s: &mut Start,
        delivered: &mut usize,
    ) -> Result<(), FailedReport> {
        for part in s.delivered..Start::PARTS {
            match part {
                0 => {
                    self.report_state(py, &s.spec_name, &s.task_id, ReportedState::Running, || {
                        self.running_metadata(
                            py,
                            &s.runner_id,
                            &s.slot_id,
                            &s.pool_name,
                            s.started_at,
                        )
                    })?
                }
                1 => self.task_assigned(py, &s.names(), &s.pool_name, s.confirmed_at)?,
                _ => {
                    self.runner_started(py, &s.names(), &s.pool_name, &s.details, s.confirmed_at)?
                }
            }
            s.delivered += 1;
            *delivered += 1;
        }
        Ok(())
    }

    /// A completion's parts from the first not delivered; each one that
    /// lands is counted in the report, so a retry resumes after it.
    fn perform_completion(
        &self,
        py: Python<'py>,
        c: &mut Completion,
        delivered: &mut usize,
    ) -> Result<(), FailedReport> {
        for &part in c.parts_left() {
            match part {
                CompletionPart::RunnerFinished => {
                    self.runner_finished(py, &c.names(), true, c.execution_time_seconds, &None)?
                }
                CompletionPart::TaskCompleted => self.task_completed(
                    py,
                    &c.spec_name,
                    &c.task_id,
                    &c.runner_id,
                    c.execution_time_seconds,
                )?,
                CompletionPart::ReleaseSlot => {
                    if let Some(slot_id) = &c.slot_id {
                        self.release_slot(py, slot_id)?;
                    }
                }
                CompletionPart::Done => {
                    self.report_state(py, &c.spec_name, &c.task_id, ReportedState::Done, || {
                        self.done_metadata(py, &c.runner_id, c.completed_at)
                    })?
                }
            }
            c.delivered += 1;
            *delivered += 1;
        }
        Ok(())
    }

    fn perform_single(
        &self,
        py: Python<'py>,
        effect: &Effect<Py<PyAny>>,
    ) -> Result<(), FailedReport> {
        let fail = failed;
        match effect {
            // Handles are dropped when filed, and launches and completions
            // go part by part (`perform`): none reaches here.
            Effect::Discard(_) | Effect::Started(_) | Effect::Completed(_) => {}
            Effect::ReleaseSlot { slot_id, .. } => self.release_slot(py, slot_id)?,
            Effect::ReportState {
                spec_name,
                task_id,
                state,
                metadata,
            } => self.report_state(py, spec_name, task_id, *state, || {
                self.metadata_dict(py, metadata)
            })?,
            Effect::TaskAssigned {
                spec_name,
                task_id,
                runner_id,
                slot_id,
                pool_name,
                timestamp,
            } => self.task_assigned(
                py,
                &RunnerNames {
                    spec_name,
                    task_id,
                    runner_id,
                    slot_id,
                },
                pool_name,
                *timestamp,
            )?,
            Effect::RunnerStarted {
                spec_name,
                task_id,
                runner_id,
                slot_id,
                pool_name,
                details,
                timestamp,
            } => self.runner_started(
                py,
                &RunnerNames {
                    spec_name,
                    task_id,
                    runner_id,
                    slot_id,
                },
                pool_name,
                details,
                *timestamp,
            )?,
            Effect::RunnerFinished {
                spec_name,
                task_id,
                runner_id,
                slot_id,
                success,
                execution_time_seconds,
                failure_reason,
            } => self.runner_finished(
                py,
                &RunnerNames {
                    spec_name,
                    task_id,
                    runner_id,
                    slot_id,
                },
                *success,
                *execution_time_seconds,
                failure_reason,
            )?,
            Effect::TaskCompleted {
                spec_name,
                task_id,
                runner_id,
                execution_time_seconds,
            } => self.task_completed(py, spec_name, task_id, runner_id, *execution_time_seconds)?,
            Effect::TaskFailed {
                spec_name,
                task_id,
                runner_id,
                failure_reason,
                retry_count,
            } => {
                static NAMES: KeywordNames = KeywordNames::new(&[
                    "spec_name",
                    "task_id",
                    "runner_id",
                    "failure_reason",
                    "retry_count",
                ]);
                self.record_event(py, name!(py, "record_task_failed"), &NAMES, || {
                    Ok([
                        self.text(py, spec_name).into_any(),
                        self.id_text(py, task_id).into_any(),
                        any(py, self.optional_id_text(py, runner_id))?,
                        self.text(py, failure_reason).into_any(),
                        any(py, *retry_count)?,
                    ])
                })
                .map_err(|e| fail("record_task_failed", e))?
            }
            Effect::StopRunner { runner_id, .. } => {
                if let Some(launcher) = self.port(|p| &p.runner_launcher) {
                    if launcher.hasattr(name!(py, "stop")).unwrap_or(false) {
                        launcher
                            .call_method1(name!(py, "stop"), (runner_id.as_ref(),))
                            .map_err(|e| fail(&format!("stop({runner_id:?})"), e))?;
                    }
                }
            }
        }
        Ok(())
    }

    /// `repo_pool_manager.release_slot(slot_id, cleanup=True)`.
    fn release_slot(&self, py: Python<'py>, slot_id: &SlotId) -> Result<(), FailedReport> {
        static CLEANUP: KeywordNames = KeywordNames::new(&["cleanup"]);
        let Some(pool) = self.port(|p| &p.repo_pool_manager) else {
            return Ok(());
        };
        let result = (|| {
            call_method(
                pool,
                name!(py, "release_slot"),
                &[self.id_text(py, slot_id).into_any()],
                &CLEANUP,
                &[any(py, true)?],
            )
        })();
        result
            .map(drop)
            .map_err(|e| failed(&format!("release_slot({slot_id:?})"), e))
    }

    /// `task_registry.update_task_state(spec_name, task_id, new_state,
    /// metadata)`; the metadata is made only when there is a registry.
    fn report_state(
        &self,
        py: Python<'py>,
        spec_name: &Arc<str>,
        task_id: &TaskId,
        state: ReportedState,
        metadata: impl FnOnce() -> PyResult<Bound<'py, PyDict>>,
    ) -> Result<(), FailedReport> {
        static NAMES: KeywordNames =
            KeywordNames::new(&["spec_name", "task_id", "new_state", "metadata"]);
        let Some(registry) = self.port(|p| &p.task_registry) else {
            return Ok(());
        };
        let result = (|| -> PyResult<()> {
            let new_state = match &self.ports.states {
                Some(states) => states[state_index(state)].bind(py).clone(),
                None => self
                    .ports
                    .task_state_type
                    .bind(py)
                    .call1((state.value(),))?,
            };
            let values = [
                self.text(py, spec_name).into_any(),
                self.id_text(py, task_id).into_any(),
                new_state,
                metadata()?.into_any(),
            ];
            call_method(
                registry,
                name!(py, "update_task_state"),
                &[],
                &NAMES,
                &values,
            )?;
            Ok(())
        })();
        result.map_err(|e| {
            failed(
                &format!("update_task_state({task_id:?} -> {})", state.value()),
                e,
            )
        })
    }

    /// The texts an event about a runner starts with: spec name, task id,
    /// runner id, slot id (or None).
    fn runner_texts(
        &self,
        py: Python<'py>,
        n: &RunnerNames<'_>,
    ) -> PyResult<[Bound<'py, PyAny>; 4]> {
        Ok([
            self.text(py, n.spec_name).into_any(),
            self.id_text(py, n.task_id).into_any(),
            self.id_text(py, n.runner_id).into_any(),
            any(py, self.optional_id_text(py, n.slot_id))?,
        ])
    }

    fn task_assigned(
        &self,
        py: Python<'py>,
        names: &RunnerNames<'_>,
        pool_name: &Arc<str>,
        timestamp: WallTime,
    ) -> Result<(), FailedReport> {
        static NAMES: KeywordNames = KeywordNames::new(&[
            "spec_name",
            "task_id",
            "runner_id",
            "slot_id",
            "pool_name",
            "timestamp",
        ]);
        self.record_event(py, name!(py, "record_task_assigned"), &NAMES, || {
            let [spec, task, runner, slot] = self.runner_texts(py, names)?;
            Ok([
                spec,
                task,
                runner,
                slot,
                self.text(py, pool_name).into_any(),
                self.timestamp(py, timestamp)?,
            ])
        })
        .map_err(|e| failed("record_task_assigned", e))
    }

    fn runner_started(
        &self,
        py: Python<'py>,
        names: &RunnerNames<'_>,
        pool_name: &Arc<str>,
        details: &RunnerDetails,
        timestamp: WallTime,
    ) -> Result<(), FailedReport> {
        static NAMES: KeywordNames = KeywordNames::new(&[
            "spec_name",
            "task_id",
            "runner_id",
            "slot_id",
            "pool_name",
            "pid",
            "container_id",
            "job_name",
            "timestamp",
        ]);
        self.record_event(py, name!(py, "record_runner_started"), &NAMES, || {
            let [spec, task, runner, slot] = self.runner_texts(py, names)?;
            Ok([
                spec,
                task,
                runner,
                slot,
                self.text(py, pool_name).into_any(),
                any(py, details.pid())?,
                any(py, details.container_id().map(|s| &**s))?,
                any(py, details.job_name().map(|s| &**s))?,
                self.timestamp(py, timestamp)?,
            ])
        })
        .map_err(|e| failed("record_runner_started", e))
    }

    fn runner_finished(
        &self,
        py: Python<'py>,
        names: &RunnerNames<'_>,
        success: bool,
        execution_time_seconds: f64,
        failure_reason: &Option<Arc<str>>,
    ) -> Result<(), FailedReport> {
        static NAMES: KeywordNames = KeywordNames::new(&[
            "spec_name",
            "task_id",
            "runner_id",
            "slot_id",
            "success",
            "execution_time_seconds",
            "failure_reason",
        ]);
        self.record_event(py, name!(py, "record_runner_finished"), &NAMES, || {
            let [spec, task, runner, slot] = self.runner_texts(py, names)?;
            Ok([
                spec,
                task,
                runner,
                slot,
                any(py, success)?,
                any(py, execution_time_seconds)?,
                any(py, self.optional_text(py, failure_reason))?,
            ])
        })
        .map_err(|e| failed("record_runner_finished", e))
    }

    fn task_completed(
        &self,
        py: Python<'py>,
        spec_name: &Arc<str>,
        task_id: &TaskId,
        runner_id: &RunnerId,
        execution_time_seconds: f64,
    ) -> Result<(), FailedReport> {
        static NAMES: KeywordNames = KeywordNames::new(&[
            "spec_name",
            "task_id",
            "runner_id",
            "execution_time_seconds",
        ]);
        if logging::may_want(py, LOG_TARGET, Level::Info) {
            log::info!(target: LOG_TARGET, "task {task_id:?} completed by runner {runner_id:?}");
        }
        self.record_event(py, name!(py, "record_task_completed"), &NAMES, || {
            Ok([
                self.text(py, spec_name).into_any(),
                self.id_text(py, task_id).into_any(),
                self.id_text(py, runner_id).into_any(),
                any(py, execution_time_seconds)?,
            ])
        })
        .map_err(|e| failed("record_task_completed", e))
    }

    /// `event_recorder.<method>(**values)`; the values are made only when
    /// there is a recorder.
    fn record_event<const N: usize>(
        &self,
        py: Python<'py>,
        method: &Bound<'py, PyString>,
        names: &KeywordNames,
        values: impl FnOnce() -> PyResult<[Bound<'py, PyAny>; N]>,
    ) -> PyResult<()> {
        let Some(recorder) = self.port(|p| &p.event_recorder) else {
            return Ok(());
        };
        let _ = py;
        call_method(recorder, method, &[], names, &values()?)?;
        Ok(())
    }
}

/// The names an event about a runner carries.
struct RunnerNames<'a> {
    spec_name: &'a Arc<str>,
    task_id: &'a TaskId,
    runner_id: &'a RunnerId,
    slot_id: &'a Option<SlotId>,
}

impl Start {
    fn names(&self) -> RunnerNames<'_> {
        RunnerNames {
            spec_name: &self.spec_name,
            task_id: &self.task_id,
            runner_id: &self.runner_id,
            slot_id: &self.slot_id,
        }
    }
}

impl Completion {
    fn names(&self) -> RunnerNames<'_> {
        RunnerNames {
            spec_name: &self.spec_name,
            task_id: &self.task_id,
            runner_id: &self.runner_id,
            slot_id: &self.slot_id,
        }
    }
}

/// A report whose port call raised: what was called, and the error.
pub struct FailedReport {
    pub what: String,
    pub error: PyErr,
}

fn failed(what: &str, error: PyErr) -> FailedReport {
    FailedReport {
        what: what.to_owned(),
        error,
    }
}

/// Any value a port call passes on, as a Python object.
fn any<'py, T: IntoPyObject<'py>>(py: Python<'py>, value: T) -> PyResult<Bound<'py, PyAny>> {
    value.into_bound_py_any(py)
}

/// A runner's optional detail, or None (logged) when it is malformed.
fn lenient<T>(name: &str, value: PyResult<Option<T>>) -> Option<T> {
    value.unwrap_or_else(|e| {
        log::warn!(target: LOG_TARGET, "ignoring the launched runner's {name}: {e}");
        None
    })
}
