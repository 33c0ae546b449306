//! Which controller acts. With etcd several controllers run; exactly one
//! leads (etcd's election on a lease) and only it holds a `Controller`: it
//! loads the state from the store when it wins, runs the reconcile loop and
//! accepts agents. A standby forwards the job API to the leader and tells
//! agents where the leader is. A leader that loses its lease drops its
//! `Controller` at once (stops acting) and becomes a standby.

use std::path::PathBuf;
use std::sync::Arc;

use backon::{BackoffBuilder, ExponentialBuilder};
use cohort_proto::job_service_client::JobServiceClient;
use tokio::sync::{RwLock, watch};
use tonic::Status;
use tonic::transport::{Channel, Endpoint};

use crate::controller::{Controller, ControllerConfig};
use crate::leader::LeaderState;
use crate::store::Store;

/// How long a call waits for a new leader to finish loading its state.
const LOAD_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

pub struct Leading {
    pub id: String,
    pub url: String,
    /// The controller while this process leads (None while loading or standing by).
    current: watch::Sender<Option<Arc<Controller>>>,
    leader: watch::Receiver<LeaderState>,
    /// A channel to the leader (standbys), rebuilt when the leader changes.
    channel: RwLock<Option<(String, Channel)>>,
    /// TLS to the leader (None: --insecure).
    tls: Option<cohort_shared::tls::ClientTls>,
    /// Why the last load of the state failed, while it is retried.
    load_failure: std::sync::Mutex<Option<String>>,
}

/// Where a job-API call goes.
pub enum Target {
    Local(Arc<Controller>),
    Leader(Box<JobServiceClient<Channel>>),
}

impl Leading {
    pub fn new(
        id: String,
        url: String,
        leader: watch::Receiver<LeaderState>,
        tls: Option<cohort_shared::tls::ClientTls>,
    ) -> Arc<Self> {
        Arc::new(Self {
            id,
            url,
            current: watch::channel(None).0,
            leader,
            channel: RwLock::new(None),
            tls,
            load_failure: std::sync::Mutex::new(None),
        })
    }

    /// The local controller while this process leads. A leader still loading
    /// its state is waited for (briefly) rather than reported as a standby.
    pub async fn controller(&self) -> Option<Arc<Controller>> {
        if let Some(c) = self.current.borrow().clone() {
            return Some(c);
        }
        if !self.leader.borrow().is_leader {
            return None;
        }
        let mut rx = self.current.subscribe();
        let loaded = tokio::time::timeout(LOAD_WAIT, rx.wait_for(|c| c.is_some())).await;
        match loaded {
            Ok(Ok(c)) => c.clone(),
            _ => None,
        }
    }

    pub fn state(&self) -> LeaderState {
        self.leader.borrow().clone()
    }

    /// Why this leader has no state yet: the last load's error, retried with backoff.
    pub fn load_failure(&self) -> Option<String> {
        self.load_failure.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_load_failure(&self, failure: Option<String>) {
        *self.load_failure.lock().unwrap_or_else(|p| p.into_inner()) = failure;
    }

    /// Loads the state, retrying with backoff (the store unreachable or
    /// failing) while this process leads; None once it no longer does.
    async fn load(
        &self,
        store: &Arc<dyn Store>,
        data_dir: &std::path::Path,
        config: &ControllerConfig,
        leader: &mut watch::Receiver<LeaderState>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Option<Arc<Controller>> {
        let mut delays = ExponentialBuilder::new()
            .with_min_delay(std::time::Duration::from_millis(200))
            .with_max_delay(std::time::Duration::from_secs(5))
            .with_jitter()
            .without_max_times()
            .build();
        loop {
            match Controller::load(store.clone(), data_dir, config.clone()).await {
                Ok(controller) => {
                    self.set_load_failure(None);
                    return Some(controller);
                }
                Err(e) => {
                    let delay = delays.next().unwrap_or(std::time::Duration::from_secs(5));
                    let failure = format!("{e:#}");
                    tracing::error!(id = %self.id, error = %failure, retry_in = ?delay, "cannot load the state from the store");
                    self.set_load_failure(Some(failure));
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        changed = shutdown.changed() => if changed.is_err() { return None },
                        changed = leader.changed() => if changed.is_err() { return None },
                    }
                    if *shutdown.borrow() || !leader.borrow().is_leader {
                        self.set_load_failure(None);
                        return None;
                    }
                }
            }
        }
    }

    /// For agents: the local controller, or a refusal naming the leader
    /// ("...; leader: URL", which agents parse).
    pub async fn for_agents(&self) -> Result<Arc<Controller>, Status> {
        if let Some(c) = self.controller().await {
            return Ok(c);
        }
        let state = self.state();
        Err(Status::failed_precondition(if state.leader_url.is_empty() || state.leader_url == self.url {
            format!("controller {} is not leading (an election is under way)", self.id)
        } else {
            format!("controller {} is a standby; leader: {}", self.id, state.leader_url)
        }))
    }

    /// For the job API: the local controller, or a client of the leader.
    pub async fn target(&self) -> Result<Target, Status> {
        if let Some(c) = self.controller().await {
            return Ok(Target::Local(c));
        }
        let leader = self.state().leader_url;
        if leader.is_empty() || leader == self.url {
            return Err(Status::unavailable(format!(
                "controller {} is a standby and no leader is known yet; retry in a few seconds",
                self.id
            )));
        }
        if let Some((url, channel)) = self.channel.read().await.as_ref()
            && *url == leader
        {
            return Ok(Target::Leader(Box::new(JobServiceClient::new(channel.clone()))));
        }
        let mut endpoint = Endpoint::from_shared(leader.clone())
            .map_err(|e| Status::internal(format!("the leader's URL {leader:?} is invalid: {e}")))?
            .connect_timeout(std::time::Duration::from_secs(3));
        if let Some(tls) = &self.tls {
            endpoint = tls.apply(endpoint).map_err(|e| Status::internal(format!("TLS to the leader {leader}: {e}")))?;
        }
        let channel = endpoint.connect_lazy();
        *self.channel.write().await = Some((leader, channel.clone()));
        Ok(Target::Leader(Box::new(JobServiceClient::new(channel))))
    }

    /// Follows the election until `shutdown`: loads a `Controller` from the
    /// store and runs its reconcile loop whenever this process leads, and
    /// drops it the moment it does not.
    pub async fn run(
        self: Arc<Self>,
        store: Arc<dyn Store>,
        data_dir: PathBuf,
        config: ControllerConfig,
        watch_store: bool,
        mut shutdown: watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        let mut leader = self.leader.clone();
        loop {
            // Wait to lead.
            loop {
                if *shutdown.borrow() {
                    return Ok(());
                }
                if leader.borrow_and_update().is_leader {
                    break;
                }
                tokio::select! {
                    changed = leader.changed() => if changed.is_err() { return Ok(()) },
                    _ = shutdown.changed() => {}
                }
            }
            tracing::info!(id = %self.id, "leading: loading the state from the store");
            let Some(controller) = self.load(&store, &data_dir, &config, &mut leader, &mut shutdown).await else {
                continue;
            };
            let (stop_tx, stop_rx) = watch::channel(false);
            let reconcile = tokio::spawn(controller.clone().run(stop_rx.clone()));
            // Only a shared store (etcd) can change behind this controller's back.
            let follow = watch_store.then(|| tokio::spawn(controller.clone().follow_store(stop_rx)));
            self.current.send_replace(Some(controller.clone()));
            // Lead until the lease is lost or we shut down.
            loop {
                if !leader.borrow_and_update().is_leader || *shutdown.borrow() {
                    break;
                }
                tokio::select! {
                    changed = leader.changed() => if changed.is_err() { break },
                    _ = shutdown.changed() => {}
                }
            }
            tracing::warn!(id = %self.id, "no longer leading: stopping all control actions");
            self.current.send_replace(None);
            let _ = stop_tx.send(true);
            reconcile.abort();
            if let Some(follow) = follow {
                follow.abort();
            }
            controller.close_sessions().await;
            if *shutdown.borrow() {
                return Ok(());
            }
        }
    }
}
