//! Events as stored and delivered, and the cursors that point into history.
//!
//! An event is serialized once, when it is stored: the envelope JSON and the
//! complete WebSocket frame are kept as shared bytes and cloned (a reference
//! count) for every connection it reaches.

use std::fmt;
use std::sync::{Arc, OnceLock};

use axum::extract::ws::Utf8Bytes;
use serde::Serialize;
use serde_json::Value;
use switchboard_config::Topic;

/// A position in one tenant's history. It is also the event id: the id of an
/// event is the cursor that resumes right after it. Printed as
/// `<epoch>-<seq>` (URL-safe). The epoch names one incarnation of the
/// history; a cursor from another epoch is unknown, not silently reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cursor {
    /// The history's incarnation (0 only for foreign cursors).
    pub epoch: u64,
    /// The position in that history.
    pub seq: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cursor {0:?} is not a Switchboard cursor (expected <epoch>-<seq>)")]
/// A string that is not a cursor.
pub struct BadCursor(pub String);

impl Cursor {
    /// Stands for a cursor that is not ours at all (e.g. an id from the
    /// system Switchboard replaced). Epoch 0 is never issued, so every
    /// history answers it as an unknown cursor: a resume gap, then what is
    /// retained.
    pub const FOREIGN: Cursor = Cursor { epoch: 0, seq: 0 };

    /// Parse a client's cursor; anything unparseable is [`Cursor::FOREIGN`].
    pub fn parse_lenient(s: &str) -> Self {
        Self::parse(s).unwrap_or(Self::FOREIGN)
    }

    /// Parse `<epoch>-<seq>`.
    pub fn parse(s: &str) -> Result<Self, BadCursor> {
        let bad = || BadCursor(s.chars().take(64).collect());
        let (epoch, seq) = s.split_once('-').ok_or_else(bad)?;
        if epoch.is_empty() || epoch.len() > 16 || seq.is_empty() || seq.len() > 20 {
            return Err(bad());
        }
        Ok(Self {
            epoch: u64::from_str_radix(epoch, 16).map_err(|_| bad())?,
            seq: seq.parse().map_err(|_| bad())?,
        })
    }
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}-{}", self.epoch, self.seq)
    }
}

impl Serialize for Cursor {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// What a publisher asks to publish.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// The tenant it belongs to.
    pub tenant: Arc<str>,
    /// Its topic.
    pub topic: Topic,
    /// The payload.
    pub data: Value,
    /// The region it is published in.
    pub region: Arc<str>,
    /// Deduplication key (one is generated when absent).
    pub idempotency_key: Option<String>,
    /// Data-protection context, delivered as given.
    pub gdpr_context: Option<Value>,
    /// W3C trace context of the publish, carried to every fan-out.
    pub traceparent: Option<String>,
    /// Seed 004's message type (`entity:created`); `event` when absent.
    pub message_type: Option<String>,
    /// The user who published it from a client connection, stamped by the
    /// gateway (never taken from the client's body); `None` for backends.
    pub publisher: Option<String>,
    /// The tenant is pinned to regions (policy `residency`): the event must
    /// not be copied to other regions.
    pub resident: bool,
}

impl NewEvent {
    /// An event of `tenant` on `topic` with `data`, every optional field unset.
    pub fn new(tenant: Arc<str>, topic: Topic, data: Value, region: Arc<str>) -> Self {
        Self {
            tenant,
            topic,
            data,
            region,
            idempotency_key: None,
            gdpr_context: None,
            traceparent: None,
            message_type: None,
            publisher: None,
            resident: false,
        }
    }
}

/// What kind of message an [`Event`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// Published and stored in history: it has a cursor and can be replayed.
    Stored,
    /// A notice (presence join, leave, sync; `data.erased`): delivered
    /// live to the subscribers of its topic, never stored, without a cursor.
    Presence,
}

/// Where an event was first stored, the same in every region's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The region whose stream it was published into.
    pub region: Box<str>,
    /// Its sequence in that stream.
    pub seq: u64,
}

/// A stored event, ready to deliver.
#[derive(Debug)]
pub struct Event {
    /// The tenant it belongs to.
    pub tenant: Arc<str>,
    /// Its topic.
    pub topic: Topic,
    /// Its id, which is also the cursor that resumes after it.
    pub id: Cursor,
    /// Stored, or a presence notice.
    pub kind: EventKind,
    /// The region it was published in.
    pub region: Arc<str>,
    /// Its deduplication key.
    pub idempotency_key: String,
    /// Unix time in milliseconds when it was stored.
    pub stored_at_ms: i64,
    /// The envelope (`event_id`, `event_type`, `timestamp`, `data`, `metadata`).
    pub envelope: Utf8Bytes,
    /// The WebSocket frame `{"type":"event","data":<envelope>}`.
    pub frame: Utf8Bytes,
    /// W3C trace context of the publish.
    pub traceparent: Option<String>,
    /// The user whose private channel (`user:<id>`) carries it: only that
    /// user's connections may receive it, whatever pattern they hold.
    pub private_to: Option<Box<str>>,
    /// Seed 004's message type, when the publisher named one.
    pub message_type: Option<Box<str>>,
    /// The user who published it from a client connection.
    pub publisher: Option<Box<str>>,
    /// `gdpr_context.data_subject_id`: whose personal data it carries
    /// (what an erasure matches).
    pub data_subject: Option<Box<str>>,
    /// Its identity across regions (cluster mode): the region whose stream
    /// it was published into and its sequence there. `None` in embedded
    /// mode, where there is one history.
    pub origin: Option<Box<Origin>>,
    /// Where `data` sits in `envelope` (to build the channel form from).
    data_at: (u32, u32),
    /// Seed 004's frame, built the first time a connection needs it.
    channel_frame: OnceLock<Utf8Bytes>,
    /// The Socket.IO EVENT packet, built the first time a Socket.IO
    /// connection needs it.
    socketio_packet: OnceLock<Utf8Bytes>,
}

#[derive(Serialize)]
struct Metadata<'a> {
    region: &'a str,
    idempotency_key: &'a str,
    gdpr_context: &'a Value,
    cursor: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    message_type: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    publisher: Option<&'a str>,
}

/// JSON text of a string (cannot fail).
fn json_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

impl Event {
    /// Build the stored event and serialize it, once.
    pub fn seal(new: NewEvent, id: Cursor, now: time::OffsetDateTime) -> Self {
        let idempotency_key = new
            .idempotency_key
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let metadata = Metadata {
            region: &new.region,
            idempotency_key: &idempotency_key,
            gdpr_context: new.gdpr_context.as_ref().unwrap_or(&Value::Null),
            cursor: id.to_string(),
            message_type: new.message_type.as_deref(),
            publisher: new.publisher.as_deref(),
        };
        // Serializing a Value and plain strings cannot fail. The envelope
        // is written by hand around `data` so the channel form can reuse
        // its bytes.
        let data = serde_json::to_string(&new.data).unwrap_or_default();
        let head = format!(
            r#"{{"event_id":"{id}","event_type":{},"timestamp":"{}","data":"#,
            json_str(new.topic.as_str()),
            crate::protocol::format_time(now),
        );
        let data_at = (head.len() as u32, (head.len() + data.len()) as u32);
        let envelope = format!(
            r#"{head}{data},"metadata":{}}}"#,
            serde_json::to_string(&metadata).unwrap_or_default()
        );
        let frame = format!(r#"{{"type":"event","data":{envelope}}}"#);
        Self {
            data_subject: crate::data_protection::GdprContext::subject_of(
                new.gdpr_context.as_ref(),
            )
            .map(Into::into),
            private_to: private_owner(&new.topic).map(Into::into),
            tenant: new.tenant,
            topic: new.topic,
            id,
            kind: EventKind::Stored,
            region: new.region,
            traceparent: new.traceparent,
            idempotency_key,
            stored_at_ms: (now.unix_timestamp_nanos() / 1_000_000) as i64,
            envelope: envelope.into(),
            frame: frame.into(),
            message_type: new.message_type.map(Into::into),
            publisher: new.publisher.map(Into::into),
            data_at,
            origin: None,
            channel_frame: OnceLock::new(),
            socketio_packet: OnceLock::new(),
        }
    }

    /// A presence notice on `topic`: `native` is its seed 001 frame type
    /// (`presence.join`), `channel` its seed 004 one (`presence:join`).
    pub fn notice(
        tenant: Arc<str>,
        topic: Topic,
        region: Arc<str>,
        types: (&str, &str),
        payload: &Value,
        now: time::OffsetDateTime,
    ) -> Self {
        let payload = serde_json::to_string(payload).unwrap_or_default();
        let ms = (now.unix_timestamp_nanos() / 1_000_000) as i64;
        let head = format!(
            r#"{{"topic":{},"timestamp":"{}","data":"#,
            json_str(topic.as_str()),
            crate::protocol::format_time(now),
        );
        let data_at = (head.len() as u32, (head.len() + payload.len()) as u32);
        let envelope = format!("{head}{payload}}}");
        let frame = format!(r#"{{"type":"{}","data":{envelope}}}"#, types.0);
        let channel = format!(
            r#"{{"type":"{}","channel":{},"payload":{payload},"timestamp":{ms}}}"#,
            types.1,
            json_str(topic.as_str()),
        );
        Self {
            // A notice on a user's private channel is that user's alone.
            private_to: private_owner(&topic).map(Into::into),
            data_subject: None,
            tenant,
            topic,
            id: Cursor::FOREIGN,
            kind: EventKind::Presence,
            region,
            traceparent: None,
            idempotency_key: String::new(),
            stored_at_ms: ms,
            envelope: envelope.into(),
            frame: frame.into(),
            message_type: Some(types.0.into()),
            publisher: None,
            data_at,
            origin: None,
            channel_frame: OnceLock::from(Utf8Bytes::from(channel)),
            socketio_packet: OnceLock::new(),
        }
    }

    /// The data as JSON text.
    pub fn data_json(&self) -> &str {
        self.envelope
            .as_str()
            .get(self.data_at.0 as usize..self.data_at.1 as usize)
            .unwrap_or("null")
    }

    /// Seed 004's frame: `{"type": <message type>, "channel": <topic>,
    /// "payload": <data>, "timestamp": <ms>, "cursor": <id>}` (and
    /// `sender`, the publishing user, for client publishes). Built once per
    /// event, the first time a connection subscribed in that form needs it.
    pub fn channel_frame(&self) -> Utf8Bytes {
        self.channel_frame
            .get_or_init(|| {
                let sender = self
                    .publisher
                    .as_deref()
                    .map(|p| format!(r#","sender":{}"#, json_str(p)))
                    .unwrap_or_default();
                format!(
                    r#"{{"type":{},"channel":{},"payload":{},"timestamp":{},"cursor":"{}"{sender}}}"#,
                    json_str(self.message_type.as_deref().unwrap_or("event")),
                    json_str(self.topic.as_str()),
                    self.data_json(),
                    self.stored_at_ms,
                    self.id,
                )
                .into()
            })
            .clone()
    }
}

impl Event {
    /// The Engine.IO message carrying this event's Socket.IO EVENT packet
    /// (main namespace), `42[...]`, built once per event and shared by every
    /// connection: a stored event is seed 002's `message` with its cursor
    /// as the last argument (the offset `socket.io-client` hands back when
    /// it recovers); a presence notice is `presence_update`.
    pub fn socketio_packet(&self) -> Utf8Bytes {
        self.socketio_packet.get_or_init(|| {
            let ms = self.stored_at_ms;
            let topic = json_str(self.topic.as_str());
            let text = match self.kind {
                EventKind::Stored => {
                    let place = match &self.private_to {
                        Some(user) => format!(r#""recipientId":{}"#, json_str(user)),
                        None => format!(r#""roomId":{topic}"#),
                    };
                    let sender = self
                        .publisher
                        .as_deref()
                        .map(|p| format!(r#","senderId":{}"#, json_str(p)))
                        .unwrap_or_default();
                    format!(
                        r#"42["message",{{"id":"{id}","type":{},"topic":{topic},{place}{sender},"payload":{},"timestamp":{ms},"region":{}}},"{id}"]"#,
                        json_str(self.message_type.as_deref().unwrap_or(self.topic.as_str())),
                        self.data_json(),
                        json_str(&self.region),
                        id = self.id,
                    )
                }
                EventKind::Presence if self.message_type.as_deref() == Some(ERASED_NOTICE.0) => {
                    format!(
                        r#"42["data_erased",{{"roomId":{topic},"eventIds":{},"timestamp":{ms}}}]"#,
                        self.envelope_field("event_ids"),
                    )
                }
                EventKind::Presence => {
                    let kind = self
                        .message_type
                        .as_deref()
                        .and_then(|t| t.strip_prefix("presence."))
                        .unwrap_or("sync");
                    format!(
                        r#"42["presence_update",{{"roomId":{topic},"event":{},"presence":{},"timestamp":{ms}}}]"#,
                        json_str(kind),
                        self.data_json(),
                    )
                }
            };
            text.into()
        })
        .clone()
    }
}

/// The message types of the notice sent when events were erased: native
/// (`data.erased`) and seed 004 (`data:erased`).
pub const ERASED_NOTICE: (&str, &str) = ("data.erased", "data:erased");

impl Event {
    /// A field of a notice's data object, as JSON text (`null` if absent).
    fn envelope_field(&self, field: &str) -> String {
        serde_json::from_str::<Value>(self.data_json())
            .ok()
            .and_then(|v| v.get(field).cloned())
            .map_or_else(|| "null".into(), |v| v.to_string())
    }
}

/// The prefix of a user's private channel (seed 004's `user:{user_id}`).
pub const USER_CHANNEL_PREFIX: &str = "user:";

/// The user whose private channel `topic` is: its first token is
/// `user:<id>` (`user:alice`, `user:alice.notifications`).
pub fn private_owner(topic: &Topic) -> Option<&str> {
    topic
        .tokens()
        .next()
        .and_then(|t| t.strip_prefix(USER_CHANNEL_PREFIX))
        .filter(|id| !id.is_empty())
}

/// A sealed event with no payload, for unit tests of the modules that
/// route and queue events.
#[cfg(test)]
pub(crate) fn test_event(tenant: &str, topic: &str, seq: u64) -> Arc<Event> {
    Arc::new(Event::seal(
        NewEvent {
            tenant: tenant.into(),
            topic: Topic::parse(topic).expect("valid test topic"),
            data: Value::Null,
            region: "r".into(),
            idempotency_key: None,
            gdpr_context: None,
            traceparent: None,
            message_type: None,
            publisher: None,
            resident: false,
        },
        Cursor { epoch: 1, seq },
        time::OffsetDateTime::now_utc(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_round_trip_and_rejects() {
        let c = Cursor {
            epoch: 0xdead_beef,
            seq: 42,
        };
        assert_eq!(c.to_string(), "deadbeef-42");
        assert_eq!(Cursor::parse("deadbeef-42"), Ok(c));
        for bad in [
            "",
            "-",
            "x-1",
            "1-",
            "1-x",
            "1-2-3",
            "uuid",
            "1-99999999999999999999999",
        ] {
            assert!(Cursor::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn envelope_has_seed_fields() {
        let e = Event::seal(
            NewEvent {
                tenant: "t".into(),
                topic: Topic::parse("deal.stage.updated").unwrap(),
                data: serde_json::json!({"deal_id": 1}),
                region: "eu".into(),
                idempotency_key: Some("k".into()),
                gdpr_context: Some(serde_json::json!({"consent": true})),
                traceparent: None,
                message_type: None,
                publisher: None,
                resident: false,
            },
            Cursor { epoch: 1, seq: 7 },
            time::OffsetDateTime::UNIX_EPOCH,
        );
        let frame: Value = serde_json::from_str(&e.frame).unwrap();
        assert_eq!(frame["type"], "event");
        let d = &frame["data"];
        assert_eq!(d["event_id"], "1-7");
        assert_eq!(d["event_type"], "deal.stage.updated");
        assert_eq!(d["timestamp"], "1970-01-01T00:00:00Z");
        assert_eq!(d["data"]["deal_id"], 1);
        assert_eq!(d["metadata"]["region"], "eu");
        assert_eq!(d["metadata"]["idempotency_key"], "k");
        assert_eq!(d["metadata"]["gdpr_context"]["consent"], true);
    }
}
