//! The Kubernetes API access the plugin itself needs: the ONE list the deployment's RBAC is
//! checked against.
//!
//! `deploy/helm/rds-csi/templates/rbac-plugin.yaml` grants the controller's ServiceAccount
//! exactly [`API_ACCESS`], and the node's ServiceAccount exactly [`NODE_API_ACCESS`];
//! `tests/deploy.rs` fails when the rendered manifests grant more or less. Whoever adds,
//! removes or changes a Kubernetes API call in the adapters (`src/backend/kube*`, the
//! `AttachmentStore` and `Cluster` ports' production adapters) updates these lists in the
//! same change, then the chart (and `python3 deploy/tools/deploycheck.py sync`).
//!
//! The CSI sidecars (provisioner, attacher, resizer, snapshotter) have their own, separate
//! rules in the chart; they are not listed here.
//!
//! Invariants: entries are unique per (api group, resource); verbs are Kubernetes RBAC verbs
//! (`get`, `list`, `watch`, `create`, `update`, `patch`, `delete`, `deletecollection`).

/// One RBAC grant: (API group, `""` for the core group; resource, with `/subresource` where
/// one is used; verbs).
pub type ApiAccess = (&'static str, &'static str, &'static [&'static str]);

/// What the controller plugin (`--mode controller`) calls on the Kubernetes API.
///
/// - `persistentvolumes` get/list/patch: attachment records live in PV annotations
///   (`rds.csi.srvlab.io/attached-node`, `rds.csi.srvlab.io/attached-at`), written by a
///   patch with a resourceVersion precondition and rebuilt at start-up by a paginated list;
/// - `nodes` get: a stale record is cleared only when its node's Node object is gone;
/// - `volumeattachments` list/watch: the start-up rebuild cross-checks the records;
/// - `events` create: a fenced publish is reported as an Event.
///
/// No `leases`: leader election is done by the sidecars, not by the plugin.
pub const API_ACCESS: &[ApiAccess] = &[
    ("", "persistentvolumes", &["get", "list", "patch"]),
    ("", "nodes", &["get"]),
    ("storage.k8s.io", "volumeattachments", &["list", "watch"]),
    ("", "events", &["create"]),
];

/// What the node plugin (`--mode node`) calls on the Kubernetes API: nothing. Its
/// ServiceAccount gets no token and no RBAC while this is empty.
pub const NODE_API_ACCESS: &[ApiAccess] = &[];

#[cfg(test)]
mod tests {
    use super::*;

    const VERBS: &[&str] = &[
        "get",
        "list",
        "watch",
        "create",
        "update",
        "patch",
        "delete",
        "deletecollection",
    ];

    #[test]
    fn access_lists_are_unique_and_use_real_verbs() {
        for list in [API_ACCESS, NODE_API_ACCESS] {
            let mut seen = std::collections::BTreeSet::new();
            for (group, resource, verbs) in list {
                assert!(
                    seen.insert((group, resource)),
                    "{group}/{resource} listed twice"
                );
                assert!(!verbs.is_empty(), "{group}/{resource} has no verbs");
                for verb in *verbs {
                    assert!(
                        VERBS.contains(verb),
                        "{group}/{resource}: unknown verb {verb}"
                    );
                }
            }
        }
    }
}
