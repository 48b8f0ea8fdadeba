//! The fixture the official Engine.IO and Socket.IO protocol test suites
//! (`socketio/engine.io-protocol`, `socketio/socket.io-protocol`) run
//! against: the gateway's Engine.IO and Socket.IO layers with the suites'
//! expected configuration (ping interval 300 ms, timeout 200 ms, max
//! payload 1,000,000) and their echo behaviour, on `127.0.0.1:<port>`:
//!
//! - `/engine.io/`: every message is sent back;
//! - `/socket.io/`: namespaces `/` and `/custom`; on connect, emits
//!   `auth` with the CONNECT payload; `message` comes back as
//!   `message-back`, `message-with-ack` is acknowledged with its
//!   arguments, attachments included.
//!
//! `cargo run --example socketio_conformance -- 3000`

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use switchboard_gateway::transport::socketio::engine::{Accept, Engine, EngineConfig};
use switchboard_gateway::transport::socketio::router;
use switchboard_gateway::transport::socketio::socket::{Incoming, SioSocket};

fn config() -> EngineConfig {
    EngineConfig {
        ping_interval: Duration::from_millis(300),
        ping_timeout: Duration::from_millis(200),
        max_payload: 1_000_000,
    }
}

fn echo_engine() -> Arc<Engine> {
    let accept: Accept = Box::new(|mut socket, _| {
        tokio::spawn(async move {
            while let Ok(m) = socket.recv().await {
                socket.send([m]);
            }
        });
    });
    Engine::new(config(), accept)
}

fn echo_socketio() -> Arc<Engine> {
    let accept: Accept = Box::new(|socket, _| {
        tokio::spawn(async move {
            let mut sio = SioSocket::new(socket, Duration::from_millis(1000));
            let mut n = 0u64;
            while let Ok(incoming) = sio.next().await {
                match incoming {
                    Incoming::Connect { nsp, auth } => {
                        if nsp == "/" || nsp == "/custom" {
                            n += 1;
                            sio.accept(&nsp, &format!("fixture{n}"), None);
                            sio.emit(&nsp, "auth", vec![auth.unwrap_or(json!({}))], Vec::new());
                        } else {
                            sio.refuse(&nsp, "Invalid namespace", None);
                        }
                    }
                    Incoming::Disconnect { .. } => {}
                    Incoming::Event {
                        nsp,
                        name,
                        args,
                        ack,
                        attachments,
                    } => match (name.as_str(), ack) {
                        ("message", _) => sio.emit(&nsp, "message-back", args, attachments),
                        ("message-with-ack", Some(id)) => sio.ack(&nsp, id, args, attachments),
                        _ => {}
                    },
                }
            }
        });
    });
    Engine::new(config(), accept)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let port: u16 = std::env::args()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(3000);
    let app = axum::Router::new()
        .merge(router(echo_engine(), "/engine.io"))
        .merge(router(echo_socketio(), "/socket.io"));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    eprintln!("conformance fixture on 127.0.0.1:{port}");
    axum::serve(listener, app).await?;
    Ok(())
}
