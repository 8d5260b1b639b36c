//! The nine watch guarantees (RELIABILITY.md, after etcd's robustness
//! suite), each counted as a number of violations for one watcher, from the
//! store's revision history and the responses that watcher received.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// One event as stored (the truth) or as received.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub key: String,
    pub delete: bool,
    pub value: String,
    pub mod_revision: i64,
    pub create_revision: i64,
    pub version: i64,
    /// The previous value, when the watch asked for it (None: key was absent).
    pub prev_value: Option<String>,
}

impl Event {
    fn is_create(&self) -> bool {
        !self.delete && self.create_revision == self.mod_revision
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct WatchSpec {
    /// `[start, end)`; empty `end` = the single key `start`.
    pub start: String,
    pub end: String,
    pub start_revision: i64,
    pub prev_kv: bool,
    pub no_put: bool,
    pub no_delete: bool,
    /// The highest revision the run compacted: a watch cancelled as
    /// "compacted" beyond it was told a lie (0: nothing was compacted, so
    /// no such cancellation is ever right).
    pub compacted_at_most: i64,
}

impl WatchSpec {
    fn matches(&self, e: &Event) -> bool {
        let in_range = if self.end.is_empty() { e.key == self.start } else { e.key >= self.start && e.key < self.end };
        let wanted = if e.delete { !self.no_delete } else { !self.no_put };
        in_range && wanted
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    Events(Vec<Event>),
    Progress {
        revision: i64,
    },
    /// The watch was cancelled because the revisions it needed were
    /// compacted up to `revision` (etcd's `compact_revision`): the watcher
    /// resumes after it, and the events it missed in between are excused.
    Compacted {
        revision: i64,
    },
}

/// Violations per guarantee; all zero for a correct watch.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchReport {
    pub filter: u64,
    pub ordered: u64,
    pub unique: u64,
    pub atomic: u64,
    pub bookmarkable: u64,
    pub reliable: u64,
    pub resumable: u64,
    pub prev_value: u64,
    pub create_flag: u64,
}

impl WatchReport {
    pub fn total(&self) -> u64 {
        self.filter
            + self.ordered
            + self.unique
            + self.atomic
            + self.bookmarkable
            + self.reliable
            + self.resumable
            + self.prev_value
            + self.create_flag
    }
}

/// `stored`: revision -> that revision's events, in order (the whole history
/// the watch could have seen, at least from `spec.start_revision`).
pub fn check(spec: &WatchSpec, stored: &BTreeMap<i64, Vec<Event>>, received: &[Response]) -> WatchReport {
    let mut r = WatchReport::default();
    let truth = |rev: i64, key: &str| stored.get(&rev).and_then(|evs| evs.iter().find(|e| e.key == key));
    let mut last_rev = i64::MIN;
    let mut progress = i64::MIN;
    let mut seen: BTreeSet<(i64, String)> = BTreeSet::new();
    let mut delivered: Vec<&Event> = Vec::new();
    // Revisions a compaction excused the watcher from, inclusive ranges.
    let mut excused: Vec<(i64, i64)> = Vec::new();
    for resp in received {
        match resp {
            Response::Progress { revision } => progress = progress.max(*revision),
            Response::Compacted { revision } => {
                if *revision > spec.compacted_at_most {
                    // Claimed a compaction that never happened: a gap passed off as legitimate.
                    r.reliable += 1;
                }
                let from = if last_rev == i64::MIN { spec.start_revision } else { last_rev + 1 };
                excused.push((from, *revision));
            }
            Response::Events(events) => {
                let mut per_rev: BTreeMap<i64, usize> = BTreeMap::new();
                for e in events {
                    if !spec.matches(e) {
                        r.filter += 1;
                    }
                    if e.mod_revision < last_rev {
                        r.ordered += 1;
                    }
                    last_rev = last_rev.max(e.mod_revision);
                    if !seen.insert((e.mod_revision, e.key.clone())) {
                        r.unique += 1;
                    }
                    if e.mod_revision <= progress {
                        r.bookmarkable += 1;
                    }
                    match truth(e.mod_revision, &e.key) {
                        Some(t) => {
                            if spec.prev_kv && t.prev_value != e.prev_value {
                                r.prev_value += 1;
                            }
                            if t.is_create() != e.is_create() {
                                r.create_flag += 1;
                            }
                        }
                        // An event the store never had: nothing else to compare.
                        None => r.reliable += 1,
                    }
                    *per_rev.entry(e.mod_revision).or_default() += 1;
                    delivered.push(e);
                }
                for (rev, n) in per_rev {
                    let want = stored.get(&rev).map_or(0, |evs| evs.iter().filter(|e| spec.matches(e)).count());
                    if n != want {
                        r.atomic += 1;
                    }
                }
            }
        }
    }
    // Reliable: between the first and last revision delivered, the delivered
    // (revision, key) pairs equal the stored matching ones.
    if let (Some(first), Some(last)) =
        (delivered.iter().map(|e| e.mod_revision).min(), delivered.iter().map(|e| e.mod_revision).max())
    {
        let want: BTreeSet<(i64, String)> = stored
            .range(first..=last)
            .filter(|(rev, _)| !excused_at(&excused, **rev))
            .flat_map(|(rev, evs)| evs.iter().filter(|e| spec.matches(e)).map(move |e| (*rev, e.key.clone())))
            .collect();
        let seen: BTreeSet<(i64, String)> = seen.into_iter().filter(|(rev, _)| !excused_at(&excused, *rev)).collect();
        r.reliable += want.symmetric_difference(&seen).count() as u64;
    }
    // Resumable: the first event is the first matching one at or after the start.
    let expected_first = stored
        .range(spec.start_revision.max(0)..)
        .filter(|(rev, _)| !excused_at(&excused, **rev))
        .flat_map(|(_, evs)| evs.iter())
        .find(|e| spec.matches(e))
        .map(|e| (e.mod_revision, e.key.clone()));
    let first = delivered.first().map(|e| (e.mod_revision, e.key.clone()));
    if first.is_some() && first != expected_first {
        r.resumable += 1;
    }
    r
}

fn excused_at(excused: &[(i64, i64)], rev: i64) -> bool {
    excused.iter().any(|&(from, to)| from <= rev && rev <= to)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(rev: i64, key: &str, value: &str, create: i64, version: i64, prev: Option<&str>) -> Event {
        Event {
            key: key.into(),
            delete: false,
            value: value.into(),
            mod_revision: rev,
            create_revision: create,
            version,
            prev_value: prev.map(String::from),
        }
    }

    fn history() -> BTreeMap<i64, Vec<Event>> {
        BTreeMap::from([
            (2, vec![ev(2, "a", "1", 2, 1, None)]),
            (3, vec![ev(3, "a", "2", 2, 2, Some("1")), ev(3, "b", "1", 3, 1, None)]),
            (4, vec![ev(4, "z", "9", 4, 1, None)]),
            (5, vec![ev(5, "b", "2", 3, 2, Some("1"))]),
        ])
    }

    fn spec() -> WatchSpec {
        WatchSpec { start: "a".into(), end: "c".into(), start_revision: 2, prev_kv: true, ..Default::default() }
    }

    fn perfect() -> Vec<Response> {
        let h = history();
        vec![
            Response::Events(h[&2].clone()),
            Response::Events(h[&3].clone()),
            Response::Progress { revision: 4 },
            Response::Events(h[&5].clone()),
        ]
    }

    #[test]
    fn a_correct_watch_has_no_violations() {
        assert_eq!(check(&spec(), &history(), &perfect()), WatchReport::default());
    }

    #[test]
    fn each_planted_bug_is_counted_by_its_guarantee() {
        let (s, h) = (spec(), history());
        // dropped revision 3 -> reliable
        let mut resp = perfect();
        resp.remove(1);
        assert!(check(&s, &h, &resp).reliable > 0);
        // duplicate -> unique
        let mut resp = perfect();
        resp.push(Response::Events(h[&5].clone()));
        assert!(check(&s, &h, &resp).unique > 0);
        // reordered -> ordered
        let mut resp = perfect();
        resp.swap(0, 1);
        assert!(check(&s, &h, &resp).ordered > 0);
        // revision 3 split across two responses -> atomic
        let mut resp = perfect();
        resp[1] = Response::Events(vec![h[&3][0].clone()]);
        resp.insert(2, Response::Events(vec![h[&3][1].clone()]));
        assert!(check(&s, &h, &resp).atomic > 0);
        // an event at or below a progress notification -> bookmarkable
        let resp = vec![Response::Progress { revision: 3 }, Response::Events(h[&3].clone())];
        assert!(check(&s, &h, &resp).bookmarkable > 0);
        // wrong first event -> resumable
        let resp = vec![Response::Events(h[&3].clone()), Response::Events(h[&5].clone())];
        assert!(check(&s, &h, &resp).resumable > 0);
        // out-of-range key -> filter
        let resp = vec![Response::Events(h[&2].clone()), Response::Events(h[&4].clone())];
        assert!(check(&s, &h, &resp).filter > 0);
        // wrong prev value -> prev_value
        let mut bad = h[&5].clone();
        bad[0].prev_value = Some("nope".into());
        let mut resp = perfect();
        resp[3] = Response::Events(bad);
        assert!(check(&s, &h, &resp).prev_value > 0);
        // a create reported as an update -> create_flag
        let mut bad = h[&2].clone();
        bad[0].create_revision = 1;
        let mut resp = perfect();
        resp[0] = Response::Events(bad);
        assert!(check(&s, &h, &resp).create_flag > 0);
    }

    #[test]
    fn a_compaction_excuses_the_gap_it_claims_and_no_more() {
        let h = history();
        let compacted = WatchSpec { compacted_at_most: 3, ..spec() };
        // Cancelled as compacted up to 3 after revision 2, resumed at 4: the
        // events of 3 are excused.
        let resumed =
            vec![Response::Events(h[&2].clone()), Response::Compacted { revision: 3 }, Response::Events(h[&5].clone())];
        assert_eq!(check(&compacted, &h, &resumed), WatchReport::default());
        // Compacted before the first event: the first one after it is right.
        let late = vec![Response::Compacted { revision: 3 }, Response::Events(h[&5].clone())];
        assert_eq!(check(&compacted, &h, &late), WatchReport::default());
        // A compaction beyond any the run made is a lie, whatever follows.
        assert!(check(&spec(), &h, &resumed).reliable > 0, "nothing was compacted");
        let lie = vec![Response::Events(h[&2].clone()), Response::Compacted { revision: 4 }];
        assert!(check(&compacted, &h, &lie).reliable > 0);
        // The excuse covers only up to the claimed revision.
        let skipped =
            vec![Response::Events(h[&2].clone()), Response::Compacted { revision: 2 }, Response::Events(h[&5].clone())];
        assert!(check(&compacted, &h, &skipped).reliable > 0, "revision 3 was not compacted yet");
    }
}
