//! Conversion of a target's request match between proto and domain.

use faultd_proto::v1 as pb;

use crate::fault::{Invalid, RequestMatch};

const FIELD: &str = "fault.target.request";

pub fn from_proto(request: pb::RequestMatch) -> Result<RequestMatch, Invalid> {
    match request.protocol {
        Some(pb::request_match::Protocol::Redis(redis)) => {
            RequestMatch::redis(redis.commands, redis.key_prefix, &format!("{FIELD}.redis"))
        }
        Some(pb::request_match::Protocol::Postgres(pg)) => {
            RequestMatch::postgres(pg.statements, &format!("{FIELD}.postgres"))
        }
        None => Err(Invalid::new(
            FIELD,
            "a protocol is required: redis or postgres",
        )),
    }
}

pub fn to_proto(request: RequestMatch) -> pb::RequestMatch {
    let protocol = match request {
        RequestMatch::Redis {
            commands,
            key_prefix,
        } => pb::request_match::Protocol::Redis(pb::RedisMatch {
            commands,
            key_prefix,
        }),
        RequestMatch::Postgres { statements } => {
            pb::request_match::Protocol::Postgres(pb::PostgresMatch { statements })
        }
    };
    pb::RequestMatch {
        protocol: Some(protocol),
    }
}
