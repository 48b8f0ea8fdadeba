//! Policy rollout: which policy bundle each ready gateway pod enforces.
//!
//! Every gateway pod answers `GET /readyz` on its `admin` port with the
//! digest of the bundle in force ([`switchboard_config::Readiness`]). The
//! operator asks each ready pod of a gateway and compares with the digest of
//! the bundle it last wrote to the ConfigMap: Kubernetes updates mounted
//! ConfigMaps within about a minute and the gateway reloads the file within
//! seconds, so for a while some pods enforce the previous bundle.

use std::sync::OnceLock;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::{Api, ResourceExt};
use switchboard_config::Readiness;

use crate::build;
use crate::crd::RealtimeGateway;

/// What the ready pods of one gateway enforce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rollout {
    /// Digest of the bundle the operator wrote.
    pub digest: String,
    /// Ready pods.
    pub ready: usize,
    /// Ready pods that answered with `digest`.
    pub current: usize,
    /// Ready pods that did not answer (unreachable, or not a gateway).
    pub unreachable: usize,
}

impl Rollout {
    pub fn lagging(&self) -> usize {
        self.ready - self.current
    }

    /// Every ready pod enforces the current bundle (and there is one).
    pub fn complete(&self) -> bool {
        self.ready > 0 && self.current == self.ready
    }

    /// `PolicyApplied` reason and message.
    pub fn reason_message(&self) -> (&'static str, String) {
        let short = &self.digest[..self.digest.len().min(12)];
        if self.ready == 0 {
            return (
                "NoReadyPods",
                format!("no ready pod runs policy bundle {short} yet"),
            );
        }
        if self.complete() {
            return (
                "AllPodsCurrent",
                format!(
                    "{}/{} ready pods run policy bundle {short}",
                    self.current, self.ready
                ),
            );
        }
        let mut message = format!(
            "{} of {} ready pods do not run policy bundle {short} yet",
            self.lagging(),
            self.ready
        );
        if self.unreachable > 0 {
            message.push_str(&format!(
                " ({} did not answer on their admin port)",
                self.unreachable
            ));
        }
        ("PodsLagging", message)
    }
}

fn http() -> &'static reqwest::Client {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    CLIENT.get_or_init(|| {
        reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .unwrap_or_default()
    })
}

fn is_ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// `http://<pod IP>:<admin port>/readyz`, if the pod has both.
fn readyz_url(pod: &Pod) -> Option<String> {
    let ip = pod.status.as_ref()?.pod_ip.as_deref()?;
    let port = pod
        .spec
        .as_ref()?
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some("admin"))?
        .container_port;
    let host = if ip.contains(':') {
        format!("[{ip}]")
    } else {
        ip.to_owned()
    };
    Some(format!("http://{host}:{port}/readyz"))
}

async fn enforced(pod: &Pod) -> Option<String> {
    let url = readyz_url(pod)?;
    let answer = http().get(&url).send().await.ok()?;
    let readiness: Readiness = answer.json().await.ok()?;
    Some(readiness.policy)
}

/// Ask every ready pod of `gw` which bundle it enforces.
pub async fn observe(
    client: &kube::Client,
    gw: &RealtimeGateway,
    digest: &str,
) -> Result<Rollout, kube::Error> {
    let ns = gw.namespace().unwrap_or_default();
    let pods: Vec<Pod> = Api::<Pod>::namespaced(client.clone(), &ns)
        .list(&ListParams::default().labels(&build::selector_string(gw)))
        .await?
        .items
        .into_iter()
        .filter(is_ready)
        .collect();
    let answers = futures_util::future::join_all(pods.iter().map(enforced)).await;
    Ok(Rollout {
        digest: digest.to_owned(),
        ready: pods.len(),
        current: answers
            .iter()
            .filter(|a| a.as_deref() == Some(digest))
            .count(),
        unreachable: answers.iter().filter(|a| a.is_none()).count(),
    })
}
