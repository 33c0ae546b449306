//! The GPU backend in a process of its own (`cohort-agent gpu-reader`): the
//! real agent binary as reader, running the fake backend (no NVIDIA driver
//! here; on a GPU host the same reader runs NVML, checked by
//! tools/agent-rss.sh). Telemetry and events come through it, a reader that is
//! killed or stopped is replaced and watches the events again, and no reader
//! outlives the backend or the process that started it.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cohort_agent::gpu::nvml::shared_nvml;
use cohort_agent::gpu::reader::{Deadlines, ReaderBackend};
use cohort_agent::gpu::{GpuBackend, GpuMonitor, MonitorConfig, NvmlBackend, RawGpuEvent};
use cohort_proto::{GpuHealthState, GpuTelemetry};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(20);

/// The agent binary (COHORT_AGENT_EXE where the test binary runs away from its build, as on a GPU host).
fn agent_exe() -> PathBuf {
    std::env::var_os("COHORT_AGENT_EXE")
        .map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_cohort-agent")), PathBuf::from)
}

fn reader(events: &Path, deadlines: Deadlines) -> ReaderBackend {
    let args = ["gpu-reader", "--fake-gpus", "2", "--fake-gpu-events"].map(Into::into).into_iter();
    ReaderBackend::new(agent_exe(), args.chain([events.as_os_str().to_owned()]).collect(), deadlines)
}

fn quick() -> Deadlines {
    Deadlines {
        inventory: Duration::from_secs(30),
        poll: Duration::from_secs(2),
        restart_pause: Duration::from_millis(300),
    }
}

fn inject(file: &Path, line: &str) {
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(file).unwrap();
    writeln!(f, "{line}").unwrap();
}

/// Whether `pid` has ended (gone, or a zombie nobody reaped yet).
fn ended(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // The state follows the command's closing parenthesis.
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
    }
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < WAIT, "{what}: not within {WAIT:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

fn state(t: &GpuTelemetry) -> GpuHealthState {
    t.health.as_ref().and_then(|h| GpuHealthState::try_from(h.state).ok()).unwrap_or(GpuHealthState::Unspecified)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_monitor_reads_gpus_and_events_through_a_reader_process() {
    let dir = tempfile::tempdir().unwrap();
    let events_file = dir.path().join("events");
    let backend = Arc::new(reader(&events_file, quick()));
    let (tx, mut events) = mpsc::channel(16);
    let config = MonitorConfig { interval: Duration::from_millis(50), keep: None };
    let monitor = GpuMonitor::start(backend.clone(), config, tx).await.unwrap();
    assert_eq!(monitor.gpus().len(), 2, "{}", monitor.note());
    assert_eq!(monitor.note(), "2 fake GPU(s) from --fake-gpus (in a gpu-reader process)");
    assert!(monitor.gpus().iter().all(|g| g.fake && g.uuid.starts_with("GPU-fake-")));
    assert_eq!(monitor.latest().len(), 2);
    let pid = backend.reader_pid().expect("a reader runs");
    assert_ne!(pid, std::process::id());
    assert!(cmdline(pid).contains("gpu-reader --fake-gpus 2"), "{}", cmdline(pid));

    inject(&events_file, "xid 1 79");
    let event = tokio::time::timeout(WAIT, events.recv()).await.unwrap().unwrap();
    assert_eq!((event.index, event.kind.as_str(), event.xid), (1, "xid", 79));
    let mut latest = monitor.subscribe();
    tokio::time::timeout(
        WAIT,
        latest.wait_for(|t| t.iter().any(|t| t.index == 1 && state(t) == GpuHealthState::Unhealthy)),
    )
    .await
    .unwrap()
    .unwrap();
    // Throttling is read by the poll, in the reader.
    inject(&events_file, "throttle 0 HW_SLOWDOWN");
    tokio::time::timeout(
        WAIT,
        latest.wait_for(|t| t.iter().any(|t| t.index == 0 && t.throttle_reasons.iter().any(|r| r == "HW_SLOWDOWN"))),
    )
    .await
    .unwrap()
    .unwrap();
}

#[test]
fn a_reader_that_dies_or_hangs_is_replaced_and_watches_the_events_again() {
    let dir = tempfile::tempdir().unwrap();
    let events_file = dir.path().join("events");
    let backend = reader(&events_file, quick());
    let gpus = backend.inventory().gpus;
    assert_eq!(gpus.len(), 2);
    let (tx, mut events) = mpsc::channel::<RawGpuEvent>(16);
    backend.watch_events(&gpus, tx).unwrap();
    assert_eq!(backend.poll(&gpus).len(), 2);

    // Killed: the next polls find it gone, and a new one answers.
    let first = backend.reader_pid().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(first as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    wait_until("the killed reader is replaced", || backend.poll(&gpus).len() == 2);
    let second = backend.reader_pid().unwrap();
    assert_ne!(first, second);
    wait_until("the killed reader is reaped", || ended(first));
    // The new reader's watch starts at the file's end once its re-watch
    // command arrives, which the test cannot see: a line written before that
    // is not an event for it, so one is written every 500 ms until one comes.
    let mut event = None;
    let mut written = Instant::now() - Duration::from_secs(1);
    wait_until("the new reader watches the events", || {
        if written.elapsed() >= Duration::from_millis(500) {
            inject(&events_file, "ecc-dbe 1");
            written = Instant::now();
        }
        event = events.try_recv().ok();
        event.is_some()
    });
    assert_eq!(event.map(|e| e.index), Some(1));

    // Stopped (a call stuck in the driver): the poll gives up at its deadline,
    // the reader is killed, and a new one answers.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(second as i32), nix::sys::signal::Signal::SIGSTOP).unwrap();
    let start = Instant::now();
    assert!(backend.poll(&gpus).is_empty(), "a stopped reader gives no samples");
    assert!(start.elapsed() >= quick().poll, "waited for the deadline");
    wait_until("the stopped reader is killed", || ended(second));
    wait_until("a new reader answers", || backend.poll(&gpus).len() == 2);
    let third = backend.reader_pid().unwrap();
    assert!(![first, second].contains(&third));

    // Dropped with the backend: its stdin closes and it ends.
    drop(backend);
    wait_until("the dropped backend's reader ends", || ended(third));
}

#[test]
fn a_reader_ends_when_the_process_that_started_it_dies() {
    // sh starts two readers: one whose stdin is at its end, and one whose stdin
    // never ends (a FIFO it holds open for writing itself); then sh is killed.
    // Only the second reader's watch on its parent can end it.
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("stdin");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let script =
        r#""$0" gpu-reader --fake-gpus 1 < /dev/null & echo $!; "$0" gpu-reader --fake-gpus 1 <> "$1" & echo $!; wait"#;
    let mut sh = std::process::Command::new("sh")
        .args(["-c", script])
        .arg(agent_exe())
        .arg(&fifo)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(sh.stdout.take().unwrap());
    let mut pid = || {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut out, &mut line).unwrap();
        line.trim().parse::<u32>().unwrap()
    };
    let (closed_stdin, open_stdin) = (pid(), pid());
    wait_until("a reader whose stdin is at its end ends", || ended(closed_stdin));
    assert!(!ended(open_stdin), "a reader with its parent and its stdin runs on");
    sh.kill().unwrap();
    sh.wait().unwrap();
    wait_until("the orphaned reader ends", || ended(open_stdin));
}

/// On a GPU host: NVML read through a reader finds what the agent finds
/// itself, and its polls carry the GPUs' readings. Skipped without a driver.
#[test]
fn nvml_through_a_reader_reads_what_nvml_in_the_agent_reads() {
    if let Err(why) = shared_nvml() {
        eprintln!("SKIPPED nvml_through_a_reader_reads_what_nvml_in_the_agent_reads: {why}");
        return;
    }
    let backend = ReaderBackend::new(agent_exe(), vec!["gpu-reader".into()], Deadlines::default());
    let (through, inline) = (backend.inventory(), NvmlBackend::open().inventory());
    let uuids = |gpus: &[cohort_proto::GpuInfo]| gpus.iter().map(|g| g.uuid.clone()).collect::<Vec<_>>();
    assert_eq!(uuids(&through.gpus), uuids(&inline.gpus), "{} / {}", through.note, inline.note);
    assert_eq!(through.note, format!("{} (in a gpu-reader process)", inline.note));
    assert_eq!(through.gpus, inline.gpus, "topology and all");
    if through.gpus.is_empty() {
        eprintln!("SKIPPED nvml_through_a_reader_reads_what_nvml_in_the_agent_reads: the driver reports no GPUs");
        return;
    }
    let samples = backend.poll(&through.gpus);
    assert_eq!(samples.len(), through.gpus.len());
    for s in &samples {
        let t = &s.telemetry;
        assert!(!s.lost && t.memory_total_bytes.is_some() && t.temperature_c.is_some(), "{t:?}");
    }
    eprintln!("through the reader (pid {:?}): {}; {:?}", backend.reader_pid(), through.note, samples[0].telemetry);
}
