//! The downward API's files: fieldRef values (metadata only, as Kubernetes
//! allows in volumes), labels and annotations in the kubelet's format, and
//! resourceFieldRef limits and requests. Pure.

use std::collections::BTreeMap;

use serde_json::Value;

use super::{mode_or, quantity, FileEntry};
use crate::agent::{bytes_of, millicores, NodeInfo};

/// The downward API's items: fieldRef (name, namespace, uid, labels,
/// annotations, one label or annotation) and resourceFieldRef.
pub(super) fn downward(
    pod: &Value,
    items: &Value,
    default_mode: u32,
    node: &NodeInfo,
) -> Result<Vec<FileEntry>, String> {
    let mut out = Vec::new();
    for item in items.as_array().into_iter().flatten() {
        let path = item["path"].as_str().unwrap_or_default().to_string();
        let text = if let Some(field) = item["fieldRef"]["fieldPath"].as_str() {
            volume_field(pod, field)?
        } else if item["resourceFieldRef"].is_object() {
            resource_field(pod, &item["resourceFieldRef"], node)?
        } else {
            return Err(format!("downwardAPI item {path:?} has neither fieldRef nor resourceFieldRef"));
        };
        let mode = mode_or(&item["mode"], default_mode)?;
        out.push(FileEntry { path, bytes: text.into_bytes(), mode });
    }
    Ok(out)
}

/// The fieldPaths a downwardAPI volume may use (Kubernetes allows no
/// spec.* or status.* there: they may change without the file following).
fn volume_field(pod: &Value, path: &str) -> Result<String, String> {
    let meta = &pod["metadata"];
    let map = |kind: &str| -> BTreeMap<String, String> {
        meta[kind]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
            .collect()
    };
    let one = |kind: &str| {
        path.strip_prefix(&format!("metadata.{kind}['"))
            .and_then(|r| r.strip_suffix("']"))
            .map(|k| meta[kind][k].as_str().unwrap_or_default().to_string())
    };
    match path {
        "metadata.name" | "metadata.namespace" | "metadata.uid" => {
            Ok(meta[&path["metadata.".len()..]].as_str().unwrap_or_default().to_string())
        }
        "metadata.labels" => Ok(format_map(&map("labels"))),
        "metadata.annotations" => Ok(format_map(&map("annotations"))),
        p => one("labels")
            .or_else(|| one("annotations"))
            .ok_or_else(|| format!("fieldPath {p:?} is not supported in a volume")),
    }
}

/// Labels or annotations as the kubelet writes them: `key="value"` lines
/// sorted by key, values quoted as Go's %q does, no trailing newline.
pub fn format_map(map: &BTreeMap<String, String>) -> String {
    map.iter().map(|(k, v)| format!("{k}={}", go_quote(v))).collect::<Vec<_>>().join("\n")
}

/// Go's `strconv.Quote` for the characters labels and annotations hold.
pub fn go_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\x07' => out.push_str("\\a"),
            '\x08' => out.push_str("\\b"),
            '\x0c' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\x0b' => out.push_str("\\v"),
            c if (c as u32) < 0x20 || c == '\x7f' => out.push_str(&format!("\\x{:02x}", c as u32)),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A container's limit or request, in units of `divisor`, rounded up; an
/// unset limit is the node's allocatable, an unset request the limit
/// given (Kubernetes' defaulting), else 0.
fn resource_field(pod: &Value, r: &Value, node: &NodeInfo) -> Result<String, String> {
    let container = r["containerName"].as_str().unwrap_or_default();
    let resource = r["resource"].as_str().unwrap_or_default();
    let c = ["containers", "initContainers"]
        .iter()
        .flat_map(|list| pod["spec"][*list].as_array().into_iter().flatten())
        .find(|c| c["name"].as_str() == Some(container))
        .ok_or_else(|| format!("resourceFieldRef: container {container:?} not found"))?;
    let divisor = quantity(&r["divisor"]).unwrap_or_else(|| "1".into());
    let (kind, name) = resource.split_once('.').ok_or_else(|| format!("unsupported resource {resource:?}"))?;
    let res = &c["resources"];
    let set = |kind: &str| quantity(&res[kind][name]);
    let cpu = name == "cpu";
    let parse = |q: &str| if cpu { millicores(q) } else { bytes_of(q) };
    let node_value = match name {
        "cpu" => millicores(&node.cpu),
        "memory" => bytes_of(&node.memory),
        "ephemeral-storage" => Some(0),
        n if n.starts_with("hugepages-") => Some(0),
        _ => return Err(format!("unsupported resource {resource:?}")),
    };
    let value = match kind {
        "limits" => set("limits").map_or(node_value, |q| parse(&q)),
        "requests" => set("requests").or_else(|| set("limits")).map_or(Some(0), |q| parse(&q)),
        _ => return Err(format!("unsupported resource {resource:?}")),
    }
    .ok_or_else(|| format!("{resource} of container {container:?} is not a quantity"))?;
    let div = parse(&divisor).filter(|d| *d > 0).ok_or_else(|| format!("invalid divisor {divisor:?}"))?;
    Ok(value.div_ceil(div).to_string())
}
