//! Command-line tools built into the gateway binary: mint a development
//! token, publish an event, tail a topic, check a gateway end to end.

use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

/// `switchboard token`.
pub fn token(
    secret: &str,
    tenant: &str,
    user: &str,
    scopes: &[String],
    ttl: Duration,
) -> anyhow::Result<String> {
    if !switchboard_config::policy::valid_tenant(tenant) {
        bail!("tenant {tenant:?} must be 1-128 characters of [A-Za-z0-9_.:-]");
    }
    crate::auth::mint_hs256(secret, tenant, user, scopes, ttl).context("signing token")
}

/// `switchboard publish`: POST one event and print the answer.
pub async fn publish(
    url: &str,
    token: &str,
    event_type: &str,
    data: &str,
    idempotency_key: Option<&str>,
) -> anyhow::Result<String> {
    let data: serde_json::Value = serde_json::from_str(data).context("--data must be JSON")?;
    let mut body = serde_json::json!({ "event_type": event_type, "data": data });
    if let (Some(k), Some(obj)) = (idempotency_key, body.as_object_mut()) {
        obj.insert("idempotency_key".into(), k.into());
    }
    let resp = reqwest::Client::new()
        .post(format!(
            "{}/api/realtime/publish/",
            url.trim_end_matches('/')
        ))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .with_context(|| format!("cannot reach {url}"))?;
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    if !status.is_success() {
        bail!("publish refused ({status}): {text}");
    }
    Ok(text)
}

/// `switchboard tail`: subscribe and print every message, one JSON per line.
pub async fn tail(
    url: &str,
    token: &str,
    topics: &[String],
    cursor: Option<&str>,
) -> anyhow::Result<()> {
    let ws_url = format!(
        "{}/ws?token={token}{}",
        url.trim_end_matches('/').replacen("http", "ws", 1),
        cursor.map(|c| format!("&cursor={c}")).unwrap_or_default()
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(&ws_url)
        .await
        .with_context(|| format!("cannot connect to {url}"))?;
    let sub = serde_json::json!({ "type": "subscribe", "topics": topics });
    ws.send(Message::Text(sub.to_string().into())).await?;
    while let Some(msg) = ws.next().await {
        match msg? {
            Message::Text(t) => println!("{t}"),
            Message::Close(frame) => {
                if let Some(f) = frame {
                    eprintln!("closed: {} {}", u16::from(f.code), f.reason);
                }
                break;
            }
            _ => {}
        }
    }
    Ok(())
}

/// `switchboard check`: subscribe to `topic` over WebSocket, publish one
/// event to it over HTTP, and wait for it; the time from publish to
/// delivery.
pub async fn check(
    url: &str,
    token: &str,
    topic: &str,
    timeout: Duration,
) -> anyhow::Result<Duration> {
    tokio::time::timeout(timeout, check_steps(url, token, topic))
        .await
        .map_err(|_| anyhow::anyhow!("no answer from {url} within {timeout:?}"))?
}

/// The next text message as JSON; a close or the end is an error.
async fn next_json<S>(ws: &mut S) -> anyhow::Result<serde_json::Value>
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => return Ok(serde_json::from_str(&t)?),
            Some(Ok(Message::Close(frame))) => bail!(
                "the gateway closed the WebSocket: {}",
                frame
                    .map(|f| format!("{} {}", u16::from(f.code), f.reason))
                    .unwrap_or_default()
            ),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.into()),
            None => bail!("the WebSocket ended"),
        }
    }
}

async fn check_steps(url: &str, token: &str, topic: &str) -> anyhow::Result<Duration> {
    let ws_url = format!(
        "{}/ws?token={token}",
        url.trim_end_matches('/').replacen("http", "ws", 1)
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(&ws_url)
        .await
        .with_context(|| format!("cannot open a WebSocket to {url}"))?;
    let hello = next_json(&mut ws).await?;
    if hello["type"] != "connection.established" {
        bail!("unexpected first message: {hello}");
    }
    let sub = serde_json::json!({ "type": "subscribe", "topics": [topic] });
    ws.send(Message::Text(sub.to_string().into())).await?;
    let nonce = format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
    );
    let mut published_at = None;
    loop {
        let msg = next_json(&mut ws).await?;
        match msg["type"].as_str() {
            Some("subscription.confirmed") if published_at.is_none() => {
                let data = serde_json::json!({ "check": nonce }).to_string();
                published_at = Some(std::time::Instant::now());
                publish(url, token, topic, &data, None).await?;
            }
            Some("error") => bail!("subscribing to {topic} refused: {}", msg["data"]),
            Some("event") if msg["data"]["data"]["check"] == nonce.as_str() => {
                return Ok(published_at.map(|t| t.elapsed()).unwrap_or_default());
            }
            _ => {}
        }
    }
}
