//! etcd's Watch: one bidirectional stream multiplexing many watchers.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;

use capstan_proto::etcd::etcdserverpb as pb;
use capstan_raft::watch::{WatchMessage, WatchRequest};
use futures::Stream;
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::convert;
use super::EtcdApi;

type Out = mpsc::Sender<Result<pb::WatchResponse, Status>>;

#[tonic::async_trait]
impl pb::watch_server::Watch for EtcdApi {
    type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchResponse, Status>> + Send>>;

    async fn watch(&self, req: Request<Streaming<pb::WatchRequest>>) -> Result<Response<Self::WatchStream>, Status> {
        let mut input = req.into_inner();
        let (tx, rx) = mpsc::channel(256);
        let api = self.clone();
        tokio::spawn(async move {
            // watch id -> task forwarding that watcher's messages
            let watchers: Arc<Mutex<HashMap<i64, tokio::task::JoinHandle<()>>>> = Default::default();
            let progress: Arc<Mutex<HashMap<i64, mpsc::Sender<()>>>> = Default::default();
            let mut next_id = 0i64;
            loop {
                let msg = match input.message().await {
                    Ok(Some(m)) => m,
                    Ok(None) | Err(_) => break,
                };
                use pb::watch_request::RequestUnion;
                match msg.request_union {
                    Some(RequestUnion::CreateRequest(c)) => {
                        let id = if c.watch_id > 0 { c.watch_id } else { next_id };
                        // A client-chosen id may be i64::MAX: never overflow.
                        next_id = next_id.max(id).saturating_add(1);
                        if watchers.lock().contains_key(&id) {
                            let _ = tx.send(Err(Status::invalid_argument("etcdserver: duplicate watch ID"))).await;
                            continue;
                        }
                        if c.key.is_empty() && c.range_end.is_empty() {
                            let _ = tx
                                .send(Ok(pb::WatchResponse {
                                    header: Some(api.header()),
                                    watch_id: id,
                                    created: true,
                                    canceled: true,
                                    cancel_reason: "etcdserver: key is not provided".into(),
                                    ..Default::default()
                                }))
                                .await;
                            continue;
                        }
                        let wreq = WatchRequest {
                            range: convert::range_of(c.key, c.range_end),
                            start_revision: c.start_revision,
                            prev_kv: c.prev_kv,
                            no_put: c.filters.contains(&(pb::watch_create_request::FilterType::Noput as i32)),
                            no_delete: c.filters.contains(&(pb::watch_create_request::FilterType::Nodelete as i32)),
                            progress_notify: c.progress_notify,
                        };
                        // `created` goes out before any event of this watcher.
                        let created = pb::WatchResponse {
                            header: Some(api.header()),
                            watch_id: id,
                            created: true,
                            ..Default::default()
                        };
                        if tx.send(Ok(created)).await.is_err() {
                            break;
                        }
                        let (ptx, prx) = mpsc::channel(4);
                        progress.lock().insert(id, ptx);
                        let handle = tokio::spawn(forward(api.clone(), id, wreq, tx.clone(), prx));
                        watchers.lock().insert(id, handle);
                    }
                    Some(RequestUnion::CancelRequest(c)) => {
                        if let Some(h) = watchers.lock().remove(&c.watch_id) {
                            h.abort();
                        }
                        progress.lock().remove(&c.watch_id);
                        let _ = tx
                            .send(Ok(pb::WatchResponse {
                                header: Some(api.header()),
                                watch_id: c.watch_id,
                                canceled: true,
                                ..Default::default()
                            }))
                            .await;
                    }
                    Some(RequestUnion::ProgressRequest(_)) => {
                        for p in progress.lock().values() {
                            let _ = p.try_send(());
                        }
                    }
                    None => {}
                }
            }
            for (_, h) in watchers.lock().drain() {
                h.abort();
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Moves one watcher's messages onto the shared stream, one revision per response.
async fn forward(api: EtcdApi, id: i64, req: WatchRequest, tx: Out, mut progress: mpsc::Receiver<()>) {
    let mut w = api.node.hub.watch(req);
    loop {
        let msg = tokio::select! {
            m = w.rx.recv() => m,
            Some(()) = progress.recv() => { w.request_progress(); continue; }
        };
        let Some(msg) = msg else { return };
        let resp = match msg {
            WatchMessage::Events { revision, events } => pb::WatchResponse {
                header: Some(api.header_at(revision)),
                watch_id: id,
                events: events.into_iter().map(convert::event).collect(),
                ..Default::default()
            },
            WatchMessage::Progress { revision } => {
                pb::WatchResponse { header: Some(api.header_at(revision)), watch_id: id, ..Default::default() }
            }
            WatchMessage::Canceled { reason, compact_revision } => {
                let _ = tx
                    .send(Ok(pb::WatchResponse {
                        header: Some(api.header()),
                        watch_id: id,
                        canceled: true,
                        compact_revision,
                        cancel_reason: reason,
                        ..Default::default()
                    }))
                    .await;
                return;
            }
        };
        if tx.send(Ok(resp)).await.is_err() {
            return;
        }
    }
}
