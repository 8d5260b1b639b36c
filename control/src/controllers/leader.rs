//! Which master runs the controllers and the scheduler: the holder of the
//! Lease `kube-system/capstan-controller-manager`. The Raft leader takes an
//! expired lease at once; other masters wait one more lease duration, so the
//! leader normally wins and controller writes need no forwarding. A holder
//! that cannot renew in time stops acting before its lease can expire.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{json, Value};

pub const LEASE_NAMESPACE: &str = "kube-system";
pub const LEASE_NAME: &str = "capstan-controller-manager";
/// How long a lease is valid after its last renewal.
pub const LEASE_DURATION: Duration = Duration::from_millis(1500);
/// How often the holder renews (and others look).
pub const RENEW_EVERY: Duration = Duration::from_millis(300);

#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Write this lease (take or renew it).
    Write(Value),
    /// Someone else holds it, or it is not our turn.
    Wait,
}

fn micro(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

fn lease_duration() -> chrono::Duration {
    chrono::Duration::milliseconds(LEASE_DURATION.as_millis() as i64)
}

/// When the lease stops being valid: its last renewal plus the lease
/// duration every master runs with (`leaseDurationSeconds` is whole
/// seconds, too coarse for a 2 s failover).
pub fn expiry(lease: &Value) -> Option<DateTime<Utc>> {
    let renew = DateTime::parse_from_rfc3339(lease["spec"]["renewTime"].as_str()?).ok()?;
    Some(renew.with_timezone(&Utc) + lease_duration())
}

/// Pure: what `me` does about the current lease (`None` = none exists).
pub fn decide(lease: Option<&Value>, me: &str, raft_leader: bool, now: DateTime<Utc>) -> Decision {
    let mut next = lease.cloned().unwrap_or_else(|| {
        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": LEASE_NAME, "namespace": LEASE_NAMESPACE}, "spec": {}})
    });
    let holder = lease.and_then(|l| l["spec"]["holderIdentity"].as_str()).unwrap_or_default();
    let expired_at = lease.and_then(expiry);
    let grace = lease_duration();
    let take = match (holder == me, expired_at) {
        (true, _) => false,
        (false, None) => raft_leader,
        (false, Some(exp)) => (raft_leader && now > exp) || now > exp + grace,
    };
    if holder == me {
        next["spec"]["renewTime"] = json!(micro(now));
        return Decision::Write(next);
    }
    if !take {
        return Decision::Wait;
    }
    let transitions = next["spec"]["leaseTransitions"].as_i64().unwrap_or(0) + i64::from(!holder.is_empty());
    next["spec"] = json!({
        "holderIdentity": me,
        "leaseDurationSeconds": LEASE_DURATION.as_secs().max(1),
        "acquireTime": micro(now),
        "renewTime": micro(now),
        "leaseTransitions": transitions,
    });
    Decision::Write(next)
}

/// The elector: every [`RENEW_EVERY`], takes or renews the lease when
/// [`decide`] says so; publishes whether this master may act. Leadership
/// ends on its own 300 ms before the lease could expire, so two masters
/// never act at once.
pub async fn run(api: std::sync::Arc<crate::api::ApiServer>, me: String, leading: tokio::sync::watch::Sender<bool>) {
    let Some(rt) = capstan_proto::k8s::registry::by_kind("coordination.k8s.io/v1", "Lease") else { return };
    let mut valid_until: Option<std::time::Instant> = None;
    let margin = Duration::from_millis(300);
    loop {
        let started = std::time::Instant::now();
        let cur = api.objects.get_local(rt, Some(LEASE_NAMESPACE), LEASE_NAME).ok().flatten();
        match decide(cur.as_ref().map(|f| &f.object), &me, api.node.is_leader(), Utc::now()) {
            Decision::Write(obj) => {
                match crate::api::internal::write(&api, rt, cur.as_ref(), obj, "capstan-controller-manager").await {
                    Ok(_) => valid_until = Some(started + LEASE_DURATION - margin),
                    Err(e) => tracing::debug!("controller lease not written: {e}"),
                }
            }
            Decision::Wait => valid_until = None,
        }
        let now_leading = valid_until.is_some_and(|t| std::time::Instant::now() < t);
        leading.send_if_modified(|l| std::mem::replace(l, now_leading) != now_leading);
        tokio::time::sleep(RENEW_EVERY.saturating_sub(started.elapsed())).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(1_700_000_000_000 + ms).unwrap()
    }

    #[test]
    fn raft_leader_takes_first_others_after_a_grace() {
        assert!(matches!(decide(None, "m1", true, at(0)), Decision::Write(_)));
        assert_eq!(decide(None, "m2", false, at(0)), Decision::Wait);
        let Decision::Write(held) = decide(None, "m1", true, at(0)) else { panic!() };
        assert_eq!(held["spec"]["holderIdentity"], "m1");
        // m1 renews; m2 waits while it is valid.
        assert!(matches!(decide(Some(&held), "m1", true, at(300)), Decision::Write(_)));
        assert_eq!(decide(Some(&held), "m2", true, at(1000)), Decision::Wait);
        // Expired: the Raft leader takes it at once, others one duration later.
        assert!(matches!(decide(Some(&held), "m2", true, at(1600)), Decision::Write(_)));
        assert_eq!(decide(Some(&held), "m3", false, at(1600)), Decision::Wait);
        let Decision::Write(taken) = decide(Some(&held), "m3", false, at(3100)) else { panic!() };
        assert_eq!(
            (taken["spec"]["holderIdentity"].as_str(), taken["spec"]["leaseTransitions"].as_i64()),
            (Some("m3"), Some(1))
        );
    }
}
