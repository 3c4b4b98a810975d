//! Bounds on every variable-size input (ids, labels, peers, ports, names and paths), checked
//! before any work that grows with the input, and errors that quote at most a short prefix of
//! what was sent. A request over a bound is RESOURCE_EXHAUSTED (`Invalid::over_limit`), naming
//! the field.

use super::{Invalid, MAX_PEER_ENTRIES_PER_FAULT, MAX_RULES_PER_FAULT};

/// Longest fault or lease id (faultd's own are 16 hex digits).
pub const MAX_ID_BYTES: usize = 128;
/// Most labels on one fault or lease.
pub const MAX_LABELS: usize = 64;
/// Longest label key (a Kubernetes qualified name with its prefix is at most 317 bytes).
pub const MAX_LABEL_KEY_BYTES: usize = 320;
/// Longest label value.
pub const MAX_LABEL_VALUE_BYTES: usize = 1024;
/// Most bytes of keys and values on one fault or lease: 1000 faults (the default policy) then
/// still list in one 4 MB message.
pub const MAX_LABELS_BYTES: usize = 4096;
/// Most port ranges in a target (each range is at least one kernel entry).
pub const MAX_PORT_RANGES: usize = MAX_RULES_PER_FAULT;
/// Most peers and exclusions together in a target (each is at least one kernel entry).
pub const MAX_PEERS: usize = MAX_PEER_ENTRIES_PER_FAULT;
/// Longest peer text (the longest IPv6 CIDR is 43 characters; spaces are trimmed).
pub const MAX_PEER_BYTES: usize = 64;
/// Longest path (cgroup, network namespace): PATH_MAX.
pub const MAX_PATH_BYTES: usize = 4096;
/// Longest name (pod uid, container id, interface).
pub const MAX_NAME_BYTES: usize = 256;

/// How much of an input an error message quotes.
const QUOTE_CHARS: usize = 32;

/// `text` for an error message: quoted whole when short, else its first characters and its
/// size, so that an error never echoes a large input back.
pub fn quote(text: &str) -> String {
    match text.char_indices().nth(QUOTE_CHARS) {
        None => format!("{text:?}"),
        Some((end, _)) => format!("{:?}… ({} bytes)", &text[..end], text.len()),
    }
}

/// A string field of at most `max` bytes.
pub fn text(value: &str, max: usize, field: &str) -> Result<(), Invalid> {
    if value.len() > max {
        return Err(Invalid::over_limit(
            field,
            format!("{} is longer than {max} bytes", quote(value)),
        ));
    }
    Ok(())
}

/// A repeated field of at most `max` entries.
pub fn count(len: usize, max: usize, field: &str) -> Result<(), Invalid> {
    if len > max {
        return Err(Invalid::over_limit(
            field,
            format!("{len} entries; at most {max}"),
        ));
    }
    Ok(())
}

/// The entry counts of a target: port ranges, and peers with exclusions.
pub fn target_counts(port_ranges: usize, peers: usize) -> Result<(), Invalid> {
    count(port_ranges, MAX_PORT_RANGES, "fault.target.ports")?;
    count(peers, MAX_PEERS, "fault.target.peers")
}

/// A fault or lease id as a request names it: required and short.
pub fn id(value: &str, field: &str) -> Result<(), Invalid> {
    if value.is_empty() {
        return Err(Invalid::new(field, "required"));
    }
    text(value, MAX_ID_BYTES, field)
}

/// The labels of a fault or lease: the count first, then each key and value, then the total.
pub fn labels<'a, I>(labels: I, field: &str) -> Result<(), Invalid>
where
    I: IntoIterator<Item = (&'a String, &'a String)>,
    I::IntoIter: ExactSizeIterator,
{
    let labels = labels.into_iter();
    count(labels.len(), MAX_LABELS, field)?;
    let mut total = 0;
    for (key, value) in labels {
        if key.len() > MAX_LABEL_KEY_BYTES {
            return Err(Invalid::over_limit(
                field,
                format!(
                    "key {} is longer than {MAX_LABEL_KEY_BYTES} bytes",
                    quote(key)
                ),
            ));
        }
        if value.len() > MAX_LABEL_VALUE_BYTES {
            return Err(Invalid::over_limit(
                format!("{field}[{}]", quote(key)),
                format!(
                    "value {} is longer than {MAX_LABEL_VALUE_BYTES} bytes",
                    quote(value)
                ),
            ));
        }
        total += key.len() + value.len();
    }
    if total > MAX_LABELS_BYTES {
        return Err(Invalid::over_limit(
            field,
            format!("{total} bytes of keys and values; at most {MAX_LABELS_BYTES}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn quotes_a_short_prefix() {
        assert_eq!(quote("redis"), "\"redis\"");
        let long = "x".repeat(3_000_000);
        let quoted = quote(&long);
        assert!(quoted.len() < 64, "{quoted}");
        assert!(quoted.ends_with("(3000000 bytes)"), "{quoted}");
        // Never splits a character.
        let wide = "é".repeat(100);
        assert_eq!(quote(&wide), format!("{:?}… (200 bytes)", "é".repeat(32)));
    }

    #[test]
    fn ids_are_required_and_short() {
        assert!(id("0123456789abcdef", "id").is_ok());
        let empty = id("", "id").unwrap_err();
        assert!(!empty.over_limit);
        let long = id(&"a".repeat(3 << 20), "lease_id").unwrap_err();
        assert!(long.over_limit);
        assert_eq!(long.field, "lease_id");
        assert!(long.to_string().len() < 128, "{long}");
    }

    #[test]
    fn labels_are_bounded_in_count_size_and_total() {
        let labels = |pairs: Vec<(String, String)>| pairs.into_iter().collect::<BTreeMap<_, _>>();
        let ok = labels(vec![("experiment".into(), "redis-down".into())]);
        assert!(super::labels(&ok, "fault.labels").is_ok());

        let many = labels(
            (0..100_000)
                .map(|i| (i.to_string(), String::new()))
                .collect(),
        );
        let err = super::labels(&many, "fault.labels").unwrap_err();
        assert!(err.over_limit);
        assert_eq!(err.field, "fault.labels");

        let huge = labels(vec![("k".into(), "v".repeat(3 << 20))]);
        let err = super::labels(&huge, "fault.labels").unwrap_err();
        assert!(err.over_limit);
        assert!(err.field.starts_with("fault.labels"), "{err}");
        assert!(err.to_string().len() < 200, "{err}");

        let key = labels(vec![("k".repeat(1000), String::new())]);
        assert!(super::labels(&key, "labels").unwrap_err().over_limit);

        let total = labels(
            (0..10)
                .map(|i| (i.to_string(), "v".repeat(MAX_LABEL_VALUE_BYTES)))
                .collect(),
        );
        let err = super::labels(&total, "labels").unwrap_err();
        assert!(err.reason.contains("bytes of keys and values"), "{err}");
    }
}
