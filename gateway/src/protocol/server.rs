//! What the gateway sends besides events, as one type. A transport encodes
//! a message with [`ServerMessage::frame`] (a WebSocket text frame) or
//! [`ServerMessage::sse_name`] and [`ServerMessage::data`] (an SSE named
//! event); the shape of each message lives here only.

use std::fmt::Display;

use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::Value;
use time::OffsetDateTime;

use super::{ErrorCode, format_time};
use crate::broker::GapReason;
use crate::event::Cursor;

/// Why the gateway asks a client to reconnect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReconnectReason {
    /// The gateway drains (deploy, scale-in): reconnect to any gateway.
    Draining,
    /// The client read too slowly and its queue overflowed.
    SlowConsumer,
}

impl ReconnectReason {
    fn as_str(self) -> &'static str {
        match self {
            ReconnectReason::Draining => "draining",
            ReconnectReason::SlowConsumer => "slow consumer",
        }
    }
}

/// A server → client message other than `event`. `request_id` is echoed
/// as `requestId` when the client sent one.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerMessage {
    /// The first message of a WebSocket connection.
    ConnectionEstablished {
        /// The token's subject.
        user_id: String,
        /// This connection's id on this gateway.
        connection_id: u64,
        /// The gateway's region.
        region: String,
        /// The token's expiry (unix seconds).
        expires_at: u64,
    },
    /// Seed 001: the patterns now held.
    SubscriptionConfirmed {
        /// The patterns held (refused ones are not listed).
        topics: Vec<String>,
        /// Extension: a position from which the connection misses nothing
        /// it now holds (the last event it was sent, or where its
        /// subscriptions began), for a client that has no cursor yet.
        cursor: Option<Cursor>,
        /// Echoed `requestId`.
        request_id: Option<Value>,
    },
    /// Seed 004: the channel is subscribed (timestamp in milliseconds).
    Subscribed {
        /// The channel as the client named it.
        channel: Option<String>,
        /// Echoed `requestId` (always present in this form, `null` if none).
        request_id: Option<Value>,
    },
    /// Seed 001: the patterns removed.
    UnsubscriptionConfirmed {
        /// The patterns that were held and are now removed.
        topics: Vec<String>,
        /// Echoed `requestId`.
        request_id: Option<Value>,
    },
    /// Seed 004: the channel is unsubscribed.
    Unsubscribed {
        /// The channel as the client named it.
        channel: Option<String>,
        /// Echoed `requestId` (always present in this form).
        request_id: Option<Value>,
    },
    /// The answer to `ping`.
    Pong {
        /// Echoed `requestId`.
        request_id: Option<Value>,
    },
    /// Something the client asked for failed; what still works goes on.
    Error {
        /// What failed.
        code: ErrorCode,
        /// For people.
        message: String,
        /// Echoed `requestId`.
        request_id: Option<Value>,
    },
    /// A cursor could not be honoured; what is retained follows.
    ResumeGap {
        /// Expired or unknown.
        reason: GapReason,
        /// The cursor given (at most 64 characters; empty for a foreign one).
        requested: String,
        /// Echoed `requestId`.
        request_id: Option<Value>,
    },
    /// A replay ended.
    ReplayComplete {
        /// Events sent by this replay.
        replayed: usize,
        /// Where to resume from.
        cursor: Cursor,
        /// More events were waiting than one replay sends.
        has_more: bool,
        /// Echoed `requestId`.
        request_id: Option<Value>,
    },
    /// `cursor.update` before any subscription: kept for the next one.
    CursorConfirmed {
        /// The cursor kept.
        cursor: Cursor,
        /// Echoed `requestId`.
        request_id: Option<Value>,
    },
    /// A policy change withdrew patterns.
    SubscriptionRevoked {
        /// The patterns removed.
        topics: Vec<String>,
        /// Why, for people.
        reason: String,
    },
    /// A client publish was stored.
    PublishAck {
        /// The event's id (also its cursor).
        event_id: Cursor,
        /// The topic.
        topic: String,
        /// The idempotency key had been seen: nothing was published again.
        duplicate: bool,
        /// Echoed `requestId`.
        request_id: Option<Value>,
    },
    /// A presence leave was done (or the heartbeat taken).
    PresenceLeft {
        /// The topic.
        topic: String,
        /// Echoed `requestId`.
        request_id: Option<Value>,
    },
    /// `auth.refresh` was accepted.
    AuthRefreshed {
        /// The new expiry (unix seconds).
        expires_at: u64,
        /// Echoed `requestId`.
        request_id: Option<Value>,
    },
    /// The client should reconnect from `cursor`; the connection ends.
    Reconnect {
        /// Why.
        reason: ReconnectReason,
        /// Where to resume without missing or repeating anything.
        cursor: Cursor,
    },
}

impl ServerMessage {
    /// An `error` message.
    pub fn error(code: ErrorCode, message: impl Into<String>, request_id: Option<Value>) -> Self {
        ServerMessage::Error {
            code,
            message: message.into(),
            request_id,
        }
    }

    /// The message's `type`; also the SSE event name.
    pub fn kind(&self) -> &'static str {
        match self {
            ServerMessage::ConnectionEstablished { .. } => "connection.established",
            ServerMessage::SubscriptionConfirmed { .. } => "subscription.confirmed",
            ServerMessage::Subscribed { .. } => "subscribed",
            ServerMessage::UnsubscriptionConfirmed { .. } => "unsubscription.confirmed",
            ServerMessage::Unsubscribed { .. } => "unsubscribed",
            ServerMessage::Pong { .. } => "pong",
            ServerMessage::Error { .. } => "error",
            ServerMessage::ResumeGap { .. } => "resume.gap",
            ServerMessage::ReplayComplete { .. } => "replay.complete",
            ServerMessage::CursorConfirmed { .. } => "cursor.confirmed",
            ServerMessage::SubscriptionRevoked { .. } => "subscription.revoked",
            ServerMessage::AuthRefreshed { .. } => "auth.refreshed",
            ServerMessage::PublishAck { .. } => "publish.ack",
            ServerMessage::PresenceLeft { .. } => "presence.left",
            ServerMessage::Reconnect { .. } => "reconnect",
        }
    }

    /// The SSE event name.
    pub fn sse_name(&self) -> &'static str {
        self.kind()
    }

    fn request_id(&self) -> Option<&Value> {
        match self {
            ServerMessage::SubscriptionConfirmed { request_id, .. }
            | ServerMessage::UnsubscriptionConfirmed { request_id, .. }
            | ServerMessage::Pong { request_id }
            | ServerMessage::Error { request_id, .. }
            | ServerMessage::ResumeGap { request_id, .. }
            | ServerMessage::ReplayComplete { request_id, .. }
            | ServerMessage::CursorConfirmed { request_id, .. }
            | ServerMessage::AuthRefreshed { request_id, .. }
            | ServerMessage::PublishAck { request_id, .. }
            | ServerMessage::PresenceLeft { request_id, .. } => request_id.as_ref(),
            ServerMessage::Subscribed { request_id, .. }
            | ServerMessage::Unsubscribed { request_id, .. } => request_id.as_ref(),
            ServerMessage::ConnectionEstablished { .. }
            | ServerMessage::SubscriptionRevoked { .. }
            | ServerMessage::Reconnect { .. } => None,
        }
    }

    /// The `data` object of seed 001's envelope (what an SSE event carries),
    /// as JSON text.
    pub fn data(&self, now: OffsetDateTime) -> String {
        let ts = format_time(now);
        json_text(&Data {
            message: self,
            ts: &ts,
        })
    }

    /// The WebSocket text frame, as of `now`.
    pub fn frame_at(&self, now: OffsetDateTime) -> String {
        json_text(&Frame { message: self, now })
    }

    /// The WebSocket text frame, now.
    pub fn frame(&self) -> String {
        self.frame_at(OffsetDateTime::now_utc())
    }
}

/// Serialized straight to text: no `Value` tree is built on the way. Every
/// message below has only strings, numbers and `Value`s in it, which always
/// serialize.
fn json_text(value: &impl Serialize) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

/// A value written as a JSON string through its `Display`.
struct AsString<T>(T);

impl<T: Display> Serialize for AsString<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

/// The whole WebSocket frame. Keys are written in the order serde_json's
/// `Map` keeps them (sorted), so the bytes are those of the documented
/// examples and of `tests/golden/protocol.txt`.
struct Frame<'a> {
    message: &'a ServerMessage,
    now: OffsetDateTime,
}

impl Serialize for Frame<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let message = self.message;
        let mut m = s.serialize_map(None)?;
        match message {
            // Seed 004 answers flat: channel, requestId, epoch milliseconds.
            ServerMessage::Subscribed {
                channel,
                request_id,
            }
            | ServerMessage::Unsubscribed {
                channel,
                request_id,
            } => {
                m.serialize_entry("channel", channel)?;
                m.serialize_entry("requestId", request_id)?;
                if matches!(message, ServerMessage::Subscribed { .. }) {
                    let ms = self.now.unix_timestamp_nanos() / 1_000_000;
                    m.serialize_entry("timestamp", &(ms as i64))?;
                }
            }
            _ => {
                let ts = format_time(self.now);
                m.serialize_entry("data", &Data { message, ts: &ts })?;
                if let Some(id) = message.request_id() {
                    m.serialize_entry("requestId", id)?;
                }
            }
        }
        m.serialize_entry("type", message.kind())?;
        m.end()
    }
}

/// The `data` object of seed 001's envelope, keys sorted (see [`Frame`]).
struct Data<'a> {
    message: &'a ServerMessage,
    ts: &'a str,
}

impl Serialize for Data<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let ts = self.ts;
        let mut m = s.serialize_map(None)?;
        match self.message {
            ServerMessage::ConnectionEstablished {
                user_id,
                connection_id,
                region,
                expires_at,
            } => {
                m.serialize_entry("connection_id", &AsString(connection_id))?;
                m.serialize_entry("expires_at", expires_at)?;
                m.serialize_entry("region", region)?;
                m.serialize_entry("server_time", ts)?;
                m.serialize_entry("user_id", user_id)?;
            }
            ServerMessage::SubscriptionConfirmed { topics, cursor, .. } => {
                if let Some(cursor) = cursor {
                    m.serialize_entry("cursor", cursor)?;
                }
                m.serialize_entry("timestamp", ts)?;
                m.serialize_entry("topics", topics)?;
            }
            ServerMessage::UnsubscriptionConfirmed { topics, .. } => {
                m.serialize_entry("timestamp", ts)?;
                m.serialize_entry("topics", topics)?;
            }
            ServerMessage::Subscribed { channel, .. }
            | ServerMessage::Unsubscribed { channel, .. } => {
                m.serialize_entry("channel", channel)?;
            }
            ServerMessage::Pong { .. } => m.serialize_entry("timestamp", ts)?,
            ServerMessage::Error { code, message, .. } => {
                m.serialize_entry("code", code)?;
                m.serialize_entry("message", message)?;
                m.serialize_entry("timestamp", ts)?;
            }
            ServerMessage::ResumeGap {
                reason, requested, ..
            } => {
                m.serialize_entry(
                    "message",
                    "events after this cursor are no longer available; refresh your state",
                )?;
                m.serialize_entry("reason", reason.as_str())?;
                m.serialize_entry("requested", requested)?;
                m.serialize_entry("timestamp", ts)?;
            }
            ServerMessage::ReplayComplete {
                replayed,
                cursor,
                has_more,
                ..
            } => {
                m.serialize_entry("cursor", cursor)?;
                m.serialize_entry("has_more", has_more)?;
                m.serialize_entry("replayed", replayed)?;
                m.serialize_entry("timestamp", ts)?;
            }
            ServerMessage::CursorConfirmed { cursor, .. } => {
                m.serialize_entry("cursor", cursor)?;
                m.serialize_entry("pending", &true)?;
                m.serialize_entry("timestamp", ts)?;
            }
            ServerMessage::SubscriptionRevoked { topics, reason } => {
                m.serialize_entry("reason", reason)?;
                m.serialize_entry("timestamp", ts)?;
                m.serialize_entry("topics", topics)?;
            }
            ServerMessage::PublishAck {
                event_id,
                topic,
                duplicate,
                ..
            } => {
                m.serialize_entry("cursor", event_id)?;
                m.serialize_entry("duplicate", duplicate)?;
                m.serialize_entry("event_id", event_id)?;
                m.serialize_entry("timestamp", ts)?;
                m.serialize_entry("topic", topic)?;
            }
            ServerMessage::PresenceLeft { topic, .. } => {
                m.serialize_entry("timestamp", ts)?;
                m.serialize_entry("topic", topic)?;
            }
            ServerMessage::AuthRefreshed { expires_at, .. } => {
                m.serialize_entry("expires_at", expires_at)?;
                m.serialize_entry("timestamp", ts)?;
            }
            ServerMessage::Reconnect { reason, cursor } => {
                m.serialize_entry("cursor", cursor)?;
                m.serialize_entry("reason", reason.as_str())?;
                m.serialize_entry("timestamp", ts)?;
            }
        }
        m.end()
    }
}
