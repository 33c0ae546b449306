//! `cohort status`: the job's checkpoint interval next to the one that loses
//! least (Young/Daly), from its own saves (found in its training metrics) and
//! its own failures (its attempts).

use std::time::Duration;

use cohort_proto::job_service_client::JobServiceClient;
use cohort_proto::{GetMetricsRequest, Job, JobState, TrainingPoint};
use cohort_shared::checkpoint_interval::{ObservedSaves, daly, mtbf, observed_saves, waste};

use crate::connection::ApiChannel as Channel;

/// The job's saves and failures, and the interval they call for.
#[derive(Debug, Clone, PartialEq)]
pub struct IntervalAdvice {
    pub saves: ObservedSaves,
    pub failures: u32,
    /// Time its attempts ran, in all.
    pub run: Duration,
    pub mtbf: Duration,
    /// Daly's optimum, in time and in iterations.
    pub optimum: Duration,
    pub optimum_iterations: u64,
    /// Share of time lost to saves and redone work, now and at the optimum.
    pub waste_now: f64,
    pub waste_at_optimum: f64,
}

impl IntervalAdvice {
    pub fn lines(&self) -> [String; 2] {
        let own = self.saves.iteration * self.saves.every as u32;
        [
            format!(
                "checkpoint: every {} iterations ({}), a save takes {}{}; {} failure(s) in {} of attempts (MTBF {})",
                self.saves.every,
                human(own),
                human(self.saves.save),
                if self.saves.recorded { "" } else { " (inferred from slow iterations)" },
                self.failures,
                human(self.run),
                human(self.mtbf),
            ),
            format!(
                "            Young/Daly: every {} iterations ({}): {:.1} % lost to saves and redone work, against {:.1} % now",
                self.optimum_iterations,
                human(self.optimum),
                100.0 * self.waste_at_optimum,
                100.0 * self.waste_now,
            ),
        ]
    }
}

/// The advice, when the job has failed at least once and its metrics show
/// two saves or more.
pub fn advice(job: &Job, points: &[TrainingPoint], now_unix_ms: i64) -> Option<IntervalAdvice> {
    let failures = job.attempts.iter().filter(|a| a.state == JobState::Failed as i32).count() as u32;
    let run_ms: i64 = job
        .attempts
        .iter()
        .filter(|a| a.started_unix_ms > 0)
        .map(|a| (if a.finished_unix_ms > 0 { a.finished_unix_ms } else { now_unix_ms }) - a.started_unix_ms)
        .map(|ms| ms.max(0))
        .sum();
    let run = Duration::from_millis(run_ms as u64);
    let mtbf = mtbf(failures, run)?;
    // Each point in the attempt whose time span holds it.
    let attempt_of = |unix_ms: i64| {
        job.attempts
            .iter()
            .rev()
            .find(|a| a.started_unix_ms <= unix_ms && (a.finished_unix_ms == 0 || unix_ms <= a.finished_unix_ms))
            .map(|a| a.attempt)
    };
    let series: Vec<(u32, u64, i64)> = points
        .iter()
        .filter(|p| !p.is_eval && !p.is_save)
        .filter_map(|p| Some((attempt_of(p.unix_ms)?, p.iteration, p.unix_ms)))
        .collect();
    let recorded: Vec<(u32, u64, i64)> = points
        .iter()
        .filter(|p| p.is_save)
        .filter_map(|p| Some((attempt_of(p.unix_ms)?, p.iteration, p.unix_ms)))
        .collect();
    let saves = observed_saves(&series, &recorded)?;
    let optimum = daly(saves.save, mtbf);
    let optimum_iterations = (optimum.as_secs_f64() / saves.iteration.as_secs_f64().max(1e-9)).round().max(1.0) as u64;
    let own = saves.iteration * saves.every as u32;
    Some(IntervalAdvice {
        saves,
        failures,
        run,
        mtbf,
        optimum,
        optimum_iterations,
        waste_now: waste(own, saves.save, mtbf),
        waste_at_optimum: waste(optimum, saves.save, mtbf),
    })
}

/// Prints the advice under the status, when there is one; says nothing when the
/// metrics cannot be had (the status itself was shown).
pub async fn print_advice(client: &mut JobServiceClient<Channel>, job: &Job) {
    let Ok(response) = client.get_metrics(GetMetricsRequest { job: job.id.clone(), follow: false }).await else {
        return;
    };
    let mut stream = response.into_inner();
    let mut points = Vec::new();
    while let Ok(Some(p)) = stream.message().await {
        points.push(p);
    }
    if let Some(a) = advice(job, &points, cohort_proto::now_unix_ms()) {
        for line in a.lines() {
            say!("{line}");
        }
    }
}

/// "0.31 s" under a minute, "12m 5s" beyond.
fn human(d: Duration) -> String {
    if d < Duration::from_secs(60) {
        format!("{:.2} s", d.as_secs_f64())
    } else {
        humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use cohort_proto::AttemptRecord;

    fn point(iteration: u64, unix_ms: i64) -> TrainingPoint {
        TrainingPoint { iteration, unix_ms, ..TrainingPoint::default() }
    }

    fn attempt(attempt: u32, started: i64, finished: i64, state: JobState) -> AttemptRecord {
        AttemptRecord {
            attempt,
            started_unix_ms: started,
            finished_unix_ms: finished,
            state: state as i32,
            ..AttemptRecord::default()
        }
    }

    /// 1 s iterations, a 4 s save after every 10th; attempt 1 fails after
    /// iteration 35, attempt 2 resumes from 30 and runs to 80.
    fn job_and_points() -> (Job, Vec<TrainingPoint>) {
        let mut points = Vec::new();
        let mut t = 1_000;
        for i in 1..=35 {
            t += 1000;
            points.push(point(i, t));
            if i % 10 == 0 {
                t += 4000;
            }
        }
        let failed_at = t + 500;
        t += 20_000;
        let second = t;
        for i in 31..=80 {
            t += 1000;
            points.push(point(i, t));
            if i % 10 == 0 {
                t += 4000;
            }
        }
        let job = Job {
            attempts: vec![attempt(1, 1_000, failed_at, JobState::Failed), attempt(2, second, 0, JobState::Running)],
            ..Job::default()
        };
        (job, points)
    }

    #[test]
    fn the_advice_takes_the_saves_from_the_metrics_and_the_failures_from_the_attempts() {
        let (job, points) = job_and_points();
        let now = points.last().unwrap().unix_ms;
        let a = advice(&job, &points, now).unwrap();
        assert_eq!(a.saves.every, 10);
        assert_eq!(a.saves.save, Duration::from_secs(4));
        assert_eq!(a.failures, 1);
        let run = (job.attempts[0].finished_unix_ms - 1_000) + (now - job.attempts[1].started_unix_ms);
        assert_eq!(a.run, Duration::from_millis(run as u64));
        assert_eq!(a.mtbf, a.run);
        assert_eq!(a.optimum, daly(Duration::from_secs(4), a.mtbf));
        assert!(a.waste_at_optimum <= a.waste_now);
        let text = a.lines().join("\n");
        assert!(text.contains("every 10 iterations") && text.contains("Young/Daly: every"), "{text}");
    }

    /// The trainer's save records (rank 0's "saved checkpoint" lines) say
    /// where the saves were, here every 10 iterations and 0.3 s long: too
    /// short to show in the iteration times, where a stray slow iteration
    /// every 7 would be taken for a save.
    #[test]
    fn the_trainers_save_records_are_the_saves() {
        let (job, mut points) = job_and_points();
        let mut stalled = 0;
        for p in points.iter_mut() {
            p.unix_ms += stalled;
            if p.iteration % 10 == 0 {
                stalled -= 3_700; // saves of 0.3 s, not 4 s
            }
            if p.iteration % 7 == 0 {
                stalled += 2_500;
            }
        }
        let inferred = advice(&job, &points, points.last().unwrap().unix_ms).unwrap();
        assert_eq!(inferred.saves.every, 7, "inferred: the stalls");
        assert!(inferred.lines()[0].contains("(inferred from slow iterations)"), "{:?}", inferred.lines());
        let saves: Vec<TrainingPoint> = points
            .iter()
            .filter(|p| p.iteration % 10 == 0)
            .map(|p| TrainingPoint { is_save: true, unix_ms: p.unix_ms + 300, ..point(p.iteration, 0) })
            .collect();
        points.extend(saves);
        let a = advice(&job, &points, points.iter().map(|p| p.unix_ms).max().unwrap()).unwrap();
        assert_eq!((a.saves.every, a.saves.save, a.saves.recorded), (10, Duration::from_millis(300), true));
        assert!(a.lines()[0].starts_with("checkpoint: every 10 iterations"), "{:?}", a.lines());
        assert!(!a.lines()[0].contains("inferred"), "{:?}", a.lines());
    }

    #[test]
    fn no_failure_no_advice() {
        let (mut job, points) = job_and_points();
        job.attempts.truncate(1);
        job.attempts[0].state = JobState::Running as i32;
        job.attempts[0].finished_unix_ms = 0;
        assert_eq!(advice(&job, &points, points.last().unwrap().unix_ms), None);
    }
}
