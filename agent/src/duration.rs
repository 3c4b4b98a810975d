//! Human durations ("500ms", "30s", "2m", "1h", "1m30s"): parsing and formatting.

use std::time::Duration;

/// Why a duration does not parse; each says what to write instead.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("empty duration")]
    Empty,
    #[error("{text:?}: missing unit (use ms, s, m or h)")]
    MissingUnit { text: String },
    #[error("{text:?}: {number:?} is not a number")]
    NotANumber { text: String, number: String },
    #[error("{text:?}: unknown unit {unit:?} (use ms, s, m or h)")]
    UnknownUnit { text: String, unit: String },
    #[error("{text:?}: not a valid duration")]
    OutOfRange { text: String },
}

/// Parses a duration made of number+unit parts (ns, us, ms, s, m, h). A bare number is seconds.
pub fn parse(text: &str) -> Result<Duration, ParseError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(ParseError::Empty);
    }
    if let Ok(secs) = text.parse::<f64>() {
        return seconds(secs, text);
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let split = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| ParseError::MissingUnit { text: text.into() })?;
        let (number, tail) = rest.split_at(split);
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, next) = tail.split_at(unit_len);
        let value: f64 = number.parse().map_err(|_| ParseError::NotANumber {
            text: text.into(),
            number: number.into(),
        })?;
        let scale = match unit {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => {
                return Err(ParseError::UnknownUnit {
                    text: text.into(),
                    unit: unit.into(),
                });
            }
        };
        total += seconds(value * scale, text)?;
        rest = next;
    }
    Ok(total)
}

fn seconds(secs: f64, text: &str) -> Result<Duration, ParseError> {
    Duration::try_from_secs_f64(secs).map_err(|_| ParseError::OutOfRange { text: text.into() })
}

/// Formats a duration the way `parse` reads it, rounded to milliseconds.
pub fn format(d: Duration) -> String {
    // Round to the nearest millisecond, so 29.9999 s reads as 30s.
    let ms = (d.as_nanos() + 500_000) / 1_000_000;
    if ms == 0 && !d.is_zero() {
        return format!("{}us", d.as_micros());
    }
    if ms > 0 && ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms > 0 && ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else if ms > 1000 {
        format!("{}.{:03}s", ms / 1000, ms % 1000)
    } else {
        format!("{ms}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_combinations() {
        assert_eq!(parse("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse("").is_err());
        assert!(parse("10x").is_err());
        assert!(parse("-1s").is_err());
    }

    #[test]
    fn formats_round_trip() {
        for text in ["30s", "500ms", "2m", "1h"] {
            assert_eq!(format(parse(text).unwrap()), text);
        }
        assert_eq!(format(Duration::from_micros(29_999_900)), "30s");
        assert_eq!(format(Duration::from_millis(2925)), "2.925s");
    }
}
