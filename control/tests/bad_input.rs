//! Bad input gets a clear error and changes nothing.

mod common;

use capstan_proto::etcd::etcdserverpb as pb;
use common::*;
use tonic::Code;

/// Sends raw bytes as a gRPC request body: a malformed protobuf message.
async fn raw_call(ch: &tonic::transport::Channel, path: &'static str, body: Vec<u8>) -> tonic::Status {
    #[derive(Clone, Default)]
    struct RawCodec;
    struct RawEnc;
    struct RawDec;
    impl tonic::codec::Encoder for RawEnc {
        type Item = Vec<u8>;
        type Error = tonic::Status;
        fn encode(&mut self, item: Vec<u8>, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
            use bytes::BufMut;
            dst.put_slice(&item);
            Ok(())
        }
    }
    impl tonic::codec::Decoder for RawDec {
        type Item = Vec<u8>;
        type Error = tonic::Status;
        fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
            use bytes::Buf;
            Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
        }
    }
    impl tonic::codec::Codec for RawCodec {
        type Encode = Vec<u8>;
        type Decode = Vec<u8>;
        type Encoder = RawEnc;
        type Decoder = RawDec;
        fn encoder(&mut self) -> RawEnc {
            RawEnc
        }
        fn decoder(&mut self) -> RawDec {
            RawDec
        }
    }
    let mut grpc = tonic::client::Grpc::new(ch.clone());
    grpc.ready().await.unwrap();
    grpc.unary(tonic::Request::new(body), http::uri::PathAndQuery::from_static(path), RawCodec)
        .await
        .expect_err("malformed body must fail")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_is_rejected_and_changes_nothing() {
    let cluster = Cluster::start(3, &["--max-request-bytes", "65536"]);
    let ch = cluster.client(1).await;
    kv(&ch).put(pb::PutRequest { key: b"keep".to_vec(), value: b"v".to_vec(), ..Default::default() }).await.unwrap();
    let before = revision(&ch).await;
    let keys_before = client_keys(&ch).await;

    // malformed protobuf
    let st = raw_call(&ch, "/etcdserverpb.KV/Put", vec![0xff, 0xff, 0xff, 0x0f, 0x01]).await;
    assert!(matches!(st.code(), Code::Internal | Code::InvalidArgument), "{st:?}");
    // oversized value
    let st = kv(&ch)
        .put(pb::PutRequest { key: b"big".to_vec(), value: vec![7; 100_000], ..Default::default() })
        .await
        .unwrap_err();
    assert!(matches!(st.code(), Code::InvalidArgument | Code::ResourceExhausted | Code::OutOfRange), "{st:?}");
    // empty key
    let st = kv(&ch).put(pb::PutRequest::default()).await.unwrap_err();
    assert_eq!((st.code(), st.message()), (Code::InvalidArgument, "etcdserver: key is not provided"));
    // lease that does not exist
    let st = kv(&ch)
        .put(pb::PutRequest { key: b"l".to_vec(), value: b"v".to_vec(), lease: 12345, ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!((st.code(), st.message()), (Code::NotFound, "etcdserver: requested lease not found"));
    let st = pb::lease_client::LeaseClient::new(ch.clone())
        .lease_revoke(pb::LeaseRevokeRequest { id: 999 })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::NotFound);
    // member that does not exist
    let st = pb::cluster_client::ClusterClient::new(ch.clone())
        .member_remove(pb::MemberRemoveRequest { id: 4242 })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::NotFound);
    // txn with too many ops, and a txn whose second op is invalid: nothing half-applied
    let put = |k: String| pb::RequestOp {
        request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
            key: k.into(),
            value: b"v".to_vec(),
            ..Default::default()
        })),
    };
    let st = kv(&ch)
        .txn(pb::TxnRequest { success: (0..200).map(|i| put(format!("t{i}"))).collect(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!((st.code(), st.message()), (Code::InvalidArgument, "etcdserver: too many operations in txn request"));
    let dup = vec![put("dup".into()), put("dup".into())];
    let st = kv(&ch).txn(pb::TxnRequest { success: dup, ..Default::default() }).await.unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument);
    // read of a future revision / bad sort option
    let st = kv(&ch)
        .range(pb::RangeRequest { key: b"keep".to_vec(), revision: before + 1000, ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::OutOfRange);
    let st = kv(&ch)
        .range(pb::RangeRequest { key: b"keep".to_vec(), sort_order: 9, ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument);

    assert_eq!(client_keys(&ch).await, keys_before, "a rejected request changed the store");
    for k in ["big", "l", "t0", "dup"] {
        let r = kv(&ch).range(pb::RangeRequest { key: k.into(), ..Default::default() }).await.unwrap().into_inner();
        assert!(r.kvs.is_empty(), "{k} was written by a rejected request");
    }
}

/// Raft timing that cannot work (an election timeout not above twice the
/// heartbeat interval) is refused before the master creates anything.
#[test]
fn unusable_raft_timing_is_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("m1");
    let out = std::process::Command::new(BIN)
        .args(["server", "--name", "m1", "--init", "--peer-listen", "127.0.0.1:0", "--etcd-listen", "127.0.0.1:0"])
        .args(["--heartbeat-interval", "200", "--election-timeout", "300", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("the election timeout (300 ms) must be more than twice the heartbeat interval (200 ms)"),
        "{err}"
    );
    let written: Vec<_> =
        std::fs::read_dir(&data).map(|d| d.flatten().map(|e| e.file_name()).collect()).unwrap_or_default();
    assert!(written.is_empty(), "nothing is written: {written:?}");
}
