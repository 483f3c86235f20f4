//! The IPv4 networks no job may reach, in one list: the job network's nftables policy refuses
//! them (`network::policy`), and the host refuses them for what it fetches on a job's behalf
//! (`image::destination`).

use std::net::Ipv4Addr;

/// This network, private ranges, shared address space, loopback, link-local (cloud metadata),
/// IETF protocol assignments, benchmarking, multicast, reserved and broadcast.
pub(crate) const REFUSED_V4: &[(Ipv4Addr, u8)] = &[
    (Ipv4Addr::new(0, 0, 0, 0), 8),
    (Ipv4Addr::new(10, 0, 0, 0), 8),
    (Ipv4Addr::new(100, 64, 0, 0), 10),
    (Ipv4Addr::new(127, 0, 0, 0), 8),
    (Ipv4Addr::new(169, 254, 0, 0), 16),
    (Ipv4Addr::new(172, 16, 0, 0), 12),
    (Ipv4Addr::new(192, 0, 0, 0), 24),
    (Ipv4Addr::new(192, 168, 0, 0), 16),
    (Ipv4Addr::new(198, 18, 0, 0), 15),
    (Ipv4Addr::new(224, 0, 0, 0), 4),
    (Ipv4Addr::new(240, 0, 0, 0), 4),
];

/// Whether `ip` lies in one of [`REFUSED_V4`].
pub(crate) fn refused_v4(ip: Ipv4Addr) -> bool {
    REFUSED_V4.iter().any(|(net, prefix)| {
        let mask = if *prefix == 0 { 0 } else { u32::MAX << (32 - prefix) };
        u32::from(ip) & mask == u32::from(*net)
    })
}

/// [`REFUSED_V4`] as CIDR texts (`10.0.0.0/8`), as nftables takes them.
pub(crate) fn refused_v4_cidrs() -> Vec<String> {
    REFUSED_V4.iter().map(|(net, prefix)| format!("{net}/{prefix}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_match_their_members_only() {
        assert!(refused_v4(Ipv4Addr::new(10, 1, 2, 3)));
        assert!(refused_v4(Ipv4Addr::new(169, 254, 169, 254)));
        assert!(refused_v4(Ipv4Addr::new(100, 127, 255, 255)));
        assert!(!refused_v4(Ipv4Addr::new(100, 128, 0, 0)));
        assert!(!refused_v4(Ipv4Addr::new(198, 51, 100, 10)));
        assert_eq!(refused_v4_cidrs()[1], "10.0.0.0/8");
    }
}
