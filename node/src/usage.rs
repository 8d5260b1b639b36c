//! Resource usage reports: what a kubelet's `/metrics/resource` gives
//! metrics-server. Every [`INTERVAL`] the agent samples each running
//! container's cumulative CPU counter and working set from the runtime, and
//! the node's CPU and memory from `/proc`, and sends one
//! `NodeRequest::Usage`; the masters serve the latest report as
//! `metrics.k8s.io` (`kubectl top`, the HorizontalPodAutoscaler).
//!
//! The math is pure ([`Sampler`], [`nanocores`], [`parse_proc_stat`],
//! [`parse_meminfo`]); [`report_loop`] is the thin shell that does IO.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use capstan_proto::nodewire::{NodeRequest, NodeUsage, PodUsage};

use crate::conn::Masters;
use crate::runtime::{ContainerState, Runtime, LABEL_CONTAINER_NAME, LABEL_POD_NAME, LABEL_POD_NAMESPACE};

/// How often usage is sampled and reported (metrics-server's default resolution).
pub const INTERVAL: Duration = Duration::from_secs(15);

/// One reading of a cumulative CPU counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuSample {
    /// Monotonic clock, nanoseconds.
    pub at_nanos: u64,
    /// CPU time used so far, nanoseconds.
    pub used_nanos: u64,
}

/// CPU use between two readings of a cumulative counter, in nanocores
/// (1e9 = one core busy the whole time). `None` when no time passed or the
/// counter went backwards (the container was replaced).
pub fn nanocores(prev: CpuSample, cur: CpuSample) -> Option<u64> {
    let dt = cur.at_nanos.checked_sub(prev.at_nanos).filter(|d| *d > 0)?;
    let used = cur.used_nanos.checked_sub(prev.used_nanos)?;
    Some((used as u128 * 1_000_000_000 / dt as u128) as u64)
}

/// The node's CPU time from the first line of `/proc/stat`, in jiffies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuTimes {
    pub busy: u64,
    pub total: u64,
    /// CPUs listed (`cpuN` lines).
    pub cpus: u64,
}

/// Parses `/proc/stat`: busy = everything but idle and iowait (guest time
/// is already inside user and nice, so it is not added again).
pub fn parse_proc_stat(s: &str) -> Option<CpuTimes> {
    let first = s.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = first.split_whitespace().skip(1).take(8).map(|x| x.parse().unwrap_or(0)).collect();
    if v.len() < 4 {
        return None;
    }
    let total: u64 = v.iter().sum();
    let idle = v[3] + v.get(4).copied().unwrap_or(0);
    let cpus = s
        .lines()
        .filter(|l| l.strip_prefix("cpu").and_then(|r| r.chars().next()).is_some_and(|c| c.is_ascii_digit()))
        .count() as u64;
    Some(CpuTimes { busy: total - idle, total, cpus: cpus.max(1) })
}

/// Node CPU in nanocores between two `/proc/stat` readings.
pub fn node_nanocores(prev: CpuTimes, cur: CpuTimes) -> Option<u64> {
    let total = cur.total.checked_sub(prev.total).filter(|t| *t > 0)?;
    let busy = cur.busy.checked_sub(prev.busy)?.min(total);
    Some((busy as u128 * cur.cpus as u128 * 1_000_000_000 / total as u128) as u64)
}

/// Memory in use (MemTotal - MemAvailable) in bytes, from `/proc/meminfo`.
pub fn parse_meminfo(s: &str) -> Option<u64> {
    let kib = |key: &str| {
        s.lines().find_map(|l| l.strip_prefix(key)).and_then(|r| r.split_whitespace().next()?.parse::<u64>().ok())
    };
    Some(kib("MemTotal:")?.saturating_sub(kib("MemAvailable:")?) * 1024)
}

/// A pod's containers' usage: (container, CPU nanocores, memory bytes).
type ContainerUsage = Vec<(String, u64, u64)>;

/// One running container as sampled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerSample {
    pub id: String,
    pub namespace: String,
    pub pod: String,
    pub name: String,
    /// How long it has been running (the rate of its first reading).
    pub running_nanos: u64,
    pub cpu_used_nanos: u64,
    pub memory_bytes: u64,
}

/// Remembers the previous readings so each report carries rates over the
/// last interval. Pure: the caller passes the clock and the readings.
#[derive(Default)]
pub struct Sampler {
    containers: HashMap<String, CpuSample>,
    node: Option<CpuTimes>,
}

impl Sampler {
    /// A report from this round's readings. A container seen for the first
    /// time is rated over its whole run so far; the node's CPU is 0 until a
    /// second `/proc/stat` reading exists.
    pub fn report(
        &mut self,
        now_nanos: u64,
        timestamp: String,
        containers: &[ContainerSample],
        node_cpu: Option<CpuTimes>,
        node_memory: u64,
    ) -> NodeUsage {
        let mut pods: BTreeMap<(String, String), ContainerUsage> = BTreeMap::new();
        let mut seen = HashMap::new();
        for c in containers {
            let cur = CpuSample { at_nanos: now_nanos, used_nanos: c.cpu_used_nanos };
            let first = CpuSample { at_nanos: now_nanos.saturating_sub(c.running_nanos), used_nanos: 0 };
            let prev = self.containers.get(&c.id).copied().filter(|p| p.used_nanos <= cur.used_nanos);
            let cpu = nanocores(prev.unwrap_or(first), cur).unwrap_or(0);
            seen.insert(c.id.clone(), cur);
            pods.entry((c.namespace.clone(), c.pod.clone())).or_default().push((c.name.clone(), cpu, c.memory_bytes));
        }
        self.containers = seen;
        let cpu = match (self.node, node_cpu) {
            (Some(prev), Some(cur)) => node_nanocores(prev, cur).unwrap_or(0),
            _ => 0,
        };
        if node_cpu.is_some() {
            self.node = node_cpu;
        }
        NodeUsage {
            timestamp,
            window_seconds: INTERVAL.as_secs() as u32,
            cpu_nanocores: cpu,
            memory_bytes: node_memory,
            pods: pods
                .into_iter()
                .map(|((namespace, name), mut containers)| {
                    containers.sort();
                    PodUsage { namespace, name, containers }
                })
                .collect(),
        }
    }
}

/// Reads every running container's usage from the runtime.
async fn sample_containers<R: Runtime>(rt: &R) -> Vec<ContainerSample> {
    let Ok(list) = rt.list_containers().await else { return vec![] };
    let mut out = Vec::new();
    for c in list {
        let ContainerState::Running { started_at } = c.state else { continue };
        let label = |k: &str| c.labels.get(k).cloned().unwrap_or_default();
        let (namespace, pod) = (label(LABEL_POD_NAMESPACE), label(LABEL_POD_NAME));
        if namespace.is_empty() || pod.is_empty() {
            continue;
        }
        let Ok(u) = rt.usage(&c.id).await else { continue };
        let running = SystemTime::now().duration_since(started_at).unwrap_or_default();
        let name = c.labels.get(LABEL_CONTAINER_NAME).cloned().unwrap_or(c.name.clone());
        out.push(ContainerSample {
            id: c.id,
            namespace,
            pod,
            name,
            running_nanos: running.as_nanos() as u64,
            cpu_used_nanos: u.cpu_usage_nanos,
            memory_bytes: u.memory_working_set_bytes,
        });
    }
    out
}

/// Samples and reports until the process ends; a failed report is logged
/// and the next one goes out on schedule (stale metrics expire on the masters).
pub async fn report_loop<R: Runtime>(rt: Arc<R>, masters: Arc<Masters>) {
    let origin = Instant::now();
    let mut sampler = Sampler::default();
    loop {
        let containers = sample_containers(rt.as_ref()).await;
        let node_cpu = std::fs::read_to_string("/proc/stat").ok().and_then(|s| parse_proc_stat(&s));
        let node_mem = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| parse_meminfo(&s)).unwrap_or(0);
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let usage = sampler.report(origin.elapsed().as_nanos() as u64, now, &containers, node_cpu, node_mem);
        if let Err(e) = masters.expect(&NodeRequest::Usage { usage }).await {
            tracing::debug!(error = %format!("{e:#}"), "usage report failed");
        }
        tokio::time::sleep(INTERVAL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn nanocores_is_the_counter_delta_over_the_window() {
        let a = CpuSample { at_nanos: 10 * SEC, used_nanos: 1_000 };
        // 3 s of CPU over 15 s = 0.2 cores.
        let b = CpuSample { at_nanos: 25 * SEC, used_nanos: 1_000 + 3 * SEC };
        assert_eq!(nanocores(a, b), Some(200_000_000));
        assert_eq!(nanocores(b, b), None, "no time passed");
        let reset = CpuSample { at_nanos: 30 * SEC, used_nanos: 5 };
        assert_eq!(nanocores(b, reset), None, "counter went back");
        // Two full cores for 2 s.
        assert_eq!(
            nanocores(CpuSample { at_nanos: 0, used_nanos: 0 }, CpuSample { at_nanos: 2 * SEC, used_nanos: 4 * SEC }),
            Some(2 * SEC)
        );
    }

    #[test]
    fn proc_stat_and_meminfo() {
        let stat =
            "cpu  100 10 50 800 40 0 0 0 0 0\ncpu0 50 5 25 400 20 0 0 0 0 0\ncpu1 50 5 25 400 20 0 0 0 0 0\nintr 1 2\n";
        let t = parse_proc_stat(stat).unwrap();
        assert_eq!(t, CpuTimes { busy: 160, total: 1000, cpus: 2 });
        let later = CpuTimes { busy: 260, total: 1200, cpus: 2 };
        // 100 busy of 200 jiffies on 2 CPUs = one core.
        assert_eq!(node_nanocores(t, later), Some(SEC));
        assert_eq!(node_nanocores(later, later), None);
        assert!(parse_proc_stat("intr 1").is_none());
        let mem = "MemTotal:       16000 kB\nMemFree:  100 kB\nMemAvailable:   12000 kB\n";
        assert_eq!(parse_meminfo(mem), Some(4000 * 1024));
        assert_eq!(parse_meminfo("MemTotal: 5 kB\n"), None);
    }

    fn c(id: &str, pod: &str, name: &str, running: u64, used: u64, mem: u64) -> ContainerSample {
        ContainerSample {
            id: id.into(),
            namespace: "d".into(),
            pod: pod.into(),
            name: name.into(),
            running_nanos: running,
            cpu_used_nanos: used,
            memory_bytes: mem,
        }
    }

    #[test]
    fn sampler_rates_first_readings_over_their_run_then_over_the_interval() {
        let mut s = Sampler::default();
        let node = CpuTimes { busy: 0, total: 0, cpus: 1 };
        // First sight: 1 s of CPU over a 10 s run = 100m.
        let r = s.report(
            100 * SEC,
            "t1".into(),
            &[c("a", "p", "x", 10 * SEC, SEC, 7), c("b", "p", "y", SEC, 0, 1)],
            Some(node),
            99,
        );
        assert_eq!(r.cpu_nanocores, 0, "no previous node reading");
        assert_eq!(r.memory_bytes, 99);
        assert_eq!(r.window_seconds, 15);
        assert_eq!(r.pods.len(), 1);
        assert_eq!(r.pods[0].containers, vec![("x".into(), 100_000_000, 7), ("y".into(), 0, 1)]);
        // 15 s later: 3 s more CPU = 200m; b is gone and forgotten.
        let later = CpuTimes { busy: 15, total: 30, cpus: 2 };
        let r = s.report(
            115 * SEC,
            "t2".into(),
            &[c("a", "p", "x", 25 * SEC, 4 * SEC, 8), c("c", "q", "z", 0, 0, 0)],
            Some(later),
            5,
        );
        assert_eq!(r.pods[0].containers, vec![("x".into(), 200_000_000, 8)]);
        assert_eq!(r.pods[1].name, "q");
        assert_eq!(r.pods[1].containers, vec![("z".into(), 0, 0)], "no time run yet: zero, not a division by zero");
        assert_eq!(r.cpu_nanocores, SEC, "half of 2 CPUs busy");
        assert_eq!(s.containers.len(), 2);
        // A replaced container with the same id (counter went back) is rated from its own start.
        let r = s.report(130 * SEC, "t3".into(), &[c("a", "p", "x", 2 * SEC, SEC, 8)], None, 5);
        assert_eq!(r.pods[0].containers[0].1, 500_000_000);
    }
}
