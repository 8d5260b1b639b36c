//! Kubernetes-style API traffic under faults: what controllers and kubectl
//! do, through the masters' API servers (HTTPS, JSON), checked like the KV
//! workload.
//!
//! One ConfigMap, `chaos-counter`, holds a counter `n`. Updaters pinned to
//! different masters read it and write `n + 1` with the resourceVersion
//! they read (optimistic concurrency: a stale one is refused with 409).
//! Every applied update adds exactly one, so the stored values are 0, 1,
//! 2, ... without gaps, which makes the checks exact:
//! - lost updates: every acknowledged value must be covered by the final
//!   value; phantom updates: the final value may exceed the acknowledged
//!   ones only by updates whose outcome was unknown (timeouts, 5xx).
//! - double acknowledgements: no value may be acknowledged twice (two
//!   writers both told they won the same resourceVersion).
//! - watch: a WATCH from the creation's resourceVersion, resumed after
//!   every broken stream from the last resourceVersion it saw (against
//!   another master), must see n = 1, 2, 3, ... each once, in order, up to
//!   the final value. After "410 Gone" it re-lists, as client-go does, and
//!   only then may it skip values.
//! - stale lists: a LIST (consistent read, no resourceVersion) sent after
//!   a value was acknowledged must show at least that value.
//!
//! [`check`] is pure; the rest is the traffic.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Value};

use crate::cluster::UpCluster;

const NAME: &str = "chaos-counter";
const PATH: &str = "/api/v1/namespaces/default/configmaps";
/// A client's deadline per request, like the KV clients'.
const DEADLINE: Duration = Duration::from_secs(2);

/// What the watcher saw, in order.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Seen {
    /// A MODIFIED event with this value.
    Event(u64),
    /// After 410 Gone: the value a fresh read returned; gaps before it are
    /// excused.
    Relist(u64),
}

/// Everything the API traffic recorded.
#[derive(Clone, Debug, Default)]
pub struct ApiHistory {
    /// Values acknowledged (200) to updates, by every updater.
    pub acked: Vec<u64>,
    pub conflicts: usize,
    /// Updates whose outcome is unknown (timeout, connection lost, 5xx).
    pub indeterminate: usize,
    /// (highest value acknowledged before the LIST was sent, value it showed).
    pub lists: Vec<(u64, u64)>,
    pub watched: Vec<Seen>,
    /// The counter after the run (None: it could not be read).
    pub final_value: Option<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ApiReport {
    pub updates_acked: usize,
    pub conflicts: usize,
    pub indeterminate: usize,
    pub lists: usize,
    pub final_value: Option<u64>,
    /// Acknowledged values the final value does not cover.
    pub lost_updates: u64,
    /// Applied updates beyond the acknowledged and unknown ones.
    pub phantom_updates: u64,
    pub double_acks: u64,
    /// Watch events that skipped or repeated a value, plus the values the
    /// watch never reached.
    pub watch_gaps: u64,
    pub relists: usize,
    pub stale_lists: u64,
}

impl ApiReport {
    pub fn violations(&self) -> u64 {
        self.lost_updates + self.phantom_updates + self.double_acks + self.watch_gaps + self.stale_lists
    }
}

/// The checks of the module docs over a recorded history.
pub fn check(h: &ApiHistory) -> ApiReport {
    let mut r = ApiReport {
        updates_acked: h.acked.len(),
        conflicts: h.conflicts,
        indeterminate: h.indeterminate,
        lists: h.lists.len(),
        final_value: h.final_value,
        ..ApiReport::default()
    };
    let mut acked = h.acked.clone();
    acked.sort_unstable();
    let before = acked.len();
    acked.dedup();
    r.double_acks = (before - acked.len()) as u64;
    // Unknown final value: every acknowledged update counts as lost.
    let fin = h.final_value.unwrap_or(0);
    r.lost_updates = acked.iter().filter(|v| **v > fin).count() as u64;
    r.phantom_updates = fin.saturating_sub((acked.len() + h.indeterminate) as u64);
    r.stale_lists = h.lists.iter().filter(|(known, seen)| seen < known).count() as u64;
    let mut last = 0;
    for s in &h.watched {
        match *s {
            Seen::Event(v) => {
                if v != last + 1 {
                    r.watch_gaps += 1;
                }
                last = last.max(v);
            }
            Seen::Relist(v) => {
                r.relists += 1;
                last = last.max(v);
            }
        }
    }
    r.watch_gaps += fin.saturating_sub(last);
    r
}

/// The traffic's shared state while it runs.
struct Traffic {
    cluster: Arc<UpCluster>,
    http: reqwest::Client,
    history: Mutex<ApiHistory>,
    /// Highest value acknowledged so far (for the stale-list check).
    highest: AtomicU64,
    stop: Arc<AtomicBool>,
}

/// Running API traffic; [`ApiTraffic::finish`] stops it and returns the
/// history.
pub struct ApiTraffic {
    traffic: Arc<Traffic>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    watcher: tokio::task::JoinHandle<()>,
    watch_stop: Arc<AtomicBool>,
}

impl ApiTraffic {
    /// Creates the counter and starts two updaters (on masters 0 and 1),
    /// a lister and the watcher.
    pub async fn start(cluster: Arc<UpCluster>) -> anyhow::Result<ApiTraffic> {
        let read = |k: &str| std::fs::read(cluster.env_path(k));
        let mut identity = read("ETCDCTL_CERT")?;
        identity.extend(read("ETCDCTL_KEY")?);
        let http = reqwest::Client::builder()
            .use_rustls_tls()
            .add_root_certificate(reqwest::Certificate::from_pem(&read("ETCDCTL_CACERT")?)?)
            .identity(reqwest::Identity::from_pem(&identity)?)
            .connect_timeout(DEADLINE)
            .build()?;
        let traffic = Arc::new(Traffic {
            cluster,
            http,
            history: Mutex::default(),
            highest: AtomicU64::new(0),
            stop: Arc::new(AtomicBool::new(false)),
        });
        let rv = traffic.create().await?;
        let watch_stop = Arc::new(AtomicBool::new(false));
        let watcher = tokio::spawn(traffic.clone().watch(rv, watch_stop.clone()));
        let mut tasks = vec![tokio::spawn(traffic.clone().lister())];
        for i in 0..2 {
            tasks.push(tokio::spawn(traffic.clone().updater(i)));
        }
        Ok(ApiTraffic { traffic, tasks, watcher, watch_stop })
    }

    /// Stops the traffic, reads the final value and lets the watcher catch
    /// up to it (20 s at most: the last fault healed long before).
    pub async fn finish(self) -> ApiHistory {
        self.traffic.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut fin = None;
        while fin.is_none() && Instant::now() < deadline {
            for i in 0..self.traffic.cluster.masters {
                if let Ok((v, _)) = self.traffic.get(i).await {
                    fin = Some(v);
                    break;
                }
            }
            if fin.is_none() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        self.traffic.history.lock().expect("not poisoned").final_value = fin;
        while Instant::now() < deadline && !self.traffic.watched_up_to(fin.unwrap_or(0)) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.watch_stop.store(true, Ordering::Relaxed);
        let _ = self.watcher.await;
        let history = self.traffic.history.lock().expect("not poisoned").clone();
        history
    }
}

/// The counter in a ConfigMap (or a watch event's object).
fn value_of(obj: &Value) -> Option<u64> {
    obj["data"]["n"].as_str()?.parse().ok()
}

fn rv_of(obj: &Value) -> Option<String> {
    obj["metadata"]["resourceVersion"].as_str().map(str::to_string)
}

impl Traffic {
    fn api(&self, i: usize) -> Option<String> {
        self.cluster.endpoints(i).map(|e| e.api_url).filter(|u| !u.is_empty())
    }

    /// POSTs the counter at 0 (or finds it there); its resourceVersion.
    async fn create(&self) -> anyhow::Result<String> {
        let body = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": NAME}, "data": {"n": "0"}});
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let api = self.api(0).ok_or_else(|| anyhow::anyhow!("master-1 has no API URL"))?;
            let sent = self.http.post(format!("{api}{PATH}")).json(&body).timeout(DEADLINE).send().await;
            match sent.map(|r| r.status()) {
                Ok(s) if s.is_success() || s == reqwest::StatusCode::CONFLICT => {
                    // Created, or created by an earlier attempt whose answer
                    // was lost (409 AlreadyExists): read it back.
                    if let Ok((0, obj)) = self.get(0).await {
                        return rv_of(&obj).ok_or_else(|| anyhow::anyhow!("a ConfigMap without resourceVersion"));
                    }
                }
                _ => {}
            }
            anyhow::ensure!(Instant::now() < deadline, "could not create the {NAME} ConfigMap");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// GET through master `i`: (value, the object).
    async fn get(&self, i: usize) -> anyhow::Result<(u64, Value)> {
        let api = self.api(i).ok_or_else(|| anyhow::anyhow!("master-{} not serving", i + 1))?;
        let r = self.http.get(format!("{api}{PATH}/{NAME}")).timeout(DEADLINE).send().await?;
        anyhow::ensure!(r.status().is_success(), "GET: {}", r.status());
        let obj: Value = r.json().await?;
        Ok((value_of(&obj).ok_or_else(|| anyhow::anyhow!("no counter in {obj}"))?, obj))
    }

    fn watched_up_to(&self, v: u64) -> bool {
        let h = self.history.lock().expect("not poisoned");
        h.watched.iter().any(|s| matches!(*s, Seen::Event(x) | Seen::Relist(x) if x >= v))
    }

    /// Read, then write n + 1 with the resourceVersion read, through
    /// master `i`, until stopped.
    async fn updater(self: Arc<Self>, i: usize) {
        while !self.stop.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let Ok((n, mut obj)) = self.get(i).await else { continue };
            let Some(api) = self.api(i) else { continue };
            obj["data"]["n"] = json!((n + 1).to_string());
            let sent = self.http.put(format!("{api}{PATH}/{NAME}")).json(&obj).timeout(DEADLINE).send().await;
            let mut h = self.history.lock().expect("not poisoned");
            match sent.map(|r| r.status()) {
                Ok(s) if s.is_success() => {
                    h.acked.push(n + 1);
                    self.highest.fetch_max(n + 1, Ordering::Relaxed);
                }
                Ok(s) if s == reqwest::StatusCode::CONFLICT => h.conflicts += 1,
                // Refused outright (4xx): nothing was written.
                Ok(s) if s.is_client_error() => {}
                // 5xx, a timeout or a lost connection: it may have been.
                _ => h.indeterminate += 1,
            }
        }
    }

    /// A consistent LIST through each master in turn, every 300 ms.
    async fn lister(self: Arc<Self>) {
        let mut k = 0;
        while !self.stop.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(300)).await;
            k += 1;
            let Some(api) = self.api(k % self.cluster.masters) else { continue };
            let known = self.highest.load(Ordering::Relaxed);
            let url = format!("{api}{PATH}?fieldSelector=metadata.name%3D{NAME}");
            let Ok(r) = self.http.get(url).timeout(DEADLINE).send().await else { continue };
            if !r.status().is_success() {
                continue;
            }
            let Ok(list) = r.json::<Value>().await else { continue };
            if let Some(seen) = list["items"].as_array().and_then(|items| items.iter().find_map(value_of)) {
                self.history.lock().expect("not poisoned").lists.push((known, seen));
            }
        }
    }

    /// WATCH from `rv`, resumed from the last resourceVersion seen through
    /// the next master whenever the stream breaks, until `stop`.
    async fn watch(self: Arc<Self>, mut rv: String, stop: Arc<AtomicBool>) {
        let mut k = 0;
        while !stop.load(Ordering::Relaxed) {
            k += 1;
            let Some(api) = self.api(k % self.cluster.masters) else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            let url = format!("{api}{PATH}?watch=1&fieldSelector=metadata.name%3D{NAME}&resourceVersion={rv}");
            let Ok(mut r) = self.http.get(url).send().await else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            if !r.status().is_success() {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            let mut buf = Vec::new();
            loop {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                // A quiet stream is fine; a dead master's is re-dialled.
                let chunk = match tokio::time::timeout(Duration::from_millis(500), r.chunk()).await {
                    Err(_) => continue,
                    Ok(Ok(Some(c))) => c,
                    Ok(_) => break,
                };
                buf.extend_from_slice(&chunk);
                while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=nl).collect();
                    let Ok(ev) = serde_json::from_slice::<Value>(&line) else { continue };
                    match ev["type"].as_str() {
                        Some("MODIFIED") | Some("ADDED") => {
                            if let (Some(v), Some(new_rv)) = (value_of(&ev["object"]), rv_of(&ev["object"])) {
                                if v > 0 {
                                    self.history.lock().expect("not poisoned").watched.push(Seen::Event(v));
                                }
                                rv = new_rv;
                            }
                        }
                        Some("ERROR") if ev["object"]["code"] == 410 => {
                            // Too old: re-list, as client-go does.
                            if let Ok((v, obj)) = self.get(k % self.cluster.masters).await {
                                self.history.lock().expect("not poisoned").watched.push(Seen::Relist(v));
                                rv = rv_of(&obj).unwrap_or(rv);
                            }
                            break;
                        }
                        _ => {}
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn history(acked: &[u64], indeterminate: usize, watched: &[Seen], fin: u64) -> ApiHistory {
        ApiHistory {
            acked: acked.to_vec(),
            indeterminate,
            watched: watched.to_vec(),
            final_value: Some(fin),
            ..ApiHistory::default()
        }
    }

    use Seen::{Event, Relist};

    #[test]
    fn a_clean_history_has_no_violations() {
        let h = history(&[1, 2, 4], 1, &[Event(1), Event(2), Event(3), Event(4)], 4);
        assert_eq!(check(&h).violations(), 0, "{:?}", check(&h));
    }

    #[test]
    fn lost_phantom_and_double_acks_are_counted() {
        // 3 was acknowledged but the counter ended at 2.
        let r = check(&history(&[1, 2, 3], 0, &[Event(1), Event(2)], 2));
        assert_eq!(r.lost_updates, 1);
        // Four applied, two acknowledged, one unknown: one phantom.
        let r = check(&history(&[1, 2], 1, &[Event(1), Event(2), Event(3), Event(4)], 4));
        assert_eq!(r.phantom_updates, 1);
        // Two writers told they both wrote 2.
        let r = check(&history(&[1, 2, 2], 0, &[Event(1), Event(2)], 2));
        assert_eq!(r.double_acks, 1);
        // Nothing readable at the end: every acknowledged update is lost.
        let h = ApiHistory { acked: vec![1, 2], final_value: None, ..ApiHistory::default() };
        assert_eq!(check(&h).lost_updates, 2);
    }

    #[test]
    fn watch_skips_repeats_and_shortfalls_are_gaps_but_a_relist_excuses() {
        assert_eq!(check(&history(&[1, 2, 3], 0, &[Event(1), Event(3)], 3)).watch_gaps, 1);
        assert_eq!(check(&history(&[1, 2], 0, &[Event(1), Event(2), Event(2)], 2)).watch_gaps, 1);
        assert_eq!(check(&history(&[1, 2, 3], 0, &[Event(1)], 3)).watch_gaps, 2);
        let r = check(&history(&[1, 2, 3, 4], 0, &[Event(1), Relist(3), Event(4)], 4));
        assert_eq!((r.watch_gaps, r.relists), (0, 1));
    }

    #[test]
    fn a_list_older_than_an_acknowledgement_is_stale() {
        let h = ApiHistory { lists: vec![(3, 3), (3, 5), (4, 2)], final_value: Some(5), ..ApiHistory::default() };
        assert_eq!(check(&h).stale_lists, 1);
    }
}
