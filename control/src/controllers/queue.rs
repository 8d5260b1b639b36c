//! A keyed work queue, as Kubernetes' controllers use: a key is queued at
//! most once, never processed by two workers at once (a key added while it
//! is processed is processed again afterwards), and failures come back
//! after an exponential backoff. Pure: the caller passes `now`.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

/// Backoff after the n-th consecutive failure: 5 ms doubling, at most 1000 s
/// (Kubernetes' default controller rate limiter).
pub fn backoff(failures: u32) -> Duration {
    let ms = 5u64.saturating_mul(1u64 << failures.min(30));
    Duration::from_millis(ms).min(Duration::from_secs(1000))
}

#[derive(Default)]
pub struct WorkQueue {
    ready: VecDeque<String>,
    queued: HashSet<String>,
    processing: HashSet<String>,
    /// Added again while processing: queue once processing is done.
    dirty: HashSet<String>,
    delayed: BTreeSet<(Instant, String)>,
    failures: HashMap<String, u32>,
}

impl WorkQueue {
    pub fn add(&mut self, key: &str) {
        if self.processing.contains(key) {
            self.dirty.insert(key.to_string());
        } else if self.queued.insert(key.to_string()) {
            self.ready.push_back(key.to_string());
        }
    }

    pub fn add_after(&mut self, key: &str, at: Instant) {
        self.delayed.insert((at, key.to_string()));
    }

    /// Moves due delayed keys to ready, then takes the next ready key.
    pub fn pop(&mut self, now: Instant) -> Option<String> {
        while let Some((at, _)) = self.delayed.first() {
            if *at > now {
                break;
            }
            let (_, k) = self.delayed.pop_first().expect("non-empty");
            self.add(&k);
        }
        let key = self.ready.pop_front()?;
        self.queued.remove(&key);
        self.processing.insert(key.clone());
        Some(key)
    }

    /// Processing succeeded: forget its failures.
    pub fn done(&mut self, key: &str) {
        self.failures.remove(key);
        self.finish(key);
    }

    /// Processing failed: retry after a backoff; returns the delay.
    pub fn failed(&mut self, key: &str, now: Instant) -> Duration {
        let n = self.failures.entry(key.to_string()).or_default();
        let d = backoff(*n);
        *n += 1;
        self.finish(key);
        self.add_after(key, now + d);
        d
    }

    fn finish(&mut self, key: &str) {
        self.processing.remove(key);
        if self.dirty.remove(key) {
            self.add(key);
        }
    }

    /// When the earliest delayed key is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.delayed.first().map(|(at, _)| *at)
    }

    pub fn len(&self) -> usize {
        self.ready.len() + self.delayed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedups_and_never_hands_one_key_to_two_workers() {
        let now = Instant::now();
        let mut q = WorkQueue::default();
        q.add("a");
        q.add("a");
        q.add("b");
        assert_eq!(q.pop(now).as_deref(), Some("a"));
        q.add("a"); // changed while being processed
        assert_eq!(q.pop(now).as_deref(), Some("b"));
        assert_eq!(q.pop(now), None, "a is busy");
        q.done("a");
        assert_eq!(q.pop(now).as_deref(), Some("a"), "processed again after");
        q.done("a");
        q.done("b");
        assert!(q.is_empty());
    }

    #[test]
    fn failures_back_off_exponentially_and_success_resets() {
        let now = Instant::now();
        let mut q = WorkQueue::default();
        q.add("k");
        let mut delays = vec![];
        for _ in 0..4 {
            let k = q.pop(now + Duration::from_secs(3600)).unwrap();
            delays.push(q.failed(&k, now));
        }
        assert_eq!(delays, [5, 10, 20, 40].map(Duration::from_millis));
        assert_eq!(q.pop(now), None, "not due yet");
        assert_eq!(q.next_due(), Some(now + Duration::from_millis(40)));
        let k = q.pop(now + Duration::from_millis(40)).unwrap();
        q.done(&k);
        q.add("k");
        let k = q.pop(now).unwrap();
        assert_eq!(q.failed(&k, now), Duration::from_millis(5), "success reset the count");
        assert_eq!(backoff(40), Duration::from_secs(1000));
    }
}
