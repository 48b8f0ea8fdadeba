//! An in-process fake Kubernetes API server for kube's real `Client`.
//!
//! No API server can be installed on the machines these tests run on, so
//! this stands in for one: it keeps objects, answers get, list, watch
//! (streamed JSON lines), create, replace, delete, JSON merge patch and
//! server-side apply (as "the applied object is the manager's whole intent":
//! labels, annotations and owner references merge; spec and data are
//! replaced; status only through the `/status` subresource), bumps
//! `resourceVersion` and `generation` like the real one, and emulates the
//! garbage collector (deleting an owner deletes what it owns). Server-side
//! apply tracks field ownership in `managedFields` (see `fields`): a field
//! the manager stops applying is removed, conflicts are 409 unless forced,
//! and a Deployment without `spec.replicas` is defaulted to 1 as the real
//! API server defaults it.
//!
//! Custom resources are admitted as the API server admits them, from the
//! shipped CRDs (see `admission`): pruning, schema defaults, OpenAPI
//! validation and the CRDs' CEL rules with a real CEL engine; a refused
//! write gets the API server's 422 `Invalid`.
//!
//! With [`FakeApi::with_rbac`] every request is authorized as the real API
//! server's RBAC authorizer would (see `rbac`), against the RBAC objects the
//! Helm chart renders; a denied request gets the API server's 403.
//! No controllers run: tests play the Deployment controller themselves where
//! they need pod readiness.
#![allow(dead_code)]

pub mod admission;
pub mod fields;
pub mod rbac;

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use serde_json::{Value, json};
use tokio::sync::broadcast;

#[allow(unused_imports)] // each test binary uses some of them
pub use rbac::{Attributes, Rbac, RenderedChart, User};

type Body = BoxBody<Bytes, Infallible>;
/// A list or watch: (user, verb, resource, labelSelector).
type ListRequest = (User, String, String, Option<String>);

#[derive(Clone, Debug)]
struct Ev {
    rv: u64,
    key: (String, String, String), // api, plural, namespace
    kind: &'static str,
    object: Value,
}

#[derive(Default)]
struct State {
    rv: u64,
    uid: u64,
    /// (api, plural, namespace, name) -> object
    objects: BTreeMap<(String, String, String, String), Value>,
    events: Vec<Ev>,
}

#[derive(Clone)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
    tx: broadcast::Sender<Ev>,
    rbac: Option<Arc<Rbac>>,
    crds: Arc<admission::Crds>,
    /// Every list and watch: (user, verb, resource, labelSelector).
    selectors: Arc<Mutex<Vec<ListRequest>>>,
    /// Every request a non-admin user made: (user, attributes, allowed).
    audit: Arc<Mutex<Vec<(String, Attributes, bool)>>>,
}

#[derive(Clone)]
struct Path {
    api: String,
    plural: String,
    namespace: Option<String>,
    name: Option<String>,
    sub: Option<String>,
}

fn parse_path(path: &str) -> Option<Path> {
    let (api, rest) = if let Some(r) = path.strip_prefix("/api/v1/") {
        ("v1".to_owned(), r)
    } else {
        let r = path.strip_prefix("/apis/")?;
        let mut it = r.splitn(3, '/');
        let (g, v, rest) = (it.next()?, it.next()?, it.next()?);
        (format!("{g}/{v}"), rest)
    };
    let parts: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    let (namespace, parts) = match parts.as_slice() {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest.to_vec()),
        _ => (None, parts),
    };
    Some(Path {
        api,
        plural: parts.first()?.to_string(),
        namespace,
        name: parts.get(1).map(|s| s.to_string()),
        sub: parts.get(2).map(|s| s.to_string()),
    })
}

/// An equality-based label selector (`k=v`, `k==v`, `k!=v`, `k`, `!k`,
/// comma-separated), as kube's watcher sends it.
#[derive(Clone, Default)]
pub struct LabelSelector(Vec<(String, Requirement)>);

#[derive(Clone)]
enum Requirement {
    Equals(String),
    NotEquals(String),
    Exists,
    Absent,
}

impl LabelSelector {
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut out = Vec::new();
        for term in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let requirement = if let Some((k, v)) = term.split_once("!=") {
                (k, Requirement::NotEquals(v.into()))
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                (k, Requirement::Equals(v.into()))
            } else if let Some(k) = term.strip_prefix('!') {
                (k, Requirement::Absent)
            } else if term.contains(' ') || term.contains('(') {
                return Err(format!(
                    "unable to parse requirement: {term:?} (set-based selectors are not modelled)"
                ));
            } else {
                (term, Requirement::Exists)
            };
            out.push((requirement.0.trim().to_owned(), requirement.1));
        }
        Ok(Self(out))
    }

    pub fn matches(&self, obj: &Value) -> bool {
        let labels = &obj["metadata"]["labels"];
        self.0.iter().all(|(k, r)| {
            let v = labels.get(k).and_then(Value::as_str);
            match r {
                Requirement::Equals(want) => v == Some(want.as_str()),
                Requirement::NotEquals(want) => v != Some(want.as_str()),
                Requirement::Exists => v.is_some(),
                Requirement::Absent => v.is_none(),
            }
        })
    }
}

fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

fn status(code: u16, reason: &str, message: String) -> Response<Body> {
    json_response(
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": message, "reason": reason, "code": code}),
    )
}

fn json_response(code: StatusCode, v: Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(v.to_string())).boxed())
        .unwrap()
}

fn now() -> String {
    time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

/// The API server's defaulting, where a test depends on it.
fn set_defaults(api: &str, plural: &str, obj: &mut Value) {
    if api == "apps/v1" && plural == "deployments" && obj["spec"].get("replicas").is_none() {
        obj["spec"]["replicas"] = json!(1);
    }
}

/// Keep `new`'s managedFields in step with `owners`, leaving them (and
/// their timestamps) untouched when ownership did not change, as the API
/// server does for a no-op write.
fn store_owners(old: Option<&Value>, new: &mut Value, owners: &fields::Owners) {
    let unchanged = old.is_some_and(|o| fields::Owners::of(o) == *owners);
    match old {
        Some(o) if unchanged => {
            new["metadata"]["managedFields"] = o["metadata"]["managedFields"].clone();
        }
        _ => {
            let api_version = new["apiVersion"].clone();
            owners.store(new, &api_version, &now());
        }
    }
}

impl FakeApi {
    pub fn new() -> Self {
        Self {
            state: Arc::default(),
            tx: broadcast::channel(4096).0,
            rbac: None,
            crds: admission::Crds::shipped(),
            selectors: Arc::default(),
            audit: Arc::default(),
        }
    }

    /// A fake that authorizes every request with `rbac`.
    pub fn with_rbac(rbac: Rbac) -> Self {
        Self {
            rbac: Some(Arc::new(rbac)),
            ..Self::new()
        }
    }

    /// A kube `Client` of the cluster admin (test setup).
    pub fn client(&self) -> kube::Client {
        self.client_as(User::Admin)
    }

    /// A kube `Client` that sends its requests as `user`.
    pub fn client_as(&self, user: User) -> kube::Client {
        let api = self.clone();
        let svc = tower::service_fn(move |req: Request<kube::client::Body>| {
            let (api, user) = (api.clone(), user.clone());
            async move { Ok::<_, Infallible>(api.handle(req, &user).await) }
        });
        kube::Client::new(svc, "default")
    }

    /// The bearer token that identifies `user` to [`FakeApi::serve`].
    pub fn token(user: &User) -> String {
        match user {
            User::Admin => "admin".into(),
            User::ServiceAccount { namespace, name } => format!("sa.{namespace}.{name}"),
        }
    }

    fn user_of_token(token: &str) -> Option<User> {
        if token == "admin" {
            return Some(User::Admin);
        }
        let rest = token.strip_prefix("sa.")?;
        let (namespace, name) = rest.split_once('.')?;
        Some(User::ServiceAccount {
            namespace: namespace.into(),
            name: name.into(),
        })
    }

    /// Requests denied so far: (user, attributes).
    pub fn denied(&self) -> Vec<(String, Attributes)> {
        let audit = self.audit.lock().unwrap();
        audit
            .iter()
            .filter(|(_, _, ok)| !ok)
            .map(|(u, a, _)| (u.clone(), a.clone()))
            .collect()
    }

    /// (verb, group, resource) of every authorized request a non-admin made.
    pub fn used(&self) -> BTreeSet<(String, String, String)> {
        let audit = self.audit.lock().unwrap();
        audit
            .iter()
            .filter(|(_, _, ok)| *ok)
            .map(|(_, a, _)| (a.verb.clone(), a.group.clone(), a.resource.clone()))
            .collect()
    }

    /// (verb, resource, labelSelector) of every list and watch `user` made.
    pub fn list_selectors(&self, user: &User) -> Vec<(String, String, Option<String>)> {
        let log = self.selectors.lock().unwrap();
        log.iter()
            .filter(|(u, ..)| u == user)
            .map(|(_, v, r, l)| (v.clone(), r.clone(), l.clone()))
            .collect()
    }

    /// How many authorized requests non-admins made with `verb` on `resource`.
    pub fn requests(&self, verb: &str, resource: &str) -> usize {
        let audit = self.audit.lock().unwrap();
        audit
            .iter()
            .filter(|(_, a, ok)| *ok && a.verb == verb && a.resource == resource)
            .count()
    }

    /// Authorize one request: `Some` is the API server's 403 answer.
    fn forbidden(&self, user: &User, a: Attributes) -> Option<Response<Body>> {
        let Some(rbac) = &self.rbac else {
            return None;
        };
        if *user == User::Admin {
            return None;
        }
        let ok = rbac.allows(user, &a);
        self.audit
            .lock()
            .unwrap()
            .push((user.username(), a.clone(), ok));
        if ok {
            return None;
        }
        let qualified = if a.group.is_empty() {
            a.resource.clone()
        } else {
            format!("{}.{}", a.resource, a.group)
        };
        let object = a
            .name
            .as_ref()
            .map(|n| format!("{qualified} \"{n}\""))
            .unwrap_or(qualified);
        let scope = if a.namespace.is_empty() {
            "at the cluster scope".to_owned()
        } else {
            format!("in the namespace \"{}\"", a.namespace)
        };
        Some(status(
            403,
            "Forbidden",
            format!(
                "{object} is forbidden: User \"{}\" cannot {} resource \"{}\" in API group \"{}\" {scope}",
                user.username(),
                a.verb,
                a.resource,
                a.group
            ),
        ))
    }

    fn emit(
        &self,
        st: &mut State,
        kind: &'static str,
        key: &(String, String, String, String),
        object: Value,
    ) {
        let ev = Ev {
            rv: st.rv,
            key: (key.0.clone(), key.1.clone(), key.2.clone()),
            kind,
            object,
        };
        st.events.push(ev.clone());
        let _ = self.tx.send(ev);
    }

    /// Serve this fake over HTTP on a loopback port, for a real process (the
    /// operator binary, with a kubeconfig naming this address).
    pub async fn serve(&self) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let api = self.clone();
        let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
            let api = api.clone();
            async move {
                let (parts, body) = req.into_parts();
                let user = parts
                    .headers
                    .get(http::header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .and_then(FakeApi::user_of_token);
                let Some(user) = user else {
                    let (parts, body) =
                        status(401, "Unauthorized", "Unauthorized".into()).into_parts();
                    return axum::response::Response::from_parts(
                        parts,
                        axum::body::Body::new(body),
                    );
                };
                let bytes = axum::body::to_bytes(body, 16 << 20)
                    .await
                    .unwrap_or_default();
                let req = Request::from_parts(parts, kube::client::Body::from(bytes.to_vec()));
                let (parts, body) = api.handle(req, &user).await.into_parts();
                axum::response::Response::from_parts(parts, axum::body::Body::new(body))
            }
        });
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    }

    /// Read an object directly (test assertions).
    pub fn get(&self, api: &str, plural: &str, ns: &str, name: &str) -> Option<Value> {
        let st = self.state.lock().unwrap();
        st.objects
            .get(&(api.into(), plural.into(), ns.into(), name.into()))
            .cloned()
    }

    /// Every version an object went through: (resourceVersion, event type,
    /// object), oldest first.
    pub fn history(
        &self,
        api: &str,
        plural: &str,
        ns: &str,
        name: &str,
    ) -> Vec<(u64, &'static str, Value)> {
        let st = self.state.lock().unwrap();
        st.events
            .iter()
            .filter(|e| {
                e.key.0 == api
                    && e.key.1 == plural
                    && e.key.2 == ns
                    && e.object["metadata"]["name"] == name
            })
            .map(|e| (e.rv, e.kind, e.object.clone()))
            .collect()
    }

    /// Every stored object of a kind, in every namespace.
    pub fn list(&self, api: &str, plural: &str) -> Vec<Value> {
        let st = self.state.lock().unwrap();
        st.objects
            .iter()
            .filter(|(k, _)| k.0 == api && k.1 == plural)
            .map(|(_, v)| v.clone())
            .collect()
    }

    pub fn count(&self, api: &str, plural: &str) -> usize {
        let st = self.state.lock().unwrap();
        st.objects
            .keys()
            .filter(|k| k.0 == api && k.1 == plural)
            .count()
    }

    /// The API server's admission of a write: defaulting, then for custom
    /// resources pruning, schema validation and CEL rules (see `admission`).
    fn admit(&self, p: &Path, name: &str, obj: &mut Value) -> Result<(), Box<Response<Body>>> {
        set_defaults(&p.api, &p.plural, obj);
        self.crds.admit(&p.api, &p.plural, obj).map_err(|causes| {
            let kind = self
                .crds
                .qualified_kind(&p.api, &p.plural)
                .unwrap_or_else(|| p.plural.clone());
            let each: Vec<String> = causes
                .iter()
                .map(|c| format!("{}: {}", c.field, c.message))
                .collect();
            let message = match each.as_slice() {
                [one] => format!("{kind} \"{name}\" is invalid: {one}"),
                many => format!("{kind} \"{name}\" is invalid: [{}]", many.join(", ")),
            };
            let causes: Vec<Value> = causes
                .iter()
                .map(|c| json!({"reason": "FieldValueInvalid", "message": c.message, "field": c.field}))
                .collect();
            Box::new(json_response(
                StatusCode::UNPROCESSABLE_ENTITY,
                json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                       "message": message, "reason": "Invalid",
                       "details": {"name": name, "kind": p.plural, "causes": causes}, "code": 422}),
            ))
        })
    }

    fn write(
        &self,
        st: &mut State,
        key: (String, String, String, String),
        mut obj: Value,
        created: bool,
    ) -> Value {
        st.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(st.rv.to_string());
        st.objects.insert(key.clone(), obj.clone());
        self.emit(
            st,
            if created { "ADDED" } else { "MODIFIED" },
            &key,
            obj.clone(),
        );
        obj
    }

    fn create(
        &self,
        st: &mut State,
        key: (String, String, String, String),
        mut obj: Value,
    ) -> Value {
        st.uid += 1;
        let m = &mut obj["metadata"];
        m["uid"] = json!(format!("uid-{}", st.uid));
        m["generation"] = json!(1);
        m["creationTimestamp"] = json!(now());
        m["name"] = json!(key.3);
        if !key.2.is_empty() {
            m["namespace"] = json!(key.2);
        }
        self.write(st, key, obj, true)
    }

    /// Store an updated object; bumps `generation` when anything outside
    /// metadata and status changed; a no-op writes nothing.
    fn update(
        &self,
        st: &mut State,
        key: (String, String, String, String),
        old: &Value,
        mut new: Value,
    ) -> Value {
        let strip = |v: &Value| {
            let mut v = v.clone();
            if let Some(m) = v.as_object_mut() {
                m.remove("metadata");
                m.remove("status");
            }
            v
        };
        let mut generation = old["metadata"]["generation"].as_i64().unwrap_or(1);
        if strip(old) != strip(&new) {
            generation += 1;
        }
        new["metadata"]["generation"] = json!(generation);
        new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
        if &new == old {
            return new;
        }
        self.write(st, key, new, false)
    }

    fn delete(&self, st: &mut State, key: (String, String, String, String)) -> Option<Value> {
        let obj = st.objects.remove(&key)?;
        st.rv += 1;
        self.emit(st, "DELETED", &key, obj.clone());
        // The garbage collector: owned objects go with their owner.
        let uid = obj["metadata"]["uid"].clone();
        let owned: Vec<_> = st
            .objects
            .iter()
            .filter(|(_, o)| {
                o["metadata"]["ownerReferences"]
                    .as_array()
                    .is_some_and(|refs| refs.iter().any(|r| r["uid"] == uid))
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in owned {
            self.delete(st, k);
        }
        Some(obj)
    }

    async fn handle(&self, req: Request<kube::client::Body>, user: &User) -> Response<Body> {
        let (parts, body) = req.into_parts();
        let bytes = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let query: BTreeMap<String, String> =
            form_urlencoded::parse(parts.uri.query().unwrap_or_default().as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect();
        let Some(p) = parse_path(parts.uri.path()) else {
            return status(404, "NotFound", format!("no route {}", parts.uri.path()));
        };
        let ns = p.namespace.clone().unwrap_or_default();
        let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        let content_type = parts
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let watching = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
        let verb = match (&parts.method, p.name.is_some()) {
            (&Method::GET, _) if watching => "watch",
            (&Method::GET, true) => "get",
            (&Method::GET, false) => "list",
            (&Method::POST, _) => "create",
            (&Method::PUT, _) => "update",
            (&Method::PATCH, _) => "patch",
            (&Method::DELETE, true) => "delete",
            (&Method::DELETE, false) => "deletecollection",
            _ => "unknown",
        };
        // A list or watch of one object (fieldSelector=metadata.name=...)
        // names it, as the API server's request info does.
        let selected = query
            .get("fieldSelector")
            .and_then(|f| f.strip_prefix("metadata.name=").map(str::to_owned));
        if p.api.starts_with("switchboard.dev/") && !self.crds.serves(&p.api, &p.plural) {
            return status(
                404,
                "NotFound",
                format!(
                    "the server could not find the requested resource ({})",
                    p.plural
                ),
            );
        }
        let attributes = Attributes {
            verb: verb.into(),
            group: p.api.split_once('/').map_or("", |(g, _)| g).to_owned(),
            resource: match &p.sub {
                Some(sub) => format!("{}/{sub}", p.plural),
                None => p.plural.clone(),
            },
            namespace: ns.clone(),
            name: p.name.clone().or(selected),
        };
        if let Some(denied) = self.forbidden(user, attributes.clone()) {
            return denied;
        }
        let manager = query.get("fieldManager").cloned().unwrap_or_else(|| {
            parts
                .headers
                .get(http::header::USER_AGENT)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split('/').next())
                .unwrap_or("unknown")
                .to_owned()
        });
        let force = query.get("force").map(String::as_str) == Some("true");

        if parts.method == Method::GET && p.name.is_none() {
            let labels = match query.get("labelSelector").map(|l| LabelSelector::parse(l)) {
                None => LabelSelector::default(),
                Some(Ok(l)) => l,
                Some(Err(e)) => return status(400, "BadRequest", e),
            };
            self.selectors.lock().unwrap().push((
                user.clone(),
                verb.to_owned(),
                p.plural.clone(),
                query.get("labelSelector").cloned(),
            ));
            if watching {
                let from: u64 = query
                    .get("resourceVersion")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                return self.watch(p, from, labels);
            }
            let st = self.state.lock().unwrap();
            let items: Vec<Value> = st
                .objects
                .iter()
                .filter(|(k, v)| {
                    k.0 == p.api
                        && k.1 == p.plural
                        && (p.namespace.is_none() || k.2 == ns)
                        && labels.matches(v)
                })
                .map(|(_, v)| v.clone())
                .collect();
            return json_response(
                StatusCode::OK,
                json!({"apiVersion": p.api, "kind": "List", "metadata": {"resourceVersion": st.rv.to_string()}, "items": items}),
            );
        }
        let Some(name) = p.name.clone() else {
            if parts.method == Method::POST {
                let name = body["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                let name = if name.is_empty() {
                    format!(
                        "{}{}",
                        body["metadata"]["generateName"].as_str().unwrap_or("obj-"),
                        self.state.lock().unwrap().rv + 1
                    )
                } else {
                    name
                };
                let mut body = body;
                if let Err(refused) = self.admit(&p, &name, &mut body) {
                    return *refused;
                }
                let mut owners = fields::Owners::default();
                owners.record_update(&manager, &json!({}), &body);
                store_owners(None, &mut body, &owners);
                let key = (p.api, p.plural, ns, name.clone());
                let mut st = self.state.lock().unwrap();
                if st.objects.contains_key(&key) {
                    return status(409, "AlreadyExists", format!("{name} already exists"));
                }
                let obj = self.create(&mut st, key, body);
                return json_response(StatusCode::CREATED, obj);
            }
            return status(405, "MethodNotAllowed", "unsupported".into());
        };
        let key = (p.api.clone(), p.plural.clone(), ns.clone(), name.clone());
        let mut st = self.state.lock().unwrap();
        let existing = st.objects.get(&key).cloned();
        match (parts.method.clone(), existing) {
            (Method::GET, Some(o)) => json_response(StatusCode::OK, o),
            (Method::GET, None) | (Method::DELETE, None) => {
                status(404, "NotFound", format!("{} {name} not found", p.plural))
            }
            (Method::DELETE, Some(_)) => {
                let obj = self.delete(&mut st, key).unwrap_or_default();
                json_response(StatusCode::OK, obj)
            }
            (Method::PUT, Some(old)) => {
                let want = body["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap_or_default();
                if !want.is_empty() && old["metadata"]["resourceVersion"].as_str() != Some(want) {
                    return status(409, "Conflict", "the object has been modified".into());
                }
                let mut new = body;
                for f in ["uid", "creationTimestamp"] {
                    new["metadata"][f] = old["metadata"][f].clone();
                }
                if let Err(refused) = self.admit(&p, &name, &mut new) {
                    return *refused;
                }
                let mut owners = fields::Owners::of(&old);
                owners.record_update(&manager, &old, &new);
                store_owners(Some(&old), &mut new, &owners);
                json_response(StatusCode::OK, self.update(&mut st, key, &old, new))
            }
            (Method::PUT, None) => status(404, "NotFound", format!("{name} not found")),
            (Method::PATCH, existing) => {
                let is_status = p.sub.as_deref() == Some("status");
                match (content_type.contains("apply-patch"), existing) {
                    (_, None) if is_status => status(404, "NotFound", format!("{name} not found")),
                    (true, None) => {
                        // An apply that creates is authorized as create too.
                        let create = Attributes {
                            verb: "create".into(),
                            ..attributes
                        };
                        if let Some(denied) = self.forbidden(user, create) {
                            return denied;
                        }
                        let mut owners = fields::Owners::default();
                        let Ok(mut obj) = owners.apply(&manager, &json!({}), &body, force) else {
                            return status(409, "Conflict", "apply conflict".into());
                        };
                        for f in ["apiVersion", "kind"] {
                            obj[f] = body[f].clone();
                        }
                        if let Err(refused) = self.admit(&p, &name, &mut obj) {
                            return *refused;
                        }
                        store_owners(None, &mut obj, &owners);
                        json_response(StatusCode::CREATED, self.create(&mut st, key, obj))
                    }
                    (false, None) => status(404, "NotFound", format!("{name} not found")),
                    (apply, Some(old)) => {
                        let mut new = old.clone();
                        if is_status {
                            merge(&mut new["status"], &body["status"]);
                            if apply {
                                new["status"] = body["status"].clone();
                            }
                            if let Err(refused) = self.admit(&p, &name, &mut new) {
                                return *refused;
                            }
                        } else if apply {
                            let mut owners = fields::Owners::of(&old);
                            match owners.apply(&manager, &old, &body, force) {
                                Ok(applied) => new = applied,
                                Err(conflicts) => {
                                    let list: Vec<String> = conflicts
                                        .iter()
                                        .map(|(m, p)| {
                                            format!("conflict with \"{m}\": .{}", p.join("."))
                                        })
                                        .collect();
                                    return status(
                                        409,
                                        "Conflict",
                                        format!(
                                            "Apply failed with {} conflict(s): {}",
                                            list.len(),
                                            list.join(", ")
                                        ),
                                    );
                                }
                            }
                            if let Err(refused) = self.admit(&p, &name, &mut new) {
                                return *refused;
                            }
                            store_owners(Some(&old), &mut new, &owners);
                        } else {
                            merge(&mut new, &body);
                            if let Err(refused) = self.admit(&p, &name, &mut new) {
                                return *refused;
                            }
                            let mut owners = fields::Owners::of(&old);
                            owners.record_update(&manager, &old, &new);
                            store_owners(Some(&old), &mut new, &owners);
                        }
                        json_response(StatusCode::OK, self.update(&mut st, key, &old, new))
                    }
                }
            }
            _ => status(405, "MethodNotAllowed", "unsupported".into()),
        }
    }

    /// A watch stream. With a label selector, only events of objects that
    /// match are sent (an object that stops matching is not announced as
    /// deleted, as the real API server would: the operator never relabels).
    fn watch(&self, p: Path, from: u64, labels: LabelSelector) -> Response<Body> {
        let matches = move |ev: &Ev| {
            ev.key.0 == p.api
                && ev.key.1 == p.plural
                && p.namespace.as_ref().is_none_or(|n| &ev.key.2 == n)
                && labels.matches(&ev.object)
        };
        let rx = self.tx.subscribe();
        let backlog: Vec<Ev> = {
            let st = self.state.lock().unwrap();
            st.events
                .iter()
                .filter(|e| e.rv > from && matches(e))
                .cloned()
                .collect()
        };
        let last = backlog.last().map_or(from, |e| e.rv);
        let line = |e: &Ev| {
            let mut s = json!({"type": e.kind, "object": e.object}).to_string();
            s.push('\n');
            Ok::<_, Infallible>(http_body::Frame::data(Bytes::from(s)))
        };
        let initial = futures_util::stream::iter(backlog.iter().map(line).collect::<Vec<_>>());
        let live = futures_util::stream::unfold((rx, last), move |(mut rx, last)| {
            let matches = matches.clone();
            async move {
                loop {
                    match rx.recv().await {
                        Ok(e) if e.rv > last && matches(&e) => {
                            let rv = e.rv;
                            return Some((line(&e), (rx, rv)));
                        }
                        Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(broadcast::error::RecvError::Closed) => return None,
                    }
                }
            }
        });
        use futures_util::StreamExt;
        let stream = initial.chain(live);
        Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .body(BodyExt::boxed(StreamBody::new(stream)))
            .unwrap()
    }
}
