//! Property tests: the topic/pattern matcher against a reference model,
//! parsing against its own printing, and the file parsers against arbitrary
//! input (they refuse it with an error; they never panic).

use proptest::prelude::*;
use switchboard_config::{GatewayConfig, Pattern, PolicyBundle, Topic};

/// `cases` per property, no regression files written (the seeds that fail
/// are printed; CI starts from a clean clone anyway).
fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// The documented semantics, written as plainly as possible: `*` in the
/// middle is one token, a trailing `*` or `>` one or more, anything else
/// itself.
fn reference(pattern: &[&str], topic: &[&str]) -> bool {
    match (pattern.split_first(), topic.split_first()) {
        (None, None) => true,
        (Some((&("*" | ">"), [])), _) => !topic.is_empty(),
        (Some((&"*", rest)), Some((_, more))) => reference(rest, more),
        (Some((p, rest)), Some((t, more))) => p == t && reference(rest, more),
        _ => false,
    }
}

/// Small alphabets, so matches and near misses are both common.
fn topic_tokens() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(
        prop::sample::select(vec!["a", "b", "c"]).prop_map(String::from),
        1..5,
    )
}

fn pattern_tokens() -> impl Strategy<Value = Vec<String>> {
    (
        prop::collection::vec(
            prop::sample::select(vec!["a", "b", "*"]).prop_map(String::from),
            1..5,
        ),
        any::<bool>(),
    )
        .prop_map(|(mut tokens, tail)| {
            if tail {
                tokens.push(">".into());
            }
            tokens
        })
}

proptest! {
    #![proptest_config(config(2000))]

    #[test]
    fn the_matcher_agrees_with_the_reference(p in pattern_tokens(), t in topic_tokens()) {
        let pattern = Pattern::parse(&p.join(".")).unwrap();
        let topic = Topic::parse(&t.join(".")).unwrap();
        let p_refs: Vec<&str> = p.iter().map(String::as_str).collect();
        let t_refs: Vec<&str> = t.iter().map(String::as_str).collect();
        prop_assert_eq!(pattern.matches(&topic), reference(&p_refs, &t_refs));
    }

    #[test]
    fn what_a_pattern_says_of_itself_agrees_with_its_tokens(p in pattern_tokens()) {
        let pattern = Pattern::parse(&p.join(".")).unwrap();
        let wild = |t: &String| t == "*" || t == ">";
        prop_assert_eq!(pattern.is_exact(), !p.iter().any(wild));
        prop_assert_eq!(pattern.literal_prefix(), p.first().filter(|t| !wild(t)).map(String::as_str));
        let mut nats = p.clone();
        if let Some(last) = nats.last_mut() && last == "*" {
            *last = ">".into();
        }
        prop_assert_eq!(pattern.to_nats(), nats.join("."));
    }

    #[test]
    fn what_parses_prints_back_as_given(s in "[a-z*>:_.-]{0,40}") {
        if let Ok(p) = Pattern::parse(&s) {
            prop_assert_eq!(p.as_str(), s.as_str());
            prop_assert_eq!(Pattern::parse(p.as_str()).unwrap(), p);
        }
        if let Ok(t) = Topic::parse(&s) {
            prop_assert_eq!(t.as_str(), s.as_str());
            prop_assert!(Pattern::parse(&s).unwrap().matches(&t), "a topic matches itself as a pattern");
        }
    }

    #[test]
    fn parsers_refuse_arbitrary_text_without_panicking(s in any::<String>()) {
        let _ = Topic::parse(&s);
        let _ = Pattern::parse(&s);
        let _ = PolicyBundle::from_yaml(&s);
        let _ = GatewayConfig::from_yaml(&s);
    }

    #[test]
    fn policy_bundles_survive_printing(
        tenants in prop::collection::btree_map("[a-z]{1,8}", prop::collection::vec(pattern_tokens(), 0..4), 0..4),
    ) {
        let mut yaml = String::from(if tenants.is_empty() { "tenants: {}\n" } else { "tenants:\n" });
        for (tenant, patterns) in &tenants {
            // Quoted: a tenant may be called `null`, `true` or `no`.
            yaml.push_str(&format!("  \"{tenant}\":\n    subscribe:\n"));
            if patterns.is_empty() {
                yaml.push_str("      []\n");
            }
            for p in patterns {
                yaml.push_str(&format!("      - pattern: \"{}\"\n", p.join(".")));
            }
        }
        let bundle = PolicyBundle::from_yaml(&yaml).unwrap();
        let again = PolicyBundle::from_yaml(&bundle.to_yaml()).unwrap();
        prop_assert_eq!(again.digest(), bundle.digest());
    }
}

#[test]
fn tenants_named_like_yaml_keywords_survive_printing() {
    for name in ["null", "true", "no", "yes", "off", "nan"] {
        let yaml = format!("tenants:\n  \"{name}\":\n    subscribe:\n      - pattern: \"a.*\"\n");
        let bundle = PolicyBundle::from_yaml(&yaml).unwrap();
        assert!(bundle.tenants.contains_key(name), "{name}");
        let again = PolicyBundle::from_yaml(&bundle.to_yaml()).unwrap();
        assert_eq!(again.digest(), bundle.digest(), "{name}");
    }
}

proptest! {
    // Each case checks every topic up to seven tokens: fewer cases.
    #![proptest_config(config(200))]

    #[test]
    fn two_patterns_overlap_exactly_when_some_topic_matches_both(
        a in pattern_tokens(),
        b in pattern_tokens(),
    ) {
        let (pa, pb) = (Pattern::parse(&a.join(".")).unwrap(), Pattern::parse(&b.join(".")).unwrap());
        // Every topic over the alphabet (plus one token no pattern names)
        // up to one token longer than either pattern.
        let longest = a.len().max(b.len()) + 1;
        let mut witness = false;
        let mut frontier: Vec<Vec<&str>> = vec![vec![]];
        for _ in 0..longest {
            let mut next = Vec::new();
            for t in &frontier {
                for tok in ["a", "b", "c"] {
                    let mut longer = t.clone();
                    longer.push(tok);
                    let topic = Topic::parse(&longer.join(".")).unwrap();
                    witness |= pa.matches(&topic) && pb.matches(&topic);
                    next.push(longer);
                }
            }
            frontier = next;
        }
        prop_assert_eq!(pa.overlaps(&pb), witness, "{} / {}", pa.as_str(), pb.as_str());
    }
}

/// Structured but hostile YAML: deep nesting, anchors, huge numbers.
#[test]
fn hostile_yaml_is_an_error() {
    let deep = format!("{}1{}", "[".repeat(5000), "]".repeat(5000));
    for text in [
        deep.as_str(),
        "a: &x [*x]",
        "tenants: {acme: {limits: {max_connections: 99999999999999999999999}}}",
        "tenants: {acme: {subscribe: [{pattern: 'a..b'}]}}",
        "listen: [1, 2]",
        "\u{0}\u{feff}",
    ] {
        assert!(
            PolicyBundle::from_yaml(text).is_err(),
            "policy {:.40}",
            text
        );
        assert!(
            GatewayConfig::from_yaml(text).is_err(),
            "config {:.40}",
            text
        );
    }
}
