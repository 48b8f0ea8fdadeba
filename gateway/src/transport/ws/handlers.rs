//! What each client message does on a WebSocket connection. Every answer is
//! a [`ServerMessage`]; replays go through the session's one resume path.

use std::sync::Arc;

use serde_json::Value;
use switchboard_config::Pattern;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tracing::Instrument;

use super::connection::{Connection, Flow};
use super::read::Incoming;
use super::socket::Socket;
use super::timers::{RateLimit, Tick, deadline_for_expiry};
use crate::broker::GapReason;
use crate::event::{Cursor, Event};
use crate::node::PublishRequest;
use crate::protocol::{
    ClientMessage, Close, ErrorCode, MessageProbe, PresenceFrame, PublishFrame, ServerMessage,
    SubscriptionRequest,
};
use crate::session::{Form, ResumeSink, Session};
use crate::transport::PolicyChange;

/// Events replayed for one request before `has_more` applies.
const REPLAY_LIMIT: usize = 100_000;
/// Error frames one subscribe frame may cause before the rest is summarized.
pub(super) const MAX_ERRORS_PER_FRAME: usize = 10;
/// Replayed frames written before waiting for the socket to take them.
const REPLAY_FLUSH: usize = 32;

/// A replay written straight to the socket, flushed every few frames so a
/// client that reads slowly holds the replay back instead of the gateway
/// buffering it.
struct SocketSink<'a> {
    socket: &'a mut Socket,
    session: &'a Session,
    rid: Option<&'a Value>,
    unflushed: usize,
}

impl ResumeSink for SocketSink<'_> {
    async fn gap(&mut self, reason: GapReason, requested: &str) -> bool {
        let m = ServerMessage::ResumeGap {
            reason,
            requested: requested.to_owned(),
            request_id: self.rid.cloned(),
        };
        self.socket.send_text(m.frame().into()).await.is_ok()
    }

    async fn event(&mut self, event: &Arc<Event>) -> bool {
        self.socket.feed_text(self.session.frame_for(event).into());
        self.unflushed += 1;
        if self.unflushed >= REPLAY_FLUSH {
            self.unflushed = 0;
            return self.socket.flush().await.is_ok();
        }
        true
    }

    async fn page_done(&mut self) -> bool {
        self.unflushed = 0;
        self.socket.flush().await.is_ok()
    }

    /// The caller answers right after the replay (`replay.complete`, or an
    /// error) and that write flushes what is queued: the confirmation, the
    /// replay and the answer leave in one write.
    async fn replay_done(&mut self) -> bool {
        self.unflushed = 0;
        true
    }
}

impl Connection {
    pub(super) async fn on_frame(&mut self, msg: Incoming, expiry: &mut Tick) -> Flow {
        let node = self.session.node.clone();
        let text: Utf8Bytes = match msg {
            Incoming::Text(t) => t,
            Incoming::Binary(_) => {
                if !self.rate.allow() {
                    return Flow::Close(Close::RateLimited, None);
                }
                node.metrics.error("websocket");
                return self
                    .reply(ServerMessage::error(
                        ErrorCode::BinaryNotSupported,
                        "binary frames are not supported; send JSON text frames",
                        None,
                    ))
                    .await;
            }
            Incoming::Ping(_) | Incoming::Pong => return Flow::Continue,
            Incoming::Close(_) => return Flow::Gone,
        };
        if !self.rate.allow() {
            node.metrics.error("rate_limited");
            return Flow::Close(Close::RateLimited, None);
        }
        if text.len() > self.max_bytes as usize {
            node.metrics.error("message_too_big");
            let m = ServerMessage::error(
                ErrorCode::MessageTooLarge,
                format!(
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
                    }) if !ClientMessage::TYPES.contains(&k.as_str()) => (
                        ErrorCode::UnknownMessageType,
                        format!(
                            "unknown message type {:?}",
                            k.chars().take(64).collect::<String>()
                        ),
                    ),
                    _ => (
                        ErrorCode::MalformedMessage,
                        format!("malformed message: {e}"),
                    ),
                };
                let rid = probe.and_then(|p| p.request_id);
                return self.reply(ServerMessage::error(code, message, rid)).await;
            }
        };
        match parsed {
            ClientMessage::Ping { request_id } => {
                self.reply(ServerMessage::Pong { request_id }).await
            }
            ClientMessage::Subscribe(req) => {
                let span = tracing::info_span!("subscribe", patterns = req.patterns().len() as i64);
                self.subscribe(req).instrument(span).await
            }
            ClientMessage::Unsubscribe(req) => self.on_unsubscribe(req).await,
            ClientMessage::CursorUpdate { cursor, request_id } => {
                self.on_cursor(cursor.as_deref().unwrap_or_default(), request_id)
                    .await
            }
            ClientMessage::AuthRefresh { token, request_id } => {
                self.on_refresh(&token, request_id, expiry).await
            }
            ClientMessage::Publish(frame) => self.on_publish(frame).await,
            ClientMessage::PresenceJoin(frame) => self.on_presence_join(frame).await,
            ClientMessage::PresenceLeave(frame) => {
                let topic = frame.topic().unwrap_or_default().to_owned();
                let m = if self.session.presence_leave(&topic) {
                    ServerMessage::PresenceLeft {
                        topic,
                        request_id: frame.request_id,
                    }
                } else {
                    not_a_member(&topic, frame.request_id)
                };
                self.reply(m).await
            }
            ClientMessage::PresenceHeartbeat(frame) => {
                let topic = frame.topic().unwrap_or_default();
                if self.session.presence_heartbeat(topic) {
                    Flow::Continue
                } else {
                    let m = not_a_member(topic, frame.request_id.clone());
                    self.reply(m).await
                }
            }
        }
    }

    #[tracing::instrument(name = "client_publish", skip_all)]
    async fn on_publish(&mut self, frame: PublishFrame) -> Flow {
        let node = self.session.node.clone();
        let rid = frame.request_id;
        let Some(topic) = frame.topic.or(frame.channel) else {
            let m = ServerMessage::error(
                ErrorCode::InvalidTopic,
                "publish needs 'topic' (or 'channel')",
                rid,
            );
            return self.reply(m).await;
        };
        let req = PublishRequest {
            event_type: topic,
            data: frame.data.or(frame.payload).unwrap_or(Value::Null),
            message_type: frame.message_type,
            company_id: None,
            tenant: None,
            region: None,
            gdpr_context: None,
            idempotency_key: frame.idempotency_key,
        };
        let m = match node.publish_from_client(&self.principal, req).await {
            Ok(p) => ServerMessage::PublishAck {
                event_id: p.event.id,
                topic: p.event.topic.to_string(),
                duplicate: p.duplicate,
                request_id: rid,
            },
            Err(e) => {
                node.metrics.error("publish");
                ServerMessage::error(
                    crate::transport::publish::error_code(&e),
                    e.to_string(),
                    rid,
                )
            }
        };
        self.reply(m).await
    }

    async fn on_presence_join(&mut self, frame: PresenceFrame) -> Flow {
        let form = if frame.is_channel_form() {
            Form::Channel
        } else {
            Form::Native
        };
        let topic = frame.topic().unwrap_or_default().to_owned();
        let info = frame.info.or(frame.payload);
        let rid = frame.request_id;
        let m = match self.session.presence_join(&topic, info, form).await {
            Ok(_) if form == Form::Channel => ServerMessage::Subscribed {
                channel: Some(topic),
                request_id: rid,
            },
            Ok(p) => ServerMessage::SubscriptionConfirmed {
                topics: vec![p.to_string()],
                cursor: Some(self.resume_cursor()),
                request_id: rid,
            },
            Err(e) => {
                self.session.node.metrics.error("subscription");
                ServerMessage::error(e.code(), e.to_string(), rid)
            }
        };
        self.reply(m).await
    }

    pub(super) async fn reply(&mut self, message: ServerMessage) -> Flow {
        match self.send(&message).await {
            Ok(()) => Flow::Continue,
            Err(_) => Flow::Gone,
        }
    }

    async fn subscribe(&mut self, req: SubscriptionRequest) -> Flow {
        let node = self.session.node.clone();
        let requested = req.patterns();
        let rid = req.request_id.clone();
        if requested.is_empty() {
            let m = ServerMessage::error(
                ErrorCode::InvalidTopic,
                "subscribe needs 'topics' (a list) or 'channel'",
                rid,
            );
            return self.reply(m).await;
        }
        let explicit = req.cursor.as_deref().map(Cursor::parse_lenient);
        let before: Vec<Pattern> = self.session.patterns().cloned().collect();
        let form = if req.is_channel_form() {
            Form::Channel
        } else {
            Form::Native
        };
        let (ok, errors) = self.session.subscribe(&requested, form).await;
        // One error frame per refused pattern, up to a few; the rest in one
        // summary, so a frame naming thousands of bad patterns cannot make
        // the gateway write many times its size back.
        let mut replies: Vec<ServerMessage> = errors
            .iter()
            .take(MAX_ERRORS_PER_FRAME)
            .map(|e| ServerMessage::error(e.code(), e.to_string(), rid.clone()))
            .collect();
        if let Some(first) = errors.get(MAX_ERRORS_PER_FRAME) {
            replies.push(ServerMessage::error(
                first.code(),
                format!(
                    "{} more patterns of this frame refused (the first: {first})",
                    errors.len() - MAX_ERRORS_PER_FRAME
                ),
                rid.clone(),
            ));
        }
        for _ in &errors {
            node.metrics.error("subscription");
        }
        for m in replies {
            let flow = self.reply(m).await;
            if !matches!(flow, Flow::Continue) {
                return flow;
            }
        }
        if ok.is_empty() {
            return Flow::Continue;
        }
        let confirm = if req.is_channel_form() {
            ServerMessage::Subscribed {
                channel: req.channel.clone(),
                request_id: rid.clone(),
            }
        } else {
            ServerMessage::SubscriptionConfirmed {
                topics: ok.iter().map(|p| p.as_str().to_owned()).collect(),
                cursor: Some(self.resume_cursor()),
                request_id: rid.clone(),
            }
        };
        let new: Vec<Pattern> = ok.into_iter().filter(|p| !before.contains(p)).collect();
        let resume_from = explicit
            .or_else(|| self.pending_cursor.take().map(|c| *c))
            .filter(|_| !new.is_empty());
        let Some(cursor) = resume_from else {
            let flow = self.reply(confirm).await;
            return match flow {
                Flow::Continue if req.snapshot && !new.is_empty() => {
                    self.send_snapshot(&new, rid).await
                }
                flow => flow,
            };
        };
        // A replay follows: the confirmation leaves with it, in one write
        // (the replay's answer flushes).
        self.socket.feed_text(confirm.frame().into());
        self.replay(cursor, Some(&new), rid).await
    }

    /// The newest retained event of each topic `new` matches, before any
    /// live event of those subscriptions (events after their start come
    /// live, so nothing is sent twice).
    async fn send_snapshot(&mut self, new: &[Pattern], rid: Option<Value>) -> Flow {
        let latest = match self
            .session
            .snapshot(Some(new), crate::transport::snapshot::MAX_TOPICS)
            .await
        {
            Ok(l) => l,
            Err(e) => {
                self.session.node.metrics.error("history");
                let m = ServerMessage::error(ErrorCode::HistoryUnavailable, e.to_string(), rid);
                return self.reply(m).await;
            }
        };
        let mut sink = SocketSink {
            socket: &mut self.socket,
            session: &self.session,
            rid: rid.as_ref(),
            unflushed: 0,
        };
        for event in &latest.events {
            if !sink.event(event).await {
                return Flow::Gone;
            }
        }
        if !sink.page_done().await {
            return Flow::Gone;
        }
        self.session
            .node
            .metrics
            .events_delivered
            .inc_by(latest.events.len() as u64);
        Flow::Continue
    }

    #[tracing::instrument(name = "unsubscribe", skip_all)]
    async fn on_unsubscribe(&mut self, req: SubscriptionRequest) -> Flow {
        let patterns: Vec<Pattern> = req
            .patterns()
            .iter()
            .filter_map(|p| Pattern::parse(p).ok())
            .collect();
        let removed = self.session.unsubscribe(&patterns).await;
        let m = if req.is_channel_form() {
            ServerMessage::Unsubscribed {
                channel: req.channel,
                request_id: req.request_id,
            }
        } else {
            ServerMessage::UnsubscriptionConfirmed {
                topics: removed.iter().map(|p| p.as_str().to_owned()).collect(),
                request_id: req.request_id,
            }
        };
        self.reply(m).await
    }

    async fn on_cursor(&mut self, raw: &str, rid: Option<Value>) -> Flow {
        // Not one of ours (e.g. a uuid from the replaced system) is an
        // unknown cursor: the client is told, then gets what is retained.
        let cursor = Cursor::parse_lenient(raw);
        if self.session.subscription_count() == 0 {
            self.pending_cursor = Some(Box::new(cursor));
            return self
                .reply(ServerMessage::CursorConfirmed {
                    cursor,
                    request_id: rid,
                })
                .await;
        }
        self.replay(cursor, None, rid).await
    }

    /// Send what the user's private channel carried after `after` and
    /// before it was held (see [`Session::catch_up_own_channel`]); false
    /// when the client left.
    pub(super) async fn catch_up_own_channel(&mut self, after: Cursor) -> bool {
        let mut sink = SocketSink {
            socket: &mut self.socket,
            session: &self.session,
            rid: None,
            unflushed: 0,
        };
        match self
            .session
            .catch_up_own_channel(after, REPLAY_LIMIT, &mut sink)
            .await
        {
            Ok(caught_up) => {
                if let Some(id) = caught_up.last {
                    self.note_sent(id);
                }
                if caught_up.gap.is_none() && !caught_up.truncated {
                    self.session.own_channel_caught_up(after);
                }
                !caught_up.stopped
            }
            Err(e) => {
                // Live delivery goes on; only the window is lost.
                tracing::warn!(error = %e, "private channel catch-up failed");
                self.session.node.metrics.error("history");
                true
            }
        }
    }

    /// Replay after `cursor`, then tell the client where it stands.
    #[tracing::instrument(name = "replay", skip_all, fields(replayed = tracing::field::Empty, gap = tracing::field::Empty))]
    async fn replay(
        &mut self,
        cursor: Cursor,
        only: Option<&[Pattern]>,
        rid: Option<Value>,
    ) -> Flow {
        let mut sink = SocketSink {
            socket: &mut self.socket,
            session: &self.session,
            rid: rid.as_ref(),
            unflushed: 0,
        };
        let result = self
            .session
            .resume(cursor, only, REPLAY_LIMIT, &mut sink)
            .await;
        let resumed = match result {
            Ok(r) => r,
            Err(e) => {
                let m = ServerMessage::error(ErrorCode::HistoryUnavailable, e.to_string(), rid);
                return self.reply(m).await;
            }
        };
        if resumed.stopped {
            return Flow::Gone;
        }
        let span = tracing::Span::current();
        span.record("replayed", resumed.sent);
        if let Some(gap) = resumed.gap {
            span.record("gap", gap.as_str());
        }
        // A complete replay covers its subscriptions up to where live
        // delivery took over.
        if !resumed.truncated
            && let Some(id) = resumed.last
        {
            self.note_sent(id);
        }
        let done = ServerMessage::ReplayComplete {
            replayed: resumed.sent,
            cursor: resumed.last.unwrap_or_else(|| self.session.live_cursor()),
            has_more: resumed.truncated,
            request_id: rid,
        };
        self.reply(done).await
    }

    async fn on_refresh(&mut self, token: &str, rid: Option<Value>, expiry: &mut Tick) -> Flow {
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
                *expiry = Tick::at(deadline_for_expiry(p.expires_at));
                self.principal = p;
                ServerMessage::AuthRefreshed {
                    expires_at: self.principal.expires_at,
                    request_id: rid,
                }
            }
            Err(e) => {
                node.metrics.error("auth");
                ServerMessage::error(
                    ErrorCode::AuthRefreshFailed,
                    format!("token refresh refused: {e}"),
                    rid,
                )
            }
        };
        self.reply(m).await
    }

    pub(super) async fn on_policy_change(&mut self) -> Flow {
        match crate::transport::policy_changed(&mut self.session).await {
            PolicyChange::TenantRemoved(m) => {
                let _ = self.send(&m).await;
                Flow::Close(Close::Forbidden, None)
            }
            change => {
                if let Ok(limits) = self.session.node.limits(&self.principal.tenant) {
                    self.rate = RateLimit::new(limits.messages_per_minute);
                    self.max_bytes = super::connection::clamp_u32(limits.max_message_bytes);
                }
                match change {
                    PolicyChange::Revoked(m) => self.reply(m).await,
                    _ => Flow::Continue,
                }
            }
        }
    }
}

fn not_a_member(topic: &str, rid: Option<Value>) -> ServerMessage {
    ServerMessage::error(
        ErrorCode::InvalidTopic,
        format!(
            "not a member of presence topic {:?} (send presence.join first)",
            topic.chars().take(255).collect::<String>()
        ),
        rid,
    )
}
