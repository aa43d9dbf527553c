//! Offline checks of the deployment in `deploy/`: the Helm chart, the plain manifests rendered
//! from it, and the container image definition.
//!
//! - every manifest validates against the Kubernetes schema (kubernetes-validate, strict; our
//!   own schema for the VolumeSnapshotClass CRD kind, which it does not ship);
//! - the committed `deploy/manifests/` equal the chart rendered with its default values;
//! - the plugin's RBAC grants exactly `rds_csi::kube_rbac::API_ACCESS`, each sidecar exactly
//!   its upstream rule set, and nothing else is bound to the plugin's ServiceAccounts;
//! - the pods are shaped as fencing needs (CSIDriver attachRequired, a csi-attacher, sidecar
//!   leader election, node privileges and mount propagation) and every flag and environment
//!   variable the manifests give the plugin is one `rds-csi-plugin` accepts;
//! - mutated copies prove that a wrong verb, a missing sidecar and the other checked faults
//!   make these checks fail.
//!
//! The manifests are read through `deploy/tools/deploycheck.py` (python3 with PyYAML and
//! kubernetes-validate, installed by `.ci/run`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use clap::{CommandFactory, Parser};
use rds_csi::cli::Cli;
use rds_csi::kube_rbac::{API_ACCESS, ApiAccess, NODE_API_ACCESS};
use rds_csi::types::defaults::DEFAULT_DRIVER_NAME;
use serde_json::{Value, json};

/// The release name and namespace `deploy/manifests/` is rendered with.
const RELEASE: &str = "rds-csi";
const NAMESPACE: &str = "kube-system";

/// Sidecar RBAC, per each sidecar's upstream `deploy/kubernetes/rbac.yaml` (the optional
/// rules for unused features left out: CSI secrets, group snapshots, cross-namespace data
/// sources). Bumping a sidecar image may
/// change its needs: update both this table and `rbac-sidecars.yaml` from its release notes.
const PROVISIONER: &[ApiAccess] = &[
    (
        "",
        "persistentvolumes",
        &["get", "list", "watch", "create", "patch", "delete"],
    ),
    (
        "",
        "persistentvolumeclaims",
        &["get", "list", "watch", "update"],
    ),
    (
        "storage.k8s.io",
        "storageclasses",
        &["get", "list", "watch"],
    ),
    (
        "",
        "events",
        &["list", "watch", "create", "update", "patch"],
    ),
    (
        "snapshot.storage.k8s.io",
        "volumesnapshots",
        &["get", "list"],
    ),
    (
        "snapshot.storage.k8s.io",
        "volumesnapshotcontents",
        &["get", "list"],
    ),
    ("storage.k8s.io", "csinodes", &["get", "list", "watch"]),
    ("", "nodes", &["get", "list", "watch"]),
    (
        "storage.k8s.io",
        "volumeattachments",
        &["get", "list", "watch"],
    ),
];
const ATTACHER: &[ApiAccess] = &[
    (
        "",
        "persistentvolumes",
        &["get", "list", "watch", "update", "patch"],
    ),
    ("", "nodes", &["get", "list", "watch"]),
    ("storage.k8s.io", "csinodes", &["get", "list", "watch"]),
    (
        "storage.k8s.io",
        "volumeattachments",
        &["get", "list", "watch", "update", "patch"],
    ),
    ("storage.k8s.io", "volumeattachments/status", &["patch"]),
];
const RESIZER: &[ApiAccess] = &[
    ("", "persistentvolumes", &["get", "list", "watch", "patch"]),
    ("", "persistentvolumeclaims", &["get", "list", "watch"]),
    ("", "pods", &["list", "watch"]),
    ("", "persistentvolumeclaims/status", &["patch"]),
    (
        "",
        "events",
        &["list", "watch", "create", "update", "patch"],
    ),
    (
        "storage.k8s.io",
        "volumeattributesclasses",
        &["get", "list", "watch"],
    ),
];
const SNAPSHOTTER: &[ApiAccess] = &[
    (
        "",
        "events",
        &["list", "watch", "create", "update", "patch"],
    ),
    (
        "snapshot.storage.k8s.io",
        "volumesnapshotclasses",
        &["get", "list", "watch"],
    ),
    (
        "snapshot.storage.k8s.io",
        "volumesnapshotcontents",
        &["create", "get", "list", "watch", "update", "patch"],
    ),
    (
        "snapshot.storage.k8s.io",
        "volumesnapshotcontents/status",
        &["update", "patch"],
    ),
];
/// Sidecar leader election (a Role in the release namespace).
const LEADER_ELECTION: &[ApiAccess] = &[(
    "coordination.k8s.io",
    "leases",
    &["get", "watch", "list", "delete", "update", "create"],
)];
/// external-provisioner `--enable-capacity` (a Role in the release namespace).
const CAPACITY: &[ApiAccess] = &[
    (
        "storage.k8s.io",
        "csistoragecapacities",
        &[
            "get", "list", "watch", "create", "update", "patch", "delete",
        ],
    ),
    ("", "pods", &["get"]),
    ("apps", "replicasets", &["get"]),
];

/// The controller pod's containers: (name, image name, takes leader election).
const CONTROLLER_SIDECARS: &[(&str, &str)] = &[
    ("csi-provisioner", "csi-provisioner"),
    ("csi-attacher", "csi-attacher"),
    ("csi-resizer", "csi-resizer"),
    ("csi-snapshotter", "csi-snapshotter"),
];
const PLUGIN: &str = "rds-csi-plugin";

// ------------------------------------------------------------------ running the tool

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn manifests_dir() -> PathBuf {
    root().join("deploy/manifests")
}

/// Runs `python3 deploy/tools/deploycheck.py ARGS`.
fn tool(args: &[&str]) -> Output {
    Command::new("python3")
        .arg(root().join("deploy/tools/deploycheck.py"))
        .args(args)
        .current_dir(root())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run python3 ({e}): the deployment checks need python3 with \
                 `pip install kubernetes-validate==1.37.0` (see deploy/README.md)"
            )
        })
}

fn text(out: &Output) -> String {
    format!(
        "exit: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Every document under `dir`, as JSON.
fn load_docs(dir: &Path) -> Vec<Value> {
    let out = tool(&["json", dir.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "deploycheck.py json failed: {}",
        text(&out)
    );
    let files: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    files.into_iter().map(|f| f["doc"].clone()).collect()
}

fn default_docs() -> Vec<Value> {
    load_docs(&manifests_dir())
}

/// Copies `deploy/manifests` into a fresh temporary directory.
fn copy_manifests() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(manifests_dir()).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    dir
}

// ------------------------------------------------------------------ navigating documents

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
}

fn find_mut<'a>(docs: &'a mut [Value], kind: &str, name: &str) -> &'a mut Value {
    docs.iter_mut()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("{kind}/{name} not in the manifests"))
}

fn arr(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or(&[])
}

fn strs(v: &Value) -> Vec<String> {
    arr(v)
        .iter()
        .filter_map(|s| s.as_str().map(str::to_owned))
        .collect()
}

fn container<'a>(pod_spec: &'a Value, name: &str) -> Option<&'a Value> {
    arr(&pod_spec["containers"])
        .iter()
        .find(|c| c["name"] == name)
}

fn container_mut<'a>(docs: &'a mut [Value], kind: &str, name: &str, c: &str) -> &'a mut Value {
    find_mut(docs, kind, name)["spec"]["template"]["spec"]["containers"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|x| x["name"] == c)
        .unwrap_or_else(|| panic!("no container {c} in {kind}/{name}"))
}

/// The value of `--flag=value` in `args`.
fn flag(args: &[String], name: &str) -> Option<String> {
    let prefix = format!("--{name}=");
    args.iter()
        .find_map(|a| a.strip_prefix(&prefix).map(str::to_owned))
}

/// Expands `$(VAR)` from the container's literal `env` values, as the kubelet does.
fn expand(c: &Value, s: &str) -> String {
    let mut out = s.to_owned();
    for e in arr(&c["env"]) {
        if let (Some(n), Some(v)) = (e["name"].as_str(), e["value"].as_str()) {
            out = out.replace(&format!("$({n})"), v);
        }
    }
    out
}

type Grants = BTreeSet<(String, String, String)>;

fn grants_of(list: &[ApiAccess]) -> Grants {
    let mut g = Grants::new();
    for (group, resource, verbs) in list {
        for verb in *verbs {
            g.insert((group.to_string(), resource.to_string(), verb.to_string()));
        }
    }
    g
}

/// The (group, resource, verb) triples a Role/ClusterRole grants; wildcards, resourceNames
/// and nonResourceURLs are reported as problems (the plugin's RBAC never needs them).
fn grants_of_role(role: &Value, what: &str, problems: &mut Vec<String>) -> Grants {
    let mut g = Grants::new();
    for rule in arr(&role["rules"]) {
        for key in ["resourceNames", "nonResourceURLs"] {
            if !rule[key].is_null() {
                problems.push(format!("{what}: a rule uses {key}"));
            }
        }
        for group in strs(&rule["apiGroups"]) {
            for resource in strs(&rule["resources"]) {
                for verb in strs(&rule["verbs"]) {
                    if group == "*" || resource == "*" || verb == "*" {
                        problems.push(format!("{what}: wildcard rule {group}/{resource}/{verb}"));
                    }
                    g.insert((group.clone(), resource.clone(), verb));
                }
            }
        }
    }
    g
}

fn diff_grants(what: &str, expected: &Grants, actual: &Grants, hint: &str) -> Option<String> {
    if expected == actual {
        return None;
    }
    let fmt = |s: Vec<&(String, String, String)>| {
        s.iter()
            .map(|(g, r, v)| format!("{g}/{r}:{v}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    Some(format!(
        "{what}: RBAC differs from what is expected; missing [{}], extra [{}]. {hint}",
        fmt(expected.difference(actual).collect()),
        fmt(actual.difference(expected).collect()),
    ))
}

const PLUGIN_HINT: &str = "The plugin's ClusterRole must grant exactly \
    rds_csi::kube_rbac::API_ACCESS (NODE_API_ACCESS for the node). If the Kubernetes adapters' \
    API calls changed, update src/kube_rbac.rs in the same change, then \
    deploy/helm/rds-csi/templates/rbac-plugin.yaml, then run \
    `python3 deploy/tools/deploycheck.py sync`.";
const SIDECAR_HINT: &str = "Sidecar rules follow the sidecar's upstream rbac.yaml; if a \
    sidecar image was bumped, update tests/deploy.rs and rbac-sidecars.yaml together.";

// ------------------------------------------------------------------ the checks

/// Every problem found in a rendered deployment (`docs`), as readable sentences.
fn check_deployment(docs: &[Value]) -> Vec<String> {
    let mut p = Vec::new();
    check_csidriver(docs, &mut p);
    check_rbac(docs, &mut p);
    check_controller(docs, &mut p);
    check_node(docs, &mut p);
    check_classes(docs, &mut p);
    p
}

fn check_csidriver(docs: &[Value], p: &mut Vec<String>) {
    let Some(d) = find(docs, "CSIDriver", DEFAULT_DRIVER_NAME) else {
        p.push(format!("no CSIDriver {DEFAULT_DRIVER_NAME}"));
        return;
    };
    let spec = &d["spec"];
    // Without attachRequired Kubernetes never calls ControllerPublishVolume: fencing inert.
    for (field, want) in [
        ("attachRequired", json!(true)),
        ("podInfoOnMount", json!(true)),
        ("fsGroupPolicy", json!("File")),
        ("storageCapacity", json!(true)),
    ] {
        if spec[field] != want {
            p.push(format!(
                "CSIDriver spec.{field} is {} (want {want})",
                spec[field]
            ));
        }
    }
}

/// The names of the roles bound to ServiceAccount `sa` (kind, name, binding namespace).
fn bound_roles(docs: &[Value], sa: &str) -> Vec<(String, String, Option<String>)> {
    let mut out = Vec::new();
    for b in docs
        .iter()
        .filter(|d| d["kind"] == "ClusterRoleBinding" || d["kind"] == "RoleBinding")
    {
        let binds_sa = arr(&b["subjects"]).iter().any(|s| {
            s["kind"] == "ServiceAccount" && s["name"] == sa && s["namespace"] == NAMESPACE
        });
        if binds_sa {
            out.push((
                b["roleRef"]["kind"].as_str().unwrap_or("").to_owned(),
                b["roleRef"]["name"].as_str().unwrap_or("").to_owned(),
                b["metadata"]["namespace"].as_str().map(str::to_owned),
            ));
        }
    }
    out.sort();
    out
}

fn check_rbac(docs: &[Value], p: &mut Vec<String>) {
    let controller_sa = format!("{RELEASE}-controller");
    let node_sa = format!("{RELEASE}-node");
    let mut expected: Vec<(&str, String, &[ApiAccess], &str)> = vec![
        (
            "ClusterRole",
            format!("{RELEASE}-plugin"),
            API_ACCESS,
            PLUGIN_HINT,
        ),
        (
            "ClusterRole",
            format!("{RELEASE}-external-provisioner"),
            PROVISIONER,
            SIDECAR_HINT,
        ),
        (
            "ClusterRole",
            format!("{RELEASE}-external-attacher"),
            ATTACHER,
            SIDECAR_HINT,
        ),
        (
            "ClusterRole",
            format!("{RELEASE}-external-resizer"),
            RESIZER,
            SIDECAR_HINT,
        ),
        (
            "ClusterRole",
            format!("{RELEASE}-external-snapshotter"),
            SNAPSHOTTER,
            SIDECAR_HINT,
        ),
        (
            "Role",
            format!("{RELEASE}-leader-election"),
            LEADER_ELECTION,
            SIDECAR_HINT,
        ),
    ];
    let capacity = find(docs, "Deployment", &format!("{RELEASE}-controller"))
        .and_then(|d| container(&d["spec"]["template"]["spec"], "csi-provisioner"))
        .is_some_and(|c| strs(&c["args"]).iter().any(|a| a == "--enable-capacity"));
    if capacity {
        expected.push((
            "Role",
            format!("{RELEASE}-external-provisioner-capacity"),
            CAPACITY,
            SIDECAR_HINT,
        ));
    }
    let bound = bound_roles(docs, &controller_sa);
    for (kind, name, access, hint) in &expected {
        let what = format!("{kind} {name}");
        match find(docs, kind, name) {
            None => p.push(format!("{what} is missing")),
            Some(role) => {
                let actual = grants_of_role(role, &what, p);
                p.extend(diff_grants(&what, &grants_of(access), &actual, hint));
                if *kind == "Role" && role["metadata"]["namespace"] != NAMESPACE {
                    p.push(format!("{what} is not in namespace {NAMESPACE}"));
                }
            }
        }
        if !bound.iter().any(|(k, n, _)| k == kind && n == name) {
            p.push(format!(
                "{what} is not bound to ServiceAccount {controller_sa}"
            ));
        }
    }
    for (kind, name, _) in &bound {
        if !expected.iter().any(|(k, n, _, _)| k == kind && n == name) {
            p.push(format!(
                "ServiceAccount {controller_sa} is bound to unexpected {kind} {name}. {PLUGIN_HINT}"
            ));
        }
    }
    let node_bound = bound_roles(docs, &node_sa);
    if NODE_API_ACCESS.is_empty() {
        if !node_bound.is_empty() {
            p.push(format!(
                "ServiceAccount {node_sa} is bound to {node_bound:?} but NODE_API_ACCESS is empty. \
                 {PLUGIN_HINT}"
            ));
        }
        if let Some(sa) = find(docs, "ServiceAccount", &node_sa)
            && sa["automountServiceAccountToken"] != json!(false)
        {
            p.push(format!(
                "ServiceAccount {node_sa} mounts a token it never uses"
            ));
        }
    } else {
        let mut actual = Grants::new();
        for (kind, name, _) in &node_bound {
            if let Some(role) = find(docs, kind, name) {
                actual.extend(grants_of_role(role, name, p));
            }
        }
        p.extend(diff_grants(
            &node_sa,
            &grants_of(NODE_API_ACCESS),
            &actual,
            PLUGIN_HINT,
        ));
        // The node calls the API: its pod must get the ServiceAccount token.
        let pod = find(docs, "DaemonSet", &node_sa).map(|d| &d["spec"]["template"]["spec"]);
        let sa = find(docs, "ServiceAccount", &node_sa);
        let pod_off = pod.is_some_and(|s| s["automountServiceAccountToken"] == json!(false));
        let sa_off = sa.is_some_and(|s| s["automountServiceAccountToken"] == json!(false));
        let pod_on = pod.is_some_and(|s| s["automountServiceAccountToken"] == json!(true));
        if pod_off || (sa_off && !pod_on) {
            p.push(format!(
                "the node plugin (ServiceAccount {node_sa}) calls the Kubernetes API \
                 (NODE_API_ACCESS) but its pod gets no token: drop automountServiceAccountToken: \
                 false"
            ));
        }
    }
}

fn check_plugin_container(c: &Value, mode: &str, what: &str, p: &mut Vec<String>) {
    let args = strs(&c["args"]);
    // Every flag must be one the plugin has, with a value it accepts.
    let argv = std::iter::once(PLUGIN.to_owned()).chain(args.iter().cloned());
    if let Err(e) = Cli::try_parse_from(argv) {
        p.push(format!(
            "{what}: rds-csi-plugin rejects its arguments {args:?}: {e}"
        ));
    }
    if flag(&args, "mode").as_deref() != Some(mode) {
        p.push(format!("{what}: not started with --mode={mode}"));
    }
    if let Some(name) = flag(&args, "driver-name")
        && name != DEFAULT_DRIVER_NAME
    {
        p.push(format!(
            "{what}: --driver-name={name}, but the CSIDriver is {DEFAULT_DRIVER_NAME}"
        ));
    }
    // Environment variables: each one the plugin reads (a flag's env) or one the args use.
    let cmd = Cli::command();
    let known: BTreeSet<String> = cmd
        .get_arguments()
        .filter_map(|a| a.get_env().map(|e| e.to_string_lossy().into_owned()))
        .collect();
    for e in arr(&c["env"]) {
        let name = e["name"].as_str().unwrap_or("");
        let used = args.iter().any(|a| a.contains(&format!("$({name})")));
        if !known.contains(name) && !used {
            p.push(format!(
                "{what}: env {name} is neither a plugin setting nor used by an arg"
            ));
        }
    }
    let image = c["image"].as_str().unwrap_or("");
    let want_tag = format!(":{}", env!("CARGO_PKG_VERSION"));
    if !image.ends_with(&want_tag) {
        p.push(format!(
            "{what}: image {image} is not the crate version {want_tag}"
        ));
    }
}

/// The unix socket path of the plugin (its `--endpoint`) and the sidecars' `--csi-address`
/// must be the same file in a shared volume.
fn check_socket(pod: &Value, plugin: &Value, c: &Value, what: &str, p: &mut Vec<String>) {
    let endpoint = flag(&strs(&plugin["args"]), "endpoint").unwrap_or_default();
    let Some(plugin_sock) = endpoint.strip_prefix("unix://") else {
        p.push(format!(
            "{what}: plugin endpoint {endpoint:?} is not a unix socket"
        ));
        return;
    };
    let addr = flag(&strs(&c["args"]), "csi-address").map(|a| expand(c, &a));
    if addr.as_deref() != Some(plugin_sock) {
        p.push(format!(
            "{what}: --csi-address {addr:?} is not the plugin's socket {plugin_sock}"
        ));
    }
    let dir = Path::new(plugin_sock)
        .parent()
        .and_then(Path::to_str)
        .unwrap_or("");
    let mount_of = |x: &Value| {
        arr(&x["volumeMounts"])
            .iter()
            .find(|m| m["mountPath"] == dir)
            .map(|m| m["name"].clone())
    };
    if mount_of(plugin).is_none() || mount_of(plugin) != mount_of(c) {
        p.push(format!(
            "{what}: does not share the plugin's socket directory {dir}"
        ));
    }
    let _ = pod;
}

fn check_least_privilege(pod: &Value, what: &str, p: &mut Vec<String>) {
    if pod["securityContext"]["runAsNonRoot"] != json!(true) {
        p.push(format!(
            "{what}: pod securityContext.runAsNonRoot is not true"
        ));
    }
    if pod["hostNetwork"] == json!(true) {
        p.push(format!("{what}: uses the host network"));
    }
    for c in arr(&pod["containers"]) {
        let name = c["name"].as_str().unwrap_or("");
        let sc = &c["securityContext"];
        if sc["privileged"] == json!(true) {
            p.push(format!("{what}/{name}: privileged"));
        }
        if sc["allowPrivilegeEscalation"] != json!(false) {
            p.push(format!(
                "{what}/{name}: allowPrivilegeEscalation is not false"
            ));
        }
        if sc["readOnlyRootFilesystem"] != json!(true) {
            p.push(format!("{what}/{name}: root filesystem is writable"));
        }
        if !strs(&sc["capabilities"]["drop"]).iter().any(|c| c == "ALL") {
            p.push(format!("{what}/{name}: does not drop ALL capabilities"));
        }
    }
}

fn check_controller(docs: &[Value], p: &mut Vec<String>) {
    let name = format!("{RELEASE}-controller");
    let what = format!("Deployment {name}");
    let Some(d) = find(docs, "Deployment", &name) else {
        p.push(format!("{what} is missing"));
        return;
    };
    let pod = &d["spec"]["template"]["spec"];
    if pod["serviceAccountName"] != name.as_str() {
        p.push(format!("{what}: does not run as ServiceAccount {name}"));
    }
    // One plugin instance at a time: its attachment state is rebuilt only at start-up.
    if d["spec"]["replicas"] != json!(1) || d["spec"]["strategy"]["type"] != "Recreate" {
        p.push(format!(
            "{what}: must run exactly one replica with strategy Recreate"
        ));
    }
    check_least_privilege(pod, &what, p);
    let Some(plugin) = container(pod, PLUGIN) else {
        p.push(format!("{what}: no {PLUGIN} container"));
        return;
    };
    check_plugin_container(plugin, "controller", &format!("{what}/{PLUGIN}"), p);
    for (sidecar, image) in CONTROLLER_SIDECARS {
        let cw = format!("{what}/{sidecar}");
        let Some(c) = container(pod, sidecar) else {
            p.push(format!("{what}: sidecar {sidecar} is missing"));
            continue;
        };
        if !c["image"]
            .as_str()
            .unwrap_or("")
            .contains(&format!("/{image}:"))
        {
            p.push(format!("{cw}: image {} is not {image}", c["image"]));
        }
        if !strs(&c["args"])
            .iter()
            .any(|a| a == "--leader-election" || a == "--leader-election=true")
        {
            p.push(format!("{cw}: runs without --leader-election"));
        }
        check_socket(pod, plugin, c, &cw, p);
    }
    match container(pod, "liveness-probe") {
        Some(c) => check_socket(pod, plugin, c, &format!("{what}/liveness-probe"), p),
        None => p.push(format!("{what}: sidecar liveness-probe is missing")),
    }
    // The SSH key comes from the Secret the chart (or the admin) provides.
    let secret_name = arr(&pod["volumes"])
        .iter()
        .find_map(|v| v["secret"]["secretName"].as_str())
        .unwrap_or("");
    match find(docs, "Secret", secret_name) {
        Some(s) => {
            for key in ["ssh-privatekey", "host-key"] {
                if s["data"][key].is_null() {
                    p.push(format!("Secret {secret_name} has no {key}"));
                }
            }
        }
        None => p.push(format!(
            "{what}: mounts Secret {secret_name:?}, which is not rendered"
        )),
    }
}

fn check_node(docs: &[Value], p: &mut Vec<String>) {
    let name = format!("{RELEASE}-node");
    let what = format!("DaemonSet {name}");
    let Some(d) = find(docs, "DaemonSet", &name) else {
        p.push(format!("{what} is missing"));
        return;
    };
    let pod = &d["spec"]["template"]["spec"];
    if pod["hostNetwork"] != json!(true) {
        p.push(format!("{what}: not on the host network"));
    }
    let Some(plugin) = container(pod, PLUGIN) else {
        p.push(format!("{what}: no {PLUGIN} container"));
        return;
    };
    let pw = format!("{what}/{PLUGIN}");
    check_plugin_container(plugin, "node", &pw, p);
    if plugin["securityContext"]["privileged"] != json!(true) {
        p.push(format!(
            "{pw}: not privileged (it connects NVMe devices and mounts)"
        ));
    }
    // deploy/Dockerfile's USER is unprivileged: a privileged container running as that user
    // has no capabilities.
    if plugin["securityContext"]["runAsUser"] != json!(0) {
        p.push(format!("{pw}: does not run as root (runAsUser: 0)"));
    }
    let node_id = flag(&strs(&plugin["args"]), "node-id").unwrap_or_default();
    let node_name_env = arr(&plugin["env"]).iter().any(|e| {
        node_id == format!("$({})", e["name"].as_str().unwrap_or("?"))
            && e["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    });
    if !node_name_env {
        p.push(format!(
            "{pw}: --node-id is not the Kubernetes node name (spec.nodeName)"
        ));
    }
    let host_path = |vol: &Value| -> Option<String> {
        arr(&pod["volumes"])
            .iter()
            .find(|v| v["name"] == *vol)
            .and_then(|v| v["hostPath"]["path"].as_str().map(str::to_owned))
    };
    let mounts = arr(&plugin["volumeMounts"]);
    let mount = |path: &str| mounts.iter().find(|m| m["mountPath"] == path);
    for host_dir in ["/dev", "/sys"] {
        if mount(host_dir)
            .and_then(|m| host_path(&m["name"]))
            .as_deref()
            != Some(host_dir)
        {
            p.push(format!(
                "{pw}: host {host_dir} is not mounted at {host_dir}"
            ));
        }
    }
    // The kubelet directory, at its own path, shared both ways with the host.
    let kubelet = mounts
        .iter()
        .find(|m| m["mountPropagation"] == "Bidirectional")
        .filter(|m| host_path(&m["name"]).as_deref() == m["mountPath"].as_str());
    let Some(kubelet) = kubelet else {
        p.push(format!(
            "{pw}: no host kubelet directory mounted with Bidirectional propagation"
        ));
        return;
    };
    let kubelet_dir = kubelet["mountPath"].as_str().unwrap_or("");
    // The node service accepts staging/target paths only below --kubelet-root.
    if flag(&strs(&plugin["args"]), "kubelet-root").as_deref() != Some(kubelet_dir) {
        p.push(format!(
            "{pw}: --kubelet-root is not the mounted kubelet directory {kubelet_dir}"
        ));
    }
    match container(pod, "node-driver-registrar") {
        None => p.push(format!("{what}: sidecar node-driver-registrar is missing")),
        Some(r) => {
            let rw = format!("{what}/node-driver-registrar");
            check_socket(pod, plugin, r, &rw, p);
            // kubelet must find the plugin socket at the registration path on the host.
            let reg = flag(&strs(&r["args"]), "kubelet-registration-path").unwrap_or_default();
            let sock_dir = arr(&r["volumeMounts"])
                .iter()
                .find(|m| m["mountPath"] == "/csi")
                .and_then(|m| host_path(&m["name"]));
            let want = sock_dir.map(|d| format!("{d}/csi.sock"));
            if want.as_deref() != Some(reg.as_str()) {
                p.push(format!(
                    "{rw}: registration path {reg} is not the socket's host path"
                ));
            }
            let want_dir = format!("{kubelet_dir}/plugins/{DEFAULT_DRIVER_NAME}/csi.sock");
            if reg != want_dir {
                p.push(format!("{rw}: registration path {reg} is not {want_dir}"));
            }
            let registry = arr(&r["volumeMounts"])
                .iter()
                .find(|m| m["mountPath"] == "/registration")
                .and_then(|m| host_path(&m["name"]));
            if registry.as_deref() != Some(&format!("{kubelet_dir}/plugins_registry")) {
                p.push(format!(
                    "{rw}: {kubelet_dir}/plugins_registry is not at /registration"
                ));
            }
        }
    }
    match container(pod, "liveness-probe") {
        Some(c) => check_socket(pod, plugin, c, &format!("{what}/liveness-probe"), p),
        None => p.push(format!("{what}: sidecar liveness-probe is missing")),
    }
}

fn check_classes(docs: &[Value], p: &mut Vec<String>) {
    let classes: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == "StorageClass")
        .collect();
    for sc in &classes {
        if sc["provisioner"] != DEFAULT_DRIVER_NAME {
            p.push(format!(
                "StorageClass {}: provisioner is not {DEFAULT_DRIVER_NAME}",
                sc["metadata"]["name"]
            ));
        }
    }
    let fstypes: BTreeSet<String> = classes
        .iter()
        .map(|sc| {
            sc["parameters"]["csi.storage.k8s.io/fstype"]
                .as_str()
                .unwrap_or("")
                .to_owned()
        })
        .collect();
    for want in ["ext4", "xfs", ""] {
        if !fstypes.contains(want) {
            p.push(format!(
                "no example StorageClass with fstype {want:?} (\"\" = block)"
            ));
        }
    }
    let vsc: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == "VolumeSnapshotClass")
        .collect();
    if vsc.is_empty() || vsc.iter().any(|c| c["driver"] != DEFAULT_DRIVER_NAME) {
        p.push(format!(
            "no VolumeSnapshotClass for driver {DEFAULT_DRIVER_NAME}"
        ));
    }
}

fn assert_no_problems(docs: &[Value]) {
    let problems = check_deployment(docs);
    assert!(
        problems.is_empty(),
        "deployment problems:\n- {}",
        problems.join("\n- ")
    );
}

/// Applies `mutate` to a copy of the default manifests and asserts the checks catch it.
fn assert_caught(mutation: &str, expect: &str, mutate: impl FnOnce(&mut Vec<Value>)) {
    let mut docs = default_docs();
    mutate(&mut docs);
    let problems = check_deployment(&docs);
    assert!(
        problems.iter().any(|p| p.contains(expect)),
        "mutation {mutation:?} was not caught (expected a problem containing {expect:?}); \
         problems: {problems:#?}"
    );
}

// ------------------------------------------------------------------ tests

#[test]
fn manifests_validate_against_kubernetes_schema() {
    let out = tool(&["validate", "deploy/manifests"]);
    assert!(
        out.status.success(),
        "schema validation failed: {}",
        text(&out)
    );
}

#[test]
fn schema_validation_rejects_broken_manifests() {
    let dir = copy_manifests();
    let edit = |file: &str, from: &str, to: &str| {
        let path = dir.path().join(file);
        let s = std::fs::read_to_string(&path).unwrap();
        assert!(s.contains(from), "{file} has no {from:?}");
        std::fs::write(&path, s.replacen(from, to, 1)).unwrap();
    };
    edit(
        "csidriver.yaml",
        "\n  attachRequired: true",
        "\n  attachRequired: \"yes\"",
    );
    edit(
        "node.yaml",
        "hostNetwork: true",
        "hostNetwork: true\n      hostNetwrk: true",
    );
    edit(
        "volumesnapshotclass.yaml",
        "deletionPolicy: Delete",
        "deletionPolicy: Remove",
    );
    let out = tool(&["validate", dir.path().to_str().unwrap()]);
    let t = text(&out);
    assert!(
        !out.status.success(),
        "broken manifests passed validation: {t}"
    );
    for expect in ["attachRequired", "hostNetwrk", "Remove"] {
        assert!(
            t.contains(expect),
            "validation did not report {expect}: {t}"
        );
    }
}

#[test]
fn committed_manifests_equal_the_rendered_chart() {
    let out = tool(&["check-sync"]);
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn a_stale_manifest_is_detected() {
    let dir = copy_manifests();
    let path = dir.path().join("controller.yaml");
    let s = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        s.replacen("--leader-election\"", "--leader-election=false\"", 1),
    )
    .unwrap();
    let out = tool(&["check-sync", "--manifests", dir.path().to_str().unwrap()]);
    let t = text(&out);
    assert!(
        !out.status.success(),
        "a hand-edited manifest went unnoticed: {t}"
    );
    assert!(t.contains("--leader-election=false"), "no diff shown: {t}");
}

#[test]
fn renderer_refuses_template_features_outside_its_subset() {
    let chart = tempfile::tempdir().unwrap();
    let templates = chart.path().join("templates");
    std::fs::create_dir(&templates).unwrap();
    let src = root().join("deploy/helm/rds-csi");
    for f in ["Chart.yaml", "values.yaml"] {
        std::fs::copy(src.join(f), chart.path().join(f)).unwrap();
    }
    let out_dir = tempfile::tempdir().unwrap();
    for (body, why) in [
        ("x: {{ include \"t\" . }}\n", "unsupported action"),
        ("x: {{ .Values.image }}\n", "outside the subset"),
        ("x: {{ .Values.nope }}\n", "is not set"),
        (
            "{{- range .Values.sidecars }}{{ end }}\n",
            "only lists are in the subset",
        ),
        (
            "x: {{ toYaml .Values.image.repository }}\n",
            "toYaml takes one map or list",
        ),
        (
            "x:{{ .Files.Get \"../values.yaml\" }}\n",
            "one literal path in the chart",
        ),
    ] {
        std::fs::write(templates.join("t.yaml"), body).unwrap();
        let out = tool(&[
            "render",
            "--chart",
            chart.path().to_str().unwrap(),
            "--out",
            out_dir.path().to_str().unwrap(),
        ]);
        let t = text(&out);
        assert!(
            !out.status.success() && t.contains(why),
            "{body:?} was rendered: {t}"
        );
    }
}

#[test]
fn chart_renders_valid_manifests_with_other_values() {
    let dir = tempfile::tempdir().unwrap();
    let values = dir.path().join("values.yaml");
    std::fs::write(
        &values,
        "metrics:\n  enabled: false\ncontroller:\n  storageCapacity: false\n\
         rds:\n  secret:\n    create: false\nvolumeSnapshotClass:\n  create: false\n\
         dashboards:\n  enabled: false\n\
         storageClasses:\n  classes:\n  - name: rds-ext4\n    fsType: ext4\n    default: true\n    parameters: []\n",
    )
    .unwrap();
    let out_dir = dir.path().join("out");
    let out = tool(&[
        "render",
        "--values",
        values.to_str().unwrap(),
        "--release-name",
        "other",
        "--namespace",
        "storage",
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let out = tool(&["validate", out_dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let docs = load_docs(&out_dir);
    assert!(find(&docs, "Secret", "rds-csi-rds-credentials").is_none());
    assert!(find(&docs, "Role", "other-external-provisioner-capacity").is_none());
    assert!(docs.iter().all(|d| d["kind"] != "VolumeSnapshotClass"));
    let deploy = find(&docs, "Deployment", "other-controller").expect("controller");
    assert_eq!(deploy["metadata"]["namespace"], "storage");
    let plugin = container(&deploy["spec"]["template"]["spec"], PLUGIN).unwrap();
    assert!(flag(&strs(&plugin["args"]), "metrics-address").is_none());
    let ext4 = find(&docs, "StorageClass", "rds-ext4").unwrap();
    assert_eq!(
        ext4["metadata"]["annotations"]["storageclass.kubernetes.io/is-default-class"],
        "true"
    );
    assert_eq!(
        docs.iter().filter(|d| d["kind"] == "StorageClass").count(),
        1,
        "the list in values is the list of classes"
    );
    assert!(
        docs.iter()
            .all(|d| d["kind"] != "Service" && d["kind"] != "ConfigMap")
    );
}

/// What an operator sets: a ServiceMonitor, scheduling, resources, extra sidecar args and
/// an own class — rendered, validated (the ServiceMonitor against deploy/schemas), and
/// carried into the objects.
#[test]
fn chart_renders_monitoring_scheduling_and_classes_from_values() {
    let dir = tempfile::tempdir().unwrap();
    let values = dir.path().join("values.yaml");
    std::fs::write(
        &values,
        r#"metrics:
  diskTrafficIntervalSecs: 60
  serviceMonitor:
    enabled: true
    labels:
      release: kube-prometheus-stack
dashboards:
  folder: "Storage"
controller:
  priorityClassName: "storage-critical"
  tolerations:
    - key: "node-role.kubernetes.io/control-plane"
      operator: "Exists"
      effect: "NoSchedule"
  affinity:
    nodeAffinity:
      requiredDuringSchedulingIgnoredDuringExecution:
        nodeSelectorTerms:
          - matchExpressions:
              - key: "storage"
                operator: "In"
                values: ["rds"]
  resources:
    plugin:
      requests:
        cpu: "50m"
        memory: "64Mi"
      limits:
        memory: "256Mi"
  extraArgs:
    provisioner: ["--worker-threads=20"]
node:
  nodeSelector:
    storage: "rds"
  extraArgs:
    registrar: ["--http-endpoint=:9812"]
storageClasses:
  classes:
    - name: "fast-xfs"
      fsType: "xfs"
      default: false
      parameters:
        - name: "nvmePort"
          value: "4421"
"#,
    )
    .unwrap();
    let out_dir = dir.path().join("out");
    let out = tool(&[
        "render",
        "--values",
        values.to_str().unwrap(),
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let out = tool(&["validate", out_dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let docs = load_docs(&out_dir);
    let sm = find(&docs, "ServiceMonitor", RELEASE).expect("ServiceMonitor");
    assert_eq!(sm["metadata"]["labels"]["release"], "kube-prometheus-stack");
    assert_eq!(sm["spec"]["endpoints"][0]["port"], "metrics");
    // The ServiceMonitor selects both metrics Services, which select the pods' ports.
    for (svc, component) in [
        ("rds-csi-controller-metrics", "controller"),
        ("rds-csi-node-metrics", "node"),
    ] {
        let s = find(&docs, "Service", svc).unwrap_or_else(|| panic!("{svc}"));
        for (k, v) in sm["spec"]["selector"]["matchLabels"].as_object().unwrap() {
            assert_eq!(&s["metadata"]["labels"][k], v, "{svc} not selected by {k}");
        }
        assert_eq!(
            s["spec"]["selector"]["app.kubernetes.io/component"],
            component
        );
        assert_eq!(s["spec"]["ports"][0]["targetPort"], "metrics");
    }
    let deploy = find(&docs, "Deployment", "rds-csi-controller").unwrap();
    let pod = &deploy["spec"]["template"]["spec"];
    assert_eq!(pod["priorityClassName"], "storage-critical");
    assert_eq!(pod["tolerations"][0]["effect"], "NoSchedule");
    assert_eq!(
        pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
            [0]["matchExpressions"][0]["values"][0],
        "rds"
    );
    let plugin = container(pod, PLUGIN).unwrap();
    assert_eq!(plugin["resources"]["limits"]["memory"], "256Mi");
    assert_eq!(
        flag(&strs(&plugin["args"]), "rds-disk-traffic-interval-secs").as_deref(),
        Some("60")
    );
    assert!(
        strs(&container(pod, "csi-provisioner").unwrap()["args"])
            .contains(&"--worker-threads=20".to_owned())
    );
    let ds = find(&docs, "DaemonSet", "rds-csi-node").unwrap();
    let npod = &ds["spec"]["template"]["spec"];
    assert_eq!(npod["nodeSelector"]["storage"], "rds");
    assert!(
        strs(&container(npod, "node-driver-registrar").unwrap()["args"])
            .contains(&"--http-endpoint=:9812".to_owned())
    );
    let classes: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == "StorageClass")
        .collect();
    assert_eq!(classes.len(), 1);
    assert_eq!(classes[0]["metadata"]["name"], "fast-xfs");
    assert_eq!(classes[0]["parameters"]["nvmePort"], "4421");
    assert_eq!(classes[0]["parameters"]["csi.storage.k8s.io/fstype"], "xfs");
    let cm = find(&docs, "ConfigMap", "rds-csi-dashboard").unwrap();
    assert_eq!(cm["metadata"]["annotations"]["grafana_folder"], "Storage");
}

/// A broken ServiceMonitor is refused by its schema.
#[test]
fn the_service_monitor_schema_has_teeth() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("sm.yaml"),
        "apiVersion: monitoring.coreos.com/v1\nkind: ServiceMonitor\nmetadata:\n  name: x\n\
         spec:\n  selector: {}\n  endpoints:\n  - port: metrics\n    intervall: 30s\n",
    )
    .unwrap();
    let out = tool(&["validate", dir.path().to_str().unwrap()]);
    let t = text(&out);
    assert!(!out.status.success() && t.contains("intervall"), "{t}");
}

// ------------------------------------------------------------------ the dashboard

/// The metric names a PromQL expression reads: identifiers outside strings, label
/// matchers (`{...}`), ranges (`[...]`) and grouping clauses (`by (...)`), that are not
/// function calls, keywords or numbers.
fn promql_metric_names(expr: &str) -> Vec<String> {
    const KEYWORDS: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "and",
        "or",
        "unless",
        "offset",
    ];
    // Aggregation operators may take their grouping clause before the parenthesis.
    const AGGREGATIONS: &[&str] = &[
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
    ];
    // Blank out strings, matchers and ranges.
    let mut flat = String::new();
    let mut depth_curly = 0;
    let mut depth_square = 0;
    let mut in_string = false;
    for c in expr.chars() {
        match c {
            '"' => in_string = !in_string,
            '{' if !in_string => depth_curly += 1,
            '}' if !in_string => depth_curly -= 1,
            '[' if !in_string => depth_square += 1,
            ']' if !in_string => depth_square -= 1,
            _ if in_string || depth_curly > 0 || depth_square > 0 => {}
            _ => {
                flat.push(c);
                continue;
            }
        }
        flat.push(' ');
    }
    // Tokens, with what follows each.
    let chars: Vec<char> = flat.chars().collect();
    let mut names = Vec::new();
    let mut i = 0;
    let mut skip_group = false;
    while i < chars.len() {
        let c = chars[i];
        if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let next = chars[i..].iter().find(|c| !c.is_whitespace()).copied();
            if KEYWORDS.contains(&word.as_str()) {
                skip_group = matches!(
                    word.as_str(),
                    "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
                );
                continue;
            }
            if next == Some('(') || AGGREGATIONS.contains(&word.as_str()) {
                continue; // a function or an aggregation
            }
            names.push(word);
        } else if c.is_ascii_digit() {
            // A number or a duration (5m): not a name.
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else if c == '(' && skip_group {
            // The label list of a grouping clause.
            while i < chars.len() && chars[i] != ')' {
                i += 1;
            }
            skip_group = false;
            i += 1;
        } else {
            if !c.is_whitespace() {
                skip_group = false;
            }
            i += 1;
        }
    }
    names
}

#[test]
fn promql_names_are_extracted_from_queries() {
    assert_eq!(
        promql_metric_names(
            r#"sum by (le, method) (rate(rds_csi_x_bucket{code!="Ok",a=~"b|c"}[$__rate_interval])) / on(job) rds_csi_y offset 5m"#
        ),
        ["rds_csi_x_bucket", "rds_csi_y"]
    );
    assert_eq!(promql_metric_names("1 - max(a) / max(b)"), ["a", "b"]);
    assert_eq!(promql_metric_names("topk(10, a + b)"), ["a", "b"]);
}

/// Every query of the Grafana dashboard names series the driver really exports: the names
/// are read from the registry's text exposition (with one sample of every family), so a
/// renamed or removed series fails here, and the dashboard uses every family.
#[test]
fn every_dashboard_query_names_a_series_the_driver_exports() {
    let path = root().join("deploy/helm/rds-csi/dashboards/rds-csi.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let exported = rds_csi::metrics::sample_names(&rds_csi::metrics::Metrics::example().render());
    let mut used = BTreeSet::new();
    let mut queries = 0;
    for panel in arr(&dashboard["panels"]) {
        for target in arr(&panel["targets"]) {
            let expr = target["expr"].as_str().expect("a PromQL expr");
            queries += 1;
            let names = promql_metric_names(expr);
            assert!(
                !names.is_empty(),
                "panel {:?}: no series in {expr}",
                panel["title"]
            );
            for name in names {
                assert!(
                    exported.contains(&name),
                    "panel {:?} queries {name}, which the driver does not export (it exports {exported:?})",
                    panel["title"]
                );
                used.insert(name);
            }
        }
    }
    assert!(queries >= 20, "{queries} queries");
    let families: BTreeSet<String> =
        rds_csi::metrics::families(&rds_csi::metrics::Metrics::example().render())
            .into_iter()
            .map(|(n, _)| n)
            .collect();
    let unused: Vec<&String> = families
        .iter()
        .filter(|f| {
            !used.iter().any(|u| {
                u == *f
                    || u.strip_prefix(f.as_str())
                        .is_some_and(|s| ["_total", "_bucket", "_sum", "_count"].contains(&s))
            })
        })
        .collect();
    assert!(unused.is_empty(), "series without a panel: {unused:?}");
    // The shipped ConfigMap carries exactly this file, labelled for Grafana's sidecar.
    let docs = default_docs();
    let cm = find(&docs, "ConfigMap", "rds-csi-dashboard").expect("dashboard ConfigMap");
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    let shipped: Value =
        serde_json::from_str(cm["data"]["rds-csi.json"].as_str().unwrap()).unwrap();
    assert_eq!(shipped, dashboard);
}

#[test]
fn deployment_is_shaped_for_fencing_and_least_privilege() {
    assert_no_problems(&default_docs());
}

#[test]
fn plugin_rbac_equals_the_api_access_list() {
    let docs = default_docs();
    let role = find(&docs, "ClusterRole", &format!("{RELEASE}-plugin")).expect("plugin role");
    let mut problems = Vec::new();
    let actual = grants_of_role(role, "plugin", &mut problems);
    assert!(problems.is_empty(), "{problems:?}");
    if let Some(diff) = diff_grants(
        "plugin ClusterRole",
        &grants_of(API_ACCESS),
        &actual,
        PLUGIN_HINT,
    ) {
        panic!("{diff}");
    }
}

#[test]
fn a_wrong_plugin_verb_fails() {
    assert_caught(
        "PV patch -> update",
        "missing [/persistentvolumes:patch]",
        |docs| {
            let role = find_mut(docs, "ClusterRole", "rds-csi-plugin");
            role["rules"][0]["verbs"] = json!(["get", "list", "update"]);
        },
    );
    assert_caught(
        "extra delete on PVs",
        "extra [/persistentvolumes:delete]",
        |docs| {
            let role = find_mut(docs, "ClusterRole", "rds-csi-plugin");
            role["rules"][0]["verbs"] = json!(["get", "list", "patch", "delete"]);
        },
    );
    assert_caught("wildcard", "wildcard rule", |docs| {
        let role = find_mut(docs, "ClusterRole", "rds-csi-plugin");
        role["rules"][1]["verbs"] = json!(["*"]);
    });
}

#[test]
fn a_missing_sidecar_fails() {
    for (sidecar, _) in CONTROLLER_SIDECARS {
        assert_caught(sidecar, &format!("sidecar {sidecar} is missing"), |docs| {
            let pod =
                &mut find_mut(docs, "Deployment", "rds-csi-controller")["spec"]["template"]["spec"];
            pod["containers"]
                .as_array_mut()
                .unwrap()
                .retain(|c| c["name"] != *sidecar);
        });
    }
    assert_caught("registrar", "node-driver-registrar is missing", |docs| {
        let pod = &mut find_mut(docs, "DaemonSet", "rds-csi-node")["spec"]["template"]["spec"];
        pod["containers"]
            .as_array_mut()
            .unwrap()
            .retain(|c| c["name"] != "node-driver-registrar");
    });
}

#[test]
fn other_faults_fail() {
    assert_caught("attachRequired false", "spec.attachRequired", |docs| {
        find_mut(docs, "CSIDriver", DEFAULT_DRIVER_NAME)["spec"]["attachRequired"] = json!(false);
    });
    assert_caught(
        "attacher rbac drift",
        "volumeattachments/status:patch",
        |docs| {
            let role = find_mut(docs, "ClusterRole", "rds-csi-external-attacher");
            role["rules"].as_array_mut().unwrap().pop();
        },
    );
    assert_caught(
        "attacher unbound",
        "external-attacher is not bound",
        |docs| {
            docs.retain(|d| {
                !(d["kind"] == "ClusterRoleBinding"
                    && d["metadata"]["name"] == "rds-csi-external-attacher")
            });
        },
    );
    assert_caught(
        "node sa bound to the controller's role",
        "extra [/events:create",
        |docs| {
            let mut b = find_mut(docs, "ClusterRoleBinding", "rds-csi-plugin").clone();
            b["subjects"][0]["name"] = json!("rds-csi-node");
            docs.push(b);
        },
    );
    assert_caught("node role unbound", "missing [/nodes:patch, ", |docs| {
        docs.retain(|d| {
            !(d["kind"] == "ClusterRoleBinding" && d["metadata"]["name"] == "rds-csi-node")
        });
    });
    assert_caught("node pod without token", "its pod gets no token", |docs| {
        let pod = &mut find_mut(docs, "DaemonSet", "rds-csi-node")["spec"]["template"]["spec"];
        pod["automountServiceAccountToken"] = json!(false);
    });
    assert_caught("node sa without token", "its pod gets no token", |docs| {
        find_mut(docs, "ServiceAccount", "rds-csi-node")["automountServiceAccountToken"] =
            json!(false);
    });
    assert_caught("no leader election", "without --leader-election", |docs| {
        let c = container_mut(docs, "Deployment", "rds-csi-controller", "csi-resizer");
        c["args"]
            .as_array_mut()
            .unwrap()
            .retain(|a| a != "--leader-election");
    });
    assert_caught("unknown flag", "rejects its arguments", |docs| {
        let c = container_mut(docs, "Deployment", "rds-csi-controller", PLUGIN);
        c["args"]
            .as_array_mut()
            .unwrap()
            .push(json!("--rds-adress=x"));
    });
    assert_caught("bad flag value", "rejects its arguments", |docs| {
        let c = container_mut(docs, "DaemonSet", "rds-csi-node", PLUGIN);
        c["args"]
            .as_array_mut()
            .unwrap()
            .push(json!("--log-format=xml"));
    });
    assert_caught("unknown env", "env RDS_HOSTKEY", |docs| {
        let c = container_mut(docs, "Deployment", "rds-csi-controller", PLUGIN);
        c["env"]
            .as_array_mut()
            .unwrap()
            .push(json!({"name": "RDS_HOSTKEY", "value": "x"}));
    });
    assert_caught("kubelet root", "--kubelet-root", |docs| {
        let c = container_mut(docs, "DaemonSet", "rds-csi-node", PLUGIN);
        c["args"]
            .as_array_mut()
            .unwrap()
            .retain(|a| !a.as_str().unwrap().starts_with("--kubelet-root"));
    });
    assert_caught("no propagation", "Bidirectional", |docs| {
        let c = container_mut(docs, "DaemonSet", "rds-csi-node", PLUGIN);
        for m in c["volumeMounts"].as_array_mut().unwrap() {
            m.as_object_mut().unwrap().remove("mountPropagation");
        }
    });
    assert_caught("node not root", "does not run as root", |docs| {
        let c = container_mut(docs, "DaemonSet", "rds-csi-node", PLUGIN);
        c["securityContext"]
            .as_object_mut()
            .unwrap()
            .remove("runAsUser");
    });
    assert_caught("node not privileged", "not privileged", |docs| {
        let c = container_mut(docs, "DaemonSet", "rds-csi-node", PLUGIN);
        c["securityContext"]["privileged"] = json!(false);
    });
    assert_caught("controller privileged", "privileged", |docs| {
        let c = container_mut(docs, "Deployment", "rds-csi-controller", "csi-attacher");
        c["securityContext"]["privileged"] = json!(true);
    });
    assert_caught("two replicas", "exactly one replica", |docs| {
        find_mut(docs, "Deployment", "rds-csi-controller")["spec"]["replicas"] = json!(2);
    });
    assert_caught("socket mismatch", "is not the plugin's socket", |docs| {
        let c = container_mut(docs, "Deployment", "rds-csi-controller", "csi-attacher");
        c["env"][0]["value"] = json!("/csi/other.sock");
    });
}

#[test]
fn chart_version_matches_the_crate() {
    let chart = std::fs::read_to_string(root().join("deploy/helm/rds-csi/Chart.yaml")).unwrap();
    let want = format!("appVersion: \"{}\"", env!("CARGO_PKG_VERSION"));
    assert!(chart.lines().any(|l| l == want), "Chart.yaml lacks {want}");
}

#[test]
fn dockerfile_builds_the_plugin_onto_a_runtime_with_the_node_tools() {
    let df = std::fs::read_to_string(root().join("deploy/Dockerfile")).unwrap();
    let froms: Vec<&str> = df.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(
        froms.len(),
        2,
        "expected a build stage and a runtime stage: {froms:?}"
    );
    assert!(
        froms[0].contains("rust:") && froms[0].ends_with(" AS build"),
        "{}",
        froms[0]
    );
    assert!(
        froms[1].contains("debian:") && froms[1].contains("-slim"),
        "{}",
        froms[1]
    );
    assert!(df.contains("cargo build --release --locked --bin rds-csi-plugin"));
    for pkg in ["nvme-cli", "e2fsprogs", "xfsprogs", "util-linux", "mount"] {
        assert!(
            df.split_whitespace().any(|w| w == pkg),
            "runtime lacks {pkg}"
        );
    }
    assert!(df.contains("ENTRYPOINT [\"/usr/local/bin/rds-csi-plugin\"]"));
    // The controller pod runs as 65532 (chart); the node pod overrides it with root.
    assert!(df.contains("USER 65532:65532"));
    // The image must not carry a host NQN of its own (all nodes would share it).
    assert!(df.contains("rm -f /etc/nvme/hostnqn /etc/nvme/hostid"));
    // The build stage's Rust is at least the crate's rust-version.
    let arg = df
        .lines()
        .find_map(|l| l.strip_prefix("ARG RUST_VERSION="))
        .expect("ARG RUST_VERSION");
    let minor = |v: &str| {
        v.split('.')
            .nth(1)
            .and_then(|m| m.parse::<u32>().ok())
            .unwrap()
    };
    let needed = env!("CARGO_PKG_RUST_VERSION");
    assert!(
        minor(arg) >= minor(needed),
        "Rust {arg} < rust-version {needed}"
    );
}

/// Chart values the plugin has no flag for yet: the chart accepts them, the templates do not
/// pass them. When the flag lands on main, wire the value in the templates and remove it here.
const NOT_YET_WIRED: &[&str] = &[];

#[test]
fn every_chart_value_reaches_a_template() {
    let out = tool(&["unused-values"]);
    assert!(out.status.success(), "{}", text(&out));
    let unused: Vec<&str> = std::str::from_utf8(&out.stdout).unwrap().lines().collect();
    assert_eq!(
        unused, NOT_YET_WIRED,
        "values.yaml entries no template reads (a value that does nothing misleads admins): \
         wire them or remove them; NOT_YET_WIRED lists those waiting for a plugin flag"
    );
}

#[test]
fn mistyped_values_are_rejected_by_the_values_schema() {
    let dir = tempfile::tempdir().unwrap();
    let values = dir.path().join("values.yaml");
    std::fs::write(&values, "rds:\n  adress: rds.lan\nlog:\n  format: xml\n").unwrap();
    let out = tool(&[
        "render",
        "--values",
        values.to_str().unwrap(),
        "--out",
        dir.path().join("out").to_str().unwrap(),
    ]);
    let t = text(&out);
    assert!(!out.status.success(), "mistyped values were accepted: {t}");
    assert!(
        t.contains("'adress' was unexpected") && t.contains("'xml'"),
        "{t}"
    );
}

#[test]
fn data_path_fence_value_reaches_the_controller() {
    let dir = tempfile::tempdir().unwrap();
    let values = dir.path().join("values.yaml");
    std::fs::write(
        &values,
        "dataPathFence: true\npoolMountPoint: \"raid1\"\nrds:\n  nvmeAddress: \"10.0.40.2\"\n",
    )
    .unwrap();
    let out_dir = dir.path().join("out");
    let out = tool(&[
        "render",
        "--values",
        values.to_str().unwrap(),
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let docs = load_docs(&out_dir);
    assert_no_problems(&docs);
    let deploy = find(&docs, "Deployment", "rds-csi-controller").unwrap();
    let plugin = container(&deploy["spec"]["template"]["spec"], PLUGIN).unwrap();
    let args = strs(&plugin["args"]);
    assert!(
        args.iter().any(|a| a == "--data-path-fence=true"),
        "{args:?}"
    );
    let cli = Cli::try_parse_from(std::iter::once(PLUGIN.to_owned()).chain(args)).unwrap();
    assert!(cli.data_path_fence);
    assert_eq!(cli.rds_pool_mount_point.as_deref(), Some("raid1"));
    assert_eq!(cli.nvme_address.as_deref(), Some("10.0.40.2"));
    // On by default (the node plugins publish their host NQNs), and off only when asked.
    let default = find(&default_docs(), "Deployment", "rds-csi-controller")
        .cloned()
        .unwrap();
    let plugin = container(&default["spec"]["template"]["spec"], PLUGIN)
        .unwrap()
        .clone();
    let args = strs(&plugin["args"]);
    let cli = Cli::try_parse_from(std::iter::once(PLUGIN.to_owned()).chain(args)).unwrap();
    assert!(cli.data_path_fence, "the default chart fences");
    std::fs::write(&values, "dataPathFence: false\n").unwrap();
    let off_dir = dir.path().join("off");
    let out = tool(&[
        "render",
        "--values",
        values.to_str().unwrap(),
        "--out",
        off_dir.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let docs = load_docs(&off_dir);
    let deploy = find(&docs, "Deployment", "rds-csi-controller").unwrap();
    let plugin = container(&deploy["spec"]["template"]["spec"], PLUGIN).unwrap();
    let args = strs(&plugin["args"]);
    assert!(
        args.iter().any(|a| a == "--data-path-fence=false"),
        "{args:?}"
    );
    let cli = Cli::try_parse_from(std::iter::once(PLUGIN.to_owned()).chain(args)).unwrap();
    assert!(!cli.data_path_fence);
}

/// Every example StorageClass must be one the controller accepts: its parameters, as the
/// csi-provisioner passes them (the `csi.storage.k8s.io/fstype` key becomes the capability's
/// fs_type; `--extra-create-metadata` adds the PVC/PV names), go through the controller's
/// own parser with the controller's --rds-address and --rds-volume-path from the manifests.
/// An unknown or mistyped parameter would fail every PVC of that class.
#[test]
fn example_storage_classes_pass_the_controllers_parameter_parser() {
    use rds_csi::controller::params::{Expected, parse};
    let docs = default_docs();
    let deploy = find(&docs, "Deployment", "rds-csi-controller").expect("controller");
    let args = strs(&container(&deploy["spec"]["template"]["spec"], PLUGIN).unwrap()["args"]);
    let expected = Expected {
        rds_address: flag(&args, "rds-address"),
        volume_path: flag(&args, "rds-volume-path"),
    };
    let mut checked = 0;
    for sc in docs.iter().filter(|d| d["kind"] == "StorageClass") {
        let name = sc["metadata"]["name"].as_str().unwrap();
        let mut params: std::collections::HashMap<String, String> = sc["parameters"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("<not a string>").to_owned()))
                    .collect()
            })
            .unwrap_or_default();
        params.remove("csi.storage.k8s.io/fstype");
        for (k, v) in [
            ("csi.storage.k8s.io/pvc/name", "data"),
            ("csi.storage.k8s.io/pvc/namespace", "default"),
            ("csi.storage.k8s.io/pv/name", "pvc-0a1b"),
        ] {
            params.insert(k.to_owned(), v.to_owned());
        }
        if let Err(e) = parse(&params, &expected) {
            panic!("StorageClass {name}: the controller rejects its parameters: {e}");
        }
        checked += 1;
    }
    // The check has teeth: a mistyped key is refused by the same parser.
    let typo = std::collections::HashMap::from([("nvmeAdress".to_owned(), "x".to_owned())]);
    assert!(
        parse(&typo, &expected).is_err(),
        "the parser accepted a mistyped key"
    );
    assert_eq!(
        checked, 4,
        "expected the ext4, xfs, block and RWX block (KubeVirt) example classes"
    );
}
