//! Publishing one payload to one topic, per target: Switchboard's HTTP API
//! (one request per event, or batched), its streaming publish WebSocket,
//! NATS over TCP, or a Socket.IO emit the server relays to the topic's room.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures_util::SinkExt;
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;

use crate::target::{self, Kind, Ws};

/// How Switchboard is published to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Via {
    /// `POST /api/realtime/publish/`, one request per event.
    Http,
    /// `POST /api/realtime/publish/` with `{"events": [...]}`: what is due
    /// within 5 ms goes in one request.
    Batch,
    /// `/api/realtime/publish/stream`: one WebSocket, events in flight.
    Stream,
}

/// One event waiting for its answer.
type Pending = (String, oneshot::Sender<bool>);

#[derive(Clone)]
pub enum Publisher {
    Switchboard {
        http: reqwest::Client,
        url: String,
        token: Arc<str>,
    },
    /// Batched or streamed: a task sends, this end waits for the answer.
    Queued(mpsc::UnboundedSender<Pending>),
    Nats(async_nats::Client),
    Socketio(Arc<Mutex<Ws>>),
}

impl Publisher {
    pub async fn connect(kind: Kind, via: Via, url: &str, token: &str) -> anyhow::Result<Self> {
        Ok(match kind {
            Kind::Switchboard | Kind::SwitchboardSocketio if via == Via::Stream => {
                Self::Queued(stream(url, token).await?)
            }
            Kind::Switchboard | Kind::SwitchboardSocketio if via == Via::Batch => {
                let (tx, rx) = mpsc::unbounded_channel();
                let http = reqwest::Client::builder()
                    .timeout(Duration::from_secs(30))
                    .build()?;
                tokio::spawn(batcher(
                    rx,
                    http,
                    format!("{url}/api/realtime/publish/"),
                    token.into(),
                ));
                Self::Queued(tx)
            }
            Kind::Switchboard | Kind::SwitchboardSocketio => Self::Switchboard {
                http: reqwest::Client::builder()
                    .pool_max_idle_per_host(256)
                    .timeout(Duration::from_secs(30))
                    .build()?,
                url: format!("{url}/api/realtime/publish/"),
                token: token.into(),
            },
            Kind::Nats => Self::Nats(
                async_nats::connect(url)
                    .await
                    .with_context(|| format!("connect to NATS at {url}"))?,
            ),
            Kind::Socketio => {
                let ws_url = target::subscriber_url(kind, url, token, None);
                let (mut ws, _) = tokio_tungstenite::connect_async_with_config(
                    &ws_url,
                    Some(target::ws_config()),
                    true,
                )
                .await
                .with_context(|| format!("connect to {ws_url}"))?;
                // Join a room nobody publishes to: this completes the
                // handshake; server pings are answered by `keepalive`.
                target::subscribe(kind, &mut ws, "bench.publisher").await?;
                let ws = Arc::new(Mutex::new(ws));
                tokio::spawn(keepalive(ws.clone()));
                Self::Socketio(ws)
            }
        })
    }

    /// Publish; true when the system accepted it.
    pub async fn publish(&self, topic: &str, payload: String) -> bool {
        match self {
            Self::Switchboard { http, url, token } => {
                let body = format!(r#"{{"event_type":"{topic}","data":{payload}}}"#);
                http.post(url.as_str())
                    .bearer_auth(&**token)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
            }
            Self::Queued(tx) => {
                let body = format!(r#""event_type":"{topic}","data":{payload}"#);
                let (answer, answered) = oneshot::channel();
                tx.send((body, answer)).is_ok() && answered.await.unwrap_or(false)
            }
            Self::Nats(client) => client
                .publish(topic.to_owned(), payload.into())
                .await
                .is_ok(),
            Self::Socketio(ws) => {
                let m = format!(r#"42["publish","{topic}",{payload}]"#);
                ws.lock().await.send(Message::Text(m.into())).await.is_ok()
            }
        }
    }

    /// Make sure everything published so far has left this process.
    pub async fn flush(&self) {
        if let Self::Nats(client) = self {
            let _ = client.flush().await;
        }
    }
}

/// Open a publish stream: a writer task sends every queued event as one
/// frame (flushing once per wake-up), a reader task matches the answers,
/// which come in frame order.
async fn stream(url: &str, token: &str) -> anyhow::Result<mpsc::UnboundedSender<Pending>> {
    use futures_util::StreamExt;
    let ws_url = format!(
        "{}/api/realtime/publish/stream?token={token}",
        url.replacen("http", "ws", 1)
    );
    let (ws, _) = tokio_tungstenite::connect_async(&ws_url)
        .await
        .with_context(|| format!("open the publish stream at {ws_url}"))?;
    let (mut sink, mut source) = ws.split();
    let waiting: Arc<std::sync::Mutex<VecDeque<oneshot::Sender<bool>>>> = Arc::default();
    let (tx, mut rx) = mpsc::unbounded_channel::<Pending>();
    let w = waiting.clone();
    tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            let mut next = Some(first);
            while let Some((body, answer)) = next.take() {
                w.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push_back(answer);
                if sink
                    .feed(Message::Text(format!("{{{body}}}").into()))
                    .await
                    .is_err()
                {
                    return;
                }
                next = rx.try_recv().ok();
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
    });
    tokio::spawn(async move {
        while let Some(Ok(msg)) = source.next().await {
            if let Message::Text(t) = msg {
                let ok = serde_json::from_str::<serde_json::Value>(&t)
                    .is_ok_and(|v| v["event_id"].is_string());
                let answer = waiting
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .pop_front();
                if let Some(answer) = answer {
                    let _ = answer.send(ok);
                }
            }
        }
    });
    Ok(tx)
}

/// Batch what is due within 5 ms into one request (at most 1,000 events,
/// the API's limit); requests run concurrently.
async fn batcher(
    mut rx: mpsc::UnboundedReceiver<Pending>,
    http: reqwest::Client,
    url: String,
    token: Arc<str>,
) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let window = tokio::time::sleep(Duration::from_millis(5));
        tokio::pin!(window);
        while batch.len() < 1000 {
            tokio::select! {
                () = &mut window => break,
                next = rx.recv() => match next {
                    Some(p) => batch.push(p),
                    None => break,
                },
            }
        }
        let (http, url, token) = (http.clone(), url.clone(), token.clone());
        tokio::spawn(async move {
            let events: Vec<String> = batch.iter().map(|(b, _)| format!("{{{b}}}")).collect();
            let body = format!(r#"{{"events":[{}]}}"#, events.join(","));
            let answer = async {
                let r = http
                    .post(url.as_str())
                    .bearer_auth(&*token)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .ok()?;
                r.json::<serde_json::Value>().await.ok()
            }
            .await;
            for (i, (_, tx)) in batch.into_iter().enumerate() {
                let ok = answer
                    .as_ref()
                    .is_some_and(|a| a["results"][i]["event_id"].is_string());
                let _ = tx.send(ok);
            }
        });
    }
}

/// Answer the Socket.IO server's pings on the publisher connection.
async fn keepalive(ws: Arc<Mutex<Ws>>) {
    use futures_util::StreamExt;
    loop {
        let next = {
            let mut guard = ws.lock().await;
            tokio::time::timeout(Duration::from_millis(5), guard.next()).await
        };
        match next {
            Ok(Some(Ok(Message::Text(t)))) if &*t == "2" => {
                let _ = ws.lock().await.send(Message::Text("3".into())).await;
            }
            Ok(None | Some(Err(_))) => return,
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}
