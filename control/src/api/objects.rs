//! Kubernetes objects in the replicated store: key layout, reads and
//! optimistic-concurrency writes. The only module of the API server that
//! builds store commands.
//!
//! Key layout (one key per object; the value is a
//! [`StoredObject`](capstan_proto::k8s::stored::StoredObject) archive):
//!
//! ```text
//! /registry/<group or "core">/<plural>/<namespace>/<name>   namespaced kinds
//! /registry/<group or "core">/<plural>/<name>               cluster-scoped kinds
//! /capstan/metrics/nodes/<node>                             a node's latest usage report
//!                                                           (JSON `NodeUsage`, on a shared lease)
//! ```
//!
//! `metadata.resourceVersion` is the key's mod revision. Creates compare
//! `create_revision == 0`; updates and deletes compare the mod revision they
//! read, so a concurrent writer turns into a 409 instead of a lost update.

use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;
use capstan_proto::k8s::registry::ResourceType;
use capstan_proto::k8s::stored::StoredObject;
use capstan_raft::types::{
    Command, Compare, CompareResult, CompareTarget, DeleteRequest, KeyRange, KeyValue, MvccError, Op, OpResponse,
    Outcome, PutRequest, RangeRequest, TxnRequest,
};
use capstan_raft::{StoreError, StoreNode};
use serde_json::Value;

use super::status::ApiError;

pub fn group_segment(rt: &ResourceType) -> &str {
    if rt.group.is_empty() {
        "core"
    } else {
        rt.group
    }
}

pub fn key(rt: &ResourceType, namespace: Option<&str>, name: &str) -> Vec<u8> {
    match (rt.namespaced, namespace) {
        (true, Some(ns)) => format!("/registry/{}/{}/{ns}/{name}", group_segment(rt), rt.plural),
        _ => format!("/registry/{}/{}/{name}", group_segment(rt), rt.plural),
    }
    .into_bytes()
}

/// Every object of a kind, or of a kind in one namespace.
pub fn prefix(rt: &ResourceType, namespace: Option<&str>) -> Vec<u8> {
    match (rt.namespaced, namespace) {
        (true, Some(ns)) => format!("/registry/{}/{}/{ns}/", group_segment(rt), rt.plural),
        _ => format!("/registry/{}/{}/", group_segment(rt), rt.plural),
    }
    .into_bytes()
}

pub fn store_error(e: StoreError) -> ApiError {
    match e {
        StoreError::TooLarge { size, max } => {
            ApiError::new(413, "RequestEntityTooLarge", format!("request is too large ({size} bytes, limit {max})"))
        }
        StoreError::NoSpace | StoreError::Mvcc(MvccError::NoSpace) => {
            ApiError::new(
                507,
                "InsufficientStorage",
                "the store is out of space (over its quota, or a master's data disk is almost full): only deletes are accepted",
            )
        }
        StoreError::Mvcc(MvccError::Compacted { compacted }) => {
            ApiError::gone(format!("The resourceVersion for the provided list is too old (compacted at {compacted})."))
        }
        StoreError::Mvcc(MvccError::FutureRevision { current }) => {
            ApiError::new(504, "Timeout", format!("Too large resource version: the store is at revision {current}"))
        }
        StoreError::Indeterminate(m) => {
            ApiError::new(504, "Timeout", format!("the write may or may not have been applied: {m}"))
        }
        other => ApiError::unavailable(other.to_string()),
    }
}

/// A decoded object and its revision.
pub struct Found {
    pub object: Value,
    pub mod_revision: i64,
}

/// One page of a list.
pub struct Page {
    pub items: Vec<Value>,
    /// The revision the list was read at (the list's resourceVersion).
    pub revision: i64,
    pub continue_token: Option<String>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct ContinueToken {
    rv: i64,
    start: String,
}

pub fn decode_kv(kv: &KeyValue) -> Result<Value, ApiError> {
    StoredObject::decode(&kv.value, kv.mod_revision)
        .map_err(|e| ApiError::internal(format!("stored object {}: {e}", String::from_utf8_lossy(&kv.key))))
}

fn encode(obj: &Value) -> Result<Bytes, ApiError> {
    let stored = StoredObject::from_object(obj).map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(Bytes::from(stored.encode()))
}

/// Events expire after this long (Kubernetes' `--event-ttl`): they are
/// high-churn, low-value data and must not fill the store.
pub const EVENT_TTL_SECS: i64 = 3600;
/// Events created within this window share one lease, as Kubernetes'
/// apiserver reuses leases, so an event burst is not a lease burst.
const EVENT_LEASE_REUSE: std::time::Duration = std::time::Duration::from_secs(60);

/// Node usage reports (metrics.k8s.io) vanish between this long after
/// their report and this minus [`METRICS_LEASE_REUSE`]: agents report every
/// 15 s, so only a node that stopped reporting loses its metrics.
pub const METRICS_TTL_SECS: i64 = 75;
const METRICS_LEASE_REUSE: std::time::Duration = std::time::Duration::from_secs(30);
pub const METRICS_PREFIX: &str = "/capstan/metrics/nodes/";

/// A lease shared by the writes of a short window (granted, then reused).
type SharedLease = Arc<tokio::sync::Mutex<Option<(i64, std::time::Instant)>>>;

#[derive(Clone)]
pub struct Objects {
    pub node: Arc<StoreNode>,
    event_lease: SharedLease,
    metrics_lease: SharedLease,
}

impl Objects {
    pub fn new(node: Arc<StoreNode>) -> Objects {
        Objects { node, event_lease: Default::default(), metrics_lease: Default::default() }
    }

    /// The lease new Events are attached to: granted with the event TTL
    /// plus the reuse window, so no event outlives its TTL by less.
    async fn event_lease(&self) -> Result<i64, ApiError> {
        self.shared_lease(&self.event_lease, EVENT_TTL_SECS + EVENT_LEASE_REUSE.as_secs() as i64, EVENT_LEASE_REUSE)
            .await
    }

    async fn shared_lease(&self, slot: &SharedLease, ttl: i64, reuse: std::time::Duration) -> Result<i64, ApiError> {
        let mut cur = slot.lock().await;
        if let Some((id, at)) = *cur {
            if at.elapsed() < reuse {
                return Ok(id);
            }
        }
        use rand::Rng;
        let id = rand::thread_rng().gen_range(1..i64::MAX);
        let r = self.node.write(Command::LeaseGrant { id, ttl }).await.map_err(store_error)?;
        match r.outcome {
            Some(Ok(Outcome::LeaseGranted { id, .. })) => {
                *cur = Some((id, std::time::Instant::now()));
                Ok(id)
            }
            Some(Err(e)) => Err(store_error(StoreError::Mvcc(e))),
            _ => Err(ApiError::internal("unexpected store outcome granting a lease")),
        }
    }

    /// Stores `node`'s latest usage report (one put; the lease is shared by
    /// every report this master writes within [`METRICS_LEASE_REUSE`]), so
    /// any master can serve it and a silent node's report expires.
    pub async fn put_node_metrics(&self, node: &str, report: Vec<u8>) -> Result<(), ApiError> {
        let key = Bytes::from(format!("{METRICS_PREFIX}{node}"));
        for _ in 0..2 {
            let lease = self.shared_lease(&self.metrics_lease, METRICS_TTL_SECS, METRICS_LEASE_REUSE).await?;
            let put = Op::Put(PutRequest {
                key: key.clone(),
                value: Bytes::from(report.clone()),
                lease,
                ..Default::default()
            });
            let r = self.node.write(Command::Txn(TxnRequest { success: vec![put], ..Default::default() })).await;
            match r.map_err(store_error)?.outcome {
                Some(Ok(_)) => return Ok(()),
                // Revoked under us (e.g. expired while this master was cut off): grant a new one.
                Some(Err(MvccError::LeaseNotFound)) => *self.metrics_lease.lock().await = None,
                Some(Err(e)) => return Err(store_error(StoreError::Mvcc(e))),
                None => return Err(ApiError::internal("unexpected store outcome writing node metrics")),
            }
        }
        Err(ApiError::unavailable("node metrics lease kept disappearing"))
    }

    /// Every node's latest usage report in this master's applied state.
    pub fn node_metrics_local(&self) -> Result<Vec<(String, Bytes)>, ApiError> {
        let req = RangeRequest { range: KeyRange::prefix(METRICS_PREFIX.as_bytes().to_vec()), ..Default::default() };
        let (kvs, _, _) = self.range(&req)?;
        Ok(kvs
            .into_iter()
            .map(|kv| (String::from_utf8_lossy(&kv.key[METRICS_PREFIX.len()..]).into_owned(), kv.value))
            .collect())
    }

    /// Waits until this master has applied everything committed before the
    /// call (ReadIndex), so the read that follows is linearizable.
    pub async fn sync(&self) -> Result<(), ApiError> {
        self.node.read_index().await.map_err(store_error)
    }

    pub fn revision(&self) -> i64 {
        self.node.state().read().mvcc.revision()
    }

    pub fn range(&self, req: &RangeRequest) -> Result<(Vec<KeyValue>, bool, i64), ApiError> {
        let st = self.node.state().read();
        let r = st.mvcc.range(req).map_err(|e| store_error(StoreError::Mvcc(e)))?;
        let rev = if req.revision > 0 { req.revision } else { st.mvcc.revision() };
        Ok((r.kvs, r.more, rev))
    }

    /// Reads one object from this master's applied state (call `sync` first
    /// for a linearizable read).
    pub fn get_local(&self, rt: &ResourceType, ns: Option<&str>, name: &str) -> Result<Option<Found>, ApiError> {
        match self.get_stored_local(rt, ns, name)? {
            Some(kv) => Ok(Some(Found { object: decode_kv(&kv)?, mod_revision: kv.mod_revision })),
            None => Ok(None),
        }
    }

    /// The object as stored (an archive to read in place), not decoded.
    pub fn get_stored_local(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        name: &str,
    ) -> Result<Option<KeyValue>, ApiError> {
        let (kvs, _, _) =
            self.range(&RangeRequest { range: KeyRange::key(key(rt, ns, name)), ..Default::default() })?;
        Ok(kvs.into_iter().next())
    }

    /// [`Objects::get_stored_local`] after catching up (linearizable).
    pub async fn get_stored(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        name: &str,
    ) -> Result<Option<KeyValue>, ApiError> {
        self.sync().await?;
        self.get_stored_local(rt, ns, name)
    }

    pub async fn get(&self, rt: &ResourceType, ns: Option<&str>, name: &str) -> Result<Option<Found>, ApiError> {
        self.sync().await?;
        self.get_local(rt, ns, name)
    }

    /// A page of the objects `select` returns (it decodes the ones it
    /// keeps), in key order, read at one revision (continuations resume at
    /// the same revision).
    pub fn list_local(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        limit: Option<i64>,
        continue_token: Option<&str>,
        select: &dyn Fn(&KeyValue) -> Result<Option<Value>, ApiError>,
    ) -> Result<Page, ApiError> {
        let full = KeyRange::prefix(prefix(rt, ns));
        let (start, revision) = match continue_token {
            Some(t) => {
                let c = base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(t)
                    .ok()
                    .and_then(|b| serde_json::from_slice::<ContinueToken>(&b).ok())
                    .filter(|c| c.start.as_bytes() >= &full.start[..] && c.rv > 0)
                    .ok_or_else(|| ApiError::bad_request("invalid continue token"))?;
                (Bytes::from(c.start.into_bytes()), c.rv)
            }
            None => (full.start.clone(), self.revision()),
        };
        let limit = limit.filter(|l| *l > 0);
        let mut items = Vec::new();
        let mut cursor = start;
        let mut next = None;
        // Read in chunks so a selective filter over a big range stays bounded per step.
        const CHUNK: i64 = 1000;
        'outer: loop {
            let req = RangeRequest {
                range: KeyRange { start: cursor.clone(), end: full.end.clone() },
                revision,
                limit: CHUNK,
                ..Default::default()
            };
            let (kvs, more, _) = self.range(&req)?;
            for kv in &kvs {
                if limit.is_some_and(|l| items.len() as i64 >= l) {
                    next = Some(kv.key.clone());
                    break 'outer;
                }
                if let Some(v) = select(kv)? {
                    items.push(v);
                }
            }
            match kvs.last() {
                Some(last) if more => {
                    let mut k = last.key.to_vec();
                    k.push(0);
                    cursor = Bytes::from(k);
                }
                _ => break,
            }
        }
        let continue_token = match next {
            Some(k) => {
                let tok =
                    serde_json::to_vec(&ContinueToken { rv: revision, start: String::from_utf8_lossy(&k).into() })
                        .map_err(|e| ApiError::internal(e.to_string()))?;
                Some(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(tok))
            }
            None => None,
        };
        Ok(Page { items, revision, continue_token })
    }

    async fn txn(&self, txn: TxnRequest) -> Result<(bool, Vec<OpResponse>, i64), ApiError> {
        let r = self.node.write(Command::Txn(txn)).await.map_err(store_error)?;
        match r.outcome {
            Some(Ok(Outcome::Txn(t))) => Ok((t.succeeded, t.responses, r.revision)),
            Some(Err(e)) => Err(store_error(StoreError::Mvcc(e))),
            _ => Err(ApiError::internal("unexpected store outcome")),
        }
    }

    /// Creates `obj`; 409 AlreadyExists if the key is taken, 422 if one of
    /// its claims (see [`claims`]) is held by another object.
    pub async fn create(&self, rt: &ResourceType, obj: Value) -> Result<Value, ApiError> {
        let txn = self.create_txn(rt, &obj).await?;
        let (_, rev) = self.commit_create(rt, txn).await?;
        Ok(with_rv(obj, rev))
    }

    /// [`Objects::create`], answering with what was stored (the archive)
    /// and its revision. `obj` is dropped before the write waits for Raft:
    /// freed while still in cache it cost a third of what it did after.
    pub async fn create_stored(&self, rt: &ResourceType, obj: Value) -> Result<(Bytes, i64), ApiError> {
        let txn = self.create_txn(rt, &obj).await?;
        drop(obj);
        self.commit_create(rt, txn).await
    }

    /// The transaction that creates `obj` with its claims.
    async fn create_txn(&self, rt: &ResourceType, obj: &Value) -> Result<CreateTxn, ApiError> {
        let (ns, name) = ns_name(obj);
        let k = Bytes::from(key(rt, ns.as_deref(), &name));
        let claimed = claims(rt.kind, obj);
        let absent = |key: &Bytes| Compare {
            range: KeyRange::key(key.clone()),
            result: CompareResult::Equal,
            target: CompareTarget::Create(0),
        };
        let lease = if rt.kind == "Event" { self.event_lease().await? } else { 0 };
        let mut compare = vec![absent(&k)];
        let stored = encode(obj)?;
        let mut success =
            vec![Op::Put(PutRequest { key: k.clone(), value: stored.clone(), lease, ..Default::default() })];
        for (c, _) in &claimed {
            compare.push(absent(c));
            success.push(Op::Put(PutRequest { key: c.clone(), value: k.clone(), ..Default::default() }));
        }
        Ok(CreateTxn {
            txn: TxnRequest { compare, success, failure: vec![] },
            stored,
            key: k,
            name,
            claim: claimed.first().map(|(_, field)| *field),
        })
    }

    async fn commit_create(&self, rt: &ResourceType, c: CreateTxn) -> Result<(Bytes, i64), ApiError> {
        let (ok, _, rev) = self.txn(c.txn).await?;
        if !ok {
            self.sync().await?;
            if let (false, Some(field)) = (self.exists_local(&c.key), c.claim) {
                return Err(already_allocated(rt, &c.name, field));
            }
            return Err(ApiError::already_exists(rt.group, rt.plural, &c.name));
        }
        Ok((c.stored, rev))
    }

    fn exists_local(&self, key: &Bytes) -> bool {
        self.range(&RangeRequest { range: KeyRange::key(key.clone()), ..Default::default() })
            .is_ok_and(|(kvs, _, _)| !kvs.is_empty())
    }

    /// Stores `stored` over the object of its name if that is still at
    /// revision `expected` (409 otherwise); its new revision. For writers
    /// that edit the stored form itself (the scheduler's bindings): the
    /// object's claims (see [`claims`]) are not looked at, so kinds that
    /// hold any are refused.
    pub async fn update_stored(&self, rt: &ResourceType, stored: StoredObject, expected: i64) -> Result<i64, ApiError> {
        if CLAIMING_KINDS.contains(&rt.kind) {
            return Err(ApiError::internal(format!("{} updates must go through their claims", rt.kind)));
        }
        let ns = (!stored.namespace.is_empty()).then_some(stored.namespace.as_str());
        let k = Bytes::from(key(rt, ns, &stored.name));
        self.replace(rt, &stored.name, k, Bytes::from(stored.encode()), vec![], vec![], expected).await
    }

    /// Replaces the object if it is still at `expected` (its mod revision).
    /// A claim (see [`claims`]) the object gains, e.g. a pod CIDR set on a
    /// Node that had none, is taken in the same txn (422 if another object
    /// holds it); one it already holds is checked to still be its own.
    pub async fn update(&self, rt: &ResourceType, obj: Value, expected: i64) -> Result<Value, ApiError> {
        let (ns, name) = ns_name(&obj);
        let k = Bytes::from(key(rt, ns.as_deref(), &name));
        let owner = Bytes::from(k.to_vec());
        let (mut compare, mut puts) = (vec![], vec![]);
        for (c, field) in claims(rt.kind, &obj) {
            let held = self.range(&RangeRequest { range: KeyRange::key(c.clone()), ..Default::default() })?.0;
            let target = match held.first() {
                Some(kv) if kv.value == owner => CompareTarget::Value(owner.clone()),
                Some(_) => return Err(already_allocated(rt, &name, field)),
                None => {
                    puts.push(Op::Put(PutRequest { key: c.clone(), value: owner.clone(), ..Default::default() }));
                    CompareTarget::Create(0)
                }
            };
            compare.push(Compare { range: KeyRange::key(c), result: CompareResult::Equal, target });
        }
        let rev = self.replace(rt, &name, k, encode(&obj)?, compare, puts, expected).await?;
        Ok(with_rv(obj, rev))
    }

    /// Puts `value` under `k` (with `puts`) if the object there is still
    /// at revision `expected` and `compare` holds; 409 otherwise. Its new
    /// revision.
    #[allow(clippy::too_many_arguments)]
    async fn replace(
        &self,
        rt: &ResourceType,
        name: &str,
        k: Bytes,
        value: Bytes,
        mut compare: Vec<Compare>,
        puts: Vec<Op>,
        expected: i64,
    ) -> Result<i64, ApiError> {
        compare.insert(
            0,
            Compare {
                range: KeyRange::key(k.clone()),
                result: CompareResult::Equal,
                target: CompareTarget::Mod(expected),
            },
        );
        // An Event keeps the lease it was created with.
        let mut success =
            vec![Op::Put(PutRequest { key: k, value, ignore_lease: rt.kind == "Event", ..Default::default() })];
        success.extend(puts);
        let (ok, _, rev) = self.txn(TxnRequest { compare, success, failure: vec![] }).await?;
        if !ok {
            return Err(ApiError::conflict(
                rt.group,
                rt.plural,
                name,
                "the object has been modified; please apply your changes to the latest version and try again",
            ));
        }
        Ok(rev)
    }

    /// Deletes `obj` (and releases its claims) if it is still at
    /// `expected`; returns the revision of the delete.
    pub async fn delete(&self, rt: &ResourceType, obj: &Value, expected: i64) -> Result<i64, ApiError> {
        let (ns, name) = ns_name(obj);
        let k = Bytes::from(key(rt, ns.as_deref(), &name));
        let mut success = vec![Op::Delete(DeleteRequest { range: KeyRange::key(k.clone()), prev_kv: false })];
        for (c, _) in claims(rt.kind, obj) {
            success.push(Op::Delete(DeleteRequest { range: KeyRange::key(c), prev_kv: false }));
        }
        let txn = TxnRequest {
            compare: vec![Compare {
                range: KeyRange::key(k),
                result: CompareResult::Equal,
                target: CompareTarget::Mod(expected),
            }],
            success,
            failure: vec![],
        };
        let (ok, _, rev) = self.txn(txn).await?;
        if !ok {
            return Err(ApiError::conflict(rt.group, rt.plural, &name, "the object has been modified"));
        }
        Ok(rev)
    }

    /// Writes a key outside the object layout (Capstan's own, under
    /// `/capstan/`) unless it already exists; whether this call wrote it.
    pub async fn put_if_absent(&self, key: Vec<u8>, value: Vec<u8>) -> Result<bool, ApiError> {
        let key = Bytes::from(key);
        let txn = TxnRequest {
            compare: vec![Compare {
                range: KeyRange::key(key.clone()),
                result: CompareResult::Equal,
                target: CompareTarget::Create(0),
            }],
            success: vec![Op::Put(PutRequest { key, value: Bytes::from(value), ..Default::default() })],
            failure: vec![],
        };
        Ok(self.txn(txn).await?.0)
    }
}

/// The kinds whose objects can hold claims (see [`claims`]).
const CLAIMING_KINDS: &[&str] = &["Service", "Node"];

/// Keys an object holds exclusively besides its own (with the field that
/// claims each): a Service's cluster IP. Claimed in the create's txn,
/// released in the delete's, so two Services never share an IP.
pub fn claims(kind: &str, obj: &Value) -> Vec<(Bytes, &'static str)> {
    if !CLAIMING_KINDS.contains(&kind) {
        return vec![];
    }
    match kind {
        "Service" => match obj["spec"]["clusterIP"].as_str() {
            Some(ip) if ip.parse::<std::net::IpAddr>().is_ok() => {
                vec![(Bytes::from(format!("/registry/ranges/serviceips/{ip}")), "spec.clusterIP")]
            }
            _ => vec![],
        },
        // A node's pod CIDR: no two nodes route the same pod addresses.
        "Node" => match obj["spec"]["podCIDR"].as_str() {
            Some(cidr) if !cidr.is_empty() => vec![(pod_cidr_claim(cidr), "spec.podCIDR")],
            _ => vec![],
        },
        _ => vec![],
    }
}

/// A create's write and what its failure is reported with.
struct CreateTxn {
    txn: TxnRequest,
    stored: Bytes,
    key: Bytes,
    name: String,
    /// The field of its first claim, if it claims any.
    claim: Option<&'static str>,
}

/// 422 for a claim (see [`claims`]) another object holds.
fn already_allocated(rt: &ResourceType, name: &str, field: &str) -> ApiError {
    let what = if field == "spec.podCIDR" { "provided CIDR" } else { "provided IP" };
    ApiError::invalid(rt.kind, name, vec![(field.to_string(), format!("Invalid value: {what} is already allocated"))])
}

pub fn pod_cidr_claim(cidr: &str) -> Bytes {
    Bytes::from(format!("/registry/ranges/podcidrs/{}", cidr.replace('/', "_")))
}

pub fn ns_name(obj: &Value) -> (Option<String>, String) {
    let m = &obj["metadata"];
    (m["namespace"].as_str().map(str::to_string), m["name"].as_str().unwrap_or_default().to_string())
}

/// The object's resourceVersion as a store revision (0 if absent).
pub fn revision_of(obj: &Value) -> i64 {
    obj["metadata"]["resourceVersion"].as_str().and_then(|s| s.parse().ok()).unwrap_or(0)
}

pub fn with_rv(mut obj: Value, rev: i64) -> Value {
    obj["metadata"]["resourceVersion"] = Value::String(rev.to_string());
    obj
}

#[cfg(test)]
mod tests {
    use super::*;
    use capstan_proto::k8s::registry::by_kind;

    #[test]
    fn key_layout() {
        let pods = by_kind("v1", "Pod").unwrap();
        assert_eq!(key(pods, Some("d"), "p"), b"/registry/core/pods/d/p");
        assert_eq!(prefix(pods, None), b"/registry/core/pods/");
        let crb = by_kind("rbac.authorization.k8s.io/v1", "ClusterRoleBinding").unwrap();
        assert_eq!(key(crb, None, "x"), b"/registry/rbac.authorization.k8s.io/clusterrolebindings/x");
    }
}
