//! `capstan-bench store`: an etcd v3 load generator.
//!
//! Every client is one task that issues one request at a time, in a loop,
//! until the shared request budget (`--total`) or the time limit
//! (`--duration`) runs out. Clients share `--conns` gRPC channels
//! round-robin, and the channels are spread round-robin over the endpoints.
//! Latencies of successful requests go into per-client HDR histograms that
//! are merged at the end.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use capstan_proto::etcd::etcdserverpb::{
    compare::{CompareResult, CompareTarget, TargetUnion},
    kv_client::KvClient,
    request_op::Request as Op,
    Compare, PutRequest, RangeRequest, RequestOp, TxnRequest,
};
use clap::ValueEnum;
use hdrhistogram::Histogram;
use rand::{rngs::StdRng, Rng, RngCore, SeedableRng};
use serde::Serialize;
use tonic::transport::Channel;

use crate::conn::{self, Tls};

/// Requests budget when neither `--total` nor `--duration` is given.
const DEFAULT_TOTAL: u64 = 10_000;
/// Request errors echoed to stderr (the rest are only counted).
const ERRORS_SHOWN: u64 = 5;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    /// Put a random key of the key space with a random value.
    Put,
    /// Range (get) one random key, linearizable (serializable=false).
    RangeLinear,
    /// Range (get) one random key, serializable (member-local).
    RangeSerial,
    /// Txn: if mod_revision(key) > 0 then put(key) else put(key).
    Txn,
    /// range-linear with probability --mix-read-ratio, else put.
    Mix,
}

impl Workload {
    fn name(self) -> String {
        self.to_possible_value().map(|v| v.get_name().to_string()).unwrap_or_default()
    }
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Client URLs, comma-separated (http:// or https://; a bare host:port
    /// gets https:// when TLS files are given).
    #[arg(long, value_delimiter = ',', default_value = "http://127.0.0.1:2379")]
    pub endpoints: Vec<String>,
    /// CA bundle to verify the servers with (enables TLS).
    #[arg(long)]
    pub cacert: Option<PathBuf>,
    /// Client certificate (PEM), with --key.
    #[arg(long)]
    pub cert: Option<PathBuf>,
    /// Client private key (PEM), with --cert.
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// Concurrent clients, each with one request in flight.
    #[arg(long, default_value_t = 100)]
    pub clients: usize,
    /// gRPC connections, shared round-robin by the clients.
    #[arg(long, default_value_t = 10)]
    pub conns: usize,
    /// Stop after this many requests (default 10000 when --duration is not
    /// given either).
    #[arg(long)]
    pub total: Option<u64>,
    /// Stop after this many seconds.
    #[arg(long)]
    pub duration: Option<f64>,
    /// Key length in bytes.
    #[arg(long, default_value_t = 32)]
    pub key_size: usize,
    /// Value length in bytes (put and txn).
    #[arg(long, default_value_t = 256)]
    pub value_size: usize,
    /// Number of distinct keys; each request picks one uniformly.
    #[arg(long, default_value_t = 10_000)]
    pub key_space: u64,
    #[arg(long, value_enum, default_value_t = Workload::Put)]
    pub workload: Workload,
    /// Fraction of reads in the mix workload.
    #[arg(long, default_value_t = 0.5)]
    pub mix_read_ratio: f64,
    /// Seed of the clients' random keys and values.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Per-request timeout in seconds (a timeout counts as an error).
    #[arg(long, default_value_t = 10.0)]
    pub timeout: f64,
    /// Put every key of the key space once before measuring (not counted).
    #[arg(long)]
    pub prefill: bool,
}

/// The JSON object printed on stdout (fields in this order).
#[derive(Serialize)]
struct Output {
    workload: String,
    clients: usize,
    conns: usize,
    value_size: usize,
    /// Successful requests.
    requests: u64,
    /// Failed or timed-out requests.
    errors: u64,
    /// From the first request to the last response.
    duration_s: f64,
    /// Successful requests per second.
    throughput_per_s: f64,
    /// Of successful requests.
    latency_ms: Latency,
}

#[derive(Serialize)]
struct Latency {
    p50: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

/// What `run` measured.
pub struct Report {
    /// The JSON line printed on stdout.
    pub json: String,
    /// Successful requests.
    pub requests: u64,
    pub errors: u64,
}

struct Cfg {
    workload: Workload,
    key_space: u64,
    /// Digits after the "b/" prefix: keys are "b/" + zero-padded index.
    key_digits: usize,
    value_size: usize,
    read_ratio: f64,
    seed: u64,
    total: u64,
    deadline: Option<Instant>,
    timeout: Duration,
}

impl Cfg {
    fn key(&self, idx: u64) -> Vec<u8> {
        format!("b/{idx:0width$}", width = self.key_digits).into_bytes()
    }
}

#[derive(Default)]
struct Counters {
    /// Requests handed out against the --total budget.
    issued: AtomicU64,
    ok: AtomicU64,
    errors: AtomicU64,
    /// Next key index to prefill.
    prefill: AtomicU64,
}

pub async fn run(args: Args) -> Result<Report> {
    if args.clients == 0 || args.conns == 0 {
        bail!("--clients and --conns must be at least 1");
    }
    if args.key_space == 0 {
        bail!("--key-space must be at least 1");
    }
    if !(0.0..=1.0).contains(&args.mix_read_ratio) {
        bail!("--mix-read-ratio must be within [0, 1]");
    }
    if args.duration.is_some_and(|d| !(d > 0.0 && d.is_finite())) || !(args.timeout > 0.0 && args.timeout.is_finite()) {
        bail!("--duration and --timeout must be positive");
    }
    let total = match (args.total, args.duration) {
        (Some(t), _) => t,
        (None, Some(_)) => u64::MAX,
        (None, None) => DEFAULT_TOTAL,
    };
    let tls = Tls { cacert: args.cacert.clone(), cert: args.cert.clone(), key: args.key.clone() };
    let conns = args.conns.min(args.clients);
    eprintln!(
        "capstan-bench store: {} x {} clients over {} connections to {}",
        args.workload.name(),
        args.clients,
        conns,
        args.endpoints.join(",")
    );
    let channels = conn::open(&args.endpoints, conns, &tls).await?;

    let key_digits = args.key_size.saturating_sub(2).max((args.key_space - 1).to_string().len());
    let mut cfg = Cfg {
        workload: args.workload,
        key_space: args.key_space,
        key_digits,
        value_size: args.value_size,
        read_ratio: args.mix_read_ratio,
        seed: args.seed,
        total,
        deadline: None,
        timeout: Duration::from_secs_f64(args.timeout),
    };
    let counters = Arc::new(Counters::default());

    if args.prefill {
        let began = Instant::now();
        let shared = Arc::new(cfg);
        let tasks: Vec<_> = (0..args.clients)
            .map(|i| tokio::spawn(prefill(channels[i % channels.len()].clone(), shared.clone(), counters.clone())))
            .collect();
        for task in tasks {
            task.await??;
        }
        eprintln!("prefilled {} keys in {:.1}s", args.key_space, began.elapsed().as_secs_f64());
        cfg = Arc::into_inner(shared).expect("prefill tasks are done");
    }

    let start = Instant::now();
    cfg.deadline = args.duration.map(|d| start + Duration::from_secs_f64(d));
    let cfg = Arc::new(cfg);
    let tasks: Vec<_> = (0..args.clients)
        .map(|i| tokio::spawn(client(i as u64, channels[i % channels.len()].clone(), cfg.clone(), counters.clone())))
        .collect();
    let progress = tokio::spawn(progress(start, counters.clone()));

    let mut hist = new_histogram();
    for t in tasks {
        hist.add(t.await?)?;
    }
    let elapsed = start.elapsed().as_secs_f64();
    progress.abort();

    let requests = counters.ok.load(Relaxed);
    let errors = counters.errors.load(Relaxed);
    let ms = |us: u64| us as f64 / 1000.0;
    let out = Output {
        workload: args.workload.name(),
        clients: args.clients,
        conns,
        value_size: args.value_size,
        requests,
        errors,
        duration_s: round3(elapsed),
        throughput_per_s: round3(requests as f64 / elapsed),
        latency_ms: Latency {
            p50: ms(hist.value_at_quantile(0.50)),
            p99: ms(hist.value_at_quantile(0.99)),
            p999: ms(hist.value_at_quantile(0.999)),
            max: ms(hist.max()),
        },
    };
    let json = serde_json::to_string(&out)?;
    eprintln!("done: {requests} ok, {errors} errors in {elapsed:.2}s");
    Ok(Report { json, requests, errors })
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn new_histogram() -> Histogram<u64> {
    // Microseconds, 1 µs to 1 h, 3 significant digits.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

async fn progress(start: Instant, c: Arc<Counters>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut last = 0;
    loop {
        tick.tick().await;
        let ok = c.ok.load(Relaxed);
        eprintln!(
            "{:>7.1}s {:>10} ok {:>8} errors {:>10.0}/s",
            start.elapsed().as_secs_f64(),
            ok,
            c.errors.load(Relaxed),
            (ok - last) as f64
        );
        last = ok;
    }
}

async fn prefill(ch: Channel, cfg: Arc<Cfg>, c: Arc<Counters>) -> Result<()> {
    let mut kv = KvClient::new(ch);
    loop {
        let idx = c.prefill.fetch_add(1, Relaxed);
        if idx >= cfg.key_space {
            return Ok(());
        }
        let req = PutRequest { key: cfg.key(idx), value: vec![b'x'; cfg.value_size], ..Default::default() };
        kv.put(req).await?;
    }
}

/// One client: one request in flight at a time until the budget or the
/// time is up. Returns the latencies (µs) of its successful requests.
async fn client(id: u64, ch: Channel, cfg: Arc<Cfg>, c: Arc<Counters>) -> Histogram<u64> {
    let mut kv = KvClient::new(ch);
    let mut rng = StdRng::seed_from_u64(cfg.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15).wrapping_add(id));
    let mut hist = new_histogram();
    let mut value = vec![0u8; cfg.value_size];
    loop {
        if c.issued.fetch_add(1, Relaxed) >= cfg.total || cfg.deadline.is_some_and(|d| Instant::now() >= d) {
            return hist;
        }
        let key = cfg.key(rng.gen_range(0..cfg.key_space));
        let op = match cfg.workload {
            Workload::Mix if rng.gen_bool(cfg.read_ratio) => Workload::RangeLinear,
            Workload::Mix => Workload::Put,
            w => w,
        };
        if matches!(op, Workload::Put | Workload::Txn) {
            rng.fill_bytes(&mut value);
        }
        let t = Instant::now();
        let res = tokio::time::timeout(cfg.timeout, request(&mut kv, op, key, &value)).await;
        let us = t.elapsed().as_micros() as u64;
        let err = match res {
            Ok(Ok(())) => {
                hist.saturating_record(us.max(1));
                c.ok.fetch_add(1, Relaxed);
                continue;
            }
            Ok(Err(status)) => format!("{}: {}", status.code(), status.message()),
            Err(_) => format!("timed out after {:?}", cfg.timeout),
        };
        if c.errors.fetch_add(1, Relaxed) < ERRORS_SHOWN {
            eprintln!("client {id}: {err}");
        }
    }
}

async fn request(kv: &mut KvClient<Channel>, op: Workload, key: Vec<u8>, value: &[u8]) -> Result<(), tonic::Status> {
    match op {
        Workload::Put | Workload::Mix => {
            kv.put(PutRequest { key, value: value.to_vec(), ..Default::default() }).await?;
        }
        Workload::RangeLinear | Workload::RangeSerial => {
            let serializable = op == Workload::RangeSerial;
            kv.range(RangeRequest { key, serializable, ..Default::default() }).await?;
        }
        Workload::Txn => {
            let put = || RequestOp {
                request: Some(Op::RequestPut(PutRequest {
                    key: key.clone(),
                    value: value.to_vec(),
                    ..Default::default()
                })),
            };
            let txn = TxnRequest {
                compare: vec![Compare {
                    result: CompareResult::Greater as i32,
                    target: CompareTarget::Mod as i32,
                    key: key.clone(),
                    target_union: Some(TargetUnion::ModRevision(0)),
                    range_end: Vec::new(),
                }],
                success: vec![put()],
                failure: vec![put()],
            };
            kv.txn(txn).await?;
        }
    }
    Ok(())
}
