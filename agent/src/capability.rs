//! One line of the capability report: what the kernel offers for a feature, or what it lacks.
//! A leaf, so the dataplane can report what it probed without knowing the report (`caps`).

use std::fmt::Display;

#[derive(Clone, Debug)]
pub struct Capability {
    pub name: &'static str,
    pub available: bool,
    pub detail: String,
}

impl Capability {
    /// A probe's outcome: `what` it is when available, else what is missing.
    pub fn outcome(name: &'static str, result: Result<(), impl Display>, what: &str) -> Self {
        match result {
            Ok(()) => Self {
                name,
                available: true,
                detail: what.into(),
            },
            Err(missing) => Self {
                name,
                available: false,
                detail: missing.to_string(),
            },
        }
    }
}
