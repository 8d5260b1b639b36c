//! A hollow runtime for scale tests (`--runtime sim`): the agent's whole
//! control path — QUIC, pod watch, workers, status — with containers that
//! exist only in memory. A container "runs" until it is stopped; pod IPs
//! come from the node's pod CIDR.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;

use crate::runtime::*;

#[derive(Default)]
pub struct SimRuntime {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    next: u64,
    base: Option<Ipv4Addr>,
    sandboxes: HashMap<String, Sandbox>,
    containers: HashMap<String, ContainerStatus>,
}

impl SimRuntime {
    pub fn new() -> SimRuntime {
        SimRuntime::default()
    }
}

impl Runtime for SimRuntime {
    fn set_pod_cidr(&self, cidr: &str) {
        self.state.lock().base = cidr.split('/').next().and_then(|ip| ip.parse().ok());
    }

    async fn ensure_image(
        &self,
        image: &str,
        _policy: PullPolicy,
        _auth: &[RegistryAuth],
    ) -> Result<(String, String), RuntimeError> {
        Ok((image.to_string(), format!("sha256:{:064x}", image.len())))
    }

    async fn run_sandbox(&self, cfg: &SandboxConfig) -> Result<Sandbox, RuntimeError> {
        let mut st = self.state.lock();
        st.next += 1;
        let n = st.next;
        let ip = match (cfg.host_network, st.base) {
            (false, Some(base)) => Some(IpAddr::V4(Ipv4Addr::from(u32::from(base) + 2 + (n % 250) as u32))),
            _ => None,
        };
        let sb = Sandbox { id: format!("sim-sandbox-{n}"), pod_uid: cfg.pod_uid.clone(), ip, netns: None };
        st.sandboxes.insert(sb.id.clone(), sb.clone());
        Ok(sb)
    }

    async fn remove_sandbox(&self, sandbox_id: &str) -> Result<(), RuntimeError> {
        self.state.lock().sandboxes.remove(sandbox_id);
        Ok(())
    }

    async fn list_sandboxes(&self) -> Result<Vec<Sandbox>, RuntimeError> {
        Ok(self.state.lock().sandboxes.values().cloned().collect())
    }

    async fn start_container(&self, _sandbox: &Sandbox, cfg: &ContainerConfig) -> Result<String, RuntimeError> {
        let mut st = self.state.lock();
        st.next += 1;
        let id = format!("sim-{}", st.next);
        st.containers.insert(
            id.clone(),
            ContainerStatus {
                id: id.clone(),
                pod_uid: cfg.pod_uid.clone(),
                name: cfg.name.clone(),
                attempt: cfg.attempt,
                image: cfg.image.clone(),
                image_id: format!("sha256:{:064x}", cfg.image.len()),
                state: ContainerState::Running { started_at: SystemTime::now() },
                labels: cfg.labels.clone(),
            },
        );
        Ok(id)
    }

    async fn stop_container(&self, id: &str, _grace: Duration) -> Result<(), RuntimeError> {
        if let Some(c) = self.state.lock().containers.get_mut(id) {
            if let ContainerState::Running { started_at } = c.state {
                c.state = ContainerState::Exited {
                    started_at: Some(started_at),
                    finished_at: SystemTime::now(),
                    exit_code: 0,
                    oom_killed: false,
                };
            }
        }
        Ok(())
    }

    async fn remove_container(&self, id: &str) -> Result<(), RuntimeError> {
        self.state.lock().containers.remove(id);
        Ok(())
    }

    async fn list_containers(&self) -> Result<Vec<ContainerStatus>, RuntimeError> {
        Ok(self.state.lock().containers.values().cloned().collect())
    }

    async fn exec(&self, id: &str, cmd: &[String], _tty: bool, io: ExecIo) -> Result<ExitCode, RuntimeError> {
        if !self.state.lock().containers.contains_key(id) {
            return Err(RuntimeError::NotFound(id.to_string()));
        }
        let _ = io.stdout.send(bytes::Bytes::from(format!("{}\n", cmd.join(" ")))).await;
        Ok(0)
    }

    async fn usage(&self, _id: &str) -> Result<Usage, RuntimeError> {
        Ok(Usage::default())
    }

    /// Hollow nodes at scale: no tmpfs, no files.
    fn materializes_volumes(&self) -> bool {
        false
    }
}
