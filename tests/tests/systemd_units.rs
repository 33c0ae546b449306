//! The shipped systemd units pass `systemd-analyze verify` (with ExecStart
//! pointed at this build's binaries), and keep the properties the agent's
//! restart-without-killing-ranks relies on.
#![allow(clippy::unwrap_used)]

use cohort_tests::{bin_dir, repo_root};

#[test]
fn units_pass_systemd_analyze_verify() {
    // No skip: a unit that no longer verifies must fail CI, not pass unseen.
    if let Err(e) = std::process::Command::new("systemd-analyze").arg("--version").output() {
        panic!(
            "systemd-analyze cannot run ({e}): this test needs it; run tests/install-deps.sh (apt-get install systemd, harmless in a container: it is not started)"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let mut units = Vec::new();
    for name in ["cohort-controller.service", "cohort-agent.service"] {
        let text = std::fs::read_to_string(repo_root().join("deploy/systemd").join(name)).unwrap();
        let text = text.replace("/usr/bin/", &format!("{}/", bin_dir().display()));
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        units.push(path);
    }
    let out = std::process::Command::new("systemd-analyze").arg("verify").args(&units).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.trim().is_empty(), "systemd-analyze verify:\n{stderr}");
    let agent = std::fs::read_to_string(&units[1]).unwrap();
    for line in ["Type=notify", "KillMode=process", "WatchdogSec="] {
        assert!(agent.lines().any(|l| l.starts_with(line)), "agent unit lacks {line}");
    }
}
