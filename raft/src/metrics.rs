//! Prometheus metrics of the store.
//!
//! Metrics are created unregistered, so every component can be built in
//! tests; `register` attaches them to the registry a process serves on
//! `/metrics`. Counters and histograms are updated where things happen;
//! gauges describing state (term, leader, indexes, sizes) are refreshed from
//! the live state just before each scrape (`StoreNode::refresh_metrics`).

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

fn counter(name: &str, help: &str) -> IntCounter {
    IntCounter::new(name, help).expect("valid metric")
}

fn gauge(name: &str, help: &str) -> IntGauge {
    IntGauge::new(name, help).expect("valid metric")
}

fn histogram(name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets)).expect("valid metric")
}

/// 100 µs .. ~6.5 s, doubling.
fn latency_buckets() -> Vec<f64> {
    prometheus::exponential_buckets(0.0001, 2.0, 17).expect("valid buckets")
}

pub struct WatchMetrics {
    pub events_sent: IntCounter,
    pub lagged: IntCounter,
    pub cancelled: IntCounterVec,
    pub watchers: IntGauge,
    /// Time from a revision's apply to its delivery to a watcher.
    pub delivery_lag: Histogram,
}

impl Default for WatchMetrics {
    fn default() -> Self {
        WatchMetrics {
            events_sent: counter("capstan_watch_events_sent_total", "Watch events delivered to watchers."),
            lagged: counter(
                "capstan_watch_lagged_total",
                "Times a watcher fell behind the live stream and caught up from history.",
            ),
            cancelled: IntCounterVec::new(
                Opts::new("capstan_watch_cancelled_total", "Watchers cancelled by the server, by reason."),
                &["reason"],
            )
            .expect("valid metric"),
            watchers: gauge("capstan_watch_watchers", "Active watchers."),
            delivery_lag: histogram(
                "capstan_watch_delivery_lag_seconds",
                "Time from a revision's apply to its delivery to a watcher.",
                latency_buckets(),
            ),
        }
    }
}

impl WatchMetrics {
    pub fn register(&self, r: &Registry) -> prometheus::Result<()> {
        r.register(Box::new(self.events_sent.clone()))?;
        r.register(Box::new(self.lagged.clone()))?;
        r.register(Box::new(self.cancelled.clone()))?;
        r.register(Box::new(self.watchers.clone()))?;
        r.register(Box::new(self.delivery_lag.clone()))?;
        Ok(())
    }
}

/// Log and state-machine IO.
pub struct StorageMetrics {
    pub fsync: Histogram,
    pub appended_entries: IntCounter,
    pub snapshot_build: Histogram,
    pub snapshot_install: Histogram,
    pub snapshot_size: IntGauge,
    pub compaction: Histogram,
}

impl Default for StorageMetrics {
    fn default() -> Self {
        StorageMetrics {
            fsync: histogram(
                "capstan_raft_log_fsync_duration_seconds",
                "Duration of a Raft log WAL sync (one per group commit).",
                latency_buckets(),
            ),
            appended_entries: counter("capstan_raft_log_appended_entries_total", "Entries appended to the Raft log."),
            snapshot_build: histogram(
                "capstan_raft_snapshot_build_duration_seconds",
                "Duration of building a Raft snapshot.",
                latency_buckets(),
            ),
            snapshot_install: histogram(
                "capstan_raft_snapshot_install_duration_seconds",
                "Duration of installing a Raft snapshot received from the leader.",
                latency_buckets(),
            ),
            snapshot_size: gauge("capstan_raft_snapshot_size_bytes", "Size of the latest Raft snapshot."),
            compaction: histogram(
                "capstan_store_compaction_duration_seconds",
                "Duration of applying a history compaction.",
                latency_buckets(),
            ),
        }
    }
}

impl StorageMetrics {
    pub fn register(&self, r: &Registry) -> prometheus::Result<()> {
        r.register(Box::new(self.fsync.clone()))?;
        r.register(Box::new(self.appended_entries.clone()))?;
        r.register(Box::new(self.snapshot_build.clone()))?;
        r.register(Box::new(self.snapshot_install.clone()))?;
        r.register(Box::new(self.snapshot_size.clone()))?;
        r.register(Box::new(self.compaction.clone()))?;
        Ok(())
    }
}

/// Raft and store state, refreshed at scrape time, plus proposal counters.
pub struct NodeMetrics {
    pub term: IntGauge,
    pub is_leader: IntGauge,
    pub has_leader: IntGauge,
    pub leader_changes: IntCounter,
    pub last_log_index: IntGauge,
    pub applied_index: IntGauge,
    pub apply_lag: IntGauge,
    pub proposals_committed: IntCounter,
    pub proposals_failed: IntCounter,
    pub revision: IntGauge,
    pub compacted_revision: IntGauge,
    pub keys: IntGauge,
    pub data_bytes: IntGauge,
    pub db_size_bytes: IntGauge,
    pub quota_bytes: IntGauge,
    pub alarm_nospace: IntGauge,
    pub alarm_disk_low: IntGauge,
    pub members: IntGauge,
    pub peer_rtt: prometheus::GaugeVec,
}

impl Default for NodeMetrics {
    fn default() -> Self {
        NodeMetrics {
            term: gauge("capstan_raft_term", "Current Raft term."),
            is_leader: gauge("capstan_raft_is_leader", "1 if this master is the Raft leader."),
            has_leader: gauge("capstan_raft_has_leader", "1 if this master knows a Raft leader."),
            leader_changes: counter("capstan_raft_leader_changes_total", "Leader changes seen by this master."),
            last_log_index: gauge("capstan_raft_last_log_index", "Index of the last entry in the local Raft log."),
            applied_index: gauge("capstan_raft_applied_index", "Index of the last entry applied to the state machine."),
            apply_lag: gauge("capstan_raft_apply_lag_entries", "Local log entries not yet applied."),
            proposals_committed: counter(
                "capstan_raft_proposals_committed_total",
                "Client commands committed through this master.",
            ),
            proposals_failed: counter(
                "capstan_raft_proposals_failed_total",
                "Client commands proposed through this master that failed.",
            ),
            revision: gauge("capstan_store_revision", "Current store revision."),
            compacted_revision: gauge("capstan_store_compacted_revision", "Revision history is compacted up to."),
            keys: gauge("capstan_store_keys", "Live keys in the store."),
            data_bytes: gauge(
                "capstan_store_data_bytes",
                "Bytes of keys and values held, all revisions (quota basis).",
            ),
            db_size_bytes: gauge("capstan_store_db_size_bytes", "On-disk size of the RocksDB database."),
            quota_bytes: gauge("capstan_store_quota_bytes", "Hard quota on stored data."),
            alarm_nospace: gauge("capstan_store_alarm_nospace", "1 while stored data is over the soft quota."),
            alarm_disk_low: gauge(
                "capstan_store_alarm_disk_low",
                "1 while this master's data disk is below its free-space floor (writes refused cluster-wide).",
            ),
            members: gauge("capstan_raft_members", "Members (voters and learners) in the Raft membership."),
            peer_rtt: prometheus::GaugeVec::new(
                Opts::new("capstan_peer_rtt_seconds", "QUIC round-trip time to each peer master this one dials."),
                &["peer"],
            )
            .expect("valid metric"),
        }
    }
}

impl NodeMetrics {
    pub fn register(&self, r: &Registry) -> prometheus::Result<()> {
        for g in [
            &self.term,
            &self.is_leader,
            &self.has_leader,
            &self.last_log_index,
            &self.applied_index,
            &self.apply_lag,
            &self.revision,
            &self.compacted_revision,
            &self.keys,
            &self.data_bytes,
            &self.db_size_bytes,
            &self.quota_bytes,
            &self.alarm_nospace,
            &self.alarm_disk_low,
            &self.members,
        ] {
            r.register(Box::new(g.clone()))?;
        }
        for c in [&self.leader_changes, &self.proposals_committed, &self.proposals_failed] {
            r.register(Box::new(c.clone()))?;
        }
        r.register(Box::new(self.peer_rtt.clone()))?;
        Ok(())
    }
}

/// The standard `process_*` metrics, with `process_cpu_seconds_total` to
/// the clock tick as Prometheus' other clients report it: the prometheus
/// crate truncates it to whole seconds, too coarse for the CPU of a
/// benchmark phase or a short `rate()`.
pub struct ProcessMetrics(prometheus::process_collector::ProcessCollector);

impl ProcessMetrics {
    pub fn for_self() -> ProcessMetrics {
        ProcessMetrics(prometheus::process_collector::ProcessCollector::for_self())
    }
}

/// User plus system CPU of this process so far, in seconds.
pub fn own_cpu_seconds() -> Option<f64> {
    // SAFETY: getrusage only writes the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return None;
    }
    let s = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Some(s(u.ru_utime) + s(u.ru_stime))
}

impl prometheus::core::Collector for ProcessMetrics {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.0.desc()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let mut families = self.0.collect();
        let Some(cpu) = own_cpu_seconds() else { return families };
        let cpu_family = families.iter_mut().filter(|f| f.name() == "process_cpu_seconds_total");
        for m in cpu_family.flat_map(|f| f.mut_metric().iter_mut()) {
            let mut c = prometheus::proto::Counter::default();
            c.set_value(cpu);
            m.set_counter(c);
        }
        families
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::core::Collector;

    /// A fresh test process has used well under a second of CPU: the
    /// crate's own collector says 0 there, this one says how much.
    #[test]
    fn process_cpu_is_reported_to_the_tick() {
        // Spins until the process has used 40 ms of CPU (not wall time: a
        // busy machine may give this thread less than its wall time).
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while own_cpu_seconds().unwrap() < 0.04 && start.elapsed() < std::time::Duration::from_secs(30) {
            for _ in 0..10_000 {
                x = x.wrapping_mul(31).wrapping_add(7);
            }
        }
        std::hint::black_box(x);
        let families = ProcessMetrics::for_self().collect();
        let cpu = families.iter().find(|f| f.name() == "process_cpu_seconds_total").expect("cpu family");
        let reported = cpu.get_metric()[0].get_counter().get_value();
        let now = own_cpu_seconds().unwrap();
        assert!(reported >= 0.04 && reported <= now, "reported {reported}, own {now}");
        assert!(families.iter().any(|f| f.name() == "process_resident_memory_bytes"));
    }
}
