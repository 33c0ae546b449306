//! Lines per second `metrics::parse_line` handles on one core, per log format,
//! against a baseline in the same run: a plain scan of the same lines for the
//! word "iteration" (the least any parser must do).
//!
//! `cargo run --release -p cohort-shared --example parse_bench [-- LINES]`

use std::hint::black_box;
use std::time::Instant;

use cohort_shared::metrics::parse_line;

const MEGATRON: &str = " [2024-04-06 02:59:36] iteration       43/     100 | consumed samples:         5504 | elapsed time per iteration (ms): 5444.9 | throughput per GPU (TFLOP/s/GPU): 239.8 | learning rate: 8.600000E-06 | global batch size:   128 | lm loss: 1.825991E+00 | load_balancing_loss: 1.019746E+00 | loss scale: 1.0 | grad norm: 1.426 | num zeros: 0.0 | number of skipped iterations:   0 | number of nan iterations:   0 |";
const SWIFT3: &str = " [2025-12-01 16:59:08] iteration     1530/    1926 | consumed samples:        24480 | elapsed time per iteration (ms): 85938.4 | memory(GiB): 72.89 | elapsed time: 1d 6h 54m 11s | remaining time: 7h 59m 54s | learning rate: 4.001458E-06 | global batch size:    16 | lm loss: 3.515074E-01 | load_balancing_loss: 2.801638E+00 | loss scale: 1.0 | grad norm: 11.293 | number of skipped iterations:   0 | number of nan iterations:   0 |";
const SWIFT4: &str = "{'loss': 1.87345123, 'grad_norm': 12.375, 'learning_rate': 2e-06, 'iteration': '1/500', 'elapsed_time': '41s', 'remaining_time': '5h 43m 29s', 'memory(GiB)': 61.23, 'train_speed(s/it)': 41.3}";
/// What most of a rank's output is: not metrics.
const OTHER: &str = "[rank0]:[W1128 05:12:44.123456 ProcessGroupNCCL.cpp:4115] Warning: using the default NCCL settings for this process group";

fn measure(lines: &[&str], f: impl Fn(&str) -> bool) -> f64 {
    let start = Instant::now();
    let mut hits = 0usize;
    for line in lines {
        if f(black_box(line)) {
            hits += 1;
        }
    }
    black_box(hits);
    lines.len() as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(1_000_000);
    println!(
        "metrics parser, one thread, {n} lines per case ({})",
        if cfg!(debug_assertions) { "debug build: use --release" } else { "release" }
    );
    println!("{:<28} {:>14} {:>16} {:>8}", "case", "lines/s", "baseline lines/s", "ratio");
    for (name, line) in [
        ("Megatron-LM line", MEGATRON),
        ("ms-swift 3.x line", SWIFT3),
        ("ms-swift 4.x dict", SWIFT4),
        ("other output line", OTHER),
    ] {
        assert!(parse_line(line).is_some() == (name != "other output line"), "{name} must parse");
        let lines = vec![line; n];
        // Warm up, then measure each twice and keep the faster.
        measure(&lines[..n / 10], |l| parse_line(l).is_some());
        let parse = measure(&lines, |l| parse_line(l).is_some()).max(measure(&lines, |l| parse_line(l).is_some()));
        let scan = measure(&lines, |l| l.contains("iteration")).max(measure(&lines, |l| l.contains("iteration")));
        println!("{name:<28} {parse:>14.0} {scan:>16.0} {:>7.1}x", scan / parse);
    }
}
