//! Per-job cgroups on a node (issue 14, finding 9): every process of a job's
//! attempt on this node runs in one cgroup the agent creates (as root) before
//! the first shim starts, with the node's per-job limits (`job-memory-max`,
//! `job-pids-max`, `job-cpus`), and removes once the last process ended. Each
//! shim joins it before it starts its rank, so the rank and everything it
//! forks are inside from their first instruction.
//!
//! Both hierarchies are handled: cgroup v2 (the unified hierarchy of Ubuntu
//! 24.04: `<root>/cgroup.controllers` exists), where job cgroups live under
//! `<root>/cohort/<agent>/` (v2 allows no processes in a cgroup that hands
//! controllers down, so not below the agent's own), and cgroup v1 (one
//! hierarchy per controller: `<root>/memory`, `<root>/pids`, `<root>/cpu`),
//! where they live below the agent's own cgroup of each, inside whatever
//! limits the agent itself has. Neither writable: a warning, no cgroups.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// The node's limits for each job (each attempt) on it; None: no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct JobLimits {
    pub memory_max_bytes: Option<u64>,
    pub pids_max: Option<u64>,
    /// CPU time as a number of cores (1.5: 150 ms per 100 ms period).
    pub cpus: Option<f64>,
}

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("neither cgroup v2 ({root}/cgroup.controllers) nor cgroup v1 ({root}/memory, {root}/pids) is mounted")]
    NotMounted { root: String },
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io { path: path.display().to_string(), source }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Version {
    V1,
    V2,
}

/// Where this agent's job cgroups go, and what they get.
#[derive(Debug, Clone)]
pub struct JobCgroups {
    version: Version,
    /// v2: one directory; v1: one per controller hierarchy (memory, pids, cpu).
    parents: Vec<PathBuf>,
    limits: JobLimits,
}

/// One job attempt's cgroup: the directories its processes join (one per
/// hierarchy on v1).
#[derive(Debug, Clone, PartialEq)]
pub struct JobCgroup {
    pub dirs: Vec<PathBuf>,
}

impl JobCgroups {
    /// Finds the hierarchy under `root` (normally /sys/fs/cgroup) and makes
    /// this agent's parent cgroup (`agent`: a name unique to this agent on
    /// the host); an error says why the node runs without per-job cgroups.
    pub fn set_up(root: &Path, agent: &str, limits: JobLimits) -> Result<JobCgroups, CgroupError> {
        if root.join("cgroup.controllers").exists() {
            return Self::set_up_v2(root, agent, limits);
        }
        if root.join("memory").is_dir() && root.join("pids").is_dir() {
            return Self::set_up_v1(root, agent, limits);
        }
        Err(CgroupError::NotMounted { root: root.display().to_string() })
    }

    fn set_up_v2(root: &Path, agent: &str, limits: JobLimits) -> Result<JobCgroups, CgroupError> {
        let parent = root.join("cohort").join(agent);
        std::fs::create_dir_all(&parent).map_err(io(&parent))?;
        // Each level hands down what the job cgroups need and the level above offers.
        let mut dir = root.to_path_buf();
        for part in [Path::new("cohort"), Path::new(agent)] {
            enable_controllers(&dir)?;
            dir = dir.join(part);
        }
        enable_controllers(&parent)?;
        Ok(JobCgroups { version: Version::V2, parents: vec![parent], limits })
    }

    fn set_up_v1(root: &Path, agent: &str, limits: JobLimits) -> Result<JobCgroups, CgroupError> {
        let mut parents = Vec::new();
        for controller in ["memory", "pids", "cpu"] {
            let hierarchy = root.join(controller);
            if !hierarchy.is_dir() {
                continue;
            }
            let own = own_cgroup(controller).unwrap_or_default();
            let parent = hierarchy.join(own.trim_start_matches('/')).join("cohort").join(agent);
            std::fs::create_dir_all(&parent).map_err(io(&parent))?;
            parents.push(parent);
        }
        Ok(JobCgroups { version: Version::V1, parents, limits })
    }

    /// `cgroup v2 at ...` or `cgroup v1 at ...`, for the agent's log.
    pub fn describe(&self) -> String {
        let version = if self.version == Version::V2 { "v2" } else { "v1" };
        let parents: Vec<String> = self.parents.iter().map(|p| p.display().to_string()).collect();
        format!("cgroup {version} under {}", parents.join(", "))
    }

    /// The cgroup of a job's attempt, created with the node's limits (an
    /// existing one, from an agent before a restart, is reused).
    pub fn create(&self, job_id: &str, attempt: u32) -> Result<JobCgroup, CgroupError> {
        let cgroup = self.cgroup(job_id, attempt);
        for dir in &cgroup.dirs {
            std::fs::create_dir_all(dir).map_err(io(dir))?;
            for (file, value) in self.limit_files() {
                let path = dir.join(file);
                if path.exists() {
                    std::fs::write(&path, value).map_err(io(&path))?;
                }
            }
        }
        Ok(cgroup)
    }

    /// The cgroup of a job's attempt (whether or not it exists).
    pub fn cgroup(&self, job_id: &str, attempt: u32) -> JobCgroup {
        let name = format!("{job_id}.{attempt}");
        JobCgroup { dirs: self.parents.iter().map(|p| p.join(&name)).collect() }
    }

    fn limit_files(&self) -> Vec<(&'static str, String)> {
        let l = &self.limits;
        let period = 100_000u64;
        let quota = l.cpus.map(|c| ((c * period as f64) as u64).max(1000));
        let mut files = Vec::new();
        match self.version {
            Version::V2 => {
                files.extend(l.memory_max_bytes.map(|m| ("memory.max", m.to_string())));
                // Without swap the limit is the limit (a node with swap would page instead).
                files.extend(l.memory_max_bytes.map(|_| ("memory.swap.max", "0".to_owned())));
                files.extend(l.pids_max.map(|p| ("pids.max", p.to_string())));
                files.extend(quota.map(|q| ("cpu.max", format!("{q} {period}"))));
            }
            // Each hierarchy's directory has only its own files: the others are skipped.
            Version::V1 => {
                files.extend(l.memory_max_bytes.map(|m| ("memory.limit_in_bytes", m.to_string())));
                files.extend(l.pids_max.map(|p| ("pids.max", p.to_string())));
                files.extend(quota.map(|_| ("cpu.cfs_period_us", period.to_string())));
                files.extend(quota.map(|q| ("cpu.cfs_quota_us", q.to_string())));
            }
        }
        files
    }

    /// Why the kernel stopped the job's processes, when one of its limits
    /// did: the OOM killer at the memory limit, or a fork refused at the
    /// pids limit. None when no limit was hit.
    pub fn limits_hit(&self, cgroup: &JobCgroup) -> Option<String> {
        let mut hits = Vec::new();
        let count = |dir: &Path, file: &str, key: &str| -> u64 {
            std::fs::read_to_string(dir.join(file))
                .ok()
                .and_then(|text| text.lines().find_map(|l| l.strip_prefix(key).and_then(|v| v.trim().parse().ok())))
                .unwrap_or(0)
        };
        for dir in &cgroup.dirs {
            let oom_kills = count(dir, "memory.events", "oom_kill ").max(count(dir, "memory.oom_control", "oom_kill "));
            if oom_kills > 0
                && let Some(limit) = self.limits.memory_max_bytes
            {
                hits.push(format!(
                    "the kernel's OOM killer killed {oom_kills} process(es) at the job's memory limit on this node \
                     ({} MiB, the agent's job-memory-max): use less memory per node or ask the node's admin for more",
                    limit >> 20
                ));
            }
            let refused = count(dir, "pids.events", "max ");
            if refused > 0
                && let Some(limit) = self.limits.pids_max
            {
                hits.push(format!(
                    "{refused} fork(s) refused at the job's limit of {limit} processes and threads on this node \
                     (the agent's job-pids-max): start fewer processes or threads (dataloader workers, OMP/MKL threads)"
                ));
            }
        }
        hits.sort();
        hits.dedup();
        (!hits.is_empty()).then(|| hits.join("; "))
    }

    /// Removes a job attempt's cgroup once its processes have left it
    /// (killed processes take a moment); true when it is gone. A cgroup
    /// that still holds processes after `within` stays, with a warning.
    pub async fn remove(&self, cgroup: &JobCgroup, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        let mut left: Vec<&PathBuf> = cgroup.dirs.iter().collect();
        loop {
            left.retain(|dir| match std::fs::remove_dir(dir) {
                Ok(()) => false,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
                Err(_) => true,
            });
            if left.is_empty() {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(cgroups = ?left, "job cgroup still holds processes; left in place");
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl JobCgroups {
    /// Removes this agent's own parent cgroups, once empty (an agent that
    /// stopped every process on its way out): a host where test clusters come
    /// and go does not collect empty cgroups. What still holds a job stays.
    pub fn remove_agent_dirs(&self) {
        for parent in &self.parents {
            if let Ok(entries) = std::fs::read_dir(parent) {
                for dir in entries.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())) {
                    let _ = std::fs::remove_dir(dir.path());
                }
            }
            let _ = std::fs::remove_dir(parent);
        }
    }
}

/// On v2, hands the controllers a job cgroup needs (of those `dir` has) to
/// its children.
fn enable_controllers(dir: &Path) -> Result<(), CgroupError> {
    let available_path = dir.join("cgroup.controllers");
    let available = std::fs::read_to_string(&available_path).map_err(io(&available_path))?;
    let wanted: Vec<String> = ["memory", "pids", "cpu"]
        .into_iter()
        .filter(|c| available.split_whitespace().any(|a| a == *c))
        .map(|c| format!("+{c}"))
        .collect();
    if wanted.is_empty() {
        return Ok(());
    }
    let control = dir.join("cgroup.subtree_control");
    std::fs::write(&control, wanted.join(" ")).map_err(io(&control))
}

/// This process's cgroup path in the v1 hierarchy of `controller`, from /proc/self/cgroup.
fn own_cgroup(controller: &str) -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    text.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        controllers.split(',').any(|c| c == controller).then(|| path.to_owned())
    })
}

/// Moves the calling process (a shim, before it starts its rank) into the
/// cgroup directories: its children start inside.
pub fn join(dirs: &[PathBuf]) -> Result<(), CgroupError> {
    let pid = std::process::id().to_string();
    for dir in dirs {
        let procs = dir.join("cgroup.procs");
        std::fs::write(&procs, &pid).map_err(io(&procs))?;
    }
    Ok(())
}

/// A name for this agent's cgroups that two agents on one host (test
/// clusters) do not share and a restarted agent finds again: the node name
/// and a hash of the work directory.
pub fn agent_cgroup_name(node: &str, work_dir: &Path) -> String {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    work_dir.hash(&mut hasher);
    let clean: String = node.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
    format!("{clean}-{:08x}", hasher.finish() as u32)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_written_as_each_version_names_them() {
        let limits = JobLimits { memory_max_bytes: Some(64 << 20), pids_max: Some(32), cpus: Some(1.5) };
        let v2 = JobCgroups { version: Version::V2, parents: vec![], limits };
        let files = v2.limit_files();
        assert!(files.contains(&("memory.max", (64u64 << 20).to_string())));
        assert!(files.contains(&("pids.max", "32".into())));
        assert!(files.contains(&("cpu.max", "150000 100000".into())));
        let v1 = JobCgroups { version: Version::V1, ..v2 };
        let files = v1.limit_files();
        assert!(files.contains(&("memory.limit_in_bytes", (64u64 << 20).to_string())));
        assert!(files.contains(&("cpu.cfs_quota_us", "150000".into())));
    }

    /// A v2 tree as the kernel shows it (a tempdir stands in for cgroupfs:
    /// the interface files the kernel would create are made by the test).
    #[test]
    fn on_v2_controllers_are_handed_down_and_the_job_cgroup_gets_the_limits() {
        let root = tempfile::tempdir().unwrap();
        let agent_dir = root.path().join("cohort/node0-1");
        std::fs::create_dir_all(&agent_dir).unwrap();
        for dir in [root.path(), &root.path().join("cohort"), &agent_dir] {
            std::fs::write(dir.join("cgroup.controllers"), "cpuset cpu io memory hugetlb pids rdma misc\n").unwrap();
        }
        let limits = JobLimits { memory_max_bytes: Some(1 << 30), pids_max: Some(100), cpus: Some(2.0) };
        let groups = JobCgroups::set_up(root.path(), "node0-1", limits).unwrap();
        assert!(groups.describe().starts_with("cgroup v2"), "{}", groups.describe());
        for dir in [root.path(), &root.path().join("cohort"), &agent_dir] {
            let control = std::fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap();
            assert_eq!(control, "+memory +pids +cpu", "{}", dir.display());
        }
        let job_dir = agent_dir.join("train-7.2");
        std::fs::create_dir_all(&job_dir).unwrap();
        for file in ["memory.max", "memory.swap.max", "pids.max", "cpu.max"] {
            std::fs::write(job_dir.join(file), "max").unwrap();
        }
        let cgroup = groups.create("train-7", 2).unwrap();
        assert_eq!(cgroup.dirs, vec![job_dir.clone()]);
        let read = |f: &str| std::fs::read_to_string(job_dir.join(f)).unwrap();
        assert_eq!(read("memory.max"), (1u64 << 30).to_string());
        assert_eq!(read("memory.swap.max"), "0");
        assert_eq!(read("pids.max"), "100");
        assert_eq!(read("cpu.max"), "200000 100000");
    }

    #[test]
    fn a_root_without_cgroups_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = JobCgroups::set_up(dir.path(), "a", JobLimits::default()).unwrap_err();
        assert!(err.to_string().contains("neither cgroup v2"), "{err}");
    }

    #[test]
    fn a_hit_limit_is_explained_with_the_setting() {
        let dir = tempfile::tempdir().unwrap();
        let limits = JobLimits { memory_max_bytes: Some(64 << 20), pids_max: Some(32), cpus: None };
        let groups = JobCgroups { version: Version::V2, parents: vec![dir.path().to_path_buf()], limits };
        let cgroup = groups.cgroup("j", 1);
        std::fs::create_dir_all(&cgroup.dirs[0]).unwrap();
        assert_eq!(groups.limits_hit(&cgroup), None);
        std::fs::write(cgroup.dirs[0].join("memory.events"), "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n").unwrap();
        std::fs::write(cgroup.dirs[0].join("pids.events"), "max 7\n").unwrap();
        let why = groups.limits_hit(&cgroup).unwrap();
        assert!(
            why.contains("OOM killer killed 1") && why.contains("64 MiB") && why.contains("job-memory-max"),
            "{why}"
        );
        assert!(why.contains("7 fork(s) refused") && why.contains("job-pids-max"), "{why}");
    }
}
