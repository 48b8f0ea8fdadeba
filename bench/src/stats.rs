//! What the subscribers saw, per publishing step, and what the processes
//! under test used (from /proc).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;

/// Latency histograms are sharded so subscribers on different threads do
/// not queue on one lock.
const SHARDS: usize = 8;
pub const MAX_STEPS: usize = 40;

pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn histogram() -> Histogram<u64> {
    // 1 µs .. 10 min, 3 significant figures (constant, valid bounds).
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

pub struct Step {
    pub delivered: AtomicU64,
    latency: [Mutex<Histogram<u64>>; SHARDS],
}

pub struct Stats {
    pub steps: Vec<Step>,
    pub duplicates: AtomicU64,
    /// Subscriptions (re-)established after a disconnect.
    pub resumed: AtomicU64,
    pub disconnects: AtomicU64,
    /// Per resumed subscriber: from noticing the disconnect to having
    /// replayed what it missed (`replay.complete`), in µs.
    resume_latency: Mutex<Histogram<u64>>,
    /// Per reconnect, in µs: TCP connect, WebSocket handshake, subscribe
    /// until confirmed.
    reconnect_phases: [Mutex<Histogram<u64>>; 6],
    /// How late this process ran a 10 ms timer while clients were
    /// resuming, in µs: the load generator's own share of their latency.
    timer_lag: Mutex<Histogram<u64>>,
}

/// The parts of a reconnect the storm report breaks out.
#[derive(Clone, Copy)]
pub enum Phase {
    /// The TCP connect.
    Tcp,
    /// The WebSocket handshake.
    Handshake,
    /// The subscribe until confirmed.
    Subscribed,
    /// From noticing a disconnect until the reconnect began (the client's
    /// own delay, plus however late this process ran it).
    Wait,
    /// From the subscription's confirmation until `replay.complete`.
    Replay,
    /// From the reconnect's start (TCP connect) until `replay.complete`:
    /// the resume as the cluster served it, without the client's own delay.
    Served,
}

/// How long one connect took, phase by phase.
#[derive(Clone, Copy)]
pub struct ConnectPhases {
    pub tcp: std::time::Duration,
    pub handshake: std::time::Duration,
    pub subscribed: std::time::Duration,
}

impl Stats {
    pub fn new() -> Self {
        Self {
            steps: (0..MAX_STEPS)
                .map(|_| Step {
                    delivered: AtomicU64::new(0),
                    latency: std::array::from_fn(|_| Mutex::new(histogram())),
                })
                .collect(),
            duplicates: AtomicU64::new(0),
            resumed: AtomicU64::new(0),
            disconnects: AtomicU64::new(0),
            resume_latency: Mutex::new(histogram()),
            reconnect_phases: std::array::from_fn(|_| Mutex::new(histogram())),
            timer_lag: Mutex::new(histogram()),
        }
    }

    /// One delivery seen by subscriber `conn`; `seen` is its record of
    /// sequence numbers (for duplicates). False for a duplicate.
    pub fn record(&self, conn: usize, seen: &mut Seen, seq: u64, step: u64, sent_us: u64) -> bool {
        if !seen.insert(seq) {
            self.duplicates.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let Some(s) = self.steps.get(step as usize) else {
            return true;
        };
        s.delivered.fetch_add(1, Ordering::Relaxed);
        let latency = now_us().saturating_sub(sent_us).max(1);
        let mut h = s.latency[conn % SHARDS]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        h.saturating_record(latency);
        true
    }

    /// One subscriber caught up after a disconnect, `us` after noticing it.
    pub fn record_resume(&self, us: u64) {
        self.resume_latency
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .saturating_record(us.max(1));
    }

    /// The phases of one reconnect.
    pub fn record_reconnect(&self, phases: ConnectPhases) {
        self.record_phase(Phase::Tcp, phases.tcp);
        self.record_phase(Phase::Handshake, phases.handshake);
        self.record_phase(Phase::Subscribed, phases.subscribed);
    }

    /// How long one part of a reconnect took.
    pub fn record_phase(&self, phase: Phase, d: std::time::Duration) {
        self.reconnect_phases[phase as usize]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .saturating_record((d.as_micros() as u64).max(1));
    }

    /// A timer of this process ran `us` late.
    pub fn record_timer_lag(&self, us: u64) {
        self.timer_lag
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .saturating_record(us.max(1));
    }

    /// Reconnect phase percentiles in milliseconds.
    pub fn reconnect_phases_ms(&self) -> serde_json::Value {
        let [tcp, handshake, subscribed, waited, replayed, served] = &self.reconnect_phases;
        let ms = |h: &Mutex<Histogram<u64>>| {
            percentiles_ms(&h.lock().unwrap_or_else(|e| e.into_inner()))
        };
        serde_json::json!({
            "tcp_connect": ms(tcp),
            "websocket_handshake": ms(handshake),
            "subscribed": ms(subscribed),
            "reconnect_wait": ms(waited),
            "replayed": ms(replayed),
            "served": ms(served),
        })
    }

    /// Timer lag percentiles in milliseconds.
    pub fn timer_lag_ms(&self) -> serde_json::Value {
        percentiles_ms(&self.timer_lag.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Resume latency percentiles in milliseconds (with the count).
    /// How many resumes were timed (each until its replay completed).
    pub fn resumes_timed(&self) -> u64 {
        self.resume_latency
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    pub fn resume_ms(&self) -> serde_json::Value {
        let h = self
            .resume_latency
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        percentiles_ms(&h)
    }

    pub fn delivered(&self, step: usize) -> u64 {
        self.steps[step].delivered.load(Ordering::Relaxed)
    }

    /// Latency percentiles of a step, in milliseconds.
    pub fn latency_ms(&self, step: usize) -> serde_json::Value {
        let mut all = histogram();
        for shard in &self.steps[step].latency {
            let h = shard.lock().unwrap_or_else(|e| e.into_inner());
            let _ = all.add(&*h);
        }
        percentiles_ms(&all)
    }
}

/// p50, p99, p99.9 and max of a µs histogram in ms (null when empty).
fn percentiles_ms(h: &Histogram<u64>) -> serde_json::Value {
    if h.is_empty() {
        return serde_json::Value::Null;
    }
    let ms = |v: u64| v as f64 / 1000.0;
    serde_json::json!({
        "count": h.len(),
        "p50": ms(h.value_at_quantile(0.5)),
        "p99": ms(h.value_at_quantile(0.99)),
        "p999": ms(h.value_at_quantile(0.999)),
        "max": ms(h.max()),
    })
}

/// A growable bitset of sequence numbers.
#[derive(Default)]
pub struct Seen(Vec<u64>);

impl Seen {
    /// False when `seq` was already there.
    pub fn insert(&mut self, seq: u64) -> bool {
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        if word >= self.0.len() {
            self.0.resize(word + 1, 0);
        }
        let fresh = self.0[word] & (1 << bit) == 0;
        self.0[word] |= 1 << bit;
        fresh
    }
}

/// Resident memory (KiB) and CPU seconds (user + system) of processes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    pub rss_kib: u64,
    pub cpu_seconds: f64,
}

pub fn usage(pids: &[u32]) -> Option<Usage> {
    let mut total = Usage::default();
    for pid in pids {
        let u = one(*pid)?;
        total.rss_kib += u.rss_kib;
        total.cpu_seconds += u.cpu_seconds;
    }
    Some(total)
}

fn one(pid: u32) -> Option<Usage> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(Usage {
        rss_kib,
        cpu_seconds: ticks / 100.0,
    })
}

/// One process's usage.
pub fn usage_of(pid: u32) -> Option<Usage> {
    one(pid)
}

pub fn self_cpu() -> f64 {
    one(std::process::id()).map_or(0.0, |u| u.cpu_seconds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seen_reports_repeats() {
        let mut s = Seen::default();
        assert!(s.insert(0));
        assert!(s.insert(1000));
        assert!(!s.insert(1000));
        assert!(!s.insert(0));
    }

    #[test]
    fn duplicates_are_not_counted_as_deliveries() {
        let stats = Stats::new();
        let mut seen = Seen::default();
        assert!(stats.record(0, &mut seen, 5, 1, now_us()));
        assert!(!stats.record(0, &mut seen, 5, 1, now_us()), "the repeat");
        assert_eq!(stats.delivered(1), 1);
        assert_eq!(stats.duplicates.load(Ordering::Relaxed), 1);
        assert!(stats.latency_ms(1)["p99"].as_f64().is_some());
    }
}
