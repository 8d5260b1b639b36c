use capstan_proto::etcd::etcdserverpb as pb;
use capstan_raft::transport::PeerRequest;
use tonic::{Request, Response, Status};

use super::convert::store_status;
use super::EtcdApi;

impl EtcdApi {
    fn member_list(&self) -> Vec<pb::Member> {
        self.node
            .members()
            .into_iter()
            .map(|(id, m, learner)| pb::Member {
                id,
                name: m.name,
                peer_ur_ls: vec![format!("https://{}", m.peer_addr)],
                client_ur_ls: vec![m.client_url],
                is_learner: learner,
            })
            .collect()
    }
}

#[tonic::async_trait]
impl pb::cluster_server::Cluster for EtcdApi {
    async fn member_add(&self, _req: Request<pb::MemberAddRequest>) -> Result<Response<pb::MemberAddResponse>, Status> {
        Err(Status::unimplemented(
            "capstan: masters join with a bootstrap token: `capstan token create`, then `capstan server --join <addr> --token <t>`",
        ))
    }

    async fn member_remove(
        &self,
        req: Request<pb::MemberRemoveRequest>,
    ) -> Result<Response<pb::MemberRemoveResponse>, Status> {
        let id = req.into_inner().id;
        if !self.node.members().iter().any(|(i, _, _)| *i == id) {
            return Err(Status::not_found("etcdserver: member not found"));
        }
        self.node.membership_call(PeerRequest::RemoveMember { id }).await.map_err(store_status)?;
        Ok(Response::new(pb::MemberRemoveResponse { header: Some(self.header()), members: self.member_list() }))
    }

    async fn member_update(
        &self,
        _req: Request<pb::MemberUpdateRequest>,
    ) -> Result<Response<pb::MemberUpdateResponse>, Status> {
        Err(Status::unimplemented("capstan: member addresses are fixed at join; remove and re-join to change them"))
    }

    async fn member_list(
        &self,
        _req: Request<pb::MemberListRequest>,
    ) -> Result<Response<pb::MemberListResponse>, Status> {
        Ok(Response::new(pb::MemberListResponse { header: Some(self.header()), members: self.member_list() }))
    }

    async fn member_promote(
        &self,
        req: Request<pb::MemberPromoteRequest>,
    ) -> Result<Response<pb::MemberPromoteResponse>, Status> {
        let id = req.into_inner().id;
        let Some((_, member, learner)) = self.node.members().into_iter().find(|(i, _, _)| *i == id) else {
            return Err(Status::not_found("etcdserver: member not found"));
        };
        if !learner {
            return Err(Status::failed_precondition("etcdserver: can only promote a learner member"));
        }
        self.node.membership_call(PeerRequest::Promote { id, member }).await.map_err(store_status)?;
        Ok(Response::new(pb::MemberPromoteResponse { header: Some(self.header()), members: self.member_list() }))
    }
}
