//! Presence across gateways over core NATS (no JetStream): heartbeated
//! subjects and views held by the gateways that need them.
//!
//! ```text
//! <p>.prhb                       every gateway's heartbeat ({"pod"}), every heartbeat_seconds
//! <p>.pr.<tenant>.<topic…>       a change of one gateway's entry for one user (a Delta)
//! <p>.prq.<tenant>.<topic…>      "who is here?": every gateway answers with its members
//! ```
//!
//! A gateway subscribes to a topic's changes only while one of its
//! connections observes that topic; the sync request then fills its view.
//! Heartbeats are one small message per gateway per interval, whatever the
//! number of members. See docs/architecture.md for costs and partitions.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use switchboard_config::{PresenceConfig, Topic};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{Delta, Entry, Key, Presence};
use crate::broker::nats::subject::{escape_tenant, unescape_tenant};

/// How long a sync waits for the other gateways' answers.
const SYNC_WAIT: Duration = Duration::from_millis(500);

/// How long a sync that heard every known gateway still listens for others.
const SYNC_STALL: Duration = Duration::from_millis(100);

/// The NATS side of presence, set once by [`attach`].
pub struct Link {
    client: async_nats::Client,
    prefix: String,
    out: mpsc::UnboundedSender<(String, Vec<u8>)>,
}

#[derive(Serialize, Deserialize)]
struct Heartbeat {
    pod: String,
}

#[derive(Serialize, Deserialize)]
struct SyncAnswer {
    pod: String,
    members: Vec<(String, Entry)>,
}

impl Link {
    fn subject(&self, kind: &str, key: &Key) -> String {
        format!(
            "{}.{kind}.{}.{}",
            self.prefix,
            escape_tenant(&key.0),
            key.1.as_str()
        )
    }

    /// Send a change of this gateway's members (in order, without waiting).
    pub(super) fn send_delta(&self, key: &Key, delta: Delta) {
        if let Ok(body) = serde_json::to_vec(&delta) {
            let _ = self.out.send((self.subject("pr", key), body));
        }
    }

    /// Follow `key`'s changes and fill its view; runs until the view goes.
    pub(super) fn open_view(
        &self,
        presence: Arc<Presence>,
        key: Key,
    ) -> tokio::task::JoinHandle<()> {
        let client = self.client.clone();
        let changes = self.subject("pr", &key);
        let ask = self.subject("prq", &key);
        tokio::spawn(async move {
            let mut deltas = match client.subscribe(changes).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "presence: cannot follow a topic's changes");
                    presence.view_ready(&key);
                    return;
                }
            };
            let _ = client.flush().await;
            sync(&client, &presence, &key, ask).await;
            presence.view_ready(&key);
            while let Some(msg) = deltas.next().await {
                if let Ok(d) = serde_json::from_slice::<Delta>(&msg.payload) {
                    presence.merge(&key, d.pod.into(), vec![(d.user.into(), d.entry)]);
                }
            }
        })
    }
}

/// Ask every gateway for its members of `key` and merge the answers;
/// waits for as many answers as gateways are known and then until none came
/// for [`SYNC_STALL`], at most [`SYNC_WAIT`].
async fn sync(client: &async_nats::Client, presence: &Presence, key: &Key, ask: String) {
    let inbox = client.new_inbox();
    let Ok(mut answers) = client.subscribe(inbox.clone()).await else {
        return;
    };
    if client
        .publish_with_reply(ask, inbox, Vec::new().into())
        .await
        .is_err()
    {
        return;
    }
    let _ = client.flush().await;
    let deadline = Instant::now() + SYNC_WAIT;
    let mut got = 0;
    // Until every known gateway answered and then none for SYNC_STALL (a
    // gateway not heard of yet, e.g. just after start, still answers).
    loop {
        let stall = Instant::now() + SYNC_STALL;
        let wait_until = if got < presence.known_pods() {
            deadline
        } else {
            stall.min(deadline)
        };
        let Ok(Some(msg)) = tokio::time::timeout_at(wait_until, answers.next()).await else {
            break;
        };
        if let Ok(a) = serde_json::from_slice::<SyncAnswer>(&msg.payload) {
            if *a.pod == *presence.pod {
                continue;
            }
            got += 1;
            presence.heard(&a.pod);
            let members = a.members.into_iter().map(|(u, e)| (u.into(), e)).collect();
            presence.merge(key, a.pod.into(), members);
        }
    }
}

/// Sync every view again (in the background).
fn resync_all(client: &async_nats::Client, presence: &Arc<Presence>, prefix: &str) {
    for key in presence.viewed() {
        let ask = format!("{prefix}.prq.{}.{}", escape_tenant(&key.0), key.1);
        let (client, presence) = (client.clone(), presence.clone());
        tokio::spawn(async move { sync(&client, &presence, &key, ask).await });
    }
}

/// The key a presence subject names, after `<prefix>.<kind>.`.
fn key_of(rest: &str) -> Option<Key> {
    let (tenant, topic) = rest.split_once('.')?;
    Some((unescape_tenant(tenant)?.into(), Topic::parse(topic).ok()?))
}

/// Connect presence to NATS: heartbeats, answers to sync requests and the
/// expiry of silent gateways.
pub async fn attach(
    presence: &Arc<Presence>,
    client: async_nats::Client,
    prefix: &str,
    config: &PresenceConfig,
    metrics: Arc<crate::metrics::Metrics>,
) -> anyhow::Result<()> {
    let heartbeats = client.subscribe(format!("{prefix}.prhb")).await?;
    let requests = client.subscribe(format!("{prefix}.prq.>")).await?;
    let (out, mut rx) = mpsc::unbounded_channel::<(String, Vec<u8>)>();
    let link = Link {
        client: client.clone(),
        prefix: prefix.to_owned(),
        out,
    };
    let _ = presence.link.set(link);

    // Changes go out in the order they happened.
    let publisher = client.clone();
    tokio::spawn(async move {
        while let Some((subject, body)) = rx.recv().await {
            let _ = publisher.publish(subject, body.into()).await;
        }
    });

    let beat = serde_json::to_vec(&Heartbeat {
        pod: presence.pod.to_string(),
    })
    .unwrap_or_default();
    let hb_subject = format!("{prefix}.prhb");

    // Heartbeats heard: a gateway not known before (new, or back after a
    // partition) is greeted at once and every view syncs again, so what
    // was dropped while it was unreachable comes back.
    {
        let presence = presence.clone();
        let client = client.clone();
        let beat = beat.clone();
        let hb_subject = hb_subject.clone();
        let prefix = prefix.to_owned();
        let mut heartbeats = heartbeats;
        tokio::spawn(async move {
            while let Some(msg) = heartbeats.next().await {
                let Ok(hb) = serde_json::from_slice::<Heartbeat>(&msg.payload) else {
                    continue;
                };
                if presence.heard(&hb.pod) {
                    let _ = client
                        .publish(hb_subject.clone(), beat.clone().into())
                        .await;
                    resync_all(&client, &presence, &prefix);
                }
            }
        });
    }

    // Sync requests: answer with this gateway's members (possibly none, so
    // the asker knows it has heard everyone).
    {
        let presence = presence.clone();
        let client = client.clone();
        let skip = format!("{prefix}.prq.").len();
        let mut requests = requests;
        tokio::spawn(async move {
            while let Some(msg) = requests.next().await {
                let (Some(reply), Some(key)) =
                    (msg.reply.clone(), msg.subject.get(skip..).and_then(key_of))
                else {
                    continue;
                };
                let answer = SyncAnswer {
                    pod: presence.pod.to_string(),
                    members: presence.local_members(&key),
                };
                if let Ok(body) = serde_json::to_vec(&answer) {
                    let _ = client.publish(reply, body.into()).await;
                }
            }
        });
    }

    // This gateway's heartbeat, and the expiry of silent ones. After a
    // reconnect to NATS (another server, or the same one back), what was
    // sent or received meanwhile may be lost: members are sent again and
    // every view syncs again.
    {
        let presence = presence.clone();
        let every = Duration::from_secs(config.heartbeat_seconds);
        let timeout = Duration::from_secs(config.timeout_seconds);
        let prefix = prefix.to_owned();
        let stats = client.statistics();
        let mut connects = stats.connects.load(std::sync::atomic::Ordering::Relaxed);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let now = stats.connects.load(std::sync::atomic::Ordering::Relaxed);
                if now != connects {
                    connects = now;
                    tracing::info!(
                        "presence: reconnected to NATS; members sent again, views sync again"
                    );
                    presence.reannounce();
                    resync_all(&client, &presence, &prefix);
                }
                let _ = client
                    .publish(hb_subject.clone(), beat.clone().into())
                    .await;
                for pod in presence.expire(timeout) {
                    tracing::info!(%pod, "presence: a gateway went silent; its members left");
                }
                metrics.presence_gateways.set(presence.known_pods() as i64);
            }
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_name_their_key() {
        let key = key_of("a~2Eb.presence:doc/1.x").unwrap();
        assert_eq!(&*key.0, "a.b");
        assert_eq!(key.1.as_str(), "presence:doc/1.x");
        assert!(key_of("a~2eb.x").is_none());
        assert!(key_of("nodot").is_none());
    }
}
