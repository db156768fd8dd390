//! `grafana/dashboard.json`: every query of its panels, evaluated against the
//! test's Prometheus with Grafana's variables replaced, must answer without
//! error and (unless it only reads counters that stay absent in a healthy
//! run) with data; and every metric it names must be one the roles serve.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::Check;
use crate::server::Prometheus;

/// Counters a healthy run may never touch: their label sets, so their
/// series, appear on the first failure, retry or duplicate.
const MAY_BE_ABSENT: &[&str] = &[
    "relay_failed_total",
    "consumer_duplicates_total",
    "consumer_retried_total",
    "consumer_dead_lettered_total",
    "consumer_requeued_total",
];

/// (panel title, query) of every target of every panel, rows included.
pub fn queries() -> Vec<(String, String)> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/grafana/dashboard.json");
    let text = std::fs::read_to_string(path).expect("reading grafana/dashboard.json");
    let dashboard: Value = serde_json::from_str(&text).expect("grafana/dashboard.json is JSON");
    let mut out = Vec::new();
    collect(&dashboard["panels"], &mut out);
    assert!(!out.is_empty(), "grafana/dashboard.json has no queries");
    out
}

fn collect(panels: &Value, out: &mut Vec<(String, String)>) {
    for panel in panels.as_array().into_iter().flatten() {
        let title = panel["title"].as_str().unwrap_or("?");
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                out.push((title.to_owned(), expr.to_owned()));
            }
        }
        collect(&panel["panels"], out); // a collapsed row holds its panels
    }
}

/// The query as Grafana would send it, its variables replaced.
fn expand(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$__interval", "15s")
        .replace("$__range", "5m")
}

/// One check per query.
pub fn checks() -> Vec<Check> {
    queries()
        .into_iter()
        .map(|(title, expr)| {
            let optional = metric_names(&expr)
                .iter()
                .all(|name| MAY_BE_ABSENT.contains(&name.as_str()));
            let what = format!("dashboard panel {title:?}: {expr}");
            Check::new(
                what,
                expand(&expr),
                Box::new(move |samples| {
                    if samples.is_empty() && !optional {
                        Err("no data".into())
                    } else {
                        Ok(())
                    }
                }),
            )
        })
        .collect()
}

/// Metric names the dashboard uses that no role serves (per Prometheus'
/// metadata of its targets, which lists a family from its `# TYPE` line even
/// before any of its series exists).
pub async fn unknown_metrics(prometheus: &Prometheus) -> Result<(), String> {
    let families: BTreeSet<String> = prometheus.metadata().await?.into_iter().collect();
    // OpenMetrics names a counter's family without `_total`, a histogram's
    // without `_bucket`, `_count` and `_sum`.
    let served = |name: &str| {
        families.contains(name)
            || ["_total", "_bucket", "_count", "_sum"]
                .iter()
                .any(|suffix| {
                    name.strip_suffix(suffix)
                        .is_some_and(|f| families.contains(f))
                })
    };
    let unknown: BTreeSet<String> = queries()
        .iter()
        .flat_map(|(_, expr)| metric_names(expr))
        .filter(|name| name != "up" && !served(name))
        .collect();
    if unknown.is_empty() {
        Ok(())
    } else {
        Err(format!("not served: {unknown:?}; served: {families:?}"))
    }
}

/// The metric names in a PromQL expression: identifiers outside label
/// matchers `{...}`, ranges `[...]`, strings and grouping lists (`by (...)`),
/// that are neither functions nor keywords.
fn metric_names(expr: &str) -> Vec<String> {
    const KEYWORDS: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "sum",
        "min",
        "max",
        "avg",
        "count",
        "stddev",
        "stdvar",
        "topk",
        "bottomk",
        "quantile",
        "count_values",
        "group",
        "inf",
        "nan",
    ];
    let chars: Vec<char> = expr.chars().collect();
    let (mut names, mut i, mut braces, mut brackets) = (Vec::new(), 0, 0, 0);
    let mut skip_list = false; // the next `( ... )` lists labels
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => {
                i += 1;
                while i < chars.len() && chars[i] != c {
                    i += if chars[i] == '\\' { 2 } else { 1 };
                }
            }
            '{' => braces += 1,
            '}' => braces -= 1,
            '[' => brackets += 1,
            ']' => brackets -= 1,
            '(' if skip_list => {
                while i < chars.len() && chars[i] != ')' {
                    i += 1;
                }
                skip_list = false;
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || matches!(chars[i], '_' | ':'))
                {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let next = chars[i..].iter().find(|c| !c.is_whitespace());
                if matches!(
                    word.as_str(),
                    "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
                ) {
                    skip_list = true;
                } else if braces == 0
                    && brackets == 0
                    && next != Some(&'(')
                    && !KEYWORDS.contains(&word.as_str())
                {
                    names.push(word);
                }
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    names
}

#[test]
fn metric_names_are_found_outside_matchers_and_grouping() {
    assert_eq!(
        metric_names(
            r#"histogram_quantile(0.5, sum by (le, queue) (rate(consumer_event_age_seconds_bucket{queue=~"a_b"}[1m])))"#
        ),
        ["consumer_event_age_seconds_bucket"]
    );
    assert_eq!(
        metric_names("sum(relay_failed_total) or vector(0) + max(up)"),
        ["relay_failed_total", "up"]
    );
}
