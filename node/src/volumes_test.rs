use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use super::*;

fn node() -> NodeInfo {
    let mut n = NodeInfo::from_host("n1", "10.0.0.9", "test");
    n.cpu = "4".into();
    n.memory = "8Gi".into();
    n
}

fn pod(volumes: Value) -> Value {
    json!({
        "metadata": {
            "name": "web", "namespace": "ns", "uid": "uid-1",
            "labels": {"app": "web", "tier": "front\"end\n"},
            "annotations": {"a/b": "c"},
        },
        "spec": {
            "containers": [{
                "name": "app", "image": "busybox",
                "resources": {"limits": {"cpu": "500m", "memory": "64Mi"}, "requests": {"cpu": "250m"}},
            }],
            "volumes": volumes,
        }
    })
}

fn cm(data: Value) -> Value {
    json!({"metadata": {"name": "cfg"}, "data": data, "binaryData": {"bin": "AAEC"}})
}

fn secret() -> Value {
    // "hunter2", "t"
    json!({"metadata": {"name": "sec"}, "data": {"password": "aHVudGVyMg==", "token": "dA=="}})
}

fn sources(with_cm: bool) -> Sources {
    let mut s = Sources::new();
    let cfg = SourceRef { kind: SourceKind::ConfigMap, name: "cfg".into() };
    s.insert(cfg, Ok(with_cm.then(|| cm(json!({"a": "1", "b": "2"})))));
    s.insert(SourceRef { kind: SourceKind::Secret, name: "sec".into() }, Ok(Some(secret())));
    let token = SourceRef { kind: SourceKind::Token, name: token_source_name(&json!({"expirationSeconds": 3600})) };
    s.insert(token, Ok(Some(json!({"token": "jwt-for-the-pod"}))));
    s
}

fn plan(volume: Value, sources: &Sources) -> Result<VolumePlan, VolumeError> {
    let p = pod(json!([volume.clone()]));
    plan_volume(&p, &volume, sources, &node())
}

fn files(volume: Value, sources: &Sources) -> Vec<(String, Vec<u8>, u32)> {
    match plan(volume, sources).unwrap() {
        VolumePlan::Files { files, .. } => files.into_iter().map(|f| (f.path, f.bytes, f.mode)).collect(),
        other => panic!("not a file set: {other:?}"),
    }
}

fn text(f: &[(String, Vec<u8>, u32)], path: &str) -> String {
    let (_, b, _) = f.iter().find(|(p, _, _)| p == path).unwrap_or_else(|| panic!("no {path} in {f:?}"));
    String::from_utf8(b.clone()).unwrap()
}

#[test]
fn sources_are_named_once() {
    let p = pod(json!([
        {"name": "a", "configMap": {"name": "cfg"}},
        {"name": "b", "secret": {"secretName": "sec"}},
        {"name": "c", "projected": {"sources": [{"configMap": {"name": "cfg"}}, {"secret": {"name": "other"}}]}},
    ]));
    let names: Vec<(SourceKind, String)> = sources_of(&p).into_iter().map(|s| (s.kind, s.name)).collect();
    assert_eq!(
        names,
        [
            (SourceKind::ConfigMap, "cfg".to_string()),
            (SourceKind::Secret, "other".to_string()),
            (SourceKind::Secret, "sec".to_string())
        ]
    );
}

#[test]
fn only_file_set_volumes_are_refreshed() {
    assert!(!refreshable(&pod(json!([{"name": "a", "emptyDir": {}}, {"name": "b", "hostPath": {"path": "/x"}}]))));
    assert!(refreshable(&pod(json!([{"name": "a", "emptyDir": {}}, {"name": "c", "secret": {"secretName": "s"}}]))));
    assert!(!refreshable(&json!({"spec": {}})));
}

#[test]
fn config_map_all_keys_with_default_mode_and_binary_data() {
    let f = files(json!({"name": "v", "configMap": {"name": "cfg"}}), &sources(true));
    let paths: Vec<&str> = f.iter().map(|(p, _, _)| p.as_str()).collect();
    assert_eq!(paths, ["a", "b", "bin"]);
    assert!(f.iter().all(|(_, _, m)| *m == 0o644));
    assert_eq!(f[2].1, vec![0u8, 1, 2]);
    let f = files(json!({"name": "v", "configMap": {"name": "cfg", "defaultMode": 0o440}}), &sources(true));
    assert!(f.iter().all(|(_, _, m)| *m == 0o440));
}

#[test]
fn items_choose_keys_paths_and_modes() {
    let v = json!({"name": "v", "configMap": {"name": "cfg", "defaultMode": 0o600, "items": [
        {"key": "a", "path": "conf/a.txt", "mode": 0o400},
        {"key": "b", "path": "b.txt"},
        {"key": "a", "path": "again"},
    ]}});
    let f = files(v, &sources(true));
    assert_eq!(
        f,
        [
            ("conf/a.txt".to_string(), b"1".to_vec(), 0o400),
            ("b.txt".to_string(), b"2".to_vec(), 0o600),
            ("again".to_string(), b"1".to_vec(), 0o600)
        ]
    );
    // A key that is not there: an error, unless optional.
    let v = json!({"name": "v", "configMap": {"name": "cfg", "items": [{"key": "zz", "path": "z"}]}});
    let e = plan(v, &sources(true)).unwrap_err();
    assert_eq!(e.to_string(), "configmap references non-existent config key: zz");
    let v = json!({"name": "v", "configMap": {"name": "cfg", "optional": true, "items": [{"key": "zz", "path": "z"}]}});
    assert_eq!(files(v, &sources(true)), []);
}

#[test]
fn missing_sources_fail_like_kubernetes_unless_optional() {
    let e = plan(json!({"name": "v", "configMap": {"name": "cfg"}}), &sources(false)).unwrap_err();
    assert_eq!(e.to_string(), r#"configmap "cfg" not found"#);
    let e = plan(json!({"name": "v", "secret": {"secretName": "nope"}}), &sources(true)).unwrap_err();
    assert_eq!(e.to_string(), r#"secret "nope" not found"#);
    assert_eq!(files(json!({"name": "v", "configMap": {"name": "cfg", "optional": true}}), &sources(false)), []);
    // Could not ask is not "not found".
    let mut s = sources(true);
    s.insert(SourceRef { kind: SourceKind::Secret, name: "sec".into() }, Err("no master".into()));
    assert!(matches!(
        plan(json!({"name": "v", "secret": {"secretName": "sec", "optional": true}}), &s),
        Err(VolumeError::Unavailable { .. })
    ));
}

#[test]
fn secrets_are_decoded_and_on_tmpfs() {
    let v = json!({"name": "v", "secret": {"secretName": "sec", "defaultMode": 0o400}});
    match plan(v, &sources(true)).unwrap() {
        VolumePlan::Files { plugin, tmpfs, files, .. } => {
            assert_eq!((plugin, tmpfs), (PLUGIN_SECRET, true));
            assert_eq!(files[0], FileEntry { path: "password".into(), bytes: b"hunter2".to_vec(), mode: 0o400 });
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn bad_modes_and_paths_are_refused() {
    for (items, why) in [
        (json!([{"key": "a", "path": "/abs"}]), "must be relative"),
        (json!([{"key": "a", "path": "x/../../y"}]), "must not contain '..'"),
        (json!([{"key": "a", "path": "..data"}]), "must not start with '..'"),
        (json!([{"key": "a", "path": "x"}, {"key": "b", "path": "x"}]), "conflicting duplicate path"),
        (json!([{"key": "a", "path": "x"}, {"key": "b", "path": "x/y"}]), "both a file and a directory"),
        (json!([{"key": "a", "path": "x", "mode": 0o1777}]), "between 0 and 0777"),
        (json!([{"key": "a", "path": ""}]), "empty path"),
    ] {
        let v = json!({"name": "v", "configMap": {"name": "cfg", "items": items}});
        let e = plan(v, &sources(true)).unwrap_err().to_string();
        assert!(e.contains(why), "{e} should say {why}");
    }
    let e = plan(json!({"name": "../x", "emptyDir": {}}), &sources(true)).unwrap_err();
    assert!(e.to_string().contains("invalid volume name"), "{e}");
    let e = plan(json!({"name": "v", "nfs": {"server": "x"}}), &sources(true)).unwrap_err();
    assert!(e.to_string().contains(r#""nfs" is not supported"#), "{e}");
}

#[test]
fn downward_api_files_in_kubernetes_format() {
    let v = json!({"name": "v", "downwardAPI": {"items": [
        {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
        {"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}, "mode": 0o400},
        {"path": "name", "fieldRef": {"fieldPath": "metadata.name"}},
        {"path": "ns", "fieldRef": {"fieldPath": "metadata.namespace"}},
        {"path": "uid", "fieldRef": {"fieldPath": "metadata.uid"}},
        {"path": "app", "fieldRef": {"fieldPath": "metadata.labels['app']"}},
        {"path": "ab", "fieldRef": {"fieldPath": "metadata.annotations['a/b']"}},
        {"path": "cpu_limit", "resourceFieldRef": {"containerName": "app", "resource": "limits.cpu", "divisor": "1m"}},
        {"path": "cpu_cores", "resourceFieldRef": {"containerName": "app", "resource": "limits.cpu"}},
        {"path": "cpu_req", "resourceFieldRef": {"containerName": "app", "resource": "requests.cpu", "divisor": "1m"}},
        {"path": "mem_limit", "resourceFieldRef": {"containerName": "app", "resource": "limits.memory", "divisor": "1Mi"}},
        {"path": "mem_req", "resourceFieldRef": {"containerName": "app", "resource": "requests.memory"}},
    ]}});
    let f = files(v, &sources(true));
    assert_eq!(text(&f, "labels"), "app=\"web\"\ntier=\"front\\\"end\\n\"");
    assert_eq!(text(&f, "annotations"), "a/b=\"c\"");
    assert_eq!(f.iter().find(|(p, _, _)| p == "annotations").unwrap().2, 0o400);
    assert_eq!(text(&f, "name"), "web");
    assert_eq!(text(&f, "ns"), "ns");
    assert_eq!(text(&f, "uid"), "uid-1");
    assert_eq!(text(&f, "app"), "web");
    assert_eq!(text(&f, "ab"), "c");
    assert_eq!(text(&f, "cpu_limit"), "500");
    assert_eq!(text(&f, "cpu_cores"), "1"); // rounded up
    assert_eq!(text(&f, "cpu_req"), "250");
    assert_eq!(text(&f, "mem_limit"), "64");
    // Unset request, limit set: the limit (API defaulting).
    assert_eq!(text(&f, "mem_req"), (64u64 << 20).to_string());

    // No limit: the node's allocatable.
    let v = json!({"name": "v", "downwardAPI": {"items": [
        {"path": "c", "resourceFieldRef": {"containerName": "app", "resource": "limits.cpu", "divisor": "1m"}},
    ]}});
    let mut p = pod(json!([v.clone()]));
    p["spec"]["containers"][0]["resources"] = json!({});
    match plan_volume(&p, &v, &sources(true), &node()).unwrap() {
        VolumePlan::Files { files, .. } => assert_eq!(files[0].bytes, b"4000"),
        other => panic!("{other:?}"),
    }
    // fieldPaths a volume may not use, unknown containers, zero divisors.
    for item in [
        json!({"path": "x", "fieldRef": {"fieldPath": "spec.nodeName"}}),
        json!({"path": "x", "resourceFieldRef": {"containerName": "nope", "resource": "limits.cpu"}}),
        json!({"path": "x", "resourceFieldRef": {"containerName": "app", "resource": "limits.cpu", "divisor": "0"}}),
        json!({"path": "x", "resourceFieldRef": {"containerName": "app", "resource": "limits.gpu"}}),
    ] {
        let v = json!({"name": "v", "downwardAPI": {"items": [item]}});
        assert!(plan(v, &sources(true)).is_err());
    }
}

#[test]
fn go_quoting_matches_strconv_quote() {
    assert_eq!(go_quote("plain"), r#""plain""#);
    assert_eq!(go_quote("a\"b\\c\td\u{7}\u{1}\u{7f}é"), r#""a\"b\\c\td\a\x01\x7fé""#);
    let m: BTreeMap<String, String> = [("b", "2"), ("a", "1")].map(|(k, v)| (k.into(), v.into())).into();
    assert_eq!(format_map(&m), "a=\"1\"\nb=\"2\"");
    assert_eq!(format_map(&BTreeMap::new()), "");
}

#[test]
fn token_sources_name_their_audience_and_lifetime() {
    let t = json!({"path": "token", "audience": "vault", "expirationSeconds": 600});
    assert_eq!(token_source_parts(&token_source_name(&t)), (Some("vault".to_string()), 600));
    assert_eq!(token_source_parts(&token_source_name(&json!({"path": "token"}))), (None, 3607));
    // Without the token (masters unreachable) the projection is not written.
    let v = json!({"name": "v", "projected": {"sources": [{"serviceAccountToken": {"path": "t", "audience": "x"}}]}});
    assert!(matches!(plan(v, &sources(true)), Err(VolumeError::NotFound { .. })));
}

#[test]
fn projected_merges_sources_with_one_default_mode() {
    let v = json!({"name": "v", "projected": {"defaultMode": 0o440, "sources": [
        {"configMap": {"name": "cfg", "items": [{"key": "a", "path": "cfg/a"}]}},
        {"secret": {"name": "sec", "items": [{"key": "token", "path": "token", "mode": 0o400}]}},
        {"downwardAPI": {"items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]}},
        {"serviceAccountToken": {"path": "sa-token", "expirationSeconds": 3600}},
        {"configMap": {"name": "absent", "optional": true}},
    ]}});
    match plan(v, &sources(true)).unwrap() {
        VolumePlan::Files { plugin, tmpfs, files, .. } => {
            assert_eq!((plugin, tmpfs), (PLUGIN_PROJECTED, true));
            let got: Vec<(&str, u32)> = files.iter().map(|f| (f.path.as_str(), f.mode)).collect();
            assert_eq!(got, [("cfg/a", 0o440), ("token", 0o400), ("labels", 0o440), ("sa-token", 0o440)]);
            assert_eq!(files[3].bytes, b"jwt-for-the-pod");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn empty_dir_and_host_path_plans() {
    let s = sources(true);
    assert_eq!(
        plan(json!({"name": "v", "emptyDir": {}}), &s).unwrap(),
        VolumePlan::EmptyDir { memory: false, size_limit: None, gid: None }
    );
    assert_eq!(
        plan(json!({"name": "v", "emptyDir": {"medium": "Memory", "sizeLimit": "64Mi"}}), &s).unwrap(),
        VolumePlan::EmptyDir { memory: true, size_limit: Some(64 << 20), gid: None }
    );
    // No sizeLimit: the pod's memory limit; bigger than it: cut to it.
    assert_eq!(
        plan(json!({"name": "v", "emptyDir": {"medium": "Memory"}}), &s).unwrap(),
        VolumePlan::EmptyDir { memory: true, size_limit: Some(64 << 20), gid: None }
    );
    assert_eq!(
        plan(json!({"name": "v", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}}), &s).unwrap(),
        VolumePlan::EmptyDir { memory: true, size_limit: Some(64 << 20), gid: None }
    );
    let v = json!({"name": "v", "emptyDir": {"medium": "Memory"}});
    let mut p = pod(json!([v.clone()]));
    p["spec"]["containers"][0]["resources"] = json!({});
    assert_eq!(
        plan_volume(&p, &v, &s, &node()).unwrap(),
        VolumePlan::EmptyDir { memory: true, size_limit: Some(8 << 30), gid: None }
    );
    assert!(plan(json!({"name": "v", "emptyDir": {"medium": "HugePages"}}), &s).is_err());
    assert!(plan(json!({"name": "v", "emptyDir": {"sizeLimit": "lots"}}), &s).is_err());
    assert_eq!(
        plan(json!({"name": "v", "hostPath": {"path": "/var/log", "type": "Directory"}}), &s).unwrap(),
        VolumePlan::HostPath { path: "/var/log".into(), kind: HostPathType::Directory }
    );
    assert!(plan(json!({"name": "v", "hostPath": {"path": "rel"}}), &s).is_err());
    assert!(plan(json!({"name": "v", "hostPath": {"path": "/x", "type": "Bogus"}}), &s).is_err());
}

#[test]
fn sub_paths_are_validated_and_expanded() {
    let env = vec![("POD".to_string(), "web-0".to_string())];
    let sp = |m: Value| sub_path(&m, &env);
    assert_eq!(sp(json!({"name": "v"})).unwrap(), None);
    assert_eq!(sp(json!({"name": "v", "subPath": "a/./b/"})).unwrap(), Some(PathBuf::from("a/b")));
    assert_eq!(sp(json!({"name": "v", "subPathExpr": "logs/$(POD)"})).unwrap(), Some(PathBuf::from("logs/web-0")));
    for (m, why) in [
        (json!({"name": "v", "subPath": "../etc"}), "must not contain '..'"),
        (json!({"name": "v", "subPath": "a/../../b"}), "must not contain '..'"),
        (json!({"name": "v", "subPath": "/etc"}), "must be a relative path"),
        (json!({"name": "v", "subPathExpr": "/$(POD)"}), "must be a relative path"),
        (json!({"name": "v", "subPath": "a", "subPathExpr": "b"}), "mutually exclusive"),
    ] {
        let e = sp(m).unwrap_err().to_string();
        assert!(e.contains(why), "{e} should say {why}");
    }
}

// ---- IO: as root, into a temp dir; every mount is undone by the guard. ----

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Unmounts and removes the pod's volumes even when the test fails half-way
/// (before the temp dir itself is removed).
struct Guard {
    tmp: tempfile::TempDir,
    uid: &'static str,
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = cleanup(&self.tmp.path().join("data"), self.uid);
        // Whatever else a failing test left mounted in the temp dir.
        for m in mounts_under(self.tmp.path()) {
            let c = std::ffi::CString::new(m.as_os_str().as_encoded_bytes()).unwrap();
            // SAFETY: plain syscall on a valid NUL-terminated string.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

fn fake_fetch(
    objects: HashMap<(SourceKind, String), Value>,
) -> impl Fn(SourceRef) -> std::future::Ready<Result<Option<Value>, String>> {
    move |s: SourceRef| std::future::ready(Ok(objects.get(&(s.kind, s.name)).cloned()))
}

fn every_volume(host: &Path) -> Value {
    pod(json!([
        {"name": "cache", "emptyDir": {}},
        {"name": "mem", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
        {"name": "hdir", "hostPath": {"path": host.join("made/dir"), "type": "DirectoryOrCreate"}},
        {"name": "hfile", "hostPath": {"path": host.join("file.txt"), "type": "FileOrCreate"}},
        {"name": "cfg", "configMap": {"name": "cfg", "items": [{"key": "a", "path": "conf/a", "mode": 0o600}]}},
        {"name": "sec", "secret": {"secretName": "sec", "defaultMode": 0o400}},
        {"name": "info", "downwardAPI": {"items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]}},
        {"name": "all", "projected": {"sources": [
            {"configMap": {"name": "cfg"}},
            {"secret": {"name": "sec", "items": [{"key": "token", "path": "token"}]}},
            {"serviceAccountToken": {"path": "sa"}},
        ]}},
    ]))
}

fn objects(a: &str) -> HashMap<(SourceKind, String), Value> {
    HashMap::from([
        ((SourceKind::ConfigMap, "cfg".to_string()), cm(json!({"a": a, "b": "2"}))),
        ((SourceKind::Secret, "sec".to_string()), secret()),
        ((SourceKind::Token, token_source_name(&json!({}))), json!({"token": "jwt"})),
    ])
}

#[tokio::test]
async fn every_volume_type_is_prepared_mounted_and_cleaned_up() {
    if !is_root() {
        eprintln!("skipping: needs root");
        return;
    }
    tokio::time::timeout(Duration::from_secs(60), every_volume_type()).await.expect("timed out");
}

async fn every_volume_type() {
    let guard = Guard { tmp: tempfile::tempdir().unwrap(), uid: "uid-1" };
    let data = guard.tmp.path().join("data");
    let host = guard.tmp.path().join("host");
    fs::create_dir_all(&host).unwrap();
    let pod = every_volume(&host);
    let vols = volumes_dir(&data, "uid-1");

    let prepared = prepare(&pod, &data, &node(), fake_fetch(objects("1"))).await.unwrap();
    assert_eq!(prepared.len(), 8);

    // emptyDir: a world-writable directory; Memory: its own tmpfs with the size limit.
    let cache = vols.join("kubernetes.io~empty-dir/cache");
    assert_eq!(prepared["cache"], Prepared { path: cache.clone(), read_only: false });
    assert_eq!(mode(&cache), 0o777);
    assert!(!is_mount_point(&cache));
    let mem = vols.join("kubernetes.io~empty-dir/mem");
    assert!(is_mount_point(&mem));
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = info.lines().find(|l| l.split(' ').nth(4) == mem.to_str()).expect("tmpfs in mountinfo");
    assert!(line.contains(" - tmpfs ") && line.contains("size=1024k"), "{line}");
    assert_eq!(mode(&mem), 0o777);

    // hostPath: created as asked, mounted as itself.
    assert!(host.join("made/dir").is_dir());
    assert!(host.join("file.txt").is_file());
    assert_eq!(prepared["hdir"].path, host.join("made/dir"));

    // configMap: the AtomicWriter layout.
    let cfg = vols.join("kubernetes.io~configmap/cfg");
    assert!(prepared["cfg"].read_only);
    assert!(!is_mount_point(&cfg));
    let version = fs::read_link(cfg.join("..data")).unwrap();
    assert!(version.to_str().unwrap().starts_with("..20"), "{version:?}");
    assert_eq!(fs::read_link(cfg.join("conf")).unwrap(), Path::new("..data/conf"));
    assert_eq!(fs::read_to_string(cfg.join("conf/a")).unwrap(), "1");
    assert_eq!(mode(&cfg.join(&version).join("conf/a")), 0o600);

    // secret: on tmpfs, decoded, defaultMode.
    let sec = vols.join("kubernetes.io~secret/sec");
    assert!(is_mount_point(&sec));
    assert_eq!(fs::read_to_string(sec.join("password")).unwrap(), "hunter2");
    assert_eq!(mode(&sec.join("password")), 0o400);

    // downwardAPI and projected (the token source writes nothing).
    let labels = fs::read_to_string(vols.join("kubernetes.io~downward-api/info/labels")).unwrap();
    assert_eq!(labels, "app=\"web\"\ntier=\"front\\\"end\\n\"");
    let all = vols.join("kubernetes.io~projected/all");
    assert!(is_mount_point(&all));
    let mut names: Vec<String> =
        fs::read_dir(&all).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names.len(), 7, "{names:?}"); // ..data, the version, a, b, bin, token, sa
    assert_eq!(fs::read_to_string(all.join("token")).unwrap(), "t");
    assert_eq!(fs::read_to_string(all.join("sa")).unwrap(), "jwt", "the ServiceAccount token");

    // Preparing again with nothing changed keeps the version; a change swaps it
    // and removes the old one; a key gone takes its link with it.
    let again = prepare(&pod, &data, &node(), fake_fetch(objects("1"))).await.unwrap();
    assert_eq!(again, prepared);
    assert_eq!(fs::read_link(cfg.join("..data")).unwrap(), version);
    fs::write(cache.join("kept"), "x").unwrap();
    let mut changed = objects("2");
    changed.insert((SourceKind::ConfigMap, "cfg".into()), cm(json!({"a": "2"})));
    prepare(&pod, &data, &node(), fake_fetch(changed)).await.unwrap();
    let version2 = fs::read_link(cfg.join("..data")).unwrap();
    assert_ne!(version2, version);
    assert!(!cfg.join(&version).exists());
    assert_eq!(fs::read_to_string(cfg.join("conf/a")).unwrap(), "2");
    assert!(fs::symlink_metadata(all.join("b")).is_err(), "stale link kept");
    assert_eq!(fs::read_to_string(cache.join("kept")).unwrap(), "x", "emptyDir must survive a refresh");
    assert_eq!(mounts_under(&vols).len(), 3, "tmpfs mounted twice");

    // Masters unreachable: the last contents stay; a new pod cannot start.
    let down = |_s: SourceRef| std::future::ready(Err::<Option<Value>, String>("no master".into()));
    prepare(&pod, &data, &node(), down).await.unwrap();
    assert_eq!(fs::read_to_string(cfg.join("conf/a")).unwrap(), "2");
    let other = every_volume(&host);
    let e = prepare(&other, &guard.tmp.path().join("other"), &node(), down).await.unwrap_err();
    assert!(matches!(e, VolumeError::Unavailable { .. }), "{e}");
    assert!(!guard.tmp.path().join("other").exists(), "a failed prepare must change nothing");

    // volumeMounts.
    let container = json!({"name": "app", "volumeMounts": [
        {"name": "cache", "mountPath": "/cache", "subPathExpr": "$(POD)/logs"},
        {"name": "cfg", "mountPath": "/etc/cfg"},
        {"name": "cfg", "mountPath": "/etc/a", "subPath": "conf/a"},
        {"name": "mem", "mountPath": "/mem", "readOnly": true},
    ]});
    let env = vec![("POD".to_string(), "web-0".to_string())];
    let m = mounts_for(&container, &env, &prepared).unwrap();
    let real_cache = fs::canonicalize(&cache).unwrap();
    assert_eq!(m[0].host_path, real_cache.join("web-0/logs"));
    assert!(real_cache.join("web-0/logs").is_dir());
    assert_eq!(mode(&real_cache.join("web-0")), 0o777);
    assert_eq!((m[0].container_path.as_path(), m[0].read_only), (Path::new("/cache"), false));
    assert_eq!((m[1].host_path.as_path(), m[1].read_only), (cfg.as_path(), true));
    assert_eq!(m[2].host_path, fs::canonicalize(cfg.join(&version2).join("conf/a")).unwrap());
    assert!(m[3].read_only);
    // A subPath may not lead out of its volume through a symlink.
    std::os::unix::fs::symlink(&host, cache.join("out")).unwrap();
    let escape = json!({"name": "app", "volumeMounts": [{"name": "cache", "mountPath": "/x", "subPath": "out/new"}]});
    let e = mounts_for(&escape, &env, &prepared).unwrap_err();
    assert!(e.to_string().contains("outside the volume"), "{e}");
    assert!(!host.join("new").exists());
    let unknown = json!({"name": "app", "volumeMounts": [{"name": "nope", "mountPath": "/x"}]});
    assert!(mounts_for(&unknown, &env, &prepared).unwrap_err().to_string().contains("cannot find volume"));

    // Cleanup: no mount, no file, host paths untouched; and again is fine.
    assert_eq!(pods_with_volumes(&data), ["uid-1"]);
    cleanup(&data, "uid-1").unwrap();
    assert!(mounts_under(guard.tmp.path()).is_empty());
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!info.contains(guard.tmp.path().to_str().unwrap()), "{info}");
    assert!(!data.join("pods/uid-1").exists());
    assert!(host.join("made/dir").is_dir() && host.join("file.txt").is_file());
    cleanup(&data, "uid-1").unwrap();
    assert!(pods_with_volumes(&data).is_empty());
}

#[tokio::test]
async fn missing_config_map_and_host_path_checks_fail_clearly() {
    if !is_root() {
        eprintln!("skipping: needs root");
        return;
    }
    let guard = Guard { tmp: tempfile::tempdir().unwrap(), uid: "uid-1" };
    let data = guard.tmp.path().join("data");
    let fetch = || fake_fetch(HashMap::new());
    let p = pod(json!([{"name": "cfg", "configMap": {"name": "cfg"}}]));
    let e = prepare(&p, &data, &node(), fetch()).await.unwrap_err();
    assert_eq!(e.to_string(), r#"configmap "cfg" not found"#);

    let sock = guard.tmp.path().join("s.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let file = guard.tmp.path().join("f");
    fs::write(&file, "").unwrap();
    for (path, kind, ok) in [
        (&sock, "Socket", true),
        (&file, "Socket", false),
        (&file, "File", true),
        (&file, "Directory", false),
        (&guard.tmp.path().join("absent"), "File", false),
        (&guard.tmp.path().join("no/parent"), "FileOrCreate", false),
    ] {
        let p = pod(json!([{"name": "h", "hostPath": {"path": path, "type": kind}}]));
        let got = prepare(&p, &data, &node(), fetch()).await;
        assert_eq!(got.is_ok(), ok, "{path:?} as {kind}: {got:?}");
        if let Err(e) = got {
            assert!(e.to_string().contains("hostPath type check failed") || kind == "FileOrCreate", "{e}");
        }
    }
    cleanup(&data, "uid-1").unwrap();
    assert!(mounts_under(guard.tmp.path()).is_empty());
}

#[test]
fn fs_group_makes_files_group_readable() {
    let v = json!({"name": "v", "secret": {"secretName": "sec", "defaultMode": 0o400}});
    let mut p = pod(json!([v.clone()]));
    p["spec"]["securityContext"] = json!({"fsGroup": 2000});
    match plan_volume(&p, &v, &sources(true), &node()).unwrap() {
        VolumePlan::Files { files, gid, .. } => {
            assert_eq!(gid, Some(2000));
            assert!(files.iter().all(|f| f.mode == 0o440), "{files:?}");
        }
        other => panic!("{other:?}"),
    }
    let e = json!({"name": "e", "emptyDir": {}});
    assert_eq!(
        plan_volume(&p, &e, &sources(true), &node()).unwrap(),
        VolumePlan::EmptyDir { memory: false, size_limit: None, gid: Some(2000) }
    );
}

#[tokio::test]
async fn fs_group_owns_the_volumes() {
    if !is_root() {
        eprintln!("skipping: needs root");
        return;
    }
    use std::os::unix::fs::MetadataExt;
    let guard = Guard { tmp: tempfile::tempdir().unwrap(), uid: "uid-1" };
    let data = guard.tmp.path().join("data");
    let mut p = pod(json!([
        {"name": "e", "emptyDir": {}},
        {"name": "s", "secret": {"secretName": "sec", "defaultMode": 0o400,
                                 "items": [{"key": "password", "path": "deep/pw"}]}},
    ]));
    p["spec"]["securityContext"] = json!({"fsGroup": 2000});
    let got = prepare(&p, &data, &node(), fake_fetch(objects("1"))).await.unwrap();
    let meta = |p: &Path| fs::metadata(p).unwrap();
    assert_eq!((meta(&got["e"].path).gid(), mode(&got["e"].path)), (2000, 0o2777));
    let s = &got["s"].path;
    assert_eq!((meta(&s.join("deep/pw")).gid(), mode(&s.join("deep/pw"))), (2000, 0o440));
    assert_eq!((meta(&s.join("deep")).gid(), mode(&s.join("deep"))), (2000, 0o2755));
    let version = s.join(fs::read_link(s.join("..data")).unwrap());
    assert_eq!(meta(&version).gid(), 2000);
    // Same contents and owner: nothing rewritten.
    prepare(&p, &data, &node(), fake_fetch(objects("1"))).await.unwrap();
    assert_eq!(s.join(fs::read_link(s.join("..data")).unwrap()), version);
    cleanup(&data, "uid-1").unwrap();
    assert!(mounts_under(guard.tmp.path()).is_empty());
}

#[test]
fn cleanup_refuses_odd_uids_and_tolerates_absence() {
    let tmp = tempfile::tempdir().unwrap();
    cleanup(tmp.path(), "never-prepared").unwrap();
    for bad in ["", "..", "a/b"] {
        assert!(cleanup(tmp.path(), bad).is_err());
    }
    assert!(tmp.path().is_dir());
}

// ---- Claim volumes (persistentVolumeClaim, ephemeral). ----

fn pvc(name: &str, phase: &str, volume: &str) -> Value {
    json!({
        "metadata": {"name": name, "namespace": "ns", "uid": format!("uid-{name}")},
        "spec": {"volumeName": volume},
        "status": {"phase": phase},
    })
}

fn local_path_pv(name: &str, claim: &str, path: &str) -> Value {
    json!({
        "metadata": {"name": name, "annotations": {"pv.kubernetes.io/provisioned-by": "capstan.io/local-path"}},
        "spec": {
            "hostPath": {"path": path, "type": "DirectoryOrCreate"},
            "claimRef": {"namespace": "ns", "name": claim, "uid": format!("uid-{claim}")},
            "persistentVolumeReclaimPolicy": "Delete", "storageClassName": "local-path",
            "accessModes": ["ReadWriteOnce"], "capacity": {"storage": "1Gi"},
            "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                {"key": "kubernetes.io/hostname", "operator": "In", "values": ["n1"]}
            ]}]}},
        },
    })
}

fn claim_sources(objects: &[(SourceKind, &str, Value)]) -> Sources {
    objects.iter().map(|(k, n, v)| (SourceRef { kind: *k, name: n.to_string() }, Ok(Some(v.clone())))).collect()
}

fn bound(claim: &str, pv: Value) -> Sources {
    let name = pv["metadata"]["name"].as_str().unwrap().to_string();
    claim_sources(&[
        (SourceKind::PersistentVolumeClaim, claim, pvc(claim, "Bound", &name)),
        (SourceKind::PersistentVolume, &name, pv),
    ])
}

#[test]
fn claims_are_sources_and_name_their_bound_volumes() {
    let p = pod(json!([
        {"name": "data", "persistentVolumeClaim": {"claimName": "data-web-0"}},
        {"name": "scratch", "ephemeral": {"volumeClaimTemplate": {"spec": {}}}},
        {"name": "again", "persistentVolumeClaim": {"claimName": "data-web-0", "readOnly": true}},
    ]));
    let names: Vec<(SourceKind, String)> = sources_of(&p).into_iter().map(|s| (s.kind, s.name)).collect();
    assert_eq!(
        names,
        [
            (SourceKind::PersistentVolumeClaim, "data-web-0".to_string()),
            (SourceKind::PersistentVolumeClaim, "web-scratch".to_string())
        ]
    );
    let vols = p["spec"]["volumes"].as_array().unwrap();
    assert_eq!(
        claim_of(&p, &vols[2]),
        Some(ClaimUse { claim: "data-web-0".into(), read_only: true, ephemeral: false })
    );
    assert_eq!(claim_of(&p, &vols[1]).map(|c| c.ephemeral), Some(true));
    assert_eq!(claim_of(&p, &json!({"name": "e", "emptyDir": {}})), None);

    // Only Bound claims with a volumeName lead on to a PersistentVolume.
    let s = claim_sources(&[
        (SourceKind::PersistentVolumeClaim, "a", pvc("a", "Bound", "pvc-a")),
        (SourceKind::PersistentVolumeClaim, "b", pvc("b", "Pending", "pvc-b")),
        (SourceKind::PersistentVolumeClaim, "c", pvc("c", "Bound", "")),
        (SourceKind::PersistentVolumeClaim, "d", pvc("d", "Bound", "pvc-a")),
        (SourceKind::ConfigMap, "cfg", json!({"spec": {"volumeName": "nope"}, "status": {"phase": "Bound"}})),
    ]);
    let next: Vec<(SourceKind, String)> = bound_volumes(&s).into_iter().map(|s| (s.kind, s.name)).collect();
    assert_eq!(next, [(SourceKind::PersistentVolume, "pvc-a".to_string())]);
    assert!(SourceKind::PersistentVolumeClaim.namespaced() && !SourceKind::PersistentVolume.namespaced());
    assert_eq!(SourceKind::PersistentVolume.resource(), "persistentvolumes");
}

#[test]
fn a_bound_claim_is_its_volumes_host_path() {
    let path = "/var/lib/capstan/local-path/pvc-1_ns_data";
    let s = bound("data", local_path_pv("pvc-1", "data", path));
    let v = json!({"name": "data", "persistentVolumeClaim": {"claimName": "data"}});
    assert_eq!(
        plan(v.clone(), &s).unwrap(),
        VolumePlan::Persistent { path: path.into(), check: PathCheck::Provisioned, read_only: false }
    );
    // A hostPath PV an administrator made is checked as a hostPath volume.
    let mut static_pv = local_path_pv("pvc-1", "data", path);
    static_pv["metadata"]["annotations"] = json!({});
    assert_eq!(
        plan(v, &bound("data", static_pv)).unwrap(),
        VolumePlan::Persistent {
            path: path.into(),
            check: PathCheck::HostPath(HostPathType::DirectoryOrCreate),
            read_only: false
        }
    );
    let v = json!({"name": "data", "persistentVolumeClaim": {"claimName": "data", "readOnly": true}});
    assert!(matches!(plan(v, &s).unwrap(), VolumePlan::Persistent { read_only: true, .. }));

    // A local PV (it must exist; nothing is created), with matchFields.
    let mut local = local_path_pv("pvc-2", "data", "");
    local["spec"].as_object_mut().unwrap().remove("hostPath");
    local["spec"]["local"] = json!({"path": "/mnt/disks/ssd1", "fsType": "ext4"});
    local["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"] =
        json!([{"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n1"]}]}]);
    let v = json!({"name": "data", "persistentVolumeClaim": {"claimName": "data"}});
    assert_eq!(
        plan(v, &bound("data", local)).unwrap(),
        VolumePlan::Persistent { path: "/mnt/disks/ssd1".into(), check: PathCheck::Exists, read_only: false }
    );

    // An ephemeral volume: the claim `<pod>-<volume>`, owned by the pod.
    let mut claim = pvc("web-scratch", "Bound", "pvc-3");
    claim["metadata"]["ownerReferences"] =
        json!([{"apiVersion": "v1", "kind": "Pod", "name": "web", "uid": "uid-1", "controller": true}]);
    let s = claim_sources(&[
        (SourceKind::PersistentVolumeClaim, "web-scratch", claim.clone()),
        (SourceKind::PersistentVolume, "pvc-3", local_path_pv("pvc-3", "web-scratch", "/lp/pvc-3_ns_web-scratch")),
    ]);
    let v = json!({"name": "scratch", "ephemeral": {"volumeClaimTemplate": {"spec": {}}}});
    assert!(matches!(plan(v.clone(), &s).unwrap(), VolumePlan::Persistent { .. }));
    claim["metadata"]["ownerReferences"][0]["uid"] = json!("someone-else");
    let mut s = s;
    s.insert(SourceRef { kind: SourceKind::PersistentVolumeClaim, name: "web-scratch".into() }, Ok(Some(claim)));
    let e = plan(v, &s).unwrap_err().to_string();
    assert!(e.contains(r#"persistentvolumeclaim "web-scratch" was not created for pod ns/web"#), "{e}");
}

#[test]
fn claims_not_ready_yet_say_so_and_are_retried() {
    let v = json!({"name": "data", "persistentVolumeClaim": {"claimName": "data"}});
    let e = plan(v.clone(), &Sources::new()).unwrap_err();
    assert_eq!(e.to_string(), r#"persistentvolumeclaim "data" not found"#);
    for claim in [pvc("data", "Pending", ""), pvc("data", "Pending", "pvc-1"), pvc("data", "Bound", "")] {
        let s = claim_sources(&[(SourceKind::PersistentVolumeClaim, "data", claim)]);
        let e = plan(v.clone(), &s).unwrap_err();
        assert_eq!(e, VolumeError::NotBound { claim: "data".into() });
        assert_eq!(e.to_string(), r#"persistentvolumeclaim "data" is not bound yet"#);
    }
    let s = claim_sources(&[(SourceKind::PersistentVolumeClaim, "data", pvc("data", "Bound", "pvc-1"))]);
    assert_eq!(plan(v.clone(), &s).unwrap_err().to_string(), r#"persistentvolume "pvc-1" not found"#);
    // Could not ask is not "not found".
    let mut s = Sources::new();
    s.insert(SourceRef { kind: SourceKind::PersistentVolumeClaim, name: "data".into() }, Err("no master".into()));
    assert!(matches!(plan(v, &s), Err(VolumeError::Unavailable { .. })));
}

#[test]
fn claims_the_node_cannot_mount_are_refused_clearly() {
    let v = json!({"name": "data", "persistentVolumeClaim": {"claimName": "data"}});
    let refused = |edit: &dyn Fn(&mut Value), claim: Value| {
        let mut pv = local_path_pv("pvc-1", "data", "/lp/pvc-1_ns_data");
        edit(&mut pv);
        let s = claim_sources(&[
            (SourceKind::PersistentVolumeClaim, "data", claim),
            (SourceKind::PersistentVolume, "pvc-1", pv),
        ]);
        plan(v.clone(), &s).unwrap_err().to_string()
    };
    let claim = || pvc("data", "Bound", "pvc-1");
    let nfs = |pv: &mut Value| {
        let spec = pv["spec"].as_object_mut().unwrap();
        spec.remove("hostPath");
        spec.insert("nfs".into(), json!({"server": "nas", "path": "/x"}));
    };
    assert_eq!(
        refused(&nfs, claim()),
        r#"volume "data": persistentvolume "pvc-1": unsupported volume source "nfs" (capstan-node mounts hostPath and local volumes)"#
    );
    let none = |pv: &mut Value| {
        pv["spec"].as_object_mut().unwrap().remove("hostPath");
    };
    assert!(refused(&none, claim()).ends_with("it has no volume source"));
    let elsewhere = |pv: &mut Value| {
        pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"][0]["matchExpressions"][0]["values"] = json!(["n2"])
    };
    assert_eq!(
        refused(&elsewhere, claim()),
        r#"volume "data": persistentvolume "pvc-1": its nodeAffinity does not admit node "n1""#
    );
    let block = |pv: &mut Value| pv["spec"]["volumeMode"] = json!("Block");
    assert!(refused(&block, claim()).contains("block volumes are not supported"));
    let relative = |pv: &mut Value| pv["spec"]["hostPath"]["path"] = json!("rel");
    assert!(refused(&relative, claim()).contains(r#"hostPath path "rel" must be absolute"#));
    let other_claim = |pv: &mut Value| pv["spec"]["claimRef"]["name"] = json!("other");
    assert!(refused(&other_claim, claim()).contains("it is bound to persistentvolumeclaim ns/other, not ns/data"));
    let other_uid = |pv: &mut Value| pv["spec"]["claimRef"]["uid"] = json!("uid-old");
    assert!(refused(&other_uid, claim()).contains("it is bound to persistentvolumeclaim ns/data, not ns/data"));
    // No claimRef: the claim's phase already says the binding is done.
    let no_ref = |pv: &mut Value| {
        pv["spec"].as_object_mut().unwrap().remove("claimRef");
    };
    let s = |pv: Value| {
        claim_sources(&[
            (SourceKind::PersistentVolumeClaim, "data", claim()),
            (SourceKind::PersistentVolume, "pvc-1", pv),
        ])
    };
    let mut pv = local_path_pv("pvc-1", "data", "/lp/pvc-1_ns_data");
    no_ref(&mut pv);
    assert!(plan(v.clone(), &s(pv)).is_ok());
    let mut deleting = claim();
    deleting["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
    assert!(refused(&|_| {}, deleting).contains(r#"persistentvolumeclaim "data" is being deleted"#));
    let e = plan(json!({"name": "data", "persistentVolumeClaim": {}}), &Sources::new()).unwrap_err();
    assert!(e.to_string().contains("claimName is empty"), "{e}");
}

#[test]
fn node_affinity_terms_match_like_kubernetes() {
    let mut n = node();
    n.labels.push(("zone".into(), "a".into()));
    n.labels.push(("disks".into(), "4".into()));
    let admits = |terms: Value| node_affinity_admits(&json!({"required": {"nodeSelectorTerms": terms}}), &n);
    let expr = |key: &str, op: &str, values: Value| json!([{"matchExpressions": [{"key": key, "operator": op, "values": values}]}]);
    assert!(admits(expr("kubernetes.io/hostname", "In", json!(["n0", "n1"]))));
    assert!(!admits(expr("kubernetes.io/hostname", "In", json!(["n2"]))));
    assert!(admits(expr("kubernetes.io/hostname", "NotIn", json!(["n2"]))));
    assert!(!admits(expr("kubernetes.io/hostname", "NotIn", json!(["n1"]))));
    assert!(admits(expr("zone", "Exists", json!([]))));
    assert!(!admits(expr("rack", "Exists", json!([]))));
    assert!(admits(expr("rack", "DoesNotExist", json!([]))));
    assert!(!admits(expr("zone", "DoesNotExist", json!([]))));
    assert!(admits(expr("disks", "Gt", json!(["3"]))) && !admits(expr("disks", "Lt", json!(["3"]))));
    assert!(!admits(expr("zone", "Near", json!(["a"]))), "an unknown operator matches nothing");
    let field =
        |op: &str, name: &str| json!([{"matchFields": [{"key": "metadata.name", "operator": op, "values": [name]}]}]);
    assert!(admits(field("In", "n1")) && !admits(field("In", "n2")) && admits(field("NotIn", "n2")));
    assert!(!admits(json!([{"matchFields": [{"key": "metadata.uid", "operator": "In", "values": ["n1"]}]}])));
    // Terms are ORed, a term's requirements ANDed; an empty term, or none, matches nothing.
    let and = json!([{"matchExpressions": [
        {"key": "zone", "operator": "In", "values": ["a"]},
        {"key": "kubernetes.io/hostname", "operator": "In", "values": ["n2"]},
    ]}]);
    assert!(!admits(and.clone()));
    let or = json!([and[0].clone(), {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]);
    assert!(admits(or));
    assert!(!admits(json!([{}])) && !admits(json!([])));
    // No required selector: any node.
    assert!(node_affinity_admits(&json!({}), &n) && node_affinity_admits(&Value::Null, &n));
}

#[tokio::test]
async fn claim_volumes_are_bind_mounted_recorded_and_kept_while_masters_are_away() {
    if !is_root() {
        eprintln!("skipping: needs root");
        return;
    }
    let guard = Guard { tmp: tempfile::tempdir().unwrap(), uid: "uid-1" };
    let data = guard.tmp.path().join("data");
    let dir = guard.tmp.path().join("lp/pvc-1_ns_data");
    let pv = local_path_pv("pvc-1", "data", dir.to_str().unwrap());
    let objects = HashMap::from([
        ((SourceKind::PersistentVolumeClaim, "data".to_string()), pvc("data", "Bound", "pvc-1")),
        ((SourceKind::PersistentVolume, "pvc-1".to_string()), pv),
    ]);
    let p = pod(json!([
        {"name": "data", "persistentVolumeClaim": {"claimName": "data"}},
        {"name": "ro", "persistentVolumeClaim": {"claimName": "data", "readOnly": true}},
    ]));
    let prepared = prepare(&p, &data, &node(), fake_fetch(objects.clone())).await.unwrap();
    assert_eq!(prepared["data"], Prepared { path: dir.clone(), read_only: false });
    assert!(prepared["ro"].read_only);
    assert!(dir.is_dir(), "the volume's directory is made");
    let mode = fs::metadata(&dir).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o777, "any container user may write to a provisioned volume");
    assert_eq!(fs::read_link(volumes_dir(&data, "uid-1").join(PLUGIN_CLAIM).join("data")).unwrap(), dir);
    assert_eq!(claimed_paths(&data), [dir.clone(), dir.clone()]);

    // Mounted as itself, subPaths inside it, read-only as asked.
    let container = json!({"name": "app", "volumeMounts": [
        {"name": "data", "mountPath": "/data"},
        {"name": "data", "mountPath": "/logs", "subPath": "logs"},
        {"name": "ro", "mountPath": "/ro"},
        {"name": "data", "mountPath": "/ro2", "readOnly": true},
    ]});
    let m = mounts_for(&container, &[], &prepared).unwrap();
    assert_eq!((m[0].host_path.as_path(), m[0].read_only), (dir.as_path(), false));
    assert_eq!(m[1].host_path, fs::canonicalize(&dir).unwrap().join("logs"));
    assert!(dir.join("logs").is_dir());
    assert!(m[2].read_only && m[3].read_only);

    // Masters away: the recorded path serves a restart; a pod never prepared cannot start.
    let down = |_s: SourceRef| std::future::ready(Err::<Option<Value>, String>("no master".into()));
    assert_eq!(prepare(&p, &data, &node(), down).await.unwrap(), prepared);
    let e = prepare(&p, &guard.tmp.path().join("other"), &node(), down).await.unwrap_err();
    assert!(matches!(e, VolumeError::Unavailable { .. }), "{e}");

    // A local PV's path must exist: nothing is created for it.
    let mut local = local_path_pv("pvc-2", "data", "");
    local["spec"].as_object_mut().unwrap().remove("hostPath");
    local["spec"]["local"] = json!({"path": guard.tmp.path().join("absent")});
    let mut missing = objects.clone();
    missing.insert((SourceKind::PersistentVolumeClaim, "data".into()), pvc("data", "Bound", "pvc-2"));
    missing.insert((SourceKind::PersistentVolume, "pvc-2".into()), local);
    let e = prepare(&p, &data, &node(), fake_fetch(missing)).await.unwrap_err();
    assert!(e.to_string().starts_with("local volume "), "{e}");
    assert!(!guard.tmp.path().join("absent").exists());

    // Cleanup takes the records, never the data.
    fs::write(dir.join("logs/kept"), "x").unwrap();
    cleanup(&data, "uid-1").unwrap();
    assert!(claimed_paths(&data).is_empty());
    assert_eq!(fs::read_to_string(dir.join("logs/kept")).unwrap(), "x");
}
