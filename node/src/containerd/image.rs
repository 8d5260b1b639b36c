//! Images: storing one (blobs through `content.rs`, layers unpacked into
//! the snapshotter, image records), `ensure_image`, the image directory.
//!
//! Garbage collection decides what survives in containerd, so every write
//! happens under a lease (dropped at the end), and the blobs carry the
//! labels containerd's collector follows: manifest -> config and layers
//! (`containerd.io/gc.ref.content.*`), config -> the unpacked top snapshot
//! (`containerd.io/gc.ref.snapshot.overlayfs`); the image record holds the
//! manifest. Unpacking is idempotent: a committed snapshot named by its
//! chain id is never unpacked twice.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use containerd_client::services::v1::snapshots::{
    snapshots_client::SnapshotsClient, CommitSnapshotRequest, PrepareSnapshotRequest, RemoveSnapshotRequest,
    StatSnapshotRequest,
};
use containerd_client::services::v1::{
    diff_client::DiffClient, images_client::ImagesClient, ApplyRequest, CreateImageRequest, GetImageRequest, Image,
    UpdateImageRequest,
};
use containerd_client::types::Descriptor;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::archive::{self, OciIndex, OciManifest, MT_DOCKER_LIST, MT_OCI_INDEX};
use super::content::BlobSource;
use super::reference::{self, Reference};
use super::spec::ImageConfig;
use super::{grpc, is_not_found, new_id, Containerd, SNAPSHOTTER};
use crate::runtime::{PullPolicy, RegistryAuth, RuntimeError};

/// An image present and unpacked in containerd.
#[derive(Clone, Debug)]
pub struct LocalImage {
    /// Normalised name (`docker.io/library/busybox:1`).
    pub name: String,
    /// The config digest, Kubernetes' imageID.
    pub id: String,
    pub config: ImageConfig,
    /// Chain id of the top layer: the parent of a container's rootfs
    /// ("" for an image without layers).
    pub chain_id: String,
}

/// The image config JSON: what we run, and the layers' uncompressed digests.
#[derive(Deserialize)]
struct ConfigFile {
    #[serde(default)]
    config: Option<ImageConfig>,
    rootfs: RootFs,
}

#[derive(Deserialize)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

/// Chain ids of a layer stack, as the OCI image spec defines them.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => format!("sha256:{}", hex::encode(Sha256::digest(format!("{prev} {d}").as_bytes()))),
        };
        out.push(next);
    }
    out
}

/// Where the blobs of an image being stored come from.
pub enum Origin<'a> {
    Archive(&'a archive::ArchiveIndex),
    Registry(&'a super::registry::Puller),
}

impl Origin<'_> {
    async fn open(&self, desc: &Descriptor, entry: &str) -> Result<BlobSource, String> {
        match self {
            Origin::Archive(idx) => {
                let (off, size) = idx.range(entry).ok_or_else(|| format!("{entry} missing from the archive"))?;
                BlobSource::file(&idx.path, off, size).await
            }
            Origin::Registry(p) => p.blob(desc).await,
        }
    }
}

impl Containerd {
    fn snapshots(&self) -> SnapshotsClient<tonic::transport::Channel> {
        SnapshotsClient::new(self.channel.clone())
    }

    async fn snapshot_exists(&self, key: &str) -> Result<bool, RuntimeError> {
        let r = self
            .snapshots()
            .stat(self.req(StatSnapshotRequest { snapshotter: SNAPSHOTTER.into(), key: key.to_string() }))
            .await;
        match r {
            Ok(_) => Ok(true),
            Err(s) if is_not_found(&s) => Ok(false),
            Err(s) => Err(grpc(format!("stat snapshot {key}"), s)),
        }
    }

    pub(super) async fn remove_snapshot(&self, key: &str) -> Result<(), RuntimeError> {
        let r = self
            .snapshots()
            .remove(self.req(RemoveSnapshotRequest { snapshotter: SNAPSHOTTER.into(), key: key.to_string() }))
            .await;
        match r {
            Ok(_) => Ok(()),
            Err(s) if is_not_found(&s) => Ok(()),
            Err(s) => Err(grpc(format!("remove snapshot {key}"), s)),
        }
    }

    /// Applies the layers missing from the snapshotter, bottom up; returns
    /// the top chain id.
    async fn unpack(&self, lease: &str, layers: &[Descriptor], diff_ids: &[String]) -> Result<String, RuntimeError> {
        if layers.len() != diff_ids.len() {
            return Err(RuntimeError::Other(format!(
                "image has {} layers but its config lists {} diff ids",
                layers.len(),
                diff_ids.len()
            )));
        }
        let chains = chain_ids(diff_ids);
        for (i, layer) in layers.iter().enumerate() {
            let chain = &chains[i];
            if self.snapshot_exists(chain).await? {
                continue;
            }
            let parent = if i == 0 { String::new() } else { chains[i - 1].clone() };
            let key = format!("capstan-extract-{}-{chain}", &new_id()[..8]);
            let mounts = self
                .snapshots()
                .prepare(self.req_leased(
                    PrepareSnapshotRequest {
                        snapshotter: SNAPSHOTTER.into(),
                        key: key.clone(),
                        parent,
                        labels: HashMap::new(),
                    },
                    lease,
                ))
                .await
                .map_err(|e| grpc(format!("prepare snapshot for layer {}", layer.digest), e))?
                .into_inner()
                .mounts;
            let applied = DiffClient::new(self.channel.clone())
                .apply(self.req_leased(
                    ApplyRequest { diff: Some(layer.clone()), mounts, payloads: HashMap::new(), sync_fs: false },
                    lease,
                ))
                .await;
            let applied = match applied {
                Ok(r) => r.into_inner().applied.map(|d| d.digest).unwrap_or_default(),
                Err(e) => {
                    let _ = self.remove_snapshot(&key).await;
                    return Err(grpc(format!("apply layer {}", layer.digest), e));
                }
            };
            if applied != diff_ids[i] {
                let _ = self.remove_snapshot(&key).await;
                return Err(RuntimeError::Other(format!(
                    "layer {} unpacked to {applied}, but the image config says {}",
                    layer.digest, diff_ids[i]
                )));
            }
            let r = self
                .snapshots()
                .commit(self.req_leased(
                    CommitSnapshotRequest {
                        snapshotter: SNAPSHOTTER.into(),
                        name: chain.clone(),
                        key: key.clone(),
                        labels: HashMap::new(),
                    },
                    lease,
                ))
                .await;
            match r {
                Ok(_) => {}
                // Someone else committed the same chain meanwhile: same content.
                Err(s) if s.code() == tonic::Code::AlreadyExists => {
                    let _ = self.remove_snapshot(&key).await;
                }
                Err(s) => {
                    let _ = self.remove_snapshot(&key).await;
                    return Err(grpc(format!("commit layer {}", layer.digest), s));
                }
            }
        }
        Ok(chains.last().cloned().unwrap_or_default())
    }

    /// Writes an image's blobs, labels them for the GC, unpacks it and
    /// creates (or repoints) the image records `names`.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn store_image(
        &self,
        names: &[String],
        origin: Origin<'_>,
        manifest: &Descriptor,
        manifest_bytes: &[u8],
        config: &Descriptor,
        config_bytes: &[u8],
        layers: &[(Descriptor, String)],
    ) -> Result<String, RuntimeError> {
        let parsed: ConfigFile = serde_json::from_slice(config_bytes)
            .map_err(|e| RuntimeError::Other(format!("image config {}: {e}", config.digest)))?;
        let lease = self.lease().await?;
        let r = async {
            self.write_blob(&lease, config, BlobSource::Bytes(Bytes::copy_from_slice(config_bytes))).await?;
            for (l, entry) in layers {
                if self.content_exists(&l.digest).await? {
                    continue;
                }
                let src = origin.open(l, entry).await.map_err(RuntimeError::Other)?;
                self.write_blob(&lease, l, src).await?;
            }
            self.write_blob(&lease, manifest, BlobSource::Bytes(Bytes::copy_from_slice(manifest_bytes))).await?;
            let layer_descs: Vec<Descriptor> = layers.iter().map(|(d, _)| d.clone()).collect();
            let top = self.unpack(&lease, &layer_descs, &parsed.rootfs.diff_ids).await?;

            let mut mlabels =
                HashMap::from([("containerd.io/gc.ref.content.config".to_string(), config.digest.clone())]);
            for (i, (l, _)) in layers.iter().enumerate() {
                mlabels.insert(format!("containerd.io/gc.ref.content.l.{i}"), l.digest.clone());
            }
            self.label_blob(&manifest.digest, mlabels).await?;
            if !top.is_empty() {
                let clabels = HashMap::from([(format!("containerd.io/gc.ref.snapshot.{SNAPSHOTTER}"), top.clone())]);
                self.label_blob(&config.digest, clabels).await?;
            }
            for ((l, _), diff_id) in layers.iter().zip(&parsed.rootfs.diff_ids) {
                let labels = HashMap::from([("containerd.io/uncompressed".to_string(), diff_id.clone())]);
                self.label_blob(&l.digest, labels).await?;
            }
            for name in names {
                self.put_image_record(name, manifest).await?;
            }
            Ok::<_, RuntimeError>(())
        }
        .await;
        self.drop_lease(&lease).await;
        r.map(|()| config.digest.clone())
    }

    async fn put_image_record(&self, name: &str, target: &Descriptor) -> Result<(), RuntimeError> {
        let image = Image { name: name.to_string(), target: Some(target.clone()), ..Default::default() };
        let mut images = ImagesClient::new(self.channel.clone());
        match images.create(self.req(CreateImageRequest { image: Some(image.clone()), source_date_epoch: None })).await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == tonic::Code::AlreadyExists => images
                .update(self.req(UpdateImageRequest {
                    image: Some(image),
                    update_mask: Some(prost_types::FieldMask { paths: vec!["target".into()] }),
                    source_date_epoch: None,
                }))
                .await
                .map(|_| ())
                .map_err(|e| grpc(format!("update image {name}"), e)),
            Err(s) => Err(grpc(format!("create image {name}"), s)),
        }
    }

    /// Imports every image of an OCI image-layout or docker-archive tar;
    /// returns the names created. An image the archive does not name is
    /// named after the archive file (`busybox.tar` -> `busybox:latest`).
    pub async fn import_archive(&self, path: &Path) -> Result<Vec<String>, RuntimeError> {
        let p = path.to_path_buf();
        let (idx, images) = tokio::task::spawn_blocking(move || {
            let idx = archive::ArchiveIndex::open(&p)?;
            let images = archive::read_archive(&idx)?;
            Ok::<_, String>((idx, images))
        })
        .await
        .map_err(|e| RuntimeError::Other(format!("import {}: {e}", path.display())))?
        .map_err(|e| RuntimeError::Other(format!("import {}: {e}", path.display())))?;
        let _guard = self.import_lock.lock().await;
        let mut out = Vec::new();
        for img in images {
            let mut names = Vec::new();
            for n in &img.names {
                names.push(
                    reference::normalize(n).map_err(|e| {
                        RuntimeError::Other(format!("import {}: image name {n:?}: {e}", path.display()))
                    })?,
                );
            }
            if names.is_empty() {
                let stem = path.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
                names.push(reference::normalize(&stem).map_err(|e| {
                    RuntimeError::Other(format!(
                        "import {}: the archive names no image and {stem:?} is not a name: {e}",
                        path.display()
                    ))
                })?);
            }
            self.store_image(
                &names,
                Origin::Archive(&idx),
                &img.manifest,
                &img.manifest_bytes,
                &img.config,
                &img.config_bytes,
                &img.layers,
            )
            .await?;
            tracing::info!(archive = %path.display(), ?names, "imported image");
            out.extend(names);
        }
        Ok(out)
    }

    /// The local image `name` (normalised), unpacking it if its snapshot
    /// went missing. NotFound when there is no such image.
    pub async fn local_image(&self, name: &str) -> Result<LocalImage, RuntimeError> {
        let image = match ImagesClient::new(self.channel.clone())
            .get(self.req(GetImageRequest { name: name.to_string() }))
            .await
        {
            Ok(r) => r.into_inner().image.ok_or_else(|| RuntimeError::NotFound(format!("image {name}")))?,
            Err(s) if is_not_found(&s) => return Err(RuntimeError::NotFound(format!("image {name}"))),
            Err(s) => return Err(grpc(format!("get image {name}"), s)),
        };
        let mut target = image.target.ok_or_else(|| RuntimeError::Other(format!("image {name} has no target")))?;
        if target.media_type == MT_OCI_INDEX || target.media_type == MT_DOCKER_LIST {
            let index: OciIndex = serde_json::from_slice(&self.read_blob(&target.digest).await?)
                .map_err(|e| RuntimeError::Other(format!("image {name}: index: {e}")))?;
            target = archive::pick_platform(&index.manifests)
                .ok_or_else(|| {
                    RuntimeError::Other(format!("image {name} has no linux/{} manifest", archive::host_arch()))
                })?
                .to_descriptor();
        }
        let manifest: OciManifest = serde_json::from_slice(&self.read_blob(&target.digest).await?)
            .map_err(|e| RuntimeError::Other(format!("image {name}: manifest: {e}")))?;
        let config_bytes = self.read_blob(&manifest.config.digest).await?;
        let config: ConfigFile = serde_json::from_slice(&config_bytes)
            .map_err(|e| RuntimeError::Other(format!("image {name}: config: {e}")))?;
        let chains = chain_ids(&config.rootfs.diff_ids);
        let top = chains.last().cloned().unwrap_or_default();
        if !top.is_empty() && !self.snapshot_exists(&top).await? {
            let layers: Vec<Descriptor> = manifest.layers.iter().map(|l| l.to_descriptor()).collect();
            let lease = self.lease().await?;
            let r = self.unpack(&lease, &layers, &config.rootfs.diff_ids).await;
            self.drop_lease(&lease).await;
            r?;
        }
        Ok(LocalImage {
            name: name.to_string(),
            id: manifest.config.digest.clone(),
            config: config.config.unwrap_or_default(),
            chain_id: top,
        })
    }

    /// Imports the archives in `dir` now and whenever one appears or
    /// changes (polled every 2 s; a file is imported once its size and
    /// mtime held still for one poll, so half-copied files are skipped).
    pub fn watch_image_dir(self: &Arc<Self>, dir: PathBuf) -> tokio::task::JoinHandle<()> {
        let c = Arc::clone(self);
        tokio::spawn(async move {
            let mut seen: HashMap<PathBuf, (u64, SystemTime)> = HashMap::new();
            let mut imported: HashMap<PathBuf, (u64, SystemTime)> = HashMap::new();
            let mut first = true;
            loop {
                let mut now_seen = HashMap::new();
                if let Ok(mut rd) = tokio::fs::read_dir(&dir).await {
                    while let Ok(Some(e)) = rd.next_entry().await {
                        let path = e.path();
                        if path.extension().is_none_or(|x| x != "tar") {
                            continue;
                        }
                        if let Ok(md) = e.metadata().await {
                            let stamp = (md.len(), md.modified().unwrap_or(SystemTime::UNIX_EPOCH));
                            now_seen.insert(path, stamp);
                        }
                    }
                }
                for (path, stamp) in &now_seen {
                    // At start the files are complete; later, wait one poll.
                    let stable = first || seen.get(path) == Some(stamp);
                    if stable && imported.get(path) != Some(stamp) {
                        match c.import_archive(path).await {
                            Ok(_) => {}
                            Err(e) => tracing::warn!(archive = %path.display(), error = %e, "image import failed"),
                        }
                        // Failed imports are not retried until the file changes.
                        imported.insert(path.clone(), *stamp);
                    }
                }
                seen = now_seen;
                first = false;
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        })
    }
}

/// Kubernetes' pull policies over the local store and the registry.
pub async fn ensure_image(
    c: &Containerd,
    image: &str,
    policy: PullPolicy,
    auth: &[RegistryAuth],
) -> Result<(String, String), RuntimeError> {
    let img_err = |reason: String| RuntimeError::Image { image: image.to_string(), reason };
    let reference = Reference::parse(image).map_err(|e| img_err(format!("InvalidImageName: {e}")))?;
    let name = reference.to_string();
    let local = match c.local_image(&name).await {
        Ok(l) => Some(l),
        Err(RuntimeError::NotFound(_)) => None,
        Err(e) => return Err(img_err(e.to_string())),
    };
    match (policy, local) {
        (PullPolicy::Never, None) => Err(img_err(format!(
            "ErrImageNeverPull: container image {name:?} is not present with pull policy of Never"
        ))),
        (PullPolicy::Never | PullPolicy::IfNotPresent, Some(l)) => Ok((l.name, l.id)),
        (PullPolicy::IfNotPresent, None) => {
            let id = super::registry::pull(c, &reference, auth).await.map_err(img_err)?;
            Ok((name, id))
        }
        (PullPolicy::Always, local) => match super::registry::pull(c, &reference, auth).await {
            Ok(id) => Ok((name, id)),
            // Air-gapped nodes get images from the image directory: an
            // unreachable registry does not stop a present image.
            Err(e) => match local {
                Some(l) => {
                    tracing::warn!(image = %name, error = %e, "pull failed; using the local image");
                    Ok((l.name, l.id))
                }
                None => Err(img_err(e)),
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_spec() {
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        let chains = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(chains[0], a);
        let expect = format!("sha256:{}", hex::encode(Sha256::digest(format!("{a} {b}").as_bytes())));
        assert_eq!(chains[1], expect);
        assert!(chain_ids(&[]).is_empty());
    }
}
