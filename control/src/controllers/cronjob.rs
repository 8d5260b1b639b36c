//! CronJob controller: creates a Job for each time the cron schedule
//! (five fields, Kubernetes' syntax, in `spec.timeZone` or UTC) comes due,
//! honouring `concurrencyPolicy` (Allow, Forbid, Replace), `suspend`,
//! `startingDeadlineSeconds` and the successful/failed history limits.
//!
//! Job names are `<cronjob>-<minutes since the epoch of the scheduled
//! time>`, as in Kubernetes, so a run is created once however often the
//! controller looks (a second create is AlreadyExists). [`plan`] is pure.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use serde_json::{json, Value};

use super::events::{EventRecorder, EventType};
use super::informer::Informer;
use super::owned;
use super::runtime::{ReconcileResult, Reconciler};
use crate::api::objects::Found;
use crate::api::{internal, ApiServer};

pub const SCHEDULED_AT: &str = "batch.kubernetes.io/cronjob-scheduled-timestamp";

#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub create: Option<Value>,
    /// Jobs to delete (replaced, or beyond the history limits).
    pub delete: Vec<String>,
    pub status: Value,
    pub requeue: Option<Duration>,
    /// Why nothing can be scheduled (bad schedule or time zone).
    pub error: Option<String>,
}

fn ts(v: &Value) -> Option<DateTime<Utc>> {
    v.as_str().and_then(|t| DateTime::parse_from_rfc3339(t).ok()).map(|t| t.with_timezone(&Utc))
}

fn secs(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn job_finished(job: &Value) -> Option<&str> {
    job["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| (c["type"] == "Complete" || c["type"] == "Failed") && c["status"] == "True")
        .and_then(|c| c["type"].as_str())
}

/// The latest scheduled time in (after, now], and the next one after now.
pub fn due_times(
    schedule: &str,
    tz: Option<&str>,
    after: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<(Option<DateTime<Utc>>, DateTime<Utc>), String> {
    let cron = croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Disallowed)
        .build()
        .parse(schedule)
        .map_err(|e| format!("invalid schedule {schedule:?}: {e}"))?;
    let tz: chrono_tz::Tz = match tz {
        None | Some("") => chrono_tz::UTC,
        Some(name) => chrono_tz::Tz::from_str(name).map_err(|_| format!("unknown time zone {name:?}"))?,
    };
    let mut t = after.with_timezone(&tz);
    let mut latest = None;
    // Kubernetes gives up counting after 100 missed runs; so do we.
    for _ in 0..100 {
        let next = cron.find_next_occurrence(&t, false).map_err(|e| format!("schedule {schedule:?}: {e}"))?;
        if next.with_timezone(&Utc) > now {
            return Ok((latest, next.with_timezone(&Utc)));
        }
        latest = Some(next.with_timezone(&Utc));
        t = next;
    }
    let next = cron.find_next_occurrence(&now.with_timezone(&tz), false).map_err(|e| e.to_string())?;
    let last = cron.find_previous_occurrence(&now.with_timezone(&tz), true).map_err(|e| e.to_string())?;
    Ok((Some(last.with_timezone(&Utc)), next.with_timezone(&Utc)))
}

/// `jobs`: the Jobs this CronJob owns.
pub fn plan(cj: &Value, jobs: &[Value], now: DateTime<Utc>) -> Plan {
    let spec = &cj["spec"];
    let name = cj["metadata"]["name"].as_str().unwrap_or_default();
    let mut status = if cj["status"].is_object() { cj["status"].clone() } else { json!({}) };
    let active: Vec<&Value> = jobs.iter().filter(|j| job_finished(j).is_none()).collect();
    status["active"] = Value::Array(
        active
            .iter()
            .map(|j| json!({"kind": "Job", "apiVersion": "batch/v1", "namespace": j["metadata"]["namespace"], "name": j["metadata"]["name"], "uid": j["metadata"]["uid"]}))
            .collect(),
    );
    if status["active"].as_array().is_some_and(|a| a.is_empty()) {
        status.as_object_mut().map(|m| m.remove("active"));
    }
    if let Some(t) = jobs
        .iter()
        .filter(|j| job_finished(j) == Some("Complete"))
        .filter_map(|j| ts(&j["status"]["completionTime"]))
        .max()
    {
        status["lastSuccessfulTime"] = json!(secs(t));
    }
    // History limits, oldest first.
    let mut delete = Vec::new();
    for (kind, limit) in [
        ("Complete", spec["successfulJobsHistoryLimit"].as_i64().unwrap_or(3)),
        ("Failed", spec["failedJobsHistoryLimit"].as_i64().unwrap_or(1)),
    ] {
        let mut done: Vec<&Value> = jobs.iter().filter(|j| job_finished(j) == Some(kind)).collect();
        done.sort_by_key(|j| j["metadata"]["creationTimestamp"].as_str().unwrap_or_default().to_string());
        let extra = done.len().saturating_sub(limit.max(0) as usize);
        delete.extend(done[..extra].iter().map(|j| j["metadata"]["name"].as_str().unwrap_or_default().to_string()));
    }
    let mut plan = Plan { create: None, delete, status, requeue: None, error: None };
    let after =
        ts(&cj["status"]["lastScheduleTime"]).or_else(|| ts(&cj["metadata"]["creationTimestamp"])).unwrap_or(now);
    let (due, next) =
        match due_times(spec["schedule"].as_str().unwrap_or_default(), spec["timeZone"].as_str(), after, now) {
            Ok(x) => x,
            Err(e) => {
                plan.error = Some(e);
                return plan;
            }
        };
    plan.requeue = Some((next - now).to_std().unwrap_or_default() + Duration::from_millis(100));
    let Some(due) = due else { return plan };
    if spec["suspend"] == true {
        return plan;
    }
    let too_late = spec["startingDeadlineSeconds"].as_i64().is_some_and(|d| due + chrono::Duration::seconds(d) < now);
    if too_late {
        plan.status["lastScheduleTime"] = json!(secs(due));
        return plan;
    }
    match spec["concurrencyPolicy"].as_str().unwrap_or("Allow") {
        "Forbid" if !active.is_empty() => return plan,
        "Replace" => {
            plan.delete.extend(active.iter().map(|j| j["metadata"]["name"].as_str().unwrap_or_default().to_string()))
        }
        _ => {}
    }
    let t = &spec["jobTemplate"];
    let mut meta = if t["metadata"].is_object() { t["metadata"].clone() } else { json!({}) };
    meta["name"] = json!(format!("{name}-{}", due.timestamp() / 60));
    meta["namespace"] = cj["metadata"]["namespace"].clone();
    meta["annotations"][SCHEDULED_AT] = json!(secs(due));
    meta["ownerReferences"] = json!([{"apiVersion": "batch/v1", "kind": "CronJob", "name": name,
        "uid": cj["metadata"]["uid"], "controller": true, "blockOwnerDeletion": true}]);
    plan.create = Some(json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": t["spec"]}));
    plan.status["lastScheduleTime"] = json!(secs(due));
    plan
}

/// The Jobs the CronJob still lists as active that have finished, with
/// how (Kubernetes records `SawCompletedJob` for each as it drops them).
pub fn saw_completed<'a>(cj: &Value, jobs: &'a [Value]) -> Vec<(&'a str, &'a str)> {
    let listed =
        |j: &Value| cj["status"]["active"].as_array().into_iter().flatten().any(|a| a["uid"] == j["metadata"]["uid"]);
    jobs.iter()
        .filter(|j| listed(j))
        .filter_map(|j| Some((j["metadata"]["name"].as_str()?, job_finished(j)?)))
        .collect()
}

pub struct CronJobController {
    pub api: Arc<ApiServer>,
    pub cronjobs: Arc<Informer>,
    pub jobs: Arc<Informer>,
    pub recorder: EventRecorder,
}

impl CronJobController {
    pub fn keys_for_job(&self, job: &super::informer::Cached) -> Vec<String> {
        owned::owner_keys(&self.cronjobs, job)
    }

    async fn run(self: Arc<Self>, key: String) -> ReconcileResult {
        let Some(cached) = self.cronjobs.get(&key) else { return Ok(None) };
        if cached.deleting() {
            return Ok(None);
        }
        let cj = cached.object();
        let jobs = owned::dependents_of(&self.jobs, &cached);
        let p = plan(&cj, &jobs, Utc::now());
        let rec = &self.recorder;
        if let Some(e) = &p.error {
            tracing::warn!(cronjob = key.as_str(), "{e}");
            let reason = if e.starts_with("unknown time zone") { "UnknownTimeZone" } else { "UnparseableSchedule" };
            rec.event(&cj, EventType::Warning, reason, e.as_str());
        }
        for name in &p.delete {
            let Some(c) = self.jobs.get(&format!("{}/{name}", cached.namespace())) else { continue };
            match internal::delete(&self.api, self.jobs.rt, &c.found()).await {
                Ok(()) => rec.event(&cj, EventType::Normal, "SuccessfulDelete", format!("Deleted job {name}")),
                Err(e) if e.code == 404 => {}
                Err(e) => {
                    rec.event(&cj, EventType::Warning, "FailedDelete", format!("Deleted job: {e}"));
                    return Err(e.to_string());
                }
            }
        }
        if let Some(job) = p.create {
            let name = job["metadata"]["name"].as_str().unwrap_or_default().to_string();
            match internal::write(&self.api, self.jobs.rt, None, job, "cronjob-controller").await {
                Ok(_) => rec.event(&cj, EventType::Normal, "SuccessfulCreate", format!("Created job {name}")),
                Err(e) if e.code == 409 => {} // this run exists already
                Err(e) => {
                    rec.event(&cj, EventType::Warning, "FailedCreate", format!("Error creating job: {e}"));
                    return Err(e.to_string());
                }
            }
        }
        if cj["status"] != p.status {
            let found = Found { object: cj.clone(), mod_revision: cached.mod_revision };
            internal::write_status(&self.api, self.cronjobs.rt, &found, p.status).await.map_err(|e| e.to_string())?;
            for (name, how) in saw_completed(&cj, &jobs) {
                let msg = format!("Saw completed job: {name}, condition: {how}");
                rec.event(&cj, EventType::Normal, "SawCompletedJob", msg);
            }
        }
        Ok(p.requeue)
    }
}

impl Reconciler for CronJobController {
    fn name(&self) -> &'static str {
        "cronjob"
    }
    fn reconcile(self: Arc<Self>, key: String) -> BoxFuture<'static, ReconcileResult> {
        Box::pin(self.run(key))
    }
    fn all_keys(&self) -> Vec<String> {
        self.cronjobs.list().iter().map(|c| c.key.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn cj(extra: Value) -> Value {
        let mut c = json!({"metadata": {"name": "tick", "namespace": "d", "uid": "c1", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"schedule": "*/5 * * * *", "jobTemplate": {"spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "i"}]}}}}}});
        json_patch::merge(&mut c, &extra);
        c
    }

    fn job(name: &str, finished: Option<&str>, created: &str) -> Value {
        let mut j = json!({"metadata": {"name": name, "namespace": "d", "uid": name, "creationTimestamp": created}, "status": {}});
        if let Some(k) = finished {
            j["status"] = json!({"conditions": [{"type": k, "status": "True"}], "completionTime": created});
        }
        j
    }

    #[test]
    fn creates_one_deterministic_job_per_due_time() {
        let p = plan(&cj(json!({})), &[], at("2026-01-01T00:07:00Z"));
        let j = p.create.unwrap();
        assert_eq!(j["metadata"]["name"], format!("tick-{}", at("2026-01-01T00:05:00Z").timestamp() / 60));
        assert_eq!(j["metadata"]["annotations"][SCHEDULED_AT], "2026-01-01T00:05:00Z");
        assert_eq!(p.status["lastScheduleTime"], "2026-01-01T00:05:00Z");
        assert!(p.requeue.unwrap() <= Duration::from_secs(181));
        let done = cj(json!({"status": {"lastScheduleTime": "2026-01-01T00:05:00Z"}}));
        assert!(plan(&done, &[], at("2026-01-01T00:07:00Z")).create.is_none(), "not due again until 00:10");
    }

    #[test]
    fn concurrency_suspend_deadline_time_zone_and_history() {
        let now = at("2026-01-01T00:07:00Z");
        let running = [job("tick-1", None, "2026-01-01T00:00:00Z")];
        assert!(plan(&cj(json!({"spec": {"concurrencyPolicy": "Forbid"}})), &running, now).create.is_none());
        let p = plan(&cj(json!({"spec": {"concurrencyPolicy": "Replace"}})), &running, now);
        assert!(p.create.is_some() && p.delete == ["tick-1"]);
        assert!(plan(&cj(json!({"spec": {"suspend": true}})), &[], now).create.is_none());
        assert!(
            plan(&cj(json!({"spec": {"startingDeadlineSeconds": 60}})), &[], now).create.is_none(),
            "00:05 is 2 min late"
        );
        // 09:00 in Tokyo is 00:00 UTC.
        let tokyo = cj(json!({"spec": {"schedule": "0 9 * * *", "timeZone": "Asia/Tokyo"}}));
        let p = plan(&tokyo, &[], at("2026-01-02T00:00:30Z"));
        assert_eq!(p.status["lastScheduleTime"], "2026-01-02T00:00:00Z");
        assert!(plan(&cj(json!({"spec": {"timeZone": "Mars/Olympus"}})), &[], now).error.is_some());
        assert!(plan(&cj(json!({"spec": {"schedule": "not a schedule"}})), &[], now).error.is_some());
        let history: Vec<Value> =
            (0..5).map(|i| job(&format!("ok-{i}"), Some("Complete"), &format!("2026-01-01T00:0{i}:00Z"))).collect();
        let p = plan(&cj(json!({"status": {"lastScheduleTime": "2026-01-01T00:05:00Z"}})), &history, now);
        assert_eq!(p.delete, ["ok-0", "ok-1"], "keeps the 3 newest successes");
        assert_eq!(p.status["lastSuccessfulTime"], "2026-01-01T00:04:00Z");
    }

    #[test]
    fn completed_jobs_are_seen_once_as_they_leave_the_active_list() {
        let jobs = [
            job("done", Some("Complete"), "2026-01-01T00:00:00Z"),
            job("failed", Some("Failed"), "2026-01-01T00:00:00Z"),
            job("running", None, "2026-01-01T00:00:00Z"),
            job("old", Some("Complete"), "2026-01-01T00:00:00Z"),
        ];
        let listed = cj(json!({"status": {"active": [{"uid": "done"}, {"uid": "failed"}, {"uid": "running"}]}}));
        assert_eq!(saw_completed(&listed, &jobs), [("done", "Complete"), ("failed", "Failed")]);
        let p = plan(&listed, &jobs, at("2026-01-01T00:01:00Z"));
        let next = cj(json!({"status": p.status}));
        assert_eq!(saw_completed(&next, &jobs), [], "the new status no longer lists them");
    }
}
