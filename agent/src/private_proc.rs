//! A rank's own view of /proc (issue 14, finding 9): `exec-as`, still root,
//! gives the rank a mount namespace of its own with a fresh procfs mounted
//! `hidepid=2` on /proc, so the rank lists and reads only processes of its
//! own user: ranks of a job (one user) still see each other, as NCCL and
//! torchrun expect, and jobs of other users are invisible. No PID namespace:
//! pids, signals from the agent and py-spy work as before.

use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, unshare};

#[derive(Debug, thiserror::Error)]
pub enum PrivateProcError {
    #[error("cannot make a mount namespace for the rank (unshare): {0}; it sees every process on the node")]
    Unshare(nix::errno::Errno),
    #[error("cannot make the rank's mounts private: {0}; it sees every process on the node")]
    Private(nix::errno::Errno),
    #[error("cannot mount /proc with hidepid=2 for the rank: {0}; it sees every process on the node")]
    Proc(nix::errno::Errno),
}

/// Moves the calling process (`exec-as`, root, about to become the rank)
/// into a mount namespace of its own whose /proc hides other users'
/// processes. Mounts made on the host later still reach it (a slave mount).
pub fn enter() -> Result<(), PrivateProcError> {
    unshare(CloneFlags::CLONE_NEWNS).map_err(PrivateProcError::Unshare)?;
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_SLAVE, None::<&str>)
        .map_err(PrivateProcError::Private)?;
    mount(
        Some("proc"),
        "/proc",
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("hidepid=2"),
    )
    .map_err(PrivateProcError::Proc)
}
