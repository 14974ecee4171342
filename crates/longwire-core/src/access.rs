//! Client address allow-lists, shared by the NBD and iSCSI front-ends so
//! both read `allow = [...]` the same way.
//!
//! A client is named by `Option<IpAddr>`: `Some` for TCP clients, `None`
//! for local ones (unix sockets), which every list admits because the
//! socket file's permissions are their access control. IPv4-mapped IPv6
//! addresses (`::ffff:10.0.0.1`, what a dual-stack `[::]` listener sees
//! for an IPv4 client) are matched as the IPv4 address they carry.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::str::FromStr;

/// An address range: an address and a prefix length (`10.0.0.0/8`,
/// `fd00::/8`; a bare address is a /32 or /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl IpNet {
    /// The range of `addr` with `prefix` leading bits; `None` when the
    /// prefix is longer than the address or host bits are set.
    pub fn new(addr: IpAddr, prefix: u8) -> Option<IpNet> {
        let net = IpNet { addr, prefix };
        (prefix <= max_prefix(addr) && net.network() == bits(addr)).then_some(net.canonical())
    }

    /// Does the range hold `ip`?
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_ipv4() == self.addr.is_ipv4() && bits(ip) & self.mask() == self.network()
    }

    /// Is `other` wholly inside this range?
    fn covers(&self, other: &IpNet) -> bool {
        other.prefix >= self.prefix && self.contains(other.addr)
    }

    fn mask(&self) -> u128 {
        let width = max_prefix(self.addr);
        let host = width - self.prefix;
        let all = if width == 32 {
            u128::from(u32::MAX)
        } else {
            u128::MAX
        };
        if host >= 128 {
            0
        } else {
            all & !((1u128 << host) - 1)
        }
    }

    fn network(&self) -> u128 {
        bits(self.addr) & self.mask()
    }

    /// `::ffff:a.b.c.d/n` (n ≥ 96) is the IPv4 range `a.b.c.d/(n-96)`.
    fn canonical(self) -> IpNet {
        match self.addr {
            IpAddr::V6(v6) if self.prefix >= 96 => match v6.to_ipv4_mapped() {
                Some(v4) => IpNet {
                    addr: IpAddr::V4(v4),
                    prefix: self.prefix - 96,
                },
                None => self,
            },
            _ => self,
        }
    }
}

fn max_prefix(addr: IpAddr) -> u8 {
    if addr.is_ipv4() {
        32
    } else {
        128
    }
}

fn bits(addr: IpAddr) -> u128 {
    match addr {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

impl FromStr for IpNet {
    type Err = String;

    fn from_str(s: &str) -> Result<IpNet, String> {
        let s = s.trim();
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| {
            format!(
                "{s:?} is not an address or range like 10.0.0.0/8, 192.168.1.7, fd00::/8 or ::1"
            )
        })?;
        let prefix = match prefix {
            None => max_prefix(addr),
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= max_prefix(addr) => n,
                _ => {
                    return Err(format!(
                        "{s:?}: the prefix length must be 0 to {}",
                        max_prefix(addr)
                    ))
                }
            },
        };
        IpNet::new(addr, prefix).ok_or_else(|| {
            let network = IpNet { addr, prefix }.network();
            let network = match addr {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(network as u32)),
                IpAddr::V6(_) => IpAddr::V6(network.into()),
            };
            format!(
                "{s:?} has bits set after the /{prefix} prefix; did you mean {network}/{prefix}?"
            )
        })
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Which client addresses may use something.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum AllowList {
    /// Every client (no `allow` given).
    #[default]
    Any,
    /// Only clients inside one of these ranges, plus local clients. An
    /// empty list admits local clients only.
    Only(Vec<IpNet>),
}

impl AllowList {
    /// Parse `allow = [...]` entries; each is an address or a range.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<AllowList, String> {
        entries
            .iter()
            .map(|e| e.as_ref().parse())
            .collect::<Result<Vec<IpNet>, _>>()
            .map(AllowList::Only)
    }

    /// May the client at `peer` (None: a local, unix-socket client) in?
    pub fn allows(&self, peer: Option<IpAddr>) -> bool {
        match (self, peer) {
            (AllowList::Any, _) | (_, None) => true,
            (AllowList::Only(nets), Some(ip)) => nets.iter().any(|n| n.contains(ip)),
        }
    }

    /// The clients both lists admit (a target grouping several exports
    /// admits only who every export would).
    pub fn intersect(&self, other: &AllowList) -> AllowList {
        let (a, b) = match (self, other) {
            (AllowList::Any, x) | (x, AllowList::Any) => return x.clone(),
            (AllowList::Only(a), AllowList::Only(b)) => (a, b),
        };
        let mut out: Vec<IpNet> = Vec::new();
        for x in a {
            for y in b {
                let inner = if x.covers(y) {
                    y
                } else if y.covers(x) {
                    x
                } else {
                    continue;
                };
                if !out.contains(inner) {
                    out.push(*inner);
                }
            }
        }
        AllowList::Only(out)
    }

    pub fn is_any(&self) -> bool {
        matches!(self, AllowList::Any)
    }
}

impl fmt::Display for AllowList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AllowList::Any => f.write_str("any address"),
            AllowList::Only(nets) if nets.is_empty() => {
                f.write_str("local (unix socket) clients only")
            }
            AllowList::Only(nets) => {
                let list: Vec<String> = nets.iter().map(|n| n.to_string()).collect();
                f.write_str(&list.join(", "))
            }
        }
    }
}

/// Allow-lists by export name, with a server-wide default for exports
/// that have none of their own.
#[derive(Debug, Clone, Default)]
pub struct AddressPolicy {
    default: AllowList,
    exports: HashMap<String, AllowList>,
}

impl AddressPolicy {
    pub fn new(default: AllowList, exports: HashMap<String, AllowList>) -> AddressPolicy {
        AddressPolicy { default, exports }
    }

    /// The list that applies to `export`: its own, else the default.
    pub fn for_export(&self, export: &str) -> &AllowList {
        self.exports.get(export).unwrap_or(&self.default)
    }

    /// May the client at `peer` use `export`?
    pub fn allows(&self, export: &str, peer: Option<IpAddr>) -> bool {
        self.for_export(export).allows(peer)
    }

    /// True when every client may use every export.
    pub fn is_open(&self) -> bool {
        self.default.is_any() && self.exports.values().all(AllowList::is_any)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    fn list(entries: &[&str]) -> AllowList {
        AllowList::parse(entries).unwrap()
    }

    #[test]
    fn parses_addresses_and_ranges() {
        assert_eq!(
            "10.0.0.0/8".parse::<IpNet>().unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert_eq!(
            "127.0.0.1".parse::<IpNet>().unwrap().to_string(),
            "127.0.0.1/32"
        );
        assert_eq!("::1".parse::<IpNet>().unwrap().to_string(), "::1/128");
        assert_eq!(
            " fd00::/8 ".parse::<IpNet>().unwrap().to_string(),
            "fd00::/8"
        );
        assert_eq!(
            "0.0.0.0/0".parse::<IpNet>().unwrap().to_string(),
            "0.0.0.0/0"
        );
        assert_eq!("::/0".parse::<IpNet>().unwrap().to_string(), "::/0");
        // IPv4-mapped ranges become IPv4 ranges.
        assert_eq!(
            "::ffff:10.0.0.0/104".parse::<IpNet>().unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert_eq!(
            "::ffff:10.1.2.3".parse::<IpNet>().unwrap().to_string(),
            "10.1.2.3/32"
        );
    }

    #[test]
    fn refuses_malformed_entries_with_a_hint() {
        for bad in [
            "",
            "10.0.0",
            "10.0.0.0/33",
            "::1/129",
            "10.0.0.0/-1",
            "10.0.0.0/",
            "host.example",
            "10.0.0.0/8/8",
        ] {
            assert!(bad.parse::<IpNet>().is_err(), "{bad:?} should be refused");
        }
        let e = "10.1.2.3/8".parse::<IpNet>().unwrap_err();
        assert!(e.contains("did you mean 10.0.0.0/8"), "{e}");
        let e = "fd00::1/8".parse::<IpNet>().unwrap_err();
        assert!(e.contains("did you mean fd00::/8"), "{e}");
    }

    #[test]
    fn matches_by_prefix() {
        let l = list(&["10.0.0.0/8", "192.168.1.7", "fd00::/8", "::1"]);
        assert!(l.allows(ip("10.255.0.1")));
        assert!(l.allows(ip("192.168.1.7")));
        assert!(!l.allows(ip("192.168.1.8")));
        assert!(!l.allows(ip("11.0.0.1")));
        assert!(l.allows(ip("fd12:3456::1")));
        assert!(!l.allows(ip("fe80::1")));
        assert!(l.allows(ip("::1")));
        assert!(!l.allows(ip("::2")));
        // IPv4 rules do not match IPv6 addresses that merely share bits.
        assert!(!list(&["0.0.0.0/0"]).allows(ip("::1")));
        assert!(list(&["::/0"]).allows(ip("2001:db8::1")));
        assert!(!list(&["::/0"]).allows(ip("127.0.0.1")));
        let l = list(&["127.0.0.2/32"]);
        assert!(l.allows(ip("127.0.0.2")));
        assert!(!l.allows(ip("127.0.0.1")));
    }

    #[test]
    fn ipv4_mapped_clients_match_ipv4_rules() {
        let l = list(&["10.0.0.0/8"]);
        assert!(l.allows(ip("::ffff:10.1.2.3")));
        assert!(!l.allows(ip("::ffff:11.1.2.3")));
        // And a mapped rule matches plain IPv4 clients.
        assert!(list(&["::ffff:10.0.0.0/104"]).allows(ip("10.9.9.9")));
    }

    #[test]
    fn local_clients_and_any() {
        assert!(AllowList::Any.allows(ip("203.0.113.9")));
        assert!(
            list(&[]).allows(None),
            "unix-socket clients are always admitted"
        );
        assert!(
            !list(&[]).allows(ip("127.0.0.1")),
            "an empty list admits no TCP client"
        );
        assert!(list(&["10.0.0.0/8"]).allows(None));
    }

    #[test]
    fn intersection() {
        let a = list(&["10.0.0.0/8", "192.168.0.0/16"]);
        let b = list(&["10.1.0.0/16", "172.16.0.0/12", "192.168.0.0/16"]);
        assert_eq!(a.intersect(&b), list(&["10.1.0.0/16", "192.168.0.0/16"]));
        assert_eq!(a.intersect(&AllowList::Any), a);
        assert_eq!(AllowList::Any.intersect(&b), b);
        assert_eq!(list(&["10.0.0.0/8"]).intersect(&list(&["::1"])), list(&[]));
    }

    #[test]
    fn policy_falls_back_to_the_default() {
        let p = AddressPolicy::new(
            list(&["127.0.0.0/8"]),
            [("open".to_string(), list(&["0.0.0.0/0"]))].into(),
        );
        assert!(p.allows("disk", ip("127.0.0.5")));
        assert!(!p.allows("disk", ip("10.0.0.1")));
        assert!(p.allows("open", ip("10.0.0.1")));
        assert!(!p.is_open());
        assert!(AddressPolicy::default().is_open());
    }
}
