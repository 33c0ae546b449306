//! Preflight: what the node's Python stack and system look like, so the
//! controller can refuse a launch that would fail an hour in.
//!
//! The package probe runs `<python> -c <probe.py>` with a timeout (a hung
//! import must not hang the agent) and reads one JSON object back. System
//! checks (free disk, /dev/shm, a free MASTER_PORT, network interfaces) are
//! done here in Rust.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use cohort_proto::{PreflightCheck, PreflightReport, now_unix_ms};
use serde::Deserialize;

const PROBE: &str = include_str!("preflight/probe.py");

/// Less free space than this at the output directory fails the check.
pub const MIN_FREE_DISK: u64 = 1 << 30;
/// NCCL's shared-memory transport needs a /dev/shm bigger than Docker's 64 MiB default.
pub const MIN_SHM: u64 = 1 << 30;

#[derive(Deserialize)]
struct ProbeOutput {
    checks: Vec<ProbeCheck>,
}

#[derive(Deserialize)]
struct ProbeCheck {
    name: String,
    value: String,
    ok: bool,
    detail: String,
}

/// Runs the package probe with `python`. Errors (no such interpreter, a
/// timeout, garbage output) end up in `report.error`, never as a panic.
pub async fn probe_packages(
    node_name: &str,
    python: &str,
    env: &[(String, String)],
    timeout: Duration,
) -> PreflightReport {
    let mut report = PreflightReport {
        node_name: node_name.into(),
        python: python.into(),
        unix_ms: now_unix_ms(),
        ..PreflightReport::default()
    };
    let mut command = tokio::process::Command::new(python);
    command
        .arg("-c")
        .arg(PROBE)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let output = match command.spawn() {
        Ok(child) => tokio::time::timeout(timeout, child.wait_with_output()).await,
        Err(e) => {
            report.error = format!("cannot run {python}: {e}");
            return report;
        }
    };
    let output = match output {
        Err(_) => {
            report.error = format!("{python} did not finish the package probe within {timeout:?} (a hung import?)");
            return report;
        }
        Ok(Err(e)) => {
            report.error = format!("waiting for {python}: {e}");
            return report;
        }
        Ok(Ok(output)) => output,
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    match stdout.lines().rev().find_map(|l| serde_json::from_str::<ProbeOutput>(l).ok()) {
        Some(parsed) => {
            report.checks = parsed
                .checks
                .into_iter()
                .map(|c| PreflightCheck { name: c.name, value: c.value, ok: c.ok, detail: c.detail })
                .collect();
        }
        None => {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let tail: Vec<&str> = stderr.lines().rev().take(3).collect();
            report.error = format!(
                "{python} exited with {} without a probe result: {}",
                output.status,
                tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
            );
        }
    }
    report
}

/// Free space of the file system holding `path` (or its nearest existing parent).
pub fn free_disk(path: &Path) -> PreflightCheck {
    let existing = path.ancestors().find(|p| p.exists()).unwrap_or(Path::new("/"));
    match nix::sys::statvfs::statvfs(existing) {
        Ok(st) => {
            let free = st.blocks_available() * st.fragment_size();
            PreflightCheck {
                name: "disk".into(),
                value: format!("{} free", human_bytes(free)),
                ok: free >= MIN_FREE_DISK,
                detail: format!("at {}", existing.display()),
            }
        }
        Err(e) => PreflightCheck {
            name: "disk".into(),
            value: String::new(),
            ok: false,
            detail: format!("statvfs {}: {e}", existing.display()),
        },
    }
}

pub fn shm_size() -> PreflightCheck {
    match nix::sys::statvfs::statvfs("/dev/shm") {
        Ok(st) => {
            let size = st.blocks() * st.fragment_size();
            PreflightCheck {
                name: "shm".into(),
                value: human_bytes(size),
                ok: size >= MIN_SHM,
                detail: if size >= MIN_SHM {
                    String::new()
                } else {
                    "NCCL needs a larger /dev/shm (docker: --shm-size)".into()
                },
            }
        }
        Err(e) => {
            PreflightCheck { name: "shm".into(), value: String::new(), ok: false, detail: format!("/dev/shm: {e}") }
        }
    }
}

/// Whether `port` can be bound on every address of this node now.
pub fn port_free(port: u16) -> PreflightCheck {
    let result = std::net::TcpListener::bind(("0.0.0.0", port));
    PreflightCheck {
        name: "master_port".into(),
        value: port.to_string(),
        ok: result.is_ok(),
        detail: match result {
            Ok(_) => String::new(),
            Err(e) => format!("port {port} is taken on this node: {e}"),
        },
    }
}

pub fn interface(name: &str) -> PreflightCheck {
    let exists = Path::new("/sys/class/net").join(name).exists();
    PreflightCheck {
        name: format!("interface:{name}"),
        value: if exists { "present".into() } else { String::new() },
        ok: exists,
        detail: if exists { String::new() } else { format!("no network interface {name:?} on this node") },
    }
}

fn human_bytes(n: u64) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    if n >= 1 << 30 { format!("{:.1} GiB", n as f64 / GIB) } else { format!("{} MiB", n >> 20) }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn the_probe_reports_python_and_missing_packages() {
        let report = probe_packages("n", "python3", &[], Duration::from_secs(60)).await;
        assert_eq!(report.error, "");
        let python = report.checks.iter().find(|c| c.name == "python").unwrap();
        assert!(python.ok && python.value.starts_with('3'), "{python:?}");
        // Whatever is installed here, every expected row is present.
        for name in [
            "torch",
            "transformer_engine",
            "transformer_engine.pytorch",
            "flash_attn",
            "apex",
            "megatron.core",
            "swift",
        ] {
            let check = report.checks.iter().find(|c| c.name == name).unwrap();
            assert!(check.ok || !check.detail.is_empty(), "a failed import says why: {check:?}");
        }
    }

    #[tokio::test]
    async fn a_missing_or_hung_python_is_an_error_not_a_hang() {
        let missing = probe_packages("n", "/nonexistent/python", &[], Duration::from_secs(5)).await;
        assert!(missing.error.contains("cannot run /nonexistent/python"), "{}", missing.error);

        let dir = tempfile::tempdir().unwrap();
        // Written by a child process: a write descriptor held in this process
        // could leak into a concurrent test's fork and make exec fail (ETXTBSY).
        let hung = dir.path().join("python");
        let source = dir.path().join("python.src");
        std::fs::write(&source, "#!/bin/sh\nexec sleep 600\n").unwrap();
        let installed = std::process::Command::new("install").arg("-m").arg("755").arg(&source).arg(&hung).status();
        assert!(installed.unwrap().success());
        let report = probe_packages("n", hung.to_str().unwrap(), &[], Duration::from_millis(300)).await;
        assert!(report.error.contains("did not finish"), "{}", report.error);
    }

    #[test]
    fn system_checks() {
        assert!(interface("lo").ok);
        assert!(!interface("nonexistent0").ok);
        let listener = std::net::TcpListener::bind(("0.0.0.0", 0)).unwrap();
        let taken = listener.local_addr().unwrap().port();
        assert!(!port_free(taken).ok);
        drop(listener);
        assert!(free_disk(Path::new("/nonexistent/deeper/dir")).detail.contains("at /"));
    }
}
