//! `meta.k8s.io/v1 Table` output: the columns `kubectl get` shows for each
//! kind, computed from the object the way Kubernetes' printers do.
//! Pure: objects and `now` in, cells out.

use chrono::{DateTime, Utc};
use serde_json::{json, Value};

struct Col {
    name: &'static str,
    ty: &'static str,
    priority: u8,
    description: &'static str,
}

const fn col(name: &'static str, ty: &'static str, priority: u8, description: &'static str) -> Col {
    Col { name, ty, priority, description }
}

const NAME: Col = col("Name", "string", 0, "Name must be unique within a namespace.");
const AGE: Col = col(
    "Age",
    "string",
    0,
    "CreationTimestamp is a timestamp representing the server time when this object was created.",
);
const CONTAINERS: Col = col("Containers", "string", 1, "Names of each container in the template.");
const IMAGES: Col = col("Images", "string", 1, "Images referenced by each container in the template.");
const SELECTOR: Col = col("Selector", "string", 1, "Label selector for pods.");

fn columns(kind: &str) -> Vec<Col> {
    let c = |n, t, p| col(n, t, p, "");
    match kind {
        "Pod" => vec![
            NAME,
            c("Ready", "string", 0),
            c("Status", "string", 0),
            c("Restarts", "string", 0),
            AGE,
            c("IP", "string", 1),
            c("Node", "string", 1),
            c("Nominated Node", "string", 1),
            c("Readiness Gates", "string", 1),
        ],
        "Namespace" => vec![NAME, c("Status", "string", 0), AGE],
        "Node" => vec![
            NAME,
            c("Status", "string", 0),
            c("Roles", "string", 0),
            AGE,
            c("Version", "string", 0),
            c("Internal-IP", "string", 1),
            c("External-IP", "string", 1),
            c("OS-Image", "string", 1),
            c("Kernel-Version", "string", 1),
            c("Container-Runtime", "string", 1),
        ],
        "Service" => vec![
            NAME,
            c("Type", "string", 0),
            c("Cluster-IP", "string", 0),
            c("External-IP", "string", 0),
            c("Port(s)", "string", 0),
            AGE,
            SELECTOR,
        ],
        "Endpoints" => vec![NAME, c("Endpoints", "string", 0), AGE],
        "ConfigMap" => vec![NAME, c("Data", "integer", 0), AGE],
        "Secret" => vec![NAME, c("Type", "string", 0), c("Data", "integer", 0), AGE],
        "ServiceAccount" => vec![NAME, c("Secrets", "integer", 0), AGE],
        // Kubernetes' event columns; -o wide adds the priority-1 ones.
        "Event" => vec![
            c("Last Seen", "string", 0),
            c("Type", "string", 0),
            c("Reason", "string", 0),
            c("Object", "string", 0),
            c("Subobject", "string", 1),
            c("Source", "string", 1),
            c("Message", "string", 0),
            c("First Seen", "string", 1),
            c("Count", "string", 1),
            c("Name", "string", 1),
        ],
        "Deployment" => vec![
            NAME,
            c("Ready", "string", 0),
            c("Up-to-date", "integer", 0),
            c("Available", "integer", 0),
            AGE,
            CONTAINERS,
            IMAGES,
            SELECTOR,
        ],
        "ReplicaSet" => vec![
            NAME,
            c("Desired", "integer", 0),
            c("Current", "integer", 0),
            c("Ready", "integer", 0),
            AGE,
            CONTAINERS,
            IMAGES,
            SELECTOR,
        ],
        "DaemonSet" => vec![
            NAME,
            c("Desired", "integer", 0),
            c("Current", "integer", 0),
            c("Ready", "integer", 0),
            c("Up-to-date", "integer", 0),
            c("Available", "integer", 0),
            c("Node Selector", "string", 0),
            AGE,
            CONTAINERS,
            IMAGES,
            SELECTOR,
        ],
        "StatefulSet" => vec![NAME, c("Ready", "string", 0), AGE, CONTAINERS, IMAGES],
        "ControllerRevision" => vec![NAME, c("Controller", "string", 0), c("Revision", "integer", 0), AGE],
        "Job" => vec![
            NAME,
            c("Status", "string", 0),
            c("Completions", "string", 0),
            c("Duration", "string", 0),
            AGE,
            CONTAINERS,
            IMAGES,
            SELECTOR,
        ],
        "CronJob" => vec![
            NAME,
            c("Schedule", "string", 0),
            c("Timezone", "string", 0),
            c("Suspend", "boolean", 0),
            c("Active", "integer", 0),
            c("Last Schedule", "string", 0),
            AGE,
            CONTAINERS,
            IMAGES,
            SELECTOR,
        ],
        "Lease" => vec![NAME, c("Holder", "string", 0), AGE],
        "PersistentVolume" => vec![
            NAME,
            c("Capacity", "string", 0),
            c("Access Modes", "string", 0),
            c("Reclaim Policy", "string", 0),
            c("Status", "string", 0),
            c("Claim", "string", 0),
            c("StorageClass", "string", 0),
            c("VolumeAttributesClass", "string", 0),
            c("Reason", "string", 0),
            AGE,
            c("VolumeMode", "string", 1),
        ],
        "PersistentVolumeClaim" => vec![
            NAME,
            c("Status", "string", 0),
            c("Volume", "string", 0),
            c("Capacity", "string", 0),
            c("Access Modes", "string", 0),
            c("StorageClass", "string", 0),
            c("VolumeAttributesClass", "string", 0),
            AGE,
            c("VolumeMode", "string", 1),
        ],
        "StorageClass" => vec![
            NAME,
            c("Provisioner", "string", 0),
            c("ReclaimPolicy", "string", 0),
            c("VolumeBindingMode", "string", 0),
            c("AllowVolumeExpansion", "string", 0),
            AGE,
        ],
        "PriorityClass" => vec![
            NAME,
            c("Value", "integer", 0),
            c("Global-Default", "boolean", 0),
            AGE,
            c("PreemptionPolicy", "string", 0),
        ],
        "PodDisruptionBudget" => vec![
            NAME,
            c("Min Available", "string", 0),
            c("Max Unavailable", "string", 0),
            c("Allowed Disruptions", "integer", 0),
            AGE,
        ],
        "EndpointSlice" => {
            vec![NAME, c("AddressType", "string", 0), c("Ports", "string", 0), c("Endpoints", "string", 0), AGE]
        }
        "Role" | "ClusterRole" => vec![NAME, c("Created At", "date", 0)],
        "RoleBinding" | "ClusterRoleBinding" => vec![
            NAME,
            c("Role", "string", 0),
            AGE,
            c("Users", "string", 1),
            c("Groups", "string", 1),
            c("ServiceAccounts", "string", 1),
        ],
        "HorizontalPodAutoscaler" => vec![
            NAME,
            c("Reference", "string", 0),
            c("Targets", "string", 0),
            c("MinPods", "string", 0),
            c("MaxPods", "integer", 0),
            c("Replicas", "integer", 0),
            AGE,
        ],
        _ => vec![NAME, AGE],
    }
}

pub fn column_definitions(kind: &str) -> Value {
    Value::Array(
        columns(kind)
            .iter()
            .map(|c| {
                json!({"name": c.name, "type": c.ty, "format": if c.name == "Name" { "name" } else { "" },
                    "description": c.description, "priority": c.priority})
            })
            .collect(),
    )
}

/// A row: cells plus the object as PartialObjectMetadata (kubectl's default
/// `includeObject=Metadata`) or whole (`includeObject=Object`).
pub fn row(kind: &str, mut obj: Value, now: DateTime<Utc>, include_object: &str) -> Value {
    let cells = cells(kind, &obj, now);
    // Move, never copy, the object into the row: lists hold thousands.
    let object = match include_object {
        "Object" => obj,
        "None" => Value::Null,
        _ => {
            let mut m = serde_json::Map::new();
            m.insert("kind".into(), Value::String("PartialObjectMetadata".into()));
            m.insert("apiVersion".into(), Value::String("meta.k8s.io/v1".into()));
            m.insert("metadata".into(), obj["metadata"].take());
            Value::Object(m)
        }
    };
    let mut r = serde_json::Map::new();
    r.insert("cells".into(), Value::Array(cells));
    r.insert("object".into(), object);
    Value::Object(r)
}

pub fn table(kind: &str, rows: Vec<Value>, resource_version: &str, continue_token: Option<&str>) -> Value {
    let mut meta = json!({"resourceVersion": resource_version});
    if let Some(c) = continue_token {
        meta["continue"] = json!(c);
    }
    let mut t = json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": meta,
        "columnDefinitions": column_definitions(kind)});
    // Moved in, not through `json!` (which would copy every row).
    t["rows"] = Value::Array(rows);
    t
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn n(v: &Value) -> i64 {
    v.as_i64().unwrap_or(0)
}

/// Kubernetes' short access modes: `RWO,ROX,RWX,RWOP`.
fn access_modes(v: &Value) -> String {
    let short = |m: &str| match m {
        "ReadWriteOnce" => "RWO".to_string(),
        "ReadOnlyMany" => "ROX".to_string(),
        "ReadWriteMany" => "RWX".to_string(),
        "ReadWriteOncePod" => "RWOP".to_string(),
        other => other.to_string(),
    };
    v.as_array().into_iter().flatten().filter_map(Value::as_str).map(short).collect::<Vec<_>>().join(",")
}

fn volume_mode(v: &Value) -> String {
    if v.is_null() {
        "Filesystem".into()
    } else {
        s(v)
    }
}

fn unset_or(x: String) -> String {
    if x.is_empty() {
        "<unset>".into()
    } else {
        x
    }
}

fn or_none(x: String) -> String {
    if x.is_empty() {
        "<none>".into()
    } else {
        x
    }
}

fn age(ts: &Value, now: DateTime<Utc>) -> String {
    match ts.as_str().and_then(|t| DateTime::parse_from_rfc3339(t).ok()) {
        Some(t) => human_duration((now - t.with_timezone(&Utc)).num_seconds()),
        None => "<unknown>".into(),
    }
}

/// Kubernetes' `duration.HumanDuration`.
pub fn human_duration(secs: i64) -> String {
    if secs < -1 {
        return "<invalid>".into();
    }
    let secs = secs.max(0);
    let (m, h) = (secs / 60, secs / 3600);
    if secs < 120 {
        format!("{secs}s")
    } else if m < 10 {
        if secs % 60 == 0 {
            format!("{m}m")
        } else {
            format!("{m}m{}s", secs % 60)
        }
    } else if m < 180 {
        format!("{m}m")
    } else if h < 8 {
        if m % 60 == 0 {
            format!("{h}h")
        } else {
            format!("{h}h{}m", m % 60)
        }
    } else if h < 48 {
        format!("{h}h")
    } else if h < 24 * 8 {
        if h % 24 == 0 {
            format!("{}d", h / 24)
        } else {
            format!("{}d{}h", h / 24, h % 24)
        }
    } else if h < 24 * 365 * 2 {
        format!("{}d", h / 24)
    } else if h < 24 * 365 * 8 {
        let d = h / 24;
        if d % 365 == 0 {
            format!("{}y", d / 365)
        } else {
            format!("{}y{}d", d / 365, d % 365)
        }
    } else {
        format!("{}y", h / 24 / 365)
    }
}

fn template_columns(spec: &Value) -> (String, String) {
    let cs = spec["template"]["spec"]["containers"].as_array().cloned().unwrap_or_default();
    let names: Vec<String> = cs.iter().map(|c| s(&c["name"])).collect();
    let images: Vec<String> = cs.iter().map(|c| s(&c["image"])).collect();
    (names.join(","), images.join(","))
}

/// `matchLabels` and `matchExpressions` in selector syntax.
pub fn selector_string(sel: &Value) -> String {
    let mut parts: Vec<String> = sel["matchLabels"]
        .as_object()
        .map(|m| m.iter().map(|(k, v)| format!("{k}={}", s(v))).collect())
        .unwrap_or_default();
    for e in sel["matchExpressions"].as_array().into_iter().flatten() {
        let vals: Vec<String> = e["values"].as_array().into_iter().flatten().map(s).collect();
        let key = s(&e["key"]);
        parts.push(match e["operator"].as_str().unwrap_or_default() {
            "In" => format!("{key} in ({})", vals.join(",")),
            "NotIn" => format!("{key} notin ({})", vals.join(",")),
            "Exists" => key,
            "DoesNotExist" => format!("!{key}"),
            _ => String::new(),
        });
    }
    parts.join(",")
}

fn cells(kind: &str, o: &Value, now: DateTime<Utc>) -> Vec<Value> {
    let meta = &o["metadata"];
    let name = json!(s(&meta["name"]));
    let created = age(&meta["creationTimestamp"], now);
    let (spec, status) = (&o["spec"], &o["status"]);
    match kind {
        "Pod" => pod_cells(o, now),
        "Namespace" => vec![name, json!(s(&status["phase"])), json!(created)],
        "Node" => {
            let ready = status["conditions"].as_array().into_iter().flatten().find(|c| c["type"] == "Ready");
            let mut st = match ready.map(|c| s(&c["status"])) {
                Some(x) if x == "True" => "Ready".to_string(),
                Some(x) if x == "False" => "NotReady".to_string(),
                _ => "Unknown".to_string(),
            };
            if spec["unschedulable"] == true {
                st.push_str(",SchedulingDisabled");
            }
            let roles: Vec<String> = meta["labels"]
                .as_object()
                .into_iter()
                .flatten()
                .filter_map(|(k, _)| k.strip_prefix("node-role.kubernetes.io/").map(str::to_string))
                .collect();
            let addr = |t: &str| {
                status["addresses"].as_array().into_iter().flatten().find(|a| a["type"] == t).map(|a| s(&a["address"]))
            };
            let info = &status["nodeInfo"];
            vec![
                name,
                json!(st),
                json!(or_none(roles.join(","))),
                json!(created),
                json!(s(&info["kubeletVersion"])),
                json!(addr("InternalIP").unwrap_or("<none>".into())),
                json!(addr("ExternalIP").unwrap_or("<none>".into())),
                json!(s(&info["osImage"])),
                json!(s(&info["kernelVersion"])),
                json!(s(&info["containerRuntimeVersion"])),
            ]
        }
        "Service" => {
            let ports: Vec<String> = spec["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| match p["nodePort"].as_i64() {
                    Some(np) => format!("{}:{np}/{}", n(&p["port"]), s(&p["protocol"])),
                    None => format!("{}/{}", n(&p["port"]), s(&p["protocol"])),
                })
                .collect();
            let ext: Vec<String> = spec["externalIPs"].as_array().into_iter().flatten().map(s).collect();
            let ext = match (s(&spec["type"]).as_str(), ext.is_empty()) {
                ("LoadBalancer", true) => "<pending>".to_string(),
                ("ExternalName", _) => s(&spec["externalName"]),
                _ => or_none(ext.join(",")),
            };
            let sel = spec["selector"]
                .as_object()
                .map(|m| m.iter().map(|(k, v)| format!("{k}={}", s(v))).collect::<Vec<_>>().join(","))
                .unwrap_or_default();
            vec![
                name,
                json!(s(&spec["type"])),
                json!(or_none(s(&spec["clusterIP"]))),
                json!(ext),
                json!(or_none(ports.join(","))),
                json!(created),
                json!(or_none(sel)),
            ]
        }
        "Endpoints" => {
            let mut eps = Vec::new();
            for sub in o["subsets"].as_array().into_iter().flatten() {
                for a in sub["addresses"].as_array().into_iter().flatten() {
                    match sub["ports"].as_array().filter(|p| !p.is_empty()) {
                        Some(ports) => {
                            ports.iter().for_each(|p| eps.push(format!("{}:{}", s(&a["ip"]), n(&p["port"]))))
                        }
                        None => eps.push(s(&a["ip"])),
                    }
                }
            }
            let shown = if eps.len() > 3 {
                format!("{} + {} more...", eps[..3].join(","), eps.len() - 3)
            } else {
                eps.join(",")
            };
            vec![name, json!(or_none(shown)), json!(created)]
        }
        "ConfigMap" => {
            let count =
                o["data"].as_object().map_or(0, |m| m.len()) + o["binaryData"].as_object().map_or(0, |m| m.len());
            vec![name, json!(count), json!(created)]
        }
        "Secret" => {
            vec![name, json!(s(&o["type"])), json!(o["data"].as_object().map_or(0, |m| m.len())), json!(created)]
        }
        "ServiceAccount" => vec![name, json!(o["secrets"].as_array().map_or(0, |a| a.len())), json!(created)],
        "Event" => {
            // Kubernetes' printEvent: first seen falls back to eventTime,
            // last seen to first seen; a series carries the latest.
            let first = if o["firstTimestamp"].is_string() { &o["firstTimestamp"] } else { &o["eventTime"] };
            let first = if first.is_string() { first } else { &meta["creationTimestamp"] };
            let last = if o["lastTimestamp"].is_string() { &o["lastTimestamp"] } else { first };
            let series = &o["series"];
            let last = if series.is_object() { &series["lastObservedTime"] } else { last };
            let count = if series.is_object() { n(&series["count"]) } else { n(&o["count"]) }.max(1);
            let io = &o["involvedObject"];
            let kind = s(&io["kind"]).to_lowercase();
            let target = if s(&io["name"]).is_empty() { kind } else { format!("{kind}/{}", s(&io["name"])) };
            let or = |a: &Value, b: &Value| if s(a).is_empty() { s(b) } else { s(a) };
            let component = or(&o["source"]["component"], &o["reportingComponent"]);
            let instance = or(&o["source"]["host"], &o["reportingInstance"]);
            let source = if instance.is_empty() { component } else { format!("{component}, {instance}") };
            vec![
                json!(age(last, now)),
                json!(s(&o["type"])),
                json!(s(&o["reason"])),
                json!(target),
                json!(s(&io["fieldPath"])),
                json!(source),
                json!(s(&o["message"]).trim()),
                json!(age(first, now)),
                json!(count),
                name,
            ]
        }
        "Deployment" => {
            let (c, i) = template_columns(spec);
            vec![
                name,
                json!(format!("{}/{}", n(&status["readyReplicas"]), n(&spec["replicas"]))),
                json!(n(&status["updatedReplicas"])),
                json!(n(&status["availableReplicas"])),
                json!(created),
                json!(c),
                json!(i),
                json!(selector_string(&spec["selector"])),
            ]
        }
        "ReplicaSet" => {
            let (c, i) = template_columns(spec);
            vec![
                name,
                json!(n(&spec["replicas"])),
                json!(n(&status["replicas"])),
                json!(n(&status["readyReplicas"])),
                json!(created),
                json!(c),
                json!(i),
                json!(selector_string(&spec["selector"])),
            ]
        }
        "DaemonSet" => {
            let (c, i) = template_columns(spec);
            let ns = spec["template"]["spec"]["nodeSelector"]
                .as_object()
                .map(|m| m.iter().map(|(k, v)| format!("{k}={}", s(v))).collect::<Vec<_>>().join(","))
                .unwrap_or_default();
            vec![
                name,
                json!(n(&status["desiredNumberScheduled"])),
                json!(n(&status["currentNumberScheduled"])),
                json!(n(&status["numberReady"])),
                json!(n(&status["updatedNumberScheduled"])),
                json!(n(&status["numberAvailable"])),
                json!(or_none(ns)),
                json!(created),
                json!(c),
                json!(i),
                json!(selector_string(&spec["selector"])),
            ]
        }
        "StatefulSet" => {
            let (c, i) = template_columns(spec);
            vec![
                name,
                json!(format!("{}/{}", n(&status["readyReplicas"]), n(&spec["replicas"]))),
                json!(created),
                json!(c),
                json!(i),
            ]
        }
        "ControllerRevision" => {
            let owner = meta["ownerReferences"].as_array().into_iter().flatten().find(|r| r["controller"] == true);
            let ctl = owner
                .map(|r| {
                    format!(
                        "{}.{}/{}",
                        s(&r["kind"]).to_lowercase(),
                        s(&r["apiVersion"]).split('/').next().unwrap_or_default(),
                        s(&r["name"])
                    )
                })
                .unwrap_or("<none>".into());
            vec![name, json!(ctl), json!(n(&o["revision"])), json!(created)]
        }
        "Job" => {
            let (c, i) = template_columns(spec);
            let conds = status["conditions"].as_array().cloned().unwrap_or_default();
            let has = |t: &str| conds.iter().any(|c| c["type"] == t && c["status"] == "True");
            let st = if has("Complete") {
                "Complete"
            } else if has("Failed") {
                "Failed"
            } else if has("Suspended") {
                "Suspended"
            } else if meta["deletionTimestamp"].is_string() {
                "Terminating"
            } else {
                "Running"
            };
            let completions = match spec["completions"].as_i64() {
                Some(c) => format!("{}/{c}", n(&status["succeeded"])),
                None => format!("{}/1 of {}", n(&status["succeeded"]), n(&spec["parallelism"])),
            };
            let dur = match (status["startTime"].as_str(), status["completionTime"].as_str()) {
                (Some(st), Some(ct)) => match (DateTime::parse_from_rfc3339(st), DateTime::parse_from_rfc3339(ct)) {
                    (Ok(a), Ok(b)) => human_duration((b - a).num_seconds()),
                    _ => String::new(),
                },
                (Some(_), None) => age(&status["startTime"], now),
                _ => String::new(),
            };
            vec![
                name,
                json!(st),
                json!(completions),
                json!(dur),
                json!(created),
                json!(c),
                json!(i),
                json!(selector_string(&spec["selector"])),
            ]
        }
        "CronJob" => {
            let (c, i) = template_columns(&spec["jobTemplate"]["spec"]);
            let last = if status["lastScheduleTime"].is_string() {
                age(&status["lastScheduleTime"], now)
            } else {
                "<none>".into()
            };
            vec![
                name,
                json!(s(&spec["schedule"])),
                json!(or_none(s(&spec["timeZone"]))),
                json!(spec["suspend"] == true),
                json!(status["active"].as_array().map_or(0, |a| a.len())),
                json!(last),
                json!(created),
                json!(c),
                json!(i),
                json!(selector_string(&spec["jobTemplate"]["spec"]["selector"])),
            ]
        }
        "Lease" => vec![name, json!(s(&spec["holderIdentity"])), json!(created)],
        "PersistentVolume" => {
            let claim = &spec["claimRef"];
            let claim = if claim.is_object() {
                format!("{}/{}", s(&claim["namespace"]), s(&claim["name"]))
            } else {
                String::new()
            };
            vec![
                name,
                json!(s(&spec["capacity"]["storage"])),
                json!(access_modes(&spec["accessModes"])),
                json!(s(&spec["persistentVolumeReclaimPolicy"])),
                json!(s(&status["phase"])),
                json!(claim),
                json!(s(&spec["storageClassName"])),
                json!(unset_or(s(&spec["volumeAttributesClassName"]))),
                json!(s(&status["reason"])),
                json!(created),
                json!(volume_mode(&spec["volumeMode"])),
            ]
        }
        "PersistentVolumeClaim" => {
            // Capacity and modes are the bound volume's, so empty until bound.
            let phase = if meta["deletionTimestamp"].is_string() { "Terminating".into() } else { s(&status["phase"]) };
            vec![
                name,
                json!(phase),
                json!(s(&spec["volumeName"])),
                json!(s(&status["capacity"]["storage"])),
                json!(access_modes(&status["accessModes"])),
                json!(s(&spec["storageClassName"])),
                json!(unset_or(s(&spec["volumeAttributesClassName"]))),
                json!(created),
                json!(volume_mode(&spec["volumeMode"])),
            ]
        }
        "StorageClass" => {
            let mut shown = s(&meta["name"]);
            if crate::api::storage::is_default_class(o) {
                shown.push_str(" (default)");
            }
            vec![
                json!(shown),
                json!(s(&o["provisioner"])),
                json!(if o["reclaimPolicy"].is_null() { "Delete".into() } else { s(&o["reclaimPolicy"]) }),
                json!(if o["volumeBindingMode"].is_null() { "Immediate".into() } else { s(&o["volumeBindingMode"]) }),
                json!(o["allowVolumeExpansion"] == true),
                json!(created),
            ]
        }
        "PriorityClass" => vec![
            name,
            o["value"].clone(),
            json!(o["globalDefault"] == true),
            json!(created),
            json!(s(&o["preemptionPolicy"])),
        ],
        "PodDisruptionBudget" => vec![
            name,
            json!(if spec["minAvailable"].is_null() { "N/A".into() } else { s(&spec["minAvailable"]) }),
            json!(if spec["maxUnavailable"].is_null() { "N/A".into() } else { s(&spec["maxUnavailable"]) }),
            json!(n(&status["disruptionsAllowed"])),
            json!(created),
        ],
        "EndpointSlice" => {
            let ports: Vec<String> =
                o["ports"].as_array().into_iter().flatten().map(|p| n(&p["port"]).to_string()).collect();
            let eps: Vec<String> = o["endpoints"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|e| e["addresses"].as_array().cloned().unwrap_or_default())
                .map(|a| s(&a))
                .collect();
            vec![
                name,
                json!(s(&o["addressType"])),
                json!(or_none(ports.join(","))),
                json!(or_none(eps.join(","))),
                json!(created),
            ]
        }
        "Role" | "ClusterRole" => vec![name, json!(s(&meta["creationTimestamp"]))],
        "RoleBinding" | "ClusterRoleBinding" => {
            let subj = |k: &str| {
                o["subjects"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|x| x["kind"] == k)
                    .map(|x| {
                        if k == "ServiceAccount" {
                            format!("{}/{}", s(&x["namespace"]), s(&x["name"]))
                        } else {
                            s(&x["name"])
                        }
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            vec![
                name,
                json!(format!("{}/{}", s(&o["roleRef"]["kind"]), s(&o["roleRef"]["name"]))),
                json!(created),
                json!(subj("User")),
                json!(subj("Group")),
                json!(subj("ServiceAccount")),
            ]
        }
        "HorizontalPodAutoscaler" => {
            let r = &spec["scaleTargetRef"];
            // As Kubernetes prints them: `cpu: 40%/50%`, `128Mi/64Mi`; the
            // current value from status.currentMetrics (same order) or <unknown>.
            let current = status["currentMetrics"].as_array().cloned().unwrap_or_default();
            let targets: Vec<String> = spec["metrics"]
                .as_array()
                .into_iter()
                .flatten()
                .enumerate()
                .map(|(i, m)| {
                    let t = &m["resource"]["target"];
                    let now = &current.get(i).cloned().unwrap_or_default()["resource"]["current"];
                    match t["averageUtilization"].as_i64() {
                        Some(u) => {
                            let cur = now["averageUtilization"]
                                .as_i64()
                                .map_or_else(|| "<unknown>".to_string(), |c| format!("{c}%"));
                            format!("{}: {cur}/{u}%", s(&m["resource"]["name"]))
                        }
                        None => {
                            let cur = now["averageValue"].as_str().unwrap_or("<unknown>");
                            format!("{cur}/{}", s(&t["averageValue"]))
                        }
                    }
                })
                .collect();
            vec![
                name,
                json!(format!("{}/{}", s(&r["kind"]), s(&r["name"]))),
                json!(or_none(targets.join(", "))),
                json!(n(&spec["minReplicas"]).max(1).to_string()),
                json!(n(&spec["maxReplicas"])),
                json!(n(&status["currentReplicas"])),
                json!(created),
            ]
        }
        _ => vec![name, json!(created)],
    }
}

/// Kubernetes' pod printer: READY, STATUS (the most telling reason), RESTARTS.
fn pod_cells(o: &Value, now: DateTime<Utc>) -> Vec<Value> {
    let (meta, spec, status) = (&o["metadata"], &o["spec"], &o["status"]);
    let total = spec["containers"].as_array().map_or(0, |c| c.len());
    let statuses = status["containerStatuses"].as_array().cloned().unwrap_or_default();
    let ready = statuses.iter().filter(|c| c["ready"] == true).count();
    let restarts: i64 = statuses.iter().map(|c| n(&c["restartCount"])).sum();
    let mut reason = if status["reason"].is_string() { s(&status["reason"]) } else { s(&status["phase"]) };
    let inits = status["initContainerStatuses"].as_array().cloned().unwrap_or_default();
    let init_total = spec["initContainers"].as_array().map_or(0, |c| c.len());
    let mut initializing = false;
    for (i, c) in inits.iter().enumerate() {
        let st = &c["state"];
        if st["terminated"]["exitCode"] == 0 && st["terminated"].is_object() {
            continue;
        }
        initializing = true;
        reason = if st["terminated"].is_object() {
            if st["terminated"]["reason"].is_string() {
                format!("Init:{}", s(&st["terminated"]["reason"]))
            } else {
                format!("Init:ExitCode:{}", n(&st["terminated"]["exitCode"]))
            }
        } else if st["waiting"]["reason"].is_string() && st["waiting"]["reason"] != "PodInitializing" {
            format!("Init:{}", s(&st["waiting"]["reason"]))
        } else {
            format!("Init:{i}/{init_total}")
        };
        break;
    }
    if !initializing {
        let mut running = false;
        for c in statuses.iter().rev() {
            let st = &c["state"];
            if st["waiting"]["reason"].is_string() {
                reason = s(&st["waiting"]["reason"]);
            } else if st["terminated"]["reason"].is_string() {
                reason = s(&st["terminated"]["reason"]);
            } else if st["terminated"].is_object() {
                reason = if st["terminated"]["signal"].as_i64().unwrap_or(0) != 0 {
                    format!("Signal:{}", n(&st["terminated"]["signal"]))
                } else {
                    format!("ExitCode:{}", n(&st["terminated"]["exitCode"]))
                };
            } else if c["ready"] == true && st["running"].is_object() {
                running = true;
            }
        }
        if reason == "Completed" && running {
            reason = "Running".into();
        }
    }
    if meta["deletionTimestamp"].is_string() {
        reason = if status["reason"] == "NodeLost" { "Unknown".into() } else { "Terminating".into() };
    }
    let gates = spec["readinessGates"].as_array().map_or(0, |g| g.len());
    vec![
        json!(s(&meta["name"])),
        json!(format!("{ready}/{total}")),
        json!(reason),
        json!(restarts.to_string()),
        json!(age(&meta["creationTimestamp"], now)),
        json!(or_none(s(&status["podIP"]))),
        json!(or_none(s(&spec["nodeName"]))),
        json!(or_none(s(&status["nominatedNodeName"]))),
        json!(if gates == 0 { "<none>".to_string() } else { format!("0/{gates}") }),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_durations_match_kubernetes() {
        for (secs, want) in [
            (5, "5s"),
            (119, "119s"),
            (125, "2m5s"),
            (600, "10m"),
            (3 * 3600 + 60, "3h1m"),
            (10 * 3600, "10h"),
            (50 * 3600, "2d2h"),
            (30 * 86400, "30d"),
            (800 * 86400, "2y70d"),
        ] {
            assert_eq!(human_duration(secs), want);
        }
    }

    #[test]
    fn every_row_has_one_cell_per_column() {
        let now = Utc::now();
        let obj = json!({"metadata": {"name": "x", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"replicas": 3, "selector": {"matchLabels": {"a": "b"}}, "template": {"spec": {"containers": [{"name": "c", "image": "i"}]}}},
            "status": {"readyReplicas": 2}});
        for rt in capstan_proto::k8s::registry::all() {
            let r = row(rt.kind, obj.clone(), now, "Metadata");
            assert_eq!(r["cells"].as_array().unwrap().len(), columns(rt.kind).len(), "{}", rt.kind);
        }
        assert_eq!(cells("Deployment", &obj, now)[1], "2/3");
        assert_eq!(selector_string(&obj["spec"]["selector"]), "a=b");
    }

    #[test]
    fn pod_status_prefers_the_telling_reason() {
        let now = Utc::now();
        let pod = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "a"}]},
            "status": {"phase": "Running", "containerStatuses": [{"ready": false, "restartCount": 4,
              "state": {"waiting": {"reason": "CrashLoopBackOff"}}}]}});
        let c = pod_cells(&pod, now);
        assert_eq!((c[1].as_str(), c[2].as_str(), c[3].as_str()), (Some("0/1"), Some("CrashLoopBackOff"), Some("4")));
    }

    #[test]
    fn event_rows_are_kubernetes_printevent() {
        let now = DateTime::parse_from_rfc3339("2026-01-01T00:10:00Z").unwrap().with_timezone(&Utc);
        let e = json!({"metadata": {"name": "stuck.1a2b", "namespace": "d"},
            "involvedObject": {"kind": "Pod", "name": "stuck", "namespace": "d"},
            "reason": "FailedScheduling", "message": "0/1 nodes are available ", "type": "Warning",
            "source": {"component": "default-scheduler"},
            "firstTimestamp": "2026-01-01T00:00:00Z", "lastTimestamp": "2026-01-01T00:09:30Z", "count": 4});
        let c = cells("Event", &e, now);
        let want = ["30s", "Warning", "FailedScheduling", "pod/stuck", "", "default-scheduler"];
        assert_eq!(c[..6], want.map(|w| json!(w)));
        assert_eq!(c[6..], [json!("0/1 nodes are available"), json!("10m"), json!(4), json!("stuck.1a2b")]);
        // New-API events: eventTime and the reporting controller stand in.
        let e = json!({"metadata": {"name": "n"}, "involvedObject": {"kind": "Node"}, "eventTime": "2026-01-01T00:09:00.000000Z",
            "reportingComponent": "kubelet", "reportingInstance": "n1", "type": "Normal", "reason": "Starting"});
        let c = cells("Event", &e, now);
        assert_eq!((&c[0], &c[3], &c[5], &c[8]), (&json!("60s"), &json!("node"), &json!("kubelet, n1"), &json!(1)));
    }
}
