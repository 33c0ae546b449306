//! The real backend: NVML through nvml-wrapper, which loads
//! `libnvidia-ml.so.1` at run time (the agent links no NVIDIA library).
//!
//! - No library or no driver loaded means "no GPUs", with the reason in the
//!   inventory's note, never an error.
//! - One `Nvml` for the whole process ([`shared_nvml`]); devices are looked
//!   up by UUID on every poll, so a renumbering cannot mix up two GPUs.
//! - A call answering `NotSupported` leaves its metric out. Other errors are
//!   logged once per GPU and metric (`FailedToLoadSymbol`: the driver is too
//!   old for that call), and `GpuLost` marks the sample lost.
//! - `EventSet::wait` blocks, so events have a thread of their own.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::{Mutex, OnceLock};

use cohort_proto::{GpuInfo, GpuProcess, GpuTelemetry, now_unix_ms};
use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::{
    Clock, EccCounter, MemoryError, P2pCapabilitiesIndex, P2pStatus, RetirementCause, TemperatureSensor, TopologyLevel,
};
use nvml_wrapper::enums::device::{SampleValue, UsedGpuMemory};
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::structs::device::FieldId;
use nvml_wrapper::sys_exports::field_id::{
    NVML_FI_DEV_REMAPPED_COR, NVML_FI_DEV_REMAPPED_FAILURE, NVML_FI_DEV_REMAPPED_PENDING, NVML_FI_DEV_REMAPPED_UNC,
};
use nvml_wrapper::{Device, EventSet, Nvml};
use tokio::sync::mpsc;

use super::health::GpuEventKind;
use super::topology::{self, NvlinkScan};
use super::{GpuBackend, GpuSample, Inventory, RawGpuEvent};

/// Hopper has 18 NVLink links per GPU, the most NVML knows of.
const MAX_NVLINKS: u32 = 18;
/// How long one `EventSet::wait` blocks before the thread checks whether anyone still listens.
const EVENT_WAIT_MS: u32 = 1000;

static NVML: OnceLock<Result<Nvml, String>> = OnceLock::new();

/// The process's one NVML handle, initialised on first use. The error says
/// why there are no GPUs (no library, no driver, ...).
pub fn shared_nvml() -> Result<&'static Nvml, String> {
    NVML.get_or_init(|| {
        Nvml::init().map_err(|e| match e {
            NvmlError::LibloadingError(e) => {
                format!("no NVIDIA driver: libnvidia-ml.so.1 could not be loaded ({e})")
            }
            NvmlError::DriverNotLoaded => "no NVIDIA driver loaded (NVML: DriverNotLoaded)".into(),
            e => format!("NVML unavailable: {e}"),
        })
    })
    .as_ref()
    .map_err(Clone::clone)
}

/// GPUs read through NVML.
pub struct NvmlBackend {
    nvml: Result<&'static Nvml, String>,
    /// (GPU UUID, metric) pairs whose error has been logged already.
    logged: Mutex<HashSet<(String, &'static str)>>,
}

impl NvmlBackend {
    /// Loads NVML; without a driver the backend reports no GPUs.
    pub fn open() -> Self {
        Self { nvml: shared_nvml(), logged: Mutex::new(HashSet::new()) }
    }

    /// Logs an error of `metric` on GPU `uuid` the first time only.
    fn log_once(&self, uuid: &str, metric: &'static str, error: &NvmlError) {
        let first = self.logged.lock().map(|mut l| l.insert((uuid.to_string(), metric))).unwrap_or(false);
        if first {
            match error {
                NvmlError::FailedToLoadSymbol(symbol) => tracing::warn!(
                    gpu = uuid,
                    metric,
                    symbol,
                    "the NVIDIA driver is too old for this NVML call; the metric is left out"
                ),
                e => {
                    tracing::warn!(gpu = uuid, metric, error = %e, "NVML call failed; logged once, the metric is left out")
                }
            }
        }
    }
}

/// Reads metrics of one GPU, leaving out what is unsupported.
struct Reader<'a> {
    backend: &'a NvmlBackend,
    uuid: &'a str,
    lost: bool,
}

impl Reader<'_> {
    fn get<T>(&mut self, metric: &'static str, result: Result<T, NvmlError>) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(NvmlError::NotSupported) => None,
            Err(NvmlError::GpuLost) => {
                self.lost = true;
                None
            }
            Err(e) => {
                self.backend.log_once(self.uuid, metric, &e);
                None
            }
        }
    }
}

impl NvmlBackend {
    fn sample(&self, nvml: &Nvml, gpu: &GpuInfo) -> GpuSample {
        let mut r = Reader { backend: self, uuid: &gpu.uuid, lost: false };
        let mut t = GpuTelemetry { index: gpu.index, uuid: gpu.uuid.clone(), ..GpuTelemetry::default() };
        let device = match nvml.device_by_uuid(gpu.uuid.as_str()) {
            // A GPU that left the bus may no longer be found at all.
            Err(NvmlError::NotFound) => return GpuSample { telemetry: t, lost: true },
            result => r.get("device_by_uuid", result),
        };
        let Some(device) = device else { return GpuSample { telemetry: t, lost: r.lost } };
        if let Some(u) = r.get("utilization", device.utilization_rates()) {
            t.utilization_gpu_pct = Some(u.gpu);
            t.utilization_memory_pct = Some(u.memory);
        }
        if let Some(m) = r.get("memory", device.memory_info()) {
            t.memory_used_bytes = Some(m.used);
            t.memory_total_bytes = Some(m.total);
        }
        t.temperature_c = r.get("temperature", device.temperature(TemperatureSensor::Gpu));
        t.power_w = r.get("power", device.power_usage()).map(|mw| f64::from(mw) / 1000.0);
        t.power_limit_w = r.get("power_limit", device.enforced_power_limit()).map(|mw| f64::from(mw) / 1000.0);
        t.sm_clock_mhz = r.get("sm_clock", device.clock_info(Clock::SM));
        if let Some(reasons) = r.get("throttle_reasons", device.current_throttle_reasons()) {
            t.throttle_reasons = reasons.iter_names().map(|(name, _)| name.to_string()).collect();
        }
        let ecc = |error, counter| device.total_ecc_errors(error, counter);
        t.ecc_volatile_corrected = r.get("ecc", ecc(MemoryError::Corrected, EccCounter::Volatile));
        t.ecc_volatile_uncorrected = r.get("ecc", ecc(MemoryError::Uncorrected, EccCounter::Volatile));
        t.ecc_aggregate_corrected = r.get("ecc", ecc(MemoryError::Corrected, EccCounter::Aggregate));
        t.ecc_aggregate_uncorrected = r.get("ecc", ecc(MemoryError::Uncorrected, EccCounter::Aggregate));
        let retired = |cause| device.retired_pages(cause).map(|pages| pages.len() as u32);
        t.retired_pages_single_bit = r.get("retired_pages", retired(RetirementCause::MultipleSingleBitEccErrors));
        t.retired_pages_double_bit = r.get("retired_pages", retired(RetirementCause::DoubleBitEccError));
        self.remapped_rows(&mut r, &device, &mut t);
        if let Some(processes) = r.get("processes", device.running_compute_processes()) {
            t.processes = processes
                .into_iter()
                .map(|p| GpuProcess {
                    pid: p.pid,
                    used_memory_bytes: match p.used_gpu_memory {
                        UsedGpuMemory::Used(bytes) => bytes,
                        UsedGpuMemory::Unavailable => 0,
                    },
                })
                .collect();
        }
        GpuSample { telemetry: t, lost: r.lost }
    }

    /// nvml-wrapper 0.13 does not wrap nvmlDeviceGetRemappedRows (and this
    /// crate forbids unsafe code), so the row remapper is read through field
    /// values, which is the same counter.
    fn remapped_rows(&self, r: &mut Reader<'_>, device: &Device<'_>, t: &mut GpuTelemetry) {
        let ids = [
            NVML_FI_DEV_REMAPPED_COR,
            NVML_FI_DEV_REMAPPED_UNC,
            NVML_FI_DEV_REMAPPED_PENDING,
            NVML_FI_DEV_REMAPPED_FAILURE,
        ];
        let Some(values) = r.get("remapped_rows", device.field_values_for(&ids.map(FieldId))) else { return };
        let mut values: BTreeMap<u32, Result<SampleValue, NvmlError>> =
            values.into_iter().flatten().map(|v| (v.field.0, v.value)).collect();
        let mut read = |id: u32| -> Option<u64> {
            let value = r.get("remapped_rows", values.remove(&id)?)?;
            Some(match value {
                SampleValue::U32(v) => u64::from(v),
                SampleValue::U64(v) => v,
                SampleValue::I64(v) => v.max(0) as u64,
                SampleValue::F64(v) => v.max(0.0) as u64,
            })
        };
        t.remapped_rows_correctable = read(NVML_FI_DEV_REMAPPED_COR).map(|v| v as u32);
        t.remapped_rows_uncorrectable = read(NVML_FI_DEV_REMAPPED_UNC).map(|v| v as u32);
        t.remapped_rows_pending = read(NVML_FI_DEV_REMAPPED_PENDING).map(|v| v != 0);
        t.remapped_rows_failed = read(NVML_FI_DEV_REMAPPED_FAILURE).map(|v| v != 0);
    }
}

impl GpuBackend for NvmlBackend {
    fn inventory(&self) -> Inventory {
        let nvml = match self.nvml {
            Ok(nvml) => nvml,
            Err(ref note) => return Inventory { gpus: Vec::new(), note: note.clone() },
        };
        let count = match nvml.device_count() {
            Ok(count) => count,
            Err(e) => return Inventory { gpus: Vec::new(), note: format!("NVML loaded but listing GPUs failed: {e}") },
        };
        let mut gpus = Vec::with_capacity(count as usize);
        let mut skipped = Vec::new();
        for index in 0..count {
            match read_device(nvml, index) {
                Ok(gpu) => gpus.push(gpu),
                Err(e) => {
                    tracing::warn!(gpu = index, error = %e, "GPU unreadable; not offered");
                    skipped.push(format!("GPU {index} unreadable ({e})"));
                }
            }
        }
        read_topology(nvml, &mut gpus);
        let driver = nvml.sys_driver_version().unwrap_or_else(|_| "unknown".into());
        let mut note = format!("{} GPU(s) through NVML, driver {driver}", gpus.len());
        if !skipped.is_empty() {
            note += &format!("; {}", skipped.join("; "));
        }
        Inventory { gpus, note }
    }

    fn poll(&self, gpus: &[GpuInfo]) -> Vec<GpuSample> {
        match self.nvml {
            Ok(nvml) => gpus.iter().map(|gpu| self.sample(nvml, gpu)).collect(),
            Err(_) => Vec::new(),
        }
    }

    fn watch_events(&self, gpus: &[GpuInfo], sink: mpsc::Sender<RawGpuEvent>) -> Result<(), String> {
        let nvml = self.nvml.as_ref().map_err(Clone::clone)?;
        if gpus.is_empty() {
            return Ok(());
        }
        let set = register_events(nvml, gpus)?;
        let by_uuid: BTreeMap<String, u32> = gpus.iter().map(|g| (g.uuid.clone(), g.index)).collect();
        std::thread::Builder::new()
            .name("nvml-events".into())
            .spawn(move || event_loop(&set, &by_uuid, &sink))
            .map_err(|e| format!("cannot start the NVML event thread: {e}"))?;
        Ok(())
    }

    /// Nothing to forget: NVML's counters are the hardware's. The health
    /// policy re-bases on the counters as they are at the clear.
    fn clear(&self, _index: u32) {}
}

fn read_device(nvml: &Nvml, index: u32) -> Result<GpuInfo, NvmlError> {
    let device = nvml.device_by_index(index)?;
    Ok(GpuInfo {
        index,
        uuid: device.uuid()?,
        name: device.name()?,
        memory_total_bytes: device.memory_info()?.total,
        fake: false,
        pci_bus_id: device.pci_info()?.bus_id,
        ..GpuInfo::default()
    })
}

/// Fills `links` and `nvlink_island`: NVLink links (nvmlDeviceGetNvLinkState,
/// nvmlDeviceGetNvLinkRemotePciInfo_v2), NVLink P2P status as a fallback, and
/// PCIe common ancestors (nvmlDeviceGetTopologyCommonAncestor) for the rest.
fn read_topology(nvml: &Nvml, gpus: &mut [GpuInfo]) {
    let device = |index: u32| nvml.device_by_index(index).ok();
    let scans: Vec<NvlinkScan> = gpus
        .iter()
        .map(|gpu| NvlinkScan {
            index: gpu.index,
            pci_bus_id: gpu.pci_bus_id.clone(),
            remotes: device(gpu.index).map(|d| active_nvlink_remotes(&d)).unwrap_or_default(),
        })
        .collect();
    let mut p2p = BTreeSet::new();
    for (i, a) in gpus.iter().enumerate() {
        for b in &gpus[i + 1..] {
            if let (Some(da), Some(db)) = (device(a.index), device(b.index))
                && matches!(da.p2p_status(&db, P2pCapabilitiesIndex::NvLink), Ok(P2pStatus::Ok))
            {
                p2p.insert((a.index.min(b.index), a.index.max(b.index)));
            }
        }
    }
    let nvlinks = topology::nvlink_pairs(&scans, &p2p);
    topology::assemble(gpus, &nvlinks, |a, b| {
        let level = device(a)?.topology_common_ancestor(device(b)?).ok()?;
        Some(
            match level {
                TopologyLevel::Internal => "INTERNAL",
                TopologyLevel::Single => "SINGLE",
                TopologyLevel::Multiple => "MULTIPLE",
                TopologyLevel::HostBridge => "HOSTBRIDGE",
                TopologyLevel::Node => "NODE",
                TopologyLevel::System => "SYSTEM",
            }
            .to_string(),
        )
    });
}

/// The remote PCI bus id of each active NVLink link; empty without NVLink
/// (a single-GPU VM answers NotSupported).
fn active_nvlink_remotes(device: &Device<'_>) -> Vec<String> {
    let mut remotes = Vec::new();
    for link in 0..MAX_NVLINKS {
        let link = device.link_wrapper_for(link);
        match link.is_active() {
            Ok(true) => {
                if let Ok(remote) = link.remote_pci_info() {
                    remotes.push(remote.bus_id);
                }
            }
            Ok(false) => {}
            Err(NvmlError::NotSupported) => break,
            // InvalidArg: past this GPU's last link.
            Err(_) => continue,
        }
    }
    remotes
}

/// Registers XID, double-bit and single-bit ECC events of every GPU that
/// supports them. A failed registration frees the set (NVML's rule), so the
/// set is rebuilt without that GPU.
fn register_events(nvml: &'static Nvml, gpus: &[GpuInfo]) -> Result<EventSet<'static>, String> {
    let wanted = EventTypes::CRITICAL_XID_ERROR | EventTypes::DOUBLE_BIT_ECC_ERROR | EventTypes::SINGLE_BIT_ECC_ERROR;
    let new_set = || nvml.create_event_set().map_err(|e| format!("cannot create an NVML event set: {e}"));
    let mut set = new_set()?;
    let mut registered: Vec<(Device<'static>, EventTypes)> = Vec::new();
    for gpu in gpus {
        let Ok(device) = nvml.device_by_uuid(gpu.uuid.as_str()) else { continue };
        let types = match device.supported_event_types() {
            Ok(supported) => supported & wanted,
            Err(e) => {
                tracing::warn!(gpu = gpu.index, error = %e, "cannot read the GPU's supported events; none watched");
                continue;
            }
        };
        if types.is_empty() {
            tracing::warn!(gpu = gpu.index, "the GPU supports none of XID and ECC events; health relies on polling");
            continue;
        }
        match device.register_events(types, set) {
            Ok(s) => {
                set = s;
                registered.push((device, types));
            }
            Err(e) => {
                tracing::warn!(gpu = gpu.index, error = %e.error, "cannot watch the GPU's events; health relies on polling");
                set = new_set()?;
                for (device, types) in &registered {
                    set = device
                        .register_events(*types, set)
                        .map_err(|e| format!("re-registering events: {}", e.error))?;
                }
            }
        }
    }
    Ok(set)
}

/// Waits for events until the receiver is gone, sending each one at once.
fn event_loop(set: &EventSet<'static>, by_uuid: &BTreeMap<String, u32>, sink: &mpsc::Sender<RawGpuEvent>) {
    let mut logged = HashSet::new();
    while !sink.is_closed() {
        let data = match set.wait(EVENT_WAIT_MS) {
            Ok(data) => data,
            Err(NvmlError::Timeout) => continue,
            Err(e) => {
                // GpuLost and friends: the poll sees which GPU; do not spin.
                if logged.insert(e.to_string()) {
                    tracing::warn!(error = %e, "waiting for NVML events failed; retrying every second");
                }
                std::thread::sleep(std::time::Duration::from_secs(1));
                continue;
            }
        };
        let Ok(uuid) = data.device.uuid() else { continue };
        let Some(&index) = by_uuid.get(&uuid) else { continue };
        let kind = if data.event_type.contains(EventTypes::CRITICAL_XID_ERROR) {
            GpuEventKind::Xid(match data.event_data {
                Some(XidError::Value(xid)) => xid,
                _ => 0,
            })
        } else if data.event_type.contains(EventTypes::DOUBLE_BIT_ECC_ERROR) {
            GpuEventKind::EccDoubleBit
        } else if data.event_type.contains(EventTypes::SINGLE_BIT_ECC_ERROR) {
            GpuEventKind::EccSingleBit
        } else {
            continue;
        };
        if sink.blocking_send(RawGpuEvent { index, uuid, kind, unix_ms: now_unix_ms() }).is_err() {
            return;
        }
    }
}
