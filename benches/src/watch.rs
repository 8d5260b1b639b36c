//! Kubernetes list-then-watch for the node benches: a list gives the
//! objects and the resourceVersion to watch from; `follow` streams events
//! (stamped when their line arrives) into a channel, resuming from the last
//! seen resourceVersion when the server ends a watch, until the receiver
//! is dropped.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;
use tokio::sync::mpsc;

use crate::api::Kube;

pub(crate) struct Event {
    /// When the event's line was read.
    pub at: Instant,
    /// ADDED, MODIFIED, DELETED (BOOKMARKs are not passed on).
    pub kind: String,
    pub object: Value,
}

/// Splits a byte stream into lines; a partial line waits for the next chunk.
#[derive(Default)]
pub(crate) struct Lines {
    buf: Vec<u8>,
}

impl Lines {
    pub fn push(&mut self, chunk: &[u8]) -> Vec<Vec<u8>> {
        self.buf.extend_from_slice(chunk);
        let mut out = Vec::new();
        while let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
            let mut line: Vec<u8> = self.buf.drain(..=i).collect();
            line.pop();
            if !line.is_empty() {
                out.push(line);
            }
        }
        out
    }
}

/// GET `path` (a collection, with any `?query`); its items and resourceVersion.
pub(crate) async fn list(kube: &Kube, path: &str) -> Result<(Vec<Value>, String)> {
    let v = kube.get_json(path).await?;
    let rv = v["metadata"]["resourceVersion"].as_str().context("list without resourceVersion")?.to_string();
    let items = v["items"].as_array().cloned().unwrap_or_default();
    Ok((items, rv))
}

/// Watches `path` (a collection; `query` such as `labelSelector=...`) from
/// `rv` into `tx`. Returns when `tx` is closed; fails on a watch error
/// (e.g. 410 Gone: the bench is too slow for the store's compaction).
pub(crate) async fn follow(
    kube: Arc<Kube>,
    path: String,
    query: String,
    mut rv: String,
    tx: mpsc::UnboundedSender<Event>,
) -> Result<()> {
    let sep = if query.is_empty() { "" } else { "&" };
    loop {
        let url = format!("{}{path}?{query}{sep}watch=1&allowWatchBookmarks=true&resourceVersion={rv}", kube.server);
        let mut r = kube.clients[0].get(&url).timeout(Duration::from_secs(24 * 3600)).send().await?;
        if !r.status().is_success() {
            bail!("watch {path}: {} {}", r.status(), r.text().await.unwrap_or_default());
        }
        let mut lines = Lines::default();
        while let Some(chunk) = r.chunk().await? {
            for line in lines.push(&chunk) {
                let at = Instant::now();
                let Ok(mut ev) = serde_json::from_slice::<Value>(&line) else { continue };
                let kind = ev["type"].as_str().unwrap_or_default().to_string();
                if kind == "ERROR" {
                    bail!("watch {path}: {}", ev["object"]);
                }
                if let Some(v) = ev["object"]["metadata"]["resourceVersion"].as_str() {
                    rv = v.to_string();
                }
                if kind == "BOOKMARK" {
                    continue;
                }
                let object = ev["object"].take();
                if tx.send(Event { at, kind, object }).is_err() {
                    return Ok(());
                }
            }
        }
        if tx.is_closed() {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_across_chunks() {
        let mut l = Lines::default();
        assert!(l.push(b"{\"a\"").is_empty());
        assert_eq!(l.push(b":1}\n{\"b\":2}\n\n{\"c\""), vec![b"{\"a\":1}".to_vec(), b"{\"b\":2}".to_vec()]);
        assert_eq!(l.push(b":3}\n"), vec![b"{\"c\":3}".to_vec()]);
    }
}
