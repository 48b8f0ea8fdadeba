//! A connection's clocks: the deadlines one timer waits for (heartbeat,
//! idle timeout, token expiry, drain) and the message rate limit.

use std::time::Duration;

use switchboard_config::gateway::HeartbeatConfig;
use tokio::time::Instant;

/// Allows `messages_per_minute` with bursts of a tenth of that (at least
/// ten). Kept small: every connection holds one.
pub(crate) struct RateLimit {
    tokens: f32,
    per_minute: u32,
    at: Instant,
}

impl RateLimit {
    pub(crate) fn new(per_minute: u32) -> Self {
        let mut limit = Self {
            tokens: 0.0,
            per_minute,
            at: Instant::now(),
        };
        limit.tokens = limit.capacity();
        limit
    }
    fn capacity(&self) -> f32 {
        (self.per_minute as f32 / 10.0).max(10.0)
    }
    pub(crate) fn allow(&mut self) -> bool {
        let now = Instant::now();
        let elapsed = now.duration_since(self.at).as_secs_f32();
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
    pub(super) ping: Instant,
    /// Closed when the client has sent nothing (not even a pong) until then.
    pub(super) idle: Instant,
    pub(super) expiry: Instant,
    pub(super) drain: Option<Instant>,
    /// With a write delay: until when events are held back, a delay after
    /// the last write.
    quiet_until: Option<Instant>,
    /// Events are held back: the timer waits for `quiet_until` to write
    /// them, and the queue is left alone until then.
    pub(super) holding: bool,
}

impl Deadlines {
    pub(super) fn new(hb: &HeartbeatConfig, expiry: Instant) -> Self {
        let now = Instant::now();
        let mut clock = Self {
            ping: now,
            idle: now,
            expiry,
            drain: None,
            quiet_until: None,
            holding: false,
        };
        clock.ping = now + Duration::from_secs(hb.ping_interval_seconds);
        clock.heard_from_client(now, hb);
        clock
    }

    /// The client sent something at `now`: the idle deadline moves. The
    /// heartbeat's intervals are not kept here (every connection's state
    /// holds this clock).
    pub(super) fn heard_from_client(&mut self, now: Instant, hb: &HeartbeatConfig) {
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
                self.drain = Some(d.deadline_for(conn));
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
    pub(super) fn write_or_hold(&mut self, now: impl FnOnce() -> Instant, delay_ms: u64) -> Write {
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
    pub(super) fn take_flush(&mut self, now: Instant, delay_ms: u64) -> bool {
        let due = self.holding && self.quiet_until.is_some_and(|until| now >= until);
        if due {
            self.holding = false;
            self.quiet_until = Some(now + Duration::from_millis(delay_ms));
        }
        due
    }

    /// Whether a deadline other than the flush has passed.
    pub(super) fn others_due(&self, now: Instant) -> bool {
        now >= self.next_other()
    }

    fn next_other(&self) -> Instant {
        let soonest = self.ping.min(self.idle).min(self.expiry);
        self.drain.map_or(soonest, |d| d.min(soonest))
    }

    pub(super) fn next(&self) -> Instant {
        let soonest = self.next_other();
        match self.quiet_until {
            Some(until) if self.holding => until.min(soonest),
            _ => soonest,
        }
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
        d.expiry = now + Duration::from_secs(3600);
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
        assert_eq!(d.drain, Some(now));
        assert!(!Deadlines::new(&hb, now).arm_drain(None, 7));
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_delay_holds_only_what_follows_a_write_within_the_delay() {
        let ms = Duration::from_millis;
        let hb = HeartbeatConfig::default();
        let now = Instant::now();
        let ping = now + Duration::from_secs(30);
        let mut d = Deadlines::new(&hb, now + Duration::from_secs(3600));
        let no_clock = || -> Instant { panic!("the clock was read without a delay") };
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
        assert_eq!(d.next(), now + ms(20), "the flush is the nearest deadline");
        assert!(!d.take_flush(now + ms(19), 20), "not yet");
        assert!(!d.others_due(now + ms(20)));
        assert!(d.take_flush(now + ms(20), 20));
        assert!(!d.take_flush(now + ms(20), 20), "taken once");
        assert_eq!(d.next(), ping, "back to the ping");
        // The flush was a write: what follows within 20 ms of it waits.
        assert_eq!(d.write_or_hold(|| now + ms(30), 20), Write::Hold);
        assert_eq!(d.next(), now + ms(40));
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
}
