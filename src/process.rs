//! Starting a task's shell: `/bin/sh -c COMMAND` in a directory, with its
//! own environment, stdout and stderr in new files, stdin from /dev/null,
//! in a new session (so a process group of its own, that everything it
//! starts can be killed with, and no controlling terminal: a command that
//! asks the terminal for a password fails instead of stopping in the
//! background), SIGPIPE and SIGXFSZ back to their defaults (Python ignores
//! them) — what `Popen(..., start_new_session=True)` does.
//!
//! The local launcher starts one of these per task, and the start is on the
//! main job's critical path: `subprocess.Popen` costs the parent about
//! 190 µs with the GIL held (its Python set-up, then a vfork that waits for
//! the child's exec). Three ways, the first this system has:
//! - Linux on x86-64 and arm64: `clone_vm`, which returns without waiting
//!   for the child's exec (the main job then keeps its pool busy);
//! - Linux: `posix_spawn` with `POSIX_SPAWN_SETSID` and the C library's
//!   change-directory action (glibc 2.29+, musl 1.1.24+: looked up at run
//!   time, the wheels promise glibc 2.28);
//! - elsewhere: std's `Command` with `setsid` before exec (a fork).
//!
//! The caller holds no GIL meanwhile. Reaping stays with the caller.

#[cfg(target_os = "linux")]
use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
#[cfg(target_os = "linux")]
use std::os::fd::AsRawFd;
#[cfg(target_os = "linux")]
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

#[cfg(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
pub mod clone_vm;

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
/// session whose id (and process group id) is the returned pid.
pub fn spawn_shell(
    command: &str,
    cwd: &Path,
    env: &[(String, String)],
    stdout: &Path,
    stderr: &Path,
) -> Result<u32, SpawnError> {
    let out = create(stdout)?;
    let err = create(stderr)?;
    #[cfg(all(
        target_os = "linux",
        any(target_arch = "x86_64", target_arch = "aarch64")
    ))]
    if let Some(pid) = clone_vm::start(command, cwd, env, &out, &err)? {
        return Ok(pid);
    }
    #[cfg(target_os = "linux")]
    if let Some(pid) = linux::spawn(command, cwd, env, &out, &err)? {
        return Ok(pid);
    }
    spawn_forked(command, cwd, env, out, err)
}

/// The portable way: std's `Command`, with `setsid` between fork and exec.
fn spawn_forked(
    command: &str,
    cwd: &Path,
    env: &[(String, String)],
    out: File,
    err: File,
) -> Result<u32, SpawnError> {
    let mut shell = Command::new("/bin/sh");
    shell
        .arg("-c")
        .arg(command)
        .current_dir(cwd)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    // SAFETY: setsid and signal (sigaction) are async-signal-safe, as a
    // pre-exec hook's calls must be. std restores SIGPIPE itself.
    unsafe {
        shell.pre_exec(|| {
            if libc::setsid() == -1 {
                return Err(io::Error::last_os_error());
            }
            libc::signal(libc::SIGXFSZ, libc::SIG_DFL);
            Ok(())
        });
    }
    let child = shell.spawn().map_err(SpawnError::Start)?;
    Ok(child.id())
}

/// A C string for the spawn; a NUL inside is the caller's error.
#[cfg(target_os = "linux")]
fn c_string(bytes: &[u8]) -> Result<CString, SpawnError> {
    CString::new(bytes).map_err(|_| {
        SpawnError::Start(io::Error::new(
            io::ErrorKind::InvalidInput,
            "an argument, the directory or the environment contains a NUL",
        ))
    })
}

/// A descriptor at 3 or above (close-on-exec), so that moving it to 0, 1
/// or 2 in the child is a real dup2 (which clears close-on-exec).
#[cfg(target_os = "linux")]
fn above_stdio(file: &File) -> Result<Option<File>, SpawnError> {
    if file.as_raw_fd() > 2 {
        return Ok(None);
    }
    // SAFETY: duplicating a descriptor we own; the new one is owned by the
    // returned File.
    let fd = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) };
    if fd < 0 {
        return Err(SpawnError::Start(io::Error::last_os_error()));
    }
    Ok(Some(unsafe {
        <File as std::os::fd::FromRawFd>::from_raw_fd(fd)
    }))
}

/// `KEY=VALUE` C strings, the environment an exec takes.
#[cfg(target_os = "linux")]
fn c_environment(env: &[(String, String)]) -> Result<Vec<CString>, SpawnError> {
    let mut variables = Vec::with_capacity(env.len());
    for (key, value) in env {
        let mut entry = Vec::with_capacity(key.len() + value.len() + 1);
        entry.extend_from_slice(key.as_bytes());
        entry.push(b'=');
        entry.extend_from_slice(value.as_bytes());
        variables.push(c_string(&entry)?);
    }
    Ok(variables)
}

/// What becomes the child's stdin (/dev/null), stdout and stderr: three
/// descriptors above 2, held open until the child has its own copies.
#[cfg(target_os = "linux")]
struct ChildStdio {
    fds: [libc::c_int; 3],
    _held: [Option<File>; 4],
}

#[cfg(target_os = "linux")]
impl ChildStdio {
    fn new(out: &File, err: &File) -> Result<ChildStdio, SpawnError> {
        let null = File::open("/dev/null").map_err(SpawnError::Start)?;
        let moved = [above_stdio(&null)?, above_stdio(out)?, above_stdio(err)?];
        let sources = [&null, out, err];
        let fds = std::array::from_fn(|i| moved[i].as_ref().unwrap_or(sources[i]).as_raw_fd());
        let [a, b, c] = moved;
        Ok(ChildStdio {
            fds,
            _held: [Some(null), a, b, c],
        })
    }
}

#[cfg(target_os = "linux")]
mod linux {
    use super::*;
    use std::sync::OnceLock;

    type AddChdir =
        unsafe extern "C" fn(*mut libc::posix_spawn_file_actions_t, *const libc::c_char) -> i32;

    /// `posix_spawn_file_actions_addchdir_np`, if this C library has it.
    pub(super) fn add_chdir() -> Option<AddChdir> {
        static FOUND: OnceLock<Option<AddChdir>> = OnceLock::new();
        *FOUND.get_or_init(|| {
            // SAFETY: a lookup by a NUL-terminated name; the symbol, when
            // present, has this signature in glibc and musl.
            unsafe {
                let symbol = libc::dlsym(
                    libc::RTLD_DEFAULT,
                    c"posix_spawn_file_actions_addchdir_np".as_ptr(),
                );
                (!symbol.is_null())
                    .then(|| std::mem::transmute::<*mut libc::c_void, AddChdir>(symbol))
            }
        })
    }

    fn check(code: i32) -> Result<(), SpawnError> {
        match code {
            0 => Ok(()),
            code => Err(SpawnError::Start(io::Error::from_raw_os_error(code))),
        }
    }

    /// The spawn, or None when this C library cannot change directory in
    /// it (the caller forks instead).
    pub(super) fn spawn(
        command: &str,
        cwd: &Path,
        env: &[(String, String)],
        out: &File,
        err: &File,
    ) -> Result<Option<u32>, SpawnError> {
        let Some(add_chdir) = add_chdir() else {
            return Ok(None);
        };
        let program = c"/bin/sh";
        let command = c_string(command.as_bytes())?;
        let argv = [
            program.as_ptr(),
            c"-c".as_ptr(),
            command.as_ptr(),
            std::ptr::null(),
        ];
        let variables = c_environment(env)?;
        let mut envp: Vec<*const libc::c_char> = variables.iter().map(|v| v.as_ptr()).collect();
        envp.push(std::ptr::null());
        let cwd = c_string(cwd.as_os_str().as_bytes())?;
        let stdio = ChildStdio::new(out, err)?;

        // SAFETY: every pointer handed to the C library points into values
        // that outlive the calls (argv, envp, cwd, the files); the attribute
        // and action objects are initialised before use and destroyed once.
        unsafe {
            let mut actions = std::mem::MaybeUninit::<libc::posix_spawn_file_actions_t>::uninit();
            check(libc::posix_spawn_file_actions_init(actions.as_mut_ptr()))?;
            let mut attr = std::mem::MaybeUninit::<libc::posix_spawnattr_t>::uninit();
            if let Err(e) = check(libc::posix_spawnattr_init(attr.as_mut_ptr())) {
                libc::posix_spawn_file_actions_destroy(actions.as_mut_ptr());
                return Err(e);
            }
            let actions = actions.as_mut_ptr();
            let attr = attr.as_mut_ptr();
            let result = (|| {
                for (target, fd) in stdio.fds.iter().enumerate() {
                    check(libc::posix_spawn_file_actions_adddup2(
                        actions,
                        *fd,
                        target as i32,
                    ))?;
                }
                check(add_chdir(actions, cwd.as_ptr()))?;
                let mut defaults = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
                libc::sigemptyset(defaults.as_mut_ptr());
                // Python ignores these two; the command gets them back. Other
                // ignored signals stay ignored (a run under nohup), as with
                // Popen; handlers are reset by exec itself.
                libc::sigaddset(defaults.as_mut_ptr(), libc::SIGPIPE);
                libc::sigaddset(defaults.as_mut_ptr(), libc::SIGXFSZ);
                check(libc::posix_spawnattr_setsigdefault(attr, defaults.as_ptr()))?;
                let mut empty = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
                libc::sigemptyset(empty.as_mut_ptr());
                check(libc::posix_spawnattr_setsigmask(attr, empty.as_ptr()))?;
                let flags = libc::POSIX_SPAWN_SETSID as libc::c_short
                    | libc::POSIX_SPAWN_SETSIGDEF as libc::c_short
                    | libc::POSIX_SPAWN_SETSIGMASK as libc::c_short;
                check(libc::posix_spawnattr_setflags(attr, flags))?;
                let mut pid: libc::pid_t = 0;
                check(libc::posix_spawn(
                    &mut pid,
                    program.as_ptr(),
                    actions,
                    attr,
                    argv.as_ptr() as *const *mut libc::c_char,
                    envp.as_ptr() as *const *mut libc::c_char,
                ))?;
                Ok(pid as u32)
            })();
            libc::posix_spawnattr_destroy(attr);
            libc::posix_spawn_file_actions_destroy(actions);
            result.map(Some)
        }
    }
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

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
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
                      ps -o sid= -p $$ | tr -d ' '; \
                      echo oops >&2; read line; echo \"stdin:$?\"; exit 3";
        let pid = spawn_shell(script, &dir, &env(&[("X", "1")]), &out, &err).unwrap();
        assert_eq!(wait(pid), 3);
        let text = fs::read_to_string(&out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(Path::new(lines[0]), dir.canonicalize().unwrap());
        // Only the environment given: HOME is not inherited.
        assert_eq!(lines[1], "1|unset");
        // Its own process group and session, led by the shell.
        assert_eq!(lines[2], pid.to_string());
        assert_eq!(lines[3], pid.to_string());
        // stdin is /dev/null: `read` meets end of file at once.
        assert_eq!(lines[4], "stdin:1");
        assert_eq!(fs::read_to_string(&err).unwrap(), "oops\n");
        fs::remove_dir_all(&dir).unwrap();
    }

    /// What the shell reports of itself: pid, process group, session, and
    /// whether it ignores SIGPIPE (this test process does, as Python does).
    fn identity(dir: &Path, spawn: impl FnOnce(&str, &Path, &Path) -> u32) -> (u32, Vec<String>) {
        let (out, err) = (dir.join("id.log"), dir.join("id.err"));
        let script = "ps -o pgid= -p $$ | tr -d ' '; ps -o sid= -p $$ | tr -d ' '; \
                      grep SigIgn /proc/$$/status 2>/dev/null || echo 'SigIgn: 0'";
        let pid = spawn(script, &out, &err);
        assert_eq!(wait(pid), 0, "{}", fs::read_to_string(&err).unwrap());
        let text = fs::read_to_string(&out).unwrap();
        (pid, text.lines().map(str::to_owned).collect())
    }

    #[test]
    fn every_way_starts_a_session_with_pythons_ignored_signals_restored() {
        let dir = scratch("session");
        // SAFETY: dispositions set as Python's runtime sets SIGPIPE, and as
        // `nohup` sets SIGHUP (which the command must keep ignoring).
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_IGN);
            libc::signal(libc::SIGHUP, libc::SIG_IGN);
        }
        let mut started = vec![identity(&dir, |script, out, err| {
            spawn_forked(
                script,
                &dir,
                &env(&[]),
                create(out).unwrap(),
                create(err).unwrap(),
            )
            .unwrap()
        })];
        #[cfg(target_os = "linux")]
        started.push(identity(&dir, |script, out, err| {
            let (out, err) = (create(out).unwrap(), create(err).unwrap());
            linux::spawn(script, &dir, &env(&[]), &out, &err)
                .unwrap()
                .unwrap()
        }));
        #[cfg(all(
            target_os = "linux",
            any(target_arch = "x86_64", target_arch = "aarch64")
        ))]
        started.push(identity(&dir, |script, out, err| {
            let (out, err) = (create(out).unwrap(), create(err).unwrap());
            clone_vm::start(script, &dir, &env(&[]), &out, &err)
                .unwrap()
                .unwrap()
        }));
        // SAFETY: back to the default for the rest of this test process.
        unsafe { libc::signal(libc::SIGHUP, libc::SIG_DFL) };
        for (pid, lines) in started {
            assert_eq!(lines[0], pid.to_string());
            assert_eq!(lines[1], pid.to_string());
            let mask = lines[2].trim_start_matches("SigIgn:").trim();
            let mask = u64::from_str_radix(mask, 16).unwrap();
            assert_eq!(mask & (1 << (libc::SIGPIPE - 1)), 0, "{}", lines[2]);
            #[cfg(target_os = "linux")]
            assert_ne!(mask & (1 << (libc::SIGHUP - 1)), 0, "{}", lines[2]);
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    /// Many starts at once from several threads, each child with its own
    /// environment and files; every stack and plan is freed once the
    /// children have exec'd.
    #[cfg(all(
        target_os = "linux",
        any(target_arch = "x86_64", target_arch = "aarch64")
    ))]
    #[test]
    fn unwaited_starts_from_many_threads_run_each_command_once() {
        let dir = scratch("many");
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let dir = dir.clone();
                std::thread::spawn(move || {
                    let mut pids = Vec::new();
                    for i in 0..50 {
                        let name = format!("{t}-{i}");
                        let out = create(&dir.join(format!("{name}.log"))).unwrap();
                        let err = create(&dir.join(format!("{name}.err"))).unwrap();
                        let vars = env(&[("N", &name)]);
                        let pid = clone_vm::start("echo \"$N\"", &dir, &vars, &out, &err)
                            .unwrap()
                            .unwrap();
                        pids.push((name, pid));
                    }
                    pids
                })
            })
            .collect();
        for thread in threads {
            for (name, pid) in thread.join().unwrap() {
                assert_eq!(wait(pid), 0);
                let text = fs::read_to_string(dir.join(format!("{name}.log"))).unwrap();
                assert_eq!(text, format!("{name}\n"));
            }
        }
        // Other tests may be starting children meanwhile: theirs drain too.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while clone_vm::pending() > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(clone_vm::pending(), 0);
        fs::remove_dir_all(&dir).unwrap();
    }

    /// A child that cannot exec (a command longer than the kernel takes in
    /// one argument) says why on its stderr and exits 127; its stack and
    /// plan are freed all the same.
    #[cfg(all(
        target_os = "linux",
        any(target_arch = "x86_64", target_arch = "aarch64")
    ))]
    #[test]
    fn an_unwaited_child_that_cannot_exec_exits_127_saying_why() {
        let dir = scratch("e2big");
        let (out, err) = (dir.join("o"), dir.join("e"));
        let command = format!("echo {}", "x".repeat(200 * 1024));
        let (o, e) = (create(&out).unwrap(), create(&err).unwrap());
        let pid = clone_vm::start(&command, &dir, &env(&[]), &o, &e)
            .unwrap()
            .unwrap();
        assert_eq!(wait(pid), 127);
        let said = fs::read_to_string(&err).unwrap();
        assert_eq!(
            said,
            format!(
                "necrocode-dispatch: cannot start the command: execve /bin/sh: errno {}\n",
                libc::E2BIG
            )
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    /// This machine's C library has the change-directory action, so the
    /// tests above exercised the posix_spawn path as well as the fork.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn glibc_here_spawns_without_forking() {
        assert!(linux::add_chdir().is_some());
    }

    #[test]
    fn failures_say_what_failed() {
        let dir = scratch("fails");
        let missing = dir.join("no-such-dir");
        let error = spawn_shell(
            "true",
            &dir,
            &env(&[("A", "b")]),
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
            &env(&[("A", "b")]),
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
