//! Ten thousand clients (8,000 WebSockets, 2,000 SSE streams) resume at once against a deep history: the
//! gateway's memory stays within a stated bound, because a replay streams
//! page by page with backpressure from each socket instead of being
//! collected whole before the first byte is written.
//!
//! Clients are raw sockets (handshake by hand, bytes scanned, not parsed)
//! so the test process is not the bottleneck; the gateway is the real
//! binary in its own process, whose resident memory is read from /proc.

mod common;

use std::time::Duration;

use common::nats::{GatewayProc, TempDir};
use common::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// WebSockets, connected first, that resume at once.
const WEBSOCKETS: usize = 8_000;
/// SSE streams opened with a cursor at the same moment.
const SSE_STREAMS: usize = 2_000;
/// Events in history, all of which every client replays.
const HISTORY: usize = 300;
/// The bound: memory a resuming WebSocket may add to the gateway beyond
/// its idle connection (measured: about 4 KiB, its write buffer). A replay
/// held whole would add 32 bytes per event (a frame reference) and the
/// socket's unflushed frames.
const WS_BYTES: u64 = 6 * 1024;
/// The bound for an SSE stream, its connection included (measured: about
/// 40 KiB for the idle HTTP connection and 13 KiB for the replay in flight).
/// A replay held whole would add ~450 bytes per formatted event, 130 KiB
/// at this depth, and grow with it.
const SSE_BYTES: u64 = 64 * 1024;

/// Resident memory of a process: (current, peak), in bytes.
fn rss(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|kb| kb.parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .unwrap_or_else(|| panic!("{name} in /proc/{pid}/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Read until `needle` has gone by (scanning a rolling window); bytes read.
async fn read_until(stream: &mut TcpStream, needle: &[u8]) -> usize {
    let mut buf = vec![0u8; 64 * 1024];
    let mut tail: Vec<u8> = Vec::new();
    let mut total = 0;
    loop {
        let n = stream.read(&mut buf).await.expect("read");
        assert!(
            n > 0,
            "connection closed before {:?}",
            String::from_utf8_lossy(needle)
        );
        total += n;
        tail.extend_from_slice(&buf[..n]);
        if tail.windows(needle.len()).any(|w| w == needle) {
            return total;
        }
        let keep = tail.len().saturating_sub(needle.len());
        tail.drain(..keep);
    }
}

/// A WebSocket opened by hand; returns once the upgrade is answered.
async fn ws_open(addr: &str, query: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let req = format!(
        "GET /ws?{query} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    read_until(&mut s, b"connection.established").await;
    s
}

/// One masked text frame (mask key zero: the payload goes as is).
fn text_frame(payload: &str) -> Vec<u8> {
    let len = payload.len();
    let mut f = vec![0x81];
    if len < 126 {
        f.push(0x80 | len as u8);
    } else {
        f.push(0x80 | 126);
        f.extend_from_slice(&(len as u16).to_be_bytes());
    }
    f.extend_from_slice(&[0, 0, 0, 0]);
    f.extend_from_slice(payload.as_bytes());
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_clients_resume_at_once_within_a_memory_bound() {
    let dir = TempDir::new("storm");
    let gw = GatewayProc::start(
        &dir,
        "gw",
        // Every client must be admitted at once (what is measured is the
        // memory of 10,000 concurrent replays), so load shedding is off here;
        // tests/overload.rs shows it.
        "limits:\n  messages_per_minute: 100000\nhistory:\n  max_events_per_tenant: 100000\noverload:\n  max_scheduler_lag_ms: 0\n",
    );
    gw.wait_ready().await;
    let pid = gw.pid().unwrap();
    let addr = gw.http().trim_start_matches("http://").to_owned();
    let publisher = token("acme", &["publish"]);
    let mut first = String::new();
    let mut last = String::new();
    let body: Vec<_> = (0..HISTORY)
        .map(|i| json!({"event_type": format!("deal.e{}", i % 7), "data": {"i": i, "pad": "x".repeat(120)}}))
        .collect();
    for chunk in body.chunks(500) {
        let r = reqwest::Client::new()
            .post(format!("{}/api/realtime/publish/", gw.http()))
            .bearer_auth(&publisher)
            .json(&json!({ "events": chunk }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let answer: serde_json::Value = r.json().await.unwrap();
        let results = answer["results"].as_array().unwrap();
        if first.is_empty() {
            first = results[0]["event_id"].as_str().unwrap().to_owned();
        }
        last = results.last().unwrap()["event_id"]
            .as_str()
            .unwrap()
            .to_owned();
    }
    // Replay everything: the cursor just before the first event.
    let (epoch, _) = first.split_once('-').unwrap();
    let cursor = format!("{epoch}-0");
    let subscriber = token("acme", &[]);

    // Every WebSocket connected (and idle) first: its own cost is not the
    // storm's.
    let half = WEBSOCKETS;
    let mut sockets = Vec::with_capacity(half);
    let query = format!("token={subscriber}&cursor={cursor}");
    for chunk in (0..half).collect::<Vec<_>>().chunks(500) {
        let opened =
            futures_util::future::join_all(chunk.iter().map(|_| ws_open(&addr, &query))).await;
        sockets.extend(opened);
    }
    let (before, _) = rss(pid);

    // The storm: every WebSocket subscribes with the cursor, every SSE
    // client connects with it, at once; each reads its whole replay.
    let subscribe = text_frame(&json!({"type": "subscribe", "topics": ["deal.*"]}).to_string());
    let last_sse = format!("id: {last}\n");
    let started = std::time::Instant::now();
    let mut tasks = Vec::with_capacity(WEBSOCKETS + SSE_STREAMS);
    for mut s in sockets {
        let frame = subscribe.clone();
        tasks.push(tokio::spawn(async move {
            s.write_all(&frame).await.unwrap();
            read_until(&mut s, b"replay.complete").await
        }));
    }
    for _ in 0..SSE_STREAMS {
        let (addr, subscriber, cursor, needle) = (
            addr.clone(),
            subscriber.clone(),
            cursor.clone(),
            last_sse.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(&addr).await.expect("connect");
            let req = format!(
                "GET /api/realtime/sse/?topics=deal.*&cursor={cursor}&token={subscriber} HTTP/1.1\r\nHost: {addr}\r\n\r\n"
            );
            s.write_all(req.as_bytes()).await.unwrap();
            read_until(&mut s, needle.as_bytes()).await
        }));
    }
    let mut bytes = 0;
    for t in tasks {
        bytes += tokio::time::timeout(Duration::from_secs(300), t)
            .await
            .expect("every replay completes")
            .unwrap();
    }
    let elapsed = started.elapsed();
    let (after, peak) = rss(pid);
    let grown = peak.saturating_sub(before);
    let bound = WS_BYTES * WEBSOCKETS as u64 + SSE_BYTES * SSE_STREAMS as u64;
    eprintln!(
        "{WEBSOCKETS} WebSockets and {SSE_STREAMS} SSE streams replayed {HISTORY} events each ({} MB) in {elapsed:?}; gateway RSS {} MB with the WebSockets idle, peak {} MB (+{} MB, bound {} MB), {} MB after",
        bytes / 1_000_000,
        before / 1_000_000,
        peak / 1_000_000,
        grown / 1_000_000,
        bound / 1_000_000,
        after / 1_000_000
    );
    assert!(
        bytes >= (WEBSOCKETS + SSE_STREAMS) * HISTORY * 150,
        "every client received its whole replay ({bytes} bytes)"
    );
    assert!(
        grown <= bound,
        "the storm grew the gateway by {} MB, the bound is {} MB",
        grown / 1_000_000,
        bound / 1_000_000
    );
}
