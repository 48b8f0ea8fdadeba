//! Whether this gateway's NATS account may subscribe to a subject.
//!
//! NATS answers a subscription its permissions refuse with an asynchronous
//! `-ERR 'Permissions Violation for Subscription to "…"'` that no client
//! library ties to the subscription: the subscription looks fine and
//! delivers nothing. So the broker asks the server for its account's
//! permissions (`$SYS.REQ.USER.INFO`, after every connect) and refuses such
//! a subscription itself, with the server's rule as the reason.
//!
//! The check follows nats-server's `canSubscribe`: the subject (taken
//! literally, wildcards included) must match an `allow` entry when there
//! are any, and no `deny` entry. A wildcard subscription that only
//! overlaps a `deny` entry is accepted by the server (it filters the denied
//! messages), and here too.

use serde::Deserialize;
use serde_json::Value;

/// The subscribe permissions of one NATS user.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct SubscribePermissions {
    #[serde(default)]
    allow: Vec<String>,
    #[serde(default)]
    deny: Vec<String>,
}

impl SubscribePermissions {
    /// From a `$SYS.REQ.USER.INFO` answer; `None` when it is not one.
    pub fn from_user_info(answer: &Value) -> Option<Self> {
        let data = answer.get("data")?;
        match data.pointer("/permissions/subscribe") {
            Some(sub) => serde_json::from_value(sub.clone()).ok(),
            // A user without permissions may subscribe to anything.
            None => data.get("user").map(|_| Self::default()),
        }
    }

    /// Why subscribing to `subject` is refused, if it is.
    pub fn refusal(&self, subject: &str) -> Option<String> {
        if !self.allow.is_empty() && !self.allow.iter().any(|a| matches(a, subject)) {
            return Some(format!(
                "the NATS account may only subscribe to {:?}",
                self.allow
            ));
        }
        self.deny
            .iter()
            .find(|d| matches(d, subject))
            .map(|d| format!("the NATS account may not subscribe to {d:?}"))
    }
}

/// Does the permission `pattern` match `subject`, whose tokens are taken
/// literally (as nats-server's sublist matches a subscription's subject)?
fn matches(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn perms(allow: &[&str], deny: &[&str]) -> SubscribePermissions {
        SubscribePermissions {
            allow: allow.iter().map(|s| s.to_string()).collect(),
            deny: deny.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn matching_takes_the_subject_literally() {
        assert!(matches("a.*.c", "a.b.c"));
        assert!(matches("a.*.c", "a.*.c"));
        assert!(matches("a.>", "a.b.c"));
        assert!(matches("a.>", "a.>"));
        assert!(!matches("a.>", "a"));
        assert!(
            !matches("a.b", "a.*"),
            "a literal does not match a wildcard"
        );
        assert!(!matches("a.b.c", "a.b"));
        assert!(!matches("a.b", "a.b.c"));
    }

    #[test]
    fn deny_refuses_what_it_matches_and_allow_what_it_does_not() {
        let p = perms(&[], &["sb.rp.*.sb.ev.*.blocked.>"]);
        assert!(p.refusal("sb.rp.eu.sb.ev.*.blocked.deal.>").is_some());
        assert!(p.refusal("sb.rp.eu.sb.ev.*.acme.deal.>").is_none());
        // Only overlapping a deny: accepted by the server, filtered there.
        assert!(p.refusal("sb.rp.eu.sb.ev.*.*.>").is_none());
        let p = perms(&["sb.rp.eu.>"], &[]);
        assert!(p.refusal("sb.rp.eu.sb.ev.*.acme.>").is_none());
        assert!(p.refusal("sb.rp.us.sb.ev.*.acme.>").is_some());
        assert!(perms(&[], &[]).refusal("anything.>").is_none());
    }

    #[test]
    fn reads_the_servers_answer() {
        let answer = json!({"data": {"user": "gw", "account": "$G", "permissions": {
            "publish": {}, "subscribe": {"deny": ["x.>"]}}}});
        assert_eq!(
            SubscribePermissions::from_user_info(&answer),
            Some(perms(&[], &["x.>"]))
        );
        let open = json!({"data": {"user": "gw", "account": "$G"}});
        assert_eq!(
            SubscribePermissions::from_user_info(&open),
            Some(SubscribePermissions::default())
        );
        assert_eq!(
            SubscribePermissions::from_user_info(&json!({"error": {"code": 503}})),
            None
        );
    }
}
