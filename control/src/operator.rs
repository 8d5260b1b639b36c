//! Operator commands: `capstan status`, `capstan member ...`,
//! `capstan snapshot save|restore`. Each talks to a running master through
//! the etcd API with an admin certificate issued from that master's data dir
//! (see admin.rs); the table rendering is a pure function, tested alone.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use capstan_proto::etcd::etcdserverpb as pb;
use clap::{Args, Subcommand};

use crate::admin;

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Data dir of a running master on this host.
    #[arg(long)]
    pub data_dir: PathBuf,
}

/// One master's line in `capstan status`.
#[derive(Clone, Debug, PartialEq)]
pub struct MasterRow {
    pub name: String,
    pub id: u64,
    pub endpoint: String,
    /// None when the master did not answer.
    pub status: Option<MasterStatus>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct MasterStatus {
    pub leader: u64,
    pub term: u64,
    pub raft_index: u64,
    pub applied: u64,
    pub db_size: i64,
    pub learner: bool,
    pub errors: Vec<String>,
}

fn human_bytes(n: i64) -> String {
    let n = n.max(0) as f64;
    match n {
        n if n >= 1024.0 * 1024.0 * 1024.0 => format!("{:.1} GiB", n / 1024.0 / 1024.0 / 1024.0),
        n if n >= 1024.0 * 1024.0 => format!("{:.1} MiB", n / 1024.0 / 1024.0),
        n if n >= 1024.0 => format!("{:.1} KiB", n / 1024.0),
        n => format!("{n} B"),
    }
}

/// Renders the masters table: leader marked, lag against the highest index seen.
pub fn render_status(rows: &[MasterRow]) -> String {
    let top = rows.iter().filter_map(|r| r.status.as_ref()).map(|s| s.raft_index).max().unwrap_or(0);
    let mut out = format!(
        "{:<12} {:<18} {:<26} {:<7} {:>5} {:>9} {:>6} {:>10}  {}\n",
        "NAME", "ID", "ENDPOINT", "ROLE", "TERM", "APPLIED", "LAG", "DB SIZE", "ALARMS/ERRORS"
    );
    for r in rows {
        let line = match &r.status {
            None => format!(
                "{:<12} {:<18x} {:<26} {:<7} {:>5} {:>9} {:>6} {:>10}  unreachable\n",
                r.name, r.id, r.endpoint, "?", "-", "-", "-", "-"
            ),
            Some(s) => {
                let role = if s.leader == r.id {
                    "leader"
                } else if s.learner {
                    "learner"
                } else {
                    "voter"
                };
                format!(
                    "{:<12} {:<18x} {:<26} {:<7} {:>5} {:>9} {:>6} {:>10}  {}\n",
                    r.name,
                    r.id,
                    r.endpoint,
                    role,
                    s.term,
                    s.applied,
                    top.saturating_sub(s.applied),
                    human_bytes(s.db_size),
                    if s.errors.is_empty() { "-".to_string() } else { s.errors.join("; ") }
                )
            }
        };
        out.push_str(&line);
    }
    out
}

/// Renders the nodes table from Node objects and their heartbeat Leases
/// (kube-node-lease): readiness, cordon, allocatable, last heartbeat.
pub fn render_nodes(
    nodes: &[serde_json::Value],
    leases: &[serde_json::Value],
    now: chrono::DateTime<chrono::Utc>,
) -> String {
    if nodes.is_empty() {
        return "\nNODES\n(none registered)\n".to_string();
    }
    let mut out = format!(
        "\nNODES\n{:<24} {:<9} {:<13} {:>6} {:>10} {:>5}  {}\n",
        "NAME", "STATUS", "SCHEDULING", "CPU", "MEMORY", "PODS", "HEARTBEAT"
    );
    let text = |v: &serde_json::Value| v.as_str().unwrap_or("-").to_string();
    for n in nodes {
        let name = n["metadata"]["name"].as_str().unwrap_or_default();
        let ready = n["status"]["conditions"].as_array().into_iter().flatten().find(|c| c["type"] == "Ready").map_or(
            "Unknown",
            |c| match c["status"].as_str() {
                Some("True") => "Ready",
                Some("False") => "NotReady",
                _ => "Unknown",
            },
        );
        let scheduling = if n["spec"]["unschedulable"] == true { "cordoned" } else { "schedulable" };
        let alloc = &n["status"]["allocatable"];
        let renewed = leases
            .iter()
            .find(|l| l["metadata"]["name"] == name)
            .and_then(|l| l["spec"]["renewTime"].as_str())
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .map_or("never".to_string(), |t| {
                format!("{}s ago", (now - t.with_timezone(&chrono::Utc)).num_seconds().max(0))
            });
        out.push_str(&format!(
            "{:<24} {:<9} {:<13} {:>6} {:>10} {:>5}  {}\n",
            name,
            ready,
            scheduling,
            text(&alloc["cpu"]),
            text(&alloc["memory"]),
            text(&alloc["pods"]),
            renewed
        ));
    }
    out
}

/// Every object of a kind (in one namespace), read through the etcd API.
async fn registry_objects(
    ch: tonic::transport::Channel,
    api_version: &str,
    kind: &str,
    ns: Option<&str>,
) -> anyhow::Result<Vec<serde_json::Value>> {
    let rt = capstan_proto::k8s::registry::by_kind(api_version, kind).context("kind not served")?;
    let prefix = crate::api::objects::prefix(rt, ns);
    let mut end = prefix.clone();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    let req = pb::RangeRequest { key: prefix, range_end: end, ..Default::default() };
    let kvs = pb::kv_client::KvClient::new(ch).range(req).await?.into_inner().kvs;
    Ok(kvs
        .iter()
        .filter_map(|kv| capstan_proto::k8s::stored::StoredObject::decode(&kv.value, kv.mod_revision).ok())
        .collect())
}

pub async fn status(a: StatusArgs) -> anyhow::Result<()> {
    let ch = admin::admin_channel(&a.data_dir).await?;
    let nodes = registry_objects(ch.clone(), "v1", "Node", None).await?;
    let leases = registry_objects(ch.clone(), "coordination.k8s.io/v1", "Lease", Some("kube-node-lease")).await?;
    let members = pb::cluster_client::ClusterClient::new(ch).member_list(pb::MemberListRequest::default()).await?;
    let (ca, cert) = admin::issue_admin(&a.data_dir)?;
    let mut rows = Vec::new();
    for m in members.into_inner().members {
        let endpoint = m.client_ur_ls.first().cloned().unwrap_or_default();
        let status = match admin::channel(&endpoint, &ca, &cert).await {
            Ok(ch) => {
                let mut c = pb::maintenance_client::MaintenanceClient::new(ch);
                let req = tonic::Request::new(pb::StatusRequest::default());
                match tokio::time::timeout(Duration::from_secs(5), c.status(req)).await {
                    Ok(Ok(s)) => {
                        let s = s.into_inner();
                        Some(MasterStatus {
                            leader: s.leader,
                            term: s.raft_term,
                            raft_index: s.raft_index,
                            applied: s.raft_applied_index,
                            db_size: s.db_size,
                            learner: s.is_learner,
                            errors: s.errors,
                        })
                    }
                    _ => None,
                }
            }
            Err(_) => None,
        };
        rows.push(MasterRow { name: m.name, id: m.id, endpoint, status });
    }
    print!("{}", render_status(&rows));
    print!("{}", render_nodes(&nodes, &leases, chrono::Utc::now()));
    Ok(())
}

#[derive(Subcommand, Debug)]
pub enum MemberCmd {
    /// List members.
    List(StatusArgs),
    /// Print the command that joins a new master (with a fresh bootstrap token).
    Add {
        #[arg(long)]
        data_dir: PathBuf,
        /// Name for the new master.
        name: String,
    },
    /// Remove a member (by name or hex id).
    Remove {
        #[arg(long)]
        data_dir: PathBuf,
        member: String,
    },
    /// Promote a learner to voter (by name or hex id).
    Promote {
        #[arg(long)]
        data_dir: PathBuf,
        member: String,
    },
}

async fn find_member(ch: tonic::transport::Channel, who: &str) -> anyhow::Result<pb::Member> {
    let list = pb::cluster_client::ClusterClient::new(ch).member_list(pb::MemberListRequest::default()).await?;
    let id = u64::from_str_radix(who, 16).ok();
    list.into_inner()
        .members
        .into_iter()
        .find(|m| m.name == who || Some(m.id) == id)
        .with_context(|| format!("no member named or numbered {who:?}"))
}

pub async fn member(cmd: MemberCmd) -> anyhow::Result<()> {
    match cmd {
        MemberCmd::List(a) => {
            let ch = admin::admin_channel(&a.data_dir).await?;
            let list = pb::cluster_client::ClusterClient::new(ch).member_list(pb::MemberListRequest::default()).await?;
            println!("{:<18} {:<12} {:<8} {:<28} CLIENT URL", "ID", "NAME", "ROLE", "PEER URL");
            for m in list.into_inner().members {
                let role = if m.is_learner { "learner" } else { "voter" };
                let peer = m.peer_ur_ls.first().cloned().unwrap_or_default();
                let client = m.client_ur_ls.first().cloned().unwrap_or_default();
                println!("{:<18x} {:<12} {:<8} {:<28} {}", m.id, m.name, role, peer, client);
            }
        }
        MemberCmd::Add { data_dir, name } => {
            let token = admin::create_token(&data_dir, Duration::from_secs(3600), "master").await?;
            let ep = crate::server::read_endpoints(&data_dir)?;
            println!("On the new master's host, run (the token is valid for one hour):");
            println!(
                "  capstan server --name {name} --data-dir <dir> --join {} --token {token} --peer-listen <addr:port> --etcd-listen <addr:port>",
                ep.peer
            );
        }
        MemberCmd::Remove { data_dir, member } => {
            let ch = admin::admin_channel(&data_dir).await?;
            let m = find_member(ch.clone(), &member).await?;
            pb::cluster_client::ClusterClient::new(ch).member_remove(pb::MemberRemoveRequest { id: m.id }).await?;
            println!("removed {} ({:x})", m.name, m.id);
        }
        MemberCmd::Promote { data_dir, member } => {
            let ch = admin::admin_channel(&data_dir).await?;
            let m = find_member(ch.clone(), &member).await?;
            pb::cluster_client::ClusterClient::new(ch).member_promote(pb::MemberPromoteRequest { id: m.id }).await?;
            println!("promoted {} ({:x})", m.name, m.id);
        }
    }
    Ok(())
}

#[derive(Subcommand, Debug)]
pub enum SnapshotCmd {
    /// Save a consistent backup of the running cluster to a file.
    Save {
        file: PathBuf,
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Create a new one-master cluster from a backup; then run it with
    /// `capstan server --data-dir <dir>` and grow it with `member add`.
    Restore {
        file: PathBuf,
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long)]
        peer_listen: Option<std::net::SocketAddr>,
        #[arg(long)]
        etcd_listen: Option<std::net::SocketAddr>,
        #[arg(long)]
        metrics_listen: Option<std::net::SocketAddr>,
        #[arg(long)]
        api_listen: Option<std::net::SocketAddr>,
        /// Node gateway (QUIC) address for the restored master [default: a free port].
        #[arg(long)]
        node_listen: Option<std::net::SocketAddr>,
    },
}

pub async fn snapshot(cmd: SnapshotCmd) -> anyhow::Result<()> {
    match cmd {
        SnapshotCmd::Save { file, data_dir } => {
            let ch = admin::admin_channel(&data_dir).await?;
            let mut stream = pb::maintenance_client::MaintenanceClient::new(ch)
                .snapshot(pb::SnapshotRequest::default())
                .await?
                .into_inner();
            let mut data = Vec::new();
            let mut revision = 0;
            while let Some(chunk) = stream.message().await? {
                revision = chunk.header.map_or(revision, |h| h.revision);
                data.extend_from_slice(&chunk.blob);
            }
            // Refuse to write a backup that would not restore.
            let image = capstan_raft::backup::decode(&data).context("the received backup is invalid")?;
            let tmp = file.with_extension("part");
            std::fs::write(&tmp, &data)?;
            std::fs::File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, &file)?;
            println!("saved {} ({} bytes, revision {revision}, {} keys)", file.display(), data.len(), image.keys.len());
        }
        SnapshotCmd::Restore {
            file,
            data_dir,
            name,
            peer_listen,
            etcd_listen,
            metrics_listen,
            api_listen,
            node_listen,
        } => {
            if data_dir.join("member.json").exists() {
                bail!("{} already holds a master; restore into a new directory", data_dir.display());
            }
            let args = crate::server::ServerArgs {
                data_dir: data_dir.clone(),
                name: Some(name),
                init: true,
                join: None,
                restore: Some(file),
                exit_when_ready: true,
                token: None,
                peer_listen,
                peer_advertise: None,
                etcd_listen,
                metrics_listen,
                api_listen,
                node_monitor_grace_period: None,
                node_listen: Some(node_listen.unwrap_or_else(|| std::net::SocketAddr::from(([127, 0, 0, 1], 0)))),
                cluster_cidr: None,
                etcd_plaintext_listen: None,
                max_request_bytes: None,
                quota_bytes: None,
                min_free_disk_bytes: None,
                auto_compaction_revisions: None,
                snapshot_every: None,
                heartbeat_interval: None,
                election_timeout: None,
            };
            crate::server::run(args).await?;
            println!(
                "restored into {}; run it with: capstan server --data-dir {}",
                data_dir.display(),
                data_dir.display()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_table_marks_the_leader_and_the_lag() {
        let st = |applied, leader| MasterStatus {
            leader,
            term: 3,
            raft_index: 120,
            applied,
            db_size: 2048,
            learner: false,
            errors: vec![],
        };
        let rows = vec![
            MasterRow { name: "m1".into(), id: 1, endpoint: "https://a".into(), status: Some(st(120, 1)) },
            MasterRow { name: "m2".into(), id: 2, endpoint: "https://b".into(), status: Some(st(100, 1)) },
            MasterRow { name: "m3".into(), id: 3, endpoint: "https://c".into(), status: None },
        ];
        let out = render_status(&rows);
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[1].contains("leader") && lines[1].contains("2.0 KiB"), "{out}");
        assert!(lines[2].contains("voter") && lines[2].split_whitespace().any(|w| w == "20"), "{out}");
        assert!(lines[3].contains("unreachable"), "{out}");
    }

    #[test]
    fn nodes_table_shows_readiness_cordon_and_heartbeat() {
        use serde_json::json;
        let now = chrono::DateTime::parse_from_rfc3339("2026-01-01T00:01:00Z").unwrap().with_timezone(&chrono::Utc);
        assert!(render_nodes(&[], &[], now).contains("(none registered)"));
        let nodes = [
            json!({"metadata": {"name": "n1"}, "status": {"allocatable": {"cpu": "4", "memory": "8Gi", "pods": "110"},
                "conditions": [{"type": "Ready", "status": "True"}]}}),
            json!({"metadata": {"name": "n2"}, "spec": {"unschedulable": true},
                "status": {"conditions": [{"type": "Ready", "status": "Unknown"}]}}),
        ];
        let leases = [json!({"metadata": {"name": "n1"}, "spec": {"renewTime": "2026-01-01T00:00:50.000000Z"}})];
        let out = render_nodes(&nodes, &leases, now);
        let lines: Vec<&str> = out.lines().collect();
        let cols = |l: &str| l.split_whitespace().map(str::to_string).collect::<Vec<_>>();
        assert_eq!(cols(lines[3]), ["n1", "Ready", "schedulable", "4", "8Gi", "110", "10s", "ago"], "{out}");
        assert_eq!(cols(lines[4]), ["n2", "Unknown", "cordoned", "-", "-", "-", "never"], "{out}");
    }
}
