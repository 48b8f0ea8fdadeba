//! The upgrade of a polling session held by another process: the process
//! the WebSocket reached (the relay) does the probe with the client and
//! carries frames; the owner keeps the session and switches it to a
//! "remote WebSocket" whose frames travel over NATS:
//!
//! ```text
//! client ──ws──► relay ──{prefix}.sio.in.<sid>──► owner (session)
//! client ◄─ws─── relay ◄─{prefix}.sio.out.<sid>── owner
//! ```
//!
//! NATS keeps each direction in order (one publisher, one subscriber).
//! The upgrade itself is two requests on the owner's forwarding subject:
//! `UPGRADE` after the client's `2probe` (polling ends with a noop) and
//! `SWITCH` after its `5`; a relay that gives up in between sends `ABORT`,
//! and an owner left waiting goes back to polling by itself. If the relay
//! dies, the client's pongs stop and the owner ends the session at its
//! ping timeout; if the owner dies, the client's pings stop and it
//! reconnects.

use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use axum::extract::ws::{Message, WebSocket};
use futures_util::StreamExt;

use super::forward::{Forwarder, Method};
use super::packet::{Packet, Payload};
use super::{Closed, Shared, Transport};

/// Marks a binary frame.
const BINARY: &str = "Sio-Binary";
/// Marks the end of the relayed session.
const END: &str = "Sio-End";

/// Whether a session id can name subjects (it comes from a client).
pub fn subject_safe(sid: &str) -> bool {
    !sid.is_empty() && sid.len() <= 64 && sid.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

fn in_subject(prefix: &str, sid: &str) -> String {
    format!("{prefix}.sio.in.{sid}")
}

fn out_subject(prefix: &str, sid: &str) -> String {
    format!("{prefix}.sio.out.{sid}")
}

/// Owner side, `UPGRADE`: the client answered the probe through a relay.
pub fn begin(shared: &Arc<Shared>, give_up_after: Duration) -> bool {
    {
        let mut st = shared.lock();
        if st.transport != Transport::Polling || st.closed.is_some() {
            return false;
        }
        st.transport = Transport::Upgrading;
    }
    shared.changed.notify_waiters();
    // A relay that vanished before `SWITCH` must not leave the session
    // answering every poll with a noop.
    let shared = shared.clone();
    tokio::spawn(async move {
        tokio::time::sleep(give_up_after).await;
        abort(&shared);
    });
    true
}

/// Owner side, `ABORT` (or the relay never switched): back to polling.
pub fn abort(shared: &Shared) {
    let mut st = shared.lock();
    if st.transport == Transport::Upgrading {
        st.transport = Transport::Polling;
        drop(st);
        shared.changed.notify_waiters();
    }
}

/// Owner side, `SWITCH`: the session's transport is now the relay.
pub async fn switch(shared: Arc<Shared>, client: async_nats::Client, prefix: &str) -> bool {
    if shared.lock().transport != Transport::Upgrading {
        return false;
    }
    let Ok(inbound) = client.subscribe(in_subject(prefix, &shared.sid)).await else {
        return false;
    };
    shared.lock().transport = Transport::WebSocket;
    shared.changed.notify_waiters();
    let out = out_subject(prefix, &shared.sid);
    tokio::spawn(owner_loop(shared, client, inbound, out));
    true
}

async fn owner_loop(
    shared: Arc<Shared>,
    client: async_nats::Client,
    mut inbound: async_nats::Subscriber,
    out: String,
) {
    let outcome = loop {
        let queued = shared.next_out();
        tokio::select! {
            biased;
            m = inbound.next() => {
                let Some(m) = m else { break Closed::ByServer };
                let headers = m.headers.as_ref();
                if headers.is_some_and(|h| h.get(END).is_some()) {
                    break Closed::ByClient;
                }
                let packet = if headers.is_some_and(|h| h.get(BINARY).is_some()) {
                    Some(Packet::Message(Payload::Binary(m.payload)))
                } else {
                    std::str::from_utf8(&m.payload)
                        .ok()
                        .and_then(|t| Packet::decode_text(t).ok())
                };
                let received = match packet {
                    Some(p) => shared.receive(p).await,
                    None => Err(Closed::ByServer),
                };
                if let Err(why) = received {
                    break why;
                }
            }
            q = queued => match q {
                Ok(packets) => {
                    for p in packets {
                        let sent = match p {
                            Packet::Message(Payload::Binary(b)) => {
                                let mut h = HeaderMap::new();
                                h.insert(BINARY, "1");
                                client.publish_with_headers(out.clone(), h, b).await
                            }
                            other => {
                                let mut s = String::new();
                                other.encode_text(&mut s);
                                client.publish(out.clone(), s.into()).await
                            }
                        };
                        if sent.is_err() {
                            break;
                        }
                    }
                }
                Err(why) => break why,
            },
        }
    };
    shared.close(outcome);
    let mut h = HeaderMap::new();
    h.insert(END, "1");
    let _ = client
        .publish_with_headers(out, h, Default::default())
        .await;
}

/// Relay side: serve a WebSocket for `sid`, held by `owner`.
pub async fn relay(
    forwarder: &Forwarder,
    owner: &str,
    sid: &str,
    mut socket: WebSocket,
    wait: Duration,
) {
    if !subject_safe(sid) {
        return;
    }
    let ask = |m: Method| forwarder.send(owner, sid, m, Default::default(), wait);
    if super::next_packet(&mut socket, wait).await != Some(Packet::Ping("probe".into()))
        || ask(Method::Upgrade).await.status != 200
    {
        let _ = socket.send(Message::Close(None)).await;
        return;
    }
    if socket.send(Message::Text("3probe".into())).await.is_err()
        || super::next_packet(&mut socket, wait).await != Some(Packet::Upgrade)
    {
        ask(Method::Abort).await;
        let _ = socket.send(Message::Close(None)).await;
        return;
    }
    let client = forwarder.client();
    let prefix = forwarder.prefix();
    let Ok(mut from_owner) = client.subscribe(out_subject(prefix, sid)).await else {
        ask(Method::Abort).await;
        return;
    };
    if ask(Method::Switch).await.status != 200 {
        let _ = socket.send(Message::Close(None)).await;
        return;
    }
    let to_owner = in_subject(prefix, sid);
    let end = || {
        let mut h = HeaderMap::new();
        h.insert(END, "1");
        h
    };
    loop {
        tokio::select! {
            frame = socket.next() => {
                let sent = match frame {
                    Some(Ok(Message::Text(t))) => client.publish(to_owner.clone(), bytes::Bytes::copy_from_slice(t.as_bytes())).await,
                    Some(Ok(Message::Binary(b))) => {
                        let mut h = HeaderMap::new();
                        h.insert(BINARY, "1");
                        client.publish_with_headers(to_owner.clone(), h, b).await
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => Ok(()),
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                        let _ = client.publish_with_headers(to_owner.clone(), end(), Default::default()).await;
                        return;
                    }
                };
                if sent.is_err() {
                    break;
                }
            }
            m = from_owner.next() => {
                let Some(m) = m else { break };
                if m.headers.as_ref().is_some_and(|h| h.get(END).is_some()) {
                    break;
                }
                let msg = if m.headers.as_ref().is_some_and(|h| h.get(BINARY).is_some()) {
                    Message::Binary(m.payload)
                } else {
                    match String::from_utf8(m.payload.to_vec()) {
                        Ok(t) => Message::Text(t.into()),
                        Err(_) => continue,
                    }
                };
                if socket.send(msg).await.is_err() {
                    let _ = client.publish_with_headers(to_owner.clone(), end(), Default::default()).await;
                    return;
                }
            }
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), socket.send(Message::Close(None))).await;
}
