//! Compiles etcd's v3 API (`proto/etcd/...`) into prost messages plus tonic
//! clients and servers. Needs `protoc` (Debian's protobuf-compiler, see
//! scripts/deps.sh); `PROTOC` overrides the one on `PATH`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/etcd/mvccpb/kv.proto", "proto/etcd/etcdserverpb/rpc.proto"];
    tonic_prost_build::configure().build_server(true).build_client(true).compile_protos(&protos, &["proto"])?;
    Ok(())
}
