//! Topic names and subscription patterns.
//!
//! A topic is a dot-separated list of tokens (`deal.stage.updated`). A pattern
//! is a topic in which a token may be `*` (exactly one token) and whose last
//! token may be `*` or `>` (one or more tokens): the seeds promise that
//! `activity.*` covers `activity.task.completed`, while `deal.*.updated`
//! matches `deal.stage.updated` but not `deal.stage.x.updated`.
//!
//! Both types are validated on construction, so a value of either type is
//! always well formed and safe to embed in a NATS subject.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest topic or pattern accepted, in bytes.
pub const MAX_TOPIC_LEN: usize = 255;
/// Most tokens in a topic or pattern.
pub const MAX_TOKENS: usize = 16;

/// Why a topic or pattern was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("topic is empty")]
    /// No topic at all.
    Empty,
    #[error("topic is longer than {MAX_TOPIC_LEN} bytes")]
    /// Longer than 255 bytes.
    TooLong,
    #[error("topic has more than {MAX_TOKENS} tokens")]
    /// More than 16 tokens.
    TooManyTokens,
    #[error("topic has an empty token (leading, trailing or doubled '.')")]
    /// A leading, trailing or doubled `.`.
    EmptyToken,
    #[error("token {0:?} has a character outside [A-Za-z0-9_:/-]")]
    /// A token with a character outside `[A-Za-z0-9_:/-]`.
    BadCharacter(String),
    #[error("wildcards are not allowed in a topic, only in subscription patterns")]
    /// A wildcard where a concrete topic is needed.
    WildcardInTopic,
    #[error("'>' may only be the last token of a pattern")]
    /// `>` before the last token.
    TailNotLast,
    #[error("a wildcard must be a whole token ('*' or '>'), found {0:?}")]
    /// A wildcard inside a token (`de*`).
    PartialWildcard(String),
}

fn plain_token(token: &str) -> bool {
    token
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b':' | b'/'))
}

fn split_checked(s: &str) -> Result<std::str::Split<'_, char>, TopicError> {
    if s.is_empty() {
        return Err(TopicError::Empty);
    }
    if s.len() > MAX_TOPIC_LEN {
        return Err(TopicError::TooLong);
    }
    if s.split('.').count() > MAX_TOKENS {
        return Err(TopicError::TooManyTokens);
    }
    Ok(s.split('.'))
}

/// A concrete topic such as `deal.stage.updated`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Topic(String);

impl Topic {
    /// Parse a concrete topic (no wildcards).
    pub fn parse(s: &str) -> Result<Self, TopicError> {
        for token in split_checked(s)? {
            if token.is_empty() {
                return Err(TopicError::EmptyToken);
            }
            if token.contains(['*', '>']) {
                return Err(TopicError::WildcardInTopic);
            }
            if !plain_token(token) {
                return Err(TopicError::BadCharacter(token.to_owned()));
            }
        }
        Ok(Self(s.to_owned()))
    }

    /// The topic as given.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Its dot-separated tokens.
    pub fn tokens(&self) -> impl Iterator<Item = &str> {
        self.0.split('.')
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One token of a pattern, read from its text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token<'a> {
    Literal(&'a str),
    /// `*` not in last position: exactly one token.
    One,
    /// `*` or `>` in last position: one or more tokens.
    Rest,
}

/// A subscription pattern such as `deal.*.updated` or `activity.*`.
///
/// Only its text is kept (checked by `parse`); the tokens are read from it
/// when needed. Every subscription of every connection holds one, so the
/// text is its whole cost: one small allocation, no token list beside it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pattern {
    text: Box<str>,
}

impl Pattern {
    /// Parse a subscription pattern (`*` one token, trailing `*` or `>` the rest).
    pub fn parse(s: &str) -> Result<Self, TopicError> {
        let raw: Vec<&str> = split_checked(s)?.collect();
        let last = raw.len() - 1;
        for (i, token) in raw.iter().enumerate() {
            match *token {
                "" => return Err(TopicError::EmptyToken),
                "*" => {}
                ">" if i == last => {}
                ">" => return Err(TopicError::TailNotLast),
                t if t.contains(['*', '>']) => {
                    return Err(TopicError::PartialWildcard(t.to_owned()));
                }
                t if !plain_token(t) => return Err(TopicError::BadCharacter(t.to_owned())),
                _ => {}
            }
        }
        Ok(Self { text: s.into() })
    }

    /// Its tokens, in order (the text was checked when it was parsed).
    fn tokens(&self) -> impl Iterator<Item = Token<'_>> + Clone {
        let mut parts = self.text.split('.').peekable();
        std::iter::from_fn(move || {
            let token = parts.next()?;
            let last = parts.peek().is_none();
            Some(match token {
                "*" if last => Token::Rest,
                "*" => Token::One,
                ">" => Token::Rest,
                literal => Token::Literal(literal),
            })
        })
    }

    /// The pattern as given.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The first token when it is literal (`deal` in `deal.*`; none for `*.x`).
    pub fn literal_prefix(&self) -> Option<&str> {
        match self.tokens().next() {
            Some(Token::Literal(t)) => Some(t),
            _ => None,
        }
    }

    /// True when the pattern has no wildcard, i.e. names exactly one topic.
    pub fn is_exact(&self) -> bool {
        !self.text.contains(['*', '>'])
    }

    /// Does this pattern match the topic?
    pub fn matches(&self, topic: &Topic) -> bool {
        // The usual case on the delivery path: an exact pattern (a topic
        // never contains a wildcard, so equal text is a match).
        if *self.text == *topic.as_str() {
            return true;
        }
        if !self.text.contains(['*', '>']) {
            return false;
        }
        let mut topic_tokens = topic.tokens();
        for token in self.tokens() {
            match token {
                Token::Rest => return topic_tokens.next().is_some(),
                Token::One => {
                    if topic_tokens.next().is_none() {
                        return false;
                    }
                }
                Token::Literal(lit) => {
                    if topic_tokens.next() != Some(lit) {
                        return false;
                    }
                }
            }
        }
        topic_tokens.next().is_none()
    }

    /// Is every topic this pattern matches also matched by `outer`?
    /// Used to check a subscription against a policy allowlist.
    pub fn is_covered_by(&self, outer: &Pattern) -> bool {
        let mut inner = self.tokens();
        for o in outer.tokens() {
            let Some(i) = inner.next() else {
                return false;
            };
            match (o, i) {
                (Token::Rest, _) => return true,
                (Token::One, Token::Rest) => return false,
                (Token::One, _) => {}
                (Token::Literal(a), Token::Literal(b)) if a == b => {}
                (Token::Literal(_), _) => return false,
            }
        }
        inner.next().is_none()
    }

    /// Could one topic match both patterns? (Containment either way implies
    /// it, but so does `*.captured` against `payment.>`.)
    pub fn overlaps(&self, other: &Pattern) -> bool {
        fn go(a: &[Token<'_>], b: &[Token<'_>]) -> bool {
            match (a.split_first(), b.split_first()) {
                (None, None) => true,
                // One or more tokens: whatever the other still needs.
                (Some((Token::Rest, _)), Some(_)) | (Some(_), Some((Token::Rest, _))) => true,
                (None, Some(_)) | (Some(_), None) => false,
                (Some((x, rest_a)), Some((y, rest_b))) => {
                    let compatible = match (x, y) {
                        (Token::Literal(p), Token::Literal(q)) => p == q,
                        _ => true,
                    };
                    compatible && go(rest_a, rest_b)
                }
            }
        }
        let a: Vec<Token<'_>> = self.tokens().collect();
        let b: Vec<Token<'_>> = other.tokens().collect();
        go(&a, &b)
    }

    /// The NATS-style form of this pattern (`*` for one token, `>` for the rest).
    pub fn to_nats(&self) -> String {
        let parts: Vec<&str> = self
            .tokens()
            .map(|t| match t {
                Token::Literal(l) => l,
                Token::One => "*",
                Token::Rest => ">",
            })
            .collect();
        parts.join(".")
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

macro_rules! string_serde {
    ($ty:ty, $desc:literal) => {
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                <$ty>::parse(&s).map_err(|e| serde::de::Error::custom(format!("{s:?}: {e}")))
            }
        }
        impl schemars::JsonSchema for $ty {
            fn schema_name() -> std::borrow::Cow<'static, str> {
                stringify!($ty).into()
            }
            fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
                schemars::json_schema!({
                    "type": "string",
                    "description": $desc,
                    "maxLength": MAX_TOPIC_LEN,
                    "pattern": r"^([A-Za-z0-9_:/-]+|\*)(\.([A-Za-z0-9_:/-]+|\*))*(\.>)?$|^>$"
                })
            }
        }
    };
}

string_serde!(Topic, "A dot-separated topic such as deal.stage.updated");
string_serde!(
    Pattern,
    "A topic pattern: '*' matches one token; a trailing '*' or '>' matches the rest"
);

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Pattern {
        Pattern::parse(s).unwrap()
    }
    fn t(s: &str) -> Topic {
        Topic::parse(s).unwrap()
    }

    /// Every pattern of up to three tokens over {a, b, *, >} and every topic
    /// of up to four tokens over {a, b}: `overlaps` and `is_covered_by`
    /// against their definitions, by brute force.
    #[test]
    fn overlap_and_cover_agree_with_brute_force() {
        fn sequences(alphabet: &[&str], max: usize) -> Vec<String> {
            let mut out: Vec<String> = alphabet.iter().map(|s| s.to_string()).collect();
            let mut last = out.clone();
            for _ in 1..max {
                let next: Vec<String> = last
                    .iter()
                    .flat_map(|p| alphabet.iter().map(move |a| format!("{p}.{a}")))
                    .collect();
                out.extend(next.iter().cloned());
                last = next;
            }
            out
        }
        let patterns: Vec<Pattern> = sequences(&["a", "b", "*", ">"], 3)
            .iter()
            .filter_map(|p| Pattern::parse(p).ok())
            .collect();
        let topics: Vec<Topic> = sequences(&["a", "b"], 4)
            .iter()
            .map(|t| Topic::parse(t).unwrap())
            .collect();
        assert_eq!(patterns.len(), 4 + 3 * 4 + 3 * 3 * 4);
        for p in &patterns {
            for q in &patterns {
                let both = topics.iter().any(|t| p.matches(t) && q.matches(t));
                assert_eq!(p.overlaps(q), both, "{p} overlaps {q}");
                let covered = topics.iter().all(|t| !p.matches(t) || q.matches(t));
                assert_eq!(p.is_covered_by(q), covered, "{p} covered by {q}");
            }
        }
    }

    #[test]
    fn seed_wildcard_semantics() {
        assert!(p("activity.*").matches(&t("activity.task.completed")));
        assert!(p("activity.*").matches(&t("activity.task")));
        assert!(!p("activity.*").matches(&t("activity")));
        assert!(p("deal.*.updated").matches(&t("deal.stage.updated")));
        assert!(!p("deal.*.updated").matches(&t("deal.stage.x.updated")));
        assert!(!p("deal.*.updated").matches(&t("deal.stage.created")));
        assert!(p("deal.stage.*").matches(&t("deal.stage.updated")));
        assert!(p("deal.>").matches(&t("deal.stage.updated")));
        assert!(p("*").matches(&t("anything.at.all")));
        assert!(p("a.b").matches(&t("a.b")));
        assert!(!p("a.b").matches(&t("a.b.c")));
        assert!(!p("a.b.c").matches(&t("a.b")));
        assert!(p("entity:Task").matches(&t("entity:Task")));
    }

    #[test]
    fn invalid_inputs_are_refused_with_reasons() {
        assert_eq!(Topic::parse(""), Err(TopicError::Empty));
        assert_eq!(Topic::parse("a..b"), Err(TopicError::EmptyToken));
        assert_eq!(Topic::parse(".a"), Err(TopicError::EmptyToken));
        assert_eq!(Topic::parse("a.*"), Err(TopicError::WildcardInTopic));
        assert!(matches!(
            Topic::parse("a.b c"),
            Err(TopicError::BadCharacter(_))
        ));
        assert!(matches!(
            Topic::parse("a.\u{0}"),
            Err(TopicError::BadCharacter(_))
        ));
        assert_eq!(Pattern::parse("a.>.b"), Err(TopicError::TailNotLast));
        assert!(matches!(
            Pattern::parse("deal*"),
            Err(TopicError::PartialWildcard(_))
        ));
        assert_eq!(
            Topic::parse("a.".repeat(20).trim_end_matches('.')),
            Err(TopicError::TooManyTokens)
        );
        assert_eq!(Topic::parse(&"a".repeat(300)), Err(TopicError::TooLong));
    }

    #[test]
    fn coverage_for_allowlists() {
        assert!(p("deal.stage.updated").is_covered_by(&p("deal.*")));
        assert!(p("deal.*.updated").is_covered_by(&p("deal.*")));
        assert!(p("deal.*").is_covered_by(&p("deal.>")));
        assert!(!p("deal.*").is_covered_by(&p("deal.*.updated")));
        assert!(!p("deal.*").is_covered_by(&p("deal.stage.*")));
        assert!(!p("*").is_covered_by(&p("deal.*")));
        assert!(p("a.b").is_covered_by(&p("a.*")));
        assert!(!p("a.b.c").is_covered_by(&p("a.*.d")));
        assert!(p("a.x.d").is_covered_by(&p("a.*.d")));
        assert!(!p("a.*").is_covered_by(&p("a.*.d")));
        assert_eq!(p("activity.*").to_nats(), "activity.>");
        assert_eq!(p("deal.*.updated").to_nats(), "deal.*.updated");
    }
}
