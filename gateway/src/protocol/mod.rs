//! The wire protocol as types: what clients send ([`ClientMessage`]), what
//! the gateway answers ([`ServerMessage`]), the error codes every transport
//! shares ([`ErrorCode`], with their HTTP status) and the WebSocket close
//! codes ([`Close`]). Transports only encode these: a WebSocket text frame,
//! an SSE named event, a JSON body. `docs/protocol.md` documents them and
//! `tests/protocol_golden.rs` pins their exact JSON.
//!
//! Events are not here: they are serialized once per fan-out when stored
//! (see [`crate::event`]).

mod client;
mod close;
mod error;
mod server;

pub use client::{ClientMessage, MessageProbe, PresenceFrame, PublishFrame, SubscriptionRequest};
pub use close::Close;
pub use error::ErrorCode;
pub use server::{ReconnectReason, ServerMessage};

/// The current time as RFC 3339 with a `Z` suffix, as the seeds print it.
pub fn now_rfc3339() -> String {
    format_time(time::OffsetDateTime::now_utc())
}

/// A time as RFC 3339 (the seeds' `timestamp` form).
pub fn format_time(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}
