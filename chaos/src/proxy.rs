//! Delay, jitter (so reordering), duplication and loss between masters,
//! without netem (this kernel has none): a UDP proxy in front of every
//! master's peer port. Each master advertises its proxy's "front" address
//! (`capstan up --peer-advertise`), so every peer datagram to it,
//! QUIC included, passes through here:
//!
//! ```text
//! master A (port a) --> front F_B --[impaired]--> upstream U(a) --> master B
//! master A          <-- front F_B <-[impaired]--- upstream U(a) <-- master B
//! ```
//!
//! One upstream socket per source keeps each sender's flow distinct, as a
//! NAT does; QUIC and TLS do not care (a master's certificate names the
//! address it advertises, and certificates name hosts, not ports). On
//! hosts ([`crate::hosts`]) the proxy binds the client host's address. The impairment can be changed
//! while traffic flows; [`Impairment::none`] forwards at once.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

/// What happens to each datagram, either way.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Impairment {
    /// Fixed delay, plus a uniform random extra of up to `jitter`: with
    /// jitter, datagrams overtake each other (reordering).
    pub delay: Duration,
    pub jitter: Duration,
    /// Probability (0..1) a datagram is sent twice (each copy delayed on
    /// its own), and that it is dropped.
    pub duplicate: f64,
    pub loss: f64,
}

impl Impairment {
    pub fn none() -> Impairment {
        Impairment::default()
    }
}

/// Datagrams through the proxy so far, by fate.
#[derive(Debug, Default, Serialize)]
pub struct ProxyStats {
    pub forwarded: AtomicU64,
    pub delayed: AtomicU64,
    pub duplicated: AtomicU64,
    pub dropped: AtomicU64,
}

/// One datagram's fate: the delay of each copy sent (none: dropped).
/// Pure, so the arithmetic is tested without sockets.
pub fn fate(imp: &Impairment, rng: &mut impl Rng) -> Vec<Duration> {
    if imp.loss > 0.0 && rng.gen_bool(imp.loss.min(1.0)) {
        return vec![];
    }
    let copies = if imp.duplicate > 0.0 && rng.gen_bool(imp.duplicate.min(1.0)) { 2 } else { 1 };
    (0..copies)
        .map(|_| {
            let extra = if imp.jitter.is_zero() { Duration::ZERO } else { imp.jitter.mul_f64(rng.gen::<f64>()) };
            imp.delay + extra
        })
        .collect()
}

struct Shared {
    impairment: Mutex<Impairment>,
    rng: Mutex<rand::rngs::StdRng>,
    stats: ProxyStats,
}

impl Shared {
    /// Sends `data` to `to` through `sock`, impaired.
    async fn deliver(self: &Arc<Self>, sock: &Arc<UdpSocket>, data: Vec<u8>, to: SocketAddr) {
        let imp = *self.impairment.lock().expect("not poisoned");
        let delays = fate(&imp, &mut *self.rng.lock().expect("not poisoned"));
        let stats = &self.stats;
        stats.forwarded.fetch_add(1, Ordering::Relaxed);
        match delays.len() {
            0 => {
                stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
            1 if delays[0].is_zero() => {
                let _ = sock.send_to(&data, to).await;
            }
            n => {
                if n > 1 {
                    stats.duplicated.fetch_add(1, Ordering::Relaxed);
                }
                stats.delayed.fetch_add(1, Ordering::Relaxed);
                for d in delays {
                    let (sock, data) = (sock.clone(), data.clone());
                    tokio::spawn(async move {
                        tokio::time::sleep(d).await;
                        let _ = sock.send_to(&data, to).await;
                    });
                }
            }
        }
    }
}

/// The proxies in front of `n` masters.
pub struct PeerProxy {
    fronts: Vec<SocketAddr>,
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
    upstreams: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl PeerProxy {
    /// Binds a front port per master; `target(i)` is master i's real peer
    /// address once it is known (its data dir may not exist yet: datagrams
    /// for it are dropped until then, and QUIC sends them again).
    pub async fn start(
        n: usize,
        bind: std::net::IpAddr,
        target: impl Fn(usize) -> Option<SocketAddr> + Send + Sync + 'static,
        seed: u64,
    ) -> anyhow::Result<PeerProxy> {
        let shared = Arc::new(Shared {
            impairment: Mutex::new(Impairment::none()),
            rng: Mutex::new(rand::rngs::StdRng::seed_from_u64(seed)),
            stats: ProxyStats::default(),
        });
        let target = Arc::new(target);
        let upstreams: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let mut fronts = Vec::new();
        let mut tasks = Vec::new();
        for i in 0..n {
            let front = Arc::new(UdpSocket::bind((bind, 0)).await?);
            fronts.push(front.local_addr()?);
            let (shared, target, upstreams) = (shared.clone(), target.clone(), upstreams.clone());
            tasks.push(tokio::spawn(async move {
                let mut by_source: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
                let mut known: Option<SocketAddr> = None;
                let mut buf = vec![0u8; 65536];
                loop {
                    let Ok((len, from)) = front.recv_from(&mut buf).await else { return };
                    if known.is_none() {
                        known = target(i);
                    }
                    let Some(to) = known else { continue };
                    let up = match by_source.get(&from) {
                        Some(up) => up.clone(),
                        None => {
                            let Ok(sock) = UdpSocket::bind((bind, 0)).await else { continue };
                            let up = Arc::new(sock);
                            by_source.insert(from, up.clone());
                            // Replies from the master go back to `from`, from the front.
                            let (up2, front2, shared2) = (up.clone(), front.clone(), shared.clone());
                            let back = tokio::spawn(async move {
                                let mut buf = vec![0u8; 65536];
                                while let Ok(len) = up2.recv(&mut buf).await {
                                    shared2.deliver(&front2, buf[..len].to_vec(), from).await;
                                }
                            });
                            upstreams.lock().expect("not poisoned").push(back);
                            up
                        }
                    };
                    if up.peer_addr().is_err() {
                        // Connected, so `recv` above sees only the master's replies.
                        let _ = up.connect(to).await;
                    }
                    shared.deliver(&up, buf[..len].to_vec(), to).await;
                }
            }));
        }
        Ok(PeerProxy { fronts, shared, tasks, upstreams })
    }

    /// The front address of each master, in order.
    pub fn fronts(&self) -> &[SocketAddr] {
        &self.fronts
    }

    pub fn set(&self, imp: Impairment) {
        *self.shared.impairment.lock().expect("not poisoned") = imp;
    }

    pub fn stats(&self) -> &ProxyStats {
        &self.shared.stats
    }
}

impl Drop for PeerProxy {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        for t in self.upstreams.lock().expect("not poisoned").iter() {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fates_follow_the_impairment() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        assert_eq!(fate(&Impairment::none(), &mut rng), vec![Duration::ZERO]);
        let lossy = Impairment { loss: 1.0, ..Impairment::none() };
        assert!(fate(&lossy, &mut rng).is_empty());
        let twice = Impairment { duplicate: 1.0, delay: Duration::from_millis(5), ..Impairment::none() };
        assert_eq!(fate(&twice, &mut rng), vec![Duration::from_millis(5); 2]);
        let jitter =
            Impairment { delay: Duration::from_millis(10), jitter: Duration::from_millis(50), ..Impairment::none() };
        let delays: Vec<Duration> = (0..200).flat_map(|_| fate(&jitter, &mut rng)).collect();
        assert!(delays.iter().all(|d| *d >= Duration::from_millis(10) && *d <= Duration::from_millis(60)));
        assert!(delays.windows(2).any(|w| w[0] > w[1]), "jitter reorders: a later datagram can leave first");
    }

    async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(2), f).await.expect("in time")
    }

    /// Datagrams reach the target through the front and replies come back
    /// from the front; with loss 1 nothing passes.
    #[tokio::test]
    async fn forwards_both_ways_and_impairs() {
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = server.local_addr().unwrap();
        let proxy = PeerProxy::start(1, std::net::Ipv4Addr::LOCALHOST.into(), move |_| Some(addr), 7).await.unwrap();
        let front = proxy.fronts()[0];
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut buf = [0u8; 16];

        client.send_to(b"ping", front).await.unwrap();
        let (n, via) = within(server.recv_from(&mut buf)).await.unwrap();
        assert_eq!(&buf[..n], b"ping");
        assert_ne!(via, client.local_addr().unwrap(), "the master sees the proxy, not the client");
        server.send_to(b"pong", via).await.unwrap();
        let (n, from) = within(client.recv_from(&mut buf)).await.unwrap();
        assert_eq!((&buf[..n], from), (&b"pong"[..], front), "the reply comes from the front port");

        proxy.set(Impairment { duplicate: 1.0, delay: Duration::from_millis(20), ..Impairment::none() });
        client.send_to(b"twice", front).await.unwrap();
        for _ in 0..2 {
            let (n, _) = within(server.recv_from(&mut buf)).await.unwrap();
            assert_eq!(&buf[..n], b"twice");
        }
        proxy.set(Impairment { loss: 1.0, ..Impairment::none() });
        client.send_to(b"lost", front).await.unwrap();
        assert!(tokio::time::timeout(Duration::from_millis(300), server.recv_from(&mut buf)).await.is_err());
        assert_eq!(proxy.stats().dropped.load(Ordering::Relaxed), 1);
        assert_eq!(proxy.stats().duplicated.load(Ordering::Relaxed), 1);
    }
}
