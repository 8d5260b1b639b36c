//! A busybox container image, built locally as an OCI image-layout tar
//! archive, for tests of every crate that runs containers (no registry, no
//! network: Debian's busybox-static provides the binary).
//!
//! The archive holds `oci-layout`, `index.json` (one manifest, annotated
//! with the reference both as `io.containerd.image.name`, which `ctr
//! import` names the image by, and `org.opencontainers.image.ref.name`,
//! which skopeo and the OCI tools read), the manifest, the config (amd64,
//! linux, PATH, Cmd ["sh"], no Entrypoint, like Docker's busybox) and one
//! gzip layer: /bin/busybox, a symlink per common applet, /etc/passwd and
//! /etc/group (root and nobody), /tmp, /root.
//!
//! Building is pure and in memory ([`build_archive`]); [`busybox_oci_archive`]
//! reads the binary and writes the file. Timestamps are fixed, so the same
//! busybox gives the same digests every time.
//!
//! Note: Debian 12's busybox-static `wget` segfaults (even on the host);
//! use `nc` for HTTP in tests.

use std::io::Write;
use std::path::Path;

use serde_json::json;
use sha2::{Digest, Sha256};

/// Where Debian's busybox-static puts the binary.
pub const BUSYBOX: &str = "/bin/busybox";

/// Applets linked in /bin.
pub const APPLETS: &[&str] = &[
    "sh",
    "ash",
    "echo",
    "cat",
    "sleep",
    "ls",
    "httpd",
    "wget",
    "nc",
    "head",
    "tail",
    "true",
    "false",
    "kill",
    "ps",
    "id",
    "env",
    "mkdir",
    "touch",
    "grep",
    "date",
    "hostname",
    "ip",
    "rm",
    "cp",
    "mv",
    "ln",
    "chmod",
    "chown",
    "pwd",
    "uname",
    "whoami",
    "printf",
    "test",
    "[",
    "seq",
    "wc",
    "sed",
    "awk",
    "sort",
    "uniq",
    "tr",
    "cut",
    "find",
    "xargs",
    "dd",
    "du",
    "df",
    "mount",
    "umount",
    "top",
    "free",
    "ping",
    "nslookup",
    "netstat",
    "ifconfig",
    "route",
    "tee",
    "yes",
    "expr",
    "basename",
    "dirname",
    "readlink",
    "stat",
    "sync",
    "timeout",
    "watch",
    "which",
    "md5sum",
    "sha256sum",
    "base64",
    "gzip",
    "gunzip",
    "tar",
    "nohup",
    "vi",
    "less",
    "more",
    "diff",
    "realpath",
    "usleep",
    "killall",
    "pidof",
];

pub const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MEDIA_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

#[derive(Debug, thiserror::Error)]
pub enum TestImageError {
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("writing {path}: {source}")]
    Write { path: String, source: std::io::Error },
    #[error("building the archive: {0}")]
    Build(#[from] std::io::Error),
}

/// What was built: the digests tests compare with what a runtime reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuiltImage {
    pub reference: String,
    /// `sha256:...` of the manifest.
    pub manifest_digest: String,
    /// `sha256:...` of the config: the image id containerd and the CRI show.
    pub config_digest: String,
}

fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// Fixed mtime (2020-01-01) so that the archive is reproducible.
const MTIME: u64 = 1_577_836_800;

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(MTIME);
    h
}

fn add_file<W: Write>(b: &mut tar::Builder<W>, path: &str, mode: u32, data: &[u8]) -> std::io::Result<()> {
    let mut h = header(tar::EntryType::Regular, mode, data.len() as u64);
    b.append_data(&mut h, path, data)
}

fn add_dir<W: Write>(b: &mut tar::Builder<W>, path: &str, mode: u32) -> std::io::Result<()> {
    let mut h = header(tar::EntryType::Directory, mode, 0);
    b.append_data(&mut h, path, std::io::empty())
}

fn add_symlink<W: Write>(b: &mut tar::Builder<W>, path: &str, target: &str) -> std::io::Result<()> {
    let mut h = header(tar::EntryType::Symlink, 0o777, 0);
    b.append_link(&mut h, path, target)
}

/// The root filesystem layer as an uncompressed tar.
pub fn rootfs_tar(busybox: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    for (dir, mode) in
        [("bin", 0o755), ("etc", 0o755), ("root", 0o700), ("tmp", 0o1777), ("usr", 0o755), ("usr/bin", 0o755)]
    {
        add_dir(&mut b, dir, mode)?;
    }
    add_file(&mut b, "bin/busybox", 0o755, busybox)?;
    for applet in APPLETS {
        add_symlink(&mut b, &format!("bin/{applet}"), "busybox")?;
    }
    // Scripts starting with #!/usr/bin/env.
    add_symlink(&mut b, "usr/bin/env", "/bin/busybox")?;
    add_file(
        &mut b,
        "etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )?;
    add_file(&mut b, "etc/group", 0o644, b"root:x:0:\nnobody:x:65534:\n")?;
    b.into_inner()
}

/// The whole OCI archive in memory.
pub fn build_archive(busybox: &[u8], reference: &str) -> Result<(Vec<u8>, BuiltImage), TestImageError> {
    let layer_tar = rootfs_tar(busybox)?;
    let diff_id = sha256(&layer_tar);
    // GzEncoder writes mtime 0 and no file name: reproducible.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&layer_tar)?;
    let layer = gz.finish()?;
    let layer_digest = sha256(&layer);

    let config = serde_json::to_vec(&json!({
        "created": "2020-01-01T00:00:00Z",
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["sh"],
            "WorkingDir": "/",
        },
        "rootfs": { "type": "layers", "diff_ids": [diff_id] },
        "history": [{ "created": "2020-01-01T00:00:00Z", "created_by": "capstan-node testimage: busybox-static" }],
    }))
    .map_err(std::io::Error::other)?;
    let config_digest = sha256(&config);

    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": { "mediaType": MEDIA_CONFIG, "digest": config_digest, "size": config.len() },
        "layers": [{ "mediaType": MEDIA_LAYER, "digest": layer_digest, "size": layer.len() }],
    }))
    .map_err(std::io::Error::other)?;
    let manifest_digest = sha256(&manifest);

    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": [{
            "mediaType": MEDIA_MANIFEST,
            "digest": manifest_digest,
            "size": manifest.len(),
            "platform": { "architecture": "amd64", "os": "linux" },
            "annotations": {
                "io.containerd.image.name": reference,
                "org.opencontainers.image.ref.name": reference,
            },
        }],
    }))
    .map_err(std::io::Error::other)?;

    let mut b = tar::Builder::new(Vec::new());
    add_file(&mut b, "oci-layout", 0o644, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    add_file(&mut b, "index.json", 0o644, &index)?;
    add_dir(&mut b, "blobs", 0o755)?;
    add_dir(&mut b, "blobs/sha256", 0o755)?;
    for (digest, data) in [(&manifest_digest, &manifest), (&config_digest, &config), (&layer_digest, &layer)] {
        add_file(&mut b, &format!("blobs/sha256/{}", &digest["sha256:".len()..]), 0o644, data)?;
    }
    let archive = b.into_inner()?;
    Ok((archive, BuiltImage { reference: reference.to_string(), manifest_digest, config_digest }))
}

/// Writes the busybox image as an OCI archive to `dest` (what `ctr images
/// import` and `skopeo copy oci-archive:` take), named `reference`
/// (e.g. `docker.io/library/busybox:test`).
pub fn busybox_oci_archive(dest: &Path, reference: &str) -> Result<BuiltImage, TestImageError> {
    let busybox = std::fs::read(BUSYBOX).map_err(|source| TestImageError::Read { path: BUSYBOX.into(), source })?;
    let (archive, built) = build_archive(&busybox, reference)?;
    let write = |source| TestImageError::Write { path: dest.display().to_string(), source };
    // Write-then-rename: tests building the same file in parallel never
    // read a half-written archive.
    let tmp = dest.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, archive).map_err(write)?;
    std::fs::rename(&tmp, dest).map_err(write)?;
    Ok(built)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::io::Read;

    fn entries(tar_bytes: &[u8]) -> BTreeMap<String, (tar::EntryType, Vec<u8>, Option<String>)> {
        let mut a = tar::Archive::new(tar_bytes);
        let mut out = BTreeMap::new();
        for e in a.entries().unwrap() {
            let mut e = e.unwrap();
            let path = e.path().unwrap().to_string_lossy().into_owned();
            let kind = e.header().entry_type();
            let link = e.link_name().unwrap().map(|l| l.to_string_lossy().into_owned());
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            out.insert(path, (kind, data, link));
        }
        out
    }

    fn blob<'a>(files: &'a BTreeMap<String, (tar::EntryType, Vec<u8>, Option<String>)>, digest: &str) -> &'a [u8] {
        let hexd = digest.strip_prefix("sha256:").unwrap();
        &files[&format!("blobs/sha256/{hexd}")].1
    }

    #[test]
    fn archive_digests_are_consistent() {
        let (archive, built) = build_archive(b"#!fake busybox", "example.com/busybox:test").unwrap();
        let files = entries(&archive);
        // Every blob is named by its digest.
        for (path, (_, data, _)) in &files {
            if let Some(hexd) = path.strip_prefix("blobs/sha256/").filter(|h| !h.is_empty()) {
                assert_eq!(sha256(data), format!("sha256:{hexd}"));
            }
        }
        assert_eq!(files["oci-layout"].1, br#"{"imageLayoutVersion":"1.0.0"}"#);
        let index: serde_json::Value = serde_json::from_slice(&files["index.json"].1).unwrap();
        let m = &index["manifests"][0];
        assert_eq!(m["digest"], built.manifest_digest.as_str());
        assert_eq!(m["annotations"]["org.opencontainers.image.ref.name"], "example.com/busybox:test");
        let manifest_bytes = blob(&files, &built.manifest_digest);
        assert_eq!(m["size"], manifest_bytes.len());
        let manifest: serde_json::Value = serde_json::from_slice(manifest_bytes).unwrap();
        assert_eq!(manifest["config"]["digest"], built.config_digest.as_str());
        let config: serde_json::Value = serde_json::from_slice(blob(&files, &built.config_digest)).unwrap();
        assert_eq!(manifest["config"]["size"], blob(&files, &built.config_digest).len());
        assert_eq!(config["config"]["Cmd"], json!(["sh"]));
        assert!(config["config"].get("Entrypoint").is_none());
        assert_eq!((config["architecture"].as_str(), config["os"].as_str()), (Some("amd64"), Some("linux")));

        // The layer: its digest over the gzip, the diff_id over the tar.
        let layer_digest = manifest["layers"][0]["digest"].as_str().unwrap();
        let layer = blob(&files, layer_digest);
        assert_eq!(manifest["layers"][0]["size"], layer.len());
        let mut tar_bytes = Vec::new();
        flate2::read::GzDecoder::new(layer).read_to_end(&mut tar_bytes).unwrap();
        assert_eq!(config["rootfs"]["diff_ids"][0], sha256(&tar_bytes).as_str());
        let rootfs = entries(&tar_bytes);
        assert_eq!(rootfs["bin/busybox"].1, b"#!fake busybox");
        assert_eq!(rootfs["bin/sh"].0, tar::EntryType::Symlink);
        assert_eq!(rootfs["bin/sh"].2.as_deref(), Some("busybox"));
        assert!(String::from_utf8_lossy(&rootfs["etc/passwd"].1).starts_with("root:x:0:0:"));
        assert!(rootfs.contains_key("tmp") && rootfs.contains_key("root"));

        // Reproducible.
        let (again, built_again) = build_archive(b"#!fake busybox", "example.com/busybox:test").unwrap();
        assert_eq!((again, built_again), (archive, built));
    }

    #[test]
    fn skopeo_accepts_the_archive() {
        if !Path::new(BUSYBOX).exists() || std::process::Command::new("skopeo").arg("--version").output().is_err() {
            eprintln!("skipping: needs {BUSYBOX} and skopeo");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("busybox.tar");
        let built = busybox_oci_archive(&dest, "docker.io/library/busybox:capstan-test").unwrap();
        let out = std::process::Command::new("skopeo")
            .args(["inspect", &format!("oci-archive:{}", dest.display())])
            .output()
            .unwrap();
        assert!(out.status.success(), "skopeo: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["Digest"], built.manifest_digest.as_str());
        assert_eq!(v["Architecture"], "amd64");
        assert_eq!(v["Os"], "linux");
        assert_eq!(v["Layers"].as_array().map(Vec::len), Some(1));
        let raw = std::process::Command::new("skopeo")
            .args(["inspect", "--config", &format!("oci-archive:{}", dest.display())])
            .output()
            .unwrap();
        assert!(raw.status.success(), "{}", String::from_utf8_lossy(&raw.stderr));
        let cfg: serde_json::Value = serde_json::from_slice(&raw.stdout).unwrap();
        assert_eq!(cfg["config"]["Cmd"], json!(["sh"]));
    }
}
