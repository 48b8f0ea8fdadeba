//! Authorization as the API server's RBAC authorizer does it, from the
//! Roles, ClusterRoles and bindings the Helm chart renders (rendered by the
//! real Helm engine through `tests/chart/render.py`), never from a list the
//! operator keeps.
//!
//! Request attributes follow the API server's `RequestInfoFactory`: GET on a
//! collection is `list` (or `watch` with `watch=true`), GET on an object
//! `get`, POST `create`, PUT `update`, PATCH `patch`, DELETE `delete` (on a
//! collection `deletecollection`); a subresource is authorized as
//! `resource/subresource`; a server-side apply that creates the object is
//! authorized as `patch` and then as `create`.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

/// Who sends a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum User {
    /// Cluster admin (the test itself, setting up objects).
    Admin,
    /// `system:serviceaccount:<namespace>:<name>`.
    ServiceAccount { namespace: String, name: String },
}

impl User {
    pub fn username(&self) -> String {
        match self {
            User::Admin => "kubernetes-admin".into(),
            User::ServiceAccount { namespace, name } => {
                format!("system:serviceaccount:{namespace}:{name}")
            }
        }
    }
}

/// What a request asks to do.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Attributes {
    pub verb: String,
    pub group: String,
    /// `resource` or `resource/subresource`.
    pub resource: String,
    /// Empty for cluster-scoped requests.
    pub namespace: String,
    pub name: Option<String>,
}

#[derive(Clone, Debug)]
struct Rule {
    groups: Vec<String>,
    resources: Vec<String>,
    verbs: Vec<String>,
    names: Vec<String>,
}

impl Rule {
    fn parse(v: &Value) -> Vec<Rule> {
        let list = |v: &Value| -> Vec<String> {
            v.as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default()
        };
        v["rules"]
            .as_array()
            .map(|rules| {
                rules
                    .iter()
                    .map(|r| Rule {
                        groups: list(&r["apiGroups"]),
                        resources: list(&r["resources"]),
                        verbs: list(&r["verbs"]),
                        names: list(&r["resourceNames"]),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    fn allows(&self, a: &Attributes) -> bool {
        let any = |l: &[String], want: &str| l.iter().any(|x| x == "*" || x == want);
        let resource_ok = self.resources.iter().any(|r| {
            r == "*"
                || r == &a.resource
                || a.resource
                    .split_once('/')
                    .is_some_and(|(_, sub)| r == &format!("*/{sub}"))
        });
        any(&self.verbs, &a.verb)
            && any(&self.groups, &a.group)
            && resource_ok
            && (self.names.is_empty() || a.name.as_ref().is_some_and(|n| self.names.contains(n)))
    }
}

/// A binding of rules to subjects, in one namespace or cluster-wide.
#[derive(Clone, Debug)]
struct Grant {
    /// `None`: a ClusterRoleBinding (every namespace and cluster scope).
    namespace: Option<String>,
    subjects: Vec<String>,
    rules: Vec<Rule>,
}

/// The RBAC objects of a rendered chart.
#[derive(Clone, Debug, Default)]
pub struct Rbac {
    grants: Vec<Grant>,
}

impl Rbac {
    pub fn from_objects(docs: &[Value]) -> Self {
        let role = |kind: &str, name: &str, ns: Option<&str>| -> Vec<Rule> {
            docs.iter()
                .find(|d| {
                    d["kind"] == kind
                        && d["metadata"]["name"] == name
                        && (kind == "ClusterRole" || d["metadata"]["namespace"].as_str() == ns)
                })
                .map(Rule::parse)
                .unwrap_or_default()
        };
        let mut grants = Vec::new();
        for d in docs {
            let kind = d["kind"].as_str().unwrap_or_default();
            if kind != "RoleBinding" && kind != "ClusterRoleBinding" {
                continue;
            }
            let namespace = d["metadata"]["namespace"].as_str().map(str::to_owned);
            let namespace = if kind == "RoleBinding" {
                Some(namespace.expect("a RoleBinding has a namespace"))
            } else {
                None
            };
            let role_kind = d["roleRef"]["kind"].as_str().unwrap_or_default();
            let role_name = d["roleRef"]["name"].as_str().unwrap_or_default();
            // A ClusterRoleBinding can only reference a ClusterRole.
            if kind == "ClusterRoleBinding" && role_kind != "ClusterRole" {
                continue;
            }
            let rules = role(role_kind, role_name, namespace.as_deref());
            let subjects = d["subjects"]
                .as_array()
                .map(|s| {
                    s.iter()
                        .filter(|s| s["kind"] == "ServiceAccount")
                        .map(|s| {
                            User::ServiceAccount {
                                namespace: s["namespace"]
                                    .as_str()
                                    .or(namespace.as_deref())
                                    .unwrap_or_default()
                                    .into(),
                                name: s["name"].as_str().unwrap_or_default().into(),
                            }
                            .username()
                        })
                        .collect()
                })
                .unwrap_or_default();
            grants.push(Grant {
                namespace,
                subjects,
                rules,
            });
        }
        Self { grants }
    }

    pub fn allows(&self, user: &User, a: &Attributes) -> bool {
        if *user == User::Admin {
            return true;
        }
        let username = user.username();
        self.grants.iter().any(|g| {
            g.subjects.contains(&username)
                && g.namespace.as_ref().is_none_or(|ns| *ns == a.namespace)
                && g.rules.iter().any(|r| r.allows(a))
        })
    }
}

/// The chart, rendered by the real Helm engine.
pub struct RenderedChart {
    pub objects: Vec<Value>,
}

impl RenderedChart {
    /// `helm template` of `charts/switchboard` (release `sb`) in `namespace`
    /// with `values` merged over the defaults.
    pub fn render(namespace: &str, values: &Value) -> Self {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let python = std::env::var_os("SWITCHBOARD_TEST_PYTHON")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("tests/.work/venv/bin/python"));
        let out = Command::new(&python)
            .arg(root.join("tests/chart/render.py"))
            .args(["--namespace", namespace, "--set-json", &values.to_string()])
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "running {} (the test venv: ./tests/run.sh creates it, or set SWITCHBOARD_TEST_PYTHON): {e}",
                    python.display()
                )
            });
        assert!(
            out.status.success(),
            "rendering the chart failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self {
            objects: serde_json::from_slice(&out.stdout).expect("render.py prints JSON"),
        }
    }

    /// The operator Deployment's ServiceAccount.
    pub fn operator_account(&self) -> User {
        let deploy = self
            .objects
            .iter()
            .find(|d| d["kind"] == "Deployment" && d["metadata"]["name"] == "sb-operator")
            .expect("the chart renders the operator Deployment");
        User::ServiceAccount {
            namespace: deploy["metadata"]["namespace"]
                .as_str()
                .unwrap_or_default()
                .into(),
            name: deploy["spec"]["template"]["spec"]["serviceAccountName"]
                .as_str()
                .expect("the operator runs as a named ServiceAccount")
                .into(),
        }
    }

    /// The namespace the rendered operator is told to watch, if any.
    pub fn watch_namespace(&self) -> Option<String> {
        let deploy = self
            .objects
            .iter()
            .find(|d| d["kind"] == "Deployment" && d["metadata"]["name"] == "sb-operator")?;
        deploy["spec"]["template"]["spec"]["containers"][0]["env"]
            .as_array()?
            .iter()
            .find(|e| e["name"] == "SWITCHBOARD_WATCH_NAMESPACE")
            .and_then(|e| e["value"].as_str())
            .map(str::to_owned)
    }

    pub fn rbac(&self) -> Rbac {
        Rbac::from_objects(&self.objects)
    }
}
