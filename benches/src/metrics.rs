//! Prometheus text from the masters' `/metrics`: fetching, and summing the
//! samples of one metric (parsing is pure and tested).

use serde_json::Value;

/// Sum of `name`'s samples whose labels include every `(label, value)` of
/// `labels` (an empty filter takes every series).
pub(crate) fn sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut total = 0.0;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else { continue };
        let (label_text, value) = match rest.strip_prefix('{') {
            Some(r) => match r.split_once('}') {
                Some((l, v)) => (l, v),
                None => continue,
            },
            // Another metric sharing this prefix (`x` vs `x_total`).
            None if !rest.starts_with(' ') => continue,
            None => ("", rest),
        };
        let Some(v) = value.split_whitespace().next().and_then(|v| v.parse::<f64>().ok()) else { continue };
        if labels.iter().all(|(k, want)| label_text.split(',').any(|kv| kv == format!("{k}=\"{want}\""))) {
            total += v;
        }
    }
    total
}

/// One scrape of each URL (`http://host:port`); a master that does not
/// answer gives an empty text.
pub(crate) async fn scrape(urls: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for u in urls {
        let text = match reqwest::get(format!("{u}/metrics")).await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        out.push(text);
    }
    out
}

/// `sum` over every scrape.
pub(crate) fn sum_all(texts: &[String], name: &str, labels: &[(&str, &str)]) -> f64 {
    texts.iter().map(|t| sum(t, name, labels)).sum()
}

/// The largest `sum` of one scrape (a cluster-wide value every master
/// reports, such as the store revision).
pub(crate) fn max_of(texts: &[String], name: &str) -> f64 {
    texts.iter().map(|t| sum(t, name, &[])).fold(0.0, f64::max)
}

/// Rounds to 0.1 for reports.
pub(crate) fn r1(v: f64) -> Value {
    Value::from((v * 10.0).round() / 10.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP capstan_gateway_connected_nodes Node agents\n\
        # TYPE capstan_gateway_connected_nodes gauge\n\
        capstan_gateway_connected_nodes 7\n\
        capstan_gateway_connected_nodes_extra 100\n\
        capstan_gateway_requests_total{code=\"200\",request=\"heartbeat\"} 40\n\
        capstan_gateway_requests_total{code=\"500\",request=\"heartbeat\"} 2\n\
        capstan_gateway_requests_total{code=\"200\",request=\"join\"} 5\n\
        capstan_store_revision 1.5e3\n";

    #[test]
    fn plain_gauge_ignores_longer_names() {
        assert_eq!(sum(TEXT, "capstan_gateway_connected_nodes", &[]), 7.0);
    }

    #[test]
    fn labelled_series_are_filtered_and_summed() {
        assert_eq!(sum(TEXT, "capstan_gateway_requests_total", &[]), 47.0);
        assert_eq!(sum(TEXT, "capstan_gateway_requests_total", &[("request", "heartbeat")]), 42.0);
        assert_eq!(sum(TEXT, "capstan_gateway_requests_total", &[("request", "heartbeat"), ("code", "200")]), 40.0);
        assert_eq!(sum(TEXT, "capstan_gateway_requests_total", &[("request", "register")]), 0.0);
    }

    #[test]
    fn scientific_values_and_missing_metrics() {
        assert_eq!(sum(TEXT, "capstan_store_revision", &[]), 1500.0);
        assert_eq!(sum(TEXT, "nope", &[]), 0.0);
    }

    #[test]
    fn across_masters() {
        let texts = vec![TEXT.to_string(), "capstan_store_revision 1400\ncapstan_gateway_connected_nodes 3\n".into()];
        assert_eq!(sum_all(&texts, "capstan_gateway_connected_nodes", &[]), 10.0);
        assert_eq!(max_of(&texts, "capstan_store_revision"), 1500.0);
    }
}
