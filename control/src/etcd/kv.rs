use capstan_proto::etcd::etcdserverpb as pb;
use capstan_raft::types::{Command, Op, Outcome, TxnRequest};
use tonic::{Request, Response, Status};

use super::convert::{self, store_status};
use super::EtcdApi;

impl EtcdApi {
    async fn txn_write(&self, txn: TxnRequest) -> Result<(capstan_raft::types::TxnResponse, i64), Status> {
        let r = self.node.write(Command::Txn(txn)).await.map_err(store_status)?;
        match convert::outcome(r)? {
            (Outcome::Txn(t), rev) => Ok((t, rev)),
            _ => Err(Status::internal("etcdserver: unexpected command outcome")),
        }
    }
}

#[tonic::async_trait]
impl pb::kv_server::Kv for EtcdApi {
    async fn range(&self, req: Request<pb::RangeRequest>) -> Result<Response<pb::RangeResponse>, Status> {
        let req = req.into_inner();
        let serializable = req.serializable;
        let r = convert::range_request(req)?;
        if !serializable {
            self.node.read_index().await.map_err(store_status)?;
        }
        let (resp, rev) = {
            let st = self.node.state().read();
            (st.mvcc.range(&r).map_err(|e| convert::mvcc_status(&e))?, st.mvcc.revision())
        };
        Ok(Response::new(convert::range_response(resp, self.header_at(rev))))
    }

    async fn put(&self, req: Request<pb::PutRequest>) -> Result<Response<pb::PutResponse>, Status> {
        let put = convert::put_request(req.into_inner())?;
        let (mut t, rev) = self.txn_write(TxnRequest { success: vec![Op::Put(put)], ..Default::default() }).await?;
        let prev_kv = match t.responses.pop() {
            Some(capstan_raft::types::OpResponse::Put { prev_kv }) => prev_kv.map(convert::kv),
            _ => None,
        };
        Ok(Response::new(pb::PutResponse { header: Some(self.header_at(rev)), prev_kv }))
    }

    async fn delete_range(
        &self,
        req: Request<pb::DeleteRangeRequest>,
    ) -> Result<Response<pb::DeleteRangeResponse>, Status> {
        let del = convert::delete_request(req.into_inner())?;
        let (mut t, rev) = self.txn_write(TxnRequest { success: vec![Op::Delete(del)], ..Default::default() }).await?;
        let (deleted, prev_kvs) = match t.responses.pop() {
            Some(capstan_raft::types::OpResponse::Delete { deleted, prev_kvs }) => {
                (deleted, prev_kvs.into_iter().map(convert::kv).collect())
            }
            _ => (0, vec![]),
        };
        Ok(Response::new(pb::DeleteRangeResponse { header: Some(self.header_at(rev)), deleted, prev_kvs }))
    }

    async fn txn(&self, req: Request<pb::TxnRequest>) -> Result<Response<pb::TxnResponse>, Status> {
        let txn = convert::txn_request(req.into_inner())?;
        let (t, rev) = self.txn_write(txn).await?;
        Ok(Response::new(convert::txn_response(t, &self.header_at(rev))))
    }

    async fn compact(&self, req: Request<pb::CompactionRequest>) -> Result<Response<pb::CompactionResponse>, Status> {
        let req = req.into_inner();
        let r = self.node.write(Command::Compact { revision: req.revision }).await.map_err(store_status)?;
        let (_, rev) = convert::outcome(r)?;
        Ok(Response::new(pb::CompactionResponse { header: Some(self.header_at(rev)) }))
    }
}
