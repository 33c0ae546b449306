//! [`GpuMonitor`]: runs a [`GpuBackend`] for the session. One task owns the
//! health of every GPU; a poller feeds it samples from a blocking thread, the
//! backend's event thread feeds it events, and operators' clears come in on a
//! channel. The session reads the latest snapshot and never waits on NVML.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use cohort_proto::{GpuEvent, GpuHealth, GpuHealthState, GpuInfo, GpuTelemetry, now_unix_ms};
use tokio::sync::{mpsc, oneshot, watch};

use super::health::GpuHealthTracker;
use super::{GpuBackend, GpuSample, RawGpuEvent, topology};

/// Events waiting between the backend's thread and the monitor.
const EVENT_QUEUE: usize = 1024;

#[derive(Debug, Clone)]
pub struct MonitorConfig {
    /// How often telemetry is polled (`--telemetry-interval`).
    pub interval: Duration,
    /// Offer only these GPU indices (`--gpu-indices`): the others are neither
    /// reported, polled nor watched.
    pub keep: Option<Vec<u32>>,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        Self { interval: Duration::from_secs(1), keep: None }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error("--gpu-indices names GPU {missing}, but this node has {count} GPU(s) ({note})")]
    UnknownIndex { missing: u32, count: usize, note: String },
    #[error("reading the GPU inventory failed: {0}")]
    Inventory(String),
}

type ClearRequest = (u32, oneshot::Sender<Result<GpuHealth, String>>);

/// The session's handle on the node's GPUs. Cheap to clone; the monitor stops
/// when the last handle is dropped.
#[derive(Clone)]
pub struct GpuMonitor {
    gpus: Arc<Vec<GpuInfo>>,
    note: Arc<str>,
    latest: watch::Receiver<Vec<GpuTelemetry>>,
    clears: mpsc::Sender<ClearRequest>,
}

impl GpuMonitor {
    /// Reads the inventory (keeping `config.keep`), takes a first sample, then
    /// polls every `config.interval` and watches events; each event goes to
    /// `events` the moment it arrives, with the GPU's health after it.
    pub async fn start(
        backend: Arc<dyn GpuBackend>,
        config: MonitorConfig,
        events: mpsc::Sender<GpuEvent>,
    ) -> Result<Self, MonitorError> {
        let reader = backend.clone();
        let inventory = tokio::task::spawn_blocking(move || reader.inventory())
            .await
            .map_err(|e| MonitorError::Inventory(e.to_string()))?;
        let mut gpus = inventory.gpus;
        if let Some(keep) = &config.keep {
            if let Some(missing) = keep.iter().find(|i| !gpus.iter().any(|g| g.index == **i)) {
                return Err(MonitorError::UnknownIndex { missing: *missing, count: gpus.len(), note: inventory.note });
            }
            gpus.retain(|g| keep.contains(&g.index));
            for gpu in &mut gpus {
                gpu.links.retain(|l| keep.contains(&l.peer_index));
            }
            topology::assign_islands(&mut gpus);
        }
        let gpus = Arc::new(gpus);

        let (raw_tx, raw_rx) = mpsc::channel(EVENT_QUEUE);
        let (watcher, watched) = (backend.clone(), gpus.clone());
        match tokio::task::spawn_blocking(move || watcher.watch_events(&watched, raw_tx)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "GPU events are not watched; health comes from polling only"),
            Err(e) => {
                tracing::error!(error = %e, "registering for GPU events panicked; health comes from polling only")
            }
        }
        let first = poll(&backend, &gpus).await.unwrap_or_default();
        let mut book = HealthBook::new(&gpus);
        let (latest_tx, latest) = watch::channel(book.apply_samples(first, now_unix_ms()).0);
        let (samples_tx, samples_rx) = mpsc::channel(1);
        let (clears, clears_rx) = mpsc::channel(16);
        tokio::spawn(poller(backend.clone(), gpus.clone(), config.interval, samples_tx));
        let inputs = Inputs { samples: samples_rx, raw: raw_rx, clears: clears_rx };
        tokio::spawn(run(book, backend, inputs, latest_tx, events));
        Ok(Self { gpus, note: inventory.note.into(), latest, clears })
    }

    /// The GPUs this agent offers, with topology.
    pub fn gpus(&self) -> &[GpuInfo] {
        &self.gpus
    }

    /// Where the inventory came from, for `NodeInfo.gpu_note`.
    pub fn note(&self) -> &str {
        &self.note
    }

    /// The latest telemetry and health of every GPU, for a heartbeat.
    pub fn latest(&self) -> Vec<GpuTelemetry> {
        self.latest.borrow().clone()
    }

    /// A receiver that sees every new snapshot (tests, the probe example).
    pub fn subscribe(&self) -> watch::Receiver<Vec<GpuTelemetry>> {
        self.latest.clone()
    }

    /// An operator declared GPU `index` healthy (`ClearGpuCommand`): its sticky
    /// health is reset. Returns the health after the clear.
    pub async fn clear(&self, index: u32) -> Result<GpuHealth, String> {
        let (tx, rx) = oneshot::channel();
        self.clears.send((index, tx)).await.map_err(|_| "the GPU monitor has stopped".to_string())?;
        rx.await.map_err(|_| "the GPU monitor has stopped".to_string())?
    }
}

async fn poll(backend: &Arc<dyn GpuBackend>, gpus: &Arc<Vec<GpuInfo>>) -> Option<Vec<GpuSample>> {
    let (backend, gpus) = (backend.clone(), gpus.clone());
    match tokio::task::spawn_blocking(move || backend.poll(&gpus)).await {
        Ok(samples) => Some(samples),
        Err(e) => {
            tracing::error!(error = %e, "GPU poll panicked");
            None
        }
    }
}

/// Polls on its own cadence until the monitor stops; a slow poll delays the
/// next one instead of piling up.
async fn poller(
    backend: Arc<dyn GpuBackend>,
    gpus: Arc<Vec<GpuInfo>>,
    every: Duration,
    samples: mpsc::Sender<Vec<GpuSample>>,
) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if samples.is_closed() {
            return;
        }
        if let Some(s) = poll(&backend, &gpus).await
            && samples.send(s).await.is_err()
        {
            return;
        }
    }
}

struct Inputs {
    samples: mpsc::Receiver<Vec<GpuSample>>,
    raw: mpsc::Receiver<RawGpuEvent>,
    clears: mpsc::Receiver<ClearRequest>,
}

async fn run(
    mut book: HealthBook,
    backend: Arc<dyn GpuBackend>,
    mut inputs: Inputs,
    latest: watch::Sender<Vec<GpuTelemetry>>,
    events: mpsc::Sender<GpuEvent>,
) {
    let mut raw_open = true;
    loop {
        let out: Vec<GpuEvent> = tokio::select! {
            // Events first: a poll that shows an event's counters must not beat the event.
            biased;
            raw = inputs.raw.recv(), if raw_open => match raw {
                Some(raw) => match book.apply_event(&raw) {
                    Some(event) => {
                        latest.send_replace(book.snapshot());
                        vec![event]
                    }
                    None => Vec::new(),
                },
                None => {
                    raw_open = false;
                    Vec::new()
                }
            },
            samples = inputs.samples.recv() => {
                let Some(samples) = samples else { return };
                let (snapshot, turned) = book.apply_samples(samples, now_unix_ms());
                latest.send_replace(snapshot);
                turned
            }
            clear = inputs.clears.recv() => {
                let Some((index, reply)) = clear else { return };
                let result = book.clear(index, now_unix_ms());
                if result.is_ok() {
                    backend.clear(index);
                    latest.send_replace(book.snapshot());
                    tracing::info!(gpu = index, "GPU cleared by an operator: health reset");
                }
                let _ = reply.send(result);
                Vec::new()
            }
        };
        for event in out {
            if events.send(event).await.is_err() {
                tracing::debug!("nobody takes GPU events any more");
            }
        }
    }
}

/// The health of every offered GPU and its latest telemetry.
struct HealthBook {
    trackers: BTreeMap<u32, GpuHealthTracker>,
    telemetry: BTreeMap<u32, GpuTelemetry>,
    offered: BTreeSet<u32>,
}

impl HealthBook {
    fn new(gpus: &[GpuInfo]) -> Self {
        let now = now_unix_ms();
        Self {
            trackers: gpus.iter().map(|g| (g.index, GpuHealthTracker::new(now))).collect(),
            telemetry: gpus
                .iter()
                .map(|g| (g.index, GpuTelemetry { index: g.index, uuid: g.uuid.clone(), ..Default::default() }))
                .collect(),
            offered: gpus.iter().map(|g| g.index).collect(),
        }
    }

    fn snapshot(&self) -> Vec<GpuTelemetry> {
        self.telemetry
            .iter()
            .map(|(index, t)| GpuTelemetry { health: self.trackers.get(index).map(|h| h.health()), ..t.clone() })
            .collect()
    }

    /// Applies a poll; returns the snapshot and a "health" event for each GPU
    /// the poll itself turned UNHEALTHY (a count rose, the GPU was lost, ...).
    fn apply_samples(&mut self, samples: Vec<GpuSample>, now: i64) -> (Vec<GpuTelemetry>, Vec<GpuEvent>) {
        let mut turned = Vec::new();
        for sample in samples {
            let index = sample.telemetry.index;
            let Some(tracker) = self.trackers.get_mut(&index) else { continue };
            let was = tracker.state();
            let health = tracker.observe(&sample.telemetry, sample.lost, now);
            if was != GpuHealthState::Unhealthy && tracker.state() == GpuHealthState::Unhealthy {
                tracing::warn!(gpu = index, reasons = ?health.reasons, "GPU unhealthy");
                turned.push(GpuEvent {
                    index,
                    uuid: sample.telemetry.uuid.clone(),
                    kind: "health".into(),
                    xid: 0,
                    detail: health.reasons.join("; "),
                    unix_ms: now,
                    health: Some(health),
                });
            }
            self.telemetry.insert(index, sample.telemetry);
        }
        (self.snapshot(), turned)
    }

    /// Applies an event of an offered GPU; returns what to send the controller.
    fn apply_event(&mut self, raw: &RawGpuEvent) -> Option<GpuEvent> {
        if !self.offered.contains(&raw.index) {
            return None;
        }
        let tracker = self.trackers.get_mut(&raw.index)?;
        let health = tracker.event(&raw.kind, raw.unix_ms);
        let detail = raw.kind.describe();
        tracing::warn!(gpu = raw.index, uuid = %raw.uuid, event = %detail, state = ?tracker.state(), "GPU event");
        Some(GpuEvent {
            index: raw.index,
            uuid: raw.uuid.clone(),
            kind: raw.kind.wire_name().into(),
            xid: match raw.kind {
                super::GpuEventKind::Xid(xid) => xid,
                _ => 0,
            },
            detail,
            unix_ms: raw.unix_ms,
            health: Some(health),
        })
    }

    fn clear(&mut self, index: u32, now: i64) -> Result<GpuHealth, String> {
        match self.trackers.get_mut(&index) {
            Some(tracker) => Ok(tracker.clear(now)),
            None => Err(format!("this agent offers no GPU {index} (it offers {:?})", self.offered)),
        }
    }
}
