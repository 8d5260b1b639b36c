//! MVCC against a naive model: the model keeps a full copy of the key space
//! for every revision, so reads at any revision, compaction and watch history
//! all have an obvious right answer.

use std::collections::BTreeMap;

use bytes::Bytes;
use proptest::prelude::*;

use super::*;

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

fn put(k: &str, v: &str) -> Command {
    Command::Txn(TxnRequest {
        success: vec![Op::Put(PutRequest { key: b(k), value: b(v), prev_kv: true, ..Default::default() })],
        ..Default::default()
    })
}

fn del(range: KeyRange) -> Command {
    Command::Txn(TxnRequest { success: vec![Op::Delete(DeleteRequest { range, prev_kv: true })], ..Default::default() })
}

fn get(m: &Mvcc, range: KeyRange, rev: i64) -> Result<RangeResponse, MvccError> {
    m.range(&RangeRequest { range, revision: rev, ..Default::default() })
}

fn txn_ok(a: &Applied) -> &TxnResponse {
    match &a.result.outcome {
        Some(Ok(Outcome::Txn(t))) => t,
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn put_get_versions_and_tombstones() {
    let mut m = Mvcc::default();
    assert_eq!(m.revision(), 1);
    m.apply(&put("a", "1"));
    m.apply(&put("a", "2"));
    let r = get(&m, KeyRange::key(b("a")), 0).unwrap();
    assert_eq!(r.kvs[0].value, b("2"));
    assert_eq!((r.kvs[0].create_revision, r.kvs[0].mod_revision, r.kvs[0].version), (2, 3, 2));
    let d = m.apply(&del(KeyRange::key(b("a"))));
    assert_eq!(d.result.revision, 4);
    assert_eq!(d.events[0].kind, EventKind::Delete);
    assert_eq!(d.events[0].prev_kv.as_ref().unwrap().value, b("2"));
    assert!(get(&m, KeyRange::key(b("a")), 0).unwrap().kvs.is_empty());
    assert_eq!(get(&m, KeyRange::key(b("a")), 3).unwrap().kvs[0].value, b("2"));
    m.apply(&put("a", "3"));
    let r = get(&m, KeyRange::key(b("a")), 0).unwrap();
    assert_eq!((r.kvs[0].create_revision, r.kvs[0].version), (5, 1));
    // deleting nothing does not move the revision
    let d = m.apply(&del(KeyRange::key(b("zz"))));
    assert_eq!(d.result.revision, 5);
    assert!(d.events.is_empty());
}

#[test]
fn txn_compare_and_atomicity() {
    let mut m = Mvcc::default();
    m.apply(&put("k", "v"));
    let cas = |want_mod: i64, v: &str| {
        Command::Txn(TxnRequest {
            compare: vec![Compare {
                range: KeyRange::key(b("k")),
                result: CompareResult::Equal,
                target: CompareTarget::Mod(want_mod),
            }],
            success: vec![Op::Put(PutRequest { key: b("k"), value: b(v), ..Default::default() })],
            failure: vec![Op::Range(RangeRequest { range: KeyRange::key(b("k")), ..Default::default() })],
        })
    };
    let a = m.apply(&cas(2, "w"));
    assert!(txn_ok(&a).succeeded);
    let a = m.apply(&cas(2, "x"));
    assert!(!txn_ok(&a).succeeded);
    assert_eq!(a.result.revision, 3);
    // duplicate key: rejected whole, nothing written
    let bad = Command::Txn(TxnRequest {
        success: vec![
            Op::Put(PutRequest { key: b("n"), value: b("1"), ..Default::default() }),
            Op::Put(PutRequest { key: b("n"), value: b("2"), ..Default::default() }),
        ],
        ..Default::default()
    });
    let a = m.apply(&bad);
    assert_eq!(a.result.outcome, Some(Err(MvccError::DuplicateKey)));
    assert!(a.rows.is_empty() && a.events.is_empty());
    assert!(get(&m, KeyRange::key(b("n")), 0).unwrap().kvs.is_empty());
    // too many ops
    let many = Command::Txn(TxnRequest {
        success: (0..200)
            .map(|i| Op::Put(PutRequest { key: b(&format!("m{i}")), value: b("x"), ..Default::default() }))
            .collect(),
        ..Default::default()
    });
    assert!(matches!(m.apply(&many).result.outcome, Some(Err(MvccError::TooManyOps { .. }))));
    // unknown lease
    let a = m.apply(&Command::Txn(TxnRequest {
        success: vec![Op::Put(PutRequest { key: b("l"), value: b("1"), lease: 99, ..Default::default() })],
        ..Default::default()
    }));
    assert_eq!(a.result.outcome, Some(Err(MvccError::LeaseNotFound)));
    assert_eq!(m.revision(), 3);
}

#[test]
fn range_options() {
    let mut m = Mvcc::default();
    for (k, v) in [("p/c", "3"), ("p/a", "1"), ("p/b", "2"), ("q", "9")] {
        m.apply(&put(k, v));
    }
    let req = RangeRequest { range: KeyRange::prefix(b("p/")), limit: 2, ..Default::default() };
    let r = m.range(&req).unwrap();
    assert_eq!(r.kvs.iter().map(|kv| kv.key.clone()).collect::<Vec<_>>(), vec![b("p/a"), b("p/b")]);
    assert!(r.more);
    assert_eq!(r.count, 3);
    let r = m
        .range(&RangeRequest {
            range: KeyRange::prefix(b("p/")),
            sort_order: SortOrder::Descend,
            sort_target: SortTarget::Value,
            keys_only: true,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(r.kvs[0].key, b("p/c"));
    assert!(r.kvs[0].value.is_empty());
    let r = m.range(&RangeRequest { range: KeyRange::prefix(b("")), count_only: true, ..Default::default() }).unwrap();
    assert_eq!((r.count, r.kvs.len()), (4, 0));
    assert_eq!(get(&m, KeyRange::key(b("q")), 99), Err(MvccError::FutureRevision { current: 5 }));
}

#[test]
fn leases_own_keys() {
    let mut m = Mvcc::default();
    m.apply(&Command::LeaseGrant { id: 7, ttl: 10 });
    assert_eq!(m.apply(&Command::LeaseGrant { id: 7, ttl: 10 }).result.outcome, Some(Err(MvccError::LeaseExists)));
    for k in ["a", "b"] {
        m.apply(&Command::Txn(TxnRequest {
            success: vec![Op::Put(PutRequest { key: b(k), value: b("v"), lease: 7, ..Default::default() })],
            ..Default::default()
        }));
    }
    m.apply(&put("c", "v"));
    assert_eq!(m.lease(7).unwrap().keys.len(), 2);
    let a = m.apply(&Command::LeaseRevoke { id: 7 });
    assert_eq!(a.events.len(), 2);
    assert_eq!(a.result.revision, 5);
    assert!(m.lease(7).is_none());
    assert_eq!(get(&m, KeyRange::prefix(b("")), 0).unwrap().count, 1);
    assert_eq!(m.apply(&Command::LeaseRevoke { id: 7 }).result.outcome, Some(Err(MvccError::LeaseNotFound)));
}

#[test]
fn compaction_keeps_latest_and_rejects_old_reads() {
    let mut m = Mvcc::default();
    m.apply(&put("a", "1")); // 2
    m.apply(&put("a", "2")); // 3
    m.apply(&put("b", "1")); // 4
    m.apply(&del(KeyRange::key(b("b")))); // 5
    let a = m.apply(&Command::Compact { revision: 5 });
    assert_eq!(a.result.outcome, Some(Ok(Outcome::Compacted)));
    assert_eq!(get(&m, KeyRange::key(b("a")), 4), Err(MvccError::Compacted { compacted: 5 }));
    assert_eq!(get(&m, KeyRange::key(b("a")), 5).unwrap().kvs[0].value, b("2"));
    assert!(m.history(&KeyRange::prefix(b("")), 4, 5).is_err());
    assert_eq!(
        m.apply(&Command::Compact { revision: 5 }).result.outcome,
        Some(Err(MvccError::Compacted { compacted: 5 }))
    );
    // a+b rows: one live row of `a` remains; tombstoned `b` is gone entirely
    assert_eq!(m.rows().count(), 1);
}

#[test]
fn restore_from_rows_equals_original() {
    let mut m = Mvcc::default();
    m.apply(&Command::LeaseGrant { id: 1, ttl: 5 });
    m.apply(&put("x", "1"));
    m.apply(&Command::Txn(TxnRequest {
        success: vec![Op::Put(PutRequest { key: b("y"), value: b("v"), lease: 1, ..Default::default() })],
        ..Default::default()
    }));
    m.apply(&del(KeyRange::key(b("x"))));
    let back = Mvcc::from_image(m.image());
    assert_eq!(back.image(), m.image());
    assert_eq!(back.lease(1).unwrap().keys.len(), 1);
    assert_eq!(back.hash_kv(back.revision()), m.hash_kv(m.revision()));
    assert_eq!(back.size_bytes(), m.size_bytes());
}

// ---- property test against the model ----

#[derive(Clone, Debug)]
enum ModelOp {
    Put(u8, u8),
    Delete(u8),
    DeletePrefix(u8),
    Cas(u8, u8, u8),
    Compact(u8),
    Read(u8, u8),
    Watch(u8, u8),
}

fn key_of(i: u8) -> Bytes {
    Bytes::from(format!("k{}/{}", i % 3, i % 5))
}

fn model_op() -> impl Strategy<Value = ModelOp> {
    prop_oneof![
        4 => (any::<u8>(), any::<u8>()).prop_map(|(k, v)| ModelOp::Put(k, v)),
        1 => any::<u8>().prop_map(ModelOp::Delete),
        1 => any::<u8>().prop_map(ModelOp::DeletePrefix),
        2 => (any::<u8>(), any::<u8>(), any::<u8>()).prop_map(|(k, r, v)| ModelOp::Cas(k, r, v)),
        1 => any::<u8>().prop_map(ModelOp::Compact),
        2 => (any::<u8>(), any::<u8>()).prop_map(|(k, r)| ModelOp::Read(k, r)),
        1 => (any::<u8>(), any::<u8>()).prop_map(|(k, r)| ModelOp::Watch(k, r)),
    ]
}

/// `states[r]` is the key space at revision r (index 0 unused).
struct Model {
    states: Vec<BTreeMap<Bytes, KeyValue>>,
    compacted: i64,
}

impl Model {
    fn cur(&self) -> &BTreeMap<Bytes, KeyValue> {
        self.states.last().unwrap()
    }
    fn rev(&self) -> i64 {
        self.states.len() as i64 - 1
    }
    fn commit(&mut self, next: BTreeMap<Bytes, KeyValue>) {
        self.states.push(next);
    }
    fn put(&self, next: &mut BTreeMap<Bytes, KeyValue>, k: Bytes, v: Bytes) {
        let rev = self.rev() + 1;
        let (create, version) = next.get(&k).map_or((rev, 1), |p| (p.create_revision, p.version + 1));
        next.insert(
            k.clone(),
            KeyValue { key: k, create_revision: create, mod_revision: rev, version, value: v, lease: 0 },
        );
    }
}

fn pick_rev(m: &Model, r: u8) -> i64 {
    1 + (r as i64 % m.rev().max(1))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]
    #[test]
    fn mvcc_matches_model(ops in proptest::collection::vec(model_op(), 1..120)) {
        let mut s = Mvcc::default();
        let mut m = Model { states: vec![BTreeMap::new(), BTreeMap::new()], compacted: 0 };
        for op in ops {
            match op {
                ModelOp::Put(k, v) => {
                    let (k, v) = (key_of(k), Bytes::from(vec![v]));
                    s.apply(&put(std::str::from_utf8(&k).unwrap(), std::str::from_utf8(&[b'a' + v[0] % 26]).unwrap()));
                    let mut next = m.cur().clone();
                    m.put(&mut next, k, Bytes::from(vec![b'a' + v[0] % 26]));
                    m.commit(next);
                }
                ModelOp::Delete(k) | ModelOp::DeletePrefix(k) => {
                    let range = if matches!(op, ModelOp::Delete(_)) { KeyRange::key(key_of(k)) }
                        else { KeyRange::prefix(Bytes::from(format!("k{}", k % 3))) };
                    let a = s.apply(&del(range.clone()));
                    let mut next = m.cur().clone();
                    next.retain(|key, _| !range.contains(key));
                    if next.len() != m.cur().len() { m.commit(next); }
                    prop_assert_eq!(a.result.revision, m.rev());
                }
                ModelOp::Cas(k, r, v) => {
                    let k = key_of(k);
                    let want = pick_rev(&m, r);
                    let val = Bytes::from(vec![b'A' + v % 26]);
                    let a = s.apply(&Command::Txn(TxnRequest {
                        compare: vec![Compare { range: KeyRange::key(k.clone()), result: CompareResult::Equal, target: CompareTarget::Mod(want) }],
                        success: vec![Op::Put(PutRequest { key: k.clone(), value: val.clone(), ..Default::default() })],
                        failure: vec![],
                    }));
                    let hit = m.cur().get(&k).map_or(0, |kv| kv.mod_revision) == want;
                    prop_assert_eq!(txn_ok(&a).succeeded, hit);
                    if hit {
                        let mut next = m.cur().clone();
                        m.put(&mut next, k, val);
                        m.commit(next);
                    }
                }
                ModelOp::Compact(r) => {
                    let rev = pick_rev(&m, r);
                    let a = s.apply(&Command::Compact { revision: rev });
                    if rev <= m.compacted {
                        let is_compacted = matches!(a.result.outcome, Some(Err(MvccError::Compacted { .. })));
                        prop_assert!(is_compacted);
                    } else {
                        prop_assert_eq!(a.result.outcome, Some(Ok(Outcome::Compacted)));
                        m.compacted = rev;
                    }
                }
                ModelOp::Read(k, r) => {
                    let rev = pick_rev(&m, r);
                    let range = KeyRange::prefix(Bytes::from(format!("k{}", k % 3)));
                    let got = get(&s, range.clone(), rev);
                    if rev < m.compacted {
                        prop_assert_eq!(got, Err(MvccError::Compacted { compacted: m.compacted }));
                    } else {
                        let want: Vec<KeyValue> = m.states[rev as usize].values().filter(|kv| range.contains(&kv.key)).cloned().collect();
                        prop_assert_eq!(got.unwrap().kvs, want);
                    }
                }
                ModelOp::Watch(k, r) => {
                    // History from `from` must replay exactly the model's diffs.
                    let from = pick_rev(&m, r);
                    let range = KeyRange::prefix(Bytes::from(format!("k{}", k % 3)));
                    let got = s.history(&range, from, m.rev());
                    if from <= m.compacted {
                        prop_assert!(got.is_err());
                        continue;
                    }
                    let got = got.unwrap();
                    let mut want = Vec::new();
                    for rev in from.max(2)..=m.rev() {
                        let (before, after) = (&m.states[rev as usize - 1], &m.states[rev as usize]);
                        for (key, kv) in after.iter().filter(|(k, _)| range.contains(k)) {
                            if before.get(key) != Some(kv) { want.push((rev, EventKind::Put, key.clone(), kv.value.clone())); }
                        }
                        for key in before.keys().filter(|k| range.contains(k) && !after.contains_key(*k)) {
                            want.push((rev, EventKind::Delete, key.clone(), Bytes::new()));
                        }
                    }
                    want.sort();
                    let mut got: Vec<_> = got.into_iter().map(|(r, e)| (r, e.kind, e.kv.key, e.kv.value)).collect();
                    got.sort();
                    prop_assert_eq!(got, want);
                }
            }
            prop_assert_eq!(s.revision(), m.rev());
        }
        // A replica rebuilt from the persisted image agrees.
        let back = Mvcc::from_image(s.image());
        prop_assert_eq!(back.hash_kv(back.revision()), s.hash_kv(s.revision()));
    }
}
