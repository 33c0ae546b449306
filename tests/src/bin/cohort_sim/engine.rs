//! A discrete-event replay of a trace through the controller's own scheduling
//! decisions: the real queue file parser, fair share, placement, EASY
//! reservation and backfill (`cohort_controller::{queues, planner}`), called
//! in the order the reconcile pass `schedule` calls them
//! (controller/src/controller/reconcile.rs: `pending_order`, the quota and
//! borrowing passes, `place_pending`), once per event (an arrival or an end)
//! instead of every 250 ms. Jobs end at their run time; no preparation time,
//! no faults, no label quotas.
//!
//! Preemption (with [`Sim::preempting`]): the head of the order that does not
//! fit and whose queue reclaims, within its quota, stops the gangs
//! `planner::choose_victims` picks among queues beyond theirs, as
//! `try_preempt` does, and (with `preempt_for_fair_share` in the queue file)
//! the first borrower of each queue that does not fit may stop gangs of
//! queues that used more than their weight's share (decayed use), on the
//! grounds `Queues::fair_share_victims` gives; the victims free their GPUs at once (no save or stop
//! time) and are queued again with the work not saved still to do:
//! none with save-first ([`Saving::OnSignal`]), the time since their last
//! periodic checkpoint otherwise ([`Saving::Periodic`]).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::time::Duration;

use anyhow::{Context, bail};
use cohort_controller::planner::{self, Candidate, Grounds, NodeView, Placement, Reservation, RunningGang};
use cohort_controller::queues::{FairShare, OrderKey, Queue, Queues, Scheduler};
use cohort_shared::spec::JobSpec;

use crate::trace::TraceJob;

/// What became of one job.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub start_ms: Option<i64>,
    /// Started in the borrowing pass, beyond its queue's quota.
    pub borrowed: bool,
    /// Started while an earlier job of the order held a reservation.
    pub backfilled: bool,
    /// Could not fit even on an idle cluster.
    pub never_fits: bool,
    /// Each time it ran: (start, end) in ms; the last one's end is where it was
    /// due to end when the replay stopped.
    pub runs: Vec<(i64, i64)>,
    /// The work (ms) each of its preemptions lost.
    pub lost_ms: Vec<i64>,
    /// How many of its preemptions were for another queue's fair share (the rest reclaimed quota).
    pub for_fair_share: u32,
}

/// How a preempted job saves (what the simulation charges it).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Saving {
    /// It saves on the signal: nothing lost.
    OnSignal,
    /// Only its checkpoints every this many ms of run time count: the rest of the interval is lost.
    Periodic { interval_ms: i64 },
}

/// Broken promises the simulation watched for (each must stay 0).
#[derive(Debug, Clone, Default)]
pub struct Checks {
    /// A placement handed out a GPU that was not free.
    pub overcommits: u64,
    /// A queue above its quota after a start that was not borrowing (fifo,
    /// which has no quotas, makes these).
    pub quota_breaches: u64,
    /// A backfilled start that moved the reservation it ran behind later (checked with `check`).
    pub reservations_delayed: u64,
}

pub struct Run {
    pub outcomes: Vec<Outcome>,
    pub checks: Checks,
    /// When the last event happened.
    pub end_ms: i64,
    /// The replay preempted (or could have: none may have been needed).
    pub preempting: bool,
}

struct Gang {
    gpus: Vec<(String, Vec<u32>)>,
    ends_ms: Option<i64>,
    started_ms: i64,
}

pub struct Sim<'a> {
    trace: &'a [TraceJob],
    queues: Queues,
    policy: Scheduler,
    /// Check after every backfilled start that the reservation did not move (slow).
    check: bool,
    views: Vec<NodeView>,
    index: HashMap<String, usize>,
    specs: HashMap<(u32, u32), JobSpec>,
    pending: Vec<usize>,
    /// By job: in a fixed order, so that a replay is the same every time (fair
    /// share sums floats, and reservations break ties by the order of the gangs).
    running: BTreeMap<usize, Gang>,
    fair: FairShare,
    out: Vec<Outcome>,
    checks: Checks,
    /// Nodes with at least g free GPUs, by g; None after a change.
    free_nodes: Option<Vec<u32>>,
    /// How preempted jobs save; None: no preemption.
    saving: Option<Saving>,
    /// By job: the work left (ms), and the run its end event belongs to (an
    /// end queued before a preemption is stale).
    left_ms: Vec<i64>,
    run_no: Vec<u32>,
}

fn ms(seconds: f64) -> i64 {
    (seconds * 1000.0).round() as i64
}

impl<'a> Sim<'a> {
    pub fn new(
        trace: &'a [TraceJob],
        queues: Queues,
        policy: Scheduler,
        nodes: u32,
        gpus_per_node: u32,
        check: bool,
    ) -> anyhow::Result<Self> {
        let views: Vec<NodeView> = (0..nodes)
            .map(|i| NodeView {
                name: format!("n{i:05}"),
                address: "10.0.0.1".into(),
                labels: HashMap::new(),
                free_gpus: (0..gpus_per_node).collect(),
                total_gpus: gpus_per_node,
                unavailable: None,
                node_env: Vec::new(),
                islands: HashMap::new(),
            })
            .collect();
        let index = views.iter().enumerate().map(|(i, v)| (v.name.clone(), i)).collect();
        let mut specs = HashMap::new();
        for (i, job) in trace.iter().enumerate() {
            if queues.of(Some(&job.queue)).is_none() {
                bail!("trace job {i}: queue {:?} is not a queue of the simulated cluster", job.queue);
            }
            if let std::collections::hash_map::Entry::Vacant(slot) = specs.entry((job.nodes, job.gpus_per_node)) {
                let yaml = format!(
                    "name: sim\nkind: command\nnodes: {}\ngpus_per_node: {}\ncommand: [x]\n",
                    job.nodes, job.gpus_per_node
                );
                slot.insert(JobSpec::from_yaml(&yaml, "sim.yaml").with_context(|| format!("trace job {i}"))?);
            }
        }
        Ok(Sim {
            trace,
            queues,
            policy,
            check,
            views,
            index,
            specs,
            pending: Vec::new(),
            running: BTreeMap::new(),
            fair: FairShare::default(),
            out: vec![Outcome::default(); trace.len()],
            checks: Checks::default(),
            free_nodes: None,
            saving: None,
            left_ms: trace.iter().map(|j| ms(j.run_s)).collect(),
            run_no: vec![0; trace.len()],
        })
    }

    /// Queues that reclaim preempt borrowers, charged as `saving` says (the
    /// backfill scheduler only, as in the controller).
    pub fn preempting(mut self, saving: Saving) -> Self {
        self.saving = Some(saving);
        self
    }

    /// Replays the trace until every job started or `until_ms` passed.
    pub fn run(mut self, until_ms: i64) -> Run {
        let mut ends: BinaryHeap<Reverse<(i64, usize, u32)>> = BinaryHeap::new();
        let mut next = 0;
        let mut now = 0;
        loop {
            let arrival = self.trace.get(next).map(|j| ms(j.submit_s));
            let end = ends.peek().map(|Reverse((t, ..))| *t);
            let Some(t) = [arrival, end].into_iter().flatten().min() else { break };
            if t > until_ms {
                break;
            }
            now = t;
            while let Some(Reverse((_, job, run))) = ends.peek().copied().filter(|Reverse((e, ..))| *e == t) {
                ends.pop();
                if run == self.run_no[job] {
                    self.finish(job);
                }
            }
            while self.trace.get(next).is_some_and(|j| ms(j.submit_s) == t) {
                self.pending.push(next);
                next += 1;
            }
            // A pass that preempted is followed by another, as the controller's next pass places the head.
            loop {
                let (started, preempted) = self.schedule(t);
                for job in started {
                    ends.push(Reverse((t + self.left_ms[job], job, self.run_no[job])));
                }
                if !preempted {
                    break;
                }
            }
        }
        let preempting = self.saving.is_some() && self.policy == Scheduler::Backfill;
        Run { outcomes: self.out, checks: self.checks, end_ms: now, preempting }
    }

    fn finish(&mut self, job: usize) {
        self.left_ms[job] = 0;
        self.release(job);
    }

    fn release(&mut self, job: usize) {
        let Some(gang) = self.running.remove(&job) else { return };
        for (node, gpus) in gang.gpus {
            let view = &mut self.views[self.index[&node]];
            view.free_gpus.extend(gpus);
            view.free_gpus.sort_unstable();
        }
        self.free_nodes = None;
    }

    /// Whether `job` could fit on the free GPUs at all (a shortcut past
    /// `place` for the many that cannot; `place` decides the rest).
    fn may_fit(&mut self, job: usize) -> bool {
        let (nodes, g) = (self.trace[job].nodes, self.trace[job].gpus_per_node as usize);
        let views = &self.views;
        let free = self.free_nodes.get_or_insert_with(|| {
            let mut by = vec![0u32; 1 + views.iter().map(|v| v.total_gpus as usize).max().unwrap_or(0)];
            for v in views {
                for slot in by.iter_mut().take(v.free_gpus.len() + 1) {
                    *slot += 1;
                }
            }
            by
        });
        free.get(g).is_some_and(|n| *n >= nodes)
    }

    fn queue(&self, job: usize) -> &Queue {
        // Every job's queue was checked in `new`.
        self.queues.of(Some(&self.trace[job].queue)).unwrap_or(&self.queues.all()[0])
    }

    /// The pending jobs in the order `pending_order` (or `fifo_order`) gives.
    fn order(&mut self, now: i64) -> Vec<usize> {
        if self.policy == Scheduler::Fifo {
            return self.pending.clone();
        }
        let holding: Vec<(String, String, u32)> = self
            .running
            .keys()
            .map(|j| (self.trace[*j].user.clone(), self.trace[*j].queue.clone(), self.trace[*j].gpus()))
            .collect();
        self.fair.accrue(now, self.queues.half_life, holding);
        // The trace's jobs all have priority 0; submission order is the trace's.
        let mut order: Vec<(OrderKey, usize)> = self
            .pending
            .iter()
            .map(|j| {
                let key = OrderKey {
                    queue_rank: self.fair.queue_rank(self.queue(*j)),
                    priority: 0,
                    user_usage: self.fair.usage(&self.trace[*j].user),
                    seq: *j as u64,
                };
                (key, *j)
            })
            .collect();
        order.sort_by(|a, b| a.0.order(&b.0));
        order.into_iter().map(|(_, j)| j).collect()
    }

    /// One pass of `schedule`; returns the jobs it started, and whether it preempted.
    fn schedule(&mut self, now: i64) -> (Vec<usize>, bool) {
        let backfill = self.policy == Scheduler::Backfill;
        let order = self.order(now);
        let mut used: HashMap<String, u32> = HashMap::new();
        for job in self.running.keys() {
            *used.entry(self.trace[*job].queue.clone()).or_default() += self.trace[*job].gpus();
        }
        let mut reservation: Option<Reservation> = None;
        let mut borrowers = Vec::new();
        let mut started = Vec::new();
        let mut tried = std::collections::HashSet::new();
        for (borrowing, ids) in [(false, order), (true, Vec::new())] {
            let ids = if borrowing { std::mem::take(&mut borrowers) } else { ids };
            for job in ids {
                let queue = self.queue(job);
                let (gpus, name, quota, borrow) =
                    (self.trace[job].gpus(), queue.name.clone(), queue.gpu_quota, queue.borrow);
                let held = used.get(&name).copied().unwrap_or(0);
                if backfill && !borrowing && quota.is_some_and(|q| held + gpus > q) {
                    if borrow {
                        borrowers.push(job);
                    }
                    continue;
                }
                let behind = reservation.is_some();
                match self.place_pending(job, borrowing, now, &mut reservation) {
                    Ok(placement) => {
                        let backfilled = reservation.is_some();
                        self.start(job, &placement, now, borrowing, backfilled, reservation.as_ref());
                        *used.entry(name.clone()).or_default() += gpus;
                        if !borrowing && quota.is_some_and(|q| used[&name] > q) {
                            self.checks.quota_breaches += 1;
                        }
                        started.push(job);
                    }
                    Err(Wait::Never) => {
                        self.out[job].never_fits = true;
                        self.pending.retain(|j| *j != job);
                    }
                    Err(Wait::Blocked) if !borrowing => {
                        // The head of the order may make room by preemption; nothing behind it starts meanwhile.
                        if backfill && !behind && self.try_preempt(job, &used, now, false) {
                            return (started, true);
                        }
                        if reservation.is_none() {
                            return (started, false);
                        }
                    }
                    // The first borrower of each queue that does not fit may preempt for its fair share.
                    Err(Wait::Blocked) => {
                        if backfill && tried.insert(name.clone()) && self.try_preempt(job, &used, now, true) {
                            return (started, true);
                        }
                    }
                }
            }
        }
        (started, false)
    }

    /// `try_preempt` on reclaim grounds: when `job`'s queue reclaims and stays
    /// within its quota with it, and other queues hold GPUs beyond theirs, the
    /// gangs `choose_victims` picks among those are stopped and queued again.
    /// For a `borrower`, on fair-share grounds (`preempt_for_fair_share`):
    /// among the GPUs lent to queues that used more than their weight's share.
    fn try_preempt(&mut self, job: usize, used: &HashMap<String, u32>, now: i64, borrower: bool) -> bool {
        let Some(saving) = self.saving else { return false };
        let held = |name: &str| used.get(name).copied().unwrap_or(0);
        let queue = self.queue(job);
        let grounds = if borrower {
            self.queues.fair_share_victims(queue, held, &self.fair)
        } else {
            self.queues.reclaimable(queue, self.trace[job].gpus(), held)
        };
        let Some(beyond_quota) = grounds else { return false };
        let candidates: Vec<Candidate> = self
            .running
            .iter()
            .filter(|(_, g)| self.queues.preemptible(g.started_ms, now))
            .map(|(j, g)| Candidate {
                job_id: j.to_string(),
                queue: self.trace[*j].queue.clone(),
                priority: 0,
                started_unix_ms: g.started_ms,
                gpus: g.gpus.clone(),
            })
            .collect();
        let t = &self.trace[job];
        let spec = &self.specs[&(t.nodes, t.gpus_per_node)];
        let grounds = Grounds::Reclaim { beyond_quota };
        let Some(victims) = planner::choose_victims(spec, &self.views, &[], &candidates, &grounds) else {
            return false;
        };
        for victim in victims.iter().filter_map(|v| v.parse::<usize>().ok()) {
            self.preempt(victim, saving, now);
            self.out[victim].for_fair_share += u32::from(borrower);
        }
        !victims.is_empty()
    }

    /// Stops `job` at `now`: its GPUs freed, the work it saved taken off what it has left, queued again.
    fn preempt(&mut self, job: usize, saving: Saving, now: i64) {
        let Some(started) = self.running.get(&job).map(|g| g.started_ms) else { return };
        let done = now - started;
        let saved = match saving {
            Saving::OnSignal => done,
            Saving::Periodic { interval_ms } => done / interval_ms.max(1) * interval_ms.max(1),
        };
        self.left_ms[job] -= saved;
        let out = &mut self.out[job];
        out.lost_ms.push(done - saved);
        if let Some(run) = out.runs.last_mut() {
            run.1 = now;
        }
        self.run_no[job] += 1;
        self.release(job);
        self.pending.push(job);
        self.pending.sort_unstable();
    }

    /// `place_pending`: behind a reservation only where it cannot delay it;
    /// the first job that does not fit takes the reservation (backfill; not a
    /// borrower), or holds up every job behind it (fifo).
    fn place_pending(
        &mut self,
        job: usize,
        borrowing: bool,
        now: i64,
        reservation: &mut Option<Reservation>,
    ) -> Result<Placement, Wait> {
        let trace = self.trace;
        let t = &trace[job];
        let limit = self.queue(job).time_limit(Some(Duration::from_secs_f64(t.limit_s)));
        let fits = self.may_fit(job);
        let spec = &self.specs[&(t.nodes, t.gpus_per_node)];
        if let Some(r) = reservation {
            if !fits {
                return Err(Wait::Blocked);
            }
            return planner::backfill(spec, limit, &self.views, &[], r, now).map_err(|e| match e {
                planner::BackfillRefusal::DoesNotFit(e) if e.never_fits => Wait::Never,
                _ => Wait::Blocked,
            });
        }
        if fits {
            match planner::place(spec, &self.views, &[]) {
                Ok(placement) => return Ok(placement),
                Err(e) if e.never_fits => return Err(Wait::Never),
                Err(_) => {}
            }
        } else if t.nodes as usize > self.views.len() || t.gpus_per_node > self.views[0].total_gpus {
            return Err(Wait::Never);
        }
        // A borrower takes no reservation (see reconcile.rs `place_pending`).
        if borrowing || self.policy == Scheduler::Fifo {
            return Err(Wait::Blocked);
        }
        *reservation = planner::reserve(&job.to_string(), spec, &self.views, &self.gangs(), now);
        Err(Wait::Blocked)
    }

    /// `running_gangs`: each gang with the end its time limit gives it.
    fn gangs(&self) -> Vec<RunningGang> {
        self.running.values().map(|g| RunningGang { gpus: g.gpus.clone(), ends_unix_ms: g.ends_ms }).collect()
    }

    fn start(
        &mut self,
        job: usize,
        placement: &Placement,
        now: i64,
        borrowed: bool,
        backfilled: bool,
        behind: Option<&Reservation>,
    ) {
        for (node, gpus) in &placement.nodes {
            let view = &mut self.views[self.index[node]];
            if !gpus.iter().all(|g| view.free_gpus.contains(g)) {
                self.checks.overcommits += 1;
            }
            view.free_gpus.retain(|g| !gpus.contains(g));
        }
        self.free_nodes = None;
        let limit = self.queue(job).time_limit(Some(Duration::from_secs_f64(self.trace[job].limit_s)));
        let ends_ms = limit.map(|l| now + l.as_millis() as i64);
        self.running.insert(job, Gang { gpus: placement.nodes.clone(), ends_ms, started_ms: now });
        self.pending.retain(|j| *j != job);
        let out = &mut self.out[job];
        // A job queued again after a preemption keeps its first start (its wait).
        if out.start_ms.is_none() {
            (out.start_ms, out.borrowed, out.backfilled) = (Some(now), borrowed, backfilled);
        }
        out.runs.push((now, now + self.left_ms[job]));
        if let (true, Some(r)) = (self.check, behind) {
            self.check_reservation(r, now);
        }
    }

    /// The head's reservation, computed again after a backfilled start, starts no later.
    fn check_reservation(&mut self, r: &Reservation, now: i64) {
        let Ok(head) = r.job_id.parse::<usize>() else { return };
        let trace = self.trace;
        let t = &trace[head];
        let spec = &self.specs[&(t.nodes, t.gpus_per_node)];
        let again = planner::reserve(&r.job_id, spec, &self.views, &self.gangs(), now);
        if again.is_none_or(|a| a.start_unix_ms > r.start_unix_ms) {
            self.checks.reservations_delayed += 1;
        }
    }
}

/// Why a job did not start in a pass.
enum Wait {
    /// Not now.
    Blocked,
    /// Not on this cluster, ever.
    Never,
}
