//! Which fields of a request body Kubernetes does not define.
//!
//! A body is decoded into its typed object and encoded again
//! ([`super::registry::ResourceType::normalize`]); whatever the input had
//! that the normalized object lacks is unknown to Kubernetes. The API server
//! rejects, drops or warns about those paths per `fieldValidation`.

use serde_json::Value;

/// Paths (Kubernetes' notation: `spec.containers[0].bogus`) present in
/// `input` but missing from `normalized`. Explicit nulls are not reported:
/// they carry nothing.
pub fn unknown_fields(input: &Value, normalized: &Value) -> Vec<String> {
    let mut out = Vec::new();
    walk(input, normalized, &mut String::new(), &mut out);
    out
}

fn walk(input: &Value, normalized: &Value, path: &mut String, out: &mut Vec<String>) {
    match (input, normalized) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(k);
                match b.get(k) {
                    Some(w) => walk(v, w, path, out),
                    None if v.is_null() => {}
                    None => out.push(path.clone()),
                }
                path.truncate(len);
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            for (i, (v, w)) in a.iter().zip(b).enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                walk(v, w, path, out);
                path.truncate(len);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reports_nested_and_listed_unknowns_but_not_nulls() {
        let input = json!({"a": 1, "x": null, "spec": {"c": [{"name": "n", "bad": 2}], "zz": {"q": 1}}});
        let norm = json!({"a": 1, "spec": {"c": [{"name": "n"}]}});
        assert_eq!(unknown_fields(&input, &norm), vec!["spec.c[0].bad".to_string(), "spec.zz".to_string()]);
        assert!(unknown_fields(&norm, &norm).is_empty());
    }
}
