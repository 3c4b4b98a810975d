//! Parsers of flag values (ports, labels, durations, rates, sizes, percentages): each error
//! says what to type instead, with an example.

use std::collections::HashMap;
use std::time::Duration;

use faultd::duration;
use faultd_proto::v1::PortRange;

pub const PORT_EXAMPLE: &str = "e.g. --port 6379, --port 8000-8010 or --port 6379,5432";

/// One port: 1 to 65535.
pub fn parse_port(text: &str) -> Result<u32, String> {
    match text.trim().parse::<u32>() {
        Ok(port @ 1..=65535) => Ok(port),
        _ => Err(format!(
            "{text:?} is not a port: use a number from 1 to 65535, {PORT_EXAMPLE}"
        )),
    }
}

/// `N` or `N-M` with N <= M.
pub fn parse_port_range(text: &str) -> Result<PortRange, String> {
    let Some((first, last)) = text.split_once('-') else {
        return Ok(PortRange {
            first: parse_port(text)?,
            last: None,
        });
    };
    let (first, last) = (parse_port(first)?, parse_port(last)?);
    if first > last {
        return Err(format!(
            "{text:?}: the first port is above the last; write the range low to high, \
             e.g. --port {last}-{first}"
        ));
    }
    Ok(PortRange {
        first,
        last: Some(last),
    })
}

pub fn parse_label(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.trim().is_empty() => {
            Ok((key.trim().to_string(), value.to_string()))
        }
        _ => Err(format!(
            "{text:?} is not a label: write KEY=VALUE, e.g. --label experiment=redis-outage"
        )),
    }
}

/// Labels as a map; a key given twice is a mistake, not something to resolve silently.
pub fn label_map(labels: &[(String, String)]) -> Result<HashMap<String, String>, String> {
    let mut map = HashMap::new();
    for (key, value) in labels {
        if map.insert(key.clone(), value.clone()).is_some() {
            return Err(format!(
                "label {key:?} is given twice: give each --label key once"
            ));
        }
    }
    Ok(map)
}

pub fn parse_ttl(text: &str) -> Result<Duration, String> {
    match duration::parse(text) {
        Ok(ttl) if !ttl.is_zero() => Ok(ttl),
        Ok(_) => Err("a ttl must be longer than zero, e.g. --ttl 30s".into()),
        Err(why) => Err(format!("{why}; write e.g. --ttl 30s, 500ms, 2m or 1m30s")),
    }
}

pub fn parse_latency(text: &str) -> Result<Duration, String> {
    match duration::parse(text) {
        Ok(latency) if !latency.is_zero() => Ok(latency),
        Ok(_) => Err("a delay must be longer than zero, e.g. --latency 100ms".into()),
        Err(why) => Err(format!("{why}; write e.g. --latency 100ms or 1.5s")),
    }
}

pub fn parse_close_after(text: &str) -> Result<Duration, String> {
    match duration::parse(text) {
        Ok(after) if !after.is_zero() => Ok(after),
        Ok(_) => Err("must be longer than zero (leave it out to stall until the end)".into()),
        Err(why) => Err(format!("{why}; write e.g. --close-after 5s")),
    }
}

pub fn parse_jitter(text: &str) -> Result<Duration, String> {
    duration::parse(text).map_err(|why| format!("{why}; write e.g. --jitter 20ms"))
}

/// `--gap` of reorder: longer than zero.
pub fn parse_gap(text: &str) -> Result<Duration, String> {
    match duration::parse(text) {
        Ok(gap) if !gap.is_zero() => Ok(gap),
        Ok(_) => Err("a gap must be longer than zero, e.g. --gap 10ms".into()),
        Err(why) => Err(format!("{why}; write e.g. --gap 10ms")),
    }
}

/// `--delay` of slice: zero sends the pieces at once.
pub fn parse_slice_delay(text: &str) -> Result<Duration, String> {
    duration::parse(text).map_err(|why| format!("{why}; write e.g. --delay 1ms"))
}

/// `NUMBER[UNIT]`: bytes, or bits when the unit says so. Returns bytes.
pub fn parse_quantity(text: &str, bits_allowed: bool) -> Option<u64> {
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let bytes = match unit.trim() {
        "" | "B" => 1.0,
        "kB" | "KB" => 1e3,
        "KiB" => 1024.0,
        "MB" => 1e6,
        "MiB" => 1024.0 * 1024.0,
        "GB" => 1e9,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        bits if bits_allowed => match bits.to_ascii_lowercase().as_str() {
            "bit" => 1.0 / 8.0,
            "kbit" => 1e3 / 8.0,
            "mbit" => 1e6 / 8.0,
            "gbit" => 1e9 / 8.0,
            _ => return None,
        },
        _ => return None,
    };
    let value = (number * bytes).round();
    (value.is_finite() && value >= 1.0 && value < u64::MAX as f64).then_some(value as u64)
}

/// A rate in bytes per second: `256KiB/s`, `1MB/s`, `10mbit`, `5000` (bytes/s).
pub fn parse_rate(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let unit = trimmed.strip_suffix("/s").unwrap_or(trimmed);
    parse_quantity(unit, true).ok_or_else(|| {
        format!(
            "{text:?} is not a rate: write e.g. --rate 256KiB/s, 1MB/s or 10mbit \
             (B, KB, KiB, MB, MiB, GB, GiB per second, or bit, kbit, mbit, gbit)"
        )
    })
}

/// A size in bytes: `32KiB`, `1500`, `1MB`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    parse_quantity(text.trim(), false).ok_or_else(|| {
        format!("{text:?} is not a size: write e.g. --burst 32KiB or 1500 (B, KB, KiB, MB, MiB)")
    })
}

pub fn parse_percent(text: &str) -> Result<f64, String> {
    match text.trim().trim_end_matches('%').parse::<f64>() {
        Ok(percent) if (0.0..=100.0).contains(&percent) => Ok(percent),
        _ => Err(format!(
            "{text:?}: write a percentage from 0 to 100, e.g. --percent 50"
        )),
    }
}
