//! Resident memory of Capstan's processes on this machine, read from
//! `/proc/<pid>/cmdline` and `/proc/<pid>/status` (`VmRSS`).
//!
//! Which process is what is decided from its argv alone (`classify`), so
//! the rules are unit-tested without a `/proc`: `capstan-node` is a node
//! agent (or, with `log-driver`, one container's log driver, which runs
//! beside the agent and is counted apart); `capstan ... server` is a master.
//! RSS includes shared pages (the binaries' text), as `ps` shows it; PSS
//! (`/proc/<pid>/smaps_rollup`) splits each shared page among its users,
//! so the log drivers' sum is not their binary counted once per container.

use std::path::Path;

use serde_json::{json, Value};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    Agent,
    LogDriver,
    Master,
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Proc {
    pub pid: u32,
    pub role: Role,
    pub rss_kib: u64,
    /// Proportional set size, when readable.
    pub pss_kib: Option<u64>,
    /// The `--data-dir` it was started with, to tell clusters apart.
    pub data_dir: Option<String>,
}

/// `/proc/<pid>/cmdline`: NUL-separated, usually NUL-terminated.
pub(crate) fn split_cmdline(raw: &[u8]) -> Vec<String> {
    raw.split(|&b| b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect()
}

/// The `VmRSS:` line of `/proc/<pid>/status`, in KiB (kernel threads have none).
pub(crate) fn vm_rss_kib(status: &str) -> Option<u64> {
    kib_field(status, "VmRSS:")
}

/// A `Name:   123 kB` line's value.
fn kib_field(text: &str, field: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(field))?;
    let mut parts = line[field.len()..].split_whitespace();
    let v = parts.next()?.parse().ok()?;
    match parts.next() {
        Some("kB") | None => Some(v),
        Some(_) => None,
    }
}

pub(crate) fn classify(argv: &[String]) -> Option<Role> {
    let exe = Path::new(argv.first()?).file_name()?.to_str()?;
    match exe {
        "capstan-node" if argv.iter().any(|a| a == "log-driver") => Some(Role::LogDriver),
        "capstan-node" => Some(Role::Agent),
        "capstan" if argv.iter().skip(1).any(|a| a == "server") => Some(Role::Master),
        _ => None,
    }
}

fn flag_value(argv: &[String], flag: &str) -> Option<String> {
    let eq = format!("{flag}=");
    argv.iter().enumerate().find_map(|(i, a)| {
        if a == flag {
            argv.get(i + 1).cloned()
        } else {
            a.strip_prefix(&eq).map(str::to_string)
        }
    })
}

/// A process's RSS in KiB, if it still runs.
pub(crate) fn rss_kib(pid: u32) -> Option<u64> {
    vm_rss_kib(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

/// Every Capstan process running now; with `under`, only those with an
/// argument containing it (a cluster's directory: masters' and agents'
/// `--data-dir`, log drivers' log paths).
pub(crate) fn scan(under: Option<&str>) -> Vec<Proc> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    let mut out = Vec::new();
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(raw) = std::fs::read(e.path().join("cmdline")) else { continue };
        let argv = split_cmdline(&raw);
        let Some(role) = classify(&argv) else { continue };
        if under.is_some_and(|u| !argv.iter().any(|a| a.contains(u))) {
            continue;
        }
        // Gone between the two reads: skip it.
        let Some(rss_kib) = rss_kib(pid) else { continue };
        let pss_kib = std::fs::read_to_string(e.path().join("smaps_rollup")).ok().and_then(|t| kib_field(&t, "Pss:"));
        out.push(Proc { pid, role, rss_kib, pss_kib, data_dir: flag_value(&argv, "--data-dir") });
    }
    out.sort_by_key(|p| p.pid);
    out
}

pub(crate) fn mib(kib: u64) -> f64 {
    (kib as f64 / 1024.0 * 10.0).round() / 10.0
}

/// Per role: count, total and largest RSS (MiB), and each process.
pub(crate) fn report(procs: &[Proc]) -> Value {
    let group = |role: Role| {
        let of: Vec<&Proc> = procs.iter().filter(|p| p.role == role).collect();
        json!({
            "count": of.len(),
            "total_mib": mib(of.iter().map(|p| p.rss_kib).sum()),
            "max_mib": mib(of.iter().map(|p| p.rss_kib).max().unwrap_or(0)),
            "pss_total_mib": mib(of.iter().filter_map(|p| p.pss_kib).sum()),
            "each": of.iter().map(|p| json!({"pid": p.pid, "rss_mib": mib(p.rss_kib), "pss_mib": p.pss_kib.map(mib), "data_dir": p.data_dir})).collect::<Vec<_>>(),
        })
    };
    json!({"agents": group(Role::Agent), "masters": group(Role::Master), "log_drivers": group(Role::LogDriver)})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &str) -> Vec<String> {
        s.split(' ').map(str::to_string).collect()
    }

    #[test]
    fn cmdline_splits_on_nul() {
        assert_eq!(split_cmdline(b"capstan\0server\0--data-dir\0/tmp/a\0"), argv("capstan server --data-dir /tmp/a"));
        assert_eq!(split_cmdline(b"no-trailing-nul"), argv("no-trailing-nul"));
        assert!(split_cmdline(b"").is_empty());
    }

    #[test]
    fn rss_from_status() {
        let status = "Name:\tcapstan-node\nVmPeak:\t  200000 kB\nVmRSS:\t   23456 kB\nRssAnon:\t 1000 kB\n";
        assert_eq!(vm_rss_kib(status), Some(23456));
        assert_eq!(vm_rss_kib("Name:\tkthreadd\nState:\tS (sleeping)\n"), None);
        let rollup = "55d0-7ffd ---p 00000000 00:00 0  [rollup]\nRss:   30000 kB\nPss:   9000 kB\nPss_Anon: 800 kB\n";
        assert_eq!(kib_field(rollup, "Pss:"), Some(9000));
    }

    #[test]
    fn roles_from_argv() {
        assert_eq!(classify(&argv("/x/debug/capstan-node --data-dir d --runtime sim")), Some(Role::Agent));
        assert_eq!(classify(&argv("capstan-node log-driver {}")), Some(Role::LogDriver));
        assert_eq!(classify(&argv("/x/capstan --log-level info server --data-dir /d/master-1")), Some(Role::Master));
        assert_eq!(classify(&argv("/x/capstan up --data-dir /d")), None);
        assert_eq!(classify(&argv("/x/capstan-bench pod-startup")), None);
        assert_eq!(classify(&argv("containerd --config c")), None);
        assert_eq!(classify(&[]), None);
    }

    #[test]
    fn data_dir_either_form() {
        assert_eq!(flag_value(&argv("capstan server --data-dir /d/m1"), "--data-dir").as_deref(), Some("/d/m1"));
        assert_eq!(flag_value(&argv("capstan server --data-dir=/d/m2"), "--data-dir").as_deref(), Some("/d/m2"));
        assert_eq!(flag_value(&argv("capstan server"), "--data-dir"), None);
    }

    #[test]
    fn report_groups_by_role() {
        let p = |pid, role, rss_kib| Proc { pid, role, rss_kib, pss_kib: Some(rss_kib / 2), data_dir: None };
        let r = report(&[p(1, Role::Master, 102400), p(2, Role::Master, 204800), p(3, Role::Agent, 20480)]);
        assert_eq!(r["masters"]["count"], 2);
        assert_eq!(r["masters"]["total_mib"], 300.0);
        assert_eq!(r["masters"]["max_mib"], 200.0);
        assert_eq!(r["masters"]["pss_total_mib"], 150.0);
        assert_eq!(r["agents"]["total_mib"], 20.0);
        assert_eq!(r["log_drivers"]["count"], 0);
    }

    #[test]
    fn this_process_has_an_rss() {
        assert!(rss_kib(std::process::id()).is_some_and(|k| k > 0));
    }
}
