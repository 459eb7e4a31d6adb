//! Which addresses a server-side fetch may reach: the globally reachable ones. The lists are
//! IANA's IPv4 and IPv6 Special-Purpose Address Registries (every block not marked globally
//! reachable is internal), plus multicast and, for IPv6, everything outside global unicast
//! (2000::/3). An IPv6 form that carries an IPv4 address (mapped, compatible, NAT64, 6to4) is
//! judged by that IPv4 address, since that is where the packet ends up.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// IPv4 blocks that are not globally reachable (address, prefix length).
const V4_INTERNAL: &[([u8; 4], u8)] = &[
    ([0, 0, 0, 0], 8),       // "this network"
    ([10, 0, 0, 0], 8),      // private
    ([100, 64, 0, 0], 10),   // shared address space (carrier-grade NAT)
    ([127, 0, 0, 0], 8),     // loopback
    ([169, 254, 0, 0], 16),  // link local
    ([172, 16, 0, 0], 12),   // private
    ([192, 0, 0, 0], 24),    // IETF protocol assignments
    ([192, 0, 2, 0], 24),    // documentation (TEST-NET-1)
    ([192, 88, 99, 0], 24),  // deprecated 6to4 relay anycast
    ([192, 168, 0, 0], 16),  // private
    ([198, 18, 0, 0], 15),   // benchmarking
    ([198, 51, 100, 0], 24), // documentation (TEST-NET-2)
    ([203, 0, 113, 0], 24),  // documentation (TEST-NET-3)
    ([224, 0, 0, 0], 4),     // multicast
    ([240, 0, 0, 0], 4),     // reserved, and the limited broadcast address
];

/// IPv6 blocks within global unicast that are not globally reachable.
const V6_INTERNAL: &[([u16; 8], u8)] = &[
    ([0x2001, 0, 0, 0, 0, 0, 0, 0], 23), // IETF protocol assignments (Teredo among them)
    ([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0], 32), // documentation
    ([0x3fff, 0, 0, 0, 0, 0, 0, 0], 20), // documentation
];

/// Blocks inside `V6_INTERNAL` that the registry marks globally reachable.
const V6_GLOBAL: &[([u16; 8], u8)] = &[
    ([0x2001, 1, 0, 0, 0, 0, 0, 1], 128),    // PCP anycast
    ([0x2001, 1, 0, 0, 0, 0, 0, 2], 128),    // TURN anycast
    ([0x2001, 1, 0, 0, 0, 0, 0, 3], 128),    // DNS-SD service registration
    ([0x2001, 3, 0, 0, 0, 0, 0, 0], 32),     // AMT
    ([0x2001, 4, 0x112, 0, 0, 0, 0, 0], 48), // AS112-v6
    ([0x2001, 0x20, 0, 0, 0, 0, 0, 0], 28),  // ORCHIDv2
    ([0x2001, 0x30, 0, 0, 0, 0, 0, 0], 28),  // drone remote ID
];

fn in_v4(ip: Ipv4Addr, (net, len): ([u8; 4], u8)) -> bool {
    let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
    u32::from(ip) & mask == u32::from(Ipv4Addr::from(net)) & mask
}

fn in_v6(ip: Ipv6Addr, (net, len): ([u16; 8], u8)) -> bool {
    let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
    u128::from(ip) & mask == u128::from(Ipv6Addr::from(net)) & mask
}

/// The IPv4 address an IPv6 form carries: IPv4-mapped (`::ffff:a.b.c.d`), IPv4-compatible
/// (`::a.b.c.d`, deprecated), NAT64 well-known prefix (`64:ff9b::a.b.c.d`) and 6to4
/// (`2002:aabb:ccdd::`).
pub fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let bits = u128::from(ip);
    let low = Ipv4Addr::from(bits as u32);
    if let Some(v4) = ip.to_ipv4_mapped() {
        return Some(v4);
    }
    // ::/96 holds :: and ::1 too; they are not IPv4 forms.
    if bits >> 32 == 0 && bits > 1 {
        return Some(low);
    }
    if in_v6(ip, ([0x64, 0xff9b, 0, 0, 0, 0, 0, 0], 96)) {
        return Some(low);
    }
    if in_v6(ip, ([0x2002, 0, 0, 0, 0, 0, 0, 0], 16)) {
        return Some(Ipv4Addr::from((bits >> 80) as u32));
    }
    None
}

/// Whether a server-side fetch must not reach `ip` by default.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => V4_INTERNAL.iter().any(|&block| in_v4(v4, block)),
        IpAddr::V6(v6) => {
            if let Some(v4) = embedded_v4(v6) {
                return is_internal(IpAddr::V4(v4));
            }
            // Loopback, unspecified, unique local, link local, site local, multicast and
            // every reserved block lie outside 2000::/3.
            let global_unicast = in_v6(v6, ([0x2000, 0, 0, 0, 0, 0, 0, 0], 3));
            !global_unicast
                || (V6_INTERNAL.iter().any(|&b| in_v6(v6, b))
                    && !V6_GLOBAL.iter().any(|&b| in_v6(v6, b)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every form the guard must refuse, including those that carry an internal IPv4
    /// address inside an IPv6 one. Nothing here connects anywhere.
    #[test]
    fn internal_forms() {
        for a in [
            "127.0.0.1",
            "127.255.255.254",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "224.0.0.1",
            "239.255.255.250",
            "255.255.255.255",
            "0.0.0.0",
            "0.1.2.3",
            "100.64.0.1",
            "100.127.255.255",
            "192.0.0.1",
            "192.0.0.170",
            "192.0.2.1",
            "192.88.99.1",
            "198.18.0.1",
            "198.19.255.255",
            "198.51.100.7",
            "203.0.113.9",
            "240.0.0.1",
            "250.1.2.3",
            "::1",
            "::",
            "::127.0.0.1",
            "::10.0.0.1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b:1::1",
            "2002:7f00:1::",
            "2002:c0a8:101::1",
            "2002:a00:1::",
            "fe80::1",
            "febf::1",
            "fec0::1",
            "fd00::1",
            "fc00::1",
            "ff02::1",
            "ff05::1:3",
            "100::1",
            "2001::1",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            "2001:2::1",
            "2001:db8::1",
            "3fff::1",
            "5f00::1",
        ] {
            assert!(is_internal(a.parse().unwrap()), "{a} must be internal");
        }
    }

    #[test]
    fn global_forms() {
        for a in [
            "93.184.216.34",
            "8.8.8.8",
            "1.1.1.1",
            "100.128.0.1",
            "100.63.255.255",
            "172.32.0.1",
            "192.0.1.1",
            "192.31.196.1",
            "198.20.0.1",
            "223.255.255.254",
            "2606:4700::1111",
            "2a00:1450:4001::1",
            "::ffff:8.8.8.8",
            "::8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
            "2001:1::1",
            "2001:4:112::1",
            "2001:20::1",
        ] {
            assert!(!is_internal(a.parse().unwrap()), "{a} must be global");
        }
    }

    #[test]
    fn embedded_ipv4() {
        let cases = [
            ("::ffff:10.0.0.1", Some("10.0.0.1")),
            ("::10.0.0.1", Some("10.0.0.1")),
            ("64:ff9b::10.0.0.1", Some("10.0.0.1")),
            ("2002:0a00:0001::", Some("10.0.0.1")),
            ("::1", None),
            ("2606:4700::1111", None),
        ];
        for (v6, v4) in cases {
            let got = embedded_v4(v6.parse().unwrap());
            assert_eq!(got, v4.map(|s| s.parse().unwrap()), "{v6}");
        }
    }
}
