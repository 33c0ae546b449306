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
    tls: Option<cohort_runtime::tls::ClientTls>,
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
        tls: Option<cohort_runtime::tls::ClientTls>,
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
        if !self.leader.borrow().is_leader || self.load_failure().is_some() {
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

    /// A leader whose load fails says so, rather than "no leader known".
    fn check_loading(&self) -> Result<(), Status> {
        match self.load_failure() {
            Some(failure) if self.leader.borrow().is_leader => Err(Status::unavailable(format!(
                "controller {} leads but cannot load its state (retrying): {failure}",
                self.id
            ))),
            _ => Ok(()),
        }
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
        self.check_loading()?;
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
        self.check_loading()?;
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
            let retention = tokio::spawn(controller.clone().retain_finished(stop_rx.clone()));
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
            controller.stop_writes();
            let _ = stop_tx.send(true);
            reconcile.abort();
            retention.abort();
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    use async_trait::async_trait;

    use super::*;
    use crate::store::{EmbeddedStore, Expect, StoreError, Versioned, WatchStream};

    /// The embedded store, whose first `failures` lists fail (etcd unreachable at a load).
    struct FailingLists {
        store: EmbeddedStore,
        failures: AtomicU32,
    }

    #[async_trait]
    impl Store for FailingLists {
        async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
            self.store.get(key).await
        }
        async fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, StoreError> {
            if self.failures.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
                return Err(StoreError::Backend("etcd at 10.0.0.9:2379 is unreachable".into()));
            }
            self.store.list(prefix).await
        }
        async fn put(&self, key: &str, value: Vec<u8>, expect: Expect) -> Result<u64, StoreError> {
            self.store.put(key, value, expect).await
        }
        async fn delete(&self, key: &str, expect: Expect) -> Result<(), StoreError> {
            self.store.delete(key, expect).await
        }
        async fn watch(&self, prefix: &str, from_revision: u64) -> Result<WatchStream, StoreError> {
            self.store.watch(prefix, from_revision).await
        }
    }

    /// A load that fails is named (not "loading" forever) and retried until it works.
    #[tokio::test]
    async fn a_failed_load_is_reported_and_retried_until_it_works() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FailingLists { store: EmbeddedStore::open(dir.path()).unwrap(), failures: 3.into() });
        let leader = crate::leader::single("c1".into(), "http://127.0.0.1:1".into());
        let leading = Leading::new("c1".into(), "http://127.0.0.1:1".into(), leader, None);
        let (_stop, shutdown) = watch::channel(false);
        let config = ControllerConfig::default();
        tokio::spawn(leading.clone().run(store, dir.path().to_path_buf(), config, false, shutdown));

        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let failure = loop {
            if let Some(failure) = leading.load_failure() {
                break failure;
            }
            assert!(tokio::time::Instant::now() < deadline, "the failed load was never reported");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert!(failure.contains("etcd at 10.0.0.9:2379 is unreachable"), "{failure}");
        let refused = leading.target().await.err().unwrap();
        assert_eq!(refused.code(), tonic::Code::Unavailable);
        assert!(refused.message().contains("cannot load its state"), "{}", refused.message());
        while leading.controller().await.is_none() {
            assert!(tokio::time::Instant::now() < deadline, "the load was not retried: {:?}", leading.load_failure());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(leading.load_failure(), None);
    }
}
