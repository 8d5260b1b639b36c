//! Membership 1 -> 3 -> replace one; quota; no unauthenticated peer can
//! join, replicate, write or read.

mod common;

use std::time::Duration;

use bytes::Bytes;
use capstan_proto::etcd::etcdserverpb as pb;
use capstan_raft::transport::{JoinRequest, PeerClients, PeerRequest, PeerResponse};
use capstan_raft::types::{Command, Op, PutRequest, TxnRequest};
use common::*;
use tonic::Code;

async fn members(ch: &tonic::transport::Channel) -> Vec<pb::Member> {
    pb::cluster_client::ClusterClient::new(ch.clone())
        .member_list(pb::MemberListRequest::default())
        .await
        .unwrap()
        .into_inner()
        .members
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grow_replace_quota_and_auth() {
    // 1 -> 3
    let mut cluster = Cluster::start(1, &["--quota-bytes", "400000"]);
    let ch = cluster.client(0).await;
    kv(&ch).put(pb::PutRequest { key: b"before".to_vec(), value: b"1".to_vec(), ..Default::default() }).await.unwrap();
    cluster.add_master(2);
    cluster.add_master(3);
    let ms = members(&ch).await;
    assert_eq!(ms.len(), 3);
    assert!(ms.iter().all(|m| !m.is_learner), "joined masters are voters: {ms:?}");

    // replace master-3 with master-4 while clients keep writing
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let acked: std::sync::Arc<parking_lot::Mutex<Vec<(String, i64)>>> = Default::default();
    let mut writers = Vec::new();
    for w in 0..4 {
        let (ch, stop, acked) = (ch.clone(), stop.clone(), acked.clone());
        writers.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let key = format!("load/{w}/{i}");
                let put = pb::PutRequest { key: key.clone().into(), value: b"x".to_vec(), ..Default::default() };
                if let Ok(r) = kv(&ch).put(put).await {
                    acked.lock().push((key, r.into_inner().header.unwrap().revision));
                }
                i += 1;
            }
        }));
    }
    let id3 = endpoints(&cluster.masters[2].dir).unwrap().id;
    pb::cluster_client::ClusterClient::new(ch.clone())
        .member_remove(pb::MemberRemoveRequest { id: id3 })
        .await
        .unwrap();
    // The leader stops replicating to a removed member before it can hear
    // of its removal; its peers tell it when it campaigns, and it stops by
    // itself with the status `capstan up` does not restart.
    let mut removed = cluster.masters[2].child.take().expect("master-3 runs");
    let status = wait_for(30, "the removed master-3 to stop", || removed.try_wait().unwrap());
    assert_eq!(status.code(), Some(3), "exit status of a removed master; log:\n{}", log_tail(&cluster.masters[2].dir));
    assert!(
        log_tail(&cluster.masters[2].dir).contains("removed from the cluster"),
        "the removed master says why it stopped:\n{}",
        log_tail(&cluster.masters[2].dir)
    );
    cluster.add_master(4);
    let ms = members(&ch).await;
    let names: Vec<&str> = ms.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names.len(), 3, "{names:?}");
    assert!(names.contains(&"master-4") && !names.contains(&"master-3"), "{names:?}");
    let ch4 = cluster.client(3).await;
    let r =
        kv(&ch4).range(pb::RangeRequest { key: b"before".to_vec(), ..Default::default() }).await.unwrap().into_inner();
    assert_eq!(r.kvs[0].value, b"1", "the new master has the old data");
    let during = acked.lock().len();
    assert!(during > 0, "writes went on during the membership change");
    // Keep writing against the new membership too, then stop.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while acked.lock().len() < during + 50 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    let acked = acked.lock().clone();
    assert!(acked.len() >= during + 50, "writes went on after the membership change ({} acked)", acked.len());
    for (key, rev) in &acked {
        for c in [&ch, &ch4] {
            let r = kv(c).range(pb::RangeRequest { key: key.clone().into(), ..Default::default() }).await.unwrap();
            let r = r.into_inner();
            assert_eq!(r.kvs.first().map(|kv| kv.mod_revision), Some(*rev), "acknowledged write {key} lost");
        }
    }
    kv(&ch)
        .delete_range(pb::DeleteRangeRequest {
            key: b"load/".to_vec(),
            range_end: b"load0".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap();

    // quota: writes fail with a clear error once over the hard limit;
    // deletes and compaction still pass, and free the space again.
    let mut last_err = None;
    for i in 0..200 {
        match kv(&ch)
            .put(pb::PutRequest { key: format!("q/{i}").into(), value: vec![b'x'; 8000], ..Default::default() })
            .await
        {
            Ok(_) => {}
            Err(e) => {
                last_err = Some(e);
                break;
            }
        }
    }
    let e = last_err.expect("the quota stopped writes");
    assert_eq!((e.code(), e.message()), (Code::ResourceExhausted, "etcdserver: mvcc: database space exceeded"));
    let alarms = pb::maintenance_client::MaintenanceClient::new(ch.clone())
        .alarm(pb::AlarmRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(!alarms.alarms.is_empty(), "the quota alarm is raised");
    kv(&ch)
        .delete_range(pb::DeleteRangeRequest { key: b"q/".to_vec(), range_end: b"q0".to_vec(), ..Default::default() })
        .await
        .unwrap();
    let rev = revision(&ch).await;
    kv(&ch).compact(pb::CompactionRequest { revision: rev, physical: false }).await.unwrap();
    kv(&ch)
        .put(pb::PutRequest { key: b"after-quota".to_vec(), value: b"ok".to_vec(), ..Default::default() })
        .await
        .unwrap();

    // No client certificate: the etcd listener refuses the TLS handshake.
    let ca = std::fs::read_to_string(cluster.masters[0].dir.join("pki/ca.crt")).unwrap();
    let tls = tonic::transport::ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(&ca));
    let anon = tonic::transport::Channel::from_shared(cluster.url(0)).unwrap().tls_config(tls).unwrap().connect().await;
    if let Ok(anon) = anon {
        let r = kv(&anon).range(pb::RangeRequest { key: b"before".to_vec(), ..Default::default() }).await;
        assert!(r.is_err(), "a client without a certificate read the store");
    }

    // Anonymous QUIC peer (it trusts the CA, but has no certificate).
    let fp = capstan_raft::pki::fingerprint_pem(&ca).unwrap();
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(capstan_raft::pki::quic_anonymous_client_config(&fp).unwrap());
    let peers = PeerClients::new(ep);
    let addr = endpoints(&cluster.masters[0].dir).unwrap().peer;
    let t = Duration::from_secs(5);
    let write = || {
        PeerRequest::ClientWrite(Command::Txn(TxnRequest {
            success: vec![Op::Put(PutRequest {
                key: Bytes::from_static(b"intruder"),
                value: Bytes::from_static(b"x"),
                ..Default::default()
            })],
            ..Default::default()
        }))
    };
    for req in [write(), PeerRequest::ReadIndex, PeerRequest::LeaseKeepAlive { id: 1 }] {
        match peers.call(&addr, &req, t).await.unwrap() {
            PeerResponse::Error(e) => assert!(e.contains("permission denied"), "{e}"),
            other => panic!("anonymous peer was served: {other:?}"),
        }
    }
    // The removed master-3's certificate is still signed by the cluster CA,
    // and still names master-3's member id: refused, whatever it asks.
    let pki3 = capstan_raft::bootstrap::load_pki(&cluster.masters[2].dir).unwrap();
    assert_eq!(
        capstan_raft::pki::cert_info(&capstan_raft::pki::first_cert(&pki3.identity.cert_pem).unwrap())
            .unwrap()
            .member_id,
        Some(id3),
        "a joined master's certificate names its member id"
    );
    let mut ep3 = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep3.set_default_client_config(capstan_raft::pki::quic_client_config(&ca, &pki3.identity).unwrap());
    let removed_peer = PeerClients::new(ep3);
    for req in [write(), PeerRequest::ReadIndex, PeerRequest::LeaseKeepAlive { id: 1 }] {
        match removed_peer.call(&addr, &req, t).await.unwrap() {
            PeerResponse::Removed => {}
            other => panic!("the removed master was served: {other:?}"),
        }
    }
    assert!(*removed_peer.removed().borrow(), "hearing it marks the caller removed");
    let join = |token: String| {
        PeerRequest::Join(JoinRequest {
            token,
            name: "evil".into(),
            csr_pem: capstan_raft::pki::make_csr("master:evil", &["127.0.0.1".into()]).unwrap().1,
            peer_addr: "127.0.0.1:9".into(),
            client_url: "https://127.0.0.1:9".into(),
        })
    };
    let bogus = format!("capstan1.deadbeef.0123456789abcdef.{fp}");
    match peers.call(&addr, &join(bogus), t).await.unwrap() {
        PeerResponse::Error(e) => assert!(e.contains("join refused"), "{e}"),
        other => panic!("join with a bogus token succeeded: {other:?}"),
    }
    let r =
        kv(&ch).range(pb::RangeRequest { key: b"intruder".to_vec(), ..Default::default() }).await.unwrap().into_inner();
    assert!(r.kvs.is_empty());
    assert_eq!(members(&ch).await.len(), 3);
}
