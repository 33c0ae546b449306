//! Questions to agents over their sessions: a command whose answer is a
//! `QueryResult` carrying its command id (checkpoint lookups, path
//! inspections, ms-swift argument checks, staging caches).

use std::time::Duration;

use cohort_proto::QueryResult;
use cohort_proto::query_result::Result as QueryAnswer;
use tokio::sync::oneshot;

use super::{Command, Controller, State};

/// Sends `command` to `node` as a query; None when the node is not connected.
pub(super) fn ask(state: &mut State, node: &str, command: Command) -> Option<oneshot::Receiver<QueryResult>> {
    let (tx, rx) = oneshot::channel();
    let command_id = state.next_command_id;
    state.queries.insert(command_id, tx);
    if Controller::send_command(state, node, command) {
        Some(rx)
    } else {
        state.queries.remove(&command_id);
        None
    }
}

/// `node`'s answer to a query, waited for up to `within`: what it found, or
/// why there is none (no answer in time, the node gone, its own error).
pub(super) async fn answer_of(
    node: &str,
    rx: oneshot::Receiver<QueryResult>,
    within: Duration,
) -> Result<Option<QueryAnswer>, String> {
    match tokio::time::timeout(within, rx).await {
        Err(_) => Err(format!("node {node} did not answer within {within:?}")),
        Ok(Err(_)) => Err(format!("node {node} went away before answering")),
        Ok(Ok(answer)) if !answer.error.is_empty() => Err(format!("node {node}: {}", answer.error)),
        Ok(Ok(answer)) => Ok(answer.result),
    }
}

impl Controller {
    /// Drops the queries whose askers gave up waiting.
    pub(super) async fn forget_unanswered(&self) {
        self.state.call(|state, _| state.queries.retain(|_, tx| !tx.is_closed())).await;
    }
}
