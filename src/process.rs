//! Starting a task's shell: `/bin/sh -c COMMAND` in a directory, with its
//! own environment, stdout and stderr in new files, stdin from /dev/null,
//! and a process group of its own (so that everything it starts can be
//! killed together).
//!
//! The local launcher starts one of these per task, and the start is on the
//! main job's critical path: `subprocess.Popen` costs the parent about
//! 190 µs with the GIL held (its Python set-up, then a vfork that waits for
//! the child's exec). Rust's `Command` uses `posix_spawn` where the C
//! library can change directory in it (glibc 2.29+, musl, macOS: looked up
//! at run time, else it forks), and the caller waits without the GIL.
//! Reaping stays with the caller: dropping `Child` neither waits nor kills.

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

/// What failed, for the caller's message: opening an output file (which
/// one) or starting the shell.
#[derive(Debug)]
pub enum SpawnError {
    Open { path: String, error: io::Error },
    Start(io::Error),
}

impl std::fmt::Display for SpawnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SpawnError::Open { path, error } => write!(f, "cannot open {path}: {error}"),
            SpawnError::Start(error) => write!(f, "cannot start /bin/sh: {error}"),
        }
    }
}

impl SpawnError {
    pub fn io_error(&self) -> &io::Error {
        match self {
            SpawnError::Open { error, .. } | SpawnError::Start(error) => error,
        }
    }
}

/// Creates (or truncates) an output file, as Python's `open(path, "wb")`.
fn create(path: &Path) -> Result<File, SpawnError> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|error| SpawnError::Open {
            path: path.display().to_string(),
            error,
        })
}

/// Starts `/bin/sh -c command` in `cwd` with exactly `env`, stdout to
/// `stdout` and stderr to `stderr` (both created or truncated), in a new
/// process group whose id is the returned pid.
pub fn spawn_shell<K, V>(
    command: &str,
    cwd: &Path,
    env: impl IntoIterator<Item = (K, V)>,
    stdout: &Path,
    stderr: &Path,
) -> Result<u32, SpawnError>
where
    K: AsRef<OsStr>,
    V: AsRef<OsStr>,
{
    let out = create(stdout)?;
    let err = create(stderr)?;
    let child = Command::new("/bin/sh")
        .arg("-c")
        .arg(command)
        .current_dir(cwd)
        .env_clear()
        .envs(env)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .map_err(SpawnError::Start)?;
    Ok(child.id())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn wait(pid: u32) -> i32 {
        let mut status = 0;
        // SAFETY: waiting for our own child; `status` is a valid out pointer.
        let reaped = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, 0) };
        assert_eq!(reaped, pid as libc::pid_t);
        assert!(libc::WIFEXITED(status));
        libc::WEXITSTATUS(status)
    }

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("nd-spawn-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn runs_in_its_directory_with_its_environment_and_group() {
        let dir = scratch("runs");
        let (out, err) = (dir.join("a.log"), dir.join("a.err"));
        fs::write(&out, "old contents that must go").unwrap();
        let script = "pwd; echo \"$X|${HOME-unset}\"; ps -o pgid= -p $$ | tr -d ' '; \
                      echo oops >&2; read line; echo \"stdin:$?\"; exit 3";
        let pid = spawn_shell(script, &dir, [("X", "1")], &out, &err).unwrap();
        assert_eq!(wait(pid), 3);
        let text = fs::read_to_string(&out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(Path::new(lines[0]), dir.canonicalize().unwrap());
        // Only the environment given: HOME is not inherited.
        assert_eq!(lines[1], "1|unset");
        // Its own process group, led by the shell.
        assert_eq!(lines[2], pid.to_string());
        // stdin is /dev/null: `read` meets end of file at once.
        assert_eq!(lines[3], "stdin:1");
        assert_eq!(fs::read_to_string(&err).unwrap(), "oops\n");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn failures_say_what_failed() {
        let dir = scratch("fails");
        let missing = dir.join("no-such-dir");
        let error = spawn_shell(
            "true",
            &dir,
            [("A", "b")],
            &missing.join("x.log"),
            &dir.join("e"),
        )
        .unwrap_err();
        assert_eq!(error.io_error().kind(), io::ErrorKind::NotFound);
        assert!(error.to_string().starts_with("cannot open "), "{error}");
        assert!(error.to_string().contains("x.log"), "{error}");
        let error = spawn_shell(
            "true",
            &missing,
            [("A", "b")],
            &dir.join("o"),
            &dir.join("e"),
        )
        .unwrap_err();
        assert_eq!(error.io_error().kind(), io::ErrorKind::NotFound);
        assert!(
            error.to_string().starts_with("cannot start /bin/sh"),
            "{error}"
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
