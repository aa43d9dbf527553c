//! A simulated Kubernetes API server, for tests, benchmarks and the simulation; never used
//! by the plugin binary.
//!
//! Objects (PersistentVolumes, Nodes, VolumeAttachments, Events, Leases,
//! VolumeSnapshotContents) are kept as JSON with a
//! resourceVersion from one counter. It answers GET, LIST (`limit` + `continue`), POST,
//! PATCH (JSON merge patch) and PUT — a `metadata.resourceVersion` in the body is a
//! precondition, a mismatch is 409 Conflict — and DELETE. Faults can be injected: 409 on the
//! next N writes (as if another writer had just changed the object: its resourceVersion
//! moves), 5xx on the next N requests, and a fixed latency (a `tokio::time::sleep`, which
//! turmoil virtualises). Requests are counted by verb.
//!
//! The HTTP handling ([`FakeApi::handle`]: method, path, body → status, body) is separate
//! from the transport: [`FakeApi`] is also a tower service that `kube::Client::new`
//! accepts, and the simulation can serve `handle` over turmoil TCP. Responses carry a fixed
//! `date` header (hyper would stamp the wall clock and break determinism).
//!
//! Objects are stored as serialized bytes, so 100,000 PVs cost tens of MiB and a LIST page
//! is a concatenation, not a re-serialization.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use serde_json::{Value, json};

/// Fixed `date` header of every response.
pub const FIXED_DATE: &str = "Thu, 01 Jan 2026 00:00:00 GMT";

/// Object kinds the fake serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// `/api/v1/persistentvolumes`
    PersistentVolume,
    /// `/api/v1/nodes`
    Node,
    /// `/apis/storage.k8s.io/v1/volumeattachments`
    VolumeAttachment,
    /// `/api/v1/namespaces/{ns}/events`
    Event,
    /// `/apis/coordination.k8s.io/v1/namespaces/{ns}/leases`
    Lease,
    /// `/apis/snapshot.storage.k8s.io/v1/volumesnapshotcontents`
    VolumeSnapshotContent,
}

impl Kind {
    fn list_kind(self) -> (&'static str, &'static str) {
        match self {
            Kind::PersistentVolume => ("v1", "PersistentVolumeList"),
            Kind::Node => ("v1", "NodeList"),
            Kind::VolumeAttachment => ("storage.k8s.io/v1", "VolumeAttachmentList"),
            Kind::Event => ("v1", "EventList"),
            Kind::Lease => ("coordination.k8s.io/v1", "LeaseList"),
            Kind::VolumeSnapshotContent => {
                ("snapshot.storage.k8s.io/v1", "VolumeSnapshotContentList")
            }
        }
    }
    fn resource(self) -> &'static str {
        match self {
            Kind::PersistentVolume => "persistentvolumes",
            Kind::Node => "nodes",
            Kind::VolumeAttachment => "volumeattachments",
            Kind::Event => "events",
            Kind::Lease => "leases",
            Kind::VolumeSnapshotContent => "volumesnapshotcontents",
        }
    }
}

type Key = (Kind, String, String); // kind, namespace ("" for cluster-scoped), name

#[derive(Debug, Clone)]
struct Obj {
    rv: u64,
    json: Bytes,
}

#[derive(Debug, Default)]
struct State {
    objects: BTreeMap<Key, Obj>,
    rv: u64,
    requests: BTreeMap<String, u64>,
    conflicts: u64,
    errors: Vec<u16>,
    latency: Duration,
}

/// The simulated API server. Clones share state.
#[derive(Debug, Clone, Default)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
}

/// An HTTP answer of [`FakeApi::handle`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// Status code.
    pub status: StatusCode,
    /// JSON body.
    pub body: Bytes,
}

fn status_body(code: u16, reason: &str, message: &str) -> Answer {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code,
    });
    Answer {
        status: StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        body: Bytes::from(body.to_string()),
    }
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = Value::Object(serde_json::Map::new());
            }
            if let Value::Object(t) = target {
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(k);
                    } else {
                        merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                    }
                }
            }
        }
        other => *target = other.clone(),
    }
}

struct Route {
    kind: Kind,
    namespace: String,
    name: Option<String>,
}

fn route(path: &str) -> Option<Route> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (kind, namespace, rest) = match parts.as_slice() {
        ["api", "v1", "persistentvolumes", rest @ ..] => (Kind::PersistentVolume, "", rest),
        ["api", "v1", "nodes", rest @ ..] => (Kind::Node, "", rest),
        ["apis", "storage.k8s.io", "v1", "volumeattachments", rest @ ..] => {
            (Kind::VolumeAttachment, "", rest)
        }
        ["api", "v1", "namespaces", ns, "events", rest @ ..] => (Kind::Event, *ns, rest),
        ["apis", "coordination.k8s.io", "v1", "namespaces", ns, "leases", rest @ ..] => {
            (Kind::Lease, *ns, rest)
        }
        ["apis", "snapshot.storage.k8s.io", "v1", "volumesnapshotcontents", rest @ ..] => {
            (Kind::VolumeSnapshotContent, "", rest)
        }
        _ => return None,
    };
    let name = match rest {
        [] => None,
        [name] => Some((*name).to_string()),
        _ => return None,
    };
    Some(Route {
        kind,
        namespace: namespace.to_string(),
        name,
    })
}

fn query_param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

impl FakeApi {
    /// An empty API server.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Creates or replaces an object (test set-up; not counted as a request). Returns its
    /// resourceVersion.
    pub fn put_object(&self, kind: Kind, namespace: &str, mut obj: Value) -> u64 {
        let mut st = self.state();
        st.rv += 1;
        let rv = st.rv;
        let name = obj["metadata"]["name"].as_str().unwrap_or_default().to_string();
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let json = Bytes::from(obj.to_string());
        st.objects
            .insert((kind, namespace.to_string(), name), Obj { rv, json });
        rv
    }

    /// Removes an object (test set-up, e.g. a Node going away).
    pub fn remove_object(&self, kind: Kind, namespace: &str, name: &str) -> bool {
        self.state()
            .objects
            .remove(&(kind, namespace.to_string(), name.to_string()))
            .is_some()
    }

    /// An object as JSON.
    pub fn object(&self, kind: Kind, namespace: &str, name: &str) -> Option<Value> {
        let st = self.state();
        let o = st
            .objects
            .get(&(kind, namespace.to_string(), name.to_string()))?;
        serde_json::from_slice(&o.json).ok()
    }

    /// Objects of `kind`, sorted by (namespace, name).
    pub fn objects(&self, kind: Kind) -> Vec<Value> {
        self.state()
            .objects
            .iter()
            .filter(|((k, _, _), _)| *k == kind)
            .filter_map(|(_, o)| serde_json::from_slice(&o.json).ok())
            .collect()
    }

    /// The next `n` writes (PATCH/PUT) answer 409 Conflict, each moving the target's
    /// resourceVersion as a concurrent writer would.
    pub fn conflict_next_writes(&self, n: u64) {
        self.state().conflicts += n;
    }

    /// The next requests answer these HTTP error statuses (e.g. 500, 503), in order.
    pub fn fail_next_requests(&self, statuses: impl IntoIterator<Item = u16>) {
        let mut st = self.state();
        let mut add: Vec<u16> = statuses.into_iter().collect();
        add.reverse();
        add.append(&mut st.errors);
        st.errors = add;
    }

    /// Every request waits `latency` before it is handled.
    pub fn set_latency(&self, latency: Duration) {
        self.state().latency = latency;
    }

    /// Requests handled so far, by `"VERB kind"` (e.g. `"PATCH persistentvolumes"`, `"LIST
    /// nodes"`).
    pub fn requests(&self) -> BTreeMap<String, u64> {
        self.state().requests.clone()
    }

    /// Total requests handled so far.
    pub fn request_count(&self) -> u64 {
        self.state().requests.values().sum()
    }

    /// Forgets the request counts.
    pub fn reset_requests(&self) {
        self.state().requests.clear();
    }

    /// Handles one request after the configured latency.
    pub async fn handle(&self, method: &Method, path_and_query: &str, body: &[u8]) -> Answer {
        let latency = self.state().latency;
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        self.handle_now(method, path_and_query, body)
    }

    /// Handles one request immediately (no latency).
    pub fn handle_now(&self, method: &Method, path_and_query: &str, body: &[u8]) -> Answer {
        let (path, query) = path_and_query
            .split_once('?')
            .unwrap_or((path_and_query, ""));
        let Some(route) = route(path) else {
            return status_body(404, "NotFound", &format!("no route for {path}"));
        };
        let verb = match (method, &route.name) {
            (&Method::GET, None) => "LIST",
            (m, _) => m.as_str(),
        };
        let mut st = self.state();
        *st.requests
            .entry(format!("{verb} {}", route.kind.resource()))
            .or_insert(0) += 1;
        if let Some(code) = st.errors.pop() {
            return status_body(code, "InternalError", "injected server error");
        }
        let key = |name: &str| (route.kind, route.namespace.clone(), name.to_string());
        match (method, &route.name) {
            (&Method::GET, Some(name)) => match st.objects.get(&key(name)) {
                Some(o) => Answer {
                    status: StatusCode::OK,
                    body: o.json.clone(),
                },
                None => not_found(route.kind, name),
            },
            (&Method::GET, None) => list(&st, &route, query),
            (&Method::POST, None) => {
                let Ok(mut obj) = serde_json::from_slice::<Value>(body) else {
                    return status_body(400, "BadRequest", "body is not JSON");
                };
                let name = match obj["metadata"]["name"].as_str() {
                    Some(n) => n.to_string(),
                    None => match obj["metadata"]["generateName"].as_str() {
                        Some(prefix) => format!("{prefix}{}", st.rv + 1),
                        None => return status_body(422, "Invalid", "metadata.name is required"),
                    },
                };
                if st.objects.contains_key(&key(&name)) {
                    return status_body(409, "AlreadyExists", &format!("{name} already exists"));
                }
                obj["metadata"]["name"] = json!(name);
                if !route.namespace.is_empty() {
                    obj["metadata"]["namespace"] = json!(route.namespace);
                }
                store(&mut st, key(&name), obj, StatusCode::CREATED)
            }
            (&Method::PATCH | &Method::PUT, Some(name)) => {
                let Ok(patch) = serde_json::from_slice::<Value>(body) else {
                    return status_body(400, "BadRequest", "body is not JSON");
                };
                let Some(current) = st.objects.get(&key(name)).cloned() else {
                    return not_found(route.kind, name);
                };
                if st.conflicts > 0 {
                    st.conflicts -= 1;
                    // A concurrent writer changed the object: its version moves.
                    st.rv += 1;
                    let rv = st.rv;
                    if let Ok(mut obj) = serde_json::from_slice::<Value>(&current.json) {
                        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
                        st.objects.insert(
                            key(name),
                            Obj {
                                rv,
                                json: Bytes::from(obj.to_string()),
                            },
                        );
                    }
                    return conflict(route.kind, name);
                }
                if let Some(want) = patch["metadata"]["resourceVersion"].as_str()
                    && want != current.rv.to_string()
                {
                    return conflict(route.kind, name);
                }
                let obj = if method == Method::PUT {
                    patch
                } else {
                    let Ok(mut obj) = serde_json::from_slice::<Value>(&current.json) else {
                        return status_body(500, "InternalError", "stored object is not JSON");
                    };
                    merge_patch(&mut obj, &patch);
                    obj
                };
                store(&mut st, key(name), obj, StatusCode::OK)
            }
            (&Method::DELETE, Some(name)) => match st.objects.remove(&key(name)) {
                Some(o) => Answer {
                    status: StatusCode::OK,
                    body: o.json,
                },
                None => not_found(route.kind, name),
            },
            _ => status_body(405, "MethodNotAllowed", &format!("{method} {path}")),
        }
    }
}

fn not_found(kind: Kind, name: &str) -> Answer {
    status_body(
        404,
        "NotFound",
        &format!("{} \"{name}\" not found", kind.resource()),
    )
}

fn conflict(kind: Kind, name: &str) -> Answer {
    status_body(
        409,
        "Conflict",
        &format!(
            "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; \
             please apply your changes to the latest version and try again",
            kind.resource()
        ),
    )
}

fn store(st: &mut State, key: Key, mut obj: Value, status: StatusCode) -> Answer {
    st.rv += 1;
    let rv = st.rv;
    obj["metadata"]["resourceVersion"] = json!(rv.to_string());
    let json = Bytes::from(obj.to_string());
    st.objects.insert(
        key,
        Obj {
            rv,
            json: json.clone(),
        },
    );
    Answer { status, body: json }
}

fn list(st: &State, route: &Route, query: &str) -> Answer {
    let limit = query_param(query, "limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    // The continue token is the name of the last item of the previous page.
    let start = query_param(query, "continue").unwrap_or("");
    let lower = (route.kind, route.namespace.clone(), start.to_string());
    let mut items: Vec<&Bytes> = Vec::new();
    let mut last: Option<&str> = None;
    let mut token = None;
    for ((_, _, name), obj) in st
        .objects
        .range(lower..)
        .take_while(|((k, ns, _), _)| {
            *k == route.kind && (route.namespace.is_empty() || *ns == route.namespace)
        })
        .filter(|((_, _, name), _)| start.is_empty() || name.as_str() != start)
    {
        if items.len() == limit {
            token = last.map(str::to_string);
            break;
        }
        items.push(&obj.json);
        last = Some(name);
    }
    let (api_version, kind) = route.kind.list_kind();
    let mut meta = json!({ "resourceVersion": st.rv.to_string() });
    if let Some(t) = &token {
        meta["continue"] = json!(t);
    }
    let mut out = Vec::with_capacity(items.iter().map(|b| b.len() + 1).sum::<usize>() + 128);
    out.extend_from_slice(
        format!("{{\"apiVersion\":\"{api_version}\",\"kind\":\"{kind}\",\"metadata\":{meta},\"items\":[")
            .as_bytes(),
    );
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(item);
    }
    out.extend_from_slice(b"]}");
    Answer {
        status: StatusCode::OK,
        body: Bytes::from(out),
    }
}

impl tower::Service<http::Request<::kube::client::Body>> for FakeApi {
    type Response = http::Response<::kube::client::Body>;
    type Error = std::convert::Infallible;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<::kube::client::Body>) -> Self::Future {
        let api = self.clone();
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            let body = body.collect_bytes().await.unwrap_or_default();
            let path = parts
                .uri
                .path_and_query()
                .map(|p| p.as_str().to_string())
                .unwrap_or_default();
            let answer = api.handle(&parts.method, &path, &body).await;
            let mut resp = http::Response::new(::kube::client::Body::from(answer.body));
            *resp.status_mut() = answer.status;
            let headers = resp.headers_mut();
            headers.insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            headers.insert(
                http::header::DATE,
                http::HeaderValue::from_static(FIXED_DATE),
            );
            Ok(resp)
        })
    }
}

impl FakeApi {
    /// Serves HTTP/1.1 on one accepted connection (a tokio or turmoil `TcpStream`, any
    /// async byte stream) until the peer closes it: the transport for the simulation.
    pub async fn serve_connection<IO>(&self, io: IO) -> Result<(), hyper::Error>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let api = self.clone();
        let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
            let api = api.clone();
            async move {
                let (parts, body) = req.into_parts();
                let mut body = std::pin::pin!(body);
                let mut bytes = Vec::new();
                while let Some(frame) = std::future::poll_fn(|cx| {
                    hyper::body::Body::poll_frame(body.as_mut(), cx)
                })
                .await
                {
                    if let Ok(data) = frame?.into_data() {
                        bytes.extend_from_slice(&data);
                    }
                }
                let path = parts
                    .uri
                    .path_and_query()
                    .map(|p| p.as_str().to_string())
                    .unwrap_or_default();
                let answer = api.handle(&parts.method, &path, &bytes).await;
                let text = String::from_utf8_lossy(&answer.body).into_owned();
                let mut resp = http::Response::new(text);
                *resp.status_mut() = answer.status;
                let headers = resp.headers_mut();
                headers.insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/json"),
                );
                // hyper stamps a wall-clock date only when the header is absent.
                headers.insert(
                    http::header::DATE,
                    http::HeaderValue::from_static(FIXED_DATE),
                );
                Ok::<_, hyper::Error>(resp)
            }
        });
        hyper::server::conn::http1::Builder::new()
            .serve_connection(hyper_util::rt::TokioIo::new(io), service)
            .await
    }

    /// A kube client over this fake (no kube retries: the adapters retry with our seeded
    /// backoff). Must be called inside a tokio runtime (kube spawns its buffer task).
    pub fn client(&self) -> ::kube::Client {
        ::kube::Client::new(self.clone(), "default")
    }
}
