//! What faultctl prints: each answer as text for people (`text`, built from the phrases in
//! `fields`) or as one JSON document for scripts (`json`), and `show`, which writes either.

use std::io::Write;

use anyhow::{Context, Result};
use serde_json::Value;

use crate::args::Output;

pub mod fields;
pub mod json;
pub mod text;

/// Prints the text or the JSON document, and flushes so a reading script sees it at once.
pub fn show(output: Output, text: impl FnOnce() -> String, json: Value) -> Result<()> {
    let rendered = match output {
        Output::Text => text(),
        Output::Json => serde_json::to_string_pretty(&json).context("encoding JSON")?,
    };
    let mut stdout = std::io::stdout().lock();
    // Written by hand rather than println! so a closed pipe is an error, not a panic.
    writeln!(stdout, "{}", rendered.trim_end())
        .and_then(|()| stdout.flush())
        .context("writing to stdout")
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use faultd::api::convert;
    use faultd_proto::v1::{self as pb, Fault, fault};

    use super::fields::action_text;
    use super::json::fault_json;

    #[test]
    fn delay_and_bandwidth_read_like_the_flags() {
        let ms = |ms| Some(convert::duration_to_proto(Duration::from_millis(ms)));
        let delay = fault::Action::Delay(pb::Delay {
            latency: ms(100),
            jitter: ms(20),
            correlation: 25.0,
            mechanism: 0,
        });
        assert_eq!(
            action_text(Some(&delay)),
            "delay 100ms ±20ms 25% correlated"
        );
        let fixed = fault::Action::Delay(pb::Delay {
            latency: ms(50),
            jitter: ms(0),
            ..Default::default()
        });
        assert_eq!(action_text(Some(&fixed)), "delay 50ms");
        let bandwidth = fault::Action::Bandwidth(pb::Bandwidth {
            rate_bytes_per_sec: 262_144,
            burst: 2621,
            mechanism: 0,
        });
        assert_eq!(
            action_text(Some(&bandwidth)),
            "bandwidth 256KiB/s burst 2621B"
        );
        let fault = Fault {
            action: Some(delay),
            mechanism: "nfqueue".into(),
            ..Fault::default()
        };
        let json = fault_json(&fault);
        assert_eq!(json["delay"]["latency"], "0.100s");
        assert_eq!(json["delay"]["mechanism"], "MECHANISM_UNSPECIFIED");
        assert_eq!(json["mechanism"], "nfqueue");
    }
}
