//! `cohort-sim --quick` (issue 17's scheduling simulator): the same seeded
//! trace under `fifo` and `backfill`. Backfill must cut the waits of small
//! jobs, start jobs behind a reservation without ever moving it later, keep
//! every queue within its quota except by borrowing, and never hand out a
//! GPU twice; fifo must start nothing out of submission order.
#![allow(clippy::unwrap_used)]

use std::process::Command;

use serde_json::Value;

fn run_quick(extra: &[&str]) -> Value {
    run(&[&["--quick"], extra].concat())
}

fn run(args: &[&str]) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("figures.json");
    let output = Command::new(env!("CARGO_BIN_EXE_cohort-sim"))
        .args(["--check", "--json"])
        .arg(&json)
        .args(args)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap()
}

fn f(v: &Value, path: &str) -> f64 {
    v.pointer(path).and_then(Value::as_f64).unwrap_or_else(|| panic!("{path} missing in {v}"))
}

#[test]
fn backfill_cuts_small_jobs_waits_against_fifo_and_keeps_its_promises() {
    // Without preemption: in the quick trace every blocked head within its quota
    // can reclaim, so with it nothing would wait behind a reservation.
    let figures = run_quick(&["--preempt", "off"]);
    let (fifo, backfill) = (&figures["fifo"], &figures["backfill-no-preempt"]);
    let (before, after) = (f(fifo, "/waits/1-node/p99_s"), f(backfill, "/waits/1-node/p99_s"));
    assert!(after < before, "1-node p99 wait: backfill {after}s, fifo {before}s");
    assert!(f(backfill, "/waits/1-node/jobs") >= 100.0, "too few small jobs to measure: {backfill}");
    assert!(f(backfill, "/backfilled") > 0.0, "nothing ran behind a reservation: {backfill}");
    assert!(f(backfill, "/borrowed") > 0.0, "no queue borrowed idle GPUs: {backfill}");
    for check in ["overcommits", "quota_breaches", "reservations_delayed"] {
        assert_eq!(f(backfill, &format!("/checks/{check}")), 0.0, "{check}: {backfill}");
    }
    assert_eq!(f(fifo, "/checks/overcommits"), 0.0, "{fifo}");
    // Fifo has no quotas: the same count sees its queues run over them.
    assert!(f(fifo, "/checks/quota_breaches") > 0.0, "{fifo}");
    assert_eq!((f(fifo, "/backfilled"), f(fifo, "/borrowed")), (0.0, 0.0), "fifo neither backfills nor borrows");
    assert!(fifo["preemptions"].is_null(), "fifo does not preempt: reported as n/a");
}

#[test]
fn reclaiming_by_preemption_loses_no_work_with_save_first_and_the_checkpoint_interval_without() {
    let figures = run_quick(&["--policies", "backfill", "--preempt", "save-first,periodic,off"]);
    let (saving, periodic, off) =
        (&figures["backfill"], &figures["backfill-periodic"], &figures["backfill-no-preempt"]);
    assert!(f(saving, "/preemptions") > 0.0, "the quick trace's queues reclaim lent GPUs: {saving}");
    assert_eq!(f(saving, "/lost_work/gpu_hours"), 0.0, "{saving}");
    assert_eq!(f(saving, "/lost_work/max_iterations_per_preemption"), 0.0, "{saving}");
    assert!(f(periodic, "/preemptions") > 0.0, "{periodic}");
    // At most a checkpoint interval (30 min at 2 s an iteration: 900 iterations) each, and some.
    let (mean, most) =
        (f(periodic, "/lost_work/iterations_per_preemption"), f(periodic, "/lost_work/max_iterations_per_preemption"));
    assert!(mean > 0.0 && most <= 900.0, "{periodic}");
    assert!(off["preemptions"].is_null(), "{off}");
    for replay in [saving, periodic] {
        for check in ["overcommits", "quota_breaches", "reservations_delayed"] {
            assert_eq!(f(replay, &format!("/checks/{check}")), 0.0, "{check}: {replay}");
        }
    }
}

#[test]
fn borrowers_preempt_for_fair_share_only_when_the_queue_file_says_so_and_keep_every_promise() {
    let args = ["--load", "1.3", "--policies", "backfill", "--preempt", "save-first"];
    let (off, on) = (run_quick(&args), run_quick(&[&args[..], &["--preempt-for-fair-share"]].concat()));
    let (off, on) = (&off["backfill"], &on["backfill"]);
    assert_eq!(f(off, "/preemptions_for_fair_share"), 0.0, "{off}");
    assert!(f(on, "/preemptions_for_fair_share") > 0.0, "the overloaded quick trace has borrowers to serve: {on}");
    assert!(f(on, "/preemptions") >= f(on, "/preemptions_for_fair_share"), "{on}");
    assert_eq!(f(on, "/lost_work/gpu_hours"), 0.0, "save-first loses nothing: {on}");
    for check in ["overcommits", "quota_breaches", "reservations_delayed"] {
        assert_eq!(f(on, &format!("/checks/{check}")), 0.0, "{check}: {on}");
    }
}

#[test]
fn a_written_trace_replays_to_the_same_figures() {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("trace.csv");
    let generated = run_quick(&["--policies", "backfill", "--write-trace", trace.to_str().unwrap()]);
    let replayed = run_quick(&["--policies", "backfill", "--trace", trace.to_str().unwrap()]);
    for path in ["/backfill/utilisation", "/backfill/waits/1-node/p99_s", "/backfill/backfilled"] {
        let (a, b) = (f(&generated, path), f(&replayed, path));
        assert!((a - b).abs() <= 1e-6 * a.abs().max(1.0), "{path}: generated {a}, replayed {b}");
    }
}

#[test]
fn a_philly_job_log_replays_and_backfill_starts_its_small_jobs_beside_a_gang_that_waits() {
    let sample = concat!(env!("CARGO_MANIFEST_DIR"), "/data/philly-sample.json");
    // Four 8-GPU nodes: a two-day job holds one, so the 4-node gang waits for it.
    let figures = run(&["--philly", sample, "--nodes", "4", "--hours", "6", "--warmup-hours", "0"]);
    let (fifo, backfill) = (&figures["fifo"], &figures["backfill"]);
    assert_eq!(f(backfill, "/waits/1-node/jobs"), 7.0, "the sample's one-node jobs: {backfill}");
    let (before, after) = (f(fifo, "/waits/1-node/p99_s"), f(backfill, "/waits/1-node/p99_s"));
    assert!(after < before, "1-node p99 wait: backfill {after}s, fifo {before}s");
    let queues: Vec<&str> =
        backfill["shares"].as_array().unwrap().iter().map(|q| q["queue"].as_str().unwrap()).collect();
    assert_eq!(queues, ["vc-a", "vc-b", "vc-c"], "each virtual cluster is a queue");
}
