//! Engine.IO v4: sessions over HTTP long-polling and WebSocket, the upgrade
//! from one to the other, and heartbeats. The layer above (Socket.IO, or
//! the conformance fixture's echo) gets an [`EngineSocket`] per session and
//! sees only messages.
//!
//! A session is shared state ([`Shared`]: the outbound queue, which
//! transport carries it, whether it ended) between the task that serves it
//! (holding the [`EngineSocket`]) and whichever transport requests reach it:
//! polling GETs take the queue, polling POSTs feed the inbox, a
//! WebSocket does both. Heartbeats are driven by [`EngineSocket::recv`], so a
//! session whose task stopped reading ends.
//!
//! No sticky sessions: a session id names the process that owns it. A
//! polling request that reaches another process is forwarded to the owner
//! over NATS request/reply (see [`forward`]); an upgrade that reaches
//! another process is refused, and the client keeps polling.

pub mod forward;
pub mod packet;
pub mod relay;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use axum::extract::ws::{Message, Utf8Bytes, WebSocket};
use bytes::Bytes;
use dashmap::DashMap;
use futures_util::StreamExt;
use rand::Rng;
use tokio::sync::Notify;
use tokio::time::{Instant, sleep_until};

pub use packet::{Packet, Payload};

/// Queued packets above which [`EngineSocket::backlog_full`] holds the
/// producer back.
const BACKLOG_HIGH: usize = 512;
/// Up to this many queued packets are written one per syscall; more are
/// coalesced into one write.
const ONE_WRITE_EACH: usize = 4;
/// Inbound packets buffered before a transport waits for the session task.
const INBOUND: usize = 64;
/// How long a poll arriving mid-upgrade waits for the upgrade to settle.
const UPGRADE_SETTLE: Duration = Duration::from_millis(200);

/// The protocol's knobs, announced in the handshake.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// How often the server pings.
    pub ping_interval: Duration,
    /// How long a pong may take.
    pub ping_timeout: Duration,
    /// The largest message, and the largest polling body, in bytes.
    pub max_payload: usize,
}

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// The client sent `close` or went away.
    ByClient,
    /// No pong within the timeout.
    PingTimeout,
    /// The server ended it (its task stopped, a protocol error, a
    /// duplicate poll).
    ByServer,
}

impl Closed {
    /// A label for logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            Closed::ByClient => "client",
            Closed::PingTimeout => "ping_timeout",
            Closed::ByServer => "server",
        }
    }
}

/// How a parked poll ends.
enum PollEnd {
    /// With this payload.
    Answer(String),
    /// As a poll that raced the upgrade ([`Engine::poll_while_upgrading`]).
    Settle,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Polling,
    /// A WebSocket answered the probe; polling ends with `noop`.
    Upgrading,
    WebSocket,
}

struct State {
    queue: VecDeque<Packet>,
    /// Packets from the client not yet taken by the session task (at most
    /// [`INBOUND`]; transports wait for room).
    inbox: VecDeque<Packet>,
    transport: Transport,
    /// A polling GET is waiting.
    polling: bool,
    /// A WebSocket asked to upgrade this session (its request was
    /// accepted) and has not given up. A poll sent after that may race the
    /// client's `5` (see [`Engine::poll_while_upgrading`]); one sent before
    /// it is the poll the client waits on before it sends `5`.
    upgrade_asked: bool,
    closed: Option<Closed>,
    /// The client closed a polling session while no poll was waiting: the
    /// next poll still gets the noop that poll would have got (the client
    /// may have sent both at once and they can be served in either order,
    /// as engine.io does), and the one after it 400.
    farewell: bool,
    /// A ping is out and its pong is due by then. Kept here, not only in
    /// the session task, so that a request arriving after the deadline
    /// finds the session timed out even if the task's timer has not fired
    /// yet (a loaded runtime): the answer does not depend on who runs first.
    pong_due: Option<Instant>,
}

/// What the session task and the transports share.
pub struct Shared {
    sid: Arc<str>,
    state: Mutex<State>,
    /// Ticks when the queue, the inbox's room or the state changed.
    changed: Notify,
    /// Wakes the session task: the inbox has packets, or the session ended.
    inbox_ready: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the state torn
        // (every change is one assignment); keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the session ended, ending it first if its pong is overdue.
    fn ended(&self) -> bool {
        let st = self.lock();
        if st.closed.is_none() && st.pong_due.is_some_and(|d| Instant::now() >= d) {
            drop(st);
            self.close(Closed::PingTimeout);
            return true;
        }
        st.closed.is_some()
    }

    /// End the session (first reason wins) and wake everyone.
    fn close(&self, why: Closed) {
        let mut st = self.lock();
        if st.closed.is_none() {
            st.closed = Some(why);
            st.farewell =
                why == Closed::ByClient && st.transport == Transport::Polling && !st.polling;
        }
        drop(st);
        self.changed.notify_waiters();
        // The session task learns it too.
        self.inbox_ready.notify_one();
    }

    /// Takes the noop owed to the poll after a client's close, if any.
    fn take_farewell(&self) -> bool {
        let taken = std::mem::take(&mut self.lock().farewell);
        if taken {
            self.changed.notify_waiters();
        }
        taken
    }

    /// Hand a client's packet to the session task, waiting while the inbox
    /// is full; false once the session ended.
    async fn deliver(&self, packet: Packet) -> bool {
        let mut packet = Some(packet);
        let ok = self
            .wait(|st| {
                if st.closed.is_some() {
                    Some(false)
                } else if st.inbox.len() < INBOUND {
                    st.inbox.extend(packet.take());
                    Some(true)
                } else {
                    None
                }
            })
            .await;
        if ok {
            self.inbox_ready.notify_one();
        }
        ok
    }

    /// A packet from the client, on any transport: messages and heartbeats
    /// go to the session task, `close` ends the session, and a packet no
    /// client sends ends it as a protocol error. `Err`: why it ends.
    async fn receive(&self, packet: Packet) -> Result<(), Closed> {
        match packet {
            Packet::Close => Err(Closed::ByClient),
            p @ (Packet::Message(_) | Packet::Pong(_) | Packet::Ping(_)) => {
                if matches!(p, Packet::Pong(_)) {
                    self.lock().pong_due = None;
                }
                if self.deliver(p).await {
                    Ok(())
                } else {
                    Err(Closed::ByServer)
                }
            }
            Packet::Noop => Ok(()),
            Packet::Open(_) | Packet::Upgrade | Packet::Encoded(_) => Err(Closed::ByServer),
        }
    }

    /// What a WebSocket writer waits for: everything queued, or why the
    /// session ended.
    async fn next_out(&self) -> Result<VecDeque<Packet>, Closed> {
        self.wait(|st| {
            if !st.queue.is_empty() {
                Some(Ok(std::mem::take(&mut st.queue)))
            } else {
                st.closed.map(Err)
            }
        })
        .await
    }

    /// The next packet of the inbox, if any.
    fn take_inbox(&self) -> Option<Packet> {
        let mut st = self.lock();
        let was_full = st.inbox.len() >= INBOUND;
        let p = st.inbox.pop_front();
        drop(st);
        if was_full {
            self.changed.notify_waiters();
        }
        p
    }

    fn push(&self, packets: impl IntoIterator<Item = Packet>) {
        let mut st = self.lock();
        if st.closed.is_some() {
            return;
        }
        st.queue.extend(packets);
        drop(st);
        self.changed.notify_waiters();
    }

    /// Wait until `check` has an answer; `check` runs under the lock.
    async fn wait<R>(&self, mut check: impl FnMut(&mut State) -> Option<R>) -> R {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(r) = check(&mut self.lock()) {
                return r;
            }
            notified.await;
        }
    }
}

/// What the request that opened a session carried.
#[derive(Debug, Clone, Default)]
pub struct Handshake {
    /// Its query parameters (the last of each name).
    pub query: Vec<(String, String)>,
    /// Its headers.
    pub headers: axum::http::HeaderMap,
}

impl Handshake {
    /// One query parameter.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Starts the task that serves a new session.
pub type Accept = Box<dyn Fn(EngineSocket, Handshake) + Send + Sync>;

/// One Engine.IO endpoint: its sessions and the layer above.
pub struct Engine {
    config: EngineConfig,
    sessions: DashMap<Arc<str>, Arc<Shared>>,
    accept: Accept,
    /// Names this process in the session ids it issues.
    owner: String,
    /// Where requests for other processes' sessions go (cluster mode).
    forward: std::sync::OnceLock<forward::Forwarder>,
    /// Handed to sessions so they can leave the table.
    this: Weak<Engine>,
    /// Whether new sessions are taken (a draining gateway refuses them at
    /// the handshake, which clients retry elsewhere).
    gate: std::sync::OnceLock<Gate>,
}

/// Says whether new sessions are taken.
pub type Gate = Box<dyn Fn() -> bool + Send + Sync>;

/// A plain HTTP answer of the polling transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The status code.
    pub status: u16,
    /// The body (a payload, `ok`, or an error in the protocol's JSON).
    pub body: String,
}

impl Reply {
    fn ok(body: String) -> Self {
        Self { status: 200, body }
    }

    /// A refusal with Engine.IO's error shape (`{"code", "message"}`).
    pub fn error(status: u16, code: u8, message: &str) -> Self {
        Self {
            status,
            body: serde_json::json!({ "code": code, "message": message }).to_string(),
        }
    }

    fn unknown_sid() -> Self {
        Self::error(400, 1, "Session ID unknown")
    }
}

/// A random alphanumeric string.
fn random_id(len: usize) -> String {
    rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}

impl Engine {
    /// An endpoint whose new sessions are served by `accept`.
    pub fn new(config: EngineConfig, accept: Accept) -> Arc<Self> {
        Arc::new_cyclic(|this| Self {
            config,
            sessions: DashMap::new(),
            accept,
            owner: random_id(10),
            forward: std::sync::OnceLock::new(),
            this: this.clone(),
            gate: std::sync::OnceLock::new(),
        })
    }

    /// Refuse new sessions while `gate` says no (set once).
    pub fn set_gate(&self, gate: Gate) {
        let _ = self.gate.set(gate);
    }

    /// Whether a new session may open here.
    pub fn accepting(&self) -> bool {
        self.gate.get().is_none_or(|g| g())
    }

    /// The protocol's knobs.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// The process a session id names.
    fn owner_of(sid: &str) -> Option<&str> {
        sid.split_once('-').map(|(o, _)| o)
    }

    fn open(&self, transport: Transport, handshake: Handshake) -> (Arc<Shared>, String) {
        let sid: Arc<str> = format!("{}-{}", self.owner, random_id(16)).into();
        let shared = Arc::new(Shared {
            sid: sid.clone(),
            state: Mutex::new(State {
                queue: VecDeque::new(),
                inbox: VecDeque::new(),
                transport,
                polling: false,
                upgrade_asked: false,
                farewell: false,
                pong_due: None,
                closed: None,
            }),
            changed: Notify::new(),
            inbox_ready: Notify::new(),
        });
        self.sessions.insert(sid.clone(), shared.clone());
        let upgrades: &[&str] = match transport {
            Transport::Polling => &["websocket"],
            _ => &[],
        };
        let open = serde_json::json!({
            "sid": &*sid,
            "upgrades": upgrades,
            "pingInterval": self.config.ping_interval.as_millis() as u64,
            "pingTimeout": self.config.ping_timeout.as_millis() as u64,
            "maxPayload": self.config.max_payload,
        });
        let mut text = String::new();
        Packet::Open(open.to_string()).encode_text(&mut text);
        let socket = EngineSocket {
            shared: shared.clone(),
            engine: self.this.clone(),
            next_ping: Instant::now() + self.config.ping_interval,
            pong_due: None,
            ping_interval: self.config.ping_interval,
            ping_timeout: self.config.ping_timeout,
        };
        (self.accept)(socket, handshake);
        (shared, text)
    }

    /// A polling GET without a session id: the handshake.
    pub fn handshake_polling(&self, handshake: Handshake) -> Reply {
        if !self.accepting() {
            return Reply::error(
                503,
                3,
                "Not accepting new sessions: connect to another server",
            );
        }
        let (_, open) = self.open(Transport::Polling, handshake);
        Reply::ok(open)
    }

    /// A polling GET of session `sid`: what is queued, or (after waiting
    /// up to one ping interval) a noop.
    pub async fn poll(&self, sid: &str) -> Reply {
        match self.sessions.get(sid).map(|s| s.clone()) {
            Some(shared) => self.poll_local(shared).await,
            None => {
                self.forward_or_unknown(sid, forward::Method::Get, Bytes::new())
                    .await
            }
        }
    }

    /// A polling POST to session `sid`.
    pub async fn push(&self, sid: &str, body: Bytes) -> Reply {
        match self.sessions.get(sid).map(|s| s.clone()) {
            Some(shared) => self.push_local(&shared, &body).await,
            None => {
                self.forward_or_unknown(sid, forward::Method::Post, body)
                    .await
            }
        }
    }

    async fn forward_or_unknown(&self, sid: &str, method: forward::Method, body: Bytes) -> Reply {
        match (Self::owner_of(sid), self.forward.get()) {
            (Some(owner), Some(f)) if owner != self.owner => {
                let wait = self.config.ping_interval + self.config.ping_timeout;
                f.send(owner, sid, method, body, wait).await
            }
            _ => Reply::unknown_sid(),
        }
    }

    async fn poll_local(&self, shared: Arc<Shared>) -> Reply {
        if shared.take_farewell() {
            return Reply::ok("6".into());
        }
        if shared.ended() {
            return Reply::error(400, 3, "Bad request");
        }
        // `None`: the session is being upgraded.
        let after_ask = {
            let mut st = shared.lock();
            if st.closed.is_some() || st.transport == Transport::WebSocket {
                return Reply::error(400, 3, "Bad request");
            }
            if st.transport == Transport::Upgrading {
                None
            } else {
                if st.polling {
                    // Two polls at once: the protocol ends the session.
                    drop(st);
                    shared.close(Closed::ByServer);
                    return Reply::error(400, 3, "Bad request");
                }
                st.polling = true;
                Some(st.upgrade_asked)
            }
        };
        let Some(after_ask) = after_ask else {
            return self.poll_while_upgrading(&shared).await;
        };
        struct Polling<'a>(&'a Shared);
        impl Drop for Polling<'_> {
            fn drop(&mut self) {
                self.0.lock().polling = false;
            }
        }
        let _polling = Polling(&shared);
        let max = self.config.max_payload.max(1);
        let deadline = Instant::now() + self.config.ping_interval + self.config.ping_timeout;
        let answer = tokio::time::timeout_at(
            deadline,
            shared.wait(|st| {
                if !st.queue.is_empty() {
                    let mut taken = Vec::new();
                    let mut size = 0;
                    while let Some(p) = st.queue.front() {
                        let len = p.polling_len() + 1;
                        if !taken.is_empty() && size + len > max {
                            break;
                        }
                        size += len;
                        taken.extend(st.queue.pop_front());
                    }
                    return Some(PollEnd::Answer(packet::encode_payload(&taken)));
                }
                match (st.closed, st.transport) {
                    (Some(Closed::ByClient), _) => Some(PollEnd::Answer("6".into())),
                    (Some(_), _) => Some(PollEnd::Answer("1".into())),
                    (None, Transport::Polling) => None,
                    // The probe was answered, or the whole upgrade landed
                    // before this poll looked again. A poll sent after the
                    // client's WebSocket settles (400 once upgraded); the
                    // one it sent before is the one it waits on: noop.
                    (None, _) if after_ask => Some(PollEnd::Settle),
                    (None, _) => Some(PollEnd::Answer("6".into())),
                }
            }),
        )
        .await
        .unwrap_or_else(|_| PollEnd::Answer("6".into()));
        shared.changed.notify_waiters();
        match answer {
            PollEnd::Answer(answer) => Reply::ok(answer),
            PollEnd::Settle => self.poll_while_upgrading(&shared).await,
        }
    }

    /// A poll that arrives while the session is being upgraded, or that
    /// was sent after the client's WebSocket and waited here until the
    /// probe was answered. The client may already have sent the upgrade's
    /// last packet (`5`) on the WebSocket, which this process has not read
    /// yet: give that a moment, so the answer does not depend on which
    /// connection is served first. Upgraded: 400, as for any poll after
    /// an upgrade; otherwise a noop (a client pausing its polling waits
    /// for this poll to end before it sends `5`, so the moment is all it
    /// costs).
    async fn poll_while_upgrading(&self, shared: &Shared) -> Reply {
        let settled = tokio::time::timeout(
            UPGRADE_SETTLE,
            shared.wait(|st| (st.transport != Transport::Upgrading).then_some(st.transport)),
        )
        .await;
        match settled {
            Ok(Transport::WebSocket) => Reply::error(400, 3, "Bad request"),
            _ => Reply::ok("6".into()),
        }
    }

    async fn push_local(&self, shared: &Shared, body: &[u8]) -> Reply {
        {
            // While an upgrade is under way the client may still finish a
            // write it began over polling.
            if shared.ended() {
                return Reply::error(400, 3, "Bad request");
            }
            let st = shared.lock();
            if st.closed.is_some() || st.transport == Transport::WebSocket {
                return Reply::error(400, 3, "Bad request");
            }
        }
        if body.len() > self.config.max_payload {
            shared.close(Closed::ByServer);
            return Reply::error(413, 3, "Payload too large");
        }
        let packets = match std::str::from_utf8(body)
            .ok()
            .and_then(|s| packet::decode_payload(s).ok())
        {
            Some(p) => p,
            None => {
                shared.close(Closed::ByServer);
                return Reply::error(400, 3, "Bad request: invalid packet");
            }
        };
        for p in packets {
            match shared.receive(p).await {
                Ok(()) => {}
                Err(Closed::ByClient) => {
                    shared.close(Closed::ByClient);
                    break;
                }
                Err(why) => {
                    shared.close(why);
                    return Reply::error(400, 3, "Bad request: unexpected packet");
                }
            }
        }
        Reply::ok("ok".into())
    }

    /// Serve a WebSocket: a new session (`sid` None), or the upgrade of a
    /// polling session.
    pub async fn serve_websocket(
        &self,
        mut socket: WebSocket,
        sid: Option<String>,
        handshake: Handshake,
    ) {
        let shared = match sid {
            None => {
                let (shared, open) = self.open(Transport::WebSocket, handshake);
                if socket.send(Message::Text(open.into())).await.is_err() {
                    shared.close(Closed::ByClient);
                    return;
                }
                shared
            }
            Some(sid) => {
                let Some(shared) = self.sessions.get(sid.as_str()).map(|s| s.clone()) else {
                    // Held by another process: relay the upgrade to it.
                    if let (Some(owner), Some(f)) = (Self::owner_of(&sid), self.forward.get())
                        && owner != self.owner
                    {
                        let wait = self.config.ping_interval + self.config.ping_timeout;
                        relay::relay(f, owner, &sid, socket, wait).await;
                        return;
                    }
                    let _ = socket.send(Message::Close(None)).await;
                    return;
                };
                if !self.probe(&mut socket, &shared).await {
                    shared.lock().upgrade_asked = false;
                    let _ = socket.send(Message::Close(None)).await;
                    return;
                }
                shared
            }
        };
        self.websocket_loop(socket, &shared).await;
    }

    /// The upgrade: `2probe` → `3probe`, polling ends with a noop, then
    /// `5`. False when the session cannot be upgraded (it already was,
    /// another upgrade is under way, the client did not follow through).
    async fn probe(&self, socket: &mut WebSocket, shared: &Shared) -> bool {
        if shared.lock().transport != Transport::Polling {
            return false;
        }
        let wait = self.config.ping_interval + self.config.ping_timeout;
        if next_packet(socket, wait).await != Some(Packet::Ping("probe".into())) {
            return false;
        }
        {
            let mut st = shared.lock();
            if st.transport != Transport::Polling || st.closed.is_some() {
                return false;
            }
            st.transport = Transport::Upgrading;
        }
        shared.changed.notify_waiters();
        if socket.send(Message::Text("3probe".into())).await.is_err() {
            shared.lock().transport = Transport::Polling;
            return false;
        }
        if next_packet(socket, wait).await != Some(Packet::Upgrade) {
            shared.lock().transport = Transport::Polling;
            shared.changed.notify_waiters();
            return false;
        }
        shared.lock().transport = Transport::WebSocket;
        shared.changed.notify_waiters();
        true
    }

    async fn websocket_loop(&self, mut socket: WebSocket, shared: &Shared) {
        let max = self.config.max_payload;
        let outcome = loop {
            let queued = shared.next_out();
            tokio::select! {
                biased;
                frame = socket.next() => {
                    let packet = match frame {
                        Some(Ok(Message::Text(t))) if t.len() <= max + 1 => Packet::decode_text(t.as_str()),
                        Some(Ok(Message::Binary(b))) if b.len() <= max => Ok(Packet::Message(Payload::Binary(b))),
                        Some(Ok(Message::Text(_) | Message::Binary(_))) => break Closed::ByServer,
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                        Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break Closed::ByClient,
                    };
                    let received = match packet {
                        Ok(p) => shared.receive(p).await,
                        Err(_) => Err(Closed::ByServer),
                    };
                    if let Err(why) = received {
                        break why;
                    }
                }
                out = queued => match out {
                    Ok(packets) => {
                        // A few packets: one write each, as the reference
                        // servers do when idle (clients, and the official
                        // test suite, may take one read as one event). A
                        // burst: one write for all, as Node's streams
                        // coalesce writes queued behind a busy socket.
                        let coalesce = packets.len() > ONE_WRITE_EACH;
                        let mut failed = false;
                        for p in packets {
                            let msg = match p {
                                Packet::Message(Payload::Binary(b)) => Message::Binary(b),
                                Packet::Encoded(t) => Message::Text(t),
                                other => {
                                    let mut s = String::new();
                                    other.encode_text(&mut s);
                                    Message::Text(s.into())
                                }
                            };
                            let sent = if coalesce {
                                futures_util::SinkExt::feed(&mut socket, msg).await
                            } else {
                                socket.send(msg).await
                            };
                            if sent.is_err() {
                                failed = true;
                                break;
                            }
                        }
                        if failed
                            || (coalesce && futures_util::SinkExt::flush(&mut socket).await.is_err())
                        {
                            break Closed::ByClient;
                        }
                    }
                    Err(why) => break why,
                },
            }
        };
        shared.close(outcome);
        if outcome != Closed::ByClient {
            let _ = tokio::time::timeout(Duration::from_secs(1), socket.send(Message::Close(None)))
                .await;
        }
    }

    /// Serve requests forwarded from other processes for this process's
    /// sessions (cluster mode).
    pub fn attach_forwarding(&self, client: async_nats::Client, prefix: &str) {
        let f = forward::Forwarder::new(client, prefix);
        if let Some(engine) = self.this.upgrade() {
            f.serve(engine, self.owner.clone());
        }
        let _ = self.forward.set(f);
    }
}

/// The next text packet of a WebSocket, within `wait`.
async fn next_packet(socket: &mut WebSocket, wait: Duration) -> Option<Packet> {
    match tokio::time::timeout(wait, socket.next()).await {
        Ok(Some(Ok(Message::Text(t)))) => Packet::decode_text(t.as_str()).ok(),
        _ => None,
    }
}

/// The session task's end of a session.
pub struct EngineSocket {
    shared: Arc<Shared>,
    engine: Weak<Engine>,
    next_ping: Instant,
    pong_due: Option<Instant>,
    ping_interval: Duration,
    ping_timeout: Duration,
}

impl EngineSocket {
    /// The session id.
    pub fn sid(&self) -> &str {
        &self.shared.sid
    }

    /// The next message from the client (cancel-safe); answers heartbeats
    /// on the way. An error once the session ended.
    pub async fn recv(&mut self) -> Result<Payload, Closed> {
        loop {
            // What the client sent before it closed is still read.
            while let Some(p) = self.shared.take_inbox() {
                match p {
                    Packet::Message(m) => return Ok(m),
                    Packet::Pong(_) => {
                        self.pong_due = None;
                        self.next_ping = Instant::now() + self.ping_interval;
                    }
                    _ => {}
                }
            }
            if let Some(why) = self.shared.lock().closed {
                return Err(why);
            }
            let deadline = self.pong_due.unwrap_or(self.next_ping);
            tokio::select! {
                biased;
                () = self.shared.inbox_ready.notified() => {}
                () = sleep_until(deadline) => {
                    if self.pong_due.is_some() {
                        self.shared.close(Closed::PingTimeout);
                        return Err(Closed::PingTimeout);
                    }
                    let due = Instant::now() + self.ping_timeout;
                    self.shared.lock().pong_due = Some(due);
                    self.shared.push([Packet::Ping(String::new())]);
                    self.pong_due = Some(due);
                }
            }
        }
    }

    /// A handle for sending, usable beside [`Self::recv`].
    pub fn handle(&self) -> EngineHandle {
        EngineHandle(self.shared.clone())
    }

    /// Queue messages for the client.
    pub fn send(&self, messages: impl IntoIterator<Item = Payload>) {
        self.shared.push(messages.into_iter().map(Packet::Message));
    }

    /// Queue packets already in their text form (type digit included).
    pub fn send_encoded(&self, packets: impl IntoIterator<Item = Utf8Bytes>) {
        self.shared.push(packets.into_iter().map(Packet::Encoded));
    }

    /// End the session from the server's side.
    pub fn close(&self) {
        self.shared.close(Closed::ByServer);
    }
}

/// The sending side of a session.
#[derive(Clone)]
pub struct EngineHandle(Arc<Shared>);

impl EngineHandle {
    /// Queue packets already in their text form (type digit included).
    pub fn send_encoded(&self, packets: impl IntoIterator<Item = Utf8Bytes>) {
        self.0.push(packets.into_iter().map(Packet::Encoded));
    }

    /// Queue messages for the client.
    pub fn send(&self, messages: impl IntoIterator<Item = Payload>) {
        self.0.push(messages.into_iter().map(Packet::Message));
    }

    /// Too much is queued: hold new messages back until [`Self::drained`].
    pub fn backlog_full(&self) -> bool {
        self.0.lock().queue.len() >= BACKLOG_HIGH
    }

    /// Resolves once the queue is below half the high mark, or the session ended.
    pub async fn drained(&self) {
        self.0
            .wait(|st| (st.queue.len() < BACKLOG_HIGH / 2 || st.closed.is_some()).then_some(()))
            .await;
    }

    /// End the session from the server's side.
    pub fn close(&self) {
        self.0.close(Closed::ByServer);
    }
}

impl Drop for EngineSocket {
    fn drop(&mut self) {
        self.shared.close(Closed::ByServer);
        let Some(engine) = self.engine.upgrade() else {
            return;
        };
        // A noop still owed to a poll keeps the session findable until
        // that poll comes, for at most a ping timeout.
        if self.shared.lock().farewell
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let shared = self.shared.clone();
            let grace = self.ping_timeout;
            runtime.spawn(async move {
                let owed = shared.wait(|st| (!st.farewell).then_some(()));
                let _ = tokio::time::timeout(grace, owed).await;
                engine.sessions.remove(&shared.sid);
            });
            return;
        }
        engine.sessions.remove(&self.shared.sid);
    }
}

impl Engine {
    /// Whether this process holds session `sid`.
    pub fn holds(&self, sid: &str) -> bool {
        self.sessions.contains_key(sid)
    }

    /// Whether a polling GET of session `sid` is waiting here.
    pub fn polled(&self, sid: &str) -> bool {
        self.sessions.get(sid).is_some_and(|s| s.lock().polling)
    }

    /// Whether this process holds session `sid`, or can relay its
    /// upgrade to the process that does.
    pub fn reaches(&self, sid: &str) -> bool {
        self.holds(sid)
            || (self.forward.get().is_some()
                && relay::subject_safe(sid)
                && Self::owner_of(sid).is_some_and(|o| o != self.owner))
    }

    /// A WebSocket asks to upgrade session `sid` (held here): polls sent
    /// from now on may race the upgrade. Called before the WebSocket's
    /// handshake is answered, so that it happens before anything the
    /// client sends once its WebSocket is open.
    pub fn upgrade_asked(&self, sid: &str) {
        if let Some(s) = self.sessions.get(sid).map(|s| s.clone()) {
            s.lock().upgrade_asked = true;
        }
    }

    /// A polling body over `maxPayload` ends its session (held here).
    pub fn refuse_oversized(&self, sid: &str) {
        if let Some(s) = self.sessions.get(sid).map(|s| s.clone()) {
            s.close(Closed::ByServer);
        }
    }
}
