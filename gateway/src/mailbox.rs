//! One connection's outbound mailbox: the bounded queue the hub fills and
//! the connection drains.
//!
//! It is a short critical section around a `VecDeque` plus one waker, not a
//! channel: an idle connection's mailbox allocates nothing, a delivery is a
//! push under an uncontended lock (the waker is only touched when the queue
//! was empty), and the slow-consumer verdict travels on the same wake-up.
//!
//! A burst of events (a streamed or batched publish, the messages NATS
//! delivered together) is fanned out with its wake-ups held back
//! ([`hold_wakes`]): each connection is woken once for the whole burst and
//! writes it with one syscall, instead of once per event. The cost per
//! delivery then falls as load rises.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;

use futures_util::task::AtomicWaker;

use crate::event::Event;

/// Queue capacity kept after the connection drained a burst; larger
/// buffers are given back so a once-busy idle connection stays small.
const KEEP_CAPACITY: usize = 64;

/// Wake-ups held back while a burst is fanned out; whatever is held is
/// woken when the burst ends, and also if it is abandoned half-way
/// (dropped): no queued event can be left without its wake-up.
#[derive(Default)]
struct HeldWakes(Vec<Arc<Mailbox>>);

impl HeldWakes {
    fn release(&mut self) {
        for mailbox in self.0.drain(..) {
            mailbox.waker.wake();
        }
    }
}

impl Drop for HeldWakes {
    fn drop(&mut self) {
        self.release();
    }
}

tokio::task_local! {
    static HELD: RefCell<HeldWakes>;
}

/// Run `burst` (which may await) with the wake-ups of the mailboxes it
/// fills held back until it is done: one wake-up per connection per burst.
pub async fn hold_wakes<F: Future>(burst: F) -> F::Output {
    HELD.scope(RefCell::new(HeldWakes::default()), async {
        let out = burst.await;
        release_held();
        out
    })
    .await
}

/// [`hold_wakes`] for a burst that does not await.
pub fn hold_wakes_sync<R>(burst: impl FnOnce() -> R) -> R {
    HELD.sync_scope(RefCell::new(HeldWakes::default()), || {
        let out = burst();
        release_held();
        out
    })
}

fn release_held() {
    let _ = HELD.try_with(|held| held.borrow_mut().release());
}

/// What became of one offered event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offered {
    /// Queued for the connection.
    Queued,
    /// The queue was full: the connection is now a slow consumer and will
    /// be closed (this is the first event it lost).
    Overflowed,
    /// The connection had already overflowed; the event is not queued.
    Dropped,
}

/// The connection overflowed its queue and must be closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("outbound queue overflowed")]
pub struct Overflowed;

#[derive(Debug, Default)]
struct Queue {
    events: VecDeque<Arc<Event>>,
    overflowed: bool,
    /// The policy or the drain state changed since the connection last
    /// looked (see [`Mailbox::signal_control`]).
    control: bool,
}

impl Queue {
    /// The oldest event; the capacity a burst left is given back once the
    /// queue is empty.
    fn pop(&mut self) -> Option<Arc<Event>> {
        let event = self.events.pop_front();
        if self.events.is_empty() && self.events.capacity() > KEEP_CAPACITY {
            self.events.shrink_to(KEEP_CAPACITY);
        }
        event
    }
}

/// What woke a connection that waits with [`Mailbox::take_or_control`].
#[derive(Debug)]
pub enum Wake {
    /// The next queued event.
    Event(Arc<Event>),
    /// The policy or the drain state changed: re-check them.
    Control,
}

#[derive(Debug)]
/// A connection's bounded outbound queue (see the module docs).
pub struct Mailbox {
    queue: Mutex<Queue>,
    waker: AtomicWaker,
    capacity: usize,
    /// Only events from this region, when set.
    pub region: Option<Arc<str>>,
    /// The connection's user: only its own private channel reaches it.
    pub user: Arc<str>,
}

impl Mailbox {
    /// A mailbox of `capacity` events of `user`, keeping only `region`'s when set.
    pub fn new(capacity: usize, region: Option<Arc<str>>, user: Arc<str>) -> Self {
        Self {
            queue: Mutex::default(),
            waker: AtomicWaker::new(),
            capacity: capacity.max(1),
            region,
            user,
        }
    }

    /// May this connection receive `event` at all, whatever it subscribed
    /// to: not another region's when it asked for one, never another
    /// user's private channel.
    pub fn may_receive(&self, event: &Event) -> bool {
        self.region.as_deref().is_none_or(|r| r == &*event.region)
            && event.private_to.as_deref().is_none_or(|u| u == &*self.user)
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queue an event without ever waiting (called by the hub's fan-out).
    /// Inside [`hold_wakes`] the wake-up waits for the end of the burst.
    pub fn offer(self: &Arc<Self>, event: &Arc<Event>) -> Offered {
        let mut q = self.lock();
        if q.overflowed {
            return Offered::Dropped;
        }
        if q.events.len() >= self.capacity {
            q.overflowed = true;
            q.events = VecDeque::new();
            drop(q);
            self.waker.wake();
            return Offered::Overflowed;
        }
        let was_empty = q.events.is_empty();
        q.events.push_back(event.clone());
        drop(q);
        if was_empty {
            let held = HELD.try_with(|held| held.borrow_mut().0.push(self.clone()));
            if held.is_err() {
                self.waker.wake();
            }
        }
        Offered::Queued
    }

    /// Whether the queue overflowed (the connection is a slow consumer).
    pub fn overflowed(&self) -> bool {
        self.lock().overflowed
    }

    /// Take the next queued event, if any.
    pub fn try_take(&self) -> Result<Option<Arc<Event>>, Overflowed> {
        let mut q = self.lock();
        if q.overflowed {
            return Err(Overflowed);
        }
        Ok(q.pop())
    }

    /// Wait for the next event (cancel-safe: nothing is taken unless it is
    /// returned).
    pub async fn take(&self) -> Result<Arc<Event>, Overflowed> {
        poll_fn(|cx| {
            // Register before looking, so an event queued in between wakes us.
            self.waker.register(cx.waker());
            match self.try_take() {
                Ok(Some(event)) => Poll::Ready(Ok(event)),
                Ok(None) => Poll::Pending,
                Err(e) => Poll::Ready(Err(e)),
            }
        })
        .await
    }

    /// Wait for the next event or a control signal, whichever comes first
    /// (a signal first when both are there: a revoked subscription stops
    /// before more of its events are written). Cancel-safe.
    pub async fn take_or_control(&self) -> Result<Wake, Overflowed> {
        poll_fn(|cx| {
            self.waker.register(cx.waker());
            let mut q = self.lock();
            if q.overflowed {
                return Poll::Ready(Err(Overflowed));
            }
            if std::mem::take(&mut q.control) {
                return Poll::Ready(Ok(Wake::Control));
            }
            match q.pop() {
                Some(event) => Poll::Ready(Ok(Wake::Event(event))),
                None => Poll::Pending,
            }
        })
        .await
    }

    /// The policy or the drain state changed: wake the connection so it
    /// re-checks them. Connections are signalled through their mailbox
    /// rather than each holding a watch of their own: nothing more to keep
    /// per connection, and nothing more to poll on every delivery.
    pub fn signal_control(&self) {
        self.lock().control = true;
        self.waker.wake();
    }

    /// Ready once the connection has overflowed (wakes `cx` then).
    pub fn poll_kicked(&self, cx: &mut std::task::Context<'_>) -> Poll<()> {
        self.waker.register(cx.waker());
        if self.overflowed() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(seq: u64) -> Arc<Event> {
        crate::event::test_event("t", "x", seq)
    }

    #[test]
    fn keeps_order_and_reports_overflow_once() {
        let m = Arc::new(Mailbox::new(2, None, "u".into()));
        assert_eq!(m.offer(&event(1)), Offered::Queued);
        assert_eq!(m.offer(&event(2)), Offered::Queued);
        assert_eq!(m.try_take().unwrap().unwrap().id.seq, 1);
        assert_eq!(m.offer(&event(3)), Offered::Queued);
        assert_eq!(m.offer(&event(4)), Offered::Overflowed);
        assert_eq!(m.offer(&event(5)), Offered::Dropped);
        assert!(m.overflowed());
        assert!(matches!(m.try_take(), Err(Overflowed)));
    }

    #[tokio::test]
    async fn take_wakes_on_offer_and_on_overflow() {
        let m = Arc::new(Mailbox::new(1, None, "u".into()));
        let waiter = tokio::spawn({
            let m = m.clone();
            async move { m.take().await.map(|e| e.id.seq) }
        });
        tokio::task::yield_now().await;
        m.offer(&event(7));
        assert_eq!(waiter.await.unwrap(), Ok(7));

        let kicked = tokio::spawn({
            let m = m.clone();
            async move { poll_fn(|cx| m.poll_kicked(cx)).await }
        });
        m.offer(&event(8));
        m.offer(&event(9));
        tokio::time::timeout(std::time::Duration::from_secs(5), kicked)
            .await
            .expect("kick must wake the connection")
            .unwrap();
    }

    #[tokio::test]
    async fn a_held_burst_wakes_each_connection_once_at_its_end() {
        let m = Arc::new(Mailbox::new(16, None, "u".into()));
        let wakes = Arc::new(WakeCount::default());
        let waker = std::task::Waker::from(wakes.clone());
        m.waker.register(&waker);
        hold_wakes(async {
            m.offer(&event(1));
            tokio::task::yield_now().await;
            m.offer(&event(2));
            assert_eq!(wakes.count(), 0, "no wake-up inside the burst");
        })
        .await;
        assert_eq!(wakes.count(), 1, "one wake-up when the burst ends");

        // Abandoned half-way (its task dropped): the wake-up still comes.
        while m.try_take().unwrap().is_some() {}
        m.waker.register(&waker);
        let m2 = m.clone();
        let burst = tokio::spawn(hold_wakes(async move {
            m2.offer(&event(3));
            std::future::pending::<()>().await;
        }));
        tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while m.lock().events.is_empty() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the burst queues its event");
        assert_eq!(wakes.count(), 1);
        burst.abort();
        let _ = burst.await;
        assert_eq!(wakes.count(), 2, "an abandoned burst still wakes");

        // Outside a burst, at once.
        while m.try_take().unwrap().is_some() {}
        m.waker.register(&waker);
        hold_wakes_sync(|| {
            m.offer(&event(4));
            assert_eq!(wakes.count(), 2);
        });
        assert_eq!(wakes.count(), 3);
        while m.try_take().unwrap().is_some() {}
        m.waker.register(&waker);
        m.offer(&event(5));
        assert_eq!(wakes.count(), 4);
    }

    #[derive(Default)]
    struct WakeCount(std::sync::atomic::AtomicUsize);

    impl WakeCount {
        fn count(&self) -> usize {
            self.0.load(std::sync::atomic::Ordering::SeqCst)
        }
    }

    impl std::task::Wake for WakeCount {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// Every connection keeps one mailbox in an `Arc` (16 bytes of counts
    /// before it): together they stay in jemalloc's 128-byte size class.
    #[test]
    fn a_mailbox_stays_in_its_size_class() {
        let size = std::mem::size_of::<Mailbox>();
        assert!(size + 16 <= 128, "the mailbox grew to {size} bytes");
    }

    #[tokio::test]
    async fn a_control_signal_wakes_a_waiting_connection_once_and_comes_first() {
        let m = Arc::new(Mailbox::new(4, None, "u".into()));
        let waiter = tokio::spawn({
            let m = m.clone();
            async move { m.take_or_control().await }
        });
        tokio::task::yield_now().await;
        m.signal_control();
        let woke = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("a signal wakes the connection")
            .unwrap();
        assert!(matches!(woke, Ok(Wake::Control)));

        // Queued before the signal, delivered after it; signals coalesce.
        m.offer(&event(1));
        m.signal_control();
        m.signal_control();
        assert!(matches!(m.take_or_control().await, Ok(Wake::Control)));
        assert!(matches!(m.take_or_control().await, Ok(Wake::Event(e)) if e.id.seq == 1));
        assert!(m.try_take().unwrap().is_none(), "one signal, one event");

        // An overflow wins over both.
        m.signal_control();
        for seq in 2..8 {
            m.offer(&event(seq));
        }
        assert!(matches!(m.take_or_control().await, Err(Overflowed)));
    }

    #[test]
    fn a_drained_burst_gives_its_memory_back() {
        let m = Arc::new(Mailbox::new(10_000, None, "u".into()));
        for seq in 0..5_000 {
            m.offer(&event(seq));
        }
        while m.try_take().unwrap().is_some() {}
        assert!(m.lock().events.capacity() <= KEEP_CAPACITY);
    }
}
