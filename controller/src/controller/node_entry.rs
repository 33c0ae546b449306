//! A node's state machine. `NodeEntry` is what the controller knows of one
//! node: its registration, its agent's session, its liveness and what it
//! reported last. Its phase changes only through the methods here
//! (register, heartbeat, sweep, ...); the proto `NodeState` is only what
//! `Node` answers carry.

use std::collections::HashMap;
use std::time::Duration;

use cohort_proto::{NodeInfo, NodeRecord, NodeState, PreflightReport, RunningLaunch, now_unix_ms};
use tokio::time::Instant;

use super::SessionSender;

/// The most one sweep adds to a node's silence: the sweep ticks every 250 ms,
/// and a longer gap is this controller's own delay (starved, paused), during
/// which it could not have read what the node sent.
pub(super) const SWEEP_CREDIT_MAX: Duration = Duration::from_millis(500);

/// Whether a node is heard from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum NodePhase {
    /// Registered and heartbeating on time: work may be placed there.
    Ready,
    /// Its stream closed, or heartbeats late (more than three intervals), but
    /// not yet lost: no new work goes there.
    Suspect,
    /// Silent for the TTL of this controller's observed time (see
    /// [`NodeEntry::sweep`]): its jobs' processes there are lost.
    Lost,
    /// Known from the store, not registered since this controller started.
    Disconnected,
}

impl NodePhase {
    pub(super) fn to_proto(self) -> NodeState {
        match self {
            NodePhase::Ready => NodeState::Ready,
            NodePhase::Suspect => NodeState::Suspect,
            NodePhase::Lost => NodeState::Lost,
            NodePhase::Disconnected => NodeState::Disconnected,
        }
    }
}

/// What a liveness sweep did to a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Sweep {
    Unchanged,
    /// Became suspect now.
    Suspect,
    /// Lost now: its session is dropped, its jobs' processes there are lost.
    Lost,
}

pub(super) struct NodeEntry {
    pub(super) info: NodeInfo,
    pub(super) registered_unix_ms: i64,
    /// When its agent last registered (a first registration, a restart or a
    /// reconnect) with this controller; 0: not since it started.
    pub(super) last_registered_unix_ms: i64,
    pub(super) revision: Option<u64>,
    pub(super) session: Option<(String, SessionSender)>,
    /// The session id handed out by the last Register.
    pub(super) registered_session: Option<String>,
    pub(super) last_seen: Instant,
    pub(super) last_seen_unix_ms: i64,
    /// How long the node has been silent in time this controller observed
    /// running on schedule: each sweep adds the time since the previous one,
    /// at most [`SWEEP_CREDIT_MAX`]; anything the agent sends resets it.
    silent: Duration,
    /// Observed time left during which the node is not declared lost
    /// whatever its silence: after this controller's own stall or start, its
    /// agent may be in its reconnection backoff through no fault of its own.
    grace: Duration,
    phase: NodePhase,
    /// Launches the agent last said it runs.
    pub(super) reported: Vec<RunningLaunch>,
    /// The agent's start-up preflight report.
    pub(super) preflight: Option<PreflightReport>,
    /// No new work (cordon, drain); persisted.
    pub(super) cordoned: bool,
    pub(super) draining: bool,
    /// GPUs the health policy marked unhealthy, until an operator clears them; persisted.
    pub(super) unhealthy_gpus: HashMap<u32, cohort_proto::GpuHealth>,
    /// The newest telemetry of each GPU (memory only).
    pub(super) telemetry: Vec<cohort_proto::GpuTelemetry>,
}

impl NodeEntry {
    /// A node known from the store: `Disconnected` until its agent registers.
    /// `now` starts its TTL. `None` for a record without the node's info.
    /// `grace`: observed time before it may be declared lost.
    pub(super) fn from_store(record: NodeRecord, revision: u64, now: Instant, grace: Duration) -> Option<Self> {
        let info = record.info?;
        let mut node = Self::new(info, record.registered_unix_ms, now, NodePhase::Disconnected);
        node.revision = Some(revision);
        node.cordoned = record.cordoned;
        node.draining = record.draining;
        node.unhealthy_gpus = record.unhealthy_gpus.into_iter().collect();
        // A controller that just started (or took the lead): agents are
        // reconnecting, some from a long backoff.
        node.grace = grace;
        Some(node)
    }

    /// A node registering for the first time: `Ready`.
    pub(super) fn registered(info: NodeInfo, session_id: String, running: Vec<RunningLaunch>, now: Instant) -> Self {
        let mut node = Self::new(info, now_unix_ms(), now, NodePhase::Ready);
        node.registered_session = Some(session_id);
        node.last_seen_unix_ms = now_unix_ms();
        node.last_registered_unix_ms = node.last_seen_unix_ms;
        node.reported = running;
        node
    }

    fn new(info: NodeInfo, registered_unix_ms: i64, now: Instant, phase: NodePhase) -> Self {
        NodeEntry {
            info,
            registered_unix_ms,
            last_registered_unix_ms: 0,
            revision: None,
            session: None,
            registered_session: None,
            last_seen: now,
            last_seen_unix_ms: 0,
            silent: Duration::ZERO,
            grace: Duration::ZERO,
            phase,
            reported: Vec::new(),
            preflight: None,
            cordoned: false,
            draining: false,
            unhealthy_gpus: HashMap::new(),
            telemetry: Vec::new(),
        }
    }

    /// What is persisted of the node (liveness and telemetry are memory only).
    pub(super) fn record(&self) -> NodeRecord {
        NodeRecord {
            info: Some(self.info.clone()),
            registered_unix_ms: self.registered_unix_ms,
            cordoned: self.cordoned,
            draining: self.draining,
            unhealthy_gpus: self.unhealthy_gpus.clone().into_iter().collect(),
        }
    }

    pub(super) fn phase(&self) -> NodePhase {
        self.phase
    }

    /// Ready with an open session: commands reach it.
    pub(super) fn is_connected(&self) -> bool {
        self.session.is_some() && self.phase == NodePhase::Ready
    }

    /// Where other nodes fetch staged content from this one (`host:port`);
    /// None while it is not connected or serves none (peer port 0).
    pub(super) fn peer_address(&self) -> Option<String> {
        if !self.is_connected() || self.info.peer_port == 0 {
            return None;
        }
        let host = &self.info.advertise_addr;
        let host = if host.contains(':') { format!("[{host}]") } else { host.clone() };
        Some(format!("{host}:{}", self.info.peer_port))
    }

    // ------------------------------------------------------------ transitions

    /// A known node's agent registered again (a restart or a reconnect):
    /// `Ready`, with a new session id. Returns whether its info changed.
    pub(super) fn register(
        &mut self,
        info: NodeInfo,
        session_id: String,
        running: Vec<RunningLaunch>,
        now: Instant,
    ) -> bool {
        let changed = self.info != info;
        self.info = info;
        self.registered_session = Some(session_id);
        self.heard_from(now);
        self.last_registered_unix_ms = self.last_seen_unix_ms;
        self.reported = running;
        changed
    }

    /// A heartbeat (or a registration): `Ready` again. Returns whether it was not.
    pub(super) fn heard_from(&mut self, now: Instant) -> bool {
        self.last_seen = now;
        self.last_seen_unix_ms = now_unix_ms();
        self.silent = Duration::ZERO;
        let was = std::mem::replace(&mut self.phase, NodePhase::Ready);
        was != NodePhase::Ready
    }

    /// Binds the stream of the session `session_id` (checked by the caller).
    pub(super) fn attach(&mut self, session_id: &str, tx: SessionSender, now: Instant) {
        self.session = Some((session_id.to_string(), tx));
        self.last_seen = now;
        self.silent = Duration::ZERO;
        // A fresh stream is the agent's own proof that it reaches this controller.
        self.grace = Duration::ZERO;
    }

    /// Something else than a heartbeat came from the agent (a process event,
    /// output): it is alive, though the fence deadline still counts from the
    /// last acknowledged heartbeat.
    pub(super) fn spoke(&mut self, now: Instant) {
        self.last_seen = now;
        self.silent = Duration::ZERO;
    }

    /// The stream of `session_id` closed. Returns whether it was the node's
    /// session (a stale stream's close changes nothing). The close (an EOF or
    /// a reset: the agent died, restarted or gave up on the stream) makes the
    /// node suspect at once: no new work goes there until it registers again.
    pub(super) fn detach(&mut self, session_id: &str) -> bool {
        if self.session.as_ref().is_some_and(|(id, _)| id == session_id) {
            self.session = None;
            if self.phase == NodePhase::Ready {
                self.phase = NodePhase::Suspect;
            }
            return true;
        }
        false
    }

    /// The liveness sweep. `observed`: the time since the previous sweep
    /// that this controller observed itself running (at most
    /// [`SWEEP_CREDIT_MAX`], nothing after a stall), added to the node's
    /// silence. Silent for longer than `suspect_after`, suspect; for longer
    /// than `ttl` once its grace is spent, lost (and its session dropped).
    /// A node heard since the previous sweep is silent only since then.
    pub(super) fn sweep(&mut self, now: Instant, observed: Duration, suspect_after: Duration, ttl: Duration) -> Sweep {
        if self.phase == NodePhase::Lost {
            return Sweep::Unchanged;
        }
        self.silent += observed.min(now.saturating_duration_since(self.last_seen));
        self.grace = self.grace.saturating_sub(observed);
        if self.silent > ttl && self.grace.is_zero() {
            tracing::warn!(node = %self.info.name, ttl = ?ttl, "nothing from the node within the TTL; node lost");
            self.phase = NodePhase::Lost;
            self.session = None;
            return Sweep::Lost;
        }
        if self.phase == NodePhase::Ready && self.silent > suspect_after {
            tracing::warn!(node = %self.info.name, silent = ?self.silent, "heartbeats late; node suspect");
            self.phase = NodePhase::Suspect;
            return Sweep::Suspect;
        }
        Sweep::Unchanged
    }

    /// The controller itself was away (paused, starved): the node's silence
    /// meanwhile is not its own. Its silence starts again, and it gets
    /// `grace` of observed time to be heard (its agent may have given up on
    /// the stream and be in its reconnection backoff). A lost node stays lost.
    pub(super) fn forgive_silence(&mut self, now: Instant, grace: Duration) {
        if self.phase == NodePhase::Lost {
            return;
        }
        self.last_seen = now;
        self.silent = Duration::ZERO;
        self.grace = self.grace.max(grace);
        if self.phase == NodePhase::Suspect && self.session.is_some() {
            self.phase = NodePhase::Ready;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const SUSPECT_AFTER: Duration = Duration::from_secs(3);
    const TTL: Duration = Duration::from_secs(10);

    fn info(name: &str) -> NodeInfo {
        NodeInfo { name: name.into(), advertise_addr: "10.0.0.1".into(), ..NodeInfo::default() }
    }

    fn connected(now: Instant) -> NodeEntry {
        let mut node = NodeEntry::registered(info("n1"), "s1".into(), Vec::new(), now);
        node.attach("s1", tokio::sync::mpsc::unbounded_channel().0, now);
        node
    }

    #[test]
    fn a_stored_node_is_disconnected_until_it_registers() {
        let now = Instant::now();
        let record = NodeRecord { info: Some(info("n1")), cordoned: true, ..NodeRecord::default() };
        let mut node = NodeEntry::from_store(record.clone(), 4, now, Duration::ZERO).unwrap();
        assert_eq!(node.phase(), NodePhase::Disconnected);
        assert_eq!(node.phase().to_proto(), NodeState::Disconnected);
        assert_eq!((node.revision, node.cordoned), (Some(4), true));
        assert_eq!(node.record(), record, "what is stored comes back unchanged");
        assert!(
            NodeEntry::from_store(NodeRecord::default(), 1, now, Duration::ZERO).is_none(),
            "a record without its info"
        );

        let changed = node.register(info("n1"), "s2".into(), Vec::new(), now);
        assert!(!changed, "the same info");
        assert_eq!(node.phase(), NodePhase::Ready);
        assert_eq!(node.registered_session.as_deref(), Some("s2"));
        assert!(node.register(
            NodeInfo { labels: [("gpu".into(), "h100".into())].into(), ..info("n1") },
            "s3".into(),
            Vec::new(),
            now
        ));
    }

    /// Sweeps of `step` (each observed whole) for `total`; returns the first
    /// that was not Unchanged and after how long.
    fn sweep_for(node: &mut NodeEntry, step: Duration, total: Duration) -> Option<(Sweep, Duration)> {
        let mut waited = Duration::ZERO;
        while waited < total {
            waited += step;
            // Long after anything was heard: each sweep counts whole.
            let now = node.last_seen + Duration::from_secs(3600);
            match node.sweep(now, step, SUSPECT_AFTER, TTL) {
                Sweep::Unchanged => {}
                other => return Some((other, waited)),
            }
        }
        None
    }

    const TICK: Duration = Duration::from_millis(250);

    /// Sweeps of [`TICK`] until the node is lost (at most `total`); how long that took.
    fn until_lost(node: &mut NodeEntry, total: Duration) -> Option<Duration> {
        let mut waited = Duration::ZERO;
        while waited < total {
            waited += TICK;
            if node.sweep(node.last_seen + Duration::from_secs(3600), TICK, SUSPECT_AFTER, TTL) == Sweep::Lost {
                return Some(waited);
            }
        }
        None
    }

    #[test]
    fn silence_makes_a_node_suspect_then_lost_once() {
        let start = Instant::now();
        let mut node = connected(start);
        assert!(node.is_connected());
        assert_eq!(sweep_for(&mut node, TICK, SUSPECT_AFTER), None, "on the limit");
        assert_eq!(node.sweep(start + TTL, TICK, SUSPECT_AFTER, TTL), Sweep::Suspect);
        assert_eq!(node.phase(), NodePhase::Suspect);
        assert!(!node.is_connected(), "a suspect node gets no commands");
        let lost = sweep_for(&mut node, TICK, TTL);
        assert_eq!(lost, Some((Sweep::Lost, TTL - SUSPECT_AFTER)), "lost one tick past the TTL");
        assert_eq!(node.phase(), NodePhase::Lost);
        assert!(node.session.is_none(), "a lost node's stream is dropped");
        assert_eq!(sweep_for(&mut node, TICK, TTL * 2), None, "lost once");

        assert!(node.heard_from(start + Duration::from_secs(31)), "a heartbeat makes it Ready again");
        assert_eq!(node.phase(), NodePhase::Ready);
        assert!(!node.heard_from(start + Duration::from_secs(32)));
    }

    #[test]
    fn anything_the_agent_sends_resets_its_silence() {
        let start = Instant::now();
        let mut node = connected(start);
        for _ in 0..100 {
            assert_eq!(sweep_for(&mut node, TICK, SUSPECT_AFTER), None);
            node.spoke(start);
        }
        assert_eq!(node.phase(), NodePhase::Ready, "output and process events keep it alive: {:?}", node.silent);
    }

    #[test]
    fn a_closed_stream_makes_the_node_suspect_at_once_and_lost_after_the_ttl() {
        let mut node = connected(Instant::now());
        assert!(node.detach("s1"));
        assert_eq!(node.phase(), NodePhase::Suspect, "the stream's close is suspicion at once");
        assert_eq!(until_lost(&mut node, TTL * 2), Some(TTL + TICK));
    }

    #[test]
    fn a_controller_that_was_away_forgives_silence_but_not_a_loss() {
        let start = Instant::now();
        let mut node = connected(start);
        sweep_for(&mut node, TICK, SUSPECT_AFTER + TICK);
        assert_eq!(node.phase(), NodePhase::Suspect);
        let back = start + Duration::from_secs(60);
        let grace = Duration::from_secs(20);
        node.forgive_silence(back, grace);
        assert_eq!(node.phase(), NodePhase::Ready);
        assert_eq!(node.last_seen, back);
        // Never heard again: not lost before the grace is spent, then at once.
        assert_eq!(
            until_lost(&mut node, grace * 2),
            Some(grace),
            "lost when the grace is spent (silent past the TTL by then)"
        );

        node.forgive_silence(back + Duration::from_secs(100), grace);
        assert_eq!(node.phase(), NodePhase::Lost, "a lost node stays lost");
    }

    #[test]
    fn a_fresh_stream_ends_the_grace() {
        let start = Instant::now();
        let mut node = connected(start);
        node.forgive_silence(start, Duration::from_secs(60));
        node.attach("s2", tokio::sync::mpsc::unbounded_channel().0, start);
        let lost = until_lost(&mut node, TTL * 2);
        assert_eq!(lost, Some(TTL + TICK), "the grace ended with the new stream");
    }

    #[test]
    fn only_the_current_sessions_close_detaches_the_node() {
        let mut node = connected(Instant::now());
        assert!(!node.detach("s0"), "a stale stream");
        assert!(node.session.is_some());
        assert!(node.detach("s1"));
        assert!(node.session.is_none());
    }
}
