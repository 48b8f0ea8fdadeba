//! Server-side apply field ownership, as the API server tracks it in
//! `metadata.managedFields` (FieldsV1): each manager owns the leaf fields it
//! applied or changed; an apply removes the fields its manager stops
//! applying unless another manager also owns them; applying a value another
//! manager owns is a 409 Conflict unless forced, and a write that is not an
//! apply takes the fields it changes from everyone else.
//!
//! One simplification, named so it is not mistaken for the real thing:
//! lists are atomic (the real server merges lists with merge keys, such as
//! containers by name, item by item). The objects these tests write are
//! only ever applied whole by one manager, so the difference does not show.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value, json};

/// A field path: object keys from the root.
pub type FieldPath = Vec<String>;

/// Fields outside ownership: identity, bookkeeping and status.
fn tracked(path: &[String]) -> bool {
    !matches!(
        path.iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .as_slice(),
        ["apiVersion"]
            | ["kind"]
            | ["status", ..]
            | [
                "metadata",
                "name"
                    | "namespace"
                    | "uid"
                    | "resourceVersion"
                    | "generation"
                    | "creationTimestamp"
                    | "managedFields"
                    | "generateName"
            ]
    )
}

/// The leaf fields of an object: scalars, lists and empty objects.
pub fn leaves(v: &Value) -> BTreeSet<FieldPath> {
    fn walk(v: &Value, path: &mut FieldPath, out: &mut BTreeSet<FieldPath>) {
        match v {
            Value::Object(m) if !m.is_empty() => {
                for (k, child) in m {
                    path.push(k.clone());
                    if tracked(path) {
                        walk(child, path, out);
                    }
                    path.pop();
                }
            }
            Value::Null => {}
            _ => {
                out.insert(path.clone());
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(v, &mut Vec::new(), &mut out);
    out
}

pub fn get<'a>(v: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(k))
}

fn set(v: &mut Value, path: &[String], value: Value) {
    let mut cur = v;
    for k in path {
        if !cur.is_object() {
            *cur = Value::Object(Map::new());
        }
        cur = cur
            .as_object_mut()
            .map(|m| m.entry(k.clone()).or_insert(Value::Null))
            .expect("an object");
    }
    *cur = value;
}

fn remove(v: &mut Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut cur = v;
    for k in parents {
        match cur.get_mut(k) {
            Some(next) => cur = next,
            None => return,
        }
    }
    if let Some(m) = cur.as_object_mut() {
        m.remove(last);
    }
}

/// `{"f:spec": {"f:replicas": {}}}` from a set of paths.
fn to_fields_v1(paths: &BTreeSet<FieldPath>) -> Value {
    let mut root = json!({});
    for p in paths {
        let mut cur = &mut root;
        for k in p {
            cur = cur
                .as_object_mut()
                .map(|m| m.entry(format!("f:{k}")).or_insert(json!({})))
                .expect("an object");
        }
    }
    root
}

fn from_fields_v1(v: &Value) -> BTreeSet<FieldPath> {
    fn walk(v: &Value, path: &mut FieldPath, out: &mut BTreeSet<FieldPath>) {
        let children: Vec<_> = v
            .as_object()
            .map(|m| {
                m.iter()
                    .filter_map(|(k, c)| k.strip_prefix("f:").map(|k| (k.to_owned(), c)))
                    .collect()
            })
            .unwrap_or_default();
        if children.is_empty() {
            if !path.is_empty() {
                out.insert(path.clone());
            }
            return;
        }
        for (k, c) in children {
            path.push(k);
            walk(c, path, out);
            path.pop();
        }
    }
    let mut out = BTreeSet::new();
    walk(v, &mut Vec::new(), &mut out);
    out
}

/// Ownership of one object: (manager, operation) -> fields.
#[derive(Default, Debug, PartialEq)]
pub struct Owners(BTreeMap<(String, &'static str), BTreeSet<FieldPath>>);

impl Owners {
    pub fn of(obj: &Value) -> Self {
        let mut owners = Owners::default();
        for e in obj["metadata"]["managedFields"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let op = if e["operation"] == "Apply" {
                "Apply"
            } else {
                "Update"
            };
            let manager = e["manager"].as_str().unwrap_or_default().to_owned();
            owners
                .0
                .entry((manager, op))
                .or_default()
                .extend(from_fields_v1(&e["fieldsV1"]));
        }
        owners
    }

    /// Write the ownership into `obj.metadata.managedFields`.
    pub fn store(&self, obj: &mut Value, api_version: &Value, time: &str) {
        let entries: Vec<Value> = self
            .0
            .iter()
            .filter(|(_, fields)| !fields.is_empty())
            .map(|((manager, op), fields)| {
                json!({"manager": manager, "operation": op, "apiVersion": api_version,
                       "time": time, "fieldsType": "FieldsV1", "fieldsV1": to_fields_v1(fields)})
            })
            .collect();
        obj["metadata"]["managedFields"] = json!(entries);
    }

    fn others<'a>(
        &'a mut self,
        manager: &'a str,
        op: &'static str,
    ) -> impl Iterator<Item = (&'a (String, &'static str), &'a mut BTreeSet<FieldPath>)> {
        self.0
            .iter_mut()
            .filter(move |((m, o), _)| !(m == manager && *o == op))
    }

    /// A write that is not an apply (create, update, merge patch): the
    /// writer owns every field it set or changed, nobody else does.
    pub fn record_update(&mut self, manager: &str, old: &Value, new: &Value) {
        let after = leaves(new);
        let changed: BTreeSet<FieldPath> = after
            .iter()
            .filter(|p| get(old, p) != get(new, p))
            .cloned()
            .collect();
        for (_, fields) in self.others(manager, "Update") {
            fields.retain(|p| !changed.contains(p) && after.contains(p));
        }
        let mine = self.0.entry((manager.to_owned(), "Update")).or_default();
        mine.retain(|p| after.contains(p));
        mine.extend(changed);
    }

    /// A server-side apply of `config` by `manager` onto `live` (an empty
    /// object for a create). Returns the new object, or the conflicts.
    pub fn apply(
        &mut self,
        manager: &str,
        live: &Value,
        config: &Value,
        force: bool,
    ) -> Result<Value, Vec<(String, FieldPath)>> {
        let applied = leaves(config);
        let mut conflicts = Vec::new();
        for ((other, _), fields) in self.others(manager, "Apply") {
            for p in fields.iter() {
                if applied.contains(p) && get(live, p) != get(config, p) {
                    conflicts.push((other.clone(), p.clone()));
                }
            }
        }
        if !conflicts.is_empty() && !force {
            return Err(conflicts);
        }
        for (other, p) in &conflicts {
            for ((m, _), fields) in self.0.iter_mut() {
                if m == other {
                    fields.remove(p);
                }
            }
        }
        let mut new = live.clone();
        let previous = self
            .0
            .remove(&(manager.to_owned(), "Apply"))
            .unwrap_or_default();
        for p in previous.difference(&applied) {
            let shared = self.0.values().any(|fields| fields.contains(p));
            if !shared {
                remove(&mut new, p);
            }
        }
        for p in &applied {
            if let Some(v) = get(config, p) {
                set(&mut new, p, v.clone());
            }
        }
        self.0.insert((manager.to_owned(), "Apply"), applied);
        Ok(new)
    }
}

/// The fields a manager owns in `obj`, any operation.
pub fn owned_by(obj: &Value, manager: &str) -> BTreeSet<FieldPath> {
    Owners::of(obj)
        .0
        .into_iter()
        .filter(|((m, _), _)| m == manager)
        .flat_map(|(_, f)| f)
        .collect()
}
