//! How values are written for the xtables match extensions the rules use: xt_multiport port
//! lists, xt_time dates, and the peers of one address family.

use super::Family;
use crate::fault::{Cidr, PeerSet, PortRange};

/// The peers of `family` a fault is limited to (`[None]`: every address; empty: none, the
/// family gets no rule) and the ones it excludes.
pub(super) fn peers_of(peers: Option<&PeerSet>, family: Family) -> (Vec<Option<Cidr>>, Vec<Cidr>) {
    let ours = |c: &&Cidr| c.is_v6() == (family == Family::V6);
    match peers {
        None => (vec![None], Vec::new()),
        Some(set) => (
            set.include.iter().filter(ours).copied().map(Some).collect(),
            set.exclude.iter().filter(ours).copied().collect(),
        ),
    }
}

/// Most port entries xt_multiport takes in one rule (a range counts as two).
const MULTIPORT_MAX: usize = 15;

/// Unix seconds as xt_time writes a UTC date: `2026-11-22T05:30:07`.
pub(super) fn utc(secs: u64) -> String {
    let (days, rest) = ((secs / 86_400) as i64, secs % 86_400);
    // Days since 1970-01-01 to a civil date (proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// Port ranges as xt_multiport `--ports` lists of at most 15 entries (a range takes two).
pub(super) fn multiport_lists(ports: &[PortRange]) -> Vec<String> {
    let mut lists = Vec::new();
    let mut current: Vec<String> = Vec::new();
    let mut used = 0;
    for range in ports {
        let (entry, cost) = if range.first == range.last {
            (range.first.to_string(), 1)
        } else {
            (format!("{}:{}", range.first, range.last), 2)
        };
        if used + cost > MULTIPORT_MAX {
            lists.push(current.join(","));
            current.clear();
            used = 0;
        }
        current.push(entry);
        used += cost;
    }
    if !current.is_empty() {
        lists.push(current.join(","));
    }
    lists
}

/// Port ranges from `(first, last)` pairs, for tests.
#[cfg(test)]
pub(super) fn ports(list: &[(u16, u16)]) -> Vec<PortRange> {
    list.iter()
        .map(|&(first, last)| PortRange { first, last })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_utc() {
        assert_eq!(utc(0), "1970-01-01T00:00:00");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00");
        assert_eq!(utc(4_102_444_799), "2099-12-31T23:59:59");
    }

    #[test]
    fn port_lists_respect_the_multiport_limit() {
        let many: Vec<(u16, u16)> = (1..=20).map(|p| (p, p)).collect();
        let lists = multiport_lists(&ports(&many));
        assert_eq!(lists.len(), 2);
        assert_eq!(lists[0].split(',').count(), 15);
        let ranges: Vec<(u16, u16)> = (0..8).map(|i| (i * 10 + 1, i * 10 + 5)).collect();
        let lists = multiport_lists(&ports(&ranges));
        assert_eq!(
            lists,
            vec!["1:5,11:15,21:25,31:35,41:45,51:55,61:65", "71:75"]
        );
    }
}
