//! The WebSocket transport: upgrade, authentication, and the per-connection
//! state machine of the native protocol.
//!
//! One task per connection `select!`s over: the mailbox (events from the hub,
//! written in batches; also the slow-consumer verdict), frames from the
//! client, one timer (heartbeat, idle timeout, token expiry and drain
//! deadline share it), policy changes and drain. Everything it waits on
//! lives across loop turns, so a delivery costs one wake-up and one poll of
//! each; the rarely used request handlers are boxed so they do not inflate
//! the state every idle connection keeps (see docs/benchmarks.md).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};
use switchboard_config::Pattern;
use tokio::time::{Instant, sleep_until};
use tokio_stream::wrappers::WatchStream;
use tracing::Instrument;

use crate::auth::Principal;
use crate::event::Cursor;
use crate::node::{Node, valid_region};
use crate::protocol::{
    ClientMessage, Close, ErrorCode, MessageProbe, SubscriptionRequest, error_message, now_rfc3339,
    server_message,
};
use crate::session::{Session, SubscribeError};

/// Read buffer per connection. Clients send small control messages; a
/// larger frame grows the buffer for as long as it takes to read it.
/// tungstenite's default (128 KiB) would make an idle connection cost far
/// more than its state.
const READ_BUFFER: usize = 128;
/// Frames are collected up to this size and written with one syscall.
const WRITE_BUFFER: usize = 8 * 1024;
/// Events written per flush.
const WRITE_BATCH: usize = 64;
/// Events replayed in one go for one request before `has_more` applies.
const REPLAY_LIMIT: usize = 100_000;

#[derive(Debug, Deserialize)]
pub struct WsParams {
    token: Option<String>,
    company_id: Option<String>,
    /// Extension: resume the first subscriptions from this cursor.
    cursor: Option<String>,
    /// Extension: only events from this region.
    region: Option<String>,
}

/// Error frames one subscribe frame may cause before the rest is summarized.
const MAX_ERRORS_PER_FRAME: usize = 10;

/// What a request says about the page that made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin<'a> {
    /// No `Origin` header: not a browser (browsers always send one on a
    /// WebSocket upgrade).
    Absent,
    One(&'a str),
    /// Several `Origin` headers, or one that is not visible ASCII: never a
    /// browser's, and never checked by guessing which one counts.
    Malformed,
}

impl<'a> Origin<'a> {
    pub fn of(headers: &'a HeaderMap) -> Self {
        let mut values = headers.get_all(axum::http::header::ORIGIN).iter();
        match (values.next(), values.next()) {
            (None, _) => Origin::Absent,
            (Some(_), Some(_)) => Origin::Malformed,
            (Some(v), None) => match v.to_str() {
                Ok(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic()) => Origin::One(s),
                _ => Origin::Malformed,
            },
        }
    }
}

/// Is this `Origin` allowed to open a WebSocket?
pub fn origin_allowed(allowed: &[String], origin: Origin<'_>) -> bool {
    let any = allowed.iter().any(|a| a == "*");
    match origin {
        Origin::Absent => true,
        Origin::One(o) => any || allowed.iter().any(|a| a.eq_ignore_ascii_case(o)),
        Origin::Malformed => false,
    }
}

pub async fn upgrade(
    State(node): State<Arc<Node>>,
    super::JsonQuery(params): super::JsonQuery<WsParams>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    if !origin_allowed(&node.config.allowed_origins, Origin::of(&headers)) {
        node.metrics
            .connections_rejected
            .get_or_create(&vec![("reason", "origin")])
            .inc();
        return super::error_response(
            StatusCode::FORBIDDEN,
            "origin_not_allowed",
            "origin not allowed",
        );
    }
    if node.draining() {
        node.metrics
            .connections_rejected
            .get_or_create(&vec![("reason", "draining")])
            .inc();
        return super::error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            "this gateway is draining; connect to another one",
        );
    }
    let auth = super::authenticate(
        &node,
        &headers,
        params.token.as_deref(),
        params.company_id.as_deref(),
    )
    .await;
    let max = node.config.limits.max_message_bytes as usize;
    ws.read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| {
            let span = tracing::info_span!(
                "ws.connection",
                otel.kind = "server",
                conn = tracing::field::Empty,
                tenant = tracing::field::Empty,
                close_code = tracing::field::Empty,
                trace_id = tracing::field::Empty,
            );
            if let Some(id) = crate::telemetry::trace_id(&span) {
                span.record("trace_id", id);
            }
            async move {
                let principal = match auth {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::info!(reason = %e, "websocket rejected: unauthorized");
                        node.metrics
                            .connections_rejected
                            .get_or_create(&vec![("reason", "unauthorized")])
                            .inc();
                        node.metrics.error("auth");
                        return reject(socket, Close::Unauthorized, &e.to_string()).await;
                    }
                };
                let admission = match node.admit(&principal) {
                    Ok(a) => a,
                    Err(close) => {
                        node.metrics
                            .connections_rejected
                            .get_or_create(&vec![("reason", close.label())])
                            .inc();
                        return reject(socket, close, close.reason()).await;
                    }
                };
                let region = params.region.filter(|r| valid_region(r)).map(Arc::from);
                let session = Session::new(
                    node.clone(),
                    admission,
                    principal.tenant.clone(),
                    region,
                    node.config.limits.outbound_queue,
                );
                let cursor = params.cursor.as_deref().map(Cursor::parse_lenient);
                let span = tracing::Span::current();
                span.record(
                    "conn",
                    i64::try_from(session.admission.id).unwrap_or(i64::MAX),
                );
                if node.metrics.tenant_labels() {
                    span.record("tenant", &*principal.tenant);
                }
                tracing::info!("authenticated");
                // Its own task: the upgrade future (request data, the auth
                // result) is freed now instead of living as long as the
                // connection.
                // Not instrumented as a whole: the span is entered around the
                // handlers, not on every poll of the delivery path.
                tokio::spawn(Connection::open(session, principal, cursor, socket, span).run());
            }
            .instrument(span.clone())
        })
}

async fn reject(mut socket: WebSocket, close: Close, detail: &str) {
    tracing::Span::current().record("close_code", i64::from(close.code()));
    let reason: String = format!("{}: {detail}", close.reason())
        .chars()
        .take(120)
        .collect();
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code: close.code(),
            reason: reason.into(),
        })))
        .await;
}

/// Allows `messages_per_minute` with bursts of a tenth of that.
struct RateLimit {
    tokens: f64,
    capacity: f64,
    per_sec: f64,
    at: Instant,
}

impl RateLimit {
    fn new(per_minute: u32) -> Self {
        let capacity = (f64::from(per_minute) / 10.0).max(10.0);
        Self {
            tokens: capacity,
            capacity,
            per_sec: f64::from(per_minute) / 60.0,
            at: Instant::now(),
        }
    }
    fn allow(&mut self) -> bool {
        let now = Instant::now();
        let elapsed = now.duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + elapsed * self.per_sec).min(self.capacity);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

enum Flow {
    Continue,
    /// Close with this code (and a detail for the reason, if any).
    Close(Close, Option<String>),
    /// The client closed or vanished: send nothing more.
    Gone,
}

struct Connection {
    session: Session,
    principal: Principal,
    socket: WebSocket,
    /// A cursor to apply to the first subscriptions (from `?cursor=` or a
    /// `cursor.update` sent before any subscription).
    pending_cursor: Option<Cursor>,
    /// Every event of the subscriptions up to this one was sent: where a
    /// client told to reconnect resumes (None: nothing sent yet).
    sent_up_to: Option<Cursor>,
    /// `ws.connection`, entered while a handler runs.
    span: tracing::Span,
    rate: RateLimit,
    max_bytes: usize,
}

fn unix_now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

/// The deadlines one connection keeps; a single timer waits for the nearest.
struct Deadlines {
    ping: Instant,
    ping_interval: Duration,
    /// Closed when the client has sent nothing (not even a pong) until then.
    idle: Instant,
    idle_timeout: Duration,
    expiry: Instant,
    drain: Option<Instant>,
}

impl Deadlines {
    fn new(hb: &switchboard_config::gateway::HeartbeatConfig, expiry: Instant) -> Self {
        let now = Instant::now();
        let ping_interval = Duration::from_secs(hb.ping_interval_seconds);
        let idle_timeout = Duration::from_secs(hb.idle_timeout_seconds);
        Self {
            ping: now + ping_interval,
            ping_interval,
            idle: now + idle_timeout,
            idle_timeout,
            expiry,
            drain: None,
        }
    }

    /// Take the drain's deadline for this connection, once; true when it
    /// was just set.
    fn arm_drain(&mut self, drain: Option<crate::node::Drain>, conn: crate::hub::ConnId) -> bool {
        match (self.drain, drain) {
            (None, Some(d)) => {
                self.drain = Some(d.deadline_for(conn));
                true
            }
            _ => false,
        }
    }

    fn next(&self) -> Instant {
        let soonest = self.ping.min(self.idle).min(self.expiry);
        self.drain.map_or(soonest, |d| d.min(soonest))
    }
}

/// When a token with this `exp` expires; capped at a year so an absurd
/// claim cannot overflow the clock.
fn deadline_for_expiry(exp: u64) -> Instant {
    const YEAR: u64 = 365 * 24 * 3600;
    Instant::now() + Duration::from_secs(exp.saturating_sub(unix_now()).min(YEAR))
}

impl Connection {
    /// Set the connection up; `run` then serves it.
    fn open(
        session: Session,
        principal: Principal,
        cursor: Option<Cursor>,
        socket: WebSocket,
        span: tracing::Span,
    ) -> Self {
        let node = session.node.clone();
        let limits = node.limits(&principal.tenant).ok();
        let conn = Connection {
            rate: RateLimit::new(limits.map_or(node.config.limits.messages_per_minute, |l| {
                l.messages_per_minute
            })),
            max_bytes: limits.map_or(node.config.limits.max_message_bytes, |l| {
                l.max_message_bytes
            }) as usize,
            session,
            principal,
            socket,
            pending_cursor: cursor,
            sent_up_to: None,
            span,
        };
        node.metrics.connections_opened.inc();
        node.metrics.connections_active.inc();
        let conn_id = conn.session.admission.id;
        conn.span.in_scope(|| {
            tracing::info!(conn = conn_id, tenant = %conn.principal.tenant, "websocket connected");
        });
        conn
    }

    /// The connection's task. Not an `async fn`: its argument would be kept
    /// twice in the task's state (once as the argument, once as the local it
    /// is moved to); captured by the block, it is kept once.
    #[allow(clippy::manual_async_fn)]
    fn run(mut self) -> impl std::future::Future<Output = ()> + Send {
        async move {
            let close = self.serve().await;
            // Boxed: the goodbye's state would otherwise be reserved in
            // every connection's task for its whole life.
            let span = self.span.clone();
            Box::pin(self.finish(close).instrument(span)).await;
        }
    }

    /// Say goodbye (close frame and closing handshake) and leave the hub.
    async fn finish(mut self, close: Option<(Close, Option<String>)>) {
        let node = self.session.node.clone();
        let conn_id = self.session.admission.id;
        let label = close.as_ref().map_or("client", |c| c.0.label());
        if let Some((close, detail)) = close {
            tracing::Span::current().record("close_code", i64::from(close.code()));
            let reason: String = detail
                .unwrap_or_else(|| close.reason().to_owned())
                .chars()
                .take(120)
                .collect();
            let frame = Message::Close(Some(CloseFrame {
                code: close.code(),
                reason: reason.into(),
            }));
            // The closing handshake: send ours, then read (and drop) what
            // the client still sends until its close. Dropping the socket
            // with unread data would reset the connection and lose our close
            // frame (and its code) on the way. The peer may be gone or not
            // reading (slow consumer): the goodbye is bounded.
            let goodbye = async {
                self.socket.send(frame).await?;
                while let Some(Ok(_)) = self.socket.next().await {}
                Ok::<_, axum::Error>(())
            };
            let _ = tokio::time::timeout(Duration::from_secs(1), goodbye).await;
        }
        tracing::info!(conn = conn_id, reason = label, "websocket closed");
        node.metrics.connections_active.dec();
        node.metrics
            .connections_closed
            .get_or_create(&vec![("reason", label)])
            .inc();
        self.session.close().await;
    }

    /// The connection loop; returns the close to send, or None when the
    /// client left.
    async fn serve(&mut self) -> Option<(Close, Option<String>)> {
        let node = self.session.node.clone();
        let mailbox = self.session.mailbox.clone();
        let mut clock = Deadlines::new(
            &node.config.heartbeat,
            deadline_for_expiry(self.principal.expires_at),
        );
        let timer = sleep_until(clock.next());
        tokio::pin!(timer);
        // Policy changes and the drain arrive as ticks of one watch.
        let mut control = WatchStream::from_changes(node.control());
        let mut policy_seen = node.policy();
        // A drain already under way counts.
        if clock.arm_drain(node.drain_state(), self.session.admission.id) {
            timer.as_mut().reset(clock.next());
        }

        let established = server_message(
            "connection.established",
            json!({
                "user_id": self.principal.user,
                "connection_id": self.session.admission.id.to_string(),
                "server_time": now_rfc3339(),
                "region": &*node.region,
                "expires_at": self.principal.expires_at,
            }),
            None,
        );
        if self.send_text(established).await.is_err() {
            return None;
        }

        loop {
            let flow = tokio::select! {
                biased;
                event = self.session.next_live() => match event {
                    Ok(first) => {
                        // Write a batch; a blocked write loses to the kick.
                        let kicked = tokio::select! {
                            biased;
                            () = mailbox.kicked() => true,
                            r = self.write_batch(first) => {
                                if r.is_err() { return None; }
                                false
                            }
                        };
                        if kicked { Flow::Close(Close::SlowConsumer, None) } else { Flow::Continue }
                    }
                    Err(_overflowed) => Flow::Close(Close::SlowConsumer, None),
                },
                frame = self.socket.next() => {
                    // The timer is not moved: when it fires early it re-arms.
                    clock.idle = Instant::now() + clock.idle_timeout;
                    match frame {
                        None => return None,
                        Some(Err(e)) => {
                            if is_capacity_error(&e) {
                                node.metrics.error("message_too_big");
                                Flow::Close(Close::MessageTooBig, None)
                            } else {
                                self.span.in_scope(|| tracing::debug!(error = %e, "websocket read error"));
                                node.metrics.error("websocket");
                                return None;
                            }
                        }
                        Some(Ok(msg)) => {
                            let before = clock.expiry;
                            let span = self.span.clone();
                            let flow = Box::pin(self.on_frame(msg, &mut clock.expiry).instrument(span)).await;
                            if clock.expiry != before {
                                timer.as_mut().reset(clock.next());
                            }
                            flow
                        }
                    }
                }
                () = &mut timer => {
                    let span = self.span.clone();
                    let flow = Box::pin(self.on_timer(&mut clock).instrument(span)).await;
                    timer.as_mut().reset(clock.next());
                    flow
                }
                Some(()) = control.next() => {
                    if clock.arm_drain(node.drain_state(), self.session.admission.id) {
                        timer.as_mut().reset(clock.next());
                    }
                    let policy = node.policy();
                    if Arc::ptr_eq(&policy, &policy_seen) {
                        Flow::Continue
                    } else {
                        policy_seen = policy;
                        let span = self.span.clone();
                        Box::pin(self.on_policy_change().instrument(span)).await
                    }
                }
            };
            match flow {
                Flow::Continue => {}
                Flow::Close(close, detail) => return Some((close, detail)),
                Flow::Gone => return None,
            }
        }
    }

    /// The connection's timer fired: whichever deadlines have passed act.
    async fn on_timer(&mut self, clock: &mut Deadlines) -> Flow {
        let now = Instant::now();
        if now >= clock.expiry {
            let msg = error_message(
                ErrorCode::TokenExpired,
                "token expired; reconnect with a fresh token or send auth.refresh before expiry",
                None,
            );
            let _ = self.send_text(msg).await;
            return Flow::Close(Close::Unauthorized, Some("token expired".into()));
        }
        if clock.drain.is_some_and(|d| now >= d) {
            let msg = server_message(
                "reconnect",
                json!({
                    "reason": "draining",
                    "cursor": self.resume_cursor().to_string(),
                    "timestamp": now_rfc3339(),
                }),
                None,
            );
            let _ = self.send_text(msg).await;
            return Flow::Close(Close::ServiceRestart, None);
        }
        if now >= clock.idle {
            return Flow::Close(Close::IdleTimeout, None);
        }
        if now >= clock.ping {
            clock.ping = now + clock.ping_interval;
            if self
                .socket
                .send(Message::Ping(Default::default()))
                .await
                .is_err()
            {
                return Flow::Gone;
            }
        }
        Flow::Continue
    }

    async fn send_text(&mut self, text: String) -> Result<(), axum::Error> {
        self.socket.send(Message::Text(text.into())).await
    }

    fn note_sent(&mut self, id: Cursor) {
        if self.sent_up_to.is_none_or(|s| s.seq < id.seq) {
            self.sent_up_to = Some(id);
        }
    }

    /// Where this client resumes without missing or repeating anything.
    fn resume_cursor(&self) -> Cursor {
        self.sent_up_to
            .unwrap_or_else(|| self.session.live_cursor())
    }

    /// Write `first` and whatever else is queued (up to a batch), then
    /// flush: a busy connection gets many events per syscall.
    async fn write_batch(&mut self, first: Arc<crate::event::Event>) -> Result<(), axum::Error> {
        self.socket.feed(Message::Text(first.frame.clone())).await?;
        self.note_sent(first.id);
        for _ in 1..WRITE_BATCH {
            match self.session.try_next_live() {
                Ok(Some(ev)) => {
                    self.socket.feed(Message::Text(ev.frame.clone())).await?;
                    self.note_sent(ev.id);
                }
                // An overflow is seen by the next turn of the loop.
                _ => break,
            }
        }
        self.socket.flush().await
    }

    async fn on_frame(&mut self, msg: Message, expiry: &mut Instant) -> Flow {
        let node = self.session.node.clone();
        let text: Utf8Bytes = match msg {
            Message::Text(t) => t,
            Message::Binary(_) => {
                if !self.rate.allow() {
                    return Flow::Close(Close::RateLimited, None);
                }
                node.metrics.error("websocket");
                let m = error_message(
                    ErrorCode::BinaryNotSupported,
                    "binary frames are not supported; send JSON text frames",
                    None,
                );
                return self.reply(m).await;
            }
            Message::Ping(_) | Message::Pong(_) => return Flow::Continue,
            Message::Close(_) => return Flow::Gone,
        };
        if !self.rate.allow() {
            node.metrics.error("rate_limited");
            return Flow::Close(Close::RateLimited, None);
        }
        if text.len() > self.max_bytes {
            node.metrics.error("message_too_big");
            let m = error_message(
                ErrorCode::MessageTooLarge,
                &format!(
                    "message of {} bytes exceeds the limit of {}",
                    text.len(),
                    self.max_bytes
                ),
                None,
            );
            return self.reply(m).await;
        }
        let parsed: ClientMessage = match serde_json::from_str(&text) {
            Ok(m) => m,
            Err(e) => {
                node.metrics.error("websocket");
                let probe: Option<MessageProbe> = serde_json::from_str(&text).ok();
                let (code, message) = match &probe {
                    Some(MessageProbe {
                        kind: Some(Value::String(k)),
                        ..
                    }) if ![
                        "subscribe",
                        "unsubscribe",
                        "cursor.update",
                        "ping",
                        "auth.refresh",
                    ]
                    .contains(&k.as_str()) =>
                    {
                        (
                            ErrorCode::UnknownMessageType,
                            format!(
                                "unknown message type {:?}",
                                k.chars().take(64).collect::<String>()
                            ),
                        )
                    }
                    _ => (
                        ErrorCode::MalformedMessage,
                        format!("malformed message: {e}"),
                    ),
                };
                let rid = probe.and_then(|p| p.request_id);
                return self
                    .reply(error_message(code, &message, rid.as_ref()))
                    .await;
            }
        };
        match parsed {
            ClientMessage::Ping { request_id } => {
                let m = server_message(
                    "pong",
                    json!({ "timestamp": now_rfc3339() }),
                    request_id.as_ref(),
                );
                self.reply(m).await
            }
            ClientMessage::Subscribe(req) => self.on_subscribe(req).await,
            ClientMessage::Unsubscribe(req) => self.on_unsubscribe(req).await,
            ClientMessage::CursorUpdate { cursor, request_id } => {
                self.on_cursor(cursor.as_deref().unwrap_or_default(), request_id)
                    .await
            }
            ClientMessage::AuthRefresh { token, request_id } => {
                self.on_refresh(&token, request_id, expiry).await
            }
        }
    }

    async fn reply(&mut self, text: String) -> Flow {
        match self.send_text(text).await {
            Ok(()) => Flow::Continue,
            Err(_) => Flow::Gone,
        }
    }

    async fn on_subscribe(&mut self, req: SubscriptionRequest) -> Flow {
        let span = tracing::info_span!("subscribe", patterns = req.patterns().len() as i64);
        self.subscribe(req).instrument(span).await
    }

    async fn subscribe(&mut self, req: SubscriptionRequest) -> Flow {
        let node = self.session.node.clone();
        let requested = req.patterns();
        let rid = req.request_id.clone();
        if requested.is_empty() {
            let m = error_message(
                ErrorCode::InvalidTopic,
                "subscribe needs 'topics' (a list) or 'channel'",
                rid.as_ref(),
            );
            return self.reply(m).await;
        }
        let explicit = req.cursor.as_deref().map(Cursor::parse_lenient);
        let before: Vec<Pattern> = self.session.patterns().cloned().collect();
        let (ok, errors) = self.session.subscribe(&requested).await;
        let code_of = |e: &SubscribeError| match e {
            SubscribeError::Invalid(..) => ErrorCode::InvalidTopic,
            SubscribeError::Denied(_) => ErrorCode::TopicNotAllowed,
            SubscribeError::TooMany(_) => ErrorCode::TooManySubscriptions,
            SubscribeError::Unavailable(_) => ErrorCode::BusUnavailable,
        };
        // One error frame per refused pattern, up to a few; the rest in one
        // summary, so a frame naming thousands of bad patterns cannot make
        // the gateway write many times its size back.
        let mut replies: Vec<(ErrorCode, String)> = errors
            .iter()
            .take(MAX_ERRORS_PER_FRAME)
            .map(|e| (code_of(e), e.to_string()))
            .collect();
        if let Some(first) = errors.get(MAX_ERRORS_PER_FRAME) {
            replies.push((
                code_of(first),
                format!(
                    "{} more patterns of this frame refused (the first: {first})",
                    errors.len() - MAX_ERRORS_PER_FRAME
                ),
            ));
        }
        for _ in &errors {
            node.metrics.error("subscription");
        }
        for (code, message) in replies {
            let flow = self
                .reply(error_message(code, &message, rid.as_ref()))
                .await;
            if !matches!(flow, Flow::Continue) {
                return flow;
            }
        }
        if ok.is_empty() {
            return Flow::Continue;
        }
        let topics: Vec<&str> = ok.iter().map(Pattern::as_str).collect();
        let confirm = if req.is_channel_form() {
            json!({
                "type": "subscribed",
                "channel": req.channel,
                "requestId": rid,
                "timestamp": time::OffsetDateTime::now_utc().unix_timestamp() * 1000,
            })
            .to_string()
        } else {
            server_message(
                "subscription.confirmed",
                json!({ "topics": topics, "timestamp": now_rfc3339() }),
                rid.as_ref(),
            )
        };
        let flow = self.reply(confirm).await;
        if !matches!(flow, Flow::Continue) {
            return flow;
        }
        let new: Vec<Pattern> = ok.into_iter().filter(|p| !before.contains(p)).collect();
        match explicit.or_else(|| self.pending_cursor.take()) {
            Some(cursor) if !new.is_empty() => self.replay(cursor, Some(&new), rid).await,
            _ => Flow::Continue,
        }
    }

    #[tracing::instrument(name = "unsubscribe", skip_all)]
    async fn on_unsubscribe(&mut self, req: SubscriptionRequest) -> Flow {
        let patterns: Vec<Pattern> = req
            .patterns()
            .iter()
            .filter_map(|p| Pattern::parse(p).ok())
            .collect();
        let removed = self.session.unsubscribe(&patterns).await;
        let topics: Vec<&str> = removed.iter().map(Pattern::as_str).collect();
        let m = if req.is_channel_form() {
            json!({ "type": "unsubscribed", "channel": req.channel, "requestId": req.request_id })
                .to_string()
        } else {
            server_message(
                "unsubscription.confirmed",
                json!({ "topics": topics, "timestamp": now_rfc3339() }),
                req.request_id.as_ref(),
            )
        };
        self.reply(m).await
    }

    async fn on_cursor(&mut self, raw: &str, rid: Option<Value>) -> Flow {
        // Not one of ours (e.g. a uuid from the replaced system) is an
        // unknown cursor: the client is told, then gets what is retained.
        let cursor = Cursor::parse_lenient(raw);
        if self.session.subscription_count() == 0 {
            self.pending_cursor = Some(cursor);
            let m = server_message(
                "cursor.confirmed",
                json!({ "cursor": cursor.to_string(), "pending": true, "timestamp": now_rfc3339() }),
                rid.as_ref(),
            );
            return self.reply(m).await;
        }
        self.replay(cursor, None, rid).await
    }

    /// Replay after `cursor`, then tell the client where it stands.
    #[tracing::instrument(name = "replay", skip_all, fields(replayed = tracing::field::Empty, gap = tracing::field::Empty))]
    async fn replay(
        &mut self,
        cursor: Cursor,
        only: Option<&[Pattern]>,
        rid: Option<Value>,
    ) -> Flow {
        let node = self.session.node.clone();
        let requested = if cursor == Cursor::FOREIGN {
            String::new()
        } else {
            cursor.to_string()
        };
        let mut frames = Vec::new();
        let mut last = None;
        let result = self
            .session
            .replay(cursor, only, REPLAY_LIMIT, |e| {
                frames.push(e.frame.clone());
                last = Some(e.id);
                true
            })
            .await;
        let replayed = match result {
            Ok(r) => r,
            Err(e) => {
                node.metrics.error("history");
                let m = server_message(
                    "error",
                    json!({ "message": e.to_string(), "code": "history_unavailable", "timestamp": now_rfc3339() }),
                    rid.as_ref(),
                );
                return self.reply(m).await;
            }
        };
        let span = tracing::Span::current();
        span.record("replayed", replayed.sent);
        if let Some(gap) = replayed.gap {
            span.record("gap", gap.as_str());
            node.metrics
                .resumes
                .get_or_create(&vec![("outcome", "gap")])
                .inc();
            let m = server_message(
                "resume.gap",
                json!({
                    "reason": gap.as_str(),
                    "requested": requested,
                    "message": "events after this cursor are no longer available; refresh your state",
                    "timestamp": now_rfc3339(),
                }),
                rid.as_ref(),
            );
            let flow = self.reply(m).await;
            if !matches!(flow, Flow::Continue) {
                return flow;
            }
        } else {
            node.metrics
                .resumes
                .get_or_create(&vec![("outcome", "replayed")])
                .inc();
        }
        node.metrics.events_delivered.inc_by(frames.len() as u64);
        for f in frames {
            if self.socket.feed(Message::Text(f)).await.is_err() {
                return Flow::Gone;
            }
        }
        // A complete replay covers its subscriptions up to where live
        // delivery took over.
        if !replayed.truncated
            && let Some(id) = last
        {
            self.note_sent(id);
        }
        let done = server_message(
            "replay.complete",
            json!({
                "replayed": replayed.sent,
                "cursor": last.unwrap_or_else(|| self.session.live_cursor()).to_string(),
                "has_more": replayed.truncated,
                "timestamp": now_rfc3339(),
            }),
            rid.as_ref(),
        );
        self.reply(done).await
    }

    async fn on_refresh(&mut self, token: &str, rid: Option<Value>, expiry: &mut Instant) -> Flow {
        let node = self.session.node.clone();
        let result = node.verifier.verify(token).await.and_then(|p| {
            if p.tenant != self.principal.tenant || p.user != self.principal.user {
                Err(crate::auth::AuthError::TenantMismatch)
            } else {
                Ok(p)
            }
        });
        let m = match result {
            Ok(p) => {
                *expiry = deadline_for_expiry(p.expires_at);
                self.principal = p;
                server_message(
                    "auth.refreshed",
                    json!({ "expires_at": self.principal.expires_at, "timestamp": now_rfc3339() }),
                    rid.as_ref(),
                )
            }
            Err(e) => {
                node.metrics.error("auth");
                error_message(
                    ErrorCode::AuthRefreshFailed,
                    &format!("token refresh refused: {e}"),
                    rid.as_ref(),
                )
            }
        };
        self.reply(m).await
    }

    async fn on_policy_change(&mut self) -> Flow {
        let node = self.session.node.clone();
        let limits = match node.limits(&self.principal.tenant) {
            Ok(l) => l,
            Err(_) => {
                let m = server_message(
                    "subscription.revoked",
                    json!({
                        "topics": self.session.patterns().map(Pattern::as_str).collect::<Vec<_>>(),
                        "reason": "the tenant no longer has a policy on this gateway",
                        "timestamp": now_rfc3339(),
                    }),
                    None,
                );
                let _ = self.send_text(m).await;
                return Flow::Close(Close::Forbidden, None);
            }
        };
        self.rate = RateLimit::new(limits.messages_per_minute);
        self.max_bytes = limits.max_message_bytes as usize;
        let revoked = self.session.enforce_policy().await;
        if revoked.is_empty() {
            return Flow::Continue;
        }
        let m = server_message(
            "subscription.revoked",
            json!({
                "topics": revoked.iter().map(|(p, _)| p.as_str()).collect::<Vec<_>>(),
                "reason": revoked.first().map(|(_, d)| d.to_string()),
                "timestamp": now_rfc3339(),
            }),
            None,
        );
        self.reply(m).await
    }
}

/// Did the read fail because a frame or message exceeded the size limit?
fn is_capacity_error(e: &axum::Error) -> bool {
    use tokio_tungstenite::tungstenite::Error;
    matches!(
        std::error::Error::source(e).and_then(|s| s.downcast_ref::<Error>()),
        Some(Error::Capacity(_))
    )
}
