//! The Events the driver left in the API server agree with what the workload saw, judged
//! when the workload has finished:
//! - every acknowledged ControllerPublishVolume of (volume, node) produced the Event
//!   `VolumeAttached` naming that node on the volume's PersistentVolumeClaim (the PV's
//!   `claimRef`), unless recording it failed (events are best effort; the failures are
//!   noted by `crate::events`);
//! - repeats are aggregated: one driver instance (`reportingInstance`) never created two
//!   Event objects for the same object, type, reason and message.

use std::collections::BTreeMap;

use rds_csi::kube::fake_api::Kind;
use rds_csi::ports::cluster::reason;
use serde_json::Value;

use crate::world::{CLAIM_NAMESPACE, Shared, claim_name};

/// What is wrong with the Events (empty: they agree).
pub fn check(sh: &Shared) -> Vec<String> {
    let mut bad = Vec::new();
    let events = sh.api.objects(Kind::Event);
    let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
    let mut objects: BTreeMap<[String; 7], u64> = BTreeMap::new();
    for e in &events {
        let key = [
            s(&e["reportingInstance"]),
            s(&e["involvedObject"]["kind"]),
            s(&e["involvedObject"]["namespace"]),
            s(&e["involvedObject"]["name"]),
            s(&e["type"]),
            s(&e["reason"]),
            s(&e["message"]),
        ];
        *objects.entry(key).or_default() += 1;
    }
    for (key, n) in &objects {
        if *n > 1 {
            bad.push(format!(
                "events: {n} Event objects for one repeated event (not aggregated): {key:?}"
            ));
        }
    }
    let published: Vec<(String, String)> = {
        let model = sh.model.lock().unwrap_or_else(|p| p.into_inner());
        model.published.iter().cloned().collect()
    };
    for (volume, node) in published {
        let message = format!("volume {volume} attached to node {node}");
        let claim = claim_name(&volume);
        let found = events.iter().any(|e| {
            e["reason"] == reason::VOLUME_ATTACHED
                && e["message"] == message.as_str()
                && e["involvedObject"]["kind"] == "PersistentVolumeClaim"
                && e["involvedObject"]["namespace"] == CLAIM_NAMESPACE
                && e["involvedObject"]["name"] == claim.as_str()
                && e["metadata"]["namespace"] == CLAIM_NAMESPACE
                && e["count"].as_u64().is_some_and(|c| c >= 1)
        });
        if !found && !sh.events.failed(&volume, reason::VOLUME_ATTACHED, &message) {
            bad.push(format!(
                "events: publish of {volume} to {node} was acknowledged but no VolumeAttached \
                 Event is on its claim {CLAIM_NAMESPACE}/{claim} (and recording one never failed)"
            ));
        }
    }
    bad
}
