//! Admission of custom resources the way the API server does it, from the
//! CRDs the project ships (`crds/switchboard.dev.yaml`, what users apply):
//!
//! 1. pruning: fields the structural schema does not declare are dropped
//!    (unless `x-kubernetes-preserve-unknown-fields`);
//! 2. defaulting from the schema's `default`s;
//! 3. OpenAPI schema validation (types, `pattern`, lengths, `enum`, bounds,
//!    `required`), with the maintained `jsonschema` crate on the schema
//!    translated as the API server reads it (`nullable`, int-or-string);
//! 4. every `x-kubernetes-validations` rule evaluated with a real CEL engine
//!    (the `cel` crate) wherever its field is present, `self` bound to it.
//!
//! A refused object gets the API server's 422 `Invalid` with one cause per
//! failure. Transition rules (`oldSelf`) are not modelled: a CRD using one
//! makes every admission fail loudly rather than pass silently.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Map, Value, json};

/// One refused field: the path (`spec.autoscaling`) and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Cause {
    pub field: String,
    pub message: String,
}

struct Kind {
    kind: String,
    group: String,
    schema: Value,
    validator: jsonschema::Validator,
}

/// The shipped CRDs, by (`group/version`, plural).
pub struct Crds {
    kinds: BTreeMap<(String, String), Kind>,
}

impl Crds {
    /// The CRDs in `crds/switchboard.dev.yaml`.
    pub fn shipped() -> Arc<Self> {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../crds/switchboard.dev.yaml");
        let text = std::fs::read_to_string(path).expect("crds/switchboard.dev.yaml");
        let mut kinds = BTreeMap::new();
        for doc in text.split("\n---").filter(|d| d.contains("kind:")) {
            let crd: Value = serde_saphyr::from_str(doc).expect("a CRD document");
            let group = crd["spec"]["group"].as_str().unwrap_or_default().to_owned();
            let plural = crd["spec"]["names"]["plural"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let kind = crd["spec"]["names"]["kind"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            for v in crd["spec"]["versions"].as_array().into_iter().flatten() {
                let schema = v["schema"]["openAPIV3Schema"].clone();
                let validator = jsonschema::draft4::new(&as_json_schema(&schema))
                    .expect("the CRD schema is a valid JSON schema");
                let version = v["name"].as_str().unwrap_or_default();
                kinds.insert(
                    (format!("{group}/{version}"), plural.clone()),
                    Kind {
                        kind: kind.clone(),
                        group: group.clone(),
                        schema,
                        validator,
                    },
                );
            }
        }
        assert!(!kinds.is_empty(), "no CRDs in {path}");
        Arc::new(Self { kinds })
    }

    /// Whether these CRDs define (`group/version`, plural).
    pub fn serves(&self, api: &str, plural: &str) -> bool {
        self.kinds
            .contains_key(&(api.to_owned(), plural.to_owned()))
    }

    /// `Kind.group` of a custom resource, for messages.
    pub fn qualified_kind(&self, api: &str, plural: &str) -> Option<String> {
        let k = self.kinds.get(&(api.to_owned(), plural.to_owned()))?;
        Some(format!("{}.{}", k.kind, k.group))
    }

    /// Prune, default and validate `obj` when it is one of these kinds;
    /// anything else passes untouched.
    pub fn admit(&self, api: &str, plural: &str, obj: &mut Value) -> Result<(), Vec<Cause>> {
        let Some(k) = self.kinds.get(&(api.to_owned(), plural.to_owned())) else {
            return Ok(());
        };
        if let Some(fields) = obj.as_object_mut() {
            for (name, value) in fields.iter_mut() {
                if matches!(name.as_str(), "apiVersion" | "kind" | "metadata") {
                    continue;
                }
                if let Some(s) = k.schema["properties"].get(name) {
                    prune(s, value);
                }
            }
            fields.retain(|name, _| {
                matches!(name.as_str(), "apiVersion" | "kind" | "metadata")
                    || k.schema["properties"].get(name).is_some()
            });
        }
        default(&k.schema, obj);
        let mut causes: Vec<Cause> = k
            .validator
            .iter_errors(obj)
            .map(|e| Cause {
                field: dotted(&e.instance_path().to_string()),
                message: e.to_string(),
            })
            .collect();
        // CEL runs on objects that pass the schema, as in the API server.
        if causes.is_empty() {
            rules(&k.schema, obj, "", &mut causes);
        }
        if causes.is_empty() {
            Ok(())
        } else {
            Err(causes)
        }
    }
}

/// `/spec/subscribe/0/pattern` → `spec.subscribe[0].pattern`.
fn dotted(pointer: &str) -> String {
    let mut out = String::new();
    for part in pointer.split('/').filter(|p| !p.is_empty()) {
        if part.chars().all(|c| c.is_ascii_digit()) {
            out.push_str(&format!("[{part}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(part);
        }
    }
    out
}

/// The CRD schema as a JSON schema: `nullable` becomes a null type,
/// int-or-string accepts both, the `x-kubernetes-*` keys go.
fn as_json_schema(schema: &Value) -> Value {
    match schema {
        Value::Object(m) => {
            let mut out = Map::new();
            for (k, v) in m {
                if k.starts_with("x-kubernetes-") || k == "nullable" {
                    continue;
                }
                let v = match k.as_str() {
                    "properties" | "definitions" => Value::Object(
                        v.as_object()
                            .into_iter()
                            .flatten()
                            .map(|(name, s)| (name.clone(), as_json_schema(s)))
                            .collect(),
                    ),
                    "default" | "enum" | "example" => v.clone(),
                    _ => as_json_schema(v),
                };
                out.insert(k.clone(), v);
            }
            if m.get("x-kubernetes-int-or-string") == Some(&json!(true)) {
                out.remove("type");
                out.insert("type".into(), json!(["integer", "string"]));
            }
            if m.get("nullable") == Some(&json!(true))
                && let Some(t) = out.get("type").and_then(Value::as_str)
            {
                let t = t.to_owned();
                out.insert("type".into(), json!([t, "null"]));
            }
            Value::Object(out)
        }
        Value::Array(a) => Value::Array(a.iter().map(as_json_schema).collect()),
        v => v.clone(),
    }
}

fn preserves_unknown(schema: &Value) -> bool {
    schema["x-kubernetes-preserve-unknown-fields"] == json!(true)
}

/// Drop what the structural schema does not declare.
fn prune(schema: &Value, value: &mut Value) {
    match value {
        Value::Object(fields) => {
            if let Some(props) = schema["properties"].as_object() {
                if !preserves_unknown(schema) {
                    fields.retain(|k, _| props.contains_key(k));
                }
                for (k, v) in fields.iter_mut() {
                    if let Some(s) = props.get(k) {
                        prune(s, v);
                    }
                }
            } else if schema["additionalProperties"].is_object() {
                for v in fields.values_mut() {
                    prune(&schema["additionalProperties"], v);
                }
            } else if !preserves_unknown(schema)
                && schema["type"] == json!("object")
                && schema["additionalProperties"].is_null()
            {
                fields.clear();
            }
        }
        Value::Array(items) => {
            for v in items {
                prune(&schema["items"], v);
            }
        }
        _ => {}
    }
}

/// Fill absent fields that declare a `default`, as the API server does.
fn default(schema: &Value, value: &mut Value) {
    match value {
        Value::Object(fields) => {
            if let Some(props) = schema["properties"].as_object() {
                for (k, s) in props {
                    if !fields.contains_key(k)
                        && let Some(d) = s.get("default")
                    {
                        fields.insert(k.clone(), d.clone());
                    }
                }
                for (k, v) in fields.iter_mut() {
                    if let Some(s) = props.get(k) {
                        default(s, v);
                    }
                }
            } else if schema["additionalProperties"].is_object() {
                for v in fields.values_mut() {
                    default(&schema["additionalProperties"], v);
                }
            }
        }
        Value::Array(items) => {
            for v in items {
                default(&schema["items"], v);
            }
        }
        _ => {}
    }
}

/// Evaluate every `x-kubernetes-validations` rule on the values present.
fn rules(schema: &Value, value: &Value, path: &str, causes: &mut Vec<Cause>) {
    if value.is_null() {
        return;
    }
    for rule in schema["x-kubernetes-validations"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let source = rule["rule"].as_str().unwrap_or_default();
        let failed = |why: String| Cause {
            field: path.to_owned(),
            message: format!("Invalid value: \"{}\": {why}", type_name(value)),
        };
        match evaluate(source, value) {
            Ok(true) => {}
            Ok(false) => causes.push(failed(
                rule["message"]
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| format!("failed rule: {source}")),
            )),
            Err(e) => causes.push(failed(format!("rule {source:?} cannot be evaluated: {e}"))),
        }
    }
    let join = |name: &str| {
        if path.is_empty() {
            name.to_owned()
        } else {
            format!("{path}.{name}")
        }
    };
    match value {
        Value::Object(fields) => {
            if let Some(props) = schema["properties"].as_object() {
                for (k, v) in fields {
                    if let Some(s) = props.get(k) {
                        rules(s, v, &join(k), causes);
                    }
                }
            } else if schema["additionalProperties"].is_object() {
                for (k, v) in fields {
                    rules(&schema["additionalProperties"], v, &join(k), causes);
                }
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                rules(&schema["items"], v, &format!("{path}[{i}]"), causes);
            }
        }
        _ => {}
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Object(_) => "object",
        Value::Array(_) => "array",
        Value::String(_) => "string",
        Value::Number(_) => "number",
        Value::Bool(_) => "boolean",
        Value::Null => "null",
    }
}

/// One CEL rule with `self` bound to `value`.
pub fn evaluate(source: &str, value: &Value) -> Result<bool, String> {
    if source.contains("oldSelf") {
        return Err("transition rules (oldSelf) are not modelled by the fake API".into());
    }
    let program = cel::Program::compile(source).map_err(|e| e.to_string())?;
    let mut context = cel::Context::default();
    let this = cel::to_value(value).map_err(|e| e.to_string())?;
    context.add_variable_from_value("self", this);
    match program.execute(&context).map_err(|e| e.to_string())? {
        cel::Value::Bool(b) => Ok(b),
        other => Err(format!("the rule returned {other:?}, not a bool")),
    }
}
