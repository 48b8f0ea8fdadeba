//! Protection against connection storms and saturation.
//!
//! Two mechanisms, both checked before a new WebSocket or SSE connection is
//! admitted (and the load one before a long-poll):
//!
//! - **connect rates**: token buckets per client address and per tenant, so
//!   a reconnect storm (or one abusive address, or one tenant's fleet) is
//!   admitted at a sustainable pace instead of all at once;
//! - **load shedding**: a monitor task measures how late the runtime runs a
//!   timer (the scheduling delay every task sees). While it is above
//!   `max_scheduler_lag_ms`, new connections are refused: the connections
//!   already open keep their latency instead of all of them degrading.
//!
//! A refusal is a WebSocket close 1013 ("try again later") or an HTTP 429
//! (`connect_rate_limited`) / 503 (`overloaded`) with `Retry-After`.

use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use axum::http::HeaderMap;
use dashmap::DashMap;
use switchboard_config::OverloadConfig;
use tokio::time::Instant;

/// How often the monitor measures the scheduling delay.
const TICK: Duration = Duration::from_millis(50);
/// Once saturated, new connections are refused for at least this long.
const HOLD: Duration = Duration::from_secs(1);
/// How often idle buckets are forgotten.
const SWEEP: Duration = Duration::from_secs(10);

/// Why a new connection is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The client address's connect rate is exceeded.
    AddressRate,
    /// The tenant's connect rate is exceeded.
    TenantRate,
    /// The process is saturated.
    Saturated,
}

impl Refusal {
    /// Label for `switchboard_connections_rejected_total{reason}`.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::AddressRate | Refusal::TenantRate => "connect_rate",
            Refusal::Saturated => "overloaded",
        }
    }

    /// What the client is told.
    pub fn message(self) -> &'static str {
        match self {
            Refusal::AddressRate => "too many new connections from this address; retry later",
            Refusal::TenantRate => "too many new connections for this tenant; retry later",
            Refusal::Saturated => "the gateway is overloaded; retry later",
        }
    }
}

/// Token buckets by key: `rate` per second, holding `burst` at most.
struct Buckets<K: Eq + Hash> {
    map: DashMap<K, Bucket>,
    rate: f64,
    burst: f64,
}

#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl<K: Eq + Hash> Buckets<K> {
    fn new(rate: u32, burst_seconds: u32) -> Option<Self> {
        (rate > 0).then(|| Self {
            map: DashMap::new(),
            rate: f64::from(rate),
            burst: (f64::from(rate) * f64::from(burst_seconds.max(1))).max(1.0),
        })
    }

    fn refill(&self, b: &mut Bucket, now: Instant) {
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.rate).min(self.burst);
        b.at = now;
    }

    /// Take one token for `key`, or say no.
    fn take(&self, key: K, now: Instant) -> bool {
        let mut b = self.map.entry(key).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        self.refill(&mut b, now);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Forget full buckets (a key not seen for a while costs nothing).
    fn sweep(&self, now: Instant) {
        self.map.retain(|_, b| {
            self.refill(b, now);
            b.tokens < self.burst
        });
    }
}

/// The process's overload protection (one per [`crate::node::Node`]).
pub struct Overload {
    per_address: Option<Buckets<IpAddr>>,
    per_tenant: Option<Buckets<Arc<str>>>,
    max_lag: Option<Duration>,
    retry_after: u64,
    address_header: Option<String>,
    started: Instant,
    /// Milliseconds since `started` of the monitor's last tick.
    last_tick_ms: AtomicU64,
    /// Milliseconds since `started` until which new connections are shed.
    shed_until_ms: AtomicU64,
    /// The last measured scheduling delay, in microseconds.
    lag_us: AtomicU64,
    monitor: AtomicBool,
}

impl Overload {
    /// Protection as configured.
    pub fn new(config: &OverloadConfig) -> Self {
        Self {
            per_address: Buckets::new(
                config.connects_per_second_per_address,
                config.connect_burst_seconds,
            ),
            per_tenant: Buckets::new(
                config.connects_per_second_per_tenant,
                config.connect_burst_seconds,
            ),
            max_lag: (config.max_scheduler_lag_ms > 0)
                .then(|| Duration::from_millis(config.max_scheduler_lag_ms)),
            retry_after: config.retry_after_seconds.max(1),
            address_header: config
                .client_address_header
                .as_ref()
                .map(|h| h.to_ascii_lowercase()),
            started: Instant::now(),
            last_tick_ms: AtomicU64::new(0),
            shed_until_ms: AtomicU64::new(0),
            lag_us: AtomicU64::new(0),
            monitor: AtomicBool::new(false),
        }
    }

    fn ms(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.started).as_millis()).unwrap_or(u64::MAX)
    }

    /// Start the monitor task (once; later calls do nothing).
    pub fn start(self: &Arc<Self>) {
        if self.monitor.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let mut next_sweep = Instant::now() + SWEEP;
            let mut expected = Instant::now() + TICK;
            loop {
                tokio::time::sleep_until(expected).await;
                let now = Instant::now();
                me.record(now.saturating_duration_since(expected), now);
                if now >= next_sweep {
                    if let Some(b) = &me.per_address {
                        b.sweep(now);
                    }
                    if let Some(b) = &me.per_tenant {
                        b.sweep(now);
                    }
                    next_sweep = now + SWEEP;
                }
                expected = now + TICK;
            }
        });
    }

    /// One measurement: the timer due at `now - lag` ran at `now`.
    fn record(&self, lag: Duration, now: Instant) {
        self.last_tick_ms.store(self.ms(now), Ordering::Release);
        self.lag_us.store(
            u64::try_from(lag.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        if self.max_lag.is_some_and(|max| lag > max) {
            self.shed_until_ms
                .store(self.ms(now + HOLD), Ordering::Release);
        }
    }

    /// The last measured scheduling delay.
    pub fn lag(&self) -> Duration {
        Duration::from_micros(self.lag_us.load(Ordering::Relaxed))
    }

    /// Whether new connections are shed now: the last measurement was over
    /// the limit (within the last second), or the monitor's tick is overdue by more
    /// than the limit (the runtime is stuck right now).
    pub fn saturated(&self) -> bool {
        let Some(max) = self.max_lag else {
            return false;
        };
        let now = self.ms(Instant::now());
        if now < self.shed_until_ms.load(Ordering::Acquire) {
            return true;
        }
        let overdue_ms = u64::try_from((TICK + max).as_millis()).unwrap_or(u64::MAX);
        self.monitor.load(Ordering::Acquire)
            && now.saturating_sub(self.last_tick_ms.load(Ordering::Acquire)) > overdue_ms
    }

    /// The client's address: the configured header's (first entry), else
    /// the TCP peer's.
    pub fn client_address(&self, headers: &HeaderMap, peer: Option<IpAddr>) -> Option<IpAddr> {
        if let Some(name) = &self.address_header {
            let from_header = headers
                .get(name.as_str())
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split(',').next())
                .and_then(|v| v.trim().parse().ok());
            if from_header.is_some() {
                return from_header;
            }
        }
        peer
    }

    /// Checks before authentication: the address's connect rate, then load.
    pub fn check_connect(&self, address: Option<IpAddr>) -> Result<(), Refusal> {
        if self.saturated() {
            return Err(Refusal::Saturated);
        }
        match (&self.per_address, address) {
            (Some(b), Some(a)) if !b.take(a, Instant::now()) => Err(Refusal::AddressRate),
            _ => Ok(()),
        }
    }

    /// Check after authentication: the tenant's connect rate.
    pub fn check_tenant(&self, tenant: &Arc<str>) -> Result<(), Refusal> {
        match &self.per_tenant {
            Some(b) if !b.take(tenant.clone(), Instant::now()) => Err(Refusal::TenantRate),
            _ => Ok(()),
        }
    }

    /// A `Retry-After` in seconds, spread over one to two times the
    /// configured value so refused clients do not come back together.
    pub fn retry_after(&self) -> u64 {
        self.retry_after + rand::random_range(0..=self.retry_after)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(per_address: u32, per_tenant: u32, lag_ms: u64) -> OverloadConfig {
        OverloadConfig {
            connects_per_second_per_address: per_address,
            connects_per_second_per_tenant: per_tenant,
            connect_burst_seconds: 1,
            max_scheduler_lag_ms: lag_ms,
            ..OverloadConfig::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn connect_rates_admit_a_burst_then_the_rate_per_key() {
        let o = Overload::new(&config(5, 0, 0));
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        let admitted = (0..20).filter(|_| o.check_connect(Some(a)).is_ok()).count();
        assert_eq!(admitted, 5, "the burst");
        assert_eq!(o.check_connect(Some(a)), Err(Refusal::AddressRate));
        assert!(
            o.check_connect(Some(b)).is_ok(),
            "another address has its own bucket"
        );
        tokio::time::advance(Duration::from_millis(400)).await;
        let admitted = (0..20).filter(|_| o.check_connect(Some(a)).is_ok()).count();
        assert_eq!(admitted, 2, "0.4 s at 5/s");
        assert!(
            o.check_connect(None).is_ok(),
            "no address: no address limit"
        );
        let t = Overload::new(&config(0, 3, 0));
        let acme: Arc<str> = "acme".into();
        let other: Arc<str> = "other".into();
        assert_eq!((0..10).filter(|_| t.check_tenant(&acme).is_ok()).count(), 3);
        assert!(t.check_tenant(&other).is_ok(), "tenants are walls");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_buckets_are_forgotten() {
        let o = Overload::new(&config(5, 0, 0));
        for i in 0..100u8 {
            let _ = o.check_connect(Some(IpAddr::from([10, 0, 0, i])));
        }
        let buckets = o.per_address.as_ref().expect("configured");
        assert_eq!(buckets.map.len(), 100);
        tokio::time::advance(Duration::from_secs(2)).await;
        buckets.sweep(Instant::now());
        assert_eq!(buckets.map.len(), 0);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_stalled_runtime_sheds_new_connections_then_recovers() {
        let o = Arc::new(Overload::new(&config(0, 0, 100)));
        o.start();
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert!(!o.saturated());
        assert!(o.check_connect(None).is_ok());
        // Something hogs the only runtime thread for 300 ms.
        std::thread::sleep(Duration::from_millis(300));
        assert!(o.saturated(), "the monitor's tick is overdue");
        assert_eq!(o.check_connect(None), Err(Refusal::Saturated));
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(
            o.lag() >= Duration::from_millis(200),
            "measured {:?}",
            o.lag()
        );
        assert!(o.saturated(), "held after the measurement");
        let deadline = Instant::now() + Duration::from_secs(5);
        while o.saturated() {
            assert!(Instant::now() < deadline, "never recovered");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(o.check_connect(None).is_ok());
        let off = Overload::new(&config(0, 0, 0));
        assert!(!off.saturated(), "0 turns shedding off");
    }

    #[test]
    fn the_client_address_comes_from_the_configured_header_only() {
        let peer: IpAddr = "192.0.2.1".parse().expect("ip");
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-forwarded-for",
            "203.0.113.7, 10.0.0.1".parse().expect("hv"),
        );
        let plain = Overload::new(&OverloadConfig::default());
        assert_eq!(plain.client_address(&headers, Some(peer)), Some(peer));
        let behind = Overload::new(&OverloadConfig {
            client_address_header: Some("X-Forwarded-For".into()),
            ..OverloadConfig::default()
        });
        assert_eq!(
            behind.client_address(&headers, Some(peer)),
            Some("203.0.113.7".parse().expect("ip"))
        );
        headers.insert("x-forwarded-for", "garbage".parse().expect("hv"));
        assert_eq!(behind.client_address(&headers, Some(peer)), Some(peer));
        let r = plain.retry_after();
        assert!((5..=10).contains(&r), "{r}");
    }
}
