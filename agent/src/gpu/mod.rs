//! The node's GPUs: inventory with topology, telemetry, health and events.
//!
//! A [`GpuBackend`] reads the hardware. [`NvmlBackend`] does it through NVML
//! (`libnvidia-ml.so.1`, loaded at run time) wherever a driver is present;
//! without one it reports no GPUs and says why. [`FakeBackend`] offers GPUs
//! that do not exist, for `--fake-gpus N` on machines without a driver
//! (development, CI, planner tests): it is the only fake, it lives behind the
//! same trait, and every GPU it reports is marked `fake`. [`ReaderBackend`]
//! runs either of them in a child process, `cohort-agent gpu-reader`
//! ([`reader`]): NVML runs there by default ([`ReaderMode`]), so its memory,
//! its blocking calls and its faults stay out of the agent.
//!
//! [`GpuMonitor`] runs a backend: it polls telemetry on its own cadence in a
//! blocking thread, applies the health policy ([`health`]), sends each event
//! the moment the backend reports it, and hands the session the latest
//! snapshot for its heartbeats, so a slow NVML call never delays a heartbeat.

pub mod fake;
pub mod health;
mod monitor;
pub mod nvml;
pub mod reader;
pub mod topology;

use std::path::PathBuf;
use std::sync::Arc;

use cohort_proto::{GpuInfo, GpuTelemetry};
use tokio::sync::mpsc;

pub use fake::{FakeBackend, FakeCommand};
pub use health::{GpuEventKind, GpuHealthTracker};
pub use monitor::{GpuMonitor, MonitorConfig, MonitorError};
pub use nvml::NvmlBackend;
pub use reader::ReaderBackend;

/// The GPUs a backend found, and one line on where they came from (for `cohort nodes`).
#[derive(Debug, Clone, Default)]
pub struct Inventory {
    /// With `pci_bus_id`, `links` and `nvlink_island` filled in.
    pub gpus: Vec<GpuInfo>,
    pub note: String,
}

/// One poll of one GPU, before the health policy has looked at it.
#[derive(Debug, Clone, Default)]
pub struct GpuSample {
    /// Every metric the GPU supports; `health` is left empty.
    pub telemetry: GpuTelemetry,
    /// NVML answered `GpuLost`: the GPU fell off the bus or is unusable.
    pub lost: bool,
}

/// An event as a backend reports it, the moment it happens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawGpuEvent {
    pub index: u32,
    pub uuid: String,
    pub kind: GpuEventKind,
    pub unix_ms: i64,
}

/// Where a GPU's readings come from: NVML on real hardware, or the fake.
pub trait GpuBackend: Send + Sync + 'static {
    /// The node's GPUs with their topology. Read once, at start. May block.
    fn inventory(&self) -> Inventory;
    /// One sample of each of `gpus` (found by UUID). A metric the GPU does not
    /// support is absent, never an error. Blocks on NVML: the monitor calls it
    /// from a blocking thread.
    fn poll(&self, gpus: &[GpuInfo]) -> Vec<GpuSample>;
    /// Starts reporting the events of `gpus` on `sink`, from a thread of its
    /// own, as they happen; the thread ends once the receiver is dropped.
    /// An error means no events (the monitor logs it and goes on polling).
    fn watch_events(&self, gpus: &[GpuInfo], sink: mpsc::Sender<RawGpuEvent>) -> Result<(), String>;
    /// An operator cleared GPU `index`: forget what the backend itself
    /// remembers about its faults. Must not block.
    fn clear(&self, index: u32);
}

/// How `--fake-gpus`, `--fake-gpu-islands` and `--fake-gpu-events` ask for the fake.
#[derive(Debug, Clone, Default)]
pub struct FakeGpuFlags {
    pub count: Option<u32>,
    pub islands: Option<Vec<u32>>,
    pub events_file: Option<PathBuf>,
}

/// Where the backend runs (`--gpu-reader`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ReaderMode {
    /// NVML in a reader process ([`reader`]), the fake in the agent.
    #[default]
    Auto,
    /// Whichever backend, in a reader process.
    Process,
    /// Whichever backend, in the agent itself.
    Inline,
}

/// Picks the backend (the fake when a fake flag asks for it, else NVML) and
/// where it runs.
pub fn open_backend(flags: FakeGpuFlags, mode: ReaderMode) -> Result<Arc<dyn GpuBackend>, String> {
    let fake = check_flags(&flags)?;
    match mode {
        ReaderMode::Inline => open_in_process(flags),
        ReaderMode::Auto if fake => open_in_process(flags),
        ReaderMode::Auto | ReaderMode::Process => Ok(Arc::new(ReaderBackend::this_binary(&flags))),
    }
}

/// Whether the flags ask for the fake; an error when they contradict each other.
fn check_flags(flags: &FakeGpuFlags) -> Result<bool, String> {
    match (flags.count, &flags.islands) {
        (None, None) => match &flags.events_file {
            Some(file) => Err(format!(
                "--fake-gpu-events {} needs --fake-gpus or --fake-gpu-islands (NVML reports real events)",
                file.display()
            )),
            None => Ok(false),
        },
        (Some(count), Some(islands)) if count != islands.iter().sum::<u32>() => Err(format!(
            "--fake-gpus {count} disagrees with --fake-gpu-islands {islands:?} ({} GPUs); give one of them",
            islands.iter().sum::<u32>()
        )),
        (_, Some(islands)) if islands.contains(&0) => {
            Err(format!("--fake-gpu-islands {islands:?}: an island needs at least one GPU"))
        }
        _ => Ok(true),
    }
}

/// The backend the flags ask for, in this process.
pub fn open_in_process(flags: FakeGpuFlags) -> Result<Arc<dyn GpuBackend>, String> {
    check_flags(&flags)?;
    let fake = match (flags.count, flags.islands) {
        (None, None) => return Ok(Arc::new(NvmlBackend::open())),
        (Some(count), None) => FakeBackend::new(count),
        (_, Some(islands)) => FakeBackend::with_islands(&islands),
    };
    Ok(Arc::new(match flags.events_file {
        Some(file) => fake.follow_events(file),
        None => fake,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fake_flags_pick_and_check_the_fake() {
        let open = |flags| open_backend(flags, ReaderMode::Auto);
        let inv = open(FakeGpuFlags { count: Some(3), ..Default::default() }).map(|b| b.inventory());
        assert_eq!(inv.map(|i| i.gpus.len()), Ok(3));
        let islands = FakeGpuFlags { islands: Some(vec![4, 4]), ..Default::default() };
        assert_eq!(open(islands).map(|b| b.inventory().gpus.len()), Ok(8));
        let both = FakeGpuFlags { count: Some(7), islands: Some(vec![4, 4]), ..Default::default() };
        assert!(open(both).err().is_some_and(|e| e.contains("disagrees")));
        let events = FakeGpuFlags { events_file: Some("/tmp/x".into()), ..Default::default() };
        assert!(open(events).err().is_some_and(|e| e.contains("needs --fake-gpus")));
    }
}
