//! The names a task carries — its spec, its repo and the skill that routes
//! it — held once for all the tasks that carry the same three.
//!
//! Tasks come in batches of one spec and repo, so a held task keeps one
//! pointer to its names (8 bytes) instead of three (48 bytes): at 10^6 held
//! tasks, 40 MB (SPEC §6, memory per task held).

use std::cell::RefCell;
use std::sync::Arc;

use crate::interning::{with_thread_table, SharedTable};

#[derive(Debug, PartialEq, Eq, Hash)]
pub struct TaskNames {
    pub spec: Arc<str>,
    pub repo: Arc<str>,
    pub skill: Option<Arc<str>>,
}

thread_local! {
    static TASK_NAMES: RefCell<SharedTable<TaskNames>> = RefCell::new(SharedTable::default());
    /// The names shared last: tasks come in runs of the same names, each
    /// name already shared (`interning::shared_name`), so comparing three
    /// addresses settles most lookups without hashing any text.
    static LAST: RefCell<Option<Arc<TaskNames>>> = const { RefCell::new(None) };
}

impl TaskNames {
    /// The `TaskNames` this thread shares for these three names.
    pub fn shared(spec: Arc<str>, repo: Arc<str>, skill: Option<Arc<str>>) -> Arc<TaskNames> {
        let names = TaskNames { spec, repo, skill };
        let last = LAST
            .try_with(|last| {
                let last = last.try_borrow().ok()?;
                last.as_ref().filter(|l| l.same_as(&names)).cloned()
            })
            .ok()
            .flatten();
        if let Some(found) = last {
            return found;
        }
        let shared = match with_thread_table(&TASK_NAMES, |t| t.get(&names)).flatten() {
            Some(found) => found,
            None => {
                let made = Arc::new(names);
                with_thread_table(&TASK_NAMES, |t| t.keep(Arc::clone(&made)));
                made
            }
        };
        let _ = LAST.try_with(|last| {
            if let Ok(mut last) = last.try_borrow_mut() {
                *last = Some(Arc::clone(&shared));
            }
        });
        shared
    }

    /// The very same three names (not just equal texts).
    fn same_as(&self, other: &TaskNames) -> bool {
        Arc::ptr_eq(&self.spec, &other.spec)
            && Arc::ptr_eq(&self.repo, &other.repo)
            && match (&self.skill, &other.skill) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(spec: &str, skill: Option<&str>) -> Arc<TaskNames> {
        TaskNames::shared(spec.into(), "repo".into(), skill.map(Arc::from))
    }

    #[test]
    fn tasks_with_the_same_names_share_them() {
        let a = names("spec", None);
        assert!(Arc::ptr_eq(&a, &names("spec", None)));
        assert!(!Arc::ptr_eq(&a, &names("spec", Some("rust"))));
        assert!(!Arc::ptr_eq(&a, &names("other", None)));
        assert_eq!(&*names("spec", Some("rust")).spec, "spec");
        assert_eq!(names("spec", Some("rust")).skill.as_deref(), Some("rust"));
    }

    #[test]
    fn the_last_names_are_found_by_address() {
        let spec: Arc<str> = "spec-by-address".into();
        let a = TaskNames::shared(spec.clone(), spec.clone(), None);
        let b = TaskNames::shared(spec.clone(), spec.clone(), None);
        assert!(Arc::ptr_eq(&a, &b));
        // Equal texts in other allocations: found in the table, not by address.
        let c = TaskNames::shared("spec-by-address".into(), spec.clone(), None);
        assert!(Arc::ptr_eq(&a, &c));
        let d = TaskNames::shared(spec.clone(), spec, Some("gpu".into()));
        assert!(!Arc::ptr_eq(&a, &d));
    }
}
