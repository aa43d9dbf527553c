//! An append-only journal beside a snapshot: how the embedded backend keeps its state
//! (the emulated RDS's tables, the attachment records) on the local disk.
//!
//! A change is one line of JSON appended to `<name>.journal` with a single `write(2)`; the
//! state is the snapshot `<name>.json` with every journal line applied in order. Every so
//! many lines the journal is compacted: the whole state is written as a new snapshot, then
//! the journal restarts empty.
//!
//! Durability, decided: a change is acknowledged once the `write(2)` of its line returned.
//! From then on the line is in the kernel's page cache, which a `kill -9` (or any crash)
//! of the process does not touch: the next process reads it. What `fsync` would add is
//! survival of a power loss or kernel crash, at 3–4 ms per change on this kind of machine —
//! a thousand times the cost of the write — so the journal does not fsync per change; the
//! embedded backend is a single-machine stand-in for the RDS and the Kubernetes API, whose
//! durability it does not claim (its default state directory is under `/tmp`). After a
//! power loss the state is still consistent (snapshots are fsynced and replaced
//! atomically; a torn or zeroed journal tail is dropped), but the last moments' changes
//! may be gone.
//!
//! Invariants:
//! - the journal's first line names the snapshot generation it continues; a journal of an
//!   older generation (a compaction interrupted after its snapshot was written) is
//!   ignored, since that snapshot already holds its lines;
//! - only the last line can be incomplete (a writer killed mid-write); it is dropped and
//!   cut off at open. An unreadable line anywhere else is corruption, reported, never
//!   skipped;
//! - a failed append is cut off again before the error is returned, so a later append
//!   never follows a torn line; when even that fails the journal refuses every later
//!   append.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use super::atomic_write;

/// A state kept in a [`Journal`]: a snapshot value plus the changes applied to it.
pub trait Journaled: Default + Serialize + DeserializeOwned {
    /// One change, as written to the journal.
    type Change: Serialize + DeserializeOwned;
    /// Applies a change that was journaled (it cannot fail: it happened).
    fn apply(&mut self, change: Self::Change);
    /// How many entries the state holds (compaction is due after as many journal lines,
    /// and never sooner than [`MIN_LINES_BEFORE_COMPACTION`]).
    fn entry_count(&self) -> usize;
}

/// Journal lines appended before a compaction is worth its cost, at least.
pub const MIN_LINES_BEFORE_COMPACTION: usize = 1024;

/// Why a journaled state cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// A file holds something that is not a state or a journal line.
    #[error("{path}: {reason}")]
    Corrupt {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

#[derive(Serialize, Deserialize)]
struct Snapshot<S> {
    generation: u64,
    state: S,
}

#[derive(Serialize, Deserialize)]
struct Header {
    generation: u64,
}

/// An open journal of state `S`.
pub struct Journal<S: Journaled> {
    snapshot: PathBuf,
    log: PathBuf,
    file: File,
    /// Length of the journal up to its last complete line.
    len: u64,
    generation: u64,
    lines: usize,
    broken: Option<String>,
    _state: PhantomData<fn() -> S>,
}

impl<S: Journaled> std::fmt::Debug for Journal<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("snapshot", &self.snapshot)
            .field("generation", &self.generation)
            .field("lines", &self.lines)
            .finish_non_exhaustive()
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> JournalError + '_ {
    move |source| JournalError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn corrupt(path: &Path, reason: impl std::fmt::Display) -> JournalError {
    JournalError::Corrupt {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, JournalError> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path)(e)),
    }
}

fn header_line(generation: u64) -> Vec<u8> {
    let mut line = serde_json::to_vec(&Header { generation }).unwrap_or_default();
    line.push(b'\n');
    line
}

/// What reading a snapshot and its journal gives.
struct Replayed<S> {
    generation: u64,
    state: S,
    /// Journal lines applied.
    lines: usize,
    /// Length of the journal up to its last complete line.
    keep: u64,
    /// No journal of this snapshot yet.
    fresh: bool,
}

/// Reads `snapshot` and replays `log` onto it, writing nothing.
fn replay<S: Journaled>(snapshot: &Path, log: &Path) -> Result<Replayed<S>, JournalError> {
    let (generation, mut state) = match read_optional(snapshot)? {
        None => (0, S::default()),
        Some(bytes) => match serde_json::from_slice::<Snapshot<S>>(&bytes) {
            Ok(s) => (s.generation, s.state),
            Err(e) => match serde_json::from_slice::<S>(&bytes) {
                Ok(legacy) => (0, legacy),
                Err(_) => return Err(corrupt(snapshot, e)),
            },
        },
    };
    let mut lines = 0;
    let mut keep = 0u64;
    let mut fresh = true;
    if let Some(mut bytes) = read_optional(log)? {
        let (header, rest) = match bytes.iter().position(|b| *b == b'\n') {
            Some(at) => (Some(serde_json::from_slice::<Header>(&bytes[..at])), at + 1),
            // The header is written whole (atomically): no complete first line means
            // an empty journal.
            None => (None, 0),
        };
        match header {
            None => {}
            Some(Err(e)) => {
                return Err(corrupt(log, format!("the first line is not a journal header: {e}")));
            }
            Some(Ok(h)) if h.generation < generation => {
                tracing::info!(journal = %log.display(), "journal of an older snapshot ignored (its changes are in the snapshot)");
            }
            Some(Ok(h)) if h.generation > generation => {
                return Err(corrupt(
                    log,
                    format!(
                        "journal generation {} is newer than its snapshot's ({generation})",
                        h.generation
                    ),
                ));
            }
            Some(Ok(_)) => {
                fresh = false;
                keep = rest as u64;
                let body = bytes.split_off(rest);
                let mut at = 0;
                while at < body.len() {
                    let Some(len) = body[at..].iter().position(|b| *b == b'\n') else {
                        tracing::warn!(journal = %log.display(), bytes = body.len() - at, "dropping an incomplete last journal line (a writer was killed mid-write)");
                        break;
                    };
                    let line = &body[at..at + len];
                    match serde_json::from_slice::<Vec<S::Change>>(line) {
                        Ok(changes) => changes.into_iter().for_each(|c| state.apply(c)),
                        // Only the last line may be torn (zeros after a power loss too).
                        Err(_) if at + len + 1 == body.len() => {
                            tracing::warn!(journal = %log.display(), "dropping an unreadable last journal line");
                            break;
                        }
                        Err(e) => {
                            return Err(corrupt(
                                log,
                                format!("line {} is not a journal entry: {e}", lines + 2),
                            ));
                        }
                    }
                    lines += 1;
                    at += len + 1;
                    keep = (rest + at) as u64;
                }
            }
        }
    }
    Ok(Replayed {
        generation,
        state,
        lines,
        keep,
        fresh,
    })
}

impl<S: Journaled> Journal<S> {
    /// Opens (or creates) the state `dir/<name>.json` + `dir/<name>.journal` and returns
    /// it with the journal replayed. A snapshot written before journals existed (the bare
    /// state, as older versions wrote it) is read as generation 0.
    pub fn open(dir: &Path, name: &str) -> Result<(Self, S), JournalError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let snapshot = dir.join(format!("{name}.json"));
        let log = dir.join(format!("{name}.journal"));
        let Replayed {
            generation,
            state,
            lines,
            mut keep,
            fresh,
        } = replay::<S>(&snapshot, &log)?;
        if fresh {
            atomic_write(&log, &header_line(generation)).map_err(io_err(&log))?;
            keep = header_line(generation).len() as u64;
        }
        let file = OpenOptions::new()
            .append(true)
            .open(&log)
            .map_err(io_err(&log))?;
        // Cut off an incomplete last line before anything is appended after it.
        if file.metadata().map_err(io_err(&log))?.len() != keep {
            file.set_len(keep).map_err(io_err(&log))?;
        }
        Ok((
            Self {
                snapshot,
                log,
                file,
                len: keep,
                generation,
                lines,
                broken: None,
                _state: PhantomData,
            },
            state,
        ))
    }

    /// The state `dir/<name>.json` + `dir/<name>.journal` as it stands, read without
    /// writing anything: for a reader in another process while the owner appends (a last
    /// line being written is not there yet, and is left for the owner). Nothing there yet:
    /// the default state.
    pub fn read(dir: &Path, name: &str) -> Result<S, JournalError> {
        let snapshot = dir.join(format!("{name}.json"));
        let log = dir.join(format!("{name}.journal"));
        Ok(replay::<S>(&snapshot, &log)?.state)
    }

    /// Appends `changes` as one line (all or none of them survive a crash). Returns once
    /// the line is in the kernel (see the module header for what that survives). On error
    /// nothing was recorded and the caller must not apply the changes.
    pub fn append(&mut self, changes: &[S::Change]) -> std::io::Result<()> {
        if let Some(why) = &self.broken {
            return Err(std::io::Error::other(why.clone()));
        }
        let mut line = serde_json::to_vec(changes).map_err(std::io::Error::other)?;
        line.push(b'\n');
        if let Err(e) = self.file.write_all(&line) {
            if let Err(cut) = self.file.set_len(self.len) {
                self.broken = Some(format!(
                    "{}: a failed append could not be cut off ({cut}); restart to recover",
                    self.log.display()
                ));
            }
            return Err(e);
        }
        self.len += line.len() as u64;
        self.lines += 1;
        Ok(())
    }

    /// Whether enough lines accumulated for [`Self::compact`] to pay off for `state`.
    pub fn wants_compaction(&self, state: &S) -> bool {
        self.lines >= MIN_LINES_BEFORE_COMPACTION.max(state.entry_count())
    }

    /// Writes `state` (which must be the journal's state) as the next snapshot and
    /// restarts the journal empty. The snapshot is fsynced and replaces the old one
    /// atomically; the appends before stay valid whatever happens here.
    pub fn compact(&mut self, state: &S) -> std::io::Result<()> {
        let next = self.generation + 1;
        let data = serde_json::to_vec(&Snapshot {
            generation: next,
            state,
        })
        .map_err(std::io::Error::other)?;
        atomic_write(&self.snapshot, &data)?;
        // From here the old journal is ignored at open: appending to it would be lost.
        let restart = atomic_write(&self.log, &header_line(next)).and_then(|()| {
            OpenOptions::new().append(true).open(&self.log)
        });
        match restart {
            Ok(file) => {
                self.file = file;
                self.len = header_line(next).len() as u64;
                self.generation = next;
                self.lines = 0;
                Ok(())
            }
            Err(e) => {
                self.broken = Some(format!(
                    "{}: the journal could not be restarted after a compaction ({e}); restart to recover",
                    self.log.display()
                ));
                Err(e)
            }
        }
    }

    /// Compacts when due ([`Self::wants_compaction`]) with `state`, the journal's state
    /// after the last append. A failed compaction is logged, not returned: the changes are
    /// recorded either way, and the next call tries again.
    pub fn compact_if_due(&mut self, state: &S) {
        if self.wants_compaction(state)
            && let Err(e) = self.compact(state)
        {
            tracing::warn!(snapshot = %self.snapshot.display(), error = %e, "compaction of the state journal failed; retrying later");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
    struct Kv(BTreeMap<String, u64>);

    impl Journaled for Kv {
        type Change = (String, Option<u64>);
        fn apply(&mut self, (k, v): Self::Change) {
            match v {
                Some(v) => self.0.insert(k, v),
                None => self.0.remove(&k),
            };
        }
        fn entry_count(&self) -> usize {
            self.0.len()
        }
    }

    fn put(k: &str, v: u64) -> (String, Option<u64>) {
        (k.to_string(), Some(v))
    }

    fn reopen(dir: &Path) -> Kv {
        Journal::<Kv>::open(dir, "state").unwrap().1
    }

    #[test]
    fn changes_survive_reopen_and_compaction() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, mut s) = Journal::<Kv>::open(dir.path(), "state").unwrap();
        for (i, c) in [put("a", 1), put("b", 2), ("a".to_string(), None)]
            .into_iter()
            .enumerate()
        {
            j.append(std::slice::from_ref(&c)).unwrap();
            s.apply(c);
            assert_eq!(reopen(dir.path()), s, "after change {i}");
        }
        j.compact(&s).unwrap();
        assert_eq!(reopen(dir.path()), s);
        j.append(&[put("c", 3), put("d", 4)]).unwrap();
        s.apply(put("c", 3));
        s.apply(put("d", 4));
        assert_eq!(reopen(dir.path()), s);
        assert_eq!(
            s.0,
            BTreeMap::from([("b".into(), 2), ("c".into(), 3), ("d".into(), 4)])
        );
    }

    #[test]
    fn a_torn_last_line_is_dropped_and_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::<Kv>::open(dir.path(), "state").unwrap();
        j.append(&[put("a", 1)]).unwrap();
        drop(j);
        let log = dir.path().join("state.journal");
        let mut f = OpenOptions::new().append(true).open(&log).unwrap();
        f.write_all(b"[[\"b\",").unwrap();
        drop(f);
        let (mut j, s) = Journal::<Kv>::open(dir.path(), "state").unwrap();
        assert_eq!(s.0, BTreeMap::from([("a".into(), 1)]));
        // The next append starts on a clean line.
        j.append(&[put("c", 3)]).unwrap();
        assert_eq!(
            reopen(dir.path()).0,
            BTreeMap::from([("a".into(), 1), ("c".into(), 3)])
        );
    }

    #[test]
    fn corruption_before_the_last_line_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::<Kv>::open(dir.path(), "state").unwrap();
        j.append(&[put("a", 1)]).unwrap();
        drop(j);
        let log = dir.path().join("state.journal");
        let text = std::fs::read_to_string(&log).unwrap();
        std::fs::write(&log, format!("{text}garbage\n[[\"b\",2]]\n")).unwrap();
        assert!(matches!(
            Journal::<Kv>::open(dir.path(), "state"),
            Err(JournalError::Corrupt { .. })
        ));
        std::fs::write(dir.path().join("state.json"), b"{not json").unwrap();
        assert!(matches!(
            Journal::<Kv>::open(dir.path(), "state"),
            Err(JournalError::Corrupt { .. })
        ));
    }

    #[test]
    fn a_journal_older_than_its_snapshot_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, mut s) = Journal::<Kv>::open(dir.path(), "state").unwrap();
        j.append(&[put("a", 1)]).unwrap();
        s.apply(put("a", 1));
        let old_journal = std::fs::read(dir.path().join("state.journal")).unwrap();
        j.compact(&s).unwrap();
        j.append(&[put("a", 5)]).unwrap();
        drop(j);
        // As if the compaction had stopped right after writing its snapshot.
        std::fs::write(dir.path().join("state.journal"), old_journal).unwrap();
        assert_eq!(reopen(dir.path()).0, BTreeMap::from([("a".into(), 1)]));
    }

    #[test]
    fn compaction_is_due_after_enough_lines_and_empties_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, mut s) = Journal::<Kv>::open(dir.path(), "state").unwrap();
        let log = dir.path().join("state.journal");
        for i in 0..MIN_LINES_BEFORE_COMPACTION as u64 {
            let c = put(&format!("k{}", i % 7), i);
            j.append(std::slice::from_ref(&c)).unwrap();
            s.apply(c);
            j.compact_if_due(&s);
        }
        assert_eq!(j.generation, 1, "compacted once");
        assert_eq!(j.lines, 0);
        assert_eq!(std::fs::read(&log).unwrap(), header_line(1));
        assert_eq!(reopen(dir.path()), s);
    }

    #[test]
    fn a_bare_legacy_snapshot_is_read_as_generation_zero() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("state.json"), br#"{"x": 7}"#).unwrap();
        assert_eq!(reopen(dir.path()).0, BTreeMap::from([("x".into(), 7)]));
    }
}
