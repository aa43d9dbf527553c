//! The seam for external commands (`nvme`, `losetup`, `mount`, `mkfs.*`, `blkid`, ...).
//!
//! Adapters never spawn processes directly: they hand an argv to a [`CommandRunner`]. The
//! production [`TokioRunner`] bounds every command by a timeout and kills it when the bound
//! is reached (`kill_on_drop`), so a hung `umount` or `nvme connect` cannot hang an RPC
//! forever. Unit tests plug a recording runner and assert the exact argv.
//!
//! Commands run with stdin closed (a tool that would prompt reads EOF instead of waiting)
//! and without a shell: arguments are never parsed as shell syntax.

use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;

/// What a finished command left behind.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CommandOutput {
    /// Exit status (`None`: killed by a signal).
    pub code: Option<i32>,
    /// Standard output, lossily decoded.
    pub stdout: String,
    /// Standard error, lossily decoded.
    pub stderr: String,
}

impl CommandOutput {
    /// Exit status 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// A one-line description of a failure for error messages: exit status and stderr.
    pub fn failure_text(&self) -> String {
        let status = match self.code {
            Some(c) => format!("exit status {c}"),
            None => "killed by a signal".to_string(),
        };
        let detail = self.stderr.trim();
        let detail = if detail.is_empty() {
            self.stdout.trim()
        } else {
            detail
        };
        if detail.is_empty() {
            status
        } else {
            format!("{status}: {}", detail.replace('\n', "; "))
        }
    }
}

/// Why a command produced no [`CommandOutput`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExecError {
    /// The command did not finish within the bound and was killed.
    #[error("`{command}` did not finish within {secs}s and was killed")]
    Timeout {
        /// The command line.
        command: String,
        /// The bound in seconds.
        secs: u64,
    },
    /// The program could not be started (not installed, not executable).
    #[error("cannot run `{command}`: {reason}")]
    Spawn {
        /// The command line.
        command: String,
        /// The OS error.
        reason: String,
    },
}

/// Runs external programs.
#[async_trait]
pub trait CommandRunner: Send + Sync + 'static {
    /// Runs `program` with `args` to completion (or until the runner's bound).
    async fn run(&self, program: &str, args: &[String]) -> Result<CommandOutput, ExecError>;
}

/// The command line as text, for messages.
pub fn command_line(program: &str, args: &[String]) -> String {
    let mut line = program.to_string();
    for a in args {
        line.push(' ');
        line.push_str(a);
    }
    line
}

/// Runs commands with `tokio::process`, each bounded by `timeout`.
#[derive(Debug, Clone)]
pub struct TokioRunner {
    timeout: Duration,
}

impl TokioRunner {
    /// A runner that kills commands still running after `timeout`.
    pub fn new(timeout: Duration) -> Self {
        Self { timeout }
    }
}

#[async_trait]
impl CommandRunner for TokioRunner {
    async fn run(&self, program: &str, args: &[String]) -> Result<CommandOutput, ExecError> {
        let command = command_line(program, args);
        let child = tokio::process::Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("LC_ALL", "C")
            // Dropping the future on timeout drops the child, which kills it.
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| ExecError::Spawn {
                command: command.clone(),
                reason: e.to_string(),
            })?;
        tracing::debug!(%command, "running");
        match tokio::time::timeout(self.timeout, child.wait_with_output()).await {
            Ok(Ok(out)) => Ok(CommandOutput {
                code: out.status.code(),
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            }),
            Ok(Err(e)) => Err(ExecError::Spawn {
                command,
                reason: e.to_string(),
            }),
            Err(_) => Err(ExecError::Timeout {
                command,
                secs: self.timeout.as_secs(),
            }),
        }
    }
}

/// A scripted runner for unit tests: records every argv and answers from a closure.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use std::sync::Mutex;

    type Responder = Box<dyn Fn(&[String]) -> Result<CommandOutput, ExecError> + Send + Sync>;

    /// Records argv (program first) and answers with `respond`.
    pub(crate) struct ScriptedRunner {
        pub calls: Mutex<Vec<Vec<String>>>,
        respond: Responder,
    }

    impl ScriptedRunner {
        pub(crate) fn new(
            respond: impl Fn(&[String]) -> Result<CommandOutput, ExecError> + Send + Sync + 'static,
        ) -> Self {
            Self {
                calls: Mutex::new(Vec::new()),
                respond: Box::new(respond),
            }
        }

        pub(crate) fn calls(&self) -> Vec<Vec<String>> {
            self.calls.lock().unwrap().clone()
        }
    }

    /// Exit 0 with `stdout`.
    pub(crate) fn ok(stdout: &str) -> Result<CommandOutput, ExecError> {
        Ok(CommandOutput {
            code: Some(0),
            stdout: stdout.to_string(),
            stderr: String::new(),
        })
    }

    /// Exit `code` with `stderr`.
    pub(crate) fn fail(code: i32, stderr: &str) -> Result<CommandOutput, ExecError> {
        Ok(CommandOutput {
            code: Some(code),
            stdout: String::new(),
            stderr: stderr.to_string(),
        })
    }

    #[async_trait]
    impl CommandRunner for ScriptedRunner {
        async fn run(&self, program: &str, args: &[String]) -> Result<CommandOutput, ExecError> {
            let mut argv = vec![program.to_string()];
            argv.extend(args.iter().cloned());
            self.calls.lock().unwrap().push(argv.clone());
            (self.respond)(&argv)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn runner_captures_output_and_status() {
        let r = TokioRunner::new(Duration::from_secs(30));
        let out = r
            .run(
                "sh",
                &["-c".into(), "echo out; echo err >&2; exit 3".into()],
            )
            .await
            .unwrap();
        assert_eq!(out.code, Some(3));
        assert_eq!(out.stdout, "out\n");
        assert_eq!(out.failure_text(), "exit status 3: err");
    }

    #[tokio::test]
    async fn runner_kills_a_command_that_outlives_its_bound() {
        // `sleep` is the hung command here; the bound is what is under test.
        let r = TokioRunner::new(Duration::from_millis(200));
        let err = r.run("sleep", &["600".into()]).await.unwrap_err();
        assert!(matches!(err, ExecError::Timeout { .. }), "{err}");
    }

    #[tokio::test]
    async fn a_missing_program_is_a_spawn_error_naming_it() {
        let r = TokioRunner::new(Duration::from_secs(5));
        let err = r.run("/nonexistent/mkfs.foo", &[]).await.unwrap_err();
        assert!(err.to_string().contains("/nonexistent/mkfs.foo"), "{err}");
    }
}
