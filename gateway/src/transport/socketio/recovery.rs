//! Where a Socket.IO client's rooms wait for it between connections
//! (Socket.IO's connection state recovery). The client keeps the `pid` it
//! was given and the offset of the last event it received; when it comes
//! back (to any gateway) with both, its rooms are joined again and what it
//! missed is replayed from history by that offset.
//!
//! Embedded: a map in the process. Cluster: a JetStream key-value bucket
//! whose entries expire `recovery_seconds` after they were last written,
//! so any gateway of the region can recover any client. The entry holds
//! room names and the presence status only, never events.

use std::time::Duration;

use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::OnceCell;
use tokio::time::Instant;

use crate::node::ClusterLink;

/// What a client gets back when it recovers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Saved {
    /// The tenant it belonged to: recovery never crosses tenants.
    pub tenant: String,
    /// The user it belonged to: nor users.
    pub user: String,
    /// The rooms (topics) it had joined.
    pub rooms: Vec<String>,
    /// Its presence status (`presence_update`), if it set one.
    pub status: Option<Value>,
    /// Every event of its rooms up to this cursor was sent to it: where a
    /// client that received no event yet (and so has no offset) resumes.
    #[serde(default)]
    pub cursor: Option<String>,
}

/// The store.
pub struct Recovery {
    ttl: Duration,
    memory: DashMap<String, (Saved, Instant)>,
    cluster: Option<ClusterLink>,
    bucket: OnceCell<async_nats::jetstream::kv::Store>,
}

impl Recovery {
    /// A store keeping entries for `ttl`, in `cluster`'s bucket when set.
    pub fn new(ttl: Duration, cluster: Option<ClusterLink>) -> Self {
        Self {
            ttl,
            memory: DashMap::new(),
            cluster,
            bucket: OnceCell::new(),
        }
    }

    /// How long an entry lives after it was written.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    async fn bucket(&self) -> Option<&async_nats::jetstream::kv::Store> {
        let link = self.cluster.as_ref()?;
        self.bucket
            .get_or_try_init(|| async {
                let js = async_nats::jetstream::new(link.client.clone());
                let name: String = format!("{}_sio_recovery", link.prefix)
                    .chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                            c
                        } else {
                            '_'
                        }
                    })
                    .collect();
                js.create_key_value(async_nats::jetstream::kv::Config {
                    bucket: name,
                    history: 1,
                    max_age: self.ttl,
                    num_replicas: link.replicas.max(1),
                    ..Default::default()
                })
                .await
                .map_err(|e| {
                    tracing::warn!(error = %e, "Socket.IO recovery bucket unavailable");
                    e
                })
            })
            .await
            .ok()
    }

    /// Keep `saved` under `pid` for the next `ttl`.
    pub async fn save(&self, pid: &str, saved: &Saved) {
        if self.cluster.is_some() {
            if let (Some(kv), Ok(bytes)) = (self.bucket().await, serde_json::to_vec(saved))
                && let Err(e) = kv.put(pid, bytes.into()).await
            {
                tracing::warn!(error = %e, "saving a Socket.IO recovery entry failed");
            }
            return;
        }
        let now = Instant::now();
        if self.memory.len() % 256 == 255 {
            self.memory
                .retain(|_, (_, at)| now.duration_since(*at) < self.ttl);
        }
        self.memory.insert(pid.to_owned(), (saved.clone(), now));
    }

    /// The entry under `pid`, if it has not expired.
    pub async fn load(&self, pid: &str) -> Option<Saved> {
        if !valid_pid(pid) {
            return None;
        }
        if self.cluster.is_some() {
            let kv = self.bucket().await?;
            let bytes = kv.get(pid).await.ok()??;
            return serde_json::from_slice(&bytes).ok();
        }
        let entry = self.memory.get(pid)?;
        (entry.1.elapsed() < self.ttl).then(|| entry.0.clone())
    }

    /// Forget `pid` (the client left on purpose).
    pub async fn forget(&self, pid: &str) {
        if self.cluster.is_some() {
            if let Some(kv) = self.bucket().await {
                let _ = kv.purge(pid).await;
            }
            return;
        }
        self.memory.remove(pid);
    }
}

/// A pid this gateway could have issued (it is used as a bucket key).
pub fn valid_pid(pid: &str) -> bool {
    (16..=64).contains(&pid.len()) && pid.bytes().all(|b| b.is_ascii_alphanumeric())
}
