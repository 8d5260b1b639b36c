//! The verbs on stored kinds and their subresources. Each handler decodes,
//! runs admission, and writes through [`Objects`]; none holds state.

use std::sync::Arc;

use capstan_proto::k8s::fields::unknown_fields;
use capstan_proto::k8s::registry::{self, ResourceType};
use capstan_proto::k8s::stored::StoredObject;
use http::StatusCode;
use serde_json::{json, Value};

use capstan_raft::types::KeyValue;

use super::objects::{ns_name, Found};
use super::patch::{self, PatchType};
use super::rbac::Attributes;
use super::request::ResourceRequest;
use super::selector::{FieldSelector, LabelSelector};
use super::status::{success, ApiError};
use super::{admission, discovery, table, ApiServer, Ctx, Reply, ReplyBody};

/// Content type of a Table answer.
pub const TABLE_CT: &str = "application/json;as=Table;v=v1;g=meta.k8s.io";

pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

pub fn random_suffix() -> String {
    // Kubernetes' generateName alphabet: no vowels, no look-alikes.
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    use rand::Rng;
    let mut r = rand::thread_rng();
    (0..5).map(|_| ALPHABET[r.gen_range(0..ALPHABET.len())] as char).collect()
}

pub fn wants_table(accept: &str) -> bool {
    accept.split(',').next().is_some_and(|a| a.contains("as=Table"))
}

pub async fn resource(api: Arc<ApiServer>, r: ResourceRequest, ctx: Ctx) -> Result<Reply, ApiError> {
    if super::hpa_v1::is_v1(&r) {
        return super::hpa_v1::serve(api, r, ctx).await;
    }
    if r.group == super::resource_metrics::GROUP {
        return super::resource_metrics::serve(&api, r, &ctx).await;
    }
    if let Some(kind) = discovery::is_virtual(&r.group, &r.version, &r.resource) {
        if r.verb != "create" {
            return Err(ApiError::method_not_allowed(format!("{kind} supports only create")));
        }
        return review(&api, kind, &ctx);
    }
    let rt = registry::by_plural(&r.group, &r.version, &r.resource)
        .ok_or_else(|| ApiError::new(404, "NotFound", "the server could not find the requested resource"))?;
    if let Some(sub) = &r.subresource {
        if !rt.subresources.contains(&sub.as_str()) {
            return Err(ApiError::new(404, "NotFound", "the server could not find the requested resource"));
        }
    }
    let ns = if rt.namespaced { r.namespace.clone() } else { None };
    if rt.namespaced && ns.is_none() && !matches!(r.verb, "list" | "watch") {
        return Err(ApiError::new(404, "NotFound", "the server could not find the requested resource"));
    }
    if let Some(name) = &r.name {
        admission::check_name(rt.kind, name).map_err(|_| ApiError::not_found(rt.group, rt.plural, name))?;
    }
    let attrs = Attributes::Resource {
        verb: r.verb.to_string(),
        group: r.group.clone(),
        resource: r.resource.clone(),
        subresource: r.subresource.clone(),
        namespace: ns.clone(),
        name: r.name.clone(),
    };
    api.authorize(&ctx.user, &attrs)?;
    let ns = ns.as_deref();
    let name = r.name.as_deref().unwrap_or_default();
    match (r.verb, r.subresource.as_deref()) {
        ("get", None | Some("status" | "ephemeralcontainers")) => get(&api, rt, ns, name, &ctx).await,
        ("list", None) => list(&api, rt, ns, &ctx).await,
        ("watch", None) => super::watch::watch(api, rt, ns, r.name.clone(), ctx).await,
        ("create", None) => create(&api, rt, ns, &ctx).await,
        ("update", None | Some("status" | "ephemeralcontainers")) => {
            update(&api, rt, ns, name, r.subresource.as_deref(), &ctx).await
        }
        ("patch", None | Some("status" | "ephemeralcontainers")) => {
            patch(&api, rt, ns, name, r.subresource.as_deref(), &ctx).await
        }
        ("delete", None) => delete(&api, rt, ns, name, &ctx).await,
        ("deletecollection", None) => delete_collection(&api, rt, ns, &ctx).await,
        ("get" | "update" | "patch", Some("scale")) => scale(&api, rt, ns, name, r.verb, &ctx).await,
        ("create", Some("binding")) => binding(&api, rt, ns, name, &ctx).await,
        ("create", Some("eviction")) => eviction(&api, rt, ns, name).await,
        ("create", Some("token")) => {
            super::serviceaccount::token_request(&api, ns.unwrap_or_default(), name, &ctx).await
        }
        ("get" | "create", Some("portforward")) => {
            let pod = current(&api, rt, ns, name).await?.object;
            let Some(node) = pod["spec"]["nodeName"].as_str().filter(|n| !n.is_empty()) else {
                return Err(ApiError::bad_request(format!("pod {name} does not have a host assigned")));
            };
            super::portforward::serve(&api, node, ns.unwrap_or_default(), name, ctx).await
        }
        ("get", Some("log")) | ("get" | "create", Some("exec" | "attach")) => {
            node_stream(&api, rt, ns, name, r.subresource.as_deref().unwrap_or_default(), ctx).await
        }
        ("update", Some("finalize")) => update(&api, rt, ns, name, Some("finalize"), &ctx).await,
        (verb, sub) => Err(ApiError::method_not_allowed(format!(
            "{verb} is not supported on {}{}",
            rt.plural,
            sub.map(|s| format!("/{s}")).unwrap_or_default()
        ))),
    }
}

// ---------------------------------------------------------------------------
// Decoding.

pub(super) fn decode_body(ctx: &Ctx) -> Result<Value, ApiError> {
    if ctx.body.is_empty() {
        return Err(ApiError::bad_request("the request body is empty"));
    }
    let ct = ctx.content_type.split(';').next().unwrap_or_default().trim();
    let v: Value = match ct {
        ""
        | "application/json"
        | "*/*"
        | "application/json-patch+json"
        | "application/merge-patch+json"
        | "application/strategic-merge-patch+json" => serde_json::from_slice(&ctx.body)
            .map_err(|e| ApiError::bad_request(format!("error decoding JSON body: {e}")))?,
        "application/yaml" | "application/apply-patch+yaml" | "text/yaml" => serde_norway::from_slice(&ctx.body)
            .map_err(|e| ApiError::bad_request(format!("error decoding YAML body: {e}")))?,
        "application/vnd.kubernetes.protobuf" => {
            capstan_proto::k8s::protobuf::decode(&ctx.body).map_err(|e| match e {
                capstan_proto::k8s::protobuf::ProtobufError::UnknownKind(_) => {
                    ApiError::unsupported_media(&e.to_string())
                }
                other => ApiError::bad_request(other.to_string()),
            })?
        }
        other => return Err(ApiError::unsupported_media(other)),
    };
    Ok(v)
}

/// The body's apiVersion/kind, if given, must name the endpoint's kind.
fn check_type(rt: &ResourceType, v: &Value) -> Result<(), ApiError> {
    if !v.is_object() {
        return Err(ApiError::bad_request(format!("the body must be a {} object", rt.kind)));
    }
    let av = v["apiVersion"].as_str().unwrap_or_default();
    let kind = v["kind"].as_str().unwrap_or_default();
    if (!av.is_empty() && av != rt.api_version()) || (!kind.is_empty() && kind != rt.kind) {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({av}) or kind ({kind}) does not match the expected {} {}",
            rt.api_version(),
            rt.kind
        )));
    }
    Ok(())
}

/// Typed decode, then `fieldValidation`: Strict rejects unknown fields,
/// Warn (the default) drops them with a warning each, Ignore drops them.
pub(super) fn normalize(rt: &ResourceType, input: &Value, ctx: &Ctx) -> Result<(Value, Vec<String>), ApiError> {
    let normalized = (rt.normalize)(input).map_err(|e| {
        ApiError::bad_request(format!(
            "{} in version \"{}\" cannot be handled as a {}: {e}",
            rt.kind, rt.version, rt.kind
        ))
    })?;
    let unknown = unknown_fields(input, &normalized);
    let mode = ctx.query.get("fieldValidation").unwrap_or("Warn");
    let mut warnings = Vec::new();
    match mode {
        "Strict" if !unknown.is_empty() => {
            let name = input["metadata"]["name"].as_str().unwrap_or_default();
            let causes =
                unknown.iter().map(|f| (f.clone(), format!("strict decoding error: unknown field \"{f}\""))).collect();
            return Err(ApiError::invalid(rt.kind, name, causes));
        }
        "Strict" | "Ignore" => {}
        "Warn" => warnings.extend(unknown.iter().map(|f| format!("unknown field \"{f}\""))),
        other => {
            return Err(ApiError::bad_request(format!(
                "invalid fieldValidation {other:?}: expected Ignore, Warn or Strict"
            )))
        }
    }
    warnings.extend(admission::not_acted_on(rt.kind, &normalized));
    Ok((normalized, warnings))
}

/// The body, checked and normalized: [`normalize`] of [`decode_body`],
/// straight from the text when it is JSON with nothing to drop (most
/// creates: the body is never built as a `Value`).
fn normalize_body(rt: &ResourceType, ctx: &Ctx) -> Result<(Value, Vec<String>), ApiError> {
    let ct = ctx.content_type.split(';').next().unwrap_or_default().trim();
    let json = matches!(ct, "" | "application/json" | "*/*");
    let mode_known = matches!(ctx.query.get("fieldValidation"), None | Some("Strict" | "Warn" | "Ignore"));
    // The typed decode checks apiVersion and kind as check_type does.
    if let Some(obj) = (json && mode_known).then(|| (rt.normalize_exact)(&ctx.body)).flatten() {
        let warnings = admission::not_acted_on(rt.kind, &obj);
        return Ok((obj, warnings));
    }
    let input = decode_body(ctx)?;
    check_type(rt, &input)?;
    normalize(rt, &input, ctx)
}

fn dry_run(ctx: &Ctx) -> Result<bool, ApiError> {
    match ctx.query.get("dryRun") {
        None => Ok(false),
        Some("All") => Ok(true),
        Some(other) => Err(ApiError::bad_request(format!("unsupported dryRun value {other:?}: only All"))),
    }
}

fn object_reply(code: StatusCode, obj: Value, warnings: Vec<String>) -> Reply {
    Reply { code, body: ReplyBody::Json(obj), warnings }
}

// ---------------------------------------------------------------------------
// Reads.

fn stale_ok(ctx: &Ctx) -> bool {
    ctx.query.get("resourceVersion") == Some("0")
}

async fn get(api: &ApiServer, rt: &ResourceType, ns: Option<&str>, name: &str, ctx: &Ctx) -> Result<Reply, ApiError> {
    if !stale_ok(ctx) {
        api.objects.sync().await?;
    }
    let found = api.objects.get_local(rt, ns, name)?.ok_or_else(|| ApiError::not_found(rt.group, rt.plural, name))?;
    if wants_table(&ctx.accept) {
        let rv = found.mod_revision.to_string();
        let row =
            table::row(rt.kind, found.object, chrono::Utc::now(), ctx.query.get("includeObject").unwrap_or("Metadata"));
        return table_reply(table::table(rt.kind, vec![row], &rv, None));
    }
    Ok(Reply::ok(found.object))
}

fn table_reply(v: Value) -> Result<Reply, ApiError> {
    let bytes = serde_json::to_vec(&v).map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(Reply { code: StatusCode::OK, body: ReplyBody::Raw(bytes.into(), TABLE_CT), warnings: vec![] })
}

/// Selectors of a list, watch or deletecollection (the default: everything).
#[derive(Default)]
pub struct Filter {
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl Filter {
    pub fn from_query(rt: &ResourceType, ctx: &Ctx) -> Result<Filter, ApiError> {
        let labels = LabelSelector::parse(ctx.query.get("labelSelector").unwrap_or_default())
            .map_err(|e| ApiError::bad_request(format!("unable to parse requirement: {e}")))?;
        let fields =
            FieldSelector::parse(ctx.query.get("fieldSelector").unwrap_or_default()).map_err(ApiError::bad_request)?;
        fields.check_supported(rt.kind).map_err(ApiError::bad_request)?;
        Ok(Filter { labels, fields })
    }

    /// The object if it matches, decoded whole.
    pub fn select(&self, kv: &KeyValue) -> Result<Option<Value>, ApiError> {
        self.select_shaped(kv, super::project::Shape::All)
    }

    /// The object if it matches, decoded as far as `shape` says.
    pub fn select_shaped(&self, kv: &KeyValue, shape: super::project::Shape) -> Result<Option<Value>, ApiError> {
        if !self.matches_stored(&kv.value)? {
            return Ok(None);
        }
        let a = capstan_proto::k8s::stored::StoredObject::access(&kv.value)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let mut v = super::project::decode(&a.json, shape).map_err(|e| ApiError::internal(e.to_string()))?;
        v["metadata"]["resourceVersion"] = Value::String(kv.mod_revision.to_string());
        Ok(Some(v))
    }

    /// Decides from the archived index fields alone when it can (labels),
    /// so non-matching objects are never decoded.
    pub fn matches_stored(&self, value: &[u8]) -> Result<bool, ApiError> {
        let a =
            capstan_proto::k8s::stored::StoredObject::access(value).map_err(|e| ApiError::internal(e.to_string()))?;
        let ok = self.labels.matches(|k| a.labels.iter().find(|t| t.0.as_str() == k).map(|t| t.1.as_str()));
        if !ok || self.fields.is_empty() {
            return Ok(ok);
        }
        let v: Value = serde_json::from_slice(&a.json).map_err(|e| ApiError::internal(e.to_string()))?;
        Ok(self.fields.matches(&v))
    }
}

async fn list(api: &ApiServer, rt: &ResourceType, ns: Option<&str>, ctx: &Ctx) -> Result<Reply, ApiError> {
    let filter = Filter::from_query(rt, ctx)?;
    let limit = match ctx.query.get("limit") {
        Some(l) => Some(l.parse::<i64>().map_err(|_| ApiError::bad_request(format!("invalid limit {l:?}")))?),
        None => None,
    };
    if !stale_ok(ctx) && ctx.query.get("continue").is_none() {
        api.objects.sync().await?;
    }
    let table = wants_table(&ctx.accept);
    let include = ctx.query.get("includeObject").unwrap_or("Metadata");
    let shape =
        if table && include != "Object" { super::project::table_shape(rt.kind) } else { super::project::Shape::All };
    let page =
        api.objects.list_local(rt, ns, limit, ctx.query.get("continue"), &|kv| filter.select_shaped(kv, shape))?;
    let rv = page.revision.to_string();
    if table {
        let now = chrono::Utc::now();
        let include = ctx.query.get("includeObject").unwrap_or("Metadata");
        let rows = page.items.into_iter().map(|o| table::row(rt.kind, o, now, include)).collect();
        return table_reply(table::table(rt.kind, rows, &rv, page.continue_token.as_deref()));
    }
    let mut meta = json!({"resourceVersion": rv});
    if let Some(c) = page.continue_token {
        meta["continue"] = json!(c);
    }
    Ok(Reply::ok(list_object(rt, meta, page.items)))
}

/// A `<Kind>List`; the items are moved in (`json!` would copy each one).
fn list_object(rt: &ResourceType, meta: Value, items: Vec<Value>) -> Value {
    let mut l = json!({"kind": rt.list_kind, "apiVersion": rt.api_version(), "metadata": meta});
    l["items"] = Value::Array(items);
    l
}

// ---------------------------------------------------------------------------
// Writes.

async fn ensure_namespace_active(api: &ApiServer, ns: Option<&str>) -> Result<(), ApiError> {
    let Some(ns) = ns else { return Ok(()) };
    let nsrt = registry::by_kind("v1", "Namespace").ok_or_else(|| ApiError::internal("no Namespace kind"))?;
    // Read in place: every create in a namespace asks.
    let found = match api.objects.get_stored_local(nsrt, None, ns)? {
        Some(kv) => Some(kv),
        None => api.objects.get_stored(nsrt, None, ns).await?,
    };
    let Some(kv) = found else { return Err(ApiError::not_found("", "namespaces", ns)) };
    let stored = StoredObject::access(&kv.value).map_err(|e| ApiError::internal(format!("namespace {ns}: {e}")))?;
    if stored.deleting {
        return Err(ApiError::forbidden(format!(
            "unable to create new content in namespace {ns} because it is being terminated"
        )));
    }
    Ok(())
}

async fn create(api: &ApiServer, rt: &ResourceType, ns: Option<&str>, ctx: &Ctx) -> Result<Reply, ApiError> {
    let (obj, warnings) = normalize_body(rt, ctx)?;
    let now = now();
    let mut obj = admission::prepare_create(rt, ns, obj, &now, &uuid::Uuid::new_v4().to_string(), &random_suffix())?;
    super::apply::track_update(rt, None, &mut obj, &super::apply::update_manager(ctx), &now);
    let (obj_ns, _) = ns_name(&obj);
    if rt.kind != "Namespace" {
        ensure_namespace_active(api, obj_ns.as_deref()).await?;
    }
    obj = admission::admit_new(api, rt, obj).await?;
    if dry_run(ctx)? {
        return Ok(object_reply(StatusCode::CREATED, obj, warnings));
    }
    if rt.kind == "Service" && needs_cluster_ip(&obj) {
        // Random free address; a taken one fails the create's txn, so retry.
        for _ in 0..16 {
            let mut svc = obj.clone();
            let ip = random_service_ip();
            svc["spec"]["clusterIP"] = json!(ip);
            svc["spec"]["clusterIPs"] = json!([ip]);
            match api.objects.create(rt, svc).await {
                Err(e) if e.code == 422 => continue,
                r => return r.map(|c| object_reply(StatusCode::CREATED, c, warnings)),
            }
        }
        return Err(ApiError::internal("no free service IP found after 16 tries; the range may be full"));
    }
    // Answered with the stored text and its revision: serializing the
    // admitted object again cost as much as storing it.
    let (stored, rev) = api.objects.create_stored(rt, obj).await?;
    let text = StoredObject::access(&stored)
        .and_then(|a| StoredObject::json_archived(a, rev))
        .map_err(|e| ApiError::internal(format!("stored object: {e}")))?;
    Ok(Reply { code: StatusCode::CREATED, body: ReplyBody::JsonText(bytes::Bytes::from(text)), warnings })
}

fn needs_cluster_ip(svc: &Value) -> bool {
    svc["spec"]["type"] != "ExternalName" && svc["spec"]["clusterIP"].as_str().is_none_or(str::is_empty)
}

fn random_service_ip() -> String {
    use capstan_proto::k8s::network;
    use rand::Rng;
    let host_bits = 32 - u32::from(network::SERVICE_PREFIX);
    loop {
        let n: u32 = rand::thread_rng().gen_range(0..1 << host_bits);
        let ip = std::net::Ipv4Addr::from(u32::from(network::SERVICE_NETWORK) | n);
        if network::allocatable(ip) {
            return ip.to_string();
        }
    }
}

async fn current(api: &ApiServer, rt: &ResourceType, ns: Option<&str>, name: &str) -> Result<Found, ApiError> {
    api.objects.get(rt, ns, name).await?.ok_or_else(|| ApiError::not_found(rt.group, rt.plural, name))
}

/// Writes `new` over `cur`, or deletes it when this update removed the
/// last finalizer of an object being deleted.
async fn store_update(
    api: &ApiServer,
    rt: &ResourceType,
    cur: &Found,
    new: Value,
    dry: bool,
) -> Result<Value, ApiError> {
    if dry {
        return Ok(super::objects::with_rv(new, cur.mod_revision));
    }
    let deleting = new["metadata"]["deletionTimestamp"].is_string();
    let finalizers_left = new["metadata"]["finalizers"].as_array().is_some_and(|f| !f.is_empty())
        || (rt.kind == "Namespace" && new["spec"]["finalizers"].as_array().is_some_and(|f| !f.is_empty()));
    if deleting && !finalizers_left {
        let rev = api.objects.delete(rt, &new, cur.mod_revision).await?;
        return Ok(super::objects::with_rv(new, rev));
    }
    api.objects.update(rt, new, cur.mod_revision).await
}

fn body_rv(v: &Value) -> Option<String> {
    v["metadata"]["resourceVersion"].as_str().filter(|s| !s.is_empty()).map(str::to_string)
}

async fn update(
    api: &ApiServer,
    rt: &ResourceType,
    ns: Option<&str>,
    name: &str,
    sub: Option<&str>,
    ctx: &Ctx,
) -> Result<Reply, ApiError> {
    let (obj, warnings) = normalize_body(rt, ctx)?;
    let cur = current(api, rt, ns, name).await?;
    // Normalizing keeps metadata.resourceVersion as it was sent.
    if let Some(rv) = body_rv(&obj) {
        if rv != cur.mod_revision.to_string() {
            return Err(ApiError::conflict(
                rt.group,
                rt.plural,
                name,
                "the object has been modified; please apply your changes to the latest version and try again",
            ));
        }
    }
    let mut new = admission::prepare_update(rt, &cur.object, obj, sub)?;
    super::apply::track_update(rt, Some(&cur.object), &mut new, &super::apply::update_manager(ctx), &now());
    let out = store_update(api, rt, &cur, new, dry_run(ctx)?).await?;
    Ok(object_reply(StatusCode::OK, out, warnings))
}

fn parse_patch(pt: PatchType, ctx: &Ctx) -> Result<Value, ApiError> {
    if ctx.body.is_empty() {
        return Err(ApiError::bad_request("the patch is empty"));
    }
    match pt {
        PatchType::Apply => {
            serde_norway::from_slice(&ctx.body).map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))
        }
        _ => serde_json::from_slice(&ctx.body).map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}"))),
    }
}

async fn patch(
    api: &ApiServer,
    rt: &ResourceType,
    ns: Option<&str>,
    name: &str,
    sub: Option<&str>,
    ctx: &Ctx,
) -> Result<Reply, ApiError> {
    let pt = PatchType::from_content_type(&ctx.content_type)
        .ok_or_else(|| ApiError::unsupported_media(&ctx.content_type))?;
    let body = parse_patch(pt, ctx)?;
    let dry = dry_run(ctx)?;
    // Optimistic concurrency: retry a few times when another writer got in
    // between read and write, unless the patch itself pinned a resourceVersion.
    for attempt in 0.. {
        let cur = match api.objects.get(rt, ns, name).await? {
            Some(c) => c,
            None if pt == PatchType::Apply => return super::apply::create(api, rt, ns, name, &body, ctx).await,
            None => return Err(ApiError::not_found(rt.group, rt.plural, name)),
        };
        let (patched, pinned) = match pt {
            PatchType::Json => (patch::json_patch(&cur.object, &body).map_err(|e| patch_error(rt, name, e))?, false),
            PatchType::Merge => (patch::merge_patch(&cur.object, &body).map_err(|e| patch_error(rt, name, e))?, false),
            PatchType::Strategic => {
                (patch::strategic_merge(&cur.object, &body).map_err(|e| patch_error(rt, name, e))?, false)
            }
            PatchType::Apply => (super::apply::apply(rt, &cur.object, &body, ctx)?, false),
        };
        let pinned = pinned || body_rv(&body).is_some();
        if body_rv(&patched).is_some_and(|rv| rv != cur.mod_revision.to_string()) {
            return Err(ApiError::conflict(
                rt.group,
                rt.plural,
                name,
                "the object has been modified; please apply your changes to the latest version and try again",
            ));
        }
        check_type(rt, &patched)?;
        let (obj, warnings) = normalize(rt, &patched, ctx)?;
        let mut new = admission::prepare_update(rt, &cur.object, obj, sub)?;
        if pt != PatchType::Apply {
            super::apply::track_update(rt, Some(&cur.object), &mut new, &super::apply::update_manager(ctx), &now());
        }
        match store_update(api, rt, &cur, new, dry).await {
            Err(e) if e.code == 409 && !pinned && attempt < 8 => continue,
            r => return r.map(|o| object_reply(StatusCode::OK, o, warnings)),
        }
    }
    unreachable!("the retry loop returns")
}

fn patch_error(rt: &ResourceType, name: &str, e: String) -> ApiError {
    ApiError::new(422, "Invalid", format!("{} \"{name}\" could not be patched: {e}", rt.kind))
        .with_details(json!({"name": name, "kind": rt.kind}))
}

// ---------------------------------------------------------------------------
// Deletes.

#[derive(Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct DeleteOptions {
    propagation_policy: Option<String>,
    grace_period_seconds: Option<i64>,
    orphan_dependents: Option<bool>,
    preconditions: Option<Preconditions>,
    dry_run: Option<Vec<String>>,
}

#[derive(Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Preconditions {
    uid: Option<String>,
    resource_version: Option<String>,
}

fn delete_options(ctx: &Ctx) -> Result<DeleteOptions, ApiError> {
    let mut o: DeleteOptions = if ctx.body.is_empty() {
        DeleteOptions::default()
    } else {
        serde_json::from_slice(&ctx.body).map_err(|e| ApiError::bad_request(format!("invalid DeleteOptions: {e}")))?
    };
    if let Some(p) = ctx.query.get("propagationPolicy") {
        o.propagation_policy = Some(p.to_string());
    }
    if let Some(g) = ctx.query.get("gracePeriodSeconds") {
        o.grace_period_seconds = Some(g.parse().map_err(|_| ApiError::bad_request("invalid gracePeriodSeconds"))?);
    }
    if ctx.query.get("dryRun") == Some("All") {
        o.dry_run = Some(vec!["All".into()]);
    }
    if o.orphan_dependents == Some(true) && o.propagation_policy.is_none() {
        o.propagation_policy = Some("Orphan".into());
    }
    match o.propagation_policy.as_deref() {
        None | Some("Background" | "Foreground" | "Orphan") => Ok(o),
        Some(p) => Err(ApiError::bad_request(format!(
            "invalid propagationPolicy {p:?}: expected Background, Foreground or Orphan"
        ))),
    }
}

async fn delete(
    api: &ApiServer,
    rt: &ResourceType,
    ns: Option<&str>,
    name: &str,
    ctx: &Ctx,
) -> Result<Reply, ApiError> {
    let opts = delete_options(ctx)?;
    // As Kubernetes' store does: a delete that lost a race with another
    // write (a controller's status update) is retried on the fresh object,
    // unless the client pinned the resourceVersion it meant to delete.
    let pinned = opts.preconditions.as_ref().is_some_and(|p| p.resource_version.is_some());
    let mut attempts = 0;
    loop {
        let cur = current(api, rt, ns, name).await?;
        match delete_found(api, rt, cur, &opts).await {
            Err(e) if e.code == 409 && !pinned && attempts < 5 => attempts += 1,
            r => return r,
        }
    }
}

async fn delete_found(api: &ApiServer, rt: &ResourceType, cur: Found, opts: &DeleteOptions) -> Result<Reply, ApiError> {
    let (_, name) = ns_name(&cur.object);
    let meta = &cur.object["metadata"];
    if let Some(p) = &opts.preconditions {
        if p.uid.as_deref().is_some_and(|u| Some(u) != meta["uid"].as_str())
            || p.resource_version.as_deref().is_some_and(|rv| rv != cur.mod_revision.to_string())
        {
            return Err(ApiError::conflict(rt.group, rt.plural, &name, "Precondition failed"));
        }
    }
    let dry = opts.dry_run.as_ref().is_some_and(|d| d.iter().any(|x| x == "All"));
    let plan = admission::plan_delete(
        rt.kind,
        &cur.object,
        opts.propagation_policy.as_deref(),
        opts.grace_period_seconds,
        &now(),
    );
    match plan {
        admission::DeletePlan::Now => {
            if !dry {
                api.objects.delete(rt, &cur.object, cur.mod_revision).await?;
            }
            let details = json!({"name": name, "group": rt.group, "kind": rt.plural, "uid": meta["uid"]});
            if rt.kind == "Pod" {
                return Ok(Reply::ok(cur.object));
            }
            Ok(Reply::ok(success(details)))
        }
        admission::DeletePlan::Pending => Ok(Reply::ok(cur.object)),
        admission::DeletePlan::Mark(marked) => {
            let out = if dry { marked } else { api.objects.update(rt, marked, cur.mod_revision).await? };
            Ok(object_reply(StatusCode::OK, out, vec![]))
        }
    }
}

async fn delete_collection(api: &ApiServer, rt: &ResourceType, ns: Option<&str>, ctx: &Ctx) -> Result<Reply, ApiError> {
    let filter = Filter::from_query(rt, ctx)?;
    let opts = delete_options(ctx)?;
    api.objects.sync().await?;
    let page = api.objects.list_local(rt, ns, None, None, &|kv| filter.select(kv))?;
    let mut deleted = Vec::new();
    for obj in page.items {
        let (ns, name) = ns_name(&obj);
        let Some(cur) = api.objects.get_local(rt, ns.as_deref(), &name)? else { continue };
        match delete_found(api, rt, cur, &opts).await {
            Ok(_) => deleted.push(obj),
            Err(e) if e.code == 404 || e.code == 409 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Reply::ok(list_object(rt, json!({}), deleted)))
}

// ---------------------------------------------------------------------------
// Subresources.

fn scale_of(f: &Found) -> Value {
    let o = &f.object;
    let m = &o["metadata"];
    json!({
        "kind": "Scale", "apiVersion": "autoscaling/v1",
        "metadata": {"name": m["name"], "namespace": m["namespace"], "uid": m["uid"],
            "resourceVersion": f.mod_revision.to_string(), "creationTimestamp": m["creationTimestamp"]},
        "spec": {"replicas": o["spec"]["replicas"].as_i64().unwrap_or(1)},
        "status": {"replicas": o["status"]["replicas"].as_i64().unwrap_or(0),
            "selector": table::selector_string(&o["spec"]["selector"])},
    })
}

async fn scale(
    api: &ApiServer,
    rt: &ResourceType,
    ns: Option<&str>,
    name: &str,
    verb: &str,
    ctx: &Ctx,
) -> Result<Reply, ApiError> {
    for attempt in 0.. {
        let cur = current(api, rt, ns, name).await?;
        let sc = scale_of(&cur);
        if verb == "get" {
            return Ok(Reply::ok(sc));
        }
        let new_scale = if verb == "update" {
            decode_body(ctx)?
        } else {
            let pt = PatchType::from_content_type(&ctx.content_type)
                .filter(|p| *p != PatchType::Apply)
                .ok_or_else(|| ApiError::unsupported_media(&ctx.content_type))?;
            let body = parse_patch(pt, ctx)?;
            match pt {
                PatchType::Json => patch::json_patch(&sc, &body),
                PatchType::Merge => patch::merge_patch(&sc, &body),
                _ => patch::strategic_merge(&sc, &body),
            }
            .map_err(|e| patch_error(rt, name, e))?
        };
        let pinned = body_rv(&new_scale).is_some_and(|rv| rv != cur.mod_revision.to_string());
        if pinned {
            return Err(ApiError::conflict(rt.group, rt.plural, name, "the object has been modified"));
        }
        let replicas = new_scale["spec"]["replicas"].as_i64().filter(|r| *r >= 0).ok_or_else(|| {
            ApiError::invalid(
                "Scale",
                name,
                vec![("spec.replicas".into(), "Invalid value: must be a non-negative integer".into())],
            )
        })?;
        let mut obj = cur.object.clone();
        obj["spec"]["replicas"] = json!(replicas);
        let mut new = admission::prepare_update(rt, &cur.object, obj, None)?;
        super::apply::track_update(rt, Some(&cur.object), &mut new, &super::apply::update_manager(ctx), &now());
        match store_update(api, rt, &cur, new, dry_run(ctx)?).await {
            Err(e) if e.code == 409 && attempt < 8 => continue,
            Err(e) => return Err(e),
            Ok(o) => {
                let f = Found { mod_revision: super::objects::revision_of(&o), object: o };
                return Ok(Reply::ok(scale_of(&f)));
            }
        }
    }
    unreachable!("the retry loop returns")
}

async fn binding(
    api: &ApiServer,
    rt: &ResourceType,
    ns: Option<&str>,
    name: &str,
    ctx: &Ctx,
) -> Result<Reply, ApiError> {
    let b = decode_body(ctx)?;
    let node = b["target"]["name"]
        .as_str()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ApiError::invalid("Binding", name, vec![("target.name".into(), "Required value".into())]))?;
    let cur = current(api, rt, ns, name).await?;
    if cur.object["spec"]["nodeName"].as_str().is_some_and(|n| !n.is_empty()) {
        return Err(ApiError::conflict(rt.group, rt.plural, name, "pod is already assigned to a node"));
    }
    let mut obj = cur.object.clone();
    obj["spec"]["nodeName"] = json!(node);
    admission::set_condition(&mut obj, "PodScheduled", "True", None, &now());
    api.objects.update(rt, obj, cur.mod_revision).await?;
    Ok(Reply::ok(success(json!({}))).with_code(StatusCode::CREATED))
}

async fn eviction(api: &ApiServer, rt: &ResourceType, ns: Option<&str>, name: &str) -> Result<Reply, ApiError> {
    let cur = current(api, rt, ns, name).await?;
    let terminal = matches!(cur.object["status"]["phase"].as_str(), Some("Succeeded" | "Failed"));
    let pdb_rt = registry::by_kind("policy/v1", "PodDisruptionBudget")
        .ok_or_else(|| ApiError::internal("no PodDisruptionBudget kind"))?;
    let labels = &cur.object["metadata"]["labels"];
    let budgets: Vec<Value> = api
        .objects
        .list_local(pdb_rt, ns, None, None, &|kv| super::objects::decode_kv(kv).map(Some))?
        .items
        .into_iter()
        .filter(|b| crate::controllers::disruption::selects(&b["spec"]["selector"], labels))
        .collect();
    if budgets.len() > 1 && !terminal {
        return Err(ApiError::internal(
            "This pod has more than one PodDisruptionBudget, which the eviction subresource does not support.",
        ));
    }
    if let (Some(b), false) = (budgets.first(), terminal) {
        let allowed = b["status"]["disruptionsAllowed"].as_i64().unwrap_or(0);
        let bname = b["metadata"]["name"].as_str().unwrap_or_default();
        if allowed <= 0 {
            let msg = format!(
                "The disruption budget {bname} needs {} healthy pods and has {} currently",
                b["status"]["desiredHealthy"].as_i64().unwrap_or(0),
                b["status"]["currentHealthy"].as_i64().unwrap_or(0)
            );
            return Err(ApiError::new(
                429,
                "TooManyRequests",
                "Cannot evict pod as it would violate the pod's disruption budget.",
            )
            .with_details(json!({"causes": [{"reason": "DisruptionBudget", "message": msg}]})));
        }
        // Spend the allowance first (optimistic concurrency): two evictions
        // racing for the last disruption cannot both succeed.
        let rv = super::objects::revision_of(b);
        let found = Found { object: b.clone(), mod_revision: rv };
        let mut st = b["status"].clone();
        st["disruptionsAllowed"] = json!(allowed - 1);
        super::internal::write_status(api, pdb_rt, &found, st).await?;
    }
    delete_found(api, rt, cur, &DeleteOptions::default()).await?;
    Ok(Reply::ok(success(json!({}))).with_code(StatusCode::CREATED))
}

/// `pods/log` and `pods/exec` are served by the pod's node agent; the API
/// server checks the request the way Kubernetes does first.
async fn node_stream(
    api: &ApiServer,
    rt: &ResourceType,
    ns: Option<&str>,
    name: &str,
    sub: &str,
    ctx: Ctx,
) -> Result<Reply, ApiError> {
    let pod = current(api, rt, ns, name).await?.object;
    let spec = &pod["spec"];
    let all: Vec<&Value> = ["containers", "initContainers", "ephemeralContainers"]
        .iter()
        .flat_map(|l| spec[*l].as_array().into_iter().flatten())
        .collect();
    let names: Vec<&str> = all.iter().filter_map(|c| c["name"].as_str()).collect();
    match ctx.query.get("container") {
        Some(c) if !names.contains(&c) => {
            return Err(ApiError::bad_request(format!("container {c} is not valid for pod {name}")))
        }
        None if spec["containers"].as_array().is_some_and(|c| c.len() > 1) => {
            return Err(ApiError::bad_request(format!(
                "a container name must be specified for pod {name}, choose one of: [{}]",
                names.join(" ")
            )))
        }
        _ => {}
    }
    let node = spec["nodeName"].as_str().filter(|n| !n.is_empty());
    let Some(node) = node else {
        return Err(ApiError::bad_request(format!("pod {name} does not have a host assigned")));
    };
    let container = match ctx.query.get("container") {
        Some(c) => c.to_string(),
        None => spec["containers"][0]["name"].as_str().unwrap_or_default().to_string(),
    };
    let target = super::nodestream::Target {
        node,
        namespace: ns.unwrap_or_default(),
        pod: name,
        container: &container,
        spec: all.iter().find(|c| c["name"] == container.as_str()).copied().unwrap_or(&Value::Null),
        sub,
    };
    super::nodestream::serve(api, target, ctx).await
}

/// SelfSubjectAccessReview (`kubectl auth can-i`), SelfSubjectReview
/// (`kubectl auth whoami`), SelfSubjectRulesReview.
fn review(api: &ApiServer, kind: &str, ctx: &Ctx) -> Result<Reply, ApiError> {
    let body = if ctx.body.is_empty() { json!({}) } else { decode_body(ctx)? };
    let group = if kind == "SelfSubjectReview" { "authentication.k8s.io/v1" } else { "authorization.k8s.io/v1" };
    let mut out =
        json!({"kind": kind, "apiVersion": group, "metadata": {"creationTimestamp": null}, "spec": body["spec"]});
    match kind {
        "SelfSubjectAccessReview" => {
            let spec = &body["spec"];
            let attrs = if let Some(ra) = spec["resourceAttributes"].as_object() {
                let s = |k: &str| ra.get(k).and_then(Value::as_str).filter(|x| !x.is_empty()).map(str::to_string);
                Attributes::Resource {
                    verb: s("verb").unwrap_or_default(),
                    group: s("group").unwrap_or_default(),
                    resource: s("resource").unwrap_or_default(),
                    subresource: s("subresource"),
                    namespace: s("namespace"),
                    name: s("name"),
                }
            } else if let Some(nr) = spec["nonResourceAttributes"].as_object() {
                Attributes::NonResource {
                    verb: nr.get("verb").and_then(Value::as_str).unwrap_or_default().into(),
                    path: nr.get("path").and_then(Value::as_str).unwrap_or_default().into(),
                }
            } else {
                return Err(ApiError::invalid(
                    kind,
                    "",
                    vec![("spec".into(), "Required value: resourceAttributes or nonResourceAttributes".into())],
                ));
            };
            out["status"] = match api.authorize(&ctx.user, &attrs) {
                Ok(()) => json!({"allowed": true, "reason": "allowed by RBAC"}),
                // Kubernetes leaves the reason empty on an RBAC denial.
                Err(_) => json!({"allowed": false}),
            };
        }
        "SelfSubjectReview" => {
            out["status"] = json!({"userInfo": {"username": ctx.user.name, "groups": ctx.user.groups}});
        }
        _ => {
            out["status"] = json!({"resourceRules": [], "nonResourceRules": [], "incomplete": true,
                "evaluationError": "rule listing is not supported; use SelfSubjectAccessReview"});
        }
    }
    Ok(Reply::ok(out).with_code(StatusCode::CREATED))
}
