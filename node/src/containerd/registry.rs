//! Pulling an image over the OCI distribution API (`/v2/<repo>/manifests`
//! and `/blobs`), with Basic and Bearer-token auth, into the same content
//! store and unpack path as archive imports.
//!
//! Loopback registries (`localhost`, `127.0.0.1`) are spoken to over plain
//! HTTP; every other one over HTTPS with the system's trust roots.

use bytes::Bytes;
use containerd_client::types::Descriptor;
use reqwest::header::{ACCEPT, CONTENT_TYPE, WWW_AUTHENTICATE};
use reqwest::StatusCode;
use sha2::{Digest, Sha256};

use super::archive::{self, OciIndex, OciManifest, MT_DOCKER_LIST, MT_DOCKER_MANIFEST, MT_OCI_INDEX, MT_OCI_MANIFEST};
use super::content::BlobSource;
use super::image::Origin;
use super::reference::Reference;
use super::Containerd;
use crate::runtime::RegistryAuth;

const MANIFEST_TYPES: &[&str] = &[MT_OCI_MANIFEST, MT_DOCKER_MANIFEST, MT_OCI_INDEX, MT_DOCKER_LIST];

/// A session with one repository of one registry.
pub struct Puller {
    http: reqwest::Client,
    /// `http(s)://host/v2/<repo>`.
    base: String,
    repository: String,
    creds: Option<(String, String)>,
    token: tokio::sync::Mutex<Option<String>>,
}

/// The credentials for the registry of `domain`, if any were given.
fn creds_for(domain: &str, auth: &[RegistryAuth]) -> Option<(String, String)> {
    let canon = |s: &str| -> String {
        let s = s.trim_start_matches("https://").trim_start_matches("http://");
        let s = s.split('/').next().unwrap_or(s);
        match s {
            "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => "docker.io".to_string(),
            s => s.to_string(),
        }
    };
    let want = canon(domain);
    auth.iter().find(|a| canon(&a.registry) == want).map(|a| (a.username.clone(), a.password.clone()))
}

/// `Bearer realm="x",service="y"` -> ("bearer", [(realm, x), (service, y)]).
fn parse_challenge(h: &str) -> (String, Vec<(String, String)>) {
    let h = h.trim();
    let (scheme, rest) = h.split_once(' ').unwrap_or((h, ""));
    let mut params = Vec::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            break;
        }
        let mut val = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => val.extend(chars.next()),
                    '"' => break,
                    c => val.push(c),
                }
            }
        } else {
            while let Some(c) = chars.peek().copied().filter(|c| *c != ',') {
                val.push(c);
                chars.next();
            }
        }
        params.push((key.trim().to_ascii_lowercase(), val));
    }
    (scheme.to_ascii_lowercase(), params)
}

fn sha256(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

impl Puller {
    pub fn new(http: reqwest::Client, r: &Reference, auth: &[RegistryAuth]) -> Puller {
        let scheme = if r.is_loopback() { "http" } else { "https" };
        Puller {
            http,
            base: format!("{scheme}://{}/v2/{}", r.registry_host(), r.repository),
            repository: r.repository.clone(),
            creds: creds_for(&r.domain, auth),
            token: tokio::sync::Mutex::new(None),
        }
    }

    /// GET with the session's auth; on 401, answers the registry's
    /// challenge once (Basic credentials or a Bearer token) and retries.
    async fn get(&self, url: &str, accept: &[&str]) -> Result<reqwest::Response, String> {
        let build = |token: &Option<String>, basic: bool| {
            let mut rb = self.http.get(url);
            if !accept.is_empty() {
                rb = rb.header(ACCEPT, accept.join(", "));
            }
            if let Some(t) = token {
                rb = rb.bearer_auth(t);
            } else if let (true, Some((u, p))) = (basic, &self.creds) {
                rb = rb.basic_auth(u, Some(p));
            }
            rb
        };
        let token = self.token.lock().await.clone();
        let resp = build(&token, false).send().await.map_err(|e| format!("GET {url}: {e}"))?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        let challenge = resp.headers().get(WWW_AUTHENTICATE).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let (scheme, params) = parse_challenge(&challenge);
        let resp = match scheme.as_str() {
            "basic" => {
                if self.creds.is_none() {
                    return Err(format!("GET {url}: the registry wants credentials and none were given"));
                }
                build(&None, true).send().await.map_err(|e| format!("GET {url}: {e}"))?
            }
            "bearer" => {
                let t = self.fetch_token(&params).await?;
                *self.token.lock().await = Some(t.clone());
                build(&Some(t), false).send().await.map_err(|e| format!("GET {url}: {e}"))?
            }
            _ => return Err(format!("GET {url}: unauthorized (challenge {challenge:?})")),
        };
        if resp.status() == StatusCode::UNAUTHORIZED {
            return Err(format!("GET {url}: unauthorized: the registry rejected the credentials"));
        }
        Ok(resp)
    }

    async fn fetch_token(&self, params: &[(String, String)]) -> Result<String, String> {
        let get = |k: &str| params.iter().find(|(pk, _)| pk == k).map(|(_, v)| v.clone());
        let realm = get("realm").ok_or("bearer challenge without a realm")?;
        let mut url = reqwest::Url::parse(&realm).map_err(|e| format!("token realm {realm:?}: {e}"))?;
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = get("service") {
                q.append_pair("service", &s);
            }
            let scope = get("scope").unwrap_or_else(|| format!("repository:{}:pull", self.repository));
            q.append_pair("scope", &scope);
        }
        let mut rb = self.http.get(url.clone());
        if let Some((u, p)) = &self.creds {
            rb = rb.basic_auth(u, Some(p));
        }
        let resp = rb.send().await.map_err(|e| format!("token from {url}: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("token from {url}: {}", resp.status()));
        }
        let v: serde_json::Value = resp.json().await.map_err(|e| format!("token from {url}: {e}"))?;
        v.get("token")
            .or_else(|| v.get("access_token"))
            .and_then(|t| t.as_str())
            .map(str::to_string)
            .ok_or_else(|| format!("token from {url}: no token in the answer"))
    }

    /// A manifest or index by tag or digest: (media type, bytes, digest).
    async fn manifest(&self, object: &str) -> Result<(String, Bytes, String), String> {
        let url = format!("{}/manifests/{object}", self.base);
        let resp = self.get(&url, MANIFEST_TYPES).await?;
        match resp.status() {
            s if s.is_success() => {}
            StatusCode::NOT_FOUND => return Err(format!("manifest unknown: {object} not found in {}", self.base)),
            s => return Err(format!("GET {url}: {s}")),
        }
        let ct = resp.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let body = resp.bytes().await.map_err(|e| format!("GET {url}: {e}"))?;
        if body.len() > 4 << 20 {
            return Err(format!("GET {url}: manifest too large"));
        }
        let digest = sha256(&body);
        if object.starts_with("sha256:") && digest != object {
            return Err(format!("manifest {object} does not match its digest ({digest})"));
        }
        let mt = match ct.split(';').next().unwrap_or("").trim() {
            t if MANIFEST_TYPES.contains(&t) => t.to_string(),
            _ => serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("mediaType").and_then(|m| m.as_str()).map(str::to_string))
                .unwrap_or_else(|| MT_OCI_MANIFEST.to_string()),
        };
        if !MANIFEST_TYPES.contains(&mt.as_str()) {
            return Err(format!("unsupported manifest type {mt:?} (Docker schema 1 images are not supported)"));
        }
        Ok((mt, body, digest))
    }

    /// A blob's body, streamed (containerd checks its digest at commit).
    pub async fn blob(&self, desc: &Descriptor) -> Result<BlobSource, String> {
        let url = format!("{}/blobs/{}", self.base, desc.digest);
        let resp = self.get(&url, &[]).await?;
        if !resp.status().is_success() {
            return Err(format!("GET {url}: {}", resp.status()));
        }
        Ok(BlobSource::Http(resp))
    }
}

/// Pulls `r` into containerd and names it; returns the image id.
pub async fn pull(c: &Containerd, r: &Reference, auth: &[RegistryAuth]) -> Result<String, String> {
    let puller = Puller::new(c.http.clone(), r, auth);
    let (mut mt, mut body, mut digest) = puller.manifest(r.object()).await?;
    if mt == MT_OCI_INDEX || mt == MT_DOCKER_LIST {
        let index: OciIndex = serde_json::from_slice(&body).map_err(|e| format!("index {digest}: {e}"))?;
        let m = archive::pick_platform(&index.manifests)
            .ok_or_else(|| format!("no manifest for linux/{} in {r}", archive::host_arch()))?;
        let d = m.digest.clone();
        (mt, body, digest) = puller.manifest(&d).await?;
        if mt == MT_OCI_INDEX || mt == MT_DOCKER_LIST {
            return Err(format!("{r}: an index inside an index is not supported"));
        }
    }
    let manifest: OciManifest = serde_json::from_slice(&body).map_err(|e| format!("manifest {digest}: {e}"))?;
    let config_src = puller.blob(&manifest.config.to_descriptor()).await?;
    let BlobSource::Http(resp) = config_src else { return Err("unexpected config source".into()) };
    let config_bytes = resp.bytes().await.map_err(|e| format!("config {}: {e}", manifest.config.digest))?;
    if sha256(&config_bytes) != manifest.config.digest {
        return Err(format!("config {} does not match its digest", manifest.config.digest));
    }
    let manifest_desc = Descriptor { media_type: mt, digest, size: body.len() as i64, annotations: Default::default() };
    let layers: Vec<(Descriptor, String)> =
        manifest.layers.iter().map(|l| (l.to_descriptor(), String::new())).collect();
    let _guard = c.import_lock.lock().await;
    c.store_image(
        &[r.to_string()],
        Origin::Registry(&puller),
        &manifest_desc,
        &body,
        &manifest.config.to_descriptor(),
        &config_bytes,
        &layers,
    )
    .await
    .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        let (s, p) = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull""#,
        );
        assert_eq!(s, "bearer");
        assert_eq!(p[0], ("realm".into(), "https://auth.docker.io/token".into()));
        assert_eq!(p[1], ("service".into(), "registry.docker.io".into()));
        assert_eq!(p[2].1, "repository:library/busybox:pull");
        let (s, p) = parse_challenge(r#"Basic realm="Registry Realm""#);
        assert_eq!(s, "basic");
        assert_eq!(p, [("realm".to_string(), "Registry Realm".to_string())]);
    }

    #[test]
    fn credentials_match_registries() {
        let auth = vec![
            RegistryAuth { registry: "https://index.docker.io/v1/".into(), username: "u".into(), password: "p".into() },
            RegistryAuth { registry: "127.0.0.1:5000".into(), username: "a".into(), password: "b".into() },
        ];
        assert_eq!(creds_for("docker.io", &auth), Some(("u".into(), "p".into())));
        assert_eq!(creds_for("127.0.0.1:5000", &auth), Some(("a".into(), "b".into())));
        assert_eq!(creds_for("quay.io", &auth), None);
    }
}
