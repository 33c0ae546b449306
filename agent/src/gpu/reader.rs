//! The GPU backend in a process of its own: `cohort-agent gpu-reader`.
//!
//! NVML is a native library that the agent cannot contain: its
//! initialisation keeps about 14 MiB resident for the life of the process
//! (an anonymous mapping beside `libcuda.so` that neither `nvmlShutdown` nor
//! `malloc_trim` gives back; docs, "Agent memory"), one of its calls can block
//! for as long as the driver does (a GPU falling off the bus), and a fault in
//! it is a fault in whoever loaded it. So by default NVML runs in a child of
//! the agent, the reader, and [`ReaderBackend`] speaks to it over its stdin
//! and stdout, one JSON object per line:
//!
//! - the agent asks (`inventory`, `poll`, `watch`, `clear`) and waits for the
//!   answer at most [`Deadlines`]; a reader that does not answer in time, or
//!   has exited, is killed and a new one started at the next request (no
//!   sooner than [`Deadlines::restart_pause`] after the last start), the events watched
//!   again. Meanwhile polls give no samples: the GPUs keep their last
//!   readings, and the agent's heartbeats never wait on NVML;
//! - the reader sends events on its own, the moment NVML reports them;
//! - the reader ends when its stdin closes (the agent exited or dropped it)
//!   and, should it be blocked in NVML then, within a second of the agent's
//!   death (it watches its parent): no reader outlives its agent.
//!
//! The reader runs the same backend the agent would ([`open_in_process`]), so
//! the fake (`--fake-gpus`) can run in a reader too, which is how the tests
//! exercise this module on machines without a driver.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cohort_proto::{GpuInfo, GpuTelemetry};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::{FakeGpuFlags, GpuBackend, GpuEventKind, GpuSample, Inventory, RawGpuEvent, open_in_process};

/// `cohort-agent gpu-reader [--fake-gpus N ...]`.
pub const SUBCOMMAND: &str = "gpu-reader";
/// The longest line either side accepts (an 8-GPU inventory is a few KiB).
const MAX_LINE: u64 = 4 << 20;
/// How often the reader checks that the agent that started it is alive.
const PARENT_CHECK: Duration = Duration::from_secs(1);

/// Whether this process was started as a GPU reader.
pub fn invoked() -> bool {
    std::env::args_os().nth(1).is_some_and(|a| a == SUBCOMMAND)
}

/// How long the agent waits for each answer.
#[derive(Debug, Clone, Copy)]
pub struct Deadlines {
    /// The inventory: NVML's initialisation and the topology of every GPU.
    pub inventory: Duration,
    /// One poll of every GPU, and registering for events.
    pub poll: Duration,
    /// The least time between two starts of a reader.
    pub restart_pause: Duration,
}

impl Default for Deadlines {
    fn default() -> Self {
        Self {
            inventory: Duration::from_secs(120),
            poll: Duration::from_secs(15),
            restart_pause: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
enum Request {
    Inventory,
    Poll { gpus: Vec<GpuInfo> },
    Watch { gpus: Vec<GpuInfo> },
    Clear { index: u32 },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
enum Reply {
    Inventory { gpus: Vec<GpuInfo>, note: String },
    Samples { samples: Vec<Sample> },
    Watching { error: Option<String> },
    Event { index: u32, uuid: String, kind: EventKind, unix_ms: i64 },
}

#[derive(Debug, Serialize, Deserialize)]
struct Sample {
    telemetry: GpuTelemetry,
    lost: bool,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum EventKind {
    Xid(u64),
    EccDoubleBit,
    EccSingleBit,
}

impl From<&GpuEventKind> for EventKind {
    fn from(kind: &GpuEventKind) -> Self {
        match kind {
            GpuEventKind::Xid(xid) => EventKind::Xid(*xid),
            GpuEventKind::EccDoubleBit => EventKind::EccDoubleBit,
            GpuEventKind::EccSingleBit => EventKind::EccSingleBit,
        }
    }
}

impl From<EventKind> for GpuEventKind {
    fn from(kind: EventKind) -> Self {
        match kind {
            EventKind::Xid(xid) => GpuEventKind::Xid(xid),
            EventKind::EccDoubleBit => GpuEventKind::EccDoubleBit,
            EventKind::EccSingleBit => GpuEventKind::EccSingleBit,
        }
    }
}

/// One line of at most [`MAX_LINE`] bytes, without its newline; None at the end.
fn read_line(reader: &mut impl BufRead) -> std::io::Result<Option<String>> {
    let mut line = String::new();
    let read = reader.by_ref().take(MAX_LINE).read_line(&mut line)?;
    if read == 0 {
        return Ok(None);
    }
    if !line.ends_with('\n') && read as u64 == MAX_LINE {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("a line over {MAX_LINE} bytes")));
    }
    line.truncate(line.trim_end_matches('\n').len());
    Ok(Some(line))
}

fn write_line<T: Serialize>(out: &mut impl Write, message: &T) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(message).map_err(std::io::Error::other)?;
    line.push(b'\n');
    out.write_all(&line)?;
    out.flush()
}

// ---------------------------------------------------------------- the reader

/// The reader's own flags: which backend it runs.
#[derive(clap::Parser, Debug)]
#[command(name = "cohort-agent gpu-reader")]
struct ReaderArgs {
    #[arg(long)]
    fake_gpus: Option<u32>,
    #[arg(long, value_delimiter = ',')]
    fake_gpu_islands: Option<Vec<u32>>,
    #[arg(long)]
    fake_gpu_events: Option<PathBuf>,
}

/// `cohort-agent gpu-reader`: answers the agent's requests on stdin until it closes.
pub fn reader_main() -> i32 {
    cohort_runtime::telemetry::init("info");
    // The agent's death ends the reader even while NVML blocks it (stdin's
    // end is seen only between requests). Not PR_SET_PDEATHSIG: that follows
    // the thread that started the reader, and the agent's blocking threads come and go.
    let parent = std::os::unix::process::parent_id();
    std::thread::spawn(move || {
        while std::os::unix::process::parent_id() == parent {
            std::thread::sleep(PARENT_CHECK);
        }
        std::process::exit(0);
    });
    let args = match <ReaderArgs as clap::Parser>::try_parse_from(std::env::args_os().skip(1)) {
        Ok(args) => args,
        Err(e) => {
            tracing::error!(error = %e, "bad GPU reader arguments");
            return 2;
        }
    };
    let flags =
        FakeGpuFlags { count: args.fake_gpus, islands: args.fake_gpu_islands, events_file: args.fake_gpu_events };
    let backend = match open_in_process(flags) {
        Ok(backend) => backend,
        Err(e) => {
            tracing::error!(error = %e, "the GPU reader cannot open its backend");
            return 2;
        }
    };
    let out = Arc::new(Mutex::new(std::io::stdout()));
    let send = |reply: &Reply| out.lock().map_err(|_| ()).and_then(|mut o| write_line(&mut *o, reply).map_err(|_| ()));
    let mut stdin = BufReader::new(std::io::stdin());
    loop {
        let line = match read_line(&mut stdin) {
            Ok(Some(line)) => line,
            Ok(None) => return 0,
            Err(e) => {
                tracing::error!(error = %e, "reading the agent's request failed; the GPU reader stops");
                return 1;
            }
        };
        let reply = match serde_json::from_str::<Request>(&line) {
            Ok(Request::Inventory) => {
                let inventory = backend.inventory();
                Reply::Inventory { gpus: inventory.gpus, note: inventory.note }
            }
            Ok(Request::Poll { gpus }) => Reply::Samples {
                samples: backend
                    .poll(&gpus)
                    .into_iter()
                    .map(|s| Sample { telemetry: s.telemetry, lost: s.lost })
                    .collect(),
            },
            Ok(Request::Watch { gpus }) => {
                let (tx, rx) = mpsc::channel(1024);
                let error = backend.watch_events(&gpus, tx).err();
                if error.is_none() {
                    let out = out.clone();
                    std::thread::spawn(move || forward_events(rx, &out));
                }
                Reply::Watching { error }
            }
            Ok(Request::Clear { index }) => {
                backend.clear(index);
                continue;
            }
            Err(e) => {
                tracing::error!(error = %e, "the agent sent a request the GPU reader does not know; it stops");
                return 1;
            }
        };
        if send(&reply).is_err() {
            return 0;
        }
    }
}

fn forward_events(mut events: mpsc::Receiver<RawGpuEvent>, out: &Mutex<std::io::Stdout>) {
    while let Some(event) = events.blocking_recv() {
        let reply = Reply::Event {
            index: event.index,
            uuid: event.uuid,
            kind: EventKind::from(&event.kind),
            unix_ms: event.unix_ms,
        };
        let Ok(mut out) = out.lock() else { return };
        if write_line(&mut *out, &reply).is_err() {
            return;
        }
    }
}

// ----------------------------------------------------------- the agent's side

/// The agent's side: a [`GpuBackend`] whose every call is answered by a
/// reader process.
pub struct ReaderBackend {
    program: PathBuf,
    args: Vec<OsString>,
    deadlines: Deadlines,
    state: Mutex<State>,
    /// Clears that came while a request was under way: sent before the next one.
    clears: Mutex<Vec<u32>>,
    /// Where events go, and which GPUs they are watched on (sent again to a new reader).
    watch: Arc<Mutex<Option<Watched>>>,
}

/// The GPUs whose events are watched, and where the events go.
type Watched = (Vec<GpuInfo>, mpsc::Sender<RawGpuEvent>);

#[derive(Default)]
struct State {
    live: Option<Live>,
    started: Option<Instant>,
}

/// A running reader.
struct Live {
    /// Taken by the drop.
    child: Option<Child>,
    stdin: ChildStdin,
    replies: std_mpsc::Receiver<Reply>,
}

impl Drop for Live {
    fn drop(&mut self) {
        // Killed outright, healthy or stuck: it holds nothing that needs an
        // orderly end. Reaped on a thread of its own: a process inside the
        // driver may take a while to go.
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            std::thread::spawn(move || {
                let _ = child.wait();
            });
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum CallError {
    #[error("cannot start the GPU reader {program}: {error}")]
    Start { program: String, error: std::io::Error },
    #[error("the GPU reader was started {0:?} ago; the next start waits")]
    Pausing(Duration),
    #[error("the GPU reader exited")]
    Exited,
    #[error("the GPU reader did not answer within {0:?}; it is stopped and started again")]
    Deadline(Duration),
    #[error("the GPU reader answered out of turn: {0}")]
    Unexpected(String),
    #[error("writing to the GPU reader failed: {0}")]
    Write(std::io::Error),
}

impl ReaderBackend {
    /// A backend whose reader is `program args...` (the agent's own binary
    /// with `gpu-reader` and its flags). Nothing starts until the first call.
    pub fn new(program: PathBuf, args: Vec<OsString>, deadlines: Deadlines) -> Self {
        Self {
            program,
            args,
            deadlines,
            state: Mutex::new(State::default()),
            clears: Mutex::new(Vec::new()),
            watch: Arc::new(Mutex::new(None)),
        }
    }

    /// The agent's binary as reader, with the fake's flags when they ask for it.
    pub fn this_binary(fake: &FakeGpuFlags) -> Self {
        let mut args: Vec<OsString> = vec![SUBCOMMAND.into()];
        if let Some(count) = fake.count {
            args.extend(["--fake-gpus".into(), count.to_string().into()]);
        }
        if let Some(islands) = &fake.islands {
            let sizes: Vec<String> = islands.iter().map(u32::to_string).collect();
            args.extend(["--fake-gpu-islands".into(), sizes.join(",").into()]);
        }
        if let Some(file) = &fake.events_file {
            args.extend(["--fake-gpu-events".into(), file.clone().into_os_string()]);
        }
        Self::new(PathBuf::from("/proc/self/exe"), args, Deadlines::default())
    }

    /// The running reader's process id (tests).
    pub fn reader_pid(&self) -> Option<u32> {
        self.state.lock().ok()?.live.as_ref().and_then(|l| l.child.as_ref()).map(Child::id)
    }

    fn start(&self) -> Result<Live, CallError> {
        let program = self.program.display().to_string();
        let mut child = Command::new(&self.program)
            .args(&self.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|error| CallError::Start { program: program.clone(), error })?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            let _ = child.kill();
            let _ = child.wait();
            let error = std::io::Error::other("no pipes");
            return Err(CallError::Start { program, error });
        };
        let (tx, replies) = std_mpsc::channel();
        let watch = self.watch.clone();
        let pid = child.id();
        std::thread::Builder::new()
            .name("gpu-reader-out".into())
            .spawn(move || read_replies(BufReader::new(stdout), &tx, &watch, pid))
            .map_err(|error| CallError::Start { program, error })?;
        tracing::info!(pid, "GPU reader started");
        Ok(Live { child: Some(child), stdin, replies })
    }

    /// Sends `request` and waits for its answer (none for a clear).
    fn call(&self, request: &Request, deadline: Duration) -> Result<Option<Reply>, CallError> {
        let mut state = self.state.lock().map_err(|_| CallError::Exited)?;
        if state.live.is_none() {
            if let Some(since) = state.started.map(|s| s.elapsed()).filter(|s| *s < self.deadlines.restart_pause) {
                return Err(CallError::Pausing(since));
            }
            state.started = Some(Instant::now());
            let mut live = self.start()?;
            // A new reader watches what the last one did.
            let watched = self.watch.lock().ok().and_then(|w| w.as_ref().map(|(gpus, _)| gpus.clone()));
            if let Some(gpus) = watched.filter(|_| !matches!(request, Request::Watch { .. })) {
                match exchange(&mut live, &Request::Watch { gpus }, self.deadlines.poll) {
                    Ok(Some(Reply::Watching { error: None })) => {}
                    Ok(other) => tracing::warn!(?other, "the new GPU reader does not watch events"),
                    Err(e) => {
                        tracing::warn!(error = %e, "the new GPU reader does not watch events");
                        return Err(e);
                    }
                }
            }
            state.live = Some(live);
        }
        let Some(live) = state.live.as_mut() else { return Err(CallError::Exited) };
        let clears = self.clears.lock().map(|mut c| std::mem::take(&mut *c)).unwrap_or_default();
        let answer = clears
            .into_iter()
            .try_for_each(|index| write_line(&mut live.stdin, &Request::Clear { index }).map_err(CallError::Write))
            .and_then(|()| exchange(live, request, deadline));
        if answer.is_err() {
            // Stopped now (Live's drop), started again at a later call.
            state.live = None;
        }
        answer
    }
}

/// One request and its answer on a live reader.
fn exchange(live: &mut Live, request: &Request, deadline: Duration) -> Result<Option<Reply>, CallError> {
    // An answer that came after its deadline must not be taken for this one's.
    while live.replies.try_recv().is_ok() {}
    write_line(&mut live.stdin, request).map_err(CallError::Write)?;
    if matches!(request, Request::Clear { .. }) {
        return Ok(None);
    }
    match live.replies.recv_timeout(deadline) {
        Ok(reply) => Ok(Some(reply)),
        Err(std_mpsc::RecvTimeoutError::Timeout) => Err(CallError::Deadline(deadline)),
        Err(std_mpsc::RecvTimeoutError::Disconnected) => Err(CallError::Exited),
    }
}

/// The reader's stdout: events to the watcher, answers to the caller.
fn read_replies(mut out: impl BufRead, answers: &std_mpsc::Sender<Reply>, watch: &Mutex<Option<Watched>>, pid: u32) {
    loop {
        let line = match read_line(&mut out) {
            Ok(Some(line)) => line,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(pid, error = %e, "reading the GPU reader's output failed");
                return;
            }
        };
        match serde_json::from_str::<Reply>(&line) {
            Ok(Reply::Event { index, uuid, kind, unix_ms }) => {
                let sink = watch.lock().ok().and_then(|w| w.as_ref().map(|(_, sink)| sink.clone()));
                if let Some(sink) = sink {
                    let _ = sink.blocking_send(RawGpuEvent { index, uuid, kind: kind.into(), unix_ms });
                }
            }
            Ok(reply) => {
                if answers.send(reply).is_err() {
                    return;
                }
            }
            Err(e) => {
                tracing::warn!(pid, error = %e, "the GPU reader wrote a line that is not an answer; it is ignored")
            }
        }
    }
}

impl GpuBackend for ReaderBackend {
    fn inventory(&self) -> Inventory {
        match self.call(&Request::Inventory, self.deadlines.inventory) {
            // `cohort nodes` says where the GPUs are read.
            Ok(Some(Reply::Inventory { gpus, note })) => {
                Inventory { gpus, note: format!("{note} (in a gpu-reader process)") }
            }
            Ok(other) => Inventory { gpus: Vec::new(), note: CallError::Unexpected(format!("{other:?}")).to_string() },
            Err(e) => Inventory { gpus: Vec::new(), note: e.to_string() },
        }
    }

    fn poll(&self, gpus: &[GpuInfo]) -> Vec<GpuSample> {
        match self.call(&Request::Poll { gpus: gpus.to_vec() }, self.deadlines.poll) {
            Ok(Some(Reply::Samples { samples })) => {
                samples.into_iter().map(|s| GpuSample { telemetry: s.telemetry, lost: s.lost }).collect()
            }
            Ok(other) => {
                tracing::warn!(error = %CallError::Unexpected(format!("{other:?}")), "no GPU telemetry this poll");
                Vec::new()
            }
            Err(CallError::Pausing(_)) => Vec::new(),
            Err(e) => {
                tracing::warn!(error = %e, "no GPU telemetry this poll");
                Vec::new()
            }
        }
    }

    fn watch_events(&self, gpus: &[GpuInfo], sink: mpsc::Sender<RawGpuEvent>) -> Result<(), String> {
        if let Ok(mut watch) = self.watch.lock() {
            *watch = Some((gpus.to_vec(), sink));
        }
        match self.call(&Request::Watch { gpus: gpus.to_vec() }, self.deadlines.poll) {
            Ok(Some(Reply::Watching { error: None })) => Ok(()),
            Ok(Some(Reply::Watching { error: Some(e) })) => {
                if let Ok(mut watch) = self.watch.lock() {
                    *watch = None;
                }
                Err(e)
            }
            Ok(other) => Err(CallError::Unexpected(format!("{other:?}")).to_string()),
            Err(e) => Err(e.to_string()),
        }
    }

    fn clear(&self, index: u32) {
        // Never waits for a request under way: then the clear goes before the next one.
        if let Ok(mut state) = self.state.try_lock()
            && let Some(live) = state.live.as_mut()
        {
            let _ = write_line(&mut live.stdin, &Request::Clear { index });
            return;
        }
        if let Ok(mut clears) = self.clears.lock() {
            clears.push(index);
        }
    }
}
