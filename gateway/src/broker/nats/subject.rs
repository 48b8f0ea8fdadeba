//! The NATS subject scheme (see docs/architecture.md).
//!
//! ```text
//! <p>.ev.<origin-region>.<tenant>.<topic tokens…>     published events (stored by the region's stream)
//! <p>.rp.<region>.<p>.ev.<origin>.<tenant>.<topic…>   the same event, republished by region <region>'s
//!                                                     stream with its sequence (what gateways subscribe to)
//! ```
//!
//! Topic tokens are already restricted to `[A-Za-z0-9_:/-]` (no `.`, `*`,
//! `>` or whitespace), so a topic can never add or widen a subject token. A
//! tenant may contain `.` (and `:`), so it is escaped into exactly one
//! token: every byte outside `[A-Za-z0-9_-]` becomes `~XX` (hex). The
//! escape is injective, so no tenant name can be made to collide with
//! another's.

use switchboard_config::{Pattern, Topic};

/// Escape a tenant name into one subject token.
pub fn escape_tenant(tenant: &str) -> String {
    let mut out = String::with_capacity(tenant.len());
    for b in tenant.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(b as char);
        } else {
            out.push_str(&format!("~{b:02X}"));
        }
    }
    out
}

/// Reverse of [`escape_tenant`]; `None` for anything it cannot have produced.
pub fn unescape_tenant(token: &str) -> Option<String> {
    let bytes = token.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'~' => {
                let hex = token.get(i + 1..i + 3)?;
                let b = u8::from_str_radix(hex, 16).ok()?;
                if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || hex != hex.to_uppercase()
                {
                    return None; // not canonical
                }
                out.push(b);
                i += 3;
            }
            b if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' => {
                out.push(b);
                i += 1;
            }
            _ => return None,
        }
    }
    String::from_utf8(out).ok()
}

/// The suffix of the origin token of a resident tenant's events (`~` is
/// not allowed in region names, so it cannot collide with one).
const RESIDENT: &str = "~local";

/// The subjects of one gateway (prefix and region).
#[derive(Debug, Clone)]
pub struct Subjects {
    prefix: String,
    region: String,
}

impl Subjects {
    /// The subjects under `prefix` for `region`.
    pub fn new(prefix: &str, region: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
            region: region.to_owned(),
        }
    }

    /// The stream holding the history of `region`.
    pub fn stream_name(&self, region: &str) -> String {
        format!("{}_{region}", self.prefix.to_uppercase())
    }

    /// The subject prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// This gateway's region.
    pub fn region(&self) -> &str {
        &self.region
    }

    /// Where an event of `tenant` on `topic` is published from this region.
    /// A `resident` tenant's (pinned to regions) carries the origin token
    /// `<region>~local`, which no other region's stream sources.
    pub fn event(&self, tenant: &str, topic: &Topic, resident: bool) -> String {
        format!(
            "{}.ev.{}{}.{}.{topic}",
            self.prefix,
            self.region,
            if resident { RESIDENT } else { "" },
            escape_tenant(tenant)
        )
    }

    /// Events of resident tenants published in `region`: stored by its
    /// stream, never sourced by another.
    pub fn resident_events(&self, region: &str) -> String {
        format!("{}.ev.{region}{RESIDENT}.>", self.prefix)
    }

    /// Where the `data.erased` notices for `region`'s connections of
    /// `tenant` are sent.
    pub fn erased_notices(&self, region: &str, tenant: &str) -> String {
        format!("{}.erased.{region}.{}", self.prefix, escape_tenant(tenant))
    }

    /// Every `data.erased` notice for this region.
    pub fn erased_notices_here(&self) -> String {
        format!("{}.erased.{}.*", self.prefix, self.region)
    }

    /// Everything published from `region`.
    pub fn region_events(&self, region: &str) -> String {
        format!("{}.ev.{region}.>", self.prefix)
    }

    /// Where this region's stream republishes what it stores.
    pub fn republish_destination(&self) -> String {
        format!("{}.rp.{}.>", self.prefix, self.region)
    }

    /// What a gateway subscribes to for one tenant's pattern (events of
    /// every origin region, as stored by this region's stream).
    pub fn live_interest(&self, tenant: &str, pattern: &Pattern) -> String {
        format!(
            "{p}.rp.{r}.{p}.ev.*.{t}.{pat}",
            p = self.prefix,
            r = self.region,
            t = escape_tenant(tenant),
            pat = pattern.to_nats()
        )
    }

    /// Every event in a region's stream.
    pub fn all_events(&self) -> String {
        format!("{}.ev.>", self.prefix)
    }

    /// All of one tenant's events in a region's stream.
    pub fn tenant_history(&self, tenant: &str) -> String {
        format!("{}.ev.*.{}.>", self.prefix, escape_tenant(tenant))
    }

    /// One tenant's events matching a pattern, in a region's stream.
    pub fn pattern_history(&self, tenant: &str, pattern: &Pattern) -> String {
        format!(
            "{}.ev.*.{}.{}",
            self.prefix,
            escape_tenant(tenant),
            pattern.to_nats()
        )
    }

    /// Split a stored event's subject into (origin region, tenant, topic).
    pub fn parse_event(&self, subject: &str) -> Option<(String, String, Topic)> {
        let rest = subject.strip_prefix(&self.prefix)?.strip_prefix(".ev.")?;
        let (origin, rest) = rest.split_once('.')?;
        let origin = origin.strip_suffix(RESIDENT).unwrap_or(origin);
        let (tenant, topic) = rest.split_once('.')?;
        Some((
            origin.to_owned(),
            unescape_tenant(tenant)?,
            Topic::parse(topic).ok()?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenants_escape_into_one_token_injectively() {
        for t in ["acme", "a.b", "a~2Eb", "123", "org:7", "a-b_c", "A.B.C"] {
            let e = escape_tenant(t);
            assert!(!e.contains(['.', '*', '>', ' ']), "{e}");
            assert_eq!(unescape_tenant(&e).as_deref(), Some(t));
        }
        assert_ne!(escape_tenant("a.b"), escape_tenant("a~2Eb"));
        assert_eq!(escape_tenant("a.b"), "a~2Eb");
        // Non-canonical or foreign tokens are rejected, not guessed.
        for bad in ["a~2eb", "a~41", "a~", "a~G1", "a b", "a*"] {
            assert_eq!(unescape_tenant(bad), None, "{bad}");
        }
    }

    #[test]
    fn subjects_round_trip_and_interest_is_tenant_scoped() {
        let s = Subjects::new("sb", "eu");
        let topic = Topic::parse("deal.stage.updated").unwrap();
        let subject = s.event("a.b", &topic, false);
        assert_eq!(subject, "sb.ev.eu.a~2Eb.deal.stage.updated");
        assert_eq!(
            s.parse_event(&subject),
            Some(("eu".into(), "a.b".into(), topic.clone()))
        );
        // A resident tenant's events stay out of what other regions source
        // (`sb.ev.eu.>`), yet parse the same and match every tenant filter.
        let resident = s.event("acme", &topic, true);
        assert_eq!(resident, "sb.ev.eu~local.acme.deal.stage.updated");
        assert_eq!(
            s.parse_event(&resident),
            Some(("eu".into(), "acme".into(), topic))
        );
        assert_eq!(s.resident_events("eu"), "sb.ev.eu~local.>");
        assert_eq!(s.tenant_history("acme"), "sb.ev.*.acme.>");
        let p = Pattern::parse("deal.*").unwrap();
        assert_eq!(s.live_interest("acme", &p), "sb.rp.eu.sb.ev.*.acme.deal.>");
        // The widest pattern of a tenant stays inside its tenant token.
        let all = Pattern::parse("*").unwrap();
        assert_eq!(s.live_interest("a.b", &all), "sb.rp.eu.sb.ev.*.a~2Eb.>");
        assert_eq!(s.stream_name("eu"), "SB_eu");
        assert_eq!(s.parse_event("sb.ev.eu.acme"), None);
        assert_eq!(s.parse_event("sb.ev.eu.a b.x"), None);
        assert_eq!(s.parse_event("other.ev.eu.acme.x"), None);
    }
}
