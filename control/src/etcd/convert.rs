//! Translation between etcd's protobuf messages and the store's own types,
//! and from store errors to gRPC statuses with etcd's exact messages
//! (etcd clients, etcdctl included, recognise errors by their text).

use bytes::Bytes;
use capstan_proto::etcd::etcdserverpb as pb;
use capstan_proto::etcd::mvccpb;
use capstan_raft::mvcc::{Event, EventKind};
use capstan_raft::types::*;
use capstan_raft::StoreError;
use tonic::Status;

pub fn range_of(key: Vec<u8>, range_end: Vec<u8>) -> KeyRange {
    KeyRange { start: Bytes::from(key), end: Bytes::from(range_end) }
}

pub fn range_request(r: pb::RangeRequest) -> Result<RangeRequest, Status> {
    if r.key.is_empty() && r.range_end.is_empty() {
        return Err(Status::invalid_argument("etcdserver: key is not provided"));
    }
    let sort_order = match r.sort_order {
        0 => SortOrder::None,
        1 => SortOrder::Ascend,
        2 => SortOrder::Descend,
        _ => return Err(Status::invalid_argument("etcdserver: invalid sort option")),
    };
    let sort_target = match r.sort_target {
        0 => SortTarget::Key,
        1 => SortTarget::Version,
        2 => SortTarget::Create,
        3 => SortTarget::Mod,
        4 => SortTarget::Value,
        _ => return Err(Status::invalid_argument("etcdserver: invalid sort option")),
    };
    Ok(RangeRequest {
        range: range_of(r.key, r.range_end),
        limit: r.limit.max(0),
        revision: r.revision,
        sort_order,
        sort_target,
        keys_only: r.keys_only,
        count_only: r.count_only,
        min_mod_revision: r.min_mod_revision,
        max_mod_revision: r.max_mod_revision,
        min_create_revision: r.min_create_revision,
        max_create_revision: r.max_create_revision,
    })
}

pub fn put_request(r: pb::PutRequest) -> Result<PutRequest, Status> {
    if r.key.is_empty() {
        return Err(Status::invalid_argument("etcdserver: key is not provided"));
    }
    Ok(PutRequest {
        key: Bytes::from(r.key),
        value: Bytes::from(r.value),
        lease: r.lease,
        prev_kv: r.prev_kv,
        ignore_value: r.ignore_value,
        ignore_lease: r.ignore_lease,
    })
}

pub fn delete_request(r: pb::DeleteRangeRequest) -> Result<DeleteRequest, Status> {
    if r.key.is_empty() && r.range_end.is_empty() {
        return Err(Status::invalid_argument("etcdserver: key is not provided"));
    }
    Ok(DeleteRequest { range: range_of(r.key, r.range_end), prev_kv: r.prev_kv })
}

fn op(o: pb::RequestOp) -> Result<Op, Status> {
    use pb::request_op::Request;
    match o.request {
        Some(Request::RequestRange(r)) => Ok(Op::Range(range_request(r)?)),
        Some(Request::RequestPut(r)) => Ok(Op::Put(put_request(r)?)),
        Some(Request::RequestDeleteRange(r)) => Ok(Op::Delete(delete_request(r)?)),
        Some(Request::RequestTxn(_)) => Err(Status::invalid_argument("etcdserver: nested txn is not supported")),
        None => Err(Status::invalid_argument("etcdserver: empty request op")),
    }
}

pub fn txn_request(t: pb::TxnRequest) -> Result<TxnRequest, Status> {
    use pb::compare::TargetUnion;
    let mut compare = Vec::with_capacity(t.compare.len());
    for c in t.compare {
        let result = match c.result {
            0 => CompareResult::Equal,
            1 => CompareResult::Greater,
            2 => CompareResult::Less,
            3 => CompareResult::NotEqual,
            _ => return Err(Status::invalid_argument("etcdserver: invalid compare result")),
        };
        let target = match (c.target, c.target_union) {
            (0, Some(TargetUnion::Version(v))) => CompareTarget::Version(v),
            (1, Some(TargetUnion::CreateRevision(v))) => CompareTarget::Create(v),
            (2, Some(TargetUnion::ModRevision(v))) => CompareTarget::Mod(v),
            (3, Some(TargetUnion::Value(v))) => CompareTarget::Value(Bytes::from(v)),
            (4, Some(TargetUnion::Lease(v))) => CompareTarget::Lease(v),
            // proto3 drops zero values: a missing union means 0 / empty
            (0, None) => CompareTarget::Version(0),
            (1, None) => CompareTarget::Create(0),
            (2, None) => CompareTarget::Mod(0),
            (3, None) => CompareTarget::Value(Bytes::new()),
            (4, None) => CompareTarget::Lease(0),
            _ => return Err(Status::invalid_argument("etcdserver: compare target does not match its value")),
        };
        compare.push(Compare { range: range_of(c.key, c.range_end), result, target });
    }
    Ok(TxnRequest {
        compare,
        success: t.success.into_iter().map(op).collect::<Result<_, _>>()?,
        failure: t.failure.into_iter().map(op).collect::<Result<_, _>>()?,
    })
}

pub fn kv(kv: KeyValue) -> mvccpb::KeyValue {
    mvccpb::KeyValue {
        key: kv.key.into(),
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
        version: kv.version,
        value: kv.value.into(),
        lease: kv.lease,
    }
}

pub fn event(e: Event) -> mvccpb::Event {
    mvccpb::Event {
        r#type: match e.kind {
            EventKind::Put => mvccpb::event::EventType::Put as i32,
            EventKind::Delete => mvccpb::event::EventType::Delete as i32,
        },
        kv: Some(kv(e.kv)),
        prev_kv: e.prev_kv.map(kv),
    }
}

pub fn range_response(r: RangeResponse, header: pb::ResponseHeader) -> pb::RangeResponse {
    pb::RangeResponse { header: Some(header), kvs: r.kvs.into_iter().map(kv).collect(), more: r.more, count: r.count }
}

pub fn txn_response(t: TxnResponse, header: &pb::ResponseHeader) -> pb::TxnResponse {
    use pb::response_op::Response;
    let responses = t
        .responses
        .into_iter()
        .map(|r| pb::ResponseOp {
            response: Some(match r {
                OpResponse::Range(r) => Response::ResponseRange(range_response(r, *header)),
                OpResponse::Put { prev_kv } => {
                    Response::ResponsePut(pb::PutResponse { header: Some(*header), prev_kv: prev_kv.map(kv) })
                }
                OpResponse::Delete { deleted, prev_kvs } => Response::ResponseDeleteRange(pb::DeleteRangeResponse {
                    header: Some(*header),
                    deleted,
                    prev_kvs: prev_kvs.into_iter().map(kv).collect(),
                }),
                OpResponse::Txn(t) => Response::ResponseTxn(txn_response(t, header)),
            }),
        })
        .collect();
    pb::TxnResponse { header: Some(*header), succeeded: t.succeeded, responses }
}

pub fn mvcc_status(e: &MvccError) -> Status {
    let msg = match e {
        MvccError::Compacted { .. } => {
            return Status::out_of_range("etcdserver: mvcc: required revision has been compacted")
        }
        MvccError::FutureRevision { .. } => {
            return Status::out_of_range("etcdserver: mvcc: required revision is a future revision")
        }
        MvccError::LeaseNotFound => return Status::not_found("etcdserver: requested lease not found"),
        MvccError::LeaseExists => return Status::failed_precondition("etcdserver: lease already exists"),
        MvccError::NoSpace => return Status::resource_exhausted("etcdserver: mvcc: database space exceeded"),
        MvccError::DuplicateKey => "etcdserver: duplicate key given in txn request".to_string(),
        MvccError::EmptyKey => "etcdserver: key is not provided".to_string(),
        MvccError::TooManyOps { .. } => "etcdserver: too many operations in txn request".to_string(),
        MvccError::KeyNotFoundForIgnore => "etcdserver: key not found".to_string(),
        MvccError::NestedTxn => "etcdserver: nested txn is not supported".to_string(),
        MvccError::Invalid(m) => format!("etcdserver: {m}"),
    };
    Status::invalid_argument(msg)
}

pub fn store_status(e: StoreError) -> Status {
    match e {
        StoreError::Mvcc(m) => mvcc_status(&m),
        StoreError::TooLarge { .. } => Status::invalid_argument("etcdserver: request is too large"),
        StoreError::NoSpace => Status::resource_exhausted("etcdserver: mvcc: database space exceeded"),
        StoreError::NoLeader => Status::unavailable("etcdserver: no leader"),
        StoreError::Timeout => Status::unavailable("etcdserver: request timed out"),
        StoreError::Indeterminate(m) => {
            Status::unavailable(format!("etcdserver: request timed out, outcome unknown: {m}"))
        }
        StoreError::Internal(m) => Status::internal(format!("etcdserver: {m}")),
    }
}

/// The outcome of an applied command, or its error as a gRPC status.
pub fn outcome(r: CommandResult) -> Result<(Outcome, i64), Status> {
    match r.outcome {
        Some(Ok(o)) => Ok((o, r.revision)),
        Some(Err(e)) => Err(mvcc_status(&e)),
        None => Err(Status::internal("etcdserver: command produced no result")),
    }
}
