//! Checking a fault before anything is applied: the target's bounds, and what the action asks
//! of the target (protocol, direction, scope, a request match). INVALID_ARGUMENT names the field.

use super::*;

impl FaultSpec {
    /// The target's checks, and what the action asks of the target.
    pub fn validate(&self) -> Result<(), Invalid> {
        limits::labels(&self.labels, "fault.labels")?;
        self.target.validate()?;
        let on_interface = matches!(self.target.scope, Scope::Netns { .. });
        if on_interface
            && matches!(
                self.action,
                Action::Reset {
                    after_bytes: Some(_)
                }
            )
        {
            return Err(Invalid::new(
                "fault.target.netns",
                "reset with after_bytes is not available on an interface in a network namespace \
                 (a reset without it is: it tears down the namespace's connections and refuses \
                 new ones through the interface)",
            ));
        }
        match &self.target.request {
            Some(request) => self.validate_request(request)?,
            None if self.action == Action::LoseReply => {
                return Err(Invalid::new(
                    "fault.target.request",
                    "lose_reply acts on the replies of matched requests: name them (e.g. \
                     postgres statements COMMIT)",
                ));
            }
            None => {}
        }
        if self.action.tcp_only() && self.target.protocol == Protocol::Udp {
            return Err(Invalid::new(
                "fault.target.protocol",
                format!(
                    "{} acts on TCP segments: use TCP or leave it unset (drop stops UDP)",
                    self.action.name()
                ),
            ));
        }
        if on_interface
            && matches!(
                self.action,
                Action::Stall {
                    close_after: Some(_)
                }
            )
        {
            return Err(Invalid::new(
                "fault.stall.close_after",
                "closing connections acts on local sockets, which an interface in a network \
                 namespace does not have (leave close_after out)",
            ));
        }
        if self.action.on_connections() {
            let action = self.action.name();
            if self.target.protocol == Protocol::Udp {
                return Err(Invalid::new(
                    "fault.target.protocol",
                    format!("{action} acts on TCP connections: use TCP or leave it unset"),
                ));
            }
            // An interface refuses connects either way (`reject` on a netns scope).
            if self.target.direction == Direction::Ingress && !on_interface {
                return Err(Invalid::new(
                    "fault.target.direction",
                    format!(
                        "{action} acts on the connections the workload opens: use EGRESS or \
                         leave it unset"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// What a request match asks of the action and the rest of the target.
    fn validate_request(&self, request: &RequestMatch) -> Result<(), Invalid> {
        let field = "fault.target.request";
        let what = request.protocol();
        match &self.action {
            Action::Drop { percent } if *percent == 100.0 => {}
            Action::Drop { .. } => {
                return Err(Invalid::new(
                    "fault.drop.percent",
                    format!(
                        "a drop of {what} requests drops every matched request (its \
                         retransmissions match again): use 100"
                    ),
                ));
            }
            Action::Reset { after_bytes: None } | Action::LoseReply => {}
            // Matched in user space: the packets of the target's connections pass through
            // faultd, which holds only those that start a matched request.
            Action::Delay(Delay {
                mechanism: None | Some(Mechanism::Nfqueue),
                ..
            }) => {}
            Action::Delay(_) => {
                return Err(Invalid::new(
                    "fault.delay.mechanism",
                    format!("a delay of {what} requests is applied through NFQUEUE only"),
                ));
            }
            Action::Reset { .. } => {
                return Err(Invalid::new(
                    "fault.reset.after_bytes",
                    "a reset on a request match tears the connection down at the matched request: \
                     leave after_bytes out",
                ));
            }
            other => {
                return Err(Invalid::new(
                    field,
                    format!(
                        "{} cannot act on {what} requests (drop, delay, reset and lose_reply can)",
                        other.name()
                    ),
                ));
            }
        }
        if matches!(self.target.scope, Scope::Netns { .. })
            && !matches!(self.action, Action::Drop { .. })
        {
            return Err(Invalid::new(
                "fault.target.netns",
                format!(
                    "{} on {what} requests tears down local sockets, which an interface in a \
                     network namespace does not have (drop can target one)",
                    self.action.name()
                ),
            ));
        }
        if self.target.protocol == Protocol::Udp {
            return Err(Invalid::new(
                "fault.target.protocol",
                format!("{what} requests travel over TCP: use TCP or leave it unset"),
            ));
        }
        if self.target.direction == Direction::Ingress {
            return Err(Invalid::new(
                "fault.target.direction",
                format!(
                    "{what} requests are matched on what the workload sends: use EGRESS or leave \
                     it unset"
                ),
            ));
        }
        Ok(())
    }
}
