//! Training-log parsing against the real fixture lines, and property tests:
//! no input panics, and generated lines give back the values they were made from.
#![allow(clippy::unwrap_used)]

use cohort_shared::metrics::{ChildFailure, ChildFailureParser, LogFormat, LoggingJsonl, TrainingMetrics, parse_line};
use proptest::prelude::*;

const MEGATRON_LM: &str = include_str!("fixtures/logs/megatron-lm.log");
const MS_SWIFT_3: &str = include_str!("fixtures/logs/ms-swift-3x.log");
const MS_SWIFT_4: &str = include_str!("fixtures/logs/ms-swift-4x.log");
const H200_STDOUT: &str = include_str!("fixtures/logs/ms-swift-3.12.6-h200-real.log");
const H200_JSONL: &str = include_str!("fixtures/logs/ms-swift-3.12.6-h200-real.logging.jsonl");
const CHILD_FAILED: &str = include_str!("fixtures/logs/torchrun-child-failed.log");

fn lines(text: &str) -> Vec<&str> {
    text.lines().filter(|line| !line.trim().is_empty()).collect()
}

#[test]
fn megatron_lm_fixture() {
    let [line] = lines(MEGATRON_LM)[..] else { panic!("one line expected") };
    assert_eq!(
        parse_line(line),
        Some(TrainingMetrics {
            iteration: 43,
            total_iterations: Some(100),
            loss: Some(1.825991),
            learning_rate: Some(8.6e-6),
            grad_norm: Some(1.426),
            iteration_time_s: Some(5444.9 / 1000.0),
            throughput_tflops: Some(239.8),
            memory_gib: None,
            elapsed_s: None,
            remaining_s: None,
            consumed_samples: Some(5504),
            global_batch_size: Some(128),
            is_eval: false,
            saved: false,
            format: LogFormat::MegatronLm,
        })
    );
}

#[test]
fn ms_swift_3x_fixture() {
    let [line] = lines(MS_SWIFT_3)[..] else { panic!("one line expected") };
    assert_eq!(
        parse_line(line),
        Some(TrainingMetrics {
            iteration: 1530,
            total_iterations: Some(1926),
            loss: Some(0.3515074),
            learning_rate: Some(4.001458e-6),
            grad_norm: Some(11.293),
            iteration_time_s: Some(85938.4 / 1000.0),
            throughput_tflops: None,
            memory_gib: Some(72.89),
            elapsed_s: Some(111_251.0),
            remaining_s: Some((7 * 3600 + 59 * 60 + 54) as f64),
            consumed_samples: Some(24480),
            global_batch_size: Some(16),
            is_eval: false,
            saved: false,
            format: LogFormat::MsSwift3,
        })
    );
}

#[test]
fn ms_swift_4x_fixture() {
    let [train, eval] = lines(MS_SWIFT_4)[..] else { panic!("two lines expected") };
    assert_eq!(
        parse_line(train),
        Some(TrainingMetrics {
            iteration: 1,
            total_iterations: Some(500),
            loss: Some(1.87345123),
            learning_rate: Some(2e-6),
            grad_norm: Some(12.375),
            memory_gib: Some(61.23),
            elapsed_s: Some(41.0),
            remaining_s: Some((5 * 3600 + 43 * 60 + 29) as f64),
            format: LogFormat::MsSwift4,
            ..TrainingMetrics::default()
        })
    );
    assert_eq!(
        parse_line(eval),
        Some(TrainingMetrics {
            iteration: 100,
            total_iterations: Some(500),
            loss: Some(1.3512),
            memory_gib: Some(63.9),
            elapsed_s: Some((17 * 60 + 10) as f64),
            remaining_s: Some((3600 + 8 * 60 + 40) as f64),
            is_eval: true,
            format: LogFormat::MsSwift4,
            ..TrainingMetrics::default()
        })
    );
}

#[test]
fn timestamp_prefix_is_optional_and_may_carry_microseconds() {
    let bare = "iteration        5/      10 | lm loss: 2.000000E+00 | grad norm: 0.500 |";
    let micro = format!("[2025-06-01 10:00:00.123456] {bare}");
    let torchrun = format!("[default3]:[2025-06-01 10:00:00] {bare}");
    for line in [bare, micro.as_str(), torchrun.as_str()] {
        let metrics = parse_line(line).unwrap();
        assert_eq!((metrics.iteration, metrics.total_iterations, metrics.loss), (5, Some(10), Some(2.0)), "{line}");
        assert_eq!(metrics.format, LogFormat::MegatronLm);
    }
}

#[test]
fn megatron_validation_line_is_eval() {
    let line = " validation loss at iteration 100 on validation set | lm loss value: 1.234000E+00 | lm loss PPL: 3.435130E+00 | ";
    let metrics = parse_line(line).unwrap();
    assert_eq!((metrics.iteration, metrics.loss, metrics.is_eval), (100, Some(1.234), true));
}

#[test]
fn ms_swift_3x_logging_jsonl_record() {
    let line = r#"{"lm loss": 0.35, "grad_norm": 11.3, "learning_rate": 4e-06, "elapsed_time_per_iteration": 85.9, "memory(GiB)": 72.89, "elapsed_time": "1d 6h 54m 11s", "remaining_time": "41s", "loss_scale": 1.0, "consumed_samples": 24480, "global_step/max_steps": "1530/1926"}"#;
    let metrics = parse_line(line).unwrap();
    assert_eq!(metrics.format, LogFormat::MsSwift3);
    assert_eq!((metrics.iteration, metrics.total_iterations), (1530, Some(1926)));
    assert_eq!((metrics.loss, metrics.consumed_samples, metrics.elapsed_s), (Some(0.35), Some(24480), Some(111_251.0)));
}

/// (iteration, is_eval, loss) of every record.
fn points(records: &[TrainingMetrics]) -> Vec<(u64, bool, Option<f64>)> {
    records.iter().map(|m| (m.iteration, m.is_eval, m.loss)).collect()
}

#[test]
fn ms_swift_3x_real_logging_jsonl_evals_attach_to_the_last_training_iteration() {
    // ms-swift 3.12.6 on an H200: eval records are `{"eval_lm loss": ...}` with no iteration.
    let mut follower = LoggingJsonl::new();
    let records: Vec<TrainingMetrics> = lines(H200_JSONL).into_iter().filter_map(|l| follower.parse(l)).collect();
    assert_eq!(
        points(&records),
        [
            (1, false, Some(6.98245096)),
            (5, false, Some(6.91264057)),
            (10, false, Some(6.60913696)),
            (10, true, Some(6.4828558)),
            (15, false, Some(6.4310112)),
            (20, false, Some(6.39254875)),
            (20, true, Some(6.35573959)),
            (20, true, Some(6.33211756)),
        ]
    );
    let eval = &records[3];
    assert_eq!((eval.total_iterations, eval.format), (Some(20), LogFormat::MsSwift3));
    let first = &records[0];
    assert_eq!(
        (first.iteration_time_s, first.memory_gib, first.consumed_samples, first.remaining_s),
        (Some(0.56775117), Some(0.09), Some(8), Some(11.0))
    );
}

#[test]
fn ms_swift_3x_real_stdout_matches_its_logging_jsonl() {
    let stdout: Vec<TrainingMetrics> =
        lines(H200_STDOUT).into_iter().filter_map(parse_line).filter(|m| !m.saved).collect();
    let mut follower = LoggingJsonl::new();
    let jsonl: Vec<TrainingMetrics> = lines(H200_JSONL).into_iter().filter_map(|l| follower.parse(l)).collect();
    let key = |records: &[TrainingMetrics]| -> Vec<(u64, bool)> {
        records.iter().map(|m| (m.iteration, m.is_eval)).collect()
    };
    assert_eq!(key(&stdout), key(&jsonl));
    for (out, json) in stdout.iter().zip(&jsonl) {
        // stdout rounds to 7 significant digits.
        let (a, b) = (out.loss.unwrap(), json.loss.unwrap());
        assert!((a - b).abs() < 1e-5, "iteration {}: {a} vs {b}", out.iteration);
    }
}

/// The saves of the real run (`--save_interval 10`), as rank 0 printed them
/// (Megatron-LM's `save_checkpoint`); the newer Megatron-LM prefix with a
/// timestamp; ms-swift 4.6.0's own line, as its logger printed it (captured
/// from `swift.utils.get_logger` with the f-string of
/// `utils/megatron_lm_utils.py::save_mcore_checkpoint`), which names no
/// iteration.
#[test]
fn checkpoint_save_lines_are_saves() {
    let saves: Vec<(u64, LogFormat)> = lines(H200_STDOUT)
        .into_iter()
        .filter_map(parse_line)
        .filter(|m| m.saved)
        .map(|m| {
            assert_eq!((m.loss, m.is_eval, m.total_iterations), (None, false, None), "{m:?}");
            (m.iteration, m.format)
        })
        .collect();
    assert_eq!(saves, [(10, LogFormat::MegatronLm), (20, LogFormat::MegatronLm)]);
    let newer = "  [2026-12-07 01:27:00.123456] successfully saved checkpoint from iteration     500 to /runs/x \
                 [ t 1/1, gtp_remat 0/1, p 1/1 ]";
    assert_eq!(parse_line(newer).map(|m| (m.iteration, m.saved)), Some((500, true)));
    let swift4 = "[INFO:swift] Successfully saved Megatron model weights in `/runs/qwen3/out/v0-20261207-012700`.";
    assert_eq!(parse_line(swift4).map(|m| (m.iteration, m.saved, m.format)), Some((0, true, LogFormat::MsSwift4)));
    // A local (non-persistent) checkpoint is not a save to resume from.
    assert_eq!(parse_line("  successfully saved local checkpoint from iteration      10"), None);
}

#[test]
fn an_eval_record_before_any_training_record_has_no_iteration_to_take() {
    let mut follower = LoggingJsonl::new();
    assert_eq!(follower.parse(r#"{"eval_lm loss": 6.48}"#), None);
    // A record without iteration that is not an evaluation is not metrics either.
    follower.parse(r#"{"lm loss": 6.9, "global_step/max_steps": "5/20"}"#).unwrap();
    assert_eq!(follower.parse(r#"{"lm loss": 6.9}"#), None);
    // parse_line alone (stdout) never invents an iteration.
    assert_eq!(parse_line(r#"{"eval_lm loss": 6.48}"#), None);
}

#[test]
fn ms_swift_3x_logging_jsonl_throughput_is_tflops_per_gpu() {
    let line = r#"{"lm loss": 1.5, "grad_norm": 2.0, "params_norm": 310.2, "learning_rate": 1e-05, "elapsed_time_per_iteration": 0.5, "memory(GiB)": 40.0, "elapsed_time": "10s", "remaining_time": "5s", "throughput": 412.5, "loss_scale": 1.0, "consumed_samples": 16, "global_step/max_steps": "2/4"}"#;
    let metrics = LoggingJsonl::new().parse(line).unwrap();
    assert_eq!((metrics.throughput_tflops, metrics.iteration_time_s), (Some(412.5), Some(0.5)));
}

#[test]
fn other_lines_are_not_metrics() {
    for line in [
        "",
        "run sh: `/usr/bin/python3 -m torch.distributed.run --nproc_per_node 2 sft.py`",
        "Train:  10%|█         | 50/500 [00:41<05:43,  1.31it/s]",
        "iteration 3 done",
        "iterations      43/     100 | lm loss: 1.0 |",
        "{'loss': 1.0, 'grad_norm': 2.0}",
        "{'iteration': '1/500'",
        "[2025-01-01 00:00:00] saving checkpoint at iteration      50 to /out",
        "{'iteration': 'abc/500'}",
    ] {
        assert_eq!(parse_line(line), None, "{line}");
    }
}

#[test]
fn child_failed_fixture() {
    let mut parser = ChildFailureParser::new();
    for line in CHILD_FAILED.lines() {
        parser.feed(line);
    }
    assert_eq!(
        parser.root_cause(),
        Some(ChildFailure {
            rank: 4,
            local_rank: Some(4),
            exit_code: -9,
            pid: Some(208585),
            signal: Some("SIGKILL".into()),
        })
    );
}

/// ms-swift's `format_time`: `1d 6h 54m 11s`, leading zero units left out.
fn swift_time(seconds: u64) -> String {
    let parts = [(seconds / 86_400, "d"), (seconds / 3600 % 24, "h"), (seconds / 60 % 60, "m"), (seconds % 60, "s")];
    let first = parts.iter().position(|(value, _)| *value > 0).unwrap_or(3);
    parts[first..].iter().map(|(value, unit)| format!("{value}{unit}")).collect::<Vec<_>>().join(" ")
}

#[test]
fn swift_time_helper_matches_the_fixture_forms() {
    assert_eq!(swift_time(111_251), "1d 6h 54m 11s");
    assert_eq!(swift_time(41), "41s");
    assert_eq!(swift_time(513), "8m 33s");
}

fn positive() -> impl Strategy<Value = f64> {
    (1e-12f64..1e6).prop_filter("finite", |x| x.is_finite())
}

/// Fragments of real lines, so that random inputs get deep into the parsers.
fn near_miss() -> impl Strategy<Value = String> {
    let token = prop_oneof![
        Just("iteration".to_owned()),
        Just(" | ".to_owned()),
        Just(": ".to_owned()),
        Just("/".to_owned()),
        Just("{".to_owned()),
        Just("}".to_owned()),
        Just("'".to_owned()),
        Just("[".to_owned()),
        Just("]".to_owned()),
        Just("lm loss".to_owned()),
        Just("elapsed time".to_owned()),
        Just("'iteration'".to_owned()),
        Just("eval_".to_owned()),
        Just("rank      : ".to_owned()),
        Just("Root Cause (first observed failure):".to_owned()),
        "[0-9]{1,25}".prop_map(String::from),
        "\\PC{0,4}",
    ];
    prop::collection::vec(token, 0..40).prop_map(|tokens| tokens.concat())
}

proptest! {
    #[test]
    fn never_panics_on_arbitrary_text(line in "\\PC*") {
        let _ = parse_line(&line);
        let mut parser = ChildFailureParser::new();
        parser.feed(&line);
        let _ = parser.root_cause();
    }

    #[test]
    fn never_panics_on_near_misses(line in near_miss()) {
        let _ = parse_line(&line);
        let mut parser = ChildFailureParser::new();
        parser.feed("Root Cause (first observed failure):");
        parser.feed(&line);
        let _ = parser.root_cause();
    }

    #[test]
    fn megatron_and_swift3_lines_round_trip(
        iteration in 0u64..10_000_000,
        total in 0u64..10_000_000,
        consumed in 0u64..u64::MAX / 2,
        ms in positive(),
        lr in positive(),
        loss in positive(),
        grad in positive(),
        batch in 1u64..100_000,
        timestamp in prop::option::of("\\[20[0-9]{2}-[01][0-9]-[0-3][0-9] [0-2][0-9]:[0-5][0-9]:[0-5][0-9](\\.[0-9]{6})?\\] "),
        swift in prop::option::of((positive(), 0u64..10_000_000, 0u64..10_000_000)),
    ) {
        let mut line = format!(" {}iteration {iteration:8}/{total:8} | consumed samples: {consumed:12} | elapsed time per iteration (ms): {ms} | ", timestamp.unwrap_or_default());
        if let Some((memory, elapsed, remaining)) = swift {
            line += &format!("memory(GiB): {memory} | elapsed time: {} | remaining time: {} | ", swift_time(elapsed), swift_time(remaining));
        }
        line += &format!("learning rate: {lr:E} | global batch size: {batch:5} | lm loss: {loss:E} | loss scale: 1.0 | grad norm: {grad} | number of skipped iterations:   0 |");
        let metrics = parse_line(&line).unwrap();
        prop_assert_eq!(metrics.iteration, iteration);
        prop_assert_eq!(metrics.total_iterations, Some(total));
        prop_assert_eq!(metrics.consumed_samples, Some(consumed));
        prop_assert_eq!(metrics.iteration_time_s, Some(ms / 1000.0));
        prop_assert_eq!(metrics.learning_rate, Some(lr));
        prop_assert_eq!(metrics.loss, Some(loss));
        prop_assert_eq!(metrics.grad_norm, Some(grad));
        prop_assert_eq!(metrics.global_batch_size, Some(batch));
        match swift {
            Some((memory, elapsed, remaining)) => {
                prop_assert_eq!(metrics.format, LogFormat::MsSwift3);
                prop_assert_eq!(metrics.memory_gib, Some(memory));
                prop_assert_eq!(metrics.elapsed_s, Some(elapsed as f64));
                prop_assert_eq!(metrics.remaining_s, Some(remaining as f64));
            }
            None => prop_assert_eq!(metrics.format, LogFormat::MegatronLm),
        }
    }

    #[test]
    fn swift4_lines_round_trip(
        iteration in 0u64..10_000_000,
        total in 0u64..10_000_000,
        loss in positive(),
        grad in positive(),
        lr in positive(),
        memory in positive(),
        speed in positive(),
        elapsed in 0u64..10_000_000,
        remaining in 0u64..10_000_000,
        eval in any::<bool>(),
    ) {
        let head = if eval {
            format!("'eval_loss': {loss:?}")
        } else {
            format!("'loss': {loss:?}, 'grad_norm': {grad:?}, 'learning_rate': {lr:?}")
        };
        let line = format!(
            "{{{head}, 'iteration': '{iteration}/{total}', 'elapsed_time': '{}', 'remaining_time': '{}', 'memory(GiB)': {memory:?}, 'train_speed(s/it)': {speed:?}}}",
            swift_time(elapsed), swift_time(remaining)
        );
        let metrics = parse_line(&line).unwrap();
        prop_assert_eq!(metrics.format, LogFormat::MsSwift4);
        prop_assert_eq!((metrics.iteration, metrics.total_iterations), (iteration, Some(total)));
        prop_assert_eq!(metrics.loss, Some(loss));
        prop_assert_eq!(metrics.is_eval, eval);
        prop_assert_eq!(metrics.grad_norm, (!eval).then_some(grad));
        prop_assert_eq!(metrics.learning_rate, (!eval).then_some(lr));
        prop_assert_eq!(metrics.memory_gib, Some(memory));
        // train_speed(s/it) is the mean since the start, not this interval's time per iteration.
        prop_assert_eq!(metrics.iteration_time_s, None);
        prop_assert_eq!(metrics.elapsed_s, Some(elapsed as f64));
        prop_assert_eq!(metrics.remaining_s, Some(remaining as f64));
    }

    #[test]
    fn child_failure_round_trips(rank in 0u32..100_000, local in 0u32..64, code in -64i32..256, pid in 1u32..4_000_000) {
        let mut parser = ChildFailureParser::new();
        for line in [
            "Root Cause (first observed failure):".to_owned(),
            "[0]:".to_owned(),
            format!("  rank      : {rank} (local_rank: {local})"),
            format!("  exitcode  : {code} (pid: {pid})"),
        ] {
            parser.feed(&line);
        }
        let failure = parser.root_cause().unwrap();
        prop_assert_eq!((failure.rank, failure.local_rank, failure.exit_code, failure.pid), (rank, Some(local), code, Some(pid)));
        prop_assert_eq!(failure.signal.is_some(), code < 0);
    }
}
