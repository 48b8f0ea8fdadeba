//! Leader election with a `coordination.k8s.io/v1` Lease, so that two
//! operator replicas never reconcile at once.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;

pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
}

enum Outcome {
    Held,
    Taken,
}

impl LeaseLock {
    pub fn new(
        client: kube::Client,
        namespace: &str,
        name: &str,
        identity: &str,
        duration: Duration,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            identity: identity.into(),
            duration,
        }
    }

    /// Try once to take or renew the lease.
    async fn try_hold(&self) -> Result<Outcome, kube::Error> {
        let now = Timestamp::now();
        let secs = self.duration.as_secs() as i32;
        let spec = |transitions: i32, acquired: Option<MicroTime>| LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(secs),
            acquire_time: acquired.or(Some(MicroTime(now))),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        };
        match self.api.get_opt(&self.name).await? {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(spec(0, None)),
                };
                match self.api.create(&PostParams::default(), &lease).await {
                    Ok(_) => Ok(Outcome::Held),
                    Err(kube::Error::Api(s)) if s.code == 409 => Ok(Outcome::Taken),
                    Err(e) => Err(e),
                }
            }
            Some(mut lease) => {
                let current = lease.spec.clone().unwrap_or_default();
                let ours = current.holder_identity.as_deref() == Some(&self.identity);
                let expired = current.renew_time.as_ref().is_none_or(|t| {
                    let ttl = i64::from(current.lease_duration_seconds.unwrap_or(secs));
                    t.0.as_second() + ttl < now.as_second()
                });
                if !ours && !expired {
                    return Ok(Outcome::Taken);
                }
                let transitions = current.lease_transitions.unwrap_or(0) + i32::from(!ours);
                let acquired = if ours { current.acquire_time } else { None };
                lease.spec = Some(spec(transitions, acquired));
                // `replace` carries the resourceVersion: a concurrent writer makes it fail.
                match self
                    .api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await
                {
                    Ok(_) => Ok(Outcome::Held),
                    Err(kube::Error::Api(s)) if s.code == 409 => Ok(Outcome::Taken),
                    Err(e) => Err(e),
                }
            }
        }
    }

    /// Wait until this replica holds the lease.
    pub async fn acquire(&self) {
        loop {
            match self.try_hold().await {
                Ok(Outcome::Held) => return,
                Ok(Outcome::Taken) => tracing::debug!(lease = %self.name, "another replica leads"),
                Err(e) => tracing::warn!(error = %e, "cannot read the leader lease"),
            }
            tokio::time::sleep(self.duration / 3).await;
        }
    }

    /// Keep renewing; returns when the lease is lost.
    pub async fn hold(&self) {
        let mut failures = 0;
        loop {
            tokio::time::sleep(self.duration / 3).await;
            match self.try_hold().await {
                Ok(Outcome::Held) => failures = 0,
                Ok(Outcome::Taken) => return,
                Err(e) => {
                    failures += 1;
                    tracing::warn!(error = %e, "cannot renew the leader lease");
                    if failures >= 2 {
                        return;
                    }
                }
            }
        }
    }
}
