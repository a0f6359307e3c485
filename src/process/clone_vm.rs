//! Starting the shell without waiting for its `exec`.
//!
//! `posix_spawn` clones with `CLONE_VM | CLONE_VFORK`: the child borrows our
//! memory until it execs, and the caller sleeps until then. Measured in the
//! main job, that sleep was 0.3-0.5 ms per task (the child must first get a
//! core among the running commands), about 80 % of the loop thread's time,
//! with the loop starting one task at a time. Here the child is cloned with
//! `CLONE_VM` alone, on a stack of its own: the caller returns with the pid
//! at once while the child sets itself up and execs.
//!
//! What makes that safe, as in the C library's own spawn:
//! - the child runs only raw system calls (no C library call, so no `errno`
//!   and nothing else in the thread-local storage it shares with the thread
//!   that cloned it), reads only the plan below, and writes only its stack;
//! - every signal is blocked across the clone; the child sets each caught
//!   signal back to its default before restoring the mask, so no handler of
//!   ours ever runs in it;
//! - the plan and the stack are freed only once the child no longer uses our
//!   memory: its end of a close-on-exec pipe closes when it execs, or when it
//!   exits (after it dropped the memory), and only then (a later start
//!   frees what earlier ones left).
//!
//! A failure in the child (its directory went away after the check below)
//! is written to its stderr, and it exits with 127.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use libc::{c_char, c_int, c_long, c_void};

use super::{c_environment, c_string, ChildStdio, SpawnError};

/// The child's stack: it makes a few system calls and formats one number.
const STACK: usize = 64 * 1024;
const PAGE: usize = 4096;

/// The kernel's `struct sigaction` for `rt_sigaction`, as x86-64 and arm64
/// lay it out (both have `sa_restorer`).
#[repr(C)]
struct KernelSigaction {
    handler: usize,
    flags: u64,
    restorer: usize,
    mask: u64,
}

/// Everything the child reads, at a fixed address until it has exec'd.
struct Plan {
    program: CString,
    command: CString,
    /// Kept for `envp`, which points into them.
    _variables: Vec<CString>,
    argv: Vec<*const c_char>,
    envp: Vec<*const c_char>,
    cwd: CString,
    /// Sources for stdin, stdout and stderr (all above 2).
    fds: [c_int; 3],
    /// The write end of the report pipe (close-on-exec).
    report: c_int,
    /// The cloning thread's signal mask, restored just before exec.
    mask: u64,
}

/// A raw system call: no `errno`, nothing thread-local.
#[cfg(target_arch = "x86_64")]
unsafe fn raw(n: c_long, a: usize, b: usize, c: usize, d: usize) -> isize {
    let ret: isize;
    // SAFETY: the caller passes a valid call; `syscall` clobbers rcx, r11.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") n as isize => ret,
            in("rdi") a, in("rsi") b, in("rdx") c, in("r10") d,
            lateout("rcx") _, lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

#[cfg(target_arch = "aarch64")]
unsafe fn raw(n: c_long, a: usize, b: usize, c: usize, d: usize) -> isize {
    let ret: isize;
    // SAFETY: the caller passes a valid call.
    unsafe {
        std::arch::asm!(
            "svc 0",
            in("x8") n,
            inlateout("x0") a as isize => ret,
            in("x1") b, in("x2") c, in("x3") d,
            options(nostack),
        );
    }
    ret
}

/// Reports `errno` (negated return) on stderr and the pipe, then exits 127.
unsafe fn fail(plan: &Plan, what: &[u8], ret: isize) -> ! {
    let errno = (-ret) as u32;
    let mut line = [0u8; 96];
    let prefix = b"necrocode-dispatch: cannot start the command: ";
    let mut n = 0;
    for &b in prefix.iter().chain(what) {
        line[n] = b;
        n += 1;
    }
    let mut digits = [0u8; 10];
    let (mut value, mut d) = (errno, 0);
    loop {
        digits[d] = b'0' + (value % 10) as u8;
        d += 1;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    while d > 0 {
        d -= 1;
        line[n] = digits[d];
        n += 1;
    }
    line[n] = b'\n';
    n += 1;
    unsafe {
        raw(libc::SYS_write, 2, line.as_ptr() as usize, n, 0);
        raw(
            libc::SYS_write,
            plan.report as usize,
            &errno as *const u32 as usize,
            4,
            0,
        );
        raw(libc::SYS_exit_group, 127, 0, 0, 0);
    }
    // exit_group does not return.
    #[allow(clippy::empty_loop)]
    loop {}
}

extern "C" fn child(arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the Plan the parent keeps alive until we exec or
    // exit; only raw system calls follow.
    unsafe {
        let plan = &*(arg as *const Plan);
        let default = KernelSigaction {
            handler: libc::SIG_DFL,
            flags: 0,
            restorer: 0,
            mask: 0,
        };
        for sig in 1..=64usize {
            if sig == libc::SIGKILL as usize || sig == libc::SIGSTOP as usize {
                continue;
            }
            let mut old = KernelSigaction {
                handler: 0,
                flags: 0,
                restorer: 0,
                mask: 0,
            };
            let got = raw(
                libc::SYS_rt_sigaction,
                sig,
                0,
                &mut old as *mut _ as usize,
                8,
            );
            // Caught signals go back to default (their handlers are ours);
            // ignored ones stay ignored, except the two Python ignores.
            let reset = old.handler != libc::SIG_DFL
                && (old.handler != libc::SIG_IGN
                    || sig == libc::SIGPIPE as usize
                    || sig == libc::SIGXFSZ as usize);
            if got == 0 && reset {
                raw(
                    libc::SYS_rt_sigaction,
                    sig,
                    &default as *const _ as usize,
                    0,
                    8,
                );
            }
        }
        let ret = raw(libc::SYS_setsid, 0, 0, 0, 0);
        if ret < 0 {
            fail(plan, b"setsid: errno ", ret);
        }
        for (target, fd) in plan.fds.iter().enumerate() {
            let ret = raw(libc::SYS_dup3, *fd as usize, target, 0, 0);
            if ret < 0 {
                fail(plan, b"dup3: errno ", ret);
            }
        }
        let ret = raw(libc::SYS_chdir, plan.cwd.as_ptr() as usize, 0, 0, 0);
        if ret < 0 {
            fail(plan, b"chdir: errno ", ret);
        }
        raw(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK as usize,
            &plan.mask as *const u64 as usize,
            0,
            8,
        );
        let ret = raw(
            libc::SYS_execve,
            plan.program.as_ptr() as usize,
            plan.argv.as_ptr() as usize,
            plan.envp.as_ptr() as usize,
            0,
        );
        fail(plan, b"execve /bin/sh: errno ", ret)
    }
}

/// A child's stack: a private mapping whose lowest page is a guard.
struct Stack(*mut c_void);

// SAFETY: a mapping of ours, used by one child at a time and unmapped once.
unsafe impl Send for Stack {}

impl Stack {
    fn new() -> io::Result<Stack> {
        // SAFETY: a fresh private anonymous mapping; the guard page is
        // inside it.
        unsafe {
            let base = libc::mmap(
                std::ptr::null_mut(),
                STACK + PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            );
            if base == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            let stack = Stack(base);
            if libc::mprotect(base, PAGE, libc::PROT_NONE) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(stack)
        }
    }

    fn top(&self) -> *mut c_void {
        // SAFETY: one past the mapping's end, where a stack starts.
        unsafe { (self.0 as *mut u8).add(STACK + PAGE).cast() }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // SAFETY: mapped by `new` with this size; no child is on it.
        unsafe { libc::munmap(self.0, STACK + PAGE) };
    }
}

/// A started child still possibly on our memory.
struct Pending {
    report: OwnedFd,
    _plan: Box<Plan>,
    stack: Stack,
}

// SAFETY: the plan's raw pointers point into the plan's own strings; any
// thread may free it once the child is done with it.
unsafe impl Send for Pending {}

/// Children that may still be on our memory, and stacks free for the next
/// ones (mapping and unmapping one per task cost system calls and, in a
/// process with several threads, a TLB flush on every core).
struct Children {
    pending: Vec<Pending>,
    spare: Vec<Stack>,
}

const SPARE_STACKS: usize = 16;

static CHILDREN: Mutex<Children> = Mutex::new(Children {
    pending: Vec::new(),
    spare: Vec::new(),
});

/// Runs `f` on the children's list. None if it stays locked for 5 ms: a
/// fork copied it locked, and the caller leaves its child's stack and plan
/// to the process rather than wait forever.
fn with_children<R>(f: impl FnOnce(&mut Children) -> R) -> Option<R> {
    let deadline = Instant::now() + Duration::from_millis(5);
    loop {
        match CHILDREN.try_lock() {
            Ok(mut children) => return Some(f(&mut children)),
            Err(std::sync::TryLockError::Poisoned(e)) => return Some(f(&mut e.into_inner())),
            Err(std::sync::TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::yield_now();
            }
            Err(std::sync::TryLockError::WouldBlock) => return None,
        }
    }
}

/// Frees what children that have exec'd or exited left (their report pipe
/// reads end of file); keeps the rest.
fn sweep(children: &mut Children) {
    let pending = &mut children.pending;
    if pending.is_empty() {
        return;
    }
    let mut polls: Vec<libc::pollfd> = pending
        .iter()
        .map(|p| libc::pollfd {
            fd: p.report.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: `polls` is a valid array of its length.
    if unsafe { libc::poll(polls.as_mut_ptr(), polls.len() as libc::nfds_t, 0) } <= 0 {
        return;
    }
    let mut done = vec![false; pending.len()];
    for (i, poll) in polls.iter().enumerate() {
        if poll.revents == 0 {
            continue;
        }
        let mut buf = [0u8; 16];
        // SAFETY: reading into a local buffer from our pipe end.
        let n = unsafe { libc::read(poll.fd, buf.as_mut_ptr().cast(), buf.len()) };
        // End of file: the child's end closed at exec or exit. (An errno it
        // wrote comes first; its end closes when it has exited.)
        done[i] = n == 0;
    }
    let mut kept = Vec::with_capacity(pending.len());
    for (child, done) in pending.drain(..).zip(done) {
        if !done {
            kept.push(child);
        } else if children.spare.len() < SPARE_STACKS {
            children.spare.push(child.stack);
        }
    }
    *pending = kept;
}

/// Starts the shell; `None` when this system cannot (the caller spawns).
pub(super) fn start(
    command: &str,
    cwd: &Path,
    env: &[(String, String)],
    out: &File,
    err: &File,
) -> Result<Option<u32>, SpawnError> {
    // The usual failure is checked here, where it can still be raised.
    match std::fs::metadata(cwd) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => {
            return Err(SpawnError::Start(io::Error::from_raw_os_error(
                libc::ENOTDIR,
            )))
        }
        Err(e) => return Err(SpawnError::Start(e)),
    }
    let command = c_string(command.as_bytes())?;
    let variables = c_environment(env)?;
    let stdio = ChildStdio::new(out, err)?;

    let mut ends = [0 as c_int; 2];
    // SAFETY: a two-int array for the pipe's ends.
    if unsafe { libc::pipe2(ends.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(SpawnError::Start(io::Error::last_os_error()));
    }
    // SAFETY: both ends are ours from here on.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(ends[0]), OwnedFd::from_raw_fd(ends[1])) };

    let program = CString::from(c"/bin/sh");
    let mut plan = Box::new(Plan {
        argv: Vec::new(),
        envp: variables
            .iter()
            .map(|v| v.as_ptr())
            .chain([std::ptr::null()])
            .collect(),
        program,
        cwd: c_string(cwd.as_os_str().as_bytes())?,
        _variables: variables,
        command,
        fds: stdio.fds,
        report: write_end.as_raw_fd(),
        mask: 0,
    });
    plan.argv = vec![
        plan.program.as_ptr(),
        c"-c".as_ptr(),
        plan.command.as_ptr(),
        std::ptr::null(),
    ];

    let reused = with_children(|children| {
        sweep(children);
        children.spare.pop()
    });
    let stack = match reused.flatten() {
        Some(stack) => stack,
        None => Stack::new().map_err(SpawnError::Start)?,
    };

    // SAFETY: the signal sets are initialised before use. The child gets
    // the plan's heap address, which stays put while the Box moves into
    // `Pending`, and which nothing else reads or writes until it is freed.
    let pid = unsafe {
        let mut all = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        libc::sigfillset(all.as_mut_ptr());
        let mut old = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        libc::pthread_sigmask(libc::SIG_SETMASK, all.as_ptr(), old.as_mut_ptr());
        // The first 64 signals' bits, as rt_sigprocmask takes them.
        plan.mask = *(old.as_ptr() as *const u64);
        let plan_ptr: *mut Plan = &mut *plan;
        let pid = libc::clone(
            child,
            stack.top(),
            libc::CLONE_VM | libc::SIGCHLD,
            plan_ptr.cast(),
        );
        let error = io::Error::last_os_error();
        libc::pthread_sigmask(libc::SIG_SETMASK, old.as_ptr(), std::ptr::null_mut());
        if pid == -1 {
            Err(error)
        } else {
            Ok(pid)
        }
    };
    let pending = Pending {
        report: read_end,
        _plan: plan,
        stack,
    };
    // The child has its own copies now.
    drop(write_end);
    drop(stdio);
    let pid = match pid {
        Ok(pid) => pid,
        Err(e) => {
            // No child: nothing uses the plan or the stack.
            drop(pending);
            // A sandbox that forbids this clone: the caller spawns instead.
            if matches!(e.raw_os_error(), Some(libc::EPERM | libc::ENOSYS)) {
                return Ok(None);
            }
            return Err(SpawnError::Start(e));
        }
    };
    register(pending);
    Ok(Some(pid as u32))
}

/// Keeps `pending` until its child is off our memory.
fn register(pending: Pending) {
    let mut child = Some(pending);
    if with_children(|children| children.pending.extend(child.take())).is_none() {
        std::mem::forget(child);
    }
}

/// How many started children may still be on our memory (for tests).
pub fn pending() -> usize {
    let mut children = CHILDREN.lock().unwrap_or_else(|e| e.into_inner());
    sweep(&mut children);
    children.pending.len()
}
