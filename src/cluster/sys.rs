//! Operating-system parts: starting a worker from a long-lived thread, process groups, the parent-death
//! signal, and signals to workers and from the operator.
//!
//! # Why workers are forked from a dedicated thread
//!
//! On Linux each worker asks for `PR_SET_PDEATHSIG = SIGTERM`, so that it is told to stop when the
//! supervisor dies, even by SIGKILL. But the kernel sends that signal when the *thread* that forked the
//! child exits, not the process. Tokio forks from whichever runtime thread polls the task, and runtime
//! threads come and go (blocking-pool threads exit when idle, a runtime can be dropped while the process
//! lives on). So every worker is forked from one spawner thread that is started once and never exits:
//! the signal then fires exactly when the process dies. In the child, after `prctl`, `getppid()` is
//! compared with the supervisor's pid: if the supervisor died between `fork` and `prctl`, the child exits
//! at once instead of living on as an orphan.

use std::io;
use std::sync::mpsc as std_mpsc;
use std::sync::{Mutex, OnceLock};

use tokio::process::{Child, Command};
use tokio::sync::oneshot;

use super::ClusterHandle;

struct SpawnRequest {
    command: Command,
    runtime: tokio::runtime::Handle,
    reply: oneshot::Sender<io::Result<Child>>,
}

/// The spawner thread's queue. The thread lives as long as the process (the sender is never dropped).
fn spawner() -> io::Result<std_mpsc::Sender<SpawnRequest>> {
    static SPAWNER: OnceLock<Mutex<std_mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    if let Some(tx) = SPAWNER.get() {
        return Ok(lock(tx).clone());
    }
    let (tx, rx) = std_mpsc::channel::<SpawnRequest>();
    std::thread::Builder::new()
        .name("ulb-cluster-spawner".into())
        .spawn(move || {
            for mut req in rx {
                // Child processes register with the runtime that will wait for them.
                let _guard = req.runtime.enter();
                let _ = req.reply.send(req.command.spawn());
            }
        })?;
    // If two callers raced, the loser's thread ends as soon as its sender (dropped here) is gone.
    let kept = SPAWNER.get_or_init(|| Mutex::new(tx));
    Ok(lock(kept).clone())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Starts `command` from the spawner thread, in its own process group, with the parent-death signal on
/// Linux. Must be called inside a Tokio runtime.
pub(super) async fn spawn(mut command: Command) -> io::Result<Child> {
    prepare(&mut command);
    let (reply, rx) = oneshot::channel();
    let req = SpawnRequest {
        command,
        runtime: tokio::runtime::Handle::current(),
        reply,
    };
    spawner()?
        .send(req)
        .map_err(|_| io::Error::other("the spawner thread is gone"))?;
    rx.await
        .map_err(|_| io::Error::other("the spawner thread is gone"))?
}

#[cfg(unix)]
fn prepare(command: &mut Command) {
    // Its own process group: a Ctrl-C on the terminal reaches only the supervisor, which then stops the
    // workers in order (drain first), and a stop signal reaches whatever the worker started itself.
    command.process_group(0);
    #[cfg(target_os = "linux")]
    {
        let supervisor = std::process::id();
        // SAFETY: the closure runs in the child between fork and exec, where only async-signal-safe calls
        // are allowed. It calls prctl(2), getppid(2) and _exit(2), which are, and builds an io::Error
        // from errno, which does not allocate. It touches no lock and no memory shared with the parent
        // (`supervisor` is a copied integer).
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGTERM as libc::c_ulong,
                    0,
                    0,
                    0,
                ) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                // The supervisor died before prctl took effect: nobody would ever stop this worker.
                if libc::getppid() as u32 != supervisor {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
    }
}

#[cfg(not(unix))]
fn prepare(_command: &mut Command) {}

/// Sends `signal` to the worker's process group (to the process alone if that fails).
#[cfg(unix)]
pub(super) fn signal_group(pid: u32, signal: i32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) takes plain integers; no memory is involved. `pid` is a child we have not reaped yet
    // (or the group it led), so it cannot name an unrelated process.
    unsafe {
        if libc::kill(-pid, signal) != 0 {
            libc::kill(pid, signal);
        }
    }
}

/// SIGTERM.
#[cfg(unix)]
pub(super) const TERM: i32 = libc::SIGTERM;
/// SIGKILL.
#[cfg(unix)]
pub(super) const KILL: i32 = libc::SIGKILL;

/// Resolves on the first SIGINT or SIGTERM; a second one forces the shutdown.
pub(super) async fn stop_signal(handle: ClusterHandle) {
    crate::signal::stop_then_force(
        "shutdown signal received; draining, then stopping the workers (send it again to kill them at once)",
        "second signal; killing the workers at once",
        move || handle.force_shutdown(),
    )
    .await;
}

/// Runs a rolling restart on each SIGHUP (signals arriving during one are folded into the next).
#[cfg(unix)]
pub(super) async fn rolling_restart_on_sighup(handle: ClusterHandle) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot install the SIGHUP handler; no rolling restarts on SIGHUP");
            return;
        }
    };
    while hup.recv().await.is_some() {
        tracing::info!("SIGHUP received; rolling restart");
        if let Err(e) = handle.rolling_restart().await {
            tracing::error!(error = %e, "rolling restart failed");
        }
    }
}
