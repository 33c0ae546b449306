//! Keeps a node's staging caches under `--cache-max`: after each staging, the
//! job user's cache is collected (least recently used content first, see
//! [`crate::stage::gc`]) as that user, through the `files-as` helper.
//!
//! What a job staged is pinned from its staging until its processes end (or it
//! is stopped), and never collected meanwhile. A job whose attempt was
//! prepared but never launched on this node (another node refused it) keeps
//! its pin for [`UNLAUNCHED_PIN`]. Stagings and collections on this agent
//! exclude each other (a read/write lock): a staging that found content cached
//! has pinned it before a collection can look.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::{RwLock, RwLockReadGuard};

use crate::job_files::AsJobUser;
use crate::supervisor::Supervisor;

/// How long the content of an attempt prepared here but not launched stays pinned.
pub const UNLAUNCHED_PIN: Duration = Duration::from_secs(3600);

struct Pin {
    cache: PathBuf,
    digests: Vec<String>,
    since: Instant,
    /// Its processes were seen running.
    launched: bool,
}

pub struct CacheKeeper {
    /// The limit per user cache; None: never collected.
    max_bytes: Option<u64>,
    pins: Mutex<HashMap<(String, u32), Pin>>,
    gate: RwLock<()>,
    supervisor: Option<Supervisor>,
    /// Launches the last agent left running: what they staged is not known.
    recovered: HashSet<(String, u32)>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl CacheKeeper {
    /// `recovered`: the launches the supervisor adopted from the last agent.
    pub fn new(max_bytes: Option<u64>, supervisor: Option<Supervisor>, recovered: HashSet<(String, u32)>) -> Self {
        Self { max_bytes, pins: Mutex::default(), gate: RwLock::new(()), supervisor, recovered }
    }

    /// Held by a staging until what it staged is pinned.
    pub async fn staging(&self) -> RwLockReadGuard<'_, ()> {
        self.gate.read().await
    }

    pub fn pin(&self, job_id: &str, attempt: u32, cache: PathBuf, digests: Vec<String>) {
        let pin = Pin { cache, digests, since: Instant::now(), launched: false };
        lock(&self.pins).insert((job_id.to_owned(), attempt), pin);
    }

    /// The job is being stopped: its attempts up to `attempt` pin nothing.
    pub fn unpin(&self, job_id: &str, attempt: u32) {
        lock(&self.pins).retain(|(job, a), _| !(job == job_id && *a <= attempt));
    }

    /// The digests pinned in `cache` now, after dropping the pins of attempts
    /// that ended (or were never launched within [`UNLAUNCHED_PIN`]). None
    /// while a launch runs whose inputs are not known: one recovered from the
    /// last agent, whose pins were in that agent's memory.
    async fn pinned(&self, cache: &Path) -> Option<HashSet<String>> {
        let launches = match &self.supervisor {
            Some(supervisor) => supervisor.launches_ended().await,
            None => HashMap::new(),
        };
        let mut pins = lock(&self.pins);
        pins.retain(|key, pin| match launches.get(key) {
            Some(false) => {
                pin.launched = true;
                true
            }
            Some(true) => false,
            None => !pin.launched && pin.since.elapsed() < UNLAUNCHED_PIN,
        });
        if launches.iter().any(|(key, ended)| !ended && self.recovered.contains(key)) {
            return None;
        }
        Some(pins.values().filter(|p| p.cache == cache).flat_map(|p| p.digests.iter().cloned()).collect())
    }

    /// Collects the cache at `cache` (the user's of `user`) down to the limit.
    pub async fn collect(&self, user: AsJobUser<'_>, cache: &Path) {
        let Some(max_bytes) = self.max_bytes else { return };
        let _exclusive = self.gate.write().await;
        let Some(pinned) = self.pinned(cache).await else {
            tracing::info!(
                cache = %cache.display(),
                "not collecting the staging cache: a launch the last agent left runs, and its inputs are not known"
            );
            return;
        };
        let started = Instant::now();
        match user.collect_cache(cache, max_bytes, pinned.into_iter().collect()).await {
            Ok(report) if report.removed.is_empty() && report.pinned.is_empty() && report.busy.is_empty() => {}
            Ok(report) => tracing::info!(
                cache = %cache.display(),
                removed = report.removed.len(),
                bytes_before = report.bytes_before,
                bytes_after = report.bytes_after,
                max_bytes,
                kept_pinned = report.pinned.len(),
                kept_busy = report.busy.len(),
                ms = started.elapsed().as_millis() as u64,
                "staging cache collected"
            ),
            Err(error) => tracing::warn!(cache = %cache.display(), %error, "cannot collect the staging cache"),
        }
    }
}
