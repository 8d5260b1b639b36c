//! Prometheus metrics of the store. Counters are created unregistered, so
//! every component can be built in tests; `register` attaches them to the
//! registry a process serves on `/metrics`.

use prometheus::{IntCounter, Registry};

pub struct WatchMetrics {
    pub events_sent: IntCounter,
    pub lagged: IntCounter,
    pub cancelled_compacted: IntCounter,
}

impl Default for WatchMetrics {
    fn default() -> Self {
        let c = |name: &str, help: &str| IntCounter::new(name, help).expect("valid metric name");
        WatchMetrics {
            events_sent: c("capstan_watch_events_sent_total", "Watch events delivered to watchers."),
            lagged: c(
                "capstan_watch_lagged_total",
                "Times a watcher fell behind the live stream and caught up from history.",
            ),
            cancelled_compacted: c(
                "capstan_watch_cancelled_total",
                "Watchers cancelled because the revision they needed was compacted.",
            ),
        }
    }
}

impl WatchMetrics {
    pub fn register(&self, r: &Registry) -> prometheus::Result<()> {
        r.register(Box::new(self.events_sent.clone()))?;
        r.register(Box::new(self.lagged.clone()))?;
        r.register(Box::new(self.cancelled_compacted.clone()))?;
        Ok(())
    }
}
