//! Capstan's wire formats.
//!
//! This crate holds the types that cross process boundaries, so the control
//! plane, the store and the tools share one definition of each:
//!
//! - [`etcd`]: the wire API of Capstan's store. Every master runs an embedded
//!   Raft store that serves etcd's v3 gRPC API, so the Kubernetes API server,
//!   `etcdctl` and other etcd clients talk to it unchanged. The messages and
//!   the tonic clients and servers are generated at build time from
//!   `proto/etcd/**/*.proto`, Capstan's own rendering of etcd 3.4/3.5's
//!   `mvccpb` and `etcdserverpb` packages (same names, field numbers and enum
//!   values, so the bytes on the wire are etcd's).
//! - [`nodewire`]: what masters and node agents say to each other over
//!   their QUIC connection.
//! - [`k8s`]: the Kubernetes object model (pods, nodes, services, ...), the
//!   registry of served kinds and the rkyv envelope objects are stored in.
//!
//! # The etcd API at a glance
//!
//! | service       | server trait / wrapper                                   | client                                   |
//! |---------------|----------------------------------------------------------|------------------------------------------|
//! | `KV`          | [`kv_server::Kv`] / [`kv_server::KvServer`]              | [`kv_client::KvClient`]                  |
//! | `Watch`       | [`watch_server::Watch`] / [`watch_server::WatchServer`]  | [`watch_client::WatchClient`]            |
//! | `Lease`       | [`lease_server::Lease`] / [`lease_server::LeaseServer`]  | [`lease_client::LeaseClient`]            |
//! | `Cluster`     | [`cluster_server::Cluster`] / [`cluster_server::ClusterServer`] | [`cluster_client::ClusterClient`] |
//! | `Maintenance` | [`maintenance_server::Maintenance`] / [`maintenance_server::MaintenanceServer`] | [`maintenance_client::MaintenanceClient`] |
//!
//! (all under [`etcd::etcdserverpb`]; keys and watch events are
//! [`etcd::mvccpb::KeyValue`] and [`etcd::mvccpb::Event`]). etcd's Auth
//! service is not defined: Capstan authenticates clients by TLS certificate.
//!
//! Naming follows prost: etcd's field `peerURLs` is `peer_ur_ls`, `TTL` is
//! `ttl`, `ID` is `id`; enum fields are `i32` with typed accessors, e.g.
//! [`etcd::mvccpb::Event`]'s field `r#type` and method `r#type()`, which
//! returns an [`etcd::mvccpb::event::EventType`].
//!
//! [`kv_server::Kv`]: etcd::etcdserverpb::kv_server::Kv
//! [`kv_server::KvServer`]: etcd::etcdserverpb::kv_server::KvServer
//! [`kv_client::KvClient`]: etcd::etcdserverpb::kv_client::KvClient
//! [`watch_server::Watch`]: etcd::etcdserverpb::watch_server::Watch
//! [`watch_server::WatchServer`]: etcd::etcdserverpb::watch_server::WatchServer
//! [`watch_client::WatchClient`]: etcd::etcdserverpb::watch_client::WatchClient
//! [`lease_server::Lease`]: etcd::etcdserverpb::lease_server::Lease
//! [`lease_server::LeaseServer`]: etcd::etcdserverpb::lease_server::LeaseServer
//! [`lease_client::LeaseClient`]: etcd::etcdserverpb::lease_client::LeaseClient
//! [`cluster_server::Cluster`]: etcd::etcdserverpb::cluster_server::Cluster
//! [`cluster_server::ClusterServer`]: etcd::etcdserverpb::cluster_server::ClusterServer
//! [`cluster_client::ClusterClient`]: etcd::etcdserverpb::cluster_client::ClusterClient
//! [`maintenance_server::Maintenance`]: etcd::etcdserverpb::maintenance_server::Maintenance
//! [`maintenance_server::MaintenanceServer`]: etcd::etcdserverpb::maintenance_server::MaintenanceServer
//! [`maintenance_client::MaintenanceClient`]: etcd::etcdserverpb::maintenance_client::MaintenanceClient

/// etcd v3's gRPC API: the wire API of Capstan's store.
///
/// The two modules mirror etcd's protobuf packages; `etcdserverpb` refers to
/// `mvccpb` types as `super::mvccpb`, which is why they sit side by side.
pub mod failpoints;
pub mod k8s;
pub mod nodewire;

pub mod etcd {
    /// Keys, values and watch events (etcd's `mvccpb` package).
    #[allow(clippy::all, clippy::pedantic, clippy::nursery, missing_docs, rustdoc::all)]
    pub mod mvccpb {
        tonic::include_proto!("mvccpb");
    }

    /// The KV, Watch, Lease, Cluster and Maintenance services and their
    /// messages (etcd's `etcdserverpb` package).
    #[allow(clippy::all, clippy::pedantic, clippy::nursery, missing_docs, rustdoc::all)]
    pub mod etcdserverpb {
        tonic::include_proto!("etcdserverpb");
    }
}

#[cfg(test)]
mod tests {
    use super::etcd::{etcdserverpb as pb, mvccpb};
    use prost::Message;

    /// Bytes as etcd encodes them, so a change of a field number or type in
    /// the .proto files shows up here.
    #[test]
    fn encodes_like_etcd() {
        let put =
            pb::PutRequest { key: b"k".to_vec(), value: b"v".to_vec(), lease: 7, prev_kv: true, ..Default::default() };
        assert_eq!(put.encode_to_vec(), [0x0a, 1, b'k', 0x12, 1, b'v', 0x18, 7, 0x20, 1]);

        let range = pb::RangeRequest { key: b"a".to_vec(), serializable: true, count_only: true, ..Default::default() };
        assert_eq!(range.encode_to_vec(), [0x0a, 1, b'a', 0x38, 1, 0x48, 1]);

        let cmp = pb::Compare {
            result: pb::compare::CompareResult::Greater as i32,
            target: pb::compare::CompareTarget::Mod as i32,
            key: b"k".to_vec(),
            target_union: Some(pb::compare::TargetUnion::ModRevision(5)),
            range_end: b"l".to_vec(),
        };
        // range_end is field 64: tag (64 << 3 | 2) = 514 = varint 0x82 0x04.
        assert_eq!(cmp.encode_to_vec(), [0x08, 1, 0x10, 2, 0x1a, 1, b'k', 0x30, 5, 0x82, 0x04, 1, b'l']);

        let ev = mvccpb::Event {
            r#type: mvccpb::event::EventType::Delete as i32,
            kv: Some(mvccpb::KeyValue { key: b"k".to_vec(), mod_revision: 9, ..Default::default() }),
            prev_kv: None,
        };
        let wr = pb::WatchResponse {
            watch_id: 3,
            canceled: true,
            compact_revision: 2,
            events: vec![ev],
            ..Default::default()
        };
        assert_eq!(wr.encode_to_vec(), [0x10, 3, 0x20, 1, 0x28, 2, 0x5a, 9, 0x08, 1, 0x12, 5, 0x0a, 1, b'k', 0x18, 9]);

        let st =
            pb::StatusResponse { raft_applied_index: 4, db_size_in_use: 5, is_learner: true, ..Default::default() };
        assert_eq!(st.encode_to_vec(), [0x38, 4, 0x48, 5, 0x50, 1]);

        let m = pb::Member { id: 1, peer_ur_ls: vec!["p".into()], is_learner: true, ..Default::default() };
        assert_eq!(m.encode_to_vec(), [0x08, 1, 0x1a, 1, b'p', 0x28, 1]);
    }

    #[test]
    fn watch_request_union() {
        let req = pb::WatchRequest {
            request_union: Some(pb::watch_request::RequestUnion::ProgressRequest(pb::WatchProgressRequest {})),
        };
        assert_eq!(req.encode_to_vec(), [0x1a, 0]);
        let back = pb::WatchRequest::decode(&[0x12u8, 2, 0x08, 4][..]).unwrap();
        assert_eq!(
            back.request_union,
            Some(pb::watch_request::RequestUnion::CancelRequest(pb::WatchCancelRequest { watch_id: 4 }))
        );
    }
}
