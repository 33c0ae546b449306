//! Answers the controller's questions about paths on this node for pipeline
//! jobs: the digest of a model directory (conversion-cache key), the result
//! files of infer and eval runs (the report), removal of a cache entry.

use std::path::PathBuf;

use cohort_proto::{
    AgentMessage, CacheAnswer, CacheCommand, CachedContent, FileContent, InspectPathCommand, PathAnswer, QueryResult,
    agent_message::Msg, query_result::Result as QueryAnswer,
};

use crate::job_files::{AsJobUser, InspectRequest};
use crate::prepare::Preparer;
use crate::supervisor::Outbound;

/// What one answer may carry unless the controller asks for less.
const DEFAULT_MAX_BYTES: u64 = 4 << 20;

impl Preparer {
    /// Answers as the job's user (`cmd.user`, else the node's rank-user),
    /// through the `files-as` helper: a job's output or result path that
    /// links to a file only root may read is refused, and a FIFO, a device
    /// or a hung mount costs a killed helper, not the agent.
    pub async fn inspect_path(&self, command_id: u64, cmd: InspectPathCommand) {
        let request = InspectRequest {
            path: PathBuf::from(&cmd.path),
            digest: cmd.digest,
            read: cmd.read,
            suffix: cmd.suffix,
            max_bytes: if cmd.max_bytes == 0 { DEFAULT_MAX_BYTES } else { cmd.max_bytes },
            remove: cmd.remove,
        };
        let mut result = QueryResult { command_id, ..QueryResult::default() };
        match self.rank_users.resolve_blocking(&cmd.user).await {
            Err(e) => result.error = e.to_string(),
            Ok(identity) => match (AsJobUser { identity: &identity, helper: &self.helper }).inspect_path(request).await
            {
                Ok(info) => {
                    result.result = Some(QueryAnswer::Path(PathAnswer {
                        exists: info.exists,
                        digest: info.digest,
                        files: info
                            .files
                            .into_iter()
                            .map(|f| FileContent { path: f.path, truncated: f.truncated, content: f.content })
                            .collect(),
                    }));
                }
                Err(e) => result.error = e.to_string(),
            },
        }
        let _ = self.out.send(Outbound::Message(AgentMessage { msg: Some(Msg::QueryResult(result)) })).await;
    }
}

impl Preparer {
    /// `cohort cache staged` / `cohort cache evict`: lists the node's staging
    /// caches (each as its user) and removes what `cmd.evict` names.
    pub async fn answer_cache(&self, command_id: u64, cmd: CacheCommand) {
        let keeper = &self.cache_keeper;
        let (evicted, refused, listing) = if cmd.evict.is_empty() {
            (Vec::new(), Vec::new(), keeper.list().await)
        } else {
            let (evicted, refused, listing) = keeper.evict(&cmd.evict).await;
            tracing::info!(evicted = ?evicted, refused = ?refused, "staging cache content evicted by an operator");
            (evicted, refused, listing)
        };
        let ms = |t| i64::try_from(crate::cache_keeper::unix_ms(t)).unwrap_or(i64::MAX);
        // Whose cache a job without `user:` uses here (the controller's tracker keys content by the job's `user:`).
        let default_uid = self.rank_users.resolve_blocking("").await.ok().map(|identity| identity.uid);
        let answer = CacheAnswer {
            limit_bytes: keeper.max_bytes().unwrap_or(0),
            total_bytes: listing.entries.iter().map(|c| c.entry.bytes).sum(),
            entries: listing
                .entries
                .into_iter()
                .map(|c| CachedContent {
                    sha256: c.entry.sha256,
                    bytes: c.entry.bytes,
                    files: c.entry.files,
                    last_use_unix_ms: ms(c.entry.last_use),
                    user: c.user,
                    uid: c.uid,
                    pinned_by: c.pinned_by,
                    default_user: default_uid == Some(c.uid),
                })
                .collect(),
            unknown_pins: listing.unknown_pins,
            errors: listing.errors,
            evicted,
            refused,
        };
        let result = QueryResult { command_id, result: Some(QueryAnswer::Cache(answer)), ..QueryResult::default() };
        let _ = self.out.send(Outbound::Message(AgentMessage { msg: Some(Msg::QueryResult(result)) })).await;
    }
}
