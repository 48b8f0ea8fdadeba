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
//! path, or [`WIDE_SPAN`] while this gateway's history reads queue (older
//! ones read their own range, filtered to their topics); a copy is read
//! again from scratch once unused for [`FRESH`], and otherwise kept and
//! extended, its older events dropped past the span; all copies of a
//! process hold at most [`COPIES_BYTES`] (a read that would need more is
//! the caller's own); a copy is dropped when an erasure for its tenant runs
//! here or is announced, and it never serves an event of a data subject
//! blocked since (an erasure blocks its subject before it starts).
//!
//! Why the wide span: an own read costs the NATS server more the further
//! behind its cursor is (measured: about 1 ms of its CPU at 2,000
//! positions, 3 to 6 ms at 30,000). After a burst of reconnections, resumes
//! waiting in the queue fall further behind the head while they wait; past
//! the span, each became an own read, each slower than the last, and the
//! queue grew until clients gave up (docs/scaling.md). One read of the
//! tenant's range serves them all instead.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use switchboard_config::Pattern;
use tokio::time::Instant;

use super::NatsBroker;
use super::history::{Limit, read_range};
use crate::broker::{BrokerError, Filter, ReadBatch};
use crate::event::{Cursor, Event};

/// Cursors at most this many stream positions behind the head are read
/// through the shared copy.
pub(super) const SPAN: u64 = 4096;

/// As [`SPAN`], while every history read this gateway may run at once is
/// taken (a storm): the copy then serves cursors this far behind too.
pub(super) const WIDE_SPAN: u64 = 65_536;

/// Memory all copies of one process may hold
/// ([`Event::held_bytes`](crate::event::Event::held_bytes)).
const COPIES_BYTES: usize = 64 << 20;

/// A copy is not read into with less room than this left: the caller reads
/// its own range instead.
const MIN_ROOM: usize = 1 << 20;

/// How long a copy is kept unused.
const FRESH: Duration = Duration::from_secs(2);

/// Copies kept before idle ones are swept.
const SWEEP_ABOVE: usize = 64;

/// Counts a history read in progress while it lives.
pub(super) struct Reading<'a>(&'a AtomicUsize);

impl<'a> Reading<'a> {
    pub(super) fn enter(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count)
    }
}

impl Drop for Reading<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Every tenant's shared copy.
#[derive(Default)]
pub(super) struct Tails {
    tenants: std::sync::Mutex<HashMap<Arc<str>, Arc<tokio::sync::Mutex<Tail>>>>,
    /// What all copies hold, in bytes.
    held: Arc<AtomicUsize>,
}

/// Every event of one tenant stored at positions `(from, to]`.
struct Tail {
    epoch: u64,
    from: u64,
    to: u64,
    events: Vec<Arc<Event>>,
    /// Indexes into `events` per topic: a resume of exact topics (the
    /// common case) looks at its own topics' events only.
    by_topic: HashMap<Box<str>, Vec<u32>>,
    used_at: Option<Instant>,
    /// What `events` hold, in bytes; counted in `held` too.
    bytes: usize,
    held: Arc<AtomicUsize>,
}

impl Drop for Tail {
    fn drop(&mut self) {
        self.held.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

impl Tail {
    /// An empty copy, not fresh, counting what it holds in `held`.
    fn empty(held: Arc<AtomicUsize>) -> Self {
        Self {
            epoch: 0,
            from: 0,
            to: 0,
            events: Vec::new(),
            by_topic: HashMap::new(),
            used_at: None,
            bytes: 0,
            held,
        }
    }

    /// Start over, empty, at position `from` (read now).
    fn restart(&mut self, epoch: u64, from: u64) {
        self.held.fetch_sub(self.bytes, Ordering::Relaxed);
        self.bytes = 0;
        self.events = Vec::new();
        self.by_topic = HashMap::new();
        self.epoch = epoch;
        self.from = from;
        self.to = from;
        self.used_at = Some(Instant::now());
    }

    /// Drop the events at or before `from` (a newer start than the copy's).
    fn trim(&mut self, from: u64) {
        if from <= self.from {
            return;
        }
        let first = self.events.partition_point(|e| e.id.seq <= from);
        let kept = self.events.split_off(first);
        self.held.fetch_sub(self.bytes, Ordering::Relaxed);
        self.bytes = 0;
        self.events = Vec::with_capacity(kept.len());
        self.by_topic.clear();
        self.append(kept);
        self.from = from;
    }

    /// Bytes the copies of this process may still read in.
    fn room(&self) -> usize {
        COPIES_BYTES.saturating_sub(self.held.load(Ordering::Relaxed))
    }

    /// Whether the copy may still be used: same stream, used lately.
    fn fresh(&self, epoch: u64) -> bool {
        self.epoch == epoch && self.used_at.is_some_and(|at| at.elapsed() < FRESH)
    }

    /// Add newer events (in stream order).
    fn append(&mut self, events: Vec<Arc<Event>>) {
        let bytes: usize = events.iter().map(|e| e.held_bytes()).sum();
        self.bytes += bytes;
        self.held.fetch_add(bytes, Ordering::Relaxed);
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
        self.held.fetch_sub(self.bytes, Ordering::Relaxed);
        self.bytes = 0;
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
                        .is_ok_and(|t| t.used_at.is_some_and(|at| at.elapsed() < FRESH))
            });
        }
        tenants
            .entry(tenant.clone())
            .or_insert_with(|| Arc::new(tokio::sync::Mutex::new(Tail::empty(self.held.clone()))))
            .clone()
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
    /// `tenant`'s events in `(after, until]`, one JetStream read, stopping
    /// once they hold `bytes`.
    async fn read_tenant(
        &self,
        tenant: &Arc<str>,
        epoch: u64,
        after: u64,
        until: u64,
        bytes: usize,
    ) -> Result<ReadBatch, BrokerError> {
        let _permit = self.reads.acquire().await.map_err(super::unavailable)?;
        self.count_read("shared_read");
        Box::pin(read_range(
            self,
            Some(tenant),
            &[],
            Cursor { epoch, seq: after },
            &|_| true,
            Limit {
                events: usize::MAX,
                bytes,
            },
            until,
        ))
        .await
    }

    /// How far behind the head a cursor may be to be read through the
    /// shared copy: [`WIDE_SPAN`] while more history reads are asked of
    /// this gateway than it runs at once (they queue).
    pub(super) fn shared_span(&self) -> u64 {
        if self.reading.load(Ordering::Relaxed) > super::CONCURRENT_READS {
            WIDE_SPAN
        } else {
            SPAN
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
    /// `None` when the copies have no room for what it lacks: the caller
    /// reads its own range.
    pub(super) async fn read_tail(
        &self,
        tenant: &Arc<str>,
        scope: &[Pattern],
        start: u64,
        until: u64,
        filter: Filter<'_>,
        limit: usize,
    ) -> Result<Option<ReadBatch>, BrokerError> {
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
        self.read_from_copy(&mut t, tenant, epoch, scope, start, until, filter, limit)
            .await
            .transpose()
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
    ) -> Result<Option<ReadBatch>, BrokerError> {
        let span = self.shared_span();
        if !t.fresh(epoch) || start > t.to.saturating_add(span) {
            t.restart(epoch, start);
        }
        t.used_at = Some(Instant::now());
        if start < t.from {
            // An older cursor than the copy's: read the part before it.
            if t.room() < MIN_ROOM {
                return Ok(None);
            }
            let older = self
                .read_tenant(tenant, epoch, start, t.from, t.room())
                .await?;
            if older.more {
                // Not all of it (in time, or in the room left): start the
                // copy over from here.
                t.restart(epoch, start);
                t.to = older.next.seq;
                t.append(older.events);
            } else {
                t.prepend(older.events);
                t.from = start;
            }
        }
        if t.to < until {
            if t.room() < MIN_ROOM {
                // Full: drop what falls past the span, and down to this
                // caller's start if that is not enough.
                t.trim(start.min(t.to.saturating_sub(span)));
                if t.room() < MIN_ROOM {
                    t.trim(start);
                }
            }
            if t.room() >= MIN_ROOM {
                // Read up to the newest position this gateway knows of,
                // not only this caller's: the resumes queued behind this
                // one (each with its own, a little newer, head) are then
                // answered from the copy instead of each reading again.
                let horizon = until.max(self.head_seq());
                let newer = self
                    .read_tenant(tenant, epoch, t.to, horizon, t.room())
                    .await?;
                t.to = if newer.more { newer.next.seq } else { horizon };
                t.append(newer.events);
                // Kept and extended while used: what falls past the span
                // (by a quarter, so that this is rare) goes, never what
                // this caller reads.
                if t.to - t.from > span + span / 4 {
                    t.trim(start.min(t.to - span));
                }
            } else if start >= t.to {
                return Ok(None);
            }
        }
        let to = t.to.min(until);
        let mut out = ReadBatch {
            events: Vec::new(),
            gap: None,
            next: Cursor { epoch, seq: to },
            more: false,
            seen_elsewhere: None,
        };
        for i in t.candidates(scope, start, to) {
            let e = &t.events[i as usize];
            if out.events.len() >= limit {
                out.more = true;
                break;
            }
            out.next.seq = e.id.seq;
            if !self.erased_meanwhile(tenant, e) && filter(e) {
                out.events.push(e.clone());
            }
        }
        if !out.more {
            out.next.seq = to;
            out.more = to < until;
        }
        Ok(Some(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::test_event;

    fn sum(events: &[Arc<Event>]) -> usize {
        events.iter().map(|e| e.held_bytes()).sum()
    }

    #[test]
    fn what_the_copies_hold_is_counted_as_they_grow_start_over_and_go() {
        let held = Arc::new(AtomicUsize::new(0));
        let older: Vec<_> = (5..=9).map(|s| test_event("acme", "a.b", s)).collect();
        let newer: Vec<_> = (11..=20).map(|s| test_event("acme", "a.c", s)).collect();
        let other = vec![test_event("beta", "a.b", 3)];

        let mut t = Tail::empty(held.clone());
        t.restart(1, 10);
        t.append(newer.clone());
        assert_eq!(held.load(Ordering::Relaxed), sum(&newer));
        t.prepend(older.clone());
        assert_eq!(t.bytes, sum(&older) + sum(&newer));
        assert_eq!(held.load(Ordering::Relaxed), t.bytes);
        // The prepended events come first, each still found by topic.
        assert_eq!(t.candidates(&[], 6, 12).len(), 5);
        let b = [Pattern::parse("a.b").unwrap()];
        assert_eq!(t.candidates(&b, 0, 20).len(), older.len());

        let mut u = Tail::empty(held.clone());
        u.restart(1, 0);
        u.append(other.clone());
        assert_eq!(held.load(Ordering::Relaxed), t.bytes + sum(&other));
        assert_eq!(t.room(), COPIES_BYTES - t.bytes - sum(&other));

        // Dropping the older events gives their bytes back and keeps the
        // newer ones found by topic.
        t.trim(12);
        assert_eq!(t.from, 12);
        assert_eq!(t.bytes, sum(&newer[2..]));
        assert_eq!(held.load(Ordering::Relaxed), t.bytes + sum(&other));
        assert!(t.candidates(&b, 0, 20).is_empty());
        let c = [Pattern::parse("a.c").unwrap()];
        let seqs: Vec<u64> = t
            .candidates(&c, 12, 20)
            .into_iter()
            .map(|i| t.events[i as usize].id.seq)
            .collect();
        assert_eq!(seqs, (13..=20).collect::<Vec<_>>());

        t.restart(1, 30);
        assert!(t.events.is_empty() && t.by_topic.is_empty());
        assert_eq!(held.load(Ordering::Relaxed), sum(&other));
        drop(u);
        assert_eq!(held.load(Ordering::Relaxed), 0);
        drop(t);
        assert_eq!(held.load(Ordering::Relaxed), 0);
    }
}
