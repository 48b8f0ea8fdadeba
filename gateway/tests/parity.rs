//! Where the protocol says the transports behave alike, they do: one table
//! of behaviours, each run over WebSocket, SSE and long-poll.

mod common;

use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use serde_json::{Value, json};
use switchboard_config::PolicyBundle;

#[derive(Debug, Clone, Copy)]
enum Transport {
    WebSocket,
    Sse,
    LongPoll,
}

const ALL: [Transport; 3] = [Transport::WebSocket, Transport::Sse, Transport::LongPoll];

type Body =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>;

/// One subscriber, whatever its transport.
enum Subscriber {
    WebSocket(Box<Client>),
    Sse { body: Body, text: String },
    LongPoll(tokio::task::JoinHandle<(u16, Value)>),
}

fn policy(tenants: &[&str]) -> PolicyBundle {
    let mut yaml = String::from("tenants:\n");
    for t in tenants {
        yaml.push_str(&format!("  {t}:\n    subscribe:\n      - pattern: \"deal.>\"\n    publish:\n      - pattern: \"deal.>\"\n"));
    }
    PolicyBundle::from_yaml(&yaml).unwrap()
}

async fn gateway() -> Gateway {
    let gw = Gateway::default().await;
    gw.node.set_policy(policy(&["acme", "globex"]));
    gw
}

/// Subscribe `acme` to `deal.*` (from `cursor`, if given) and return once
/// the subscription is in place.
async fn subscribe(gw: &Gateway, t: Transport, cursor: Option<&str>) -> Subscriber {
    let token = token("acme", &[]);
    let cursor_q = cursor.map_or(String::new(), |c| format!("&cursor={c}"));
    match t {
        Transport::WebSocket => {
            let mut c = Client::connect(&gw.ws(&format!("token={token}{cursor_q}"))).await;
            c.recv_type("connection.established").await;
            c.subscribe(&["deal.*"]).await;
            Subscriber::WebSocket(Box::new(c))
        }
        Transport::Sse => {
            let r = reqwest::get(format!(
                "{}/api/realtime/sse/?topics=deal.*&token={token}{cursor_q}",
                gw.http()
            ))
            .await
            .unwrap();
            assert_eq!(r.status(), 200);
            let mut body: Body = Box::pin(r.bytes_stream());
            let mut text = String::new();
            read_sse_until(&mut body, &mut text, ": switchboard").await;
            Subscriber::Sse { body, text }
        }
        Transport::LongPoll => {
            let before = active_subscriptions(gw).await;
            let url = format!(
                "{}/api/realtime/poll/?topics=deal.*&timeout=30&token={token}{cursor_q}",
                gw.http()
            );
            let task = tokio::spawn(async move {
                let r = reqwest::get(url).await.unwrap();
                (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
            });
            let deadline = tokio::time::Instant::now() + DEADLINE;
            while active_subscriptions(gw).await <= before {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "poll never subscribed"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Subscriber::LongPoll(task)
        }
    }
}

async fn active_subscriptions(gw: &Gateway) -> f64 {
    metric(&gw.metrics().await, "switchboard_subscriptions_active")
}

/// Read an SSE body to its end (deadline).
async fn sse_to_end(body: &mut Body, text: &mut String) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while let Some(chunk) = tokio::time::timeout_at(deadline, body.next())
        .await
        .expect("the stream ends before the deadline")
    {
        text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
}

/// The data of the last SSE event named `name` in `text`.
fn sse_event(text: &str, name: &str) -> Value {
    let marker = format!("event: {name}\ndata: ");
    let at = text
        .rfind(&marker)
        .unwrap_or_else(|| panic!("no {name} event in {text:?}"));
    let data = &text[at + marker.len()..];
    serde_json::from_str(data.lines().next().unwrap()).unwrap()
}

#[tokio::test]
async fn a_removed_tenant_is_told_and_ended_on_every_transport() {
    for t in ALL {
        let gw = gateway().await;
        let sub = subscribe(&gw, t, None).await;
        gw.node.set_policy(policy(&["globex"]));
        match sub {
            Subscriber::WebSocket(mut c) => {
                let revoked = c.recv_type("subscription.revoked").await;
                assert_eq!(revoked["data"]["topics"], json!(["deal.*"]));
                assert_eq!(c.closed().await.0, 4003);
            }
            Subscriber::Sse { mut body, mut text } => {
                sse_to_end(&mut body, &mut text).await;
                let revoked = sse_event(&text, "subscription.revoked");
                assert_eq!(revoked["topics"], json!(["deal.*"]), "{t:?}");
                let error = sse_event(&text, "error");
                assert_eq!(error["code"], "forbidden", "{t:?}: {text}");
            }
            Subscriber::LongPoll(task) => {
                let (status, body) = tokio::time::timeout(DEADLINE, task).await.unwrap().unwrap();
                assert_eq!(status, 403, "{body}");
                assert_eq!(body["error"]["code"], "forbidden", "{body}");
            }
        }
    }
}

#[tokio::test]
async fn a_drain_hands_every_transport_its_resume_cursor() {
    for t in ALL {
        let mut gw = gateway().await;
        let first = publish_ok(&gw, "acme", "deal.won", json!({})).await;
        // Long-poll resumes after the event it was given; the streams are
        // sent it live.
        let sub = match t {
            Transport::LongPoll => subscribe(&gw, t, Some(&first)).await,
            _ => subscribe(&gw, t, None).await,
        };
        let sub = match sub {
            Subscriber::WebSocket(mut c) => {
                let id = publish_ok(&gw, "acme", "deal.lost", json!({})).await;
                assert_eq!(ids(&c.events(1).await), [id]);
                Subscriber::WebSocket(c)
            }
            Subscriber::Sse { mut body, mut text } => {
                let id = publish_ok(&gw, "acme", "deal.lost", json!({})).await;
                read_sse_until(&mut body, &mut text, &format!("id: {id}")).await;
                Subscriber::Sse { body, text }
            }
            s => s,
        };
        let expected = match t {
            Transport::LongPoll => first.clone(),
            _ => {
                // The last event sent: the one published after `first`.
                let (_, page) = get_json(
                    &format!(
                        "{}/api/realtime/poll/?topics=deal.*&cursor={first}&timeout=0",
                        gw.http()
                    ),
                    Some(&token("acme", &[])),
                )
                .await;
                page["cursor"].as_str().unwrap().to_owned()
            }
        };
        gw.trigger_drain();
        match sub {
            Subscriber::WebSocket(mut c) => {
                let m = c.recv_type("reconnect").await;
                assert_eq!(m["data"]["reason"], "draining");
                assert_eq!(m["data"]["cursor"], expected.as_str(), "{m}");
                assert_eq!(c.closed().await.0, 1012);
            }
            Subscriber::Sse { mut body, mut text } => {
                sse_to_end(&mut body, &mut text).await;
                let m = sse_event(&text, "reconnect");
                assert_eq!(m["reason"], "draining", "{text}");
                assert_eq!(m["cursor"], expected.as_str(), "{text}");
            }
            Subscriber::LongPoll(task) => {
                let (status, body) = tokio::time::timeout(DEADLINE, task).await.unwrap().unwrap();
                assert_eq!(status, 200, "{body}");
                assert_eq!(body["events"], json!([]), "{body}");
                assert_eq!(body["cursor"], expected.as_str(), "{body}");
            }
        }
    }
}

#[tokio::test]
async fn a_region_filter_that_cannot_be_a_region_is_refused_on_every_transport() {
    let gw = gateway().await;
    let token = token("acme", &[]);
    // Ignoring it would deliver every region's events to a client that
    // asked for one.
    for bad in ["eu%20west", "a.b", &"x".repeat(65)] {
        for path in ["sse", "poll"] {
            // Answered at once (an ignored filter would open a stream).
            let (status, body) = tokio::time::timeout(
                DEADLINE,
                get_json(
                    &format!(
                        "{}/api/realtime/{path}/?topics=deal.*&timeout=0&region={bad}",
                        gw.http()
                    ),
                    Some(&token),
                ),
            )
            .await
            .expect("an answer, not a stream");
            assert_eq!(status, 400, "{path} {bad}: {body}");
            assert_eq!(body["error"]["code"], "invalid_query", "{body}");
        }
        let refused =
            tokio_tungstenite::connect_async(gw.ws(&format!("token={token}&region={bad}")))
                .await
                .expect_err("no upgrade");
        match refused {
            tokio_tungstenite::tungstenite::Error::Http(r) => assert_eq!(r.status(), 400),
            other => panic!("{other}"),
        }
    }
    // A valid one filters.
    let (status, _) = get_json(
        &format!(
            "{}/api/realtime/poll/?topics=deal.*&timeout=0&region=eu-west_1",
            gw.http()
        ),
        Some(&token),
    )
    .await;
    assert_eq!(status, 200);
}
