//! The metrics parser against lines printed by ms-swift's OWN logging code of each version
//! (tools/swift-flags/make_log_fixtures.py: 3.x `BaseMegatronTrainer.training_log`, 4.x
//! `PrintCallback.on_log`, with made-up values) and against the real lines of a 3.12.6 run on
//! an H200. stdout lines go through `parse_line`, as the agent does for the last rank; each
//! `logging.jsonl` record too, as the agent's jsonl follower does.
#![allow(clippy::unwrap_used)]

use cohort_shared::metrics::{LogFormat, LoggingJsonl, TrainingMetrics, parse_line};

/// The made-up (iteration, loss) of make_log_fixtures.py's training points.
const MADE_UP_TRAIN: [(u64, f64); 5] = [(1, 6.9824), (5, 6.9126), (10, 6.6091), (15, 6.3522), (20, 6.2105)];
/// Its evaluation points.
const MADE_UP_EVAL: [(u64, f64); 2] = [(10, 6.4811), (20, 6.2903)];

struct Fixture {
    name: &'static str,
    log: &'static str,
    jsonl: &'static str,
}

const GENERATED: [Fixture; 4] = [
    Fixture {
        name: "ms-swift-3.12.6",
        log: include_str!("fixtures/logs/ms-swift-3.12.6.log"),
        jsonl: include_str!("fixtures/logs/ms-swift-3.12.6.logging.jsonl"),
    },
    Fixture {
        name: "ms-swift-3.10.3",
        log: include_str!("fixtures/logs/ms-swift-3.10.3.log"),
        jsonl: include_str!("fixtures/logs/ms-swift-3.10.3.logging.jsonl"),
    },
    Fixture {
        name: "ms-swift-4.6.0",
        log: include_str!("fixtures/logs/ms-swift-4.6.0.log"),
        jsonl: include_str!("fixtures/logs/ms-swift-4.6.0.logging.jsonl"),
    },
    Fixture {
        name: "ms-swift-4.4.2",
        log: include_str!("fixtures/logs/ms-swift-4.4.2.log"),
        jsonl: include_str!("fixtures/logs/ms-swift-4.4.2.logging.jsonl"),
    },
];

const H200: Fixture = Fixture {
    name: "ms-swift-3.12.6-h200-real",
    log: include_str!("fixtures/logs/ms-swift-3.12.6-h200-real.log"),
    jsonl: include_str!("fixtures/logs/ms-swift-3.12.6-h200-real.logging.jsonl"),
};

fn points(text: &str) -> Vec<TrainingMetrics> {
    text.lines().filter_map(parse_line).collect()
}

fn train(points: &[TrainingMetrics]) -> Vec<(u64, f64)> {
    points.iter().filter(|p| !p.is_eval && !p.saved).map(|p| (p.iteration, p.loss.unwrap())).collect()
}

fn eval(points: &[TrainingMetrics]) -> Vec<(u64, f64)> {
    points.iter().filter(|p| p.is_eval).map(|p| (p.iteration, p.loss.unwrap())).collect()
}

fn assert_close(name: &str, got: &[(u64, f64)], want: &[(u64, f64)]) {
    assert_eq!(got.len(), want.len(), "{name}: {got:?} vs {want:?}");
    for ((gi, gl), (wi, wl)) in got.iter().zip(want) {
        assert_eq!(gi, wi, "{name}: iterations {got:?} vs {want:?}");
        assert!((gl - wl).abs() < 1e-3, "{name}: loss {gl} at iteration {gi}, expected {wl}");
    }
}

#[test]
fn train_points_from_each_versions_own_stdout_and_logging_jsonl() {
    for fixture in &GENERATED {
        for (what, text) in [("stdout", fixture.log), ("logging.jsonl", fixture.jsonl)] {
            let name = format!("{} {what}", fixture.name);
            let points = points(text);
            assert_close(&name, &train(&points), &MADE_UP_TRAIN);
            let want = if fixture.name.starts_with("ms-swift-3") { LogFormat::MsSwift3 } else { LogFormat::MsSwift4 };
            assert!(points.iter().all(|p| p.format == want), "{name}: {points:?}");
            assert!(points.iter().all(|p| p.total_iterations == Some(20)), "{name}: {points:?}");
        }
    }
}

#[test]
fn eval_points_from_ms_swift_4_stdout_and_logging_jsonl() {
    for fixture in GENERATED.iter().filter(|f| f.name.starts_with("ms-swift-4")) {
        for (what, text) in [("stdout", fixture.log), ("logging.jsonl", fixture.jsonl)] {
            assert_close(&format!("{} {what}", fixture.name), &eval(&points(text)), &MADE_UP_EVAL);
        }
    }
}

#[test]
fn real_h200_run_train_and_eval_points() {
    let stdout = points(H200.log);
    let want_train = [(1, 6.982451), (5, 6.912641), (10, 6.609137), (15, 6.431011), (20, 6.392549)];
    assert_close("h200 stdout train", &train(&stdout), &want_train);
    // validation every 10, and the final one on the validation set
    assert_close("h200 stdout eval", &eval(&stdout), &[(10, 6.482856), (20, 6.35574), (20, 6.332118)]);
    assert_close("h200 logging.jsonl train", &train(&points(H200.jsonl)), &want_train);
}

/// 3.x writes eval records as `{"eval_lm loss": 6.48}`, with no iteration key
/// (swift/megatron/trainers/base.py:715-725): each becomes an eval point at the iteration of
/// the last training record before it, read as the agent reads the file (LoggingJsonl).
#[test]
fn ms_swift_3_logging_jsonl_eval_records_are_read() {
    for (fixture, want) in [
        (&GENERATED[0], MADE_UP_EVAL.to_vec()),
        (&GENERATED[1], MADE_UP_EVAL.to_vec()),
        (&H200, vec![(10, 6.4828558), (20, 6.35573959), (20, 6.33211756)]),
    ] {
        let mut reader = LoggingJsonl::new();
        let points: Vec<TrainingMetrics> = fixture.jsonl.lines().filter_map(|l| reader.parse(l)).collect();
        assert_close(&format!("{} logging.jsonl eval", fixture.name), &eval(&points), &want);
        assert!(points.iter().filter(|p| p.is_eval).all(|p| p.format == LogFormat::MsSwift3), "{}", fixture.name);
    }
}
