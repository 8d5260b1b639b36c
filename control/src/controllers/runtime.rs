//! Controllers as actix actors: each owns a [`WorkQueue`] of object keys,
//! runs up to `workers` reconciles at once (never two for one key), retries
//! failures with backoff, and acts only while this master holds the
//! controller lease. The actors live on one actix system thread; informers
//! feed them keys with `Addr::do_send` from the store's runtime.
//!
//! A reconcile is level-triggered: given a key it reads the current state
//! from informers and moves the world one step; it must be safe to run
//! again at any time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use futures::future::BoxFuture;

use super::queue::WorkQueue;

/// `Ok(Some(d))`: reconcile again after `d` even if nothing changes.
pub type ReconcileResult = Result<Option<Duration>, String>;

pub trait Reconciler: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    fn reconcile(self: Arc<Self>, key: String) -> BoxFuture<'static, ReconcileResult>;
    /// Every key the controller is responsible for (resync on gaining the lease).
    fn all_keys(&self) -> Vec<String>;
    /// Called when this master starts leading, before the resync.
    fn on_leading(&self) {}
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct Enqueue(pub String);

#[derive(Message)]
#[rtype(result = "()")]
pub struct Leading(pub bool);

pub struct ControllerActor {
    metrics: super::metrics::ControllerMetrics,
    r: Arc<dyn ReconcilerDyn>,
    queue: WorkQueue,
    busy: usize,
    workers: usize,
    leading: bool,
    wakeup: Option<SpawnHandle>,
}

/// Object-safe view of a [`Reconciler`].
trait ReconcilerDyn: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    fn run(&self, key: String) -> BoxFuture<'static, ReconcileResult>;
    fn all_keys(&self) -> Vec<String>;
    fn on_leading(&self);
}

impl<R: Reconciler> ReconcilerDyn for Arc<R> {
    fn name(&self) -> &'static str {
        R::name(self)
    }
    fn run(&self, key: String) -> BoxFuture<'static, ReconcileResult> {
        self.clone().reconcile(key)
    }
    fn all_keys(&self) -> Vec<String> {
        R::all_keys(self)
    }
    fn on_leading(&self) {
        R::on_leading(self)
    }
}

impl ControllerActor {
    pub fn new<R: Reconciler>(
        r: Arc<R>,
        workers: usize,
        metrics: super::metrics::ControllerMetrics,
    ) -> ControllerActor {
        ControllerActor {
            metrics,
            r: Arc::new(r),
            queue: WorkQueue::default(),
            busy: 0,
            workers,
            leading: false,
            wakeup: None,
        }
    }

    fn pump(&mut self, ctx: &mut Context<Self>) {
        if !self.leading {
            return;
        }
        let now = Instant::now();
        while self.busy < self.workers {
            let Some(key) = self.queue.pop(now) else { break };
            self.busy += 1;
            let started = Instant::now();
            let fut = self.r.run(key.clone());
            ctx.spawn(fut.into_actor(self).map(move |res, act, ctx| {
                act.busy -= 1;
                let now = Instant::now();
                match res {
                    Ok(None) => act.queue.done(&key),
                    Ok(Some(after)) => {
                        act.queue.done(&key);
                        act.queue.add_after(&key, now + after);
                    }
                    Err(e) => {
                        act.metrics.retries.with_label_values(&[act.r.name()]).inc();
                        let d = act.queue.failed(&key, now);
                        tracing::debug!(controller = act.r.name(), key, retry_in = ?d, "reconcile failed: {e}");
                    }
                }
                act.metrics.work.with_label_values(&[act.r.name()]).observe(started.elapsed().as_secs_f64());
                act.pump(ctx);
            }));
        }
        if let Some(h) = self.wakeup.take() {
            ctx.cancel_future(h);
        }
        self.metrics.depth.with_label_values(&[self.r.name()]).set(self.queue.len() as i64);
        if self.queue.is_empty() {
            return;
        }
        if let Some(due) = self.queue.next_due() {
            let d = due.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
            self.wakeup = Some(ctx.run_later(d, |act, ctx| {
                act.wakeup = None;
                act.pump(ctx)
            }));
        }
    }
}

impl Actor for ControllerActor {
    type Context = Context<Self>;
}

impl Handler<Enqueue> for ControllerActor {
    type Result = ();
    fn handle(&mut self, m: Enqueue, ctx: &mut Context<Self>) {
        self.queue.add(&m.0);
        self.pump(ctx);
    }
}

impl Handler<Leading> for ControllerActor {
    type Result = ();
    fn handle(&mut self, m: Leading, ctx: &mut Context<Self>) {
        let gained = m.0 && !self.leading;
        self.leading = m.0;
        if gained {
            self.r.on_leading();
            // Level-triggered: on taking over, look at everything once.
            for k in self.r.all_keys() {
                self.queue.add(&k);
            }
            tracing::info!(controller = self.r.name(), "controller active");
        }
        self.pump(ctx);
    }
}
