//! Helpers for the controller's store under faults (a full data disk, a
//! damaged state file): `/healthz`, filling a disk, job ids and the raw
//! records of the embedded store. Shared by `store_faults.rs` and the fault suite.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use cohort_proto::ListJobsRequest;

use crate::{Cluster, SparePort};

/// The embedded store's table, as the controller lays it out: key -> (revision, value).
const KV: redb::TableDefinition<&str, (u64, &[u8])> = redb::TableDefinition::new("kv");

/// `/healthz` of a plaintext (`--insecure`) controller's `--http`: its code and body.
pub async fn healthz(http: &SparePort) -> Option<(u16, String)> {
    let response = reqwest::get(format!("http://{}/healthz", http.addr())).await.ok()?;
    let code = response.status().as_u16();
    Some((code, response.text().await.unwrap_or_default()))
}

/// Polls `/healthz` until it answers `code`; returns the body.
pub async fn wait_healthz(http: &SparePort, code: u16, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let got = healthz(http).await;
        if let Some((c, body)) = &got
            && *c == code
        {
            return body.clone();
        }
        assert!(Instant::now() < deadline, "/healthz did not answer {code} within {within:?}; last: {got:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every job id the controller lists, in its order.
pub async fn job_ids(cluster: &Cluster) -> Vec<String> {
    let mut client = cluster.client().await.unwrap();
    let jobs = client.list_jobs(ListJobsRequest::default()).await.unwrap().into_inner().jobs;
    jobs.into_iter().map(|j| j.id).collect()
}

/// The sequence number of a job id `<name>-<seq>`.
pub fn seq(id: &str) -> u64 {
    id.rsplit('-').next().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("job id {id:?} has no sequence"))
}

/// Writes `path` until the disk is full.
pub fn fill(path: &Path) {
    let mut file = std::fs::File::create(path).unwrap();
    let chunk = vec![0xa5u8; 64 * 1024];
    while file.write_all(&chunk).is_ok() {}
    let _ = file.write_all(&[0]);
}

/// Writes `value` under `key` straight into a stopped controller's state file.
pub fn write_raw_record(state_file: &Path, key: &str, revision: u64, value: &[u8]) {
    let db = redb::Database::open(state_file).unwrap();
    let txn = db.begin_write().unwrap();
    txn.open_table(KV).unwrap().insert(key, (revision, value)).unwrap();
    txn.commit().unwrap();
}

/// The stored record under `key` in a stopped controller's state file: (revision, value).
pub fn read_raw_record(state_file: &Path, key: &str) -> Option<(u64, Vec<u8>)> {
    use redb::ReadableDatabase;
    let db = redb::Database::open(state_file).unwrap();
    let txn = db.begin_read().unwrap();
    let table = txn.open_table(KV).unwrap();
    let guard = table.get(key).unwrap()?;
    let (revision, value) = guard.value();
    Some((revision, value.to_vec()))
}
