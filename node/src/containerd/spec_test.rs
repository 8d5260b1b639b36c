use std::collections::BTreeMap;
use std::path::PathBuf;

use super::*;
use crate::runtime::{Mount, Security};

fn cfg() -> ContainerConfig {
    ContainerConfig {
        pod_uid: "pod-1".into(),
        namespace: "default".into(),
        pod_name: "p".into(),
        name: "c".into(),
        attempt: 0,
        image: "docker.io/library/busybox:1".into(),
        command: vec![],
        args: vec![],
        env: vec![],
        working_dir: None,
        mounts: vec![],
        cpu_limit_millis: None,
        cpu_request_millis: None,
        memory_limit_bytes: None,
        security: Security::default(),
        tty: false,
        stdin: false,
        share_pid_with: None,
        log_path: PathBuf::from("/var/log/pods/x/c/0.log"),
        labels: BTreeMap::new(),
    }
}

fn image() -> ImageConfig {
    ImageConfig {
        entrypoint: vec!["/entry".into()],
        cmd: vec!["serve".into(), "--port=80".into()],
        env: vec!["PATH=/bin".into(), "A=image".into(), "B=image".into()],
        working_dir: "/srv".into(),
        user: String::new(),
    }
}

fn sandbox() -> SandboxSpec {
    SandboxSpec {
        netns: Some(PathBuf::from("/run/netns/sb1")),
        host_network: false,
        hostname: "web-0".into(),
        etc_hosts: Some(PathBuf::from("/data/sb1/hosts")),
        resolv_conf: Some(PathBuf::from("/data/sb1/resolv.conf")),
        etc_hostname: Some(PathBuf::from("/data/sb1/hostname")),
    }
}

fn build(c: &ContainerConfig, i: &ImageConfig, s: &SandboxSpec) -> Result<Value, String> {
    build_spec(&SpecInput {
        cfg: c,
        image: i,
        passwd: None,
        group: None,
        sandbox: s,
        cgroups_path: "/capstan/pod-1/abc",
        host: &HostFacts { swap_accounting: true, devices: vec![] },
        pid_namespace: None,
    })
}

#[test]
fn args_follow_kubernetes_rules() {
    let mut c = cfg();
    let i = image();
    assert_eq!(process_args(&c, &i), ["/entry", "serve", "--port=80"]);
    c.args = vec!["other".into()];
    assert_eq!(process_args(&c, &i), ["/entry", "other"]);
    c.command = vec!["/bin/sh".into(), "-c".into()];
    assert_eq!(process_args(&c, &i), ["/bin/sh", "-c", "other"]);
    c.args.clear();
    assert_eq!(process_args(&c, &i), ["/bin/sh", "-c"]);
}

#[test]
fn no_command_is_an_error() {
    let e = build(&cfg(), &ImageConfig::default(), &sandbox()).unwrap_err();
    assert!(e.contains("no command"), "{e}");
}

#[test]
fn env_image_then_container_with_override() {
    let mut c = cfg();
    c.env = vec![("B".into(), "container".into()), ("C".into(), "x=y".into())];
    assert_eq!(process_env(&c, &image()), ["PATH=/bin", "A=image", "B=container", "C=x=y"]);
    let env = process_env(&cfg(), &ImageConfig::default());
    assert!(env[0].starts_with("PATH=/usr/local/sbin"), "{env:?}");
}

#[test]
fn cwd_user_and_groups() {
    let mut c = cfg();
    let mut i = image();
    let s = build(&c, &i, &sandbox()).unwrap();
    assert_eq!(s["process"]["cwd"], "/srv");
    assert_eq!(s["process"]["user"], json!({"uid": 0, "gid": 0}));
    c.working_dir = Some("/work".into());
    i.user = "1000:2000".into();
    let s = build(&c, &i, &sandbox()).unwrap();
    assert_eq!(s["process"]["cwd"], "/work");
    assert_eq!(s["process"]["user"], json!({"uid": 1000, "gid": 2000}));
    c.security.run_as_user = Some(5);
    c.security.run_as_group = Some(6);
    c.security.supplemental_groups = vec![7, 6, 8];
    let s = build(&c, &i, &sandbox()).unwrap();
    assert_eq!(s["process"]["user"], json!({"uid": 5, "gid": 6, "additionalGids": [7, 8]}));
}

#[test]
fn named_users_need_passwd() {
    let c = cfg();
    let passwd = "root:x:0:0::/root:/bin/sh\nwww:x:33:34::/var/www:/bin/false\n";
    let group = "root:x:0:\nstaff:x:50:\n";
    assert_eq!(resolve_user(&c, "www", Some(passwd), Some(group)).unwrap(), (33, 34, vec![]));
    assert_eq!(resolve_user(&c, "www:staff", Some(passwd), Some(group)).unwrap(), (33, 50, vec![]));
    assert_eq!(resolve_user(&c, "33", Some(passwd), None).unwrap(), (33, 34, vec![]));
    assert!(resolve_user(&c, "www", None, None).unwrap_err().contains("could not be read"));
    assert!(resolve_user(&c, "nobody", Some(passwd), None).unwrap_err().contains("not found"));
}

#[test]
fn capabilities_add_drop_all() {
    let mut c = cfg();
    assert_eq!(capabilities(&c).unwrap().len(), DEFAULT_CAPS.len());
    c.security.add_capabilities = vec!["NET_ADMIN".into()];
    c.security.drop_capabilities = vec!["KILL".into(), "CAP_CHOWN".into()];
    let caps = capabilities(&c).unwrap();
    assert!(caps.contains(&"CAP_NET_ADMIN".to_string()));
    assert!(!caps.contains(&"CAP_KILL".to_string()) && !caps.contains(&"CAP_CHOWN".to_string()));
    c.security.drop_capabilities = vec!["ALL".into()];
    assert_eq!(capabilities(&c).unwrap(), ["CAP_NET_ADMIN"]);
    c.security.add_capabilities = vec!["all".into()];
    c.security.drop_capabilities = vec!["SYS_ADMIN".into()];
    assert_eq!(capabilities(&c).unwrap().len(), ALL_CAPS.len() - 1);
    c.security.add_capabilities = vec!["MAKE_COFFEE".into()];
    assert!(capabilities(&c).unwrap_err().contains("MAKE_COFFEE"));
}

#[test]
fn privileged_gets_everything() {
    let mut c = cfg();
    c.security.privileged = true;
    let host = HostFacts {
        swap_accounting: false,
        devices: vec![HostDevice { path: "/dev/fuse".into(), kind: 'c', major: 10, minor: 229, file_mode: 0o666 }],
    };
    let s = build_spec(&SpecInput {
        cfg: &c,
        image: &image(),
        passwd: None,
        group: None,
        sandbox: &sandbox(),
        cgroups_path: "/x",
        host: &host,
        pid_namespace: None,
    })
    .unwrap();
    assert_eq!(s["process"]["capabilities"]["bounding"].as_array().unwrap().len(), ALL_CAPS.len());
    assert!(s["linux"].get("maskedPaths").is_none());
    assert_eq!(s["linux"]["resources"]["devices"], json!([{"allow": true, "access": "rwm"}]));
    assert_eq!(s["linux"]["devices"][0]["path"], "/dev/fuse");
    let sys = s["mounts"].as_array().unwrap().iter().find(|m| m["destination"] == "/sys").unwrap();
    assert!(sys["options"].as_array().unwrap().contains(&json!("rw")));
}

#[test]
fn mounts_namespaces_and_hostname() {
    let mut c = cfg();
    c.mounts = vec![
        Mount { host_path: "/data/vol".into(), container_path: "/data".into(), read_only: true },
        Mount { host_path: "/data/shm".into(), container_path: "/dev/shm".into(), read_only: false },
    ];
    c.security.read_only_root = true;
    let s = build(&c, &image(), &sandbox()).unwrap();
    let mounts = s["mounts"].as_array().unwrap();
    let dests: Vec<&str> = mounts.iter().map(|m| m["destination"].as_str().unwrap()).collect();
    for d in ["/proc", "/dev", "/dev/pts", "/dev/mqueue", "/sys", "/sys/fs/cgroup", "/etc/hosts", "/etc/resolv.conf"] {
        assert!(dests.contains(&d), "{d} in {dests:?}");
    }
    assert_eq!(dests.iter().filter(|d| **d == "/dev/shm").count(), 1, "user mount replaces the default");
    let data = mounts.iter().find(|m| m["destination"] == "/data").unwrap();
    assert_eq!(data["options"], json!(["rbind", "rprivate", "ro"]));
    assert_eq!(s["root"]["readonly"], true);
    assert_eq!(s["hostname"], "web-0");
    let ns = s["linux"]["namespaces"].as_array().unwrap();
    assert!(ns.contains(&json!({"type": "network", "path": "/run/netns/sb1"})));
    assert!(ns.contains(&json!({"type": "uts"})));
    assert!(s["linux"]["maskedPaths"].as_array().unwrap().contains(&json!("/proc/kcore")));
    assert_eq!(s["linux"]["cgroupsPath"], "/capstan/pod-1/abc");

    let host = SandboxSpec { netns: None, host_network: true, ..sandbox() };
    let s = build(&c, &image(), &host).unwrap();
    let ns = s["linux"]["namespaces"].as_array().unwrap();
    assert!(!ns.iter().any(|n| n["type"] == "network" || n["type"] == "uts"));
    assert!(s.get("hostname").is_none());

    let broken = SandboxSpec { netns: None, ..sandbox() };
    assert!(build(&c, &image(), &broken).is_err());
}

#[test]
fn resources_from_millicores_and_bytes() {
    let mut c = cfg();
    let s = build(&c, &image(), &sandbox()).unwrap();
    assert_eq!(s["linux"]["resources"]["cpu"], json!({"shares": 2}));
    assert!(s["linux"]["resources"].get("memory").is_none());
    c.cpu_request_millis = Some(250);
    c.cpu_limit_millis = Some(500);
    c.memory_limit_bytes = Some(16 << 20);
    let s = build(&c, &image(), &sandbox()).unwrap();
    assert_eq!(s["linux"]["resources"]["cpu"], json!({"shares": 256, "quota": 50000, "period": 100000}));
    assert_eq!(s["linux"]["resources"]["memory"], json!({"limit": 16 << 20, "swap": 16 << 20}));
    assert_eq!(cpu_quota(1), 1000);
    assert_eq!(cpu_shares(Some(1)), 2);
}

#[test]
fn exec_process_inherits_the_container() {
    let s = build(&cfg(), &image(), &sandbox()).unwrap();
    let p = exec_process(&s, &["ls".into()], true).unwrap();
    assert_eq!(p["args"], json!(["ls"]));
    assert_eq!(p["terminal"], true);
    assert_eq!(p["cwd"], "/srv");
    assert!(exec_process(&s, &[], false).is_err());
}

#[test]
fn image_config_tolerates_nulls() {
    let c: ImageConfig = serde_json::from_str(r#"{"Entrypoint":null,"Cmd":["sh"],"Env":null}"#).unwrap();
    assert_eq!(c.cmd, ["sh"]);
    assert!(c.entrypoint.is_empty());
}

#[test]
fn a_debugger_joins_its_target_s_pid_namespace() {
    let (c, i, s) = (cfg(), image(), sandbox());
    let host = HostFacts { swap_accounting: true, devices: vec![] };
    let input = |pid_namespace| SpecInput {
        cfg: &c,
        image: &i,
        passwd: None,
        group: None,
        sandbox: &s,
        cgroups_path: "/x",
        host: &host,
        pid_namespace,
    };
    let pid = |s: &Value| s["linux"]["namespaces"].as_array().unwrap().iter().find(|n| n["type"] == "pid").cloned();
    assert_eq!(pid(&build_spec(&input(None)).unwrap()), Some(json!({"type": "pid"})), "a new one by default");
    let joined = build_spec(&input(Some("/proc/42/ns/pid"))).unwrap();
    assert_eq!(pid(&joined), Some(json!({"type": "pid", "path": "/proc/42/ns/pid"})));
}
