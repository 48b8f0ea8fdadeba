//! `loadgen`: opens N WebSocket connections to a Switchboard gateway,
//! subscribes them over T topics, publishes at a target rate and reports
//! connect time, server RSS per connection, deliveries/s, loss, duplicates,
//! latency percentiles (payloads carry a sequence number and the send time)
//! and CPU seconds of server and load generator, as one JSON line.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

#[derive(Parser, Clone)]
struct Args {
    /// Run an OTLP/gRPC trace sink on this port instead (counts spans; for
    /// measuring the gateway with trace export on).
    #[arg(long)]
    otlp_sink: Option<u16>,
    /// Gateway base URL.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    url: String,
    /// HS256 secret of the gateway (tokens are minted here).
    #[arg(long, default_value = "bench-secret")]
    secret: String,
    /// PID of the server, for RSS and CPU.
    #[arg(long)]
    server_pid: Option<u32>,
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    #[arg(long, default_value_t = 1)]
    topics: usize,
    /// Publishes per second (0: idle scenario, no publishing).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Label for the report.
    #[arg(long, default_value = "switchboard")]
    target: String,
    #[arg(long, default_value = "")]
    scenario: String,
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// (resident KiB, CPU seconds) of a process.
fn proc_stats(pid: u32) -> Option<(u64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some((rss, ticks / 100.0))
}

fn self_cpu() -> f64 {
    proc_stats(std::process::id()).map_or(0.0, |s| s.1)
}

/// Find `"key":<number>` in a frame without parsing all of it.
fn number_after(text: &str, key: &str) -> Option<u64> {
    let at = text.find(key)? + key.len();
    let digits: String = text[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

struct Totals {
    delivered: AtomicU64,
    duplicates: AtomicU64,
}

mod sink {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
        TraceService, TraceServiceServer,
    };
    use opentelemetry_proto::tonic::collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    };

    #[derive(Clone, Default)]
    struct Count(Arc<AtomicU64>);

    #[tonic::async_trait]
    impl TraceService for Count {
        async fn export(
            &self,
            request: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            let n: usize = request
                .into_inner()
                .resource_spans
                .iter()
                .flat_map(|r| &r.scope_spans)
                .map(|s| s.spans.len())
                .sum();
            let total = self.0.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
            eprintln!("otlp sink: {total} spans");
            Ok(tonic::Response::new(ExportTraceServiceResponse {
                partial_success: None,
            }))
        }
    }

    pub async fn run(port: u16) -> anyhow::Result<()> {
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Count::default()))
            .serve(([127, 0, 0, 1], port).into())
            .await?;
        Ok(())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(port) = args.otlp_sink {
        return sink::run(port).await;
    }
    let token = switchboard_gateway::auth::mint_hs256(
        &args.secret,
        "bench",
        "loadgen",
        &["publish".into()],
        Duration::from_secs(3600),
    )?;
    let ws_base = args.url.replacen("http", "ws", 1);
    let before = args.server_pid.and_then(proc_stats);

    // Connect and subscribe.
    let started = Instant::now();
    let totals = Arc::new(Totals {
        delivered: AtomicU64::new(0),
        duplicates: AtomicU64::new(0),
    });
    let expected_per_topic = args.rate * args.seconds / args.topics.max(1) as u64;
    let mut handles = Vec::with_capacity(args.connections);
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<bool>(args.connections.max(1));
    let sem = Arc::new(tokio::sync::Semaphore::new(256));
    for i in 0..args.connections {
        let url = format!("{ws_base}/ws?token={token}");
        let topic = format!("bench.t{}", i % args.topics.max(1));
        let totals = totals.clone();
        let ready = ready_tx.clone();
        let sem = sem.clone();
        let expected = expected_per_topic;
        handles.push(tokio::spawn(async move {
            let permit = sem.acquire_owned().await.ok()?;
            let opened = async {
                let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.ok()?;
                ws.send(Message::Text(
                    json!({"type": "subscribe", "topics": [topic]})
                        .to_string()
                        .into(),
                ))
                .await
                .ok()?;
                while let Some(Ok(m)) = ws.next().await {
                    if let Message::Text(t) = m
                        && t.contains("subscription.confirmed")
                    {
                        return Some(ws);
                    }
                }
                None
            }
            .await;
            drop(permit);
            let _ = ready.send(opened.is_some()).await;
            drop(ready);
            let mut ws = opened?;
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).ok()?;
            let mut seen = vec![false; expected as usize + 1];
            let mut got = 0u64;
            while let Some(Ok(m)) = ws.next().await {
                let Message::Text(t) = m else { continue };
                let (Some(seq), Some(sent)) =
                    (number_after(&t, "\"seq\":"), number_after(&t, "\"sent\":"))
                else {
                    continue;
                };
                let _ = hist.record(now_us().saturating_sub(sent).max(1));
                let slot = seq as usize;
                if slot < seen.len() {
                    if seen[slot] {
                        totals.duplicates.fetch_add(1, Ordering::Relaxed);
                    }
                    seen[slot] = true;
                }
                got += 1;
                totals.delivered.fetch_add(1, Ordering::Relaxed);
                if got >= expected && expected > 0 {
                    break;
                }
            }
            Some(hist)
        }));
    }
    drop(ready_tx);
    let mut connected = 0;
    for _ in 0..args.connections {
        if ready_rx.recv().await == Some(true) {
            connected += 1;
        }
    }
    let connect_secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = args.server_pid.and_then(proc_stats);
    let kib_per_conn = match (before, idle) {
        (Some(b), Some(a)) if connected > 0 => Some((a.0 as f64 - b.0 as f64) / connected as f64),
        _ => None,
    };

    // Publish at the target rate, spread over the topics.
    let cpu_before = (
        args.server_pid.and_then(proc_stats).map(|s| s.1),
        self_cpu(),
    );
    let publish_started = Instant::now();
    let mut published = 0u64;
    if args.rate > 0 {
        let http = reqwest::Client::new();
        let total = args.rate * args.seconds;
        let interval = Duration::from_secs_f64(1.0 / args.rate as f64);
        let mut next = Instant::now();
        // Each publish is its own task, so it is sent at once (a future
        // nobody polls would sit and distort the latency).
        let limit = Arc::new(tokio::sync::Semaphore::new(64));
        let mut tasks = Vec::with_capacity(total as usize);
        for n in 0..total {
            let topic = n as usize % args.topics.max(1);
            let seq = n / args.topics.max(1) as u64;
            next += interval;
            if let Some(wait) = next.checked_duration_since(Instant::now()) {
                tokio::time::sleep(wait).await;
            }
            let permit = limit.clone().acquire_owned().await?;
            let req = http
                .post(format!("{}/api/realtime/publish/", args.url))
                .bearer_auth(&token)
                .json(&json!({"event_type": format!("bench.t{topic}"), "data": {"seq": seq, "sent": now_us()}}));
            tasks.push(tokio::spawn(async move {
                let r = req.send().await;
                drop(permit);
                r.map(|r| r.status().is_success())
            }));
        }
        for t in tasks {
            if t.await?.context("publish")? {
                published += 1;
            }
        }
    }
    // Wait for the deliveries (bounded).
    let expected_total = expected_per_topic * connected as u64;
    let deadline = Instant::now() + Duration::from_secs(30);
    while totals.delivered.load(Ordering::Relaxed) < expected_total && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let elapsed = publish_started.elapsed().as_secs_f64();
    let cpu_after = (
        args.server_pid.and_then(proc_stats).map(|s| s.1),
        self_cpu(),
    );
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for h in handles {
        h.abort();
        if let Ok(Some(part)) = h.await {
            hist.add(&part)?;
        }
    }
    let delivered = totals.delivered.load(Ordering::Relaxed);
    let ms = |q: f64| {
        if hist.is_empty() {
            None
        } else {
            Some(hist.value_at_quantile(q) as f64 / 1000.0)
        }
    };
    let report = json!({
        "target": args.target,
        "scenario": args.scenario,
        "connections": connected,
        "topics": args.topics,
        "rate": args.rate,
        "seconds": args.seconds,
        "connect_seconds": connect_secs,
        "kib_per_idle_connection": kib_per_conn,
        "server_rss_kib_before": before.map(|b| b.0),
        "server_rss_kib_idle": idle.map(|b| b.0),
        "published": published,
        "expected_deliveries": expected_total,
        "delivered": delivered,
        "lost": expected_total.saturating_sub(delivered),
        "duplicates": totals.duplicates.load(Ordering::Relaxed),
        "deliveries_per_second": delivered as f64 / elapsed.max(1e-9),
        "latency_ms": {"p50": ms(0.5), "p99": ms(0.99), "p999": ms(0.999), "max": if hist.is_empty() { None } else { Some(hist.max() as f64 / 1000.0) }},
        "server_cpu_seconds": cpu_before.0.zip(cpu_after.0).map(|(b, a)| a - b),
        "loadgen_cpu_seconds": cpu_after.1 - cpu_before.1,
    });
    println!("{report}");
    Ok(())
}
