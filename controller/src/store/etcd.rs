//! The etcd store: every key lives at `<prefix><key>` in an etcd v3 cluster,
//! and a key's revision is its etcd `mod_revision`.
//!
//! etcd-client spreads calls over every endpoint, dead members included, and
//! never retries: so every call here is retried a few times, fast, on transport
//! and `Unavailable` errors. A compare-and-set that loses is never retried.

use std::time::Duration;

use async_trait::async_trait;
use backon::{BackoffBuilder, ExponentialBuilder};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, Error as EtcdError, EventType, GetOptions, KeyValue, Txn, TxnOp,
    TxnOpResponse, TxnResponse, WatchOptions,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::{
    CommitError, CommitLimits, Expect, Op, Store, StoreError, Versioned, WatchEvent, WatchStream, check_distinct_keys,
};

/// Where Cohort's keys live unless configured otherwise.
pub const DEFAULT_PREFIX: &str = "/cohort/";
/// etcd's default `--max-txn-ops`: the most compares, and the most ops of
/// each branch, in one transaction.
pub const DEFAULT_MAX_TXN_OPS: usize = 128;
/// etcd's default `--max-request-bytes` (1.5 MiB).
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 1_572_864;
/// Keys fetched per range request when listing.
const LIST_PAGE: i64 = 500;
/// Events a watcher may have in flight before etcd is made to wait.
const WATCH_BUFFER: usize = 256;

/// How to reach etcd.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// `http://host:port` of each member.
    pub endpoints: Vec<String>,
    /// Prepended to every key, e.g. `/cohort/`.
    pub prefix: String,
    /// Per member, to open a connection.
    pub connect_timeout: Duration,
    /// Per attempt of a call (retries come on top).
    pub request_timeout: Duration,
    /// The cluster's `--max-txn-ops`: most keys in one [`Store::commit`].
    pub max_txn_ops: usize,
    /// The cluster's `--max-request-bytes`: a commit's keys and values stay
    /// within three quarters of it (the rest for keys named again in its
    /// compares and reads).
    pub max_request_bytes: usize,
}

impl EtcdOptions {
    pub fn new(endpoints: Vec<String>) -> Self {
        Self {
            endpoints,
            prefix: DEFAULT_PREFIX.to_string(),
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(2),
            max_txn_ops: DEFAULT_MAX_TXN_OPS,
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
        }
    }

    /// From `etcd://host1:port1,host2:port2`.
    pub fn from_url(url: &str) -> Result<Self, StoreError> {
        Ok(Self::new(parse_endpoints(url)?))
    }

    fn connect_options(&self) -> ConnectOptions {
        ConnectOptions::new()
            .with_connect_timeout(self.connect_timeout)
            .with_timeout(self.request_timeout)
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(2))
            // A member cut off from the raft leader answers at once instead of
            // holding the call: the retry then goes to another member.
            .with_require_leader(true)
    }
}

/// `etcd://h1:p1,h2:p2` (or one `http://h:p`) -> `["http://h1:p1", "http://h2:p2"]`.
pub fn parse_endpoints(url: &str) -> Result<Vec<String>, StoreError> {
    let bad = |why: String| StoreError::Backend(format!("etcd URL {url:?}: {why}"));
    let hosts = url
        .strip_prefix("etcd://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| bad("expected etcd://host:port[,host:port...] (TLS is not supported)".into()))?;
    let hosts = hosts.strip_suffix('/').unwrap_or(hosts);
    let mut endpoints = Vec::new();
    for member in hosts.split(',').map(str::trim) {
        if member.contains('/') {
            return Err(bad(format!("{member:?} has a path; the key prefix is configured separately")));
        }
        let (host, port) = member.rsplit_once(':').ok_or_else(|| bad(format!("{member:?} has no :port")))?;
        if host.is_empty() || host.contains('@') {
            return Err(bad(format!("{member:?} has no host")));
        }
        port.parse::<u16>().map_err(|_| bad(format!("{member:?}: port {port:?} is not a number in 1-65535")))?;
        endpoints.push(format!("http://{member}"));
    }
    Ok(endpoints)
}

#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    prefix: String,
    endpoints: Vec<String>,
    limits: CommitLimits,
}

impl EtcdStore {
    /// Connects with default timeouts; keys go under `prefix`.
    pub async fn connect(endpoints: &[String], prefix: &str) -> Result<Self, StoreError> {
        Self::connect_with(EtcdOptions { prefix: prefix.to_string(), ..EtcdOptions::new(endpoints.to_vec()) }).await
    }

    /// Connects and checks that the cluster answers (with retries).
    pub async fn connect_with(options: EtcdOptions) -> Result<Self, StoreError> {
        let endpoints = options.endpoints.clone();
        let client = Client::connect(&endpoints, Some(options.connect_options()))
            .await
            .map_err(|e| StoreError::Backend(format!("etcd at {endpoints:?}: {e}")))?;
        let limits = CommitLimits { ops: options.max_txn_ops.max(1), bytes: options.max_request_bytes / 4 * 3 };
        let store = Self { client, prefix: options.prefix, endpoints, limits };
        let probe = store.key("");
        store
            .retrying("connect", |mut c| {
                let probe = probe.clone();
                async move { c.get(probe, Some(GetOptions::new().with_count_only())).await }
            })
            .await
            .map_err(|e| StoreError::Backend(format!("etcd at {:?} does not answer: {e}", store.endpoints)))?;
        tracing::info!(endpoints = ?store.endpoints, prefix = %store.prefix, "connected to etcd");
        Ok(store)
    }

    /// The underlying client, e.g. for leases and elections.
    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// Runs `call` until it succeeds, fails for good, or the retries run out.
    async fn retrying<T, F, Fut>(&self, what: &str, call: F) -> Result<T, EtcdError>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, EtcdError>>,
    {
        retry_call(&self.client, what, call).await.map(|(value, _)| value)
    }

    fn error(&self, what: &str, key: &str, e: EtcdError) -> StoreError {
        StoreError::Backend(format!("etcd {what} {key:?} (endpoints {:?}): {e}", self.endpoints))
    }

    /// The revision of an earlier attempt of this commit that was applied
    /// before its answer was lost: every put's key holds its value, all at
    /// one revision, and every deleted key is gone (`now`: etcd's revision,
    /// for a commit of deletes only). `found`: the keys' revisions now.
    async fn applied_earlier(&self, ops: &[Op], found: &[Option<u64>], now: u64) -> Result<Option<u64>, StoreError> {
        let mut revision = None;
        for (op, found) in ops.iter().zip(found) {
            match (&op.value, found) {
                (None, None) => {}
                (Some(_), Some(at)) if *revision.get_or_insert(*at) == *at => {}
                _ => return Ok(None),
            }
        }
        for op in ops {
            if let Some(value) = &op.value
                && self.get(&op.key).await?.is_none_or(|now| now.value != *value || Some(now.revision) != revision)
            {
                return Ok(None);
            }
        }
        Ok(Some(revision.unwrap_or(now)))
    }

    /// A compare-and-set transaction: `then` if `expect` holds, else a read of the key.
    async fn cas(&self, key: &str, expect: Expect, then: TxnOp) -> Result<(TxnResponse, bool), StoreError> {
        let full = self.key(key);
        let compares = match expect {
            Expect::Any => vec![],
            Expect::Absent => vec![Compare::create_revision(full.clone(), CompareOp::Equal, 0)],
            // `version > 0` keeps Revision(0) from matching an absent key.
            Expect::Revision(r) => vec![
                Compare::version(full.clone(), CompareOp::Greater, 0),
                Compare::mod_revision(full.clone(), CompareOp::Equal, to_etcd(r)),
            ],
        };
        let txn = Txn::new().when(compares).and_then(vec![then]).or_else(vec![TxnOp::get(full.clone(), None)]);
        retry_call(&self.client, "txn", |mut c| {
            let txn = txn.clone();
            async move { c.txn(txn).await }
        })
        .await
        .map(|(response, attempts)| (response, attempts > 1))
        .map_err(|e| self.error("write", key, e))
    }
}

/// The mod revision of each op's key (`None`: absent) as read in a
/// commit's failure branch, in op order.
fn found_revisions(response: &TxnResponse) -> Vec<Option<u64>> {
    response
        .op_responses()
        .into_iter()
        .map(|op| match op {
            TxnOpResponse::Get(get) => get.kvs().first().map(|kv| from_etcd(kv.mod_revision())),
            _ => None,
        })
        .collect()
}

/// `(value, attempts)`.
pub(crate) async fn retry_call<T, F, Fut>(client: &Client, what: &str, mut call: F) -> Result<(T, u32), EtcdError>
where
    F: FnMut(Client) -> Fut,
    Fut: Future<Output = Result<T, EtcdError>>,
{
    let mut delays = retry_backoff().build();
    let mut attempts = 0;
    loop {
        attempts += 1;
        match call(client.clone()).await {
            Ok(value) => return Ok((value, attempts)),
            Err(e) if is_transient(&e) => match delays.next() {
                Some(delay) => {
                    tracing::debug!(call = what, attempts, error = %e, "etcd call failed; retrying");
                    tokio::time::sleep(delay).await;
                }
                None => {
                    tracing::warn!(call = what, attempts, error = %e, "etcd call failed; giving up");
                    return Err(e);
                }
            },
            Err(e) => return Err(e),
        }
    }
}

/// A few fast attempts with jitter: long enough to ride out a dead member or
/// a raft leader election (about 1-2 s with etcd's defaults), at most ~3 s.
pub(crate) fn retry_backoff() -> ExponentialBuilder {
    ExponentialBuilder::new()
        .with_min_delay(Duration::from_millis(20))
        .with_max_delay(Duration::from_millis(600))
        .with_factor(2.0)
        .with_max_times(10)
        .with_jitter()
        .with_total_delay(Some(Duration::from_secs(3)))
}

/// Errors after which the same call may succeed on another member or a moment later.
pub(crate) fn is_transient(e: &EtcdError) -> bool {
    use tonic::Code;
    match e {
        EtcdError::TransportError(_) | EtcdError::IoError(_) => true,
        // Unavailable: connection refused, no leader, leader changed, server-side timeout.
        // Unknown/Cancelled/DeadlineExceeded: a connection that broke or hung mid-call.
        EtcdError::GRpcStatus(s) => {
            matches!(s.code(), Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded)
        }
        _ => false,
    }
}

fn to_etcd(revision: u64) -> i64 {
    i64::try_from(revision).unwrap_or(i64::MAX)
}

fn from_etcd(revision: i64) -> u64 {
    u64::try_from(revision).unwrap_or(0)
}

/// The key as read in a transaction's failure branch.
fn found_kv(response: &TxnResponse) -> Option<KeyValue> {
    response.op_responses().into_iter().find_map(|op| match op {
        TxnOpResponse::Get(get) => get.kvs().first().cloned(),
        _ => None,
    })
}

fn header_revision(response: &TxnResponse) -> u64 {
    response.header().map(|h| from_etcd(h.revision())).unwrap_or(0)
}

#[async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        let full = self.key(key);
        let response = self
            .retrying("get", |mut c| {
                let full = full.clone();
                async move { c.get(full, None).await }
            })
            .await
            .map_err(|e| self.error("get", key, e))?;
        Ok(response
            .kvs()
            .first()
            .map(|kv| Versioned { value: kv.value().to_vec(), revision: from_etcd(kv.mod_revision()) }))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, StoreError> {
        let full = self.key(prefix);
        let end = prefix_end(full.as_bytes());
        let mut from = if full.is_empty() { vec![0] } else { full.into_bytes() };
        // Every page is read at the first page's revision: one consistent snapshot.
        let mut at_revision = 0;
        let mut out = Vec::new();
        loop {
            let response = self
                .retrying("list", |mut c| {
                    let options =
                        GetOptions::new().with_range(end.clone()).with_limit(LIST_PAGE).with_revision(at_revision);
                    let from = from.clone();
                    async move { c.get(from, Some(options)).await }
                })
                .await
                .map_err(|e| self.error("list", prefix, e))?;
            if at_revision == 0 {
                at_revision = response.header().map(|h| h.revision()).unwrap_or(0);
            }
            for kv in response.kvs() {
                let Some(key) = kv.key().strip_prefix(self.prefix.as_bytes()) else { continue };
                let Ok(key) = std::str::from_utf8(key) else {
                    tracing::warn!(key = ?String::from_utf8_lossy(kv.key()), "skipping a non-UTF-8 etcd key");
                    continue;
                };
                let revision = from_etcd(kv.mod_revision());
                out.push((key.to_string(), Versioned { value: kv.value().to_vec(), revision }));
            }
            match (response.more(), response.kvs().last()) {
                (true, Some(last)) => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => return Ok(out),
            }
        }
    }

    async fn put(&self, key: &str, value: Vec<u8>, expect: Expect) -> Result<u64, StoreError> {
        let (response, retried) = self.cas(key, expect, TxnOp::put(self.key(key), value.clone(), None)).await?;
        if response.succeeded() {
            return Ok(header_revision(&response));
        }
        let found = found_kv(&response);
        // An earlier attempt may have been applied before its answer was lost:
        // then the key holds exactly what we wrote.
        if retried
            && let Some(kv) = &found
            && kv.value() == value.as_slice()
        {
            tracing::debug!(key, "an earlier attempt of this write was applied");
            return Ok(from_etcd(kv.mod_revision()));
        }
        Err(StoreError::Conflict {
            key: key.to_string(),
            expected: expect,
            found: found.map(|kv| from_etcd(kv.mod_revision())),
        })
    }

    async fn delete(&self, key: &str, expect: Expect) -> Result<(), StoreError> {
        let (response, retried) = self.cas(key, expect, TxnOp::delete(self.key(key), None)).await?;
        if response.succeeded() {
            return Ok(());
        }
        let found = found_kv(&response);
        if retried && found.is_none() {
            tracing::debug!(key, "an earlier attempt of this delete was applied");
            return Ok(());
        }
        Err(StoreError::Conflict {
            key: key.to_string(),
            expected: expect,
            found: found.map(|kv| from_etcd(kv.mod_revision())),
        })
    }

    /// One transaction: a compare per key (none for `Any`), the writes if
    /// all hold, else a read of every key to name the one that did not.
    async fn commit(&self, ops: Vec<Op>) -> Result<Vec<u64>, CommitError> {
        check_distinct_keys(&ops)?;
        let Some(first) = ops.first() else { return Ok(Vec::new()) };
        if let Some(why) = self.limits.exceeded_by(&ops) {
            return Err(StoreError::Backend(format!(
                "a commit of {why} is more than etcd takes in one transaction (keys: its --max-txn-ops; \
                 bytes: 3/4 of its --max-request-bytes); split it as Store::commit_limits says"
            ))
            .into());
        }
        // Revision 0 is no key's revision: refused, as `put` refuses it.
        if let Some(index) = ops.iter().position(|op| op.expect == Expect::Revision(0)) {
            let op = &ops[index];
            let found = self.get(&op.key).await?.map(|v| v.revision);
            let error = StoreError::Conflict { key: op.key.clone(), expected: op.expect, found };
            return Err(CommitError::Conflict { index, error });
        }
        let compares: Vec<Compare> = ops
            .iter()
            .filter_map(|op| match op.expect {
                Expect::Any => None,
                Expect::Absent => Some(Compare::create_revision(self.key(&op.key), CompareOp::Equal, 0)),
                // An absent key's mod_revision is 0, which no revision here is.
                Expect::Revision(r) => Some(Compare::mod_revision(self.key(&op.key), CompareOp::Equal, to_etcd(r))),
            })
            .collect();
        let writes: Vec<TxnOp> = ops
            .iter()
            .map(|op| match &op.value {
                Some(value) => TxnOp::put(self.key(&op.key), value.clone(), None),
                None => TxnOp::delete(self.key(&op.key), None),
            })
            .collect();
        // Revisions only: the values could make the answer bigger than a client takes.
        let reads: Vec<TxnOp> =
            ops.iter().map(|op| TxnOp::get(self.key(&op.key), Some(GetOptions::new().with_keys_only()))).collect();
        let txn = Txn::new().when(compares).and_then(writes).or_else(reads);
        let (response, attempts) = retry_call(&self.client, "commit", |mut c| {
            let txn = txn.clone();
            async move { c.txn(txn).await }
        })
        .await
        .map_err(|e| {
            let keys = format!("{:?} and {} more", first.key, ops.len() - 1);
            StoreError::Backend(format!("etcd commit of {keys} (endpoints {:?}): {e}", self.endpoints))
        })?;
        if response.succeeded() {
            return Ok(vec![header_revision(&response); ops.len()]);
        }
        let found = found_revisions(&response);
        if attempts > 1
            && let Some(revision) = self.applied_earlier(&ops, &found, header_revision(&response)).await?
        {
            tracing::debug!(keys = ops.len(), "an earlier attempt of this commit was applied");
            return Ok(vec![revision; ops.len()]);
        }
        match ops.iter().zip(found).enumerate().find(|(_, (op, found))| !op.expect.holds(*found)) {
            Some((index, (op, found))) => {
                let error = StoreError::Conflict { key: op.key.clone(), expected: op.expect, found };
                Err(CommitError::Conflict { index, error })
            }
            None => Err(StoreError::Backend(format!(
                "etcd refused a commit of {} keys whose expectations all hold as read back; try again",
                ops.len()
            ))
            .into()),
        }
    }

    fn commit_limits(&self) -> CommitLimits {
        self.limits
    }

    async fn watch(&self, prefix: &str, from_revision: u64) -> Result<WatchStream, StoreError> {
        let watch = PrefixWatch { client: self.client.clone(), prefix: self.prefix.clone(), watched: self.key(prefix) };
        let (stream, created_at) = retry_call(&self.client, "watch", |_| watch.open(from_revision))
            .await
            .map(|(opened, _)| opened)
            .map_err(|e| self.error("watch", prefix, e))?;
        let next = if from_revision == 0 { created_at + 1 } else { from_revision };
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        tokio::spawn(watch.pump(stream, next, tx));
        Ok(Box::pin(ReceiverStream::new(rx)))
    }
}

/// The end of the range of keys starting with `prefix` (etcd's `range_end`).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// One `Store::watch`: forwards etcd's events and re-opens the etcd watch
/// whenever it breaks, from the next revision not yet delivered.
struct PrefixWatch {
    client: Client,
    prefix: String,
    watched: String,
}

impl PrefixWatch {
    /// Opens the etcd watch and waits until etcd has created it; returns it and
    /// the store revision at creation.
    async fn open(&self, from_revision: u64) -> Result<(etcd_client::WatchStream, u64), EtcdError> {
        let mut options = WatchOptions::new().with_prefix().with_progress_notify();
        if from_revision > 0 {
            options = options.with_start_revision(to_etcd(from_revision));
        }
        let mut stream = self.client.watch_client().watch(self.watched.clone(), Some(options)).await?;
        let created = tokio::time::timeout(Duration::from_secs(5), stream.message())
            .await
            .map_err(|_| EtcdError::GRpcStatus(tonic::Status::deadline_exceeded("watch not created within 5 s")))??;
        match created {
            Some(response) if response.created() && !response.canceled() => {
                Ok((stream, response.header().map(|h| from_etcd(h.revision())).unwrap_or(0)))
            }
            Some(response) => Err(EtcdError::WatchError(format!("watch not created: {:?}", response.cancel_reason()))),
            None => Err(EtcdError::GRpcStatus(tonic::Status::unavailable("watch stream closed at creation"))),
        }
    }

    async fn pump(self, mut stream: etcd_client::WatchStream, mut next: u64, tx: mpsc::Sender<WatchEvent>) {
        let mut reopen_delays = reopen_backoff().build();
        loop {
            // Forward until the etcd watch ends; then decide where to resume.
            let mut resync = false;
            loop {
                let message = tokio::select! {
                    _ = tx.closed() => return,
                    message = stream.message() => message,
                };
                let response = match message {
                    Ok(Some(response)) => response,
                    Ok(None) => {
                        tracing::debug!(prefix = %self.watched, "etcd watch stream ended; re-opening");
                        break;
                    }
                    Err(e) => {
                        tracing::debug!(prefix = %self.watched, error = %e, "etcd watch broke; re-opening");
                        break;
                    }
                };
                if response.canceled() {
                    if response.compact_revision() > 0 {
                        tracing::warn!(
                            prefix = %self.watched, next, compacted = response.compact_revision(),
                            "etcd compacted history this watch still needed; the consumer re-lists"
                        );
                        resync = true;
                    } else {
                        tracing::debug!(prefix = %self.watched, reason = response.cancel_reason(), "etcd cancelled the watch");
                    }
                    break;
                }
                if response.events().is_empty() {
                    // A progress notification: everything up to its revision has been delivered.
                    if let Some(header) = response.header() {
                        next = next.max(from_etcd(header.revision()) + 1);
                    }
                    continue;
                }
                for event in response.events() {
                    let Some(event) = self.event(event) else { continue };
                    if let WatchEvent::Put { revision, .. } | WatchEvent::Delete { revision, .. } = &event {
                        next = *revision + 1;
                    }
                    if tx.send(event).await.is_err() {
                        return;
                    }
                }
                reopen_delays = reopen_backoff().build();
            }

            // Re-open: from `next` (nothing lost) or, after a compaction, from now;
            // paced, so a watch that etcd keeps cancelling does not spin.
            let from = if resync { 0 } else { next };
            loop {
                let delay = reopen_delays.next().unwrap_or(Duration::from_secs(2));
                tokio::select! {
                    _ = tx.closed() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
                match self.open(from).await {
                    Ok((opened, created_at)) => {
                        stream = opened;
                        if resync {
                            next = created_at + 1;
                            // Sent once the new watch is in place: the consumer's re-list cannot miss a change.
                            if tx.send(WatchEvent::Resync).await.is_err() {
                                return;
                            }
                        }
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(prefix = %self.watched, error = %e, "cannot re-open the etcd watch; retrying")
                    }
                }
            }
        }
    }

    fn event(&self, event: &etcd_client::Event) -> Option<WatchEvent> {
        let kv = event.kv()?;
        let key = kv.key().strip_prefix(self.prefix.as_bytes())?;
        let Ok(key) = std::str::from_utf8(key) else {
            tracing::warn!(key = ?String::from_utf8_lossy(kv.key()), "skipping a non-UTF-8 etcd key");
            return None;
        };
        let (key, revision) = (key.to_string(), from_etcd(kv.mod_revision()));
        Some(match event.event_type() {
            EventType::Put => WatchEvent::Put { key, value: kv.value().to_vec(), revision },
            EventType::Delete => WatchEvent::Delete { key, revision },
        })
    }
}

/// Re-opening a broken watch: quick at first, then every 2 s, forever.
fn reopen_backoff() -> ExponentialBuilder {
    ExponentialBuilder::new()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(2))
        .with_jitter()
        .without_max_times()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_endpoints() {
        assert_eq!(
            parse_endpoints("etcd://10.0.0.1:2379,etcd-b:2379").unwrap(),
            ["http://10.0.0.1:2379", "http://etcd-b:2379"]
        );
        assert_eq!(parse_endpoints("http://127.0.0.1:2379/").unwrap(), ["http://127.0.0.1:2379"]);
        assert_eq!(parse_endpoints("etcd://[::1]:2379").unwrap(), ["http://[::1]:2379"]);
        for bad in
            ["127.0.0.1:2379", "etcd://h1", "etcd://h1:x", "etcd://h1:2379/cohort", "etcd://:2379", "https://h:1"]
        {
            let err = parse_endpoints(bad).unwrap_err().to_string();
            assert!(err.contains(bad), "{err}");
        }
    }

    #[test]
    fn prefix_end_is_the_next_key() {
        assert_eq!(prefix_end(b"/cohort/jobs/"), b"/cohort/jobs0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff"), [0]);
    }
}
