//! Allow and deny lists of networks ([`Acl`]), matched in O(prefix length) however long they are.
//!
//! Each list is a [`NetSet`]: per address family, one `HashSet` of masked network addresses for each
//! prefix length that occurs in the list (at most 33 for IPv4, 129 for IPv6). An address is in the set
//! when, for one of those lengths, the address masked to it is in that length's set: one hash lookup per
//! distinct prefix length, whatever the number of entries.
//!
//! A v4-mapped IPv6 address (`::ffff:10.0.0.1`) is matched as the IPv4 address it maps, too; an IPv6
//! network within `::ffff:0:0/96` (`::ffff:10.0.0.0/104`) is also entered as the IPv4 network it maps
//! (`10.0.0.0/8`), so that either spelling of a rule matches either spelling of an address.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// The masked networks of one address family, by prefix length (only the lengths present, longest
/// first).
#[derive(Debug, Clone, Default)]
struct Family<T> {
    by_len: Vec<(u8, HashSet<T>)>,
}

impl<T: std::hash::Hash + Eq + Copy> Family<T> {
    fn insert(&mut self, len: u8, masked: T) {
        match self.by_len.iter_mut().find(|(l, _)| *l == len) {
            Some((_, set)) => {
                set.insert(masked);
            }
            None => {
                self.by_len.push((len, HashSet::from([masked])));
                self.by_len.sort_by_key(|(len, _)| std::cmp::Reverse(*len));
            }
        }
    }

    fn contains(&self, addr: T, mask: impl Fn(T, u8) -> T) -> bool {
        self.by_len
            .iter()
            .any(|(len, set)| set.contains(&mask(addr, *len)))
    }

    fn is_empty(&self) -> bool {
        self.by_len.is_empty()
    }
}

fn mask4(addr: u32, len: u8) -> u32 {
    match len {
        0 => 0,
        l => addr & (u32::MAX << (32 - u32::from(l.min(32)))),
    }
}

fn mask6(addr: u128, len: u8) -> u128 {
    match len {
        0 => 0,
        l => addr & (u128::MAX << (128 - u32::from(l.min(128)))),
    }
}

/// A set of IPv4 and IPv6 networks with an O(prefix length) membership test.
#[derive(Debug, Clone, Default)]
pub struct NetSet {
    v4: Family<u32>,
    v6: Family<u128>,
}

impl NetSet {
    /// The set of these networks.
    pub fn new<'a>(nets: impl IntoIterator<Item = &'a IpNet>) -> Self {
        let mut set = NetSet::default();
        for net in nets {
            set.insert(*net);
        }
        set
    }

    /// Adds a network (its host bits are ignored: `10.1.2.3/8` is `10.0.0.0/8`).
    pub fn insert(&mut self, net: IpNet) {
        match net {
            IpNet::V4(n) => {
                let len = n.prefix_len();
                self.v4.insert(len, mask4(u32::from(n.addr()), len));
            }
            IpNet::V6(n) => {
                let len = n.prefix_len();
                let bits = u128::from(n.addr());
                self.v6.insert(len, mask6(bits, len));
                // Within ::ffff:0:0/96: also the IPv4 network it maps.
                if len >= 96
                    && mask6(bits, 96)
                        == mask6(u128::from(Ipv4Addr::UNSPECIFIED.to_ipv6_mapped()), 96)
                {
                    let v4 = len - 96;
                    self.v4.insert(v4, mask4(bits as u32, v4));
                }
            }
        }
    }

    /// True when `ip` is in one of the networks (a v4-mapped IPv6 address also as its IPv4 form).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(a) => self.v4.contains(u32::from(a), mask4),
            IpAddr::V6(a) => {
                self.v6.contains(u128::from(a), mask6)
                    || Ipv6Addr::to_ipv4_mapped(&a)
                        .is_some_and(|v4| self.v4.contains(u32::from(v4), mask4))
            }
        }
    }

    /// True when the set holds no network.
    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }
}

/// Allow and deny lists: a source is refused when it is in the deny list, or when there is an allow
/// list and it is not in it (deny wins over allow).
#[derive(Debug, Clone, Default)]
pub struct Acl {
    allow: NetSet,
    deny: NetSet,
}

impl Acl {
    /// The lists; an empty allow list allows every source not denied.
    pub fn new(allow: &[IpNet], deny: &[IpNet]) -> Self {
        Acl {
            allow: NetSet::new(allow),
            deny: NetSet::new(deny),
        }
    }

    /// True when a connection from `ip` may be carried.
    pub fn permits(&self, ip: IpAddr) -> bool {
        !self.deny.contains(ip) && (self.allow.is_empty() || self.allow.contains(ip))
    }

    /// True when both lists are empty (every source is permitted).
    pub fn is_empty(&self) -> bool {
        self.allow.is_empty() && self.deny.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v4_v6_and_v4_mapped_match() {
        let set = NetSet::new(&nets(&[
            "10.0.0.0/8",
            "192.168.1.7/32",
            "2001:db8::/32",
            "::1/128",
        ]));
        assert!(set.contains(ip("10.200.3.4")));
        assert!(
            set.contains(ip("::ffff:10.0.0.1")),
            "v4-mapped matches 10/8"
        );
        assert!(set.contains(ip("192.168.1.7")));
        assert!(!set.contains(ip("192.168.1.8")));
        assert!(!set.contains(ip("11.0.0.1")));
        assert!(set.contains(ip("2001:db8:ffff::1")));
        assert!(set.contains(ip("::1")));
        assert!(!set.contains(ip("::2")));
        assert!(!set.contains(ip("2001:db9::1")));
        // A v4-mapped network matches plain IPv4 addresses too.
        let mapped = NetSet::new(&nets(&["::ffff:172.16.0.0/108"]));
        assert!(mapped.contains(ip("172.16.5.5")));
        assert!(mapped.contains(ip("::ffff:172.16.5.5")));
        assert!(!mapped.contains(ip("172.32.0.1")));
        // /0 matches everything of its family.
        let all4 = NetSet::new(&nets(&["0.0.0.0/0"]));
        assert!(all4.contains(ip("1.2.3.4")) && !all4.contains(ip("2001:db8::1")));
    }

    #[test]
    fn deny_wins_and_an_allow_list_refuses_the_rest() {
        let acl = Acl::new(&nets(&["10.0.0.0/8"]), &nets(&["10.0.0.3/32"]));
        assert!(acl.permits(ip("10.0.0.2")));
        assert!(!acl.permits(ip("10.0.0.3")));
        assert!(!acl.permits(ip("::ffff:10.0.0.3")));
        assert!(!acl.permits(ip("11.0.0.1")));
        let deny_only = Acl::new(&[], &nets(&["127.0.0.3/32"]));
        assert!(deny_only.permits(ip("127.0.0.2")) && !deny_only.permits(ip("127.0.0.3")));
        assert!(Acl::new(&[], &[]).is_empty());
    }
}
