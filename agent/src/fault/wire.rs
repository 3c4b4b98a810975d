//! How a request looks at the start of a TCP segment: the same reading of Redis and PostgreSQL
//! requests as the kernel programs make (`agent-ebpf/src/request.rs`), for what matches in user
//! space (delay through NFQUEUE), and as the tested statement of what is and is not matched.

use faultd_common::{REQ_BUF_LEN, REQ_NAME_LEN};

use super::RequestMatch;

/// Bytes of whitespace and comments skipped before a PostgreSQL statement's keyword, and the
/// longest prepared statement name, as in the kernel.
const SQL_SKIP: usize = 96;
const STATEMENT_NAME: usize = 64;

impl RequestMatch {
    /// Whether a segment whose TCP payload is `payload` starts with a request this match
    /// names. Only the first `REQ_BUF_LEN` bytes count, as in the kernel.
    pub fn matches(&self, payload: &[u8]) -> bool {
        let p = &payload[..payload.len().min(REQ_BUF_LEN)];
        let name = match self {
            Self::Redis { key_prefix, .. } => redis(p, key_prefix.as_bytes()),
            Self::Postgres { .. } => postgres(p),
        };
        name.is_some_and(|name| {
            let upper = name.to_ascii_uppercase();
            self.names()
                .iter()
                .any(|n| n.as_bytes() == upper.as_slice())
        })
    }
}

/// The TCP payload of an IPv4 or IPv6 packet (no IPv6 extension headers), if any.
pub fn tcp_payload(packet: &[u8]) -> Option<&[u8]> {
    let l4 = match packet.first()? >> 4 {
        4 if packet.get(9) == Some(&6) => usize::from(packet[0] & 0x0f) * 4,
        6 if packet.get(6) == Some(&6) => 40,
        _ => return None,
    };
    let data = l4 + usize::from(packet.get(l4 + 12)? >> 4) * 4;
    packet.get(data..).filter(|p| !p.is_empty())
}

/// A decimal of 1 to 4 digits at `at` ended by `\r\n`: its value and where `\r` is.
fn number(p: &[u8], at: usize) -> Option<(usize, usize)> {
    let digits = p.get(at..)?.iter().take(5).position(|&c| c == b'\r')?;
    if digits == 0 || p.get(at + digits + 1) != Some(&b'\n') {
        return None;
    }
    let text = std::str::from_utf8(&p[at..at + digits]).ok()?;
    if !text.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    Some((text.parse().ok()?, at + digits))
}

fn command_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'-'
}

fn redis<'a>(p: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    let multibulk = p.first() == Some(&b'*');
    let (start, len) = if multibulk {
        let (_, cr) = number(p, 1)?;
        if p.get(cr + 2) != Some(&b'$') {
            return None;
        }
        let (len, cr) = number(p, cr + 3)?;
        (cr + 2, len)
    } else {
        let end = p
            .iter()
            .take(REQ_NAME_LEN + 1)
            .position(|&c| matches!(c, b' ' | b'\r' | b'\n'))?;
        (0, end)
    };
    if len == 0 || len > REQ_NAME_LEN {
        return None;
    }
    let name = p.get(start..start + len)?;
    if !name.iter().all(|&c| command_byte(c)) {
        return None;
    }
    if !prefix.is_empty() {
        let key = if multibulk {
            let at = start + len + 2;
            if p.get(at) != Some(&b'$') {
                return None;
            }
            let (key_len, cr) = number(p, at + 1)?;
            if key_len < prefix.len() {
                return None;
            }
            cr + 2
        } else {
            start + len + 1
        };
        if p.get(key..key + prefix.len())? != prefix {
            return None;
        }
    }
    Some(name)
}

fn postgres(p: &[u8]) -> Option<&[u8]> {
    let mut pos = match p.first()? {
        b'Q' => 5,
        b'P' => {
            let name = p
                .get(5..)?
                .iter()
                .take(STATEMENT_NAME)
                .position(|&c| c == 0)?;
            6 + name
        }
        _ => return None,
    };
    // 0: code, 1: in a `--` comment, 2: in a `/* */` comment.
    let mut mode = 0;
    let mut start = None;
    for _ in 0..SQL_SKIP {
        let c = *p.get(pos)?;
        let next = p.get(pos + 1).copied().unwrap_or(0);
        pos += match mode {
            0 if matches!(c, b' ' | b'\t' | b'\n' | b'\r') => 1,
            0 if c == b'-' && next == b'-' => {
                mode = 1;
                2
            }
            0 if c == b'/' && next == b'*' => {
                mode = 2;
                2
            }
            0 => {
                start = Some(pos);
                break;
            }
            1 => {
                if c == b'\n' {
                    mode = 0;
                }
                1
            }
            _ if c == b'*' && next == b'/' => {
                mode = 0;
                2
            }
            _ => 1,
        };
    }
    let start = start?;
    let len = p
        .get(start..)?
        .iter()
        .take(REQ_NAME_LEN + 1)
        .position(|c| !c.is_ascii_alphabetic())?;
    (1..=REQ_NAME_LEN)
        .contains(&len)
        .then(|| &p[start..start + len])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redis_match(names: &[&str], prefix: &str) -> RequestMatch {
        RequestMatch::redis(
            names.iter().map(|n| n.to_string()).collect(),
            prefix.into(),
            "r",
        )
        .unwrap()
    }

    fn query(kind: u8, sql: &str) -> Vec<u8> {
        let mut m = vec![kind, 0, 0, 0, 0];
        m.extend_from_slice(sql.as_bytes());
        m.push(0);
        m
    }

    #[test]
    fn redis_commands_in_both_forms_and_what_passes() {
        let set = redis_match(&["SET"], "");
        assert!(set.matches(b"*3\r\n$3\r\nset\r\n$1\r\nk\r\n$1\r\nv\r\n"));
        assert!(set.matches(b"SET k v\r\n"));
        assert!(!set.matches(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"));
        assert!(!set.matches(b"*3\r\n$6\r\nSETNX\r\n"), "a different name");
        // Pipelined behind another command, and split before the end of the name: passed.
        assert!(!set.matches(b"*2\r\n$3\r\nGET\r\n$1\r\na\r\n*3\r\n$3\r\nSET\r\n"));
        assert!(!set.matches(b"*3\r\n$3\r\nSE"));
        assert!(!set.matches(b"T\r\n$1\r\nk\r\n"));
        assert!(set.matches(b"*3\r\n$3\r\nSET\r\n"), "split after the name");
        let keyed = redis_match(&["GET"], "user:");
        assert!(keyed.matches(b"*2\r\n$3\r\nGET\r\n$7\r\nuser:42\r\n"));
        assert!(!keyed.matches(b"*2\r\n$3\r\nGET\r\n$7\r\nitem:42\r\n"));
        assert!(!keyed.matches(b"*2\r\n$3\r\nGET\r\n$4\r\nuser\r\n"));
        assert!(keyed.matches(b"get user:1\r\n"));
    }

    #[test]
    fn postgres_statements_after_whitespace_and_comments() {
        let m = RequestMatch::postgres(vec!["commit".into(), "INSERT".into()], "p").unwrap();
        assert!(m.matches(&query(b'Q', "COMMIT")));
        assert!(m.matches(&query(
            b'Q',
            "  /* app */ -- note\n\tinsert into t values (1)"
        )));
        assert!(!m.matches(&query(b'Q', "SELECT 1; COMMIT")));
        assert!(!m.matches(&query(b'Q', "COMMITTED")), "a longer word");
        let mut parse = vec![b'P', 0, 0, 0, 0];
        parse.extend_from_slice(b"stmt_1\0commit\0");
        assert!(m.matches(&parse));
        assert!(!m.matches(b"B\0\0\0\0COMMIT"));
        assert!(!m.matches(&query(b'Q', "/* never closed COMMIT")));
    }

    #[test]
    fn payload_of_ipv4_and_ipv6_tcp() {
        let mut v4 = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 6];
        v4.resize(20, 0);
        let mut tcp = vec![0u8; 20];
        tcp[12] = 5 << 4;
        v4.extend_from_slice(&tcp);
        assert_eq!(tcp_payload(&v4), None, "a bare ACK");
        v4.extend_from_slice(b"PING\r\n");
        assert_eq!(tcp_payload(&v4), Some(&b"PING\r\n"[..]));
        let mut v6 = vec![0x60, 0, 0, 0, 0, 0, 6, 64];
        v6.resize(40, 0);
        v6.extend_from_slice(&tcp);
        v6.extend_from_slice(b"x");
        assert_eq!(tcp_payload(&v6), Some(&b"x"[..]));
    }
}
