//! The reconcile loop: silent nodes become lost, pending jobs are placed and
//! launched, and stops are re-sent until every unwanted process is gone.

use cohort_shared::failure::FailureCause;

use super::node_entry::{SWEEP_CREDIT_MAX, Sweep};
use super::queue_admin::{queue_name, queue_of, time_limit_of};
use super::*;
use crate::planner::{AttemptInputs, LaunchPlan};

impl Controller {
    // -------------------------------------------------------------- reconcile

    /// Follows the store's `jobs/` keys: a job written by anyone but this
    /// controller (an operator, a deposed leader racing it) is taken from the
    /// store, and after a compaction everything is re-read; then reconcile runs.
    pub async fn follow_store(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        use crate::store::WatchEvent;
        use futures::StreamExt;
        loop {
            let mut stream = match self.store.watch("jobs/", 0).await {
                Ok(stream) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch the store; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        _ = shutdown.changed() => return,
                    }
                }
            };
            // Whatever changed before the watch opened.
            self.resync_jobs().await;
            loop {
                let event = tokio::select! {
                    event = stream.next() => event,
                    _ = shutdown.changed() => return,
                };
                match event {
                    Some(WatchEvent::Put { key, value, revision }) => self.stored_job(&key, &value, revision).await,
                    Some(WatchEvent::Delete { key, .. }) => {
                        tracing::warn!(
                            key,
                            "a job was deleted from the store behind the controller's back; keeping it in memory"
                        );
                    }
                    Some(WatchEvent::Resync) => self.resync_jobs().await,
                    None => break,
                }
            }
        }
    }

    async fn resync_jobs(&self) {
        match self.store.list("jobs/").await {
            Ok(entries) => {
                for (key, v) in entries {
                    self.stored_job(&key, &v.value, v.revision).await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "re-listing jobs failed"),
        }
    }

    /// Takes a job record from the store when it is newer than the one held.
    pub(super) async fn stored_job(&self, key: &str, value: &[u8], revision: u64) {
        let (key, value) = (key.to_string(), value.to_vec());
        self.state.call(move |state, ctl| ctl.take_stored_job(state, &key, &value, revision)).await
    }

    /// [`Self::stored_job`] on the state. A job this controller does not
    /// hold joins the state as at a load: written after it loaded the store
    /// by a controller that lost the lead meanwhile (a submit it answered),
    /// or by hand; one it deleted itself lately stays deleted.
    fn take_stored_job(&self, state: &mut State, key: &str, value: &[u8], revision: u64) {
        let Some(id) = key.strip_prefix("jobs/") else { return };
        state.deleted_jobs.retain(|_, at| at.elapsed() < DELETED_MEMORY);
        let stale = match state.jobs.get(id) {
            Some(entry) => entry.revision.is_some_and(|r| r >= revision),
            None => state.deleted_jobs.contains_key(id),
        };
        if stale || self.writer.is_known(key, revision) {
            return; // our own write (made or on its way), older, or deleted
        }
        let record = match JobRecord::decode(value) {
            Ok(record) if record.job.is_some() => record,
            Ok(_) => return,
            Err(_) => {
                tracing::warn!(key, "undecodable job record in the store; ignoring it");
                return;
            }
        };
        if let Some(entry) = state.jobs.get_mut(id) {
            tracing::warn!(job = %id, revision, "the job was changed in the store by someone else; taking that version");
            entry.replace_record(record.job.unwrap_or_default(), revision);
        } else {
            match entry_from_record(record, revision) {
                Ok(entry) => {
                    tracing::warn!(job = %id, revision, "a job this controller did not hold is in the store; taking it");
                    state.insert_stored(entry);
                }
                Err(e) => {
                    tracing::error!(key, error = %e, "a stored job no longer parses; skipping it");
                    return;
                }
            }
        }
        self.writer.adopt(key, revision);
        self.wake.notify_one();
    }

    /// Runs the reconcile loop until `shutdown` fires.
    pub async fn run(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.wake.notified() => {}
                _ = shutdown.changed() => return,
            }
            if let Err(e) = self.reconcile().await {
                tracing::error!(error = %e, "reconcile failed; retrying on the next tick");
            }
            self.advance_pipelines().await;
        }
    }

    pub async fn reconcile(&self) -> Result<(), ControllerError> {
        let live = self.state.call(|state, ctl| ctl.converge(state)).await?;
        // What the log hub keeps of a finished attempt's output goes (the file
        // stays; a job that launched meanwhile is read back from it).
        self.logs.retain(|id| live.contains(id)).await;
        Ok(())
    }

    /// One reconcile pass on the state; returns the jobs whose output is still being written.
    fn converge(&self, state: &mut State) -> Result<HashSet<String>, ControllerError> {
        self.flush_old_held(state);
        self.expire_nodes(state);
        for id in self.check_progress(state) {
            self.persist_job(state, &id);
        }
        self.advance_checkpoint_waits(state);
        self.release_fences(state);
        self.advance_restarts(state)?;
        self.settle_dependencies(state);
        self.settle_arrays(state);
        self.schedule(state)?;
        self.store_fair_share(state);
        for id in self.resend_stops(state) {
            self.persist_job(state, &id);
        }
        // An attempt's span ends (and is exported) once the attempt is over.
        for entry in state.jobs.values_mut().filter(|e| e.is_terminal() && e.job.live_processes == 0) {
            entry.span = None;
        }
        let live = state.jobs.values().filter(|e| !e.is_terminal() || e.job.live_processes > 0);
        Ok(live.map(|e| e.job.id.clone()).collect())
    }

    pub(super) fn expire_nodes(&self, state: &mut State) {
        let now = Instant::now();
        let ttl = self.config.node_ttl;
        let mut lost = Vec::new();
        let suspect_after = self.config.heartbeat_interval * 3;
        let observed = self.observed_since_last_sweep(state, now);
        for node in state.nodes.values_mut() {
            if node.sweep(now, observed, suspect_after, ttl) == Sweep::Lost {
                lost.push(node.info.name.clone());
            }
        }
        for node in lost {
            let ids: Vec<String> = state
                .jobs
                .values()
                .filter(|e| {
                    e.job.processes.iter().any(|p| p.node_name == node && is_live(p))
                        || (e.phase() == JobPhase::Preparing && e.on_node(&node))
                })
                .map(|e| e.job.id.clone())
                .collect();
            for id in ids {
                let Some(entry) = state.jobs.get_mut(&id) else { continue };
                // The lost node's agent (or, with the agent dead, each rank's shim)
                // starts stopping its ranks at its fence deadline and needs up to the
                // job's stop grace to finish: no new attempt may start before then.
                entry.hold_for_fence(
                    &node,
                    now_unix_ms(),
                    ranks_fenced_by(state.nodes.get(&node), entry.spec.stop_grace),
                );
                let describe = |node_rank| {
                    format!(
                        "node {node} (node rank {node_rank}) lost: no heartbeat for {} (of this controller's observed time)",
                        humantime::format_duration(ttl)
                    )
                };
                let message = match self.fail_on_node(state, &id, &node, FailureCause::NodeLost, describe) {
                    Some(message) => message,
                    // Over already: its processes on the node are lost all the same.
                    None => describe(state.jobs.get_mut(&id).map(|e| e.mark_lost(&node)).unwrap_or(0)),
                };
                self.persist_job(state, &id);
                self.publish(state, &id, &message);
            }
        }
    }

    /// The time since the last sweep that counts against the nodes' silence:
    /// what this controller observed itself running on schedule. The sweep
    /// ticks every 250 ms; a later one means this controller was starved and
    /// could not read what the nodes sent, so a gap counts at most
    /// [`SWEEP_CREDIT_MAX`]. A gap over [`stall_limit`] means it did not run
    /// at all (SIGSTOP, a VM pause, CPU starvation): nothing counts, every
    /// node's silence starts again and each gets [`stall_grace`] to be heard.
    fn observed_since_last_sweep(&self, state: &mut State, now: Instant) -> Duration {
        let last = state.last_sweep.replace(now);
        let Some(gap) = last.map(|last| now.duration_since(last)) else { return Duration::ZERO };
        if gap <= stall_limit(&self.config) {
            return gap.min(SWEEP_CREDIT_MAX);
        }
        let grace = stall_grace(&self.config);
        tracing::warn!(
            gap = ?gap,
            grace = ?grace,
            "the liveness sweep ran late: this controller was paused or starved; no node is declared lost before it is heard or the grace is over"
        );
        for node in state.nodes.values_mut() {
            node.forgive_silence(now, grace);
        }
        Duration::ZERO
    }

    pub(super) fn node_views(state: &State) -> Vec<NodeView> {
        let mut used: HashMap<&str, HashSet<u32>> = HashMap::new();
        for entry in state.jobs.values().filter(|e| e.holds_resources()) {
            for a in entry.plan().map(|p| p.nodes.as_slice()).unwrap_or_default() {
                used.entry(a.node_name.as_str()).or_default().extend(&a.gpu_indices);
            }
        }
        state
            .nodes
            .values()
            .map(|n| {
                let taken = used.get(n.info.name.as_str());
                // Unhealthy GPUs are never granted.
                let free_gpus: Vec<u32> = n
                    .info
                    .gpus
                    .iter()
                    .map(|g| g.index)
                    .filter(|i| taken.is_none_or(|t| !t.contains(i)) && !n.unhealthy_gpus.contains_key(i))
                    .collect();
                // A launch the agent reports that no job of the controller holds (its record was
                // quarantined or lost) is being stopped: which GPUs it holds is not known.
                let stray = n.reported.iter().find(|l| {
                    l.processes.iter().any(|p| p.exited.is_none())
                        && state.jobs.get(&l.job_id).is_none_or(|e| e.job.attempt != l.attempt)
                });
                let unavailable = match (n.phase(), &n.session) {
                    _ if n.draining => Some("draining".to_string()),
                    _ if n.cordoned => Some("cordoned".to_string()),
                    _ if let Some(l) = stray => Some(format!(
                        "stopping the processes of job {} (attempt {}), which the controller does not hold; \
                         which GPUs they hold is not known",
                        l.job_id, l.attempt
                    )),
                    (NodePhase::Ready | NodePhase::Suspect, Some(_)) => None,
                    (NodePhase::Lost, _) => Some("lost".to_string()),
                    _ => Some("not connected".to_string()),
                };
                NodeView {
                    name: n.info.name.clone(),
                    address: n.info.advertise_addr.clone(),
                    labels: n.info.labels.clone(),
                    free_gpus,
                    total_gpus: n.info.gpus.len() as u32,
                    unavailable,
                    node_env: n.info.node_env.clone(),
                    islands: n.info.gpus.iter().map(|g| (g.index, g.nvlink_island)).collect(),
                }
            })
            .collect()
    }

    pub(super) fn used_ports(state: &State) -> HashSet<u16> {
        state
            .jobs
            .values()
            .filter(|e| e.holds_resources())
            .filter_map(|e| e.plan().map(|p| p.master_port as u16))
            .collect()
    }

    /// The next free MASTER_PORT ([`planner::next_master_port`]); None when every one is leased.
    pub(super) fn peek_port(state: &State, config: &ControllerConfig) -> Option<u16> {
        planner::next_master_port(&config.master_ports, state.next_port, &Self::used_ports(state))
    }

    /// Positive evidence instead of the clock: a lost node that registered
    /// again after it was declared lost, and runs none of a job's processes
    /// (its new agent reported what it runs, and anything of the job's it
    /// still ran has been stopped), no longer holds that job's next attempt
    /// until its fence deadline.
    fn release_fences(&self, state: &mut State) {
        if state.jobs.values().all(|e| e.fence_holds.is_empty()) {
            return;
        }
        // Connected nodes: when they last registered, and the jobs they still run a process of.
        let back: HashMap<String, (i64, HashSet<&str>)> = state
            .nodes
            .values()
            .filter(|n| n.is_connected())
            .map(|n| {
                let running = n
                    .reported
                    .iter()
                    .filter(|l| l.processes.iter().any(|p| p.exited.is_none()))
                    .map(|l| l.job_id.as_str())
                    .collect();
                (n.info.name.clone(), (n.last_registered_unix_ms, running))
            })
            .collect();
        let mut released = Vec::new();
        for entry in state.jobs.values_mut().filter(|e| !e.fence_holds.is_empty()) {
            let proven: Vec<String> = entry
                .fence_holds
                .iter()
                .filter(|h| {
                    back.get(&h.node).is_some_and(|(registered, running)| {
                        *registered > h.lost_unix_ms && !running.contains(entry.job.id.as_str())
                    })
                })
                .filter(|h| !entry.job.processes.iter().any(|p| p.node_name == h.node && is_live(p)))
                .map(|h| h.node.clone())
                .collect();
            for node in proven {
                let held_until = entry.job.not_before_unix_ms;
                if entry.release_fence(&node) {
                    tracing::info!(
                        job = %entry.job.id,
                        node = %node,
                        saved_ms = (held_until - entry.job.not_before_unix_ms).max(0),
                        "the lost node is back and runs none of the job's processes: its fence no longer holds the next attempt"
                    );
                    released.push(entry.job.id.clone());
                }
            }
        }
        released.dedup();
        for id in released {
            self.persist_job(state, &id);
        }
    }

    /// Places pending jobs: within a queue by priority, then fair share (the
    /// submitter's decayed GPU use), then submission order; jobs of queues
    /// under their GPU quota first, then those that borrow idle GPUs beyond it.
    /// The first job that does not fit gets a reservation of the nodes that
    /// free up first; a job behind it starts only where it cannot delay that
    /// (EASY backfill); borrowers take none. One that could never fit holds up nothing.
    pub(super) fn schedule(&self, state: &mut State) -> Result<(), ControllerError> {
        let now = now_unix_ms();
        let queues = state.queues.clone();
        let queues = &*queues;
        let backfill = self.config.scheduler == crate::queues::Scheduler::Backfill;
        let order = if backfill { Self::pending_order(state, queues, now) } else { Self::fifo_order(state) };
        let labels_of: HashMap<String, crate::queues::LabelMap> =
            state.nodes.values().map(|n| (n.info.name.clone(), n.info.labels.clone())).collect();
        let on_nodes = |nodes: &[(String, Vec<u32>)]| -> Vec<(&crate::queues::LabelMap, u32)> {
            nodes.iter().filter_map(|(n, g)| labels_of.get(n).map(|l| (l, g.len() as u32))).collect()
        };
        let (mut used, mut label_use) = Self::queue_use(state, queues, &on_nodes);
        let mut reservation: Option<planner::Reservation> = None;
        let mut borrowers: Vec<String> = Vec::new();
        // The queues one of whose borrowers tried to preempt in this pass.
        let mut tried: HashSet<String> = HashSet::new();
        // The nodes as they are, made again only after a launch.
        let mut inventory: Option<Vec<NodeView>> = None;
        for (borrowing, ids) in [(false, order), (true, Vec::new())] {
            let ids = if borrowing { std::mem::take(&mut borrowers) } else { ids };
            for id in ids {
                let all: &Vec<NodeView> = inventory.get_or_insert_with(|| Self::node_views(state));
                let Some(entry) = state.jobs.get(&id) else { continue };
                let wait_ms = entry.job.not_before_unix_ms - now;
                if wait_ms > 0 {
                    let reason = format!(
                        "waiting {:.0}s before the next attempt: the restart backoff, or the fence deadline of the nodes the last attempt lost, so that two attempts never overlap",
                        wait_ms as f64 / 1000.0
                    );
                    if let Some(entry) = state.jobs.get_mut(&id) {
                        entry.job.reason = reason;
                    }
                    continue;
                }
                // A victim does not take back the GPUs it gave up before the job it made room for starts.
                if let Some(by) = entry.last_preemption().map(|p| p.by_job.clone())
                    && state.jobs.get(&by).is_some_and(|e| e.phase() == JobPhase::Pending)
                {
                    self.set_reason(state, &id, format!("waiting for job {by}, which it made room for, to start"));
                    continue;
                }
                let Some(queue) = queue_of(queues, entry) else {
                    let reason = format!(
                        "queue {} is not declared any more (deleted, or gone from the controller's --queues); resubmit the job to a declared queue",
                        queue_name(queues, entry)
                    );
                    self.set_reason(state, &id, reason);
                    continue;
                };
                let gpus = entry.spec.nodes * entry.spec.gpus_per_node;
                let held = used.get(&queue.name).copied().unwrap_or(0);
                let over_quota = queue.gpu_quota.filter(|quota| backfill && held + gpus > *quota);
                if let (false, Some(quota)) = (borrowing, over_quota) {
                    let reason = format!("queue {} at quota {held}/{quota} GPUs (this job needs {gpus})", queue.name);
                    if queue.borrow {
                        borrowers.push(id.clone());
                    }
                    self.set_reason(state, &id, reason);
                    continue;
                }
                // Nodes under a label quota with no room left are not this job's (borrowers aside).
                // A job that does not fit once they are taken out waits on its quota, not as the head.
                let mut restricted = None;
                if backfill && !borrowing && !queue.label_quotas.is_empty() {
                    let mut views = all.clone();
                    let selected =
                        |v: &NodeView| entry.spec.node_selector.iter().all(|(k, x)| v.labels.get(k) == Some(x));
                    if let Some(why) = label_use.restrict(queue, entry.spec.gpus_per_node, &mut views)
                        && planner::place(&entry.spec, &views, &entry.job.excluded_nodes).is_err()
                        && views.iter().zip(all).any(|(r, a)| r.unavailable != a.unavailable && selected(a))
                    {
                        if queue.borrow {
                            borrowers.push(id.clone());
                        }
                        self.set_reason(state, &id, why);
                        continue;
                    }
                    restricted = Some(views);
                }
                let views: &[NodeView] = restricted.as_deref().unwrap_or(all);
                let limit = queue.time_limit(entry.spec.time_limit);
                let pending = Pending { queue, held, borrowing, views, limit, now };
                let behind = reservation.is_some();
                let placed = self.place_pending(state, &id, pending, &mut reservation);
                let placement = match placed {
                    Ok(placement) => placement,
                    Err(reason) => {
                        let never = reason.starts_with(cohort_proto::names::NEVER_FITS);
                        // The head of the order may make room by preemption (not under `--scheduler fifo`,
                        // the baseline); nothing behind it starts meanwhile.
                        // So may the first borrower of each queue that does not fit, for its fair share.
                        let may_preempt = if borrowing {
                            queues.preempt_for_fair_share && tried.insert(queue.name.clone())
                        } else {
                            !behind
                        };
                        if backfill
                            && !never
                            && may_preempt
                            && let Some(why) = self.try_preempt(state, &id, queue, views, borrowing)
                        {
                            self.set_reason(state, &id, why);
                            return Ok(());
                        }
                        let blocks = !never && !borrowing && reservation.is_none();
                        self.set_reason(state, &id, reason);
                        // A job no idle cluster could hold (admitted before nodes
                        // left) must not hold up the queue behind it.
                        if blocks {
                            return Ok(());
                        }
                        continue;
                    }
                };
                if !borrowing && let Some(why) = label_use.exceeded(queue, on_nodes(&placement.nodes)) {
                    if queue.borrow {
                        borrowers.push(id.clone());
                    }
                    self.set_reason(state, &id, why);
                    continue;
                }
                let Some(port) = Self::peek_port(state, &self.config) else {
                    tracing::warn!(job = %id, "every MASTER_PORT of the range is leased; waiting");
                    return Ok(());
                };
                state.next_port = port.saturating_add(1);
                *used.entry(queue.name.clone()).or_default() += gpus;
                label_use.add(queue, on_nodes(&placement.nodes));
                self.launch(state, &id, &placement, views, port)?;
                inventory = None;
            }
        }
        Ok(())
    }

    /// Pending jobs in the order they are placed: the queue furthest below
    /// its weighted fair share first, then priority, then the submitter's
    /// fair share (its decayed GPU use, accrued up to `now`), then submission order.
    fn pending_order(state: &mut State, queues: &crate::queues::Queues, now: i64) -> Vec<String> {
        let holding: Vec<(String, String, u32)> = state
            .jobs
            .values()
            .filter(|e| e.holds_resources())
            .map(|e| (submitter(e), queue_name(queues, e), gpus_held(e)))
            .collect();
        state.fair_share.accrue(now, queues.half_life, holding);
        let share = &state.fair_share;
        let held = arrays::held_back(state);
        let mut pending: Vec<(crate::queues::OrderKey, String)> = state
            .jobs
            .values()
            .filter(|e| e.phase() == JobPhase::Pending && !e.spec.is_pipeline() && !dependencies::waits(state, e))
            .filter(|e| !held.contains_key(&e.job.id))
            .map(|e| {
                let key = crate::queues::OrderKey {
                    queue_rank: queue_of(queues, e).map_or(0.0, |q| share.queue_rank(q)),
                    priority: e.job.priority,
                    user_usage: share.usage(&submitter(e)),
                    seq: e.seq,
                };
                (key, e.job.id.clone())
            })
            .collect();
        pending.sort_by(|a, b| a.0.order(&b.0));
        pending.into_iter().map(|(_, id)| id).collect()
    }

    /// The GPUs each queue's running jobs hold, in all and under its label quotas.
    fn queue_use<'a>(
        state: &State,
        queues: &crate::queues::Queues,
        on_nodes: &impl Fn(&[(String, Vec<u32>)]) -> Vec<(&'a crate::queues::LabelMap, u32)>,
    ) -> (HashMap<String, u32>, crate::queues::LabelUse) {
        let mut used: HashMap<String, u32> = HashMap::new();
        let mut label_use = crate::queues::LabelUse::default();
        for entry in state.jobs.values().filter(|e| e.holds_resources()) {
            let Some(queue) = queue_of(queues, entry) else { continue };
            *used.entry(queue.name.clone()).or_default() += gpus_held(entry);
            if let Some(plan) = entry.plan() {
                let nodes: Vec<(String, Vec<u32>)> =
                    plan.nodes.iter().map(|a| (a.node_name.clone(), a.gpu_indices.clone())).collect();
                label_use.add(queue, on_nodes(&nodes));
            }
        }
        (used, label_use)
    }

    /// Places one pending job now, or says why it waits: behind a reservation
    /// only where it cannot delay it (EASY backfill); the first job that does
    /// not fit (and does not borrow) takes the reservation of the nodes that
    /// free up first.
    fn place_pending(
        &self,
        state: &State,
        id: &str,
        job: Pending<'_>,
        reservation: &mut Option<planner::Reservation>,
    ) -> Result<planner::Placement, String> {
        let Pending { queue, held, borrowing, views, limit, now } = job;
        let Some(entry) = state.jobs.get(id) else { return Err("its job record is gone".into()) };
        if let Some(r) = reservation {
            return planner::backfill(&entry.spec, limit, views, &entry.job.excluded_nodes, r, now).map_err(
                |e| match e {
                    planner::BackfillRefusal::DoesNotFit(e) if e.never_fits => {
                        format!("{}: {e}", cohort_proto::names::NEVER_FITS)
                    }
                    e => format!(
                        "behind job {} (reserved nodes {} from {}): {e}",
                        r.job_id,
                        planner::node_range(&r.nodes),
                        clock(r.start_unix_ms)
                    ),
                },
            );
        }
        // Without the nodes blamed for earlier failures when the others suffice.
        planner::place(&entry.spec, views, &entry.job.excluded_nodes).map_err(|e| {
            if e.never_fits {
                return format!("{}: {e}", cohort_proto::names::NEVER_FITS);
            }
            if self.config.scheduler == crate::queues::Scheduler::Fifo {
                return format!("waiting for free GPUs: {e}; no job behind it starts (--scheduler fifo)");
            }
            if borrowing {
                // No reservation for a borrower: jobs within their quota come first in every pass
                // and would keep moving it later, idling what it holds (cohort-sim: -4 points of
                // utilisation overloaded, see docs/src/benchmarks.md).
                let quota = queue.gpu_quota.unwrap_or_default();
                return format!(
                    "queue {} at quota {held}/{quota} GPUs; waiting to borrow idle GPUs beyond it: {e}",
                    queue.name
                );
            }
            // The head of the order: the nodes that free up first are its.
            match planner::reserve(id, &entry.spec, views, &running_gangs(state, &state.queues, now), now) {
                Some(r) => {
                    let why = format!(
                        "waiting for free GPUs: {e}; reserved nodes {} from {}",
                        planner::node_range(&r.nodes),
                        clock(r.start_unix_ms)
                    );
                    *reservation = Some(r);
                    why
                }
                None => format!(
                    "waiting for free GPUs: {e}; no reservation (jobs holding the GPUs it needs have no time limit), so no job behind it starts"
                ),
            }
        })
    }

    /// Pending jobs in the order of `--scheduler fifo`: priority, then submission.
    fn fifo_order(state: &State) -> Vec<String> {
        let held = arrays::held_back(state);
        let mut pending: Vec<(i32, u64, String)> = state
            .jobs
            .values()
            .filter(|e| e.phase() == JobPhase::Pending && !e.spec.is_pipeline() && !dependencies::waits(state, e))
            .filter(|e| !held.contains_key(&e.job.id))
            .map(|e| (-e.job.priority, e.seq, e.job.id.clone()))
            .collect();
        pending.sort();
        pending.into_iter().map(|(.., id)| id).collect()
    }

    /// Sets a pending job's reason, published when it changed; a job queued
    /// again after a preemption says so until it starts.
    fn set_reason(&self, state: &mut State, id: &str, reason: String) {
        let preempted = state.jobs.get(id).and_then(|e| {
            e.last_preemption().map(|p| {
                let waited = if p.waited.is_empty() { String::new() } else { format!(" {}", p.waited) };
                format!("preempted by job {} ({}){waited}{}; ", p.by_job, p.grounds, super::restart::lost_note(Some(p)))
            })
        });
        let reason = format!("{}{reason}", preempted.unwrap_or_default());
        if let Some(entry) = state.jobs.get_mut(id)
            && entry.job.reason != reason
        {
            entry.job.reason = reason;
            self.publish(state, id, "pending");
        }
    }

    /// Starts a new attempt on a placement: renders the plan (with the resume
    /// flags when resuming), records the attempt, then either prepares every
    /// node (megatron-sft, staging, shared paths) or launches at once.
    pub(super) fn launch(
        &self,
        state: &mut State,
        id: &str,
        placement: &planner::Placement,
        views: &[NodeView],
        port: u16,
    ) -> Result<(), ControllerError> {
        let Some(entry) = state.jobs.get_mut(id) else { return Ok(()) };
        let next = entry.job.attempt + 1;
        let plan = planner::layout(
            &planner::attempt_spec(&entry.spec, entry.job.resume_from.as_ref()),
            placement,
            views,
            &RenderInput { job_id: id, attempt: next, master_port: port, workdir: entry.spec.workdir.as_deref() },
        );
        let nodes: Vec<String> = placement.nodes.iter().map(|(n, _)| n.clone()).collect();
        let attempt = entry.begin_attempt(plan, nodes.clone())?;
        entry.span = Some(tracing::info_span!(parent: None, "attempt", job = %id, attempt, nodes = %node_list(&nodes)));
        // A job that runs an ms-swift CLI (a pipeline step) is prepared too: the node's ms-swift checks its argv.
        let runs_swift = matches!(&entry.spec.workload, Workload::Command(c) if planner::swift_argcheck::from_argv(&c.argv).is_some());
        if entry.spec.needs_preparation() || runs_swift {
            entry.preparing(format!("preparing {}: preflight, shared paths, datasets, staging", node_list(&nodes)))?;
            self.persist_job(state, id);
            tracing::info!(job = %id, attempt, port, "preparing");
            self.send_prepare(state, id);
        } else {
            self.send_launch(state, id)?;
        }
        self.publish(state, id, "attempt started");
        Ok(())
    }

    /// Sends the attempt's launch commands (the plan is already laid out).
    pub(super) fn send_launch(&self, state: &mut State, id: &str) -> Result<(), ControllerError> {
        let Some(launch_plan) = Self::launch_plan(state, id, None) else { return Ok(()) };
        let Some(entry) = state.jobs.get_mut(id) else { return Ok(()) };
        let attempt = entry.job.attempt;
        let processes = launch_plan
            .nodes
            .iter()
            .flat_map(|n| {
                n.launch.processes.iter().map(|p| ProcessStatus {
                    node_name: n.node_name.clone(),
                    node_rank: n.launch.node_rank,
                    index: p.index,
                    global_rank: p.global_rank,
                    ..ProcessStatus::default()
                })
            })
            .collect();
        let nodes: Vec<&str> = launch_plan.nodes.iter().map(|n| n.node_name.as_str()).collect();
        entry.launching(processes, format!("launching on {}", node_list(&nodes)))?;
        let port = entry.plan().map(|p| p.master_port).unwrap_or_default();
        state.logs_complete.insert((id.to_string(), attempt));
        // Queued before sending, so it reaches the store ahead of what follows.
        // A controller that dies before it lands restarts without this attempt,
        // and `resend_stops` stops the ranks the agents report for it.
        self.persist_job(state, id);
        tracing::info!(job = %id, attempt, port, "launching");
        let mut unreachable = None;
        for node in launch_plan.nodes {
            if !Self::send_command(state, &node.node_name, Command::Launch(node.launch)) {
                unreachable = Some(node.node_name);
                break;
            }
        }
        if let Some(node) = unreachable {
            self.fail_on_node(state, id, &node, FailureCause::NodeLost, |_| {
                format!("node {node} dropped its stream while the job was launched")
            });
            self.persist_job(state, id);
        }
        self.publish(state, id, "launching");
        Ok(())
    }

    /// The current attempt's commands ([`planner::launch_plan`]) from its
    /// recorded layout, the nodes' own variables and what they staged; with a
    /// marker, the prepare commands too. None when the job has no laid-out attempt.
    pub(super) fn launch_plan(state: &State, id: &str, prepare_marker: Option<&str>) -> Option<LaunchPlan> {
        let entry = state.jobs.get(id)?;
        let layout = entry.plan()?;
        let node_env: HashMap<&str, &[cohort_proto::EnvVar]> = layout
            .nodes
            .iter()
            .filter_map(|a| state.nodes.get(&a.node_name).map(|n| (a.node_name.as_str(), n.info.node_env.as_slice())))
            .collect();
        let inputs = AttemptInputs {
            job_id: id,
            attempt: entry.job.attempt,
            resume_from: entry.job.resume_from.as_ref(),
            staged: &entry.job.staging,
            node_env: &node_env,
            prepare_marker,
            sync: entry.job.file.as_ref().and_then(|f| f.sync.as_ref()),
        };
        Some(planner::launch_plan(&entry.spec, layout, &inputs))
    }

    /// Sends one command to a node's session; false when the node has none.
    pub(super) fn send_command(state: &mut State, node: &str, command: Command) -> bool {
        let command_id = state.next_command_id;
        state.next_command_id += 1;
        let msg = ControllerMessage { command_id, command: Some(command) };
        state.nodes.get(node).and_then(|n| n.session.as_ref()).is_some_and(|(_, tx)| tx.send(Ok(msg)).is_ok())
    }

    /// Level-triggered teardown: every live process of a finished job, and
    /// every launch an agent reports that no job wants, gets a stop, again
    /// every `stop_resend` until it is gone.
    /// Returns the jobs it changed.
    pub(super) fn resend_stops(&self, state: &mut State) -> Vec<String> {
        let mut changed = Vec::new();
        let now = Instant::now();
        let resend = self.config.stop_resend;
        type Grace = (Duration, Option<(String, Duration)>);
        let mut wanted_stops: Vec<(String, String, u32, Grace)> = Vec::new();
        for entry in state.jobs.values().filter(|e| e.is_over() && e.job.live_processes > 0) {
            let nodes: HashSet<&str> =
                entry.job.processes.iter().filter(|p| is_live(p)).map(|p| p.node_name.as_str()).collect();
            for node in nodes {
                let grace = (entry.spec.stop_grace, entry.save_first());
                wanted_stops.push((node.into(), entry.job.id.clone(), entry.job.attempt, grace));
            }
        }
        for node in state.nodes.values().filter(|n| n.session.is_some()) {
            for launch in &node.reported {
                let wanted = state
                    .jobs
                    .get(&launch.job_id)
                    .is_some_and(|e| e.is_active() && e.job.attempt == launch.attempt && e.on_node(&node.info.name));
                if !wanted && launch.processes.iter().any(|p| p.exited.is_none()) {
                    let grace =
                        state.jobs.get(&launch.job_id).map(|e| e.spec.stop_grace).unwrap_or(Duration::from_secs(10));
                    wanted_stops.push((node.info.name.clone(), launch.job_id.clone(), launch.attempt, (grace, None)));
                }
            }
        }
        for (node, job, attempt, grace) in wanted_stops {
            let key = (node.clone(), job.clone(), attempt);
            let last_stop = state.stops_sent.get(&key).copied();
            if last_stop.is_some_and(|t| now.duration_since(t) < resend) {
                continue;
            }
            // Stopped a while ago and the agent's heartbeats no longer list the
            // launch: its exit was lost with a broken stream; the processes are gone.
            let reported = state.nodes.get(&node).is_some_and(|n| {
                n.reported
                    .iter()
                    .any(|l| l.job_id == job && l.attempt == attempt && l.processes.iter().any(|p| p.exited.is_none()))
            });
            if last_stop.is_some() && !reported {
                if let Some(entry) = state.jobs.get_mut(&job).filter(|e| e.is_over() && e.job.attempt == attempt) {
                    entry.mark_lost(&node);
                    tracing::warn!(node = %node, job = %job, "stopped launch no longer reported; marking its processes gone");
                    self.publish(state, &job, "processes gone");
                    changed.push(job.clone());
                }
                continue;
            }
            tracing::debug!(node = %node, job = %job, attempt, "sending stop");
            Self::send_stop(state, &node, &job, attempt, grace, "not wanted by the controller");
        }
        state.stops_sent.retain(|_, t| now.duration_since(*t) < resend * 10);
        changed
    }
}

/// Who submitted a job, for fair share.
fn submitter(entry: &JobEntry) -> String {
    entry.job.file.as_ref().map(|f| f.submitted_by.clone()).unwrap_or_default()
}

/// The GPUs a job's attempt holds.
fn gpus_held(entry: &JobEntry) -> u32 {
    entry.plan().map(|p| p.nodes.iter().map(|a| a.gpu_indices.len() as u32).sum()).unwrap_or(0)
}

/// Every gang that holds GPUs, with when its time limit (its own, or its
/// queue's max_run_time) ends it, counted from its placement.
fn running_gangs(state: &State, queues: &crate::queues::Queues, now: i64) -> Vec<planner::RunningGang> {
    state
        .jobs
        .values()
        .filter(|e| e.holds_resources())
        .filter_map(|e| {
            let plan = e.plan()?;
            let limit = time_limit_of(queues, e);
            // A stopped gang still exiting is gone within its stop grace.
            let limit = if e.is_over() { Some(e.spec.stop_grace) } else { limit };
            let since = if e.job.started_unix_ms > 0 && !e.is_over() { e.job.started_unix_ms } else { now };
            Some(planner::RunningGang {
                gpus: plan.nodes.iter().map(|a| (a.node_name.clone(), a.gpu_indices.clone())).collect(),
                ends_unix_ms: limit.map(|l| since.saturating_add(l.as_millis() as i64)),
            })
        })
        .collect()
}

/// A time of day (UTC) for a reason: "14:05:00".
fn clock(unix_ms: i64) -> String {
    let at = std::time::UNIX_EPOCH + Duration::from_millis(unix_ms.max(0) as u64);
    let text = humantime::format_rfc3339_seconds(at).to_string();
    text.get(11..19).map(|t| format!("{t} UTC")).unwrap_or(text)
}

/// When a node's agent stops its ranks if it stays cut off: its last
/// acknowledged heartbeat plus its `--fence-after`.
pub(super) fn fence_deadline(node: Option<&NodeEntry>) -> i64 {
    node.map(|n| n.last_seen_unix_ms + i64::from(n.info.fence_after_ms)).unwrap_or(0)
}

/// Slack on top of a fence deadline: the agent renews its lease when the ack
/// arrives (after the controller saw the heartbeat), the shims and the agent
/// look at it every 250 ms, and a SIGKILLed group takes a moment to be gone.
const FENCE_SLACK_MS: i64 = 1_500;

/// When every rank of a cut-off node is surely gone: the fence deadline, then
/// the SIGTERM-to-SIGKILL `grace`, then [`FENCE_SLACK_MS`]. 0 for an unknown node.
pub(super) fn ranks_fenced_by(node: Option<&NodeEntry>, grace: Duration) -> i64 {
    match fence_deadline(node) {
        0 => 0,
        deadline => deadline + grace.as_millis() as i64 + FENCE_SLACK_MS,
    }
}

/// How late the liveness sweep (a 250 ms tick) may run before the controller
/// counts itself as having been away: the time after which a node's own
/// silence would make it Suspect, and at least a second.
pub(super) fn stall_limit(config: &ControllerConfig) -> Duration {
    (config.heartbeat_interval * 3).max(Duration::from_secs(1))
}

/// The agents' longest reconnection backoff by default (`--max-backoff 10s`).
const AGENT_MAX_BACKOFF: Duration = Duration::from_secs(10);

/// How long of observed time a node is not declared lost after this
/// controller stalled or started: an agent whose stream went unanswered gave
/// it up and may be waiting out its reconnection backoff; the TTL on top.
pub(super) fn stall_grace(config: &ControllerConfig) -> Duration {
    AGENT_MAX_BACKOFF + config.node_ttl
}

/// What [`Controller::place_pending`] needs to know of one pending job beside its record.
struct Pending<'a> {
    queue: &'a crate::queues::Queue,
    /// GPUs its queue's running jobs hold.
    held: u32,
    /// In the second pass: beyond the queue's quota, on idle GPUs.
    borrowing: bool,
    views: &'a [NodeView],
    /// Its time limit, or its queue's maximum run time.
    limit: Option<Duration>,
    now: i64,
}
