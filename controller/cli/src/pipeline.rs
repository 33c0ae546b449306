//! `cohort` verbs and views of pipeline jobs: the stage graph in `cohort
//! status`, `cohort report`, `cohort cache ls|rm`.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use crate::connection::ApiChannel as Channel;
use anyhow::Context;
use cohort_proto::job_service_client::JobServiceClient;
use cohort_proto::{
    GetReportRequest, Job, ListConversionCacheRequest, PipelineStage, RemoveConversionCacheRequest, StagePlan,
    StageState,
};
use comfy_table::{Table, presets::NOTHING};

use crate::output::Output;
use cohort_proto::names::stage_state_name;

/// How long a stage ran (or has been running).
fn stage_duration(stage: &PipelineStage) -> String {
    if stage.started_unix_ms <= 0 {
        return String::new();
    }
    let end = if stage.finished_unix_ms > 0 { stage.finished_unix_ms } else { cohort_proto::now_unix_ms() };
    let secs = ((end - stage.started_unix_ms).max(0) / 1000) as u64;
    humantime::format_duration(Duration::from_secs(secs)).to_string()
}

/// The stages as a small graph: each stage under the last stage it depends
/// on, with its other dependencies named; state, duration, runs and why.
pub fn stage_graph(stages: &[PipelineStage]) -> Vec<String> {
    let names: Vec<&str> = stages.iter().map(|s| s.name.as_str()).collect();
    let mut children: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    let mut roots = Vec::new();
    for (index, stage) in stages.iter().enumerate() {
        match stage.depends_on.iter().rev().find(|d| names.contains(&d.as_str())) {
            Some(parent) => children.entry(parent.as_str()).or_default().push(index),
            None => roots.push(index),
        }
    }
    let mut rows = Vec::new();
    fn walk(
        index: usize,
        prefix: &str,
        last: bool,
        root: bool,
        stages: &[PipelineStage],
        children: &BTreeMap<&str, Vec<usize>>,
        rows: &mut Vec<(String, usize)>,
    ) {
        let branch = if root {
            ""
        } else if last {
            "└─ "
        } else {
            "├─ "
        };
        rows.push((format!("{prefix}{branch}{}", stages[index].name), index));
        let deeper = if root { prefix.to_string() } else { format!("{prefix}{}", if last { "   " } else { "│  " }) };
        let kids = children.get(stages[index].name.as_str()).cloned().unwrap_or_default();
        for (i, child) in kids.iter().enumerate() {
            walk(*child, &deeper, i + 1 == kids.len(), false, stages, children, rows);
        }
    }
    for root in &roots {
        walk(*root, "", true, true, stages, &children, &mut rows);
    }
    let mut t = Table::new();
    t.load_preset(NOTHING).set_header(["STAGE", "KIND", "STATE", "DURATION", "RUNS", "DETAIL"]);
    for (label, index) in rows {
        let stage = &stages[index];
        let mut detail = stage.reason.clone();
        let others: Vec<&str> = stage.depends_on.iter().rev().skip(1).map(String::as_str).collect();
        if !others.is_empty() {
            let also = format!("also after {}", others.join(", "));
            detail = if detail.is_empty() { also } else { format!("{detail}; {also}") };
        }
        if stage.state == StageState::Cached as i32 || (!stage.cache_key.is_empty() && detail.is_empty()) {
            detail = format!("cache key {} → {}", stage.cache_key, stage.output);
        }
        if !stage.checkpoint.is_empty() {
            detail = format!("checkpoint {}", stage.checkpoint);
        }
        t.add_row([
            label,
            stage.kind.clone(),
            stage_state_name(stage.state).to_string(),
            stage_duration(stage),
            stage.runs.join(" "),
            detail,
        ]);
    }
    t.to_string().lines().map(str::to_owned).collect()
}

/// The `stages:` part of `cohort status`.
pub fn print_stages(job: &Job) {
    if job.stages.is_empty() {
        if !job.pipeline_id.is_empty() {
            say!("pipeline:  stage {} of {}", job.pipeline_stage, job.pipeline_id);
        }
        return;
    }
    say!("stages:");
    for line in stage_graph(&job.stages) {
        say!("  {line}");
    }
    if job.report_ready {
        say!("report:    cohort report {}", job.id);
    }
}

/// `cohort plan` of a pipeline: each stage in the order it runs, and for each of its runs the
/// size, the environment that matters and the command line.
pub fn stage_plan_lines(stages: &[StagePlan]) -> Vec<String> {
    let mut lines = vec![format!(
        "pipeline of {} stage(s), each placed when it starts; what earlier stages produce shows as <stage NAME: output>",
        stages.len()
    )];
    for stage in stages {
        let after = if stage.depends_on.is_empty() {
            String::new()
        } else {
            format!(", after {}", stage.depends_on.join(", "))
        };
        lines.push(String::new());
        lines.push(format!("stage {} ({}{after})", stage.name, stage.kind));
        for run in &stage.runs {
            let indent = if run.part.is_empty() {
                "  ".to_owned()
            } else {
                lines.push(format!("  {}:", run.part));
                "    ".to_owned()
            };
            lines.push(format!("{indent}{} node(s) × {} GPU(s)", run.nodes, run.gpus_per_node));
            for var in &run.env {
                lines.push(format!("{indent}{}={}", var.name, var.value));
            }
            lines.push(format!("{indent}command: {}", shell_words::join(&run.argv)));
        }
    }
    lines
}

pub fn print_stage_plans(stages: &[StagePlan]) {
    for line in stage_plan_lines(stages) {
        say!("{line}");
    }
}

/// Writes the report as report.md and report.html into `dir`.
pub async fn report(client: &mut JobServiceClient<Channel>, job: &str, dir: &Path) -> anyhow::Result<()> {
    let report = client
        .get_report(GetReportRequest { job: job.into() })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for (name, text) in [("report.md", &report.markdown), ("report.html", &report.html)] {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    say!("{}", report.markdown);
    Ok(())
}

pub async fn cache_ls(client: &mut JobServiceClient<Channel>, out: Output) -> anyhow::Result<()> {
    let response = client
        .list_conversion_cache(ListConversionCacheRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    if out == Output::Json {
        return crate::output::print_json(&response);
    }
    let mut t = Table::new();
    t.load_preset(NOTHING).set_header(["KEY", "MODEL", "TP", "PP", "SWIFT", "PATH", "CREATED BY", "HITS", "LAST USED"]);
    for e in &response.entries {
        let secs = ((cohort_proto::now_unix_ms() - e.last_used_unix_ms).max(0) / 1000) as u64;
        t.add_row([
            e.key.clone(),
            e.model.clone(),
            e.tensor_model_parallel_size.to_string(),
            e.pipeline_model_parallel_size.to_string(),
            format!("{}.x", e.swift_version),
            e.path.clone(),
            e.created_by.clone(),
            e.hits.to_string(),
            format!("{} ago", humantime::format_duration(Duration::from_secs(secs))),
        ]);
    }
    say!("{t}");
    Ok(())
}

pub async fn cache_rm(client: &mut JobServiceClient<Channel>, key: &str) -> anyhow::Result<()> {
    let entry = client
        .remove_conversion_cache(RemoveConversionCacheRequest { key: key.into() })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    say!("removed {} ({})", entry.key, entry.path);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage(name: &str, deps: &[&str], state: StageState) -> PipelineStage {
        PipelineStage {
            name: name.into(),
            kind: "command".into(),
            depends_on: deps.iter().map(|d| d.to_string()).collect(),
            state: state as i32,
            ..PipelineStage::default()
        }
    }

    #[test]
    fn graph_nests_stages_under_their_last_dependency() {
        let stages = [
            stage("convert", &[], StageState::Cached),
            stage("sft", &["convert"], StageState::Running),
            stage("export", &["sft"], StageState::Waiting),
            stage("answers", &["export"], StageState::Waiting),
            stage("bench", &["sft", "export"], StageState::Waiting),
        ];
        let lines = stage_graph(&stages);
        // The STAGE column, whatever padding the table style puts around it.
        let header = &lines[0];
        let pad = header.len() - header.trim_start().len();
        let width = header.find("KIND").unwrap_or(header.len());
        let firsts: Vec<String> = lines
            .iter()
            .map(|l| l.chars().skip(pad).take(width - pad).collect::<String>().trim_end().to_string())
            .collect();
        assert_eq!(
            firsts[1..],
            ["convert", "└─ sft", "   └─ export", "      ├─ answers", "      └─ bench"],
            "{lines:#?}"
        );
        assert!(lines[5].contains("also after sft"), "{lines:#?}");
        assert!(lines[1].contains("Cached") && lines[2].contains("Running"), "{lines:#?}");
    }
}
