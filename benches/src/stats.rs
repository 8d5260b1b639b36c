//! Latency summaries over exact samples (nearest-rank percentiles).
//!
//! The load benches record into HDR histograms (millions of samples); the
//! node benches time a few hundred or thousand objects, where exact
//! samples are cheap and a p99 over 100 pods should be a real pod's time.
//! No IO here.

use serde_json::{json, Value};

/// p50/p90/p99/max of a set of samples, in the samples' unit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Summary {
    pub count: usize,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Summary {
    /// `None` without samples. NaNs sort last (they should not occur).
    pub fn of(mut samples: Vec<f64>) -> Option<Summary> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_by(|a, b| a.total_cmp(b));
        Some(Summary {
            count: samples.len(),
            p50: nearest_rank(&samples, 0.50),
            p90: nearest_rank(&samples, 0.90),
            p99: nearest_rank(&samples, 0.99),
            max: samples[samples.len() - 1],
        })
    }

    /// `{"count", "p50", "p90", "p99", "max"}`, values rounded to 0.1.
    pub fn json(&self) -> Value {
        let r = |v: f64| (v * 10.0).round() / 10.0;
        json!({"count": self.count, "p50": r(self.p50), "p90": r(self.p90), "p99": r(self.p99), "max": r(self.max)})
    }
}

/// `Summary::of(..).json()`, or `null` without samples.
pub(crate) fn summary_json(samples: Vec<f64>) -> Value {
    Summary::of(samples).map_or(Value::Null, |s| s.json())
}

/// The smallest sample with at least `q` of the samples at or below it.
fn nearest_rank(sorted: &[f64], q: f64) -> f64 {
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Seconds rounded to the millisecond, for reports.
pub(crate) fn secs3(s: f64) -> f64 {
    (s * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_has_no_summary() {
        assert_eq!(Summary::of(vec![]), None);
        assert_eq!(summary_json(vec![]), Value::Null);
    }

    #[test]
    fn one_sample_is_every_percentile() {
        let s = Summary::of(vec![7.0]).unwrap();
        assert_eq!((s.count, s.p50, s.p90, s.p99, s.max), (1, 7.0, 7.0, 7.0, 7.0));
    }

    #[test]
    fn nearest_rank_on_one_to_hundred() {
        // Unsorted input: 100, 99, ..., 1.
        let s = Summary::of((1..=100).rev().map(f64::from).collect()).unwrap();
        assert_eq!((s.p50, s.p90, s.p99, s.max), (50.0, 90.0, 99.0, 100.0));
    }

    #[test]
    fn p99_of_ten_is_the_slowest() {
        let s = Summary::of((1..=10).map(f64::from).collect()).unwrap();
        assert_eq!((s.p50, s.p90, s.p99), (5.0, 9.0, 10.0));
    }

    #[test]
    fn json_rounds_to_a_tenth() {
        let v = Summary::of(vec![1.234, 5.678]).unwrap().json();
        assert_eq!(v, json!({"count": 2, "p50": 1.2, "p90": 5.7, "p99": 5.7, "max": 5.7}));
    }
}
