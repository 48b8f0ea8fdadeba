//! The exact JSON of every server message, pinned: seed 001 and seed 004
//! clients parse these, so a change here breaks them silently unless this
//! test is updated on purpose (`UPDATE_GOLDEN=1` rewrites
//! `tests/golden/protocol.txt`; review the diff as a wire-format change).

use std::sync::Arc;

use serde_json::json;
use switchboard_config::Topic;
use switchboard_gateway::broker::GapReason;
use switchboard_gateway::event::{Cursor, Event, NewEvent};
use switchboard_gateway::protocol::{ErrorCode, ReconnectReason, ServerMessage};

fn at() -> time::OffsetDateTime {
    time::macros::datetime!(2026-11-22 07:00:00.123 UTC)
}

fn messages() -> Vec<(&'static str, ServerMessage)> {
    let cursor = Cursor {
        epoch: 0x5f3a9c1e,
        seq: 43,
    };
    let rid = Some(json!("req_123"));
    vec![
        (
            "connection.established",
            ServerMessage::ConnectionEstablished {
                user_id: "123".into(),
                connection_id: 17,
                region: "eu".into(),
                expires_at: 1_795_000_000,
            },
        ),
        (
            "subscription.confirmed",
            ServerMessage::SubscriptionConfirmed {
                topics: vec!["deal.stage.*".into()],
                cursor: None,
                request_id: None,
            },
        ),
        (
            "subscription.confirmed with requestId",
            ServerMessage::SubscriptionConfirmed {
                topics: vec!["deal.stage.*".into(), "contact.*".into()],
                cursor: Some(cursor),
                request_id: Some(json!(7)),
            },
        ),
        (
            "subscribed (seed 004)",
            ServerMessage::Subscribed {
                channel: Some("entity:Task".into()),
                request_id: rid.clone(),
            },
        ),
        (
            "unsubscription.confirmed",
            ServerMessage::UnsubscriptionConfirmed {
                topics: vec!["deal.stage.*".into()],
                request_id: None,
            },
        ),
        (
            "unsubscribed (seed 004)",
            ServerMessage::Unsubscribed {
                channel: Some("entity:Task".into()),
                request_id: None,
            },
        ),
        (
            "pong",
            ServerMessage::Pong {
                request_id: rid.clone(),
            },
        ),
        (
            "error",
            ServerMessage::error(
                ErrorCode::InvalidTopic,
                "invalid topic \"deal..x\": topic has an empty token",
                None,
            ),
        ),
        (
            "error with requestId",
            ServerMessage::error(
                ErrorCode::BusUnavailable,
                "the event bus is unavailable",
                Some(json!(7)),
            ),
        ),
        (
            "resume.gap",
            ServerMessage::ResumeGap {
                reason: GapReason::Expired,
                requested: "5f3a9c1e-2".into(),
                request_id: None,
            },
        ),
        (
            "replay.complete",
            ServerMessage::ReplayComplete {
                replayed: 2,
                cursor,
                has_more: false,
                request_id: None,
            },
        ),
        (
            "cursor.confirmed",
            ServerMessage::CursorConfirmed {
                cursor,
                request_id: None,
            },
        ),
        (
            "subscription.revoked",
            ServerMessage::SubscriptionRevoked {
                topics: vec!["contact.*".into()],
                reason: "pattern \"contact.*\" is not allowed for tenant \"acme\"".into(),
            },
        ),
        (
            "auth.refreshed",
            ServerMessage::AuthRefreshed {
                expires_at: 1_795_003_600,
                request_id: None,
            },
        ),
        (
            "publish.ack",
            ServerMessage::PublishAck {
                event_id: cursor,
                topic: "chat.room1".into(),
                duplicate: false,
                request_id: Some(json!(9)),
            },
        ),
        (
            "presence.left",
            ServerMessage::PresenceLeft {
                topic: "presence:doc-1".into(),
                request_id: None,
            },
        ),
        (
            "reconnect (draining)",
            ServerMessage::Reconnect {
                reason: ReconnectReason::Draining,
                cursor,
            },
        ),
        (
            "reconnect (slow consumer)",
            ServerMessage::Reconnect {
                reason: ReconnectReason::SlowConsumer,
                cursor,
            },
        ),
    ]
}

fn render() -> String {
    let mut out = String::new();
    for (name, m) in messages() {
        out.push_str(&format!("# {name}\nws:  {}\n", m.frame_at(at())));
        out.push_str(&format!(
            "sse: event: {}\n     data: {}\n\n",
            m.sse_name(),
            m.data(at())
        ));
    }
    let event = Event::seal(
        NewEvent {
            tenant: Arc::from("acme"),
            topic: Topic::parse("deal.stage.updated").unwrap(),
            data: json!({"deal_id": 456, "new_stage": "qualification"}),
            region: Arc::from("us-east-1"),
            idempotency_key: Some("deal-456-stage-1".into()),
            gdpr_context: Some(json!({"consent": true, "retention_days": 365})),
            traceparent: None,
            message_type: None,
            publisher: None,
            resident: false,
        },
        Cursor {
            epoch: 0x5f3a9c1e,
            seq: 43,
        },
        at(),
    );
    out.push_str(&format!(
        "# event\nws:  {}\nsse: id: {}\n     data: {}\n",
        event.frame, event.id, event.envelope
    ));
    let typed = Event::seal(
        NewEvent {
            message_type: Some("entity:created".into()),
            publisher: Some("alice".into()),
            idempotency_key: Some("m-1".into()),
            ..NewEvent::new(
                Arc::from("acme"),
                Topic::parse("entity:Task:123").unwrap(),
                json!({"title": "New task"}),
                Arc::from("eu"),
            )
        },
        Cursor {
            epoch: 0x5f3a9c1e,
            seq: 44,
        },
        at(),
    );
    out.push_str(&format!(
        "\n# event with a message type, from a client (seed 001 form, then seed 004's)\nws:  {}\nws:  {}\n",
        typed.frame,
        typed.channel_frame()
    ));
    let notice = Event::notice(
        Arc::from("acme"),
        Topic::parse("presence:doc-1").unwrap(),
        Arc::from("eu"),
        ("presence.sync", "presence:sync"),
        &json!({"users": [{"id": "alice", "name": "Alice", "connections": 1, "lastSeen": 1795000000000_i64}], "count": 1, "truncated": false}),
        at(),
    );
    out.push_str(&format!(
        "\n# presence notice (seed 001 form, then seed 004's)\nws:  {}\nws:  {}\n",
        notice.frame,
        notice.channel_frame()
    ));
    let erased = Event::notice(
        Arc::from("acme"),
        Topic::parse("orders.created").unwrap(),
        Arc::from("eu"),
        switchboard_gateway::event::ERASED_NOTICE,
        &json!({"event_ids": ["5f3a9c1e-43"]}),
        at(),
    );
    out.push_str(&format!(
        "\n# data.erased notice (seed 001 form, seed 004's, Socket.IO)\nws:  {}\nws:  {}\nsio: {}\n",
        erased.frame,
        erased.channel_frame(),
        erased.socketio_packet()
    ));
    out
}

#[test]
fn every_server_message_has_the_pinned_json() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/protocol.txt");
    let got = render();
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &got).unwrap();
    }
    let want = std::fs::read_to_string(&path)
        .expect("tests/golden/protocol.txt (UPDATE_GOLDEN=1 writes it)");
    assert_eq!(got, want, "the wire format changed");
}

#[test]
fn every_error_code_is_documented() {
    let docs = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/protocol.md"),
    )
    .unwrap();
    for code in ErrorCode::ALL {
        assert!(
            docs.contains(&format!("`{}`", code.as_str())),
            "{code} is not documented in docs/protocol.md"
        );
    }
}
