use std::pin::Pin;

use capstan_proto::etcd::etcdserverpb as pb;
use futures::Stream;
use tonic::{Request, Response, Status};

use super::convert::store_status;
use super::EtcdApi;

/// Snapshot stream chunk size.
const CHUNK: usize = 1 << 20;

#[tonic::async_trait]
impl pb::maintenance_server::Maintenance for EtcdApi {
    async fn alarm(&self, _req: Request<pb::AlarmRequest>) -> Result<Response<pb::AlarmResponse>, Status> {
        let mut alarms = vec![];
        if self.node.alarm_nospace.load(std::sync::atomic::Ordering::Relaxed) {
            alarms.push(pb::AlarmMember { member_id: self.node.id, alarm: pb::AlarmType::Nospace as i32 });
        }
        // Low data disks: this master's, and on the leader every reported one.
        for id in self.node.disk_alarms() {
            if !alarms.iter().any(|a| a.member_id == id) {
                alarms.push(pb::AlarmMember { member_id: id, alarm: pb::AlarmType::Nospace as i32 });
            }
        }
        Ok(Response::new(pb::AlarmResponse { header: Some(self.header()), alarms }))
    }

    async fn status(&self, _req: Request<pb::StatusRequest>) -> Result<Response<pb::StatusResponse>, Status> {
        let m = self.node.raft.metrics().borrow().clone();
        let (size, applied_rev) = {
            let st = self.node.state().read();
            (st.mvcc.size_bytes() as i64, st.mvcc.revision())
        };
        let learner = self.node.members().iter().any(|(id, _, l)| *id == self.node.id && *l);
        let mut errors = vec![];
        if m.current_leader.is_none() {
            errors.push("etcdserver: no leader".to_string());
        }
        Ok(Response::new(pb::StatusResponse {
            header: Some(self.header_at(applied_rev)),
            version: "3.5.0".into(),
            db_size: size,
            leader: m.current_leader.unwrap_or(0),
            raft_index: m.last_log_index.unwrap_or(0),
            raft_term: m.current_term,
            raft_applied_index: m.last_applied.map_or(0, |l| l.index),
            errors,
            db_size_in_use: size,
            is_learner: learner,
        }))
    }

    async fn defragment(
        &self,
        _req: Request<pb::DefragmentRequest>,
    ) -> Result<Response<pb::DefragmentResponse>, Status> {
        // RocksDB compacts in the background; there is nothing to defragment.
        Ok(Response::new(pb::DefragmentResponse { header: Some(self.header()) }))
    }

    async fn hash(&self, _req: Request<pb::HashRequest>) -> Result<Response<pb::HashResponse>, Status> {
        let st = self.node.state().read();
        let h = st.mvcc.hash_kv(st.mvcc.revision());
        Ok(Response::new(pb::HashResponse { header: Some(self.header()), hash: (h ^ (h >> 32)) as u32 }))
    }

    async fn hash_kv(&self, req: Request<pb::HashKvRequest>) -> Result<Response<pb::HashKvResponse>, Status> {
        let rev = req.into_inner().revision;
        let (h, compacted, cur) = {
            let st = self.node.state().read();
            let at = if rev <= 0 { st.mvcc.revision() } else { rev };
            if at > st.mvcc.revision() {
                return Err(Status::out_of_range("etcdserver: mvcc: required revision is a future revision"));
            }
            if at < st.mvcc.compacted() {
                return Err(Status::out_of_range("etcdserver: mvcc: required revision has been compacted"));
            }
            (st.mvcc.hash_kv(at), st.mvcc.compacted(), st.mvcc.revision())
        };
        Ok(Response::new(pb::HashKvResponse {
            header: Some(self.header_at(cur)),
            hash: (h ^ (h >> 32)) as u32,
            compact_revision: compacted,
        }))
    }

    type SnapshotStream = Pin<Box<dyn Stream<Item = Result<pb::SnapshotResponse, Status>> + Send>>;

    /// A consistent image of the store (`capstan_raft::backup` format, with
    /// the trailing SHA-256 etcd clients check), streamed in 1 MiB chunks.
    async fn snapshot(&self, _req: Request<pb::SnapshotRequest>) -> Result<Response<Self::SnapshotStream>, Status> {
        self.node.read_index().await.map_err(store_status)?;
        let image = self.node.state().read().mvcc.image();
        let data = capstan_raft::backup::encode(&image);
        let header = self.header_at(image.revision);
        let total = data.len();
        let chunks: Vec<Result<pb::SnapshotResponse, Status>> = data
            .chunks(CHUNK)
            .enumerate()
            .map(|(i, c)| {
                Ok(pb::SnapshotResponse {
                    header: Some(header),
                    remaining_bytes: (total - (i * CHUNK + c.len())) as u64,
                    blob: c.to_vec(),
                })
            })
            .collect();
        Ok(Response::new(Box::pin(futures::stream::iter(chunks))))
    }

    async fn move_leader(
        &self,
        _req: Request<pb::MoveLeaderRequest>,
    ) -> Result<Response<pb::MoveLeaderResponse>, Status> {
        Err(Status::unimplemented("capstan: leadership transfer is not supported yet"))
    }
}
