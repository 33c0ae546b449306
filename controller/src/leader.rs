//! Which of several controllers leads: etcd's Election API on a lease.
//!
//! A controller campaigns with the value `"<id> <url>"` on a lease it keeps
//! alive every TTL/3. It publishes `is_leader: true` only once the campaign
//! returns, and `false` the moment a keep-alive fails (no member renewed it
//! until max(TTL/6, 0.5 s) before it could expire), the lease is gone, or a
//! newer leader key shows up; it steps down before anything else, while the
//! lease still holds, then campaigns again on a new lease. Standbys follow the
//! election to know the leader's URL. On shutdown the leader steps down and
//! resigns, so the next one takes over at once instead of after the TTL.

use std::sync::Mutex;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use etcd_client::{Client, ConnectOptions, Error as EtcdError, LeaderKey, ResignOptions};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::store::etcd::{is_transient, retry_call};

/// The election's name under the key prefix: candidates are `<prefix>leader/<lease>`.
pub const ELECTION: &str = "leader";
/// The leader's lease unless configured otherwise.
pub const DEFAULT_TTL: Duration = Duration::from_secs(5);

/// Who leads, as this controller knows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaderState {
    pub is_leader: bool,
    /// Empty while no leader is known.
    pub leader_id: String,
    pub leader_url: String,
}

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("leader election: {0}")]
    Config(String),
    #[error("leader election: etcd at {endpoints:?}: {source}")]
    Etcd { endpoints: Vec<String>, source: EtcdError },
}

/// One controller and no etcd: it always leads.
pub fn single(id: String, url: String) -> watch::Receiver<LeaderState> {
    let (tx, rx) = watch::channel(LeaderState { is_leader: true, leader_id: id, leader_url: url });
    // Keep the sender while anyone listens: a closed channel reads as "leadership ended".
    tokio::spawn(async move { tx.closed().await });
    rx
}

/// Everything one campaigner needs.
#[derive(Debug, Clone)]
pub struct ElectionConfig {
    pub endpoints: Vec<String>,
    /// The election's full name in etcd, e.g. `/cohort/leader`.
    pub election: String,
    /// This controller's name; no whitespace.
    pub id: String,
    /// Where the others reach this controller.
    pub url: String,
    /// The lease TTL, whole seconds (etcd may raise a very short one).
    pub ttl: Duration,
}

/// Campaigns in the election `<prefix>leader` until `shutdown` fires (or
/// every receiver is dropped); then steps down and resigns.
pub async fn etcd(
    endpoints: &[String],
    prefix: &str,
    id: &str,
    url: &str,
    ttl: Duration,
    shutdown: watch::Receiver<bool>,
) -> Result<watch::Receiver<LeaderState>, LeaderError> {
    let config = ElectionConfig {
        endpoints: endpoints.to_vec(),
        election: format!("{prefix}{ELECTION}"),
        id: id.to_string(),
        url: url.to_string(),
        ttl,
    };
    etcd_with(config, shutdown).await
}

/// [`etcd`] with every setting explicit.
pub async fn etcd_with(
    config: ElectionConfig,
    shutdown: watch::Receiver<bool>,
) -> Result<watch::Receiver<LeaderState>, LeaderError> {
    for (what, value) in [("controller id", &config.id), ("advertised URL", &config.url)] {
        if value.is_empty() || value.contains(char::is_whitespace) {
            return Err(LeaderError::Config(format!("{what} {value:?} must be non-empty and without spaces")));
        }
    }
    if config.ttl < Duration::from_secs(1) {
        return Err(LeaderError::Config(format!("lease TTL {:?} is under etcd's 1 s granularity", config.ttl)));
    }
    // No per-request timeout: a campaign call blocks until this controller
    // wins. HTTP/2 pings find a dead or hung member instead.
    let options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(1))
        .with_keep_alive(Duration::from_secs(1), Duration::from_secs(2))
        .with_keep_alive_while_idle(true)
        .with_require_leader(true);
    let client = Client::connect(&config.endpoints, Some(options))
        .await
        .map_err(|source| LeaderError::Etcd { endpoints: config.endpoints.clone(), source })?;
    let (state, rx) = watch::channel(LeaderState::default());
    let election = Election { client, config, state, observed: Mutex::new(None), newer_leader: watch::channel(0).0 };
    tokio::spawn(async move { election.run(shutdown).await });
    Ok(rx)
}

/// The leader key as `Observe` last reported it.
#[derive(Debug, Clone)]
struct Observed {
    id: String,
    url: String,
}

struct Election {
    client: Client,
    config: ElectionConfig,
    state: watch::Sender<LeaderState>,
    observed: Mutex<Option<Observed>>,
    /// Creation revision of the newest leader key observed.
    newer_leader: watch::Sender<i64>,
}

/// How one lease's term ended.
enum TermEnd {
    Lost(String),
    Shutdown,
}

impl Election {
    async fn run(self, mut shutdown: watch::Receiver<bool>) {
        tokio::select! {
            _ = self.observe() => {}
            _ = self.campaign_loop(&mut shutdown) => {}
        }
        tracing::info!(id = %self.config.id, "left the leader election");
    }

    async fn campaign_loop(&self, shutdown: &mut watch::Receiver<bool>) {
        let mut delays = patient_backoff().build();
        loop {
            let granted = tokio::select! {
                granted = self.grant() => granted,
                _ = self.stopping(shutdown) => return,
            };
            let (lease, ttl, granted_at) = match granted {
                Ok(granted) => granted,
                Err(e) => {
                    let delay = delays.next().unwrap_or(Duration::from_secs(2));
                    tracing::warn!(id = %self.config.id, error = %e, retry_in = ?delay, "cannot get a lease for the election");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => continue,
                        _ = self.stopping(shutdown) => return,
                    }
                }
            };
            delays = patient_backoff().build();
            let end = self.term(lease, ttl, granted_at, shutdown).await;
            // Deletes our candidate key at once, if etcd can be reached.
            self.revoke(lease).await;
            match end {
                TermEnd::Shutdown => return,
                TermEnd::Lost(reason) => {
                    tracing::warn!(id = %self.config.id, lease = format!("{lease:x}"), %reason, "no longer a candidate on this lease; campaigning again");
                }
            }
        }
    }

    /// Campaigns on one lease and leads while it lasts.
    async fn term(
        &self,
        lease: i64,
        ttl: Duration,
        granted_at: Instant,
        shutdown: &mut watch::Receiver<bool>,
    ) -> TermEnd {
        let lease_lost = self.keep_alive(lease, ttl, granted_at);
        tokio::pin!(lease_lost);
        let won = tokio::select! {
            won = self.campaign(lease) => won,
            reason = &mut lease_lost => return TermEnd::Lost(reason),
            _ = self.stopping(shutdown) => return TermEnd::Shutdown,
        };
        let leader_key = match won {
            Ok(key) => key,
            Err(reason) => return TermEnd::Lost(reason),
        };
        // etcd answers a campaign whose key vanished meanwhile (lease revoked) as won: check.
        if let Err(reason) = self.still_holds(&leader_key, lease).await {
            return TermEnd::Lost(reason);
        }
        self.publish_leading(true);
        tracing::info!(id = %self.config.id, lease = format!("{lease:x}"), "elected leader");
        let end = tokio::select! {
            reason = &mut lease_lost => TermEnd::Lost(reason),
            reason = self.overtaken(leader_key.rev()) => TermEnd::Lost(reason),
            _ = self.stopping(shutdown) => TermEnd::Shutdown,
        };
        // Stop acting first; only then tell etcd.
        self.publish_leading(false);
        if matches!(end, TermEnd::Shutdown) {
            self.resign(leader_key).await;
        }
        end
    }

    async fn grant(&self) -> Result<(i64, Duration, Instant), EtcdError> {
        let ttl = i64::try_from(self.config.ttl.as_secs()).unwrap_or(i64::MAX);
        let sent = Instant::now();
        let (granted, _) = retry_call(&self.client, "lease grant", |mut c| async move {
            tokio::time::timeout(Duration::from_secs(2), c.lease_grant(ttl, None)).await.map_err(timed_out)?
        })
        .await?;
        // etcd raises a TTL below its minimum (about 1.5 election timeouts).
        let ttl = Duration::from_secs(u64::try_from(granted.ttl()).unwrap_or(0)).max(self.config.ttl);
        Ok((granted.id(), ttl, sent))
    }

    /// Renews the lease every TTL/3; resolves, with the reason, once it cannot.
    /// A renewal is retried fast (over the other members, through a raft
    /// election) until shortly before the lease could run out, counted from
    /// when the last successful renewal was sent: the margin covers clock drift
    /// and the step-down itself.
    async fn keep_alive(&self, lease: i64, ttl: Duration, granted_at: Instant) -> String {
        let margin = (ttl / 6).max(Duration::from_millis(500));
        let mut renewed_at = granted_at;
        loop {
            tokio::time::sleep_until(renewed_at + ttl / 3).await;
            let sent = Instant::now();
            let give_up = renewed_at + ttl.saturating_sub(margin);
            let renew = retry_until(give_up, || async {
                let mut leases = self.client.lease_client();
                tokio::time::timeout(ttl / 3, leases.keep_alive(lease)).await.map_err(timed_out)?.map(|_| ())
            });
            match tokio::time::timeout_at(give_up, renew).await {
                Ok(Ok(())) => renewed_at = sent,
                Ok(Err(e)) => return format!("keep-alive failed: {e}"),
                Err(_) => return format!("no keep-alive answered within {:?}", give_up - renewed_at),
            }
        }
    }

    /// Campaigns until this controller leads; retries over members that fail.
    async fn campaign(&self, lease: i64) -> Result<LeaderKey, String> {
        let value = format!("{} {}", self.config.id, self.config.url);
        let mut delays = patient_backoff().build();
        loop {
            let mut election = self.client.election_client();
            match election.campaign(self.config.election.clone(), value.clone(), lease).await {
                Ok(mut won) => return won.take_leader().ok_or_else(|| "campaign answered without a leader key".into()),
                Err(e) if is_transient(&e) => {
                    let delay = delays.next().unwrap_or(Duration::from_secs(1));
                    tracing::debug!(id = %self.config.id, error = %e, "campaign call failed; retrying");
                    tokio::time::sleep(delay).await;
                }
                Err(e) => return Err(format!("campaign failed: {e}")),
            }
        }
    }

    async fn still_holds(&self, key: &LeaderKey, lease: i64) -> Result<(), String> {
        let (found, _) = retry_call(&self.client, "leader key check", |mut c| {
            let key = key.key().to_vec();
            async move { tokio::time::timeout(Duration::from_secs(2), c.get(key, None)).await.map_err(timed_out)? }
        })
        .await
        .map_err(|e| format!("cannot check the leader key: {e}"))?;
        match found.kvs().first() {
            Some(kv) if kv.lease() == lease && kv.create_revision() == key.rev() => Ok(()),
            _ => Err("the campaign returned but our election key is gone".into()),
        }
    }

    /// Resolves once the election shows a leader key newer than ours: ours is gone.
    async fn overtaken(&self, ours: i64) -> String {
        let mut newest = self.newer_leader.subscribe();
        let _ = newest.wait_for(|created| *created > ours).await;
        "another controller's key leads the election".into()
    }

    async fn resign(&self, key: LeaderKey) {
        let resigned = retry_call(&self.client, "resign", |mut c| {
            let key = key.clone();
            async move {
                let resign = c.resign(Some(ResignOptions::new().with_leader(key)));
                tokio::time::timeout(Duration::from_secs(2), resign).await.map_err(timed_out)?
            }
        })
        .await;
        match resigned {
            Ok(_) => tracing::info!(id = %self.config.id, "resigned leadership"),
            Err(e) => tracing::warn!(id = %self.config.id, error = %e, "cannot resign; the lease runs out instead"),
        }
    }

    async fn revoke(&self, lease: i64) {
        let revoked = retry_call(&self.client, "lease revoke", |mut c| async move {
            tokio::time::timeout(Duration::from_secs(1), c.lease_revoke(lease)).await.map_err(timed_out)?
        })
        .await;
        if let Err(e) = revoked {
            tracing::debug!(lease = format!("{lease:x}"), error = %e, "lease not revoked; it will expire");
        }
    }

    /// Follows the election's leader key (re-opened when the stream breaks).
    async fn observe(&self) {
        let mut delays = patient_backoff().build();
        loop {
            let mut election = self.client.election_client();
            match election.observe(self.config.election.clone()).await {
                Ok(mut stream) => loop {
                    match stream.message().await {
                        Ok(Some(response)) => {
                            delays = patient_backoff().build();
                            if let Some(kv) = response.kv() {
                                self.observed(kv.value(), kv.create_revision());
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            tracing::debug!(error = %e, "election observe stream broke; re-opening");
                            break;
                        }
                    }
                },
                Err(e) => tracing::debug!(error = %e, "cannot observe the election"),
            }
            tokio::time::sleep(delays.next().unwrap_or(Duration::from_secs(2))).await;
        }
    }

    fn observed(&self, value: &[u8], created: i64) {
        let value = String::from_utf8_lossy(value);
        let Some((id, url)) = value.split_once(' ') else {
            tracing::warn!(value = %value, "election value is not \"<id> <url>\"; ignored");
            return;
        };
        let observed = Observed { id: id.to_string(), url: url.to_string() };
        *self.observed.lock().unwrap_or_else(|p| p.into_inner()) = Some(observed.clone());
        self.newer_leader.send_if_modified(|newest| {
            let newer = created > *newest;
            *newest = (*newest).max(created);
            newer
        });
        self.state.send_if_modified(|state| {
            // While leading, this controller knows best; a newer key ends that through `overtaken`.
            if state.is_leader {
                return false;
            }
            self.show_observed(state, Some(&observed))
        });
    }

    fn publish_leading(&self, leading: bool) {
        self.state.send_if_modified(|state| {
            if leading {
                let next = LeaderState {
                    is_leader: true,
                    leader_id: self.config.id.clone(),
                    leader_url: self.config.url.clone(),
                };
                let changed = *state != next;
                *state = next;
                return changed;
            }
            let was_leader = std::mem::replace(&mut state.is_leader, false);
            let observed = self.observed.lock().unwrap_or_else(|p| p.into_inner()).clone();
            self.show_observed(state, observed.as_ref()) || was_leader
        });
    }

    /// Shows `observed` as the leader, unless it is this controller's own key
    /// (stale while this controller is not leading). Returns whether `state` changed.
    fn show_observed(&self, state: &mut LeaderState, observed: Option<&Observed>) -> bool {
        let (id, url) = match observed {
            Some(o) if o.id != self.config.id => (o.id.clone(), o.url.clone()),
            _ => (String::new(), String::new()),
        };
        let changed = state.leader_id != id || state.leader_url != url;
        state.leader_id = id;
        state.leader_url = url;
        changed
    }

    /// Resolves when the process shuts down (or its sender is gone), or nobody
    /// listens to this election any more.
    async fn stopping(&self, shutdown: &mut watch::Receiver<bool>) {
        tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => {}
            _ = self.state.closed() => {}
        }
    }
}

/// Retries `call` on transient errors until `deadline`.
async fn retry_until<T, F, Fut>(deadline: Instant, mut call: F) -> Result<T, EtcdError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, EtcdError>>,
{
    let mut delays = ExponentialBuilder::new()
        .with_min_delay(Duration::from_millis(10))
        .with_max_delay(Duration::from_millis(200))
        .with_jitter()
        .without_max_times()
        .build();
    loop {
        match call().await {
            Err(e) if is_transient(&e) && Instant::now() < deadline => {
                tracing::debug!(error = %e, "lease keep-alive failed; retrying");
                tokio::time::sleep(delays.next().unwrap_or(Duration::from_millis(200))).await;
            }
            result => return result,
        }
    }
}

/// Between attempts that may take a while to succeed (etcd down): 100 ms up to 2 s.
fn patient_backoff() -> ExponentialBuilder {
    ExponentialBuilder::new()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(2))
        .with_jitter()
        .without_max_times()
}

fn timed_out(_: tokio::time::error::Elapsed) -> EtcdError {
    EtcdError::GRpcStatus(tonic::Status::deadline_exceeded("etcd did not answer in time"))
}
