//! Kubernetes' controller manager and scheduler, built the Capstan way.
//!
//! - `informer.rs`: one cache per resource per master, fed by the watch
//!   hub's shared frames; objects held as `Arc`s, index fields read in place.
//! - `queue.rs`: the keyed, rate-limited work queue (pure).
//! - `runtime.rs`: each controller is an actix actor around a queue.
//! - `owned.rs`: owners, dependents and expectations, shared by the controllers of owned objects.
//! - `leader.rs`: the Lease that decides which master's controllers act.
//! - `replicaset.rs`, `deployment.rs`, `daemonset.rs`, `statefulset.rs`, `job.rs`, `cronjob.rs`,
//!   `nodelifecycle.rs`, `disruption.rs`, `endpoints.rs`, `hpa.rs`, `volume.rs`, `ephemeral.rs`, `scheduler/`, `gc.rs`:
//!   the controllers, each a pure `plan` plus a thin shell.
//! - `clusterstate.rs`: node readiness and crash-loop gauges for alerts.
//! - `serviceaccount.rs`: each namespace's `default` ServiceAccount and `kube-root-ca.crt`.
//! - `events.rs`: the event recorder every controller and the scheduler
//!   records what it did with (client-go's EventRecorder; `events/correlator.rs`
//!   aggregates and throttles them, pure).
//!
//! Every master runs informers and actors (warm caches); only the lease
//! holder's actors process their queues. Writes go through the API's
//! admission path in-process (`api::internal`).

pub mod clusterstate;
pub mod cronjob;
pub mod daemonset;
pub mod deployment;
pub mod disruption;
pub mod endpoints;
pub mod ephemeral;
pub mod events;
pub mod gc;
pub mod hpa;
pub mod informer;
pub mod job;
pub mod leader;
pub mod metrics;
pub mod nodelifecycle;
pub mod owned;
pub mod queue;
pub mod replicaset;
pub mod runtime;
pub mod scheduler;
pub mod serviceaccount;
pub mod statefulset;
pub mod volume;

use std::collections::BTreeMap;
use std::sync::Arc;

use actix::prelude::*;
use tokio::sync::watch;

use self::informer::{Change, Informers};
use self::runtime::{ControllerActor, Enqueue, Leading, Reconciler};
use crate::api::ApiServer;

/// Maps a change to the keys an actor reconciles.
type KeyMap = Box<dyn Fn(&Change) -> Vec<String> + Send>;

/// Which actors hear of each informer's changes, and as which keys. One
/// task per informer serves all its routes (a task per route woke for
/// every change: ten for each pod change).
#[derive(Default)]
struct Routes(BTreeMap<&'static str, Vec<(Addr<ControllerActor>, KeyMap)>>);

impl Routes {
    /// Every change of `kind` goes to `addr` as the keys `map` gives.
    fn add(
        &mut self,
        kind: &'static str,
        addr: &Addr<ControllerActor>,
        map: impl Fn(&Change) -> Vec<String> + Send + 'static,
    ) {
        self.0.entry(kind).or_default().push((addr.clone(), Box::new(map)));
    }

    /// Changes of `kind` go to the keys `owners` names for the object
    /// before and after the change (e.g. the ReplicaSet owning a pod).
    fn add_owners(
        &mut self,
        kind: &'static str,
        addr: &Addr<ControllerActor>,
        owners: impl Fn(&informer::Cached) -> Vec<String> + Send + 'static,
    ) {
        self.add(kind, addr, move |c| {
            let mut keys: Vec<String> = c.new.iter().chain(c.old.iter()).flat_map(|o| owners(o)).collect();
            keys.sort();
            keys.dedup();
            keys
        });
    }

    /// Subscribes to each informer and forwards from then on.
    fn start(self, inf: &Informers) {
        for (kind, routes) in self.0 {
            let mut rx = inf.get(kind).subscribe();
            tokio::spawn(async move {
                while let Some(c) = rx.recv().await {
                    for (addr, map) in &routes {
                        for k in map(&c) {
                            addr.do_send(Enqueue(k));
                        }
                    }
                }
            });
        }
    }
}

/// Builds and starts one controller's actor (on the actors' thread).
type Spawn = Box<dyn FnOnce(metrics::ControllerMetrics) -> Addr<ControllerActor> + Send>;

fn actor<R: Reconciler>(r: Arc<R>, workers: usize) -> Spawn {
    Box::new(move |m| ControllerActor::new(r, workers, m).start())
}

/// Starts the actors on one actix system thread of their own; their
/// addresses, in order.
fn start_actors(specs: Vec<Spawn>, metrics: metrics::ControllerMetrics) -> anyhow::Result<Vec<Addr<ControllerActor>>> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new().name("controllers".into()).spawn(move || {
        let sys = actix::System::new();
        sys.block_on(async move {
            let addrs: Vec<_> = specs.into_iter().map(|s| s(metrics.clone())).collect();
            let _ = tx.send(addrs);
            std::future::pending::<()>().await;
        });
    })?;
    Ok(rx.recv()?)
}

/// What [`start`] started, for the rest of the master.
pub struct Started {
    /// Whether this master holds the controller lease (is acting).
    pub leading: watch::Receiver<bool>,
    pub informers: Arc<Informers>,
    /// Records the events node agents report (every master's gateway
    /// writes those of the nodes connected to it).
    pub kubelet_events: events::EventRecorder,
}

/// Starts informers, the controller actors (on their own actix system
/// thread) and the lease elector.
pub fn start(
    api: Arc<ApiServer>,
    me: String,
    registry: &prometheus::Registry,
    node_grace: std::time::Duration,
) -> anyhow::Result<Started> {
    let metrics = metrics::ControllerMetrics::new(registry)?;
    let events = events::EventBroadcaster::start(api.clone(), metrics.events.clone())?;
    let inf = Arc::new(Informers::start(
        &api.objects,
        &[
            "Pod",
            "ReplicaSet",
            "Deployment",
            "Node",
            "Service",
            "Endpoints",
            "EndpointSlice",
            "Job",
            "DaemonSet",
            "Lease",
            "CronJob",
            "PodDisruptionBudget",
            "StatefulSet",
            "ControllerRevision",
            "Namespace",
            "ServiceAccount",
            "ConfigMap",
            "HorizontalPodAutoscaler",
            "PersistentVolumeClaim",
            "PersistentVolume",
            "StorageClass",
        ],
    ));
    let (lead_tx, lead_rx) = watch::channel(false);
    // One identity per process, as Kubernetes does: a restarted master
    // waits for its predecessor's lease to expire like anyone else.
    let identity = format!("{me}_{}", uuid::Uuid::new_v4());
    tokio::spawn(leader::run(api.clone(), identity, lead_tx));

    let rs = Arc::new(replicaset::ReplicaSetController::new(
        api.clone(),
        inf.get("ReplicaSet").clone(),
        inf.get("Pod").clone(),
        events.recorder("replicaset-controller"),
    ));
    let dc = Arc::new(deployment::DeploymentController::new(
        api.clone(),
        inf.get("Deployment").clone(),
        inf.get("ReplicaSet").clone(),
        events.recorder("deployment-controller"),
    ));
    let sched =
        Arc::new(scheduler::Scheduler::new(api.clone(), &inf, metrics.clone(), events.recorder("default-scheduler")));

    let ep = Arc::new(endpoints::EndpointsController {
        api: api.clone(),
        services: inf.get("Service").clone(),
        pods: inf.get("Pod").clone(),
        endpoints: inf.get("Endpoints").clone(),
        slices: inf.get("EndpointSlice").clone(),
    });
    let jc = Arc::new(job::JobController::new(
        api.clone(),
        inf.get("Job").clone(),
        inf.get("Pod").clone(),
        events.recorder("job-controller"),
    ));
    let dsc = Arc::new(daemonset::DaemonSetController::new(
        api.clone(),
        inf.get("DaemonSet").clone(),
        inf.get("Pod").clone(),
        inf.get("Node").clone(),
        events.recorder("daemonset-controller"),
    ));
    let nlc = Arc::new(nodelifecycle::NodeLifecycleController {
        api: api.clone(),
        nodes: inf.get("Node").clone(),
        leases: inf.get("Lease").clone(),
        pods: inf.get("Pod").clone(),
        grace: node_grace,
        recorder: events.recorder("node-controller"),
        sightings: Default::default(),
    });
    let cjc = Arc::new(cronjob::CronJobController {
        api: api.clone(),
        cronjobs: inf.get("CronJob").clone(),
        jobs: inf.get("Job").clone(),
        recorder: events.recorder("cronjob-controller"),
    });
    let pdbc = Arc::new(disruption::DisruptionController {
        api: api.clone(),
        pdbs: inf.get("PodDisruptionBudget").clone(),
        pods: inf.get("Pod").clone(),
    });
    let stsc = Arc::new(statefulset::StatefulSetController::new(
        api.clone(),
        inf.get("StatefulSet").clone(),
        inf.get("Pod").clone(),
        inf.get("ControllerRevision").clone(),
        inf.get("PersistentVolumeClaim").clone(),
        events.recorder("statefulset-controller"),
    ));
    let sac = Arc::new(serviceaccount::ServiceAccountController {
        api: api.clone(),
        namespaces: inf.get("Namespace").clone(),
        accounts: inf.get("ServiceAccount").clone(),
        configmaps: inf.get("ConfigMap").clone(),
    });
    let hpac = Arc::new(hpa::HpaController::new(
        api.clone(),
        inf.get("HorizontalPodAutoscaler").clone(),
        inf.get("Pod").clone(),
        ["Deployment", "ReplicaSet", "StatefulSet"].into_iter().map(|k| (k, inf.get(k).clone())).collect(),
        events.recorder("horizontal-pod-autoscaler"),
    ));
    let pvc = Arc::new(volume::VolumeController::new(
        api.clone(),
        inf.get("PersistentVolumeClaim").clone(),
        inf.get("PersistentVolume").clone(),
        inf.get("StorageClass").clone(),
        inf.get("Node").clone(),
        inf.get("Pod").clone(),
        events.recorder("persistentvolume-controller"),
    ));
    let evc = Arc::new(ephemeral::EphemeralController {
        api: api.clone(),
        pods: inf.get("Pod").clone(),
        claims: inf.get("PersistentVolumeClaim").clone(),
        recorder: events.recorder("ephemeral_volume"),
    });
    clusterstate::start(inf.get("Node").clone(), inf.get("Pod").clone(), metrics.clone());
    let all = start_actors(
        vec![
            actor(rs.clone(), 4),
            actor(dc.clone(), 2),
            actor(sched.clone(), 1),
            actor(ep.clone(), 2),
            actor(jc.clone(), 2),
            actor(dsc.clone(), 2),
            actor(nlc, 2),
            actor(cjc.clone(), 1),
            actor(pdbc.clone(), 1),
            actor(stsc.clone(), 2),
            actor(sac, 1),
            actor(hpac, 1),
            actor(pvc.clone(), 2),
            actor(evc, 1),
        ],
        metrics,
    )?;
    let [rs_addr, dc_addr, sched_addr, ep_addr, job_addr, ds_addr, node_addr, cj_addr, pdb_addr, sts_addr, sa_addr, hpa_addr, pv_addr, ev_addr] =
        <[Addr<ControllerActor>; 14]>::try_from(all.clone())
            .map_err(|_| anyhow::anyhow!("controller actors missing"))?;

    let mut routes = Routes::default();
    routes.add("ReplicaSet", &rs_addr, |c| vec![c.key.clone()]);
    let rs_for_pods = rs.clone();
    routes.add_owners("Pod", &rs_addr, move |p| rs_for_pods.keys_for_pod(p));
    routes.add("Deployment", &dc_addr, |c| vec![c.key.clone()]);
    let dc_for_rs = dc.clone();
    routes.add_owners("ReplicaSet", &dc_addr, move |r| dc_for_rs.keys_for_replicaset(r));
    sched.clone().feed(sched_addr.clone());

    routes.add("Service", &ep_addr, |c| vec![c.key.clone()]);
    routes.add("Endpoints", &ep_addr, |c| vec![c.key.clone()]);
    let ep_for_pods = ep.clone();
    routes.add_owners("Pod", &ep_addr, move |p| ep_for_pods.keys_for_pod(p));

    routes.add("Job", &job_addr, |c| vec![c.key.clone()]);
    let jc_for_pods = jc.clone();
    routes.add_owners("Pod", &job_addr, move |p| jc_for_pods.keys_for_pod(p));

    routes.add("DaemonSet", &ds_addr, |c| vec![c.key.clone()]);
    let dsc_for_pods = dsc.clone();
    routes.add_owners("Pod", &ds_addr, move |p| dsc_for_pods.keys_for_pod(p));
    // Any node change may change where every DaemonSet belongs.
    let dsc_for_nodes = dsc.clone();
    routes.add("Node", &ds_addr, move |_| dsc_for_nodes.all_keys());

    routes.add("Node", &node_addr, |c| vec![c.key.clone()]);
    routes.add("Lease", &node_addr, |c| {
        c.key.strip_prefix(&format!("{}/", nodelifecycle::LEASE_NAMESPACE)).map(str::to_string).into_iter().collect()
    });

    let mut lead = lead_rx.clone();
    routes.add("CronJob", &cj_addr, |c| vec![c.key.clone()]);
    let cjc_for_jobs = cjc.clone();
    routes.add_owners("Job", &cj_addr, move |j| cjc_for_jobs.keys_for_job(j));

    routes.add("PodDisruptionBudget", &pdb_addr, |c| vec![c.key.clone()]);
    let pdbc_for_pods = pdbc.clone();
    routes.add_owners("Pod", &pdb_addr, move |p| pdbc_for_pods.keys_for_pod(p));

    routes.add("StatefulSet", &sts_addr, |c| vec![c.key.clone()]);
    let stsc_for_pods = stsc.clone();
    routes.add_owners("Pod", &sts_addr, move |p| stsc_for_pods.keys_for_dependent(p));
    let stsc_for_claims = stsc.clone();
    routes.add("PersistentVolumeClaim", &sts_addr, move |c| stsc_for_claims.keys_for_claim(c));
    routes.add_owners("ControllerRevision", &sts_addr, move |r| stsc.keys_for_dependent(r));

    routes.add("Namespace", &sa_addr, |c| vec![c.key.clone()]);
    routes.add("ServiceAccount", &sa_addr, |c| {
        serviceaccount::ServiceAccountController::key_for(c, serviceaccount::DEFAULT_ACCOUNT)
    });
    routes.add("ConfigMap", &sa_addr, |c| {
        serviceaccount::ServiceAccountController::key_for(c, crate::api::serviceaccount::ROOT_CA_CONFIGMAP)
    });

    // Each HPA then resyncs itself every 15 s (usage is not watched).
    routes.add("HorizontalPodAutoscaler", &hpa_addr, |c| vec![c.key.clone()]);

    // Volumes and claims name each other; a new volume, class or node
    // (announcing its local-path directory) may serve a waiting claim; a
    // pod that goes may let a claim being deleted go.
    routes.add("PersistentVolumeClaim", &pv_addr, volume::VolumeController::keys_for_claim);
    let pvc_for_volumes = pvc.clone();
    routes.add("PersistentVolume", &pv_addr, move |c| {
        let mut keys = volume::VolumeController::keys_for_volume(c);
        if c.new.is_none() || c.new.as_ref().is_some_and(|v| v.object()["spec"]["claimRef"].is_null()) {
            keys.extend(pvc_for_volumes.unbound_claims());
        }
        keys
    });
    let pvc_for_classes = pvc.clone();
    routes.add("StorageClass", &pv_addr, move |_| pvc_for_classes.unbound_claims());
    let pvc_for_nodes = pvc.clone();
    routes.add("Node", &pv_addr, move |c| {
        let announced = |x: &Option<Arc<informer::Cached>>| {
            x.as_ref().map(|n| n.object()["metadata"]["annotations"][volume::LOCAL_PATH_ROOT].clone())
        };
        if announced(&c.new) == announced(&c.old) {
            return vec![];
        }
        pvc_for_nodes.unbound_claims()
    });
    routes.add("Pod", &pv_addr, volume::VolumeController::keys_for_pod);
    routes.add("Pod", &ev_addr, ephemeral::EphemeralController::keys_for_pod);

    routes.start(&inf);

    tokio::spawn(async move {
        loop {
            let now = *lead.borrow_and_update();
            for a in &all {
                a.do_send(Leading(now));
            }
            if lead.changed().await.is_err() {
                return;
            }
        }
    });
    Ok(Started { leading: lead_rx, informers: inf, kubelet_events: events.recorder("kubelet") })
}
