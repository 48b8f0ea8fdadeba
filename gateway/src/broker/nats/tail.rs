//! A tenant's recent history, read once for the resumes that arrive
//! together.
//!
//! When a gateway dies its clients resume on the others at once, each from a
//! cursor a few seconds old. Read one by one, every resume is a JetStream
//! consumer of its own (create, fetch, delete): 10,000 clients are 30,000
//! JetStream API requests queued behind each other, and the last client
//! waits seconds. Here the first resume of a tenant reads the tenant's
//! recent range once; the resumes queued behind it are answered from that
//! copy, which is extended (one read) when the stream's head has moved on.
//!
//! Bounds: only cursors at most [`SPAN`] positions behind the head take this
//! path (older ones read their own range, filtered to their topics); a copy
//! is used for at most [`FRESH`] after the read that began or widened it
//! ended; it is dropped when an erasure for its tenant runs here or is
//! announced, and it never serves an event of a data subject blocked since
//! (an erasure blocks its subject before it starts).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use switchboard_config::Pattern;
use tokio::time::Instant;

use super::NatsBroker;
use super::history::read_range;
use crate::broker::{BrokerError, Filter, ReadBatch};
use crate::event::{Cursor, Event};

/// Cursors at most this many stream positions behind the head are read
/// through the shared copy.
pub(super) const SPAN: u64 = 4096;

/// How long a copy is used after the read that began or widened it ended.
const FRESH: Duration = Duration::from_secs(2);

/// Copies kept before idle ones are swept.
const SWEEP_ABOVE: usize = 64;

/// Every tenant's shared copy.
#[derive(Default)]
pub(super) struct Tails {
    tenants: std::sync::Mutex<HashMap<Arc<str>, Arc<tokio::sync::Mutex<Tail>>>>,
}

/// Every event of one tenant stored at positions `(from, to]`.
#[derive(Default)]
struct Tail {
    epoch: u64,
    from: u64,
    to: u64,
    events: Vec<Arc<Event>>,
    /// Indexes into `events` per topic: a resume of exact topics (the
    /// common case) looks at its own topics' events only.
    by_topic: HashMap<Box<str>, Vec<u32>>,
    read_at: Option<Instant>,
}

impl Tail {
    fn new(epoch: u64, from: u64) -> Self {
        Self {
            epoch,
            from,
            to: from,
            read_at: Some(Instant::now()),
            ..Self::default()
        }
    }

    /// Whether the copy may still be used.
    fn fresh(&self, epoch: u64) -> bool {
        self.epoch == epoch && self.read_at.is_some_and(|at| at.elapsed() < FRESH)
    }

    /// Add newer events (in stream order).
    fn append(&mut self, events: Vec<Arc<Event>>) {
        for e in events {
            let at = self.events.len() as u32;
            self.by_topic
                .entry(e.topic.as_str().into())
                .or_default()
                .push(at);
            self.events.push(e);
        }
    }

    /// Add older events (in stream order) before the ones held.
    fn prepend(&mut self, events: Vec<Arc<Event>>) {
        let newer = std::mem::take(&mut self.events);
        self.by_topic.clear();
        self.append(events);
        self.append(newer);
    }

    /// Indexes of the events in `(start, to]` that `scope` may match, in
    /// stream order: per topic when every pattern is an exact topic.
    fn candidates(&self, scope: &[Pattern], start: u64, to: u64) -> Vec<u32> {
        let in_range = |i: &u32| {
            let seq = self.events[*i as usize].id.seq;
            seq > start && seq <= to
        };
        if scope.is_empty() || !scope.iter().all(Pattern::is_exact) {
            let first = self.events.partition_point(|e| e.id.seq <= start);
            return (first as u32..self.events.len() as u32)
                .take_while(in_range)
                .collect();
        }
        let mut out: Vec<u32> = Vec::new();
        for p in scope {
            if let Some(list) = self.by_topic.get(p.as_str()) {
                let first = list.partition_point(|i| self.events[*i as usize].id.seq <= start);
                out.extend(list[first..].iter().copied().take_while(in_range));
            }
        }
        if scope.len() > 1 {
            out.sort_unstable();
            out.dedup();
        }
        out
    }
}

impl Tails {
    fn of(&self, tenant: &Arc<str>) -> Arc<tokio::sync::Mutex<Tail>> {
        let mut tenants = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
        if tenants.len() > SWEEP_ABOVE {
            tenants.retain(|_, t| {
                Arc::strong_count(t) > 1
                    || t.try_lock()
                        .is_ok_and(|t| t.read_at.is_some_and(|at| at.elapsed() < FRESH))
            });
        }
        tenants.entry(tenant.clone()).or_default().clone()
    }

    /// Drop `tenant`'s copy (its history changed: an erasure).
    pub(super) fn forget(&self, tenant: &str) {
        self.tenants
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(tenant);
    }
}

impl NatsBroker {
    /// All of `tenant`'s events in `(after, until]`, one JetStream read.
    async fn read_tenant(
        &self,
        tenant: &Arc<str>,
        epoch: u64,
        after: u64,
        until: u64,
    ) -> Result<ReadBatch, BrokerError> {
        let _permit = self.reads.acquire().await.map_err(super::unavailable)?;
        self.count_read("shared_read");
        Box::pin(read_range(
            self,
            Some(tenant),
            &[],
            Cursor { epoch, seq: after },
            &|_| true,
            usize::MAX,
            until,
        ))
        .await
    }

    /// Add to `out` the events held here (a copy, a window) that `filter`
    /// keeps, in stream order, leaving out any erased since they were read;
    /// `out.next` follows the last one looked at, and past `limit` events
    /// `out.more` is set.
    pub(super) fn page_of_held<'a>(
        &self,
        tenant: &str,
        held: impl IntoIterator<Item = &'a Arc<Event>>,
        filter: Filter<'_>,
        limit: usize,
        out: &mut ReadBatch,
    ) {
        for e in held {
            if out.events.len() >= limit {
                out.more = true;
                break;
            }
            out.next.seq = e.id.seq;
            if !self.erased_meanwhile(tenant, e) && filter(e) {
                out.events.push(e.clone());
            }
        }
    }

    /// An event of a data subject whose erasure began after the copy was
    /// read (the block is set before the erasure starts).
    fn erased_meanwhile(&self, tenant: &str, e: &Event) -> bool {
        e.data_subject.as_deref().is_some_and(|subject| {
            self.blocked
                .blocked(&crate::data_protection::subject_key(tenant, subject))
        })
    }

    /// `tenant`'s events after `start` up to `until` that `filter` keeps (at
    /// most `limit`), from the shared copy, reading into it what it lacks.
    pub(super) async fn read_tail(
        &self,
        tenant: &Arc<str>,
        scope: &[Pattern],
        start: u64,
        until: u64,
        filter: Filter<'_>,
        limit: usize,
    ) -> Result<ReadBatch, BrokerError> {
        let epoch = self.epoch()?;
        let tail = self.tails.of(tenant);
        let mut t = tail.lock().await;
        self.read_from_copy(&mut t, tenant, epoch, scope, start, until, filter, limit)
            .await
    }

    /// As [`Self::read_tail`] up to the newest position this gateway knows
    /// of, without the stream's state, when the shared copy is fresh and
    /// already holds `start` (so the cursor was found in the stream when the
    /// copy was read, and nothing before it is read again). `None` when it
    /// does not: the caller asks for the stream's state.
    pub(super) async fn read_recent(
        &self,
        tenant: &Arc<str>,
        scope: &[Pattern],
        start: u64,
        filter: Filter<'_>,
        limit: usize,
    ) -> Option<Result<ReadBatch, BrokerError>> {
        let epoch = self.epoch().ok()?;
        // The head as this call found it, not as it is once the copy is
        // ours: the caller's subscriptions went live before this call, so
        // everything newer reaches it live. Taken after the wait, every
        // resume queued behind a slow read would find the head moved on
        // (events keep coming) and read again, one JetStream round trip per
        // resume: a storm's resumes then trickle out one by one.
        let until = self.head_seq();
        let tail = self.tails.of(tenant);
        let mut t = tail.lock().await;
        if !t.fresh(epoch) || start < t.from {
            return None;
        }
        Some(
            self.read_from_copy(&mut t, tenant, epoch, scope, start, until, filter, limit)
                .await,
        )
    }

    #[allow(clippy::too_many_arguments)]
    async fn read_from_copy(
        &self,
        t: &mut Tail,
        tenant: &Arc<str>,
        epoch: u64,
        scope: &[Pattern],
        start: u64,
        until: u64,
        filter: Filter<'_>,
        limit: usize,
    ) -> Result<ReadBatch, BrokerError> {
        let mut widened = false;
        if !t.fresh(epoch) || start > t.to {
            *t = Tail::new(epoch, start);
            widened = true;
        }
        if start < t.from {
            // An older cursor than the copy's: read the part before it.
            let older = self.read_tenant(tenant, epoch, start, t.from).await?;
            if older.more {
                // Not all of it in time: start the copy over from here.
                *t = Tail::new(epoch, start);
                t.to = older.next.seq;
                t.append(older.events);
            } else {
                t.prepend(older.events);
                t.from = start;
            }
            widened = true;
        }
        if t.to < until {
            // Read up to the newest position this gateway knows of, not
            // only this caller's: the resumes queued behind this one (each
            // with its own, a little newer, head) are then answered from
            // the copy instead of each reading again.
            let horizon = until.max(self.head_seq());
            let newer = self.read_tenant(tenant, epoch, t.to, horizon).await?;
            t.to = if newer.more { newer.next.seq } else { horizon };
            t.append(newer.events);
        }
        if widened {
            // A copy is fresh from when the read that began or widened it
            // ended, not from when that read began: a read longer than
            // FRESH (a slow link, a busy server) left a stale copy, and
            // each resume that had waited on it read the range again, one
            // after the other. (Reads that extend it to newer events do
            // not renew it: a copy in constant use is still read afresh.)
            t.read_at = Some(Instant::now());
        }
        let to = t.to.min(until);
        let mut out = ReadBatch::at(Cursor { epoch, seq: to });
        let candidates = t.candidates(scope, start, to);
        self.page_of_held(
            tenant,
            candidates.iter().map(|i| &t.events[*i as usize]),
            filter,
            limit,
            &mut out,
        );
        if !out.more {
            out.next.seq = to;
            out.more = to < until;
        }
        Ok(out)
    }
}
