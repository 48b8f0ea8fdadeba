//! The gateway configuration file.

use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::FormatError;

/// Everything a gateway process needs to know, besides the policy bundle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields, rename_all = "snake_case")]
pub struct GatewayConfig {
    /// Address clients connect to, `host:port`: WebSocket, SSE, long-poll,
    /// publish and the seed health answer (`/api/realtime/health/`).
    pub listen: String,
    /// Address of the admin listener, `host:port`: `/metrics`, `/healthz`,
    /// `/readyz`. Kept off the client port so that whoever reaches the load
    /// balancer cannot read metrics. `null` turns it off.
    pub admin_listen: Option<String>,
    /// Connections the kernel completes and queues for the client listener
    /// while the gateway is busy accepting others (the `listen(2)` backlog;
    /// Linux caps it at `net.core.somaxconn`, 4096 by default). When a
    /// reconnect storm overflows this queue, the kernel drops handshakes
    /// and the clients retry only after a second or more; 1-65535.
    pub listen_backlog: u32,
    /// Region this gateway runs in; stamped on events published through it.
    pub region: String,
    /// Origins allowed for browsers (CORS and the WebSocket `Origin` check).
    /// `"*"` allows every origin. Requests without an `Origin` header
    /// (services, CLIs) are always allowed.
    pub allowed_origins: Vec<String>,
    /// How clients' tokens are verified.
    pub auth: AuthConfig,
    /// Limits for every tenant (a tenant's policy may lower them).
    pub limits: Limits,
    /// WebSocket pings, idle timeout, SSE keep-alives.
    pub heartbeat: HeartbeatConfig,
    /// How events are written to WebSocket connections.
    pub websocket: WebSocketConfig,
    /// Presence across gateways (cluster mode).
    pub presence: PresenceConfig,
    /// The Socket.IO endpoint (`/socket.io/`, Engine.IO v4 / Socket.IO v5).
    pub socketio: SocketIoConfig,
    /// The live console page (`/console/`).
    pub console: ConsoleConfig,
    /// Connect-rate limits and load shedding.
    pub overload: OverloadConfig,
    /// How long and how much history is kept.
    pub history: HistoryConfig,
    /// Erasure by data subject, per-event retention and the audit trail.
    pub data_protection: DataProtectionConfig,
    /// Seconds over which connections are told to reconnect on shutdown.
    pub drain_seconds: u64,
    /// The policy bundle file; without one every tenant may use every topic.
    pub policy_file: Option<PathBuf>,
    /// How often the policy file is checked for changes, in seconds.
    pub policy_reload_seconds: u64,
    /// Log lines as text or JSON.
    pub log_format: LogFormat,
    /// Cluster mode: NATS/JetStream. Without it the gateway runs alone with
    /// an in-memory bus and history (the embedded mode).
    pub nats: Option<NatsConfig>,
    /// OpenTelemetry traces.
    pub telemetry: TelemetryConfig,
}

/// Traces (OpenTelemetry over OTLP) and metric labels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields, rename_all = "snake_case")]
pub struct TelemetryConfig {
    /// OTLP endpoint (`http://collector:4317` for gRPC, `http://collector:4318`
    /// for HTTP). Unset: `OTEL_EXPORTER_OTLP_ENDPOINT`, and without it no
    /// traces are exported.
    pub otlp_endpoint: Option<String>,
    /// How spans reach the collector.
    pub otlp_protocol: OtlpProtocol,
    /// Extra headers sent with every export (e.g. an API key).
    pub otlp_headers: std::collections::BTreeMap<String, String>,
    /// Fraction of new traces sampled (0-1); a caller's sampled `traceparent`
    /// is always followed. `OTEL_TRACES_SAMPLER_ARG` overrides it.
    pub sampling_ratio: f64,
    /// `service.name`; `OTEL_SERVICE_NAME` overrides it.
    pub service_name: String,
    /// Extra resource attributes (`OTEL_RESOURCE_ATTRIBUTES` adds to them).
    pub resource: std::collections::BTreeMap<String, String>,
    /// Put tenant names in span attributes and per-tenant metrics.
    pub tenant_labels: bool,
    /// At most this many tenants get their own metric label; the rest are `other`.
    pub tenant_label_cap: usize,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            otlp_protocol: OtlpProtocol::Grpc,
            otlp_headers: Default::default(),
            sampling_ratio: 0.1,
            service_name: "switchboard-gateway".into(),
            resource: Default::default(),
            tenant_labels: false,
            tenant_label_cap: 100,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
/// The OTLP transport.
pub enum OtlpProtocol {
    #[default]
    /// OTLP over gRPC (port 4317 by convention).
    Grpc,
    /// OTLP over HTTP with protobuf bodies (port 4318 by convention).
    HttpProtobuf,
}

/// How to reach NATS, and how this region's history stream is laid out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields, rename_all = "snake_case")]
pub struct NatsConfig {
    /// Server URLs of this region's NATS cluster (`nats://host:4222`, `tls://…`).
    pub urls: Vec<String>,
    /// A `.creds` file (JWT + NKey seed).
    pub credentials_file: Option<PathBuf>,
    /// A file holding an NKey seed.
    pub nkey_seed_file: Option<PathBuf>,
    /// A file holding a token.
    pub token_file: Option<PathBuf>,
    /// User name, with `password_file`.
    pub user: Option<String>,
    /// A file holding the password for `user`.
    pub password_file: Option<PathBuf>,
    /// TLS to NATS.
    pub tls: Option<NatsTls>,
    /// JetStream domain, when the account uses one.
    pub jetstream_domain: Option<String>,
    /// Every region of the deployment (this one included): this region's
    /// history stream sources the events of the others.
    pub regions: Vec<String>,
    /// The NATS cluster the region's stream is placed in (the region's
    /// cluster name in a supercluster); unset lets JetStream choose.
    pub placement_cluster: Option<String>,
    /// Replicas of the region's stream (3 in production clusters).
    pub stream_replicas: usize,
    /// First token of every subject Switchboard uses.
    pub subject_prefix: String,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            urls: vec!["nats://127.0.0.1:4222".into()],
            credentials_file: None,
            nkey_seed_file: None,
            token_file: None,
            user: None,
            password_file: None,
            tls: None,
            jetstream_domain: None,
            regions: Vec::new(),
            placement_cluster: None,
            stream_replicas: 1,
            subject_prefix: "sb".into(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields, rename_all = "snake_case")]
/// TLS settings for the NATS connection.
pub struct NatsTls {
    /// CA bundle that signs the servers' certificates.
    pub ca_file: Option<PathBuf>,
    /// Client certificate (mutual TLS), with `key_file`.
    pub cert_file: Option<PathBuf>,
    /// The client certificate's private key.
    pub key_file: Option<PathBuf>,
    /// Require TLS even for `nats://` URLs.
    pub required: bool,
}

/// Where the admin listener binds unless configured otherwise.
pub const DEFAULT_ADMIN_LISTEN: &str = "0.0.0.0:9090";

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:8000".into(),
            admin_listen: Some(DEFAULT_ADMIN_LISTEN.into()),
            listen_backlog: 4096,
            region: "local".into(),
            allowed_origins: vec!["*".into()],
            auth: AuthConfig::default(),
            limits: Limits::default(),
            heartbeat: HeartbeatConfig::default(),
            websocket: WebSocketConfig::default(),
            presence: PresenceConfig::default(),
            socketio: SocketIoConfig::default(),
            console: ConsoleConfig::default(),
            overload: OverloadConfig::default(),
            history: HistoryConfig::default(),
            data_protection: DataProtectionConfig::default(),
            drain_seconds: 30,
            policy_file: None,
            policy_reload_seconds: 2,
            log_format: LogFormat::Text,
            nats: None,
            telemetry: TelemetryConfig::default(),
        }
    }
}

/// How tokens are verified.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields, rename_all = "snake_case")]
pub struct AuthConfig {
    /// Shared secret for HS256 tokens.
    pub hs256_secret: Option<String>,
    /// File holding the HS256 secret (e.g. a mounted Secret); wins over `hs256_secret`.
    pub hs256_secret_file: Option<PathBuf>,
    /// PEM public keys (RSA or EC P-256) for RS256/ES256 tokens.
    pub public_keys: Vec<PublicKeyConfig>,
    /// A JWKS document with RS256/ES256 keys, selected by `kid`.
    pub jwks_url: Option<String>,
    /// How long a fetched JWKS is trusted before it is fetched again.
    pub jwks_cache_seconds: Option<u64>,
    /// Required `iss`, when set.
    pub issuer: Option<String>,
    /// Accepted `aud` values, when set (any one must match).
    pub audiences: Vec<String>,
    /// Claim holding the tenant; `company_id` is the fallback. Default `tenant`.
    pub tenant_claim: Option<String>,
    /// Clock skew allowed on `exp`/`nbf`, in seconds. Default 30.
    pub leeway_seconds: Option<u64>,
}

impl AuthConfig {
    /// The claim that names the tenant (default `company_id`).
    pub fn tenant_claim(&self) -> &str {
        self.tenant_claim.as_deref().unwrap_or("tenant")
    }
    /// Clock skew tolerated on `exp` and `nbf`, in seconds.
    pub fn leeway(&self) -> u64 {
        self.leeway_seconds.unwrap_or(30)
    }
    /// How long fetched JWKS keys are kept, in seconds.
    pub fn jwks_cache(&self) -> u64 {
        self.jwks_cache_seconds.unwrap_or(300)
    }
    /// True when no verification key of any kind is configured.
    pub fn has_no_keys(&self) -> bool {
        self.hs256_secret.is_none()
            && self.hs256_secret_file.is_none()
            && self.public_keys.is_empty()
            && self.jwks_url.is_none()
    }
}

/// One PEM public key, inline or from a file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct PublicKeyConfig {
    /// Key id matched against the token header's `kid`; without it the key is
    /// tried for tokens that carry no `kid`.
    #[serde(default)]
    pub kid: Option<String>,
    #[serde(default)]
    /// The key as PEM text.
    pub pem: Option<String>,
    #[serde(default)]
    /// A file holding the key as PEM.
    pub file: Option<PathBuf>,
}

/// Limits applied to every connection; a tenant's policy may lower or raise them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields, rename_all = "snake_case")]
pub struct Limits {
    /// Connections this process accepts before refusing new ones.
    pub max_connections: u64,
    /// Subscriptions one connection may hold.
    pub max_subscriptions_per_connection: u32,
    /// Largest client frame or published event, in bytes.
    pub max_message_bytes: u64,
    /// Messages a connection may send per minute (bursts up to a tenth of it).
    pub messages_per_minute: u32,
    /// Outbound frames queued for one connection before it counts as a slow consumer.
    pub outbound_queue: usize,
    /// Members listed per presence topic; above it, presence sends counts only.
    pub max_presence_members: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 100_000,
            max_subscriptions_per_connection: 50,
            max_message_bytes: 1024 * 1024,
            messages_per_minute: 6000,
            outbound_queue: 1024,
            max_presence_members: 100,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields, rename_all = "snake_case")]
/// Presence across gateways: every gateway announces itself on NATS every
/// `heartbeat_seconds`; one not heard for `timeout_seconds` is gone, and its
/// members leave everywhere.
pub struct PresenceConfig {
    /// Seconds between a gateway's presence heartbeats.
    pub heartbeat_seconds: u64,
    /// Seconds without a heartbeat after which a gateway's members leave.
    pub timeout_seconds: u64,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        Self {
            heartbeat_seconds: 5,
            timeout_seconds: 15,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields, rename_all = "snake_case")]
/// Protection against connection storms and saturation: new WebSocket and
/// SSE connections are refused (WebSocket close 1013, HTTP 429/503 with
/// `Retry-After`) rather than letting every open connection degrade.
pub struct OverloadConfig {
    /// New connections per second from one client address (0: no limit).
    /// Clients behind one NAT share an address: size it for the largest
    /// office, or leave it to the load balancer.
    pub connects_per_second_per_address: u32,
    /// New connections per second of one tenant (0: no limit). A tenant's
    /// storm then cannot take the connect capacity others need.
    pub connects_per_second_per_tenant: u32,
    /// The connect buckets hold this many seconds of their rate: the burst
    /// a quiet address or tenant may open at once.
    pub connect_burst_seconds: u32,
    /// New connections (and long-polls) are refused while the runtime's
    /// scheduling delay is above this many milliseconds (0: never shed).
    pub max_scheduler_lag_ms: u64,
    /// The `Retry-After` (seconds) answered to refused HTTP requests;
    /// refused clients are spread over one to two times it.
    pub retry_after_seconds: u64,
    /// A request header holding the client's address, set by the load
    /// balancer in front (`x-real-ip`, or the first `x-forwarded-for`
    /// entry). Unset: the TCP peer's address. Only set it behind a proxy
    /// that overwrites the header, or clients choose their own address.
    pub client_address_header: Option<String>,
}

impl Default for OverloadConfig {
    fn default() -> Self {
        Self {
            connects_per_second_per_address: 0,
            connects_per_second_per_tenant: 0,
            connect_burst_seconds: 2,
            max_scheduler_lag_ms: 1000,
            retry_after_seconds: 5,
            client_address_header: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields, rename_all = "snake_case")]
/// Data protection: who may erase a data subject's events, how long the
/// subject stays blocked afterwards, where the audit trail goes, and how
/// long a retention "day" is (see docs/data-protection.md).
pub struct DataProtectionConfig {
    /// The token scope that may call the erase API (besides `platform`).
    pub erase_scope: String,
    /// After an erasure, publishes for the subject are refused for this many
    /// seconds (0: not blocked; an erase request may ask for another period).
    pub block_seconds: u64,
    /// Append one JSON line per erasure to this file (who, when, which
    /// subject, counts; never the erased data). Audit records are also
    /// logged (target `switchboard::audit`) and, in cluster mode, kept in
    /// the erasure bucket.
    pub audit_file: Option<PathBuf>,
    /// Pause between two deletions of one erasure, in milliseconds: spreads
    /// a large erasure's load on JetStream (0: none).
    pub erase_pace_ms: u64,
    /// Seconds in one day of `gdpr_context.retention_days` and of the
    /// policy's `max_retention_days`: 86400. Lower it only in tests, to
    /// watch retention act in seconds.
    pub retention_day_seconds: u64,
}

impl Default for DataProtectionConfig {
    fn default() -> Self {
        Self {
            erase_scope: "erase".into(),
            block_seconds: 30 * 86400,
            audit_file: None,
            erase_pace_ms: 0,
            retention_day_seconds: 86400,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
/// When the console is served.
pub enum ConsoleMode {
    /// Only in development mode (no token keys configured).
    #[default]
    Development,
    /// Always (it holds no secret: it works with the token its user gives it).
    On,
    /// Never.
    Off,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields, rename_all = "snake_case")]
/// The live console: a page at `/console/` that connects with a token,
/// subscribes, shows events as they arrive, publishes test events and
/// shows presence, built on the JavaScript SDK (served with it).
pub struct ConsoleConfig {
    /// `development` (default: served only when no token keys are
    /// configured, where it can also mint development tokens), `on` or `off`.
    pub enabled: ConsoleMode,
}

impl ConsoleConfig {
    /// Whether the console is served, given whether the gateway runs in
    /// development mode (no keys configured).
    pub fn served(&self, development: bool) -> bool {
        match self.enabled {
            ConsoleMode::Development => development,
            ConsoleMode::On => true,
            ConsoleMode::Off => false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields, rename_all = "snake_case")]
/// The Socket.IO endpoint: seed 002's clients (`socket.io-client` 3.x/4.x).
/// The values are announced to clients in the Engine.IO handshake.
pub struct SocketIoConfig {
    /// Serve `/socket.io/`.
    pub enabled: bool,
    /// Milliseconds between server pings.
    pub ping_interval_ms: u64,
    /// Milliseconds a client has to answer a ping.
    pub ping_timeout_ms: u64,
    /// The largest message and polling request body, in bytes.
    pub max_payload: u64,
    /// Milliseconds a new connection has to join a namespace.
    pub connect_timeout_ms: u64,
    /// Seconds a disconnected client may come back and recover its rooms
    /// and missed events (Socket.IO's connection state recovery).
    pub recovery_seconds: u64,
}

impl Default for SocketIoConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            ping_interval_ms: 25_000,
            ping_timeout_ms: 20_000,
            max_payload: 1_000_000,
            connect_timeout_ms: 45_000,
            recovery_seconds: 120,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields, rename_all = "snake_case")]
/// Liveness checks of connections.
pub struct HeartbeatConfig {
    /// Seconds between server WebSocket pings.
    pub ping_interval_seconds: u64,
    /// Seconds without any frame from the client before it is closed.
    pub idle_timeout_seconds: u64,
    /// Seconds between SSE keep-alive comments.
    pub sse_keepalive_seconds: u64,
}

impl Default for HeartbeatConfig {
    fn default() -> Self {
        Self {
            ping_interval_seconds: 30,
            idle_timeout_seconds: 60,
            sse_keepalive_seconds: 15,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields, rename_all = "snake_case")]
/// How events are written to WebSocket connections (the native protocol).
pub struct WebSocketConfig {
    /// Milliseconds a connection holds its first unwritten event to gather
    /// the ones that follow into the same write (one syscall, one TCP
    /// segment). 0, the default, writes every event as soon as it arrives
    /// (events already queued still share a write). A delay trades latency
    /// (up to this much) for CPU per delivery when each connection receives
    /// tens of events a second; 0-1000.
    pub write_delay_ms: u64,
}

/// The most `websocket.write_delay_ms` may be.
pub const MAX_WRITE_DELAY_MS: u64 = 1000;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields, rename_all = "snake_case")]
/// History retention and deduplication.
pub struct HistoryConfig {
    /// How long events stay replayable, in seconds.
    pub retention_seconds: u64,
    /// Most events kept per tenant (oldest dropped first).
    pub max_events_per_tenant: usize,
    /// Window in which a repeated idempotency key is a duplicate, in seconds.
    pub dedup_window_seconds: u64,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        Self {
            retention_seconds: 24 * 3600,
            max_events_per_tenant: 10_000,
            dedup_window_seconds: 120,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
/// The format of log lines.
pub enum LogFormat {
    #[default]
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// What a region name must be, for people.
pub const REGION_RULE: &str = "use 1-64 characters of [A-Za-z0-9_-]";

/// Region names are NATS subject tokens, stream name parts and labels: one
/// rule for all of them (the gateway's own region, `nats.regions`, the
/// region a publish names, the `region` filter of a subscriber).
pub fn valid_region(r: &str) -> bool {
    !r.is_empty()
        && r.len() <= 64
        && r.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl GatewayConfig {
    /// Parse a YAML (or JSON) config file and check it.
    pub fn from_yaml(text: &str) -> Result<Self, FormatError> {
        let config: Self = crate::parse_yaml("gateway config", text)?;
        config.validate()?;
        Ok(config)
    }

    /// The configuration as YAML (what `from_yaml` reads back).
    pub fn to_yaml(&self) -> String {
        serde_saphyr::to_string(self).unwrap_or_default()
    }

    /// Every problem with the config, at once.
    pub fn validate(&self) -> Result<(), FormatError> {
        let mut problems = Vec::new();
        if !valid_region(&self.region) {
            problems.push(format!("region {:?}: {REGION_RULE}", self.region));
        }
        if self.data_protection.retention_day_seconds == 0 {
            problems.push("data_protection.retention_day_seconds must be at least 1".into());
        }
        if self.data_protection.erase_scope.is_empty()
            || self
                .data_protection
                .erase_scope
                .contains(char::is_whitespace)
        {
            problems.push(format!(
                "data_protection.erase_scope {:?} must be one word",
                self.data_protection.erase_scope
            ));
        }
        if let Some(url) = &self.auth.jwks_url {
            let host = url
                .strip_prefix("https://")
                .or_else(|| url.strip_prefix("http://"))
                .map(|rest| rest.split(['/', '?', '#']).next().unwrap_or_default());
            if host.is_none_or(|h| h.is_empty() || h.contains(char::is_whitespace)) {
                problems.push(format!(
                    "auth.jwks_url {url:?} must be an http:// or https:// URL with a host"
                ));
            }
        }
        if self.admin_listen.as_deref() == Some(self.listen.as_str()) {
            problems.push(format!(
                "admin_listen must differ from listen ({}): metrics stay off the client port",
                self.listen
            ));
        }
        if self.limits.max_subscriptions_per_connection == 0 {
            problems.push("limits.max_subscriptions_per_connection must be at least 1".into());
        }
        if self.limits.max_message_bytes < 1024 {
            problems.push("limits.max_message_bytes must be at least 1024".into());
        }
        if self.limits.messages_per_minute == 0 {
            problems.push("limits.messages_per_minute must be at least 1".into());
        }
        let sio = &self.socketio;
        if sio.ping_interval_ms == 0
            || sio.ping_timeout_ms == 0
            || sio.max_payload < 1024
            || sio.connect_timeout_ms == 0
        {
            problems.push(
                "socketio: ping_interval_ms, ping_timeout_ms and connect_timeout_ms must be non-zero, max_payload at least 1024"
                    .into(),
            );
        }
        if self.limits.outbound_queue == 0 {
            problems.push("limits.outbound_queue must be at least 1".into());
        }
        if self.presence.heartbeat_seconds == 0
            || self.presence.timeout_seconds < 2 * self.presence.heartbeat_seconds
            || self.presence.timeout_seconds > 3600
        {
            problems.push(
                "presence.timeout_seconds must be at least twice a non-zero heartbeat_seconds (and at most 3600)"
                    .into(),
            );
        }
        if self.heartbeat.ping_interval_seconds == 0
            || self.heartbeat.idle_timeout_seconds <= self.heartbeat.ping_interval_seconds
        {
            problems.push(
                "heartbeat.idle_timeout_seconds must exceed a non-zero ping_interval_seconds"
                    .into(),
            );
        }
        if self.heartbeat.idle_timeout_seconds > 7 * 24 * 3600
            || self.heartbeat.sse_keepalive_seconds == 0
            || self.heartbeat.sse_keepalive_seconds > 3600
            || self.drain_seconds > 24 * 3600
        {
            problems.push(
                "heartbeat.idle_timeout_seconds must be at most a week, sse_keepalive_seconds 1-3600, drain_seconds at most a day"
                    .into(),
            );
        }
        if self.websocket.write_delay_ms > MAX_WRITE_DELAY_MS {
            problems.push(format!(
                "websocket.write_delay_ms must be at most {MAX_WRITE_DELAY_MS}"
            ));
        }
        if self.listen_backlog == 0 || self.listen_backlog > 65_535 {
            problems.push("listen_backlog must be 1-65535".into());
        }
        if self.history.max_events_per_tenant == 0 {
            problems.push("history.max_events_per_tenant must be at least 1".into());
        }
        if !(0.0..=1.0).contains(&self.telemetry.sampling_ratio) {
            problems.push("telemetry.sampling_ratio must be between 0 and 1".into());
        }
        if let Some(nats) = &self.nats {
            let token = |t: &str| {
                !t.is_empty()
                    && t.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            };
            if nats.urls.is_empty() {
                problems.push("nats.urls needs at least one server URL".into());
            }
            if !token(&nats.subject_prefix) {
                problems.push("nats.subject_prefix must be one token of [A-Za-z0-9_-]".into());
            }
            if nats.stream_replicas == 0 || nats.stream_replicas > 5 {
                problems.push("nats.stream_replicas must be 1-5".into());
            }
            for r in &nats.regions {
                if !valid_region(r) {
                    problems.push(format!("nats.regions: {r:?}: {REGION_RULE}"));
                }
            }
            if !nats.regions.is_empty() && !nats.regions.contains(&self.region) {
                problems.push(format!(
                    "nats.regions must include this gateway's region {:?}",
                    self.region
                ));
            }
            if nats.user.is_some() != nats.password_file.is_some() {
                problems.push("nats.user and nats.password_file go together".into());
            }
        }
        for (i, key) in self.auth.public_keys.iter().enumerate() {
            if key.pem.is_some() == key.file.is_some() {
                problems.push(format!(
                    "auth.public_keys[{i}] needs exactly one of pem or file"
                ));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(FormatError::Invalid {
                what: "gateway config",
                problems,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_round_trip() {
        let c = GatewayConfig::from_yaml("").unwrap();
        assert_eq!(c, GatewayConfig::default());
        assert_eq!(c.limits.max_subscriptions_per_connection, 50);
        assert_eq!(c.limits.max_message_bytes, 1024 * 1024);
        let back = GatewayConfig::from_yaml(&c.to_yaml()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn typos_and_bad_values_are_named() {
        let err = GatewayConfig::from_yaml("lisen: 1.2.3.4:1\n").unwrap_err();
        assert!(err.to_string().contains("lisen"), "{err}");
        let err = GatewayConfig::from_yaml("region: 'eu west'\nlimits:\n  outbound_queue: 0\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("region") && err.contains("outbound_queue"),
            "{err}"
        );
        let err = GatewayConfig::from_yaml("websocket:\n  write_delay_ms: 1001\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("websocket.write_delay_ms"), "{err}");
        let ok = GatewayConfig::from_yaml("websocket:\n  write_delay_ms: 20\n").unwrap();
        assert_eq!(ok.websocket.write_delay_ms, 20);
        // A JWKS URL that cannot be fetched would refuse every token, and
        // would not be a key at all: it is named at load.
        for url in [
            "''",
            "id.example.com/jwks.json",
            "'https://'",
            "'ftp://id.example.com/k'",
        ] {
            let err = GatewayConfig::from_yaml(&format!("auth:\n  jwks_url: {url}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains("auth.jwks_url"), "{url}: {err}");
        }
        for url in [
            "https://id.example.com/.well-known/jwks.json",
            "http://keycloak.idp.svc:8080/realms/app/protocol/openid-connect/certs",
        ] {
            GatewayConfig::from_yaml(&format!("auth:\n  jwks_url: {url}\n")).unwrap();
        }
        for backlog in [0, 65_536] {
            let err = GatewayConfig::from_yaml(&format!("listen_backlog: {backlog}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains("listen_backlog must be 1-65535"), "{err}");
        }
    }
}
