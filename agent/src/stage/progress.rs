//! Progress of one item, shared by the tasks that copy its files.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::{StageProgress, StageState};

/// A `Copying` report goes out each time this many more bytes are done,
const REPORT_EVERY: u64 = 16 << 20;
/// and at least this often while bytes come at all (a slow source: the
/// progress bars move, and peers waiting on this node hear it reads on).
const REPORT_AT_LEAST: Duration = Duration::from_secs(1);
/// `bytes_total` while the size is not known yet (an HTTP body before its headers).
const UNKNOWN: u64 = u64::MAX;

pub(super) struct Meter {
    item: String,
    tx: mpsc::Sender<StageProgress>,
    bytes_done: AtomicU64,
    bytes_total: AtomicU64,
    files_done: AtomicU32,
    files_total: AtomicU32,
    cancelled: AtomicBool,
    /// Bytes read from local sources, over every item of the `Stager`.
    source_read: Arc<AtomicU64>,
    started: Instant,
    /// Milliseconds after `started` of the last `Copying` report.
    reported_ms: AtomicU64,
    report_at_least: Duration,
}

impl Meter {
    pub(super) fn new(item: String, tx: mpsc::Sender<StageProgress>, source_read: Arc<AtomicU64>) -> Self {
        Self {
            item,
            tx,
            bytes_done: AtomicU64::new(0),
            bytes_total: AtomicU64::new(UNKNOWN),
            files_done: AtomicU32::new(0),
            files_total: AtomicU32::new(1),
            cancelled: AtomicBool::new(false),
            source_read,
            started: Instant::now(),
            reported_ms: AtomicU64::new(0),
            report_at_least: REPORT_AT_LEAST,
        }
    }

    fn snapshot(&self, state: StageState) -> StageProgress {
        let total = self.bytes_total.load(Ordering::Relaxed);
        StageProgress {
            item: self.item.clone(),
            bytes_done: self.bytes_done.load(Ordering::Relaxed),
            bytes_total: (total != UNKNOWN).then_some(total),
            files_done: self.files_done.load(Ordering::Relaxed),
            files_total: self.files_total.load(Ordering::Relaxed),
            state,
            file: None,
            sha256: None,
            path: None,
        }
    }

    /// Reports a change of state; waits for room in the channel, so the
    /// receiver must be drained (or dropped).
    pub(super) async fn state(&self, state: StageState) {
        // A dropped receiver only means nobody watches.
        let _ = self.tx.send(self.snapshot(state)).await;
    }

    /// Reports the item staged (`Ready` or `Cached`) as content `sha256` at `path`.
    pub(super) async fn finished(&self, state: StageState, sha256: &str, path: &std::path::Path) {
        let report = StageProgress {
            sha256: Some(sha256.to_owned()),
            path: Some(path.to_string_lossy().into_owned()),
            ..self.snapshot(state)
        };
        // A dropped receiver only means nobody watches.
        let _ = self.tx.send(report).await;
    }

    pub(super) fn set_totals(&self, bytes: Option<u64>, files: u32) {
        self.bytes_total.store(bytes.unwrap_or(UNKNOWN), Ordering::Relaxed);
        self.files_total.store(files, Ordering::Relaxed);
    }

    pub(super) fn set_bytes_total(&self, bytes: Option<u64>) {
        self.bytes_total.store(bytes.unwrap_or(UNKNOWN), Ordering::Relaxed);
    }

    /// Counts bytes copied (or re-hashed); reports every `REPORT_EVERY` bytes
    /// and at least every `REPORT_AT_LEAST`, without waiting: a slow receiver
    /// never slows a copy down.
    pub(super) fn add(&self, n: u64) {
        let before = self.bytes_done.fetch_add(n, Ordering::Relaxed);
        let now_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let last_ms = self.reported_ms.load(Ordering::Relaxed);
        let crossed = before / REPORT_EVERY != (before + n) / REPORT_EVERY;
        let due = now_ms.saturating_sub(last_ms) >= self.report_at_least.as_millis() as u64
            // One of the threads copying this item's files reports it.
            && self.reported_ms.compare_exchange(last_ms, now_ms, Ordering::Relaxed, Ordering::Relaxed).is_ok();
        if crossed || due {
            self.reported_ms.fetch_max(now_ms, Ordering::Relaxed);
            let _ = self.tx.try_send(self.snapshot(StageState::Copying));
        }
    }

    /// Counts bytes read from a local source (copied or hashed in place).
    pub(super) fn read_from_source(&self, n: u64) {
        self.source_read.fetch_add(n, Ordering::Relaxed);
    }

    /// Takes back bytes of a prefix that had to be thrown away.
    pub(super) fn rewind(&self, n: u64) {
        let _ = self.bytes_done.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |done| Some(done.saturating_sub(n)));
    }

    /// Counts a file of a directory done and reports it, with its path, size
    /// and digest, without fail (waits for room: call it from a blocking
    /// thread); a path that is not UTF-8 is only counted.
    pub(super) fn tree_file_done(&self, rel: &std::path::Path, size: u64, sha256: &str) {
        self.files_done.fetch_add(1, Ordering::Relaxed);
        let mut report = self.snapshot(StageState::Copying);
        if let Some(path) = rel.to_str() {
            report.file = Some(super::FileDone { path: path.to_owned(), size, sha256: sha256.to_owned() });
        }
        let _ = self.tx.blocking_send(report);
    }

    pub(super) fn set_done(&self, bytes: u64, files: u32) {
        self.bytes_done.store(bytes, Ordering::Relaxed);
        self.files_done.store(files, Ordering::Relaxed);
    }

    /// Tells the blocking copies of this item to stop at their next chunk.
    pub(super) fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }

    pub(super) fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A copy that moves a byte at a time still reports once its interval
    /// passed, as a large step reports at each `REPORT_EVERY` bytes.
    #[test]
    fn a_slow_copy_reports_at_least_once_per_interval() {
        let (tx, mut rx) = mpsc::channel(64);
        let mut meter = Meter::new("data".into(), tx, Arc::default());
        meter.report_at_least = Duration::from_secs(3600);
        meter.add(1);
        assert!(rx.try_recv().is_err(), "no report before the interval passed, nor 16 MiB");
        meter.report_at_least = Duration::from_millis(20);
        let deadline = Instant::now() + Duration::from_secs(10);
        let report = loop {
            meter.add(1);
            if let Ok(report) = rx.try_recv() {
                break report;
            }
            assert!(Instant::now() < deadline, "no report within 10 s of one every 20 ms");
            std::thread::yield_now();
        };
        assert!(report.bytes_done >= 2 && report.state == StageState::Copying, "{report:?}");
        meter.report_at_least = Duration::from_secs(3600);
        meter.add(REPORT_EVERY);
        assert_eq!(rx.try_recv().unwrap().bytes_done, report.bytes_done + REPORT_EVERY);
    }
}
