//! GPUs that do not exist, for `--fake-gpus N` on machines without an NVIDIA
//! driver (development, CI, planner tests). This is the only fake: it sits
//! behind [`GpuBackend`] like NVML does, and every GPU it reports is marked
//! `fake`. Its readings are those of an idle H100 (GPU_IDLE, ECC counters 0,
//! no page retirement), and its NVLink islands are whatever
//! `--fake-gpu-islands` asks for.
//!
//! Test hook: `--fake-gpu-events FILE` makes the agent follow FILE (like
//! `tail -F`: lines already there at start are skipped, a file created later is
//! read from its start) and turn each line into what the hardware would do,
//! so tests and operators can exercise alerting without a broken GPU:
//!
//! ```text
//! xid 1 79            # XID 79 on GPU 1 (fallen off the bus)
//! ecc-dbe 0           # a double-bit ECC error on GPU 0
//! ecc-sbe 0           # a single-bit (corrected) ECC error on GPU 0
//! throttle 2 HW_THERMAL_SLOWDOWN   # reasons from the next poll on (or `none`)
//! ```

use std::collections::BTreeSet;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cohort_proto::{GpuInfo, GpuTelemetry, now_unix_ms};
use tokio::sync::mpsc;

use super::health::GpuEventKind;
use super::topology::{self, NVLINK};
use super::{GpuBackend, GpuSample, Inventory, RawGpuEvent};

/// How often the events file is looked at.
const FOLLOW_EVERY: Duration = Duration::from_millis(100);
/// NVLink links between two fake GPUs of one island (an HGX H100's count).
const FAKE_NVLINKS: u32 = 18;

/// What one line of the events file asks the fake hardware to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FakeCommand {
    Xid {
        index: u32,
        xid: u64,
    },
    EccDoubleBit {
        index: u32,
    },
    EccSingleBit {
        index: u32,
    },
    /// Clock-throttle reasons from the next poll on (empty: none).
    Throttle {
        index: u32,
        reasons: Vec<String>,
    },
}

impl FakeCommand {
    /// Parses one line; `None` for blank lines and `#` comments.
    pub fn parse(line: &str) -> Result<Option<Self>, String> {
        let line = line.split('#').next().unwrap_or_default().trim();
        let words: Vec<&str> = line.split_whitespace().collect();
        let index = |w: Option<&&str>| -> Result<u32, String> {
            w.ok_or_else(|| format!("{line:?}: which GPU? e.g. `{} 0`", words[0]))?
                .parse()
                .map_err(|_| format!("{line:?}: the GPU index must be a number"))
        };
        let command = match words.first() {
            None => return Ok(None),
            Some(&"xid") => {
                let xid = words.get(2).and_then(|w| w.parse().ok());
                let xid = xid.ok_or_else(|| format!("{line:?}: expected `xid INDEX CODE`, e.g. `xid 1 79`"))?;
                FakeCommand::Xid { index: index(words.get(1))?, xid }
            }
            Some(&"ecc-dbe") => FakeCommand::EccDoubleBit { index: index(words.get(1))? },
            Some(&"ecc-sbe") => FakeCommand::EccSingleBit { index: index(words.get(1))? },
            Some(&"throttle") => {
                let reasons = words.get(2).ok_or_else(|| {
                    format!("{line:?}: expected `throttle INDEX REASON[,REASON]` or `throttle INDEX none`")
                })?;
                let reasons = match *reasons {
                    "none" => Vec::new(),
                    list => list.split(',').map(|r| r.trim().to_ascii_uppercase()).collect(),
                };
                FakeCommand::Throttle { index: index(words.get(1))?, reasons }
            }
            Some(other) => {
                return Err(format!("{line:?}: unknown command {other:?} (xid, ecc-dbe, ecc-sbe, throttle)"));
            }
        };
        Ok(Some(command))
    }

    fn index(&self) -> u32 {
        match self {
            FakeCommand::Xid { index, .. }
            | FakeCommand::EccDoubleBit { index }
            | FakeCommand::EccSingleBit { index }
            | FakeCommand::Throttle { index, .. } => *index,
        }
    }
}

/// What the fake remembers of each GPU.
#[derive(Debug, Clone)]
struct FakeGpu {
    throttle: Vec<String>,
    corrected: u64,
    uncorrected: u64,
}

impl Default for FakeGpu {
    fn default() -> Self {
        Self { throttle: vec!["GPU_IDLE".into()], corrected: 0, uncorrected: 0 }
    }
}

struct Sink {
    tx: mpsc::Sender<RawGpuEvent>,
    watched: BTreeSet<u32>,
}

struct FakeState {
    gpus: Vec<GpuInfo>,
    faults: Mutex<Vec<FakeGpu>>,
    sink: Mutex<Option<Sink>>,
}

/// N GPUs that do not exist (see the module docs).
pub struct FakeBackend {
    state: Arc<FakeState>,
    islands: Vec<u32>,
    events_file: Option<PathBuf>,
}

impl FakeBackend {
    /// `count` GPUs without NVLink: each is its own island.
    pub fn new(count: u32) -> Self {
        Self::build(vec![1; count as usize])
    }

    /// GPUs in NVLink islands of the given sizes: `[4, 4]` is 8 GPUs, 0-3 and 4-7.
    pub fn with_islands(sizes: &[u32]) -> Self {
        Self::build(sizes.to_vec())
    }

    /// Follows `file` for injected events (the `--fake-gpu-events` test hook).
    pub fn follow_events(mut self, file: PathBuf) -> Self {
        self.events_file = Some(file);
        self
    }

    fn build(islands: Vec<u32>) -> Self {
        let count: u32 = islands.iter().sum();
        let island_of: Vec<usize> =
            islands.iter().enumerate().flat_map(|(n, size)| std::iter::repeat_n(n, *size as usize)).collect();
        let mut gpus: Vec<GpuInfo> = (0..count)
            .map(|index| GpuInfo {
                index,
                uuid: format!("GPU-fake-{index:04}"),
                name: "fake GPU (--fake-gpus)".into(),
                memory_total_bytes: 80 << 30,
                fake: true,
                pci_bus_id: format!("00000000:{:02x}:00.0", (0x10 + index) % 256),
                ..GpuInfo::default()
            })
            .collect();
        let mut nvlinks = std::collections::BTreeMap::new();
        for a in 0..count {
            for b in a + 1..count {
                if island_of[a as usize] == island_of[b as usize] {
                    nvlinks.insert((a, b), FAKE_NVLINKS);
                }
            }
        }
        topology::assemble(&mut gpus, &nvlinks, |_, _| Some("NODE".into()));
        debug_assert!(gpus.iter().all(|g| g.links.iter().all(|l| l.kind == NVLINK || l.kind == "NODE")));
        let state =
            FakeState { faults: Mutex::new(vec![FakeGpu::default(); gpus.len()]), gpus, sink: Mutex::new(None) };
        Self { state: Arc::new(state), islands, events_file: None }
    }

    /// Does what `command` says, as the hardware would: events go out at once
    /// (once the monitor watches), throttling shows from the next poll.
    pub fn inject(&self, command: FakeCommand) -> Result<(), String> {
        self.state.apply(command)
    }
}

impl FakeState {
    fn apply(&self, command: FakeCommand) -> Result<(), String> {
        let index = command.index();
        let Some(gpu) = self.gpus.iter().find(|g| g.index == index) else {
            return Err(format!("fake GPU {index} does not exist ({} fake GPUs)", self.gpus.len()));
        };
        // The event is queued before the lock is let go, so no poll shows the
        // new counters ahead of the event that explains them.
        let mut faults = self.faults.lock().map_err(|_| "fake GPU state poisoned".to_string())?;
        let fault = &mut faults[index as usize];
        let kind = match command {
            FakeCommand::Throttle { reasons, .. } => {
                fault.throttle = reasons;
                return Ok(());
            }
            FakeCommand::Xid { xid, .. } => GpuEventKind::Xid(xid),
            FakeCommand::EccDoubleBit { .. } => {
                fault.uncorrected += 1;
                GpuEventKind::EccDoubleBit
            }
            FakeCommand::EccSingleBit { .. } => {
                fault.corrected += 1;
                GpuEventKind::EccSingleBit
            }
        };
        let sink = self.sink.lock().map_err(|_| "fake GPU state poisoned".to_string())?;
        let Some(sink) = sink.as_ref().filter(|s| s.watched.contains(&index)) else {
            tracing::info!(gpu = index, event = %kind.describe(), "fake GPU event with nobody watching GPU {index}");
            return Ok(());
        };
        let event = RawGpuEvent { index, uuid: gpu.uuid.clone(), kind, unix_ms: now_unix_ms() };
        sink.tx.try_send(event).map_err(|e| format!("fake GPU {index}: event not delivered ({e})"))
    }

    fn watching(&self) -> bool {
        self.sink.lock().map(|s| s.as_ref().is_some_and(|s| !s.tx.is_closed())).unwrap_or(false)
    }
}

impl GpuBackend for FakeBackend {
    fn inventory(&self) -> Inventory {
        let shape = if self.islands.iter().all(|s| *s == 1) {
            String::new()
        } else {
            format!(" in NVLink islands {:?}", self.islands)
        };
        Inventory {
            gpus: self.state.gpus.clone(),
            note: format!("{} fake GPU(s){shape} from --fake-gpus", self.state.gpus.len()),
        }
    }

    fn poll(&self, gpus: &[GpuInfo]) -> Vec<GpuSample> {
        let faults = match self.state.faults.lock() {
            Ok(f) => f.clone(),
            Err(_) => return Vec::new(),
        };
        gpus.iter()
            .filter_map(|gpu| {
                let fault = faults.get(gpu.index as usize)?;
                let telemetry = GpuTelemetry {
                    index: gpu.index,
                    uuid: gpu.uuid.clone(),
                    utilization_gpu_pct: Some(0),
                    utilization_memory_pct: Some(0),
                    memory_used_bytes: Some(0),
                    memory_total_bytes: Some(gpu.memory_total_bytes),
                    temperature_c: Some(34),
                    power_w: Some(70.0),
                    power_limit_w: Some(700.0),
                    sm_clock_mhz: Some(345),
                    throttle_reasons: fault.throttle.clone(),
                    ecc_volatile_corrected: Some(fault.corrected),
                    ecc_volatile_uncorrected: Some(fault.uncorrected),
                    ecc_aggregate_corrected: Some(fault.corrected),
                    ecc_aggregate_uncorrected: Some(fault.uncorrected),
                    remapped_rows_correctable: Some(0),
                    remapped_rows_uncorrectable: Some(0),
                    remapped_rows_pending: Some(false),
                    remapped_rows_failed: Some(false),
                    ..GpuTelemetry::default()
                };
                Some(GpuSample { telemetry, lost: false })
            })
            .collect()
    }

    fn watch_events(&self, gpus: &[GpuInfo], sink: mpsc::Sender<RawGpuEvent>) -> Result<(), String> {
        let watched = gpus.iter().map(|g| g.index).collect();
        *self.state.sink.lock().map_err(|_| "fake GPU state poisoned".to_string())? = Some(Sink { tx: sink, watched });
        if let Some(file) = &self.events_file {
            let (state, path) = (self.state.clone(), file.clone());
            std::thread::Builder::new()
                .name("fake-gpu-events".into())
                .spawn(move || follow(&path, &state))
                .map_err(|e| format!("cannot start the thread following {}: {e}", file.display()))?;
        }
        Ok(())
    }

    fn clear(&self, index: u32) {
        if let Ok(mut faults) = self.state.faults.lock()
            && let Some(fault) = faults.get_mut(index as usize)
        {
            fault.throttle = FakeGpu::default().throttle;
        }
    }
}

/// Follows `path` like `tail -F` until nobody watches the events any more.
fn follow(path: &Path, state: &FakeState) {
    tracing::info!(file = %path.display(), "following fake GPU events (test hook)");
    // None: the file is not there (yet); once it appears it is read from the start.
    let mut offset: Option<u64> = std::fs::metadata(path).ok().map(|m| m.len());
    let mut line_no = 0u64;
    while state.watching() {
        match std::fs::File::open(path) {
            Ok(mut file) => {
                let start = offset.unwrap_or(0);
                let len = file.metadata().map(|m| m.len()).unwrap_or(0);
                let start = if len < start { 0 } else { start }; // truncated: begin again
                let mut text = Vec::new();
                if file.seek(SeekFrom::Start(start)).is_ok() && file.read_to_end(&mut text).is_ok() {
                    // Only whole lines; a line still being written waits for its newline.
                    let whole = text.iter().rposition(|b| *b == b'\n').map_or(0, |p| p + 1);
                    for line in String::from_utf8_lossy(&text[..whole]).lines() {
                        line_no += 1;
                        let result = FakeCommand::parse(line).and_then(|c| c.map_or(Ok(()), |c| state.apply(c)));
                        if let Err(e) = result {
                            tracing::warn!(file = %path.display(), line = line_no, "fake GPU events: {e}");
                        }
                    }
                    offset = Some(start + whole as u64);
                }
            }
            Err(_) => offset = None,
        }
        std::thread::sleep(FOLLOW_EVERY);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_parse() {
        assert_eq!(FakeCommand::parse("xid 1 79"), Ok(Some(FakeCommand::Xid { index: 1, xid: 79 })));
        assert_eq!(FakeCommand::parse("  ecc-dbe 0  # boom"), Ok(Some(FakeCommand::EccDoubleBit { index: 0 })));
        assert_eq!(FakeCommand::parse("ecc-sbe 3"), Ok(Some(FakeCommand::EccSingleBit { index: 3 })));
        assert_eq!(
            FakeCommand::parse("throttle 2 hw_slowdown,SW_THERMAL_SLOWDOWN"),
            Ok(Some(FakeCommand::Throttle {
                index: 2,
                reasons: vec!["HW_SLOWDOWN".into(), "SW_THERMAL_SLOWDOWN".into()]
            }))
        );
        assert_eq!(
            FakeCommand::parse("throttle 2 none"),
            Ok(Some(FakeCommand::Throttle { index: 2, reasons: vec![] }))
        );
        assert_eq!(FakeCommand::parse("# comment"), Ok(None));
        assert_eq!(FakeCommand::parse(""), Ok(None));
        for bad in ["xid 1", "xid x 79", "ecc-dbe", "reboot 1", "throttle 1"] {
            assert!(FakeCommand::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn fake_gpus_are_marked_numbered_and_islanded() {
        let inv = FakeBackend::with_islands(&[4, 4]).inventory();
        assert_eq!(inv.gpus.iter().map(|g| g.index).collect::<Vec<_>>(), (0..8).collect::<Vec<_>>());
        assert!(inv.gpus.iter().all(|g| g.fake && g.uuid.starts_with("GPU-fake-")));
        assert_eq!(inv.gpus.iter().map(|g| g.nvlink_island).collect::<Vec<_>>(), [0, 0, 0, 0, 1, 1, 1, 1]);
        let g0 = &inv.gpus[0];
        assert_eq!(g0.links.iter().filter(|l| l.kind == NVLINK).map(|l| l.peer_index).collect::<Vec<_>>(), [1, 2, 3]);
        assert!(inv.note.contains("[4, 4]"), "{}", inv.note);

        let plain = FakeBackend::new(3).inventory();
        assert_eq!(plain.gpus.iter().map(|g| g.nvlink_island).collect::<Vec<_>>(), [0, 1, 2]);
        assert!(plain.gpus.iter().all(|g| g.links.iter().all(|l| l.kind != NVLINK)));
    }

    #[test]
    fn injected_faults_show_in_the_next_poll() {
        let fake = FakeBackend::new(2);
        let gpus = fake.inventory().gpus;
        assert_eq!(fake.poll(&gpus)[1].telemetry.throttle_reasons, ["GPU_IDLE"]);
        fake.inject(FakeCommand::Throttle { index: 1, reasons: vec!["HW_SLOWDOWN".into()] }).unwrap_or_default();
        fake.inject(FakeCommand::EccDoubleBit { index: 1 }).unwrap_or_default();
        let sample = &fake.poll(&gpus)[1].telemetry;
        assert_eq!(sample.throttle_reasons, ["HW_SLOWDOWN"]);
        assert_eq!(sample.ecc_volatile_uncorrected, Some(1));
        assert!(fake.inject(FakeCommand::Xid { index: 5, xid: 79 }).is_err());
    }
}
