//! `cohort cache staged` and `cohort cache evict`: the nodes' staging caches,
//! asked of the agents over their sessions (each lists every user's cache
//! as that user, see agent/src/cache_keeper.rs).

use std::time::Duration;

use cohort_proto::{CacheCommand, NodeCache, query_result::Result as QueryAnswer};

use super::queries::{answer_of, ask};
use super::{Command, Controller, ControllerError, unknown_node};

/// How long a node has to list (or evict from) its caches.
const CACHE_TIMEOUT: Duration = Duration::from_secs(60);

impl Controller {
    /// The staging caches of `node` (empty: of every connected node), by node name.
    pub async fn node_caches(&self, node: &str) -> Result<Vec<NodeCache>, ControllerError> {
        self.ask_caches(node, CacheCommand::default()).await
    }

    /// Removes `digests` from the staging caches of `node`; what the node did.
    pub async fn evict_node_cache(&self, node: &str, digests: Vec<String>) -> Result<NodeCache, ControllerError> {
        if node.trim().is_empty() {
            return Err(ControllerError::InvalidRequest("EvictNodeCacheRequest.node: name the node".into()));
        }
        if digests.is_empty() {
            return Err(ControllerError::InvalidRequest(
                "EvictNodeCacheRequest.sha256: name at least one digest (`cohort cache staged` lists them)".into(),
            ));
        }
        if let Some(bad) = digests.iter().find(|d| !is_hex_digest(d)) {
            return Err(ControllerError::InvalidRequest(format!(
                "EvictNodeCacheRequest.sha256: {bad:?} is not 64 hex digits; give the whole digest"
            )));
        }
        let digests: Vec<String> = digests.into_iter().map(|d| d.to_ascii_lowercase()).collect();
        let (name, gone) = (node.trim().to_owned(), digests.clone());
        // Peers are not sent to fetch it there any more (see `content`).
        self.state.call(move |state, _| gone.iter().for_each(|digest| state.content.evicted(&name, digest))).await;
        let mut answers = self.ask_caches(node, CacheCommand { evict: digests }).await?;
        Ok(answers.pop().unwrap_or_default())
    }

    /// Learns what `node`'s caches hold when its session opens, so that a
    /// controller that restarted or took over sends peers to content staged
    /// before it (see `content`): each complete content under its user's
    /// name, and under `""` (a job without `user:`) when it is the node's
    /// rank-user's. Only for a node that serves peers; a failure is logged
    /// and costs only a read of the source.
    pub async fn learn_holdings(&self, node: &str) {
        let name = node.to_owned();
        let serves =
            self.state.call(move |state, _| state.nodes.get(&name).is_some_and(|n| n.peer_address().is_some()));
        if !serves.await {
            return;
        }
        let answer = match self.ask_caches(node, CacheCommand::default()).await {
            Ok(mut answers) => answers.pop().unwrap_or_default(),
            Err(e) => {
                tracing::warn!(node, error = %e, "cannot learn what the node's caches hold");
                return;
            }
        };
        let Some(cache) = answer.cache else {
            tracing::warn!(node, error = %answer.error, "cannot learn what the node's caches hold");
            return;
        };
        let held: Vec<(String, String)> = cache
            .entries
            .into_iter()
            .filter(|c| is_hex_digest(&c.sha256))
            .flat_map(|c| {
                let digest = c.sha256.to_ascii_lowercase();
                let default = c.default_user.then(|| (String::new(), digest.clone()));
                std::iter::once((c.user, digest)).chain(default)
            })
            .collect();
        let (name, contents) = (node.to_owned(), held.len());
        self.state
            .call(move |state, _| held.iter().for_each(|(user, digest)| state.content.held(&name, user, digest)))
            .await;
        tracing::info!(node, contents, "learnt what the node's caches hold");
    }

    async fn ask_caches(&self, node: &str, command: CacheCommand) -> Result<Vec<NodeCache>, ControllerError> {
        let node = node.trim().to_owned();
        let pending = self
            .state
            .call(move |state, _| {
                let names: Vec<String> = if node.is_empty() {
                    state.nodes.values().filter(|n| n.is_connected()).map(|n| n.info.name.clone()).collect()
                } else if state.nodes.contains_key(&node) {
                    vec![node.clone()]
                } else {
                    return Err(unknown_node(&node));
                };
                Ok(names
                    .into_iter()
                    .map(|name| {
                        let rx = ask(state, &name, Command::Cache(command.clone()));
                        (name, rx)
                    })
                    .collect::<Vec<_>>())
            })
            .await?;
        let mut answers = futures::future::join_all(pending.into_iter().map(|(node, rx)| async move {
            let mut answer = NodeCache { node: node.clone(), ..Default::default() };
            let Some(rx) = rx else {
                answer.error = format!("node {node} is not connected");
                return answer;
            };
            match answer_of(&node, rx, CACHE_TIMEOUT).await {
                Err(error) => answer.error = error,
                Ok(Some(QueryAnswer::Cache(cache))) => answer.cache = Some(cache),
                Ok(_) => answer.error = format!("node {node} answered something else"),
            }
            answer
        }))
        .await;
        self.forget_unanswered().await;
        answers.sort_by(|a, b| a.node.cmp(&b.node));
        Ok(answers)
    }
}

/// 64 hex digits, either case (what the caches list and evict, lowercased after).
pub(super) fn is_hex_digest(digest: &str) -> bool {
    digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit())
}
