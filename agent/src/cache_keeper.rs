//! Keeps a node's staging caches under `--cache-max`, one limit over all of
//! them: the agent's own cache and each user's (`users/<uid>/`, see
//! [`crate::job_files::user_cache`]). After each staging every cache is
//! listed, as its user, through the `files-as` helper; the least recently
//! used content of all of them together goes first ([`crate::stage::gc::choose`]),
//! removed by its own user's helper.
//!
//! What a job staged is pinned from its staging until its processes end (or it
//! is stopped), and never collected meanwhile. A job whose attempt was
//! prepared but never launched on this node (another node refused it) keeps
//! its pin for [`UNLAUNCHED_PIN`]. The pins are kept in `<cache>/pins.json`
//! too, so that an agent started while the last one's launches still run
//! (an upgrade, a crash) knows what they use. Stagings and collections on
//! this agent exclude each other (a read/write lock): a staging that found
//! content cached has pinned it before a collection can look.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::{RwLock, RwLockReadGuard};

use crate::job_files::AsJobUser;
use crate::rank_user::{RankIdentity, RankUserPolicy};
use crate::stage::gc::{self, CacheEntry};
use crate::supervisor::Supervisor;

/// How long the content of an attempt prepared here but not launched stays pinned.
pub const UNLAUNCHED_PIN: Duration = Duration::from_secs(3600);

/// The file that keeps the pins across agent restarts, in the cache root.
const PINS_FILE: &str = "pins.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Pin {
    job_id: String,
    attempt: u32,
    cache: PathBuf,
    digests: Vec<String>,
    /// When it was pinned, ms since the epoch.
    since_unix_ms: u64,
    /// Its processes were seen running.
    launched: bool,
}

/// `at` as ms since the epoch (0 before it).
pub fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl Pin {
    fn age(&self) -> Duration {
        Duration::from_millis(unix_ms(SystemTime::now()).saturating_sub(self.since_unix_ms))
    }
}

/// One cache of the node and the user it belongs to.
#[derive(Debug, Clone)]
pub struct NodeCache {
    pub dir: PathBuf,
    pub identity: RankIdentity,
}

/// One content of one of the node's caches, as `cohort cache staged` shows it.
#[derive(Debug, Clone)]
pub struct ListedContent {
    pub user: String,
    pub uid: u32,
    pub entry: CacheEntry,
    /// `job/attempt` of every pin that holds it.
    pub pinned_by: Vec<String>,
}

/// Every cache of the node, listed.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    /// Least recently used first.
    pub entries: Vec<ListedContent>,
    /// A launch the last agent left runs whose inputs are not known: nothing is collected.
    pub unknown_pins: bool,
    /// Caches that could not be listed, one line each.
    pub errors: Vec<String>,
}

pub struct CacheKeeper {
    /// The limit over every cache of the node; None: never collected.
    max_bytes: Option<u64>,
    /// `--cache-dir`: the agent's own cache, and `users/` in it.
    root: PathBuf,
    /// The `files-as` helper (`/proc/self/exe` in the daemon).
    helper: PathBuf,
    pins: Mutex<HashMap<(String, u32), Pin>>,
    gate: RwLock<()>,
    supervisor: Option<Supervisor>,
    /// Launches the last agent left running whose pins were not found: what
    /// they staged is not known.
    unknown: HashSet<(String, u32)>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl CacheKeeper {
    /// `recovered`: the launches the supervisor adopted from the last agent;
    /// their pins are read back from the cache root's pins file.
    pub fn new(
        max_bytes: Option<u64>,
        root: PathBuf,
        helper: PathBuf,
        supervisor: Option<Supervisor>,
        recovered: HashSet<(String, u32)>,
    ) -> Self {
        let saved = load_pins(&root);
        let mut pins = HashMap::new();
        for pin in saved {
            let key = (pin.job_id.clone(), pin.attempt);
            // Running now, or prepared and maybe about to launch; a launch that ended went with the last agent.
            if recovered.contains(&key) || (!pin.launched && pin.age() < UNLAUNCHED_PIN) {
                pins.insert(key, pin);
            }
        }
        let unknown: HashSet<_> = recovered.into_iter().filter(|key| !pins.contains_key(key)).collect();
        if !pins.is_empty() || !unknown.is_empty() {
            tracing::info!(
                pins = pins.len(),
                unknown = unknown.len(),
                "staging cache pins read back for the launches the last agent left"
            );
        }
        let keeper =
            Self { max_bytes, root, helper, pins: Mutex::new(pins), gate: RwLock::new(()), supervisor, unknown };
        keeper.save(&lock(&keeper.pins));
        keeper
    }

    /// Held by a staging until what it staged is pinned.
    pub async fn staging(&self) -> RwLockReadGuard<'_, ()> {
        self.gate.read().await
    }

    pub fn max_bytes(&self) -> Option<u64> {
        self.max_bytes
    }

    pub fn pin(&self, job_id: &str, attempt: u32, cache: PathBuf, digests: Vec<String>) {
        let pin = Pin {
            job_id: job_id.to_owned(),
            attempt,
            cache,
            digests,
            since_unix_ms: unix_ms(SystemTime::now()),
            launched: false,
        };
        let mut pins = lock(&self.pins);
        pins.insert((job_id.to_owned(), attempt), pin);
        self.save(&pins);
    }

    /// The job is being stopped: its attempts up to `attempt` pin nothing.
    pub fn unpin(&self, job_id: &str, attempt: u32) {
        let mut pins = lock(&self.pins);
        let before = pins.len();
        pins.retain(|(job, a), _| !(job == job_id && *a <= attempt));
        if pins.len() != before {
            self.save(&pins);
        }
    }

    /// Writes the pins for the next agent (best effort: without the file, a
    /// next agent collects nothing while this one's launches run).
    fn save(&self, pins: &HashMap<(String, u32), Pin>) {
        let mut list: Vec<&Pin> = pins.values().collect();
        list.sort_by(|a, b| (&a.job_id, a.attempt).cmp(&(&b.job_id, b.attempt)));
        let path = self.root.join(PINS_FILE);
        let tmp = self.root.join(format!("{PINS_FILE}.tmp"));
        let written = serde_json::to_vec(&list).map_err(std::io::Error::other).and_then(|text| {
            std::fs::create_dir_all(&self.root)?;
            std::fs::write(&tmp, text)?;
            std::fs::rename(&tmp, &path)
        });
        if let Err(error) = written {
            tracing::warn!(path = %path.display(), %error, "cannot save the staging cache's pins");
        }
    }

    /// The pins in force now, by cache and digest, after dropping those of
    /// attempts that ended (or were never launched within
    /// [`UNLAUNCHED_PIN`]). None while a launch runs whose inputs are not
    /// known: one recovered from the last agent without its pins.
    async fn pinned(&self) -> Option<HashMap<(PathBuf, String), Vec<String>>> {
        let launches = match &self.supervisor {
            Some(supervisor) => supervisor.launches_ended().await,
            None => HashMap::new(),
        };
        let mut pins = lock(&self.pins);
        let before = pins.clone();
        pins.retain(|key, pin| match launches.get(key) {
            Some(false) => {
                pin.launched = true;
                true
            }
            Some(true) => false,
            None => !pin.launched && pin.age() < UNLAUNCHED_PIN,
        });
        if *pins != before {
            self.save(&pins);
        }
        if launches.iter().any(|(key, ended)| !ended && self.unknown.contains(key)) {
            return None;
        }
        let mut pinned: HashMap<(PathBuf, String), Vec<String>> = HashMap::new();
        for pin in pins.values() {
            for digest in &pin.digests {
                let by = format!("{}/{}", pin.job_id, pin.attempt);
                pinned.entry((pin.cache.clone(), digest.clone())).or_default().push(by);
            }
        }
        Some(pinned)
    }

    /// Every cache of the node: the agent's own (`--cache-dir`) and each
    /// user's `users/<uid>/` that belongs to that uid.
    fn caches(&self) -> Vec<NodeCache> {
        let mut caches = Vec::new();
        if let Ok(identity) = RankUserPolicy::agent_user().check() {
            caches.push(NodeCache { dir: self.root.clone(), identity });
        }
        let Ok(users) = std::fs::read_dir(self.root.join("users")) else { return caches };
        let mut found: BTreeMap<u32, NodeCache> = BTreeMap::new();
        for entry in users.flatten() {
            let Some(uid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            let Ok(meta) = std::fs::symlink_metadata(entry.path()) else { continue };
            // `user_cache` made it so; anything else is not a user's cache.
            if !meta.is_dir() || meta.uid() != uid {
                continue;
            }
            let name = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
                .ok()
                .flatten()
                .map_or_else(|| uid.to_string(), |u| u.name);
            let identity = RankIdentity { name, uid, gid: meta.gid(), groups: vec![meta.gid()], home: "/".into() };
            found.insert(uid, NodeCache { dir: entry.path(), identity });
        }
        caches.extend(found.into_values());
        caches
    }

    /// Lists every cache as its user; a cache that cannot be listed is left out, with its error.
    async fn list_all(&self, caches: &[NodeCache]) -> (Vec<Vec<CacheEntry>>, Vec<String>) {
        let mut lists = Vec::new();
        let mut errors = Vec::new();
        for cache in caches {
            let user = AsJobUser { identity: &cache.identity, helper: &self.helper };
            match user.list_cache(&cache.dir).await {
                Ok(entries) => lists.push(entries),
                Err(error) => {
                    errors.push(format!("{} (user {}): {error}", cache.dir.display(), cache.identity.name));
                    lists.push(Vec::new());
                }
            }
        }
        (lists, errors)
    }

    /// Collects the node's caches down to the limit, together.
    pub async fn collect(&self) {
        let Some(max_bytes) = self.max_bytes else { return };
        let _exclusive = self.gate.write().await;
        let Some(pinned) = self.pinned().await else {
            tracing::info!(
                "not collecting the staging caches: a launch the last agent left runs, and its inputs are not known"
            );
            return;
        };
        let started = Instant::now();
        let caches = self.caches();
        let (lists, errors) = self.list_all(&caches).await;
        for error in &errors {
            tracing::warn!(%error, "cannot list a staging cache");
        }
        let choice = gc::choose(&lists, max_bytes, |i, hex| pinned.contains_key(&(caches[i].dir.clone(), hex.into())));
        if choice.evict.is_empty() {
            if !choice.pinned.is_empty() {
                tracing::info!(
                    bytes = choice.bytes_before,
                    max_bytes,
                    kept_pinned = choice.pinned.len(),
                    "the staging caches are over their limit with content running jobs use"
                );
            }
            return;
        }
        let mut by_cache: BTreeMap<usize, Vec<String>> = BTreeMap::new();
        for (i, entry) in &choice.evict {
            by_cache.entry(*i).or_default().push(entry.sha256.clone());
        }
        let (mut removed, mut busy) = (0, 0);
        for (i, digests) in by_cache {
            let cache = &caches[i];
            let user = AsJobUser { identity: &cache.identity, helper: &self.helper };
            match user.evict_cache(&cache.dir, digests).await {
                Ok(report) => {
                    removed += report.removed.len();
                    busy += report.busy.len();
                }
                Err(error) => tracing::warn!(cache = %cache.dir.display(), %error, "cannot collect a staging cache"),
            }
        }
        tracing::info!(
            removed,
            bytes_before = choice.bytes_before,
            bytes_after = choice.bytes_after,
            max_bytes,
            kept_pinned = choice.pinned.len(),
            kept_busy = busy,
            caches = caches.len(),
            ms = started.elapsed().as_millis() as u64,
            "staging caches collected"
        );
    }

    /// Every content of every cache of the node, least recently used first.
    pub async fn list(&self) -> Listing {
        let _shared = self.gate.read().await;
        self.list_locked().await.1
    }

    /// The node's caches and what they hold (the caller holds the gate).
    async fn list_locked(&self) -> (Vec<NodeCache>, Listing) {
        let pinned = self.pinned().await;
        let caches = self.caches();
        let (lists, errors) = self.list_all(&caches).await;
        let mut entries: Vec<ListedContent> = Vec::new();
        for (cache, list) in caches.iter().zip(lists) {
            for entry in list {
                let key = (cache.dir.clone(), entry.sha256.clone());
                let pinned_by = pinned.as_ref().and_then(|p| p.get(&key)).cloned().unwrap_or_default();
                entries.push(ListedContent {
                    user: cache.identity.name.clone(),
                    uid: cache.identity.uid,
                    entry,
                    pinned_by,
                });
            }
        }
        entries.sort_by(|a, b| {
            (a.entry.last_use, a.uid, &a.entry.sha256).cmp(&(b.entry.last_use, b.uid, &b.entry.sha256))
        });
        (caches, Listing { entries, unknown_pins: pinned.is_none(), errors })
    }

    /// Removes `digests` from every cache of the node that holds them (an
    /// operator's `cohort cache evict`). Pinned content is refused, as is
    /// everything while a launch with unknown inputs runs. Returns what was
    /// removed, for each refused digest why, and the caches' content after.
    pub async fn evict(&self, digests: &[String]) -> (Vec<String>, Vec<String>, Listing) {
        let _exclusive = self.gate.write().await;
        let (caches, mut listing) = self.list_locked().await;
        let (mut removed, mut refused) = (Vec::new(), Vec::new());
        let mut wanted: BTreeMap<u32, Vec<String>> = BTreeMap::new();
        for digest in digests {
            let holders: Vec<&ListedContent> = listing.entries.iter().filter(|c| &c.entry.sha256 == digest).collect();
            if holders.is_empty() {
                refused.push(format!("{digest}: not in any staging cache of this node"));
            } else if listing.unknown_pins {
                refused.push(format!(
                    "{digest}: a launch the last agent left runs and what it uses is not known; evict once it ends"
                ));
            } else if let Some(pinned) = holders.iter().find(|c| !c.pinned_by.is_empty()) {
                refused.push(format!(
                    "{digest}: in use by job {} (user {}); evict once it ends",
                    pinned.pinned_by.join(", "),
                    pinned.user
                ));
            } else {
                for holder in holders {
                    wanted.entry(holder.uid).or_default().push(digest.clone());
                }
            }
        }
        for (uid, digests) in wanted {
            let Some(cache) = caches.iter().find(|c| c.identity.uid == uid) else { continue };
            let user = AsJobUser { identity: &cache.identity, helper: &self.helper };
            match user.evict_cache(&cache.dir, digests.clone()).await {
                Ok(report) => {
                    listing.entries.retain(|c| c.uid != uid || !report.removed.contains(&c.entry.sha256));
                    removed.extend(report.removed);
                    refused.extend(report.busy.into_iter().map(|d| format!("{d}: being staged right now")));
                }
                Err(error) => refused.extend(digests.into_iter().map(|d| format!("{d}: {error}"))),
            }
        }
        removed.sort();
        removed.dedup();
        (removed, refused, listing)
    }
}

/// The pins a previous agent saved; none when there is no file or it cannot be read.
fn load_pins(root: &Path) -> Vec<Pin> {
    let path = root.join(PINS_FILE);
    let text = match std::fs::read(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(error) => {
            tracing::warn!(path = %path.display(), %error, "cannot read the staging cache's pins");
            return Vec::new();
        }
    };
    serde_json::from_slice(&text).unwrap_or_else(|error| {
        tracing::warn!(path = %path.display(), %error, "the staging cache's pins file is not valid; ignored");
        Vec::new()
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn pins_outlive_the_agent_for_the_launches_it_left_running() {
        let root = tempfile::tempdir().unwrap();
        let keeper = CacheKeeper::new(Some(1), root.path().into(), "/nonexistent".into(), None, HashSet::new());
        keeper.pin("running", 1, root.path().into(), vec!["aa".repeat(32)]);
        keeper.pin("ended", 2, root.path().into(), vec!["bb".repeat(32)]);
        keeper.pin("prepared", 1, root.path().into(), vec!["cc".repeat(32)]);
        {
            let mut pins = lock(&keeper.pins);
            for key in [("running".to_owned(), 1), ("ended".to_owned(), 2)] {
                pins.get_mut(&key).unwrap().launched = true;
            }
            keeper.save(&pins);
        }
        drop(keeper);

        // The next agent adopted "running" and a launch whose pins it never saw.
        let recovered = HashSet::from([("running".to_owned(), 1), ("older".to_owned(), 1)]);
        let next = CacheKeeper::new(Some(1), root.path().into(), "/nonexistent".into(), None, recovered);
        let kept: HashSet<String> = lock(&next.pins).keys().map(|(job, _)| job.clone()).collect();
        assert_eq!(kept, HashSet::from(["running".to_owned(), "prepared".to_owned()]));
        assert_eq!(next.unknown, HashSet::from([("older".to_owned(), 1)]));
        // And wrote what it kept for the one after it.
        let saved: Vec<String> = load_pins(root.path()).into_iter().map(|p| p.job_id).collect();
        assert_eq!(saved, ["prepared", "running"]);
    }

    #[test]
    fn a_bad_pins_file_is_ignored() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join(PINS_FILE), b"{not json").unwrap();
        let keeper = CacheKeeper::new(None, root.path().into(), "/nonexistent".into(), None, HashSet::new());
        assert!(lock(&keeper.pins).is_empty());
    }
}
