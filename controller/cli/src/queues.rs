//! `cohort queues`, `cohort queue set|delete` (admin) and `cohort usage`
//! (GPU-hours per user and queue, like Slurm's sreport).

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Subcommand, ValueEnum};
use cohort_proto::job_service_client::JobServiceClient;
use cohort_proto::{
    DeleteQueueRequest, GetUsageRequest, GetUsageResponse, LabelQuotaSpec, ListQueuesRequest, QueueSpec, UsageRow,
};

use crate::connection::ApiChannel as Channel;
use crate::output::{Format, Output, print_json, status_error, table};

#[derive(Subcommand, Debug)]
pub enum QueueVerb {
    /// Create a queue, or change the flags given of an existing one (admin).
    Set {
        name: String,
        #[command(flatten)]
        flags: QueueFlags,
        #[command(flatten)]
        format: Format,
    },
    /// Delete a queue with no pending or running job (admin); not the default queue.
    Delete { name: String },
}

/// What `cohort queue set` changes; a flag left out keeps the queue's value
/// (a new queue: no quota, weight 1, no maximum run time, everyone, borrowing).
#[derive(clap::Args, Debug, Default)]
pub struct QueueFlags {
    /// Its GPU quota; `none` for no quota.
    #[arg(long)]
    gpus: Option<String>,
    /// Its fair-share weight (> 0).
    #[arg(long)]
    weight: Option<f64>,
    /// The time limit of its jobs that set none (`24h`; `none` for none).
    #[arg(long)]
    max_run_time: Option<String>,
    /// Token users who may submit, comma-separated (`*` for everyone).
    #[arg(long, value_delimiter = ',')]
    users: Option<Vec<String>>,
    /// Whether its jobs may run on idle GPUs beyond its quota.
    #[arg(long)]
    borrow: Option<bool>,
    /// Whether its jobs within its quota may preempt borrowers of its lent GPUs (`true` for a new queue).
    #[arg(long)]
    reclaim: Option<bool>,
    /// Whether its jobs may preempt the queue's own jobs of lower priority (`false` for a new queue).
    #[arg(long)]
    preempt_lower_priority: Option<bool>,
    /// A quota on nodes with a label, KEY=VALUE:GPUS (`gpu=h100:16`); repeat it; replaces them all.
    #[arg(long = "gpus-by-label")]
    gpus_by_label: Vec<String>,
}

impl QueueFlags {
    /// `spec` with these flags applied; the error names the flag and the fix.
    pub fn apply(&self, mut spec: QueueSpec) -> anyhow::Result<QueueSpec> {
        if let Some(gpus) = &self.gpus {
            spec.gpus = match gpus.as_str() {
                "none" => None,
                n => Some(n.parse().map_err(|_| anyhow::anyhow!("--gpus {n:?}: give a number of GPUs, or `none`"))?),
            };
        }
        if let Some(weight) = self.weight {
            if !(weight.is_finite() && weight > 0.0) {
                anyhow::bail!("--weight {weight}: give a number above 0, e.g. 2");
            }
            spec.weight = weight;
        }
        if let Some(max) = &self.max_run_time {
            spec.max_run_time_ms = match max.as_str() {
                "none" => 0,
                text => humantime::parse_duration(text)
                    .map_err(|e| anyhow::anyhow!("--max-run-time {text:?}: {e}; e.g. `24h`, or `none`"))?
                    .as_millis()
                    .try_into()
                    .unwrap_or(i64::MAX),
            };
        }
        if let Some(users) = &self.users {
            spec.users = users.iter().filter(|u| *u != "*").cloned().collect();
        }
        if let Some(borrow) = self.borrow {
            spec.borrow = borrow;
        }
        if let Some(reclaim) = self.reclaim {
            spec.reclaim = Some(reclaim);
        }
        if let Some(preempt) = self.preempt_lower_priority {
            spec.preempt_lower_priority = preempt;
        }
        if !self.gpus_by_label.is_empty() {
            spec.label_quotas = self.gpus_by_label.iter().map(|l| label_quota(l)).collect::<anyhow::Result<_>>()?;
        }
        Ok(spec)
    }
}

fn label_quota(text: &str) -> anyhow::Result<LabelQuotaSpec> {
    let parsed = text.rsplit_once(':').and_then(|(label, gpus)| Some((label, gpus.parse().ok()?)));
    let Some((label, gpus)) = parsed.filter(|(l, _)| l.contains('=')) else {
        anyhow::bail!("--gpus-by-label {text:?}: write KEY=VALUE:GPUS, e.g. gpu=h100:16");
    };
    Ok(LabelQuotaSpec { label: label.to_string(), gpus })
}

/// `cohort queues`.
pub async fn queues(client: &mut JobServiceClient<Channel>, out: Output) -> anyhow::Result<ExitCode> {
    let list = client.list_queues(ListQueuesRequest {}).await.map_err(status_error)?.into_inner();
    if out == Output::Json {
        print_json(&list)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut t = table(&[
        "QUEUE", "WEIGHT", "QUOTA", "USED", "BORROWED", "LENT", "RUNNING", "WAITING", "SHARE", "TARGET", "MAX RUN",
        "USERS",
    ]);
    for q in &list.queues {
        let spec = q.spec.clone().unwrap_or_default();
        let name = if q.is_default { format!("{} (default)", spec.name) } else { spec.name.clone() };
        let mut quota = spec.gpus.map_or("-".to_string(), |g| g.to_string());
        for l in &spec.label_quotas {
            quota.push_str(&format!(" {}:{}", l.label, l.gpus));
        }
        t.add_row(vec![
            name,
            format!("{}", spec.weight),
            quota,
            q.used_gpus.to_string(),
            q.borrowed_gpus.to_string(),
            q.lent_gpus.to_string(),
            q.running_jobs.to_string(),
            q.pending_jobs.to_string(),
            format!("{:.0}%", q.usage_share * 100.0),
            format!("{:.0}%", q.target_share * 100.0),
            match spec.max_run_time_ms {
                0 => "-".to_string(),
                ms => humantime::format_duration(Duration::from_millis(ms as u64)).to_string(),
            },
            if spec.users.is_empty() { "*".to_string() } else { spec.users.join(",") },
        ]);
    }
    say!("{t}");
    Ok(ExitCode::SUCCESS)
}

/// `cohort queue set|delete`.
pub async fn queue(client: &mut JobServiceClient<Channel>, verb: QueueVerb) -> anyhow::Result<ExitCode> {
    match verb {
        QueueVerb::Set { name, flags, format } => {
            let list = client.list_queues(ListQueuesRequest {}).await.map_err(status_error)?.into_inner();
            let old = list.queues.into_iter().filter_map(|q| q.spec).find(|s| s.name == name);
            let base = old.unwrap_or(QueueSpec {
                name: name.clone(),
                weight: 1.0,
                borrow: true,
                reclaim: Some(true),
                ..QueueSpec::default()
            });
            let status = client.set_queue(flags.apply(base)?).await.map_err(status_error)?.into_inner();
            if format.output == Output::Json {
                print_json(&status)?;
            } else {
                say!("queue {name} set");
            }
        }
        QueueVerb::Delete { name } => {
            client.delete_queue(DeleteQueueRequest { name: name.clone() }).await.map_err(status_error)?;
            say!("queue {name} deleted");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// How `cohort usage` groups its rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum UsageBy {
    User,
    Queue,
    /// One row per user and queue.
    Both,
}

/// `cohort usage -o`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum UsageOutput {
    Table,
    Json,
    Csv,
}

/// `--since`: a duration back from now (`7d`), an RFC 3339 time or a date (UTC).
pub fn parse_since(text: &str, now_unix_ms: i64) -> anyhow::Result<i64> {
    if let Ok(back) = humantime::parse_duration(text) {
        return Ok(now_unix_ms.saturating_sub(i64::try_from(back.as_millis()).unwrap_or(i64::MAX)).max(0));
    }
    let full = if text.len() == 10 { format!("{text}T00:00:00Z") } else { text.to_string() };
    let at = humantime::parse_rfc3339_weak(&full).map_err(|_| {
        anyhow::anyhow!("--since {text:?}: give a duration back from now (`7d`), a date (`2026-12-01`) or a time (`2026-12-01T08:00:00Z`)")
    })?;
    let ms = at.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
    Ok(i64::try_from(ms).unwrap_or(i64::MAX))
}

/// Rows summed by user or by queue (the other key left empty).
pub fn group(rows: Vec<UsageRow>, by: UsageBy) -> Vec<UsageRow> {
    if by == UsageBy::Both {
        return rows;
    }
    let mut grouped: BTreeMap<String, UsageRow> = BTreeMap::new();
    for row in rows {
        let key = if by == UsageBy::User { row.user.clone() } else { row.queue.clone() };
        let sum = grouped.entry(key.clone()).or_insert_with(|| match by {
            UsageBy::User => UsageRow { user: key, ..UsageRow::default() },
            _ => UsageRow { queue: key, ..UsageRow::default() },
        });
        sum.gpu_hours += row.gpu_hours;
        sum.jobs += row.jobs;
        sum.attempts += row.attempts;
        sum.running_gpus += row.running_gpus;
    }
    grouped.into_values().collect()
}

/// `cohort usage`.
pub async fn usage(
    client: &mut JobServiceClient<Channel>,
    since_unix_ms: i64,
    by: UsageBy,
    out: UsageOutput,
) -> anyhow::Result<ExitCode> {
    let mut usage = client.get_usage(GetUsageRequest { since_unix_ms }).await.map_err(status_error)?.into_inner();
    usage.rows = group(std::mem::take(&mut usage.rows), by);
    match out {
        UsageOutput::Json => print_json(&usage)?,
        UsageOutput::Csv => say!("{}", csv(&usage, by)),
        UsageOutput::Table => print_usage(&usage, by),
    }
    Ok(ExitCode::SUCCESS)
}

fn columns(by: UsageBy) -> Vec<&'static str> {
    match by {
        UsageBy::User => vec!["user"],
        UsageBy::Queue => vec!["queue"],
        UsageBy::Both => vec!["user", "queue"],
    }
}

fn keys(row: &UsageRow, by: UsageBy) -> Vec<String> {
    match by {
        UsageBy::User => vec![row.user.clone()],
        UsageBy::Queue => vec![row.queue.clone()],
        UsageBy::Both => vec![row.user.clone(), row.queue.clone()],
    }
}

/// RFC 4180 CSV with a header line; numbers as numbers.
pub fn csv(usage: &GetUsageResponse, by: UsageBy) -> String {
    let quote = |s: &str| {
        if s.contains([',', '"', '\n', '\r']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s.to_string() }
    };
    let mut header = columns(by);
    header.extend(["gpu_hours", "jobs", "attempts", "running_gpus"]);
    let mut lines = vec![header.join(",")];
    for row in &usage.rows {
        let mut fields: Vec<String> = keys(row, by).iter().map(|k| quote(k)).collect();
        fields.extend([
            format!("{:.3}", row.gpu_hours),
            row.jobs.to_string(),
            row.attempts.to_string(),
            row.running_gpus.to_string(),
        ]);
        lines.push(fields.join(","));
    }
    lines.join("\n")
}

fn print_usage(usage: &GetUsageResponse, by: UsageBy) {
    let mut header: Vec<String> = columns(by).iter().map(|c| c.to_uppercase()).collect();
    header.extend(["GPU-HOURS", "JOBS", "ATTEMPTS", "RUNNING GPUS"].map(String::from));
    let header: Vec<&str> = header.iter().map(String::as_str).collect();
    let mut t = table(&header);
    let mut total = 0.0;
    for row in &usage.rows {
        total += row.gpu_hours;
        let mut cells =
            keys(row, by).into_iter().map(|k| if k.is_empty() { "-".into() } else { k }).collect::<Vec<_>>();
        cells.extend([
            format!("{:.2}", row.gpu_hours),
            row.jobs.to_string(),
            row.attempts.to_string(),
            row.running_gpus.to_string(),
        ]);
        t.add_row(cells);
    }
    let from = humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + Duration::from_millis(usage.since_unix_ms.max(0) as u64),
    );
    say!("{t}");
    say!("{total:.2} GPU-hours since {from}");
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn row(user: &str, queue: &str, gpu_hours: f64) -> UsageRow {
        UsageRow { user: user.into(), queue: queue.into(), gpu_hours, jobs: 1, attempts: 2, running_gpus: 0 }
    }

    #[test]
    fn usage_is_grouped_by_user_or_queue_and_written_as_csv() {
        let rows = vec![row("alice", "a", 1.5), row("alice", "b", 2.0), row("bob", "a", 0.25)];
        let by_user = group(rows.clone(), UsageBy::User);
        assert_eq!(
            by_user.iter().map(|r| (r.user.as_str(), r.gpu_hours)).collect::<Vec<_>>(),
            [("alice", 3.5), ("bob", 0.25)]
        );
        assert_eq!(by_user[0].attempts, 4);
        let by_queue = group(rows.clone(), UsageBy::Queue);
        assert_eq!(
            by_queue.iter().map(|r| (r.queue.as_str(), r.gpu_hours)).collect::<Vec<_>>(),
            [("a", 1.75), ("b", 2.0)]
        );
        let text = csv(&GetUsageResponse { rows: vec![row("a,b", "q", 1.0)], ..Default::default() }, UsageBy::Both);
        assert_eq!(text, "user,queue,gpu_hours,jobs,attempts,running_gpus\n\"a,b\",q,1.000,1,2,0");
    }

    #[test]
    fn since_takes_a_duration_a_date_or_a_time() {
        let now = 10 * 86_400_000;
        assert_eq!(parse_since("1d", now).unwrap(), 9 * 86_400_000);
        assert_eq!(parse_since("1970-01-02", now).unwrap(), 86_400_000);
        assert_eq!(parse_since("1970-01-02T01:00:00Z", now).unwrap(), 90_000_000);
        let e = parse_since("last week", now).unwrap_err().to_string();
        assert!(e.starts_with("--since \"last week\": give a duration"), "{e}");
        assert!(
            e.ends_with(
                ": give a duration back from now (`7d`), a date (`2026-12-01`) or a time (`2026-12-01T08:00:00Z`)"
            ),
            "{e}"
        );
    }

    #[test]
    fn bad_queue_flags_name_the_flag_and_the_fix() {
        let base = QueueSpec { name: "a".into(), weight: 1.0, ..QueueSpec::default() };
        let error = |flags: QueueFlags| flags.apply(base.clone()).unwrap_err().to_string();
        let e = error(QueueFlags { gpus: Some("eight".into()), ..QueueFlags::default() });
        assert_eq!(e, "--gpus \"eight\": give a number of GPUs, or `none`");
        for weight in [0.0, -1.0, f64::NAN] {
            let e = error(QueueFlags { weight: Some(weight), ..QueueFlags::default() });
            assert!(e.ends_with(": give a number above 0, e.g. 2"), "{e}");
        }
        let e = error(QueueFlags { max_run_time: Some("a day".into()), ..QueueFlags::default() });
        assert!(e.starts_with("--max-run-time \"a day\": "), "{e}");
        assert!(e.ends_with("; e.g. `24h`, or `none`"), "{e}");
    }

    #[test]
    fn queue_flags_change_only_what_they_name() {
        let base = QueueSpec { name: "a".into(), weight: 2.0, gpus: Some(8), borrow: true, ..QueueSpec::default() };
        let flags = QueueFlags { gpus: Some("none".into()), max_run_time: Some("2h".into()), ..QueueFlags::default() };
        let spec = flags.apply(base.clone()).unwrap();
        assert_eq!((spec.gpus, spec.weight, spec.max_run_time_ms, spec.borrow), (None, 2.0, 7_200_000, true));
        assert_eq!((spec.reclaim, spec.preempt_lower_priority), (None, false));
        let flags = QueueFlags { reclaim: Some(false), preempt_lower_priority: Some(true), ..QueueFlags::default() };
        let spec = flags.apply(base.clone()).unwrap();
        assert_eq!((spec.reclaim, spec.preempt_lower_priority), (Some(false), true));
        let flags = QueueFlags { gpus_by_label: vec!["gpu=h100:16".into()], ..QueueFlags::default() };
        assert_eq!(
            flags.apply(base.clone()).unwrap().label_quotas,
            [LabelQuotaSpec { label: "gpu=h100".into(), gpus: 16 }]
        );
        let bad = QueueFlags { gpus_by_label: vec!["h100".into()], ..QueueFlags::default() };
        assert!(bad.apply(base.clone()).unwrap_err().to_string().contains("KEY=VALUE:GPUS"));
        let bad = QueueFlags { weight: Some(0.0), ..QueueFlags::default() };
        assert!(bad.apply(base.clone()).unwrap_err().to_string().starts_with("--weight 0: give a number above 0"));
        let bad = QueueFlags { gpus: Some("many".into()), ..QueueFlags::default() };
        assert!(bad.apply(base).unwrap_err().to_string().starts_with("--gpus \"many\""));
    }
}
