//! The kernel's OOM-killer lines from `/dev/kmsg`: a rank the kernel killed
//! for memory dies by SIGKILL and prints nothing; the kernel log says why.
//! Only the launch's own kills count: the log is the whole host's, and an OOM
//! kill of some other process (another job's, a daemon's) while a rank died
//! of something else must not make that rank's failure `kernel_oom`, which
//! is not retried by default.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;

use cohort_proto::now_unix_ms;

/// What marks an OOM kill in the kernel log.
const OOM_MARKERS: &[&str] = &["Out of memory: Killed process", "oom-kill:", "Memory cgroup out of memory"];
/// Most records read (the ring buffer holds a few thousand at most).
const MAX_RECORDS: usize = 100_000;

/// Whose OOM kills are wanted: a launch's processes, by pid, and its cgroup.
#[derive(Debug, Default, Clone)]
pub struct Whose {
    /// The rank's and its shim's pids.
    pub pids: Vec<u32>,
    /// The launch's cgroup directories: a kill whose `task_memcg` is one of
    /// them (or below one) counts, whatever process it took.
    pub cgroups: Vec<std::path::PathBuf>,
}

impl Whose {
    /// The kernel names a memory cgroup by its path from the hierarchy's root,
    /// which differs from the agent's mount path (and, in a cgroup namespace,
    /// from its view): the directory's last two parts, `<agent>/<job>.<attempt>`,
    /// identify it.
    fn memcg_suffixes(&self) -> Vec<String> {
        self.cgroups
            .iter()
            .filter_map(|dir| {
                let mut parts = dir.iter().rev().take(2).collect::<Vec<_>>();
                (parts.len() == 2).then(|| {
                    parts.reverse();
                    format!("/{}", std::path::PathBuf::from_iter(parts).display())
                })
            })
            .collect()
    }
}

/// The kernel's OOM-kill messages logged since `since_unix_ms` about `whose`
/// processes (empty when the log cannot be read, e.g. without CAP_SYSLOG).
pub fn oom_kills_since(since_unix_ms: i64, whose: &Whose) -> Vec<String> {
    let Some(uptime_s) =
        std::fs::read_to_string("/proc/uptime").ok().and_then(|t| t.split_whitespace().next()?.parse::<f64>().ok())
    else {
        return Vec::new();
    };
    // Boot-relative microseconds at `since`.
    let ago_ms = (now_unix_ms() - since_unix_ms).max(0) as f64;
    let since_us = ((uptime_s * 1000.0 - ago_ms) * 1000.0).max(0.0) as u64;
    let Ok(mut kmsg) =
        std::fs::OpenOptions::new().read(true).custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits()).open("/dev/kmsg")
    else {
        return Vec::new();
    };
    let mut found = Vec::new();
    let mut buf = vec![0u8; 8192];
    let mut filter = Filter::new(whose);
    for _ in 0..MAX_RECORDS {
        // One record per read; EAGAIN at the end; EPIPE when a record was overwritten (go on).
        match kmsg.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if let Some(line) = oom_line(&String::from_utf8_lossy(&buf[..n]), since_us)
                    && filter.ours(&line)
                {
                    found.push(line);
                }
            }
            Err(e) if e.raw_os_error() == Some(nix::libc::EPIPE) => continue,
            Err(_) => break,
        }
    }
    found
}

/// "6,1234,8123442161,-;Out of memory: Killed process ..." → the message, when
/// it is an OOM kill at or after `since_us`.
fn oom_line(record: &str, since_us: u64) -> Option<String> {
    let (header, message) = record.split_once(';')?;
    let at_us: u64 = header.split(',').nth(2)?.parse().ok()?;
    let message = message.lines().next()?.trim();
    (at_us >= since_us && OOM_MARKERS.iter().any(|m| message.contains(m)))
        .then(|| format!("[kernel {:.6}] {message}", at_us as f64 / 1e6))
}

/// Picks the launch's own kills from the host's. The kernel logs one kill as
/// `oom-kill:...,task_memcg=/x/y,task=python3,pid=123,uid=0` and then
/// `Out of memory: Killed process 123 (python3) ...` (or `Memory cgroup out
/// of memory: Killed process 123`): a kill in the launch's cgroup makes its
/// pid the launch's, so the line after it is kept as well.
struct Filter {
    pids: Vec<u32>,
    memcgs: Vec<String>,
}

impl Filter {
    fn new(whose: &Whose) -> Filter {
        Filter { pids: whose.pids.iter().copied().filter(|p| *p > 0).collect(), memcgs: whose.memcg_suffixes() }
    }

    fn ours(&mut self, line: &str) -> bool {
        let field = |name: &str| {
            line.split([',', ' ']).find_map(|f| f.strip_prefix(name)).map(|v| v.trim_end_matches(['\n', ';']))
        };
        let pid = field("pid=").or_else(|| {
            let (_, after) = line.split_once("Killed process ")?;
            after.split_whitespace().next()
        });
        let pid: Option<u32> = pid.and_then(|p| p.parse().ok());
        let in_cgroup = field("task_memcg=").is_some_and(|memcg| {
            self.memcgs.iter().any(|ours| memcg.ends_with(ours.as_str()) || memcg.contains(&format!("{ours}/")))
        });
        if in_cgroup && let Some(pid) = pid {
            self.pids.push(pid);
        }
        in_cgroup || pid.is_some_and(|p| self.pids.contains(&p))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn oom_records_after_the_start_are_kept() {
        let record = "3,1834,8123442161,-;Out of memory: Killed process 208585 (python3) total-vm:98765432kB, anon-rss:81234567kB\n SUBSYSTEM=memory";
        assert_eq!(
            oom_line(record, 8_000_000_000).as_deref(),
            Some(
                "[kernel 8123.442161] Out of memory: Killed process 208585 (python3) total-vm:98765432kB, anon-rss:81234567kB"
            )
        );
        assert_eq!(oom_line(record, 9_000_000_000), None, "before the process started");
        assert_eq!(oom_line("6,1,5,-;eth0: link up", 0), None);
    }

    #[test]
    fn reading_the_kernel_log_never_fails() {
        // Whatever this machine allows, the answer is a list (no error, no hang).
        let _ = oom_kills_since(now_unix_ms() - 1000, &Whose::default());
    }

    /// Seen on this machine: a test's job `hog-3` was OOM-killed in its cgroup
    /// while another agent's rank, also on "node0", died by kill -9; that
    /// rank's failure was classified `kernel_oom` and not restarted.
    #[test]
    fn only_the_launchs_own_kills_count() {
        let memcg = "[kernel 1361.870518] oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=/,mems_allowed=0,\
                     oom_memcg=/process_api/93/cohort/node0-b6632a29/hog-3.1,\
                     task_memcg=/process_api/93/cohort/node0-b6632a29/hog-3.1,task=dd,pid=19838,uid=0";
        let killed = "[kernel 1361.870600] Memory cgroup out of memory: Killed process 19838 (dd) total-vm:9000kB";
        let other = "[kernel 1362.000000] Out of memory: Killed process 4242 (postgres) total-vm:1kB";
        let hog = Whose { pids: vec![19000], cgroups: vec!["/sys/fs/cgroup/cohort/node0-b6632a29/hog-3.1".into()] };
        let mut f = Filter::new(&hog);
        assert!(f.ours(memcg), "a kill in the launch's cgroup");
        assert!(f.ours(killed), "and the kernel's next line about the same pid");
        assert!(!f.ours(other), "another process of the host");
        // The goodput job's rank on the other agent named node0: none of it is its.
        let other_agent = Whose {
            pids: vec![20001, 20002],
            cgroups: vec!["/sys/fs/cgroup/cohort/node0-77aa0f3c/goodput-1.1".into()],
        };
        let mut f = Filter::new(&other_agent);
        assert!(!f.ours(memcg) && !f.ours(killed) && !f.ours(other));
        // Without cgroups, the rank's own pid.
        let mut f = Filter::new(&Whose { pids: vec![4242], cgroups: Vec::new() });
        assert!(f.ours(other) && !f.ours(memcg));
        // A process in a cgroup below the launch's (cgroup v2 allows none, v1 does) is the launch's.
        let nested = memcg.replace("hog-3.1,task=", "hog-3.1/sub,task=");
        assert!(Filter::new(&hog).ours(&nested));
        // A job whose id extends another's is not it.
        let longer = memcg.replace("hog-3.1", "hog-3.10");
        assert!(!Filter::new(&hog).ours(&longer));
    }
}
