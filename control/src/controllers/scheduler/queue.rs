//! The scheduling queue, Kubernetes' three queues in one pure structure
//! (the caller passes `now`):
//!
//! - *active*: a heap by priority, then arrival — what is scheduled next;
//! - *backoff*: pods that failed recently, each waiting 1 s doubling to
//!   10 s after its attempts (podInitialBackoffSeconds / podMaxBackoffSeconds);
//! - *unschedulable*: pods that fit nowhere; they are moved back (to active,
//!   or to backoff while theirs runs) when the cluster changes in a way that
//!   may help them, and at the latest after 5 minutes.
//!
//! A pod handed out by [`SchedulingQueue::pop`] is *in flight* until the
//! caller reports it unschedulable, failed, or gone.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap};
use std::time::{Duration, Instant};

pub const INITIAL_BACKOFF: Duration = Duration::from_secs(1);
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);
pub const MAX_UNSCHEDULABLE: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Copy, PartialEq)]
enum Where {
    Active,
    Backoff(Instant),
    Unschedulable(Instant),
    InFlight,
}

struct Entry {
    at: Where,
    attempts: u32,
    last_attempt: Option<Instant>,
    priority: i64,
    /// Matches the live heap entry; older heap entries are skipped.
    generation: u64,
}

#[derive(Default)]
pub struct SchedulingQueue {
    active: BinaryHeap<(i64, Reverse<u64>, String)>,
    backoff: BTreeSet<(Instant, String)>,
    pods: HashMap<String, Entry>,
    seq: u64,
}

/// Counts per queue, for `scheduler_pending_pods{queue}`.
#[derive(Debug, Default, PartialEq)]
pub struct Depths {
    pub active: usize,
    pub backoff: usize,
    pub unschedulable: usize,
}

impl SchedulingQueue {
    fn backoff_of(e: &Entry) -> Option<Instant> {
        let last = e.last_attempt?;
        let d = INITIAL_BACKOFF.saturating_mul(1u32 << e.attempts.saturating_sub(1).min(8)).min(MAX_BACKOFF);
        Some(last + d)
    }

    fn activate(&mut self, key: &str) {
        self.seq += 1;
        let Some(e) = self.pods.get_mut(key) else { return };
        e.at = Where::Active;
        e.generation = self.seq;
        self.active.push((e.priority, Reverse(self.seq), key.to_string()));
    }

    /// Moves a waiting pod to active, or to backoff while its backoff runs.
    fn requeue(&mut self, key: &str, now: Instant) {
        let Some(e) = self.pods.get_mut(key) else { return };
        if let Where::Backoff(at) = e.at {
            self.backoff.remove(&(at, key.to_string()));
        }
        match Self::backoff_of(e).filter(|until| *until > now) {
            Some(until) => {
                e.at = Where::Backoff(until);
                self.backoff.insert((until, key.to_string()));
            }
            None => self.activate(key),
        }
    }

    /// A pending pod was created or changed. `changed`: what scheduling
    /// depends on differs, so an unschedulable pod is worth another try.
    pub fn add(&mut self, key: &str, priority: i64, changed: bool, now: Instant) {
        match self.pods.get_mut(key) {
            None => {
                self.pods.insert(
                    key.to_string(),
                    Entry { at: Where::Active, attempts: 0, last_attempt: None, priority, generation: 0 },
                );
                self.activate(key);
            }
            Some(e) => {
                let reprioritised = e.priority != priority;
                e.priority = priority;
                match e.at {
                    Where::Unschedulable(_) if changed => self.requeue(key, now),
                    Where::Active if reprioritised => self.activate(key),
                    _ => {}
                }
            }
        }
    }

    /// The next pod to schedule, if any is due.
    pub fn pop(&mut self, now: Instant) -> Option<String> {
        while let Some((at, _)) = self.backoff.first() {
            if *at > now {
                break;
            }
            let (_, key) = self.backoff.pop_first().expect("non-empty");
            self.activate(&key);
        }
        while let Some((_, Reverse(generation), key)) = self.active.pop() {
            let Some(e) = self.pods.get_mut(&key) else { continue };
            if e.at != Where::Active || e.generation != generation {
                continue;
            }
            e.at = Where::InFlight;
            e.attempts += 1;
            e.last_attempt = Some(now);
            return Some(key);
        }
        None
    }

    /// The pod fits nowhere now.
    pub fn unschedulable(&mut self, key: &str, now: Instant) {
        if let Some(e) = self.pods.get_mut(key) {
            e.at = Where::Unschedulable(now);
        }
    }

    /// Scheduling or binding failed for another reason: retry after backoff.
    pub fn failed(&mut self, key: &str, now: Instant) {
        if self.pods.contains_key(key) {
            self.requeue(key, now);
        }
    }

    /// The pod is bound or gone.
    pub fn remove(&mut self, key: &str) {
        if let Some(e) = self.pods.remove(key) {
            if let Where::Backoff(at) = e.at {
                self.backoff.remove(&(at, key.to_string()));
            }
        }
    }

    /// A cluster change that may help unschedulable pods (those `which`
    /// accepts): give them another try.
    pub fn move_unschedulable(&mut self, now: Instant, which: impl Fn(&str) -> bool) {
        let keys: Vec<String> = self
            .pods
            .iter()
            .filter(|(k, e)| matches!(e.at, Where::Unschedulable(_)) && which(k))
            .map(|(k, _)| k.clone())
            .collect();
        for k in keys {
            self.requeue(&k, now);
        }
    }

    /// When something becomes due without a change: the first backoff
    /// expiry or the oldest unschedulable pod's retry.
    pub fn next_due(&self) -> Option<Instant> {
        let stale = self
            .pods
            .values()
            .filter_map(|e| match e.at {
                Where::Unschedulable(since) => Some(since + MAX_UNSCHEDULABLE),
                _ => None,
            })
            .min();
        [self.backoff.first().map(|(at, _)| *at), stale].into_iter().flatten().min()
    }

    /// Retries the unschedulable pods that have waited [`MAX_UNSCHEDULABLE`].
    pub fn retry_stale(&mut self, now: Instant) {
        let stale: Vec<String> = self
            .pods
            .iter()
            .filter(|(_, e)| matches!(e.at, Where::Unschedulable(since) if since + MAX_UNSCHEDULABLE <= now))
            .map(|(k, _)| k.clone())
            .collect();
        for k in stale {
            self.requeue(&k, now);
        }
    }

    pub fn depths(&self) -> Depths {
        let mut d = Depths::default();
        for e in self.pods.values() {
            match e.at {
                Where::Active => d.active += 1,
                Where::Backoff(_) => d.backoff += 1,
                Where::Unschedulable(_) => d.unschedulable += 1,
                Where::InFlight => {}
            }
        }
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priority_then_arrival() {
        let now = Instant::now();
        let mut q = SchedulingQueue::default();
        q.add("a", 0, false, now);
        q.add("b", 10, false, now);
        q.add("c", 0, false, now);
        q.add("a", 0, true, now); // an update does not reorder
        assert_eq!(q.pop(now).as_deref(), Some("b"));
        assert_eq!(q.pop(now).as_deref(), Some("a"));
        q.add("c", 20, false, now); // but a new priority does
        assert_eq!(q.pop(now).as_deref(), Some("c"));
        assert_eq!(q.pop(now), None);
    }

    #[test]
    fn unschedulable_pods_wait_for_a_change_then_their_backoff() {
        let t0 = Instant::now();
        let mut q = SchedulingQueue::default();
        q.add("p", 0, false, t0);
        assert_eq!(q.pop(t0).as_deref(), Some("p"));
        q.unschedulable("p", t0);
        assert_eq!(q.pop(t0 + Duration::from_secs(60)), None, "no change, no retry");
        assert_eq!(q.depths(), Depths { active: 0, backoff: 0, unschedulable: 1 });
        q.add("p", 0, false, t0); // a status-only update is no reason
        assert_eq!(q.pop(t0), None);
        q.move_unschedulable(t0 + Duration::from_millis(100), |_| true);
        assert_eq!(q.depths().backoff, 1, "moved, but its 1 s backoff runs");
        assert_eq!(q.pop(t0 + Duration::from_millis(500)), None);
        assert_eq!(q.next_due(), Some(t0 + Duration::from_secs(1)));
        assert_eq!(q.pop(t0 + Duration::from_secs(1)).as_deref(), Some("p"));
        // Second failure: 2 s from that attempt.
        let t1 = t0 + Duration::from_secs(1);
        q.failed("p", t1);
        assert_eq!(q.pop(t1 + Duration::from_millis(1999)), None);
        assert_eq!(q.pop(t1 + Duration::from_secs(2)).as_deref(), Some("p"));
        q.unschedulable("p", t1);
        q.retry_stale(t1 + MAX_UNSCHEDULABLE - Duration::from_secs(1));
        assert_eq!(q.depths().unschedulable, 1);
        q.retry_stale(t1 + MAX_UNSCHEDULABLE);
        assert_eq!(q.pop(t1 + MAX_UNSCHEDULABLE).as_deref(), Some("p"), "stale pods are retried");
        q.remove("p");
        assert_eq!(q.depths(), Depths::default());
        assert_eq!(q.next_due(), None);
    }

    #[test]
    fn backoff_is_capped() {
        let t0 = Instant::now();
        let mut q = SchedulingQueue::default();
        q.add("p", 0, false, t0);
        let mut t = t0;
        for _ in 0..12 {
            t = q.next_due().unwrap_or(t);
            assert_eq!(q.pop(t).as_deref(), Some("p"));
            q.failed("p", t);
        }
        assert_eq!(q.next_due(), Some(t + MAX_BACKOFF));
    }
}
