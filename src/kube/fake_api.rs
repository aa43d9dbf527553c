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
//! **Watches.** A collection GET with `watch=true` (or `watch=1`) answers a stream of
//! newline-delimited JSON watch events, like the real API server: from `resourceVersion=N`,
//! every change of that kind after `N` kept in its bounded event history (a watch cache of
//! [`DEFAULT_WATCH_HISTORY`] events per kind, [`FakeApi::set_watch_history`]) is replayed,
//! then live ADDED/MODIFIED/DELETED events follow; without a resourceVersion (or `0`) the
//! current objects come first as ADDED. A resourceVersion older than the history answers
//! one `ERROR` event carrying a `Status` with code 410 (reason `Expired`, "too old resource
//! version") and ends the stream — the real server's answer, on which a client relists.
//! `allowWatchBookmarks=true` adds a BOOKMARK (the current resourceVersion) every
//! [`BOOKMARK_INTERVAL`]; `timeoutSeconds` ends the stream after that long. Faults: every
//! open stream cut ([`FakeApi::cut_watches`]), the next watches answered 410
//! ([`FakeApi::gone_next_watches`]), the history compacted ([`FakeApi::compact_history`]).
//! A paginated LIST is a snapshot as far as watches go: every page carries the
//! resourceVersion of the first (the continue token keeps it), so a watch from there
//! replays what changed during the listing. A deletion moves the resourceVersion (the
//! DELETED event carries the new one), as on the real server.
//!
//! The HTTP handling ([`FakeApi::handle`]: method, path, body → status, body) is separate
//! from the transport: [`FakeApi`] is also a tower service that `kube::Client::new`
//! accepts, and the simulation can serve `handle` over turmoil TCP. Responses carry a fixed
//! `date` header (hyper would stamp the wall clock and break determinism).
//!
//! Objects are stored as serialized bytes, so 100,000 PVs cost tens of MiB and a LIST page
//! is a concatenation, not a re-serialization.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use serde_json::{Value, json};

/// Fixed `date` header of every response.
pub const FIXED_DATE: &str = "Thu, 01 Jan 2026 00:00:00 GMT";

/// Events of each kind kept for watches to resume from (the watch cache's size).
pub const DEFAULT_WATCH_HISTORY: usize = 1000;

/// How often a watch that allows bookmarks gets one (the real server: about a minute).
pub const BOOKMARK_INTERVAL: Duration = Duration::from_secs(60);

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

/// One change of an object, as a watch reports it.
#[derive(Debug, Clone)]
struct Change {
    rv: u64,
    namespace: String,
    /// The whole watch event line (`{"type":..,"object":..}\n`).
    line: Bytes,
}

/// The event history of one kind: what a watch from an older resourceVersion replays.
#[derive(Debug, Default)]
struct History {
    changes: VecDeque<Change>,
    /// Changes up to this resourceVersion are forgotten: a watch from before it is 410.
    floor: u64,
}

/// An open watch stream.
#[derive(Debug)]
struct Watcher {
    kind: Kind,
    namespace: String,
    tx: tokio::sync::mpsc::UnboundedSender<Bytes>,
}

#[derive(Debug)]
struct State {
    objects: BTreeMap<Key, Obj>,
    rv: u64,
    requests: BTreeMap<String, u64>,
    conflicts: u64,
    errors: Vec<u16>,
    latency: Duration,
    history: BTreeMap<Kind, History>,
    history_limit: usize,
    watchers: Vec<Watcher>,
    gone_watches: u64,
    listed_objects: u64,
    watch_events: u64,
    /// Lines sent to watch streams and not yet taken by their readers.
    pending: Arc<AtomicU64>,
}

impl Default for State {
    fn default() -> Self {
        Self {
            objects: BTreeMap::new(),
            rv: 0,
            requests: BTreeMap::new(),
            conflicts: 0,
            errors: Vec::new(),
            latency: Duration::ZERO,
            history: BTreeMap::new(),
            history_limit: DEFAULT_WATCH_HISTORY,
            watchers: Vec::new(),
            gone_watches: 0,
            listed_objects: 0,
            watch_events: 0,
            pending: Arc::default(),
        }
    }
}

impl State {
    /// Records a change of `kind` (the object's JSON already carries `rv`) and sends it to
    /// the open watches of that kind.
    fn changed(&mut self, kind: Kind, namespace: &str, rv: u64, kind_word: &str, json: &Bytes) {
        let mut line = Vec::with_capacity(json.len() + 32);
        line.extend_from_slice(b"{\"type\":\"");
        line.extend_from_slice(kind_word.as_bytes());
        line.extend_from_slice(b"\",\"object\":");
        line.extend_from_slice(json);
        line.extend_from_slice(b"}\n");
        let line = Bytes::from(line);
        let limit = self.history_limit;
        let h = self.history.entry(kind).or_default();
        h.changes.push_back(Change {
            rv,
            namespace: namespace.to_string(),
            line: line.clone(),
        });
        while h.changes.len() > limit {
            if let Some(old) = h.changes.pop_front() {
                h.floor = old.rv;
            }
        }
        let mut sent = 0;
        self.watchers.retain(|w| {
            if w.kind != kind || !(w.namespace.is_empty() || w.namespace == namespace) {
                return !w.tx.is_closed();
            }
            let ok = w.tx.send(line.clone()).is_ok();
            sent += u64::from(ok);
            ok
        });
        self.watch_events += sent;
        self.pending.fetch_add(sent, Ordering::SeqCst);
    }
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
        let key = (kind, namespace.to_string(), name);
        let word = if st.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        st.changed(kind, namespace, rv, word, &json);
        st.objects.insert(key, Obj { rv, json });
        rv
    }

    /// Removes an object (test set-up, e.g. a Node going away).
    pub fn remove_object(&self, kind: Kind, namespace: &str, name: &str) -> bool {
        let mut st = self.state();
        delete(&mut st, &(kind, namespace.to_string(), name.to_string())).is_some()
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

    /// Drops every injected fault not yet spent: the 409s and error statuses queued for
    /// the next requests, and the 410s queued for the next watches (a test's or the
    /// simulation's "faults off": a storm injected while nothing wrote must not outlive it).
    pub fn clear_injected_faults(&self) {
        let mut st = self.state();
        st.conflicts = 0;
        st.errors.clear();
        st.gone_watches = 0;
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
            (&Method::GET, None) => list(&mut st, &route, query),
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
                        let json = Bytes::from(obj.to_string());
                        st.changed(route.kind, &route.namespace, rv, "MODIFIED", &json);
                        st.objects.insert(key(name), Obj { rv, json });
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
            (&Method::DELETE, Some(name)) => match delete(&mut st, &key(name)) {
                Some(json) => Answer {
                    status: StatusCode::OK,
                    body: json,
                },
                None => not_found(route.kind, name),
            },
            _ => status_body(405, "MethodNotAllowed", &format!("{method} {path}")),
        }
    }
}

/// What [`FakeApi::respond`] answers: a whole body, or a watch's stream of event lines.
#[derive(Debug)]
pub enum Reply {
    /// A whole answer.
    Whole(Answer),
    /// A watch: status 200 and a stream of newline-delimited JSON watch events.
    Watch(WatchStream),
}

/// The receiving end of one watch; on drop, lines still queued stop counting as pending.
#[derive(Debug)]
struct WatchRx {
    rx: tokio::sync::mpsc::UnboundedReceiver<Bytes>,
    pending: Arc<AtomicU64>,
}

impl Drop for WatchRx {
    fn drop(&mut self) {
        self.rx.close();
        while self.rx.try_recv().is_ok() {
            self.pending.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// A watch's stream of newline-delimited JSON events (one event a line), ending when the
/// watch's timeout passes, the server cuts it, or after a 410 `ERROR` event.
pub struct WatchStream {
    inner: Pin<Box<dyn futures::Stream<Item = Bytes> + Send>>,
}

impl std::fmt::Debug for WatchStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchStream").finish_non_exhaustive()
    }
}

impl futures::Stream for WatchStream {
    type Item = Bytes;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        self.inner.as_mut().poll_next(cx)
    }
}

/// The 410 a watch from a resourceVersion older than the history gets, as an event line.
fn gone_line(asked: u64, floor: u64) -> Bytes {
    let status = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("too old resource version: {asked} ({floor})"),
        "reason": "Expired", "code": 410,
    });
    Bytes::from(format!("{{\"type\":\"ERROR\",\"object\":{status}}}\n"))
}

impl FakeApi {
    /// Handles one request after the configured latency; a watch answers a stream.
    pub async fn respond(&self, method: &Method, path_and_query: &str, body: &[u8]) -> Reply {
        let latency = self.state().latency;
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        let (path, query) = path_and_query
            .split_once('?')
            .unwrap_or((path_and_query, ""));
        let is_watch = matches!(query_param(query, "watch"), Some("true" | "1"));
        match route(path) {
            Some(route) if is_watch && method == Method::GET && route.name.is_none() => {
                self.watch(&route, query)
            }
            _ => Reply::Whole(self.handle_now(method, path_and_query, body)),
        }
    }

    /// Opens a watch of `route`'s collection.
    fn watch(&self, route: &Route, query: &str) -> Reply {
        let mut st = self.state();
        *st.requests
            .entry(format!("WATCH {}", route.kind.resource()))
            .or_insert(0) += 1;
        if let Some(code) = st.errors.pop() {
            return Reply::Whole(status_body(code, "InternalError", "injected server error"));
        }
        let from = match query_param(query, "resourceVersion").filter(|v| !v.is_empty()) {
            None | Some("0") => None,
            Some(v) => match v.parse::<u64>() {
                Ok(v) => Some(v),
                Err(_) => {
                    return Reply::Whole(status_body(
                        400,
                        "BadRequest",
                        &format!("invalid resourceVersion {v:?}"),
                    ));
                }
            },
        };
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let pending = Arc::clone(&st.pending);
        let mut queued = 0u64;
        let mut register = true;
        let floor = st.history.get(&route.kind).map_or(0, |h| h.floor);
        let gone = st.gone_watches > 0;
        match from {
            Some(v) if gone || v < floor => {
                st.gone_watches = st.gone_watches.saturating_sub(1);
                queued += u64::from(tx.send(gone_line(v, floor.max(v + 1))).is_ok());
                register = false;
            }
            Some(v) => {
                if let Some(h) = st.history.get(&route.kind) {
                    for c in h.changes.iter().filter(|c| {
                        c.rv > v && (route.namespace.is_empty() || c.namespace == route.namespace)
                    }) {
                        queued += u64::from(tx.send(c.line.clone()).is_ok());
                    }
                }
            }
            None => {
                for ((k, ns, _), o) in st.objects.iter() {
                    if *k == route.kind && (route.namespace.is_empty() || *ns == route.namespace) {
                        let mut line = Vec::with_capacity(o.json.len() + 32);
                        line.extend_from_slice(b"{\"type\":\"ADDED\",\"object\":");
                        line.extend_from_slice(&o.json);
                        line.extend_from_slice(b"}\n");
                        queued += u64::from(tx.send(Bytes::from(line)).is_ok());
                    }
                }
            }
        }
        st.watch_events += queued;
        pending.fetch_add(queued, Ordering::SeqCst);
        if register {
            st.watchers.push(Watcher {
                kind: route.kind,
                namespace: route.namespace.clone(),
                tx,
            });
        }
        drop(st);
        let bookmarks = query_param(query, "allowWatchBookmarks") == Some("true");
        let timeout = query_param(query, "timeoutSeconds")
            .and_then(|t| t.parse::<u64>().ok())
            .map(Duration::from_secs);
        let api = self.clone();
        let kind = route.kind;
        let rx = WatchRx { rx, pending };
        let end = timeout.map(|t| tokio::time::Instant::now() + t);
        let stream = futures::stream::unfold((rx, api, end), move |(mut rx, api, end)| async move {
            loop {
                let next_bookmark = tokio::time::sleep(BOOKMARK_INTERVAL);
                let until_end = async {
                    match end {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    biased;
                    line = rx.rx.recv() => {
                        let line = line?;
                        rx.pending.fetch_sub(1, Ordering::SeqCst);
                        return Some((line, (rx, api, end)));
                    }
                    () = until_end => return None,
                    () = next_bookmark, if bookmarks => {
                        let st = api.state();
                        if !rx.rx.is_empty() {
                            continue;
                        }
                        let (api_version, list) = kind.list_kind();
                        let singular = list.strip_suffix("List").unwrap_or(list);
                        let line = Bytes::from(format!(
                            "{{\"type\":\"BOOKMARK\",\"object\":{{\"kind\":\"{singular}\",\"apiVersion\":\"{api_version}\",\"metadata\":{{\"resourceVersion\":\"{}\"}}}}}}\n",
                            st.rv
                        ));
                        drop(st);
                        return Some((line, (rx, api, end)));
                    }
                }
            }
        });
        Reply::Watch(WatchStream {
            inner: Box::pin(stream),
        })
    }

    /// Ends every open watch stream (the lines already queued are still delivered), as a
    /// restarting API server or a load balancer cutting connections would.
    pub fn cut_watches(&self) {
        self.state().watchers.clear();
    }

    /// The next `n` watches from a resourceVersion answer 410 Gone (an `ERROR` event), as
    /// when their version fell out of the server's watch cache.
    pub fn gone_next_watches(&self, n: u64) {
        self.state().gone_watches += n;
    }

    /// Forgets every kind's event history (an etcd compaction): a watch from an earlier
    /// resourceVersion answers 410 Gone.
    pub fn compact_history(&self) {
        let mut st = self.state();
        let rv = st.rv;
        for h in st.history.values_mut() {
            h.changes.clear();
            h.floor = rv;
        }
    }

    /// Keeps at most `n` events of each kind for watches to resume from.
    pub fn set_watch_history(&self, n: usize) {
        self.state().history_limit = n;
    }

    /// Watch event lines sent and not yet taken by the streams' readers: while there are
    /// any, a host has work no timer shows.
    pub fn watch_lines_pending(&self) -> u64 {
        self.state().pending.load(Ordering::SeqCst)
    }

    /// Open watch streams.
    pub fn open_watches(&self) -> usize {
        let mut st = self.state();
        st.watchers.retain(|w| !w.tx.is_closed());
        st.watchers.len()
    }

    /// Objects sent in LIST answers so far.
    pub fn listed_objects(&self) -> u64 {
        self.state().listed_objects
    }

    /// Watch events sent so far (replayed and live).
    pub fn watch_events(&self) -> u64 {
        self.state().watch_events
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
    let word = if status == StatusCode::CREATED {
        "ADDED"
    } else {
        "MODIFIED"
    };
    st.changed(key.0, &key.1, rv, word, &json);
    st.objects.insert(
        key,
        Obj {
            rv,
            json: json.clone(),
        },
    );
    Answer { status, body: json }
}

/// Deletes an object: the deletion moves the resourceVersion, and the DELETED event (and
/// the answer) carry the object's last state at the new version.
fn delete(st: &mut State, key: &Key) -> Option<Bytes> {
    let o = st.objects.remove(key)?;
    st.rv += 1;
    let rv = st.rv;
    let json = match serde_json::from_slice::<Value>(&o.json) {
        Ok(mut obj) => {
            obj["metadata"]["resourceVersion"] = json!(rv.to_string());
            Bytes::from(obj.to_string())
        }
        Err(_) => o.json,
    };
    st.changed(key.0, &key.1, rv, "DELETED", &json);
    Some(json)
}

fn list(st: &mut State, route: &Route, query: &str) -> Answer {
    let limit = query_param(query, "limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    // The continue token is `<resourceVersion of the first page>_<name of the last item of
    // the previous page>` (`_` is in no object name, and needs no escaping in a query):
    // every page answers the first page's version, from which a watch replays whatever
    // changed while the pages were read.
    let (snapshot, start) = match query_param(query, "continue") {
        Some(t) => match t.split_once('_') {
            Some((rv, name)) => (rv.parse::<u64>().ok(), name),
            None => (None, t),
        },
        None => (None, ""),
    };
    let snapshot = snapshot.unwrap_or(st.rv);
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
    let listed = items.len() as u64;
    let (api_version, kind) = route.kind.list_kind();
    let mut meta = json!({ "resourceVersion": snapshot.to_string() });
    if let Some(t) = &token {
        meta["continue"] = json!(format!("{snapshot}_{t}"));
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
    st.listed_objects += listed;
    Answer {
        status: StatusCode::OK,
        body: Bytes::from(out),
    }
}

/// A response body: a whole answer or a watch's stream.
pub type ReplyBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// The error type of [`ReplyBody`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Reply {
    /// The HTTP response of this reply, with the fixed `date` header (hyper stamps the wall
    /// clock only when the header is absent).
    pub fn into_response(self) -> http::Response<ReplyBody> {
        use futures::StreamExt;
        use http_body_util::BodyExt;
        let (status, body) = match self {
            Reply::Whole(a) => (
                a.status,
                http_body_util::Full::new(a.body)
                    .map_err(|never| match never {})
                    .boxed_unsync(),
            ),
            Reply::Watch(stream) => (
                StatusCode::OK,
                http_body_util::StreamBody::new(
                    stream.map(|b| Ok::<_, BoxError>(hyper::body::Frame::data(b))),
                )
                .boxed_unsync(),
            ),
        };
        let mut resp = http::Response::new(body);
        *resp.status_mut() = status;
        let headers = resp.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        headers.insert(
            http::header::DATE,
            http::HeaderValue::from_static(FIXED_DATE),
        );
        resp
    }
}

impl tower::Service<http::Request<::kube::client::Body>> for FakeApi {
    type Response = http::Response<ReplyBody>;
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
            Ok(api.respond(&parts.method, &path, &body).await.into_response())
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
                Ok::<_, hyper::Error>(api.respond(&parts.method, &path, &bytes).await.into_response())
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
