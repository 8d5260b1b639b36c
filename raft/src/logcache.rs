//! The newest Raft log entries, kept decoded in memory.
//!
//! Every entry a master appends is read back soon after: by the state
//! machine when it commits, and on the leader by each follower's
//! replication. Reading them from RocksDB meant an iterator and a postcard
//! decode (a copy of every key and value) per read; a leader profile
//! during a pod burst had 3–4% of its CPU there, a follower's 6%. The
//! cache holds the log's tail as it was appended (values are shared
//! `Bytes`, so a hit clones structure, not payload) and answers a read
//! only when it holds the whole range; anything older falls through to
//! RocksDB.
//!
//! It mirrors the log by being told every change the log store makes —
//! append, truncate, purge — in the same order. It holds a contiguous run
//! of indexes whose last is the log's last entry (appends go to the back,
//! truncation removes from the back), or nothing.

use std::collections::VecDeque;
use std::ops::{Bound, RangeBounds};

use crate::types::Entry;
use openraft::EntryPayload;

/// Bounds of the cache: entries and their approximate payload bytes.
/// 64 MiB is several seconds of writes at the rates this store reaches.
pub const MAX_ENTRIES: usize = 65_536;
pub const MAX_BYTES: usize = 64 << 20;

#[derive(Default)]
pub struct LogCache {
    entries: VecDeque<(Entry, usize)>,
    bytes: usize,
}

fn size(e: &Entry) -> usize {
    64 + match &e.payload {
        EntryPayload::Normal(cmd) => cmd.approx_size(),
        EntryPayload::Blank | EntryPayload::Membership(_) => 0,
    }
}

impl LogCache {
    fn first(&self) -> Option<u64> {
        self.entries.front().map(|(e, _)| e.log_id.index)
    }

    fn last(&self) -> Option<u64> {
        self.entries.back().map(|(e, _)| e.log_id.index)
    }

    /// `e` was appended to the log (after every entry before it).
    pub fn append(&mut self, e: Entry) {
        // openraft truncates before it overwrites; should an entry replace
        // held ones anyway, they and everything after them are gone.
        self.truncate(e.log_id.index);
        if self.last().is_some_and(|l| l + 1 != e.log_id.index) {
            // Not the next index (the log restarted after a snapshot):
            // what is held is no longer the tail.
            self.clear();
        }
        let n = size(&e);
        self.entries.push_back((e, n));
        self.bytes += n;
        while self.entries.len() > MAX_ENTRIES || (self.bytes > MAX_BYTES && self.entries.len() > 1) {
            self.pop_front();
        }
    }

    /// Entries from `index` on were removed from the log.
    pub fn truncate(&mut self, index: u64) {
        while self.last().is_some_and(|l| l >= index) {
            if let Some((_, n)) = self.entries.pop_back() {
                self.bytes -= n;
            }
        }
    }

    /// Entries up to and including `index` were removed from the log.
    pub fn purge(&mut self, index: u64) {
        while self.first().is_some_and(|f| f <= index) {
            self.pop_front();
        }
    }

    /// The entries of `range`, if every one of them is held. An open end
    /// means "to the last entry", which the cache holds whenever it holds
    /// anything.
    pub fn get(&self, range: &impl RangeBounds<u64>) -> Option<Vec<Entry>> {
        let (first, last) = (self.first()?, self.last()?);
        let start = match range.start_bound() {
            Bound::Included(&i) => i,
            Bound::Excluded(&i) => i.checked_add(1)?,
            Bound::Unbounded => 0,
        };
        // Inclusive end; past the last entry the log has nothing either.
        let end = match range.end_bound() {
            Bound::Included(&i) => i.min(last),
            Bound::Excluded(&i) => i.checked_sub(1)?.min(last),
            Bound::Unbounded => last,
        };
        if start < first {
            return None;
        }
        if start > end {
            return Some(Vec::new());
        }
        let from = (start - first) as usize;
        Some(self.entries.range(from..=(end - first) as usize).map(|(e, _)| e.clone()).collect())
    }

    pub fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    fn pop_front(&mut self) {
        if let Some((_, n)) = self.entries.pop_front() {
            self.bytes -= n;
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{Command, LogId};
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            log_id: LogId::new(openraft::CommittedLeaderId::new(term, 1), index),
            payload: EntryPayload::Normal(Command::LeaseRevoke { id: index as i64 }),
        }
    }

    /// What a read of the log itself returns.
    fn read(log: &BTreeMap<u64, Entry>, range: &(Bound<u64>, Bound<u64>)) -> Vec<Entry> {
        log.iter().filter(|&(i, _)| range.contains(i)).map(|(_, e)| e.clone()).collect()
    }

    #[derive(Debug, Clone)]
    enum Change {
        Append(u8),
        Truncate(u8),
        Purge(u8),
        /// The log restarts past a gap, as after installing a snapshot.
        Restart(u8),
    }

    fn change() -> impl Strategy<Value = Change> {
        prop_oneof![
            4 => (1u8..20).prop_map(Change::Append),
            1 => any::<u8>().prop_map(Change::Truncate),
            1 => any::<u8>().prop_map(Change::Purge),
            1 => (2u8..50).prop_map(Change::Restart),
        ]
    }

    fn bound() -> impl Strategy<Value = Bound<u64>> {
        prop_oneof![
            (0u64..400).prop_map(Bound::Included),
            (0u64..400).prop_map(Bound::Excluded),
            Just(Bound::Unbounded),
        ]
    }

    proptest! {
        /// Whatever the log goes through, a read the cache answers is the
        /// read the log would answer, and a run of appends is answered
        /// from the cache.
        #[test]
        fn answers_only_what_the_log_holds(
            changes in proptest::collection::vec(change(), 1..60),
            reads in proptest::collection::vec((bound(), bound()), 1..20),
        ) {
            let (mut log, mut cache, mut term) = (BTreeMap::<u64, Entry>::new(), LogCache::default(), 1u64);
            for c in changes {
                let next: u64 = log.keys().next_back().map_or(1, |&l| l + 1);
                match c {
                    Change::Append(n) => for i in next..next + u64::from(n) {
                        log.insert(i, entry(i, term));
                        cache.append(log[&i].clone());
                    },
                    Change::Truncate(at) => {
                        term += 1;
                        log.retain(|&i, _| i < u64::from(at));
                        cache.truncate(u64::from(at));
                    }
                    Change::Purge(upto) => {
                        log.retain(|&i, _| i > u64::from(upto));
                        cache.purge(u64::from(upto));
                    }
                    Change::Restart(gap) => {
                        let i = next + u64::from(gap);
                        log.clear();
                        log.insert(i, entry(i, term));
                        cache.append(log[&i].clone());
                    }
                }
                // The given reads, and every one-sided read around what
                // the log holds (edges are where a stale entry would hide).
                let (lo, hi) = (log.keys().next().map_or(0, |f| f.saturating_sub(2)), next + 2);
                let around = (lo..=hi).flat_map(|k| [
                    (Bound::Included(k), Bound::Unbounded),
                    (Bound::Included(k), Bound::Included(k)),
                    (Bound::Unbounded, Bound::Excluded(k)),
                ]);
                for r in reads.iter().cloned().chain(around) {
                    if let Some(got) = cache.get(&r) {
                        prop_assert_eq!(got, read(&log, &r), "range {:?}", r);
                    }
                }
                if let Some(&last) = log.keys().next_back() {
                    if !cache.is_empty() {
                        prop_assert!(cache.get(&(last..)).is_some(), "the tail is always held");
                    }
                }
            }
        }
    }

    #[test]
    fn stays_within_its_bounds_and_falls_through_for_older_entries() {
        let mut cache = LogCache::default();
        for i in 1..=(MAX_ENTRIES as u64 + 10) {
            cache.append(entry(i, 1));
        }
        assert_eq!(cache.len(), MAX_ENTRIES);
        assert!(cache.get(&(5..8)).is_none(), "evicted entries are read from the log");
        let last = MAX_ENTRIES as u64 + 10;
        assert_eq!(cache.get(&(last - 1..)).unwrap().len(), 2);
        assert_eq!(cache.get(&(last + 1..last + 5)).unwrap(), vec![], "nothing past the last entry");
    }
}
