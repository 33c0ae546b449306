//! CLI views of training: metrics tables, plots, progress with ETA, the
//! preflight table, staging progress bars, attempts.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use crate::connection::ApiChannel as Channel;
use cohort_proto::job_service_client::JobServiceClient;
use cohort_proto::{GetMetricsRequest, Job, PreflightTable, TrainingPoint};
use cohort_shared::metrics::{LogFormat, TrainingMetrics};
use comfy_table::{Cell, Color, Table, presets::NOTHING};

use crate::output::Output;
use cohort_proto::names::state_name;

/// Prints the job's metrics as a table or JSON (one document; JSON lines with `--follow`), optionally following.
pub async fn metrics(
    client: &mut JobServiceClient<Channel>,
    job: &str,
    follow: bool,
    out: Output,
) -> anyhow::Result<()> {
    let mut stream = client
        .get_metrics(GetMetricsRequest { job: job.into(), follow })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    if out == Output::Table {
        say!(
            "{:>10} {:>12} {:>13} {:>10} {:>10} {:>9} {:>10} {:>10}",
            "ITERATION",
            "LOSS",
            "LR",
            "GRAD NORM",
            "S/ITER",
            "MEM GiB",
            "ELAPSED",
            "REMAINING"
        );
    }
    // JSON: one document of every point, or with --follow one JSON line per point as it comes.
    let mut points = Vec::new();
    while let Some(p) = stream.message().await.map_err(|s| anyhow::anyhow!("{}", s.message()))? {
        if out == Output::Json && follow {
            crate::output::print_json_line(&p)?;
            continue;
        }
        if out == Output::Json {
            points.push(p);
            continue;
        }
        let total = p.total_iterations.map(|t| format!("/{t}")).unwrap_or_default();
        if p.is_save {
            let at = if p.iteration > 0 { p.iteration.to_string() } else { "-".into() };
            say!("{at:>10} {:>12}  (checkpoint saved)", "");
            continue;
        }
        let loss = p.loss.map(|l| format!("{l:.6}")).unwrap_or_default();
        say!(
            "{:>10} {:>12} {:>13} {:>10} {:>10} {:>9} {:>10} {:>10}{}",
            format!("{}{total}", p.iteration),
            loss,
            p.learning_rate.map(|v| format!("{v:.6e}")).unwrap_or_default(),
            p.grad_norm.map(|v| format!("{v:.3}")).unwrap_or_default(),
            p.iteration_time_s.map(|v| format!("{v:.3}")).unwrap_or_default(),
            p.memory_gib.map(|v| format!("{v:.2}")).unwrap_or_default(),
            p.elapsed_s.map(secs).unwrap_or_default(),
            p.remaining_s.map(secs).unwrap_or_default(),
            if p.is_eval { "  (eval)" } else { "" },
        );
    }
    if out == Output::Json && !follow {
        say!("{}", serde_json::to_string_pretty(&crate::json::list_document("points", &points)?)?);
    }
    Ok(())
}

/// Writes the loss / learning-rate chart of a job to a PNG or SVG file.
pub async fn plot(client: &mut JobServiceClient<Channel>, job: &str, path: &Path) -> anyhow::Result<()> {
    let mut stream = client
        .get_metrics(GetMetricsRequest { job: job.into(), follow: false })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    let mut points = Vec::new();
    while let Some(p) = stream.message().await.map_err(|s| anyhow::anyhow!("{}", s.message()))? {
        points.push(to_metrics(&p));
    }
    crate::plot::plot_training(&format!("job {job}"), &points, path)?;
    eprintln!("wrote {} ({} points)", path.display(), points.len());
    Ok(())
}

pub fn to_metrics(p: &TrainingPoint) -> TrainingMetrics {
    TrainingMetrics {
        iteration: p.iteration,
        total_iterations: p.total_iterations,
        loss: p.loss,
        learning_rate: p.learning_rate,
        grad_norm: p.grad_norm,
        iteration_time_s: p.iteration_time_s,
        throughput_tflops: p.throughput_tflops,
        memory_gib: p.memory_gib,
        elapsed_s: p.elapsed_s,
        remaining_s: p.remaining_s,
        consumed_samples: p.consumed_samples,
        global_batch_size: None,
        is_eval: p.is_eval,
        saved: p.is_save,
        format: match p.format.as_str() {
            "ms-swift-3" => LogFormat::MsSwift3,
            "ms-swift-4" => LogFormat::MsSwift4,
            _ => LogFormat::MegatronLm,
        },
    }
}

fn secs(s: f64) -> String {
    humantime::format_duration(Duration::from_secs(s.max(0.0) as u64)).to_string()
}

/// "iteration 1530/1926 (79%), loss 0.3515, ETA 7h 59m 54s".
pub fn progress_line(p: &TrainingPoint) -> String {
    let mut parts = Vec::new();
    match p.total_iterations {
        Some(total) if total > 0 => {
            parts.push(format!("iteration {}/{total} ({:.0}%)", p.iteration, 100.0 * p.iteration as f64 / total as f64))
        }
        _ => parts.push(format!("iteration {}", p.iteration)),
    }
    if let Some(loss) = p.loss {
        parts.push(format!("loss {loss:.4}"));
    }
    if let Some(lr) = p.learning_rate {
        parts.push(format!("lr {lr:.3e}"));
    }
    // The trainer's own estimate when it prints one, else time per iteration × iterations left.
    let eta = p.remaining_s.or_else(|| {
        let (total, per) = (p.total_iterations?, p.iteration_time_s?);
        Some(per * total.saturating_sub(p.iteration) as f64)
    });
    if let Some(eta) = eta {
        parts.push(format!("ETA {}", secs(eta)));
    }
    parts.join(", ")
}

/// Nodes as columns, checks as rows; a row whose values differ, or a failed
/// check, is marked `!` (and red on a terminal).
pub fn print_preflight(table: &PreflightTable) {
    let mut table = table.clone();
    // The node's own ms-swift on the job's command line, as one more row.
    for report in &mut table.nodes {
        if let Some(check) = &report.swift_argcheck {
            report.checks.push(argcheck_row(check));
        }
    }
    let table = &table;
    let mut names: Vec<String> = Vec::new();
    for report in &table.nodes {
        for check in &report.checks {
            if !names.contains(&check.name) {
                names.push(check.name.clone());
            }
        }
    }
    let mut t = Table::new();
    t.load_preset(NOTHING);
    let mut header = vec![Cell::new("CHECK")];
    header.extend(table.nodes.iter().map(|r| Cell::new(&r.node_name)));
    t.set_header(header);
    for name in &names {
        let cells: Vec<Option<&cohort_proto::PreflightCheck>> =
            table.nodes.iter().map(|r| r.checks.iter().find(|c| &c.name == name)).collect();
        let values: std::collections::BTreeSet<&str> =
            cells.iter().flatten().filter(|c| c.ok).map(|c| c.value.as_str()).collect();
        let differs = values.len() > 1;
        let failed = cells.iter().any(|c| c.is_none_or(|c| !c.ok));
        let mut row =
            vec![if differs || failed { Cell::new(format!("! {name}")).fg(Color::Red) } else { Cell::new(name) }];
        for cell in cells {
            row.push(match cell {
                Some(c) if c.ok => {
                    let cell = Cell::new(&c.value);
                    if differs { cell.fg(Color::Red) } else { cell }
                }
                Some(c) => Cell::new(format!("✗ {}", short(&c.detail))).fg(Color::Red),
                None => Cell::new("-"),
            });
        }
        t.add_row(row);
    }
    say!("{t}");
    for report in table.nodes.iter().filter(|r| !r.error.is_empty()) {
        say!("node {}: {}", report.node_name, report.error);
    }
    if table.problems.is_empty() {
        say!("no problems: the nodes agree");
    } else {
        say!("problems:");
        for p in &table.problems {
            say!("  - {p}");
        }
    }
}

/// `ms-swift argv` row: `ok (4.6.0)`, or the first refused flag, or why it could not judge.
fn argcheck_row(check: &cohort_proto::SwiftArgcheckResult) -> cohort_proto::PreflightCheck {
    let name = "ms-swift argv".to_string();
    let version = if check.ms_swift.is_empty() { String::new() } else { format!(" ({})", check.ms_swift) };
    match check.problems.first() {
        _ if !check.error.is_empty() => cohort_proto::PreflightCheck {
            name,
            value: String::new(),
            ok: false,
            detail: format!("not checked: {}", check.error),
        },
        Some(p) => cohort_proto::PreflightCheck {
            name,
            value: String::new(),
            ok: false,
            detail: format!("refuses {}{}", p.flag, if check.problems.len() > 1 { " (and more)" } else { "" }),
        },
        None => cohort_proto::PreflightCheck { name, value: format!("ok{version}"), ok: true, detail: String::new() },
    }
}

fn short(text: &str) -> String {
    let first = text.lines().next().unwrap_or_default();
    if first.chars().count() > 60 {
        format!("{}…", first.chars().take(59).collect::<String>())
    } else {
        first.to_string()
    }
}

/// The parts of `cohort status` that issue-4 features add.
pub fn print_training_status(job: &Job) {
    if let Some(p) = &job.progress {
        say!("progress:  {}", progress_line(p));
    }
    if let Some(c) = &job.resume_from {
        say!("resumes:   from iteration {} ({})", c.iteration, c.path);
    }
    if !job.staging.is_empty() {
        say!("staging:");
        for s in &job.staging {
            let total = if s.bytes_total > 0 { format!("/{}", bytes(s.bytes_total)) } else { String::new() };
            let at = if s.path.is_empty() { String::new() } else { format!(" -> {}", s.path) };
            let mut how = String::new();
            if s.bytes_from_peers > 0 {
                how = format!(" ({} from other nodes)", bytes(s.bytes_from_peers));
            }
            if !s.corrupt_peers.is_empty() {
                how.push_str(&format!(" (corrupt files from {}, fetched again elsewhere)", s.corrupt_peers.join(", ")));
            }
            say!("  {} {}: {} {}{total}{at}{how} {}", s.node_name, s.item, s.state, bytes(s.bytes_done), s.detail);
        }
    }
    for d in &job.datasets {
        say!("dataset:   {} ({} rows, {} bad, {})", d.path, d.rows, d.bad_rows, if d.ok { "ok" } else { "problems" });
        for line in d
            .report
            .lines()
            .filter(|l| l.trim_start().starts_with(&d.path) || l.trim_start().starts_with("- "))
            .take(12)
        {
            say!("  {}", line.trim());
        }
    }
    if let Some(table) = &job.preflight
        && (!table.problems.is_empty() || job.state == cohort_proto::JobState::Failed as i32)
        && !table.nodes.is_empty()
    {
        say!("preflight:");
        print_preflight(table);
    }
    if job.attempts.len() > 1 || job.attempts.iter().any(|a| a.resumed_from.is_some()) {
        let mut t = Table::new();
        t.load_preset(NOTHING).set_header(vec![
            "ATTEMPT",
            "STARTED",
            "NODES",
            "FROM CHECKPOINT",
            "ENDED",
            "CAUSE",
            "WHY",
        ]);
        for a in &job.attempts {
            t.add_row(vec![
                a.attempt.to_string(),
                time_of(a.started_unix_ms),
                a.nodes.join(","),
                a.resumed_from.as_ref().map(|c| format!("iteration {}", c.iteration)).unwrap_or_else(|| "-".into()),
                if a.finished_unix_ms > 0 {
                    format!("{} {}", state_name(a.state), time_of(a.finished_unix_ms))
                } else {
                    "-".into()
                },
                a.failure
                    .as_ref()
                    .map(|f| f.cause.clone())
                    .filter(|c| !c.is_empty())
                    .or_else(|| a.preemption.as_ref().map(|_| "preempted".into()))
                    .unwrap_or_else(|| "-".into()),
                format!("{}{}", a.reason, a.preemption.as_ref().map(lost_work).unwrap_or_default()),
            ]);
        }
        say!("attempts:");
        say!("{t}");
        let preemptions: Vec<&cohort_proto::Preemption> =
            job.attempts.iter().filter_map(|a| a.preemption.as_ref()).collect();
        if !preemptions.is_empty() {
            let lost: u64 = preemptions.iter().filter_map(|p| p.lost_iterations).sum();
            say!("preempted {} time(s), {lost} iteration(s) of work lost", preemptions.len());
        }
    }
}

/// "; at iteration 42, resumed from 40: 2 iterations lost" for a preempted attempt (what is known of it).
fn lost_work(p: &cohort_proto::Preemption) -> String {
    match (p.iteration, p.resumed_iteration, p.lost_iterations) {
        (Some(at), Some(from), Some(lost)) => {
            format!("; at iteration {at}, resumed from {from}: {lost} iterations lost")
        }
        (None, Some(from), _) => format!("; resumed from iteration {from} (work lost unknown: no iteration seen)"),
        _ => String::new(),
    }
}

fn time_of(unix_ms: i64) -> String {
    if unix_ms <= 0 {
        return "-".into();
    }
    let t = std::time::UNIX_EPOCH + Duration::from_millis(unix_ms as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

pub fn bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n => format!("{n} B"),
    }
}

/// Progress bars for staging while a job is being prepared (stderr, only on a terminal).
pub struct StageBars {
    multi: indicatif::MultiProgress,
    bars: BTreeMap<(String, String), indicatif::ProgressBar>,
}

impl StageBars {
    pub fn new() -> Self {
        Self { multi: indicatif::MultiProgress::new(), bars: BTreeMap::new() }
    }

    pub fn update(&mut self, job: &Job) {
        for s in &job.staging {
            let bar = self.bars.entry((s.node_name.clone(), s.item.clone())).or_insert_with(|| {
                let bar = self.multi.add(indicatif::ProgressBar::new(s.bytes_total.max(1)));
                if let Ok(style) = indicatif::ProgressStyle::with_template(
                    "{prefix:>24} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {msg}",
                ) {
                    bar.set_style(style.progress_chars("=> "));
                }
                bar.set_prefix(format!("{}:{}", s.node_name, s.item));
                bar
            });
            if s.bytes_total > 0 {
                bar.set_length(s.bytes_total);
            }
            bar.set_position(s.bytes_done);
            bar.set_message(s.state.clone());
            if matches!(s.state.as_str(), "ready" | "cached" | "failed") {
                bar.finish_with_message(s.state.clone());
            }
        }
    }
}

impl Default for StageBars {
    fn default() -> Self {
        Self::new()
    }
}
