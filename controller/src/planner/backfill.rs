//! EASY backfill: the first job of the order that does not fit now gets a
//! reservation, the nodes that free up first by the running gangs' expected
//! ends; a later job starts now only where it cannot delay that reservation.
//!
//! A running gang's expected end is its start plus its time limit (its own or
//! its queue's maximum run time); a gang with neither never ends as far as
//! the planner knows, so the GPUs it holds are never counted on.

use std::time::Duration;

use cohort_shared::spec::JobSpec;

use super::{NodeView, Placement, PlacementError, place, place_setting_aside};

/// A gang that holds GPUs now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunningGang {
    /// The GPUs it holds, per node.
    pub gpus: Vec<(String, Vec<u32>)>,
    /// When its time limit stops it at the latest (None: no limit).
    pub ends_unix_ms: Option<i64>,
}

/// The nodes a blocked job will start on, and when at the latest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub job_id: String,
    /// Sorted node names.
    pub nodes: Vec<String>,
    pub start_unix_ms: i64,
}

/// Why a job behind a reservation waits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackfillRefusal {
    /// It does not fit on the free GPUs, reserved nodes or not.
    #[error(transparent)]
    DoesNotFit(#[from] PlacementError),
    /// It fits only on reserved nodes, and its time limit would run past the reservation's start.
    #[error("fits only on nodes reserved for job {job_id}, and {why}")]
    WouldDelay { job_id: String, why: String },
}

/// The reservation of `spec` (job `job_id`): frees the running gangs' GPUs in
/// the order their time limits end them until `spec` fits, all or nothing.
/// None when it never fits that way (gangs without a time limit hold what it needs).
pub fn reserve(
    job_id: &str,
    spec: &JobSpec,
    inventory: &[NodeView],
    running: &[RunningGang],
    now_unix_ms: i64,
) -> Option<Reservation> {
    let mut ending: Vec<&RunningGang> = running.iter().filter(|g| g.ends_unix_ms.is_some()).collect();
    ending.sort_by_key(|g| g.ends_unix_ms);
    let reservation = |placement: Placement, at: i64| {
        let mut nodes: Vec<String> = placement.nodes.into_iter().map(|(n, _)| n).collect();
        nodes.sort();
        Reservation { job_id: job_id.to_string(), nodes, start_unix_ms: at.max(now_unix_ms) }
    };
    if let Ok(placement) = place(spec, inventory, &[]) {
        return Some(reservation(placement, now_unix_ms));
    }
    // The inventory once the first `k` gangs to end are gone.
    let index: std::collections::HashMap<&str, usize> =
        inventory.iter().enumerate().map(|(i, v)| (v.name.as_str(), i)).collect();
    let freed = |k: usize| {
        let mut views = inventory.to_vec();
        for gang in &ending[..k] {
            for (node, gpus) in &gang.gpus {
                if let Some(view) = index.get(node.as_str()).map(|i| &mut views[*i]) {
                    for gpu in gpus {
                        if !view.free_gpus.contains(gpu) {
                            view.free_gpus.push(*gpu);
                        }
                    }
                    view.free_gpus.sort_unstable();
                }
            }
        }
        views
    };
    // More free GPUs never make a job fit less, so the first `k` it fits after is found by bisection.
    let (mut fails, mut fits) = (0, ending.len());
    place(spec, &freed(fits), &[]).ok()?;
    while fits - fails > 1 {
        let mid = (fails + fits) / 2;
        if place(spec, &freed(mid), &[]).is_ok() {
            fits = mid;
        } else {
            fails = mid;
        }
    }
    let placement = place(spec, &freed(fits), &[]).ok()?;
    Some(reservation(placement, ending[fits - 1].ends_unix_ms.unwrap_or(now_unix_ms)))
}

/// Where `spec` may start now behind `reservation`: on free GPUs off the
/// reserved nodes; or on reserved ones when its `time_limit` ends it before
/// the reservation starts. Nodes in `excluded` are avoided as in [`place`].
pub fn backfill(
    spec: &JobSpec,
    time_limit: Option<Duration>,
    inventory: &[NodeView],
    excluded: &[String],
    reservation: &Reservation,
    now_unix_ms: i64,
) -> Result<Placement, BackfillRefusal> {
    let reserved = |v: &NodeView| {
        reservation.nodes.binary_search(&v.name).is_ok().then(|| format!("reserved for job {}", reservation.job_id))
    };
    if let Ok(placement) = place_setting_aside(spec, inventory, excluded, &reserved) {
        return Ok(placement);
    }
    let placement = place(spec, inventory, excluded)?;
    let why = match time_limit {
        None => "it has no time limit (neither its own time_limit nor its queue's max_run_time)".to_string(),
        Some(limit) if now_unix_ms.saturating_add(limit.as_millis() as i64) > reservation.start_unix_ms => {
            format!("its time_limit {} would run past the reservation's start", humantime::format_duration(limit))
        }
        Some(_) => return Ok(placement),
    };
    Err(BackfillRefusal::WouldDelay { job_id: reservation.job_id.clone(), why })
}

/// Sorted node names for a reason: "n1,n2,n3", or "n01..n64 (64 nodes)" past four.
pub fn node_range(nodes: &[String]) -> String {
    match nodes {
        [first, .., last] if nodes.len() > 4 => format!("{first}..{last} ({} nodes)", nodes.len()),
        _ => nodes.join(","),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use proptest::prelude::*;

    use super::*;
    use crate::planner::test_support::{command_job as spec, node};

    fn gang(node: &str, gpus: &[u32], ends: Option<i64>) -> RunningGang {
        RunningGang { gpus: vec![(node.into(), gpus.to_vec())], ends_unix_ms: ends }
    }

    const MIN: i64 = 60_000;

    #[test]
    fn a_short_job_backfills_past_a_blocked_head_and_a_long_one_waits() {
        // n3 is busy for 10 more minutes: the 3-node head starts on n1-n3 then.
        let inventory = [node("n1", &[0], 1), node("n2", &[0], 1), node("n3", &[], 1)];
        let running = [gang("n3", &[0], Some(10 * MIN))];
        let head = reserve("head-1", &spec(3, 1), &inventory, &running, 0).unwrap();
        assert_eq!(head.nodes, ["n1", "n2", "n3"]);
        assert_eq!(head.start_unix_ms, 10 * MIN);
        let short = backfill(&spec(1, 1), Some(Duration::from_secs(300)), &inventory, &[], &head, 0).unwrap();
        assert_eq!(short.nodes.len(), 1);
        let long = backfill(&spec(1, 1), Some(Duration::from_secs(3600)), &inventory, &[], &head, 0).unwrap_err();
        assert!(long.to_string().contains("reserved for job head-1, and its time_limit 1h would run past"), "{long}");
        let unbounded = backfill(&spec(1, 1), None, &inventory, &[], &head, 0).unwrap_err();
        assert!(unbounded.to_string().contains("no time limit"), "{unbounded}");
    }

    #[test]
    fn a_job_off_the_reserved_nodes_starts_whatever_its_time_limit() {
        let inventory = [node("n1", &[0], 1), node("n2", &[], 1), node("n3", &[0], 1)];
        let running = [gang("n2", &[0], Some(5 * MIN))];
        let head = reserve("head-1", &spec(2, 1), &inventory, &running, 0);
        // n1 and n3 are free: the head fits now and needs no reservation of the future.
        assert_eq!(head.unwrap().start_unix_ms, 0);
        let head = reserve("head-1", &spec(3, 1), &inventory, &running, 0).unwrap();
        assert_eq!(head.start_unix_ms, 5 * MIN);
        assert!(backfill(&spec(1, 1), None, &inventory, &[], &head, 0).is_err(), "every node is reserved");
    }

    #[test]
    fn gangs_without_a_time_limit_give_no_reservation() {
        let inventory = [node("n1", &[0], 1), node("n2", &[], 1)];
        let running = [gang("n2", &[0], None)];
        assert_eq!(reserve("head-1", &spec(2, 1), &inventory, &running, 0), None);
    }

    /// A random cluster of 1-5 nodes of 1-4 GPUs, and gangs of one node each on some of its GPUs.
    fn random_state() -> impl Strategy<Value = (Vec<NodeView>, Vec<RunningGang>)> {
        prop::collection::vec((1u32..=4, 0u32..=4, prop::option::weighted(0.85, 1i64..100)), 1..=5).prop_map(|nodes| {
            let mut views = Vec::new();
            let mut gangs = Vec::new();
            for (i, (total, busy, ends)) in nodes.into_iter().enumerate() {
                let name = format!("n{i}");
                let busy = busy.min(total);
                views.push(node(&name, &(busy..total).collect::<Vec<_>>(), total));
                if busy > 0 {
                    gangs.push(gang(&name, &(0..busy).collect::<Vec<_>>(), ends.map(|e| e * MIN)));
                }
            }
            (views, gangs)
        })
    }

    proptest! {
        /// Whatever starts behind a reservation never moves its start later, and
        /// gets all of its nodes and GPUs from the free ones or nothing.
        #[test]
        fn a_backfilled_job_never_delays_the_reservation(
            (inventory, running) in random_state(),
            head in (1u32..=5, 1u32..=4),
            job in (1u32..=3, 1u32..=4),
            limit_min in prop::option::weighted(0.8, 1u64..120),
            now_min in 0i64..10,
        ) {
            let now = now_min * MIN;
            let head_spec = spec(head.0, head.1);
            let Some(reservation) = reserve("head", &head_spec, &inventory, &running, now) else {
                return Ok(());
            };
            let limit = limit_min.map(|m| Duration::from_secs(m * 60));
            let job_spec = spec(job.0, job.1);
            let Ok(placement) = backfill(&job_spec, limit, &inventory, &[], &reservation, now) else {
                return Ok(());
            };
            prop_assert_eq!(placement.nodes.len() as u32, job.0);
            for (name, gpus) in &placement.nodes {
                prop_assert_eq!(gpus.len() as u32, job.1);
                let view = inventory.iter().find(|v| &v.name == name).unwrap();
                prop_assert!(gpus.iter().all(|g| view.free_gpus.contains(g)));
            }
            // The job now runs: take its GPUs and count its end.
            let mut after = inventory.clone();
            for (name, gpus) in &placement.nodes {
                let view = after.iter_mut().find(|v| &v.name == name).unwrap();
                view.free_gpus.retain(|g| !gpus.contains(g));
            }
            let mut running = running.clone();
            running.push(RunningGang {
                gpus: placement.nodes.clone(),
                ends_unix_ms: limit.map(|l| now + l.as_millis() as i64),
            });
            let again = reserve("head", &head_spec, &after, &running, now);
            prop_assert!(again.as_ref().is_some_and(|r| r.start_unix_ms <= reservation.start_unix_ms),
                "reservation {:?} became {:?}", reservation, again);
        }
    }
}
