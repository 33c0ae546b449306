//! The agent's connection to the controller: register, then one stream with
//! heartbeats, process events and logs going up and commands coming down.
//! A broken stream is re-dialled with capped exponential backoff, trying each
//! controller of the list and following a standby's pointer to the leader;
//! running processes are not touched by a disconnect. But an agent that has
//! not heard a controller acknowledge a heartbeat for `fence_after` stops its
//! ranks (fencing): by then the controller has called the node lost and may
//! run the job elsewhere, and two attempts of a job must never run at once.

mod reconnect;

use std::collections::HashMap;
use std::time::Duration;

use cohort_proto::agent_service_client::AgentServiceClient;
use cohort_proto::{
    AgentMessage, CommandAck, ControllerMessage, Heartbeat, Hello, LogBatch, LogLine, MetricsBatch, NodeInfo,
    RegisterRequest, agent_message::Msg, controller_message::Command, now_unix_ms,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use crate::prepare::Preparer;
use crate::supervisor::{MAX_LOG_BATCH_BYTES, Outbound, Supervisor};

pub use reconnect::{Reconnect, leader_hint, silent_limit};

/// Log lines are shipped in batches at this cadence, or sooner when a batch
/// reaches [`MAX_BATCH`] lines or [`MAX_LOG_BATCH_BYTES`].
const LOG_FLUSH: Duration = Duration::from_millis(50);
const MAX_BATCH: usize = 1000;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("invalid controller URL {url:?}: {source}")]
    Url { url: String, source: tonic::transport::Error },
    #[error("cannot connect to {url}: {source}")]
    Connect { url: String, source: tonic::transport::Error },
    #[error("controller refused: {0}")]
    Rpc(#[from] tonic::Status),
    #[error("the stream to the controller closed")]
    Closed,
    #[error("no heartbeat acknowledged for {0:?}")]
    Silent(Duration),
    #[error("the controller accepted the connection but did not answer {0} within {1:?}")]
    NoAnswer(&'static str, Duration),
    #[error("{0}: plaintext http:// while this agent uses TLS (run both sides with --insecure, or use https://)")]
    Plaintext(String),
    #[error(transparent)]
    Tls(#[from] cohort_runtime::tls::TlsError),
}

/// How long Register, and opening the session stream, may take: a controller
/// that accepts the connection but never answers (stopped, stuck) must not hold
/// the agent forever; it tries the next controller instead.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(15);

/// `call`'s result, or [`SessionError::NoAnswer`] after [`ANSWER_TIMEOUT`].
async fn answered<T, E: Into<SessionError>>(
    what: &'static str,
    call: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, SessionError> {
    match tokio::time::timeout(ANSWER_TIMEOUT, call).await {
        Ok(result) => result.map_err(Into::into),
        Err(_) => Err(SessionError::NoAnswer(what, ANSWER_TIMEOUT)),
    }
}

pub struct SessionConfig {
    /// Every controller's URL; any of them leads or points at the leader.
    pub controller_urls: Vec<String>,
    pub node: NodeInfo,
    pub max_backoff: Duration,
    /// Stop the ranks after this long without an acknowledged heartbeat.
    pub fence_after: Duration,
    /// The node's GPUs: heartbeats carry their latest telemetry, ClearGpu resets their health.
    pub gpus: crate::gpu::GpuMonitor,
    /// The node's certificate and the cluster CA (None: --insecure, plaintext).
    pub tls: Option<cohort_runtime::tls::ClientTls>,
}

/// When a controller last acknowledged this agent, shared by the session and
/// the fence; with a lease file, also as that file's modification time, which
/// the shims watch (they fence their ranks even when the agent is dead).
#[derive(Clone)]
pub struct Liveness(std::sync::Arc<std::sync::Mutex<tokio::time::Instant>>, Option<std::sync::Arc<std::path::PathBuf>>);

impl Liveness {
    pub fn new() -> Self {
        Self(std::sync::Arc::new(std::sync::Mutex::new(tokio::time::Instant::now())), None)
    }
    pub fn with_lease_file(path: std::path::PathBuf) -> Self {
        Self(std::sync::Arc::new(std::sync::Mutex::new(tokio::time::Instant::now())), Some(std::sync::Arc::new(path)))
    }
    fn touch(&self) {
        if let Ok(mut t) = self.0.lock() {
            *t = tokio::time::Instant::now();
        }
        if let Some(path) = &self.1 {
            let renewed = std::fs::File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(path.as_path())
                .and_then(|f| f.set_modified(std::time::SystemTime::now()));
            if let Err(e) = renewed {
                tracing::warn!(path = %path.display(), error = %e, "cannot renew the controller lease file");
            }
        }
    }
    fn since(&self) -> Duration {
        self.0.lock().map(|t| t.elapsed()).unwrap_or_default()
    }
}

impl Default for Liveness {
    fn default() -> Self {
        Self::new()
    }
}

/// Stops every rank once no controller has acknowledged a heartbeat for
/// `fence_after`; runs until `shutdown`.
pub async fn fence(
    liveness: Liveness,
    fence_after: Duration,
    supervisor: Supervisor,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let silent = liveness.since();
        if silent >= fence_after && !supervisor.report(false).await.is_empty() {
            tracing::error!(
                silent = ?silent,
                fence_after = ?fence_after,
                "no controller reachable: fencing, stopping every rank so that no second attempt overlaps"
            );
            supervisor.stop_all().await;
        }
    }
}

/// Keeps a session to a controller open until `shutdown` fires.
pub async fn run(
    config: SessionConfig,
    supervisor: Supervisor,
    preparer: Preparer,
    liveness: Liveness,
    mut outbound: mpsc::Receiver<Outbound>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut reconnect = Reconnect::new(config.controller_urls.clone(), config.max_backoff);
    // The session this process holds: presented when it registers again, so
    // the controller tells this agent reconnecting from a second one.
    let mut held_session = String::new();
    loop {
        let url = reconnect.url();
        let started = tokio::time::Instant::now();
        let result = tokio::select! {
            r = session(&config, &url, &supervisor, &preparer, &liveness, &mut outbound, &mut held_session) => r,
            _ = shutdown.changed() => return,
        };
        match result {
            Ok(()) => tracing::warn!(controller = %url, "controller ended the session; reconnecting"),
            Err(SessionError::Rpc(status)) if status.code() == tonic::Code::FailedPrecondition => {
                // A standby names the leader: go there at once.
                match leader_hint(status.message()) {
                    Some(leader) if leader != url => {
                        tracing::info!(standby = %url, leader = %leader, "redirected to the leader");
                        reconnect.redirect_to(leader);
                        continue;
                    }
                    _ => {
                        tracing::warn!(controller = %url, error = %status.message(), "controller is not leading; trying the next")
                    }
                }
            }
            Err(SessionError::Rpc(status)) if status.code() == tonic::Code::AlreadyExists => {
                tracing::error!(
                    controller = %url,
                    error = %status.message(),
                    "refused: another agent holds this node name; retrying in case it goes away"
                )
            }
            Err(e) => {
                tracing::warn!(controller = %url, error = %e, "session to the controller failed; ranks keep running, reconnecting")
            }
        }
        let delay = reconnect.failed(started.elapsed());
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.changed() => return,
        }
    }
}

async fn connect(url: &str, tls: Option<&cohort_runtime::tls::ClientTls>) -> Result<Channel, SessionError> {
    let url = if url.contains("://") {
        url.to_string()
    } else {
        format!("{}://{url}", if tls.is_some() { "https" } else { "http" })
    };
    let mut endpoint = Endpoint::from_shared(url.clone())
        .map_err(|source| SessionError::Url { url: url.clone(), source })?
        .connect_timeout(Duration::from_secs(3))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5));
    if let Some(tls) = tls {
        if url.starts_with("http://") {
            return Err(SessionError::Plaintext(url));
        }
        endpoint = tls.apply(endpoint)?;
    }
    endpoint.connect().await.map_err(|source| SessionError::Connect { url, source })
}

async fn session(
    config: &SessionConfig,
    url: &str,
    supervisor: &Supervisor,
    preparer: &Preparer,
    liveness: &Liveness,
    outbound: &mut mpsc::Receiver<Outbound>,
    held_session: &mut String,
) -> Result<(), SessionError> {
    let channel = answered("the connection handshake", connect(url, config.tls.as_ref())).await?;
    preparer.controller.send_replace(Some(channel.clone()));
    let mut client = AgentServiceClient::new(channel).max_decoding_message_size(16 << 20);
    let running = supervisor.report(true).await;
    let register = client.register(RegisterRequest {
        node: Some(config.node.clone()),
        running,
        previous_session_id: held_session.clone(),
    });
    let registered = answered("Register", register).await?.into_inner();
    held_session.clone_from(&registered.session_id);
    let interval = Duration::from_millis(u64::from(registered.heartbeat_interval_ms.max(100)));
    let (tx, rx) = mpsc::channel::<AgentMessage>(1024);
    let hello = Hello { node_name: config.node.name.clone(), session_id: registered.session_id };
    tx.send(AgentMessage { msg: Some(Msg::Hello(hello)) }).await.map_err(|_| SessionError::Closed)?;
    let mut inbound = answered("Session", client.session(ReceiverStream::new(rx))).await?.into_inner();
    tracing::info!(controller = %url, "connected and registered");
    liveness.touch();
    // A controller that restarted has not seen this node's environment yet.
    let report = preparer.report.borrow().clone();
    if let Some(report) = report {
        tx.send(AgentMessage { msg: Some(Msg::Preflight(report)) }).await.map_err(|_| SessionError::Closed)?;
    }

    let mut heartbeat = tokio::time::interval(interval);
    // A stream that stops acknowledging (a silent partition keeps TCP open) is
    // abandoned for another controller well before the fence.
    let silent_limit = silent_limit(interval, config.fence_after);
    let mut last_ack = tokio::time::Instant::now();
    let mut flush = tokio::time::interval(LOG_FLUSH);
    let mut seq = 0u64;
    let mut pending: HashMap<(String, u32), PendingLines> = HashMap::new();
    let send = |msg: Msg| {
        let tx = tx.clone();
        async move { tx.send(AgentMessage { msg: Some(msg) }).await.map_err(|_| SessionError::Closed) }
    };
    loop {
        tokio::select! {
            _ = heartbeat.tick() => {
                if last_ack.elapsed() > silent_limit {
                    return Err(SessionError::Silent(last_ack.elapsed()));
                }
                seq += 1;
                let running = supervisor.report(false).await;
                let gpus = config.gpus.latest();
                send(Msg::Heartbeat(Heartbeat { seq, sent_unix_ms: now_unix_ms(), running, gpus })).await?;
            }
            _ = flush.tick() => {
                for ((job_id, attempt), pending) in pending.drain() {
                    send(Msg::Logs(LogBatch { job_id, attempt, lines: pending.lines, fetch_command_id: 0 })).await?;
                }
            }
            item = outbound.recv() => match item {
                Some(Outbound::Metrics { job_id, attempt, point }) => {
                    // Metrics follow the lines they were parsed from.
                    if let Some(pending) = pending.remove(&(job_id.clone(), attempt)) {
                        send(Msg::Logs(LogBatch { job_id: job_id.clone(), attempt, lines: pending.lines, fetch_command_id: 0 })).await?;
                    }
                    send(Msg::Metrics(MetricsBatch { job_id, attempt, points: vec![point] })).await?;
                }
                Some(Outbound::Line { job_id, attempt, line }) => {
                    let batch = pending.entry((job_id.clone(), attempt)).or_default();
                    if let Some(lines) = batch.push(line) {
                        send(Msg::Logs(LogBatch { job_id, attempt, lines, fetch_command_id: 0 })).await?;
                    }
                }
                Some(Outbound::Message(msg)) => {
                    // A process event follows the lines printed before it.
                    if let Some(Msg::ProcessEvent(ev)) = &msg.msg
                        && let Some(pending) = pending.remove(&(ev.job_id.clone(), ev.attempt))
                    {
                        send(Msg::Logs(LogBatch { job_id: ev.job_id.clone(), attempt: ev.attempt, lines: pending.lines, fetch_command_id: 0 })).await?;
                    }
                    tx.send(msg).await.map_err(|_| SessionError::Closed)?;
                }
                None => return Ok(()),
            },
            message = inbound.message() => match message? {
                Some(ControllerMessage { command: Some(Command::HeartbeatAck(_)), .. }) => {
                    last_ack = tokio::time::Instant::now();
                    liveness.touch();
                }
                Some(command) => {
                    if let Some(ack) = handle(supervisor, preparer, &config.gpus, command).await {
                        send(Msg::Ack(ack)).await?;
                    }
                }
                None => return Ok(()),
            },
        }
    }
}

/// A launch's lines waiting for the next flush.
#[derive(Default)]
struct PendingLines {
    lines: Vec<LogLine>,
    bytes: usize,
}

impl PendingLines {
    /// Adds a line; returns the lines to send now when the batch is full by
    /// count or by bytes (a line is at most 64 KiB: a batch stays near 1 MiB).
    fn push(&mut self, line: LogLine) -> Option<Vec<LogLine>> {
        self.bytes += line.text.len() + 32;
        self.lines.push(line);
        if self.lines.len() < MAX_BATCH && self.bytes < MAX_LOG_BATCH_BYTES {
            return None;
        }
        self.bytes = 0;
        Some(std::mem::take(&mut self.lines))
    }
}

/// Carries out one command. Stops run in the background (they wait out a
/// grace period); launches complete before the acknowledgement.
/// Returns the acknowledgement to send, if the command wants one.
async fn handle(
    supervisor: &Supervisor,
    preparer: &Preparer,
    gpus: &crate::gpu::GpuMonitor,
    message: ControllerMessage,
) -> Option<CommandAck> {
    let command_id = message.command_id;
    if let Err(e) = crate::commands::check(&message) {
        tracing::warn!(command = command_id, error = %e, "refusing a controller command");
        // A refused launch starts nothing: say so for every process, so the gang fails now.
        if let Some(Command::Launch(launch)) = &message.command {
            for process in &launch.processes {
                supervisor.spawn_failed(&launch.job_id, launch.attempt, process.index, e.to_string()).await;
            }
        }
        return Some(CommandAck { command_id, ok: false, error: e.to_string() });
    }
    let result = match message.command {
        Some(Command::Launch(launch)) => {
            tracing::info!(job = %launch.job_id, attempt = launch.attempt, node_rank = launch.node_rank, processes = launch.processes.len(), "launch");
            let (job_id, attempt) = (launch.job_id.clone(), launch.attempt);
            let indices: Vec<u32> = launch.processes.iter().map(|p| p.index).collect();
            match supervisor.launch(launch).await {
                Ok(()) => Ok(()),
                Err(e @ crate::supervisor::LaunchError::Duplicate { .. }) => Err(e.to_string()),
                Err(e) => {
                    // Nothing started: say so for every process, so the gang fails now.
                    tracing::warn!(job = %job_id, error = %e, "launch failed");
                    for index in indices {
                        supervisor.spawn_failed(&job_id, attempt, index, e.to_string()).await;
                    }
                    Err(e.to_string())
                }
            }
        }
        Some(Command::Stop(stop)) => {
            tracing::info!(job = %stop.job_id, attempt = stop.attempt, reason = %stop.reason, "stop");
            preparer.abort(&stop.job_id, stop.attempt);
            let supervisor = supervisor.clone();
            let save = preemption_signal(&stop);
            tokio::spawn(async move {
                let grace = Duration::from_millis(u64::from(stop.grace_ms));
                supervisor.stop_after(&stop.job_id, stop.attempt, grace, save).await;
            });
            Ok(())
        }
        Some(Command::Prepare(prepare)) => {
            tracing::info!(job = %prepare.job_id, attempt = prepare.attempt, "prepare");
            preparer.spawn_prepare(prepare);
            Ok(())
        }
        Some(Command::StageDigest(digest)) => {
            preparer.stage_digest(digest);
            Ok(())
        }
        Some(Command::FindCheckpoint(find)) => {
            let preparer = preparer.clone();
            tokio::spawn(async move { preparer.find_checkpoint(command_id, find).await });
            Ok(())
        }
        Some(Command::SwiftArgcheck(check)) => {
            let preparer = preparer.clone();
            tokio::spawn(async move { preparer.check_swift_args(command_id, check).await });
            Ok(())
        }
        Some(Command::InspectPath(inspect)) => {
            let preparer = preparer.clone();
            tokio::spawn(async move { preparer.inspect_path(command_id, inspect).await });
            Ok(())
        }
        Some(Command::Cache(cache)) => {
            let preparer = preparer.clone();
            tokio::spawn(async move { preparer.answer_cache(command_id, cache).await });
            Ok(())
        }
        Some(Command::HeartbeatAck(_)) => return None, // handled by the session loop
        Some(Command::ClearGpu(clear)) => {
            tracing::info!(gpu = clear.index, "GPU cleared by an operator");
            gpus.clear(clear.index).await.map(|_| ())
        }
        Some(Command::DumpStacks(dump)) => {
            tracing::warn!(job = %dump.job_id, attempt = dump.attempt, "dumping stacks (hang)");
            let supervisor = supervisor.clone();
            tokio::spawn(async move { supervisor.dump_stacks(command_id, dump).await });
            Ok(())
        }
        Some(Command::FetchLogs(fetch)) => {
            let supervisor = supervisor.clone();
            tokio::spawn(async move { supervisor.fetch_logs(command_id, fetch).await });
            Ok(())
        }
        None => Err("empty command: this agent may be older than the controller".to_string()),
    };
    Some(match result {
        Ok(()) => CommandAck { command_id, ok: true, error: String::new() },
        Err(error) => CommandAck { command_id, ok: false, error },
    })
}

/// A stop's preemption signal and how long the ranks get to save; None for a
/// plain stop, or (with a warning) for a signal this agent does not send.
fn preemption_signal(stop: &cohort_proto::StopCommand) -> Option<(nix::sys::signal::Signal, Duration)> {
    if stop.first_signal.is_empty() {
        return None;
    }
    let allowed = cohort_shared::spec::PREEMPT_SIGNALS.contains(&stop.first_signal.as_str());
    match stop.first_signal.parse::<nix::sys::signal::Signal>() {
        Ok(signal) if allowed => Some((signal, Duration::from_millis(u64::from(stop.first_signal_grace_ms)))),
        _ => {
            tracing::warn!(job = %stop.job_id, signal = %stop.first_signal, "not a preemption signal this agent sends; a plain stop");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_signals_a_job_may_ask_for_are_sent_before_a_stop() {
        let stop = |signal: &str| cohort_proto::StopCommand {
            first_signal: signal.into(),
            first_signal_grace_ms: 1500,
            ..Default::default()
        };
        assert_eq!(preemption_signal(&stop("")), None, "a plain stop");
        let usr1 = Some((nix::sys::signal::Signal::SIGUSR1, Duration::from_millis(1500)));
        assert_eq!(preemption_signal(&stop("SIGUSR1")), usr1);
        assert_eq!(preemption_signal(&stop("SIGKILL")), None, "never a signal that cannot be caught");
        assert_eq!(preemption_signal(&stop("USR1")), None);
    }

    /// Finding 12: 1000 lines of 64 KiB made one 64 MiB message, over the controller's 16 MiB limit.
    #[test]
    fn a_batch_of_long_lines_is_sent_before_it_passes_a_mebibyte() {
        let mut pending = PendingLines::default();
        let mut sent = Vec::new();
        for _ in 0..1000 {
            let line = LogLine { text: "x".repeat(64 * 1024), ..LogLine::default() };
            if let Some(lines) = pending.push(line) {
                sent.push(lines);
            }
        }
        assert!(sent.len() >= 60, "{} batches", sent.len());
        for batch in &sent {
            let encoded = prost::Message::encoded_len(&LogBatch { lines: batch.clone(), ..LogBatch::default() });
            assert!(encoded <= MAX_LOG_BATCH_BYTES + 64 * 1024, "a batch of {encoded} bytes");
        }
    }
}
