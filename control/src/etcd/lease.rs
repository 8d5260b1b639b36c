use std::pin::Pin;

use capstan_proto::etcd::etcdserverpb as pb;
use capstan_raft::types::{Command, Outcome};
use futures::{Stream, StreamExt};
use rand::Rng;
use tonic::{Request, Response, Status, Streaming};

use super::convert::{self, store_status};
use super::EtcdApi;

/// etcd's minimum TTL is derived from its election timeout; ours is 2 s.
const MIN_TTL: i64 = 2;
/// etcd's MaxLeaseTTL.
const MAX_TTL: i64 = 9_000_000_000;

#[tonic::async_trait]
impl pb::lease_server::Lease for EtcdApi {
    async fn lease_grant(
        &self,
        req: Request<pb::LeaseGrantRequest>,
    ) -> Result<Response<pb::LeaseGrantResponse>, Status> {
        let req = req.into_inner();
        if req.ttl > MAX_TTL {
            return Err(Status::out_of_range("etcdserver: too large lease TTL"));
        }
        if req.id < 0 {
            return Err(Status::invalid_argument("etcdserver: lease ID must be positive"));
        }
        let id = if req.id == 0 { rand::thread_rng().gen_range(1..i64::MAX) } else { req.id };
        let ttl = req.ttl.max(MIN_TTL);
        let r = self.node.write(Command::LeaseGrant { id, ttl }).await.map_err(store_status)?;
        match convert::outcome(r)? {
            (Outcome::LeaseGranted { id, ttl }, rev) => Ok(Response::new(pb::LeaseGrantResponse {
                header: Some(self.header_at(rev)),
                id,
                ttl,
                error: String::new(),
            })),
            _ => Err(Status::internal("etcdserver: unexpected command outcome")),
        }
    }

    async fn lease_revoke(
        &self,
        req: Request<pb::LeaseRevokeRequest>,
    ) -> Result<Response<pb::LeaseRevokeResponse>, Status> {
        let r = self.node.write(Command::LeaseRevoke { id: req.into_inner().id }).await.map_err(store_status)?;
        let (_, rev) = convert::outcome(r)?;
        Ok(Response::new(pb::LeaseRevokeResponse { header: Some(self.header_at(rev)) }))
    }

    type LeaseKeepAliveStream = Pin<Box<dyn Stream<Item = Result<pb::LeaseKeepAliveResponse, Status>> + Send>>;

    async fn lease_keep_alive(
        &self,
        req: Request<Streaming<pb::LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        let api = self.clone();
        let out = req.into_inner().then(move |msg| {
            let api = api.clone();
            async move {
                let id = msg?.id;
                // A lease that does not exist answers TTL 0, as etcd does.
                let ttl = api.node.lease_keepalive(id).await.map_err(store_status)?.unwrap_or(0);
                Ok(pb::LeaseKeepAliveResponse { header: Some(api.header()), id, ttl })
            }
        });
        Ok(Response::new(Box::pin(out)))
    }

    async fn lease_time_to_live(
        &self,
        req: Request<pb::LeaseTimeToLiveRequest>,
    ) -> Result<Response<pb::LeaseTimeToLiveResponse>, Status> {
        let req = req.into_inner();
        let found = self.node.lease_time_to_live(req.id).await.map_err(store_status)?;
        let keys = if req.keys {
            let st = self.node.state().read();
            st.mvcc.lease(req.id).map(|l| l.keys.iter().map(|k| k.to_vec()).collect()).unwrap_or_default()
        } else {
            vec![]
        };
        let (ttl, granted_ttl) = found.unwrap_or((-1, 0));
        Ok(Response::new(pb::LeaseTimeToLiveResponse {
            header: Some(self.header()),
            id: req.id,
            ttl,
            granted_ttl,
            keys,
        }))
    }

    async fn lease_leases(
        &self,
        _req: Request<pb::LeaseLeasesRequest>,
    ) -> Result<Response<pb::LeaseLeasesResponse>, Status> {
        self.node.read_index().await.map_err(store_status)?;
        let leases = self.node.state().read().mvcc.leases().map(|(id, _)| pb::LeaseStatus { id: *id }).collect();
        Ok(Response::new(pb::LeaseLeasesResponse { header: Some(self.header()), leases }))
    }
}
