//! How often to checkpoint: the interval that loses the least time to saves
//! and to work redone after failures, from the save time and the mean time
//! between failures (Young 1974, Daly 2006), and what a job's own saves look
//! like in its training metrics.

use std::time::Duration;

/// Young's first-order optimum, √(2 · save · MTBF).
pub fn young(save: Duration, mtbf: Duration) -> Duration {
    Duration::from_secs_f64((2.0 * save.as_secs_f64() * mtbf.as_secs_f64()).sqrt())
}

/// Daly's higher-order optimum ("A higher order estimate of the optimum
/// checkpoint interval for restart dumps", FGCS 22, 2006, eq. 37): with δ the
/// save time and M the MTBF, √(2δM)·[1 + ⅓·√(δ/2M) + ⅑·(δ/2M)] − δ while
/// δ < 2M, and M beyond (checkpointing then barely pays).
pub fn daly(save: Duration, mtbf: Duration) -> Duration {
    let (d, m) = (save.as_secs_f64(), mtbf.as_secs_f64());
    if m <= 0.0 {
        return Duration::ZERO;
    }
    if d >= 2.0 * m {
        return mtbf;
    }
    let x = d / (2.0 * m);
    let tau = (2.0 * d * m).sqrt() * (1.0 + x.sqrt() / 3.0 + x / 9.0) - d;
    Duration::from_secs_f64(tau.max(0.0))
}

/// The share of time lost to saves and redone work at `interval` of compute
/// between saves (first order): δ/τ for the saves, (τ + δ)/2M for the work
/// redone after a failure, on average half an interval.
pub fn waste(interval: Duration, save: Duration, mtbf: Duration) -> f64 {
    let (t, d, m) = (interval.as_secs_f64(), save.as_secs_f64(), mtbf.as_secs_f64());
    if t <= 0.0 || m <= 0.0 {
        return 1.0;
    }
    (d / t + (t + d) / (2.0 * m)).min(1.0)
}

/// Mean time between failures: `run` time over `failures`; None without a failure.
pub fn mtbf(failures: u32, run: Duration) -> Option<Duration> {
    (failures > 0 && !run.is_zero()).then(|| run / failures)
}

/// What a job's metrics say about its saves.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ObservedSaves {
    /// Iterations between saves.
    pub every: u64,
    /// Median seconds one save adds to the iteration after it.
    pub save: Duration,
    /// Median seconds per iteration.
    pub iteration: Duration,
    /// Taken from the trainer's save records, not inferred from slow iterations.
    pub recorded: bool,
}

/// What a run's training points, `(attempt, iteration, unix ms)` in the
/// order they were read, and its save records (the trainer's "saved
/// checkpoint" lines, the same form, iteration 0 where the trainer does not
/// print it) say about its saves.
///
/// With two saves recorded, their iterations give the interval and each
/// save's time is from the training record of its iteration (or, where the
/// trainer does not name it, the last one before the save) to the save's
/// end. Without, saves are inferred: an iteration that took more than twice
/// the median longer than it should followed a save (a save shorter than
/// two iterations is not seen; a stray slow iteration is taken for one).
/// Gaps between attempts are not saves. Needs two saves, to know their
/// spacing.
pub fn observed_saves(points: &[(u32, u64, i64)], saves: &[(u32, u64, i64)]) -> Option<ObservedSaves> {
    // (iteration reached, iterations in the gap, ms of the gap) of consecutive points of one attempt.
    let gaps: Vec<(u64, u64, f64)> = points
        .windows(2)
        .filter(|w| w[0].0 == w[1].0 && w[1].1 > w[0].1 && w[1].2 > w[0].2)
        .map(|w| (w[1].1, w[1].1 - w[0].1, (w[1].2 - w[0].2) as f64))
        .collect();
    let mut per_iteration: Vec<f64> = gaps.iter().map(|(_, n, ms)| ms / *n as f64).collect();
    let median_ms = median(&mut per_iteration)?;
    let iteration = Duration::from_secs_f64(median_ms / 1000.0);
    if let Some((every, save)) = recorded_saves(points, saves) {
        return Some(ObservedSaves { every, save, iteration, recorded: true });
    }
    let mut excess = Vec::new();
    let mut saved_at = Vec::new();
    for (reached, n, ms) in &gaps {
        let over = ms - median_ms * *n as f64;
        if over > 2.0 * median_ms * *n as f64 && over > 0.0 {
            excess.push(over);
            // The save followed the iteration before the one that took longer.
            saved_at.push(reached - 1);
        }
    }
    let every = most_common_spacing(saved_at)?;
    let save_ms = median(&mut excess)?;
    Some(ObservedSaves { every, save: Duration::from_secs_f64(save_ms / 1000.0), iteration, recorded: false })
}

/// The interval (iterations) and save time of the saves the trainer
/// recorded; None with fewer than two.
fn recorded_saves(points: &[(u32, u64, i64)], saves: &[(u32, u64, i64)]) -> Option<(u64, Duration)> {
    let mut at = Vec::new();
    let mut took = Vec::new();
    for &(attempt, iteration, end_ms) in saves {
        // The newest training record of the attempt read before the save ended,
        // of the saved iteration where the save names it.
        let before = points
            .iter()
            .rev()
            .filter(|p| p.0 == attempt && p.2 <= end_ms)
            .find(|p| iteration == 0 || p.1 <= iteration);
        let Some(&(_, reached, start_ms)) = before else { continue };
        at.push(if iteration == 0 { reached } else { iteration });
        if iteration == 0 || reached == iteration {
            took.push((end_ms - start_ms) as f64);
        }
    }
    let every = most_common_spacing(at)?;
    let save_ms = median(&mut took)?;
    Some((every, Duration::from_secs_f64(save_ms / 1000.0)))
}

/// The most common spacing between sorted, distinct `iterations`: a save
/// missed (a restart in between) gives a multiple of it.
fn most_common_spacing(mut iterations: Vec<u64>) -> Option<u64> {
    iterations.sort_unstable();
    iterations.dedup();
    let mut spacing: Vec<u64> = iterations.windows(2).map(|w| w[1] - w[0]).collect();
    spacing.sort_unstable();
    spacing.iter().copied().max_by_key(|s| (spacing.iter().filter(|x| *x == s).count(), u64::MAX - s))
}

fn median(values: &mut [f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    Some(values[values.len() / 2])
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn s(secs: f64) -> Duration {
        Duration::from_secs_f64(secs)
    }

    #[test]
    fn young_is_the_square_root_of_twice_save_time_mtbf() {
        // 30 s saves, a failure a day: √(2 · 30 · 86400) = 2276.8 s.
        assert!((young(s(30.0), s(86_400.0)).as_secs_f64() - 2276.84).abs() < 0.01);
    }

    #[test]
    fn daly_corrects_young_upward_less_the_save_time() {
        let (d, m) = (s(60.0), s(3600.0));
        let x: f64 = 60.0 / 7200.0;
        let expected = (2.0f64 * 60.0 * 3600.0).sqrt() * (1.0 + x.sqrt() / 3.0 + x / 9.0) - 60.0;
        assert!((daly(d, m).as_secs_f64() - expected).abs() < 1e-6);
        // Close to Young's when saves are short next to the MTBF.
        let ratio = daly(s(1.0), s(1e6)).as_secs_f64() / young(s(1.0), s(1e6)).as_secs_f64();
        assert!((ratio - 1.0).abs() < 0.01, "{ratio}");
    }

    #[test]
    fn daly_is_the_mtbf_once_saves_take_twice_as_long() {
        assert_eq!(daly(s(200.0), s(100.0)), s(100.0));
        assert_eq!(daly(s(1.0), Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn the_optimum_wastes_less_than_intervals_around_it() {
        let (d, m) = (s(45.0), s(4.0 * 3600.0));
        let best = daly(d, m);
        let at_best = waste(best, d, m);
        for factor in [0.25, 0.5, 2.0, 4.0] {
            assert!(waste(best.mul_f64(factor), d, m) > at_best, "×{factor}");
        }
    }

    #[test]
    fn mtbf_needs_a_failure() {
        assert_eq!(mtbf(0, s(100.0)), None);
        assert_eq!(mtbf(4, s(100.0)), Some(s(25.0)));
    }

    /// A run of `iterations` at 1 s each, a 5 s save after every `every`-th,
    /// points every iteration, a restart from the last save after iteration 47.
    fn run(every: u64) -> Vec<(u32, u64, i64)> {
        let mut points = Vec::new();
        let mut t = 0i64;
        for i in 1..=47 {
            t += 1000;
            points.push((1, i, t));
            if i % every == 0 {
                t += 5000;
            }
        }
        t += 60_000;
        for i in (47 / every * every + 1)..=100 {
            t += 1000;
            points.push((2, i, t));
            if i % every == 0 {
                t += 5000;
            }
        }
        points
    }

    #[test]
    fn saves_are_found_from_the_longer_iterations_after_them() {
        let saves = observed_saves(&run(10), &[]).unwrap();
        assert_eq!(saves.every, 10);
        assert_eq!(saves.save, s(5.0));
        assert_eq!(saves.iteration, s(1.0));
    }

    #[test]
    fn a_restart_between_attempts_is_not_a_save() {
        // Two attempts' points side by side: the 60 s gap between them is not taken.
        let saves = observed_saves(&run(20), &[]).unwrap();
        assert_eq!(saves.every, 20);
        assert_eq!(saves.save, s(5.0));
    }

    /// Saves every 41 iterations that take 0.5 s (less than two 1 s
    /// iterations: not seen in the iteration times) and a stray 3 s stall
    /// every 16 iterations (taken for a save when inferring); the trainer's
    /// save records say what happened, with or without the iteration.
    #[test]
    fn recorded_saves_are_taken_over_slow_iterations() {
        let (mut points, mut saves) = (Vec::new(), Vec::new());
        let mut t = 0i64;
        for i in 1..=200u64 {
            t += if i % 16 == 0 { 4000 } else { 1000 };
            points.push((1, i, t));
            if i % 41 == 0 {
                t += 500;
                saves.push((1, i, t));
            }
        }
        assert_eq!(observed_saves(&points, &[]).map(|s| s.every), Some(16), "inferred: the stalls");
        let recorded = observed_saves(&points, &saves).unwrap();
        assert_eq!((recorded.every, recorded.save, recorded.iteration, recorded.recorded), (41, s(0.5), s(1.0), true));
        // ms-swift 4.x names no iteration: the last training record before the save is its iteration.
        let unnamed: Vec<(u32, u64, i64)> = saves.iter().map(|&(a, _, ms)| (a, 0, ms)).collect();
        assert_eq!(observed_saves(&points, &unnamed), Some(recorded));
        // One save recorded is no interval: inferred as before.
        assert_eq!(observed_saves(&points, &saves[..1]).map(|s| s.every), Some(16));
    }

    #[test]
    fn no_saves_no_answer() {
        let steady: Vec<(u32, u64, i64)> = (1..50).map(|i| (1, i, i as i64 * 1000)).collect();
        assert_eq!(observed_saves(&steady, &[]), None);
        assert_eq!(observed_saves(&[], &[]), None);
    }
}
