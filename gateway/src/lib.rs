//! Switchboard gateway: a realtime gateway that fans events out to WebSocket,
//! SSE and long-poll clients, per tenant, with history and resume.
//!
//! Map of the crate:
//! - [`node`]: the front object of one process (admission, publish).
//! - [`hub`]: this process's subscriptions and the fan-out of an event.
//! - [`broker`]: the broker boundary (storage, dedup, routing); [`broker::memory`]
//!   is the embedded default.
//! - [`session`]: one subscriber's subscriptions and the replay/live seam.
//! - [`mailbox`]: a connection's bounded outbound queue.
//! - [`transport`]: WebSocket, SSE, long-poll and the publish API.
//! - [`auth`]: JWT verification (HS256, RS/ES PEM, JWKS).
//! - [`protocol`]: wire messages and close codes.
//! - [`event`]: stored events (serialized once) and cursors.
//! - [`policy`]: the hot-reloaded tenant policy.
//! - [`metrics`], [`server`], [`startup`].

pub mod auth;
pub mod broker;
pub mod cli;
pub mod data_protection;
pub mod erasure;
pub mod event;
pub mod fanout;
pub mod hub;
pub mod mailbox;
pub mod metrics;
pub mod node;
pub mod overload;
pub mod policy;
pub mod presence;
pub mod protocol;
pub mod server;
pub mod session;
pub mod startup;
pub mod telemetry;
pub mod transport;

pub use switchboard_config as config;
