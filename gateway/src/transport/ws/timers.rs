//! A connection's clocks: the deadlines one timer waits for (heartbeat,
//! idle timeout, token expiry, drain) and the message rate limit.

use std::num::NonZeroI64;
use std::ops::Add;
use std::sync::LazyLock;
use std::time::Duration;

use switchboard_config::gateway::HeartbeatConfig;
use tokio::time::Instant;

/// A point on the monotonic clock in half an `Instant`'s space: signed
/// nanoseconds from a process-wide origin (±292 years; exact both ways).
/// Every open connection keeps several: as `Instant`s, its deadlines took
/// 88 bytes of each connection's task, as ticks 48. Never zero inside, so
/// an `Option<Tick>` is no larger.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Tick(NonZeroI64);

/// The ticks' origin: the clock when one was first taken.
static ORIGIN: LazyLock<Instant> = LazyLock::new(Instant::now);

impl Tick {
    /// `at` as a tick.
    pub(crate) fn at(at: Instant) -> Self {
        let origin = *ORIGIN;
        let nanos = |d: Duration| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX);
        let offset = if at >= origin {
            nanos(at - origin)
        } else {
            -nanos(origin - at)
        };
        Self::from_offset(offset)
    }

    pub(crate) fn now() -> Self {
        Self::at(Instant::now())
    }

    /// The instant this tick is (for a timer).
    pub(crate) fn instant(self) -> Instant {
        let offset = self.offset();
        let magnitude = Duration::from_nanos(offset.unsigned_abs());
        if offset >= 0 {
            *ORIGIN + magnitude
        } else {
            *ORIGIN - magnitude
        }
    }

    /// Zero is kept free for `Option`'s niche: offsets from 0 up are stored
    /// one higher (the largest one saturates, 292 years out).
    fn from_offset(offset: i64) -> Self {
        let stored = if offset >= 0 {
            offset.saturating_add(1)
        } else {
            offset
        };
        Self(NonZeroI64::new(stored).unwrap_or(NonZeroI64::MIN))
    }

    fn offset(self) -> i64 {
        let stored = self.0.get();
        if stored > 0 { stored - 1 } else { stored }
    }

    /// Seconds from `earlier` to this tick (0 when it is not later).
    fn secs_since(self, earlier: Tick) -> f32 {
        self.offset().saturating_sub(earlier.offset()).max(0) as f32 / 1e9
    }
}

impl Add<Duration> for Tick {
    type Output = Tick;
    fn add(self, d: Duration) -> Tick {
        let nanos = i64::try_from(d.as_nanos()).unwrap_or(i64::MAX);
        Tick::from_offset(self.offset().saturating_add(nanos))
    }
}

/// Allows `messages_per_minute` with bursts of a tenth of that (at least
/// ten). Kept small: every connection holds one.
pub(crate) struct RateLimit {
    tokens: f32,
    per_minute: u32,
    at: Tick,
}

impl RateLimit {
    pub(crate) fn new(per_minute: u32) -> Self {
        let mut limit = Self {
            tokens: 0.0,
            per_minute,
            at: Tick::now(),
        };
        limit.tokens = limit.capacity();
        limit
    }
    fn capacity(&self) -> f32 {
        (self.per_minute as f32 / 10.0).max(10.0)
    }
    pub(crate) fn allow(&mut self) -> bool {
        let now = Tick::now();
        let elapsed = now.secs_since(self.at);
        self.at = now;
        let per_sec = self.per_minute as f32 / 60.0;
        self.tokens = (self.tokens + elapsed * per_sec).min(self.capacity());
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

pub(super) fn unix_now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

/// The deadlines one connection keeps; a single timer waits for the nearest.
pub(super) struct Deadlines {
    pub(super) ping: Tick,
    /// Closed when the client has sent nothing (not even a pong) until then.
    pub(super) idle: Tick,
    pub(super) expiry: Tick,
    pub(super) drain: Option<Tick>,
    /// With a write delay: until when events are held back, a delay after
    /// the last write.
    quiet_until: Option<Tick>,
    /// Events are held back: the timer waits for `quiet_until` to write
    /// them, and the queue is left alone until then.
    pub(super) holding: bool,
}

impl Deadlines {
    pub(super) fn new(hb: &HeartbeatConfig, expiry: Instant) -> Self {
        let now = Tick::now();
        let mut clock = Self {
            ping: now + Duration::from_secs(hb.ping_interval_seconds),
            idle: now,
            expiry: Tick::at(expiry),
            drain: None,
            quiet_until: None,
            holding: false,
        };
        clock.heard_from_client(now, hb);
        clock
    }

    /// The client sent something at `now`: the idle deadline moves. The
    /// heartbeat's intervals are not kept here (every connection's state
    /// holds this clock).
    pub(super) fn heard_from_client(&mut self, now: Tick, hb: &HeartbeatConfig) {
        self.idle = now + Duration::from_secs(hb.idle_timeout_seconds);
    }

    /// Take the drain's deadline for this connection, once; true when it
    /// was just set.
    pub(super) fn arm_drain(
        &mut self,
        drain: Option<crate::node::Drain>,
        conn: crate::hub::ConnId,
    ) -> bool {
        match (self.drain, drain) {
            (None, Some(d)) => {
                self.drain = Some(Tick::at(d.deadline_for(conn)));
                true
            }
            _ => false,
        }
    }

    /// An event is to be written `now` (read only when a delay is set: the
    /// default path costs no clock read per delivery), with a write delay of
    /// `delay_ms` (not kept here: every connection's state holds this
    /// clock). Like Nagle's algorithm: a connection that wrote nothing in
    /// the last delay writes at once; one that did holds the event back
    /// until a delay after its last write, gathering the ones that follow
    /// into the same write. A connection receiving fewer events a second
    /// than the delay's inverse never waits.
    pub(super) fn write_or_hold(&mut self, now: impl FnOnce() -> Tick, delay_ms: u64) -> Write {
        if delay_ms == 0 {
            return Write::Now;
        }
        let now = now();
        match self.quiet_until {
            Some(until) if now < until => {
                self.holding = true;
                Write::Hold
            }
            _ => {
                self.quiet_until = Some(now + Duration::from_millis(delay_ms));
                Write::Now
            }
        }
    }

    /// True (once) when events held back are due at `now`; the next write
    /// then waits another delay.
    pub(super) fn take_flush(&mut self, now: Tick, delay_ms: u64) -> bool {
        let due = self.holding && self.quiet_until.is_some_and(|until| now >= until);
        if due {
            self.holding = false;
            self.quiet_until = Some(now + Duration::from_millis(delay_ms));
        }
        due
    }

    /// Whether a deadline other than the flush has passed.
    pub(super) fn others_due(&self, now: Tick) -> bool {
        now >= self.next_other()
    }

    fn next_other(&self) -> Tick {
        let soonest = self.ping.min(self.idle).min(self.expiry);
        self.drain.map_or(soonest, |d| d.min(soonest))
    }

    /// When the connection's timer is to fire.
    pub(super) fn next(&self) -> Instant {
        let soonest = self.next_other();
        match self.quiet_until {
            Some(until) if self.holding => until.min(soonest),
            _ => soonest,
        }
        .instant()
    }
}

/// Whether an event is written at once or held back for a write delay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Write {
    Now,
    Hold,
}

/// When a token with this `exp` expires; capped at a year so an absurd
/// claim cannot overflow the clock.
pub(crate) fn deadline_for_expiry(exp: u64) -> Instant {
    const YEAR: u64 = 365 * 24 * 3600;
    Instant::now() + Duration::from_secs(exp.saturating_sub(unix_now()).min(YEAR))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_rate_limit_allows_a_burst_of_a_tenth_then_refills() {
        let mut r = RateLimit::new(600);
        // A tenth of a minute's allowance at once, then nothing.
        assert_eq!((0..100).filter(|_| r.allow()).count(), 60);
        // 600 a minute is 10 a second.
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!((0..100).filter(|_| r.allow()).count(), 5);
        // Refilling stops at the burst size.
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!((0..1000).filter(|_| r.allow()).count(), 60);
        // Small allowances still get a burst of ten.
        let mut small = RateLimit::new(6);
        assert_eq!((0..100).filter(|_| small.allow()).count(), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn the_timer_waits_for_the_nearest_deadline_and_a_drain_arms_once() {
        let hb = HeartbeatConfig {
            ping_interval_seconds: 30,
            idle_timeout_seconds: 60,
            ..HeartbeatConfig::default()
        };
        let now = Instant::now();
        let mut d = Deadlines::new(&hb, now + Duration::from_secs(10));
        assert_eq!(d.next(), now + Duration::from_secs(10), "expiry first");
        d.expiry = Tick::at(now + Duration::from_secs(3600));
        assert_eq!(d.next(), now + Duration::from_secs(30), "then the ping");
        let drain = crate::node::Drain {
            started: now,
            period: Duration::from_secs(0),
        };
        assert!(d.arm_drain(Some(drain), 7));
        assert_eq!(d.next(), now, "a drain with no period is due at once");
        let later = crate::node::Drain {
            started: now + Duration::from_secs(5),
            period: Duration::from_secs(0),
        };
        assert!(!d.arm_drain(Some(later), 7), "armed once");
        assert_eq!(d.drain, Some(Tick::at(now)));
        assert!(!Deadlines::new(&hb, now).arm_drain(None, 7));
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_delay_holds_only_what_follows_a_write_within_the_delay() {
        let ms = Duration::from_millis;
        let hb = HeartbeatConfig::default();
        let now = Tick::now();
        let ping = (now + Duration::from_secs(30)).instant();
        let mut d = Deadlines::new(&hb, (now + Duration::from_secs(3600)).instant());
        let no_clock = || -> Tick { panic!("the clock was read without a delay") };
        assert_eq!(d.write_or_hold(no_clock, 0), Write::Now, "no delay");
        assert_eq!(d.write_or_hold(no_clock, 0), Write::Now);
        assert_eq!(d.next(), ping);
        // A quiet connection writes at once, and is then quiet for 20 ms.
        assert_eq!(d.write_or_hold(|| now, 20), Write::Now);
        assert_eq!(d.next(), ping, "nothing held: no flush to wait for");
        assert!(!d.take_flush(now + ms(25), 20), "nothing to flush");
        // Within the 20 ms, events are held until they end.
        assert_eq!(d.write_or_hold(|| now + ms(8), 20), Write::Hold);
        assert_eq!(d.write_or_hold(|| now + ms(16), 20), Write::Hold);
        assert!(d.holding);
        assert_eq!(
            d.next(),
            (now + ms(20)).instant(),
            "the flush is the nearest deadline"
        );
        assert!(!d.take_flush(now + ms(19), 20), "not yet");
        assert!(!d.others_due(now + ms(20)));
        assert!(d.take_flush(now + ms(20), 20));
        assert!(!d.take_flush(now + ms(20), 20), "taken once");
        assert_eq!(d.next(), ping, "back to the ping");
        // The flush was a write: what follows within 20 ms of it waits.
        assert_eq!(d.write_or_hold(|| now + ms(30), 20), Write::Hold);
        assert_eq!(d.next(), (now + ms(40)).instant());
        assert!(d.take_flush(now + ms(40), 20));
        // An event more than a delay after the last write goes at once.
        assert_eq!(d.write_or_hold(|| now + ms(61), 20), Write::Now);
        assert!(!d.holding);
    }

    #[tokio::test(start_paused = true)]
    async fn an_absurd_expiry_is_capped_at_a_year() {
        let year = Duration::from_secs(365 * 24 * 3600);
        assert_eq!(deadline_for_expiry(u64::MAX), Instant::now() + year);
        assert_eq!(deadline_for_expiry(0), Instant::now());
    }

    #[tokio::test(start_paused = true)]
    async fn a_tick_is_the_instant_it_was_taken_from_before_and_after_its_origin() {
        let origin = Tick::now().instant();
        for at in [
            origin,
            origin + Duration::from_nanos(1),
            origin + Duration::from_secs(365 * 24 * 3600),
            origin - Duration::from_nanos(1),
            origin - Duration::from_millis(1500),
        ] {
            assert_eq!(Tick::at(at).instant(), at, "{at:?}");
        }
        let earlier = Tick::at(origin - Duration::from_secs(1));
        assert!(
            earlier < Tick::at(origin)
                && Tick::at(origin) < Tick::at(origin + Duration::from_nanos(1))
        );
        assert_eq!(earlier + Duration::from_secs(1), Tick::at(origin));
        assert_eq!((earlier + Duration::from_secs(2)).secs_since(earlier), 2.0);
        assert_eq!(earlier.secs_since(Tick::at(origin)), 0.0, "never negative");
        // Far enough out, adding saturates instead of wrapping.
        let far = Tick::at(origin) + Duration::from_secs(u64::MAX);
        assert!(far > Tick::at(origin) + Duration::from_secs(100 * 365 * 24 * 3600));
    }

    #[test]
    fn a_connections_clocks_stay_small() {
        // Each open connection's task holds them (docs/benchmarks.md,
        // memory per connection).
        assert_eq!(std::mem::size_of::<Option<Tick>>(), 8);
        assert!(std::mem::size_of::<Deadlines>() <= 48);
        assert!(std::mem::size_of::<RateLimit>() <= 16);
    }
}
