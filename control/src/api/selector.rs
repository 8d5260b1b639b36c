//! Label and field selectors (`?labelSelector=`, `?fieldSelector=`).
//! Pure: parse once, then match objects.

use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Req {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed label selector; every requirement must hold.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LabelSelector(Vec<Req>);

impl LabelSelector {
    pub fn parse(s: &str) -> Result<LabelSelector, String> {
        let mut reqs = Vec::new();
        let mut rest = s.trim();
        while !rest.is_empty() {
            let (req, tail) = parse_one(rest)?;
            reqs.push(req);
            rest = tail.trim_start();
            if let Some(t) = rest.strip_prefix(',') {
                rest = t.trim_start();
                if rest.is_empty() {
                    return Err(format!("unable to parse requirement: trailing comma in {s:?}"));
                }
            } else if !rest.is_empty() {
                return Err(format!("unable to parse requirement: unexpected {rest:?}"));
            }
        }
        Ok(LabelSelector(reqs))
    }

    /// `get(key)` returns the label's value if the object has it.
    pub fn matches<'a>(&self, get: impl Fn(&str) -> Option<&'a str>) -> bool {
        self.0.iter().all(|r| match r {
            Req::Eq(k, v) => get(k) == Some(v.as_str()),
            Req::NotEq(k, v) => get(k) != Some(v.as_str()),
            Req::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            Req::NotIn(k, vs) => get(k).is_none_or(|x| vs.iter().all(|v| v != x)),
            Req::Exists(k) => get(k).is_some(),
            Req::NotExists(k) => get(k).is_none(),
        })
    }

    pub fn matches_json(&self, labels: &Value) -> bool {
        self.matches(|k| labels.get(k).and_then(Value::as_str))
    }
}

fn is_key_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/')
}

fn valid_key(k: &str) -> Result<(), String> {
    if k.is_empty() || !k.chars().all(is_key_char) {
        return Err(format!("invalid label key {k:?}"));
    }
    Ok(())
}

fn parse_one(s: &str) -> Result<(Req, &str), String> {
    if let Some(t) = s.strip_prefix('!') {
        let t = t.trim_start();
        let end = t.find(|c: char| !is_key_char(c)).unwrap_or(t.len());
        valid_key(&t[..end])?;
        return Ok((Req::NotExists(t[..end].to_string()), &t[end..]));
    }
    let end = s.find(|c: char| !is_key_char(c)).unwrap_or(s.len());
    let key = s[..end].to_string();
    valid_key(&key)?;
    let t = s[end..].trim_start();
    let value = |t: &str| -> (String, usize) {
        let t2 = t.trim_start();
        let skip = t.len() - t2.len();
        let e = t2.find(|c: char| !is_key_char(c)).unwrap_or(t2.len());
        (t2[..e].to_string(), skip + e)
    };
    if let Some(t) = t.strip_prefix("==").or_else(|| t.strip_prefix('=')) {
        let (v, n) = value(t);
        return Ok((Req::Eq(key, v), &t[n..]));
    }
    if let Some(t) = t.strip_prefix("!=") {
        let (v, n) = value(t);
        return Ok((Req::NotEq(key, v), &t[n..]));
    }
    for (word, notin) in [("notin", true), ("in", false)] {
        if let Some(t) = t.strip_prefix(word) {
            let t = t.trim_start();
            let Some(t) = t.strip_prefix('(') else {
                return Err(format!("expected '(' after {word} in {s:?}"));
            };
            let close = t.find(')').ok_or_else(|| format!("missing ')' in {s:?}"))?;
            let vals: Vec<String> = t[..close].split(',').map(|v| v.trim().to_string()).collect();
            if vals.iter().any(|v| !v.chars().all(is_key_char)) {
                return Err(format!("invalid value in {s:?}"));
            }
            let req = if notin { Req::NotIn(key, vals) } else { Req::In(key, vals) };
            return Ok((req, &t[close + 1..]));
        }
    }
    Ok((Req::Exists(key), t))
}

/// A parsed field selector: `a.b=v`, `a.b==v`, `a.b!=v`, comma-separated.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FieldSelector(Vec<(String, bool, String)>);

impl FieldSelector {
    pub fn parse(s: &str) -> Result<FieldSelector, String> {
        let mut out = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (field, eq, value) = if let Some((f, v)) = part.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = part.split_once("==") {
                (f, true, v)
            } else if let Some((f, v)) = part.split_once('=') {
                (f, true, v)
            } else {
                return Err(format!("invalid selector: {part:?}; can't understand {part:?}"));
            };
            out.push((field.trim().to_string(), eq, value.trim().to_string()));
        }
        Ok(FieldSelector(out))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Fields a selector may name for `kind`: Kubernetes supports
    /// `metadata.name`/`metadata.namespace` everywhere plus a few per kind.
    pub fn check_supported(&self, kind: &str) -> Result<(), String> {
        for (f, _, _) in &self.0 {
            let ok = matches!(f.as_str(), "metadata.name" | "metadata.namespace")
                || match kind {
                    "Pod" => matches!(
                        f.as_str(),
                        "spec.nodeName"
                            | "spec.restartPolicy"
                            | "spec.schedulerName"
                            | "spec.serviceAccountName"
                            | "spec.hostNetwork"
                            | "status.phase"
                            | "status.podIP"
                            | "status.nominatedNodeName"
                    ),
                    "Event" => f.starts_with("involvedObject.") || matches!(f.as_str(), "reason" | "source" | "type"),
                    "Node" => f == "spec.unschedulable",
                    "Secret" => f == "type",
                    "Namespace" => f == "status.phase",
                    "ReplicaSet" | "Job" => f == "status.replicas" || f == "status.successful",
                    _ => false,
                };
            if !ok {
                return Err(format!("field label not supported: {f}"));
            }
        }
        Ok(())
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|(field, eq, want)| {
            let got = field_value(obj, field);
            (got == *want) == *eq
        })
    }
}

/// A field's value as the selector compares it: strings as-is, booleans
/// and numbers in their text form, missing as "".
fn field_value(obj: &Value, path: &str) -> String {
    let mut v = obj;
    for seg in path.split('.') {
        match v.get(seg) {
            Some(x) => v = x,
            None => return String::new(),
        }
    }
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn label_selectors() {
        let labels = json!({"app": "web", "tier": "front", "env": "prod"});
        let m = |s: &str| LabelSelector::parse(s).unwrap().matches_json(&labels);
        assert!(m("app=web"));
        assert!(m("app==web,tier=front"));
        assert!(!m("app!=web"));
        assert!(m("env in (prod, staging)"));
        assert!(!m("env notin (prod)"));
        assert!(m("missing notin (x)"));
        assert!(m("app"));
        assert!(m("!missing"));
        assert!(!m("!app"));
        assert!(m(""));
        assert!(LabelSelector::parse("app=web,").is_err());
        assert!(LabelSelector::parse("a in x").is_err());
        assert!(LabelSelector::parse("a in (x").is_err());
        assert!(LabelSelector::parse("=x").is_err());
    }

    #[test]
    fn field_selectors() {
        let pod = json!({"metadata": {"name": "p", "namespace": "d"}, "spec": {"nodeName": "n1"}, "status": {"phase": "Running"}});
        let m = |s: &str| FieldSelector::parse(s).unwrap().matches(&pod);
        assert!(m("metadata.name=p"));
        assert!(m("spec.nodeName=n1,status.phase!=Failed"));
        assert!(!m("spec.nodeName="));
        assert!(FieldSelector::parse("spec.nodeName=").unwrap().matches(&json!({"spec": {}})));
        assert!(FieldSelector::parse("nonsense").is_err());
        assert!(FieldSelector::parse("spec.x=1").unwrap().check_supported("Pod").is_err());
        assert!(FieldSelector::parse("involvedObject.name=x").unwrap().check_supported("Event").is_ok());
    }
}
