//! Image references: parsing and the normalisation Kubernetes and
//! containerd apply (`busybox:1` -> `docker.io/library/busybox:1`). Pure.

use std::fmt;

/// A parsed, normalised image reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reference {
    /// Registry host[:port], `docker.io` for Docker Hub.
    pub domain: String,
    /// Repository path inside the registry (`library/busybox`).
    pub repository: String,
    /// Tag, None when only a digest was given.
    pub tag: Option<String>,
    /// `sha256:...` when the reference pins a digest.
    pub digest: Option<String>,
}

impl Reference {
    /// Parses `image` the way Docker's reference library does: the first
    /// path component is a registry only if it looks like a host (has a
    /// `.` or `:`, or is `localhost`); a missing tag means `latest`.
    pub fn parse(image: &str) -> Result<Reference, String> {
        let image = image.trim();
        if image.is_empty() {
            return Err("empty image reference".into());
        }
        if image.chars().any(char::is_whitespace) {
            return Err(format!("invalid image reference {image:?}"));
        }
        let (rest, digest) = match image.split_once('@') {
            Some((r, d)) => {
                let (algo, hex) = d.split_once(':').ok_or_else(|| format!("invalid digest in {image:?}"))?;
                if algo != "sha256" || hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(format!("invalid digest in {image:?}"));
                }
                (r, Some(d.to_string()))
            }
            None => (image, None),
        };
        // A tag follows the last ':' after the last '/'.
        let last_slash = rest.rfind('/').map(|i| i + 1).unwrap_or(0);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => (&rest[..last_slash + i], Some(rest[last_slash + i + 1..].to_string())),
            None => (rest, None),
        };
        if let Some(t) = &tag {
            if t.is_empty()
                || t.len() > 128
                || !t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
            {
                return Err(format!("invalid tag in {image:?}"));
            }
        }
        let (domain, repository) = match name.split_once('/') {
            Some((first, path)) if first.contains('.') || first.contains(':') || first == "localhost" => {
                (first.to_string(), path.to_string())
            }
            _ => ("docker.io".to_string(), name.to_string()),
        };
        let repository = if domain == "docker.io" && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        if repository.is_empty()
            || repository.split('/').any(|c| c.is_empty())
            || !repository.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-/".contains(&b))
        {
            return Err(format!("invalid repository name in {image:?}"));
        }
        let tag = if tag.is_none() && digest.is_none() { Some("latest".to_string()) } else { tag };
        Ok(Reference { domain, repository, tag, digest })
    }

    /// What to ask the registry for: the digest when pinned, else the tag.
    pub fn object(&self) -> &str {
        self.digest.as_deref().or(self.tag.as_deref()).unwrap_or("latest")
    }

    /// The host serving the registry API (Docker Hub's differs from its name).
    pub fn registry_host(&self) -> &str {
        if self.domain == "docker.io" {
            "registry-1.docker.io"
        } else {
            &self.domain
        }
    }

    /// Loopback registries are spoken to over plain HTTP (a local test or
    /// mirror registry); every other one over HTTPS.
    pub fn is_loopback(&self) -> bool {
        let host = match self.domain.rsplit_once(':') {
            Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => &self.domain,
        };
        matches!(host, "localhost" | "127.0.0.1" | "[::1]")
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.domain, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// The normalised name containerd stores an image under.
pub fn normalize(image: &str) -> Result<String, String> {
    Reference::parse(image).map(|r| r.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_like_kubernetes() {
        assert_eq!(normalize("busybox").unwrap(), "docker.io/library/busybox:latest");
        assert_eq!(normalize("busybox:1").unwrap(), "docker.io/library/busybox:1");
        assert_eq!(normalize("user/app:v2").unwrap(), "docker.io/user/app:v2");
        assert_eq!(normalize("docker.io/library/busybox:1").unwrap(), "docker.io/library/busybox:1");
        assert_eq!(normalize("127.0.0.1:5000/busybox:test").unwrap(), "127.0.0.1:5000/busybox:test");
        assert_eq!(normalize("localhost/x").unwrap(), "localhost/x:latest");
        assert_eq!(normalize("quay.io/a/b/c:1.0").unwrap(), "quay.io/a/b/c:1.0");
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(normalize(&format!("busybox@{d}")).unwrap(), format!("docker.io/library/busybox@{d}"));
    }

    #[test]
    fn rejects_garbage() {
        assert!(normalize("").is_err());
        assert!(normalize("Busybox").is_err());
        assert!(normalize("busybox:").is_err());
        assert!(normalize("busybox@sha256:xyz").is_err());
        assert!(normalize("a//b").is_err());
    }

    #[test]
    fn registry_endpoints() {
        let r = Reference::parse("busybox").unwrap();
        assert_eq!(r.registry_host(), "registry-1.docker.io");
        assert!(!r.is_loopback());
        let r = Reference::parse("127.0.0.1:5000/busybox:test").unwrap();
        assert!(r.is_loopback());
        assert_eq!(r.object(), "test");
    }
}
