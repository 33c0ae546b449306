//! The agent's connection to the controller: register, then one stream with
//! heartbeats, process events and logs going up and commands coming down.
//! A broken stream is re-dialled with capped exponential backoff; running
//! processes are not touched by a disconnect.

use std::collections::HashMap;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use cohort_proto::agent_service_client::AgentServiceClient;
use cohort_proto::{
    AgentMessage, CommandAck, ControllerMessage, Heartbeat, Hello, LogBatch, LogLine, MetricsBatch, NodeInfo,
    RegisterRequest, agent_message::Msg, controller_message::Command, now_unix_ms,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use crate::prepare::Preparer;
use crate::supervisor::{Outbound, Supervisor};

/// Log lines are shipped in batches at this cadence.
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
}

pub struct SessionConfig {
    pub controller_url: String,
    pub node: NodeInfo,
    pub max_backoff: Duration,
}

/// Keeps a session to the controller open until `shutdown` fires.
pub async fn run(
    config: SessionConfig,
    supervisor: Supervisor,
    preparer: Preparer,
    mut outbound: mpsc::Receiver<Outbound>,
    mut shutdown: watch::Receiver<bool>,
) {
    let backoff = || {
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(config.max_backoff)
            .with_jitter()
            .without_max_times()
            .build()
    };
    let mut delays = backoff();
    loop {
        let started = tokio::time::Instant::now();
        let result = tokio::select! {
            r = session(&config, &supervisor, &preparer, &mut outbound) => r,
            _ = shutdown.changed() => return,
        };
        match result {
            Ok(()) => tracing::warn!("controller ended the session; reconnecting"),
            Err(e) => tracing::warn!(error = %e, "session to the controller failed; ranks keep running, reconnecting"),
        }
        if started.elapsed() > Duration::from_secs(30) {
            delays = backoff();
        }
        let delay = delays.next().unwrap_or(config.max_backoff);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.changed() => return,
        }
    }
}

async fn connect(url: &str) -> Result<Channel, SessionError> {
    let url = if url.contains("://") { url.to_string() } else { format!("http://{url}") };
    Endpoint::from_shared(url.clone())
        .map_err(|source| SessionError::Url { url: url.clone(), source })?
        .connect_timeout(Duration::from_secs(3))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|source| SessionError::Connect { url, source })
}

async fn session(
    config: &SessionConfig,
    supervisor: &Supervisor,
    preparer: &Preparer,
    outbound: &mut mpsc::Receiver<Outbound>,
) -> Result<(), SessionError> {
    let mut client =
        AgentServiceClient::new(connect(&config.controller_url).await?).max_decoding_message_size(16 << 20);
    let running = supervisor.report(true).await;
    let registered = client.register(RegisterRequest { node: Some(config.node.clone()), running }).await?.into_inner();
    let interval = Duration::from_millis(u64::from(registered.heartbeat_interval_ms.max(100)));
    let (tx, rx) = mpsc::channel::<AgentMessage>(1024);
    let hello = Hello { node_name: config.node.name.clone(), session_id: registered.session_id };
    tx.send(AgentMessage { msg: Some(Msg::Hello(hello)) }).await.map_err(|_| SessionError::Closed)?;
    let mut inbound = client.session(ReceiverStream::new(rx)).await?.into_inner();
    tracing::info!(controller = %config.controller_url, "connected and registered");
    // A controller that restarted has not seen this node's environment yet.
    let report = preparer.report.borrow().clone();
    if let Some(report) = report {
        tx.send(AgentMessage { msg: Some(Msg::Preflight(report)) }).await.map_err(|_| SessionError::Closed)?;
    }

    let mut heartbeat = tokio::time::interval(interval);
    let mut flush = tokio::time::interval(LOG_FLUSH);
    let mut seq = 0u64;
    let mut pending: HashMap<(String, u32), Vec<LogLine>> = HashMap::new();
    let send = |msg: Msg| {
        let tx = tx.clone();
        async move { tx.send(AgentMessage { msg: Some(msg) }).await.map_err(|_| SessionError::Closed) }
    };
    loop {
        tokio::select! {
            _ = heartbeat.tick() => {
                seq += 1;
                let running = supervisor.report(false).await;
                send(Msg::Heartbeat(Heartbeat { seq, sent_unix_ms: now_unix_ms(), running, gpus: Vec::new() })).await?;
            }
            _ = flush.tick() => {
                for ((job_id, attempt), lines) in pending.drain() {
                    send(Msg::Logs(LogBatch { job_id, attempt, lines, fetch_command_id: 0 })).await?;
                }
            }
            item = outbound.recv() => match item {
                Some(Outbound::Metrics { job_id, attempt, point }) => {
                    // Metrics follow the lines they were parsed from.
                    if let Some(lines) = pending.remove(&(job_id.clone(), attempt)) {
                        send(Msg::Logs(LogBatch { job_id: job_id.clone(), attempt, lines, fetch_command_id: 0 })).await?;
                    }
                    send(Msg::Metrics(MetricsBatch { job_id, attempt, points: vec![point] })).await?;
                }
                Some(Outbound::Line { job_id, attempt, line }) => {
                    let batch = pending.entry((job_id.clone(), attempt)).or_default();
                    batch.push(line);
                    if batch.len() >= MAX_BATCH {
                        let lines = std::mem::take(batch);
                        send(Msg::Logs(LogBatch { job_id, attempt, lines, fetch_command_id: 0 })).await?;
                    }
                }
                Some(Outbound::Message(msg)) => {
                    // A process event follows the lines printed before it.
                    if let Some(Msg::ProcessEvent(ev)) = &msg.msg
                        && let Some(lines) = pending.remove(&(ev.job_id.clone(), ev.attempt))
                    {
                        send(Msg::Logs(LogBatch { job_id: ev.job_id.clone(), attempt: ev.attempt, lines, fetch_command_id: 0 })).await?;
                    }
                    tx.send(msg).await.map_err(|_| SessionError::Closed)?;
                }
                None => return Ok(()),
            },
            message = inbound.message() => match message? {
                Some(command) => {
                    if let Some(ack) = handle(supervisor, preparer, command).await {
                        send(Msg::Ack(ack)).await?;
                    }
                }
                None => return Ok(()),
            },
        }
    }
}

/// Carries out one command. Stops run in the background (they wait out a
/// grace period); launches complete before the acknowledgement.
/// Returns the acknowledgement to send, if the command wants one.
async fn handle(supervisor: &Supervisor, preparer: &Preparer, message: ControllerMessage) -> Option<CommandAck> {
    let command_id = message.command_id;
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
            let supervisor = supervisor.clone();
            tokio::spawn(async move {
                supervisor.stop(&stop.job_id, stop.attempt, Duration::from_millis(u64::from(stop.grace_ms))).await;
            });
            Ok(())
        }
        Some(Command::Prepare(prepare)) => {
            tracing::info!(job = %prepare.job_id, attempt = prepare.attempt, "prepare");
            let preparer = preparer.clone();
            tokio::spawn(async move { preparer.prepare(prepare).await });
            Ok(())
        }
        Some(Command::FindCheckpoint(find)) => {
            let preparer = preparer.clone();
            tokio::spawn(async move { preparer.find_checkpoint(command_id, find).await });
            Ok(())
        }
        Some(Command::HeartbeatAck(_)) => return None,
        Some(Command::ClearGpu(clear)) => {
            tracing::info!(gpu = clear.index, "GPU cleared by an operator");
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
