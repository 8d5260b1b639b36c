//! The containerd runtime against a real containerd and runc.
//!
//! Each test starts its own containerd under a temp dir (killed by PID at
//! the end; tasks are killed and removed first, also when a test fails),
//! imports a busybox image it builds itself, and is bounded in time. They
//! need root, containerd, runc and /bin/busybox (Debian's busybox-static);
//! without them they print why and pass.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use capstan_node::containerd::{Containerd, LogDriver, PodNetwork, PodNetworkSetup};
use capstan_node::runtime::*;
use capstan_node::testregistry::{LoopbackRegistry, PASSWORD, USER};
use futures::future::BoxFuture;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

const IMAGE: &str = "busybox:1";
const IMAGE_NAME: &str = "docker.io/library/busybox:1";
const APPLETS: &[&str] = &[
    "sh", "echo", "sleep", "cat", "httpd", "head", "tail", "id", "ls", "true", "false", "tr", "wc", "env", "hostname",
];

fn sha256(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

fn append(b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8], mode: u32) {
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(mode);
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::Regular);
    b.append_data(&mut h, path, data).unwrap();
}

fn append_dir(b: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32) {
    let mut h = tar::Header::new_gnu();
    h.set_size(0);
    h.set_mode(mode);
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::Directory);
    b.append_data(&mut h, path, &[][..]).unwrap();
}

/// The busybox root filesystem as an uncompressed layer tar.
fn busybox_layer() -> Vec<u8> {
    let busybox = std::fs::read("/bin/busybox").expect("/bin/busybox (busybox-static)");
    let mut layer = tar::Builder::new(Vec::new());
    for d in ["bin", "etc", "tmp", "proc", "sys", "dev", "root", "var", "var/www"] {
        append_dir(&mut layer, d, if d == "tmp" { 0o1777 } else { 0o755 });
    }
    append(&mut layer, "bin/busybox", &busybox, 0o755);
    for a in APPLETS {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        h.set_mode(0o777);
        h.set_mtime(0);
        layer.append_link(&mut h, format!("bin/{a}"), "busybox").unwrap();
    }
    append(&mut layer, "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nwww:x:33:34:www:/var/www:/bin/sh\n", 0o644);
    append(&mut layer, "etc/group", b"root:x:0:\nwww:x:34:\n", 0o644);
    layer.into_inner().unwrap()
}

/// A minimal busybox OCI image-layout archive (until testimage.rs lands).
fn build_busybox_archive(path: &Path, ref_name: &str, user: &str) {
    let layer = busybox_layer();
    let layer_digest = sha256(&layer);
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/bin", "FROM_IMAGE=yes"], "Cmd": ["sh"], "User": user},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    });
    let config = serde_json::to_vec(&config).unwrap();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256(&config), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer.len()}],
    });
    let manifest = serde_json::to_vec(&manifest).unwrap();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": sha256(&manifest),
                       "size": manifest.len(), "annotations": {"org.opencontainers.image.ref.name": ref_name}}],
    });
    let mut ar = tar::Builder::new(Vec::new());
    append(&mut ar, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#, 0o644);
    append(&mut ar, "index.json", &serde_json::to_vec(&index).unwrap(), 0o644);
    for blob in [&layer, &config, &manifest] {
        let d = sha256(blob);
        append(&mut ar, &format!("blobs/sha256/{}", d.trim_start_matches("sha256:")), blob, 0o644);
    }
    std::fs::File::create(path).unwrap().write_all(&ar.into_inner().unwrap()).unwrap();
}

fn runnable() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let have = |b: &str| {
        std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {b}"))
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !root || !have("containerd") || !have("runc") || !Path::new("/bin/busybox").exists() {
        eprintln!("skipping: needs root, containerd, runc and /bin/busybox");
        return false;
    }
    true
}

/// One test's containerd and its cleanup.
struct Env {
    dir: tempfile::TempDir,
    rt: Arc<Containerd>,
    archive: PathBuf,
}

impl Env {
    async fn new() -> Env {
        Env::new_with(|_, rt| rt).await
    }

    /// `f` configures the runtime (it gets the test's temp dir).
    async fn new_with(f: impl FnOnce(&Path, Containerd) -> Containerd) -> Env {
        let dir = tempfile::Builder::new().prefix("cd").tempdir_in("/tmp").unwrap();
        let rt = Containerd::start_own(dir.path()).await.expect("start containerd");
        let rt = f(dir.path(), rt);
        let archive = dir.path().join("busybox.tar");
        build_busybox_archive(&archive, IMAGE, "");
        let names = rt.import_archive(&archive).await.expect("import");
        assert_eq!(names, [IMAGE_NAME]);
        let env = Env { dir, rt: Arc::new(rt), archive };
        // The import's lease is gone: what the image needs must survive a
        // garbage collection on its labels alone.
        env.force_gc();
        let snaps = env.ctr("snapshots ls");
        assert!(snaps.contains("Committed"), "the unpacked layer survives GC: {snaps}");
        env
    }

    /// Runs containerd's garbage collector now (a synchronous lease delete).
    fn force_gc(&self) {
        let id = self.ctr("leases create").trim().to_string();
        assert!(!id.is_empty(), "ctr leases create");
        self.ctr(&format!("leases delete --sync {id}"));
    }

    fn socket(&self) -> PathBuf {
        self.rt.socket().to_path_buf()
    }

    fn ctr(&self, args: &str) -> String {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("ctr --address {} -n capstan {args}", self.socket().display()))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    async fn host_sandbox(&self) -> Sandbox {
        self.rt
            .run_sandbox(&SandboxConfig {
                pod_uid: "pod-uid-1".into(),
                namespace: "default".into(),
                name: "p".into(),
                hostname: "p".into(),
                port_mappings: vec![],
                host_network: true,
                resolv_conf: None,
                domain: None,
            })
            .await
            .unwrap()
    }

    fn config(&self, name: &str, command: &[&str]) -> ContainerConfig {
        ContainerConfig {
            pod_uid: "pod-uid-1".into(),
            namespace: "default".into(),
            pod_name: "p".into(),
            name: name.into(),
            attempt: 0,
            image: IMAGE_NAME.into(),
            command: command.iter().map(|s| s.to_string()).collect(),
            args: vec![],
            env: vec![("FROM_POD".into(), "yes".into())],
            working_dir: None,
            mounts: vec![],
            cpu_limit_millis: None,
            cpu_request_millis: None,
            memory_limit_bytes: None,
            security: Security::default(),
            tty: false,
            stdin: false,
            share_pid_with: None,
            log_path: self.dir.path().join(format!("logs/{name}/0.log")),
            labels: BTreeMap::from([("app".to_string(), "test".to_string())]),
        }
    }

    async fn status(&self, id: &str) -> ContainerStatus {
        self.rt.list_containers().await.unwrap().into_iter().find(|c| c.id == id).expect("listed")
    }

    async fn wait_exited(&self, id: &str) -> (i32, bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let ContainerState::Exited { exit_code, oom_killed, .. } = self.status(id).await.state {
                return (exit_code, oom_killed);
            }
            assert!(Instant::now() < deadline, "container {id} did not exit");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn wait_running(&self, id: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !matches!(self.status(id).await.state, ContainerState::Running { .. }) {
            assert!(Instant::now() < deadline, "container {id} is not running");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Removes every container and sandbox through the runtime, then
    /// checks containerd holds nothing of them.
    async fn cleanup(&self) {
        for c in self.rt.list_containers().await.unwrap() {
            self.rt.remove_container(&c.id).await.unwrap();
            self.rt.remove_container(&c.id).await.expect("remove is idempotent");
        }
        for s in self.rt.list_sandboxes().await.unwrap() {
            self.rt.remove_sandbox(&s.id).await.unwrap();
        }
        assert!(self.rt.list_containers().await.unwrap().is_empty());
        assert!(self.rt.list_sandboxes().await.unwrap().is_empty());
        assert_eq!(self.ctr("tasks ls -q").trim(), "");
        assert_eq!(self.ctr("containers ls -q").trim(), "");
        // Only the image's committed layer remains, no active rootfs.
        let snaps = self.ctr("snapshots ls");
        assert!(!snaps.contains("Active"), "{snaps}");
        self.rt.shutdown().await;
    }
}

impl Drop for Env {
    /// A failed test must not leave containers running: kill and delete
    /// every task through ctr before containerd goes (by PID, in Daemon's drop).
    fn drop(&mut self) {
        let sock = self.socket();
        if let Some(pid) = self.rt.daemon().map(|d| d.pid()).filter(|p| *p != 0) {
            let script = format!(
                "for t in $(ctr --address {s} -n capstan tasks ls -q); do ctr --address {s} -n capstan tasks kill -a -s SIGKILL $t; sleep 0.2; ctr --address {s} -n capstan tasks rm -f $t; done",
                s = sock.display()
            );
            let _ = std::process::Command::new("sh").arg("-c").arg(script).status();
            let _ = pid;
        }
    }
}

async fn bounded<F: std::future::Future<Output = ()>>(f: F) {
    tokio::time::timeout(Duration::from_secs(120), f).await.expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_and_ensure_image() {
    if !runnable() {
        return;
    }
    bounded(async {
        let env = Env::new().await;
        // Importing again changes nothing.
        assert_eq!(env.rt.import_archive(&env.archive).await.unwrap(), [IMAGE_NAME]);
        let (name, id) = env.rt.ensure_image(IMAGE, PullPolicy::IfNotPresent, &[]).await.unwrap();
        assert_eq!(name, IMAGE_NAME);
        assert!(id.starts_with("sha256:"), "{id}");
        let (_, id2) = env.rt.ensure_image(IMAGE_NAME, PullPolicy::Never, &[]).await.unwrap();
        assert_eq!(id, id2);
        match env.rt.ensure_image("nothere:1", PullPolicy::Never, &[]).await {
            Err(RuntimeError::Image { reason, .. }) => assert!(reason.contains("ErrImageNeverPull"), "{reason}"),
            other => panic!("{other:?}"),
        }
        // Nothing listens on port 1: a clear pull error.
        match env.rt.ensure_image("127.0.0.1:1/nope:1", PullPolicy::IfNotPresent, &[]).await {
            Err(RuntimeError::Image { image, reason }) => {
                assert_eq!(image, "127.0.0.1:1/nope:1");
                assert!(reason.contains("127.0.0.1:1"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        match env.rt.ensure_image("Bad Name", PullPolicy::IfNotPresent, &[]).await {
            Err(RuntimeError::Image { reason, .. }) => assert!(reason.contains("InvalidImageName"), "{reason}"),
            other => panic!("{other:?}"),
        }
        // A container from an image that is not there.
        let sb = env.host_sandbox().await;
        let mut cfg = env.config("c", &["true"]);
        cfg.image = "docker.io/library/missing:1".into();
        assert!(matches!(env.rt.start_container(&sb, &cfg).await, Err(RuntimeError::Image { .. })));
        env.cleanup().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_exits_zero_and_output_is_logged() {
    if !runnable() {
        return;
    }
    bounded(async {
        let env = Env::new().await;
        let sb = env.host_sandbox().await;
        let cfg = env.config("echo", &["sh", "-c", "echo hello $FROM_IMAGE $FROM_POD; echo oops >&2; id -u"]);
        let id = env.rt.start_container(&sb, &cfg).await.unwrap();
        assert_eq!(env.wait_exited(&id).await, (0, false));
        let st = env.status(&id).await;
        assert_eq!((st.name.as_str(), st.pod_uid.as_str(), st.attempt), ("echo", "pod-uid-1", 0));
        assert_eq!(st.image, IMAGE_NAME);
        assert!(st.image_id.starts_with("sha256:"));
        assert_eq!(st.labels.get("app").map(String::as_str), Some("test"));
        assert_eq!(st.labels.get(LABEL_CONTAINER_NAME).map(String::as_str), Some("echo"));
        let ContainerState::Exited { started_at, finished_at, .. } = st.state else { unreachable!() };
        assert!(started_at.is_some_and(|s| s <= finished_at));
        // The shim's file:// logging (this test's driver) copies the pipes
        // on its own and may finish a moment after the exit is reported.
        let complete = |log: &str| {
            log.contains("hello yes yes") && log.contains("oops") && (log.contains("\n0\n") || log.ends_with("0\n"))
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut log = std::fs::read_to_string(&cfg.log_path).unwrap();
        while !complete(&log) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
            log = std::fs::read_to_string(&cfg.log_path).unwrap();
        }
        assert!(complete(&log), "{log}");
        env.cleanup().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_and_missing_commands() {
    if !runnable() {
        return;
    }
    bounded(async {
        let env = Env::new().await;
        let sb = env.host_sandbox().await;
        let id = env.rt.start_container(&sb, &env.config("fail", &["sh", "-c", "exit 3"])).await.unwrap();
        assert_eq!(env.wait_exited(&id).await, (3, false));
        match env.rt.start_container(&sb, &env.config("missing", &["/no/such/binary"])).await {
            Err(RuntimeError::Container(m)) => assert!(m.contains("/no/such/binary"), "{m}"),
            other => panic!("{other:?}"),
        }
        env.force_gc();
        // The failed one left nothing behind.
        assert_eq!(env.rt.list_containers().await.unwrap().len(), 1);
        env.cleanup().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_with_grace() {
    if !runnable() {
        return;
    }
    bounded(async {
        let env = Env::new().await;
        let sb = env.host_sandbox().await;
        // Handles SIGTERM: exits 0 within the grace period.
        let polite = env
            .rt
            .start_container(
                &sb,
                &env.config("polite", &["sh", "-c", "trap 'exit 0' TERM; while :; do sleep 0.1; done"]),
            )
            .await
            .unwrap();
        // PID 1 without a handler ignores SIGTERM: killed after the grace.
        let stubborn = env.rt.start_container(&sb, &env.config("stubborn", &["sleep", "1000"])).await.unwrap();
        env.wait_running(&polite).await;
        env.wait_running(&stubborn).await;
        let t = Instant::now();
        env.rt.stop_container(&polite, Duration::from_secs(10)).await.unwrap();
        assert!(t.elapsed() < Duration::from_secs(5));
        assert_eq!(env.wait_exited(&polite).await, (0, false));
        let t = Instant::now();
        env.rt.stop_container(&stubborn, Duration::from_secs(1)).await.unwrap();
        assert!(t.elapsed() >= Duration::from_secs(1));
        assert_eq!(env.wait_exited(&stubborn).await, (137, false));
        // Stopping a stopped container is fine.
        env.rt.stop_container(&stubborn, Duration::from_secs(1)).await.unwrap();
        env.cleanup().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_limit_breach_is_oom_killed() {
    if !runnable() {
        return;
    }
    bounded(async {
        let env = Env::new().await;
        let sb = env.host_sandbox().await;
        let mut cfg = env.config("hog", &["sh", "-c", "head -c 200000000 /dev/zero | tail"]);
        cfg.memory_limit_bytes = Some(16 << 20);
        let id = env.rt.start_container(&sb, &cfg).await.unwrap();
        let (code, oom) = env.wait_exited(&id).await;
        assert!(oom, "exit {code}, not OOM-killed");
        assert_ne!(code, 0);
        env.cleanup().await;
    })
    .await;
}

async fn run_exec(rt: &Containerd, id: &str, cmd: &[&str], tty: bool, stdin: Option<&[u8]>) -> (i32, String, String) {
    let (out_tx, mut out_rx) = mpsc::channel(64);
    let (err_tx, mut err_rx) = mpsc::channel(64);
    let stdin_rx = stdin.map(|data| {
        let (tx, rx) = mpsc::channel(4);
        let data = Bytes::copy_from_slice(data);
        tokio::spawn(async move {
            let _ = tx.send(data).await;
        });
        rx
    });
    let (_resize_tx, resize_rx) = mpsc::channel(1);
    let io = ExecIo { stdin: stdin_rx, stdout: out_tx, stderr: err_tx, resize: tty.then_some(resize_rx) };
    let cmd: Vec<String> = cmd.iter().map(|s| s.to_string()).collect();
    let code = rt.exec(id, &cmd, tty, io).await.unwrap();
    let mut out = Vec::new();
    while let Ok(b) = out_rx.try_recv() {
        out.extend_from_slice(&b);
    }
    let mut err = Vec::new();
    while let Ok(b) = err_rx.try_recv() {
        err.extend_from_slice(&b);
    }
    (code, String::from_utf8_lossy(&out).to_string(), String::from_utf8_lossy(&err).to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_output_exit_code_stdin_tty_and_usage() {
    if !runnable() {
        return;
    }
    bounded(async {
        let env = Env::new().await;
        let sb = env.host_sandbox().await;
        let mut cfg = env.config("sleeper", &["sleep", "1000"]);
        cfg.working_dir = Some("/tmp".into());
        cfg.memory_limit_bytes = Some(64 << 20);
        let id = env.rt.start_container(&sb, &cfg).await.unwrap();
        env.wait_running(&id).await;
        let (code, out, err) =
            run_exec(&env.rt, &id, &["sh", "-c", "echo out $FROM_POD; pwd; echo err >&2; exit 7"], false, None).await;
        assert_eq!((code, out.as_str(), err.as_str()), (7, "out yes\n/tmp\n", "err\n"));
        let (code, out, _) = run_exec(&env.rt, &id, &["cat"], false, Some(b"from stdin")).await;
        assert_eq!((code, out.as_str()), (0, "from stdin"));
        let (code, out, _) = run_exec(&env.rt, &id, &["sh", "-c", "echo on a tty; exit 2"], true, None).await;
        assert_eq!(code, 2);
        assert!(out.contains("on a tty"), "{out:?}");
        // A command that does not exist in the container.
        let (tx, _rx) = mpsc::channel(1);
        let (etx, _erx) = mpsc::channel(1);
        let io = ExecIo { stdin: None, stdout: tx, stderr: etx, resize: None };
        match env.rt.exec(&id, &["/no/such".to_string()], false, io).await {
            Err(RuntimeError::Container(m)) => assert!(m.contains("/no/such"), "{m}"),
            Ok(code) => assert_ne!(code, 0),
            Err(e) => panic!("{e:?}"),
        }
        let u = env.rt.usage(&id).await.unwrap();
        assert!(u.cpu_usage_nanos > 0, "{u:?}");
        assert!(u.memory_working_set_bytes > 0, "{u:?}");
        assert!(matches!(env.rt.usage("nope").await, Err(RuntimeError::NotFound(_))));
        env.cleanup().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_instance_adopts_running_containers() {
    if !runnable() {
        return;
    }
    bounded(async {
        let env = Env::new().await;
        let sb = env.host_sandbox().await;
        let id = env.rt.start_container(&sb, &env.config("long", &["sleep", "1000"])).await.unwrap();
        env.wait_running(&id).await;
        let other = Containerd::connect(&env.socket(), env.dir.path()).await.unwrap();
        let listed = other.list_containers().await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].id, id);
        assert!(matches!(listed[0].state, ContainerState::Running { .. }));
        assert_eq!(listed[0].labels.get(LABEL_POD_UID).map(String::as_str), Some("pod-uid-1"));
        assert_eq!(other.list_sandboxes().await.unwrap(), vec![sb.clone()]);

        // containerd dies: the supervisor restarts it and the container
        // (in its shim) is still running.
        let d = env.rt.daemon().unwrap();
        let old = d.pid();
        // SAFETY: kill(2) on the containerd this test started.
        unsafe { libc::kill(old as i32, libc::SIGKILL) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if d.pid() != old {
                if let Ok(l) = env.rt.list_containers().await {
                    if matches!(l.first().map(|c| &c.state), Some(ContainerState::Running { .. })) {
                        break;
                    }
                }
            }
            assert!(Instant::now() < deadline, "containerd was not restarted");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        env.cleanup().await;
    })
    .await;
}

/// A network namespace made with `ip netns add`, no CNI: enough to prove
/// the container joins the sandbox's namespace.
struct NetnsOnly;

impl PodNetwork for NetnsOnly {
    fn setup<'a>(
        &'a self,
        id: &'a str,
        _cfg: &'a SandboxConfig,
    ) -> BoxFuture<'a, Result<PodNetworkSetup, RuntimeError>> {
        Box::pin(async move {
            let name = format!("capstan-test-{}", &id[..12]);
            let ok = std::process::Command::new("ip").args(["netns", "add", &name]).status().is_ok_and(|s| s.success());
            if !ok {
                return Err(RuntimeError::Network("ip netns add failed".into()));
            }
            Ok(PodNetworkSetup {
                netns: PathBuf::from(format!("/var/run/netns/{name}")),
                ip: IpAddr::from([127, 0, 0, 1]),
            })
        })
    }

    fn teardown<'a>(
        &'a self,
        id: &'a str,
        _netns: &'a Path,
        _cfg: &'a SandboxConfig,
    ) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(async move {
            let name = format!("capstan-test-{}", &id[..12]);
            let _ = std::process::Command::new("ip").args(["netns", "delete", &name]).status();
            Ok(())
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_network_namespace_and_etc_files() {
    if !runnable() {
        return;
    }
    bounded(async {
        let env = Env::new_with(|_, rt| rt.with_network(Arc::new(NetnsOnly))).await;
        let sb = env
            .rt
            .run_sandbox(&SandboxConfig {
                pod_uid: "pod-uid-2".into(),
                namespace: "default".into(),
                name: "web".into(),
                hostname: "web-0".into(),
                port_mappings: vec![],
                host_network: false,
                resolv_conf: Some("search d.svc.cluster.local\nnameserver 10.96.0.10\n".into()),
                domain: Some("web.default.svc.cluster.local".into()),
            })
            .await
            .unwrap();
        let netns = sb.netns.clone().unwrap();
        assert!(netns.exists());
        let cfg = env
            .config("net", &["sh", "-c", "ls /sys/class/net; hostname; cat /etc/hostname /etc/hosts /etc/resolv.conf"]);
        let id = env.rt.start_container(&sb, &cfg).await.unwrap();
        assert_eq!(env.wait_exited(&id).await, (0, false));
        let log = std::fs::read_to_string(&cfg.log_path).unwrap();
        // Only loopback in a fresh namespace; the pod's hostname everywhere.
        assert_eq!(log.lines().next(), Some("lo"), "{log}");
        assert!(log.matches("web-0").count() >= 3, "{log}");
        assert!(log.contains("\tweb-0.web.default.svc.cluster.local\tweb-0\n"), "the pod's FQDN: {log}");
        // The resolv.conf it was given, not the node's.
        assert!(log.ends_with("search d.svc.cluster.local\nnameserver 10.96.0.10\n"), "{log}");
        env.rt.remove_container(&id).await.unwrap();
        env.rt.remove_sandbox(&sb.id).await.unwrap();
        assert!(!netns.exists());
        env.cleanup().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_log_driver_and_named_image_user() {
    if !runnable() {
        return;
    }
    bounded(async {
        // The real log driver (`capstan-node log-driver`), run by the shim.
        let env = Env::new_with(|_dir, rt| {
            rt.with_log_driver(LogDriver::Binary(PathBuf::from(env!("CARGO_BIN_EXE_capstan-node"))))
        })
        .await;
        // An image whose config names its user.
        let archive = env.dir.path().join("named.tar");
        build_busybox_archive(&archive, "named-user:1", "www");
        env.rt.import_archive(&archive).await.unwrap();
        let sb = env.host_sandbox().await;
        let mut cfg = env.config("logged", &["sh", "-c", "echo to-out; echo to-err >&2; id -u; id -g"]);
        cfg.image = "named-user:1".into();
        let id = env.rt.start_container(&sb, &cfg).await.unwrap();
        assert_eq!(env.wait_exited(&id).await, (0, false));
        // CRI format: "<time> <stream> F <line>", stdout and stderr interleaved.
        let deadline = Instant::now() + Duration::from_secs(10);
        let read = || std::fs::read_to_string(&cfg.log_path).unwrap_or_default();
        while !read().contains(" stdout F 34") {
            assert!(Instant::now() < deadline, "log driver output: {:?}", read());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let lines: Vec<String> = read().lines().map(|l| l.split_once(' ').map_or("", |x| x.1).to_string()).collect();
        for want in ["stdout F to-out", "stderr F to-err", "stdout F 33", "stdout F 34"] {
            assert!(lines.iter().any(|l| l == want), "{want:?} in {lines:?}");
        }
        let opts = capstan_node::podlogs::ReadOptions::default();
        let text = capstan_node::podlogs::read_logs(&[cfg.log_path.clone()], &opts).unwrap();
        assert!(String::from_utf8_lossy(&text).contains("to-out\n"), "kubectl logs sees the lines");
        env.cleanup().await;
    })
    .await;
}

fn have_registry_tools() -> bool {
    let ok = Path::new("/usr/bin/docker-registry").exists() && Path::new("/usr/bin/skopeo").exists();
    if !ok {
        eprintln!("skipping: needs docker-registry and skopeo");
    }
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_with_basic_auth() {
    if !runnable() || !have_registry_tools() {
        return;
    }
    bounded(async {
        let env = Env::new().await;
        let registry = LoopbackRegistry::start(env.dir.path(), true).unwrap();
        let image = registry.push(&env.archive, "private/busybox:1", true).unwrap();
        match env.rt.ensure_image(&image, PullPolicy::IfNotPresent, &[]).await {
            Err(RuntimeError::Image { reason, .. }) => assert!(reason.contains("credentials"), "{reason}"),
            other => panic!("{other:?}"),
        }
        let wrong = [RegistryAuth { registry: registry.host(), username: USER.into(), password: "nope".into() }];
        match env.rt.ensure_image(&image, PullPolicy::IfNotPresent, &wrong).await {
            Err(RuntimeError::Image { reason, .. }) => assert!(reason.contains("rejected"), "{reason}"),
            other => panic!("{other:?}"),
        }
        let auth = [RegistryAuth { registry: registry.host(), username: USER.into(), password: PASSWORD.into() }];
        let (name, id) = env.rt.ensure_image(&image, PullPolicy::IfNotPresent, &auth).await.unwrap();
        assert_eq!(name, image);
        assert!(id.starts_with("sha256:"));
        env.cleanup().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_from_a_loopback_registry() {
    if !runnable() {
        return;
    }
    if !have_registry_tools() {
        return;
    }
    bounded(async {
        let env = Env::new().await;
        let registry = LoopbackRegistry::start(env.dir.path(), false).unwrap();
        let image = registry.push(&env.archive, "tools/busybox:test", false).unwrap();

        let (name, id) = env.rt.ensure_image(&image, PullPolicy::Always, &[]).await.unwrap();
        assert_eq!(name, image);
        let (_, local_id) = env.rt.ensure_image(IMAGE, PullPolicy::Never, &[]).await.unwrap();
        assert_eq!(id, local_id, "same config as the archive's image");
        match env.rt.ensure_image(&format!("{}/tools/absent:1", registry.host()), PullPolicy::IfNotPresent, &[]).await {
            Err(RuntimeError::Image { reason, .. }) => assert!(reason.contains("not found"), "{reason}"),
            other => panic!("{other:?}"),
        }
        // The pulled image runs.
        let sb = env.host_sandbox().await;
        let mut cfg = env.config("pulled", &["echo", "pulled ok"]);
        cfg.image = image.clone();
        let id = env.rt.start_container(&sb, &cfg).await.unwrap();
        assert_eq!(env.wait_exited(&id).await, (0, false));
        assert!(std::fs::read_to_string(&cfg.log_path).unwrap().contains("pulled ok"));
        env.cleanup().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_directory_is_watched() {
    if !runnable() {
        return;
    }
    bounded(async {
        let env = Env::new().await;
        let images = env.dir.path().join("images");
        std::fs::create_dir_all(&images).unwrap();
        build_busybox_archive(&images.join("first.tar"), "example.com/first:1", "");
        let watcher = env.rt.watch_image_dir(images.clone());
        let wait_for = |name: &'static str| {
            let rt = env.rt.clone();
            async move {
                let deadline = Instant::now() + Duration::from_secs(30);
                while rt.ensure_image(name, PullPolicy::Never, &[]).await.is_err() {
                    assert!(Instant::now() < deadline, "{name} was not imported");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        wait_for("example.com/first:1").await;
        // Written later, under a temporary name, then renamed in.
        build_busybox_archive(&images.join("second.part"), "example.com/second:1", "");
        std::fs::rename(images.join("second.part"), images.join("second.tar")).unwrap();
        wait_for("example.com/second:1").await;
        watcher.abort();
        env.cleanup().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_archive_import() {
    if !runnable() {
        return;
    }
    bounded(async {
        let env = Env::new().await;
        // `docker save` layout: manifest.json, a config file, a layer tar
        // (written gzip-compressed here) and a second tag for the same image.
        let layer = busybox_layer();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&layer).unwrap();
        let gz = gz.finish().unwrap();
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "config": {"Env": ["PATH=/bin"], "Entrypoint": ["echo"], "Cmd": ["from", "docker"]},
            "rootfs": {"type": "layers", "diff_ids": [sha256(&layer)]},
        }))
        .unwrap();
        let manifest = serde_json::json!([{
            "Config": "abc.json", "RepoTags": ["dockerbox:2", "example.com/team/dockerbox:2"], "Layers": ["l1/layer.tar"],
        }]);
        let mut ar = tar::Builder::new(Vec::new());
        append(&mut ar, "manifest.json", &serde_json::to_vec(&manifest).unwrap(), 0o644);
        append(&mut ar, "abc.json", &config, 0o644);
        append(&mut ar, "l1/layer.tar", &gz, 0o644);
        let path = env.dir.path().join("docker.tar");
        std::fs::write(&path, ar.into_inner().unwrap()).unwrap();
        let names = env.rt.import_archive(&path).await.unwrap();
        assert_eq!(names, ["docker.io/library/dockerbox:2", "example.com/team/dockerbox:2"]);
        let sb = env.host_sandbox().await;
        let mut cfg = env.config("docker", &[]);
        cfg.image = "dockerbox:2".into();
        let id = env.rt.start_container(&sb, &cfg).await.unwrap();
        assert_eq!(env.wait_exited(&id).await, (0, false));
        assert!(std::fs::read_to_string(&cfg.log_path).unwrap().contains("from docker"));
        env.cleanup().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_agent_replaces_a_containerd_left_running() {
    if !runnable() {
        return;
    }
    bounded(async {
        let env = Env::new().await;
        let sb = env.host_sandbox().await;
        let id = env.rt.start_container(&sb, &env.config("survivor", &["sleep", "1000"])).await.unwrap();
        env.wait_running(&id).await;
        // The agent dies without stopping its containerd.
        let d = env.rt.daemon().unwrap();
        let old = d.pid();
        d.disown();
        let next = Containerd::start_own(env.dir.path()).await.unwrap();
        let new = next.daemon().unwrap().pid();
        assert_ne!(new, old);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Path::new(&format!("/proc/{old}/cmdline")).exists()
            && !std::fs::read_to_string(format!("/proc/{old}/stat")).unwrap_or_default().contains(") Z")
        {
            assert!(Instant::now() < deadline, "the old containerd is still running");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The container lived through it, in its shim.
        let listed = next.list_containers().await.unwrap();
        assert_eq!(listed.len(), 1);
        assert!(matches!(listed[0].state, ContainerState::Running { .. }), "{:?}", listed[0].state);
        assert_eq!(next.list_sandboxes().await.unwrap(), vec![sb]);
        env.cleanup().await;
        next.shutdown().await;
    })
    .await;
}
