//! One WebSocket connection: its state, the loop that serves it, the
//! batched writer and the goodbye.

use std::future::poll_fn;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::sleep_until;
use tracing::Instrument;

use super::socket::{OpCode, Socket};
use super::timers::{Deadlines, RateLimit, Tick, Write, deadline_for_expiry};
use crate::auth::Principal;
use crate::event::Cursor;
use crate::mailbox::Wake;
use crate::protocol::{Close, ErrorCode, ReconnectReason, ServerMessage};
use crate::session::Session;
use switchboard_config::gateway::MAX_WRITE_DELAY_MS;

/// Events written per flush.
const WRITE_BATCH: usize = 64;
/// How long `connection.established` may wait for the user's private channel
/// (a round trip to NATS in cluster mode) before it is sent on its own.
const ESTABLISHED_WAIT: Duration = Duration::from_millis(200);

/// The most events a write delay's flush takes from the queue (the rest
/// go out on the loop's next turns, at once).
const HELD_BATCH: usize = 1024;

pub(super) enum Flow {
    Continue,
    /// Close with this code (and a detail for the reason, if any).
    Close(Close, Option<String>),
    /// The client closed or vanished: send nothing more.
    Gone,
}

pub(super) struct Connection {
    pub(super) session: Session,
    pub(super) principal: Principal,
    pub(super) socket: Socket,
    /// A cursor to apply to the first subscriptions (from `?cursor=` or a
    /// `cursor.update` sent before any subscription). Boxed: few
    /// connections have one, and every connection's state keeps the field.
    pub(super) pending_cursor: Option<Box<Cursor>>,
    /// Every event of the subscriptions up to this one was sent: where a
    /// client told to reconnect resumes (None: nothing sent yet).
    pub(super) sent_up_to: Option<Cursor>,
    /// `ws.connection`, entered while a handler runs.
    pub(super) span: tracing::Span,
    pub(super) rate: RateLimit,
    /// The largest message the client may send (u32: every connection
    /// keeps it; a larger limit is read as 4 GiB).
    pub(super) max_bytes: u32,
    /// Milliseconds events that follow a write are held, to be written
    /// together (0: at once); at most 1,000.
    write_delay_ms: u16,
}

impl Connection {
    /// Set the connection up; `run` then serves it.
    pub(super) fn open(
        session: Session,
        principal: Principal,
        cursor: Option<Cursor>,
        socket: Socket,
        span: tracing::Span,
    ) -> Self {
        let node = session.node.clone();
        let limits = node.limits(&principal.tenant).ok();
        let conn = Connection {
            rate: RateLimit::new(limits.map_or(node.config.limits.messages_per_minute, |l| {
                l.messages_per_minute
            })),
            max_bytes: clamp_u32(limits.map_or(node.config.limits.max_message_bytes, |l| {
                l.max_message_bytes
            })),
            session,
            principal,
            socket,
            pending_cursor: cursor.map(Box::new),
            sent_up_to: None,
            span,
            write_delay_ms: 0,
        };
        node.metrics.connections_opened.inc();
        node.metrics.connections_active.inc();
        let conn_id = conn.session.admission.id;
        conn.span.in_scope(|| {
            tracing::info!(conn = conn_id, tenant = %conn.principal.tenant, "websocket connected");
        });
        conn
    }

    /// Hold events that follow a write for `ms` milliseconds (capped at
    /// 1,000), to write them together.
    pub(super) fn with_write_delay(mut self, ms: u64) -> Self {
        self.write_delay_ms = u16::try_from(ms.min(MAX_WRITE_DELAY_MS)).unwrap_or(0);
        self
    }

    /// The connection's task. Not an `async fn`: its argument would be kept
    /// twice in the task's state (once as the argument, once as the local it
    /// is moved to); captured by the block, it is kept once.
    #[allow(clippy::manual_async_fn)]
    pub(super) fn run(mut self) -> impl Future<Output = ()> + Send {
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
            // The closing handshake: send ours, then read (and drop) what
            // the client still sends until its close. Dropping the socket
            // with unread data would reset the connection and lose our close
            // frame (and its code) on the way. The peer may be gone or not
            // reading (slow consumer): the goodbye is bounded.
            let goodbye = async {
                self.socket.close(close.code(), &reason).await?;
                while let Some(Ok(_)) = self.socket.next().await {}
                Ok::<_, std::io::Error>(())
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
        // The node is reached through the session, not kept in a local:
        // every connection's state would hold the extra pointer.
        let mut clock = Deadlines::new(
            &self.session.node.config.heartbeat,
            deadline_for_expiry(self.principal.expires_at),
        );
        let timer = sleep_until(clock.next());
        tokio::pin!(timer);
        // Policy changes and the drain arrive as signals in the mailbox;
        // asked for before both are read, so none is missed.
        self.session
            .node
            .signal_control_to(self.session.admission.id, &self.session.mailbox);
        let mut policy_seen = self.session.node.policy();
        // A drain already under way counts.
        if clock.arm_drain(self.session.node.drain_state(), self.session.admission.id) {
            timer.as_mut().reset(clock.next());
        }

        // Sent and dropped before the loop: nothing of it stays in the
        // state every idle connection keeps.
        let established = ServerMessage::ConnectionEstablished {
            user_id: self.principal.user.to_string(),
            connection_id: self.session.admission.id,
            region: self.session.node.region.to_string(),
            expires_at: self.principal.expires_at,
        }
        .frame();
        // Queued, not flushed: it leaves when the loop first waits for the
        // client, or with the answer to a message the client sent right
        // after the handshake (one write instead of two per reconnect).
        self.socket.feed_text(established.into());
        // Every connection receives its user's private channel (direct
        // messages), without asking and beyond its subscription limit.
        // Boxed: its state would otherwise be reserved in every idle
        // connection's task (it is larger than the loop's).
        // A bus slow to answer (NATS failing over) does not hold the
        // client's `connection.established` back: past the wait it leaves
        // alone, and the channel is held when the bus answers. What the
        // channel carried meanwhile is sent first: from the stream position
        // read before the channel was asked for (so before anything sent
        // after `connection.established`; in cluster mode the known head is
        // refreshed every second, so it starts at most about a second
        // before the connection began).
        let own_channel = Box::pin(async {
            let began_at = self.session.node.broker.head(self.session.tenant());
            let held_late = {
                let own = self.session.subscribe_own_channel();
                tokio::pin!(own);
                if tokio::time::timeout(ESTABLISHED_WAIT, own.as_mut())
                    .await
                    .is_ok()
                {
                    return Ok(());
                }
                self.socket.flush().await?;
                own.await
            };
            if held_late && !self.catch_up_own_channel(began_at).await {
                return Err(std::io::ErrorKind::ConnectionAborted.into());
            }
            Ok::<_, std::io::Error>(())
        });
        // Awaited in the condition: its result is not kept in the loop's
        // state.
        if own_channel.await.is_err() {
            return None;
        }
        // A resuming client (a cursor in its URL) sends its subscribe at
        // once: the tasks already waiting run first (this one was woken
        // straight after the handshake's answer was written), so it is read
        // by then and `connection.established` leaves with the answer (in a
        // reconnect storm, one write fewer per resume). A new connection
        // does not wait: in a burst of connects the yield keeps more
        // handshakes' buffers alive at once, and what that leaves
        // fragmented cost ~0.19 KiB of RSS per idle connection.
        if self.pending_cursor.is_some() {
            tokio::task::yield_now().await;
        }

        loop {
            // Held events wait for the write delay's flush.
            let flush_when_idle = !clock.holding;
            let flow = tokio::select! {
                biased;
                // While a write delay holds events back, the queue is left
                // alone (no wake-up per event) until the flush takes it.
                wake = self.session.next_live_or_control(), if !clock.holding => match wake {
                    Ok(Wake::Control) => {
                        if clock.arm_drain(self.session.node.drain_state(), self.session.admission.id) {
                            timer.as_mut().reset(clock.next());
                        }
                        let policy = self.session.node.policy();
                        if Arc::ptr_eq(&policy, &policy_seen) {
                            Flow::Continue
                        } else {
                            policy_seen = policy;
                            let span = self.span.clone();
                            Box::pin(self.on_policy_change().instrument(span)).await
                        }
                    }
                    Ok(Wake::Event(first)) => {
                        let delay = u64::from(self.write_delay_ms);
                        let written = match clock.write_or_hold(Tick::now, delay) {
                            Write::Now => self.write_queued(Some(first), WRITE_BATCH).await,
                            // Written with the flush, when the delay ends.
                            Write::Hold => {
                                timer.as_mut().reset(clock.next());
                                self.feed_event(&first);
                                Ok(())
                            }
                        };
                        match written {
                            Ok(()) => Flow::Continue,
                            Err(WriteStop::Kicked) => Flow::Close(Close::SlowConsumer, None),
                            Err(WriteStop::Socket) => return None,
                        }
                    }
                    Err(_overflowed) => Flow::Close(Close::SlowConsumer, None),
                },
                frame = self.socket.next_or_flush(flush_when_idle) => {
                    // The timer is not moved: when it fires early it re-arms.
                    clock.heard_from_client(Tick::now(), &self.session.node.config.heartbeat);
                    match frame {
                        None => return None,
                        Some(Err(e)) => {
                            self.span.in_scope(|| tracing::debug!(error = %e, "websocket read error"));
                            match e.close() {
                                Some(Close::MessageTooBig) => {
                                    self.session.node.metrics.error("message_too_big");
                                    Flow::Close(Close::MessageTooBig, None)
                                }
                                Some(close) => {
                                    self.session.node.metrics.error("websocket");
                                    Flow::Close(close, Some(e.to_string()))
                                }
                                None => {
                                    self.session.node.metrics.error("websocket");
                                    return None;
                                }
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
                    let flushed = if clock.take_flush(Tick::now(), u64::from(self.write_delay_ms)) {
                        self.write_queued(None, HELD_BATCH).await
                    } else {
                        Ok(())
                    };
                    let flow = match flushed {
                        Err(WriteStop::Kicked) => Flow::Close(Close::SlowConsumer, None),
                        Err(WriteStop::Socket) => return None,
                        Ok(()) if clock.others_due(Tick::now()) => {
                            let span = self.span.clone();
                            Box::pin(self.on_timer(&mut clock).instrument(span)).await
                        }
                        Ok(()) => Flow::Continue,
                    };
                    timer.as_mut().reset(clock.next());
                    flow
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
        let now = Tick::now();
        if now >= clock.expiry {
            let msg = ServerMessage::error(
                ErrorCode::TokenExpired,
                "token expired; reconnect with a fresh token or send auth.refresh before expiry",
                None,
            );
            let _ = self.send(&msg).await;
            return Flow::Close(Close::Unauthorized, Some("token expired".into()));
        }
        if clock.drain.is_some_and(|d| now >= d) {
            let msg = ServerMessage::Reconnect {
                reason: ReconnectReason::Draining,
                cursor: self.resume_cursor(),
            };
            let _ = self.send(&msg).await;
            return Flow::Close(Close::ServiceRestart, None);
        }
        if now >= clock.idle {
            return Flow::Close(Close::IdleTimeout, None);
        }
        if now >= clock.ping {
            let every = self.session.node.config.heartbeat.ping_interval_seconds;
            clock.ping = now + Duration::from_secs(every);
            self.socket.feed(OpCode::Ping, bytes::Bytes::new());
            if self.socket.flush().await.is_err() {
                return Flow::Gone;
            }
        }
        Flow::Continue
    }

    /// Send one message (and flush).
    pub(super) async fn send(&mut self, message: &ServerMessage) -> std::io::Result<()> {
        self.socket.send_text(message.frame().into()).await
    }

    pub(super) fn note_sent(&mut self, id: Cursor) {
        // Presence notices carry no cursor (Cursor::FOREIGN).
        if id != Cursor::FOREIGN && self.sent_up_to.is_none_or(|s| s.seq < id.seq) {
            self.sent_up_to = Some(id);
        }
    }

    /// Where this client resumes without missing or repeating anything.
    pub(super) fn resume_cursor(&self) -> Cursor {
        self.sent_up_to
            .unwrap_or_else(|| self.session.live_cursor())
    }

    /// Write `first` and whatever else is queued (up to `limit` events),
    /// then flush: a busy connection gets many events per syscall. Events
    /// a write delay held back go out with them.
    async fn write_queued(
        &mut self,
        first: Option<Arc<crate::event::Event>>,
        limit: usize,
    ) -> Result<(), WriteStop> {
        if let Some(first) = first {
            self.feed_event(&first);
        }
        for _ in 1..limit {
            match self.session.try_next_live() {
                Ok(Some(ev)) => self.feed_event(&ev),
                // An overflow is seen by the next turn of the loop.
                _ => break,
            }
        }
        self.write_fed().await
    }

    /// Write what was fed, unless the connection is kicked meanwhile.
    async fn write_fed(&mut self) -> Result<(), WriteStop> {
        self.unless_kicked(Socket::poll_flush).await
    }

    /// Queue one event's frame (its shared payload) for the next flush.
    fn feed_event(&mut self, event: &crate::event::Event) {
        self.socket.feed_text(self.session.frame_for(event).into());
        self.note_sent(event.id);
    }

    /// A write on the socket, unless the connection is kicked as a slow
    /// consumer while it is blocked: a blocked write loses to the kick. The
    /// kick is only looked at when the write must wait (an overflow while
    /// writes go through is seen by the loop's next turn), so a delivery
    /// costs no extra lock or waker registration.
    fn unless_kicked(
        &mut self,
        mut write: impl FnMut(&mut Socket, &mut Context<'_>) -> Poll<std::io::Result<()>>,
    ) -> impl Future<Output = Result<(), WriteStop>> {
        poll_fn(move |cx| match write(&mut self.socket, cx) {
            Poll::Ready(done) => Poll::Ready(done.map_err(|_| WriteStop::Socket)),
            Poll::Pending => self
                .session
                .mailbox
                .poll_kicked(cx)
                .map(|()| Err(WriteStop::Kicked)),
        })
    }
}

/// `n`, or `u32::MAX` when it is larger.
pub(super) fn clamp_u32(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Why a batch was not written.
#[derive(Debug)]
enum WriteStop {
    /// The connection overflowed its queue: close it as a slow consumer.
    Kicked,
    /// The client is gone.
    Socket,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn returned_size<A, F>(_: fn(A) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every open connection keeps one task: tokio's task cell (this
    /// future plus 104 bytes of header, scheduler, id and trailer, rounded
    /// up to 128) must stay in jemalloc's 896-byte size class; at 793 bytes
    /// of future it takes 1,024 (docs/benchmarks.md, memory per
    /// connection). A field added to `Connection`, or a large future
    /// awaited inline in `serve`, shows here first: box what is rare.
    #[test]
    fn an_idle_connection_task_stays_in_its_size_class() {
        let future = returned_size(Connection::run);
        assert!(
            future <= 792,
            "the connection's task state grew to {future} bytes (at most 792)"
        );
    }
}
