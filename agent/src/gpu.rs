//! The node's GPU inventory: NVML where a driver is present, otherwise none,
//! or `--fake-gpus N` slots for development machines (marked fake).

use cohort_proto::GpuInfo;
use nvml_wrapper::Nvml;
use nvml_wrapper::error::NvmlError;

/// What the agent reports about its GPUs.
pub trait GpuInventory: Send + Sync {
    fn gpus(&self) -> Vec<GpuInfo>;
    /// One line on where the inventory came from, for `cohort nodes`.
    fn note(&self) -> String;
}

/// GPUs read through NVML (`libnvidia-ml.so.1`, loaded at run time).
pub struct NvmlInventory {
    gpus: Vec<GpuInfo>,
    note: String,
}

/// N GPU slots that do not exist, for machines without NVIDIA GPUs.
pub struct FakeInventory {
    count: u32,
}

impl GpuInventory for FakeInventory {
    fn gpus(&self) -> Vec<GpuInfo> {
        (0..self.count)
            .map(|index| GpuInfo {
                index,
                uuid: format!("GPU-fake-{index:04}"),
                name: "fake GPU (--fake-gpus)".into(),
                memory_total_bytes: 80 << 30,
                fake: true,
                ..GpuInfo::default()
            })
            .collect()
    }
    fn note(&self) -> String {
        format!("{} fake GPU slot(s) from --fake-gpus", self.count)
    }
}

impl GpuInventory for NvmlInventory {
    fn gpus(&self) -> Vec<GpuInfo> {
        self.gpus.clone()
    }
    fn note(&self) -> String {
        self.note.clone()
    }
}

impl NvmlInventory {
    /// Reads the inventory once. No driver (or no library) means no GPUs, with
    /// the reason in `note`; it is not an error.
    pub fn probe() -> Self {
        match Nvml::init() {
            Ok(nvml) => match read_devices(&nvml) {
                Ok(gpus) => {
                    let driver = nvml.sys_driver_version().unwrap_or_else(|_| "unknown".into());
                    let note = format!("{} GPU(s) through NVML, driver {driver}", gpus.len());
                    Self { gpus, note }
                }
                Err(e) => Self { gpus: Vec::new(), note: format!("NVML loaded but listing GPUs failed: {e}") },
            },
            Err(NvmlError::LibloadingError(e)) => Self {
                gpus: Vec::new(),
                note: format!("no NVIDIA driver: libnvidia-ml.so.1 could not be loaded ({e})"),
            },
            Err(NvmlError::DriverNotLoaded) => {
                Self { gpus: Vec::new(), note: "no NVIDIA driver loaded (NVML: DriverNotLoaded)".into() }
            }
            Err(e) => Self { gpus: Vec::new(), note: format!("NVML unavailable: {e}") },
        }
    }
}

fn read_devices(nvml: &Nvml) -> Result<Vec<GpuInfo>, NvmlError> {
    let count = nvml.device_count()?;
    let mut gpus = Vec::with_capacity(count as usize);
    for index in 0..count {
        let device = nvml.device_by_index(index)?;
        gpus.push(GpuInfo {
            index,
            uuid: device.uuid()?,
            name: device.name()?,
            memory_total_bytes: device.memory_info()?.total,
            fake: false,
            ..GpuInfo::default()
        });
    }
    Ok(gpus)
}

/// Picks the inventory: fake slots when asked for, else NVML.
pub fn detect(fake_gpus: Option<u32>) -> Box<dyn GpuInventory> {
    match fake_gpus {
        Some(count) => Box::new(FakeInventory { count }),
        None => Box::new(NvmlInventory::probe()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fake_slots_are_marked_and_numbered() {
        let inv = FakeInventory { count: 3 };
        let gpus = inv.gpus();
        assert_eq!(gpus.iter().map(|g| g.index).collect::<Vec<_>>(), [0, 1, 2]);
        assert!(gpus.iter().all(|g| g.fake));
        assert_ne!(gpus[0].uuid, gpus[1].uuid);
    }

    /// On a GPU host this reads real values; elsewhere NVML must fail softly.
    #[test]
    fn nvml_probe_never_panics_and_explains_itself() {
        let inv = NvmlInventory::probe();
        assert!(!inv.note().is_empty());
        for gpu in inv.gpus() {
            assert!(gpu.uuid.starts_with("GPU-"), "{gpu:?}");
            assert!(gpu.memory_total_bytes > 0);
            assert!(!gpu.fake);
        }
    }
}
