//! Prometheus exposition for the gateway and the operator.
//!
//! `prometheus-client` writes OpenMetrics text. Prometheus asks for it
//! (`Accept: application/openmetrics-text`), and gets exemplars with it;
//! every other scraper gets valid Prometheus text 0.0.4, rewritten from it.

use prometheus_client::registry::Registry;

/// The two text formats `/metrics` speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpositionFormat {
    /// OpenMetrics 1.0 text (with exemplars); what Prometheus asks for.
    OpenMetrics,
    /// Prometheus text 0.0.4, for scrapers that do not ask for OpenMetrics.
    PrometheusText,
}

impl ExpositionFormat {
    /// OpenMetrics when the `Accept` header lists it (with a non-zero
    /// quality), Prometheus text 0.0.4 otherwise.
    pub fn negotiate(accept: &str) -> Self {
        let wants_openmetrics = accept.split(',').any(|item| {
            let mut parts = item.split(';').map(str::trim);
            let media = parts.next().unwrap_or("");
            let refused = parts.any(|p| {
                p.strip_prefix("q=")
                    .and_then(|q| q.parse::<f32>().ok())
                    .is_some_and(|q| q <= 0.0)
            });
            media.eq_ignore_ascii_case("application/openmetrics-text") && !refused
        });
        if wants_openmetrics {
            Self::OpenMetrics
        } else {
            Self::PrometheusText
        }
    }

    /// The HTTP `Content-Type` of this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Self::PrometheusText => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

/// Encode `registry` in `format`.
pub fn encode(registry: &Registry, format: ExpositionFormat) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    match format {
        ExpositionFormat::OpenMetrics => out,
        ExpositionFormat::PrometheusText => openmetrics_to_prometheus_text(&out),
    }
}

/// Rewrite the OpenMetrics text `prometheus-client` writes as Prometheus text
/// 0.0.4: counter families are named with their `_total` suffix, `# UNIT`
/// and `# EOF` go, exemplars are cut off the samples, and types 0.0.4 lacks
/// become `untyped` (or `gauge` for `info`).
pub fn openmetrics_to_prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    // A family's HELP comes before its TYPE; hold it until the type says
    // whether the name needs `_total`.
    let mut help: Option<(&str, &str)> = None;
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
            help = Some((name, text));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "unknown"));
            let (name, kind) = match kind {
                "counter" => (format!("{name}_total"), "counter"),
                "gauge" | "histogram" | "summary" => (name.to_owned(), kind),
                "info" => (format!("{name}_info"), "gauge"),
                _ => (name.to_owned(), "untyped"),
            };
            if let Some((_, text)) = help.take() {
                out.push_str(&format!("# HELP {name} {}\n", unescape_help(text)));
            }
            out.push_str(&format!("# TYPE {name} {kind}\n"));
        } else if line.starts_with('#') {
            // # UNIT, # EOF: not in 0.0.4.
        } else if !line.is_empty() {
            out.push_str(strip_exemplar(line));
            out.push('\n');
        }
    }
    out
}

/// OpenMetrics escapes `"` in HELP text; 0.0.4 does not.
fn unescape_help(text: &str) -> std::borrow::Cow<'_, str> {
    if text.contains("\\\"") {
        text.replace("\\\"", "\"").into()
    } else {
        text.into()
    }
}

/// A sample line without its ` # {…} value` exemplar.
fn strip_exemplar(line: &str) -> &str {
    // Skip the label set (quoted values may hold anything) before looking
    // for the exemplar marker.
    let bytes = line.as_bytes();
    let mut i = line.find(['{', ' ']).unwrap_or(line.len());
    if bytes.get(i) == Some(&b'{') {
        let mut quoted = false;
        while i < bytes.len() {
            match bytes[i] {
                b'\\' if quoted => i += 1,
                b'"' => quoted = !quoted,
                b'}' if !quoted => break,
                _ => {}
            }
            i += 1;
        }
    }
    match line.get(i..).and_then(|rest| rest.find(" # ")) {
        Some(at) => &line[..i + at],
        None => line,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_follows_the_accept_header() {
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(
            ExpositionFormat::negotiate(prometheus),
            ExpositionFormat::OpenMetrics
        );
        for accept in [
            "",
            "*/*",
            "text/plain",
            "text/plain;version=0.0.4",
            "application/openmetrics-text;q=0",
        ] {
            assert_eq!(
                ExpositionFormat::negotiate(accept),
                ExpositionFormat::PrometheusText,
                "{accept}"
            );
        }
    }

    fn sample_registry() -> Registry {
        use prometheus_client::metrics::counter::Counter;
        use prometheus_client::metrics::exemplar::HistogramWithExemplars;
        use prometheus_client::metrics::family::Family;
        use prometheus_client::metrics::gauge::Gauge;
        let mut r = Registry::with_prefix("t");
        let c = Counter::<u64>::default();
        c.inc();
        r.register("connected", "Connections \"opened\"", c);
        let g = Gauge::<i64>::default();
        g.set(2);
        r.register("active", "Open now", g);
        let f = Family::<Vec<(&'static str, &'static str)>, Counter>::default();
        f.get_or_create(&vec![("reason", "x")]).inc_by(3);
        r.register("dropped", "Dropped", f);
        let h = HistogramWithExemplars::<Vec<(&'static str, String)>>::new([0.1, 1.0].into_iter());
        h.observe(0.05, Some(vec![("trace_id", "ab".repeat(16))]), None);
        r.register("latency_seconds", "Latency", h);
        r
    }

    #[test]
    fn prometheus_text_names_counters_with_total_and_drops_openmetrics_only_parts() {
        let r = sample_registry();
        let om = encode(&r, ExpositionFormat::OpenMetrics);
        assert!(om.contains("# TYPE t_connected counter\n"));
        assert!(om.contains("trace_id=\"abab"));
        assert!(om.trim_end().ends_with("# EOF"));

        let text = encode(&r, ExpositionFormat::PrometheusText);
        assert!(
            text.contains("# TYPE t_connected_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("# HELP t_connected_total Connections \"opened\".\n"),
            "{text}"
        );
        assert!(text.contains("\nt_connected_total 1\n"));
        assert!(text.contains("# TYPE t_active gauge\nt_active 2\n"));
        assert!(text.contains("# TYPE t_dropped_total counter\nt_dropped_total{reason=\"x\"} 3\n"));
        assert!(text.contains("# TYPE t_latency_seconds histogram\n"));
        assert!(text.contains("t_latency_seconds_count 1\n"));
        assert!(
            !text.contains("# EOF") && !text.contains("trace_id"),
            "{text}"
        );
        // Every sample belongs to a declared family.
        let declared: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .collect();
        for sample in text.lines().filter(|l| !l.starts_with('#')) {
            let name = sample.split(['{', ' ']).next().unwrap_or("");
            assert!(
                declared.iter().any(|d| name == *d
                    || ["_bucket", "_sum", "_count"]
                        .iter()
                        .any(|s| name.strip_suffix(s) == Some(*d))),
                "{sample} has no family"
            );
        }
    }

    #[test]
    fn exemplars_are_cut_after_the_label_set_only() {
        assert_eq!(
            strip_exemplar(r#"a_bucket{le="1",x="q # {z}"} 3 # {trace_id="ab"} 0.5"#),
            r#"a_bucket{le="1",x="q # {z}"} 3"#
        );
        assert_eq!(strip_exemplar("a_total 3 # {t=\"x\"} 1"), "a_total 3");
        assert_eq!(strip_exemplar("a_total 3"), "a_total 3");
    }
}
