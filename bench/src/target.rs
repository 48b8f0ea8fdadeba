//! The protocol adapters: how a subscriber of each system under test
//! subscribes, which frames carry events, and how the publisher publishes.
//! Every target delivers the same payload, `{"seq":N,"step":K,"sent":T}`.

use std::sync::LazyLock;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::ValueEnum;
use futures_util::{SinkExt, StreamExt};
use memchr::memmem::Finder;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    /// Switchboard: `/ws` + `subscribe`; publishes over the HTTP API.
    Switchboard,
    /// nats-server's WebSocket listener (core NATS protocol in text frames);
    /// publishes over NATS TCP.
    Nats,
    /// A Socket.IO v4 server (bench/peers/socketio), spoken as Engine.IO v4
    /// over a WebSocket; publishes with an emit the server relays to a room.
    Socketio,
    /// Switchboard's Socket.IO endpoint (`/socket.io/`): seed 002's
    /// `join_room`, events as `message`; publishes over the HTTP API.
    SwitchboardSocketio,
}

/// The load generator's WebSocket settings. tungstenite zeroes the free
/// part of its read buffer before every read, including the reads that
/// find nothing: with 8 KiB that memset was a few percent of the load
/// generator's CPU in a reconnect storm (frames here are a few hundred bytes;
/// a larger one grows the buffer as it needs).
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(2 * 1024)
        .write_buffer_size(0)
}

/// The WebSocket URL one subscriber connects to.
pub fn subscriber_url(kind: Kind, base: &str, token: &str, cursor: Option<&str>) -> String {
    let ws = base.replacen("http", "ws", 1);
    match kind {
        Kind::Switchboard => match cursor {
            Some(c) => format!("{ws}/ws?token={token}&cursor={c}"),
            None => format!("{ws}/ws?token={token}"),
        },
        Kind::Nats => ws,
        Kind::Socketio => format!("{ws}/socket.io/?EIO=4&transport=websocket"),
        Kind::SwitchboardSocketio => {
            format!("{ws}/socket.io/?EIO=4&transport=websocket&token={token}")
        }
    }
}

/// After the WebSocket handshake: subscribe to `topic` and return once the
/// server confirmed it (so a later publish is certain to reach us), with
/// the cursor the confirmation carries (Switchboard: where the subscription
/// began, the resume point of a client that has received nothing yet).
pub async fn subscribe(kind: Kind, ws: &mut Ws, topic: &str) -> anyhow::Result<Option<String>> {
    let confirmed = |t: &str| match kind {
        Kind::Switchboard => t.contains("subscription.confirmed"),
        Kind::Nats => t.contains("PONG"),
        Kind::Socketio | Kind::SwitchboardSocketio => t.starts_with("431"),
    };
    match kind {
        Kind::Switchboard => {
            let m = format!(r#"{{"type":"subscribe","topics":["{topic}"]}}"#);
            ws.send(Message::Text(m.into())).await?;
        }
        Kind::Nats => {
            // PING after SUB: its PONG proves the SUB was processed.
            let m = format!(
                "CONNECT {{\"verbose\":false,\"pedantic\":false,\"protocol\":1}}\r\nSUB {topic} 1\r\nPING\r\n"
            );
            ws.send(Message::Text(m.into())).await?;
        }
        Kind::Socketio => {
            // Engine.IO open packet first, then connect the default namespace.
            expect(ws, |t| t.starts_with('0')).await?;
            ws.send(Message::Text("40".into())).await?;
            expect(ws, |t| t.starts_with("40")).await?;
            let m = format!(r#"421["subscribe","{topic}"]"#);
            ws.send(Message::Text(m.into())).await?;
        }
        Kind::SwitchboardSocketio => {
            // The token came with the URL; then seed 002's `connected`.
            expect(ws, |t| t.starts_with('0')).await?;
            ws.send(Message::Text("40".into())).await?;
            expect(ws, |t| t.starts_with("42[\"connected\"")).await?;
            let m = format!(r#"421["join_room",{{"roomId":"{topic}"}}]"#);
            ws.send(Message::Text(m.into())).await?;
        }
    }
    let frame = expect(ws, confirmed).await?;
    Ok(match kind {
        Kind::Switchboard => cursor_of(&frame).map(str::to_owned),
        _ => None,
    })
}

/// Read until a frame `done` accepts; returns it.
async fn expect(ws: &mut Ws, done: impl Fn(&str) -> bool) -> anyhow::Result<String> {
    let wait = async {
        while let Some(m) = ws.next().await {
            if let Some(t) = text(&m?) {
                if done(t) {
                    return Ok(t.to_owned());
                }
                if t.contains("\"type\":\"error\"") || t.starts_with("-ERR") || t.starts_with("44")
                {
                    bail!("refused: {t}");
                }
            }
        }
        bail!("closed before confirming")
    };
    tokio::time::timeout(Duration::from_secs(30), wait)
        .await
        .context("no confirmation within 30 s")?
}

/// A frame's text: nats-server sends its protocol in binary frames.
pub fn text(m: &Message) -> Option<&str> {
    match m {
        Message::Text(t) => Some(t.as_str()),
        Message::Binary(b) => std::str::from_utf8(b).ok(),
        _ => None,
    }
}

/// The answer a frame needs besides its events (keepalives), if any.
pub fn keepalive_reply(kind: Kind, frame: &str) -> Option<&'static str> {
    match kind {
        Kind::Switchboard => None,
        Kind::Nats => frame.contains("PING\r\n").then_some("PONG\r\n"),
        Kind::Socketio | Kind::SwitchboardSocketio => (frame == "2").then_some("3"),
    }
}

/// Every event payload in a frame: (seq, step, sent µs). A NATS frame may
/// carry several messages; the others carry one. Keys may come in any order
/// (Switchboard re-serializes `data` with sorted keys).
pub fn for_each_event(frame: &str, mut f: impl FnMut(u64, u64, u64)) {
    static SEQ: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"seq\":"));
    let bytes = frame.as_bytes();
    let mut from = 0;
    while let Some(at) = SEQ.find(&bytes[from..]) {
        let at = from + at;
        let start = memchr::memrchr(b'{', &bytes[..at]).unwrap_or(at);
        let end = memchr::memchr(b'}', &bytes[at..]).map_or(bytes.len(), |e| at + e);
        let object = &bytes[start..end];
        if let (Some(seq), Some(step), Some(sent)) = (
            number_after(object, b"\"seq\":"),
            number_after(object, b"\"step\":"),
            number_after(object, b"\"sent\":"),
        ) {
            f(seq, step, sent);
        }
        from = end.max(at + 1);
    }
}

/// Whether a frame is Switchboard's `replay.complete` (a resume is done).
pub fn is_replay_complete(frame: &str) -> bool {
    frame.contains("\"type\":\"replay.complete\"")
}

/// The Switchboard cursor of the last event in a frame, to resume from.
pub fn cursor_of(frame: &str) -> Option<&str> {
    let key = "\"cursor\":\"";
    let at = frame.rfind(key)? + key.len();
    let end = frame[at..].find('"')?;
    Some(&frame[at..at + end])
}

/// The number after `key` in one payload object (a few dozen bytes).
fn number_after(object: &[u8], key: &[u8]) -> Option<u64> {
    let at = object.windows(key.len()).position(|w| w == key)? + key.len();
    let mut n: u64 = 0;
    let mut digits = 0;
    for b in &object[at..] {
        if !b.is_ascii_digit() {
            break;
        }
        n = n.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
        digits += 1;
    }
    (digits > 0).then_some(n)
}

pub fn payload(seq: u64, step: u64, sent_us: u64) -> String {
    format!(r#"{{"seq":{seq},"step":{step},"sent":{sent_us}}}"#)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_every_event_in_a_frame() {
        let nats = "MSG bench.t0 1 34\r\n{\"seq\":1,\"step\":0,\"sent\":99}\r\nMSG bench.t0 1 34\r\n{\"seq\":2,\"step\":0,\"sent\":100}\r\n";
        let mut got = Vec::new();
        for_each_event(nats, |s, k, t| got.push((s, k, t)));
        assert_eq!(got, vec![(1, 0, 99), (2, 0, 100)]);
        let sb = r#"{"type":"event","data":{"event_id":"1-5","data":{"sent":5,"seq":7,"step":2},"metadata":{"cursor":"1-5"}}}"#;
        got.clear();
        for_each_event(sb, |s, k, t| got.push((s, k, t)));
        assert_eq!(got, vec![(7, 2, 5)]);
        assert_eq!(cursor_of(sb), Some("1-5"));
    }
}
