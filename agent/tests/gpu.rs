//! GPU telemetry, health and events through the monitor, with the fake
//! backend (any machine) and NVML (skipped where no driver is present).

use std::sync::Arc;
use std::time::Duration;

use cohort_agent::gpu::nvml::shared_nvml;
use cohort_agent::gpu::{FakeBackend, FakeCommand, GpuBackend, GpuMonitor, MonitorConfig, NvmlBackend};
use cohort_proto::{GpuEvent, GpuHealthState, GpuTelemetry};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(10);

fn state(t: &GpuTelemetry) -> GpuHealthState {
    t.health.as_ref().and_then(|h| GpuHealthState::try_from(h.state).ok()).unwrap_or(GpuHealthState::Unspecified)
}

fn event_state(e: &GpuEvent) -> GpuHealthState {
    e.health.as_ref().and_then(|h| GpuHealthState::try_from(h.state).ok()).unwrap_or(GpuHealthState::Unspecified)
}

async fn start(backend: Arc<dyn GpuBackend>, keep: Option<Vec<u32>>) -> (GpuMonitor, mpsc::Receiver<GpuEvent>) {
    let (tx, rx) = mpsc::channel(64);
    let config = MonitorConfig { interval: Duration::from_millis(50), keep };
    let monitor = GpuMonitor::start(backend, config, tx).await.expect("the monitor starts");
    (monitor, rx)
}

async fn next_event(rx: &mut mpsc::Receiver<GpuEvent>) -> GpuEvent {
    tokio::time::timeout(WAIT, rx.recv()).await.expect("an event within 10 s").expect("the event channel is open")
}

/// Waits until GPU `index` of the snapshot is in `want`.
async fn wait_for(monitor: &GpuMonitor, index: u32, want: GpuHealthState) -> GpuTelemetry {
    let mut rx = monitor.subscribe();
    let found = tokio::time::timeout(WAIT, async {
        loop {
            if let Some(t) = rx.borrow_and_update().iter().find(|t| t.index == index && state(t) == want) {
                return t.clone();
            }
            if rx.changed().await.is_err() {
                panic!("the monitor stopped");
            }
        }
    })
    .await;
    found.unwrap_or_else(|_| panic!("GPU {index} never became {want:?}: {:?}", monitor.latest()))
}

#[tokio::test]
async fn injected_xid_79_comes_out_at_once_unhealthy_and_sticks_until_cleared() {
    let fake = Arc::new(FakeBackend::new(2));
    let (monitor, mut events) = start(fake.clone(), None).await;
    assert_eq!(monitor.latest().len(), 2, "the first snapshot is there before the first tick");
    assert!(monitor.latest().iter().all(|t| state(t) == GpuHealthState::Healthy));

    let command = FakeCommand::parse("xid 1 79").expect("parses").expect("a command");
    fake.inject(command).expect("injected");
    let event = next_event(&mut events).await;
    assert_eq!((event.index, event.kind.as_str(), event.xid), (1, "xid", 79));
    assert_eq!(event.uuid, "GPU-fake-0001");
    assert_eq!(event.detail, "XID 79: GPU has fallen off the bus");
    assert_eq!(event_state(&event), GpuHealthState::Unhealthy);
    assert_eq!(event.health.as_ref().map(|h| h.reasons.clone()), Some(vec![event.detail.clone()]));

    // Polls go on and do not heal it; GPU 0 is untouched.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let latest = monitor.latest();
    assert_eq!(state(&latest[1]), GpuHealthState::Unhealthy);
    assert_eq!(state(&latest[0]), GpuHealthState::Healthy);
    assert!(latest[1].temperature_c.is_some(), "telemetry keeps coming: {:?}", latest[1]);

    let after = monitor.clear(1).await.expect("GPU 1 exists");
    assert_eq!(GpuHealthState::try_from(after.state), Ok(GpuHealthState::Healthy));
    assert_eq!(state(&monitor.latest()[1]), GpuHealthState::Healthy);
    assert!(monitor.clear(7).await.is_err(), "no GPU 7");
}

#[tokio::test]
async fn application_xids_are_reported_but_leave_the_gpu_healthy() {
    let fake = Arc::new(FakeBackend::new(1));
    let (monitor, mut events) = start(fake.clone(), None).await;
    fake.inject(FakeCommand::Xid { index: 0, xid: 13 }).expect("injected");
    let event = next_event(&mut events).await;
    assert_eq!((event.kind.as_str(), event.xid), ("xid", 13));
    assert_eq!(event_state(&event), GpuHealthState::Healthy);
    assert_eq!(state(&monitor.latest()[0]), GpuHealthState::Healthy);
}

#[tokio::test]
async fn double_bit_ecc_event_is_unhealthy() {
    let fake = Arc::new(FakeBackend::new(1));
    let (monitor, mut events) = start(fake.clone(), None).await;
    fake.inject(FakeCommand::EccDoubleBit { index: 0 }).expect("injected");
    let event = next_event(&mut events).await;
    assert_eq!(event.kind, "ecc_double_bit");
    assert_eq!(event_state(&event), GpuHealthState::Unhealthy);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = &monitor.latest()[0];
    assert_eq!(state(t), GpuHealthState::Unhealthy);
    assert_eq!(t.ecc_volatile_uncorrected, Some(1), "the counter shows it too: {t:?}");
}

#[tokio::test]
async fn throttling_warns_while_it_lasts() {
    let fake = Arc::new(FakeBackend::new(1));
    let (monitor, _events) = start(fake.clone(), None).await;
    fake.inject(FakeCommand::Throttle { index: 0, reasons: vec!["HW_THERMAL_SLOWDOWN".into()] }).expect("injected");
    let t = wait_for(&monitor, 0, GpuHealthState::Warning).await;
    assert_eq!(t.throttle_reasons, ["HW_THERMAL_SLOWDOWN"]);
    fake.inject(FakeCommand::Throttle { index: 0, reasons: vec!["GPU_IDLE".into()] }).expect("injected");
    wait_for(&monitor, 0, GpuHealthState::Healthy).await;
}

#[tokio::test]
async fn events_file_is_followed_like_tail_f() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let file = dir.path().join("gpu-events");
    // Lines that were there before the agent started are history.
    std::fs::write(&file, "xid 0 48\n").expect("written");
    let fake = Arc::new(FakeBackend::new(2).follow_events(file.clone()));
    let (_monitor, mut events) = start(fake, None).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut appended = std::fs::OpenOptions::new().append(true).open(&file).expect("opened");
    std::io::Write::write_all(&mut appended, b"# an operator tests alerting\nbogus line\nxid 1 79\necc-dbe 0\n")
        .expect("appended");
    let first = next_event(&mut events).await;
    assert_eq!((first.index, first.xid, event_state(&first)), (1, 79, GpuHealthState::Unhealthy));
    let second = next_event(&mut events).await;
    assert_eq!((second.index, second.kind.as_str()), (0, "ecc_double_bit"));
    assert!(events.try_recv().is_err(), "the line from before the start was not replayed");
}

#[tokio::test]
async fn gpu_indices_filter_inventory_telemetry_and_events() {
    let fake = Arc::new(FakeBackend::with_islands(&[4, 4]));
    let (monitor, mut events) = start(fake.clone(), Some(vec![4, 5, 6, 7])).await;
    let gpus = monitor.gpus();
    assert_eq!(gpus.iter().map(|g| g.index).collect::<Vec<_>>(), [4, 5, 6, 7]);
    assert!(gpus.iter().all(|g| g.nvlink_island == 0 && g.links.iter().all(|l| l.peer_index >= 4)));
    assert_eq!(monitor.latest().iter().map(|t| t.index).collect::<Vec<_>>(), [4, 5, 6, 7]);

    fake.inject(FakeCommand::Xid { index: 0, xid: 79 }).expect("injected");
    fake.inject(FakeCommand::Xid { index: 5, xid: 74 }).expect("injected");
    let event = next_event(&mut events).await;
    assert_eq!((event.index, event.xid), (5, 74), "GPU 0 is not this agent's");

    let (tx, _rx) = mpsc::channel(1);
    let config = MonitorConfig { keep: Some(vec![8]), ..MonitorConfig::default() };
    let err = GpuMonitor::start(fake, config, tx).await.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("--gpu-indices names GPU 8, but this node has 8 GPU(s)"), "{err}");
}

#[tokio::test]
async fn fake_islands_reach_the_inventory() {
    let (monitor, _events) = start(Arc::new(FakeBackend::with_islands(&[4, 4])), None).await;
    let islands: Vec<u32> = monitor.gpus().iter().map(|g| g.nvlink_island).collect();
    assert_eq!(islands, [0, 0, 0, 0, 1, 1, 1, 1]);
    assert!(monitor.note().contains("NVLink islands [4, 4]"), "{}", monitor.note());
}

/// Reads real values on a GPU host; elsewhere says why it skips.
#[tokio::test]
async fn nvml_real_values_when_a_driver_is_present() {
    if let Err(why) = shared_nvml() {
        eprintln!("SKIPPED nvml_real_values_when_a_driver_is_present: {why}");
        let inventory = NvmlBackend::open().inventory();
        assert!(inventory.gpus.is_empty());
        assert_eq!(inventory.note, why, "no driver means no GPUs, with the reason");
        return;
    }
    let backend = Arc::new(NvmlBackend::open());
    let inventory = backend.inventory();
    eprintln!("{}", inventory.note);
    if inventory.gpus.is_empty() {
        eprintln!("SKIPPED nvml_real_values_when_a_driver_is_present: the driver reports no GPUs");
        return;
    }
    let n = inventory.gpus.len();
    for gpu in &inventory.gpus {
        assert!(gpu.uuid.starts_with("GPU-"), "{gpu:?}");
        assert!(gpu.memory_total_bytes > 0, "{gpu:?}");
        assert!(!gpu.fake);
        assert!(!gpu.pci_bus_id.is_empty(), "{gpu:?}");
        assert!(gpu.links.len() < n, "{gpu:?}");
        assert!((gpu.nvlink_island as usize) < n, "{gpu:?}");
    }
    let samples = backend.poll(&inventory.gpus);
    assert_eq!(samples.len(), n);
    for s in &samples {
        let t = &s.telemetry;
        eprintln!("{t:?}");
        assert!(!s.lost, "{t:?}");
        assert!(t.uuid.starts_with("GPU-"));
        assert!(t.memory_total_bytes.is_some_and(|m| m > 0), "{t:?}");
        assert!(t.memory_used_bytes <= t.memory_total_bytes, "{t:?}");
        assert!(t.temperature_c.is_some_and(|c| c <= 120), "{t:?}");
        assert!(t.utilization_gpu_pct.is_none_or(|u| u <= 100), "{t:?}");
        assert!(t.power_w.is_none_or(|w| (0.0..2000.0).contains(&w)), "{t:?}");
    }
    let (tx, _rx) = mpsc::channel(8);
    assert_eq!(backend.watch_events(&inventory.gpus, tx), Ok(()), "XID events can be watched");
    let (monitor, _events) = start(backend, None).await;
    assert!(monitor.latest().iter().all(|t| state(t) != GpuHealthState::Unspecified));
}
