//! One lock file per content key, so that concurrent stagings of the same
//! content (tasks of one agent, or agents sharing the cache dir) make one copy.

use std::fs::{File, OpenOptions};
use std::path::PathBuf;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use super::StageError;

/// Held while an item is staged; the kernel releases it when the file closes,
/// also when the agent dies.
pub(super) struct ContentLock {
    _flock: Flock<File>,
}

pub(super) async fn acquire(item: &str, path: PathBuf) -> Result<ContentLock, StageError> {
    let item = item.to_owned();
    tokio::task::spawn_blocking(move || {
        let io_error = |action, error| StageError::Io { item: item.clone(), action, path: path.clone(), error };
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| io_error("create the lock file", e))?;
        let mut file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(flock) => return Ok(ContentLock { _flock: flock }),
            Err((file, Errno::EWOULDBLOCK)) => {
                tracing::info!(%item, lock = %path.display(), "another staging of the same content is running; waiting for it");
                file
            }
            Err((_, errno)) => return Err(io_error("lock", errno.into())),
        };
        loop {
            match Flock::lock(file, FlockArg::LockExclusive) {
                Ok(flock) => return Ok(ContentLock { _flock: flock }),
                Err((again, Errno::EINTR)) => file = again,
                Err((_, errno)) => return Err(io_error("lock", errno.into())),
            }
        }
    })
    .await
    .map_err(|e| StageError::Task(e.to_string()))?
}
