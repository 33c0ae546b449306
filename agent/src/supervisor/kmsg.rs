//! The kernel's OOM-killer lines from `/dev/kmsg`: a rank the kernel killed
//! for memory dies by SIGKILL and prints nothing; the kernel log says why.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;

use cohort_proto::now_unix_ms;

/// What marks an OOM kill in the kernel log.
const OOM_MARKERS: &[&str] = &["Out of memory: Killed process", "oom-kill:", "Memory cgroup out of memory"];
/// Most records read (the ring buffer holds a few thousand at most).
const MAX_RECORDS: usize = 100_000;

/// The kernel's OOM-kill messages logged since `since_unix_ms` (empty when
/// the log cannot be read, e.g. without CAP_SYSLOG).
pub fn oom_kills_since(since_unix_ms: i64) -> Vec<String> {
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
    for _ in 0..MAX_RECORDS {
        // One record per read; EAGAIN at the end; EPIPE when a record was overwritten (go on).
        match kmsg.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if let Some(line) = oom_line(&String::from_utf8_lossy(&buf[..n]), since_us) {
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
        let _ = oom_kills_since(now_unix_ms() - 1000);
    }
}
