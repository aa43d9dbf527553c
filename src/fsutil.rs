//! Small filesystem helpers shared by the local adapters: atomic replacement of a file and
//! the append-only [`journal`] the embedded backend keeps its state in.

pub mod journal;

use std::io::Write;
use std::path::Path;

/// Writes `data` to `path` atomically and durably: a temporary file in the same directory
/// is written and fsynced, renamed over `path`, and the directory is fsynced. After a crash
/// at any point `path` holds either the old or the new content, never a mix.
pub fn atomic_write(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other(format!("{} has no file name", path.display())))?;
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Test support for the `kill -9` tests of journaled state.
#[cfg(test)]
pub(crate) mod kill9 {
    use std::io::BufRead;
    use std::path::Path;

    /// Runs the test `child_test` of this test binary in a child process with `env` set to
    /// `dir`, counts the lines it prints that start with `ACK `, and kills it with SIGKILL
    /// (mid-write or between writes) once `acks` were seen. Returns how many were seen.
    pub(crate) fn kill_after_acks(child_test: &str, env: &str, dir: &Path, acks: u64) -> u64 {
        let exe = std::env::current_exe().unwrap();
        let mut child = std::process::Command::new(&exe)
            .args(["--exact", child_test, "--nocapture", "--test-threads=1"])
            .env(env, dir)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut acked = 0u64;
        for line in std::io::BufReader::new(stdout).lines() {
            if line.unwrap().starts_with("ACK ") {
                acked += 1;
                if acked == acks {
                    break;
                }
            }
        }
        child.kill().unwrap();
        child.wait().unwrap();
        acked
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_content_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        atomic_write(&p, b"one").unwrap();
        atomic_write(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("state.json")]);
    }
}
