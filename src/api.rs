//! The HTTP API of API.md: routing, request checks in the documented order, and the one
//! place where every `ApiError` becomes a status and an error code.

use std::cell::Cell;
use std::rc::Rc;
use std::time::Instant;

use serde_json::{json, Map, Value};
use shards::http::query::{percent_decode, Malformed, Query};
use shards::validate::{self, FieldError};

use crate::http::{Method, Outcome, Request, Response, RouteMatch, Service, Shutdown};
use crate::node::Node;
use crate::ops::{ApiError, ArchivedFilter, Op, Reply};
use crate::tail::{self, TailParams};

/// Largest `/events` response body.
const EVENTS_RESPONSE_BYTES_MAX: usize = 4 << 20;
const LIMIT_MAX: usize = 1000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Live,
    Ready,
    Metrics,
    CreateSession,
    ListSessions,
    GetSession(String),
    PatchSession(String),
    SetArchived(String, bool),
    Append(String),
    Events(String),
    Tail(String),
    DebugGroup(u16),
    /// `PUT /debug/faults`, only with `STARCITE_TEST_FAULTS=1`.
    DebugFaults,
}

impl Route {
    /// The label used in metrics.
    fn name(&self) -> &'static str {
        match self {
            Route::Live => "health_live",
            Route::Ready => "health_ready",
            Route::Metrics => "metrics",
            Route::CreateSession => "create_session",
            Route::ListSessions => "list_sessions",
            Route::GetSession(_) => "get_session",
            Route::PatchSession(_) => "patch_session",
            Route::SetArchived(..) => "set_archived",
            Route::Append(_) => "append",
            Route::Events(_) => "events",
            Route::Tail(_) => "tail",
            Route::DebugGroup(_) => "debug_group",
            Route::DebugFaults => "debug_faults",
        }
    }
}

pub struct Api {
    pub node: Rc<Node>,
    pub shutdown: Rc<Shutdown>,
    pub tail_buffer_bytes: usize,
    /// Request body bytes of this shard's requests still being served.
    pub bodies_in_flight: Rc<Cell<usize>>,
}

/// Request body bytes one shard holds for requests in flight, at most; past it new
/// requests with a body get 503 `overloaded` (bounded memory whatever the load).
pub const BODIES_IN_FLIGHT_BYTES_MAX: usize = 256 << 20;

/// Accounts a request body while it is in flight; releases it when dropped.
struct BodyPermit {
    counter: Rc<Cell<usize>>,
    bytes: usize,
}

impl BodyPermit {
    fn acquire(counter: &Rc<Cell<usize>>, bytes: usize) -> Option<BodyPermit> {
        // One request alone always fits, whatever --max-body-bytes allows.
        if counter.get() > 0 && counter.get() + bytes > BODIES_IN_FLIGHT_BYTES_MAX {
            return None;
        }
        counter.set(counter.get() + bytes);
        Some(BodyPermit {
            counter: counter.clone(),
            bytes,
        })
    }
}

impl Drop for BodyPermit {
    fn drop(&mut self) {
        self.counter.set(self.counter.get() - self.bytes);
    }
}

/// `Allow` of a read-only route: HEAD is a GET without the body (API.md, "Hardening
/// rules (v1.1)"), and every path answers a CORS preflight.
const ALLOW_GET: &str = "GET, HEAD, OPTIONS";
const ALLOW_POST: &str = "POST, OPTIONS";
/// The tail is a WebSocket (or stream) only: HEAD has no meaning there.
const ALLOW_TAIL: &str = "GET, OPTIONS";

/// Matches a path and method to a route (API.md: unknown path 404, then 405).
pub fn route(method: &Method, path: &str) -> RouteMatch<Route> {
    // The connection drops the body of a HEAD answer and keeps its headers.
    let get = matches!(method, Method::Get | Method::Head);
    let post = matches!(method, Method::Post);
    let only = |ok: bool, route: Route, allow: &'static str| {
        if ok {
            RouteMatch::Found(route)
        } else {
            RouteMatch::MethodNotAllowed { allow }
        }
    };
    match path {
        "/health/live" => return only(get, Route::Live, ALLOW_GET),
        "/health/ready" => return only(get, Route::Ready, ALLOW_GET),
        "/metrics" => return only(get, Route::Metrics, ALLOW_GET),
        "/v1/sessions" => {
            return match method {
                Method::Get | Method::Head => RouteMatch::Found(Route::ListSessions),
                Method::Post => RouteMatch::Found(Route::CreateSession),
                _ => RouteMatch::MethodNotAllowed {
                    allow: "GET, HEAD, POST, OPTIONS",
                },
            }
        }
        _ => {}
    }
    if path == "/debug/faults" && faults_enabled() {
        let put = matches!(method, Method::Put);
        return only(put, Route::DebugFaults, "PUT, OPTIONS");
    }
    if let Some(group) = path.strip_prefix("/debug/groups/") {
        return match group.parse::<u16>() {
            Ok(g) if g < shards::GROUPS && !group.starts_with('+') => {
                only(get, Route::DebugGroup(g), ALLOW_GET)
            }
            _ => RouteMatch::NotFound,
        };
    }
    let Some(rest) = path.strip_prefix("/v1/sessions/") else {
        return RouteMatch::NotFound;
    };
    let mut parts = rest.split('/');
    let (Some(raw_id), action, None) = (parts.next(), parts.next(), parts.next()) else {
        return RouteMatch::NotFound;
    };
    if raw_id.is_empty() {
        return RouteMatch::NotFound;
    }
    // An id that does not decode cannot name a session: 404 session_not_found later.
    let id = percent_decode(raw_id).unwrap_or_default();
    match action {
        None => match method {
            Method::Get | Method::Head => RouteMatch::Found(Route::GetSession(id)),
            Method::Patch => RouteMatch::Found(Route::PatchSession(id)),
            _ => RouteMatch::MethodNotAllowed {
                allow: "GET, HEAD, PATCH, OPTIONS",
            },
        },
        Some("archive") => only(post, Route::SetArchived(id, true), ALLOW_POST),
        Some("unarchive") => only(post, Route::SetArchived(id, false), ALLOW_POST),
        Some("append") => only(post, Route::Append(id), ALLOW_POST),
        Some("events") => only(get, Route::Events(id), ALLOW_GET),
        Some("tail") => only(*method == Method::Get, Route::Tail(id), ALLOW_TAIL),
        Some(_) => RouteMatch::NotFound,
    }
}

impl Service for Api {
    type Route = Route;

    fn route(&self, method: &Method, path: &str) -> RouteMatch<Route> {
        route(method, path)
    }

    async fn handle(&self, route: Route, req: Request) -> Outcome {
        let started = Instant::now();
        let name = route.name();
        let outcome = self.dispatch(route, req).await;
        let status = match &outcome {
            Outcome::Respond(response) => response.status,
            Outcome::Upgrade { response, .. } => response.status,
        };
        let elapsed_us = started.elapsed().as_micros() as u64;
        self.node
            .core
            .stats
            .borrow_mut()
            .record_request(name, status, elapsed_us);
        outcome
    }
}

impl Api {
    async fn dispatch(&self, route: Route, req: Request) -> Outcome {
        let Some(_permit) = BodyPermit::acquire(&self.bodies_in_flight, req.body.len()) else {
            return Outcome::Respond(error_response(&ApiError::Overloaded));
        };
        let result = match route {
            Route::Live => Ok(Response::json(200, r#"{"status":"ok"}"#)),
            Route::Ready => Ok(self.ready().await),
            Route::Metrics => Ok(self.metrics().await),
            Route::CreateSession => self.create(&req.body).await,
            Route::ListSessions => self.list(&req.query).await,
            Route::GetSession(id) => self.session_op(&id, Op::Get { id: id.clone() }, 200).await,
            Route::PatchSession(id) => self.patch(id, &req.body).await,
            Route::SetArchived(id, archived) => {
                let op = Op::SetArchived {
                    id: id.clone(),
                    archived,
                };
                self.session_op(&id, op, 200).await
            }
            Route::Append(id) => self.append(id, &req.body).await,
            Route::Events(id) => self.events(id, &req.query).await,
            Route::Tail(id) => return self.tail(id, &req).await,
            Route::DebugGroup(group) => Ok(self.debug_group(group).await),
            Route::DebugFaults => debug_faults(&req.body),
        };
        Outcome::Respond(result.unwrap_or_else(|e| error_response(&e)))
    }

    /// Served by this node's shard that owns the group; never forwarded to other nodes.
    async fn debug_group(&self, group: u16) -> Response {
        let shard = shards::shard_of(group, self.node.shards());
        match self.node.call(shard, Op::DebugGroup { group }).await {
            Reply::Debug(text) => Response::json(200, text),
            Reply::Error(e) => error_response(&e),
            other => error_response(&unexpected(other)),
        }
    }

    async fn ready(&self) -> Response {
        let shards = self.node.shards();
        if self.node.core.shutting_down.get() || self.shutdown.is_triggered() {
            let body = json!({"status": "degraded", "reason": "shutting_down"});
            return Response::json(503, body.to_string());
        }
        if !self.node.is_ready() {
            let body = json!({"status": "starting", "reason": "shards are recovering their logs"});
            return Response::json(503, body.to_string());
        }
        let mut total = crate::metrics::ShardStats::default();
        for reply in self.node.call_all(|| Op::Stats).await {
            if let Reply::Stats(stats) = reply {
                total.merge(&stats);
            }
        }
        let mut leaderless = std::mem::take(&mut total.leaderless);
        leaderless.sort_unstable();
        // The archive, a full disk and log damage are detail only: they never change the
        // status code (API.md: ready = shards run and groups have leaders). A node whose
        // storage is full still serves reads, and its groups' writes go to other nodes; a
        // damaged replica still serves every read, from another replica where needed.
        let archive = archive_detail(&total);
        let storage = storage_detail(&total);
        let log_damage = damage_detail(&total);
        // So are a rebuild's progress and the peers that refuse this node (whose groups
        // then have no leader, which decides the status).
        let refused_by: serde_json::Map<String, serde_json::Value> = total
            .refused_by
            .iter()
            .map(|(node, reason)| (node.to_string(), json!(reason)))
            .collect();
        let mut body = if leaderless.is_empty() {
            json!({
                "status": "ok",
                "shards": shards,
                "groups": shards::GROUPS,
                "groups_without_leader": [],
                "archive": archive,
                "storage_full": storage,
                "log_damage": log_damage,
            })
        } else {
            json!({
                "status": "degraded",
                "reason": "some groups have no leader",
                "groups_without_leader": leaderless,
                "archive": archive,
                "storage_full": storage,
                "log_damage": log_damage,
            })
        };
        if total.groups_catching_up > 0 {
            body["groups_catching_up"] = json!(total.groups_catching_up);
        }
        if !refused_by.is_empty() {
            body["refused_by_peers"] = serde_json::Value::Object(refused_by);
        }
        let status = if leaderless.is_empty() { 200 } else { 503 };
        Response::json(status, body.to_string())
    }

    async fn metrics(&self) -> Response {
        let replies = self.node.call_all(|| Op::Stats).await;
        let stats: Vec<_> = replies
            .into_iter()
            .filter_map(|r| match r {
                Reply::Stats(s) => Some(*s),
                _ => None,
            })
            .collect();
        let mut response = Response::json(200, crate::metrics::render(&stats));
        set_content_type(&mut response, "text/plain; version=0.0.4");
        response
    }

    async fn create(&self, body: &[u8]) -> Result<Response, ApiError> {
        let new = validate::validate_create(body).map_err(ApiError::Invalid)?;
        let id = new
            .id
            .clone()
            .unwrap_or_else(|| validate::generate_session_id(rand::random::<[u8; 12]>()));
        let op = Op::Create {
            id: id.clone(),
            title: new.title,
            metadata: new.metadata,
        };
        self.session_op(&id, op, 201).await
    }

    /// Runs a session op on the owner shard and answers with the session object.
    async fn session_op(&self, id: &str, op: Op, status: u16) -> Result<Response, ApiError> {
        if !validate::valid_session_id(id) {
            return Err(ApiError::SessionNotFound);
        }
        match self.node.call(self.node.owner_of(id), op).await {
            Reply::Session(text) => Ok(Response::json(status, text)),
            Reply::Error(e) => Err(e),
            other => Err(unexpected(other)),
        }
    }

    async fn patch(&self, id: String, body: &[u8]) -> Result<Response, ApiError> {
        let patch = validate::validate_patch(body).map_err(ApiError::Invalid)?;
        self.session_op(
            &id,
            Op::Patch {
                id: id.clone(),
                patch,
            },
            200,
        )
        .await
    }

    async fn append(&self, id: String, body: &[u8]) -> Result<Response, ApiError> {
        let event = validate::validate_append(body).map_err(ApiError::Invalid)?;
        if !validate::valid_session_id(&id) {
            return Err(ApiError::SessionNotFound);
        }
        let owner = self.node.owner_of(&id);
        match self.node.call(owner, Op::Append { id, event }).await {
            Reply::Appended {
                seq,
                last_seq,
                deduped,
                archived_seq,
            } => {
                let body = json!({
                    "seq": seq,
                    "last_seq": last_seq,
                    "deduped": deduped,
                    "cursor": seq,
                    "archived_seq": archived_seq,
                });
                Ok(Response::json(201, body.to_string()))
            }
            Reply::Error(e) => Err(e),
            other => Err(unexpected(other)),
        }
    }

    async fn list(&self, query: &str) -> Result<Response, ApiError> {
        let query = Query::parse(query);
        let limit = limit_param(&query)?;
        let after = match query.get("cursor") {
            Ok(Some("")) | Err(Malformed) => {
                return Err(invalid(
                    "invalid_cursor",
                    "cursor",
                    "cursor must be a session id (the previous page's next_cursor)",
                ))
            }
            Ok(other) => other.map(str::to_string),
        };
        let archived = match query.get("archived") {
            Ok(None | Some("false")) => ArchivedFilter::Active,
            Ok(Some("true")) => ArchivedFilter::Archived,
            Ok(Some("all")) => ArchivedFilter::All,
            Ok(Some(_)) | Err(Malformed) => {
                return Err(invalid(
                    "invalid_archived",
                    "archived",
                    "archived must be false, true or all",
                ))
            }
        };
        let filters = query.metadata_filters().map_err(ApiError::Invalid)?;
        let replies = self
            .node
            .call_all(|| Op::List {
                after: after.clone(),
                limit,
                archived,
                filters: filters.clone(),
            })
            .await;
        let mut parts = Vec::with_capacity(replies.len());
        for reply in replies {
            match reply {
                Reply::Sessions(part) => parts.push(part),
                Reply::Error(e) => return Err(e),
                other => return Err(unexpected(other)),
            }
        }
        let page = shards::listing::merge(parts, limit);
        let next_cursor = page.next_cursor.map_or(Value::Null, Value::String);
        let mut body = String::from("{\"sessions\":");
        push_json_array(
            &mut body,
            page.sessions.iter().map(|(_, text)| text.as_str()),
        );
        body.push_str(",\"next_cursor\":");
        body.push_str(&next_cursor.to_string());
        body.push('}');
        debug_assert!(body.len() <= shards::listing::PAGE_BYTES_MAX);
        Ok(Response::json(200, body))
    }

    async fn events(&self, id: String, query: &str) -> Result<Response, ApiError> {
        let query = Query::parse(query);
        let cursor = cursor_param(&query)?;
        let limit = limit_param(&query)?;
        if !validate::valid_session_id(&id) {
            return Err(ApiError::SessionNotFound);
        }
        let op = Op::Read {
            id: id.clone(),
            after: cursor,
            max_events: limit,
            max_bytes: EVENTS_RESPONSE_BYTES_MAX - 1024,
            wait: None,
        };
        match self.node.call(self.node.owner_of(&id), op).await {
            Reply::Events { events, last_seq } => {
                let next_cursor = events.last().map_or(cursor, |e| e.0);
                let mut body = String::from("{\"events\":");
                push_json_array(&mut body, events.iter().map(|(_, text)| text.as_ref()));
                body.push_str(&format!(
                    ",\"next_cursor\":{next_cursor},\"last_seq\":{last_seq}}}"
                ));
                Ok(Response::json(200, body))
            }
            Reply::Error(e) => Err(e),
            other => Err(unexpected(other)),
        }
    }

    async fn tail(&self, id: String, req: &Request) -> Outcome {
        let query = Query::parse(&req.query);
        let checked = cursor_param(&query).and_then(|cursor| {
            let batch_size = count_param(&query, "batch_size", "invalid_batch_size", 1)?;
            Ok((cursor, batch_size))
        });
        let (cursor, batch_size) = match checked {
            Ok(values) => values,
            Err(e) => return Outcome::Respond(error_response(&e)),
        };
        let key = match tail::upgrade_key(req) {
            Ok(key) => key,
            Err(refusal) => return Outcome::Respond(tail::refuse_upgrade(refusal)),
        };
        if let Err(e) = self.session_op(&id, Op::Get { id: id.clone() }, 200).await {
            return Outcome::Respond(error_response(&e));
        }
        let params = TailParams {
            id,
            cursor,
            batch_size,
            buffer_bytes: self.tail_buffer_bytes,
        };
        tail::upgrade(self.node.clone(), self.shutdown.clone(), &key, params)
    }
}

/// Shards whose storage is full, for `/health/ready`: `[{"shard", "reason",
/// "log_blocked"}]`, empty when every shard takes writes.
fn storage_detail(total: &crate::metrics::ShardStats) -> serde_json::Value {
    let mut full = total.storage_full.clone();
    full.sort_unstable_by_key(|f| f.shard);
    full.iter()
        .map(|f| {
            json!({
                "shard": f.shard,
                "reason": f.reason.as_str(),
                "log_blocked": f.log_blocked,
            })
        })
        .collect()
}

/// The archive's state for `/health/ready`.
fn archive_detail(total: &crate::metrics::ShardStats) -> serde_json::Value {
    use std::sync::atomic::Ordering::Relaxed;
    let (Some(feed), Some(archiver)) = (&total.archive, &total.archiver) else {
        return json!({"enabled": false});
    };
    let last_commit_us = archiver.last_commit_unix_us.load(Relaxed);
    json!({
        "enabled": true,
        "connected": archiver.connected.load(Relaxed),
        "refused": archiver.refused.load(Relaxed),
        "events_behind": feed.events_behind,
        "seconds_behind": feed.seconds_behind,
        "pending_events": archiver.pending_events.load(Relaxed),
        "last_commit_unix_us": (last_commit_us > 0).then_some(last_commit_us),
        "last_error": archiver.last_error(),
    })
}

/// Damaged log data on this node, for `/health/ready` (see docs/api/rest.md).
fn damage_detail(total: &crate::metrics::ShardStats) -> serde_json::Value {
    let d = &total.damage;
    let mut groups = d.groups_held.clone();
    groups.sort_unstable();
    json!({
        "damaged_events": d.damaged_events,
        "groups_not_led_while_damaged": groups,
        "found": d.found,
        "repaired": d.repaired,
        "index_files_rebuilt": d.index_rebuilds,
        "other_damaged_spans": d.spans,
        "recent": d.recent,
    })
}

/// Appends `[a,b,...]` of already rendered JSON texts.
fn push_json_array<'a>(out: &mut String, items: impl Iterator<Item = &'a str>) {
    out.push('[');
    for (i, text) in items.enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(text);
    }
    out.push(']');
}

fn set_content_type(response: &mut Response, value: &str) {
    for (name, v) in response.headers.iter_mut() {
        if name.eq_ignore_ascii_case("content-type") {
            *v = value.to_string();
            return;
        }
    }
    response
        .headers
        .push(("Content-Type".to_string(), value.to_string()));
}

fn invalid(code: &'static str, field: &str, message: &str) -> ApiError {
    ApiError::Invalid(FieldError {
        code,
        field: Some(field.to_string()),
        message: message.to_string(),
    })
}

fn unexpected(reply: Reply) -> ApiError {
    ApiError::Internal(format!("unexpected reply from shard: {reply:?}"))
}

/// The `cursor` of `/events` and the tail: an integer ≥ 0, default 0.
fn cursor_param(query: &Query) -> Result<u64, ApiError> {
    let bad = || {
        invalid(
            "invalid_cursor",
            "cursor",
            "cursor must be a non-negative integer",
        )
    };
    match query.get("cursor") {
        Ok(None) => Ok(0),
        Ok(Some(text)) => parse_u64(text).ok_or_else(bad),
        Err(Malformed) => Err(bad()),
    }
}

fn parse_u64(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// The `limit` query parameter: 1–1000, default 100.
fn limit_param(query: &Query) -> Result<usize, ApiError> {
    count_param(query, "limit", "invalid_limit", 100)
}

/// An integer parameter from 1 to 1000 with a default, else 400 `code`.
fn count_param(
    query: &Query,
    name: &str,
    code: &'static str,
    default: usize,
) -> Result<usize, ApiError> {
    let bad = || {
        invalid(
            code,
            name,
            &format!("{name} must be an integer from 1 to {LIMIT_MAX}"),
        )
    };
    match query.get(name) {
        Ok(None) => Ok(default),
        Ok(Some(text)) => parse_limit(text).ok_or_else(bad),
        Err(Malformed) => Err(bad()),
    }
}

fn parse_limit(text: &str) -> Option<usize> {
    parse_u64(text)
        .filter(|n| (1..=LIMIT_MAX as u64).contains(n))
        .map(|n| n as usize)
}

/// The HTTP status and error body of every `ApiError` (API.md), in one place.
pub fn error_response(error: &ApiError) -> Response {
    let mut extra = Map::new();
    let (status, code, message): (u16, &str, String) = match error {
        ApiError::Invalid(field) => {
            extra.insert(
                "field".into(),
                field.field.clone().map_or(Value::Null, Value::String),
            );
            (400, field.code, field.message.clone())
        }
        ApiError::SessionNotFound => (404, "session_not_found", "no such session".into()),
        ApiError::SessionExists => (
            409,
            "session_exists",
            "a session with this id exists".into(),
        ),
        ApiError::VersionConflict { current_version } => {
            extra.insert("current_version".into(), json!(current_version));
            let msg = format!("the session is at version {current_version}");
            (409, "expected_version_conflict", msg)
        }
        ApiError::IdempotencyConflict { seq } => {
            extra.insert("seq".into(), json!(seq));
            let msg = format!("idempotency_key was used for seq {seq} with different content");
            (409, "idempotency_conflict", msg)
        }
        ApiError::ProducerSeqConflict {
            expected_producer_seq,
        } => {
            extra.insert("expected_producer_seq".into(), json!(expected_producer_seq));
            let msg = format!("the producer's next producer_seq is {expected_producer_seq}");
            (409, "producer_seq_conflict", msg)
        }
        ApiError::ExpectedSeqConflict {
            expected_seq,
            current_seq,
        } => {
            extra.insert("expected_seq".into(), json!(expected_seq));
            extra.insert("current_seq".into(), json!(current_seq));
            let msg = format!("expected_seq {expected_seq} but the session is at {current_seq}");
            (409, "expected_seq_conflict", msg)
        }
        ApiError::Unavailable | ApiError::NotLeader { .. } => {
            (503, "unavailable", "not applied; try again".into())
        }
        ApiError::Overloaded => (503, "overloaded", "a queue is full; not applied".into()),
        ApiError::CommitUnknown => (
            503,
            "commit_unknown",
            "the write may or may not have been applied; retry with the same idempotency_key"
                .into(),
        ),
        ApiError::StorageFull => (
            507,
            "storage_full",
            "the leader's storage is full (no space left, or --max-disk-bytes reached); not \
             applied"
                .into(),
        ),
        ApiError::EventsExpired {
            first_available_seq,
        } => {
            extra.insert("first_available_seq".into(), json!(first_available_seq));
            let msg = format!("events before seq {first_available_seq} were deleted by retention");
            (410, "events_expired", msg)
        }
        ApiError::ArchiveUnavailable => (
            503,
            "archive_unavailable",
            "these events are only in the archive, which cannot be read now".into(),
        ),
        ApiError::Internal(detail) => {
            tracing::error!(%detail, "internal error");
            (500, "internal", "internal error".into())
        }
        ApiError::LogDamaged(detail) => {
            tracing::error!(%detail, "damaged events could not be served");
            let msg = format!(
                "stored events are damaged on this node and no other replica could serve \
                 them: {detail}"
            );
            (500, "internal", msg)
        }
    };
    let response = Response::error_with(status, code, &message, extra);
    if status == 503 {
        response.with_header("Retry-After", "1")
    } else {
        response
    }
}

/// Fault injection for tests of a cluster: set by `STARCITE_TEST_FAULTS=1`.
fn faults_enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var("STARCITE_TEST_FAULTS").is_ok_and(|v| v == "1"))
}

/// `PUT /debug/faults` `{"isolate": bool, "fsync_delay_ms": n | null, "lead_to": n |
/// null, "panic_shard": true}` (any of them; `panic_shard` panics the shard serving the
/// request, for the fail-stop tests): cut this node off from (or reconnect it to) every other node;
/// delay every durable log write of this node by n ms (null: back to the start-up
/// setting); hand every group this node leads to node n, now and whenever it leads one
/// again (null: stop).
fn debug_faults(body: &[u8]) -> Result<Response, ApiError> {
    let invalid = |field: Option<&str>, why: &str| {
        ApiError::Invalid(shards::validate::FieldError::new(
            shards::validate::INVALID_JSON,
            field,
            why,
        ))
    };
    let value = shards::json::parse(body).map_err(|e| invalid(None, &e.message))?;
    let isolate = match value.get("isolate") {
        None => None,
        Some(v) => Some(
            v.as_bool()
                .ok_or_else(|| invalid(Some("isolate"), "isolate must be a boolean"))?,
        ),
    };
    let fsync_delay = match value.get("fsync_delay_ms") {
        None => None,
        Some(serde_json::Value::Null) => Some(None),
        Some(v) => Some(Some(std::time::Duration::from_millis(
            v.as_u64().ok_or_else(|| {
                invalid(
                    Some("fsync_delay_ms"),
                    "fsync_delay_ms must be a count of ms or null",
                )
            })?,
        ))),
    };
    // Test fault: the shard serving this request panics (fail-stop tests).
    if value.get("panic_shard") == Some(&serde_json::Value::Bool(true)) {
        panic!("test fault: PUT /debug/faults {{\"panic_shard\": true}}");
    }
    let lead_to = match value.get("lead_to") {
        None => None,
        Some(serde_json::Value::Null) => Some(None),
        Some(v) => Some(Some(v.as_u64().ok_or_else(|| {
            invalid(Some("lead_to"), "lead_to must be a node id or null")
        })?)),
    };
    if isolate.is_none() && fsync_delay.is_none() && lead_to.is_none() {
        return Err(invalid(None, "give isolate, fsync_delay_ms or lead_to"));
    }
    if let Some(node) = lead_to {
        crate::shard::set_test_lead_to(node);
        tracing::warn!(
            ?node,
            "fault injection: hand every group led here to that node"
        );
    }
    if let Some(isolate) = isolate {
        crate::shard::set_isolated(isolate);
        tracing::warn!(isolate, "fault injection: peer traffic");
    }
    if let Some(delay) = fsync_delay {
        crate::wal::set_injected_fsync_delay(delay);
        tracing::warn!(?delay, "fault injection: fsync delay");
    }
    Ok(Response::empty(204))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_follow_api_md() {
        assert_eq!(
            route(&Method::Post, "/v1/sessions"),
            RouteMatch::Found(Route::CreateSession)
        );
        assert_eq!(
            route(&Method::Post, "/v1/sessions/a%3Ab/append"),
            RouteMatch::Found(Route::Append("a:b".into()))
        );
        assert!(matches!(
            route(&Method::Get, "/v1/nope"),
            RouteMatch::NotFound
        ));
        assert!(matches!(
            route(&Method::Delete, "/v1/sessions/x"),
            RouteMatch::MethodNotAllowed {
                allow: "GET, HEAD, PATCH, OPTIONS"
            }
        ));
        assert_eq!(
            route(&Method::Head, "/v1/sessions/x"),
            RouteMatch::Found(Route::GetSession("x".into()))
        );
        assert_eq!(
            route(&Method::Head, "/v1/sessions/x/tail"),
            RouteMatch::MethodNotAllowed {
                allow: "GET, OPTIONS"
            }
        );
        assert!(matches!(
            route(&Method::Get, "/v1/sessions/x/append/y"),
            RouteMatch::NotFound
        ));
    }

    #[test]
    fn request_bodies_in_flight_are_bounded_and_released() {
        let counter = Rc::new(Cell::new(0));
        let big = BodyPermit::acquire(&counter, BODIES_IN_FLIGHT_BYTES_MAX - 10).unwrap();
        assert!(
            BodyPermit::acquire(&counter, 11).is_none(),
            "over the bound"
        );
        let small = BodyPermit::acquire(&counter, 10).unwrap();
        assert!(BodyPermit::acquire(&counter, 1).is_none());
        drop(big);
        drop(small);
        assert_eq!(counter.get(), 0);
        // A single request larger than the bound is still served when alone.
        assert!(BodyPermit::acquire(&counter, BODIES_IN_FLIGHT_BYTES_MAX + 1).is_some());
    }

    #[test]
    fn count_and_cursor_parameters() {
        assert_eq!(parse_limit("1001"), None);
        assert_eq!(parse_limit("0"), None);
        assert_eq!(parse_limit("1000"), Some(1000));
        assert_eq!(parse_u64("-1"), None);
        assert_eq!(parse_u64("+1"), None);
        let query = Query::parse("");
        assert_eq!(
            (cursor_param(&query), limit_param(&query)),
            (Ok(0), Ok(100))
        );
    }

    fn code(error: ApiError) -> &'static str {
        match error {
            ApiError::Invalid(field) => field.code,
            other => panic!("not a field error: {other:?}"),
        }
    }

    /// The query parsing itself is tested in `shards::http::query`; here, that a
    /// malformed escape becomes each parameter's own error.
    #[test]
    fn malformed_percent_escapes_are_refused_not_dropped() {
        for bad in ["%zz", "%", "%4", "a%g1", "%+1", "%ff", "%C3%28", "%%41"] {
            let query = Query::parse(&format!("cursor={bad}&limit={bad}"));
            assert_eq!(query.get("cursor"), Err(Malformed), "{bad}");
            assert_eq!(code(limit_param(&query).unwrap_err()), "invalid_limit");
            assert_eq!(code(cursor_param(&query).unwrap_err()), "invalid_cursor");
        }
    }
}
