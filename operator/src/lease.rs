//! Leader election with a `coordination.k8s.io/v1` Lease, so that two
//! operator replicas never reconcile at once.
//!
//! Expiry is judged as client-go's leader election judges it: a replica
//! never compares another pod's `renewTime` with its own clock (clocks
//! drift between nodes). It remembers the lease record it last saw and when
//! (on its own monotonic clock); the lease has expired when that record has
//! not changed for `leaseDurationSeconds`. A replica that stops releases the
//! lease (empty holder) so the next one leads at once.

use std::sync::Mutex;
use std::time::{Duration, Instant};

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
    /// The other holder's record as last seen, and when it was first seen.
    observed: Mutex<Option<(Record, Instant)>>,
}

/// What identifies one renewal of a lease.
#[derive(Clone, PartialEq, Eq, Debug)]
struct Record {
    holder: String,
    renew_time: Option<String>,
    transitions: i32,
}

impl Record {
    fn of(spec: &LeaseSpec) -> Self {
        Self {
            holder: spec.holder_identity.clone().unwrap_or_default(),
            renew_time: spec.renew_time.as_ref().map(|t| t.0.to_string()),
            transitions: spec.lease_transitions.unwrap_or(0),
        }
    }
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
            observed: Mutex::new(None),
        }
    }

    /// Whether another holder's lease has gone unrenewed for its duration,
    /// by this replica's clock only.
    fn expired(&self, spec: &LeaseSpec) -> bool {
        let record = Record::of(spec);
        if record.holder.is_empty() {
            return true; // released
        }
        let ttl = spec
            .lease_duration_seconds
            .map_or(self.duration, |s| Duration::from_secs(s.max(0) as u64));
        let mut observed = self.observed.lock().unwrap_or_else(|e| e.into_inner());
        match &*observed {
            Some((seen, since)) if *seen == record => since.elapsed() > ttl,
            _ => {
                *observed = Some((record, Instant::now()));
                false
            }
        }
    }

    fn spec(&self, transitions: i32, acquired: Option<MicroTime>) -> LeaseSpec {
        let now = MicroTime(Timestamp::now());
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.duration.as_secs() as i32),
            acquire_time: acquired.or(Some(now.clone())),
            renew_time: Some(now),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    /// Try once to take or renew the lease.
    async fn try_hold(&self) -> Result<Outcome, kube::Error> {
        match self.api.get_opt(&self.name).await? {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(self.spec(0, None)),
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
                if !ours && !self.expired(&current) {
                    return Ok(Outcome::Taken);
                }
                let transitions = current.lease_transitions.unwrap_or(0) + i32::from(!ours);
                let acquired = if ours { current.acquire_time } else { None };
                lease.spec = Some(self.spec(transitions, acquired));
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

    /// Give the lease up (when stopping), so another replica leads without
    /// waiting for it to expire. Only a lease this replica holds is touched.
    pub async fn release(&self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(&self.identity) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(()), // someone else moved on
            Err(e) => Err(e),
        }
    }
}
