//! Seed 002's Socket.IO vocabulary on the gateway's features, in the main
//! namespace (docs/socketio.md has the mapping):
//!
//! - `connected {connectionId, serverTime, interactionClasses}` after the
//!   namespace is joined with a valid token (`auth.token`, `?token=` or
//!   `Authorization`);
//! - `join_room`/`leave_room {roomId}` subscribe to and leave a topic under
//!   the tenant's policy (`room_joined`/`room_left`);
//! - `message {type, roomId | recipientId, payload}` is a client publish
//!   (to the room's topic, or the recipient's private channel `user:<id>`),
//!   answered `message_ack {messageId}`; events of joined rooms and of the
//!   user's own channel arrive as `message`;
//! - `presence_update {status, metadata}` makes the connection a member,
//!   with that info, of every joined room that has presence; members'
//!   changes arrive as `presence_update`;
//! - `ping` → `pong`; refusals are `error {error, message}`.
//!
//! Every event a client sends may also carry an acknowledgement callback,
//! which gets the same answer.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use switchboard_config::Topic;
use switchboard_config::policy::InteractionClass;
use tokio::time::{Instant, sleep_until};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::WatchStream;

use super::engine::{Accept, EngineConfig, EngineHandle, EngineSocket, Handshake};
use super::recovery::{Recovery, Saved};
use super::socket::{Incoming, SioSocket};
use crate::auth::Principal;
use crate::broker::GapReason;
use crate::event::{Cursor, Event, EventKind, USER_CHANNEL_PREFIX};
use crate::node::{Node, PublishRequest};
use crate::protocol::ErrorCode;
use crate::session::{Form, ResumeSink, Session};
use crate::transport::ws::timers::{RateLimit, deadline_for_expiry};
use crate::transport::ws::{Origin, origin_allowed};

/// Events written per wake-up.
const BATCH: usize = 64;
/// Events replayed on a recovery before the rest is left to a refresh.
const REPLAY_LIMIT: usize = 100_000;

/// The gateway's Socket.IO endpoint.
pub fn engine(node: &Arc<Node>) -> Arc<super::engine::Engine> {
    let c = &node.config.socketio;
    let config = EngineConfig {
        ping_interval: Duration::from_millis(c.ping_interval_ms),
        ping_timeout: Duration::from_millis(c.ping_timeout_ms),
        max_payload: usize::try_from(c.max_payload).unwrap_or(usize::MAX),
    };
    let ctx = Arc::new(Ctx {
        node: node.clone(),
        recovery: Recovery::new(
            Duration::from_secs(c.recovery_seconds.max(1)),
            node.cluster.get().cloned(),
        ),
        connect_timeout: Duration::from_millis(c.connect_timeout_ms),
    });
    let accept: Accept = Box::new(move |socket, handshake| {
        tokio::spawn(serve(ctx.clone(), socket, handshake));
    });
    let engine = super::engine::Engine::new(config, accept);
    let weak = Arc::downgrade(node);
    // New sessions are refused (503, which socket.io-client retries with
    // its backoff) while draining and while the process sheds load.
    engine.set_gate(Box::new(move || {
        weak.upgrade()
            .is_some_and(|n| !n.draining() && !n.overload.saturated())
    }));
    if let Some(link) = node.cluster.get() {
        engine.attach_forwarding(link.client.clone(), &link.prefix);
    }
    engine
}

struct Ctx {
    node: Arc<Node>,
    recovery: Recovery,
    connect_timeout: Duration,
}

/// One connection, from its Engine.IO session to its end.
async fn serve(ctx: Arc<Ctx>, socket: EngineSocket, handshake: Handshake) {
    let out = socket.handle();
    let mut sio = SioSocket::new(socket, ctx.connect_timeout);
    let node = ctx.node.clone();
    loop {
        let (nsp, auth) = match sio.next().await {
            Ok(Incoming::Connect { nsp, auth }) => (nsp, auth),
            Ok(_) => continue,
            Err(_) => return,
        };
        if nsp != "/" {
            sio.refuse(&nsp, "Invalid namespace", None);
            continue;
        }
        match Box::pin(admit(&ctx, &handshake, auth.as_ref())).await {
            Ok((principal, session)) => {
                let mut conn = Conn {
                    rate: RateLimit::new(
                        node.limits(&principal.tenant)
                            .map_or(node.config.limits.messages_per_minute, |l| {
                                l.messages_per_minute
                            }),
                    ),
                    ctx: ctx.clone(),
                    sio,
                    out,
                    session,
                    principal,
                    pid: String::new(),
                    rooms: Vec::new(),
                    status: None,
                    sent_up_to: None,
                    start: Cursor::FOREIGN,
                };
                // The request's headers are not needed any more.
                drop(handshake);
                conn.run(auth).await;
                return;
            }
            Err((code, message)) => {
                node.metrics.error("auth");
                sio.refuse(
                    "/",
                    &code_str(code),
                    Some(json!({ "code": code, "message": message })),
                );
            }
        }
    }
}

/// An error code as it appears on the wire (`unauthorized`).
fn code_str(code: ErrorCode) -> String {
    match serde_json::to_value(code) {
        Ok(Value::String(s)) => s,
        _ => "error".into(),
    }
}

/// Check the origin, the token and the limits; open the gateway session.
async fn admit(
    ctx: &Ctx,
    handshake: &Handshake,
    auth: Option<&Value>,
) -> Result<(Principal, Session), (ErrorCode, String)> {
    let node = &ctx.node;
    if !origin_allowed(&node.config.allowed_origins, Origin::of(&handshake.headers)) {
        return Err((ErrorCode::OriginNotAllowed, "origin not allowed".into()));
    }
    if node.draining() {
        return Err((
            ErrorCode::Draining,
            "this gateway is draining; connect to another one".into(),
        ));
    }
    let token = auth
        .and_then(|a| a.get("token"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    let company = auth
        .and_then(|a| a.get("company_id"))
        .and_then(Value::as_str)
        .or(handshake.param("company_id"));
    let principal = crate::transport::authenticate(
        node,
        &handshake.headers,
        token.as_deref().or(handshake.param("token")),
        company,
    )
    .await
    .map_err(|e| {
        tracing::info!(transport = "socketio", reason = %e, "connection rejected: unauthorized");
        (ErrorCode::Unauthorized, e.to_string())
    })?;
    let admission = node.admit(&principal).map_err(|close| {
        node.metrics
            .connections_rejected
            .get_or_create(&vec![("reason", close.label())])
            .inc();
        (
            crate::transport::refusal_code(close),
            close.reason().to_owned(),
        )
    })?;
    let session = Session::new(
        node.clone(),
        admission,
        &principal,
        None,
        node.config.limits.outbound_queue,
    );
    Ok((principal, session))
}

/// An authenticated connection in the main namespace.
struct Conn {
    ctx: Arc<Ctx>,
    sio: SioSocket,
    out: EngineHandle,
    session: Session,
    principal: Principal,
    /// Its recovery id.
    pid: String,
    /// Rooms joined, in order.
    rooms: Vec<String>,
    /// Its presence info (`{status, metadata}`), once set.
    status: Option<Value>,
    /// Every event of its rooms up to here was sent (None: nothing sent).
    sent_up_to: Option<Cursor>,
    /// Where it stood when it connected (its resume point until an event
    /// was sent).
    start: Cursor,
    rate: RateLimit,
}

/// Arguments of an event: the first one, or null.
fn first(args: &[Value]) -> &Value {
    args.first().unwrap_or(&Value::Null)
}

/// A room named by a `{roomId}` object or a plain string.
fn room_of(arg: &Value) -> Option<String> {
    match arg {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o
            .get("roomId")
            .or_else(|| o.get("room"))
            .and_then(Value::as_str)
            .map(str::to_owned),
        _ => None,
    }
}

impl Conn {
    fn user(&self) -> &str {
        &self.principal.user
    }

    fn emit(&self, event: &str, arg: Value) {
        self.sio.emit("/", event, vec![arg], Vec::new());
    }

    /// Answer an event: the named reply, and the callback if it asked.
    fn answer(&self, reply: Option<&str>, body: Value, ack: Option<u64>) {
        if let Some(id) = ack {
            self.sio.ack("/", id, vec![body.clone()], Vec::new());
        }
        if let Some(event) = reply {
            self.emit(event, body);
        }
    }

    fn refuse(
        &self,
        code: impl serde::Serialize,
        message: impl ToString,
        ack: Option<u64>,
        extra: Value,
    ) {
        let mut body = json!({ "error": code, "message": message.to_string() });
        if let (Value::Object(b), Value::Object(e)) = (&mut body, extra) {
            b.extend(e);
        }
        if let Some(id) = ack {
            self.sio.ack("/", id, vec![body.clone()], Vec::new());
        }
        self.emit("error", body);
    }

    fn saved(&self) -> Saved {
        Saved {
            tenant: self.principal.tenant.to_string(),
            user: self.user().to_owned(),
            rooms: self.rooms.clone(),
            status: self.status.clone(),
            cursor: Some(self.sent_up_to.unwrap_or(self.start).to_string()),
        }
    }

    async fn run(&mut self, auth: Option<Value>) {
        let node = self.ctx.node.clone();
        // Socket.IO's recovery: the pid and offset it was given before.
        let offered_pid = auth
            .as_ref()
            .and_then(|a| a.get("pid"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        let offered_offset = auth
            .as_ref()
            .and_then(|a| a.get("offset"))
            .and_then(Value::as_str)
            .map(Cursor::parse_lenient);
        let recovered = match &offered_pid {
            Some(pid) => Box::pin(self.ctx.recovery.load(pid))
                .await
                .filter(|s| s.tenant == *self.principal.tenant && s.user == self.user()),
            None => None,
        };
        self.pid = match (&recovered, offered_pid) {
            (Some(_), Some(pid)) => pid,
            _ => random_pid(),
        };
        let sid = random_pid();
        self.sio.accept("/", &sid, Some(&self.pid));
        node.metrics.connections_opened.inc();
        node.metrics.connections_active.inc();
        tracing::info!(conn = self.session.admission.id, tenant = %self.principal.tenant, recovered = recovered.is_some(), "socket.io connected");
        Box::pin(self.session.subscribe_own_channel()).await;
        self.start = self.session.live_cursor();
        self.emit(
            "connected",
            json!({
                "connectionId": self.session.admission.id.to_string(),
                "userId": self.user(),
                "serverTime": crate::protocol::now_rfc3339(),
                "region": &*node.region,
                "interactionClasses": interaction_classes(&node, &self.principal.tenant),
                "recovered": recovered.is_some(),
            }),
        );
        if let Some(saved) = recovered {
            self.status = saved.status;
            for room in saved.rooms {
                Box::pin(self.join(&room, None)).await;
            }
            // The offset of the last event the client got; without one (it
            // got none), where it stood when its entry was last written.
            let from =
                offered_offset.or_else(|| saved.cursor.as_deref().map(Cursor::parse_lenient));
            if let Some(cursor) = from {
                Box::pin(self.replay(cursor)).await;
            }
        }
        Box::pin(self.ctx.recovery.save(&self.pid, &self.saved())).await;
        let outcome = self.serve().await;
        match outcome {
            // The client left the namespace on purpose: nothing to recover.
            Ending::Left => Box::pin(self.ctx.recovery.forget(&self.pid)).await,
            _ => Box::pin(self.ctx.recovery.save(&self.pid, &self.saved())).await,
        }
        let label = match outcome {
            Ending::Left | Ending::Gone => "client",
            Ending::SlowConsumer => "slow_consumer",
            Ending::Expired => "token_expired",
            Ending::Drained => "draining",
            Ending::TenantRemoved => "forbidden",
            Ending::RateLimited => "rate_limited",
        };
        tracing::info!(
            conn = self.session.admission.id,
            reason = label,
            "socket.io closed"
        );
        node.metrics.connections_active.dec();
        node.metrics
            .connections_closed
            .get_or_create(&vec![("reason", label)])
            .inc();
        self.sio.close();
    }

    async fn serve(&mut self) -> Ending {
        let node = self.ctx.node.clone();
        let expiry = deadline_for_expiry(self.principal.expires_at);
        let refresh_every = self.ctx.recovery.ttl() / 2;
        let mut refresh = Instant::now() + refresh_every;
        let mut drain_at = node
            .drain_state()
            .map(|d| d.deadline_for(self.session.admission.id));
        let mut control = WatchStream::from_changes(node.control());
        let mut policy_seen = node.policy();
        loop {
            let full = self.out.backlog_full();
            let timer = [Some(expiry), Some(refresh), drain_at]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or(expiry);
            tokio::select! {
                biased;
                incoming = self.sio.next() => match incoming {
                    Ok(Incoming::Event { name, args, ack, attachments, .. }) => {
                        let args = with_attachments(args, &attachments);
                        if !Box::pin(self.on_event(&name, &args, ack)).await {
                            return Ending::RateLimited;
                        }
                    }
                    Ok(Incoming::Disconnect { .. }) => return Ending::Left,
                    Ok(Incoming::Connect { nsp, .. }) => {
                        if nsp != "/" {
                            self.sio.refuse(&nsp, "Invalid namespace", None);
                        }
                    }
                    Err(_) => return Ending::Gone,
                },
                event = self.session.next_live(), if !full => match event {
                    Ok(first) => self.deliver(first),
                    Err(_) => return Ending::SlowConsumer,
                },
                () = self.out.drained(), if full => {}
                () = sleep_until(timer) => {
                    let now = Instant::now();
                    if now >= expiry {
                        self.refuse(ErrorCode::TokenExpired, "token expired; reconnect with a fresh token", None, json!({}));
                        return Ending::Expired;
                    }
                    if drain_at.is_some_and(|d| now >= d) {
                        // The engine session ends; socket.io-client
                        // reconnects (to another gateway) and recovers.
                        return Ending::Drained;
                    }
                    if now >= refresh {
                        refresh = now + refresh_every;
                        Box::pin(self.ctx.recovery.save(&self.pid, &self.saved())).await;
                    }
                }
                Some(()) = control.next() => {
                    if drain_at.is_none() {
                        drain_at = node.drain_state().map(|d| d.deadline_for(self.session.admission.id));
                    }
                    let policy = node.policy();
                    if !Arc::ptr_eq(&policy, &policy_seen) {
                        policy_seen = policy;
                        if !Box::pin(self.on_policy_change()).await {
                            return Ending::TenantRemoved;
                        }
                    }
                }
            }
        }
    }

    /// Re-check the rooms against a new policy; false when the tenant lost
    /// its policy here (the connection ends).
    async fn on_policy_change(&mut self) -> bool {
        let node = self.ctx.node.clone();
        match crate::transport::policy_changed(&mut self.session).await {
            crate::transport::PolicyChange::Unchanged => true,
            crate::transport::PolicyChange::Revoked(_)
            | crate::transport::PolicyChange::TenantRemoved(_) => {
                let held: Vec<String> = self.session.patterns().map(|p| p.to_string()).collect();
                let gone: Vec<String> = self
                    .rooms
                    .iter()
                    .filter(|r| !held.contains(r))
                    .cloned()
                    .collect();
                for room in gone {
                    self.rooms.retain(|r| *r != room);
                    self.emit(
                        "room_left",
                        json!({ "roomId": room, "reason": "revoked by policy" }),
                    );
                }
                if node.limits(&self.principal.tenant).is_err() {
                    self.refuse(
                        ErrorCode::Forbidden,
                        crate::transport::TENANT_REMOVED,
                        None,
                        json!({}),
                    );
                    return false;
                }
                true
            }
        }
    }

    /// Send `first` and what else is queued, in one write.
    fn deliver(&mut self, first: Arc<Event>) {
        let mut texts = Vec::with_capacity(4);
        self.note_sent(&first);
        texts.push(first.socketio_packet());
        while texts.len() < BATCH {
            match self.session.try_next_live() {
                Ok(Some(e)) => {
                    self.note_sent(&e);
                    texts.push(e.socketio_packet());
                }
                _ => break,
            }
        }
        self.sio.send_encoded(texts);
    }

    fn note_sent(&mut self, event: &Event) {
        if event.kind == EventKind::Stored && self.sent_up_to.is_none_or(|s| s.seq < event.id.seq) {
            self.sent_up_to = Some(event.id);
        }
    }

    /// Replay what the rooms received after `cursor`.
    async fn replay(&mut self, cursor: Cursor) {
        let mut sink = Sink {
            out: self.out.clone(),
            sio: &self.sio,
            batch: Vec::new(),
        };
        match self
            .session
            .resume(cursor, None, REPLAY_LIMIT, &mut sink)
            .await
        {
            Ok(r) => {
                sink.flush();
                if let Some(last) = r.last {
                    self.sent_up_to = Some(last);
                }
                if let Some(gap) = r.gap {
                    self.gap(gap);
                }
            }
            Err(e) => self.refuse(ErrorCode::BusUnavailable, e, None, json!({})),
        }
    }

    fn gap(&self, reason: GapReason) {
        self.refuse(
            "resume_gap",
            "events missed while disconnected are no longer in history: refresh from the source of truth",
            None,
            json!({ "reason": reason.as_str() }),
        );
    }

    /// Serve one event; false when the client exceeded its rate limit
    /// (closed, as the native protocol does).
    async fn on_event(&mut self, name: &str, args: &[Value], ack: Option<u64>) -> bool {
        if !self.rate.allow() {
            self.ctx.node.metrics.error("rate_limited");
            self.refuse(
                "rate_limited",
                "message rate limit exceeded",
                ack,
                json!({ "event": name }),
            );
            return false;
        }
        match name {
            "join_room" => match room_of(first(args)) {
                Some(room) => {
                    self.join(&room, ack).await;
                    self.ctx.recovery.save(&self.pid, &self.saved()).await;
                }
                None => self.refuse(
                    ErrorCode::InvalidTopic,
                    "join_room needs {roomId}",
                    ack,
                    json!({}),
                ),
            },
            "leave_room" => match room_of(first(args)) {
                Some(room) => {
                    self.leave(&room, ack).await;
                    self.ctx.recovery.save(&self.pid, &self.saved()).await;
                }
                None => self.refuse(
                    ErrorCode::InvalidTopic,
                    "leave_room needs {roomId}",
                    ack,
                    json!({}),
                ),
            },
            "message" => self.publish(first(args), ack).await,
            "presence_update" => self.presence(first(args), ack).await,
            "ping" => self.answer(
                Some("pong"),
                json!({ "serverTime": crate::protocol::now_rfc3339() }),
                ack,
            ),
            other => self.refuse(
                ErrorCode::UnknownMessageType,
                format!(
                    "unknown event {:?}",
                    other.chars().take(64).collect::<String>()
                ),
                ack,
                json!({}),
            ),
        }
        true
    }

    async fn join(&mut self, room: &str, ack: Option<u64>) {
        let (ok, errors) = self
            .session
            .subscribe(&[room.to_owned()], Form::Native)
            .await;
        if ok.is_empty() {
            let e = errors.into_iter().next();
            let (code, msg) = e.map_or((ErrorCode::InvalidTopic, "refused".to_owned()), |e| {
                (e.code(), e.to_string())
            });
            self.refuse(code, msg, ack, json!({ "roomId": room }));
            return;
        }
        if !self.rooms.iter().any(|r| r == room) {
            self.rooms.push(room.to_owned());
        }
        self.answer(Some("room_joined"), json!({ "roomId": room }), ack);
        if self.status.is_some() && self.has_presence(room) {
            let _ = self
                .session
                .presence_join(room, self.status.clone(), Form::Native)
                .await;
        }
    }

    async fn leave(&mut self, room: &str, ack: Option<u64>) {
        if let Ok(p) = switchboard_config::Pattern::parse(room) {
            self.session.unsubscribe(&[p]).await;
        }
        self.rooms.retain(|r| r != room);
        self.answer(Some("room_left"), json!({ "roomId": room }), ack);
    }

    fn has_presence(&self, room: &str) -> bool {
        Topic::parse(room).is_ok_and(|t| {
            self.ctx
                .node
                .policy()
                .is_presence(&self.principal.tenant, &t)
        })
    }

    /// `presence_update {status, metadata}`: member of every joined room
    /// with presence, with that info.
    async fn presence(&mut self, arg: &Value, ack: Option<u64>) {
        let Some(obj) = arg.as_object() else {
            self.refuse(
                ErrorCode::MalformedMessage,
                "presence_update needs {status, metadata?}",
                ack,
                json!({}),
            );
            return;
        };
        let mut info = serde_json::Map::new();
        for key in ["status", "metadata"] {
            if let Some(v) = obj.get(key) {
                info.insert(key.into(), v.clone());
            }
        }
        let info = Value::Object(info);
        if info.to_string().len() > crate::presence::MAX_INFO_BYTES {
            self.refuse(
                ErrorCode::MalformedMessage,
                "presence info too large",
                ack,
                json!({}),
            );
            return;
        }
        self.status = Some(info.clone());
        let rooms: Vec<String> = self
            .rooms
            .iter()
            .filter(|r| self.has_presence(r))
            .cloned()
            .collect();
        for room in &rooms {
            if let Err(e) = self
                .session
                .presence_join(room, Some(info.clone()), Form::Native)
                .await
            {
                self.refuse(e.code(), e, None, json!({ "roomId": room }));
            }
        }
        self.ctx.recovery.save(&self.pid, &self.saved()).await;
        if let Some(id) = ack {
            self.sio.ack(
                "/",
                id,
                vec![json!({ "ok": true, "rooms": rooms })],
                Vec::new(),
            );
        }
    }

    /// `message {type, roomId | recipientId | topic, payload, messageId?}`:
    /// a client publish, answered `message_ack {messageId}`.
    async fn publish(&mut self, arg: &Value, ack: Option<u64>) {
        let get = |k: &str| arg.get(k).and_then(Value::as_str);
        let topic = match (get("roomId").or(get("topic")), get("recipientId")) {
            (Some(room), _) => room.to_owned(),
            (None, Some(user)) => format!("{USER_CHANNEL_PREFIX}{user}"),
            (None, None) => {
                self.refuse(
                    ErrorCode::InvalidTopic,
                    "message needs roomId or recipientId",
                    ack,
                    json!({}),
                );
                return;
            }
        };
        let req = PublishRequest {
            event_type: topic.clone(),
            data: arg.get("payload").cloned().unwrap_or(Value::Null),
            message_type: get("type").map(str::to_owned),
            company_id: None,
            tenant: None,
            region: None,
            gdpr_context: None,
            idempotency_key: get("messageId").or(get("id")).map(str::to_owned),
        };
        let node = self.ctx.node.clone();
        match node.publish_from_client(&self.principal, req).await {
            Ok(p) => self.answer(
                Some("message_ack"),
                json!({
                    "messageId": p.event.id.to_string(),
                    "topic": topic,
                    "duplicate": p.duplicate,
                }),
                ack,
            ),
            Err(e) => {
                node.metrics.error("publish");
                self.refuse(
                    crate::transport::publish::error_code(&e),
                    e,
                    ack,
                    json!({ "topic": topic }),
                );
            }
        }
    }
}

/// How a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// The client left the namespace.
    Left,
    /// The session ended (closed, timed out, malformed).
    Gone,
    SlowConsumer,
    Expired,
    Drained,
    TenantRemoved,
    RateLimited,
}

/// A replay into the outbound queue, a page at a time, waiting while the
/// client has not taken the previous ones.
struct Sink<'a> {
    out: EngineHandle,
    sio: &'a SioSocket,
    batch: Vec<axum::extract::ws::Utf8Bytes>,
}

impl Sink<'_> {
    fn flush(&mut self) {
        if !self.batch.is_empty() {
            self.sio.send_encoded(std::mem::take(&mut self.batch));
        }
    }
}

impl ResumeSink for Sink<'_> {
    async fn gap(&mut self, _reason: GapReason, _requested: &str) -> bool {
        // Reported once the replay is done (see `Conn::gap`).
        true
    }

    async fn event(&mut self, event: &Arc<Event>) -> bool {
        if event.kind == EventKind::Stored {
            self.batch.push(event.socketio_packet());
        }
        true
    }

    async fn page_done(&mut self) -> bool {
        self.flush();
        if self.out.backlog_full() {
            self.out.drained().await;
        }
        true
    }
}

/// The interaction classes the tenant's policy uses (seed 002's A–D).
fn interaction_classes(node: &Node, tenant: &str) -> Value {
    let policy = node.policy();
    let mut classes = vec![("B", "stream")];
    if let Ok(t) = policy.tenant(tenant) {
        for rule in &t.subscribe {
            let c = match rule.class {
                InteractionClass::Presence => ("A", "presence"),
                InteractionClass::Stream => ("B", "stream"),
                InteractionClass::Interactive => ("C", "interactive"),
                InteractionClass::Critical => ("D", "critical"),
            };
            if !classes.contains(&c) {
                classes.push(c);
            }
        }
    }
    classes.sort();
    Value::Array(
        classes
            .into_iter()
            .map(|(letter, name)| {
                json!({ "class": letter, "name": name, "realtime": letter != "D" })
            })
            .collect(),
    )
}

/// Binary attachments become base64 strings where their placeholders were
/// (the gateway's events are JSON).
fn with_attachments(mut args: Vec<Value>, attachments: &[bytes::Bytes]) -> Vec<Value> {
    use base64::Engine as _;
    fn walk(v: &mut Value, att: &[bytes::Bytes], depth: usize) {
        if depth > 64 {
            return;
        }
        if let Some(Some(n)) = super::packet::placeholder(v)
            && let Some(b) = att.get(n)
        {
            *v = Value::String(base64::engine::general_purpose::STANDARD.encode(b));
            return;
        }
        match v {
            Value::Array(a) => a.iter_mut().for_each(|x| walk(x, att, depth + 1)),
            Value::Object(o) => o.values_mut().for_each(|x| walk(x, att, depth + 1)),
            _ => {}
        }
    }
    if !attachments.is_empty() {
        args.iter_mut().for_each(|a| walk(a, attachments, 0));
    }
    args
}

fn random_pid() -> String {
    use rand::Rng;
    rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(22)
        .map(char::from)
        .collect()
}
