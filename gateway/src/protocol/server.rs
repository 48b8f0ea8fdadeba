//! What the gateway sends besides events, as one type. A transport encodes
//! a message with [`ServerMessage::frame`] (a WebSocket text frame) or
//! [`ServerMessage::sse_name`] and [`ServerMessage::data`] (an SSE named
//! event); the shape of each message lives here only.

use serde_json::{Map, Value, json};
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

    /// The `data` object of seed 001's envelope (what an SSE event carries).
    pub fn data(&self, now: OffsetDateTime) -> Value {
        let ts = format_time(now);
        match self {
            ServerMessage::ConnectionEstablished {
                user_id,
                connection_id,
                region,
                expires_at,
            } => json!({
                "user_id": user_id,
                "connection_id": connection_id.to_string(),
                "server_time": ts,
                "region": region,
                "expires_at": expires_at,
            }),
            ServerMessage::SubscriptionConfirmed {
                topics,
                cursor: Some(cursor),
                ..
            } => json!({ "topics": topics, "cursor": cursor.to_string(), "timestamp": ts }),
            ServerMessage::SubscriptionConfirmed { topics, .. }
            | ServerMessage::UnsubscriptionConfirmed { topics, .. } => {
                json!({ "topics": topics, "timestamp": ts })
            }
            ServerMessage::Subscribed { channel, .. }
            | ServerMessage::Unsubscribed { channel, .. } => json!({ "channel": channel }),
            ServerMessage::Pong { .. } => json!({ "timestamp": ts }),
            ServerMessage::Error { code, message, .. } => {
                json!({ "message": message, "code": code, "timestamp": ts })
            }
            ServerMessage::ResumeGap {
                reason, requested, ..
            } => json!({
                "reason": reason.as_str(),
                "requested": requested,
                "message": "events after this cursor are no longer available; refresh your state",
                "timestamp": ts,
            }),
            ServerMessage::ReplayComplete {
                replayed,
                cursor,
                has_more,
                ..
            } => json!({
                "replayed": replayed,
                "cursor": cursor.to_string(),
                "has_more": has_more,
                "timestamp": ts,
            }),
            ServerMessage::CursorConfirmed { cursor, .. } => json!({
                "cursor": cursor.to_string(),
                "pending": true,
                "timestamp": ts,
            }),
            ServerMessage::SubscriptionRevoked { topics, reason } => json!({
                "topics": topics,
                "reason": reason,
                "timestamp": ts,
            }),
            ServerMessage::PublishAck {
                event_id,
                topic,
                duplicate,
                ..
            } => json!({
                "event_id": event_id.to_string(),
                "cursor": event_id.to_string(),
                "topic": topic,
                "duplicate": duplicate,
                "timestamp": ts,
            }),
            ServerMessage::PresenceLeft { topic, .. } => json!({ "topic": topic, "timestamp": ts }),
            ServerMessage::AuthRefreshed { expires_at, .. } => {
                json!({ "expires_at": expires_at, "timestamp": ts })
            }
            ServerMessage::Reconnect { reason, cursor } => json!({
                "reason": reason.as_str(),
                "cursor": cursor.to_string(),
                "timestamp": ts,
            }),
        }
    }

    /// The WebSocket text frame, as of `now`.
    pub fn frame_at(&self, now: OffsetDateTime) -> String {
        let mut msg = Map::new();
        msg.insert("type".into(), self.kind().into());
        match self {
            // Seed 004 answers flat: channel, requestId, epoch milliseconds.
            ServerMessage::Subscribed {
                channel,
                request_id,
            }
            | ServerMessage::Unsubscribed {
                channel,
                request_id,
            } => {
                msg.insert("channel".into(), json!(channel));
                msg.insert(
                    "requestId".into(),
                    request_id.clone().unwrap_or(Value::Null),
                );
                if matches!(self, ServerMessage::Subscribed { .. }) {
                    let ms = now.unix_timestamp_nanos() / 1_000_000;
                    msg.insert("timestamp".into(), json!(ms as i64));
                }
            }
            _ => {
                msg.insert("data".into(), self.data(now));
                if let Some(id) = self.request_id() {
                    msg.insert("requestId".into(), id.clone());
                }
            }
        }
        Value::Object(msg).to_string()
    }

    /// The WebSocket text frame, now.
    pub fn frame(&self) -> String {
        self.frame_at(OffsetDateTime::now_utc())
    }
}
