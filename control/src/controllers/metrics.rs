//! Controller and scheduler metrics, with Kubernetes' names.

use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};

#[derive(Clone)]
pub struct ControllerMetrics {
    /// `workqueue_depth{name}`: keys waiting (ready or backing off).
    pub depth: IntGaugeVec,
    /// `workqueue_work_duration_seconds{name}`: one reconcile.
    pub work: HistogramVec,
    /// `workqueue_retries_total{name}`: failed reconciles put back with backoff.
    pub retries: IntCounterVec,
    /// `scheduler_schedule_attempts_total{result}`: scheduled, unschedulable, error.
    pub attempts: IntCounterVec,
    /// `scheduler_pod_scheduling_duration_seconds`: pod creation to binding.
    pub scheduling: Histogram,
    /// `scheduler_scheduling_algorithm_duration_seconds`: filtering and
    /// scoring one pod (and preemption when it fits nowhere).
    pub algorithm: Histogram,
    /// `scheduler_pending_pods{queue}`: pods waiting ("active") or fitting nowhere ("unschedulable").
    pub pending: IntGaugeVec,
    /// `capstan_events_recorded_total{result}`: events the controllers
    /// recorded — written (a new Event), aggregated (an Event's count
    /// bumped), dropped (the recorder's queue was full), spam (throttled
    /// per object), failed (the write failed).
    pub events: IntCounterVec,
    /// `capstan_node_status_condition{condition="Ready",status}`: nodes by
    /// their Ready condition (true, false, unknown), as kube-state-metrics' `kube_node_status_condition`.
    pub node_ready: IntGaugeVec,
    /// `capstan_pods_crash_looping`: pods with a container in CrashLoopBackOff.
    pub crash_looping: prometheus::IntGauge,
}

impl ControllerMetrics {
    pub fn new(r: &Registry) -> prometheus::Result<ControllerMetrics> {
        let buckets = vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
        let node_ready = IntGaugeVec::new(
            Opts::new("capstan_node_status_condition", "Nodes by the status of their Ready condition.")
                .const_label("condition", "Ready"),
            &["status"],
        )?;
        let crash_looping =
            prometheus::IntGauge::new("capstan_pods_crash_looping", "Pods with a container in CrashLoopBackOff.")?;
        let m = ControllerMetrics {
            node_ready,
            crash_looping,
            depth: IntGaugeVec::new(
                Opts::new("workqueue_depth", "Keys waiting in a controller's work queue."),
                &["name"],
            )?,
            work: HistogramVec::new(
                HistogramOpts::new("workqueue_work_duration_seconds", "Time one reconcile takes.")
                    .buckets(buckets.clone()),
                &["name"],
            )?,
            retries: IntCounterVec::new(
                Opts::new("workqueue_retries_total", "Failed reconciles retried with backoff."),
                &["name"],
            )?,
            attempts: IntCounterVec::new(
                Opts::new("scheduler_schedule_attempts_total", "Scheduling attempts by result."),
                &["result"],
            )?,
            scheduling: Histogram::with_opts(
                HistogramOpts::new("scheduler_pod_scheduling_duration_seconds", "From pod creation to its binding.")
                    .buckets(buckets),
            )?,
            algorithm: Histogram::with_opts(
                HistogramOpts::new("scheduler_scheduling_algorithm_duration_seconds", "Scheduling algorithm latency.")
                    .buckets(vec![0.00001, 0.00003, 0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03, 0.1]),
            )?,
            pending: IntGaugeVec::new(
                Opts::new(
                    "scheduler_pending_pods",
                    "Pods waiting for a node, by queue (active, backoff, unschedulable).",
                ),
                &["queue"],
            )?,
            events: IntCounterVec::new(
                Opts::new(
                    "capstan_events_recorded_total",
                    "Events recorded by controllers and the scheduler, by result.",
                ),
                &["result"],
            )?,
        };
        for status in ["true", "false", "unknown"] {
            m.node_ready.with_label_values(&[status]);
        }
        for result in ["written", "aggregated", "dropped", "spam", "failed"] {
            m.events.with_label_values(&[result]);
        }
        r.register(Box::new(m.depth.clone()))?;
        r.register(Box::new(m.work.clone()))?;
        r.register(Box::new(m.retries.clone()))?;
        r.register(Box::new(m.attempts.clone()))?;
        r.register(Box::new(m.scheduling.clone()))?;
        r.register(Box::new(m.pending.clone()))?;
        r.register(Box::new(m.algorithm.clone()))?;
        r.register(Box::new(m.events.clone()))?;
        r.register(Box::new(m.node_ready.clone()))?;
        r.register(Box::new(m.crash_looping.clone()))?;
        Ok(m)
    }
}
