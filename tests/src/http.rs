//! A minimal HTTP/1.1 GET over a TCP stream, for faultd's /metrics and /healthz.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::process::blocking;

/// `GET http://<addr><path>` → (status code, body). Panics if the endpoint cannot be reached.
pub fn get(addr: &str, path: &str) -> (u16, String) {
    blocking(|| {
        let mut stream = TcpStream::connect(addr)
            .unwrap_or_else(|e| panic!("connecting to faultd's metrics endpoint {addr}: {e}"));
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("read timeout");
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .unwrap_or_else(|e| panic!("GET {path} from {addr}: {e}"));
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .unwrap_or_else(|e| panic!("reading GET {path} from {addr}: {e}"));
        let (head, body) = response
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("GET {path}: no HTTP head in {response:?}"));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("GET {path}: no status in {head:?}"));
        (status, body.to_string())
    })
}

/// The value of the sample `name{labels}` (the exact text before the value) in an exposition,
/// or None.
pub fn sample(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        value.split_whitespace().next()?.parse().ok()
    })
}
