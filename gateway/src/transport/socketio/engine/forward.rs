//! No sticky sessions for long-polling: a polling request that reaches a
//! process which does not hold its session is forwarded to the owner (named
//! in the session id) over NATS request/reply, and the owner's answer is
//! returned as if it had been served here. When the owner is gone, NATS
//! answers "no responders" at once and the client is told its session is
//! unknown (it reconnects, and Socket.IO's recovery brings back what it
//! missed).

use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use bytes::Bytes;
use futures_util::StreamExt;

use super::{Engine, Reply};

const METHOD: &str = "Sio-Method";
const SID: &str = "Sio-Sid";
const STATUS: &str = "Sio-Status";

/// Which request is forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// A poll: take what is queued.
    Get,
    /// A push: deliver packets.
    Post,
    /// A relay answered the client's probe (see [`super::relay`]).
    Upgrade,
    /// The client completed the upgrade through the relay.
    Switch,
    /// The relay gave up before the switch.
    Abort,
}

impl Method {
    fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Upgrade => "UPGRADE",
            Method::Switch => "SWITCH",
            Method::Abort => "ABORT",
        }
    }
}

/// Sends requests to other processes and serves theirs.
pub struct Forwarder {
    client: async_nats::Client,
    prefix: String,
}

impl Forwarder {
    /// Forwarding over `client`, on subjects under `prefix`.
    pub fn new(client: async_nats::Client, prefix: &str) -> Self {
        Self {
            client,
            prefix: prefix.to_owned(),
        }
    }

    /// The NATS connection.
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// The subject prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn subject(&self, owner: &str) -> String {
        format!("{}.sio.{owner}", self.prefix)
    }

    /// Forward one request to `owner` and wait up to `wait` for its answer.
    pub async fn send(
        &self,
        owner: &str,
        sid: &str,
        method: Method,
        body: Bytes,
        wait: Duration,
    ) -> Reply {
        // An owner name comes from a client: it must be one subject token.
        if owner.is_empty() || !owner.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Reply::unknown_sid();
        }
        let mut headers = HeaderMap::new();
        headers.insert(METHOD, method.as_str());
        headers.insert(SID, sid);
        let request = async_nats::Request::new()
            .payload(body)
            .headers(headers)
            .timeout(Some(wait + Duration::from_secs(5)));
        match self.client.send_request(self.subject(owner), request).await {
            Ok(answer) => {
                let status = answer
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(STATUS))
                    .and_then(|v| v.as_str().parse().ok())
                    .unwrap_or(500);
                Reply {
                    status,
                    body: String::from_utf8_lossy(&answer.payload).into_owned(),
                }
            }
            Err(e) => {
                tracing::debug!(sid, error = %e, "forwarded polling request failed");
                Reply::unknown_sid()
            }
        }
    }

    /// Answer requests for `owner`'s sessions from `engine`.
    pub fn serve(&self, engine: Arc<Engine>, owner: String) {
        let client = self.client.clone();
        let prefix = self.prefix.clone();
        let subject = self.subject(&owner);
        tokio::spawn(async move {
            let mut sub = match client.subscribe(subject.clone()).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(%subject, error = %e, "cannot serve forwarded Socket.IO polling requests");
                    return;
                }
            };
            while let Some(msg) = sub.next().await {
                let (Some(reply_to), Some(headers)) = (msg.reply.clone(), msg.headers.clone())
                else {
                    continue;
                };
                let engine = engine.clone();
                let client = client.clone();
                let prefix = prefix.clone();
                tokio::spawn(async move {
                    let sid = headers
                        .get(SID)
                        .map(|v| v.as_str().to_owned())
                        .unwrap_or_default();
                    // Only sessions held here: never forwarded again.
                    let local = engine.sessions.get(sid.as_str()).map(|s| s.clone());
                    let verdict = |ok: bool| {
                        if ok {
                            Reply::ok("ok".into())
                        } else {
                            Reply::error(400, 3, "Bad request")
                        }
                    };
                    let answer = match (local, headers.get(METHOD).map(|v| v.as_str())) {
                        (Some(shared), Some("GET")) => engine.poll_local(shared).await,
                        (Some(shared), Some("POST")) => {
                            engine.push_local(&shared, &msg.payload).await
                        }
                        (Some(shared), Some("UPGRADE")) => verdict(super::relay::begin(
                            &shared,
                            engine.config.ping_interval + engine.config.ping_timeout,
                        )),
                        (Some(shared), Some("SWITCH")) => {
                            verdict(super::relay::switch(shared, client.clone(), &prefix).await)
                        }
                        (Some(shared), Some("ABORT")) => {
                            super::relay::abort(&shared);
                            Reply::ok("ok".into())
                        }
                        _ => Reply::unknown_sid(),
                    };
                    let mut h = HeaderMap::new();
                    h.insert(STATUS, answer.status.to_string().as_str());
                    let _ = client
                        .publish_with_headers(reply_to, h, answer.body.into())
                        .await;
                });
            }
        });
    }
}
