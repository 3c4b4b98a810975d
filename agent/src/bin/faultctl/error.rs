//! How a failed call reads: what faultctl was doing, faultd's message, the transport's causes
//! and the gRPC code, so a person sees what failed and a script can match the code.

use std::fmt::Display;

use anyhow::anyhow;
use faultd::api::code_name;
use tonic::Status;

/// `<what failed>: <status message> (<CODE>)`.
pub fn rpc_error(what: impl Display) -> impl FnOnce(Status) -> anyhow::Error {
    move |status| {
        let message = match status.message() {
            "" => status.code().description(),
            message => message,
        };
        // A transport failure (e.g. a TLS alert from faultd) rides in the status's source.
        let cause = std::error::Error::source(&status)
            .map(|source| format!(": {}", error_chain(source)))
            .unwrap_or_default();
        anyhow!("{what}: {message}{cause} ({})", code_name(status.code()))
    }
}

/// The error and its sources: tonic's transport error alone only says "transport error".
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text = format!("{text}: {cause_text}");
        }
        source = cause.source();
    }
    text
}
