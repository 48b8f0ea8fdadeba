//! Publishing one payload to one topic, per target: Switchboard's HTTP API,
//! NATS over TCP, or a Socket.IO emit the server relays to the topic's room.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures_util::SinkExt;
use tokio::sync::Mutex;
use tokio_tungstenite::tungstenite::Message;

use crate::target::{self, Kind, Ws};

#[derive(Clone)]
pub enum Publisher {
    Switchboard {
        http: reqwest::Client,
        url: String,
        token: Arc<str>,
    },
    Nats(async_nats::Client),
    Socketio(Arc<Mutex<Ws>>),
}

impl Publisher {
    pub async fn connect(kind: Kind, url: &str, token: &str) -> anyhow::Result<Self> {
        Ok(match kind {
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
