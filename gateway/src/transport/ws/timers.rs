//! A connection's clocks: the deadlines one timer waits for (heartbeat,
//! idle timeout, token expiry, drain) and the message rate limit.

use std::time::Duration;

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
    /// The heartbeat's intervals in seconds (every connection keeps them:
    /// small).
    ping_every: u32,
    idle_after: u32,
}

impl Deadlines {
    pub(super) fn new(hb: &switchboard_config::gateway::HeartbeatConfig, expiry: Instant) -> Self {
        let now = Instant::now();
        let secs = |s: u64| u32::try_from(s).unwrap_or(u32::MAX);
        let mut clock = Self {
            ping: now,
            idle: now,
            expiry,
            drain: None,
            ping_every: secs(hb.ping_interval_seconds),
            idle_after: secs(hb.idle_timeout_seconds),
        };
        clock.ping = now + clock.ping_interval();
        clock.heard_from_client(now);
        clock
    }

    pub(super) fn ping_interval(&self) -> Duration {
        Duration::from_secs(self.ping_every.into())
    }

    /// The client sent something at `now`: the idle deadline moves.
    pub(super) fn heard_from_client(&mut self, now: Instant) {
        self.idle = now + Duration::from_secs(self.idle_after.into());
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

    pub(super) fn next(&self) -> Instant {
        let soonest = self.ping.min(self.idle).min(self.expiry);
        self.drain.map_or(soonest, |d| d.min(soonest))
    }
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
    use switchboard_config::gateway::HeartbeatConfig;

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
    async fn an_absurd_expiry_is_capped_at_a_year() {
        let year = Duration::from_secs(365 * 24 * 3600);
        assert_eq!(deadline_for_expiry(u64::MAX), Instant::now() + year);
        assert_eq!(deadline_for_expiry(0), Instant::now());
    }
}
