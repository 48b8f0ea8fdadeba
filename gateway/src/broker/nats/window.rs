//! What this gateway received live, kept a while per upstream subscription,
//! so that a resume on a pattern it already routes is answered without
//! reading JetStream.
//!
//! A resume whose cursor is further behind than the tenant's shared copy
//! reaches (`tail`) costs nats-server a consumer of its own, and the cost
//! grows with how far behind the cursor is. Under a burst those resumes
//! pile up on nats-server and fall further behind while they wait. But a
//! gateway whose other clients hold the same topic has already received
//! every one of those events: NATS delivers a subscription's messages in
//! stream order, and everything stored after the subscription was in place
//! reaches it. So each upstream subscription keeps a window of what it
//! delivered, complete over `(start, last]`, and a resume from a cursor in
//! that range is read from it.
//!
//! When a window cannot be trusted to be complete, it starts over from the
//! next event it receives: the connection to NATS was lost (the catch-up
//! after a reconnect routes the missed events to the hub, not here), NATS
//! or the client library dropped messages (a slow consumer), the stream was
//! recreated (a new epoch). An erasure of the tenant's events empties it.
//! A window serves a resume only when it reaches every seam it handed out
//! (`promised`): a subscription told "live after n" must find everything
//! up to n here.
//!
//! A window is never used for a pattern that overlaps another one this
//! gateway holds upstream for the tenant (`deal.*` and `deal.stage.updated`):
//! an event both match reaches the hub through whichever subscription
//! delivers it first, possibly before it is in this window, so "everything
//! dispatched before the registration is in the window" would not hold.
//!
//! Bounds: [`KEEP`] events and [`KEEP_FOR`] per window; and all windows of
//! a process hold at most [`BUDGET`] bytes of events (a window over its
//! share when the budget is spent drops its oldest first).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use switchboard_config::Pattern;

use super::NatsBroker;
use crate::broker::{Filter, ReadBatch};
use crate::event::{Cursor, Event};

/// Events kept per window.
pub(super) const KEEP: usize = 2048;

/// How long an event is kept.
pub(super) const KEEP_FOR: Duration = Duration::from_secs(60);

/// Bytes of events all windows of a process hold at most.
pub(super) const BUDGET: usize = 32 << 20;

/// What all windows of a process share: the byte budget and the
/// generation of the link to NATS (raised whenever messages may have been
/// missed).
#[derive(Default)]
pub(super) struct Windows {
    bytes: AtomicUsize,
    link: AtomicU64,
}

impl Windows {
    /// Messages may have been missed (a disconnect, a slow consumer): every
    /// window starts over.
    pub(super) fn broken(&self) {
        self.link.fetch_add(1, Ordering::AcqRel);
    }

    fn link(&self) -> u64 {
        self.link.load(Ordering::Acquire)
    }

    fn over_budget(&self) -> bool {
        self.bytes.load(Ordering::Relaxed) > BUDGET
    }
}

/// One upstream subscription's window.
pub(super) struct Window {
    shared: Arc<Windows>,
    held: std::sync::Mutex<Held>,
}

struct Held {
    epoch: u64,
    link: u64,
    /// Every event of the subscription after `start` up to `last` is held
    /// (`None` until the subscription's seam is known).
    start: Option<u64>,
    last: u64,
    /// The highest seam handed out for the subscription.
    promised: u64,
    /// Another subscription of the tenant here overlaps this one.
    overlapped: bool,
    events: VecDeque<(Instant, Arc<Event>, usize)>,
    bytes: usize,
}

fn size_of(e: &Event) -> usize {
    e.envelope.len() + e.frame.len() + 256
}

impl Window {
    pub(super) fn new(shared: Arc<Windows>) -> Self {
        let link = shared.link();
        Self {
            shared,
            held: std::sync::Mutex::new(Held {
                epoch: 0,
                link,
                start: None,
                last: 0,
                promised: 0,
                overlapped: false,
                events: VecDeque::new(),
                bytes: 0,
            }),
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drop the oldest event; the window is then complete after it.
    fn pop_oldest(&self, h: &mut Held) {
        if let Some((_, e, size)) = h.events.pop_front() {
            h.bytes -= size;
            self.shared.bytes.fetch_sub(size, Ordering::Relaxed);
            h.start = Some(e.id.seq);
        }
    }

    fn clear(&self, h: &mut Held) {
        self.shared.bytes.fetch_sub(h.bytes, Ordering::Relaxed);
        h.bytes = 0;
        h.events.clear();
    }

    /// The subscription's seam: everything stored after `first` reaches it.
    pub(super) fn begin(&self, epoch: u64, first: u64) {
        let mut h = self.held();
        if h.start.is_some() {
            return;
        }
        if h.events
            .front()
            .is_some_and(|(_, e, _)| e.id.epoch != epoch)
        {
            self.clear(&mut h);
        }
        while h.events.front().is_some_and(|(_, e, _)| e.id.seq <= first) {
            self.pop_oldest(&mut h);
        }
        h.epoch = epoch;
        h.start = Some(first);
        h.last = h.last.max(first);
    }

    /// An event the subscription delivered (in the order it delivered them).
    pub(super) fn push(&self, event: &Arc<Event>) {
        let mut h = self.held();
        let link = self.shared.link();
        if h.link != link || (h.start.is_some() && h.epoch != event.id.epoch) {
            // Something may be missing before this event: start over here.
            self.clear(&mut h);
            h.link = link;
            h.epoch = event.id.epoch;
            h.start = Some(event.id.seq.saturating_sub(1));
            h.last = event.id.seq.saturating_sub(1);
        }
        if h.start.is_some() && event.id.seq <= h.last {
            return;
        }
        let size = size_of(event);
        let now = Instant::now();
        h.events.push_back((now, event.clone(), size));
        h.bytes += size;
        h.last = h.last.max(event.id.seq);
        self.shared.bytes.fetch_add(size, Ordering::Relaxed);
        while h.events.len() > KEEP
            || h.events
                .front()
                .is_some_and(|(at, ..)| now - *at > KEEP_FOR)
            || (h.events.len() > 1 && self.shared.over_budget())
        {
            self.pop_oldest(&mut h);
        }
    }

    /// The seam to hand a new local subscriber when the window is whole:
    /// everything up to it is here, everything after it comes live.
    pub(super) fn seam(&self) -> Option<u64> {
        let mut h = self.held();
        if h.start.is_none() || h.overlapped || h.link != self.shared.link() {
            return None;
        }
        h.promised = h.promised.max(h.last);
        Some(h.last)
    }

    /// A seam handed out from elsewhere (the stream's head).
    pub(super) fn promise(&self, seam: u64) {
        let mut h = self.held();
        h.promised = h.promised.max(seam);
    }

    /// Another subscription of the tenant overlaps this one: never used
    /// again.
    pub(super) fn overlapped(&self) {
        let mut h = self.held();
        h.overlapped = true;
        self.clear(&mut h);
    }

    /// Empty it (the tenant's history changed): complete after `last`.
    pub(super) fn forget(&self) {
        let mut h = self.held();
        self.clear(&mut h);
        if h.start.is_some() {
            h.start = Some(h.last);
        }
    }

    /// The events after `after` when the window holds all of them up to
    /// every seam it handed out; `None` when it does not.
    pub(super) fn after(&self, epoch: u64, after: u64) -> Option<Vec<Arc<Event>>> {
        let h = self.held();
        let whole = !h.overlapped
            && h.link == self.shared.link()
            && h.epoch == epoch
            && h.start.is_some_and(|s| s <= after)
            && h.last >= h.promised;
        if !whole {
            return None;
        }
        let first = h.events.partition_point(|(_, e, _)| e.id.seq <= after);
        Some(h.events.range(first..).map(|(_, e, _)| e.clone()).collect())
    }
}

impl NatsBroker {
    /// `tenant`'s events after `after` that `filter` keeps (at most
    /// `limit`), from the windows of the upstream subscriptions to every
    /// pattern of `scope`; `None` when one of them is not held here or its
    /// window does not reach back to the cursor.
    pub(super) async fn read_windows(
        &self,
        tenant: &Arc<str>,
        scope: &[Pattern],
        after: Cursor,
        filter: Filter<'_>,
        limit: usize,
    ) -> Option<ReadBatch> {
        if scope.is_empty() {
            return None;
        }
        let windows: Vec<Arc<Window>> = {
            let interests = self.interests.lock().await;
            scope
                .iter()
                .map(|p| {
                    interests
                        .get(&(tenant.clone(), p.clone()))
                        .map(|i| i.window.clone())
                })
                .collect::<Option<_>>()?
        };
        let mut events = Vec::new();
        for w in &windows {
            events.extend(w.after(after.epoch, after.seq)?);
        }
        if windows.len() > 1 {
            events.sort_unstable_by_key(|e| e.id.seq);
            events.dedup_by_key(|e| e.id.seq);
        }
        let mut out = ReadBatch::at(after);
        self.page_of_held(tenant, &events, filter, limit, &mut out);
        Some(out)
    }

    /// Empty the windows of `tenant`'s subscriptions (an erasure).
    pub(super) async fn forget_windows(&self, tenant: &str) {
        for (key, i) in self.interests.lock().await.iter() {
            if &*key.0 == tenant {
                i.window.forget();
            }
        }
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        let h = self.held.get_mut().unwrap_or_else(|e| e.into_inner());
        self.shared.bytes.fetch_sub(h.bytes, Ordering::Relaxed);
    }
}
