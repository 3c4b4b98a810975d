//! One function a subcommand: each builds its request, makes the call, and shows the answer
//! through `output`. `inject` places a fault (and hands over to the hold with --keepalive),
//! `faults` reads and removes them, `lease` manages leases, `watch` follows events, `agent`
//! asks faultd about itself (capabilities, health).

pub mod agent;
pub mod faults;
pub mod inject;
pub mod lease;
pub mod watch;
