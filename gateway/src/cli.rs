//! Command-line tools built into the gateway binary: mint a development
//! token, publish an event, tail a topic.

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
