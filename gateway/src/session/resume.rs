//! The one resume path every transport uses: given a session's
//! subscriptions and a cursor, send what history holds after the cursor that
//! live delivery does not cover, then hand over to live delivery at the
//! seam (see the module above).
//!
//! The replay is a stream, not a collection: history is read a page at a
//! time and each event goes to the transport's [`ResumeSink`] as it is
//! read; a sink that waits (a socket that will not take more, a full SSE
//! channel) holds the next page back. So a resuming client costs one page
//! of event references, however deep its history, and ten thousand clients
//! resuming at once do not multiply whole replays in memory.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use switchboard_config::Pattern;

use super::{CaughtUp, Session};
use crate::broker::{BrokerError, GapReason};
use crate::event::{Cursor, Event, USER_CHANNEL_PREFIX};

/// Events read from history per request.
const PAGE: usize = 256;

/// Where a transport puts a replay.
pub trait ResumeSink: Send {
    /// The cursor could not be honoured; called before any event.
    fn gap(&mut self, reason: GapReason, requested: &str) -> impl Future<Output = bool> + Send;

    /// One replayed event; false stops the replay (the client went away).
    fn event(&mut self, event: &Arc<Event>) -> impl Future<Output = bool> + Send;

    /// A page was handed over: a sink that buffers writes it out here (and
    /// waits for the client to take it).
    fn page_done(&mut self) -> impl Future<Output = bool> + Send {
        async { true }
    }

    /// The replay's last page was handed over. By default as any page; a
    /// sink whose caller writes (and flushes) an answer right after the
    /// replay may leave the flush to it: one write for the whole resume.
    fn replay_done(&mut self) -> impl Future<Output = bool> + Send {
        self.page_done()
    }
}

/// What a resume did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Resumed {
    /// Events handed to the sink.
    pub sent: usize,
    /// Why the cursor could not be honoured, if it could not.
    pub gap: Option<GapReason>,
    /// Stopped at the caller's limit with more to send.
    pub truncated: bool,
    /// The sink stopped the replay (the client left).
    pub stopped: bool,
    /// The id of the last event sent.
    pub last: Option<Cursor>,
}

impl Session {
    /// Send the events after `cursor` that the current subscriptions match
    /// and that live delivery does not cover, oldest first, at most `limit`.
    /// Records the resume's metrics (outcome, events delivered) once, for
    /// every transport.
    ///
    /// With `only`, just events matching one of those patterns and none of
    /// the session's other patterns (a cursor given with a new subscription
    /// resumes that subscription, without repeating what others delivered).
    pub async fn resume<S: ResumeSink>(
        &self,
        cursor: Cursor,
        only: Option<&[Pattern]>,
        limit: usize,
        sink: &mut S,
    ) -> Result<Resumed, BrokerError> {
        let result = self.replay(cursor, only, limit, sink).await;
        if let Ok(r) = &result
            && r.gap.is_none()
        {
            self.resumed_through(cursor, only);
        }
        let metrics = &self.node.metrics;
        match &result {
            Ok(r) => {
                let outcome = if r.gap.is_some() { "gap" } else { "replayed" };
                metrics
                    .resumes
                    .get_or_create(&vec![("outcome", outcome)])
                    .inc();
                metrics.events_delivered.inc_by(r.sent as u64);
            }
            Err(_) => metrics.error("history"),
        }
        result
    }

    /// The client holds everything its resumed subscriptions matched up to
    /// `cursor`: none of it may come again live. In cluster mode the cursor
    /// can be newer than where this gateway's live delivery began (another
    /// gateway routed the event first, the client moved here at once); the
    /// event then still reaches this session's queue, after the replay
    /// found nothing to send.
    fn resumed_through(&self, cursor: Cursor, only: Option<&[Pattern]>) {
        if cursor == Cursor::FOREIGN || cursor.epoch != self.node.broker.head(self.tenant()).epoch {
            return; // another region's numbering: nothing to compare
        }
        let mut raised = false;
        for sub in &self.subs {
            if only.is_none_or(|o| o.contains(&sub.pattern)) {
                sub.since.fetch_max(cursor.seq, Ordering::Relaxed);
                raised = true;
            }
        }
        if raised {
            self.max_since.fetch_max(cursor.seq, Ordering::Relaxed);
        }
        self.resumed_through
            .fetch_max(cursor.seq, Ordering::Relaxed);
    }

    /// Send what the user's private channel carried after `after` (where
    /// the stream stood as far as this gateway knew when the connection
    /// began) and before the channel was held: the bus was slow to answer, the client was told it
    /// is connected meanwhile, and a direct message sent in that window
    /// must reach it. A cursor history cannot honour (the stream was
    /// recreated) sends nothing and no gap: the client never asked for it.
    pub async fn catch_up_own_channel<S: ResumeSink>(
        &self,
        after: Cursor,
        limit: usize,
        sink: &mut S,
    ) -> Result<Resumed, BrokerError> {
        let Some(own) = self.subs.iter().find(|s| s.implicit) else {
            return Ok(Resumed::default());
        };
        let only = [own.pattern.clone()];
        let mut quiet = NoGap(sink);
        let mut result = self.replay(after, Some(&only), limit, &mut quiet).await?;
        // A gap stopped it, not the client.
        result.stopped &= result.gap.is_none();
        self.node
            .metrics
            .events_delivered
            .inc_by(result.sent as u64);
        Ok(result)
    }

    /// Note that a complete catch-up from `after` (see
    /// [`Session::catch_up_own_channel`]) sent the private channel's events
    /// up to where live delivery took over: a later replay from an older
    /// cursor leaves them out.
    pub fn own_channel_caught_up(&mut self, after: Cursor) {
        if let Some(own) = self.subs.iter().find(|s| s.implicit) {
            self.own_caught_up = Some(Box::new(CaughtUp {
                after: after.seq,
                through: own.since(),
            }));
        }
    }

    async fn replay<S: ResumeSink>(
        &self,
        cursor: Cursor,
        only: Option<&[Pattern]>,
        limit: usize,
        sink: &mut S,
    ) -> Result<Resumed, BrokerError> {
        let Some(until) = self.subs.iter().map(super::Sub::since).max() else {
            return Ok(Resumed::default());
        };
        let subs = &self.subs;
        let mailbox = self.mailbox.clone();
        let seen_elsewhere = &self.seen_elsewhere;
        let caught_up = self.own_caught_up.as_deref();
        let wanted = move |e: &Event| {
            if !mailbox.may_receive(e) || seen_elsewhere.get().is_some_and(|s| s.saw(e)) {
                return false;
            }
            if caught_up.is_some_and(|c| {
                c.after < e.id.seq
                    && e.id.seq <= c.through
                    && e.topic.as_str().strip_prefix(USER_CHANNEL_PREFIX) == Some(&*mailbox.user)
            }) {
                return false; // the private channel's catch-up sent it
            }
            let mut matched = false;
            for sub in subs {
                if sub.pattern.matches(&e.topic) {
                    if e.id.seq > sub.since() {
                        return false; // delivered live
                    }
                    match only {
                        Some(only) if !only.contains(&sub.pattern) => return false,
                        _ => matched = true,
                    }
                }
            }
            matched
        };
        let scope: Vec<Pattern> = match only {
            Some(only) => only.to_vec(),
            None => subs.iter().map(|s| s.pattern.clone()).collect(),
        };
        let requested = if cursor == Cursor::FOREIGN {
            String::new()
        } else {
            cursor.to_string()
        };
        let mut out = Resumed::default();
        let mut after = cursor;
        let mut first = true;
        'pages: loop {
            let batch = self
                .node
                .broker
                .read(self.tenant(), Some(after), &scope, &wanted, PAGE)
                .await?;
            if let Some(seen) = &batch.seen_elsewhere {
                // Kept for the session: later pages and live delivery skip
                // what the client saw in the other region too.
                let _ = self.seen_elsewhere.set(seen.clone());
            }
            if first {
                first = false;
                out.gap = batch.gap;
                if let Some(gap) = batch.gap
                    && !sink.gap(gap, &requested).await
                {
                    out.stopped = true;
                    return Ok(out);
                }
            }
            for event in &batch.events {
                if event.id.seq > until {
                    break 'pages;
                }
                if out.sent == limit {
                    out.truncated = true;
                    break 'pages;
                }
                if !sink.event(event).await {
                    out.stopped = true;
                    return Ok(out);
                }
                out.sent += 1;
                out.last = Some(event.id);
            }
            if !batch.more || batch.next.seq >= until || batch.next == after {
                out.stopped = !sink.replay_done().await;
                return Ok(out);
            }
            if !sink.page_done().await {
                out.stopped = true;
                return Ok(out);
            }
            after = batch.next;
        }
        // Stopped inside a page: hand over what it sent.
        out.stopped = !sink.replay_done().await;
        Ok(out)
    }
}

impl Session {
    /// The newest retained event of each topic the subscriptions (or just
    /// `only`) match, that live delivery does not cover: what a client
    /// refreshing its state needs first (seed 002's snapshot). At most
    /// `limit` topics, oldest first.
    pub async fn snapshot(
        &self,
        only: Option<&[Pattern]>,
        limit: usize,
    ) -> Result<crate::broker::Latest, BrokerError> {
        let subs = &self.subs;
        let mailbox = self.mailbox.clone();
        let wanted = move |e: &Event| {
            mailbox.may_receive(e)
                && subs.iter().any(|s| {
                    !s.implicit
                        && s.pattern.matches(&e.topic)
                        && e.id.seq <= s.since()
                        && only.is_none_or(|o| o.contains(&s.pattern))
                })
        };
        let scope: Vec<Pattern> = match only {
            Some(only) => only.to_vec(),
            None => self.patterns().cloned().collect(),
        };
        self.node
            .broker
            .latest(self.tenant(), &scope, &wanted, limit)
            .await
    }
}

/// A sink that stops at a gap without telling the client about it.
struct NoGap<'a, S>(&'a mut S);

impl<S: ResumeSink> ResumeSink for NoGap<'_, S> {
    async fn gap(&mut self, _reason: GapReason, _requested: &str) -> bool {
        false
    }

    async fn event(&mut self, event: &Arc<Event>) -> bool {
        self.0.event(event).await
    }

    async fn page_done(&mut self) -> bool {
        self.0.page_done().await
    }

    async fn replay_done(&mut self) -> bool {
        self.0.replay_done().await
    }
}
