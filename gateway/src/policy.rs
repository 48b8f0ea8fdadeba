//! The live policy bundle: loaded from the policy file, re-read when it
//! changes, published to every connection through a watch channel.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use switchboard_config::PolicyBundle;

use crate::node::Node;

/// How long a changed policy file must stay the same before it is applied:
/// a writer that truncates and then writes (`>` in a shell, most editors'
/// in-place save) is never read half-way.
const SETTLE: Duration = Duration::from_millis(100);

/// Read and validate a policy file.
pub fn load(path: &std::path::Path) -> anyhow::Result<PolicyBundle> {
    use anyhow::Context;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading policy file {}", path.display()))?;
    parse(path, &text)
}

/// Parse a policy file's text (an empty one is refused: see
/// [`PolicyBundle::from_yaml`]).
fn parse(path: &std::path::Path, text: &str) -> anyhow::Result<PolicyBundle> {
    use anyhow::Context;
    PolicyBundle::from_yaml(text).with_context(|| format!("policy file {}", path.display()))
}

/// Poll the policy file and publish each valid new version once it has
/// stayed the same for `SETTLE`. A file that is empty or fails to parse is
/// reported and the previous policy stays in force: a bad edit never opens
/// or closes the gate by accident.
pub async fn watch_file(path: PathBuf, every: Duration, node: Arc<Node>) {
    let metrics = &node.metrics;
    let mut last_text = std::fs::read_to_string(&path).ok();
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let text = match tokio::fs::read_to_string(&path).await {
            Ok(t) => t,
            Err(e) => {
                if last_text.is_some() {
                    tracing::warn!(path = %path.display(), error = %e, "policy file unreadable; keeping the current policy");
                    metrics
                        .policy_reloads
                        .get_or_create(&vec![("result", "error")])
                        .inc();
                    last_text = None;
                }
                continue;
            }
        };
        if last_text.as_deref() == Some(text.as_str()) {
            continue;
        }
        // Still being written: look again on the next tick.
        tokio::time::sleep(SETTLE).await;
        if tokio::fs::read_to_string(&path).await.ok().as_deref() != Some(text.as_str()) {
            continue;
        }
        last_text = Some(text.clone());
        let span = tracing::info_span!("policy.reload", path = %path.display(), result = tracing::field::Empty);
        let _entered = span.enter();
        match parse(&path, &text) {
            Ok(bundle) => {
                tracing::info!(path = %path.display(), tenants = bundle.tenants.len(), "policy reloaded");
                metrics
                    .policy_reloads
                    .get_or_create(&vec![("result", "ok")])
                    .inc();
                span.record("result", "ok");
                node.set_policy(bundle);
            }
            Err(e) => {
                span.record("result", "error");
                tracing::error!(path = %path.display(), error = %format_args!("{e:#}"), "policy file invalid; keeping the current policy");
                metrics
                    .policy_reloads
                    .get_or_create(&vec![("result", "error")])
                    .inc();
            }
        }
    }
}
