//! Job controller: runs pods to completion — `parallelism` at a time until
//! `completions` succeed (or, without completions, until one succeeds and
//! none run), failing the Job past `backoffLimit` failed pods or its
//! `activeDeadlineSeconds`, replacing failed pods after Kubernetes' backoff
//! (10 s doubling per failure, at most 10 min); Indexed jobs give each pod an index; finished
//! Jobs are deleted `ttlSecondsAfterFinished` later; suspended Jobs run no pods.
//!
//! [`plan`] is pure; the shell writes pods, status and deletions with
//! expectations like the ReplicaSet controller. Counts never go down: a
//! finished pod that is deleted still counts (status keeps the maximum).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use serde_json::{json, Value};

use super::events::{EventRecorder, EventType};
use super::informer::Informer;
use super::owned::{self, Expectations, Start};
use super::runtime::{ReconcileResult, Reconciler};
use crate::api::objects::Found;
use crate::api::{internal, ApiServer};

pub const INDEX_ANNOTATION: &str = "batch.kubernetes.io/job-completion-index";

#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Pods to create: `Some(index)` for Indexed jobs.
    pub create: Vec<Option<i64>>,
    pub delete: Vec<String>,
    pub status: Value,
    /// Delete the Job itself (TTL after finishing passed).
    pub delete_job: bool,
    /// Look again after this long (deadline, TTL).
    pub requeue: Option<Duration>,
}

fn phase(p: &Value) -> &str {
    p["status"]["phase"].as_str().unwrap_or("Pending")
}

fn index_of(p: &Value) -> Option<i64> {
    p["metadata"]["annotations"][INDEX_ANNOTATION].as_str().and_then(|i| i.parse().ok())
}

fn ts(v: &Value) -> Option<DateTime<Utc>> {
    v.as_str().and_then(|t| DateTime::parse_from_rfc3339(t).ok()).map(|t| t.with_timezone(&Utc))
}

fn finished(job: &Value) -> Option<&str> {
    job["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| (c["type"] == "Complete" || c["type"] == "Failed") && c["status"] == "True")
        .and_then(|c| c["type"].as_str())
}

fn condition(ty: &str, reason: &str, message: &str, now: &str) -> Value {
    json!({"type": ty, "status": "True", "reason": reason, "message": message,
        "lastProbeTime": now, "lastTransitionTime": now})
}

/// `pods`: the pods this Job controls.
pub fn plan(job: &Value, pods: &[Value], now: DateTime<Utc>) -> Plan {
    let now_s = now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let spec = &job["spec"];
    let status = &job["status"];
    let parallelism = spec["parallelism"].as_i64().unwrap_or(1).max(0);
    let completions = spec["completions"].as_i64();
    let indexed = spec["completionMode"] == "Indexed";
    let backoff_limit = spec["backoffLimit"].as_i64().unwrap_or(6);
    let active: Vec<&Value> = pods
        .iter()
        .filter(|p| !matches!(phase(p), "Succeeded" | "Failed") && !p["metadata"]["deletionTimestamp"].is_string())
        .collect();
    let succeeded_pods: Vec<&Value> = pods.iter().filter(|p| phase(p) == "Succeeded").collect();
    let succeeded = (succeeded_pods.len() as i64).max(status["succeeded"].as_i64().unwrap_or(0));
    let failed =
        (pods.iter().filter(|p| phase(p) == "Failed").count() as i64).max(status["failed"].as_i64().unwrap_or(0));
    let mut done_indexes: BTreeSet<i64> = succeeded_pods.iter().filter_map(|p| index_of(p)).collect();
    if let Some(prev) = status["completedIndexes"].as_str() {
        done_indexes.extend(parse_indexes(prev));
    }
    let start = ts(&status["startTime"]).unwrap_or(now);
    let mut out = status.clone();
    if !out.is_object() {
        out = json!({});
    }
    out["startTime"] = json!(start.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
    out["succeeded"] = json!(succeeded);
    out["failed"] = json!(failed);
    out["ready"] = json!(active.iter().filter(|p| super::replicaset::is_ready(p)).count());
    if indexed {
        out["completedIndexes"] = json!(format_indexes(&done_indexes));
    }
    let active_names =
        || active.iter().map(|p| p["metadata"]["name"].as_str().unwrap_or_default().to_string()).collect::<Vec<_>>();
    let mut plan = Plan { create: vec![], delete: vec![], status: out, delete_job: false, requeue: None };

    if let Some(kind) = finished(job) {
        plan.delete = active_names();
        plan.status["active"] = json!(0);
        let done_at = ts(&status["completionTime"]).or_else(|| {
            status["conditions"]
                .as_array()?
                .iter()
                .find(|c| c["type"] == kind)
                .and_then(|c| ts(&c["lastTransitionTime"]))
        });
        if let (Some(ttl), Some(at)) = (spec["ttlSecondsAfterFinished"].as_i64(), done_at) {
            let expires = at + chrono::Duration::seconds(ttl);
            if expires <= now {
                plan.delete_job = true;
            } else {
                plan.requeue = Some((expires - now).to_std().unwrap_or_default());
            }
        }
        return plan;
    }
    let deadline = spec["activeDeadlineSeconds"].as_i64().map(|s| start + chrono::Duration::seconds(s));
    let failure = if failed > backoff_limit {
        Some(("BackoffLimitExceeded", "Job has reached the specified backoff limit"))
    } else if deadline.is_some_and(|d| d <= now) {
        Some(("DeadlineExceeded", "Job was active longer than specified deadline"))
    } else {
        None
    };
    let complete = match completions {
        Some(c) if indexed => (0..c).all(|i| done_indexes.contains(&i)),
        Some(c) => succeeded >= c,
        None => succeeded > 0 && active.is_empty(),
    };
    let mut conditions: Vec<Value> = status["conditions"].as_array().cloned().unwrap_or_default();
    if let Some((reason, message)) = failure {
        conditions.push(condition("Failed", reason, message, &now_s));
        plan.delete = active_names();
        plan.status["active"] = json!(0);
        plan.status["conditions"] = Value::Array(conditions);
        return plan;
    }
    if complete {
        conditions.push(condition("Complete", "", "", &now_s));
        plan.status["completionTime"] = json!(now_s);
        plan.status["conditions"] = Value::Array(conditions);
        plan.status["active"] = json!(active.len());
        plan.requeue = spec["ttlSecondsAfterFinished"].as_i64().map(|t| Duration::from_secs(t.max(0) as u64));
        return plan;
    }
    plan.status["active"] = json!(active.len());
    let suspended = spec["suspend"] == true;
    let wanted = if suspended {
        0
    } else {
        match completions {
            Some(c) => parallelism.min((c - succeeded).max(0)),
            // Work queue: once one succeeded, no new pods.
            None if succeeded > 0 => 0,
            None => parallelism,
        }
    };
    let running = active.len() as i64;
    let deadline_in = deadline.map(|d| (d - now).to_std().unwrap_or_default());
    let backing_off = retry_at(pods, failed).filter(|at| *at > now);
    if running < wanted && backing_off.is_some() {
        // Kubernetes' pod failure backoff: no new pod until it runs out.
        let wait = backing_off.map(|at| (at - now).to_std().unwrap_or_default());
        plan.requeue = [wait, deadline_in].into_iter().flatten().min();
        return plan;
    }
    if running < wanted {
        let n = (wanted - running) as usize;
        if indexed {
            let busy: BTreeSet<i64> = active.iter().filter_map(|p| index_of(p)).collect();
            let free = (0..completions.unwrap_or(0)).filter(|i| !done_indexes.contains(i) && !busy.contains(i));
            plan.create = free.take(n).map(Some).collect();
        } else {
            plan.create = vec![None; n];
        }
    } else if running > wanted {
        let mut extra: Vec<&&Value> = active.iter().collect();
        extra.sort_by_key(|p| {
            std::cmp::Reverse(p["metadata"]["creationTimestamp"].as_str().unwrap_or_default().to_string())
        });
        plan.delete = extra[..(running - wanted) as usize]
            .iter()
            .map(|p| p["metadata"]["name"].as_str().unwrap_or_default().to_string())
            .collect();
    }
    plan.requeue = deadline_in;
    plan
}

/// The first pod failure backoff: Kubernetes' 10 s, doubling per failed
/// pod, at most 10 minutes.
pub const FAILURE_BACKOFF: Duration = Duration::from_secs(10);
pub const MAX_FAILURE_BACKOFF: Duration = Duration::from_secs(600);

/// When the last failed pod stopped: its containers' finish time, else its
/// last condition change, else its creation.
fn failed_at(p: &Value) -> Option<DateTime<Utc>> {
    let finished = p["status"]["containerStatuses"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| ts(&c["state"]["terminated"]["finishedAt"]))
        .max();
    let changed = || {
        p["status"]["conditions"].as_array().into_iter().flatten().filter_map(|c| ts(&c["lastTransitionTime"])).max()
    };
    finished.or_else(changed).or_else(|| ts(&p["metadata"]["creationTimestamp"]))
}

/// When a replacement may be created after `failed` failures (None: now).
fn retry_at(pods: &[Value], failed: i64) -> Option<DateTime<Utc>> {
    if failed <= 0 {
        return None;
    }
    let last = pods.iter().filter(|p| phase(p) == "Failed").filter_map(failed_at).max()?;
    let backoff = FAILURE_BACKOFF.saturating_mul(1u32 << (failed - 1).clamp(0, 16) as u32).min(MAX_FAILURE_BACKOFF);
    Some(last + chrono::Duration::from_std(backoff).unwrap_or_default())
}

/// "1,3-5" -> {1, 3, 4, 5}.
pub fn parse_indexes(s: &str) -> BTreeSet<i64> {
    let mut out = BTreeSet::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                if let (Ok(a), Ok(b)) = (a.parse::<i64>(), b.parse::<i64>()) {
                    out.extend(a..=b.min(a + 100_000));
                }
            }
            None => out.extend(part.parse::<i64>().ok()),
        }
    }
    out
}

/// {1, 3, 4, 5} -> "1,3-5", Kubernetes' completedIndexes format.
pub fn format_indexes(set: &BTreeSet<i64>) -> String {
    let mut parts = Vec::new();
    let mut iter = set.iter().copied().peekable();
    while let Some(start) = iter.next() {
        let mut end = start;
        while iter.peek() == Some(&(end + 1)) {
            end = iter.next().unwrap_or(end);
        }
        parts.push(if start == end { start.to_string() } else { format!("{start}-{end}") });
    }
    parts.join(",")
}

/// A pod of `job` (with its completion index, for Indexed jobs).
pub fn pod_for(job: &Value, index: Option<i64>) -> Value {
    let name = job["metadata"]["name"].as_str().unwrap_or_default();
    let t = &job["spec"]["template"];
    let mut meta = if t["metadata"].is_object() { t["metadata"].clone() } else { json!({}) };
    meta["generateName"] = json!(format!("{name}-"));
    meta["namespace"] = job["metadata"]["namespace"].clone();
    meta["ownerReferences"] = json!([{"apiVersion": "batch/v1", "kind": "Job", "name": name,
        "uid": job["metadata"]["uid"], "controller": true, "blockOwnerDeletion": true}]);
    let mut spec = t["spec"].clone();
    if let Some(i) = index {
        meta["annotations"][INDEX_ANNOTATION] = json!(i.to_string());
        meta["labels"][INDEX_ANNOTATION] = json!(i.to_string());
        meta["generateName"] = json!(format!("{name}-{i}-"));
        spec["hostname"] = json!(format!("{name}-{i}"));
        for c in spec["containers"].as_array_mut().into_iter().flatten() {
            if !c["env"].is_array() {
                c["env"] = json!([]);
            }
            if let Some(env) = c["env"].as_array_mut() {
                env.push(json!({"name": "JOB_COMPLETION_INDEX", "value": i.to_string()}));
            }
        }
    }
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec})
}

/// The event Kubernetes records when a Job finishes: `Completed` "Job
/// completed", or the Failed condition's reason and message as a Warning.
pub fn finish_event(job: &Value, status: &Value) -> Option<(EventType, String, String)> {
    if finished(job).is_some() {
        return None;
    }
    let c = status["conditions"]
        .as_array()?
        .iter()
        .find(|c| (c["type"] == "Complete" || c["type"] == "Failed") && c["status"] == "True")?;
    let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
    match c["type"].as_str()? {
        "Complete" => Some((EventType::Normal, "Completed".into(), "Job completed".into())),
        _ => Some((EventType::Warning, s(&c["reason"]), s(&c["message"]))),
    }
}

pub struct JobController {
    pub api: Arc<ApiServer>,
    pub jobs: Arc<Informer>,
    pub pods: Arc<Informer>,
    pub recorder: EventRecorder,
    expectations: Expectations,
}

impl JobController {
    pub fn new(api: Arc<ApiServer>, jobs: Arc<Informer>, pods: Arc<Informer>, recorder: EventRecorder) -> Self {
        JobController { api, jobs, pods, recorder, expectations: Expectations::default() }
    }

    pub fn keys_for_pod(&self, pod: &super::informer::Cached) -> Vec<String> {
        owned::owner_keys(&self.jobs, pod)
    }

    async fn run(self: Arc<Self>, key: String) -> ReconcileResult {
        let cached = match self.expectations.start(&self.jobs, &self.pods, &key) {
            Start::Nothing => return Ok(None),
            Start::Wait => return Ok(Some(Duration::from_millis(20))),
            Start::Go(c) => c,
        };
        let job = cached.object();
        let pods = owned::dependents_of(&self.pods, &cached);
        let p = plan(&job, &pods, Utc::now());
        let found = Found { object: job.clone(), mod_revision: cached.mod_revision };
        if p.delete_job {
            internal::delete(&self.api, self.jobs.rt, &found).await.map_err(|e| e.to_string())?;
            return Ok(None);
        }
        let creates = p.create.iter().map(|i| pod_for(&job, *i)).collect();
        let told = Some((&self.recorder, &job));
        let last = owned::create_all(&self.api, &self.pods, creates, "job-controller", told).await?;
        owned::delete_all(&self.api, &self.pods, cached.namespace(), &p.delete, told).await?;
        self.expectations.wrote(&key, last);
        if job["status"] != p.status {
            let told = finish_event(&job, &p.status);
            internal::write_status(&self.api, self.jobs.rt, &found, p.status).await.map_err(|e| e.to_string())?;
            if let Some((ty, reason, message)) = told {
                self.recorder.event(&job, ty, &reason, message);
            }
        }
        Ok(p.requeue)
    }
}

impl Reconciler for JobController {
    fn name(&self) -> &'static str {
        "job"
    }
    fn reconcile(self: Arc<Self>, key: String) -> BoxFuture<'static, ReconcileResult> {
        Box::pin(self.run(key))
    }
    fn all_keys(&self) -> Vec<String> {
        self.jobs.list().iter().map(|c| c.key.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(extra: Value) -> Value {
        let mut j = json!({"metadata": {"name": "pi", "namespace": "d", "uid": "j1"},
            "spec": {"completions": 3, "parallelism": 2, "backoffLimit": 1,
              "template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "i"}]}}}});
        json_patch::merge(&mut j, &extra);
        j
    }

    fn pod(name: &str, phase: &str, index: Option<i64>) -> Value {
        let mut p = json!({"metadata": {"name": name, "creationTimestamp": name}, "status": {"phase": phase}});
        if let Some(i) = index {
            p["metadata"]["annotations"] = json!({INDEX_ANNOTATION: i.to_string()});
        }
        p
    }

    #[test]
    fn runs_parallelism_pods_until_completions_succeed() {
        let now = Utc::now();
        let p = plan(&job(json!({})), &[], now);
        assert_eq!(p.create.len(), 2);
        let p = plan(&job(json!({})), &[pod("a", "Succeeded", None), pod("b", "Running", None)], now);
        assert_eq!(p.create.len(), 1, "2 remain, 1 running");
        let p = plan(
            &job(json!({})),
            &[pod("a", "Succeeded", None), pod("b", "Succeeded", None), pod("c", "Running", None)],
            now,
        );
        assert!(p.create.is_empty() && p.delete.is_empty());
        let p = plan(
            &job(json!({})),
            &[pod("a", "Succeeded", None), pod("b", "Succeeded", None), pod("c", "Succeeded", None)],
            now,
        );
        assert_eq!(p.status["conditions"][0]["type"], "Complete");
        assert_eq!(p.status["succeeded"], 3);
        assert!(p.status["completionTime"].is_string());
    }

    #[test]
    fn failed_pods_are_replaced_after_an_exponential_backoff() {
        let t0 = DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z").unwrap().with_timezone(&Utc);
        let at = |secs: i64| (t0 + chrono::Duration::seconds(secs)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let failed = |name: &str, secs: i64| {
            json!({"metadata": {"name": name, "creationTimestamp": at(secs - 5)}, "status": {"phase": "Failed",
                "containerStatuses": [{"name": "c", "state": {"terminated": {"exitCode": 1, "finishedAt": at(secs)}}}]}})
        };
        let j = job(json!({"spec": {"backoffLimit": 6, "parallelism": 1}}));
        // One failure at t0: nothing new for 10 s, and a look again then.
        let p = plan(&j, &[failed("a", 0)], t0 + chrono::Duration::seconds(4));
        assert!(p.create.is_empty());
        assert_eq!(p.requeue, Some(Duration::from_secs(6)));
        assert_eq!(plan(&j, &[failed("a", 0)], t0 + chrono::Duration::seconds(10)).create.len(), 1);
        // Three failures, the last at t0+30: 40 s from then.
        let three = [failed("a", 0), failed("b", 12), failed("c", 30)];
        assert!(plan(&j, &three, t0 + chrono::Duration::seconds(69)).create.is_empty());
        assert_eq!(plan(&j, &three, t0 + chrono::Duration::seconds(70)).create.len(), 1);
        // Capped at 10 minutes.
        let many: Vec<Value> = (0..8).map(|i| failed(&format!("p{i}"), i)).collect();
        let j = job(json!({"spec": {"backoffLimit": 10, "parallelism": 1}}));
        assert_eq!(plan(&j, &many, t0 + chrono::Duration::seconds(7)).requeue, Some(Duration::from_secs(600)));
    }

    #[test]
    fn fails_past_the_backoff_limit_or_deadline_and_stops_its_pods() {
        let now = Utc::now();
        let p = plan(
            &job(json!({})),
            &[pod("a", "Failed", None), pod("b", "Failed", None), pod("c", "Running", None)],
            now,
        );
        assert_eq!(p.status["conditions"][0]["reason"], "BackoffLimitExceeded");
        assert_eq!(p.delete, ["c"]);
        let old = (now - chrono::Duration::seconds(100)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let j = job(json!({"spec": {"activeDeadlineSeconds": 10}, "status": {"startTime": old}}));
        assert_eq!(plan(&j, &[pod("a", "Running", None)], now).status["conditions"][0]["reason"], "DeadlineExceeded");
        let j = job(json!({"spec": {"suspend": true}}));
        assert_eq!(plan(&j, &[pod("a", "Running", None)], now).delete, ["a"], "suspended jobs run nothing");
    }

    #[test]
    fn indexed_jobs_fill_missing_indexes_and_ttl_deletes_finished_jobs() {
        let now = Utc::now();
        let j = job(json!({"spec": {"completionMode": "Indexed"}}));
        let p = plan(&j, &[pod("a", "Succeeded", Some(0)), pod("b", "Running", Some(1))], now);
        assert_eq!(p.create, vec![Some(2)]);
        assert_eq!(p.status["completedIndexes"], "0");
        let pod2 = pod_for(&j, Some(2));
        assert_eq!(pod2["metadata"]["annotations"][INDEX_ANNOTATION], "2");
        assert_eq!(pod2["spec"]["containers"][0]["env"][0]["value"], "2");
        assert_eq!(format_indexes(&parse_indexes("0,2-4,7")), "0,2-4,7");
        let done = (now - chrono::Duration::seconds(30)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let finished = job(json!({"spec": {"ttlSecondsAfterFinished": 10},
            "status": {"completionTime": done, "conditions": [{"type": "Complete", "status": "True"}]}}));
        assert!(plan(&finished, &[], now).delete_job);
    }
}
