//! Agent pools and their running counts.

use std::collections::HashMap;
use std::sync::Arc;

/// One pool's limits and load.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolState {
    pub name: Arc<str>,
    /// The pool type's value (`local-process`, `docker`, `kubernetes`).
    pub kind: Arc<str>,
    pub max_concurrency: u64,
    pub running: u64,
    pub enabled: bool,
}

impl PoolState {
    /// An idle, enabled pool.
    pub fn new(name: &str, kind: &str, max_concurrency: u64) -> Self {
        PoolState {
            name: name.into(),
            kind: kind.into(),
            max_concurrency,
            running: 0,
            enabled: true,
        }
    }

    pub fn has_room(&self) -> bool {
        self.enabled && self.running < self.max_concurrency
    }

    pub fn utilization(&self) -> f64 {
        if self.max_concurrency == 0 {
            0.0
        } else {
            self.running as f64 / self.max_concurrency as f64
        }
    }
}

/// Index of a pool in [`Pools`]; stable for the life of the dispatcher.
pub type PoolIndex = usize;

#[derive(Clone, Debug, Default)]
pub struct Pools {
    list: Vec<PoolState>,
    by_name: HashMap<Arc<str>, PoolIndex>,
}

impl Pools {
    /// Pools in configuration order; a repeated name keeps its first definition.
    pub fn new(pools: impl IntoIterator<Item = PoolState>) -> Self {
        let mut out = Pools::default();
        for pool in pools {
            if !out.by_name.contains_key(&pool.name) {
                out.by_name.insert(pool.name.clone(), out.list.len());
                out.list.push(pool);
            }
        }
        out
    }

    pub fn index(&self, name: &str) -> Option<PoolIndex> {
        self.by_name.get(name).copied()
    }

    pub fn get(&self, index: PoolIndex) -> &PoolState {
        &self.list[index]
    }

    pub fn iter(&self) -> impl Iterator<Item = (PoolIndex, &PoolState)> {
        self.list.iter().enumerate()
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn set_enabled(&mut self, index: PoolIndex, enabled: bool) {
        self.list[index].enabled = enabled;
    }

    /// Takes one unit of the pool's capacity; false when it has no room.
    pub fn reserve(&mut self, index: PoolIndex) -> bool {
        let pool = &mut self.list[index];
        if pool.has_room() {
            pool.running += 1;
            true
        } else {
            false
        }
    }

    /// Gives one unit back; never goes below zero.
    pub fn release(&mut self, index: PoolIndex) {
        let pool = &mut self.list[index];
        pool.running = pool.running.saturating_sub(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(name: &str, max: u64) -> PoolState {
        PoolState::new(name, "local-process", max)
    }

    #[test]
    fn reserve_stops_at_the_limit_and_release_at_zero() {
        let mut pools = Pools::new([pool("a", 2)]);
        let a = pools.index("a").unwrap();
        assert!(pools.reserve(a));
        assert!(pools.reserve(a));
        assert!(!pools.reserve(a));
        assert_eq!(pools.get(a).utilization(), 1.0);
        pools.release(a);
        pools.release(a);
        pools.release(a);
        assert_eq!(pools.get(a).running, 0);
    }

    #[test]
    fn disabled_pools_take_nothing() {
        let mut pools = Pools::new([pool("a", 2), pool("a", 9)]);
        assert_eq!(pools.len(), 1);
        pools.set_enabled(0, false);
        assert!(!pools.reserve(0));
    }
}
