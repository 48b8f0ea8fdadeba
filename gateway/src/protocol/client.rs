//! What clients send over WebSocket: seed 001's messages, seed 004's
//! `channel` form, and the extensions.

use serde::Deserialize;
use serde_json::Value;

/// A message from a client over WebSocket.
#[derive(Debug, Deserialize)]
#[serde(tag = "type")]
pub enum ClientMessage {
    #[serde(rename = "subscribe")]
    /// Subscribe to patterns (optionally from a cursor).
    Subscribe(SubscriptionRequest),
    #[serde(rename = "unsubscribe")]
    /// Drop subscriptions.
    Unsubscribe(SubscriptionRequest),
    #[serde(rename = "cursor.update")]
    /// Resume from a cursor (seed 001).
    CursorUpdate {
        /// The last event id the client processed.
        cursor: Option<String>,
        #[serde(default, rename = "requestId")]
        /// Echoed on the answer.
        request_id: Option<Value>,
    },
    #[serde(rename = "ping")]
    /// Application-level ping.
    Ping {
        #[serde(default, rename = "requestId")]
        /// Echoed on the answer.
        request_id: Option<Value>,
    },
    #[serde(rename = "publish")]
    /// Publish from the client, acknowledged with `publish.ack`.
    Publish(PublishFrame),
    #[serde(rename = "presence.join", alias = "presence:join")]
    /// Join a presence topic as a member (and subscribe to it).
    PresenceJoin(PresenceFrame),
    #[serde(rename = "presence.leave", alias = "presence:leave")]
    /// Leave a presence topic.
    PresenceLeave(PresenceFrame),
    #[serde(rename = "presence.heartbeat", alias = "presence:heartbeat")]
    /// Refresh the member's `lastSeen`.
    PresenceHeartbeat(PresenceFrame),
    #[serde(rename = "auth.refresh")]
    /// Replace the token before it expires.
    AuthRefresh {
        /// The new JWT (same tenant and user).
        token: String,
        #[serde(default, rename = "requestId")]
        /// Echoed on the answer.
        request_id: Option<Value>,
    },
}

impl ClientMessage {
    /// Every `type` a client may send.
    pub const TYPES: [&'static str; 12] = [
        "subscribe",
        "unsubscribe",
        "cursor.update",
        "ping",
        "auth.refresh",
        "publish",
        "presence.join",
        "presence:join",
        "presence.leave",
        "presence:leave",
        "presence.heartbeat",
        "presence:heartbeat",
    ];
}

/// `publish`: seed 001 style names `topic` and `data`, seed 004 style
/// `channel` and `payload`.
#[derive(Debug, Deserialize)]
pub struct PublishFrame {
    #[serde(default)]
    /// Seed 001 style: the topic.
    pub topic: Option<String>,
    #[serde(default)]
    /// Seed 004 style: the channel.
    pub channel: Option<String>,
    #[serde(default)]
    /// Seed 001 style: the payload.
    pub data: Option<Value>,
    #[serde(default)]
    /// Seed 004 style: the payload.
    pub payload: Option<Value>,
    #[serde(default, rename = "messageType")]
    /// Seed 004's message type for channel-form receivers.
    pub message_type: Option<String>,
    #[serde(default, rename = "idempotencyKey")]
    /// A repeated key within the dedup window publishes nothing again.
    pub idempotency_key: Option<String>,
    #[serde(default, rename = "requestId")]
    /// Echoed on the acknowledgement.
    pub request_id: Option<Value>,
}

impl PublishFrame {
    /// True for seed 004's form, which is answered in that form.
    pub fn is_channel_form(&self) -> bool {
        self.topic.is_none() && self.channel.is_some()
    }
}

/// `presence.join` / `presence:join` (and leave, heartbeat): the topic as
/// `topic` or `channel`, the member's info as `info` or `payload`.
#[derive(Debug, Deserialize)]
pub struct PresenceFrame {
    #[serde(default)]
    /// Seed 001 style: the topic.
    pub topic: Option<String>,
    #[serde(default)]
    /// Seed 004 style: the channel.
    pub channel: Option<String>,
    #[serde(default)]
    /// What the member says about itself (e.g. `{"name": "Alice"}`).
    pub info: Option<Value>,
    #[serde(default)]
    /// Seed 004 style info.
    pub payload: Option<Value>,
    #[serde(default, rename = "requestId")]
    /// Echoed on the answer.
    pub request_id: Option<Value>,
}

impl PresenceFrame {
    /// True for seed 004's form.
    pub fn is_channel_form(&self) -> bool {
        self.topic.is_none() && self.channel.is_some()
    }

    /// The topic named, either way.
    pub fn topic(&self) -> Option<&str> {
        self.topic.as_deref().or(self.channel.as_deref())
    }
}

/// `subscribe`/`unsubscribe`: seed 001 sends `topics`, seed 004 sends one
/// `channel` and a `requestId` to echo.
#[derive(Debug, Deserialize)]
pub struct SubscriptionRequest {
    #[serde(default)]
    /// Seed 001: the patterns.
    pub topics: Option<Vec<String>>,
    #[serde(default)]
    /// Seed 004: one pattern.
    pub channel: Option<String>,
    #[serde(default, rename = "requestId")]
    /// Echoed on the answer.
    pub request_id: Option<Value>,
    /// Extension: resume these subscriptions from a cursor.
    #[serde(default)]
    pub cursor: Option<String>,
    /// Extension: send the newest retained event of each matching topic
    /// first (the last value), when no cursor is given.
    #[serde(default)]
    pub snapshot: bool,
}

impl SubscriptionRequest {
    /// True for seed 004's form, which is answered in that form.
    pub fn is_channel_form(&self) -> bool {
        self.topics.is_none() && self.channel.is_some()
    }

    /// Every pattern named, in order.
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
    /// The message's `type`, if any.
    pub kind: Option<Value>,
    #[serde(default, rename = "requestId")]
    /// Its `requestId`, to echo on the error.
    pub request_id: Option<Value>,
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
}
