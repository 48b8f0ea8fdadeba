//! Building a node from configuration: the one place that wires the parts.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use switchboard_config::{GatewayConfig, PolicyBundle};

use crate::auth::Verifier;
use crate::broker::Broker;
use crate::broker::memory::MemoryBroker;
use crate::broker::nats::NatsBroker;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::node::Node;

/// Build a node (embedded broker, or NATS when `nats` is configured) and
/// start its policy watcher.
pub async fn build(config: GatewayConfig) -> anyhow::Result<Arc<Node>> {
    config.validate()?;
    let verifier = Verifier::new(&config.auth).context("loading token keys")?;
    let policy = match &config.policy_file {
        Some(path) => crate::policy::load(path)?,
        None => PolicyBundle::allow_all(),
    };
    let metrics = Arc::new(Metrics::new(
        config
            .telemetry
            .tenant_labels
            .then_some(config.telemetry.tenant_label_cap),
    ));
    let hub = Arc::new(Hub::default());
    let mut nats_client = None;
    let broker: Arc<dyn Broker> = match &config.nats {
        Some(nats) => {
            let broker = NatsBroker::start(
                nats,
                config.history.clone(),
                &config.region,
                hub.clone(),
                metrics.clone(),
            )
            .await
            .context("starting the NATS broker")?;
            nats_client = Some((
                broker.client(),
                nats.subject_prefix.clone(),
                nats.stream_replicas,
            ));
            broker
        }
        None => Arc::new(MemoryBroker::new(
            config.region.as_str().into(),
            config.history.clone(),
            hub.clone(),
            metrics.clone(),
        )),
    };
    let presence_config = config.presence.clone();
    let policy_file = config.policy_file.clone();
    let reload = Duration::from_secs(config.policy_reload_seconds.max(1));
    let node = Node::new(config, verifier, broker, hub, metrics, policy);
    if let Some((client, prefix, replicas)) = nats_client {
        let _ = node.cluster.set(crate::node::ClusterLink {
            client: client.clone(),
            prefix: prefix.clone(),
            replicas,
        });
        crate::presence::cluster::attach(
            &node.presence,
            client,
            &prefix,
            &presence_config,
            node.metrics.clone(),
        )
        .await
        .context("starting presence over NATS")?;
    }
    if let Some(path) = policy_file {
        tokio::spawn(crate::policy::watch_file(path, reload, node.clone()));
    }
    tokio::spawn(node.clone().resume_erasures());
    Ok(node)
}
