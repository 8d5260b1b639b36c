//! A hollow runtime for scale tests (`--runtime sim`): the agent's whole
//! control path — QUIC, pod watch, workers, status — with containers that
//! exist only in memory. A container "runs" until it is stopped; pod IPs
//! come from the node's pod CIDR.
//!
//! Usage is zero unless a container asks for a synthetic load through its
//! environment: `CAPSTAN_SIM_CPU` (a CPU quantity, e.g. `200m`: the
//! cumulative counter grows at that rate while it runs) and
//! `CAPSTAN_SIM_MEMORY` (e.g. `64Mi`: its working set). That lets tests
//! drive `kubectl top` and the HorizontalPodAutoscaler without real work.

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
    loads: HashMap<String, SimLoad>,
}

/// A container's synthetic usage (from its environment).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SimLoad {
    pub cpu_millis: u64,
    pub memory_bytes: u64,
}

/// Environment variables a sim container's load is read from.
pub const SIM_CPU_ENV: &str = "CAPSTAN_SIM_CPU";
pub const SIM_MEMORY_ENV: &str = "CAPSTAN_SIM_MEMORY";

impl SimLoad {
    pub fn from_env(env: &[(String, String)]) -> SimLoad {
        let get = |k: &str| env.iter().rev().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        SimLoad {
            cpu_millis: get(SIM_CPU_ENV).and_then(crate::agent::millicores).unwrap_or(0),
            memory_bytes: get(SIM_MEMORY_ENV).and_then(crate::agent::bytes_of).unwrap_or(0),
        }
    }

    /// Usage after running for `ran`: the CPU counter grows at the load's rate.
    pub fn usage(&self, ran: Duration) -> Usage {
        Usage {
            cpu_usage_nanos: (ran.as_nanos() * self.cpu_millis as u128 / 1000) as u64,
            memory_working_set_bytes: self.memory_bytes,
        }
    }
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
        st.loads.insert(id.clone(), SimLoad::from_env(&cfg.env));
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
        let mut st = self.state.lock();
        st.containers.remove(id);
        st.loads.remove(id);
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

    /// A hollow container takes input and answers nothing.
    async fn attach(&self, id: &str, input: AttachInput) -> Result<(), RuntimeError> {
        if !self.state.lock().containers.contains_key(id) {
            return Err(RuntimeError::NotFound(id.to_string()));
        }
        if let Some(mut stdin) = input.stdin {
            while stdin.recv().await.is_some() {}
        }
        Ok(())
    }

    async fn usage(&self, id: &str) -> Result<Usage, RuntimeError> {
        let st = self.state.lock();
        let c = st.containers.get(id).ok_or_else(|| RuntimeError::NotFound(id.to_string()))?;
        let ran = match c.state {
            ContainerState::Running { started_at } => SystemTime::now().duration_since(started_at).unwrap_or_default(),
            ContainerState::Exited { started_at: Some(s), finished_at, .. } => {
                finished_at.duration_since(s).unwrap_or_default()
            }
            _ => Duration::ZERO,
        };
        Ok(st.loads.get(id).copied().unwrap_or_default().usage(ran))
    }

    /// Hollow nodes at scale: no tmpfs, no files.
    fn materializes_volumes(&self) -> bool {
        false
    }

    fn has_pod_network(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_load_comes_from_the_environment() {
        let env = vec![(SIM_CPU_ENV.to_string(), "250m".to_string()), (SIM_MEMORY_ENV.to_string(), "64Mi".to_string())];
        let load = SimLoad::from_env(&env);
        assert_eq!(load, SimLoad { cpu_millis: 250, memory_bytes: 64 << 20 });
        let u = load.usage(Duration::from_secs(4));
        assert_eq!(u.cpu_usage_nanos, 1_000_000_000, "a quarter core for 4 s is 1 s of CPU");
        assert_eq!(u.memory_working_set_bytes, 64 << 20);
        assert_eq!(SimLoad::from_env(&[]).usage(Duration::from_secs(9)), Usage::default());
    }
}
