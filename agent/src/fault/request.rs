//! The request match of a TCP target: which requests of an application protocol a fault acts
//! on (Redis commands, PostgreSQL statements), with its validation and kernel encoding.

use faultd_common::{REQ_NAME_LEN, REQ_POSTGRES, REQ_PREFIX_LEN, REQ_REDIS, RequestSpec};

use super::Invalid;

/// Most names one request match may list.
pub const MAX_NAMES: usize = 64;

/// What is not matched, said wherever users read about request matches (README, caps,
/// `--dry-run`).
pub const NOT_MATCHED: &str = "matched on the first segment of what the client sends; not \
     matched: TLS, a request that starts in a segment after another pipelined one, a request \
     split before the end of its name (or key prefix)";

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestMatch {
    /// Redis commands by name (upper case), optionally only on keys starting with a prefix.
    Redis {
        commands: Vec<String>,
        key_prefix: String,
    },
    /// PostgreSQL simple Query and Parse messages whose SQL's first keyword is one of these
    /// (upper case).
    Postgres { statements: Vec<String> },
}

impl RequestMatch {
    /// Validates and upper-cases the names. `field` is the match's path,
    /// e.g. `fault.target.request.redis`.
    pub fn redis(commands: Vec<String>, key_prefix: String, field: &str) -> Result<Self, Invalid> {
        let commands = names(commands, &format!("{field}.commands"), |c| {
            c.is_ascii_alphanumeric() || c == '_' || c == '-'
        })?;
        if key_prefix.len() > REQ_PREFIX_LEN {
            return Err(Invalid::new(
                format!("{field}.key_prefix"),
                format!("{} bytes long; at most {REQ_PREFIX_LEN}", key_prefix.len()),
            ));
        }
        Ok(Self::Redis {
            commands,
            key_prefix,
        })
    }

    pub fn postgres(statements: Vec<String>, field: &str) -> Result<Self, Invalid> {
        let statements = names(statements, &format!("{field}.statements"), |c| {
            c.is_ascii_alphabetic()
        })?;
        Ok(Self::Postgres { statements })
    }

    pub fn protocol(&self) -> &'static str {
        match self {
            Self::Redis { .. } => "redis",
            Self::Postgres { .. } => "postgres",
        }
    }

    pub fn names(&self) -> &[String] {
        match self {
            Self::Redis { commands, .. } => commands,
            Self::Postgres { statements } => statements,
        }
    }

    /// e.g. `redis commands SET,DEL on keys user:*`.
    pub fn summary(&self) -> String {
        match self {
            Self::Redis {
                commands,
                key_prefix,
            } => {
                let keys = if key_prefix.is_empty() {
                    String::new()
                } else {
                    format!(" on keys {key_prefix}*")
                };
                format!("redis commands {}{keys}", commands.join(","))
            }
            Self::Postgres { statements } => {
                format!("postgres statements {}", statements.join(","))
            }
        }
    }

    /// The `FAULTD_REQ_SPECS` value.
    pub fn spec(&self) -> RequestSpec {
        let mut spec = RequestSpec::default();
        match self {
            Self::Redis { key_prefix, .. } => {
                spec.protocol = REQ_REDIS;
                spec.key_prefix_len = key_prefix.len() as u32;
                spec.key_prefix[..key_prefix.len()].copy_from_slice(key_prefix.as_bytes());
            }
            Self::Postgres { .. } => spec.protocol = REQ_POSTGRES,
        }
        spec
    }

    /// The names as `FAULTD_REQ_NAMES` keys hold them: upper case, zero-filled.
    pub fn kernel_names(&self) -> Vec<[u8; REQ_NAME_LEN]> {
        self.names()
            .iter()
            .map(|name| {
                let mut bytes = [0u8; REQ_NAME_LEN];
                bytes[..name.len()].copy_from_slice(name.as_bytes());
                bytes
            })
            .collect()
    }
}

/// Upper-cased, deduplicated names, each 1 to REQ_NAME_LEN bytes of `allowed` characters.
fn names(
    list: Vec<String>,
    field: &str,
    allowed: impl Fn(char) -> bool,
) -> Result<Vec<String>, Invalid> {
    if list.is_empty() {
        return Err(Invalid::new(
            field,
            "at least one name is required (e.g. SET)",
        ));
    }
    if list.len() > MAX_NAMES {
        return Err(Invalid::over_limit(
            field,
            format!("{} names; at most {MAX_NAMES}", list.len()),
        ));
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, name) in list.into_iter().enumerate() {
        let at = format!("{field}[{i}]");
        if name.is_empty() || name.len() > REQ_NAME_LEN {
            return Err(Invalid::new(
                at,
                format!(
                    "{} must be 1 to {REQ_NAME_LEN} characters",
                    super::limits::quote(&name)
                ),
            ));
        }
        if !name.chars().all(&allowed) {
            return Err(Invalid::new(
                at,
                format!(
                    "{} is not a command or keyword name",
                    super::limits::quote(&name)
                ),
            ));
        }
        let upper = name.to_ascii_uppercase();
        if !out.contains(&upper) {
            out.push(upper);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_upper_cased_and_checked() {
        let m = RequestMatch::redis(
            vec!["set".into(), "Del".into(), "SET".into()],
            "u:".into(),
            "r",
        )
        .unwrap();
        assert_eq!(m.names(), ["SET", "DEL"]);
        assert_eq!(m.spec().key_prefix_len, 2);
        assert_eq!(&m.kernel_names()[0][..4], b"SET\0");
        let e = RequestMatch::redis(vec![], String::new(), "r").unwrap_err();
        assert_eq!(e.field, "r.commands");
        let e = RequestMatch::redis(vec!["A".repeat(17)], String::new(), "r").unwrap_err();
        assert_eq!(e.field, "r.commands[0]");
        let e = RequestMatch::postgres(vec!["COMMIT;".into()], "p").unwrap_err();
        assert_eq!(e.field, "p.statements[0]");
        let e = RequestMatch::redis(vec!["GET".into()], "k".repeat(33), "r").unwrap_err();
        assert_eq!(e.field, "r.key_prefix");
    }
}
