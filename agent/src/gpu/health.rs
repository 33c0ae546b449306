//! GPU health policy: what turns a GPU UNHEALTHY (sticky until an operator
//! clears it), what is a WARNING while it lasts, and what is only recorded.
//! Pure: no NVML, no clock; the caller passes samples, events and the time.
//! `agent/HEALTH.md` holds the same table for operators.
//!
//! | Input | State | Why |
//! |---|---|---|
//! | XID 48 | UNHEALTHY | double-bit ECC error: data in GPU memory was corrupted |
//! | XID 63 | UNHEALTHY | page retirement / row remapping recorded: reset the GPU to apply it |
//! | XID 64 | UNHEALTHY | page retirement / row remapping failed: memory can no longer be repaired |
//! | XID 74 | UNHEALTHY | NVLink error: collectives over NVLink will fail or hang |
//! | XID 79 | UNHEALTHY | GPU has fallen off the bus |
//! | XID 92 | UNHEALTHY | high single-bit ECC error rate: memory is degrading |
//! | XID 94 | UNHEALTHY | contained ECC error: the application was killed, a reset is needed |
//! | XID 95 | UNHEALTHY | uncontained ECC error: every application on the GPU is affected |
//! | other XIDs (13, 31, 43, 45, ...) | recorded | usually the application's fault |
//! | double-bit ECC event | UNHEALTHY | as XID 48 |
//! | volatile uncorrected ECC count rises | UNHEALTHY | a double-bit error the event missed |
//! | retired double-bit pages rise | UNHEALTHY | a page was retired for a double-bit error |
//! | retired pages (both causes) ≥ 63 | UNHEALTHY | retirement table full (DCGM's limit) |
//! | remapped rows: failure | UNHEALTHY | row remapping failed |
//! | NVML answers GpuLost | UNHEALTHY | the GPU is gone until a reset |
//! | throttle HW_SLOWDOWN, HW_THERMAL_SLOWDOWN, SW_THERMAL_SLOWDOWN, HW_POWER_BRAKE_SLOWDOWN | WARNING while it lasts | too hot, or the board's power is cut |
//! | remapped rows: pending | WARNING while it lasts | a reset applies the remapping |
//! | single-bit ECC event or corrected count rises | WARNING for 5 minutes | corrected, but worth a look |
//! | throttle GPU_IDLE, SW_POWER_CAP, SYNC_BOOST, clock settings | nothing | normal operation |
//!
//! SW_POWER_CAP is not a warning: a training GPU sits at its power limit, and
//! the driver capping clocks there is how it is meant to run.

use cohort_proto::{GpuHealth, GpuHealthState, GpuTelemetry};

/// A corrected-ECC warning lasts this long after the last corrected error.
pub const CORRECTED_ECC_WARNING_MS: i64 = 5 * 60 * 1000;
/// DCGM fails a GPU whose retired pages (single- plus double-bit) reach this.
pub const RETIRED_PAGES_LIMIT: u32 = 63;
/// Clock-throttle reasons that make a GPU a WARNING while they are active.
pub const WARNING_THROTTLE_REASONS: [&str; 4] =
    ["HW_SLOWDOWN", "HW_THERMAL_SLOWDOWN", "SW_THERMAL_SLOWDOWN", "HW_POWER_BRAKE_SLOWDOWN"];
/// At most this many sticky reasons are kept (an XID storm repeats itself).
const MAX_REASONS: usize = 16;

/// An event a backend reports as it happens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GpuEventKind {
    /// A critical XID error with its code.
    Xid(u64),
    EccDoubleBit,
    EccSingleBit,
}

impl GpuEventKind {
    /// The `GpuEvent.kind` string on the wire.
    pub fn wire_name(&self) -> &'static str {
        match self {
            GpuEventKind::Xid(_) => "xid",
            GpuEventKind::EccDoubleBit => "ecc_double_bit",
            GpuEventKind::EccSingleBit => "ecc_single_bit",
        }
    }

    /// One line for logs and `GpuEvent.detail`, e.g. "XID 79: GPU has fallen off the bus".
    pub fn describe(&self) -> String {
        match self {
            GpuEventKind::Xid(xid) => format!("XID {xid}: {}", xid_info(*xid).meaning),
            GpuEventKind::EccDoubleBit => "double-bit ECC error (uncorrectable)".into(),
            GpuEventKind::EccSingleBit => "single-bit ECC error (corrected)".into(),
        }
    }
}

/// What the policy does with an XID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XidSeverity {
    /// The GPU is UNHEALTHY until an operator clears it.
    Unhealthy,
    /// Reported to the controller and logged; health does not change.
    Recorded,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XidInfo {
    /// The meaning in NVIDIA's XID catalogue (docs.nvidia.com/deploy/xid-errors).
    pub meaning: &'static str,
    pub severity: XidSeverity,
}

/// The catalogue entry and the policy for one XID.
pub fn xid_info(xid: u64) -> XidInfo {
    use XidSeverity::{Recorded, Unhealthy};
    let (meaning, severity) = match xid {
        13 => ("graphics engine exception (usually an application error)", Recorded),
        31 => ("GPU memory page fault (usually an application error)", Recorded),
        32 => ("invalid or corrupted push buffer stream", Recorded),
        38 => ("driver firmware error", Recorded),
        43 => ("GPU stopped processing (usually an application error)", Recorded),
        45 => ("preemptive cleanup, due to previous errors", Recorded),
        48 => ("double-bit ECC error", Unhealthy),
        61 => ("internal micro-controller breakpoint/warning", Recorded),
        62 => ("internal micro-controller halt", Recorded),
        63 => ("ECC page retirement or row remapping recording event", Unhealthy),
        64 => ("ECC page retirement or row remapper recording failure", Unhealthy),
        68 => ("video processor exception", Recorded),
        69 => ("graphics engine class error", Recorded),
        74 => ("NVLink error", Unhealthy),
        79 => ("GPU has fallen off the bus", Unhealthy),
        92 => ("high single-bit ECC error rate", Unhealthy),
        94 => ("contained ECC error", Unhealthy),
        95 => ("uncontained ECC error", Unhealthy),
        109 => ("context switch timeout", Recorded),
        119 => ("GSP RPC timeout", Recorded),
        120 => ("GSP error", Recorded),
        _ => ("see NVIDIA's XID catalogue", Recorded),
    };
    XidInfo { meaning, severity }
}

/// Counters whose rise the policy watches, as of the last sample (or the last clear).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Counters {
    ecc_volatile_uncorrected: Option<u64>,
    ecc_volatile_corrected: Option<u64>,
    retired_pages_double_bit: Option<u32>,
}

impl Counters {
    fn of(t: &GpuTelemetry) -> Self {
        Self {
            ecc_volatile_uncorrected: t.ecc_volatile_uncorrected,
            ecc_volatile_corrected: t.ecc_volatile_corrected,
            retired_pages_double_bit: t.retired_pages_double_bit,
        }
    }
}

/// The health of one GPU over time.
#[derive(Debug, Clone)]
pub struct GpuHealthTracker {
    /// Reasons for UNHEALTHY; cleared only by `clear`.
    sticky: Vec<String>,
    /// Reasons for WARNING from the last sample.
    warnings: Vec<String>,
    /// A corrected-ECC warning lasts until then.
    corrected_until_ms: Option<i64>,
    corrected_total: Option<u64>,
    /// Counters as last seen: a rise between two samples is an error.
    last: Option<Counters>,
    state: GpuHealthState,
    since_ms: i64,
}

impl GpuHealthTracker {
    /// A GPU seen for the first time at `now_ms`: healthy.
    pub fn new(now_ms: i64) -> Self {
        Self {
            sticky: Vec::new(),
            warnings: Vec::new(),
            corrected_until_ms: None,
            corrected_total: None,
            last: None,
            state: GpuHealthState::Healthy,
            since_ms: now_ms,
        }
    }

    /// Applies one telemetry sample. `lost` is set when NVML answered GpuLost.
    /// The first sample only sets the baselines: counts from before the agent
    /// started are history (the controller keeps its own sticky record).
    pub fn observe(&mut self, t: &GpuTelemetry, lost: bool, now_ms: i64) -> GpuHealth {
        if lost {
            self.mark("NVML reports the GPU lost (fallen off the bus or unusable)".into());
        }
        let now = Counters::of(t);
        if let Some(before) = self.last {
            if let (Some(b), Some(n)) = (before.ecc_volatile_uncorrected, now.ecc_volatile_uncorrected)
                && n > b
            {
                self.mark(format!("uncorrectable (double-bit) ECC errors rose from {b} to {n}"));
            }
            if let (Some(b), Some(n)) = (before.retired_pages_double_bit, now.retired_pages_double_bit)
                && n > b
            {
                self.mark(format!("pages retired for double-bit ECC errors rose from {b} to {n}"));
            }
            if let (Some(b), Some(n)) = (before.ecc_volatile_corrected, now.ecc_volatile_corrected)
                && n > b
            {
                self.corrected_until_ms = Some(now_ms + CORRECTED_ECC_WARNING_MS);
                self.corrected_total = Some(n);
            }
        }
        // Keep a baseline across samples that miss a counter (a failed call).
        self.last = Some(Counters {
            ecc_volatile_uncorrected: now
                .ecc_volatile_uncorrected
                .or(self.last.and_then(|c| c.ecc_volatile_uncorrected)),
            ecc_volatile_corrected: now.ecc_volatile_corrected.or(self.last.and_then(|c| c.ecc_volatile_corrected)),
            retired_pages_double_bit: now
                .retired_pages_double_bit
                .or(self.last.and_then(|c| c.retired_pages_double_bit)),
        });
        let retired = t.retired_pages_single_bit.unwrap_or(0) + t.retired_pages_double_bit.unwrap_or(0);
        if retired >= RETIRED_PAGES_LIMIT {
            self.mark(format!("{retired} retired pages: the retirement table is full (limit {RETIRED_PAGES_LIMIT})"));
        }
        if t.remapped_rows_failed == Some(true) {
            self.mark("row remapping failed".into());
        }

        self.warnings.clear();
        let throttled: Vec<&str> =
            t.throttle_reasons.iter().map(String::as_str).filter(|r| WARNING_THROTTLE_REASONS.contains(r)).collect();
        if !throttled.is_empty() {
            self.warnings.push(format!("throttled: {}", throttled.join(", ")));
        }
        if t.remapped_rows_pending == Some(true) {
            self.warnings.push("row remapping pending: reset the GPU to apply it".into());
        }
        self.settle(now_ms)
    }

    /// Applies one event as it happens.
    pub fn event(&mut self, kind: &GpuEventKind, now_ms: i64) -> GpuHealth {
        match kind {
            GpuEventKind::Xid(xid) => {
                if xid_info(*xid).severity == XidSeverity::Unhealthy {
                    self.mark(kind.describe());
                }
            }
            GpuEventKind::EccDoubleBit => self.mark(kind.describe()),
            GpuEventKind::EccSingleBit => self.corrected_until_ms = Some(now_ms + CORRECTED_ECC_WARNING_MS),
        }
        self.settle(now_ms)
    }

    /// An operator declared the GPU healthy: sticky reasons go, and the
    /// counters as last seen become the new baseline.
    pub fn clear(&mut self, now_ms: i64) -> GpuHealth {
        self.sticky.clear();
        self.corrected_until_ms = None;
        self.settle(now_ms)
    }

    /// The health as of the last sample, event or clear.
    pub fn health(&self) -> GpuHealth {
        let mut reasons = self.sticky.clone();
        reasons.extend(self.warnings.iter().cloned());
        if self.corrected_until_ms.is_some() {
            reasons.push(match self.corrected_total {
                Some(n) => format!("corrected (single-bit) ECC errors: {n} since the driver loaded"),
                None => "corrected (single-bit) ECC error".into(),
            });
        }
        GpuHealth { state: self.state as i32, reasons, since_unix_ms: self.since_ms }
    }

    pub fn state(&self) -> GpuHealthState {
        self.state
    }

    fn mark(&mut self, reason: String) {
        if !self.sticky.contains(&reason) && self.sticky.len() < MAX_REASONS {
            self.sticky.push(reason);
        }
    }

    fn settle(&mut self, now_ms: i64) -> GpuHealth {
        if self.corrected_until_ms.is_some_and(|until| now_ms >= until) {
            self.corrected_until_ms = None;
        }
        let state = if !self.sticky.is_empty() {
            GpuHealthState::Unhealthy
        } else if !self.warnings.is_empty() || self.corrected_until_ms.is_some() {
            GpuHealthState::Warning
        } else {
            GpuHealthState::Healthy
        };
        if state != self.state {
            self.state = state;
            self.since_ms = now_ms;
        }
        self.health()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> GpuTelemetry {
        GpuTelemetry {
            index: 0,
            uuid: "GPU-test".into(),
            throttle_reasons: vec!["GPU_IDLE".into()],
            ecc_volatile_corrected: Some(0),
            ecc_volatile_uncorrected: Some(0),
            remapped_rows_pending: Some(false),
            remapped_rows_failed: Some(false),
            ..GpuTelemetry::default()
        }
    }

    fn state(h: &GpuHealth) -> GpuHealthState {
        GpuHealthState::try_from(h.state).unwrap_or(GpuHealthState::Unspecified)
    }

    #[test]
    fn every_listed_xid_is_unhealthy_and_application_xids_are_recorded() {
        for xid in [48, 63, 64, 74, 79, 92, 94, 95] {
            let mut t = GpuHealthTracker::new(0);
            let h = t.event(&GpuEventKind::Xid(xid), 10);
            assert_eq!(state(&h), GpuHealthState::Unhealthy, "XID {xid}");
            assert!(h.reasons[0].starts_with(&format!("XID {xid}: ")), "{h:?}");
            assert_eq!(h.since_unix_ms, 10);
        }
        for xid in [13, 31, 43, 45, 61, 62, 119, 12345] {
            let mut t = GpuHealthTracker::new(0);
            let h = t.event(&GpuEventKind::Xid(xid), 10);
            assert_eq!(state(&h), GpuHealthState::Healthy, "XID {xid}");
            assert_eq!(h.since_unix_ms, 0);
        }
    }

    #[test]
    fn xid_79_reads_like_the_catalogue() {
        assert_eq!(GpuEventKind::Xid(79).describe(), "XID 79: GPU has fallen off the bus");
    }

    #[test]
    fn double_bit_event_and_rising_count_are_unhealthy() {
        let mut t = GpuHealthTracker::new(0);
        assert_eq!(state(&t.event(&GpuEventKind::EccDoubleBit, 1)), GpuHealthState::Unhealthy);

        let mut t = GpuHealthTracker::new(0);
        let mut s = sample();
        s.ecc_volatile_uncorrected = Some(3); // history from before the agent started
        assert_eq!(state(&t.observe(&s, false, 1)), GpuHealthState::Healthy);
        s.ecc_volatile_uncorrected = Some(4);
        let h = t.observe(&s, false, 2);
        assert_eq!(state(&h), GpuHealthState::Unhealthy);
        assert!(h.reasons[0].contains("from 3 to 4"), "{h:?}");
    }

    #[test]
    fn retired_pages_and_row_remap_failure_are_unhealthy() {
        let mut t = GpuHealthTracker::new(0);
        let mut s = sample();
        s.retired_pages_single_bit = Some(60);
        s.retired_pages_double_bit = Some(2);
        assert_eq!(state(&t.observe(&s, false, 1)), GpuHealthState::Healthy);
        s.retired_pages_double_bit = Some(3);
        let h = t.observe(&s, false, 2);
        assert_eq!(state(&h), GpuHealthState::Unhealthy);
        assert!(h.reasons.iter().any(|r| r.contains("retirement table is full")), "{h:?}");

        let mut t = GpuHealthTracker::new(0);
        let mut s = sample();
        s.remapped_rows_failed = Some(true);
        assert_eq!(state(&t.observe(&s, false, 1)), GpuHealthState::Unhealthy);
    }

    #[test]
    fn a_lost_gpu_is_unhealthy() {
        let mut t = GpuHealthTracker::new(0);
        assert_eq!(state(&t.observe(&GpuTelemetry::default(), true, 1)), GpuHealthState::Unhealthy);
    }

    #[test]
    fn thermal_throttling_warns_while_it_lasts() {
        let mut t = GpuHealthTracker::new(0);
        let mut s = sample();
        s.throttle_reasons = vec!["SW_POWER_CAP".into(), "GPU_IDLE".into()];
        assert_eq!(state(&t.observe(&s, false, 1)), GpuHealthState::Healthy, "power cap alone is normal");
        s.throttle_reasons = vec!["SW_POWER_CAP".into(), "HW_THERMAL_SLOWDOWN".into()];
        let h = t.observe(&s, false, 2);
        assert_eq!(state(&h), GpuHealthState::Warning);
        assert_eq!(h.reasons, ["throttled: HW_THERMAL_SLOWDOWN"]);
        assert_eq!(h.since_unix_ms, 2);
        assert_eq!(t.observe(&s, false, 3).since_unix_ms, 2, "since stays while the state does");
        s.throttle_reasons = vec!["SW_POWER_CAP".into()];
        let h = t.observe(&s, false, 4);
        assert_eq!(state(&h), GpuHealthState::Healthy);
        assert!(h.reasons.is_empty());
        assert_eq!(h.since_unix_ms, 4);
        for reason in WARNING_THROTTLE_REASONS {
            s.throttle_reasons = vec![reason.into()];
            assert_eq!(state(&t.observe(&s, false, 5)), GpuHealthState::Warning, "{reason}");
        }
    }

    #[test]
    fn pending_row_remap_warns() {
        let mut t = GpuHealthTracker::new(0);
        let mut s = sample();
        s.remapped_rows_pending = Some(true);
        assert_eq!(state(&t.observe(&s, false, 1)), GpuHealthState::Warning);
    }

    #[test]
    fn corrected_errors_warn_for_a_while() {
        let mut t = GpuHealthTracker::new(0);
        let mut s = sample();
        t.observe(&s, false, 0);
        s.ecc_volatile_corrected = Some(2);
        assert_eq!(state(&t.observe(&s, false, 1000)), GpuHealthState::Warning);
        assert_eq!(state(&t.observe(&s, false, 1000 + CORRECTED_ECC_WARNING_MS - 1)), GpuHealthState::Warning);
        assert_eq!(state(&t.observe(&s, false, 1000 + CORRECTED_ECC_WARNING_MS)), GpuHealthState::Healthy);
        assert_eq!(state(&t.event(&GpuEventKind::EccSingleBit, 5)), GpuHealthState::Warning);
    }

    #[test]
    fn unhealthy_is_sticky_until_cleared() {
        let mut t = GpuHealthTracker::new(0);
        let s = sample();
        t.observe(&s, false, 1);
        t.event(&GpuEventKind::Xid(79), 2);
        t.event(&GpuEventKind::Xid(79), 3);
        let h = t.observe(&s, false, 4);
        assert_eq!(state(&h), GpuHealthState::Unhealthy, "a clean sample does not heal it");
        assert_eq!(h.reasons.len(), 1, "a repeated XID is one reason: {h:?}");
        assert_eq!(h.since_unix_ms, 2);
        let h = t.clear(5);
        assert_eq!(state(&h), GpuHealthState::Healthy);
        assert_eq!(h.since_unix_ms, 5);
        assert_eq!(state(&t.observe(&s, false, 6)), GpuHealthState::Healthy);
    }

    #[test]
    fn counts_that_rose_before_a_clear_do_not_come_back() {
        let mut t = GpuHealthTracker::new(0);
        let mut s = sample();
        t.observe(&s, false, 1);
        s.ecc_volatile_uncorrected = Some(1);
        assert_eq!(state(&t.observe(&s, false, 2)), GpuHealthState::Unhealthy);
        t.clear(3);
        assert_eq!(state(&t.observe(&s, false, 4)), GpuHealthState::Healthy);
        s.ecc_volatile_uncorrected = Some(2);
        assert_eq!(state(&t.observe(&s, false, 5)), GpuHealthState::Unhealthy);
    }

    #[test]
    fn unhealthy_keeps_warnings_among_its_reasons() {
        let mut t = GpuHealthTracker::new(0);
        t.event(&GpuEventKind::Xid(74), 1);
        let mut s = sample();
        s.throttle_reasons = vec!["HW_SLOWDOWN".into()];
        let h = t.observe(&s, false, 2);
        assert_eq!(state(&h), GpuHealthState::Unhealthy);
        assert_eq!(h.reasons, ["XID 74: NVLink error", "throttled: HW_SLOWDOWN"]);
    }
}
