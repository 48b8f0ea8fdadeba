//! `loadgen`: Switchboard's benchmark load generator (docs/benchmarks.md).
//!
//! Opens N WebSocket subscribers (spread over several loopback source
//! addresses), subscribes them over T topics of one target (Switchboard,
//! nats-server's WebSocket, Socket.IO), publishes at a paced rate and prints
//! one JSON line: connect time, server RSS per idle connection, deliveries/s,
//! loss, duplicates, latency percentiles (payloads carry a sequence number
//! and the send time) and CPU seconds of the servers and of itself.
//!
//! Modes: `fixed` (one rate), `ramp` (raise the rate step by step until p99
//! passes 200 ms or anything is lost) and `storm` (the gateway the clients
//! are on is killed or drained; they resume on another one from their last
//! cursor), `churn` (a share of the subscribers drops its connection every
//! second and resumes on the next gateway from its cursor, while the rate
//! goes on: the scale-out and soak scenario, run as several processes with
//! `--part`) and `presence` (members join and leave one presence topic).

mod presence;
mod publisher;
mod sink;
mod stats;
mod target;

/// jemalloc, as the gateway uses. In a reconnect storm, where the load
/// generator shares the 2 cores with the gateways, glibc (malloc, free,
/// memset) was a sixth of its CPU; three storms each way, in turns, gave
/// resume p99s of 1,240, 1,220 and 1,135 ms with glibc and 1,118, 1,060
/// and 1,104 ms with jemalloc. At a steady moderate load it makes no
/// difference (7.9 to 8.3 µs of load-generator CPU per delivery either way).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, ValueEnum};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::Message;

use publisher::Publisher;
use stats::{Seen, Stats, Usage, now_us};
use target::Kind;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Fixed,
    Ramp,
    Storm,
    /// A share of the subscribers reconnects every second (see `churn`).
    Churn,
    /// Members join and leave one presence topic (see `presence`).
    Presence,
}

#[derive(Parser, Clone)]
struct Args {
    /// Run an OTLP/gRPC trace sink on this port instead (counts spans).
    #[arg(long)]
    otlp_sink: Option<u16>,
    #[arg(long, value_enum, default_value = "switchboard")]
    target: Kind,
    /// Label of the target in the report (e.g. "switchboard-cluster").
    #[arg(long)]
    label: Option<String>,
    /// Where subscribers connect; repeat for several gateways (subscribers
    /// are spread over them; in storm mode all start on the first).
    #[arg(long = "url", required_unless_present = "otlp_sink")]
    urls: Vec<String>,
    /// Where the publisher publishes (default: the first --url).
    #[arg(long)]
    publish_url: Option<String>,
    /// How Switchboard is published to (other targets have one way).
    #[arg(long, value_enum, default_value = "http")]
    publish_via: publisher::Via,
    /// HS256 secret of the gateway (tokens are minted here).
    #[arg(long, default_value = "bench-secret")]
    secret: String,
    /// Processes under test, for RSS and CPU (repeat; summed).
    #[arg(long = "server-pid")]
    server_pids: Vec<u32>,
    /// Local addresses subscribers connect from (comma-separated), so more
    /// than ~28k connections fit in the ephemeral port range.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1")]
    sources: Vec<IpAddr>,
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    #[arg(long, default_value_t = 1)]
    topics: usize,
    /// Publishes per second (0: idle scenario); the start rate in ramp mode.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Seconds of publishing (per step in ramp mode).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    #[arg(long, value_enum, default_value = "fixed")]
    mode: Mode,
    /// Ramp: rate factor between steps, and the most steps.
    #[arg(long, default_value_t = 1.5)]
    factor: f64,
    #[arg(long, default_value_t = 14)]
    max_steps: usize,
    /// Ramp: steps that then narrow the ceiling down between the last
    /// sustained rate and the first failing one (each halves the gap in
    /// ratio), when the failing step cut no client off.
    #[arg(long, default_value_t = 2)]
    refine_steps: usize,
    /// Ramp: the p99 (ms) beyond which a step does not count as sustained.
    #[arg(long, default_value_t = 200.0)]
    max_p99_ms: f64,
    /// Storm: the gateway to stop, the signal, and when (s after publishing starts).
    #[arg(long)]
    kill_pid: Option<u32>,
    #[arg(long, default_value = "KILL")]
    kill_signal: String,
    #[arg(long, default_value_t = 3)]
    kill_after: u64,
    /// Seconds to let the server settle before reading its idle RSS.
    #[arg(long, default_value_t = 3)]
    settle: u64,
    /// Concurrent WebSocket handshakes.
    #[arg(long, default_value_t = 128)]
    handshakes: usize,
    #[arg(long, default_value = "")]
    scenario: String,
    /// Churn: the share of subscribers that reconnect every second.
    #[arg(long, default_value_t = 0.01)]
    churn: f64,
    /// Churn: seconds between server memory samples.
    #[arg(long, default_value_t = 60)]
    sample_every: u64,
    /// Churn: events per topic published first, at `warmup_rate` per
    /// second, before the paced hold. Each upstream NATS subscription's
    /// queue gets its second (and last steady-state) 32-slot block at its
    /// 33rd message; warmed up, the soak's samples after minute 5 judge
    /// growth over time instead of that one-time step.
    #[arg(long, default_value_t = 0)]
    warmup_per_topic: u64,
    #[arg(long, default_value_t = 40.0)]
    warmup_rate: f64,
    /// This process's part of a run split over several load generators:
    /// its topics are its own (`bench.p<part>.t<i>`), so each process
    /// accounts for its own deliveries.
    #[arg(long, default_value_t = 0)]
    part: usize,
}

struct Run {
    args: Args,
    token: String,
    stats: Stats,
    /// Subscribers per topic that completed their subscription.
    subscribers: Vec<AtomicU64>,
    /// Next sequence number per topic (across steps).
    seqs: Vec<AtomicU64>,
    /// Churn: tells subscriber i to drop its connection and resume.
    churn: Vec<tokio::sync::Notify>,
    /// Churn: reconnections done.
    churned: AtomicU64,
}

impl Run {
    /// The topic name of topic index `t`.
    fn topic(&self, t: usize) -> String {
        if self.args.mode == Mode::Churn {
            format!("bench.p{}.t{t}", self.args.part)
        } else {
            format!("bench.t{t}")
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(port) = args.otlp_sink {
        return sink::run(port).await;
    }
    if args.mode == Mode::Presence {
        let mut report = presence::run(&args).await?;
        report["target"] = json!(args.label.clone().unwrap_or_else(|| "switchboard".into()));
        report["scenario"] = json!(args.scenario);
        report["mode"] = json!("presence");
        println!("{report}");
        return Ok(());
    }
    let token = switchboard_gateway::auth::mint_hs256(
        &args.secret,
        "bench",
        "loadgen",
        &["publish".into()],
        Duration::from_secs(6 * 3600),
    )?;
    let topics = args.topics.max(1);
    let run = Arc::new(Run {
        token,
        stats: Stats::new(),
        subscribers: (0..topics).map(|_| AtomicU64::new(0)).collect(),
        seqs: (0..topics).map(|_| AtomicU64::new(0)).collect(),
        churn: if args.mode == Mode::Churn {
            (0..args.connections)
                .map(|_| tokio::sync::Notify::new())
                .collect()
        } else {
            Vec::new()
        },
        churned: AtomicU64::new(0),
        args,
    });
    let args = &run.args;
    let before = stats::usage(&args.server_pids);

    // Connect and subscribe.
    let started = Instant::now();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<bool>(1024);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(args.handshakes.max(1)));
    let mut tasks = Vec::with_capacity(args.connections);
    for i in 0..args.connections {
        tasks.push(tokio::spawn(subscriber(
            run.clone(),
            i,
            handshakes.clone(),
            ready_tx.clone(),
        )));
    }
    drop(ready_tx);
    let mut connected = 0u64;
    while let Some(ok) = ready_rx.recv().await {
        connected += u64::from(ok);
    }
    let connect_seconds = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(args.settle)).await;
    let idle = stats::usage(&args.server_pids);
    let kib_per_idle_connection = match (before, idle) {
        (Some(b), Some(a)) if connected > 0 => {
            Some((a.rss_kib as f64 - b.rss_kib as f64) / connected as f64)
        }
        _ => None,
    };
    let mut report = json!({
        "target": args.label.clone().unwrap_or_else(|| format!("{:?}", args.target).to_lowercase()),
        "scenario": args.scenario,
        "publish_via": format!("{:?}", args.publish_via).to_lowercase(),
        "mode": format!("{:?}", args.mode).to_lowercase(),
        "connections": connected,
        "requested_connections": args.connections,
        "topics": topics,
        "sources": args.sources.len(),
        "connect_seconds": connect_seconds,
        "kib_per_idle_connection": kib_per_idle_connection,
        "server_rss_kib_before": before.map(|u| u.rss_kib),
        "server_rss_kib_idle": idle.map(|u| u.rss_kib),
    });

    if args.rate > 0.0 && connected > 0 {
        let publish_url = args
            .publish_url
            .clone()
            .unwrap_or_else(|| args.urls[0].clone());
        let publisher =
            Publisher::connect(args.target, args.publish_via, &publish_url, &run.token).await?;
        let mut steps = Vec::new();
        match args.mode {
            Mode::Fixed | Mode::Presence => steps.push(step(&run, &publisher, 0, args.rate).await?),
            Mode::Ramp => {
                let mut sustained_at = None;
                let mut failed_at = None;
                let mut k = 0;
                while k < args.max_steps.min(stats::MAX_STEPS) {
                    let rate = args.rate * args.factor.powi(k as i32);
                    let s = step(&run, &publisher, k, rate).await?;
                    let sustained = s["sustained"].as_bool() == Some(true);
                    eprintln!("ramp step {k}: {s}");
                    steps.push(s);
                    k += 1;
                    if !sustained {
                        failed_at = Some(rate);
                        break;
                    }
                    sustained_at = Some(rate);
                }
                // The steps are a factor apart, so the ceiling is known only
                // to within that factor: narrow it down by bisection (on a
                // log scale), as long as every client is still there (a
                // client cut off as a slow consumer is not resubscribed,
                // and every later step would count its share as lost).
                if let (Some(mut low), Some(mut high)) = (sustained_at, failed_at) {
                    for _ in 0..args.refine_steps {
                        if k >= stats::MAX_STEPS
                            || run.stats.disconnects.load(Ordering::Relaxed) > 0
                        {
                            break;
                        }
                        let rate = (low * high).sqrt();
                        let s = step(&run, &publisher, k, rate).await?;
                        eprintln!("ramp refine step {k}: {s}");
                        if s["sustained"].as_bool() == Some(true) {
                            low = rate;
                        } else {
                            high = rate;
                        }
                        steps.push(s);
                        k += 1;
                    }
                }
                let best = steps
                    .iter()
                    .filter(|s| s["sustained"].as_bool() == Some(true))
                    .filter_map(|s| s["deliveries_per_second"].as_f64())
                    .fold(None::<f64>, |m, v| Some(m.map_or(v, |m| m.max(v))));
                report["max_sustained_deliveries_per_second"] = json!(best);
            }
            Mode::Churn => {
                let churner = tokio::spawn(churn(run.clone()));
                steps.push(step(&run, &publisher, 0, args.rate).await?);
                churner.abort();
                report["churn"] = json!({
                    "share_per_second": args.churn,
                    "reconnections": run.churned.load(Ordering::Relaxed),
                    "resumed": run.stats.resumed.load(Ordering::Relaxed),
                    "resume_ms": run.stats.resume_ms(),
                    "reconnect_phases_ms": run.stats.reconnect_phases_ms(),
                    "part": args.part,
                });
            }
            Mode::Storm => {
                let pid = args.kill_pid.context("storm mode needs --kill-pid")?;
                let killer = tokio::spawn(storm(run.clone(), pid, connected));
                steps.push(step(&run, &publisher, 0, args.rate).await?);
                report["storm"] = killer.await??;
            }
        }
        report["steps"] = json!(steps);
        if let Some(first) = steps.first() {
            for key in [
                "rate",
                "published",
                "expected_deliveries",
                "delivered",
                "lost",
                "deliveries_per_second",
                "latency_ms",
                "server_cpu_seconds",
                "server_cpu_seconds_each",
                "loadgen_cpu_seconds",
            ] {
                report[key] = first[key].clone();
            }
        }
    }
    report["duplicates"] = json!(run.stats.duplicates.load(Ordering::Relaxed));
    for t in tasks {
        t.abort();
    }
    println!("{report}");
    Ok(())
}

/// Publish at `rate` for the configured seconds as step `k`, then wait for
/// the deliveries (bounded) and measure.
async fn step(
    run: &Arc<Run>,
    publisher: &Publisher,
    k: usize,
    rate: f64,
) -> anyhow::Result<serde_json::Value> {
    let args = &run.args;
    let topics = run.seqs.len();
    let each_before: Vec<Option<Usage>> = args
        .server_pids
        .iter()
        .map(|p| stats::usage_of(*p))
        .collect();
    let self_before = stats::self_cpu();
    let started = Instant::now();
    // Churn's warm-up (first step only): faster, then the paced rate.
    let warmup = if args.mode == Mode::Churn && k == 0 && args.warmup_rate > 0.0 {
        args.warmup_per_topic * topics as u64
    } else {
        0
    };
    let warmup_seconds = if warmup > 0 {
        warmup as f64 / args.warmup_rate
    } else {
        0.0
    };
    let total = warmup + (rate * args.seconds as f64).round() as u64;
    let accepted: Arc<Vec<AtomicU64>> = Arc::new((0..topics).map(|_| AtomicU64::new(0)).collect());
    let in_flight = Arc::new(tokio::sync::Semaphore::new(256));
    let mut sends = tokio::task::JoinSet::new();
    // Churn: the servers' memory over the run (flat, or leaking?).
    let mut samples = Vec::new();
    let mut next_sample = (args.mode == Mode::Churn).then(|| {
        samples.push(sample(run, started));
        started + Duration::from_secs(args.sample_every.max(1))
    });
    for n in 0..total {
        let due = started
            + Duration::from_secs_f64(if n < warmup {
                n as f64 / args.warmup_rate
            } else {
                warmup_seconds + (n - warmup) as f64 / rate
            });
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
        let t = n as usize % topics;
        let seq = run.seqs[t].fetch_add(1, Ordering::Relaxed);
        let permit = in_flight.clone().acquire_owned().await?;
        let topic = run.topic(t);
        let publisher = publisher.clone();
        let accepted = accepted.clone();
        // Each publish runs on its own, so it leaves at once (a send
        // waiting behind another would distort the latency).
        sends.spawn(async move {
            let body = target::payload(seq, k as u64, now_us());
            if publisher.publish(&topic, body).await {
                accepted[t].fetch_add(1, Ordering::Relaxed);
            }
            drop(permit);
        });
        while sends.try_join_next().is_some() {}
        if let Some(at) = next_sample
            && Instant::now() >= at
        {
            samples.push(sample(run, started));
            next_sample = Some(at + Duration::from_secs(args.sample_every.max(1)));
        }
    }
    while sends.join_next().await.is_some() {}
    publisher.flush().await;
    let publish_seconds = started.elapsed().as_secs_f64();
    let published: u64 = accepted.iter().map(|a| a.load(Ordering::Relaxed)).sum();
    let expected: u64 = accepted
        .iter()
        .zip(&run.subscribers)
        .map(|(a, s)| a.load(Ordering::Relaxed) * s.load(Ordering::Relaxed))
        .sum();
    // Wait for the deliveries: at most 10 s more (30 s in a storm).
    let grace = if matches!(args.mode, Mode::Storm | Mode::Churn) {
        30
    } else {
        10
    };
    let deadline = Instant::now() + Duration::from_secs(grace);
    while run.stats.delivered(k) < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    // Each server process's share, in the order given (cluster: nats-server,
    // then the gateways); their sum when every one was read.
    let each: Vec<Option<f64>> = args
        .server_pids
        .iter()
        .zip(&each_before)
        .map(|(p, b)| {
            b.zip(stats::usage_of(*p))
                .map(|(b, a)| a.cpu_seconds - b.cpu_seconds)
        })
        .collect();
    let server_cpu: Option<f64> = each.iter().copied().sum();
    let delivered = run.stats.delivered(k);
    let latency = run.stats.latency_ms(k);
    let lost = expected.saturating_sub(delivered);
    let p99 = latency["p99"].as_f64();
    Ok(json!({
        "step": k,
        "rate": rate,
        "warmup_events": warmup,
        "warmup_rate": if warmup > 0 { args.warmup_rate } else { 0.0 },
        "publish_seconds": publish_seconds,
        "published": published,
        "publish_failed": total - published,
        "expected_deliveries": expected,
        "delivered": delivered,
        "lost": lost,
        "deliveries_per_second": delivered as f64 / seconds.max(1e-9),
        "latency_ms": latency,
        "sustained": lost == 0 && published == total && p99.is_some_and(|p| p <= args.max_p99_ms),
        "server_cpu_seconds": server_cpu,
        "server_cpu_seconds_each": each,
        "loadgen_cpu_seconds": stats::self_cpu() - self_before,
        "samples": samples,
    }))
}

/// Each server process's RSS and CPU seconds, and this process's, at one
/// moment of a run.
fn sample(run: &Run, started: Instant) -> serde_json::Value {
    let servers: Vec<serde_json::Value> = run
        .args
        .server_pids
        .iter()
        .map(|pid| {
            let u = stats::usage_of(*pid).unwrap_or_default();
            json!({"pid": pid, "rss_kib": u.rss_kib, "cpu_seconds": u.cpu_seconds})
        })
        .collect();
    json!({
        "at_seconds": started.elapsed().as_secs_f64(),
        "servers": servers,
        "loadgen_rss_kib": stats::usage_of(std::process::id()).map(|u| u.rss_kib),
        "loadgen_cpu_seconds": stats::self_cpu(),
        "resumed": run.stats.resumed.load(Ordering::Relaxed),
    })
}

/// Every 100 ms, tell a tenth of the second's share of subscribers (picked
/// at random) to drop their connection and resume.
async fn churn(run: Arc<Run>) {
    let n = run.churn.len();
    if n == 0 {
        return;
    }
    let per_tick = run.args.churn * n as f64 / 10.0;
    let mut owed = 0.0;
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15 ^ run.args.part as u64;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        owed += per_tick;
        while owed >= 1.0 {
            owed -= 1.0;
            // xorshift: enough to spread the picks.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            run.churn[(state % n as u64) as usize].notify_one();
            run.churned.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Stop the gateway the subscribers are on, then time their resumption.
async fn storm(run: Arc<Run>, pid: u32, connected: u64) -> anyhow::Result<serde_json::Value> {
    let args = &run.args;
    tokio::time::sleep(Duration::from_secs(args.kill_after)).await;
    let resumed_before = run.stats.resumed.load(Ordering::Relaxed);
    let timed_before = run.stats.resumes_timed();
    // The CPU the storm costs: from the stop until every client replayed,
    // the servers (the survivor and nats-server) and this process apart.
    let usage_at_kill = stats::usage(&args.server_pids);
    let self_at_kill = stats::self_cpu();
    let mut storm_cpu = None;
    let at = Instant::now();
    let status = tokio::process::Command::new("kill")
        .args(["-s", &args.kill_signal, &pid.to_string()])
        .status()
        .await?;
    anyhow::ensure!(
        status.success(),
        "kill -s {} {pid} failed",
        args.kill_signal
    );
    let deadline = at + Duration::from_secs(120);
    let mut all_reconnected = None;
    let mut all_resumed = None;
    const TICK: Duration = Duration::from_millis(10);
    while Instant::now() < deadline {
        if all_reconnected.is_none()
            && run.stats.resumed.load(Ordering::Relaxed) - resumed_before >= connected
        {
            all_reconnected = Some(at.elapsed().as_secs_f64());
        }
        // Resumed means replayed: every client's resume is timed until its
        // replay completed, not only until it subscribed again.
        if run.stats.resumes_timed() - timed_before >= connected {
            all_resumed = Some(at.elapsed().as_secs_f64());
            storm_cpu = Some((
                usage_at_kill
                    .zip(stats::usage(&args.server_pids))
                    .map(|(b, a): (Usage, Usage)| a.cpu_seconds - b.cpu_seconds),
                stats::self_cpu() - self_at_kill,
            ));
            break;
        }
        // How late this process runs its timers while the clients resume:
        // their reconnect delays and reads wait the same.
        let due = Instant::now() + TICK;
        tokio::time::sleep_until(due.into()).await;
        run.stats.record_timer_lag(due.elapsed().as_micros() as u64);
    }
    Ok(json!({
        "signal": args.kill_signal,
        "seconds_until_all_reconnected": all_reconnected,
        "seconds_until_all_resumed": all_resumed,
        "resumed": run.stats.resumed.load(Ordering::Relaxed) - resumed_before,
        "disconnects": run.stats.disconnects.load(Ordering::Relaxed),
        "resume_ms": run.stats.resume_ms(),
        "reconnect_phases_ms": run.stats.reconnect_phases_ms(),
        "loadgen_timer_lag_ms": run.stats.timer_lag_ms(),
        // CPU from the stop until every client replayed (only when all
        // did), and the servers' share per resumed client.
        "server_cpu_seconds_until_resumed": storm_cpu.and_then(|(s, _)| s),
        "loadgen_cpu_seconds_until_resumed": storm_cpu.map(|(_, l)| l),
        "server_cpu_us_per_resume": storm_cpu
            .and_then(|(s, _)| s)
            .map(|s| s * 1e6 / connected.max(1) as f64),
    }))
}

/// One subscriber: connect, subscribe, count what arrives. In storm mode a
/// dropped connection resumes on the next gateway from its last cursor.
async fn subscriber(
    run: Arc<Run>,
    i: usize,
    handshakes: Arc<tokio::sync::Semaphore>,
    ready: tokio::sync::mpsc::Sender<bool>,
) {
    let args = &run.args;
    let topic_index = i % run.seqs.len();
    let topic = run.topic(topic_index);
    let mut seen = Seen::default();
    let mut cursor: Option<String> = None;
    let mut ready = Some(ready);
    let mut attempt = 0usize;
    // When this subscriber noticed its connection was gone (storm mode),
    // until it has replayed what it missed.
    let mut disconnected_at: Option<Instant> = None;
    loop {
        let url_index = match args.mode {
            Mode::Storm => attempt.min(args.urls.len() - 1),
            // Churn: resume on the next gateway each time.
            Mode::Churn => (i + attempt) % args.urls.len(),
            _ => i % args.urls.len(),
        };
        let url = target::subscriber_url(
            args.target,
            &args.urls[url_index],
            &run.token,
            cursor.as_deref(),
        );
        let source = args.sources[i % args.sources.len()];
        // When this attempt began (after the client's delay): the
        // successful one starts the resume as the cluster serves it.
        let attempt_began = Instant::now();
        let opened = {
            let _permit = handshakes.acquire().await;
            open(&url, source, args.target, &topic).await
        };
        let subscribed_at = Instant::now();
        let mut ws = match opened {
            Ok((ws, began_at, phases)) => {
                if ready.is_none() {
                    run.stats.record_reconnect(phases);
                }
                if let Some(at) = disconnected_at {
                    run.stats
                        .record_phase(stats::Phase::Wait, attempt_began - at);
                }
                // A client that has received nothing yet resumes from where
                // its subscription began.
                if cursor.is_none() {
                    cursor = began_at;
                }
                ws
            }
            Err(_) if ready.is_some() && args.mode == Mode::Churn && attempt < 20 => {
                // Churn runs start many processes at once: a first connect
                // refused (1013 under load) is retried, as clients do.
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(200 * attempt as u64)).await;
                continue;
            }
            Err(e) => {
                if let Some(r) = ready.take() {
                    static REPORTED: AtomicU64 = AtomicU64::new(0);
                    if REPORTED.fetch_add(1, Ordering::Relaxed) < 5 {
                        eprintln!("subscriber {i}: {e:#}");
                    }
                    let _ = r.send(false).await;
                    return;
                }
                // Resuming: try again shortly (the target may be starting).
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        match ready.take() {
            Some(r) => {
                run.subscribers[topic_index].fetch_add(1, Ordering::Relaxed);
                let _ = r.send(true).await;
            }
            None => {
                run.stats.resumed.fetch_add(1, Ordering::Relaxed);
                // Without a cursor there is nothing to replay: resumed once
                // subscribed.
                if cursor.is_none()
                    && let Some(at) = disconnected_at.take()
                {
                    run.stats.record_resume(at.elapsed().as_micros() as u64);
                    run.stats
                        .record_phase(stats::Phase::Served, attempt_began.elapsed());
                }
            }
        }
        let churned = async {
            match run.churn.get(i) {
                Some(n) => n.notified().await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(churned);
        loop {
            let m = tokio::select! {
                m = ws.next() => m,
                () = &mut churned => {
                    // Told to churn: leave as a client losing its network
                    // would, then resume from the cursor.
                    let _ = ws.close(None).await;
                    break;
                }
            };
            let Some(Ok(m)) = m else { break };
            let Some(t) = target::text(&m) else { continue };
            if let Some(reply) = target::keepalive_reply(args.target, t)
                && ws.send(Message::Text(reply.into())).await.is_err()
            {
                break;
            }
            target::for_each_event(t, |seq, step, sent| {
                if !run.stats.record(i, &mut seen, seq, step, sent) {
                    // Enough to find where a duplicate came from: which
                    // connection of this client, resuming or live, from
                    // which cursor.
                    static REPORTED: AtomicU64 = AtomicU64::new(0);
                    if REPORTED.fetch_add(1, Ordering::Relaxed) < 20 {
                        eprintln!(
                            "duplicate: subscriber {i} topic {topic} seq {seq} on {} (connection {attempt}, {}, cursor before {}): {}",
                            args.urls[url_index],
                            if disconnected_at.is_some() {
                                "resuming"
                            } else {
                                "live"
                            },
                            cursor.as_deref().unwrap_or("none"),
                            t.chars().take(400).collect::<String>(),
                        );
                    }
                }
            });
            if matches!(args.mode, Mode::Storm | Mode::Churn)
                && let Some(c) = target::cursor_of(t)
            {
                cursor = Some(c.to_owned());
            }
            if let Some(at) = disconnected_at
                && target::is_replay_complete(t)
            {
                run.stats.record_resume(at.elapsed().as_micros() as u64);
                run.stats
                    .record_phase(stats::Phase::Replay, subscribed_at.elapsed());
                run.stats
                    .record_phase(stats::Phase::Served, attempt_began.elapsed());
                disconnected_at = None;
            }
        }
        run.stats.disconnects.fetch_add(1, Ordering::Relaxed);
        disconnected_at.get_or_insert_with(Instant::now);
        match args.mode {
            Mode::Storm => {
                attempt += 1;
                // Clients spread their reconnects (0-500 ms), as real ones do.
                tokio::time::sleep(Duration::from_millis((i as u64 * 7919) % 500)).await;
            }
            Mode::Churn => attempt += 1,
            _ => return,
        }
    }
}

/// Connect and subscribe; returns the socket, the cursor the
/// subscription began at (Switchboard) and how long each step took.
async fn open(
    url: &str,
    source: IpAddr,
    kind: Kind,
    topic: &str,
) -> anyhow::Result<(target::Ws, Option<String>, stats::ConnectPhases)> {
    let uri: tokio_tungstenite::tungstenite::http::Uri = url.parse()?;
    let host = uri.host().context("url without host")?;
    let port = uri.port_u16().unwrap_or(80);
    let addr = tokio::net::lookup_host((host, port))
        .await?
        .find(|a| a.is_ipv4() == source.is_ipv4())
        .context("no address for the host")?;
    let socket = if source.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // Ports in TIME_WAIT from earlier runs may be bound again.
    socket.set_reuseaddr(true)?;
    // The source port is chosen at connect (by the whole 4-tuple), not at
    // bind: with tens of thousands of ports in use per source address, the
    // kernel's search for a port free for any destination took a tenth of
    // the machine's CPU in the scale-out run. Best effort (Linux only).
    if source.is_ipv4() {
        let _ = nix::sys::socket::setsockopt(
            &socket,
            nix::sys::socket::sockopt::IpBindAddressNoPort,
            &true,
        );
    }
    socket.bind((source, 0).into())?;
    let began = Instant::now();
    let stream = socket
        .connect(addr)
        .await
        .with_context(|| format!("connect {addr}"))?;
    stream.set_nodelay(true)?;
    let connected = Instant::now();
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(
        url,
        tokio_tungstenite::MaybeTlsStream::Plain(stream),
        Some(target::ws_config()),
    )
    .await
    .with_context(|| format!("websocket handshake with {url}"))?;
    let upgraded = Instant::now();
    let cursor = target::subscribe(kind, &mut ws, topic).await?;
    let phases = stats::ConnectPhases {
        tcp: connected - began,
        handshake: upgraded - connected,
        subscribed: upgraded.elapsed(),
    };
    Ok((ws, cursor, phases))
}
