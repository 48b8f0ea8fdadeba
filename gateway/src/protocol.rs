//! Wire types of the client protocol (seed 001, plus seed 004's `channel`
//! form) and the close codes, as data. `docs/protocol.md` documents them.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A message from a client over WebSocket.
#[derive(Debug, Deserialize)]
#[serde(tag = "type")]
pub enum ClientMessage {
    #[serde(rename = "subscribe")]
    Subscribe(SubscriptionRequest),
    #[serde(rename = "unsubscribe")]
    Unsubscribe(SubscriptionRequest),
    #[serde(rename = "cursor.update")]
    CursorUpdate {
        cursor: Option<String>,
        #[serde(default, rename = "requestId")]
        request_id: Option<Value>,
    },
    #[serde(rename = "ping")]
    Ping {
        #[serde(default, rename = "requestId")]
        request_id: Option<Value>,
    },
    #[serde(rename = "auth.refresh")]
    AuthRefresh {
        token: String,
        #[serde(default, rename = "requestId")]
        request_id: Option<Value>,
    },
}

/// `subscribe`/`unsubscribe`: seed 001 sends `topics`, seed 004 sends one
/// `channel` and a `requestId` to echo.
#[derive(Debug, Deserialize)]
pub struct SubscriptionRequest {
    #[serde(default)]
    pub topics: Option<Vec<String>>,
    #[serde(default)]
    pub channel: Option<String>,
    #[serde(default, rename = "requestId")]
    pub request_id: Option<Value>,
    /// Extension: resume these subscriptions from a cursor.
    #[serde(default)]
    pub cursor: Option<String>,
}

impl SubscriptionRequest {
    /// True for seed 004's form, which is answered in that form.
    pub fn is_channel_form(&self) -> bool {
        self.topics.is_none() && self.channel.is_some()
    }

    pub fn patterns(&self) -> Vec<String> {
        match (&self.topics, &self.channel) {
            (Some(t), Some(c)) => t.iter().cloned().chain([c.clone()]).collect(),
            (Some(t), None) => t.clone(),
            (None, Some(c)) => vec![c.clone()],
            (None, None) => Vec::new(),
        }
    }
}

/// Just enough of a message to answer one that failed to parse.
#[derive(Debug, Deserialize)]
pub struct MessageProbe {
    #[serde(rename = "type")]
    pub kind: Option<Value>,
    #[serde(default, rename = "requestId")]
    pub request_id: Option<Value>,
}

/// Machine-readable error codes carried in `error` messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    MalformedMessage,
    UnknownMessageType,
    BinaryNotSupported,
    InvalidTopic,
    TopicNotAllowed,
    TooManySubscriptions,
    MessageTooLarge,
    AuthRefreshFailed,
    TokenExpired,
    ResumeGap,
    BusUnavailable,
    SubscriptionRevoked,
}

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
    /// The gateway is draining (deploy, scale-in): reconnect with your cursor. 1012.
    ServiceRestart,
}

impl Close {
    pub const ALL: [Close; 8] = [
        Close::Unauthorized,
        Close::Forbidden,
        Close::IdleTimeout,
        Close::SlowConsumer,
        Close::RateLimited,
        Close::TooManyConnections,
        Close::MessageTooBig,
        Close::ServiceRestart,
    ];

    pub fn code(self) -> u16 {
        match self {
            Close::Unauthorized => 4001,
            Close::IdleTimeout => 4002,
            Close::Forbidden => 4003,
            Close::SlowConsumer => 4008,
            Close::RateLimited => 4029,
            Close::TooManyConnections => 4030,
            Close::MessageTooBig => 1009,
            Close::ServiceRestart => 1012,
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            Close::Unauthorized => "unauthorized",
            Close::IdleTimeout => "idle timeout",
            Close::Forbidden => "forbidden",
            Close::SlowConsumer => "slow consumer",
            Close::RateLimited => "rate limit exceeded",
            Close::TooManyConnections => "too many connections",
            Close::MessageTooBig => "message too big",
            Close::ServiceRestart => "draining, reconnect",
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
            Close::ServiceRestart => "draining",
        }
    }
}

/// The current time as RFC 3339 with a `Z` suffix, as the seeds print it.
pub fn now_rfc3339() -> String {
    format_time(time::OffsetDateTime::now_utc())
}

pub fn format_time(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

/// A server → client message other than `event` (events are pre-serialized
/// once per fan-out, see `event.rs`).
pub fn server_message(kind: &str, data: Value, request_id: Option<&Value>) -> String {
    let mut msg = serde_json::json!({ "type": kind, "data": data });
    if let (Some(id), Some(obj)) = (request_id, msg.as_object_mut()) {
        obj.insert("requestId".into(), id.clone());
    }
    msg.to_string()
}

pub fn error_message(code: ErrorCode, message: &str, request_id: Option<&Value>) -> String {
    server_message(
        "error",
        serde_json::json!({ "message": message, "code": code, "timestamp": now_rfc3339() }),
        request_id,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_seed_forms() {
        let m: ClientMessage =
            serde_json::from_str(r#"{"type":"subscribe","topics":["deal.stage.*"]}"#).unwrap();
        let ClientMessage::Subscribe(r) = m else {
            panic!()
        };
        assert_eq!(r.patterns(), vec!["deal.stage.*"]);
        assert!(!r.is_channel_form());
        let m: ClientMessage = serde_json::from_str(
            r#"{"type":"subscribe","channel":"entity:Task","requestId":"req_1","timestamp":1}"#,
        )
        .unwrap();
        let ClientMessage::Subscribe(r) = m else {
            panic!()
        };
        assert!(r.is_channel_form());
        assert_eq!(r.request_id, Some(Value::from("req_1")));
        assert!(serde_json::from_str::<ClientMessage>(r#"{"type":"nope"}"#).is_err());
    }

    #[test]
    fn close_codes_are_distinct() {
        let mut codes: Vec<u16> = Close::ALL.iter().map(|c| c.code()).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), Close::ALL.len());
        assert_eq!(Close::Unauthorized.code(), 4001);
    }
}
