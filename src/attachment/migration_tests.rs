//! KubeVirt live migration of multi-node block volumes through the attachment manager:
//! the two-holder limit, the durable migration, its timeout, its end, events, metrics and
//! the data-path fence during it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::attachment::tests::{
    World, allowed_host, fenced, holders, nid, publish_args, unpublish_args, vid, world_with,
};
use crate::attachment::{AttachmentConfig, AttachmentManager, PublishArgs};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::ports::cluster::{VolumeAttachmentInfo, reason};
use crate::ports::{AttachmentStore, Clock};
use crate::types::AccessMode;

/// A clock the test moves.
#[derive(Debug)]
struct ManualClock(Mutex<SystemTime>);

impl ManualClock {
    fn new() -> Arc<Self> {
        Arc::new(Self(Mutex::new(
            UNIX_EPOCH + Duration::from_micros(1_760_000_000_000_001),
        )))
    }
    fn advance(&self, by: Duration) {
        *self.0.lock().unwrap() += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self.0.lock().unwrap()
    }
}

const A_NQN: &str = "nqn.2014-08.org.nvmexpress:uuid:aaaa";
const B_NQN: &str = "nqn.2014-08.org.nvmexpress:uuid:bbbb";
const C_NQN: &str = "nqn.2014-08.org.nvmexpress:uuid:cccc";

/// A VM disk's publish (multi-node multi-writer, block) with a 60 s migration timeout.
fn vm(node: &str) -> PublishArgs {
    PublishArgs {
        access_mode: AccessMode::MultiNodeMultiWriter,
        block: true,
        fs_type: None,
        migration_timeout: Duration::from_secs(60),
        ..publish_args("pvc-1", node, false)
    }
}

async fn vm_world(cfg: AttachmentConfig) -> (World, Arc<ManualClock>, Metrics) {
    let clock = ManualClock::new();
    let w = world_with(cfg, clock.clone()).await;
    w.cluster.register_node(nid("node-c"), Some(C_NQN.into()));
    let metrics = Metrics::default();
    // The world's manager, rebuilt around the registry (what the composition root does).
    let mgr = AttachmentManager::new(
        w.rds.clone(),
        w.store.clone(),
        w.cluster.clone(),
        clock.clone(),
        w.mgr.config().clone(),
    )
    .with_migration_metrics(metrics.migrations());
    let w = World {
        mgr: Arc::new(mgr),
        ..w
    };
    (w, clock, metrics)
}

/// The events recorded with `reason`, as (warning, message); every Event is recorded on
/// the volume's claim (else its PV) by the cluster adapter.
fn events(w: &World, reason: &str) -> Vec<(bool, String)> {
    w.cluster
        .events()
        .into_iter()
        .filter(|e| e.reason == reason)
        .map(|e| (e.warning, e.message))
        .collect()
}

#[tokio::test]
async fn the_second_holder_starts_a_durable_migration_and_a_third_is_refused_naming_both() {
    let (w, clock, metrics) = vm_world(fenced()).await;
    w.mgr.publish(&vm("node-a")).await.unwrap();
    assert!(events(&w, reason::MIGRATION_STARTED).is_empty(), "one holder migrates nothing");
    clock.advance(Duration::from_secs(5));
    w.mgr.publish(&vm("node-b")).await.unwrap();
    // Durable: the target's record carries the migration, in the one write that added it.
    let stored = w.store.read_volume(&vid("pvc-1")).await.unwrap();
    let target = stored.iter().find(|r| r.node_id == nid("node-b")).unwrap();
    let m = target.migration.clone().expect("the target records the migration");
    assert_eq!((m.source, m.timeout), (nid("node-a"), Duration::from_secs(60)));
    assert_eq!(m.started_at, target.attached_at);
    assert_eq!(w.store.writes(), 2, "one write per publish");
    let started = events(&w, reason::MIGRATION_STARTED);
    assert_eq!(started.len(), 1);
    assert!(started[0].1.contains("from node node-a to node node-b"), "{started:?}");
    assert_eq!(w.mgr.migrations_in_flight(), 1);
    assert!(metrics.render().contains("rds_csi_migrations_in_flight 1"));

    clock.advance(Duration::from_secs(10));
    let err = w.mgr.publish(&vm("node-c")).await.unwrap_err();
    let Error::FailedPrecondition(msg) = &err else {
        panic!("{err:?}")
    };
    for needle in ["node-a", "node-b", "node-c", "wait for the migration to finish", "running for 10s"] {
        assert!(msg.contains(needle), "{needle}: {msg}");
    }
    assert_eq!(holders(&w, "pvc-1"), vec!["node-a", "node-b"]);
    assert_eq!(w.store.writes(), 2, "a refusal writes nothing");
    assert_eq!(events(&w, reason::ATTACHMENT_CONFLICT).len(), 1);
    // Repeats of the two holders' publishes stay idempotent.
    for n in ["node-a", "node-b"] {
        w.mgr.publish(&vm(n)).await.unwrap();
    }
    assert_eq!(w.store.writes(), 2);
}

#[tokio::test]
async fn the_source_leaving_completes_the_migration_and_the_target_leaving_fails_it() {
    let (w, clock, metrics) = vm_world(fenced()).await;
    w.mgr.publish(&vm("node-a")).await.unwrap();
    w.mgr.publish(&vm("node-b")).await.unwrap();
    clock.advance(Duration::from_secs(20));
    w.mgr.unpublish(&unpublish_args("pvc-1", Some("node-a"))).await.unwrap();
    assert_eq!(holders(&w, "pvc-1"), vec!["node-b"]);
    let stored = w.store.read_volume(&vid("pvc-1")).await.unwrap();
    assert_eq!(stored[0].migration, None, "settled in the same write");
    let done = events(&w, reason::MIGRATION_COMPLETED);
    assert_eq!(done.len(), 1);
    assert!(!done[0].0, "Normal");
    assert!(done[0].1.contains("after 20.0s"), "{done:?}");
    assert_eq!(w.mgr.migrations_in_flight(), 0);

    // Back: node-b is the source now; this time the target leaves first.
    w.mgr.publish(&vm("node-a")).await.unwrap();
    clock.advance(Duration::from_secs(3));
    w.mgr.unpublish(&unpublish_args("pvc-1", Some("node-a"))).await.unwrap();
    let failed = events(&w, reason::MIGRATION_FAILED);
    assert_eq!(failed.len(), 1);
    assert!(failed[0].0, "Warning");
    assert!(failed[0].1.contains("the target node-a detached"), "{failed:?}");
    assert_eq!(holders(&w, "pvc-1"), vec!["node-b"]);
    let text = metrics.render();
    for want in [
        r#"rds_csi_migrations_total{outcome="completed",timed_out="false"} 1"#,
        r#"rds_csi_migrations_total{outcome="failed",timed_out="false"} 1"#,
        r#"rds_csi_migration_duration_seconds_sum{outcome="completed"} 20.0"#,
        r#"rds_csi_migration_duration_seconds_sum{outcome="failed"} 3.0"#,
        "rds_csi_migrations_in_flight 0",
    ] {
        assert!(text.contains(want), "{want} in\n{text}");
    }
    // An unpublish that is a repeat ends nothing more.
    w.mgr.unpublish(&unpublish_args("pvc-1", Some("node-a"))).await.unwrap();
    assert_eq!(events(&w, reason::MIGRATION_FAILED).len(), 1);
}

#[tokio::test]
async fn a_timed_out_migration_keeps_both_holders_and_refuses_attaches_until_one_detaches() {
    let (w, clock, metrics) = vm_world(fenced()).await;
    w.mgr.publish(&vm("node-a")).await.unwrap();
    w.mgr.publish(&vm("node-b")).await.unwrap();
    clock.advance(Duration::from_secs(61));
    let err = w.mgr.publish(&vm("node-c")).await.unwrap_err();
    let Error::FailedPrecondition(msg) = &err else {
        panic!("{err:?}")
    };
    for needle in [
        "outlived its timeout of 60s",
        "migrationTimeoutSeconds",
        "detach the source node node-a",
    ] {
        assert!(msg.contains(needle), "{needle}: {msg}");
    }
    // Nothing is taken from the two holders: records, fence, repeats.
    assert_eq!(holders(&w, "pvc-1"), vec!["node-a", "node-b"]);
    assert_eq!(allowed_host(&w, "pvc-1").await.as_deref(), Some(B_NQN));
    w.mgr.publish(&vm("node-b")).await.unwrap();
    // The reset: the source detaches; the migration ends (late) and node-c may come.
    w.mgr.unpublish(&unpublish_args("pvc-1", Some("node-a"))).await.unwrap();
    assert!(
        events(&w, reason::MIGRATION_COMPLETED)[0]
            .1
            .contains("past its timeout of 60s")
    );
    assert!(
        metrics
            .render()
            .contains(r#"rds_csi_migrations_total{outcome="completed",timed_out="true"} 1"#)
    );
    w.mgr.publish(&vm("node-c")).await.unwrap();
    assert_eq!(holders(&w, "pvc-1"), vec!["node-b", "node-c"]);
    assert_eq!(allowed_host(&w, "pvc-1").await.as_deref(), Some(C_NQN));
}

#[tokio::test]
async fn a_restarted_controller_still_knows_the_migration_and_its_timeout() {
    let (w, clock, _) = vm_world(fenced()).await;
    w.mgr.publish(&vm("node-a")).await.unwrap();
    w.mgr.publish(&vm("node-b")).await.unwrap();
    let metrics = Metrics::default();
    let restarted = AttachmentManager::new(
        w.rds.clone(),
        w.store.clone(),
        w.cluster.clone(),
        clock.clone(),
        fenced(),
    )
    .with_migration_metrics(metrics.migrations());
    restarted.rebuild().await.unwrap();
    assert_eq!(restarted.migrations_in_flight(), 1);
    assert!(metrics.render().contains("rds_csi_migrations_in_flight 1"));
    clock.advance(Duration::from_secs(120));
    let err = restarted.publish(&vm("node-c")).await.unwrap_err();
    assert!(
        matches!(&err, Error::FailedPrecondition(m) if m.contains("outlived its timeout")),
        "{err:?}"
    );
    restarted
        .unpublish(&unpublish_args("pvc-1", Some("node-b")))
        .await
        .unwrap();
    assert_eq!(restarted.migrations_in_flight(), 0);
    assert_eq!(events(&w, reason::MIGRATION_FAILED).len(), 1);
}

#[tokio::test]
async fn the_fence_admits_the_holder_then_the_target_then_who_remains() {
    let (w, _, _) = vm_world(fenced()).await;
    w.mgr.publish(&vm("node-a")).await.unwrap();
    assert_eq!(allowed_host(&w, "pvc-1").await.as_deref(), Some(A_NQN));
    w.mgr.publish(&vm("node-b")).await.unwrap();
    assert_eq!(
        allowed_host(&w, "pvc-1").await.as_deref(),
        Some(B_NQN),
        "the target connects next; the source's connection is established"
    );
    // Failed: back to the source.
    w.mgr.unpublish(&unpublish_args("pvc-1", Some("node-b"))).await.unwrap();
    assert_eq!(allowed_host(&w, "pvc-1").await.as_deref(), Some(A_NQN));
    // Completed: the target keeps it.
    w.mgr.publish(&vm("node-b")).await.unwrap();
    w.mgr.unpublish(&unpublish_args("pvc-1", Some("node-a"))).await.unwrap();
    assert_eq!(allowed_host(&w, "pvc-1").await.as_deref(), Some(B_NQN));
    w.mgr.unpublish(&unpublish_args("pvc-1", Some("node-b"))).await.unwrap();
    assert_eq!(
        allowed_host(&w, "pvc-1").await,
        Some(crate::attachment::fence::parked_nqn(&vid("pvc-1")))
    );
}

#[tokio::test]
async fn a_failed_migration_whose_source_machine_is_gone_parks_the_export() {
    // Found by the simulation: the source's machine was lost (its Node object, and with it
    // its host NQN, gone) before the target detached; the export kept admitting the
    // detached target while the records named only the source.
    let (w, _, _) = vm_world(fenced()).await;
    w.mgr.publish(&vm("node-a")).await.unwrap();
    w.mgr.publish(&vm("node-b")).await.unwrap();
    assert_eq!(allowed_host(&w, "pvc-1").await.as_deref(), Some(B_NQN));
    w.cluster.remove_node(&nid("node-a"));
    w.mgr.unpublish(&unpublish_args("pvc-1", Some("node-b"))).await.unwrap();
    assert_eq!(holders(&w, "pvc-1"), vec!["node-a"]);
    assert_eq!(
        allowed_host(&w, "pvc-1").await,
        Some(crate::attachment::fence::parked_nqn(&vid("pvc-1"))),
        "nobody is admitted: not the target that left, and the source cannot be named"
    );
}

#[tokio::test]
async fn a_lost_migration_target_gives_the_export_back_to_the_source() {
    // Found by the simulation (seed 2723): the target's machine was lost mid-migration (its
    // Node object deleted); its VolumeAttachment stays until the force-detach minutes later,
    // and the export kept admitting the lost target all that time, so the source, which
    // runs the VM, could not reconnect after losing its connection.
    let (w, _, _) = vm_world(fenced()).await;
    w.mgr.publish(&vm("node-a")).await.unwrap();
    w.mgr.publish(&vm("node-b")).await.unwrap();
    assert_eq!(allowed_host(&w, "pvc-1").await.as_deref(), Some(B_NQN));
    // A resync with the target there moves nothing.
    w.mgr.resync().await.unwrap();
    assert_eq!(allowed_host(&w, "pvc-1").await.as_deref(), Some(B_NQN));
    w.cluster.remove_node(&nid("node-b"));
    // The periodic resync sees the Node gone: the source, the surviving holder, is admitted.
    w.mgr.resync().await.unwrap();
    assert_eq!(
        allowed_host(&w, "pvc-1").await.as_deref(),
        Some(A_NQN),
        "the source is admitted again once the target's Node is gone"
    );
    assert_eq!(holders(&w, "pvc-1"), vec!["node-a", "node-b"], "the records stay");
    // Every other fence decision agrees: a repeated publish of the source neither parks
    // the export nor gives it back to the lost target.
    w.mgr.publish(&vm("node-a")).await.unwrap();
    assert_eq!(allowed_host(&w, "pvc-1").await.as_deref(), Some(A_NQN));
    // A fresh machine under the target's name (a new host NQN) is not admitted by a resync:
    // the migration cannot complete on it; the force-detach ends it.
    w.cluster
        .register_node(nid("node-b"), Some("nqn.2014-08.org.nvmexpress:uuid:b2b2".into()));
    w.mgr.resync().await.unwrap();
    assert_eq!(allowed_host(&w, "pvc-1").await.as_deref(), Some(A_NQN));
    w.mgr.unpublish(&unpublish_args("pvc-1", Some("node-b"))).await.unwrap();
    assert_eq!(holders(&w, "pvc-1"), vec!["node-a"]);
    assert_eq!(allowed_host(&w, "pvc-1").await.as_deref(), Some(A_NQN));
}

#[tokio::test]
async fn a_migration_target_back_as_a_fresh_machine_is_not_admitted_until_published_again() {
    // Seed 2723 again: the target's Node came back (a fresh machine under the same name,
    // a new host NQN) before any resync saw it gone. The fresh machine runs no VM; the
    // migration cannot complete: the export admits the source.
    let (w, _, _) = vm_world(fenced()).await;
    w.mgr.publish(&vm("node-a")).await.unwrap();
    w.mgr.publish(&vm("node-b")).await.unwrap();
    let fresh = "nqn.2014-08.org.nvmexpress:uuid:b2b2";
    w.cluster.register_node(nid("node-b"), Some(fresh.into()));
    w.mgr.resync().await.unwrap();
    assert_eq!(allowed_host(&w, "pvc-1").await.as_deref(), Some(A_NQN));
    // A restarted controller's start-up agrees.
    w.mgr.settle_fences().await.unwrap();
    assert_eq!(allowed_host(&w, "pvc-1").await.as_deref(), Some(A_NQN));
    // The CO publishing to the target again admits its machine, as any target's attach.
    w.mgr.publish(&vm("node-b")).await.unwrap();
    assert_eq!(allowed_host(&w, "pvc-1").await.as_deref(), Some(fresh));
    w.mgr.resync().await.unwrap();
    assert_eq!(allowed_host(&w, "pvc-1").await.as_deref(), Some(fresh), "kept");
}

#[tokio::test]
async fn a_lost_target_and_a_lost_source_park_the_export() {
    // Neither holder can be named: nobody is admitted (never a node that holds nothing).
    let (w, _, _) = vm_world(fenced()).await;
    w.mgr.publish(&vm("node-a")).await.unwrap();
    w.mgr.publish(&vm("node-b")).await.unwrap();
    w.cluster.remove_node(&nid("node-a"));
    w.cluster.remove_node(&nid("node-b"));
    w.mgr.resync().await.unwrap();
    assert_eq!(
        allowed_host(&w, "pvc-1").await,
        Some(crate::attachment::fence::parked_nqn(&vid("pvc-1")))
    );
}

#[tokio::test]
async fn a_migration_target_detached_by_hand_gives_the_export_back_when_cleared() {
    // The target's VolumeAttachment removed by hand: DeleteVolume's look at the holders
    // clears its record, and the export follows the holder left, the source.
    let (w, _, _) = vm_world(fenced()).await;
    w.mgr.publish(&vm("node-a")).await.unwrap();
    w.mgr.publish(&vm("node-b")).await.unwrap();
    w.cluster.set_volume_attachments(Some(vec![VolumeAttachmentInfo {
        volume_id: vid("pvc-1"),
        node_id: nid("node-a"),
        attached: true,
        deleting: false,
    }]));
    let live = w.mgr.live_holders(&vid("pvc-1")).await.unwrap();
    assert_eq!(live.len(), 1);
    assert_eq!(holders(&w, "pvc-1"), vec!["node-a"]);
    assert_eq!(allowed_host(&w, "pvc-1").await.as_deref(), Some(A_NQN));
}

#[tokio::test]
async fn a_target_without_a_host_nqn_is_refused_before_anything_is_written() {
    let (w, _, _) = vm_world(fenced()).await;
    w.cluster.register_node(nid("node-c"), None);
    w.mgr.publish(&vm("node-a")).await.unwrap();
    let err = w.mgr.publish(&vm("node-c")).await.unwrap_err();
    assert!(
        matches!(&err, Error::FailedPrecondition(m) if m.contains("host NQN")),
        "{err:?}"
    );
    assert_eq!(holders(&w, "pvc-1"), vec!["node-a"]);
    assert_eq!(w.store.writes(), 1);
}

#[tokio::test]
async fn a_stale_holder_at_the_limit_is_cleared_and_the_new_node_migrates_from_the_other() {
    let (w, _, _) = vm_world(fenced()).await;
    w.mgr.publish(&vm("node-a")).await.unwrap();
    w.mgr.publish(&vm("node-b")).await.unwrap();
    let va = |n: &str| VolumeAttachmentInfo {
        volume_id: vid("pvc-1"),
        node_id: nid(n),
        attached: true,
        deleting: false,
    };
    // node-a's VolumeAttachment was removed by hand (its detach never reached us).
    w.cluster
        .set_volume_attachments(Some(vec![va("node-b"), va("node-c")]));
    w.mgr.publish(&vm("node-c")).await.unwrap();
    assert_eq!(holders(&w, "pvc-1"), vec!["node-b", "node-c"]);
    let stored = w.store.read_volume(&vid("pvc-1")).await.unwrap();
    let c = stored.iter().find(|r| r.node_id == nid("node-c")).unwrap();
    assert_eq!(c.migration.as_ref().map(|m| m.source.clone()), Some(nid("node-b")));
    assert_eq!(events(&w, reason::STALE_ATTACHMENT_CLEARED).len(), 1);
    // The old migration ended (its source left: completed), the new one started.
    assert_eq!(events(&w, reason::MIGRATION_COMPLETED).len(), 1);
    assert_eq!(events(&w, reason::MIGRATION_STARTED).len(), 2);
    assert_eq!(w.mgr.migrations_in_flight(), 1);
}

#[tokio::test]
async fn without_the_fence_a_migrating_volume_is_open_and_still_limited_to_two() {
    let (w, _, _) = vm_world(AttachmentConfig::default()).await;
    w.mgr.publish(&vm("node-a")).await.unwrap();
    w.mgr.publish(&vm("node-b")).await.unwrap();
    assert_eq!(allowed_host(&w, "pvc-1").await, None);
    assert!(matches!(
        w.mgr.publish(&vm("node-c")).await,
        Err(Error::FailedPrecondition(_))
    ));
}

#[tokio::test]
async fn unpublishing_every_node_at_once_fails_the_migration() {
    let (w, _, _) = vm_world(fenced()).await;
    w.mgr.publish(&vm("node-a")).await.unwrap();
    w.mgr.publish(&vm("node-b")).await.unwrap();
    w.mgr.unpublish(&unpublish_args("pvc-1", None)).await.unwrap();
    assert!(holders(&w, "pvc-1").is_empty());
    assert_eq!(events(&w, reason::MIGRATION_FAILED).len(), 1);
    assert_eq!(w.mgr.migrations_in_flight(), 0);
}

#[tokio::test]
async fn every_write_carries_the_next_generation_of_the_holder_set() {
    let (w, _, _) = vm_world(fenced()).await;
    let generation = |w: &World| {
        futures::executor::block_on(w.store.read_volume(&vid("pvc-1")))
            .unwrap()
            .iter()
            .map(|r| r.generation)
            .collect::<Vec<_>>()
    };
    w.mgr.publish(&vm("node-a")).await.unwrap();
    assert_eq!(generation(&w), vec![1]);
    w.mgr.publish(&vm("node-b")).await.unwrap();
    assert_eq!(generation(&w), vec![2, 2]);
    w.mgr.unpublish(&unpublish_args("pvc-1", Some("node-a"))).await.unwrap();
    assert_eq!(generation(&w), vec![3]);
}

/// `node`'s kubelet stopped reporting (`ready: false`) or reports again.
fn report(w: &World, node: &str, ready: bool) {
    w.cluster.set_node_report(
        nid(node),
        crate::ports::cluster::NodeReport {
            ready,
            volumes_in_use: Vec::new(),
        },
    );
}

#[tokio::test(start_paused = true)]
async fn a_target_cut_off_mid_migration_gives_the_export_to_the_source_until_it_reports_again() {
    // Seed 2618: the target was partitioned mid-migration while an RDS reboot dropped the
    // source's connection; with the export admitting only the target, the VM on the source
    // had no disk until the target's force-detach six minutes later.
    let (w, _, _) = vm_world(fenced()).await;
    w.mgr.spawn_resync();
    w.mgr.publish(&vm("node-a")).await.unwrap();
    w.mgr.publish(&vm("node-b")).await.unwrap();
    assert_eq!(allowed_host(&w, "pvc-1").await.as_deref(), Some(B_NQN));
    // Both cut off: nothing is known to be better; the target keeps the export.
    report(&w, "node-b", false);
    report(&w, "node-a", false);
    tokio::time::sleep(crate::attachment::MIGRATION_CHECK_EVERY * 2).await;
    assert_eq!(allowed_host(&w, "pvc-1").await.as_deref(), Some(B_NQN));
    // The source reports, the target does not: the next check admits the source.
    report(&w, "node-a", true);
    tokio::time::sleep(crate::attachment::MIGRATION_CHECK_EVERY).await;
    assert_eq!(allowed_host(&w, "pvc-1").await.as_deref(), Some(A_NQN));
    assert_eq!(holders(&w, "pvc-1"), vec!["node-a", "node-b"], "the records stay");
    // A repeated publish of the source agrees.
    w.mgr.publish(&vm("node-a")).await.unwrap();
    assert_eq!(allowed_host(&w, "pvc-1").await.as_deref(), Some(A_NQN));
    // The same target machine reports again: admitted again, the migration can complete.
    report(&w, "node-b", true);
    tokio::time::sleep(crate::attachment::MIGRATION_CHECK_EVERY).await;
    assert_eq!(allowed_host(&w, "pvc-1").await.as_deref(), Some(B_NQN));
    w.mgr.unpublish(&unpublish_args("pvc-1", Some("node-a"))).await.unwrap();
    assert_eq!(allowed_host(&w, "pvc-1").await.as_deref(), Some(B_NQN));
}

#[tokio::test]
async fn a_target_whose_source_is_cut_off_keeps_the_export() {
    // The mirror case (the helper's seed 165 of a timeout rule): the VM may well run on the
    // target; a source that stopped reporting moves nothing.
    let (w, _, _) = vm_world(fenced()).await;
    w.mgr.publish(&vm("node-a")).await.unwrap();
    w.mgr.publish(&vm("node-b")).await.unwrap();
    report(&w, "node-a", false);
    w.mgr.fence_lost_targets().await;
    assert_eq!(allowed_host(&w, "pvc-1").await.as_deref(), Some(B_NQN));
}

#[tokio::test]
async fn a_detach_waits_while_the_ready_node_still_uses_the_volume() {
    let (w, _, _) = vm_world(fenced()).await;
    w.mgr.publish(&publish_args("pvc-2", "node-a", false)).await.unwrap();
    let in_use = |ready| crate::ports::cluster::NodeReport {
        ready,
        volumes_in_use: vec![vid("pvc-2")],
    };
    w.cluster.set_node_report(nid("node-a"), in_use(true));
    let err = w.mgr.unpublish(&unpublish_args("pvc-2", Some("node-a"))).await.unwrap_err();
    assert!(matches!(err, Error::FailedPrecondition(_)), "{err:?}");
    assert_eq!(holders(&w, "pvc-2"), vec!["node-a"], "nothing changed");
    assert_eq!(allowed_host(&w, "pvc-2").await.as_deref(), Some(A_NQN));
    // Stopped reporting: its list is stale, the force-detach goes ahead (the fence parks).
    w.cluster.set_node_report(nid("node-a"), in_use(false));
    w.mgr.unpublish(&unpublish_args("pvc-2", Some("node-a"))).await.unwrap();
    assert!(holders(&w, "pvc-2").is_empty());
    assert_ne!(allowed_host(&w, "pvc-2").await.as_deref(), Some(A_NQN));
}
