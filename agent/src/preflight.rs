//! Preflight: what the node's Python stack and system look like, so the
//! controller can refuse a launch that would fail an hour in.
//!
//! The package probe runs `<python> -c <probe.py>`, and the ms-swift argument
//! check `<python> -c <swift_argcheck.py> <command> <argv...>`, through the
//! job's interpreter as the job's user ([`run`]), with a timeout (a hung import
//! must not hang the agent), and each reads one JSON line back. System checks
//! (free disk, /dev/shm, a free MASTER_PORT, network interfaces) are done here
//! in Rust.

pub mod run;

use std::path::Path;
use std::time::Duration;

use cohort_proto::{
    PreflightCheck, PreflightReport, SwiftArgcheck, SwiftArgcheckResult, SwiftFlagProblem, now_unix_ms,
};
use serde::Deserialize;

pub use run::Interpreter;

const PROBE: &str = include_str!("preflight/probe.py");
/// ms-swift's own parser over a rendered command line (see the script's docstring
/// for the JSON it prints; written against ms-swift 3.x and 4.x's sources).
const ARGCHECK: &str = include_str!("preflight/swift_argcheck.py");

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

/// The argument check's one JSON line (agent/src/preflight/swift_argcheck.py).
#[derive(Deserialize)]
struct ArgcheckOutput {
    ms_swift: Option<String>,
    ok: bool,
    #[serde(default)]
    problems: Vec<ArgcheckProblem>,
    error: Option<String>,
}

#[derive(Deserialize)]
struct ArgcheckProblem {
    flag: Option<String>,
    message: String,
}

/// The last line of `stdout` that parses as `T`.
fn last_json<T: serde::de::DeserializeOwned>(stdout: &[u8]) -> Option<T> {
    String::from_utf8_lossy(stdout).lines().rev().find_map(|l| serde_json::from_str::<T>(l).ok())
}

/// `python` exited with `status` and said nothing we could read: the last lines of its stderr.
fn no_answer(python: &str, what: &str, output: &run::RunOutput) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr);
    let tail: Vec<&str> = stderr.lines().rev().take(3).collect();
    format!(
        "{python} exited with {} without {what}: {}",
        output.status,
        tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
    )
}

/// Runs the package probe with the interpreter. Errors (no such interpreter, a
/// timeout, garbage output) end up in `report.error`, never as a panic.
pub async fn probe_packages(node_name: &str, python: &Interpreter<'_>, timeout: Duration) -> PreflightReport {
    let mut report = PreflightReport {
        node_name: node_name.into(),
        python: python.python.into(),
        unix_ms: now_unix_ms(),
        ..PreflightReport::default()
    };
    let output = match python.run(&["-c".into(), PROBE.into()], timeout).await {
        Ok(output) => output,
        Err(e) => {
            report.error = e.to_string();
            return report;
        }
    };
    match last_json::<ProbeOutput>(&output.stdout) {
        Some(parsed) => {
            report.checks = parsed
                .checks
                .into_iter()
                .map(|c| PreflightCheck { name: c.name, value: c.value, ok: c.ok, detail: c.detail })
                .collect();
        }
        None => report.error = no_answer(python.python, "a probe result", &output),
    }
    report
}

/// Runs `check.argv` through the installed ms-swift's own parser for
/// `check.command`, with the interpreter. A refused flag is a problem; an
/// answer that could not be had (no ms-swift, a timeout, garbage) is `error`.
pub async fn swift_argcheck(python: &Interpreter<'_>, check: &SwiftArgcheck, timeout: Duration) -> SwiftArgcheckResult {
    let mut result = SwiftArgcheckResult {
        command: check.command.clone(),
        python: python.python.into(),
        ..SwiftArgcheckResult::default()
    };
    let mut args = vec!["-c".to_owned(), ARGCHECK.to_owned(), check.command.clone()];
    args.extend(check.argv.iter().cloned());
    let output = match python.run(&args, timeout).await {
        Ok(output) => output,
        Err(e) => {
            result.error = format!("the ms-swift argument check: {e}");
            return result;
        }
    };
    match last_json::<ArgcheckOutput>(&output.stdout) {
        Some(parsed) => {
            result.ms_swift = parsed.ms_swift.unwrap_or_default();
            result.problems = parsed
                .problems
                .into_iter()
                .map(|p| SwiftFlagProblem { flag: p.flag.unwrap_or_default(), message: p.message })
                .collect();
            match parsed.error.filter(|e| !e.is_empty()) {
                Some(error) => {
                    result.error = error;
                    result.problems.clear();
                }
                // `ok` as the script says, but never with a refused flag.
                None => result.ok = parsed.ok && result.problems.is_empty(),
            }
        }
        None => result.error = no_answer(python.python, "an ms-swift argument check result", &output),
    }
    result
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

    fn python(python: &str) -> Interpreter<'_> {
        Interpreter { python, env: &[], identity: None, helper: Path::new("/nonexistent"), cwd: "/" }
    }

    #[tokio::test]
    async fn the_probe_reports_python_and_missing_packages() {
        let report = probe_packages("n", &python("python3"), Duration::from_secs(60)).await;
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
        let missing = probe_packages("n", &python("/nonexistent/python"), Duration::from_secs(5)).await;
        assert!(missing.error.contains("cannot run /nonexistent/python"), "{}", missing.error);

        let dir = tempfile::tempdir().unwrap();
        // Written by a child process: a write descriptor held in this process
        // could leak into a concurrent test's fork and make exec fail (ETXTBSY).
        let hung = dir.path().join("python");
        let source = dir.path().join("python.src");
        std::fs::write(&source, "#!/bin/sh\nexec sleep 600\n").unwrap();
        let installed = std::process::Command::new("install").arg("-m").arg("755").arg(&source).arg(&hung).status();
        assert!(installed.unwrap().success());
        let report = probe_packages("n", &python(hung.to_str().unwrap()), Duration::from_millis(300)).await;
        assert!(report.error.contains("did not finish"), "{}", report.error);
    }

    /// An executable script in `dir`, written by a child process (see above: ETXTBSY).
    fn script(dir: &Path, name: &str, text: &str) -> String {
        let (path, source) = (dir.join(name), dir.join(format!("{name}.src")));
        std::fs::write(&source, text).unwrap();
        let installed = std::process::Command::new("install").arg("-m").arg("755").arg(&source).arg(&path).status();
        assert!(installed.unwrap().success());
        path.display().to_string()
    }

    #[tokio::test]
    async fn the_argument_check_reports_refused_flags_and_what_it_could_not_judge() {
        let dir = tempfile::tempdir().unwrap();
        // Stand-ins that follow swift_argcheck.py's protocol: the command and argv after the script.
        let refusing = script(
            dir.path(),
            "refusing",
            "#!/bin/sh\n[ \"$3\" = megatron-sft ] && [ \"$4\" = --num_workers ] || exit 9\n\
             echo 'ms-swift logging noise'\n\
             echo '{\"ms_swift\": \"4.6.0\", \"command\": \"megatron sft\", \"ok\": false, \"problems\": \
             [{\"flag\": \"--num_workers\", \"message\": \"not a flag\"}], \"error\": null}'\n",
        );
        let check = SwiftArgcheck { command: "megatron-sft".into(), argv: vec!["--num_workers".into(), "4".into()] };
        let result = swift_argcheck(&python(&refusing), &check, Duration::from_secs(30)).await;
        assert_eq!((result.ok, result.ms_swift.as_str(), result.error.as_str()), (false, "4.6.0", ""), "{result:?}");
        assert_eq!(result.problems, [SwiftFlagProblem { flag: "--num_workers".into(), message: "not a flag".into() }]);

        let unjudged = script(
            dir.path(),
            "unjudged",
            "#!/bin/sh\necho '{\"ms_swift\": null, \"command\": null, \"ok\": false, \"problems\": [], \
             \"error\": \"cannot import swift.megatron.argument\"}'\nexit 3\n",
        );
        let result = swift_argcheck(&python(&unjudged), &check, Duration::from_secs(30)).await;
        assert!(!result.ok && result.problems.is_empty(), "{result:?}");
        assert_eq!(result.error, "cannot import swift.megatron.argument");

        let garbage = script(dir.path(), "garbage", "#!/bin/sh\necho not json; echo Traceback >&2; exit 1\n");
        let result = swift_argcheck(&python(&garbage), &check, Duration::from_secs(30)).await;
        assert!(
            !result.ok && result.error.contains("without an ms-swift argument check result: Traceback"),
            "{result:?}"
        );
    }

    #[tokio::test]
    async fn output_is_bounded_and_the_answer_is_its_last_line() {
        let dir = tempfile::tempdir().unwrap();
        // 4 MiB of noise before the answer: only the tail is kept, and the answer is in it.
        let noisy = script(
            dir.path(),
            "noisy",
            "#!/bin/sh\nhead -c 4194304 /dev/zero\necho\n\
             echo '{\"checks\": [{\"name\": \"python\", \"value\": \"3.12\", \"ok\": true, \"detail\": \"\"}]}'\n",
        );
        let output = python(&noisy).run(&[], Duration::from_secs(30)).await.unwrap();
        assert!(output.stdout.len() <= run::MAX_OUTPUT, "{}", output.stdout.len());
        let report = probe_packages("n", &python(&noisy), Duration::from_secs(30)).await;
        assert_eq!(report.error, "");
        assert_eq!(report.checks[0].value, "3.12");
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
