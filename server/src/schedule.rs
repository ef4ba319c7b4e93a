//! A GCRA schedule per key: for each key, the moment its use so far is paid for (its
//! "theoretical arrival time"), pushed forward by each use and forgotten once it falls
//! behind now. The caller says what a use costs and how far ahead of now a key may run:
//! Statebus pacing reserves a slot before each message, the document-work budget charges
//! what a write or read took after it.
//!
//! Knows nothing of what is paced.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct Schedule<K> {
    due: Mutex<HashMap<K, Instant>>,
}

impl<K: Hash + Eq + Copy> Default for Schedule<K> {
    fn default() -> Self {
        Schedule {
            due: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Hash + Eq + Copy> Schedule<K> {
    /// Moves `key`'s schedule on by `cost` from where it stands, or from `now` if that is
    /// later; the moment it now stands at.
    pub fn push(&self, key: K, now: Instant, cost: Duration) -> Instant {
        let mut due = self.due.lock().unwrap_or_else(|e| e.into_inner());
        let d = due.entry(key).or_insert(now);
        *d = (*d).max(now) + cost;
        *d
    }

    /// How far `key`'s schedule runs ahead of `now` (zero when it does not).
    pub fn ahead(&self, key: &K, now: Instant) -> Duration {
        let due = self.due.lock().unwrap_or_else(|e| e.into_inner());
        due.get(key)
            .map_or(Duration::ZERO, |d| d.saturating_duration_since(now))
    }

    /// Forgets keys whose schedules have fallen behind `now`.
    pub fn prune(&self, now: Instant) {
        let mut due = self.due.lock().unwrap_or_else(|e| e.into_inner());
        due.retain(|_, d| *d > now);
        due.shrink_to_fit();
    }

    /// Keys remembered.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.due.lock().unwrap().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uses_push_a_key_on_from_now_or_from_where_it_stands() {
        let s = Schedule::default();
        let now = Instant::now();
        let ms = Duration::from_millis;
        assert_eq!(s.ahead(&1, now), Duration::ZERO);
        assert_eq!(s.push(1, now, ms(10)), now + ms(10));
        assert_eq!(s.push(1, now, ms(10)), now + ms(20), "from where it stands");
        assert_eq!(s.ahead(&1, now), ms(20));
        assert_eq!(
            s.push(1, now + ms(50), ms(10)),
            now + ms(60),
            "from now, once behind"
        );
        assert_eq!(s.ahead(&2, now), Duration::ZERO, "each key its own");
        s.push(2, now - ms(100), ms(1));
        s.prune(now);
        assert_eq!(s.len(), 1, "a schedule behind now is forgotten");
    }
}
