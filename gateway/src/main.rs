//! The `switchboard` binary: the gateway server and its command-line tools.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use switchboard_config::{GatewayConfig, LogFormat};

use switchboard_gateway::{auth, cli, server, startup};

/// jemalloc: no per-allocation header and less fragmentation than glibc's
/// malloc for many small long-lived objects (connections); measured in
/// docs/benchmarks.md.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(name = "switchboard", version, about = "Switchboard realtime gateway")]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(clap::Args, Clone, Default)]
struct ServeArgs {
    /// Config file (YAML); see docs/configuration.md.
    #[arg(long, short, env = "SWITCHBOARD_CONFIG")]
    config: Option<PathBuf>,
    /// Listen address, overriding the config file (default 0.0.0.0:8000).
    #[arg(long, env = "SWITCHBOARD_LISTEN")]
    listen: Option<String>,
    /// Admin listen address (`/metrics`, `/healthz`, `/readyz`), overriding
    /// the config file (default 0.0.0.0:9090); `off` turns it off.
    #[arg(long, env = "SWITCHBOARD_ADMIN_LISTEN")]
    admin_listen: Option<String>,
    /// Accept queue of the client listener, overriding the config file
    /// (default 4096).
    #[arg(long, env = "SWITCHBOARD_LISTEN_BACKLOG")]
    listen_backlog: Option<u32>,
    /// Region name, overriding the config file.
    #[arg(long, env = "SWITCHBOARD_REGION")]
    region: Option<String>,
    /// Policy bundle file, overriding the config file.
    #[arg(long, env = "SWITCHBOARD_POLICY_FILE")]
    policy_file: Option<PathBuf>,
    /// HS256 secret, overriding the config file.
    #[arg(long, env = "SWITCHBOARD_HS256_SECRET", hide_env_values = true)]
    hs256_secret: Option<String>,
    /// Allowed browser origins (comma-separated), overriding the config file.
    #[arg(long, env = "SWITCHBOARD_ALLOWED_ORIGINS", value_delimiter = ',')]
    allowed_origins: Option<Vec<String>>,
    /// Drain period in seconds, overriding the config file.
    #[arg(long, env = "SWITCHBOARD_DRAIN_SECONDS")]
    drain_seconds: Option<u64>,
    /// NATS server URLs (comma-separated): cluster mode, overriding the config file.
    #[arg(long, env = "SWITCHBOARD_NATS_URL", value_delimiter = ',')]
    nats_url: Option<Vec<String>>,
    /// Log format: text or json.
    #[arg(long, env = "SWITCHBOARD_LOG_FORMAT")]
    log_format: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Serve(ServeArgs),
    /// Mint a development token (HS256).
    Token {
        #[arg(long, default_value = "demo")]
        tenant: String,
        #[arg(long, default_value = "dev-user")]
        user: String,
        /// Scopes, comma-separated (e.g. publish, platform).
        #[arg(long, value_delimiter = ',', default_value = "subscribe,publish")]
        scope: Vec<String>,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
        /// Secret; defaults to the development secret the gateway uses when none is configured.
        #[arg(long, env = "SWITCHBOARD_HS256_SECRET", hide_env_values = true)]
        secret: Option<String>,
    },
    /// Publish one event through a gateway's HTTP API.
    Publish {
        #[arg(long, default_value = "http://127.0.0.1:8000")]
        url: String,
        #[arg(long, env = "SWITCHBOARD_TOKEN", hide_env_values = true)]
        token: String,
        /// The topic, e.g. deal.stage.updated.
        #[arg(long)]
        event_type: String,
        /// JSON payload.
        #[arg(long, default_value = "{}")]
        data: String,
        #[arg(long)]
        idempotency_key: Option<String>,
    },
    /// Subscribe over WebSocket and print every message.
    Tail {
        #[arg(long, default_value = "http://127.0.0.1:8000")]
        url: String,
        #[arg(long, env = "SWITCHBOARD_TOKEN", hide_env_values = true)]
        token: String,
        /// Patterns, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "*")]
        topics: Vec<String>,
        #[arg(long)]
        cursor: Option<String>,
    },
    /// End-to-end check (the chart's `helm test`): subscribe over WebSocket,
    /// publish over HTTP with a minted token, wait for the event. Exits 1
    /// with the reason if any step fails.
    Check {
        #[arg(long, default_value = "http://127.0.0.1:8000")]
        url: String,
        /// Tenant of the minted token (its policy must allow `--topic`).
        #[arg(long, default_value = "switchboard-check")]
        tenant: String,
        #[arg(long, default_value = "switchboard.check")]
        topic: String,
        /// File holding the HS256 secret (a mounted Secret key).
        #[arg(long, conflicts_with = "secret")]
        secret_file: Option<PathBuf>,
        #[arg(long, env = "SWITCHBOARD_HS256_SECRET", hide_env_values = true)]
        secret: Option<String>,
        #[arg(long, default_value_t = 30)]
        timeout_seconds: u64,
    },
    /// Print the default configuration as YAML.
    DefaultConfig,
}

fn load_config(args: &ServeArgs) -> anyhow::Result<GatewayConfig> {
    let mut config = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading config file {}", path.display()))?;
            GatewayConfig::from_yaml(&text)
                .with_context(|| format!("config file {}", path.display()))?
        }
        None => GatewayConfig::default(),
    };
    if let Some(v) = &args.listen {
        config.listen = v.clone();
    }
    match args.admin_listen.as_deref() {
        Some("off") => config.admin_listen = None,
        Some(v) => config.admin_listen = Some(v.to_owned()),
        None => {}
    }
    if let Some(v) = &args.region {
        config.region = v.clone();
    }
    if let Some(v) = &args.policy_file {
        config.policy_file = Some(v.clone());
    }
    if let Some(v) = &args.hs256_secret {
        config.auth.hs256_secret = Some(v.clone());
    }
    if let Some(v) = &args.allowed_origins {
        config.allowed_origins = v.clone();
    }
    if let Some(v) = args.listen_backlog {
        config.listen_backlog = v;
    }
    if let Some(v) = args.drain_seconds {
        config.drain_seconds = v;
    }
    if let Some(urls) = &args.nats_url {
        let mut nats = config.nats.take().unwrap_or_default();
        nats.urls = urls.clone();
        config.nats = Some(nats);
    }
    match args.log_format.as_deref() {
        Some("json") => config.log_format = LogFormat::Json,
        Some("text") => config.log_format = LogFormat::Text,
        Some(other) => anyhow::bail!("--log-format must be text or json, not {other:?}"),
        None => {}
    }
    config.validate()?;
    Ok(config)
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = load_config(&args)?;
    let telemetry = switchboard_gateway::telemetry::init(&config)?;
    let listener = server::bind(&config.listen, config.listen_backlog)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let addr = listener.local_addr()?;
    let admin = match &config.admin_listen {
        Some(a) => Some(
            server::bind(a, config.listen_backlog)
                .await
                .with_context(|| format!("binding the admin listener {a}"))?,
        ),
        None => None,
    };
    let admin_addr = admin.as_ref().map(|l| l.local_addr()).transpose()?;
    let bus = match &config.nats {
        Some(n) => format!("NATS {}", n.urls.join(",")),
        None => "embedded (in-memory)".to_owned(),
    };
    let node = startup::build(config).await?;
    tracing::info!(
        address = %addr,
        region = %node.region,
        bus = %bus,
        admin = %admin_addr.map_or_else(|| "off".to_owned(), |a| a.to_string()),
        "switchboard listening on http://{addr} (WebSocket ws://{addr}/ws)"
    );
    if node.verifier.dev_secret {
        tracing::warn!(
            "no auth keys configured: accepting tokens signed with the DEVELOPMENT secret; \
             get one with `switchboard token --tenant demo` (never use this in production)"
        );
    }
    let served = server::run(node, listener, admin, server::shutdown_signal()).await;
    // Spans still queued leave before the process does.
    telemetry.shutdown().await;
    served?;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match args.command {
        None => serve(args.serve).await,
        Some(Command::Serve(s)) => serve(s).await,
        Some(Command::Token {
            tenant,
            user,
            scope,
            ttl,
            secret,
        }) => {
            let secret = secret.unwrap_or_else(|| auth::DEV_SECRET.to_owned());
            println!(
                "{}",
                cli::token(&secret, &tenant, &user, &scope, Duration::from_secs(ttl))?
            );
            Ok(())
        }
        Some(Command::Publish {
            url,
            token,
            event_type,
            data,
            idempotency_key,
        }) => {
            println!(
                "{}",
                cli::publish(&url, &token, &event_type, &data, idempotency_key.as_deref()).await?
            );
            Ok(())
        }
        Some(Command::Check {
            url,
            tenant,
            topic,
            secret_file,
            secret,
            timeout_seconds,
        }) => {
            let secret = match (secret_file, secret) {
                (Some(path), _) => std::fs::read_to_string(&path)
                    .with_context(|| format!("reading {}", path.display()))?
                    .trim_end()
                    .to_owned(),
                (None, Some(s)) => s,
                (None, None) => auth::DEV_SECRET.to_owned(),
            };
            let scopes = ["subscribe".to_owned(), "publish".to_owned()];
            let token = cli::token(
                &secret,
                &tenant,
                "switchboard-check",
                &scopes,
                Duration::from_secs(300),
            )?;
            let took =
                cli::check(&url, &token, &topic, Duration::from_secs(timeout_seconds)).await?;
            println!(
                "ok: {topic} published and delivered through {url} in {} ms",
                took.as_millis()
            );
            Ok(())
        }
        Some(Command::Tail {
            url,
            token,
            topics,
            cursor,
        }) => cli::tail(&url, &token, &topics, cursor.as_deref()).await,
        Some(Command::DefaultConfig) => {
            print!("{}", GatewayConfig::default().to_yaml());
            Ok(())
        }
    }
}
