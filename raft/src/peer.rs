//! Serving the peer protocol: accepts QUIC connections from other masters,
//! decides who may do what, and dispatches each stream's request.
//!
//! Only a master certificate (CN `master:<name>`, signed by the cluster CA)
//! may replicate, vote, forward writes or change membership. A connection
//! without a certificate may only send `Join` with a valid bootstrap token.
//! A removed master is refused everything (`PeerResponse::Removed`), known
//! by the member id its certificate names or its Raft messages carry.

use std::sync::Arc;

use bytes::Bytes;
use rand::Rng;

use crate::bootstrap::{JoinToken, Pki, MASTER_CN_PREFIX};
use crate::node::{Forward, StoreNode, NOT_LEADER, NO_SPACE};
use crate::transport::{
    read_frame, write_frame, JoinResponse, PeerRequest, PeerResponse, MAX_ANONYMOUS_FRAME, MAX_FRAME,
};
use crate::types::*;

/// Accept loop; runs until the endpoint is closed.
pub async fn serve_peers(endpoint: quinn::Endpoint, node: Arc<StoreNode>, pki: Arc<Pki>) {
    while let Some(incoming) = endpoint.accept().await {
        let (node, pki) = (node.clone(), pki.clone());
        tokio::spawn(async move {
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, "peer handshake failed");
                    return;
                }
            };
            let master = master_identity(&conn);
            while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                let (node, pki) = (node.clone(), pki.clone());
                tokio::spawn(async move {
                    let max = if master.is_master() { MAX_FRAME } else { MAX_ANONYMOUS_FRAME };
                    let resp = match read_frame::<PeerRequest>(&mut recv, max).await {
                        Ok(req) => handle(&node, &pki, req, master).await,
                        Err(e) => PeerResponse::Error(format!("bad request: {e}")),
                    };
                    let _ = write_frame(&mut send, &resp).await;
                });
            }
        });
    }
}

/// What a connection's certificate says of who is calling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Caller {
    /// A master: a CA-signed server certificate named `master:<name>`
    /// (admin and client certificates lack the serverAuth usage), with the
    /// Raft member id it was issued to, when it names one.
    Master(Option<NodeId>),
    /// No certificate, or not a master's.
    Anonymous,
}

impl Caller {
    fn is_master(self) -> bool {
        self != Caller::Anonymous
    }
}

fn master_identity(conn: &quinn::Connection) -> Caller {
    let Some(leaf) = crate::pki::peer_leaf(conn) else {
        return Caller::Anonymous;
    };
    match crate::pki::cert_info(leaf.as_ref()) {
        Ok(i) if i.server_auth && i.common_name.starts_with(MASTER_CN_PREFIX) => Caller::Master(i.member_id),
        _ => Caller::Anonymous,
    }
}

async fn handle(node: &Arc<StoreNode>, pki: &Pki, req: PeerRequest, caller: Caller) -> PeerResponse {
    let Caller::Master(id) = caller else {
        return match req {
            PeerRequest::Join(j) => match join(node, pki, j).await {
                Ok(r) => PeerResponse::Join(r),
                Err(e) => PeerResponse::Error(e),
            },
            _ => PeerResponse::Error("permission denied: a master certificate is required".into()),
        };
    };
    // A removed master's certificate stays valid (it is signed by the
    // cluster CA until it expires), so every request from it is refused
    // here: it may no longer write, read, vote, replicate or join others.
    // Certificates from before member ids were written into them are
    // checked by the ids their Raft messages carry, below.
    if id.is_some_and(|id| node.is_removed(id)) {
        return PeerResponse::Removed;
    }
    match req {
        PeerRequest::AppendEntries(rpc) if node.is_removed(rpc.vote.leader_id().node_id) => PeerResponse::Removed,
        PeerRequest::Vote(rpc) if node.is_removed(rpc.vote.leader_id().node_id) => PeerResponse::Removed,
        PeerRequest::AppendEntries(rpc) => PeerResponse::AppendEntries(node.raft.append_entries(rpc).await),
        PeerRequest::Vote(rpc) => PeerResponse::Vote(node.raft.vote(rpc).await),
        PeerRequest::InstallSnapshot(rpc) => PeerResponse::InstallSnapshot(node.raft.install_snapshot(rpc).await),
        PeerRequest::ClientWrite(cmd) if node.check_disk(&cmd).is_err() => PeerResponse::Error(NO_SPACE.into()),
        PeerRequest::DiskAlarm { id, low } => {
            node.disk_report(id, low);
            PeerResponse::Done
        }
        PeerRequest::ClientWrite(cmd) => match node.write_local(cmd).await {
            Ok(r) => PeerResponse::ClientWrite(r),
            Err(Forward::To(..)) | Err(Forward::Unknown) => PeerResponse::Error(NOT_LEADER.into()),
            Err(Forward::Failed(e)) => PeerResponse::Error(e.to_string()),
        },
        PeerRequest::ReadIndex => match node.leader_read_index().await {
            Ok(i) => PeerResponse::ReadIndex(i),
            Err(e) => PeerResponse::Error(e),
        },
        PeerRequest::LeaseKeepAlive { .. } | PeerRequest::LeaseTimeToLive { .. } if !node.is_leader() => {
            PeerResponse::Error(NOT_LEADER.into())
        }
        PeerRequest::LeaseKeepAlive { id } | PeerRequest::LeaseTimeToLive { id } => {
            let renew = matches!(req, PeerRequest::LeaseKeepAlive { .. });
            match node.lease_local(id, renew) {
                Some((ttl, granted)) => PeerResponse::LeaseTtl { ttl, granted },
                None => PeerResponse::LeaseTtl { ttl: -1, granted: 0 },
            }
        }
        PeerRequest::Join(j) => match join(node, pki, j).await {
            Ok(r) => PeerResponse::Join(r),
            Err(e) => PeerResponse::Error(e),
        },
        req @ (PeerRequest::Promote { .. } | PeerRequest::RemoveMember { .. }) => {
            match node.membership_call(req).await {
                Ok(()) => PeerResponse::Done,
                Err(e) => PeerResponse::Error(e.to_string()),
            }
        }
    }
}

/// Check the bootstrap token against the store, sign the joiner's CSR.
async fn join(node: &Arc<StoreNode>, pki: &Pki, j: crate::transport::JoinRequest) -> Result<JoinResponse, String> {
    let token = JoinToken::parse(&j.token).map_err(|e| e.to_string())?;
    node.read_index().await.map_err(|e| e.to_string())?;
    let stored = {
        let st = node.state().read();
        let r = st
            .mvcc
            .range(&RangeRequest { range: KeyRange::key(Bytes::from(token.store_key())), ..Default::default() })
            .map_err(|e| e.to_string())?;
        r.kvs.first().map(|kv| kv.value.clone())
    };
    let Some(stored) = stored else {
        return Err("join refused: unknown or expired bootstrap token".into());
    };
    if !token.verify(&stored, "master") {
        return Err("join refused: bootstrap token does not match".into());
    }
    if node.members().iter().any(|(_, m, _)| m.name == j.name) {
        return Err(format!("join refused: a master named {:?} is already a member", j.name));
    }
    // Never an id the cluster used before: a removed member's certificate
    // names its id, and is refused for as long as the id is a tombstone.
    let taken: Vec<NodeId> = node.members().iter().map(|(id, _, _)| *id).collect();
    let id = loop {
        let id = rand::thread_rng().gen_range(2..u64::MAX / 2);
        if !taken.contains(&id) && !node.is_removed(id) {
            break id;
        }
    };
    let cert_pem = pki.ca.sign_csr(&j.csr_pem, id).map_err(|e| e.to_string())?;
    let cn = crate::bootstrap::common_name_of_pem(&cert_pem).map_err(|e| e.to_string())?;
    if cn != format!("{MASTER_CN_PREFIX}{}", j.name) {
        return Err("join refused: the CSR's common name must be master:<name>".into());
    }
    tracing::info!(name = %j.name, id, peer = %j.peer_addr, "master joining");
    Ok(JoinResponse {
        id,
        cert_pem,
        ca_cert_pem: pki.ca.cert_pem().to_string(),
        ca_key_pem: pki.ca.key_pem().to_string(),
    })
}
