//! The OCI runtime spec of a container, built from its Kubernetes-shaped
//! config, its image's config and its sandbox. Pure: no IO, no clock; what
//! the host must tell (its devices, whether swap is accounted) comes in as
//! arguments, so every rule here is unit-tested without containerd.
//!
//! The defaults follow containerd's CRI plugin (itself Docker's): the
//! default capability set, masked and read-only /proc paths, the standard
//! mounts, a device cgroup that denies everything runc does not add itself.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{json, Value};

use crate::runtime::ContainerConfig;

/// What the runtime uses of an image's config (`config` in the OCI image
/// config JSON).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct ImageConfig {
    #[serde(rename = "Entrypoint", default, deserialize_with = "null_as_default")]
    pub entrypoint: Vec<String>,
    #[serde(rename = "Cmd", default, deserialize_with = "null_as_default")]
    pub cmd: Vec<String>,
    #[serde(rename = "Env", default, deserialize_with = "null_as_default")]
    pub env: Vec<String>,
    #[serde(rename = "WorkingDir", default, deserialize_with = "null_as_default")]
    pub working_dir: String,
    #[serde(rename = "User", default, deserialize_with = "null_as_default")]
    pub user: String,
}

/// Docker writes `null` for absent lists; treat it as empty.
fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// The parts of a sandbox a container's spec needs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SandboxSpec {
    /// Join this network namespace (None: host network if `host_network`).
    pub netns: Option<PathBuf>,
    pub host_network: bool,
    pub hostname: String,
    /// Files the sandbox provides, bind-mounted at /etc/hosts,
    /// /etc/resolv.conf and /etc/hostname.
    pub etc_hosts: Option<PathBuf>,
    pub resolv_conf: Option<PathBuf>,
    pub etc_hostname: Option<PathBuf>,
}

/// A host device handed to privileged containers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostDevice {
    pub path: PathBuf,
    /// 'c' or 'b'.
    pub kind: char,
    pub major: u64,
    pub minor: u64,
    pub file_mode: u32,
}

/// Facts about the host the spec depends on.
#[derive(Clone, Debug, Default)]
pub struct HostFacts {
    /// cgroup v1 memory.memsw is available: the memory limit also caps
    /// swap, so a breach is an OOM kill rather than swapping.
    pub swap_accounting: bool,
    /// Devices given to privileged containers.
    pub devices: Vec<HostDevice>,
}

pub const SPEC_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";
pub const PROCESS_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Process";

/// Docker's (and containerd CRI's) default capabilities.
pub const DEFAULT_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// Every capability Linux knows (through CAP_CHECKPOINT_RESTORE, 40); runc
/// skips ones an older kernel lacks.
pub const ALL_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

const MASKED_PATHS: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
];
const READONLY_PATHS: &[&str] = &["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"];

const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// CFS period; Kubernetes uses 100 ms and never a quota under 1 ms.
const CPU_PERIOD: u64 = 100_000;
const MIN_QUOTA: u64 = 1_000;
/// cpu.shares bounds, as Kubernetes' MilliCPUToShares.
const MIN_SHARES: u64 = 2;
const MAX_SHARES: u64 = 262_144;

/// The process arguments by Kubernetes' rules: `command` replaces the
/// image's entrypoint and then the image's cmd is ignored; `args` alone
/// replace the cmd and keep the entrypoint.
pub fn process_args(cfg: &ContainerConfig, image: &ImageConfig) -> Vec<String> {
    if !cfg.command.is_empty() {
        cfg.command.iter().chain(&cfg.args).cloned().collect()
    } else if !cfg.args.is_empty() {
        image.entrypoint.iter().chain(&cfg.args).cloned().collect()
    } else {
        image.entrypoint.iter().chain(&image.cmd).cloned().collect()
    }
}

/// The image's env, then the container's; a later value replaces an
/// earlier one in place. A PATH is added when neither sets one.
pub fn process_env(cfg: &ContainerConfig, image: &ImageConfig) -> Vec<String> {
    let mut env: Vec<(String, String)> = Vec::new();
    let mut set = |k: &str, v: &str| match env.iter_mut().find(|(ek, _)| ek == k) {
        Some(e) => e.1 = v.to_string(),
        None => env.push((k.to_string(), v.to_string())),
    };
    for kv in &image.env {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        set(k, v);
    }
    for (k, v) in &cfg.env {
        set(k, v);
    }
    if !env.iter().any(|(k, _)| k == "PATH") {
        let (k, v) = DEFAULT_PATH.split_once('=').unwrap_or_default();
        env.insert(0, (k.into(), v.into()));
    }
    env.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
}

/// uid, gid and additional gids. `passwd` / `group` are the image's
/// /etc/passwd and /etc/group when the caller could read them; they are
/// only needed when the image names its user.
pub fn resolve_user(
    cfg: &ContainerConfig,
    image_user: &str,
    passwd: Option<&str>,
    group: Option<&str>,
) -> Result<(u32, u32, Vec<u32>), String> {
    // Lines of /etc/passwd or /etc/group as (name, id, primary gid).
    let entries = |file: Option<&str>| -> Vec<(String, u32, Option<u32>)> {
        file.unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                let id = f.get(2)?.parse().ok()?;
                Some((f[0].to_string(), id, f.get(3).and_then(|g| g.parse().ok())))
            })
            .collect()
    };
    let by_name = |file: Option<&str>, what: &str, name: &str| -> Result<(u32, Option<u32>), String> {
        if file.is_none() {
            return Err(format!("image {what} {name:?} is a name and the image's /etc/{what} could not be read"));
        }
        entries(file)
            .into_iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, id, g)| (id, g))
            .ok_or_else(|| format!("image {what} {name:?} not found in the image's /etc/{what}"))
    };
    // A numeric uid's primary group comes from /etc/passwd when it is there.
    let primary_gid = |uid: u32| entries(passwd).into_iter().find(|(_, id, _)| *id == uid).and_then(|(_, _, g)| g);

    let (uid, mut gid) = if let Some(u) = cfg.security.run_as_user {
        // runAsUser replaces the image's user, group included (containerd's CRI does the same).
        (u, primary_gid(u))
    } else {
        let (user_part, group_part) = match image_user.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (image_user, None),
        };
        let (uid, mut gid) = match user_part {
            "" => (0, None),
            u => match u.parse::<u32>() {
                Ok(u) => (u, primary_gid(u)),
                Err(_) => by_name(passwd, "passwd", u)?,
            },
        };
        if let Some(g) = group_part.filter(|g| !g.is_empty()) {
            gid = Some(match g.parse::<u32>() {
                Ok(g) => g,
                Err(_) => by_name(group, "group", g)?.0,
            });
        }
        (uid, gid)
    };
    if let Some(g) = cfg.security.run_as_group {
        gid = Some(g);
    }
    let gid = gid.unwrap_or(0);
    let mut extra: Vec<u32> = cfg.security.supplemental_groups.clone();
    extra.retain(|g| *g != gid);
    extra.dedup();
    Ok((uid, gid, extra))
}

/// Capability names from Kubernetes (`NET_ADMIN`) to OCI (`CAP_NET_ADMIN`).
fn cap_name(name: &str) -> Result<String, String> {
    let upper = name.trim().to_ascii_uppercase();
    let full = if upper.starts_with("CAP_") { upper } else { format!("CAP_{upper}") };
    if ALL_CAPS.contains(&full.as_str()) {
        Ok(full)
    } else {
        Err(format!("unknown capability {name:?}"))
    }
}

/// The capability set, as containerd's CRI plugin computes it: ALL in add
/// grants everything, ALL in drop starts from nothing, then the named
/// additions and removals.
pub fn capabilities(cfg: &ContainerConfig) -> Result<Vec<String>, String> {
    let s = &cfg.security;
    if s.privileged {
        return Ok(ALL_CAPS.iter().map(|c| c.to_string()).collect());
    }
    let is_all = |c: &String| c.trim().eq_ignore_ascii_case("ALL");
    let mut caps: Vec<String> = if s.add_capabilities.iter().any(is_all) {
        ALL_CAPS.iter().map(|c| c.to_string()).collect()
    } else if s.drop_capabilities.iter().any(is_all) {
        Vec::new()
    } else {
        DEFAULT_CAPS.iter().map(|c| c.to_string()).collect()
    };
    for c in s.add_capabilities.iter().filter(|c| !is_all(c)) {
        let c = cap_name(c)?;
        if !caps.contains(&c) {
            caps.push(c);
        }
    }
    for c in s.drop_capabilities.iter().filter(|c| !is_all(c)) {
        let c = cap_name(c)?;
        caps.retain(|x| *x != c);
    }
    Ok(caps)
}

fn mount(dest: &str, typ: &str, source: &str, options: &[&str]) -> Value {
    json!({"destination": dest, "type": typ, "source": source, "options": options})
}

fn bind(dest: &Path, source: &Path, read_only: bool) -> Value {
    json!({
        "destination": dest,
        "type": "bind",
        "source": source,
        // Kubernetes' default propagation is private.
        "options": ["rbind", "rprivate", if read_only { "ro" } else { "rw" }],
    })
}

/// cpu.shares for a request, as Kubernetes' MilliCPUToShares (no request
/// = the minimum, which is what best-effort pods get).
pub fn cpu_shares(request_millis: Option<u64>) -> u64 {
    match request_millis {
        None | Some(0) => MIN_SHARES,
        Some(m) => (m.saturating_mul(1024) / 1000).clamp(MIN_SHARES, MAX_SHARES),
    }
}

/// CFS quota for a limit, as Kubernetes' MilliCPUToQuota.
pub fn cpu_quota(limit_millis: u64) -> u64 {
    (limit_millis.saturating_mul(CPU_PERIOD) / 1000).max(MIN_QUOTA)
}

/// Everything `build_spec` needs.
pub struct SpecInput<'a> {
    pub cfg: &'a ContainerConfig,
    pub image: &'a ImageConfig,
    /// The image's /etc/passwd and /etc/group, if read (for named users).
    pub passwd: Option<&'a str>,
    pub group: Option<&'a str>,
    pub sandbox: &'a SandboxSpec,
    /// cgroupsPath for runc's cgroupfs driver, e.g. `/capstan/<pod>/<id>`.
    pub cgroups_path: &'a str,
    pub host: &'a HostFacts,
    /// A PID namespace to join (`/proc/<pid>/ns/pid`) instead of a new one.
    pub pid_namespace: Option<&'a str>,
}

/// The OCI runtime spec (JSON) of a container.
pub fn build_spec(input: &SpecInput<'_>) -> Result<Value, String> {
    let cfg = input.cfg;
    let sec = &cfg.security;
    let args = process_args(cfg, input.image);
    if args.is_empty() {
        return Err("no command specified: the container has no command and the image no entrypoint or cmd".into());
    }
    let (uid, gid, additional_gids) = resolve_user(cfg, &input.image.user, input.passwd, input.group)?;
    let caps = capabilities(cfg)?;
    let cwd = cfg
        .working_dir
        .clone()
        .filter(|w| !w.is_empty())
        .or_else(|| Some(input.image.working_dir.clone()).filter(|w| !w.is_empty()))
        .unwrap_or_else(|| "/".to_string());
    if !cwd.starts_with('/') {
        return Err(format!("working directory {cwd:?} is not absolute"));
    }

    let mut user = json!({"uid": uid, "gid": gid});
    if !additional_gids.is_empty() {
        user["additionalGids"] = json!(additional_gids);
    }
    let process = json!({
        "terminal": cfg.tty,
        "user": user,
        "args": args,
        "env": process_env(cfg, input.image),
        "cwd": cwd,
        "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
        "noNewPrivileges": false,
        "oomScoreAdj": 0,
    });

    // Standard mounts; a user mount on the same destination wins.
    let ro_sys = if sec.privileged { "rw" } else { "ro" };
    let mut mounts = vec![
        mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"]),
        mount("/dev", "tmpfs", "tmpfs", &["nosuid", "strictatime", "mode=755", "size=65536k"]),
        mount(
            "/dev/pts",
            "devpts",
            "devpts",
            &["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
        ),
        mount("/dev/shm", "tmpfs", "shm", &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]),
        mount("/dev/mqueue", "mqueue", "mqueue", &["nosuid", "noexec", "nodev"]),
        mount("/sys", "sysfs", "sysfs", &["nosuid", "noexec", "nodev", ro_sys]),
        mount("/sys/fs/cgroup", "cgroup", "cgroup", &["nosuid", "noexec", "nodev", "relatime", ro_sys]),
    ];
    let user_dests: Vec<&Path> = cfg.mounts.iter().map(|m| m.container_path.as_path()).collect();
    mounts.retain(|m| m["destination"].as_str().is_none_or(|d| !user_dests.contains(&Path::new(d))));
    let sb = input.sandbox;
    for (dest, src) in
        [("/etc/hosts", &sb.etc_hosts), ("/etc/resolv.conf", &sb.resolv_conf), ("/etc/hostname", &sb.etc_hostname)]
    {
        if let Some(src) = src {
            if !user_dests.contains(&Path::new(dest)) {
                mounts.push(bind(Path::new(dest), src, false));
            }
        }
    }
    for m in &cfg.mounts {
        if !m.container_path.is_absolute() {
            return Err(format!("mount destination {:?} is not absolute", m.container_path));
        }
        mounts.push(bind(&m.container_path, &m.host_path, m.read_only));
    }

    let pid = match input.pid_namespace {
        Some(path) => json!({"type": "pid", "path": path}),
        None => json!({"type": "pid"}),
    };
    let mut namespaces = vec![pid, json!({"type": "ipc"}), json!({"type": "mount"})];
    if !sb.host_network {
        // Host network pods also keep the node's hostname (UTS), as in Kubernetes.
        namespaces.push(json!({"type": "uts"}));
        match &sb.netns {
            Some(p) => namespaces.push(json!({"type": "network", "path": p})),
            None => return Err("the sandbox has no network namespace and is not host-network".into()),
        }
    }

    let mut resources = json!({
        "devices": [{"allow": sec.privileged, "access": "rwm"}],
        "cpu": {"shares": cpu_shares(cfg.cpu_request_millis)},
    });
    if let Some(l) = cfg.cpu_limit_millis {
        resources["cpu"]["quota"] = json!(cpu_quota(l));
        resources["cpu"]["period"] = json!(CPU_PERIOD);
    }
    if let Some(l) = cfg.memory_limit_bytes {
        resources["memory"] = json!({"limit": l});
        if input.host.swap_accounting {
            resources["memory"]["swap"] = json!(l);
        }
    }

    let mut linux = json!({
        "namespaces": namespaces,
        "resources": resources,
        "cgroupsPath": input.cgroups_path,
    });
    if sec.privileged {
        let devices: Vec<Value> = input
            .host
            .devices
            .iter()
            .map(|d| {
                json!({"path": d.path, "type": d.kind.to_string(), "major": d.major, "minor": d.minor,
                       "fileMode": d.file_mode, "uid": 0, "gid": 0})
            })
            .collect();
        linux["devices"] = json!(devices);
    } else {
        linux["maskedPaths"] = json!(MASKED_PATHS);
        linux["readonlyPaths"] = json!(READONLY_PATHS);
    }

    let mut spec = json!({
        "ociVersion": "1.0.2",
        "process": process,
        "root": {"path": "rootfs", "readonly": sec.read_only_root},
        "mounts": mounts,
        "linux": linux,
    });
    if !sb.host_network && !sb.hostname.is_empty() {
        spec["hostname"] = json!(sb.hostname);
    }
    Ok(spec)
}

/// An exec's process: the container's own (user, env, cwd, capabilities)
/// with other arguments and terminal setting.
pub fn exec_process(container_spec: &Value, args: &[String], tty: bool) -> Result<Value, String> {
    let mut p = container_spec.get("process").cloned().ok_or("the container's spec has no process")?;
    if args.is_empty() {
        return Err("exec: empty command".into());
    }
    p["args"] = json!(args);
    p["terminal"] = json!(tty);
    if let Some(o) = p.as_object_mut() {
        // The console size belongs to the container's own terminal.
        o.remove("consoleSize");
    }
    Ok(p)
}

#[cfg(test)]
#[path = "spec_test.rs"]
mod tests;
