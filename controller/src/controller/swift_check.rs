//! The node's own ms-swift decides (issue 13): which ms-swift command a job
//! runs, what its argv is, and how a node's answer refuses a launch.
//!
//! The agent runs the rendered argv through the installed ms-swift's parser
//! (agent/src/preflight/swift_argcheck.py) with the job's interpreter; this
//! module builds the request and turns the answers into refusal lines.

use std::collections::BTreeMap;
use std::time::Duration;

use cohort_proto::{
    EnvironmentCheck, PreflightReport, SwiftArgcheckCommand, SwiftArgcheckResult, query_result::Result as QueryAnswer,
};
use cohort_shared::spec::{JobSpec, Workload};

use super::queries::{answer_of, ask};
use super::{Command, Controller};
use crate::planner::{command_line, job_env, swift_argcheck::for_job};

/// How long `cohort plan --check` waits for a node (the agent gives the check 120 s).
const CHECK_TIMEOUT: Duration = Duration::from_secs(130);
/// The preflight rows whose versions make an environment.
const ENVIRONMENT: &[&str] = &["python", "torch", "swift", "megatron.core"];

/// Whether a megatron-sft job needs transformer_engine: not when it asks for
/// Megatron's own layers (`transformer_impl: local`, Megatron-LM
/// megatron/training/arguments.py `--transformer-impl`, choices local and
/// transformer_engine, default transformer_engine; ms-swift 3.x passes it on
/// from swift/megatron/argument/megatron_args.py `transformer_impl`).
pub(super) fn needs_transformer_engine(spec: &JobSpec) -> bool {
    let Workload::MegatronSft(m) = &spec.workload else { return false };
    let flag = m.scalar("transformer_impl").map(str::to_owned);
    // `extra_args: [--transformer_impl, local]` (or `--transformer_impl=local`) says the same.
    let extra = m.extra_args.iter().enumerate().find_map(|(i, a)| match a.strip_prefix("--transformer_impl") {
        Some("") => m.extra_args.get(i + 1).cloned(),
        Some(rest) => rest.strip_prefix('=').map(str::to_owned),
        None => None,
    });
    extra.or(flag).is_none_or(|v| v.trim() != "local")
}

/// `node node1 (ms-swift 4.6.0) refuses --num_workers: not a flag of ...`,
/// one line per refused flag of each node's answer.
pub(super) fn refusals(reports: &[PreflightReport]) -> Vec<String> {
    reports
        .iter()
        .filter_map(|r| r.swift_argcheck.as_ref().map(|c| (r.node_name.as_str(), c)))
        .flat_map(|(node, check)| refusal_lines(node, check))
        .collect()
}

/// The refusal lines of one node's answer (none when it accepted or could not judge).
pub(super) fn refusal_lines(node: &str, check: &SwiftArgcheckResult) -> Vec<String> {
    let version =
        if check.ms_swift.is_empty() { "ms-swift".to_owned() } else { format!("ms-swift {}", check.ms_swift) };
    check
        .problems
        .iter()
        .map(|p| {
            let flag = if p.flag.is_empty() { "the command line".to_owned() } else { p.flag.clone() };
            format!("node {node} ({version}) refuses {flag}: {}", p.message)
        })
        .collect()
}

/// "python 3.12.3, torch 2.11.0, swift 3.12.6, megatron.core 0.15.3" from a start-up report.
fn environment_of(report: Option<&PreflightReport>) -> String {
    let Some(report) = report.filter(|r| !r.checks.is_empty()) else {
        return "unknown (no preflight report from the node yet)".into();
    };
    ENVIRONMENT
        .iter()
        .map(|name| {
            let value = report.checks.iter().find(|c| c.name == *name && c.ok).map(|c| c.value.as_str());
            format!("{name} {}", value.unwrap_or("missing"))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

impl Controller {
    /// `cohort plan --check`: one connected Ready node per distinct environment
    /// parses the job's ms-swift command line with its own ms-swift. Nothing is
    /// prepared or launched. Empty when the job runs no ms-swift command.
    pub async fn check_swift_args(&self, spec: &JobSpec) -> Vec<EnvironmentCheck> {
        let Some(check) = for_job(spec, &command_line(spec).0) else { return Vec::new() };
        let spec = spec.clone();
        let pending = self
            .state
            .call(move |state, _| {
                let mut pending = Vec::new();
                let mut environments: BTreeMap<String, Vec<String>> = BTreeMap::new();
                for node in state.nodes.values().filter(|n| n.is_connected()) {
                    environments
                        .entry(environment_of(node.preflight.as_ref()))
                        .or_default()
                        .push(node.info.name.clone());
                }
                for (environment, mut nodes) in environments {
                    nodes.sort();
                    let node = nodes[0].clone();
                    let command = SwiftArgcheckCommand {
                        check: Some(check.clone()),
                        python: spec.python.clone().unwrap_or_default(),
                        user: spec.user.clone().unwrap_or_default(),
                        env: job_env(
                            &spec,
                            state.nodes.get(&node).map(|n| n.info.node_env.as_slice()).unwrap_or_default(),
                        ),
                        workdir: spec.workdir.clone().unwrap_or_default(),
                    };
                    let entry = EnvironmentCheck { nodes, environment, node: node.clone(), ..Default::default() };
                    pending.push((entry, ask(state, &node, Command::SwiftArgcheck(command))));
                }
                pending
            })
            .await;
        let answers = futures::future::join_all(pending.into_iter().map(|(mut entry, rx)| async move {
            let Some(rx) = rx else {
                entry.error = format!("node {} is not connected", entry.node);
                return entry;
            };
            match answer_of(&entry.node, rx, CHECK_TIMEOUT).await {
                Err(error) => entry.error = error,
                Ok(Some(QueryAnswer::SwiftArgcheck(result))) => entry.result = Some(result),
                Ok(_) => entry.error = format!("node {} answered something else", entry.node),
            }
            entry
        }))
        .await;
        self.forget_unanswered().await;
        answers
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use cohort_proto::SwiftFlagProblem;

    fn spec(text: &str) -> JobSpec {
        JobSpec::from_yaml(text, "job.yaml").unwrap()
    }

    #[test]
    fn transformer_engine_is_needed_unless_the_job_asks_for_local_layers() {
        let base =
            "name: a\nkind: megatron-sft\nnodes: 1\ngpus_per_node: 1\nmegatron:\n  swift_version: 3\n  load: m\n";
        assert!(needs_transformer_engine(&spec(base)));
        assert!(!needs_transformer_engine(&spec(&format!("{base}  transformer_impl: local\n"))));
        assert!(needs_transformer_engine(&spec(&format!("{base}  transformer_impl: transformer_engine\n"))));
        assert!(!needs_transformer_engine(&spec(&format!("{base}  extra_args: [--transformer_impl, local]\n"))));
        assert!(!needs_transformer_engine(&spec(&format!("{base}  extra_args: [--transformer_impl=local]\n"))));
    }

    #[test]
    fn an_environment_is_the_python_torch_swift_and_megatron_versions() {
        let check = |name: &str, value: &str, ok: bool| cohort_proto::PreflightCheck {
            name: name.into(),
            value: value.into(),
            ok,
            detail: String::new(),
        };
        let report = PreflightReport {
            checks: vec![
                check("python", "3.12.1", true),
                check("torch", "2.11.0", true),
                check("transformer_engine", "2.1", true),
                check("swift", "", false),
                check("megatron.core", "0.15.3", true),
            ],
            ..Default::default()
        };
        // transformer_engine does not split environments: the parse does not depend on it.
        assert_eq!(environment_of(Some(&report)), "python 3.12.1, torch 2.11.0, swift missing, megatron.core 0.15.3");
        assert!(environment_of(None).starts_with("unknown"));
    }

    #[test]
    fn a_refusal_names_the_node_the_version_and_the_flag() {
        let report = PreflightReport {
            node_name: "node1".into(),
            swift_argcheck: Some(SwiftArgcheckResult {
                command: "megatron-sft".into(),
                ms_swift: "4.6.0".into(),
                problems: vec![SwiftFlagProblem {
                    flag: "--num_workers".into(),
                    message: "not a flag of megatron sft (did you mean --dataloader_num_workers?)".into(),
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            refusals(&[report]),
            [
                "node node1 (ms-swift 4.6.0) refuses --num_workers: not a flag of megatron sft (did you mean --dataloader_num_workers?)"
            ]
        );
    }
}
