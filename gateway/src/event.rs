//! Events as stored and delivered, and the cursors that point into history.
//!
//! An event is serialized once, when it is stored: the envelope JSON and the
//! complete WebSocket frame are kept as shared bytes and cloned (a reference
//! count) for every connection it reaches.

use std::fmt;
use std::sync::Arc;

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
}

#[derive(Serialize)]
struct Envelope<'a> {
    event_id: String,
    event_type: &'a str,
    timestamp: String,
    data: &'a Value,
    metadata: Metadata<'a>,
}

#[derive(Serialize)]
struct Metadata<'a> {
    region: &'a str,
    idempotency_key: &'a str,
    gdpr_context: &'a Value,
    cursor: String,
}

impl Event {
    /// Build the stored event and serialize it, once.
    pub fn seal(new: NewEvent, id: Cursor, now: time::OffsetDateTime) -> Self {
        let idempotency_key = new
            .idempotency_key
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let envelope = Envelope {
            event_id: id.to_string(),
            event_type: new.topic.as_str(),
            timestamp: crate::protocol::format_time(now),
            data: &new.data,
            metadata: Metadata {
                region: &new.region,
                idempotency_key: &idempotency_key,
                gdpr_context: new.gdpr_context.as_ref().unwrap_or(&Value::Null),
                cursor: id.to_string(),
            },
        };
        // Serializing a Value and plain strings cannot fail.
        let envelope = serde_json::to_string(&envelope).unwrap_or_default();
        let frame = format!(r#"{{"type":"event","data":{envelope}}}"#);
        Self {
            tenant: new.tenant,
            topic: new.topic,
            id,
            region: new.region,
            traceparent: new.traceparent,
            idempotency_key,
            stored_at_ms: (now.unix_timestamp_nanos() / 1_000_000) as i64,
            envelope: envelope.into(),
            frame: frame.into(),
        }
    }
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
