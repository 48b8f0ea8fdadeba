//! `switchboard-operator`: run the controllers, or print the CRDs, or render
//! what the operator would create for a RealtimeGateway.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use kube::Client;
use kube::api::ListParams;
use kube::runtime::events::{Recorder, Reporter};
use switchboard_operator::controller::{self, Context};
use switchboard_operator::crd::{RealtimeGateway, TopicPolicy};
use switchboard_operator::lease::LeaseLock;
use switchboard_operator::metrics::{ExpositionFormat, Metrics};
use switchboard_operator::{build, crd, validate};

#[derive(Parser)]
#[command(
    name = "switchboard-operator",
    version,
    about = "Switchboard Kubernetes operator"
)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controllers (the default).
    Run(RunArgs),
    /// Print the CustomResourceDefinitions as YAML.
    Crdgen,
    /// Print the objects the operator would apply for the RealtimeGateway
    /// (and TopicPolicies) in the given YAML files, as JSON lines.
    Render {
        files: Vec<PathBuf>,
        #[arg(long, default_value = "ghcr.io/switchboard-dev/gateway:0.1.0")]
        gateway_image: String,
    },
}

#[derive(clap::Args, Clone)]
struct RunArgs {
    /// Gateway image used when a RealtimeGateway sets none.
    #[arg(
        long,
        env = "SWITCHBOARD_GATEWAY_IMAGE",
        default_value = "ghcr.io/switchboard-dev/gateway:0.1.0"
    )]
    gateway_image: String,
    /// Address of /healthz and /metrics.
    #[arg(
        long,
        env = "SWITCHBOARD_OPERATOR_METRICS",
        default_value = "0.0.0.0:8080"
    )]
    metrics_addr: SocketAddr,
    /// Namespace of the leader-election Lease (the operator's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "switchboard-system")]
    lease_namespace: String,
    /// This replica's identity in the Lease.
    #[arg(long, env = "POD_NAME", default_value = "switchboard-operator")]
    identity: String,
    /// Turn leader election off (a single replica).
    #[arg(long)]
    no_leader_election: bool,
    /// Watch and manage this namespace only (needs Roles there, no
    /// ClusterRole); default: every namespace.
    #[arg(long, env = "SWITCHBOARD_WATCH_NAMESPACE")]
    watch_namespace: Option<String>,
}

fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .json()
        .init();
}

async fn serve_http(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
) -> anyhow::Result<()> {
    use axum::routing::get;
    let app = axum::Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/metrics",
            get(move |headers: axum::http::HeaderMap| {
                let m = metrics.clone();
                async move {
                    let accept = headers
                        .get(axum::http::header::ACCEPT)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("");
                    let format = ExpositionFormat::negotiate(accept);
                    (
                        [(axum::http::header::CONTENT_TYPE, format.content_type())],
                        m.render(format),
                    )
                }
            }),
        );
    axum::serve(listener, app).await?;
    Ok(())
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    init_logs();
    // Health and metrics answer from the start, also while the API server
    // or the lease is awaited.
    let metrics = Arc::new(Metrics::default());
    let listener = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .with_context(|| format!("binding {}", args.metrics_addr))?;
    tokio::spawn(serve_http(listener, metrics.clone()));
    let client = Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;
    let watch_namespace = args.watch_namespace.clone().filter(|n| !n.is_empty());
    // The CRDs must be installed: a list of each kind, in the scope the
    // operator watches, answers 404 otherwise (no cluster-wide read of
    // CustomResourceDefinitions needed, so this works in namespace scope).
    let ns = watch_namespace.as_deref();
    let probes = [
        (
            "realtimegateways.switchboard.dev",
            controller::scoped::<RealtimeGateway>(&client, ns)
                .list(&ListParams::default().limit(1))
                .await
                .map(|_| ()),
        ),
        (
            "topicpolicies.switchboard.dev",
            controller::scoped::<TopicPolicy>(&client, ns)
                .list(&ListParams::default().limit(1))
                .await
                .map(|_| ()),
        ),
    ];
    for (name, probe) in probes {
        match probe {
            Ok(()) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => bail!(
                "the CRD {name} is not installed: install the chart's CRDs or run `switchboard-operator crdgen | kubectl apply -f -`"
            ),
            Err(e) => return Err(e).with_context(|| format!("listing {name}")),
        }
    }
    // SIGTERM (how Kubernetes stops a pod) or Ctrl-C, at any point from here.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };
    let lease = (!args.no_leader_election).then(|| {
        LeaseLock::new(
            client.clone(),
            &args.lease_namespace,
            "switchboard-operator",
            &args.identity,
            Duration::from_secs(15),
        )
    });
    if let Some(lease) = &lease {
        tracing::info!(identity = %args.identity, "waiting for the leader lease");
        tokio::select! {
            _ = lease.acquire() => tracing::info!("leading"),
            _ = stopped() => return Ok(()),
        }
    }
    metrics.leader.set(1);
    let ctx = Arc::new(Context {
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "switchboard-operator".into(),
                instance: Some(args.identity.clone()),
            },
        ),
        client,
        metrics: metrics.clone(),
        default_image: args.gateway_image,
        resync: controller::RESYNC,
        watch_namespace,
    });
    let lost = async {
        match &lease {
            Some(l) => l.hold().await,
            None => std::future::pending().await,
        }
    };
    let lost = tokio::select! {
        _ = controller::run(ctx, stopped()) => false,
        _ = lost => true,
    };
    if lost {
        bail!("lost the leader lease; exiting so another replica leads");
    }
    // Stopped: the controllers have finished; hand the lease on at once.
    metrics.leader.set(0);
    if let Some(lease) = &lease {
        match lease.release().await {
            Ok(()) => tracing::info!("released the leader lease"),
            Err(e) => {
                tracing::warn!(error = %e, "could not release the leader lease; it expires on its own")
            }
        }
    }
    Ok(())
}

/// Resolves on SIGTERM (how Kubernetes stops a pod) or Ctrl-C.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term => {},
    }
    tracing::info!("stopping");
}

fn render(files: &[PathBuf], image: &str) -> anyhow::Result<()> {
    let mut gateways = Vec::new();
    let mut policies = Vec::new();
    for f in files {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        for doc in text.split("\n---").filter(|d| d.contains("kind:")) {
            let v: serde_json::Value =
                serde_saphyr::from_str(doc).with_context(|| format!("parsing {}", f.display()))?;
            match v["kind"].as_str() {
                Some("RealtimeGateway") => {
                    gateways.push(serde_json::from_value::<RealtimeGateway>(v)?)
                }
                Some("TopicPolicy") => policies.push(serde_json::from_value::<TopicPolicy>(v)?),
                _ => {}
            }
        }
    }
    for mut gw in gateways {
        gw.metadata
            .namespace
            .get_or_insert_with(|| "default".into());
        gw.metadata
            .uid
            .get_or_insert_with(|| "00000000-0000-0000-0000-000000000000".into());
        let name = gw.metadata.name.clone().unwrap_or_default();
        let mine: Vec<TopicPolicy> = policies
            .iter()
            .filter(|p| p.spec.gateway == name)
            .cloned()
            .collect();
        let (verdicts, bundle) = validate::judge(true, &mine);
        for (policy, v) in verdicts {
            if !v.is_accepted() {
                eprintln!("TopicPolicy {policy}: {v:?}");
            }
        }
        for obj in build::build(&gw, &bundle, image)?.to_json() {
            println!("{obj}");
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match args.command {
        None => run(args.run).await,
        Some(Command::Run(a)) => run(a).await,
        Some(Command::Crdgen) => {
            print!("{}", crd::crds_yaml());
            Ok(())
        }
        Some(Command::Render {
            files,
            gateway_image,
        }) => render(&files, &gateway_image),
    }
}
