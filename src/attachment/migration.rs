//! KubeVirt live migration of multi-node block volumes: the pure rules over a volume's
//! holders (no I/O; the manager applies them under the volume's lock).
//!
//! A VM disk is a PVC `ReadWriteMany` + `volumeMode: Block` (CSI `MULTI_NODE_MULTI_WRITER`
//! on a block volume). KubeVirt moves a running VM by publishing its disk to the target
//! node while the source still holds it, then unpublishing the source. Rules:
//! - a multi-node block volume has at most [`MAX_HOLDERS`] holders; a third publish is
//!   refused (FAILED_PRECONDITION naming both holders);
//! - the second holder starts a **migration**: the target's record carries it (source,
//!   start, timeout), written by the same conditional write as the holders, so a restarted
//!   or failed-over controller still knows it;
//! - the migration ends when either holder leaves: **completed** when the source leaves,
//!   **failed** when the target leaves (both leaving at once: failed);
//! - a migration running longer than its timeout (`migrationTimeoutSeconds`, 30–3600 s,
//!   default 300) has **timed out**. What that means for the two holders: nothing is taken
//!   from either — both stay attached and their records, fence and data path are unchanged
//!   (the VM runs on exactly one of them and only KubeVirt knows which: detaching either
//!   could kill it). A new attach keeps being refused, now saying how to reset (detach the
//!   source), until one of the two is unpublished. This is what the earlier driver did, with
//!   the start time durable here (the earlier driver kept it in memory, so a restart forgot
//!   the migration and its timeout).
//!
//! What the RDS export admits during a migration: see [`super::fence`].

use std::time::{Duration, SystemTime};

use crate::attachment::types::Holders;
use crate::ports::store::{AttachmentRecord, Migration};
use crate::types::{AccessMode, NodeId};

/// Most holders of a multi-node block volume: the source and the target of a migration.
pub const MAX_HOLDERS: usize = 2;

/// Default `migrationTimeoutSeconds` (the earlier driver's).
pub const DEFAULT_TIMEOUT: Duration = crate::types::defaults::DEFAULT_MIGRATION_TIMEOUT;
/// Shortest `migrationTimeoutSeconds` accepted.
pub const MIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest `migrationTimeoutSeconds` accepted.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(3600);

/// Whether `mode` is limited to [`MAX_HOLDERS`] holders and migrates.
pub fn migrates(mode: AccessMode) -> bool {
    mode == AccessMode::MultiNodeMultiWriter
}

/// A migration under way, as the holders record it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Running {
    /// The holder the VM moves away from.
    pub source: NodeId,
    /// The holder the VM moves to.
    pub target: NodeId,
    /// When the target was attached.
    pub started_at: SystemTime,
    /// How long it may run.
    pub timeout: Duration,
    /// The host NQN of the target's machine at its publish, when recorded.
    pub target_nqn: Option<String>,
}

impl Running {
    /// How long it has run at `now`.
    pub fn elapsed(&self, now: SystemTime) -> Duration {
        now.duration_since(self.started_at).unwrap_or_default()
    }

    /// Whether it has run longer than its timeout at `now`.
    pub fn timed_out(&self, now: SystemTime) -> bool {
        self.elapsed(now) > self.timeout
    }
}

/// The migration `holders` record, if one runs: a target record whose source still holds.
pub fn running(holders: &Holders) -> Option<Running> {
    holders.iter().find_map(|r| {
        let m = r.migration.as_ref()?;
        holders.contains(&m.source).then(|| Running {
            source: m.source.clone(),
            target: r.node_id.clone(),
            started_at: m.started_at,
            timeout: m.timeout,
            target_nqn: m.target_nqn.clone(),
        })
    })
}

/// How a migration ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The source left: the VM runs on the target.
    Completed,
    /// The target left (or both did): the VM stays on the source, if anywhere.
    Failed,
}

/// A change of a volume's migration between two durable holder sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A migration started.
    Started(Running),
    /// A migration ended.
    Ended(Running, Outcome),
}

/// What changed between `previous` and `next` (both durable, in this order): at most one
/// migration ends and one starts per write (a stale source cleared and a new target added
/// in one write does both: the end comes first).
pub fn changes(previous: &Holders, next: &Holders) -> Vec<Change> {
    let before = running(previous);
    let after = running(next);
    let mut out = Vec::new();
    if let Some(b) = &before
        && after.as_ref() != Some(b)
    {
        let outcome = if next.contains(&b.target) {
            Outcome::Completed
        } else {
            Outcome::Failed
        };
        out.push(Change::Ended(b.clone(), outcome));
    }
    if let Some(a) = after
        && before.as_ref() != Some(&a)
    {
        out.push(Change::Started(a));
    }
    out
}

/// Makes `record` (joining `holders`) the target of a migration from the one multi-node
/// holder there is, if it joins a volume that migrates; `target_nqn` is the host NQN of
/// the target's machine, when known.
pub fn start(
    holders: &Holders,
    record: &mut AttachmentRecord,
    timeout: Duration,
    target_nqn: Option<&str>,
) {
    if !migrates(record.access_mode) {
        return;
    }
    let mut others = holders.iter().filter(|h| h.node_id != record.node_id);
    if let (Some(source), None) = (others.next(), others.next()) {
        record.migration = Some(Migration {
            source: source.node_id.clone(),
            started_at: record.attached_at,
            timeout,
            target_nqn: target_nqn.map(str::to_string),
        });
    }
}

/// Clears the migration of a target whose source has left `holders` (the migration
/// completed), so the durable record says no migration runs.
pub fn settle(holders: Holders) -> Holders {
    let nodes: Vec<NodeId> = holders.nodes().cloned().collect();
    holders
        .into_vec()
        .into_iter()
        .map(|mut r| {
            if r.migration
                .as_ref()
                .is_some_and(|m| !nodes.contains(&m.source))
            {
                r.migration = None;
            }
            r
        })
        .collect()
}

/// The `migrationTimeoutSeconds` value of a volume context, clamped to
/// [`MIN_TIMEOUT`]..=[`MAX_TIMEOUT`] as the earlier driver does; absent, empty, not a
/// positive number: [`DEFAULT_TIMEOUT`]. `Err` names what was wrong with a value that was
/// given (for a warning), with the timeout used instead.
pub fn timeout_from(value: Option<&str>) -> Result<Duration, (Duration, String)> {
    let Some(v) = value.map(str::trim).filter(|v| !v.is_empty()) else {
        return Ok(DEFAULT_TIMEOUT);
    };
    match v.parse::<i64>() {
        Ok(secs) if secs > 0 => {
            let d = Duration::from_secs(secs.unsigned_abs());
            let clamped = d.clamp(MIN_TIMEOUT, MAX_TIMEOUT);
            if clamped == d {
                Ok(d)
            } else {
                Err((
                    clamped,
                    format!(
                        "{secs} s is outside {}..={} s; using {} s",
                        MIN_TIMEOUT.as_secs(),
                        MAX_TIMEOUT.as_secs(),
                        clamped.as_secs()
                    ),
                ))
            }
        }
        _ => Err((
            DEFAULT_TIMEOUT,
            format!(
                "{v:?} is not a positive number of seconds; using the default {} s",
                DEFAULT_TIMEOUT.as_secs()
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::VolumeId;
    use std::time::UNIX_EPOCH;

    fn rec(node: &str, at: u64) -> AttachmentRecord {
        AttachmentRecord::new(
            VolumeId::new("pvc-vm").unwrap(),
            NodeId::new(node).unwrap(),
            UNIX_EPOCH + Duration::from_secs(at),
            AccessMode::MultiNodeMultiWriter,
            false,
        )
    }

    fn nid(s: &str) -> NodeId {
        NodeId::new(s).unwrap()
    }

    #[test]
    fn the_second_holder_starts_a_migration_from_the_first() {
        let one: Holders = [rec("node-a", 10)].into_iter().collect();
        let mut t = rec("node-b", 20);
        start(&one, &mut t, Duration::from_secs(60), None);
        let m = t.migration.clone().unwrap();
        assert_eq!(m.source, nid("node-a"));
        assert_eq!(m.started_at, UNIX_EPOCH + Duration::from_secs(20));
        let two: Holders = [rec("node-a", 10), t].into_iter().collect();
        let r = running(&two).unwrap();
        assert_eq!((r.source.as_str(), r.target.as_str()), ("node-a", "node-b"));
        assert!(!r.timed_out(UNIX_EPOCH + Duration::from_secs(80)));
        assert!(r.timed_out(UNIX_EPOCH + Duration::from_secs(81)));
        assert_eq!(
            changes(&one, &two),
            vec![Change::Started(r.clone())],
            "a start is reported once"
        );
        assert!(changes(&two, &two).is_empty());
    }

    #[test]
    fn a_first_holder_or_a_single_node_volume_starts_nothing() {
        let mut first = rec("node-a", 10);
        start(&Holders::new(), &mut first, DEFAULT_TIMEOUT, None);
        assert_eq!(first.migration, None);
        let one: Holders = [rec("node-a", 10)].into_iter().collect();
        let mut ro = rec("node-b", 20);
        ro.access_mode = AccessMode::MultiNodeReadOnly;
        start(&one, &mut ro, DEFAULT_TIMEOUT, None);
        assert_eq!(ro.migration, None, "readers do not migrate");
    }

    #[test]
    fn the_source_leaving_completes_the_target_leaving_fails() {
        let one: Holders = [rec("node-a", 10)].into_iter().collect();
        let mut t = rec("node-b", 20);
        start(&one, &mut t, DEFAULT_TIMEOUT, None);
        let two: Holders = [rec("node-a", 10), t.clone()].into_iter().collect();
        let r = running(&two).unwrap();

        let target_only = settle([t.clone()].into_iter().collect());
        assert_eq!(target_only.iter().next().unwrap().migration, None, "settled");
        assert_eq!(
            changes(&two, &target_only),
            vec![Change::Ended(r.clone(), Outcome::Completed)]
        );
        let source_only: Holders = [rec("node-a", 10)].into_iter().collect();
        assert_eq!(
            changes(&two, &source_only),
            vec![Change::Ended(r.clone(), Outcome::Failed)]
        );
        assert_eq!(
            changes(&two, &Holders::new()),
            vec![Change::Ended(r, Outcome::Failed)]
        );
        // Unsettled (the source gone, the record not yet cleared): no migration runs.
        assert_eq!(running(&[t].into_iter().collect()), None);
    }

    #[test]
    fn timeouts_are_read_as_the_earlier_driver_does_and_explained() {
        assert_eq!(timeout_from(None), Ok(DEFAULT_TIMEOUT));
        assert_eq!(timeout_from(Some("")), Ok(DEFAULT_TIMEOUT));
        assert_eq!(timeout_from(Some("30")), Ok(MIN_TIMEOUT));
        assert_eq!(timeout_from(Some("3600")), Ok(MAX_TIMEOUT));
        assert_eq!(timeout_from(Some(" 600 ")), Ok(Duration::from_secs(600)));
        for (v, used) in [
            ("10", MIN_TIMEOUT),
            ("7200", MAX_TIMEOUT),
            ("0", DEFAULT_TIMEOUT),
            ("-300", DEFAULT_TIMEOUT),
            ("abc", DEFAULT_TIMEOUT),
        ] {
            let (d, why) = timeout_from(Some(v)).unwrap_err();
            assert_eq!(d, used, "{v}");
            assert!(why.contains("using"), "{v}: {why}");
        }
    }
}
