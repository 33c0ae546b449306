//! Microsoft Philly's job log (`cluster_job_log` of
//! <https://github.com/msr-fiddle/philly-traces>, the trace of the ATC'19
//! paper): a JSON array of jobs, each with `vc` (its virtual cluster: a
//! queue here), `user`, `submitted_time` and `attempts`, each attempt with
//! `start_time`, `end_time` and `detail`, the servers (`ip`) and GPUs it held.
//!
//! A job becomes one trace job: submitted when it was, on as many nodes as
//! its last complete attempt had servers, with as many GPUs per node as the
//! most it held on one (at most the simulated nodes'), running as long as
//! that attempt ran. Philly records no time limits: each gets one drawn as
//! the synthetic trace's are (1.2-4 times the run, rounded up), seeded. Jobs
//! without a submit time or a complete attempt are left out and counted.

use std::time::SystemTime;

use anyhow::{Context, ensure};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::Value;

use crate::trace::{TraceJob, draw_limit, to_ms};

/// The most of a job log read (the published one is about 0.2 GB).
const MAX_BYTES: u64 = 2 << 30;

/// What the import left out.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Skipped {
    pub no_submit_time: usize,
    pub no_complete_attempt: usize,
}

pub fn read(path: &std::path::Path, gpus_per_node: u32, seed: u64) -> anyhow::Result<(Vec<TraceJob>, Skipped)> {
    let size = std::fs::metadata(path).with_context(|| format!("--philly {}", path.display()))?.len();
    ensure!(size <= MAX_BYTES, "--philly {}: {size} bytes, more than the {MAX_BYTES} read", path.display());
    let text = std::fs::read_to_string(path).with_context(|| format!("--philly {}", path.display()))?;
    parse(&text, gpus_per_node, seed).with_context(|| format!("--philly {}", path.display()))
}

/// Philly's times: "2017-10-07 01:12:09" (the cluster's local time; only differences matter here).
fn time(v: &Value) -> Option<SystemTime> {
    v.as_str().and_then(|t| humantime::parse_rfc3339_weak(t).ok())
}

/// The last attempt with a start and an end: (run seconds, servers, most GPUs on one).
fn last_complete(attempts: &[Value]) -> Option<(f64, u32, u32)> {
    attempts.iter().rev().find_map(|a| {
        let run = time(&a["end_time"])?.duration_since(time(&a["start_time"])?).ok()?.as_secs_f64();
        let detail = a["detail"].as_array()?;
        let gpus = detail.iter().map(|d| d["gpus"].as_array().map_or(0, Vec::len)).max()? as u32;
        (run > 0.0 && gpus > 0).then_some((run, detail.len() as u32, gpus))
    })
}

pub fn parse(text: &str, gpus_per_node: u32, seed: u64) -> anyhow::Result<(Vec<TraceJob>, Skipped)> {
    let log: Value = serde_json::from_str(text).context("not JSON")?;
    let jobs = log.as_array().context("not a JSON array of jobs (Philly's cluster_job_log)")?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut skipped = Skipped::default();
    let mut kept = Vec::new();
    for (i, job) in jobs.iter().enumerate() {
        let Some(submitted) = time(&job["submitted_time"]) else {
            skipped.no_submit_time += 1;
            continue;
        };
        let Some((run_s, nodes, gpus)) = last_complete(job["attempts"].as_array().map_or(&[], Vec::as_slice)) else {
            skipped.no_complete_attempt += 1;
            continue;
        };
        let name = |key: &str| {
            job[key]
                .as_str()
                .filter(|s| cohort_shared::spec::is_queue_name(s))
                .map(str::to_owned)
                .with_context(|| format!("job {i}: {key} {} is not a name of letters, digits, - and _", job[key]))
        };
        let limit_s = draw_limit(&mut rng, run_s, 1.0, None);
        let job = TraceJob {
            submit_s: 0.0,
            queue: name("vc")?,
            user: name("user")?,
            nodes,
            gpus_per_node: gpus.min(gpus_per_node),
            run_s: to_ms(run_s),
            limit_s: to_ms(limit_s),
        };
        kept.push((submitted, job));
    }
    let first = kept.iter().map(|(t, _)| *t).min();
    let mut trace: Vec<TraceJob> = kept
        .into_iter()
        .map(|(t, mut job)| {
            let since = first.and_then(|f| t.duration_since(f).ok()).unwrap_or_default();
            job.submit_s = to_ms(since.as_secs_f64());
            job
        })
        .collect();
    trace.sort_by(|a, b| a.submit_s.total_cmp(&b.submit_s));
    Ok((trace, skipped))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const SAMPLE: &str = include_str!("../../../data/philly-sample.json");

    #[test]
    fn a_philly_log_becomes_a_trace_of_its_last_complete_attempts() {
        let (trace, skipped) = parse(SAMPLE, 8, 1).unwrap();
        assert_eq!(skipped, Skipped { no_submit_time: 1, no_complete_attempt: 2 });
        assert_eq!(trace.len(), 9);
        assert_eq!(trace[0].submit_s, 0.0, "times count from the first submit");
        // Two attempts: the second ran 2 days 5 h 39 min 42 s on one 8-GPU server.
        let retried = trace.iter().find(|j| j.user == "u-retry").unwrap();
        assert_eq!((retried.nodes, retried.gpus_per_node, retried.run_s), (1, 8, 193_182.0));
        assert!(retried.limit_s >= retried.run_s);
        let gang = trace.iter().find(|j| j.user == "u-gang").unwrap();
        assert_eq!((gang.nodes, gang.gpus_per_node, gang.queue.as_str()), (4, 8, "vc-b"));
        let (capped, _) = parse(SAMPLE, 4, 1).unwrap();
        assert!(capped.iter().all(|j| j.gpus_per_node <= 4));
    }

    #[test]
    fn a_bad_log_is_refused_naming_what() {
        assert!(parse("{}", 8, 1).unwrap_err().to_string().contains("not a JSON array"));
        let bad = r#"[{"vc": "a b", "user": "u", "submitted_time": "2017-10-07 01:11:39",
            "attempts": [{"start_time": "2017-10-07 01:12:09", "end_time": "2017-10-07 01:13:23",
            "detail": [{"ip": "m1", "gpus": ["gpu0"]}]}]}]"#;
        let e = parse(bad, 8, 1).unwrap_err().to_string();
        assert!(e.contains("job 0: vc \"a b\""), "{e}");
    }
}
