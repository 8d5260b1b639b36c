//! `?watch=true`: a chunked stream of `{"type": ..., "object": ...}` lines
//! fed by the store's watch hub. Every event after the requested
//! resourceVersion is delivered once, in revision order; a compacted start
//! is an `ERROR` event carrying a 410 `Status`, never a silent gap.
//!
//! Selectors are applied per event with Kubernetes' semantics: an object
//! that stops matching is sent as `DELETED`, one that starts matching as `ADDED`.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use capstan_proto::k8s::registry::ResourceType;
use capstan_proto::k8s::stored::{StoredError, StoredObject};
use capstan_raft::mvcc::{Event, EventKind};
use capstan_raft::types::{KeyRange, KeyValue};
use capstan_raft::watch::{WatchMessage, WatchRequest};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::handlers::{wants_table, Filter};
use super::objects::prefix;
use super::status::ApiError;
use super::{table, ApiServer, Ctx, Reply, ReplyBody};

/// A watch chunk stops taking waiting events once this long.
const CHUNK: usize = 64 * 1024;

/// Default watch length when the client gives no `timeoutSeconds`
/// (Kubernetes: `--min-request-timeout`, 1800 s).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1800);

struct Encoder {
    kind: &'static str,
    api_version: String,
    table: bool,
    include: String,
}

impl Encoder {
    fn line(&self, ty: &str, obj: Value) -> Bytes {
        let object = if self.table {
            let rv = obj["metadata"]["resourceVersion"].as_str().unwrap_or_default().to_string();
            let row = table::row(self.kind, obj, chrono::Utc::now(), &self.include);
            table::table(self.kind, vec![row], &rv, None)
        } else {
            obj
        };
        // Built by hand: `json!` would copy the object through serialization.
        let mut event = serde_json::Map::new();
        event.insert("type".into(), Value::String(ty.into()));
        event.insert("object".into(), object);
        let mut b = serde_json::to_vec(&event).unwrap_or_default();
        b.push(b'\n');
        Bytes::from(b)
    }

    /// Appends the line for a stored object shown at `revision`: its
    /// stored JSON with the revision spliced in, unless a table is wanted.
    fn stored(&self, ty: &str, key: &[u8], stored: &[u8], revision: i64, out: &mut Vec<u8>) -> Result<(), ApiError> {
        let bad = |e: StoredError| ApiError::internal(format!("stored object {}: {e}", String::from_utf8_lossy(key)));
        let a = StoredObject::access(stored).map_err(bad)?;
        if self.table {
            out.extend_from_slice(&self.line(ty, StoredObject::decode_archived(a, revision).map_err(bad)?));
            return Ok(());
        }
        let object = StoredObject::json_archived(a, revision).map_err(bad)?;
        out.reserve(object.len() + ty.len() + 32);
        out.extend_from_slice(br#"{"type":""#);
        out.extend_from_slice(ty.as_bytes());
        out.extend_from_slice(br#"","object":"#);
        out.extend_from_slice(&object);
        out.extend_from_slice(b"}\n");
        Ok(())
    }

    fn error(&self, e: &ApiError, out: &mut Vec<u8>) {
        if serde_json::to_writer(&mut *out, &json!({"type": "ERROR", "object": e.to_status()})).is_ok() {
            out.push(b'\n');
        }
    }

    /// Appends the lines for one message of the hub; false when the watch
    /// ends with it.
    fn message(&self, msg: WatchMessage, filter: &Filter, bookmarks: bool, start: i64, out: &mut Vec<u8>) -> bool {
        match msg {
            WatchMessage::Events { revision, events } => {
                for ev in &events {
                    let line = convert(ev, revision, filter)
                        .and_then(|c| c.map(|(ty, kv, rev)| self.stored(ty, &kv.key, &kv.value, rev, out)).transpose());
                    if let Err(e) = line {
                        self.error(&e, out);
                    }
                }
                true
            }
            WatchMessage::Progress { revision } => {
                if bookmarks {
                    let bm = json!({"kind": self.kind, "apiVersion": self.api_version,
                        "metadata": {"resourceVersion": revision.to_string()}});
                    if serde_json::to_writer(&mut *out, &json!({"type": "BOOKMARK", "object": bm})).is_ok() {
                        out.push(b'\n');
                    }
                }
                true
            }
            WatchMessage::Canceled { compact_revision, reason } => {
                let e = if compact_revision > 0 {
                    ApiError::gone(format!("too old resource version: {} ({compact_revision})", start - 1))
                } else {
                    ApiError::internal(format!("watch ended: {reason}"))
                };
                self.error(&e, out);
                false
            }
        }
    }
}

/// The watch event for one store event: its type, and the stored object
/// (key, archive) with the revision it is shown at; `None` when the
/// filter hides it before and after.
fn convert<'a>(
    ev: &'a Event,
    revision: i64,
    filter: &Filter,
) -> Result<Option<(&'static str, &'a KeyValue, i64)>, ApiError> {
    match ev.kind {
        // Filters are matched on the archives (labels read in place), and
        // the object is sent as stored.
        EventKind::Put => {
            let now_matches = filter.matches_stored(&ev.kv.value)?;
            let before = ev.prev_kv.as_ref().map(|p| filter.matches_stored(&p.value)).transpose()?;
            let kind = match (before, now_matches) {
                (None | Some(false), true) => "ADDED",
                (Some(true), true) => "MODIFIED",
                (Some(true), false) => "DELETED",
                (_, false) => return Ok(None),
            };
            Ok(Some((kind, &ev.kv, ev.kv.mod_revision)))
        }
        EventKind::Delete => {
            let Some(p) = &ev.prev_kv else { return Ok(None) };
            if !filter.matches_stored(&p.value)? {
                return Ok(None);
            }
            // The deleted object, at the revision that deleted it.
            Ok(Some(("DELETED", p, revision)))
        }
    }
}

pub async fn watch(
    api: Arc<ApiServer>,
    rt: &'static ResourceType,
    ns: Option<&str>,
    name: Option<String>,
    ctx: Ctx,
) -> Result<Reply, ApiError> {
    let mut filter = Filter::from_query(rt, &ctx)?;
    if let Some(n) = &name {
        let mut sel = format!("metadata.name={n}");
        if let Some(f) = ctx.query.get("fieldSelector") {
            sel = format!("{f},{sel}");
        }
        filter.fields = super::selector::FieldSelector::parse(&sel).map_err(ApiError::bad_request)?;
    }
    let rv = match ctx.query.get("resourceVersion") {
        None => None,
        Some(s) => Some(s.parse::<i64>().map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {s:?}")))?),
    };
    let timeout = match ctx.query.get("timeoutSeconds") {
        Some(t) => Duration::from_secs(t.parse().map_err(|_| ApiError::bad_request("invalid timeoutSeconds"))?),
        None => DEFAULT_TIMEOUT,
    };
    let bookmarks = ctx.query.flag("allowWatchBookmarks");
    let enc = Encoder {
        kind: rt.kind,
        api_version: rt.api_version(),
        table: wants_table(&ctx.accept),
        include: ctx.query.get("includeObject").unwrap_or("Metadata").to_string(),
    };
    // No resourceVersion (or "0"): start with the current state as ADDED
    // events, then changes after it — Kubernetes' "get state and start at most recent".
    let mut initial = Vec::new();
    let start = match rv {
        Some(n) if n > 0 => {
            // A revision the store has not reached (after catching up) is
            // refused as Kubernetes does, rather than waited on forever.
            if n > api.objects.revision() {
                api.objects.sync().await?;
            }
            let current = api.objects.revision();
            if n > current {
                return Err(ApiError::new(
                    504,
                    "Timeout",
                    format!("Too large resource version: {n}, current: {current}"),
                ));
            }
            n + 1
        }
        _ => {
            if rv.is_none() {
                api.objects.sync().await?;
            }
            let page = api.objects.list_local(rt, ns, None, None, &|kv| filter.select(kv))?;
            initial = page.items.into_iter().map(|o| enc.line("ADDED", o)).collect();
            page.revision + 1
        }
    };
    let req = WatchRequest {
        range: KeyRange::prefix(prefix(rt, ns)),
        start_revision: start,
        prev_kv: true,
        progress_notify: bookmarks,
        ..Default::default()
    };
    let mut watcher = api.hub.watch(req);
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(64);
    let gauge = api.metrics.watches.with_label_values(&["watch", rt.plural]);
    gauge.inc();
    tokio::spawn(async move {
        let _guard = scopeguard(gauge);
        for line in initial {
            if tx.send(Ok(line)).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        loop {
            let msg = tokio::select! {
                _ = &mut deadline => return,
                _ = tx.closed() => return,
                m = watcher.rx.recv() => m,
            };
            let Some(msg) = msg else { return };
            // What else is already waiting goes out in the same chunk: a
            // busy watcher gets one HTTP/2 frame (and one write) for many
            // events instead of one each.
            let mut chunk = Vec::new();
            let mut more = enc.message(msg, &filter, bookmarks, start, &mut chunk);
            while more && chunk.len() < CHUNK {
                let Ok(msg) = watcher.rx.try_recv() else { break };
                more = enc.message(msg, &filter, bookmarks, start, &mut chunk);
            }
            if !chunk.is_empty() && tx.send(Ok(Bytes::from(chunk))).await.is_err() {
                return;
            }
            if !more {
                return;
            }
        }
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    Ok(Reply { code: http::StatusCode::OK, body: ReplyBody::Stream(body, "application/json"), warnings: vec![] })
}

/// Decrements the open-watches gauge however the stream task ends.
struct GaugeGuard(prometheus::IntGauge);

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

fn scopeguard(g: prometheus::IntGauge) -> GaugeGuard {
    GaugeGuard(g)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(labels: Value, rev: i64) -> KeyValue {
        let obj = json!({"metadata": {"name": "a", "labels": labels}});
        KeyValue {
            key: "/k".into(),
            mod_revision: rev,
            value: StoredObject::from_object(&obj).unwrap().encode().into(),
            ..Default::default()
        }
    }

    fn encoder(table: bool) -> Encoder {
        Encoder { kind: "Pod", api_version: "v1".into(), table, include: String::new() }
    }

    /// Messages appended to one chunk are the lines each would have been
    /// alone, in order; bookmarks only when asked; a cancel ends the watch.
    #[test]
    fn a_chunk_holds_each_message_as_its_own_lines() {
        let enc = encoder(false);
        let all = Filter::default();
        let put = |rev| Event { kind: EventKind::Put, kv: kv(json!({"app": "web"}), rev), prev_kv: None };
        let events = |rev| WatchMessage::Events { revision: rev, events: vec![put(rev)] };
        let mut chunk = Vec::new();
        assert!(enc.message(events(2), &all, true, 2, &mut chunk));
        assert!(enc.message(WatchMessage::Progress { revision: 2 }, &all, false, 2, &mut chunk));
        assert!(enc.message(WatchMessage::Progress { revision: 3 }, &all, true, 2, &mut chunk));
        assert!(enc.message(events(4), &all, true, 2, &mut chunk));
        let cancel = WatchMessage::Canceled { compact_revision: 3, reason: String::new() };
        assert!(!enc.message(cancel, &all, true, 2, &mut chunk));
        let lines: Vec<Value> = chunk
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect();
        let summary: Vec<(&str, &str)> = lines
            .iter()
            .map(|l| {
                let rv =
                    l["object"]["metadata"]["resourceVersion"].as_str().or(l["object"]["code"].as_i64().map(|_| "410"));
                (l["type"].as_str().unwrap(), rv.unwrap())
            })
            .collect();
        assert_eq!(summary, [("ADDED", "2"), ("BOOKMARK", "3"), ("ADDED", "4"), ("ERROR", "410")]);
        assert_eq!(
            lines[1]["object"],
            json!({"kind": "Pod", "apiVersion": "v1", "metadata": {"resourceVersion": "3"}})
        );
        assert!(lines[3]["object"]["message"].as_str().unwrap().contains("too old resource version: 1 (3)"));
    }

    #[test]
    fn selector_transitions_become_added_and_deleted() {
        let filter = Filter {
            labels: super::super::selector::LabelSelector::parse("app=web").unwrap(),
            fields: Default::default(),
        };
        let put = |prev: Option<KeyValue>, new: KeyValue| Event { kind: EventKind::Put, kv: new, prev_kv: prev };
        let ty = |e: &Event| convert(e, 9, &filter).unwrap().map(|(t, ..)| t);
        assert_eq!(ty(&put(None, kv(json!({"app": "web"}), 2))), Some("ADDED"));
        assert_eq!(ty(&put(Some(kv(json!({"app": "web"}), 2)), kv(json!({"app": "web"}), 3))), Some("MODIFIED"));
        assert_eq!(ty(&put(Some(kv(json!({"app": "web"}), 3)), kv(json!({"app": "db"}), 4))), Some("DELETED"));
        assert_eq!(ty(&put(Some(kv(json!({"app": "db"}), 4)), kv(json!({"app": "web"}), 5))), Some("ADDED"));
        assert_eq!(ty(&put(None, kv(json!({}), 6))), None);
        let del = Event {
            kind: EventKind::Delete,
            kv: KeyValue { key: "/k".into(), mod_revision: 9, ..Default::default() },
            prev_kv: Some(kv(json!({"app": "web"}), 5)),
        };
        let (t, kv, rev) = convert(&del, 9, &filter).unwrap().unwrap();
        let enc = encoder(false);
        let mut out = Vec::new();
        enc.stored(t, &kv.key, &kv.value, rev, &mut out).unwrap();
        let line: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            line,
            json!({"type": "DELETED", "object": {"metadata": {"name": "a", "labels": {"app": "web"},
            "resourceVersion": "9"}}})
        );
        // A table row is built from the decoded object.
        let enc = encoder(true);
        let mut out = Vec::new();
        enc.stored(t, &kv.key, &kv.value, rev, &mut out).unwrap();
        let line: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(line["object"]["kind"], "Table");
        assert_eq!(line["object"]["metadata"]["resourceVersion"], "9");
    }
}
