//! A real registry on loopback for tests of image pulls: Debian's
//! `docker-registry` (the CNCF distribution server) serving a directory,
//! optionally behind htpasswd basic auth, with images pushed into it by
//! `skopeo` from OCI archives (see [`crate::testimage`]). The tests that
//! use it need both packages (CI installs them).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// The user [`LoopbackRegistry::start`] creates when asked for auth.
pub const USER: &str = "capstan";
/// Its password (the htpasswd line below is bcrypt("s3cret"), cost 4).
pub const PASSWORD: &str = "s3cret";
const HTPASSWD_HASH: &str = "$2b$04$xiflqB8cmA6ZEr91ADxToO.8NYstyDYukrCLXyO1AKvsL2gLbEzc.";

/// A running registry on 127.0.0.1, killed on drop.
pub struct LoopbackRegistry {
    child: Child,
    pub port: u16,
}

impl LoopbackRegistry {
    /// Serves `dir/registry-<port>` on a free loopback port, with basic
    /// auth for [`USER`]/[`PASSWORD`] when `auth`; ready when it listens.
    pub fn start(dir: &Path, auth: bool) -> anyhow::Result<LoopbackRegistry> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let dir = dir.join(format!("registry-{port}"));
        std::fs::create_dir_all(&dir)?;
        let mut config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.join("data").display()
        );
        if auth {
            std::fs::write(dir.join("htpasswd"), format!("{USER}:{HTPASSWD_HASH}\n"))?;
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: capstan-test\n    path: {}\n",
                dir.join("htpasswd").display()
            ));
        }
        let config_path = dir.join("config.yml");
        std::fs::write(&config_path, config)?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting docker-registry (apt-get install docker-registry)")?;
        let registry = LoopbackRegistry { child, port };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!("docker-registry did not listen on 127.0.0.1:{port}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(registry)
    }

    /// `127.0.0.1:<port>`, the registry part of image references.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Pushes the OCI archive as `<host>/<name>` with skopeo (with the
    /// registry's credentials if it has auth).
    pub fn push(&self, archive: &Path, name: &str, auth: bool) -> anyhow::Result<String> {
        let image = format!("{}/{name}", self.host());
        let mut cmd = Command::new("skopeo");
        cmd.args(["--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false"]);
        if auth {
            cmd.arg(format!("--dest-creds={USER}:{PASSWORD}"));
        }
        let out = cmd
            .arg(format!("oci-archive:{}", archive.display()))
            .arg(format!("docker://{image}"))
            .output()
            .context("running skopeo (apt-get install skopeo)")?;
        if !out.status.success() {
            bail!("skopeo copy to {image}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(image)
    }
}

impl Drop for LoopbackRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
