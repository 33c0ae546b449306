//! Agent sessions: registration and adoption of running processes, heartbeats,
//! process events, and the job transitions they cause (exit, failure, teardown).

use cohort_shared::failure::FailureCause;

use super::job_entry::ExitSeen;
use super::*;

/// Remembers GPUs the agent reports unhealthy (they stay so until cleared).
/// Returns whether one became unhealthy now.
fn record_health(entry: &mut NodeEntry, gpus: &[cohort_proto::GpuTelemetry]) -> bool {
    let mut changed = false;
    for t in gpus {
        if let Some(health) = t.health.as_ref().filter(|h| h.state == cohort_proto::GpuHealthState::Unhealthy as i32)
            && !entry.unhealthy_gpus.contains_key(&t.index)
        {
            tracing::warn!(node = %entry.info.name, gpu = t.index, reasons = ?health.reasons, "GPU unhealthy; no new work goes there");
            entry.unhealthy_gpus.insert(t.index, health.clone());
            changed = true;
        }
    }
    changed
}

impl Controller {
    // --------------------------------------------------------------- agent API

    pub async fn register(
        &self,
        req: cohort_proto::RegisterRequest,
    ) -> Result<cohort_proto::RegisterResponse, ControllerError> {
        let info =
            req.node.ok_or_else(|| ControllerError::InvalidRequest("RegisterRequest.node is required".into()))?;
        validate_node(&info)?;
        let session_id = format!("{:016x}", rand::random::<u64>());
        let session = session_id.clone();
        let stored = self
            .state
            .call(move |state, ctl| {
                let name = info.name.clone();
                let now = Instant::now();
                if let Some(node) = state.nodes.get(&name) {
                    ctl.check_not_held(node, &req.previous_session_id, now)?;
                }
                let changed = match state.nodes.get_mut(&name) {
                    Some(node) => node.register(info, session.clone(), req.running.clone(), now),
                    None => {
                        let node = NodeEntry::registered(info, session, req.running.clone(), now);
                        state.nodes.insert(name.clone(), node);
                        true
                    }
                };
                let stored = if changed { ctl.persist_node(state, &name) } else { Durable::nothing() };
                ctl.adopt(state, &name, &req.running);
                tracing::info!(node = %name, running = req.running.len(), "node registered");
                ctl.wake.notify_one();
                Ok::<_, ControllerError>(stored)
            })
            .await?;
        stored.wait().await?;
        Ok(cohort_proto::RegisterResponse {
            controller_id: String::new(),
            session_id,
            heartbeat_interval_ms: self.config.heartbeat_interval.as_millis() as u32,
        })
    }

    /// A node name is bound to the certificate it first joined with (recorded
    /// at Join, or at its first Register for a certificate issued before):
    /// another certificate for the same name, however validly signed, is refused.
    pub async fn check_node_certificate(&self, node: &str, fingerprint: &str) -> Result<(), ControllerError> {
        let key = crate::security::node_cert_key(node);
        let bound = match self.store.get(&key).await? {
            Some(found) => String::from_utf8_lossy(&found.value).into_owned(),
            None => match self.store.put(&key, fingerprint.as_bytes().to_vec(), Expect::Absent).await {
                Ok(_) => {
                    tracing::info!(node, "node name bound to the certificate it registered with");
                    return Ok(());
                }
                Err(crate::store::StoreError::Conflict { .. }) => self
                    .store
                    .get(&key)
                    .await?
                    .map(|v| String::from_utf8_lossy(&v.value).into_owned())
                    .unwrap_or_default(),
                Err(e) => return Err(e.into()),
            },
        };
        if bound == fingerprint {
            return Ok(());
        }
        tracing::warn!(node, "refused a certificate other than the one the node name is bound to");
        Err(ControllerError::PermissionDenied(format!(
            "node {node} is bound to the certificate it first joined with (sha256 {}...); this connection presents \
             another (sha256 {}...). If the node was reinstalled, re-issue its certificate with a join token bound \
             to it: `cohort token create --role join --node {node}`",
            bound.get(..16).unwrap_or(&bound),
            fingerprint.get(..16).unwrap_or(fingerprint)
        )))
    }

    /// A node name is one agent's: while its session is live (the stream open
    /// and heartbeats on time), only the agent holding it may register again.
    /// A second agent with the name is refused rather than taking the session
    /// (and the node's jobs) from the first.
    fn check_not_held(&self, node: &NodeEntry, previous_session: &str, now: Instant) -> Result<(), ControllerError> {
        let Some((current, tx)) = &node.session else { return Ok(()) };
        let silent = now.duration_since(node.last_seen);
        let live = !tx.is_closed() && silent <= self.config.heartbeat_interval * 3;
        if !live || previous_session == current {
            return Ok(());
        }
        tracing::warn!(node = %node.info.name, "refused a second agent for a node whose session is live");
        Err(ControllerError::AlreadyExists(format!(
            "node {} is already connected: another agent holds its session (last heartbeat {} ms ago); a second \
             agent with the same node name is refused. Stop the other agent, or give this one its own --node-name",
            node.info.name,
            silent.as_millis()
        )))
    }

    /// Reconciles what a (re)registering agent runs with what the jobs expect:
    /// exits it saw while disconnected are applied; processes it no longer has
    /// fail their job; the rest is adopted.
    pub(super) fn adopt(&self, state: &mut State, node: &str, running: &[RunningLaunch]) {
        // A node back from a partition may still run a finished job's ranks
        // (until its fence): they hold their GPUs again and are stopped.
        for launch in running {
            let Some(entry) = state.jobs.get_mut(&launch.job_id) else { continue };
            if !entry.is_over() || entry.job.attempt != launch.attempt {
                continue;
            }
            let mut revived = false;
            for rp in launch.processes.iter().filter(|rp| rp.exited.is_none()) {
                revived |= entry.process_revived(node, rp.index, rp.pid);
            }
            if revived {
                tracing::warn!(node, job = %launch.job_id, "a lost node still runs a finished job's processes; stopping them");
                let id = launch.job_id.clone();
                self.persist_job(state, &id);
            }
        }
        let ids: Vec<String> = state
            .jobs
            .values()
            .filter(|e| e.job.processes.iter().any(|p| p.node_name == node && is_live(p)))
            .map(|e| e.job.id.clone())
            .collect();
        for id in ids {
            let Some(entry) = state.jobs.get_mut(&id) else { continue };
            let attempt = entry.job.attempt;
            let report = running.iter().find(|l| l.job_id == id && l.attempt == attempt);
            let mut exits = Vec::new();
            let mut vanished = false;
            let live: Vec<u32> =
                entry.job.processes.iter().filter(|p| p.node_name == node && is_live(p)).map(|p| p.index).collect();
            for index in live {
                match report.and_then(|r| r.processes.iter().find(|rp| rp.index == index)) {
                    Some(rp) => match &rp.exited {
                        Some(exited) => exits.push((index, exited.clone())),
                        None => entry.process_running(node, index, rp.pid, rp.started_unix_ms),
                    },
                    // Launch sent but never started there, or the agent lost it.
                    None => vanished = true,
                }
            }
            for (index, exited) in exits {
                self.apply_exit(state, &id, node, index, exited);
            }
            if vanished && state.jobs.get(&id).is_some_and(|e| e.is_over()) {
                // A finished job's process the agent no longer has: it is gone.
                if let Some(entry) = state.jobs.get_mut(&id) {
                    entry.mark_lost(node);
                }
            } else if vanished {
                self.fail_on_node(state, &id, node, FailureCause::RankFailed, |_| {
                    format!("node {node} came back without the job's processes")
                });
            }
            self.persist_job(state, &id);
        }
    }

    /// Binds a stream to the node that registered with `session_id`.
    pub async fn attach(&self, node: &str, session_id: &str, tx: SessionSender) -> Result<(), ControllerError> {
        let (node, session_id) = (node.to_string(), session_id.to_string());
        self.state
            .call(move |state, ctl| {
                let entry = state
                    .nodes
                    .get_mut(&node)
                    .filter(|n| n.registered_session.as_deref() == Some(session_id.as_str()))
                    .ok_or_else(|| {
                        ControllerError::FailedPrecondition(format!(
                            "node {node:?} has no registration with session {session_id:?}: call Register first"
                        ))
                    })?;
                entry.attach(&session_id, tx, Instant::now());
                ctl.wake.notify_one();
                Ok(())
            })
            .await
    }

    pub async fn detach(&self, node: &str, session_id: &str) {
        let (node, session_id) = (node.to_string(), session_id.to_string());
        self.state
            .call(move |state, _| {
                if let Some(entry) = state.nodes.get_mut(&node)
                    && entry.detach(&session_id)
                {
                    tracing::warn!(
                        node,
                        "agent stream closed; the node is suspect, and lost unless it reconnects within the TTL"
                    );
                }
            })
            .await
    }

    /// Drops every agent session (on shutdown); agents reconnect elsewhere or later.
    pub async fn close_sessions(&self) {
        self.state
            .call(|state, _| {
                for node in state.nodes.values_mut() {
                    node.session = None;
                }
            })
            .await
    }

    /// Acknowledges a heartbeat at once, without the state: the agent's proof
    /// that a controller hears it (fencing). `session` is a weak handle of the
    /// session the state holds, so a session the state has dropped (replaced,
    /// closed on losing the lead) acks nothing and its stream ends.
    pub fn ack_heartbeat(session: &WeakSessionSender, seq: u64) {
        if let Some(tx) = session.upgrade() {
            let ack = Command::HeartbeatAck(cohort_proto::HeartbeatAck { seq });
            let _ = tx.send(Ok(ControllerMessage { command_id: 0, command: Some(ack) }));
        }
    }

    /// What a heartbeat tells about the node (liveness, running launches,
    /// telemetry); its ack went out before ([`Self::ack_heartbeat`]).
    pub async fn heartbeat(&self, node: &str, hb: cohort_proto::Heartbeat) {
        let node = node.to_string();
        self.state.call(move |state, ctl| ctl.heard(state, &node, hb)).await
    }

    /// [`Self::heartbeat`] on the state.
    fn heard(&self, state: &mut State, node: &str, hb: cohort_proto::Heartbeat) {
        let Some(entry) = state.nodes.get_mut(node) else { return };
        if entry.heard_from(Instant::now()) {
            tracing::info!(node, "node is Ready again");
        }
        entry.reported = hb.running;
        let newly_unhealthy = record_health(entry, &hb.gpus);
        entry.telemetry = hb.gpus;
        Self::gpus_seen(state, node);
        // Queued, never awaited: a heartbeat does not wait for the store.
        if newly_unhealthy {
            self.persist_node(state, node);
        }
    }

    /// An XID or ECC event: the GPU's health changes now, not at the next heartbeat.
    pub async fn gpu_event(&self, node: &str, event: cohort_proto::GpuEvent) {
        let node = node.to_string();
        self.state.call(move |state, ctl| ctl.gpu_event_seen(state, &node, event)).await
    }

    /// [`Self::gpu_event`] on the state.
    fn gpu_event_seen(&self, state: &mut State, node: &str, event: cohort_proto::GpuEvent) {
        let Some(entry) = state.nodes.get_mut(node) else { return };
        tracing::warn!(node, gpu = event.index, kind = %event.kind, xid = event.xid, detail = %event.detail, "GPU event");
        let mut changed = false;
        if let Some(health) = &event.health {
            if let Some(t) = entry.telemetry.iter_mut().find(|t| t.index == event.index) {
                t.health = Some(health.clone());
            } else {
                entry.telemetry.push(cohort_proto::GpuTelemetry {
                    index: event.index,
                    uuid: event.uuid.clone(),
                    health: Some(health.clone()),
                    ..Default::default()
                });
            }
            changed = record_health(entry, &entry.telemetry.clone());
        }
        if changed {
            self.persist_node(state, node);
            self.wake.notify_one();
        }
    }

    pub async fn process_event(&self, node: &str, event: cohort_proto::ProcessEvent) {
        let node = node.to_string();
        self.state.call(move |state, ctl| ctl.process_event_seen(state, &node, event)).await
    }

    /// [`Self::process_event`] on the state.
    fn process_event_seen(&self, state: &mut State, node: &str, event: cohort_proto::ProcessEvent) {
        use cohort_proto::process_event::Event;
        if let Some(n) = state.nodes.get_mut(node) {
            n.spoke(Instant::now());
        }
        let id = event.job_id.clone();
        let Some(entry) = state.jobs.get_mut(&id) else { return };
        if entry.job.attempt != event.attempt {
            return;
        }
        let phase_before = entry.phase();
        let is_start = matches!(event.event, Some(Event::Started(_)));
        let message = match event.event {
            Some(Event::Started(started)) => {
                if entry.process_started(node, event.index, started.pid, started.started_unix_ms) {
                    tracing::info!(job = %id, "job running");
                }
                // Which Unix user it runs as, for `cohort status`.
                if let Some(p) = entry.job.processes.iter_mut().find(|p| p.node_name == node && p.index == event.index)
                {
                    p.user = started.user.clone();
                }
                format!("process {} on node {node} started (pid {})", event.index, started.pid)
            }
            Some(Event::Exited(exited)) => {
                let how = describe_exit(exited.exit_code, exited.signal);
                self.apply_exit(state, &id, node, event.index, exited);
                format!("process {} on node {node} exited with {how}", event.index)
            }
            Some(Event::SpawnFailed(error)) => {
                let node_rank = entry.process_spawn_failed(node, event.index);
                let message = format!("could not start process {} on node {node}: {error}", event.index);
                if entry.is_active() {
                    // A program or workdir that does not exist: the job file's mistake.
                    let failure = super::restart::with_cause(
                        Failure {
                            node_name: node.into(),
                            node_rank,
                            process_index: event.index,
                            message: message.clone(),
                            ..Failure::default()
                        },
                        cohort_shared::failure::FailureCause::UserError,
                    );
                    self.fail(state, &id, failure);
                }
                message
            }
            None => return,
        };
        // A gang of N nodes sends N starts, and N exits when it is stopped:
        // persist state changes and a finished job's last exit, not each
        // event (pids and exits come back from the agents after a restart,
        // and stops are resent until the agents no longer report the ranks).
        let Some(entry) = state.jobs.get(&id) else { return };
        let state_changed = entry.phase() != phase_before;
        let over_with_live = entry.is_over() && entry.job.live_processes > 0;
        let changed = state_changed || (entry.is_terminal() && entry.job.live_processes == 0);
        if changed {
            self.persist_job(state, &id);
        }
        // A start, or an exit while a finished attempt still has ranks to
        // stop, that changes nothing else goes out with the next batch and
        // leaves the reconcile loop asleep (it has nothing to act on).
        if !state_changed && (is_start || over_with_live) {
            self.hold_message(state, &id, message);
            return;
        }
        self.flush_held(state, &id, Some(&message));
        self.wake.notify_one();
    }

    pub async fn command_ack(&self, node: &str, ack: cohort_proto::CommandAck) {
        if !ack.ok {
            tracing::warn!(node, command = ack.command_id, error = %ack.error, "agent refused a command");
        }
    }

    // ------------------------------------------------------------ transitions

    pub(super) fn apply_exit(&self, state: &mut State, id: &str, node: &str, index: u32, exited: ProcessExited) {
        let Some(entry) = state.jobs.get_mut(id) else { return };
        // Unknown, or already known (an exit re-reported after a reconnect).
        let Some(ExitSeen { node_rank, global_rank }) = entry.process_exited(node, index, &exited) else { return };
        if !entry.is_active() {
            return;
        }
        let clean = exited.exit_code == Some(0) && exited.signal.is_none();
        if !clean {
            let who = match global_rank {
                Some(rank) => format!("rank {rank} (process {index})"),
                None => format!("process {index}"),
            };
            let how = if exited.stopped_by_agent {
                "was stopped by its agent".to_string()
            } else {
                format!("exited with {}", describe_exit(exited.exit_code, exited.signal))
            };
            // torchrun's trailer names the rank that failed first inside the node.
            let cause = if exited.root_cause.is_empty() { String::new() } else { format!("; {}", exited.root_cause) };
            let failure = super::restart::classified(
                Failure {
                    node_name: node.into(),
                    node_rank,
                    process_index: index,
                    exit_code: exited.exit_code,
                    signal: exited.signal,
                    ..Failure::default()
                },
                &exited,
            );
            // The cause leads when the output revealed more than the exit status.
            let known = if failure.cause == "rank_failed" { String::new() } else { format!(" [{}]", failure.cause) };
            let detail = if failure.cause == "rank_failed" || failure.detail.is_empty() {
                String::new()
            } else {
                format!(": {}", failure.detail)
            };
            let message = format!("node {node} (node rank {node_rank}): {who} {how}{cause}{known}{detail}");
            self.fail(state, id, Failure { message, ..failure });
        } else if entry.all_exited_cleanly() && entry.succeed("every process exited with code 0").is_ok() {
            tracing::info!(job = %id, "job succeeded");
        }
    }

    /// Fails an active job and tears its gang down everywhere.
    pub(super) fn fail(&self, state: &mut State, id: &str, failure: Failure) {
        let Some(entry) = state.jobs.get_mut(id) else { return };
        let cause = failure.message.clone();
        // A job that already ended (a second node lost after the first) stays as it ended.
        if entry.fail(failure).is_err() {
            return;
        }
        tracing::warn!(job = %id, cause = %cause, "job failed; stopping the gang");
        self.teardown(state, id, "gang failure");
        self.consider_restart(state, id);
    }

    /// The active attempt loses `node`: its live processes there are lost and
    /// the job fails for `cause` with the message `describe(node_rank)`.
    /// Returns the message (`None` when the job was not active).
    pub(super) fn fail_on_node(
        &self,
        state: &mut State,
        id: &str,
        node: &str,
        cause: FailureCause,
        describe: impl FnOnce(u32) -> String,
    ) -> Option<String> {
        let entry = state.jobs.get_mut(id).filter(|e| e.is_active())?;
        let node_rank = entry.mark_lost(node);
        let message = describe(node_rank);
        let failure = super::restart::with_cause(
            Failure { node_name: node.into(), node_rank, message: message.clone(), ..Failure::default() },
            cause,
        );
        self.fail(state, id, failure);
        Some(message)
    }

    /// Sends a stop to every connected node of the job that still has live
    /// processes, or to every node of its plan while none has started.
    pub(super) fn teardown(&self, state: &mut State, id: &str, reason: &str) {
        let Some(entry) = state.jobs.get(id) else { return };
        let attempt = entry.job.attempt;
        let grace = entry.spec.stop_grace;
        let save = entry.save_first();
        let mut nodes: HashSet<String> =
            entry.job.processes.iter().filter(|p| is_live(p)).map(|p| p.node_name.clone()).collect();
        // Nodes still preparing (staging, dataset checks) have no processes yet:
        // the stop ends their preparation.
        if entry.job.processes.is_empty() {
            nodes.extend(entry.plan().map(|p| p.nodes.iter().map(|a| a.node_name.clone())).into_iter().flatten());
        }
        for node in nodes {
            Self::send_stop(state, &node, id, attempt, (grace, save.clone()), reason);
        }
    }

    /// A stop with its SIGTERM-to-SIGKILL grace and, for a preemption, the
    /// signal and time the ranks get to save first.
    pub(super) fn send_stop(
        state: &mut State,
        node: &str,
        job_id: &str,
        attempt: u32,
        (grace, save): (Duration, Option<(String, Duration)>),
        reason: &str,
    ) {
        let (first_signal, first_grace) = save.unwrap_or_default();
        let command_id = state.next_command_id;
        state.next_command_id += 1;
        let Some((_, tx)) = state.nodes.get(node).and_then(|n| n.session.as_ref()) else { return };
        let msg = ControllerMessage {
            command_id,
            command: Some(Command::Stop(StopCommand {
                job_id: job_id.into(),
                attempt,
                grace_ms: u32::try_from(grace.as_millis()).unwrap_or(u32::MAX),
                reason: reason.into(),
                first_signal,
                first_signal_grace_ms: u32::try_from(first_grace.as_millis()).unwrap_or(u32::MAX),
            })),
        };
        if tx.send(Ok(msg)).is_ok() {
            state.stops_sent.insert((node.into(), job_id.into(), attempt), Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use cohort_proto::NodeState;

    use super::*;
    use crate::store::EmbeddedStore;

    type Session = mpsc::UnboundedReceiver<Result<ControllerMessage, Status>>;

    /// A controller with `nodes` registered nodes of one GPU, each with an
    /// open session; returns the store and the sessions' receiving ends.
    async fn controller_with(dir: &Path, nodes: usize) -> (Arc<Controller>, Arc<EmbeddedStore>, Vec<Session>) {
        let store = Arc::new(EmbeddedStore::open(&dir.join("store")).unwrap());
        let controller = Controller::load(store.clone(), dir, ControllerConfig::default()).await.unwrap();
        let mut sessions = Vec::new();
        for i in 0..nodes {
            let node = NodeInfo {
                name: format!("n{i}"),
                advertise_addr: "127.0.0.1".into(),
                gpus: vec![cohort_proto::GpuInfo { index: 0, ..Default::default() }],
                ..NodeInfo::default()
            };
            let request = cohort_proto::RegisterRequest { node: Some(node), running: Vec::new(), ..Default::default() };
            let registered = controller.register(request).await.unwrap();
            let (tx, rx) = mpsc::unbounded_channel();
            controller.attach(&format!("n{i}"), &registered.session_id, tx).await.unwrap();
            sessions.push(rx);
        }
        (controller, store, sessions)
    }

    fn event(job_id: &str, event: cohort_proto::process_event::Event) -> cohort_proto::ProcessEvent {
        cohort_proto::ProcessEvent { job_id: job_id.into(), attempt: 1, index: 0, event: Some(event) }
    }

    #[tokio::test]
    async fn a_stopped_gangs_exits_are_persisted_once_and_published_together() {
        use cohort_proto::process_event::Event;
        let dir = tempfile::tempdir().unwrap();
        let (controller, store, mut sessions) = controller_with(dir.path(), 3).await;
        let yaml = "name: t\nkind: command\nnodes: 3\ngpus_per_node: 1\ncommand: [sleep, '100']\n";
        let file = JobFile { yaml: yaml.into(), source_name: "t.yaml".into(), ..JobFile::default() };
        let (job, _) = controller.submit(file, Default::default()).await.unwrap();
        controller.reconcile().await.unwrap();
        for session in &mut sessions {
            let launched = std::iter::from_fn(|| session.try_recv().ok())
                .any(|msg| matches!(msg, Ok(ControllerMessage { command: Some(Command::Launch(_)), .. })));
            assert!(launched, "every node gets its launch");
        }
        for (i, node) in ["n0", "n1", "n2"].iter().enumerate() {
            let started = cohort_proto::ProcessStarted {
                pid: 100 + i as u32,
                started_unix_ms: now_unix_ms(),
                ..Default::default()
            };
            controller.process_event(node, event(&job.id, Event::Started(started))).await;
        }
        let (_, mut events) = controller.watch(&job.id).await.unwrap();
        controller.cancel(&job.id).await.unwrap();
        while events.try_recv().is_ok() {}

        let revision = || async {
            controller.flush_store().await;
            store.get(&format!("jobs/{}", job.id)).await.unwrap().unwrap().revision
        };
        let before = revision().await;
        let exited = || Event::Exited(ProcessExited { signal: Some(15), stopped_by_agent: true, ..Default::default() });
        for node in ["n0", "n1"] {
            controller.process_event(node, event(&job.id, exited())).await;
            assert_eq!(revision().await, before, "an exit with ranks still to stop is not persisted");
        }
        assert!(events.try_recv().is_err(), "exits with ranks still to stop are held");
        controller.process_event("n2", event(&job.id, exited())).await;
        assert_ne!(revision().await, before, "the last exit is persisted");
        let last = events.try_recv().unwrap();
        assert_eq!(last.job.as_ref().unwrap().live_processes, 0);
        for node in ["n0", "n1", "n2"] {
            assert!(last.message.contains(&format!("on node {node} exited")), "{}", last.message);
        }
        assert!(events.try_recv().is_err(), "one event for the three exits");
    }

    /// Sweeps every `tick` for `total`, a heartbeat from each node of `beating`
    /// every `beat` (as the controller reads them: late when it is starved);
    /// returns when each node of the controller was first seen Lost.
    async fn sweeps(
        controller: &Controller,
        tick: Duration,
        total: Duration,
        beat: Duration,
        beating: &[&str],
    ) -> HashMap<String, Duration> {
        let (mut waited, mut since_beat) = (Duration::ZERO, Duration::ZERO);
        let mut lost = HashMap::new();
        while waited < total {
            tokio::time::advance(tick).await;
            waited += tick;
            since_beat += tick;
            if since_beat >= beat {
                since_beat = Duration::ZERO;
                for node in beating {
                    controller.heartbeat(node, cohort_proto::Heartbeat::default()).await;
                }
            }
            controller.reconcile().await.unwrap();
            for n in controller.nodes().await {
                if n.state == NodeState::Lost as i32 {
                    lost.entry(n.info.unwrap().name).or_insert(waited);
                }
            }
        }
        lost
    }

    const TICK: Duration = Duration::from_millis(250);

    #[tokio::test(start_paused = true)]
    async fn a_controller_paused_for_20s_loses_no_node_but_a_dead_one_after_its_grace() {
        let dir = tempfile::tempdir().unwrap();
        let (controller, _store, _sessions) = controller_with(dir.path(), 2).await;
        let beat = controller.config.heartbeat_interval;
        assert!(sweeps(&controller, TICK, Duration::from_secs(2), beat, &["n0", "n1"]).await.is_empty());
        // Paused 20 s: nothing of it is the nodes' silence.
        tokio::time::advance(Duration::from_secs(20)).await;
        controller.reconcile().await.unwrap();
        // n0 speaks again at once; n1 never does (it died during the pause).
        let grace = reconcile::stall_grace(&controller.config);
        let lost = sweeps(&controller, TICK, grace * 2, beat, &["n0"]).await;
        assert!(!lost.contains_key("n0"), "a node heard after the pause is never lost: {lost:?}");
        let n1 = lost.get("n1").copied().expect("a node never heard again is lost");
        assert!(n1 >= grace, "lost {n1:?} after the resume, before its grace ({grace:?}) was spent");
        assert!(n1 <= grace + TICK, "lost {n1:?} after the resume");
    }

    #[tokio::test(start_paused = true)]
    async fn a_closed_stream_and_silence_is_a_lost_node_within_3s_by_default() {
        let dir = tempfile::tempdir().unwrap();
        let (controller, _store, mut sessions) = controller_with(dir.path(), 2).await;
        assert_eq!(controller.config.node_ttl, crate::controller::DEFAULT_NODE_TTL);
        let beat = controller.config.heartbeat_interval;
        assert!(sweeps(&controller, TICK, Duration::from_secs(2), beat, &["n0", "n1"]).await.is_empty());
        // n1's agent is killed right after a heartbeat: its stream resets.
        drop(sessions.remove(1));
        controller.detach("n1", &controller.state.call(|s, _| s.nodes["n1"].session.clone().unwrap().0).await).await;
        assert_eq!(
            controller.nodes().await[1].state,
            NodeState::Suspect as i32,
            "suspect as soon as the stream closes"
        );
        let lost = sweeps(&controller, TICK, Duration::from_secs(10), beat, &["n0"]).await;
        assert_eq!(lost.keys().collect::<Vec<_>>(), ["n1"]);
        // Its last heartbeat came with the kill: lost one tick past the TTL after it.
        let ttl = controller.config.node_ttl;
        assert!(lost["n1"] > ttl && lost["n1"] <= ttl + TICK, "lost {:?} after its last heartbeat", lost["n1"]);
        assert!(lost["n1"] <= Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn late_heartbeats_of_a_starved_controller_lose_no_node_but_silence_still_does() {
        let dir = tempfile::tempdir().unwrap();
        let (controller, _store, _sessions) = controller_with(dir.path(), 2).await;
        let ttl = controller.config.node_ttl;
        // Starved: the 250 ms sweep runs every 1.25 s, and the controller reads
        // the heartbeats every 4 s (eight intervals late), longer than the TTL
        // of wall time: what it could not read is not the nodes' silence.
        let starved = Duration::from_millis(1250);
        let late = Duration::from_secs(4);
        assert!(late > ttl && starved <= reconcile::stall_limit(&controller.config));
        let lost = sweeps(&controller, starved, Duration::from_secs(120), late, &["n0", "n1"]).await;
        assert!(lost.is_empty(), "{lost:?}");
        // Still starved, n1 stops: lost all the same, later by the starvation.
        let lost = sweeps(&controller, starved, Duration::from_secs(60), late, &["n0"]).await;
        assert_eq!(lost.keys().collect::<Vec<_>>(), ["n1"]);
        assert!(lost["n1"] <= ttl * 4, "{:?}", lost["n1"]);
    }
}
