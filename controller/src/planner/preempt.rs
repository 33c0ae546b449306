//! Victim selection for preemption: which running gangs to stop so that a
//! pending job fits, in the shape it needs (whole nodes, GPUs per node, node
//! selector), and only on grounds that allow it:
//!
//! - **reclaim**: the pending job's queue is under its quota and the GPUs it
//!   lacks are lent to queues running beyond theirs; only their jobs beyond
//!   the quota may go (a victim's queue must still be over its quota before
//!   the victim is taken);
//! - **priority**: the pending job's priority is strictly higher than every victim's.
//!
//! Victims go lowest priority first, then most recently started (the least
//! work lost), and only as many as needed: once enough are chosen, each one
//! whose GPUs turn out not to be needed is given back. The same is done
//! taking the smallest gangs first (within a priority), and the choice that
//! stops fewer GPUs wins: a two-node job does not stop a 128-node gang that
//! started last where two one-node gangs would do (the scheduling simulator
//! lost a quarter of its utilisation to that, the big gang then waiting for
//! 128 free nodes). Nothing is chosen when even every allowed victim would
//! not free enough for the job.

use std::collections::{BTreeMap, HashMap};

use cohort_shared::spec::JobSpec;

use super::{NodeView, place};

/// A running gang that might be stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub job_id: String,
    pub queue: String,
    pub priority: i32,
    /// When its attempt started running (later: less work lost when it goes).
    pub started_unix_ms: i64,
    /// The GPUs it holds, per node.
    pub gpus: Vec<(String, Vec<u32>)>,
}

impl Candidate {
    fn gpu_count(&self) -> u32 {
        self.gpus.iter().map(|(_, g)| g.len() as u32).sum()
    }
}

/// Why a pending job may stop others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grounds {
    /// Its queue reclaims lent GPUs: only gangs of these queues, each of which
    /// holds this many GPUs beyond its quota.
    Reclaim { beyond_quota: BTreeMap<String, u32> },
    /// Its priority: only gangs of strictly lower priority.
    Priority { priority: i32 },
}

/// The fewest, lowest-priority, most recently started `candidates` whose GPUs,
/// once free, let `spec` be placed on `inventory` (nodes in `excluded`
/// avoided as [`place`] does); None when no allowed choice frees enough, or
/// when the job fits already.
pub fn choose_victims(
    spec: &JobSpec,
    inventory: &[NodeView],
    excluded: &[String],
    candidates: &[Candidate],
    grounds: &Grounds,
) -> Option<Vec<String>> {
    if place(spec, inventory, excluded).is_ok() {
        return None;
    }
    let allowed: Vec<&Candidate> = candidates.iter().filter(|c| allowed(c, grounds)).collect();
    let fits = |chosen: &[&Candidate]| place(spec, &freed(inventory, chosen), excluded).is_ok();
    let newest_first = |a: &&Candidate, b: &&Candidate| {
        a.priority.cmp(&b.priority).then(b.started_unix_ms.cmp(&a.started_unix_ms)).then(a.job_id.cmp(&b.job_id))
    };
    let mut newest = allowed.clone();
    newest.sort_by(newest_first);
    let mut smallest = allowed;
    smallest
        .sort_by(|a, b| a.priority.cmp(&b.priority).then(a.gpu_count().cmp(&b.gpu_count())).then(newest_first(a, b)));
    let gpus = |chosen: &[&Candidate]| chosen.iter().map(|c| c.gpu_count()).sum::<u32>();
    let by_newest = pick(newest, grounds, &fits)?;
    // Smallest first, each queue's budget is checked on what is chosen in the end: the many
    // small gangs tried on the way (fragments of nodes) would use it up.
    let unbudgeted = Grounds::Priority { priority: i32::MAX };
    let chosen = match pick(smallest, &unbudgeted, &fits) {
        Some(by_size) if gpus(&by_size) < gpus(&by_newest) && within_budget(&by_size, grounds) => by_size,
        _ => by_newest,
    };
    Some(chosen.into_iter().map(|c| c.job_id.clone()).collect())
}

/// The victims taken from `order` (the allowed candidates, the first to go
/// first): the shortest prefix that frees enough, less each one not needed
/// after all (the last taken given back first). Under reclaim, a queue back
/// within its quota lends nothing more.
fn pick<'a>(
    order: Vec<&'a Candidate>,
    grounds: &Grounds,
    fits: &dyn Fn(&[&Candidate]) -> bool,
) -> Option<Vec<&'a Candidate>> {
    let mut beyond = match grounds {
        Grounds::Reclaim { beyond_quota } => beyond_quota.clone(),
        Grounds::Priority { .. } => BTreeMap::new(),
    };
    let mut takeable: Vec<&Candidate> = Vec::new();
    for candidate in order {
        if let Grounds::Reclaim { .. } = grounds {
            let left = beyond.entry(candidate.queue.clone()).or_default();
            if *left == 0 {
                continue;
            }
            *left = left.saturating_sub(candidate.gpu_count());
        }
        takeable.push(candidate);
    }
    if !fits(&takeable) {
        return None;
    }
    // More free GPUs never make a job fit less: the shortest prefix that fits is found by bisection.
    let (mut fails, mut fit) = (0, takeable.len());
    while fit - fails > 1 {
        let mid = (fails + fit) / 2;
        if fits(&takeable[..mid]) {
            fit = mid;
        } else {
            fails = mid;
        }
    }
    let mut chosen: Vec<&Candidate> = takeable[..fit].to_vec();
    for i in (0..chosen.len()).rev() {
        let mut without = chosen.clone();
        without.remove(i);
        if fits(&without) {
            chosen = without;
        }
    }
    Some(chosen)
}

/// Under reclaim, each queue of `chosen` is still beyond its quota before its
/// last victim (its largest) is taken.
fn within_budget(chosen: &[&Candidate], grounds: &Grounds) -> bool {
    let Grounds::Reclaim { beyond_quota } = grounds else { return true };
    beyond_quota.iter().all(|(queue, beyond)| {
        let taken: Vec<u32> = chosen.iter().filter(|c| &c.queue == queue).map(|c| c.gpu_count()).collect();
        let largest = taken.iter().copied().max().unwrap_or(0);
        taken.iter().sum::<u32>() - largest < *beyond
    }) && chosen.iter().all(|c| beyond_quota.contains_key(&c.queue))
}

fn allowed(candidate: &Candidate, grounds: &Grounds) -> bool {
    match grounds {
        Grounds::Reclaim { beyond_quota } => beyond_quota.get(&candidate.queue).is_some_and(|n| *n > 0),
        Grounds::Priority { priority } => candidate.priority < *priority,
    }
}

/// `inventory` with the GPUs of `gangs` free.
fn freed(inventory: &[NodeView], gangs: &[&Candidate]) -> Vec<NodeView> {
    let index: HashMap<&str, usize> = inventory.iter().enumerate().map(|(i, v)| (v.name.as_str(), i)).collect();
    let mut views = inventory.to_vec();
    for gang in gangs {
        for (node, gpus) in &gang.gpus {
            let Some(view) = index.get(node.as_str()).map(|i| &mut views[*i]) else { continue };
            for gpu in gpus {
                if !view.free_gpus.contains(gpu) {
                    view.free_gpus.push(*gpu);
                }
            }
            view.free_gpus.sort_unstable();
        }
    }
    views
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use proptest::prelude::*;

    use super::*;
    use crate::planner::test_support::{command_job as spec, node};

    fn gang(id: &str, queue: &str, priority: i32, started: i64, gpus: &[(&str, &[u32])]) -> Candidate {
        Candidate {
            job_id: id.into(),
            queue: queue.into(),
            priority,
            started_unix_ms: started,
            gpus: gpus.iter().map(|(n, g)| (n.to_string(), g.to_vec())).collect(),
        }
    }

    fn reclaim(queues: &[(&str, u32)]) -> Grounds {
        Grounds::Reclaim { beyond_quota: queues.iter().map(|(q, n)| (q.to_string(), *n)).collect() }
    }

    #[test]
    fn the_lowest_priority_then_newest_gang_goes_first() {
        let inventory = [node("n1", &[], 1), node("n2", &[], 1), node("n3", &[], 1)];
        let gangs = [
            gang("old-low", "b", 0, 100, &[("n1", &[0])]),
            gang("new-low", "b", 0, 200, &[("n2", &[0])]),
            gang("new-high", "b", 5, 300, &[("n3", &[0])]),
        ];
        let victims = choose_victims(&spec(1, 1), &inventory, &[], &gangs, &Grounds::Priority { priority: 10 });
        assert_eq!(victims.unwrap(), ["new-low"]);
        let victims = choose_victims(&spec(2, 1), &inventory, &[], &gangs, &Grounds::Priority { priority: 10 });
        assert_eq!(victims.unwrap(), ["new-low", "old-low"]);
        // Priority 5 may not stop the priority-5 gang: 3 nodes cannot be freed.
        assert_eq!(choose_victims(&spec(3, 1), &inventory, &[], &gangs, &Grounds::Priority { priority: 5 }), None);
    }

    #[test]
    fn a_gang_whose_gpus_are_not_in_the_needed_shape_is_given_back() {
        // The job needs a whole 2-GPU node: stopping the 1-GPU gang on n1 alone never helps.
        let inventory = [node("n1", &[1], 2), node("n2", &[], 2)];
        let gangs = [gang("small", "b", 0, 300, &[("n1", &[0])]), gang("big", "b", 0, 100, &[("n2", &[0, 1])])];
        let victims = choose_victims(&spec(1, 2), &inventory, &[], &gangs, &Grounds::Priority { priority: 1 });
        // "small" (newest) is tried first and frees n1 whole: enough on its own.
        assert_eq!(victims.unwrap(), ["small"]);
        let victims = choose_victims(&spec(2, 2), &inventory, &[], &gangs, &Grounds::Priority { priority: 1 });
        assert_eq!(victims.unwrap(), ["small", "big"]);
        let inventory = [node("n1", &[], 2), node("n2", &[], 2)];
        let gangs = [
            gang("half", "b", 0, 300, &[("n1", &[0])]),
            gang("other-half", "c", 1, 300, &[("n1", &[1])]),
            gang("whole", "b", 0, 100, &[("n2", &[0, 1])]),
        ];
        let victims = choose_victims(&spec(1, 2), &inventory, &[], &gangs, &Grounds::Priority { priority: 1 });
        // Stopping "half" frees 1 GPU of n1, not a whole node; "whole" does, and "half" is given back.
        assert_eq!(victims.unwrap(), ["whole"]);
    }

    #[test]
    fn one_small_gang_that_frees_enough_goes_instead_of_a_bigger_newer_one() {
        // A 1-node job; the newest gang holds 3 nodes, an older one holds one.
        let inventory = [node("n1", &[], 1), node("n2", &[], 1), node("n3", &[], 1), node("n4", &[], 1)];
        let gangs = [
            gang("old-small", "b", 0, 100, &[("n1", &[0])]),
            gang("new-big", "b", 0, 200, &[("n2", &[0]), ("n3", &[0]), ("n4", &[0])]),
        ];
        let victims = choose_victims(&spec(1, 1), &inventory, &[], &gangs, &Grounds::Priority { priority: 1 });
        assert_eq!(victims.unwrap(), ["old-small"]);
        // Not at a higher priority than the gang it would spare.
        let gangs = [gangs[0].clone(), Candidate { priority: -1, ..gangs[1].clone() }];
        let victims = choose_victims(&spec(1, 1), &inventory, &[], &gangs, &Grounds::Priority { priority: 1 });
        assert_eq!(victims.unwrap(), ["new-big"]);
        // Two nodes: the big gang is the only single one that frees enough, and it is chosen.
        let victims = choose_victims(&spec(2, 1), &inventory, &[], &gangs, &Grounds::Priority { priority: 1 });
        assert_eq!(victims.unwrap(), ["new-big"]);
    }

    #[test]
    fn reclaim_takes_only_gangs_beyond_their_queues_quota() {
        let inventory = [node("n1", &[], 1), node("n2", &[], 1), node("n3", &[], 1)];
        let gangs = [
            gang("b1", "b", 0, 100, &[("n1", &[0])]),
            gang("b2", "b", 0, 200, &[("n2", &[0])]),
            gang("c1", "c", 0, 300, &[("n3", &[0])]),
        ];
        // Queue b holds 1 GPU beyond its quota: one of its gangs may go, the newest.
        let victims = choose_victims(&spec(1, 1), &inventory, &[], &gangs, &reclaim(&[("b", 1)]));
        assert_eq!(victims.unwrap(), ["b2"]);
        assert_eq!(choose_victims(&spec(2, 1), &inventory, &[], &gangs, &reclaim(&[("b", 1)])), None);
        let victims = choose_victims(&spec(2, 1), &inventory, &[], &gangs, &reclaim(&[("b", 1), ("c", 1)]));
        let mut victims = victims.unwrap();
        victims.sort();
        assert_eq!(victims, ["b2", "c1"]);
    }

    #[test]
    fn nothing_is_stopped_for_a_job_that_fits_already() {
        let inventory = [node("n1", &[0], 1), node("n2", &[], 1)];
        let gangs = [gang("b1", "b", 0, 100, &[("n2", &[0])])];
        assert_eq!(choose_victims(&spec(1, 1), &inventory, &[], &gangs, &Grounds::Priority { priority: 9 }), None);
    }

    /// 1-5 nodes of 1-4 GPUs, each GPU busy with its own gang of random priority,
    /// start and queue, or idle.
    fn random_state() -> impl Strategy<Value = (Vec<NodeView>, Vec<Candidate>)> {
        let gpu = prop::option::weighted(0.8, (0i32..4, 0i64..100, 0usize..2));
        prop::collection::vec((1u32..=4, prop::collection::vec(gpu, 4)), 1..=5).prop_map(|nodes| {
            let mut views = Vec::new();
            let mut gangs = Vec::new();
            for (i, (total, gpus)) in nodes.into_iter().enumerate() {
                let name = format!("n{i}");
                let mut free = Vec::new();
                for (g, busy) in gpus.into_iter().take(total as usize).enumerate() {
                    match busy {
                        Some((priority, started, queue)) => gangs.push(Candidate {
                            job_id: format!("j{i}-{g}"),
                            queue: ["b", "c"][queue].to_string(),
                            priority,
                            started_unix_ms: started,
                            gpus: vec![(name.clone(), vec![g as u32])],
                        }),
                        None => free.push(g as u32),
                    }
                }
                views.push(node(&name, &free, total));
            }
            (views, gangs)
        })
    }

    proptest! {
        /// Victims always free enough for the job; a priority preemption never
        /// takes a gang of equal or higher priority; one that gives up could
        /// not have freed enough with every allowed gang.
        #[test]
        fn victims_free_enough_and_are_allowed(
            (inventory, gangs) in random_state(),
            job in (1u32..=3, 1u32..=4),
            priority in 0i32..5,
        ) {
            let job = spec(job.0, job.1);
            let grounds = Grounds::Priority { priority };
            let allowed: Vec<&Candidate> = gangs.iter().filter(|g| g.priority < priority).collect();
            match choose_victims(&job, &inventory, &[], &gangs, &grounds) {
                Some(victims) => {
                    prop_assert!(!victims.is_empty());
                    let taken: Vec<&Candidate> = gangs.iter().filter(|g| victims.contains(&g.job_id)).collect();
                    prop_assert!(taken.iter().all(|g| g.priority < priority));
                    prop_assert!(place(&job, &freed(&inventory, &taken), &[]).is_ok());
                    // Minimal: no single victim could be spared.
                    for i in 0..taken.len() {
                        let mut fewer = taken.clone();
                        fewer.remove(i);
                        prop_assert!(place(&job, &freed(&inventory, &fewer), &[]).is_err());
                    }
                }
                None => prop_assert!(
                    place(&job, &inventory, &[]).is_ok() || place(&job, &freed(&inventory, &allowed), &[]).is_err()
                ),
            }
        }

        /// Reclaim never takes more of a queue than it holds beyond its quota,
        /// counted in whole gangs: each victim's queue was still beyond its quota when it was taken.
        #[test]
        fn reclaim_stays_within_what_each_queue_borrowed(
            (inventory, gangs) in random_state(),
            job in (1u32..=3, 1u32..=4),
            beyond in (0u32..4, 0u32..4),
        ) {
            let job = spec(job.0, job.1);
            let grounds = reclaim(&[("b", beyond.0), ("c", beyond.1)]);
            if let Some(victims) = choose_victims(&job, &inventory, &[], &gangs, &grounds) {
                let taken: Vec<&Candidate> = gangs.iter().filter(|g| victims.contains(&g.job_id)).collect();
                prop_assert!(place(&job, &freed(&inventory, &taken), &[]).is_ok());
                for (queue, limit) in [("b", beyond.0), ("c", beyond.1)] {
                    // Every gang here holds one GPU.
                    let from = taken.iter().filter(|g| g.queue == queue).count() as u32;
                    prop_assert!(from <= limit, "{} victims of queue {} beyond its quota by {}", from, queue, limit);
                }
            }
        }

        /// With one-GPU gangs on one-GPU nodes the count is the minimum: the nodes the job lacks.
        #[test]
        fn one_gpu_nodes_lose_exactly_the_nodes_missing(
            busy in prop::collection::vec(prop::option::of(0i64..100), 1..=8),
            want in 1u32..=8,
        ) {
            let inventory: Vec<NodeView> = busy.iter().enumerate()
                .map(|(i, b)| node(&format!("n{i}"), if b.is_some() { &[][..] } else { &[0][..] }, 1)).collect();
            let gangs: Vec<Candidate> = busy.iter().enumerate()
                .filter_map(|(i, b)| b.map(|s| gang(&format!("j{i}"), "b", 0, s, &[(format!("n{i}").as_str(), &[0][..])])))
                .collect();
            let free = busy.iter().filter(|b| b.is_none()).count() as u32;
            let victims = choose_victims(&spec(want, 1), &inventory, &[], &gangs, &Grounds::Priority { priority: 1 });
            if want <= free || want as usize > busy.len() {
                prop_assert_eq!(victims, None);
            } else {
                let victims = victims.unwrap();
                prop_assert_eq!(victims.len() as u32, want - free);
                // The most recently started go.
                let newest_kept = gangs.iter().filter(|g| !victims.contains(&g.job_id)).map(|g| g.started_unix_ms).max();
                let oldest_taken = gangs.iter().filter(|g| victims.contains(&g.job_id)).map(|g| g.started_unix_ms).min();
                prop_assert!(newest_kept.unwrap_or(i64::MIN) <= oldest_taken.unwrap_or(i64::MAX));
            }
        }
    }
}
