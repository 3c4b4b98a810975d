//! Peers of a fault: the remote addresses (IPv4 and IPv6 CIDRs, and exclusions) it is limited
//! to, and how they become entries of the kernel's longest-prefix-match trie.

use std::fmt;
use std::net::IpAddr;

use super::{Invalid, limits};

/// An address prefix, e.g. `10.0.0.0/8` or `fd00::/64`; host bits are zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    /// `a.b.c.d/n`, `x::y/n`, or a bare address (a single host). `field` names the request
    /// field for errors, e.g. `fault.target.peers[0]`.
    pub fn parse(text: &str, field: &str) -> Result<Self, Invalid> {
        limits::text(text, limits::MAX_PEER_BYTES, field)?;
        let invalid = |why: String| Invalid::new(field, format!("{} {why}", limits::quote(text)));
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let addr: IpAddr = addr.trim().parse().map_err(|_| {
            invalid("is not an IPv4 or IPv6 address or CIDR (e.g. 10.0.0.0/8, fd00::/64)".into())
        })?;
        let max = max_prefix(addr);
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| invalid(format!("has a prefix length outside 0 to {max}")))?,
        };
        let cidr = Self { addr, prefix };
        if cidr.network() != addr {
            return Err(invalid(format!(
                "has host bits set (did you mean {}?)",
                Self {
                    addr: cidr.network(),
                    prefix
                }
            )));
        }
        Ok(cidr)
    }

    /// Every address of one family: `0.0.0.0/0` or `::/0`.
    pub fn all(v6: bool) -> Self {
        let addr = if v6 {
            IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
        } else {
            IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
        };
        Self { addr, prefix: 0 }
    }

    pub fn is_v6(&self) -> bool {
        self.addr.is_ipv6()
    }

    /// The address in network byte order, IPv4 in the first 4 bytes (the kernel key's layout).
    pub fn bytes(&self) -> [u8; 16] {
        let mut bytes = [0u8; 16];
        match self.addr {
            IpAddr::V4(a) => bytes[..4].copy_from_slice(&a.octets()),
            IpAddr::V6(a) => bytes = a.octets(),
        }
        bytes
    }

    fn bits(&self) -> u128 {
        match self.addr {
            IpAddr::V4(a) => u128::from(u32::from(a)) << 96,
            IpAddr::V6(a) => u128::from(a),
        }
    }

    fn mask(&self) -> u128 {
        if self.prefix == 0 {
            0
        } else {
            u128::MAX << (128 - u32::from(self.prefix))
        }
    }

    fn network(&self) -> IpAddr {
        let bits = self.bits() & self.mask();
        match self.addr {
            IpAddr::V4(_) => IpAddr::V4(((bits >> 96) as u32).into()),
            IpAddr::V6(_) => IpAddr::V6(bits.into()),
        }
    }

    /// Whether every address of `other` is in `self`.
    pub fn contains(&self, other: &Cidr) -> bool {
        self.is_v6() == other.is_v6()
            && self.prefix <= other.prefix
            && (other.bits() & self.mask()) == (self.bits() & self.mask())
    }

    pub fn contains_addr(&self, addr: IpAddr) -> bool {
        let host = Self {
            addr,
            prefix: max_prefix(addr),
        };
        self.contains(&host)
    }

    /// The family and the last address of the prefix, in an order that follows `Ord`'s.
    fn last(&self) -> (bool, u128) {
        (self.is_v6(), (self.bits() & self.mask()) | !self.mask())
    }

    /// The smaller of two prefixes if one holds the other (prefixes nest or are disjoint).
    fn intersection(&self, other: &Cidr) -> Option<Cidr> {
        if self.contains(other) {
            Some(*other)
        } else if other.contains(self) {
            Some(*self)
        } else {
            None
        }
    }
}

fn max_prefix(addr: IpAddr) -> u8 {
    if addr.is_ipv6() { 128 } else { 32 }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// The remote addresses a fault is limited to: `include` minus `exclude`, normalized so that a
/// longest-prefix match over the entries of several faults with disjoint sets gives each
/// address to the one fault whose set holds it: no include lies inside an exclude or another
/// include, and every exclude lies strictly inside an include and inside no other exclude.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct PeerSet {
    pub include: Vec<Cidr>,
    pub exclude: Vec<Cidr>,
}

impl PeerSet {
    /// None when the fault names no peers (it covers every address). `field` is the target's
    /// path, for the error when the exclusions leave nothing. O(n log n): sorted once, then
    /// each prefix is checked against its one candidate container by binary search.
    pub fn new(peers: &[Cidr], exclude: &[Cidr], field: &str) -> Result<Option<Self>, Invalid> {
        if peers.is_empty() && exclude.is_empty() {
            return Ok(None);
        }
        let wanted: Vec<Cidr> = if peers.is_empty() {
            vec![Cidr::all(false), Cidr::all(true)]
        } else {
            peers.to_vec()
        };
        let exclude = outermost(exclude.to_vec());
        let include: Vec<Cidr> = outermost(wanted)
            .into_iter()
            .filter(|p| container(&exclude, p).is_none())
            .collect();
        if include.is_empty() {
            return Err(Invalid::new(
                format!("{field}.exclude_peers"),
                "excludes every peer the fault names",
            ));
        }
        // An exclusion matters only strictly inside an include.
        let exclude = exclude
            .into_iter()
            .filter(|e| container(&include, e).is_some_and(|p| p != e))
            .collect();
        Ok(Some(Self { include, exclude }))
    }

    pub fn contains(&self, addr: IpAddr) -> bool {
        self.include.iter().any(|p| p.contains_addr(addr))
            && !self.exclude.iter().any(|e| e.contains_addr(addr))
    }

    /// Whether the two sets may share an address. Conservative: a shared prefix counts as
    /// disjoint only when one exclusion removes it whole. Both include lists are sorted and
    /// disjoint, so one pass over them meets every intersecting pair.
    pub fn overlaps(&self, other: &PeerSet) -> bool {
        let (a, b) = (&self.include, &other.include);
        let (mut i, mut j) = (0, 0);
        while i < a.len() && j < b.len() {
            if let Some(shared) = a[i].intersection(&b[j])
                && container(&self.exclude, &shared).is_none()
                && container(&other.exclude, &shared).is_none()
            {
                return true;
            }
            if a[i].last() < b[j].last() {
                i += 1;
            } else {
                j += 1;
            }
        }
        false
    }
}

/// The outermost of `cidrs`, sorted, none inside another. Prefixes nest or are disjoint: once
/// sorted (family, network address, shorter prefix first), whatever lies inside a prefix comes
/// right after it.
fn outermost(mut cidrs: Vec<Cidr>) -> Vec<Cidr> {
    cidrs.sort_unstable();
    let mut kept: Vec<Cidr> = Vec::with_capacity(cidrs.len());
    for c in cidrs {
        if !kept.last().is_some_and(|k| k.contains(&c)) {
            kept.push(c);
        }
    }
    kept
}

/// The prefix of `sorted` (sorted and disjoint, as `outermost` leaves them) that holds `c`: only
/// the last one that sorts at or before `c` can.
fn container<'a>(sorted: &'a [Cidr], c: &Cidr) -> Option<&'a Cidr> {
    let at = sorted.partition_point(|e| e <= c);
    at.checked_sub(1)
        .map(|i| &sorted[i])
        .filter(|candidate| candidate.contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(text: &str) -> Cidr {
        Cidr::parse(text, "f").unwrap()
    }

    fn set(peers: &[&str], exclude: &[&str]) -> PeerSet {
        let p: Vec<_> = peers.iter().map(|t| c(t)).collect();
        let e: Vec<_> = exclude.iter().map(|t| c(t)).collect();
        PeerSet::new(&p, &e, "t").unwrap().unwrap()
    }

    #[test]
    fn cidrs_parse_and_name_the_field() {
        assert_eq!(c("10.0.0.0/8").to_string(), "10.0.0.0/8");
        assert_eq!(c("127.0.0.2").to_string(), "127.0.0.2/32");
        assert_eq!(c("::1").to_string(), "::1/128");
        assert_eq!(c("fd00:1::/64").bytes()[..4], [0xfd, 0, 0, 1]);
        assert_eq!(c("10.1.2.3").bytes()[..5], [10, 1, 2, 3, 0]);
        for bad in [
            "10.0.0.0/33",
            "10.0.0.1/8",
            "nope",
            "::/129",
            "1.2.3.4/-1",
            "",
        ] {
            let err = Cidr::parse(bad, "fault.target.peers[1]").unwrap_err();
            assert_eq!(err.field, "fault.target.peers[1]", "{bad}");
        }
        assert!(
            Cidr::parse("10.0.0.1/8", "f")
                .unwrap_err()
                .reason
                .contains("10.0.0.0/8")
        );
    }

    #[test]
    fn sets_normalize_and_match() {
        assert_eq!(PeerSet::new(&[], &[], "t").unwrap(), None);
        let only_excl = set(&[], &["10.0.0.0/8"]);
        assert!(only_excl.contains("::1".parse().unwrap()));
        assert!(only_excl.contains("127.0.0.1".parse().unwrap()));
        assert!(!only_excl.contains("10.1.1.1".parse().unwrap()));
        let s = set(
            &["10.0.0.0/8", "10.1.0.0/16", "192.168.0.0/16"],
            &[
                "10.2.0.0/16",
                "10.2.3.0/24",
                "172.16.0.0/12",
                "192.168.0.0/16",
            ],
        );
        assert_eq!(s.include, vec![c("10.0.0.0/8")]);
        assert_eq!(s.exclude, vec![c("10.2.0.0/16")]);
        let err =
            PeerSet::new(&[c("10.1.0.0/16")], &[c("10.0.0.0/8")], "fault.target").unwrap_err();
        assert_eq!(err.field, "fault.target.exclude_peers");
    }

    #[test]
    fn overlap_is_judged_on_the_sets() {
        let a = set(&["10.0.0.0/8"], &["10.1.0.0/16"]);
        assert!(!a.overlaps(&set(&["10.1.0.0/16"], &[])));
        assert!(!a.overlaps(&set(&["10.1.2.0/24"], &[])));
        assert!(a.overlaps(&set(&["10.2.0.0/16"], &[])));
        assert!(!a.overlaps(&set(&["::/0"], &[])));
        assert!(set(&["127.0.0.1"], &[]).overlaps(&set(&[], &["127.0.0.2"])));
        assert!(!set(&["127.0.0.1"], &[]).overlaps(&set(&["127.0.0.2"], &[])));
    }

    /// The pairwise definitions the sorted algorithms must agree with.
    fn naive(peers: &[Cidr], exclude: &[Cidr]) -> Option<PeerSet> {
        let wanted: Vec<Cidr> = if peers.is_empty() {
            vec![Cidr::all(false), Cidr::all(true)]
        } else {
            peers.to_vec()
        };
        let mut include: Vec<Cidr> = Vec::new();
        for (i, p) in wanted.iter().enumerate() {
            let excluded = exclude.iter().any(|e| e.contains(p));
            let nested = wanted
                .iter()
                .enumerate()
                .any(|(j, q)| j != i && q.contains(p) && (q != p || j < i));
            if !excluded && !nested {
                include.push(*p);
            }
        }
        if include.is_empty() {
            return None;
        }
        let mut kept: Vec<Cidr> = Vec::new();
        for (i, e) in exclude.iter().enumerate() {
            let inside_include = include.iter().any(|p| p.contains(e) && p != e);
            let nested = exclude
                .iter()
                .enumerate()
                .any(|(j, q)| j != i && q.contains(e) && (q != e || j < i));
            if inside_include && !nested {
                kept.push(*e);
            }
        }
        include.sort();
        kept.sort();
        Some(PeerSet {
            include,
            exclude: kept,
        })
    }

    fn naive_overlaps(a: &PeerSet, b: &PeerSet) -> bool {
        a.include.iter().any(|x| {
            b.include.iter().any(|y| match x.intersection(y) {
                None => false,
                Some(shared) => !a
                    .exclude
                    .iter()
                    .chain(&b.exclude)
                    .any(|e| e.contains(&shared)),
            })
        })
    }

    /// Random prefixes in a small space, so that many nest, repeat or sit side by side.
    fn random_cidrs(seed: &mut u64, n: usize) -> Vec<Cidr> {
        (0..n)
            .map(|_| {
                *seed ^= *seed << 13;
                *seed ^= *seed >> 7;
                *seed ^= *seed << 17;
                let prefix = 24 + (*seed % 9) as u8;
                let host = ((*seed >> 8) % 256) as u8;
                let v6 = (*seed >> 20).is_multiple_of(5);
                let text = match v6 {
                    false => format!("10.0.0.{host}"),
                    true => format!("fd00::{host:x}"),
                };
                let addr: IpAddr = text.parse().unwrap();
                let prefix = if v6 { prefix + 96 } else { prefix };
                let probe = Cidr { addr, prefix };
                Cidr {
                    addr: probe.network(),
                    prefix,
                }
            })
            .collect()
    }

    #[test]
    fn sorted_normalization_matches_the_pairwise_definition() {
        let mut seed = 0x9e37_79b9_7f4a_7c15;
        for round in 0..2000 {
            let peers = random_cidrs(&mut seed, round % 7);
            let exclude = random_cidrs(&mut seed, round % 5);
            let fast = PeerSet::new(&peers, &exclude, "t");
            if peers.is_empty() && exclude.is_empty() {
                assert_eq!(fast, Ok(None));
                continue;
            }
            match (naive(&peers, &exclude), &fast) {
                (None, Err(_)) => {}
                (Some(want), Ok(Some(got))) => assert_eq!(&want, got, "{peers:?} - {exclude:?}"),
                (want, got) => panic!("{peers:?} - {exclude:?}: {want:?} vs {got:?}"),
            }
        }
        for _ in 0..2000 {
            let a = PeerSet::new(
                &random_cidrs(&mut seed, 4),
                &random_cidrs(&mut seed, 2),
                "t",
            );
            let b = PeerSet::new(
                &random_cidrs(&mut seed, 4),
                &random_cidrs(&mut seed, 2),
                "t",
            );
            if let (Ok(Some(a)), Ok(Some(b))) = (a, b) {
                assert_eq!(a.overlaps(&b), naive_overlaps(&a, &b), "{a:?} {b:?}");
                assert_eq!(b.overlaps(&a), naive_overlaps(&b, &a), "{b:?} {a:?}");
            }
        }
    }

    #[test]
    fn many_peers_take_milliseconds() {
        let peers: Vec<Cidr> = (0..200_000u32)
            .map(|i| Cidr {
                addr: IpAddr::V4((0x0a00_0000 + i * 4).into()),
                prefix: 30,
            })
            .collect();
        let exclude: Vec<Cidr> = peers
            .iter()
            .step_by(2)
            .map(|p| Cidr {
                addr: p.addr,
                prefix: 31,
            })
            .collect();
        let started = std::time::Instant::now();
        let set = PeerSet::new(&peers, &exclude, "t").unwrap().unwrap();
        assert!(set.overlaps(&set));
        assert_eq!(set.include.len(), 200_000);
        assert_eq!(set.exclude.len(), 100_000);
        // Pairwise, this took minutes; sorted, tens of milliseconds (a debug build, a busy CI).
        assert!(
            started.elapsed() < std::time::Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn long_peers_are_refused_with_a_short_quote() {
        let err = Cidr::parse(&"1".repeat(1 << 20), "fault.target.peers[0]").unwrap_err();
        assert!(err.over_limit);
        assert!(err.to_string().len() < 128, "{err}");
        let err = Cidr::parse("redis-redis-redis-redis-redis-redis-redis", "f").unwrap_err();
        assert!(!err.over_limit);
        assert!(err.reason.contains("(41 bytes)"), "{err}");
    }
}
