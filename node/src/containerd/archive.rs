//! Reading image archives: an OCI image layout in a tar (`index.json` +
//! `blobs/sha256/...`, what `skopeo copy ... oci-archive:` writes) or a
//! docker-archive (`manifest.json` + config + layer tars, `docker save`).
//!
//! Only the outer tar is read here, by file offset: blobs are streamed
//! straight from the archive file into containerd's content store later,
//! and containerd's differ applies the layers. Blocking IO: call from
//! `spawn_blocking`.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use containerd_client::types::Descriptor;
use serde::Deserialize;
use sha2::{Digest, Sha256};

pub const MT_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MT_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MT_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MT_OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
pub const MT_OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const MT_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const MT_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";
const ANNOTATION_CONTAINERD_NAME: &str = "io.containerd.image.name";

/// Where each regular file of the tar lies in the archive file.
pub struct ArchiveIndex {
    pub path: PathBuf,
    entries: HashMap<String, (u64, u64)>,
}

impl ArchiveIndex {
    pub fn open(path: &Path) -> Result<ArchiveIndex, String> {
        let file = File::open(path).map_err(|e| format!("open {}: {e}", path.display()))?;
        let mut ar = tar::Archive::new(file);
        let mut entries = HashMap::new();
        let mut links = Vec::new();
        for e in ar.entries().map_err(|e| format!("read {}: {e}", path.display()))? {
            let e = e.map_err(|e| format!("read {}: {e}", path.display()))?;
            let name = clean(&e.path().map_err(|e| format!("bad entry name: {e}"))?.to_string_lossy());
            match e.header().entry_type() {
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    entries.insert(name, (e.raw_file_position(), e.size()));
                }
                tar::EntryType::Symlink | tar::EntryType::Link => {
                    if let Ok(Some(target)) = e.link_name() {
                        let target = target.to_string_lossy().to_string();
                        // Symlinks are relative to their directory; hard links to the root.
                        let resolved = if e.header().entry_type() == tar::EntryType::Symlink {
                            let dir = name.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
                            clean(&format!("{dir}/{target}"))
                        } else {
                            clean(&target)
                        };
                        links.push((name, resolved));
                    }
                }
                _ => {}
            }
        }
        for (name, target) in links {
            if let Some(r) = entries.get(&target).copied() {
                entries.insert(name, r);
            }
        }
        Ok(ArchiveIndex { path: path.to_path_buf(), entries })
    }

    pub fn range(&self, name: &str) -> Option<(u64, u64)> {
        self.entries.get(&clean(name)).copied()
    }

    /// A small file (index, manifest, config), whole.
    pub fn read(&self, name: &str) -> Result<Vec<u8>, String> {
        let (off, size) = self.range(name).ok_or_else(|| format!("{name} is not in {}", self.path.display()))?;
        if size > 64 << 20 {
            return Err(format!("{name} is {size} bytes, too large for a manifest or config"));
        }
        let mut f = File::open(&self.path).map_err(|e| e.to_string())?;
        f.seek(SeekFrom::Start(off)).map_err(|e| e.to_string())?;
        let mut buf = vec![0; size as usize];
        f.read_exact(&mut buf).map_err(|e| format!("read {name}: {e}"))?;
        Ok(buf)
    }

    /// sha256 of an entry, streamed.
    fn digest(&self, name: &str) -> Result<(String, u64), String> {
        let (off, size) = self.range(name).ok_or_else(|| format!("{name} is not in {}", self.path.display()))?;
        let mut f = File::open(&self.path).map_err(|e| e.to_string())?;
        f.seek(SeekFrom::Start(off)).map_err(|e| e.to_string())?;
        let mut h = Sha256::new();
        let mut left = size;
        let mut buf = vec![0u8; 1 << 20];
        while left > 0 {
            let n = (left as usize).min(buf.len());
            f.read_exact(&mut buf[..n]).map_err(|e| format!("read {name}: {e}"))?;
            h.update(&buf[..n]);
            left -= n as u64;
        }
        Ok((format!("sha256:{}", hex::encode(h.finalize())), size))
    }

    fn starts_with(&self, name: &str, magic: &[u8]) -> bool {
        let Some((off, size)) = self.range(name) else { return false };
        if size < magic.len() as u64 {
            return false;
        }
        let mut buf = vec![0u8; magic.len()];
        File::open(&self.path)
            .and_then(|mut f| {
                f.seek(SeekFrom::Start(off))?;
                f.read_exact(&mut buf)
            })
            .is_ok()
            && buf == magic
    }
}

/// `./a//b/` -> `a/b`.
fn clean(p: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out.join("/")
}

/// Path of a blob in an OCI layout.
pub fn blob_path(digest: &str) -> Result<String, String> {
    let (algo, hex) = digest.split_once(':').ok_or_else(|| format!("bad digest {digest:?}"))?;
    if algo != "sha256" || hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("unsupported digest {digest:?}"));
    }
    Ok(format!("blobs/sha256/{hex}"))
}

/// One image found in an archive, ready to be written to the content store.
pub struct ArchiveImage {
    /// Normalisable reference names, if the archive names the image.
    pub names: Vec<String>,
    pub manifest: Descriptor,
    pub manifest_bytes: Vec<u8>,
    pub config: Descriptor,
    pub config_bytes: Vec<u8>,
    /// Each layer's descriptor and the archive entry holding it.
    pub layers: Vec<(Descriptor, String)>,
}

#[derive(Deserialize)]
pub struct OciDescriptor {
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    pub digest: String,
    pub size: i64,
    #[serde(default)]
    pub annotations: HashMap<String, String>,
    #[serde(default)]
    pub platform: Option<Platform>,
}

#[derive(Deserialize)]
pub struct Platform {
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub architecture: String,
}

#[derive(Deserialize)]
pub struct OciIndex {
    #[serde(default)]
    pub manifests: Vec<OciDescriptor>,
}

#[derive(Deserialize)]
pub struct OciManifest {
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    pub config: OciDescriptor,
    #[serde(default)]
    pub layers: Vec<OciDescriptor>,
}

impl OciDescriptor {
    pub fn to_descriptor(&self) -> Descriptor {
        Descriptor {
            media_type: self.media_type.clone(),
            digest: self.digest.clone(),
            size: self.size,
            annotations: Default::default(),
        }
    }
}

/// The platform this agent runs, in OCI terms.
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "arm" => "arm",
        "s390x" => "s390x",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

/// Picks the manifest for this platform from an index (or the only one).
pub fn pick_platform(manifests: &[OciDescriptor]) -> Option<&OciDescriptor> {
    manifests
        .iter()
        .find(|m| m.platform.as_ref().is_some_and(|p| p.os == "linux" && p.architecture == host_arch()))
        .or_else(|| manifests.iter().find(|m| m.platform.is_none()))
}

fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Every image in an archive.
pub fn read_archive(idx: &ArchiveIndex) -> Result<Vec<ArchiveImage>, String> {
    if idx.range("index.json").is_some() {
        read_oci_layout(idx)
    } else if idx.range("manifest.json").is_some() {
        read_docker_archive(idx)
    } else {
        Err(format!(
            "{} is neither an OCI image layout (index.json) nor a docker archive (manifest.json)",
            idx.path.display()
        ))
    }
}

fn read_oci_layout(idx: &ArchiveIndex) -> Result<Vec<ArchiveImage>, String> {
    let index: OciIndex = serde_json::from_slice(&idx.read("index.json")?).map_err(|e| format!("index.json: {e}"))?;
    let stem = idx.path.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
    let mut images = Vec::new();
    for top in &index.manifests {
        let mut names = Vec::new();
        if let Some(n) = top.annotations.get(ANNOTATION_CONTAINERD_NAME) {
            names.push(n.clone());
        }
        if let Some(n) = top.annotations.get(ANNOTATION_REF_NAME) {
            // A full reference, or (as the OCI layout spec intends) only a
            // tag, then named after the archive file.
            if n.contains(':') || n.contains('/') {
                names.push(n.clone());
            } else if !stem.is_empty() {
                names.push(format!("{stem}:{n}"));
            }
        }
        let manifest_desc = match top.media_type.as_str() {
            MT_OCI_INDEX | MT_DOCKER_LIST => {
                let nested: OciIndex = serde_json::from_slice(&idx.read(&blob_path(&top.digest)?)?)
                    .map_err(|e| format!("index {}: {e}", top.digest))?;
                let m = pick_platform(&nested.manifests)
                    .ok_or_else(|| format!("index {} has no manifest for linux/{}", top.digest, host_arch()))?;
                m.to_descriptor()
            }
            _ => top.to_descriptor(),
        };
        let manifest_bytes = idx.read(&blob_path(&manifest_desc.digest)?)?;
        if sha256_digest(&manifest_bytes) != manifest_desc.digest {
            return Err(format!("manifest {} does not match its digest", manifest_desc.digest));
        }
        let manifest: OciManifest =
            serde_json::from_slice(&manifest_bytes).map_err(|e| format!("manifest {}: {e}", manifest_desc.digest))?;
        let config_bytes = idx.read(&blob_path(&manifest.config.digest)?)?;
        let mut layers = Vec::new();
        for l in &manifest.layers {
            let p = blob_path(&l.digest)?;
            if idx.range(&p).is_none() {
                return Err(format!("layer {} is missing from the archive", l.digest));
            }
            layers.push((l.to_descriptor(), p));
        }
        let mut manifest_desc = manifest_desc;
        if manifest_desc.media_type.is_empty() {
            manifest_desc.media_type =
                if manifest.media_type.is_empty() { MT_OCI_MANIFEST.into() } else { manifest.media_type.clone() };
        }
        images.push(ArchiveImage {
            names,
            manifest: manifest_desc,
            manifest_bytes,
            config: manifest.config.to_descriptor(),
            config_bytes,
            layers,
        });
    }
    Ok(images)
}

#[derive(Deserialize)]
struct DockerManifestEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers", default)]
    layers: Vec<String>,
}

/// docker-archive: there is no manifest in it, so one is written (an OCI
/// manifest over the archive's config and layer files).
fn read_docker_archive(idx: &ArchiveIndex) -> Result<Vec<ArchiveImage>, String> {
    let entries: Vec<DockerManifestEntry> =
        serde_json::from_slice(&idx.read("manifest.json")?).map_err(|e| format!("manifest.json: {e}"))?;
    let mut images = Vec::new();
    for e in entries {
        let config_bytes = idx.read(&e.config)?;
        let config = Descriptor {
            media_type: MT_OCI_CONFIG.into(),
            digest: sha256_digest(&config_bytes),
            size: config_bytes.len() as i64,
            annotations: Default::default(),
        };
        let mut layers = Vec::new();
        for l in &e.layers {
            let (digest, size) = idx.digest(l)?;
            let gzip = idx.starts_with(l, &[0x1f, 0x8b]);
            let media_type = if gzip { MT_OCI_LAYER_GZIP } else { MT_OCI_LAYER };
            layers.push((
                Descriptor {
                    media_type: media_type.into(),
                    digest,
                    size: size as i64,
                    annotations: Default::default(),
                },
                clean(l),
            ));
        }
        let manifest_json = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": MT_OCI_MANIFEST,
            "config": {"mediaType": config.media_type, "digest": config.digest, "size": config.size},
            "layers": layers.iter().map(|(d, _)| serde_json::json!({
                "mediaType": d.media_type, "digest": d.digest, "size": d.size,
            })).collect::<Vec<_>>(),
        });
        let manifest_bytes = serde_json::to_vec(&manifest_json).map_err(|e| e.to_string())?;
        let manifest = Descriptor {
            media_type: MT_OCI_MANIFEST.into(),
            digest: sha256_digest(&manifest_bytes),
            size: manifest_bytes.len() as i64,
            annotations: Default::default(),
        };
        images.push(ArchiveImage {
            names: e.repo_tags.unwrap_or_default(),
            manifest,
            manifest_bytes,
            config,
            config_bytes,
            layers,
        });
    }
    Ok(images)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_paths() {
        assert_eq!(clean("./blobs//sha256/ab/"), "blobs/sha256/ab");
        assert_eq!(clean("abc/../def/x"), "def/x");
    }

    #[test]
    fn blob_paths() {
        let d = format!("sha256:{}", "0".repeat(64));
        assert_eq!(blob_path(&d).unwrap(), format!("blobs/sha256/{}", "0".repeat(64)));
        assert!(blob_path("sha256:../../etc/passwd").is_err());
        assert!(blob_path("md5:00").is_err());
    }
}
