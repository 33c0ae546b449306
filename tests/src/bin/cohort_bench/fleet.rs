//! Simulated agents: N tasks in this process, each a real gRPC client of the
//! controller with its own channel (one HTTP/2 connection, as a real agent
//! has), doing what `cohort-agent` does on the wire: Register with 8 fake GPUs,
//! one Session stream, a heartbeat every interval with the GPUs' telemetry and
//! the launches it runs, process events for launches and stops, acks, and the
//! agent's reconnect policy (same backoff, standbys' "leader: URL" hints,
//! abandoning a stream whose acks stop). Nothing is spawned: a launch starts
//! its processes at once, and a `--quick` one (an argv holding `--quick`)
//! exits with code 0 right after.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cohort_agent::session::{Reconnect, leader_hint, silent_limit};
use cohort_proto::agent_service_client::AgentServiceClient;
use cohort_proto::{
    AgentMessage, CheckpointAnswer, CommandAck, ControllerMessage, GpuHealth, GpuHealthState, GpuInfo, GpuTelemetry,
    Heartbeat, Hello, NodeInfo, PrepareResult, ProcessEvent, ProcessExited, ProcessStarted, QueryResult,
    RegisterRequest, RunningLaunch, RunningProcess, agent_message::Msg, controller_message::Command, now_unix_ms,
    process_event::Event, query_result,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

/// The real agent's defaults (`cohort-agent --max-backoff`, `--fence-after`).
const MAX_BACKOFF: Duration = Duration::from_secs(10);
const FENCE_AFTER: Duration = Duration::from_secs(30);
const GPUS: u32 = 8;

pub struct FleetConfig {
    /// Every controller's URL, in the order agents try them.
    pub urls: Vec<String>,
    pub agents: usize,
    /// How many agents may connect and register at once while the fleet starts
    /// (later reconnects are not limited, as real agents are not).
    pub start_concurrency: usize,
}

/// What the agents share with the bench: counters, samples and timestamps.
pub struct Shared {
    epoch: Instant,
    /// Heartbeat latencies are kept while this is set.
    pub recording: AtomicBool,
    hb_latency_us: Mutex<Vec<u32>>,
    pub heartbeats_sent: AtomicU64,
    pub acks: AtomicU64,
    /// Sessions ended by an error or by the controller.
    pub session_breaks: AtomicU64,
    /// Sessions abandoned because no ack came for the silent limit.
    pub silent: AtomicU64,
    /// The last error that ended a session, for the report when agents do not connect.
    last_error: Mutex<String>,
    agents: Vec<AgentStatus>,
    /// Per job id: when each agent received its LaunchCommand, and its StopCommand.
    launches: Mutex<HashMap<String, Vec<Instant>>>,
    stops: Mutex<HashMap<String, Vec<Instant>>>,
}

#[derive(Default)]
struct AgentStatus {
    /// 1 + the index of the controller URL of the current session; 0 when none.
    url: AtomicUsize,
    /// µs after the epoch of the last successful Register.
    registered_us: AtomicU64,
    /// µs after the epoch of the first HeartbeatAck of the current session; 0 before it.
    acked_us: AtomicU64,
}

/// A request from the bench to one agent.
enum Control {
    /// Report process 0 of the job's launch as exited with `code`; answers when it was sent.
    Exit { job_id: String, code: i32, sent: oneshot::Sender<Option<Instant>> },
}

pub struct Fleet {
    pub shared: Arc<Shared>,
    controls: Vec<mpsc::UnboundedSender<Control>>,
    tasks: JoinSet<()>,
}

/// How the bench names simulated node `i`.
pub fn node_name(i: usize) -> String {
    format!("sim{i:05}")
}

/// The agent index of a simulated node's name.
pub fn node_index(name: &str) -> Option<usize> {
    name.strip_prefix("sim")?.parse().ok()
}

/// 127.0.x.y, distinct per node (only a string: nothing connects to it).
fn advertise_addr(i: usize) -> String {
    let k = i + 2;
    format!("127.0.{}.{}", (k >> 8) & 0xff, k & 0xff)
}

impl Fleet {
    /// Spawns the agents on the current runtime; they connect in the background.
    pub fn start(config: FleetConfig) -> Fleet {
        let shared = Arc::new(Shared {
            epoch: Instant::now(),
            recording: AtomicBool::new(false),
            hb_latency_us: Mutex::new(Vec::new()),
            heartbeats_sent: AtomicU64::new(0),
            acks: AtomicU64::new(0),
            session_breaks: AtomicU64::new(0),
            silent: AtomicU64::new(0),
            last_error: Mutex::new(String::new()),
            agents: (0..config.agents).map(|_| AgentStatus::default()).collect(),
            launches: Mutex::new(HashMap::new()),
            stops: Mutex::new(HashMap::new()),
        });
        let gate = Arc::new(Semaphore::new(config.start_concurrency.max(1)));
        let urls = Arc::new(config.urls);
        let mut tasks = JoinSet::new();
        let mut controls = Vec::with_capacity(config.agents);
        for ix in 0..config.agents {
            let (tx, rx) = mpsc::unbounded_channel();
            controls.push(tx);
            let sim = SimAgent::new(ix, shared.clone(), urls.clone());
            tasks.spawn(sim.run(gate.clone(), rx));
        }
        Fleet { shared, controls, tasks }
    }

    pub fn len(&self) -> usize {
        self.controls.len()
    }

    /// How many agents got a HeartbeatAck on a session opened after `since`
    /// (and, with `url`, to that controller).
    pub fn acked_since(&self, since: Instant, url: Option<usize>) -> (usize, Option<Instant>) {
        self.count_since(since, url, |a| &a.acked_us)
    }

    /// How many agents registered after `since` (and, with `url`, with that controller).
    pub fn registered_since(&self, since: Instant, url: Option<usize>) -> (usize, Option<Instant>) {
        self.count_since(since, url, |a| &a.registered_us)
    }

    /// (count, latest time among them).
    fn count_since(
        &self,
        since: Instant,
        url: Option<usize>,
        field: impl Fn(&AgentStatus) -> &AtomicU64,
    ) -> (usize, Option<Instant>) {
        let floor = self.shared.micros(since);
        let mut count = 0;
        let mut latest = 0;
        for a in &self.shared.agents {
            let t = field(a).load(Ordering::Acquire);
            let on_url = url.is_none_or(|u| a.url.load(Ordering::Acquire) == u + 1);
            if t >= floor && t > 0 && on_url {
                count += 1;
                latest = latest.max(t);
            }
        }
        (count, (count > 0).then(|| self.shared.epoch + Duration::from_micros(latest)))
    }

    /// Waits until every agent has been acked on a session opened after `since`.
    pub async fn wait_acked(&self, since: Instant, url: Option<usize>, within: Duration) -> anyhow::Result<Instant> {
        let deadline = Instant::now() + within;
        loop {
            let (count, latest) = self.acked_since(since, url);
            if count == self.len()
                && let Some(latest) = latest
            {
                return Ok(latest);
            }
            if Instant::now() > deadline {
                let last = self.shared.last_error.lock().map(|e| e.clone()).unwrap_or_default();
                anyhow::bail!(
                    "only {count} of {} simulated agents connected within {within:?} ({} sessions ended so far; last error: {last})",
                    self.len(),
                    self.shared.session_breaks.load(Ordering::Relaxed)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts keeping heartbeat latencies (and drops those kept before).
    pub fn start_recording(&self) {
        self.shared.hb_latency_us.lock().map(|mut v| v.clear()).unwrap_or(());
        self.shared.recording.store(true, Ordering::Release);
    }

    /// Stops keeping heartbeat latencies; returns them in ms.
    pub fn stop_recording(&self) -> Vec<f64> {
        self.shared.recording.store(false, Ordering::Release);
        let samples = self.shared.hb_latency_us.lock().map(|mut v| std::mem::take(&mut *v)).unwrap_or_default();
        samples.into_iter().map(|us| f64::from(us) / 1000.0).collect()
    }

    /// When each agent received the job's LaunchCommand.
    pub fn launches_of(&self, job_id: &str) -> Vec<Instant> {
        self.shared.launches.lock().ok().and_then(|m| m.get(job_id).cloned()).unwrap_or_default()
    }

    /// When each agent received a StopCommand for the job.
    pub fn stops_of(&self, job_id: &str) -> Vec<Instant> {
        self.shared.stops.lock().ok().and_then(|m| m.get(job_id).cloned()).unwrap_or_default()
    }

    /// Makes agent `ix` report the job's process 0 as exited with `code`;
    /// returns when the event was queued on its stream.
    pub async fn exit_process(&self, ix: usize, job_id: &str, code: i32) -> anyhow::Result<Instant> {
        let (tx, rx) = oneshot::channel();
        let control = self.controls.get(ix).ok_or_else(|| anyhow::anyhow!("no simulated agent {ix}"))?;
        control
            .send(Control::Exit { job_id: job_id.into(), code, sent: tx })
            .map_err(|_| anyhow::anyhow!("simulated agent {ix} is gone"))?;
        rx.await?.ok_or_else(|| anyhow::anyhow!("simulated agent {} does not run job {job_id}", node_name(ix)))
    }

    /// Ends every agent and waits until their tasks are gone (their connections close).
    pub async fn shutdown(mut self) {
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
    }
}

impl Shared {
    fn micros(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_micros() as u64
    }

    fn record(map: &Mutex<HashMap<String, Vec<Instant>>>, job_id: &str, at: Instant) {
        if let Ok(mut m) = map.lock() {
            m.entry(job_id.to_string()).or_default().push(at);
        }
    }
}

#[derive(Debug)]
enum SessionError {
    Connect(String),
    Rpc(tonic::Status),
    Closed,
    Silent,
    NoAnswer(&'static str),
}

impl std::fmt::Display for SessionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SessionError::Connect(e) => write!(f, "cannot connect to {e}"),
            SessionError::Rpc(status) => write!(f, "{:?}: {}", status.code(), status.message()),
            SessionError::Closed => write!(f, "the stream closed"),
            SessionError::Silent => write!(f, "no HeartbeatAck for the silent limit"),
            SessionError::NoAnswer(rpc) => write!(f, "no answer to {rpc} within 15 s"),
        }
    }
}

impl From<tonic::Status> for SessionError {
    fn from(status: tonic::Status) -> Self {
        SessionError::Rpc(status)
    }
}

struct SimAgent {
    ix: usize,
    shared: Arc<Shared>,
    urls: Arc<Vec<String>>,
    info: NodeInfo,
    telemetry: Vec<GpuTelemetry>,
    /// What it "runs", by (job, attempt).
    running: BTreeMap<(String, u32), RunningLaunch>,
}

impl SimAgent {
    fn new(ix: usize, shared: Arc<Shared>, urls: Arc<Vec<String>>) -> SimAgent {
        let gpus: Vec<GpuInfo> = (0..GPUS)
            .map(|index| GpuInfo {
                index,
                uuid: format!("GPU-sim-{ix:05}-{index}"),
                name: "simulated H100".into(),
                memory_total_bytes: 80 << 30,
                fake: true,
                ..GpuInfo::default()
            })
            .collect();
        // What the fake backend of the real agent reports for an idle H100.
        let telemetry = gpus
            .iter()
            .map(|g| GpuTelemetry {
                index: g.index,
                uuid: g.uuid.clone(),
                utilization_gpu_pct: Some(0),
                utilization_memory_pct: Some(0),
                memory_used_bytes: Some(0),
                memory_total_bytes: Some(g.memory_total_bytes),
                temperature_c: Some(34),
                power_w: Some(70.0),
                power_limit_w: Some(700.0),
                sm_clock_mhz: Some(345),
                throttle_reasons: vec!["GPU_IDLE".into()],
                ecc_volatile_corrected: Some(0),
                ecc_volatile_uncorrected: Some(0),
                health: Some(GpuHealth {
                    state: GpuHealthState::Healthy as i32,
                    reasons: Vec::new(),
                    since_unix_ms: now_unix_ms(),
                }),
                ..GpuTelemetry::default()
            })
            .collect();
        let info = NodeInfo {
            name: node_name(ix),
            advertise_addr: advertise_addr(ix),
            gpus,
            agent_version: "cohort-bench simulated agent".into(),
            gpu_note: format!("{GPUS} simulated GPUs (cohort-bench)"),
            fence_after_ms: FENCE_AFTER.as_millis() as u32,
            ..NodeInfo::default()
        };
        SimAgent { ix, shared, urls, info, telemetry, running: BTreeMap::new() }
    }

    /// The real agent's reconnect policy (`cohort_agent::session::Reconnect`): next
    /// controller on failure, at once to a named leader, capped backoff with jitter.
    async fn run(mut self, gate: Arc<Semaphore>, mut control: mpsc::UnboundedReceiver<Control>) {
        let mut reconnect = Reconnect::new(self.urls.to_vec(), MAX_BACKOFF);
        let mut permit = gate.acquire_owned().await.ok();
        let mut first = true;
        loop {
            let url = reconnect.url();
            let started = Instant::now();
            let result = self.session(&url, &mut permit, first, &mut control).await;
            first = false;
            permit = None;
            if let Some(status) = self.shared.agents.get(self.ix) {
                status.url.store(0, Ordering::Release);
            }
            self.shared.session_breaks.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = &result
                && let Ok(mut last) = self.shared.last_error.lock()
            {
                *last = e.to_string();
            }
            match result {
                Err(SessionError::Rpc(status)) if status.code() == tonic::Code::FailedPrecondition => {
                    if let Some(leader) = leader_hint(status.message()).filter(|l| *l != url) {
                        reconnect.redirect_to(leader);
                        continue;
                    }
                }
                Err(SessionError::Silent) => {
                    self.shared.silent.fetch_add(1, Ordering::Relaxed);
                }
                _ => {}
            }
            tokio::time::sleep(reconnect.failed(started.elapsed())).await;
        }
    }

    async fn session(
        &mut self,
        url: &str,
        permit: &mut Option<OwnedSemaphorePermit>,
        jittered: bool,
        control: &mut mpsc::UnboundedReceiver<Control>,
    ) -> Result<(), SessionError> {
        let channel = connect(url).await?;
        let mut client = AgentServiceClient::new(channel).max_decoding_message_size(16 << 20);
        let running = self.report();
        // As the agent: a controller that never answers is left after 15 s.
        let answer = Duration::from_secs(15);
        let registered = tokio::time::timeout(
            answer,
            client.register(RegisterRequest { node: Some(self.info.clone()), running, ..Default::default() }),
        )
        .await
        .map_err(|_| SessionError::NoAnswer("Register"))??
        .into_inner();
        *permit = None;
        let status = &self.shared.agents[self.ix];
        let url_ix = self.urls.iter().position(|u| u == url).map(|i| i + 1).unwrap_or(usize::MAX);
        status.acked_us.store(0, Ordering::Release);
        status.url.store(url_ix, Ordering::Release);
        status.registered_us.store(self.shared.micros(Instant::now()).max(1), Ordering::Release);

        let interval = Duration::from_millis(u64::from(registered.heartbeat_interval_ms.max(100)));
        let (tx, rx) = mpsc::channel::<AgentMessage>(1024);
        let hello = Hello { node_name: self.info.name.clone(), session_id: registered.session_id };
        tx.send(AgentMessage { msg: Some(Msg::Hello(hello)) }).await.map_err(|_| SessionError::Closed)?;
        let mut inbound = tokio::time::timeout(answer, client.session(ReceiverStream::new(rx)))
            .await
            .map_err(|_| SessionError::NoAnswer("Session"))??
            .into_inner();

        // The first session starts at a random phase of the interval, so that
        // heartbeats spread as they do across real nodes; reconnects tick at once.
        let offset = if jittered { interval.mul_f64(unit_random(self.ix as u64)) } else { Duration::ZERO };
        let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + offset, interval);
        let silent_limit = silent_limit(interval, FENCE_AFTER);
        let mut last_ack = Instant::now();
        let mut in_flight: VecDeque<(u64, Instant)> = VecDeque::new();
        let mut seq = 0u64;
        let send = |msg: Msg| {
            let tx = tx.clone();
            async move { tx.send(AgentMessage { msg: Some(msg) }).await.map_err(|_| SessionError::Closed) }
        };
        loop {
            tokio::select! {
                _ = heartbeat.tick() => {
                    if last_ack.elapsed() > silent_limit {
                        return Err(SessionError::Silent);
                    }
                    seq += 1;
                    let hb = Heartbeat { seq, sent_unix_ms: now_unix_ms(), running: self.report(), gpus: self.telemetry.clone() };
                    in_flight.push_back((seq, Instant::now()));
                    if in_flight.len() > 64 {
                        in_flight.pop_front();
                    }
                    send(Msg::Heartbeat(hb)).await?;
                    self.shared.heartbeats_sent.fetch_add(1, Ordering::Relaxed);
                }
                Some(request) = control.recv() => match request {
                    Control::Exit { job_id, code, sent } => {
                        let event = self.exit_one(&job_id, code);
                        let at = match event {
                            Some(event) => {
                                send(Msg::ProcessEvent(event)).await?;
                                Some(Instant::now())
                            }
                            None => None,
                        };
                        let _ = sent.send(at);
                    }
                },
                message = inbound.message() => match message? {
                    Some(ControllerMessage { command: Some(Command::HeartbeatAck(ack)), .. }) => {
                        let now = Instant::now();
                        last_ack = now;
                        self.shared.acks.fetch_add(1, Ordering::Relaxed);
                        let status = &self.shared.agents[self.ix];
                        if status.acked_us.load(Ordering::Relaxed) == 0 {
                            status.acked_us.store(self.shared.micros(now).max(1), Ordering::Release);
                        }
                        while let Some((s, sent)) = in_flight.front().copied() {
                            if s > ack.seq {
                                break;
                            }
                            in_flight.pop_front();
                            if s == ack.seq && self.shared.recording.load(Ordering::Relaxed) {
                                let us = now.duration_since(sent).as_micros().min(u128::from(u32::MAX)) as u32;
                                if let Ok(mut v) = self.shared.hb_latency_us.lock() {
                                    v.push(us);
                                }
                            }
                        }
                    }
                    Some(command) => {
                        for msg in self.handle(command) {
                            send(msg).await?;
                        }
                    }
                    None => return Ok(()),
                },
            }
        }
    }

    /// The launches it runs, as heartbeats and Register report them.
    fn report(&self) -> Vec<RunningLaunch> {
        self.running.values().cloned().collect()
    }

    /// Carries out one command at once; returns what to send back, in order.
    fn handle(&mut self, message: ControllerMessage) -> Vec<Msg> {
        let command_id = message.command_id;
        let ok = CommandAck { command_id, ok: true, error: String::new() };
        let now = Instant::now();
        match message.command {
            Some(Command::Launch(launch)) => {
                Shared::record(&self.shared.launches, &launch.job_id, now);
                let quick = launch.processes.iter().any(|p| p.argv.iter().any(|a| a == "--quick"));
                let mut out = Vec::with_capacity(2 * launch.processes.len() + 1);
                let mut processes = Vec::new();
                for p in &launch.processes {
                    let pid = 100_000 + (self.ix as u32) * 16 + p.index;
                    let started_unix_ms = now_unix_ms();
                    out.push(Msg::ProcessEvent(ProcessEvent {
                        job_id: launch.job_id.clone(),
                        attempt: launch.attempt,
                        index: p.index,
                        event: Some(Event::Started(ProcessStarted { pid, started_unix_ms, ..Default::default() })),
                    }));
                    if quick {
                        out.push(Msg::ProcessEvent(ProcessEvent {
                            job_id: launch.job_id.clone(),
                            attempt: launch.attempt,
                            index: p.index,
                            event: Some(Event::Exited(ProcessExited {
                                exit_code: Some(0),
                                ended_unix_ms: now_unix_ms(),
                                ..ProcessExited::default()
                            })),
                        }));
                    } else {
                        processes.push(RunningProcess { index: p.index, pid, started_unix_ms, exited: None });
                    }
                }
                if !processes.is_empty() {
                    let key = (launch.job_id.clone(), launch.attempt);
                    self.running
                        .insert(key, RunningLaunch { job_id: launch.job_id, attempt: launch.attempt, processes });
                }
                out.push(Msg::Ack(ok));
                out
            }
            Some(Command::Stop(stop)) => {
                Shared::record(&self.shared.stops, &stop.job_id, now);
                let mut out = Vec::new();
                if let Some(launch) = self.running.remove(&(stop.job_id.clone(), stop.attempt)) {
                    for p in launch.processes {
                        out.push(Msg::ProcessEvent(ProcessEvent {
                            job_id: stop.job_id.clone(),
                            attempt: stop.attempt,
                            index: p.index,
                            event: Some(Event::Exited(ProcessExited {
                                signal: Some(15),
                                stopped_by_agent: true,
                                ended_unix_ms: now_unix_ms(),
                                ..ProcessExited::default()
                            })),
                        }));
                    }
                }
                out.push(Msg::Ack(ok));
                out
            }
            Some(Command::Prepare(prepare)) => vec![
                Msg::Ack(ok),
                Msg::PrepareResult(PrepareResult {
                    job_id: prepare.job_id,
                    attempt: prepare.attempt,
                    ..PrepareResult::default()
                }),
            ],
            Some(Command::FindCheckpoint(_)) => vec![
                Msg::Ack(ok),
                Msg::QueryResult(QueryResult {
                    command_id,
                    error: String::new(),
                    result: Some(query_result::Result::Checkpoint(CheckpointAnswer {
                        checkpoint: None,
                        skipped: Vec::new(),
                    })),
                }),
            ],
            Some(Command::DumpStacks(dump)) => vec![
                Msg::Ack(ok),
                Msg::StackDump(cohort_proto::StackDump {
                    job_id: dump.job_id,
                    attempt: dump.attempt,
                    command_id,
                    processes: Vec::new(),
                }),
            ],
            Some(Command::FetchLogs(_) | Command::InspectPath(_) | Command::SwiftArgcheck(_) | Command::Cache(_)) => {
                vec![Msg::Ack(ok), Msg::QueryResult(QueryResult { command_id, ..QueryResult::default() })]
            }
            Some(Command::ClearGpu(_) | Command::StageDigest(_)) => vec![Msg::Ack(ok)],
            Some(Command::HeartbeatAck(_)) => Vec::new(),
            None => vec![Msg::Ack(CommandAck { command_id, ok: false, error: "empty command".into() })],
        }
    }

    /// Ends process 0 of the job's launch with `code` (the injected failure).
    fn exit_one(&mut self, job_id: &str, code: i32) -> Option<ProcessEvent> {
        let key = self.running.keys().find(|(j, _)| j == job_id).cloned()?;
        let launch = self.running.get_mut(&key)?;
        let at = launch.processes.iter().position(|p| p.index == 0)?;
        launch.processes.remove(at);
        if launch.processes.is_empty() {
            self.running.remove(&key);
        }
        Some(ProcessEvent {
            job_id: key.0,
            attempt: key.1,
            index: 0,
            event: Some(Event::Exited(ProcessExited {
                exit_code: Some(code),
                ended_unix_ms: now_unix_ms(),
                ..ProcessExited::default()
            })),
        })
    }
}

async fn connect(url: &str) -> Result<Channel, SessionError> {
    Endpoint::from_shared(url.to_string())
        .map_err(|e| SessionError::Connect(format!("{url}: {e}")))?
        .connect_timeout(Duration::from_secs(3))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| SessionError::Connect(format!("{url}: {e}")))
}

/// A number in [0, 1) from a seed and the clock (splitmix64): the start jitter.
fn unit_random(seed: u64) -> f64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_nanos();
    let mut z = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ u64::from(nanos);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}
