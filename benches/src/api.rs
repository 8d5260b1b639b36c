//! `capstan-bench api`: the Kubernetes API under load, as kubectl-like
//! clients see it (HTTPS, client certificate from a kubeconfig).
//!
//! 1. creates: `--clients` concurrent clients POST `--creates` ConfigMaps
//!    into a fresh namespace; throughput and latency percentiles.
//! 2. table list: `--pods` pods are created, then listed `--lists` times as
//!    a `meta.k8s.io/v1 Table` (what `kubectl get pods` asks for); latency
//!    of the whole answer.
//!
//! Prints one JSON object on stdout; progress on stderr.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use base64::Engine;
use hdrhistogram::Histogram;
use serde_json::{json, Value};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// kubeconfig with the server, its CA and a client certificate (`capstan up` writes one).
    #[arg(long)]
    pub kubeconfig: PathBuf,
    /// Concurrent clients.
    #[arg(long, default_value_t = 100)]
    pub clients: usize,
    /// HTTP/2 connections the clients share.
    #[arg(long, default_value_t = 10)]
    pub conns: usize,
    /// ConfigMaps to create.
    #[arg(long, default_value_t = 20_000)]
    pub creates: u64,
    /// Pods to create for the table-list phase (0 skips it).
    #[arg(long, default_value_t = 10_000)]
    pub pods: u64,
    /// Table lists to time.
    #[arg(long, default_value_t = 20)]
    pub lists: u32,
}

pub(crate) struct Kube {
    pub server: String,
    pub clients: Vec<reqwest::Client>,
}

fn kubeconfig(path: &PathBuf) -> Result<(String, Vec<u8>, Vec<u8>)> {
    let v: Value =
        serde_norway::from_slice(&std::fs::read(path).with_context(|| format!("reading {}", path.display()))?)?;
    let b64 = |v: &Value| -> Result<Vec<u8>> {
        Ok(base64::engine::general_purpose::STANDARD.decode(v.as_str().context("missing kubeconfig field")?)?)
    };
    let cluster = &v["clusters"][0]["cluster"];
    let user = &v["users"][0]["user"];
    let mut ident = b64(&user["client-certificate-data"])?;
    ident.extend(b64(&user["client-key-data"])?);
    Ok((
        cluster["server"].as_str().context("no server")?.to_string(),
        b64(&cluster["certificate-authority-data"])?,
        ident,
    ))
}

impl Kube {
    pub fn new(path: &PathBuf, conns: usize) -> Result<Kube> {
        let (server, ca, ident) = kubeconfig(path)?;
        let mut clients = Vec::new();
        for _ in 0..conns.max(1) {
            clients.push(
                reqwest::Client::builder()
                    .use_rustls_tls()
                    .add_root_certificate(reqwest::Certificate::from_pem(&ca)?)
                    .identity(reqwest::Identity::from_pem(&ident)?)
                    .timeout(Duration::from_secs(60))
                    .build()?,
            );
        }
        Ok(Kube { server, clients })
    }

    /// POSTs `body`, reading the reply without parsing it: the bench
    /// shares the machine with what it measures.
    pub async fn post(&self, i: usize, path: &str, body: &Value) -> Result<()> {
        self.send_post(i, path, body).await?.bytes().await?;
        Ok(())
    }

    async fn send_post(&self, i: usize, path: &str, body: &Value) -> Result<reqwest::Response> {
        let r = self.clients[i % self.clients.len()].post(format!("{}{path}", self.server)).json(body).send().await?;
        if !r.status().is_success() {
            bail!("POST {path}: {} {}", r.status(), r.text().await.unwrap_or_default());
        }
        Ok(r)
    }

    /// POSTs `body`; the created object.
    pub async fn post_json(&self, i: usize, path: &str, body: &Value) -> Result<Value> {
        Ok(self.send_post(i, path, body).await?.json().await?)
    }

    /// GETs `path` as JSON.
    pub async fn get_json(&self, path: &str) -> Result<Value> {
        let r = self.clients[0].get(format!("{}{path}", self.server)).send().await?;
        if !r.status().is_success() {
            bail!("GET {path}: {} {}", r.status(), r.text().await.unwrap_or_default());
        }
        Ok(r.json().await?)
    }

    /// DELETEs `path`; an object already gone (404) is not an error.
    pub async fn delete(&self, i: usize, path: &str) -> Result<()> {
        let r = self.clients[i % self.clients.len()].delete(format!("{}{path}", self.server)).send().await?;
        if !r.status().is_success() && r.status() != reqwest::StatusCode::NOT_FOUND {
            bail!("DELETE {path}: {} {}", r.status(), r.text().await.unwrap_or_default());
        }
        Ok(())
    }
}

pub(crate) fn percentiles(h: &Histogram<u64>) -> Value {
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    json!({"p50": ms(0.5), "p99": ms(0.99), "max": h.max() as f64 / 1000.0})
}

/// `total` POSTs of `make(n)` to `path` from `clients` tasks.
pub(crate) async fn load(
    kube: &Arc<Kube>,
    clients: usize,
    total: u64,
    path: String,
    make: impl Fn(u64) -> Value + Send + Sync + 'static,
) -> Result<Value> {
    let make = Arc::new(make);
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (kube, next, path, make) = (kube.clone(), next.clone(), path.clone(), make.clone());
        tasks.push(tokio::spawn(async move {
            let mut h = Histogram::<u64>::new(3).expect("histogram");
            let mut errors = 0u64;
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= total {
                    break;
                }
                let t = Instant::now();
                match kube.post(c, &path, &make(n)).await {
                    Ok(()) => h.record(t.elapsed().as_micros() as u64).expect("record"),
                    Err(e) => {
                        errors += 1;
                        if errors < 3 {
                            eprintln!("error: {e:#}");
                        }
                    }
                }
            }
            (h, errors)
        }));
    }
    let mut h = Histogram::<u64>::new(3)?;
    let mut errors = 0;
    for t in tasks {
        let (th, e) = t.await?;
        h.add(th)?;
        errors += e;
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(json!({"requests": h.len(), "errors": errors, "duration_s": (secs * 1000.0).round() / 1000.0,
        "per_s": (h.len() as f64 / secs).round(), "latency_ms": percentiles(&h)}))
}

pub async fn run(a: Args) -> Result<Value> {
    let kube = Arc::new(Kube::new(&a.kubeconfig, a.conns)?);
    let ns = format!("bench-{}", std::process::id());
    kube.post(0, "/api/v1/namespaces", &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}))
        .await?;
    eprintln!("creating {} configmaps with {} clients over {} connections", a.creates, a.clients, a.conns);
    let creates = load(&kube, a.clients, a.creates, format!("/api/v1/namespaces/{ns}/configmaps"), |n| {
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": format!("cm-{n}"), "labels": {"bench": "api"}},
            "data": {"key": "value-0123456789abcdef", "n": n.to_string()}})
    })
    .await?;
    let mut out = json!({"clients": a.clients, "conns": a.conns, "creates": creates});
    if a.pods > 0 {
        eprintln!("creating {} pods", a.pods);
        let pods = load(&kube, a.clients, a.pods, format!("/api/v1/namespaces/{ns}/pods"), |n| {
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": format!("pod-{n}"), "labels": {"app": "bench"}},
                "spec": {"containers": [{"name": "app", "image": "registry.local/app:1.0", "ports": [{"containerPort": 8080}],
                  "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}}}]}})
        })
        .await?;
        eprintln!("listing {} pods as a Table {} times", a.pods, a.lists);
        let mut h = Histogram::<u64>::new(3)?;
        let mut rows = 0;
        let url = format!("{}/api/v1/namespaces/{ns}/pods?limit=500000", kube.server);
        for _ in 0..a.lists {
            let t = Instant::now();
            let r = kube.clients[0]
                .get(&url)
                .header("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io,application/json")
                .send()
                .await?;
            let body = r.bytes().await?;
            h.record(t.elapsed().as_micros() as u64)?;
            let v: Value = serde_json::from_slice(&body)?;
            rows = v["rows"].as_array().map_or(0, |r| r.len());
        }
        out["pods"] = pods;
        out["table_list"] = json!({"rows": rows, "lists": a.lists, "latency_ms": percentiles(&h)});
    }
    eprintln!("deleting namespace {ns}");
    let _ = kube.clients[0].delete(format!("{}/api/v1/namespaces/{ns}", kube.server)).send().await;
    Ok(out)
}
