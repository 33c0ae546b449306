//! Training metrics per job, as agents parse them from the last rank's output:
//! kept in memory for `cohort metrics --follow` and the job's progress, and
//! appended to `<data-dir>/metrics/<job>.jsonl` so that loss curves outlive
//! the controller. They are a time series and stay out of the job store.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::sync::Arc;

use cohort_proto::TrainingPoint;
use tokio::sync::{Mutex, broadcast};

#[derive(Debug, Clone)]
pub struct TaggedPoint {
    pub job_id: Arc<str>,
    pub index: usize,
    pub point: TrainingPoint,
}

pub struct MetricsHub {
    dir: PathBuf,
    jobs: Mutex<HashMap<String, Vec<TrainingPoint>>>,
    /// (job, attempt, iteration, eval) already recorded: the same record can
    /// arrive twice, from stdout and from ms-swift's logging.jsonl.
    seen: Mutex<std::collections::HashSet<(String, u32, PointKey)>>,
    tx: broadcast::Sender<TaggedPoint>,
}

/// What makes a point the same point again (an agent sends its points again
/// after a reconnect): its iteration and kind; a save that names no
/// iteration (ms-swift 4.x) by when it ended.
type PointKey = (u64, bool, bool, i64);

fn point_key(p: &TrainingPoint) -> PointKey {
    let at = if p.is_save && p.iteration == 0 { p.unix_ms } else { 0 };
    (p.iteration, p.is_eval, p.is_save, at)
}

impl MetricsHub {
    pub fn new(dir: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        Ok(Self { dir, jobs: Mutex::new(HashMap::new()), seen: Mutex::default(), tx: broadcast::channel(4096).0 })
    }

    fn path(&self, job_id: &str) -> PathBuf {
        self.dir.join(format!("{job_id}.jsonl"))
    }

    /// Forgets a deleted job: what is kept of it and its file.
    pub async fn remove(&self, job_id: &str) -> std::io::Result<()> {
        self.jobs.lock().await.remove(job_id);
        self.seen.lock().await.retain(|(id, ..)| id != job_id);
        crate::logs::remove_file(&self.path(job_id))
    }

    /// Appends the points of an attempt not recorded yet; returns the newest
    /// training (non-eval) point, if any.
    pub async fn append(&self, job_id: &str, attempt: u32, points: Vec<TrainingPoint>) -> Option<TrainingPoint> {
        let points: Vec<TrainingPoint> = {
            let mut seen = self.seen.lock().await;
            points.into_iter().filter(|p| seen.insert((job_id.to_string(), attempt, point_key(p)))).collect()
        };
        let mut jobs = self.jobs.lock().await;
        let series = self.loaded(&mut jobs, job_id);
        let mut text = String::new();
        let tag: Arc<str> = Arc::from(job_id);
        for point in points {
            if let Ok(json) = serde_json::to_string(&point) {
                text.push_str(&json);
                text.push('\n');
            }
            let _ = self.tx.send(TaggedPoint { job_id: tag.clone(), index: series.len(), point: point.clone() });
            series.push(point);
        }
        let appended = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path(job_id))
            .and_then(|mut f| f.write_all(text.as_bytes()));
        if let Err(e) = appended {
            tracing::warn!(job = job_id, error = %e, "could not append to the job's metrics file");
        }
        series.iter().rev().find(|p| !p.is_eval && !p.is_save).cloned()
    }

    /// The job's points from `from` on, and a receiver for later ones.
    pub async fn snapshot(&self, job_id: &str, from: usize) -> (Vec<TrainingPoint>, broadcast::Receiver<TaggedPoint>) {
        let mut jobs = self.jobs.lock().await;
        let rx = self.tx.subscribe();
        let series = self.loaded(&mut jobs, job_id);
        (series.iter().skip(from).cloned().collect(), rx)
    }

    fn loaded<'a>(
        &self,
        jobs: &'a mut HashMap<String, Vec<TrainingPoint>>,
        job_id: &str,
    ) -> &'a mut Vec<TrainingPoint> {
        jobs.entry(job_id.to_string()).or_insert_with(|| {
            let Ok(file) = std::fs::File::open(self.path(job_id)) else { return Vec::new() };
            BufReader::new(file)
                .lines()
                .map_while(Result::ok)
                .filter_map(|l| serde_json::from_str::<TrainingPoint>(&l).ok())
                .collect()
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn point(iteration: u64, loss: f64, is_eval: bool) -> TrainingPoint {
        TrainingPoint { iteration, loss: Some(loss), is_eval, ..TrainingPoint::default() }
    }

    #[tokio::test]
    async fn points_are_kept_in_order_across_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let hub = MetricsHub::new(dir.path().into()).unwrap();
            let newest =
                hub.append("j", 1, vec![point(1, 2.0, false), point(5, 1.5, false), point(5, 1.7, true)]).await;
            // The same records again (stdout and logging.jsonl) change nothing.
            hub.append("j", 1, vec![point(5, 1.5, false)]).await;
            assert_eq!(newest.unwrap().iteration, 5, "the eval point is not progress");
        }
        let hub = MetricsHub::new(dir.path().into()).unwrap();
        hub.append("j", 2, vec![point(10, 1.0, false), point(5, 1.4, false)]).await;
        let (all, _) = hub.snapshot("j", 0).await;
        // A resumed attempt may log an iteration again: that one counts.
        assert_eq!(all.iter().map(|p| p.iteration).collect::<Vec<_>>(), [1, 5, 5, 10, 5]);
        let (later, _) = hub.snapshot("j", 3).await;
        assert_eq!(later.len(), 2);
    }
}
