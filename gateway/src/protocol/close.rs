//! WebSocket close codes as data.

/// Close codes as data: what each means and whether to reconnect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    /// Token missing, invalid, expired, or `company_id` mismatch. 4001.
    Unauthorized,
    /// The tenant has no policy on this gateway. 4003.
    Forbidden,
    /// No frame from the client within the idle timeout. 4002.
    IdleTimeout,
    /// The outbound queue overflowed: the client reads too slowly. 4008.
    SlowConsumer,
    /// The client sent more messages than its rate allows. 4029.
    RateLimited,
    /// The tenant or the process is at its connection limit. 4030.
    TooManyConnections,
    /// A frame exceeded the message size limit. 1009.
    MessageTooBig,
    /// The client broke the WebSocket protocol (an unmasked frame, a
    /// reserved bit or opcode, a bad fragment or close frame). 1002.
    ProtocolError,
    /// A text message or close reason that is not UTF-8. 1007.
    InvalidPayload,
    /// The gateway is draining (deploy, scale-in): reconnect with your cursor. 1012.
    ServiceRestart,
    /// Connect rate exceeded, or the process sheds load: try again later
    /// (with backoff, possibly on another gateway). 1013.
    TryAgainLater,
    /// The tenant's data may not live in this gateway's region (policy
    /// `residency`): connect in one of its regions; retrying here will not
    /// help. 4013.
    NotResident,
}

impl Close {
    /// Every close code.
    pub const ALL: [Close; 12] = [
        Close::Unauthorized,
        Close::Forbidden,
        Close::IdleTimeout,
        Close::SlowConsumer,
        Close::RateLimited,
        Close::TooManyConnections,
        Close::MessageTooBig,
        Close::ProtocolError,
        Close::InvalidPayload,
        Close::ServiceRestart,
        Close::TryAgainLater,
        Close::NotResident,
    ];

    /// The WebSocket close code.
    pub fn code(self) -> u16 {
        match self {
            Close::Unauthorized => 4001,
            Close::IdleTimeout => 4002,
            Close::Forbidden => 4003,
            Close::SlowConsumer => 4008,
            Close::RateLimited => 4029,
            Close::TooManyConnections => 4030,
            Close::MessageTooBig => 1009,
            Close::ProtocolError => 1002,
            Close::InvalidPayload => 1007,
            Close::ServiceRestart => 1012,
            Close::TryAgainLater => 1013,
            Close::NotResident => 4013,
        }
    }

    /// The close frame's reason text.
    pub fn reason(self) -> &'static str {
        match self {
            Close::Unauthorized => "unauthorized",
            Close::IdleTimeout => "idle timeout",
            Close::Forbidden => "forbidden",
            Close::SlowConsumer => "slow consumer",
            Close::RateLimited => "rate limit exceeded",
            Close::TooManyConnections => "too many connections",
            Close::MessageTooBig => "message too big",
            Close::ProtocolError => "protocol error",
            Close::InvalidPayload => "invalid UTF-8",
            Close::ServiceRestart => "draining, reconnect",
            Close::TryAgainLater => "try again later",
            Close::NotResident => "tenant not resident in this region",
        }
    }

    /// Label used in metrics.
    pub fn label(self) -> &'static str {
        match self {
            Close::Unauthorized => "unauthorized",
            Close::IdleTimeout => "idle_timeout",
            Close::Forbidden => "forbidden",
            Close::SlowConsumer => "slow_consumer",
            Close::RateLimited => "rate_limited",
            Close::TooManyConnections => "too_many_connections",
            Close::MessageTooBig => "message_too_big",
            Close::ProtocolError => "protocol_error",
            Close::InvalidPayload => "invalid_payload",
            Close::ServiceRestart => "draining",
            Close::TryAgainLater => "try_again_later",
            Close::NotResident => "not_resident",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_codes_are_distinct() {
        let mut codes: Vec<u16> = Close::ALL.iter().map(|c| c.code()).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), Close::ALL.len());
        assert_eq!(Close::Unauthorized.code(), 4001);
    }
}
