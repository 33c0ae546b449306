//! Training-log parsing: the agent runs [`parse_line`] on every output line of
//! the last rank (the only one that prints metrics) and [`ChildFailureParser`]
//! on the launcher's output.
//!
//! Three formats are recognised:
//! - Megatron-LM `training_log`: an optional `[timestamp]` prefix (with or
//!   without microseconds), then `iteration 43/ 100 | key: value | ...`.
//! - ms-swift 3.x: the same plus `memory(GiB)`, `elapsed time`, `remaining time`.
//! - ms-swift 4.x: a Python dict repr, `{'loss': 1.87, 'iteration': '1/500', ...}`.

mod child_failure;
mod pydict;

use serde::{Deserialize, Serialize};

pub use child_failure::{ChildFailure, ChildFailureParser, describe_exit, signal_name};
use pydict::{PyValue, parse_dict};

use crate::duration::parse_duration;

/// One line's worth of training metrics; fields a format does not print are None.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainingMetrics {
    pub iteration: u64,
    pub total_iterations: Option<u64>,
    pub loss: Option<f64>,
    pub learning_rate: Option<f64>,
    pub grad_norm: Option<f64>,
    /// Seconds per iteration over the last logging interval (Megatron prints milliseconds;
    /// ms-swift 3.x `elapsed_time_per_iteration` in `logging.jsonl`). Not ms-swift 4.x's
    /// `train_speed(s/it)`: that is the mean since the launch started (4.6.0
    /// `swift/megatron/callbacks/print.py:58-65`: elapsed / steps since `on_train_begin`), so it
    /// stays None for 4.x and consumers time the interval between records themselves.
    pub iteration_time_s: Option<f64>,
    /// Megatron's `throughput per GPU (TFLOP/s/GPU)`; ms-swift 3.x `throughput` in
    /// `logging.jsonl` (3.12.6 `swift/megatron/trainers/base.py:923,1000-1001`, with `--log_throughput`).
    pub throughput_tflops: Option<f64>,
    /// ms-swift's `memory(GiB)`: peak memory on the printing rank's GPU.
    pub memory_gib: Option<f64>,
    pub elapsed_s: Option<f64>,
    pub remaining_s: Option<f64>,
    pub consumed_samples: Option<u64>,
    pub global_batch_size: Option<u64>,
    /// An evaluation line: `loss` is then the validation loss.
    pub is_eval: bool,
    /// A checkpoint save line, printed by rank 0 once a save is complete:
    /// Megatron-LM's `successfully saved checkpoint from iteration N to DIR`
    /// (ms-swift 3.x runs it), ms-swift 4.x's `Successfully saved Megatron
    /// model weights in `DIR`.`. `iteration` is the iteration saved, 0 where
    /// the line does not say it (4.x: the last training record before it);
    /// no other field is set.
    #[serde(default)]
    pub saved: bool,
    pub format: LogFormat,
}

/// Which trainer printed the line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogFormat {
    #[default]
    MegatronLm,
    MsSwift3,
    MsSwift4,
}

/// Follows one `logging.jsonl` file: [`parse_line`] plus the ms-swift 3.x eval records.
///
/// ms-swift 3.x writes an evaluation to `logging.jsonl` as `{"eval_lm loss": 6.48}` with no
/// iteration (3.12.6 `swift/megatron/trainers/base.py:721-725`, after the training record of the
/// same iteration at :985-1005). Such a record belongs to the last training iteration written
/// before it, so the follower remembers that iteration; an eval record before any training
/// record (nothing to attach it to) is dropped.
#[derive(Debug, Default)]
pub struct LoggingJsonl {
    /// (iteration, total iterations) of the last record that carried them.
    last: Option<(u64, Option<u64>)>,
}

impl LoggingJsonl {
    pub fn new() -> Self {
        Self::default()
    }

    /// The metrics of one line of the file; None for a line that holds none.
    pub fn parse(&mut self, line: &str) -> Option<TrainingMetrics> {
        let body = strip_prefixes(line);
        if !body.starts_with('{') {
            return parse_line(line);
        }
        let (mut metrics, found_iteration) = parse_dict_record(body)?;
        if found_iteration {
            self.last = Some((metrics.iteration, metrics.total_iterations));
            return Some(metrics);
        }
        let (iteration, total) = self.last?;
        if !metrics.is_eval {
            return None;
        }
        metrics.iteration = iteration;
        metrics.total_iterations = total;
        metrics.format = LogFormat::MsSwift3;
        Some(metrics)
    }
}

/// Parses one output line; None for any line that is not a metrics line.
///
/// Recognises a Megatron-LM `training_log` line (and its `validation loss at
/// iteration N` line), an ms-swift 3.x line (Megatron style with `memory(GiB)`,
/// `elapsed time`, `remaining time`; loss key `lm loss`), and an ms-swift 4.x
/// line (a Python dict repr; `iteration: 'cur/total'`; `eval_` keys mark an
/// evaluation line). Leading `[...]` prefixes (timestamps, torchrun's
/// `[default0]:`) are skipped. Never panics, whatever the input.
pub fn parse_line(line: &str) -> Option<TrainingMetrics> {
    let body = strip_prefixes(line);
    if body.starts_with('{') { parse_dict_line(body) } else { parse_megatron_line(body) }
}

/// Drops up to a few leading `[...]` groups, each optionally followed by ':'.
fn strip_prefixes(line: &str) -> &str {
    let mut rest = line.trim();
    for _ in 0..4 {
        let Some(inner) = rest.strip_prefix('[') else {
            break;
        };
        let Some((_, after)) = inner.split_once(']') else {
            break;
        };
        let after = after.strip_prefix(':').unwrap_or(after);
        rest = after.trim_start();
    }
    rest
}

fn parse_megatron_line(body: &str) -> Option<TrainingMetrics> {
    if let Some(rest) = body.strip_prefix("successfully saved checkpoint from iteration") {
        // Megatron-LM `checkpointing.save_checkpoint` (core 0.15: checkpointing.py:631).
        let iteration = rest.split_whitespace().next()?.parse().ok()?;
        return Some(TrainingMetrics { iteration, saved: true, ..TrainingMetrics::default() });
    }
    if body.starts_with("Successfully saved Megatron model weights in ") {
        // ms-swift 4.x `utils/megatron_lm_utils.py::save_mcore_checkpoint` (4.6.0: line 387).
        return Some(TrainingMetrics { saved: true, format: LogFormat::MsSwift4, ..TrainingMetrics::default() });
    }
    let mut fields = body.split('|').map(str::trim).filter(|field| !field.is_empty());
    let first = fields.next()?;
    let mut metrics = TrainingMetrics::default();
    if let Some(rest) = first.strip_prefix("validation loss at iteration") {
        // " validation loss at iteration 100 on validation set | lm loss value: ... |"
        metrics.iteration = rest.split_whitespace().next()?.parse().ok()?;
        metrics.is_eval = true;
    } else {
        let rest = first.strip_prefix("iteration")?;
        if !rest.starts_with(char::is_whitespace) {
            return None;
        }
        let (current, total) = rest.split_once('/')?;
        metrics.iteration = current.trim().parse().ok()?;
        metrics.total_iterations = Some(total.trim().parse().ok()?);
    }
    let mut fallback_loss = None;
    for field in fields {
        let Some((key, value)) = field.split_once(':') else {
            continue;
        };
        let value = value.trim();
        let number = || value.parse::<f64>().ok();
        match key.trim() {
            "consumed samples" => metrics.consumed_samples = whole_number(value),
            "elapsed time per iteration (ms)" => metrics.iteration_time_s = number().map(|ms| ms / 1000.0),
            "throughput per GPU (TFLOP/s/GPU)" => metrics.throughput_tflops = number(),
            "learning rate" => metrics.learning_rate = number(),
            "global batch size" => metrics.global_batch_size = whole_number(value),
            "lm loss" | "lm loss value" => metrics.loss = number(),
            "loss" => fallback_loss = number(),
            "grad norm" => metrics.grad_norm = number(),
            "memory(GiB)" => {
                metrics.memory_gib = number();
                metrics.format = LogFormat::MsSwift3;
            }
            "elapsed time" => {
                metrics.elapsed_s = seconds(value);
                metrics.format = LogFormat::MsSwift3;
            }
            "remaining time" => {
                metrics.remaining_s = seconds(value);
                metrics.format = LogFormat::MsSwift3;
            }
            _ => {}
        }
    }
    metrics.loss = metrics.loss.or(fallback_loss);
    Some(metrics)
}

/// ms-swift 4.x stdout, or a `logging.jsonl` record of 3.x (`global_step/max_steps`) or 4.x.
fn parse_dict_line(body: &str) -> Option<TrainingMetrics> {
    let (metrics, found_iteration) = parse_dict_record(body)?;
    found_iteration.then_some(metrics)
}

/// A dict record and whether it named its iteration (3.x eval records in `logging.jsonl` do not).
fn parse_dict_record(body: &str) -> Option<(TrainingMetrics, bool)> {
    let entries = parse_dict(body)?;
    let mut metrics = TrainingMetrics { format: LogFormat::MsSwift4, ..TrainingMetrics::default() };
    let mut found_iteration = false;
    for (key, value) in &entries {
        let number = match value {
            PyValue::Number(number) => Some(*number),
            _ => None,
        };
        let text = match value {
            PyValue::Text(text) => Some(text.as_str()),
            _ => None,
        };
        match key.as_str() {
            "iteration" | "global_step/max_steps" => {
                if key != "iteration" {
                    metrics.format = LogFormat::MsSwift3;
                }
                let (current, total) = match (text, number) {
                    (Some(text), _) => match text.split_once('/') {
                        Some((current, total)) => (current.trim().parse().ok()?, total.trim().parse().ok()),
                        None => (text.trim().parse().ok()?, None),
                    },
                    (None, Some(number)) => (exact_u64(number)?, None),
                    (None, None) => return None,
                };
                metrics.iteration = current;
                metrics.total_iterations = total;
                found_iteration = true;
            }
            // 3.x: Megatron's loss name with `eval_` before it (3.12.6 trainers/base.py:724).
            "loss" | "lm loss" | "eval_loss" | "eval_lm loss" => metrics.loss = number,
            "grad_norm" => metrics.grad_norm = number,
            "learning_rate" => metrics.learning_rate = number,
            "memory(GiB)" => metrics.memory_gib = number,
            "elapsed_time_per_iteration" => metrics.iteration_time_s = number,
            "throughput" => metrics.throughput_tflops = number,
            // `train_speed(s/it)` (4.x) is a mean since the start, `loss_scale` and `params_norm`
            // (3.x) have no place in the metrics model: see `TrainingMetrics::iteration_time_s`.
            "elapsed_time" => metrics.elapsed_s = text.and_then(seconds).or(number),
            "remaining_time" => metrics.remaining_s = text.and_then(seconds).or(number),
            "consumed_samples" => metrics.consumed_samples = number.and_then(exact_u64),
            "global_batch_size" => metrics.global_batch_size = number.and_then(exact_u64),
            _ => {}
        }
        if key.starts_with("eval_") {
            metrics.is_eval = true;
        }
    }
    Some((metrics, found_iteration))
}

/// A count printed as `5504` (or `5504.0`).
fn whole_number(text: &str) -> Option<u64> {
    text.parse().ok().or_else(|| exact_u64(text.parse().ok()?))
}

fn exact_u64(number: f64) -> Option<u64> {
    // The upper bound keeps the cast exact; above 2^53 floats skip integers anyway.
    (number >= 0.0 && number.fract() == 0.0 && number < 9.0e15).then_some(number as u64)
}

/// ms-swift's `1d 6h 54m 11s` in seconds.
fn seconds(text: &str) -> Option<f64> {
    parse_duration(text).ok().map(|duration| duration.as_secs_f64())
}
