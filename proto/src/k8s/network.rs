//! The cluster's fixed network addresses, shared by the masters (which
//! allocate cluster IPs and create the `kubernetes` and `kube-dns`
//! Services) and the node agents (which route them and answer DNS).

use std::net::Ipv4Addr;

/// Where cluster IPs come from (Kubernetes' `--service-cluster-ip-range`).
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
/// The first and last allocatable cluster IPs as numbers: the network and
/// broadcast addresses are never handed out, and neither are the two fixed
/// addresses below, which the masters create their Services with.
pub const SERVICE_NETWORK: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 0);
pub const SERVICE_PREFIX: u8 = 16;
/// `default/kubernetes`: the API servers, from inside the cluster.
pub const KUBERNETES_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
/// `kube-system/kube-dns`: every pod's nameserver (the kubelet's
/// `--cluster-dns`). Each node answers it itself (node/src/dns.rs).
pub const CLUSTER_DNS_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// The DNS domain of Services and pods (the kubelet's `--cluster-domain`).
pub const CLUSTER_DOMAIN: &str = "cluster.local";

/// Whether `ip` may be handed to a new Service at random: inside
/// [`SERVICE_CIDR`], not its network or broadcast address, and not one of
/// the fixed addresses.
pub fn allocatable(ip: Ipv4Addr) -> bool {
    let mask = u32::MAX << (32 - SERVICE_PREFIX);
    let n = u32::from(ip);
    n & mask == u32::from(SERVICE_NETWORK)
        && n != u32::from(SERVICE_NETWORK)
        && n != u32::from(SERVICE_NETWORK) | !mask
        && ip != KUBERNETES_SERVICE_IP
        && ip != CLUSTER_DNS_IP
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_and_edge_addresses_are_not_allocatable() {
        assert_eq!(SERVICE_CIDR, format!("{SERVICE_NETWORK}/{SERVICE_PREFIX}"));
        for ip in ["10.96.0.2", "10.96.0.11", "10.96.255.254", "10.96.1.0"] {
            assert!(allocatable(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["10.96.0.0", "10.96.0.1", "10.96.0.10", "10.96.255.255", "10.97.0.5", "192.168.0.1"] {
            assert!(!allocatable(ip.parse().unwrap()), "{ip}");
        }
    }
}
