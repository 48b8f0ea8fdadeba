//! A Socket.IO connection over one Engine.IO session: packets in (whole,
//! attachments included), namespaces joined, and the ways to answer. The
//! layer above (the gateway, or the conformance fixture) decides what a
//! namespace and an event mean.

use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;
use tokio::time::Instant;

use super::engine::{Closed, EngineSocket, Payload};
use super::packet::{Assembler, Complete, Kind, Packet, ParseError};

/// What a client did.
#[derive(Debug)]
pub enum Incoming {
    /// Asks to join a namespace, with its `auth` payload.
    Connect {
        /// The namespace.
        nsp: String,
        /// The `auth` object, if any.
        auth: Option<Value>,
    },
    /// Left a namespace it had joined.
    Disconnect {
        /// The namespace.
        nsp: String,
    },
    /// An event in a joined namespace.
    Event {
        /// The namespace.
        nsp: String,
        /// The event name.
        name: String,
        /// The arguments after the name.
        args: Vec<Value>,
        /// The ack id, when the client waits for an answer.
        ack: Option<u64>,
        /// Binary attachments, in order.
        attachments: Vec<Bytes>,
    },
}

/// Why a connection ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum End {
    #[error("the session ended ({})", .0.label())]
    /// The Engine.IO session ended.
    Engine(Closed),
    #[error("malformed packet: {0}")]
    /// A packet the protocol does not allow.
    Protocol(ParseError),
    #[error("no namespace joined in time")]
    /// No CONNECT within the connect timeout.
    ConnectTimeout,
}

/// One Socket.IO connection.
pub struct SioSocket {
    engine: EngineSocket,
    assembler: Assembler,
    /// Namespaces joined.
    joined: Vec<String>,
    /// Until a first namespace is joined, when to give up.
    connect_by: Option<Instant>,
}

impl SioSocket {
    /// A connection over `engine` that must join a namespace within `connect_timeout`.
    pub fn new(engine: EngineSocket, connect_timeout: Duration) -> Self {
        Self {
            engine,
            assembler: Assembler::default(),
            joined: Vec::new(),
            connect_by: Some(Instant::now() + connect_timeout),
        }
    }

    /// Whether `nsp` was joined.
    pub fn joined(&self, nsp: &str) -> bool {
        self.joined.iter().any(|n| n == nsp)
    }

    /// The next thing the client did (cancel-safe). Packets for namespaces
    /// not joined are dropped, as Socket.IO servers do.
    pub async fn next(&mut self) -> Result<Incoming, End> {
        loop {
            let message = match self.connect_by {
                Some(by) => match tokio::time::timeout_at(by, self.engine.recv()).await {
                    Ok(m) => m,
                    Err(_) => {
                        self.engine.close();
                        return Err(End::ConnectTimeout);
                    }
                },
                None => self.engine.recv().await,
            }
            .map_err(End::Engine)?;
            let complete = match self.assembler.feed(message) {
                Ok(Some(c)) => c,
                Ok(None) => continue,
                Err(e) => {
                    self.engine.close();
                    return Err(End::Protocol(e));
                }
            };
            if let Some(incoming) = self.incoming(complete) {
                return Ok(incoming);
            }
        }
    }

    fn incoming(&mut self, c: Complete) -> Option<Incoming> {
        let Complete {
            packet,
            attachments,
        } = c;
        match packet.kind {
            Kind::Connect => Some(Incoming::Connect {
                nsp: packet.nsp,
                auth: packet.data,
            }),
            Kind::Disconnect => {
                let i = self.joined.iter().position(|n| *n == packet.nsp)?;
                self.joined.swap_remove(i);
                Some(Incoming::Disconnect { nsp: packet.nsp })
            }
            Kind::Event | Kind::BinaryEvent => {
                if !self.joined(&packet.nsp) {
                    return None;
                }
                let Some(Value::Array(mut args)) = packet.data else {
                    return None;
                };
                let Value::String(name) = args.remove(0) else {
                    return None;
                };
                Some(Incoming::Event {
                    nsp: packet.nsp,
                    name,
                    args,
                    ack: packet.id,
                    attachments,
                })
            }
            // Acks of server-sent events: the gateway never asks for one.
            Kind::Ack | Kind::BinaryAck | Kind::ConnectError => None,
        }
    }

    /// Accept a namespace: `{"sid"[, "pid"]}`.
    pub fn accept(&mut self, nsp: &str, sid: &str, pid: Option<&str>) {
        let mut data = serde_json::json!({ "sid": sid });
        if let Some(pid) = pid {
            data["pid"] = pid.into();
        }
        let mut p = Packet::new(Kind::Connect, nsp);
        p.data = Some(data);
        self.send_packet(&p, Vec::new());
        if !self.joined(nsp) {
            self.joined.push(nsp.to_owned());
        }
        self.connect_by = None;
    }

    /// Refuse a namespace: `{"message"[, "data"]}` (the client's
    /// `connect_error` gets an Error with that message and data).
    pub fn refuse(&mut self, nsp: &str, message: &str, data: Option<Value>) {
        let mut body = serde_json::json!({ "message": message });
        if let Some(d) = data {
            body["data"] = d;
        }
        let mut p = Packet::new(Kind::ConnectError, nsp);
        p.data = Some(body);
        self.send_packet(&p, Vec::new());
    }

    /// Emit `event` with `args` (and binary attachments whose placeholders
    /// are in `args`).
    pub fn emit(&self, nsp: &str, event: &str, args: Vec<Value>, attachments: Vec<Bytes>) {
        let mut data = Vec::with_capacity(args.len() + 1);
        data.push(Value::String(event.to_owned()));
        data.extend(args);
        let kind = if attachments.is_empty() {
            Kind::Event
        } else {
            Kind::BinaryEvent
        };
        let mut p = Packet::new(kind, nsp);
        p.data = Some(Value::Array(data));
        p.attachments = attachments.len();
        self.send_packet(&p, attachments);
    }

    /// Answer the event that asked for ack `id`.
    pub fn ack(&self, nsp: &str, id: u64, args: Vec<Value>, attachments: Vec<Bytes>) {
        let kind = if attachments.is_empty() {
            Kind::Ack
        } else {
            Kind::BinaryAck
        };
        let mut p = Packet::new(kind, nsp);
        p.id = Some(id);
        p.data = Some(Value::Array(args));
        p.attachments = attachments.len();
        self.send_packet(&p, attachments);
    }

    /// Send Engine.IO packets already encoded (`42[...]`: the hot path,
    /// one shared buffer per event whatever the connections).
    pub fn send_encoded(&self, packets: impl IntoIterator<Item = axum::extract::ws::Utf8Bytes>) {
        self.engine.send_encoded(packets);
    }

    fn send_packet(&self, p: &Packet, attachments: Vec<Bytes>) {
        let text = std::iter::once(Payload::Text(p.encode()));
        self.engine
            .send(text.chain(attachments.into_iter().map(Payload::Binary)));
    }

    /// End the connection.
    pub fn close(&self) {
        self.engine.close();
    }
}
