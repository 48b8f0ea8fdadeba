//! Embedding the gateway in another program: build a node from a
//! configuration, serve it on a listener of your choosing, and stop it
//! (with a drain) when your program decides.
//!
//! ```text
//! cargo run -p switchboard-gateway --example embedded
//! ```
//!
//! It starts a gateway on a free loopback port, checks it end to end with a
//! WebSocket subscriber and an HTTP publish (what `switchboard check` does),
//! prints the delivery time, and drains.

use std::time::Duration;

use switchboard_gateway::config::GatewayConfig;
use switchboard_gateway::{cli, server, startup};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Everything a config file can say; here: a secret to verify tokens,
    // a short drain, the embedded (in-process) broker.
    let mut config = GatewayConfig {
        drain_seconds: 1,
        ..GatewayConfig::default()
    };
    let secret = "an-example-secret-of-enough-length";
    config.auth.hs256_secret = Some(secret.into());

    let node = startup::build(config).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server::run(node.clone(), listener, None, async {
        let _ = stopped.await;
    }));

    let token = cli::token(
        secret,
        "acme",
        "example",
        &["publish".into()],
        Duration::from_secs(60),
    )?;
    let took = cli::check(&url, &token, "example.hello", Duration::from_secs(10)).await?;
    println!(
        "gateway at {url}: an event published over HTTP reached a WebSocket subscriber in {took:?}"
    );

    let _ = stop.send(());
    serving.await??;
    Ok(())
}
