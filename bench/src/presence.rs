//! `--mode presence`: the cost of presence. N members (each its own user)
//! join one presence topic on the first gateway at a paced rate while one
//! observer watches the topic from the last gateway (in cluster mode, the
//! other process: every join crosses NATS); then every member leaves at
//! once. Reports the latency from a join sent until the observer knows of
//! it, how long until the observer's count is 0 after everyone left, and
//! the servers' CPU per join.
//!
//! Above the members cap (default 100) the gateway sends counts only,
//! coalesced (one per second), so joins are matched by count: once the
//! observer's count is n, the first n joins sent are known to it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::sync::Mutex;
use tokio_tungstenite::tungstenite::Message;

use crate::stats;
use crate::{Args, target};

const TOPIC: &str = "presence:bench";

async fn connect(url: &str, secret: &str, user: &str) -> anyhow::Result<target::Ws> {
    let token = switchboard_gateway::auth::mint_hs256(
        secret,
        "bench",
        user,
        &[],
        Duration::from_secs(3600),
    )?;
    let ws_url = format!("{}/ws?token={token}", url.replacen("http", "ws", 1));
    let (ws, _) =
        tokio_tungstenite::connect_async_with_config(ws_url, Some(target::ws_config()), false)
            .await
            .with_context(|| format!("connect {url}"))?;
    Ok(ws)
}

/// Read frames until one whose JSON satisfies `done` (30 s at most).
async fn until(ws: &mut target::Ws, done: impl Fn(&Value) -> bool) -> anyhow::Result<Value> {
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(m) = ws.next().await {
            if let Message::Text(t) = m? {
                let v: Value = serde_json::from_str(&t)?;
                if done(&v) {
                    return Ok(v);
                }
            }
        }
        anyhow::bail!("closed")
    })
    .await
    .context("no answer within 30 s")?
}

/// Run the scenario; the report's fields.
pub async fn run(args: &Args) -> anyhow::Result<Value> {
    let members = args.connections;
    let join_url = &args.urls[0];
    let watch_url = args.urls.last().context("no --url")?;
    let mut observer = connect(watch_url, &args.secret, "observer").await?;
    observer
        .send(Message::Text(
            json!({"type": "subscribe", "topics": [TOPIC]})
                .to_string()
                .into(),
        ))
        .await?;
    until(&mut observer, |v| v["type"] == "presence.sync").await?;

    // Members connect first (not measured), then join at the paced rate.
    let mut conns = Vec::with_capacity(members);
    for i in 0..members {
        conns.push(connect(join_url, &args.secret, &format!("m{i}")).await?);
    }
    let sent: Arc<Mutex<Vec<Instant>>> = Arc::new(Mutex::new(Vec::with_capacity(members)));
    let joins_seen = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(
        1,
        600_000_000,
        3,
    )?));
    // The observer's latest count, and whether it reached 0 after the joins.
    let last_count = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (observer_tx, mut observer_rx) = observer.split();
    let watcher = {
        let (sent, joins_seen, last_count) = (sent.clone(), joins_seen.clone(), last_count.clone());
        tokio::spawn(async move {
            let mut matched = 0usize;
            while let Some(Ok(Message::Text(t))) = observer_rx.next().await {
                let Ok(v) = serde_json::from_str::<Value>(&t) else {
                    continue;
                };
                if !v["type"]
                    .as_str()
                    .is_some_and(|t| t.starts_with("presence."))
                {
                    continue;
                }
                let Some(count) = v["data"]["data"]["count"].as_u64() else {
                    continue;
                };
                last_count.store(count, std::sync::atomic::Ordering::Relaxed);
                // Every join up to `count` is now known to the observer
                // (one by one under the cap, by a coalesced count above it).
                let sent = sent.lock().await;
                let upto = (count as usize).min(sent.len());
                let mut h = joins_seen.lock().await;
                while matched < upto {
                    let _ = h.record(sent[matched].elapsed().as_micros().max(1) as u64);
                    matched += 1;
                }
            }
        })
    };
    let rate = if args.rate > 0.0 { args.rate } else { 100.0 };
    let before = stats::usage(&args.server_pids);
    let started = Instant::now();
    for (n, ws) in conns.iter_mut().enumerate() {
        let due = started + Duration::from_secs_f64(n as f64 / rate);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
        sent.lock().await.push(Instant::now());
        ws.send(Message::Text(
            json!({"type": "presence.join", "topic": TOPIC})
                .to_string()
                .into(),
        ))
        .await?;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while (joins_seen.lock().await.len() as usize) < members && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let join_seconds = started.elapsed().as_secs_f64();
    let after_joins = stats::usage(&args.server_pids);
    // Everyone leaves at once (connections closed): until the observer's count is 0.
    let leave_started = Instant::now();
    drop(conns);
    while last_count.load(std::sync::atomic::Ordering::Relaxed) > 0
        && leave_started.elapsed() < Duration::from_secs(30)
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let leave_seconds = leave_started.elapsed().as_secs_f64();
    let final_count = last_count.load(std::sync::atomic::Ordering::Relaxed);
    watcher.abort();
    drop(observer_tx);
    let h = joins_seen.lock().await;
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let cpu = before
        .zip(after_joins)
        .map(|(b, a)| a.cpu_seconds - b.cpu_seconds);
    Ok(json!({
        "members": members,
        "join_rate": rate,
        "joins_seen": h.len(),
        "count_after_leaving": final_count,
        "join_seconds": join_seconds,
        "leave_seconds": leave_seconds,
        "join_latency_ms": {"p50": ms(0.5), "p99": ms(0.99), "max": h.max() as f64 / 1000.0},
        "server_cpu_seconds_joins": cpu,
        "server_cpu_us_per_join": cpu.map(|c| c * 1e6 / members.max(1) as f64),
    }))
}
