//! `cohort plan`: where and how a job file would run, without launching it,
//! and (`--check`) what each node's ms-swift says of its command line.

use std::process::ExitCode;

use cohort_proto::job_service_client::JobServiceClient;
use cohort_proto::{JobFile, ListNodesRequest, PlanJobRequest, PlanJobResponse};

use crate::connection::ApiChannel as Channel;
use crate::output::{Output, print_json, status_error};

pub(crate) async fn plan(
    client: &mut JobServiceClient<Channel>,
    file: JobFile,
    check: bool,
    out: Output,
) -> anyhow::Result<ExitCode> {
    let source = file.source_name.clone();
    let response =
        client.plan_job(PlanJobRequest { file: Some(file), check }).await.map_err(status_error)?.into_inner();
    if out == Output::Json {
        print_json(&response)?;
        return Ok(plan_exit(&response));
    }
    for warning in &response.warnings {
        eprintln!("warning: {warning}");
    }
    if !response.problems.is_empty() {
        eprintln!("job file {source}: {} problem(s)", response.problems.len());
        for p in &response.problems {
            eprintln!("  {}", problem_line(&source, p));
        }
        return Ok(plan_exit(&response));
    }
    if !response.stages.is_empty() {
        crate::pipeline::print_stage_plans(&response.stages);
        return Ok(plan_exit(&response));
    }
    if !response.parallel_layout.is_empty() {
        say!("parallel layout: {}", response.parallel_layout);
    }
    if let Some(gib) = response.memory_estimate_gib {
        say!("memory estimate: {gib:.1} GiB per GPU (weights, gradients, optimizer state; activations not included)");
    }
    // The per-job directory a job without `workdir:` runs in is under each agent's --work-dir.
    let mut work_dirs = std::collections::HashMap::new();
    if response.plan.as_ref().is_some_and(|p| p.nodes.iter().any(|n| n.workdir.is_empty()))
        && let Ok(nodes) = client.list_nodes(ListNodesRequest {}).await
    {
        work_dirs = nodes.into_inner().nodes.into_iter().filter_map(|n| n.info).map(|i| (i.name, i.work_dir)).collect();
    }
    match &response.plan {
        Some(plan) => {
            say!("master: {}:{}", plan.master_addr, plan.master_port);
            for note in &plan.notes {
                say!("note: {note}");
            }
            for node in &plan.nodes {
                let gpus: Vec<String> = node.gpu_indices.iter().map(u32::to_string).collect();
                say!();
                say!(
                    "node {} ({}): node rank {}, GPUs [{}]",
                    node.node_name,
                    node.address,
                    node.node_rank,
                    gpus.join(",")
                );
                if node.workdir.is_empty() {
                    // Where the agent runs a job without `workdir:` (agent/src/supervisor.rs).
                    let base = work_dirs
                        .get(&node.node_name)
                        .filter(|d| !d.is_empty())
                        .map_or("<agent --work-dir>", String::as_str);
                    say!(
                        "  workdir: {base}/jobs/<job id>/workdir (none set: the agent's per-job directory, on this node's own disk)"
                    );
                } else {
                    say!("  workdir: {}", node.workdir);
                }
                for process in &node.processes {
                    if node.processes.len() > 1 {
                        say!("  process {}:", process.index);
                    }
                    for var in &process.env {
                        say!("  {}={}", var.name, var.value);
                    }
                    say!("  command: {}", shell_words::join(&process.argv));
                }
            }
        }
        None => say!("not placeable now: {}", response.placement_error),
    }
    if !response.node_problems.is_empty() {
        eprintln!("the nodes' environment refuses this job ({}):", response.node_problems.len());
        for p in &response.node_problems {
            eprintln!("  - {p}");
        }
        eprintln!(
            "install the packages on those nodes, or point `python:` in the job file at an interpreter that has them"
        );
    }
    if check {
        print_swift_checks(&response.checks);
    }
    Ok(plan_exit(&response))
}

/// `cohort plan --check`: per node environment, what its own ms-swift said.
fn print_swift_checks(checks: &[cohort_proto::EnvironmentCheck]) {
    say!();
    if checks.is_empty() {
        say!("ms-swift check: nothing to check (the job runs no ms-swift command, or no node is connected)");
        return;
    }
    say!("ms-swift check, one node per environment:");
    for check in checks {
        say!("  environment: {}", check.environment);
        say!("    nodes: {}", check.nodes.join(", "));
        match &check.result {
            None => say!("    not checked: {}", check.error),
            Some(r) if !r.error.is_empty() => say!("    not checked on {}: {}", check.node, r.error),
            Some(r) => {
                let version =
                    if r.ms_swift.is_empty() { "ms-swift".into() } else { format!("ms-swift {}", r.ms_swift) };
                if r.problems.is_empty() {
                    say!("    {} ({version}): {} ok", check.node, r.command);
                }
                for p in &r.problems {
                    say!("    node {} ({version}) refuses {}: {}", check.node, p.flag, p.message);
                }
            }
        }
    }
}

/// `file:line: field: message`, leaving out what the problem does not have.
fn problem_line(source: &str, p: &cohort_proto::SpecProblem) -> String {
    let at = if p.line == 0 { source.to_owned() } else { format!("{source}:{}", p.line) };
    if p.field.is_empty() { format!("{at}: {}", p.message) } else { format!("{at}: {}: {}", p.field, p.message) }
}

/// Whether every environment's ms-swift took the command line.
fn swift_checks_ok(checks: &[cohort_proto::EnvironmentCheck]) -> bool {
    checks.iter().all(|c| c.result.as_ref().is_some_and(|r| r.error.is_empty() && r.problems.is_empty() && r.ok))
}

fn plan_exit(response: &PlanJobResponse) -> ExitCode {
    if !response.problems.is_empty() {
        ExitCode::from(2)
    } else if !swift_checks_ok(&response.checks) || !response.node_problems.is_empty() {
        ExitCode::from(4)
    } else if response.plan.is_none() && response.stages.is_empty() {
        // Not placeable now (a pipeline has no plan of its own: its stages are placed as they start).
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_problem_line_has_no_empty_field() {
        use cohort_proto::SpecProblem;
        let p = |field: &str, line| SpecProblem { field: field.into(), line, message: "not valid YAML".into() };
        assert_eq!(super::problem_line("syn.yaml", &p("", 5)), "syn.yaml:5: not valid YAML");
        assert_eq!(super::problem_line("syn.yaml", &p("nodes", 3)), "syn.yaml:3: nodes: not valid YAML");
        assert_eq!(super::problem_line("syn.yaml", &p("", 0)), "syn.yaml: not valid YAML");
    }
}
