//! Where the time went: the job's attempt records (the controller's clock),
//! what the benchmark saw while polling, the payload's own log and the faults
//! injected, turned into useful time and a loss per cause.

use std::collections::BTreeMap;

use cohort_proto::{AttemptRecord, Job};
use cohort_shared::failure::FailureCause;
use serde_json::Value;

use crate::faults::FaultKind;

/// One fault the benchmark injected.
#[derive(Debug, Clone)]
pub struct Injected {
    pub kind: FaultKind,
    pub at_ms: i64,
    /// The attempt it hit.
    pub attempt: u32,
    pub node: String,
}

/// What the benchmark saw while polling, per attempt: when it ran (every
/// rank started) and when its last process was gone after it ended.
#[derive(Debug, Default, Clone, Copy)]
pub struct Seen {
    pub running_ms: i64,
    pub gone_ms: i64,
}

/// One line of the payload's log (goodput_trainer.py).
#[derive(Debug, Clone)]
pub struct Event {
    pub event: String,
    pub attempt: u32,
    pub t_ms: i64,
    pub iteration: u64,
    pub save_s: f64,
}

pub fn parse_events(text: &str) -> Vec<Event> {
    text.lines()
        .filter_map(|line| {
            let v: Value = serde_json::from_str(line).ok()?;
            Some(Event {
                event: v.get("event")?.as_str()?.to_string(),
                attempt: v.get("attempt")?.as_u64()? as u32,
                t_ms: (v.get("t")?.as_f64()? * 1000.0) as i64,
                iteration: v.get("iteration").and_then(Value::as_u64).unwrap_or(0),
                save_s: v.get("save_s").and_then(Value::as_f64).unwrap_or(0.0),
            })
        })
        .collect()
}

/// Seconds lost, by cause. Cohort's own parts (detection, teardown, waiting,
/// launch) run in real time; the payload's (start, load, redone work, saves)
/// are compressed by the time factor.
#[derive(Debug, Default, Clone, Copy)]
pub struct Losses {
    /// Fault → the controller fails the attempt.
    pub detect_s: f64,
    /// Attempt failed → its last process gone.
    pub teardown_s: f64,
    /// Processes gone → next attempt placed (fence deadline, backoff, capacity).
    pub wait_s: f64,
    /// Placed → ranks started, process start, rendezvous before the first step.
    pub launch_s: f64,
    /// The trainer's own start (imports, NCCL init); compressed.
    pub start_s: f64,
    /// Checkpoint load; compressed.
    pub load_s: f64,
    /// Steps done again since the checkpoint resumed from; compressed.
    pub redo_s: f64,
    /// Checkpoint saves; compressed.
    pub save_s: f64,
}

impl Losses {
    pub fn real(&self) -> f64 {
        self.detect_s + self.teardown_s + self.wait_s + self.launch_s
    }
    pub fn compressed(&self) -> f64 {
        self.start_s + self.load_s + self.redo_s + self.save_s
    }
    fn add(&mut self, o: &Losses) {
        self.detect_s += o.detect_s;
        self.teardown_s += o.teardown_s;
        self.wait_s += o.wait_s;
        self.launch_s += o.launch_s;
        self.start_s += o.start_s;
        self.load_s += o.load_s;
        self.redo_s += o.redo_s;
        self.save_s += o.save_s;
    }
    pub fn json(&self) -> Value {
        serde_json::json!({
            "detect_s": self.detect_s, "teardown_s": self.teardown_s, "wait_s": self.wait_s,
            "launch_s": self.launch_s, "start_s": self.start_s, "load_s": self.load_s,
            "redo_s": self.redo_s, "save_s": self.save_s,
        })
    }
}

/// The figures of one run.
#[derive(Debug, Clone)]
pub struct Account {
    pub steps: u64,
    /// Median seconds between steps (real).
    pub step_s: f64,
    /// Submitted → finished (real).
    pub wall_s: f64,
    /// The first attempt's start (not a fault's loss, but a loss).
    pub initial: Losses,
    /// Summed over the faults.
    pub faults: Losses,
    /// Per fault kind: how many, and their losses.
    pub by_kind: BTreeMap<&'static str, (u32, Losses)>,
    /// Saves, over the whole run (compressed).
    pub saves_s: f64,
    pub saves: u32,
}

impl Account {
    /// Useful steps × step time / wall time, all in compressed (real) seconds.
    pub fn goodput_compressed(&self) -> f64 {
        self.steps as f64 * self.step_s / self.wall_s
    }

    /// The same in simulated time: the payload's times (steps, start, load,
    /// redone work, saves) scaled back up by `factor`, Cohort's as measured.
    pub fn goodput_simulated(&self, factor: f64) -> f64 {
        let useful = self.steps as f64 * self.step_s * factor;
        let lost = (self.initial.compressed() + self.faults.compressed() - self.faults.save_s + self.saves_s) * factor
            + self.initial.real()
            + self.faults.real();
        useful / (useful + lost)
    }

    /// Wall time the breakdown does not explain (polling granularity, slow steps).
    pub fn unexplained_s(&self) -> f64 {
        self.wall_s
            - self.steps as f64 * self.step_s
            - self.saves_s
            - self.initial.real()
            - self.initial.compressed()
            - self.faults.real()
            - self.faults.compressed()
    }
}

/// Whether an attempt failed because a save found the disk full.
pub fn failed_on_full_disk(attempt: &AttemptRecord) -> bool {
    attempt.failure.as_ref().is_some_and(|f| f.cause == FailureCause::DiskFull.name())
}

fn secs(ms: i64) -> f64 {
    (ms.max(0)) as f64 / 1000.0
}

fn find(events: &[Event], attempt: u32, name: &str) -> Option<i64> {
    events.iter().find(|e| e.attempt == attempt && e.event == name).map(|e| e.t_ms)
}

/// Launch, start and load of one attempt.
fn startup(job: &Job, seen: &BTreeMap<u32, Seen>, events: &[Event], attempt: u32, step_ms: i64) -> Losses {
    let record = job.attempts.iter().find(|a| a.attempt == attempt);
    let (Some(record), Some(start), Some(init), Some(loaded)) =
        (record, find(events, attempt, "start"), find(events, attempt, "init"), find(events, attempt, "loaded"))
    else {
        return Losses::default();
    };
    let first_step = find(events, attempt, "step").unwrap_or(loaded + step_ms);
    let running = seen.get(&attempt).map(|s| s.running_ms).filter(|r| *r > 0).unwrap_or(start);
    Losses {
        launch_s: secs(running - record.started_unix_ms) + secs(start - running) + secs(first_step - step_ms - loaded),
        start_s: secs(init - start),
        load_s: secs(loaded - init),
        ..Losses::default()
    }
}

pub fn account(job: &Job, seen: &BTreeMap<u32, Seen>, events: &[Event], injected: &[Injected], steps: u64) -> Account {
    let mut gaps: Vec<i64> = Vec::new();
    let mut last: Option<&Event> = None;
    for e in events.iter().filter(|e| e.event == "step") {
        if let Some(prev) = last
            && prev.attempt == e.attempt
            && e.iteration == prev.iteration + 1
        {
            gaps.push(e.t_ms - prev.t_ms);
        }
        last = Some(e);
    }
    // The median: the steps after a save are longer by the save, so they fall above it.
    gaps.sort_unstable();
    let step_ms = gaps.get(gaps.len() / 2).copied().unwrap_or(0);
    let saves: Vec<&Event> = events.iter().filter(|e| e.event == "saved").collect();
    let mut account = Account {
        steps,
        step_s: secs(step_ms),
        wall_s: secs(job.finished_unix_ms - job.submitted_unix_ms),
        initial: startup(job, seen, events, 1, step_ms),
        faults: Losses::default(),
        by_kind: BTreeMap::new(),
        saves_s: saves.iter().map(|e| e.save_s).sum(),
        saves: saves.len() as u32,
    };
    if let Some(first) = job.attempts.first() {
        // Submitted → placed: the first placement.
        account.initial.wait_s = secs(first.started_unix_ms - job.submitted_unix_ms);
    }
    for fault in injected {
        let a = fault.attempt;
        let record = |n: u32| job.attempts.iter().find(|r| r.attempt == n);
        // The attempt that ran on: the next one; after a full disk, the first
        // that a full disk did not fail again (the disk was freed before its save).
        let mut r = a + 1;
        if fault.kind == FaultKind::DiskFull {
            while record(r).is_some_and(failed_on_full_disk) {
                r += 1;
            }
        }
        if record(a).is_none() || record(r).is_none() {
            continue;
        }
        // Steps made after the fault until it is detected count in detection: a
        // partitioned node's ranks go on until fenced, for as long as Cohort
        // takes in real time, which compression turns into many steps. A full
        // disk shows only at the next save, which comes as many steps later
        // in simulated time as in compressed: those steps are work redone,
        // and detection starts at the last of them.
        let steps_of_a = events.iter().filter(|e| e.attempt == a && e.event == "step");
        let (reached, detected_from) = match fault.kind {
            FaultKind::DiskFull => {
                let last = steps_of_a.max_by_key(|e| e.t_ms);
                (last.map(|e| e.iteration), last.map_or(fault.at_ms, |e| e.t_ms.max(fault.at_ms)))
            }
            _ => (steps_of_a.filter(|e| e.t_ms <= fault.at_ms).map(|e| e.iteration).max(), fault.at_ms),
        };
        let resumed = events.iter().find(|e| e.attempt == r && e.event == "loaded").map(|e| e.iteration);
        let redone = match (reached, resumed) {
            (Some(reached), Some(from)) => reached.saturating_sub(from),
            _ => 0,
        };
        let mut loss = Losses::default();
        for k in a..r {
            let (Some(failed), Some(next)) = (record(k), record(k + 1)) else { break };
            if k == a {
                loss.detect_s = secs(failed.finished_unix_ms - detected_from);
            } else if let Some(first_step) = find(events, k, "step") {
                // An attempt the full disk failed again: its steps and the save it failed.
                loss.redo_s += secs(failed.finished_unix_ms - first_step + step_ms);
            }
            let gone = seen.get(&k).map(|s| s.gone_ms).filter(|g| *g > 0).unwrap_or(failed.finished_unix_ms);
            loss.teardown_s += secs(gone - failed.finished_unix_ms);
            loss.wait_s += secs(next.started_unix_ms - gone.max(failed.finished_unix_ms));
            loss.add(&startup(job, seen, events, k + 1, step_ms));
        }
        loss.redo_s += redone as f64 * secs(step_ms);
        account.faults.add(&loss);
        let entry = account.by_kind.entry(fault.kind.name()).or_default();
        entry.0 += 1;
        entry.1.add(&loss);
    }
    account
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use cohort_proto::JobState;

    fn attempt(n: u32, started: i64, finished: i64, state: JobState, cause: Option<FailureCause>) -> AttemptRecord {
        AttemptRecord {
            attempt: n,
            started_unix_ms: started,
            finished_unix_ms: finished,
            state: state as i32,
            failure: cause.map(|c| cohort_proto::Failure { cause: c.name().into(), ..Default::default() }),
            ..Default::default()
        }
    }

    fn event(event: &str, attempt: u32, t_ms: i64, iteration: u64) -> String {
        format!(
            "{{\"event\": \"{event}\", \"attempt\": {attempt}, \"t\": {}, \"iteration\": {iteration}}}",
            t_ms as f64 / 1000.0
        )
    }

    /// Attempt 1 steps 1..=12 (100 ms each) from 1 s, a rank killed at 2.25 s
    /// (after step 12), failed at 2.3 s, gone at 2.4 s; attempt 2 placed at 3 s,
    /// running at 3.1 s, starts at 3.2 s, inits at 3.5 s, loads iteration 10
    /// by 3.7 s and steps 11..=20 from 3.8 s.
    #[test]
    fn each_part_of_a_fault_is_counted_once() {
        let mut lines = vec![event("start", 1, 500, 0), event("init", 1, 800, 0), event("loaded", 1, 900, 0)];
        lines.extend((1..=12).map(|i| event("step", 1, 1000 + 100 * i as i64, i)));
        lines.extend([event("start", 2, 3200, 0), event("init", 2, 3500, 0), event("loaded", 2, 3700, 10)]);
        lines.extend((11..=20).map(|i| event("step", 2, 3800 + 100 * (i as i64 - 10), i)));
        let events = parse_events(&lines.join("\n"));
        let job = Job {
            submitted_unix_ms: 0,
            finished_unix_ms: 4800,
            attempts: vec![
                attempt(1, 100, 2300, JobState::Failed, None),
                attempt(2, 3000, 4800, JobState::Succeeded, None),
            ],
            ..Job::default()
        };
        let seen =
            BTreeMap::from([(1, Seen { running_ms: 400, gone_ms: 2400 }), (2, Seen { running_ms: 3100, gone_ms: 0 })]);
        let fault = Injected { kind: FaultKind::RankCrash, at_ms: 2250, attempt: 1, node: "node0".into() };
        let a = account(&job, &seen, &events, &[fault], 20);
        assert_eq!(a.step_s, 0.1);
        let f = a.faults;
        assert!((f.detect_s - 0.05).abs() < 1e-9, "{f:?}");
        assert!((f.teardown_s - 0.1).abs() < 1e-9, "{f:?}");
        assert!((f.wait_s - 0.6).abs() < 1e-9, "{f:?}");
        // Placed → running 0.1, running → start 0.1, loaded → the first step's work 0.1 (rendezvous).
        assert!((f.launch_s - 0.3).abs() < 1e-9, "{f:?}");
        assert!((f.start_s - 0.3).abs() < 1e-9 && (f.load_s - 0.2).abs() < 1e-9, "{f:?}");
        // Steps 11 and 12 were made before the fault and done again.
        assert!((f.redo_s - 0.2).abs() < 1e-9, "{f:?}");
        assert_eq!(a.by_kind["rank crash"].0, 1);
        // Wall time less all of the above: the 50 ms of step 13 the fault cut short.
        assert!((a.unexplained_s() - 0.05).abs() < 1e-9, "{}", a.unexplained_s());
    }

    /// A full disk at 2.25 s (after step 12; the checkpoint of step 10 is the
    /// newest): attempt 1 steps on to 20 (3.0 s) and fails at its save (3.05 s); attempt
    /// 2 resumes from 10 and fails the same way (5.25 s); the disk is freed and
    /// attempt 3 resumes from 10 and finishes step 30 (8.7 s).
    #[test]
    fn a_full_disk_counts_every_attempt_it_failed_once() {
        let mut lines = vec![event("start", 1, 500, 0), event("init", 1, 800, 0), event("loaded", 1, 900, 0)];
        lines.extend((1..=20).map(|i| event("step", 1, 1000 + 100 * i as i64, i)));
        lines.extend([event("start", 2, 3700, 0), event("init", 2, 4000, 0), event("loaded", 2, 4200, 10)]);
        lines.extend((11..=20).map(|i| event("step", 2, 4200 + 100 * (i as i64 - 10), i)));
        lines.extend([event("start", 3, 6200, 0), event("init", 3, 6500, 0), event("loaded", 3, 6700, 10)]);
        lines.extend((11..=30).map(|i| event("step", 3, 6700 + 100 * (i as i64 - 10), i)));
        let events = parse_events(&lines.join("\n"));
        let disk_full = Some(FailureCause::DiskFull);
        let job = Job {
            submitted_unix_ms: 0,
            finished_unix_ms: 8700,
            attempts: vec![
                attempt(1, 100, 3050, JobState::Failed, disk_full),
                attempt(2, 3500, 5250, JobState::Failed, disk_full),
                attempt(3, 6000, 8700, JobState::Succeeded, None),
            ],
            ..Job::default()
        };
        let seen = BTreeMap::from([
            (1, Seen { running_ms: 400, gone_ms: 3100 }),
            (2, Seen { running_ms: 3600, gone_ms: 5300 }),
            (3, Seen { running_ms: 6100, gone_ms: 0 }),
        ]);
        let fault = Injected { kind: FaultKind::DiskFull, at_ms: 2250, attempt: 1, node: "node0".into() };
        let a = account(&job, &seen, &events, &[fault], 30);
        let f = a.faults;
        let near = |x: f64, want: f64| (x - want).abs() < 1e-9;
        // Attempt 1's last step (3.0 s) → failed at its save.
        assert!(near(f.detect_s, 0.05), "{f:?}");
        // Both failed attempts' teardowns and waits.
        assert!(near(f.teardown_s, 0.1) && near(f.wait_s, 1.1), "{f:?}");
        // Attempts 2 and 3 launched, started and loaded.
        assert!(near(f.launch_s, 0.4) && near(f.start_s, 0.6) && near(f.load_s, 0.4), "{f:?}");
        // Attempt 1's steps 11 to 20 (before and after the disk filled: all
        // since the checkpoint), all of attempt 2's stepping and its failed save.
        assert!(near(f.redo_s, 2.05), "{f:?}");
        assert_eq!(a.by_kind["full disk"].0, 1);
        assert!(near(a.unexplained_s(), 0.0), "{}", a.unexplained_s());
    }
}
