//! Test harness: a real gateway router on a real loopback socket, real
//! WebSocket (tokio-tungstenite) and HTTP (reqwest) clients, and deadlines
//! instead of sleeps.
#![allow(dead_code)]

pub mod nats;
pub mod otlp;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use switchboard_gateway::config::GatewayConfig;
use switchboard_gateway::node::Node;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const SECRET: &str = "test-secret-0123456789";
pub const DEADLINE: Duration = Duration::from_secs(10);

pub fn config() -> GatewayConfig {
    let mut c = GatewayConfig {
        listen: "127.0.0.1:0".into(),
        drain_seconds: 1,
        ..GatewayConfig::default()
    };
    c.auth.hs256_secret = Some(SECRET.into());
    c
}

pub struct Gateway {
    pub node: Arc<Node>,
    pub addr: SocketAddr,
    /// The admin listener (`/metrics`, `/healthz`, `/readyz`).
    pub admin_addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Gateway {
    pub async fn start(config: GatewayConfig) -> Self {
        let listener = tokio::net::TcpListener::bind(&config.listen).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin_addr = admin.local_addr().unwrap();
        let node = switchboard_gateway::startup::build(config).await.unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(switchboard_gateway::server::run(
            node.clone(),
            listener,
            Some(admin),
            async {
                let _ = rx.await;
            },
        ));
        Self {
            node,
            addr,
            admin_addr,
            stop: Some(tx),
            task,
        }
    }

    pub async fn default() -> Self {
        Self::start(config()).await
    }

    /// Wait until `/readyz` answers 200 (cluster mode: NATS and the stream are up).
    pub async fn wait_ready(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = reqwest::get(format!("{}/readyz", self.admin())).await
                && r.status() == 200
            {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "gateway not ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn http(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn admin(&self) -> String {
        format!("http://{}", self.admin_addr)
    }

    pub fn ws(&self, query: &str) -> String {
        format!("ws://{}/ws?{query}", self.addr)
    }

    /// Begin the drain (as SIGTERM would) and wait for the server to stop.
    pub async fn drain(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(Duration::from_secs(30), &mut self.task)
            .await
            .expect("server stops after drain")
            .unwrap()
            .unwrap();
    }

    pub fn trigger_drain(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }

    pub async fn metrics(&self) -> String {
        scrape(&self.admin()).await
    }
}

/// The Prometheus text of a gateway whose admin listener is at `base`.
pub async fn scrape(base: &str) -> String {
    reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Read one sample from a Prometheus text exposition; 0 when absent.
pub fn metric(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(name_and_labels)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

pub fn token(tenant: &str, scopes: &[&str]) -> String {
    token_ttl(tenant, scopes, 3600)
}

pub fn token_ttl(tenant: &str, scopes: &[&str], ttl: u64) -> String {
    let scopes: Vec<String> = scopes.iter().map(|s| s.to_string()).collect();
    switchboard_gateway::auth::mint_hs256(
        SECRET,
        tenant,
        "user-1",
        &scopes,
        Duration::from_secs(ttl),
    )
    .unwrap()
}

/// A token of `user` of `tenant` (no scopes), valid ten minutes.
pub fn user_token(tenant: &str, user: &str) -> String {
    switchboard_gateway::auth::mint_hs256(SECRET, tenant, user, &[], Duration::from_secs(600))
        .unwrap()
}

pub fn sign(claims: &Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

pub async fn publish(gw: &Gateway, token: &str, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("{}/api/realtime/publish/", gw.http()))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Publish and return the event id; panics unless stored.
pub async fn publish_ok(gw: &Gateway, tenant: &str, topic: &str, data: Value) -> String {
    let (status, body) = publish(
        gw,
        &token(tenant, &["publish"]),
        json!({ "event_type": topic, "data": data }),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    body["event_id"].as_str().unwrap().to_owned()
}

pub async fn get_json(url: &str, token: Option<&str>) -> (u16, Value) {
    let mut req = reqwest::Client::new().get(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// A client-side WebSocket.
pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The next text message of `ws` as JSON, skipping pings; panics on close
/// or when `wait` passes.
pub async fn next_text(ws: &mut Ws, wait: Duration) -> Value {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("message before deadline")
            .expect("stream open")
            .expect("no websocket error");
        match msg {
            Message::Text(t) => return serde_json::from_str(&t).unwrap(),
            Message::Close(f) => panic!("unexpected close: {f:?}"),
            _ => {}
        }
    }
}

/// A streaming publish connection (`/api/realtime/publish/stream`).
pub struct PublishStream {
    pub ws: Ws,
}

impl PublishStream {
    /// Open one on `base` (`ws://host:port`) with the token as
    /// `Authorization: Bearer`; the HTTP status when the upgrade is refused.
    pub async fn open(base: &str, token: Option<&str>) -> Result<Self, u16> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut req = format!("{base}/api/realtime/publish/stream")
            .into_client_request()
            .unwrap();
        if let Some(t) = token {
            req.headers_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        match tokio_tungstenite::connect_async(req).await {
            Ok((ws, _)) => Ok(Self { ws }),
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => Err(r.status().as_u16()),
            Err(e) => panic!("unexpected connect error: {e}"),
        }
    }

    /// Queue a frame without flushing (frames in flight together).
    pub async fn feed(&mut self, frame: &Value) {
        self.ws
            .feed(Message::Text(frame.to_string().into()))
            .await
            .unwrap();
    }

    /// Send every frame queued by `feed`.
    pub async fn flush(&mut self) {
        self.ws.flush().await.unwrap();
    }

    /// Send one frame.
    pub async fn send(&mut self, frame: &Value) {
        self.feed(frame).await;
        self.flush().await;
    }

    /// The next answer; panics on close or deadline.
    pub async fn answer(&mut self) -> Value {
        next_text(&mut self.ws, DEADLINE).await
    }

    /// The answers to `n` frames with `ref`s 0..n: in that order, each a
    /// published event.
    pub async fn expect_published(&mut self, n: usize) {
        for i in 0..n {
            let a = self.answer().await;
            assert_eq!(a["ref"], i, "answers come in frame order: {a}");
            assert!(a["event_id"].is_string(), "{a}");
        }
    }

    /// The code of the close frame the gateway sends.
    pub async fn close_code(&mut self) -> u16 {
        loop {
            match tokio::time::timeout(DEADLINE, self.ws.next())
                .await
                .expect("close before deadline")
            {
                Some(Ok(Message::Close(Some(f)))) => return f.code.into(),
                Some(Ok(Message::Close(None))) | None => panic!("closed without a code"),
                Some(Ok(_)) => {}
                Some(Err(e)) => panic!("websocket error before the close frame: {e}"),
            }
        }
    }
}

pub struct Client {
    pub ws: Ws,
}

impl Client {
    pub async fn connect(url: &str) -> Self {
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("websocket upgrade");
        Self { ws }
    }

    /// Connect as `tenant`, and read `connection.established`.
    pub async fn open(gw: &Gateway, tenant: &str) -> Self {
        let mut c =
            Self::connect(&gw.ws(&format!("token={}", token(tenant, &["subscribe"])))).await;
        let hello = c.recv().await;
        assert_eq!(hello["type"], "connection.established", "{hello}");
        c
    }

    pub async fn send(&mut self, v: Value) {
        self.ws
            .send(Message::Text(v.to_string().into()))
            .await
            .unwrap();
    }

    pub async fn send_raw(&mut self, m: Message) {
        self.ws.send(m).await.unwrap();
    }

    /// The next text message, skipping pings; panics on close or deadline.
    pub async fn recv(&mut self) -> Value {
        self.recv_within(DEADLINE).await
    }

    /// `recv` with another deadline than the default.
    pub async fn recv_within(&mut self, wait: Duration) -> Value {
        next_text(&mut self.ws, wait).await
    }

    /// Skip messages until one of `kind` arrives.
    pub async fn recv_type(&mut self, kind: &str) -> Value {
        loop {
            let m = self.recv().await;
            if m["type"] == kind {
                return m;
            }
        }
    }

    pub async fn subscribe(&mut self, topics: &[&str]) -> Value {
        self.send(json!({ "type": "subscribe", "topics": topics }))
            .await;
        let m = self.recv().await;
        assert_eq!(m["type"], "subscription.confirmed", "{m}");
        m
    }

    /// Next `n` events (skipping other message types), their envelopes.
    pub async fn events(&mut self, n: usize) -> Vec<Value> {
        let mut out = Vec::new();
        while out.len() < n {
            let m = self.recv().await;
            if m["type"] == "event" {
                out.push(m["data"].clone());
            }
        }
        out
    }

    /// No text message arrives within `wait` (used after a known later
    /// message proves ordering, or for isolation checks).
    pub async fn expect_silence(&mut self, wait: Duration) {
        let end = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(end, self.ws.next()).await {
                Err(_) => return,
                Ok(Some(Ok(Message::Text(t)))) => panic!("unexpected message: {t}"),
                Ok(Some(Ok(Message::Close(f)))) => panic!("unexpected close: {f:?}"),
                Ok(None) => panic!("unexpected end of stream"),
                Ok(_) => {}
            }
        }
    }

    /// Read until the server closes; return the close code and reason.
    pub async fn closed(&mut self) -> (u16, String) {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .expect("close before deadline")
            {
                Some(Ok(Message::Close(Some(f)))) => {
                    return (u16::from(f.code), f.reason.to_string());
                }
                Some(Ok(Message::Close(None))) => {
                    return (u16::from(CloseCode::Status), String::new());
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => panic!("error before close frame: {e}"),
                None => panic!("stream ended without a close frame"),
            }
        }
    }
}

pub fn ids(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["event_id"].as_str().unwrap().to_owned())
        .collect()
}

/// Read an SSE body until `needle` appears (deadline), appending to `text`.
pub async fn read_sse_until<S, E>(body: &mut S, text: &mut String, needle: &str)
where
    S: futures_util::Stream<Item = Result<bytes::Bytes, E>> + Unpin,
    E: std::fmt::Debug,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !text.contains(needle) {
        let chunk = tokio::time::timeout_at(deadline, body.next())
            .await
            .expect("SSE data before the deadline")
            .expect("stream open")
            .expect("no read error");
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
}
