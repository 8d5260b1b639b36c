//! The content store: leases, streaming blobs in (digest-checked by
//! containerd at commit, resumable), reading small blobs, GC labels.

use std::collections::HashMap;
use std::path::Path;

use bytes::Bytes;
use containerd_client::services::v1::{
    content_client::ContentClient, leases_client::LeasesClient, CreateRequest as LeaseCreateRequest,
    DeleteRequest as LeaseDeleteRequest, Info, InfoRequest, ReadContentRequest, UpdateRequest, WriteAction,
    WriteContentRequest,
};
use containerd_client::types::Descriptor;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::{grpc, is_not_found, new_id, Containerd};
use crate::runtime::RuntimeError;

/// Where a blob's bytes come from.
pub enum BlobSource {
    Bytes(Bytes),
    /// A range of a file (a blob inside an archive).
    File {
        file: tokio::fs::File,
        left: u64,
    },
    Http(reqwest::Response),
}

impl BlobSource {
    pub async fn file(path: &Path, offset: u64, size: u64) -> Result<BlobSource, String> {
        let mut file = tokio::fs::File::open(path).await.map_err(|e| format!("open {}: {e}", path.display()))?;
        file.seek(std::io::SeekFrom::Start(offset)).await.map_err(|e| e.to_string())?;
        Ok(BlobSource::File { file, left: size })
    }

    async fn next_chunk(&mut self) -> Result<Option<Bytes>, String> {
        match self {
            BlobSource::Bytes(b) => Ok((!b.is_empty()).then(|| std::mem::take(b))),
            BlobSource::File { file, left } => {
                if *left == 0 {
                    return Ok(None);
                }
                let mut buf = vec![0u8; (*left).min(1 << 20) as usize];
                file.read_exact(&mut buf).await.map_err(|e| format!("read blob: {e}"))?;
                *left -= buf.len() as u64;
                Ok(Some(buf.into()))
            }
            BlobSource::Http(r) => r.chunk().await.map_err(|e| format!("download blob: {e}")),
        }
    }
}

impl Containerd {
    fn content(&self) -> ContentClient<tonic::transport::Channel> {
        ContentClient::new(self.channel.clone())
    }

    /// A lease that expires by itself in an hour, so a crash mid-import
    /// does not pin garbage forever.
    pub(super) async fn lease(&self) -> Result<String, RuntimeError> {
        let id = format!("capstan-{}", &new_id()[..16]);
        let expire = chrono::Utc::now() + chrono::Duration::hours(1);
        let labels = HashMap::from([(
            "containerd.io/gc.expire".to_string(),
            expire.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        )]);
        LeasesClient::new(self.channel.clone())
            .create(self.req(LeaseCreateRequest { id: id.clone(), labels }))
            .await
            .map_err(|e| grpc("create lease", e))?;
        Ok(id)
    }

    pub(super) async fn drop_lease(&self, id: &str) {
        let r = LeasesClient::new(self.channel.clone())
            .delete(self.req(LeaseDeleteRequest { id: id.to_string(), sync: false }))
            .await;
        if let Err(e) = r {
            tracing::warn!(lease = id, error = %e, "deleting lease failed; it expires by itself");
        }
    }

    pub(super) async fn content_exists(&self, digest: &str) -> Result<bool, RuntimeError> {
        match self.content().info(self.req(InfoRequest { digest: digest.to_string() })).await {
            Ok(_) => Ok(true),
            Err(s) if is_not_found(&s) => Ok(false),
            Err(s) => Err(grpc(format!("content info {digest}"), s)),
        }
    }

    /// Streams a blob into the content store; containerd checks the digest
    /// at commit. A partial ingest under the same ref is resumed.
    pub(super) async fn write_blob(
        &self,
        lease: &str,
        desc: &Descriptor,
        mut src: BlobSource,
    ) -> Result<(), RuntimeError> {
        if self.content_exists(&desc.digest).await? {
            return Ok(());
        }
        let err = |what: &str, e: String| RuntimeError::Other(format!("write blob {}: {what}: {e}", desc.digest));
        let ingest_ref = format!("capstan-{}", desc.digest);
        let (tx, rx) = tokio::sync::mpsc::channel::<WriteContentRequest>(2);
        let send = |r: WriteContentRequest| {
            let tx = tx.clone();
            async move { tx.send(r).await.map_err(|_| "stream closed".to_string()) }
        };
        send(WriteContentRequest {
            action: WriteAction::Stat as i32,
            r#ref: ingest_ref.clone(),
            total: desc.size,
            expected: desc.digest.clone(),
            ..Default::default()
        })
        .await
        .map_err(|e| err("stat", e))?;
        let mut responses = self
            .content()
            .write(self.req_leased(tokio_stream::wrappers::ReceiverStream::new(rx), lease))
            .await
            .map_err(|e| grpc(format!("write blob {}", desc.digest), e))?
            .into_inner();
        let first = responses
            .message()
            .await
            .map_err(|e| grpc(format!("write blob {}", desc.digest), e))?
            .ok_or_else(|| err("stat", "no response".into()))?;
        // Resume after what an interrupted ingest already holds.
        let mut offset = first.offset;
        let mut skip = offset;
        loop {
            let Some(mut chunk) = src.next_chunk().await.map_err(|e| err("read", e))? else { break };
            if skip > 0 {
                let n = (skip as usize).min(chunk.len());
                chunk = chunk.slice(n..);
                skip -= n as i64;
                if chunk.is_empty() {
                    continue;
                }
            }
            let len = chunk.len() as i64;
            send(WriteContentRequest {
                action: WriteAction::Write as i32,
                r#ref: ingest_ref.clone(),
                total: desc.size,
                offset,
                data: chunk.to_vec(),
                ..Default::default()
            })
            .await
            .map_err(|e| err("write", e))?;
            responses
                .message()
                .await
                .map_err(|e| grpc(format!("write blob {}", desc.digest), e))?
                .ok_or_else(|| err("write", "stream ended".into()))?;
            offset += len;
        }
        send(WriteContentRequest {
            action: WriteAction::Commit as i32,
            r#ref: ingest_ref.clone(),
            total: desc.size,
            offset,
            expected: desc.digest.clone(),
            ..Default::default()
        })
        .await
        .map_err(|e| err("commit", e))?;
        match responses.message().await {
            Ok(_) => Ok(()),
            Err(s) if s.code() == tonic::Code::AlreadyExists => Ok(()),
            Err(s) => Err(grpc(format!("commit blob {}", desc.digest), s)),
        }
    }

    /// A whole blob from the content store (manifests and configs only).
    pub(super) async fn read_blob(&self, digest: &str) -> Result<Vec<u8>, RuntimeError> {
        let mut stream = self
            .content()
            .read(self.req(ReadContentRequest { digest: digest.to_string(), offset: 0, size: 0 }))
            .await
            .map_err(|e| grpc(format!("read blob {digest}"), e))?
            .into_inner();
        let mut out = Vec::new();
        while let Some(m) = stream.message().await.map_err(|e| grpc(format!("read blob {digest}"), e))? {
            out.extend_from_slice(&m.data);
            if out.len() > 64 << 20 {
                return Err(RuntimeError::Other(format!("blob {digest} is too large for a manifest or config")));
            }
        }
        Ok(out)
    }

    /// Merges labels into a blob's (the GC references).
    pub(super) async fn label_blob(&self, digest: &str, labels: HashMap<String, String>) -> Result<(), RuntimeError> {
        if labels.is_empty() {
            return Ok(());
        }
        let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
        self.content()
            .update(self.req(UpdateRequest {
                info: Some(Info { digest: digest.to_string(), labels, ..Default::default() }),
                update_mask: Some(prost_types::FieldMask { paths }),
            }))
            .await
            .map_err(|e| grpc(format!("label blob {digest}"), e))?;
        Ok(())
    }
}
