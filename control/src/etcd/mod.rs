//! The etcd v3 gRPC API served by every master, over the replicated store.
//!
//! KV writes become Raft proposals (`StoreNode::write`, forwarded to the
//! leader when needed); reads are linearizable through ReadIndex unless the
//! client asks for `serializable`. Watches are served from this master's
//! watch hub; lease keep-alives go to the leader, which alone keeps lease
//! clocks. This module only translates: no store logic lives here.

mod cluster;
pub mod convert;
mod kv;
mod lease;
mod maintenance;
mod watch;

use std::sync::Arc;

use capstan_proto::etcd::etcdserverpb as pb;
use capstan_raft::StoreNode;

/// Shared by every etcd service.
#[derive(Clone)]
pub struct EtcdApi {
    pub node: Arc<StoreNode>,
    pub cluster_id: u64,
}

impl EtcdApi {
    pub fn header(&self) -> pb::ResponseHeader {
        let revision = self.node.state().read().mvcc.revision();
        self.header_at(revision)
    }

    pub fn header_at(&self, revision: i64) -> pb::ResponseHeader {
        pb::ResponseHeader {
            cluster_id: self.cluster_id,
            member_id: self.node.id,
            revision,
            raft_term: self.node.raft.metrics().borrow().current_term,
        }
    }

    /// All five services, ready to add to a tonic router.
    pub fn routes(self, max_request_bytes: usize) -> tonic::service::Routes {
        use pb::{
            cluster_server::ClusterServer, kv_server::KvServer, lease_server::LeaseServer,
            maintenance_server::MaintenanceServer, watch_server::WatchServer,
        };
        // Leave room for the envelope around the largest accepted value.
        let limit = max_request_bytes + 64 * 1024;
        tonic::service::Routes::new(KvServer::new(self.clone()).max_decoding_message_size(limit))
            .add_service(WatchServer::new(self.clone()).max_decoding_message_size(limit))
            .add_service(LeaseServer::new(self.clone()))
            .add_service(ClusterServer::new(self.clone()))
            .add_service(MaintenanceServer::new(self).max_encoding_message_size(usize::MAX))
    }
}
