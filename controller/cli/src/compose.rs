//! Job files made or changed on the command line, the way `sbatch`/`srun`
//! users work: `cohort run -N 2 --gpus-per-node 8 -- torchrun ...` (an inline
//! command job), `cohort submit FILE --nodes 4 --env K=V` (overrides of a
//! file), and `cohort validate FILE` (the file's own checks, no controller).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use cohort_proto::JobFile;
use cohort_shared::spec::after::Dependency;
use cohort_shared::spec::{JobSpec, Workload};
use serde_yaml_ng::{Mapping, Value};

/// Fields of a job file set from the command line; they win over the file.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct Overrides {
    /// The job's `name`.
    #[arg(long)]
    pub name: Option<String>,
    /// `nodes`: how many nodes the gang spans.
    #[arg(long, short = 'N')]
    pub nodes: Option<u32>,
    /// `gpus_per_node`.
    #[arg(long)]
    pub gpus_per_node: Option<u32>,
    /// `priority` (higher first).
    #[arg(long, allow_hyphen_values = true)]
    pub priority: Option<i32>,
    /// `queue`: the queue the job waits in (default: the controller's default queue).
    #[arg(long)]
    pub queue: Option<String>,
    /// One `env` entry, NAME=VALUE; repeat for more. Replaces the file's value of NAME.
    #[arg(long = "env", short = 'e', value_name = "NAME=VALUE", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// Start only once job JOB has ended: `:ok` (succeeded; the default),
    /// `:any` or `:notok` (failed or cancelled); repeat or comma-separate for
    /// more. Adds to the file's `after:`.
    #[arg(long, value_name = "JOB[:ok|any|notok]", value_delimiter = ',', value_parser = parse_after)]
    pub after: Vec<Dependency>,
    /// `array`: one job per index, as `sbatch --array`: `0-7`, `1,3,5`,
    /// `0-15%4` (at most 4 at once); each gets COHORT_ARRAY_INDEX.
    #[arg(long, value_name = "INDICES[%N]", value_parser = parse_array)]
    pub array: Option<String>,
}

fn parse_array(text: &str) -> Result<String, String> {
    cohort_shared::spec::array::parse_array(text).map(|_| text.to_owned())
}

fn parse_after(text: &str) -> Result<Dependency, String> {
    cohort_shared::spec::after::parse_dependency(text)
}

fn parse_env(text: &str) -> Result<(String, String), String> {
    let (name, value) =
        text.split_once('=').ok_or_else(|| format!("{text:?}: write NAME=VALUE, e.g. NCCL_DEBUG=INFO"))?;
    if !cohort_shared::spec::is_env_name(name) {
        return Err(format!("{name:?} is not an environment variable name (letters, digits and _, not first a digit)"));
    }
    Ok((name.to_owned(), value.to_owned()))
}

impl Overrides {
    pub fn is_empty(&self) -> bool {
        self.name.is_none()
            && self.nodes.is_none()
            && self.gpus_per_node.is_none()
            && self.priority.is_none()
            && self.queue.is_none()
            && self.env.is_empty()
            && self.after.is_empty()
            && self.array.is_none()
    }

    /// The flags as the user typed them, for messages: "--nodes 4 --env A=…".
    fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(name) = &self.name {
            parts.push(format!("--name {name}"));
        }
        if let Some(nodes) = self.nodes {
            parts.push(format!("--nodes {nodes}"));
        }
        if let Some(gpus) = self.gpus_per_node {
            parts.push(format!("--gpus-per-node {gpus}"));
        }
        if let Some(priority) = self.priority {
            parts.push(format!("--priority {priority}"));
        }
        if let Some(queue) = &self.queue {
            parts.push(format!("--queue {queue}"));
        }
        parts.extend(self.env.iter().map(|(name, _)| format!("--env {name}=…")));
        parts.extend(self.after.iter().map(|d| format!("--after {d}")));
        if let Some(array) = &self.array {
            parts.push(format!("--array {array}"));
        }
        parts.join(" ")
    }

    /// The job file with these fields set. Unchanged (comments and line
    /// numbers kept) when there is nothing to set; otherwise the file is
    /// written again, and its name in messages says so.
    pub fn apply(&self, mut file: JobFile) -> anyhow::Result<JobFile> {
        if self.is_empty() {
            return Ok(file);
        }
        let mut root: Value = serde_yaml_ng::from_str(&file.yaml).with_context(|| {
            format!("{}: not valid YAML, so {} cannot be applied", file.source_name, self.describe())
        })?;
        let Value::Mapping(map) = &mut root else {
            anyhow::bail!("{}: a job file is a mapping (`name: ...`, `kind: ...`)", file.source_name);
        };
        self.set(map)?;
        file.yaml = serde_yaml_ng::to_string(&root)?;
        file.source_name = format!("{} (with {})", file.source_name, self.describe());
        Ok(file)
    }

    fn set(&self, map: &mut Mapping) -> anyhow::Result<()> {
        if let Some(name) = &self.name {
            map.insert("name".into(), name.as_str().into());
        }
        if let Some(nodes) = self.nodes {
            map.insert("nodes".into(), u64::from(nodes).into());
        }
        if let Some(gpus) = self.gpus_per_node {
            map.insert("gpus_per_node".into(), u64::from(gpus).into());
        }
        if let Some(priority) = self.priority {
            map.insert("priority".into(), i64::from(priority).into());
        }
        if let Some(queue) = &self.queue {
            map.insert("queue".into(), queue.as_str().into());
        }
        if !self.env.is_empty() {
            let env = map.entry("env".into()).or_insert_with(|| Value::Mapping(Mapping::new()));
            if env.is_null() {
                *env = Value::Mapping(Mapping::new());
            }
            let Value::Mapping(env) = env else {
                anyhow::bail!("`env` in the job file is not a mapping (NAME: value lines), so --env cannot add to it");
            };
            for (name, value) in &self.env {
                env.insert(name.as_str().into(), value.as_str().into());
            }
        }
        if !self.after.is_empty() {
            add_after(map, &self.after)?;
        }
        if let Some(array) = &self.array {
            map.insert("array".into(), array.as_str().into());
        }
        Ok(())
    }
}

/// `--after`: the file's `after:` (one entry or a list) with these added.
fn add_after(map: &mut Mapping, after: &[Dependency]) -> anyhow::Result<()> {
    let mut entries = match map.remove("after") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Sequence(entries)) => entries,
        Some(entry @ Value::String(_)) => vec![entry],
        Some(_) => anyhow::bail!("`after` in the job file is not a job or a list of jobs, so --after cannot add to it"),
    };
    entries.extend(after.iter().map(|d| Value::from(d.to_string())));
    map.insert("after".into(), Value::Sequence(entries));
    Ok(())
}

/// `cohort run`: a command job from the command line.
#[derive(clap::Args, Debug, Clone)]
pub struct Inline {
    #[command(flatten)]
    pub overrides: Overrides,
    /// The directory the command runs in on every node (default: this one; it
    /// must exist there, e.g. on a shared file system).
    #[arg(long, conflicts_with = "sync")]
    pub workdir: Option<PathBuf>,
    /// Pack this local directory (e.g. `.`), upload it, and run the command in
    /// each node's unpacked copy (`sync:`; for nodes without a shared file system).
    #[arg(long, value_name = "DIR")]
    pub sync: Option<PathBuf>,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

impl Inline {
    /// The job file `cohort run` submits: kind command, one node and no GPU
    /// unless the flags say otherwise, named after the program.
    pub fn job_file(&self, cwd: &Path) -> anyhow::Result<JobFile> {
        let program = self.command.first().context("cohort run needs a command after `--`")?;
        let stem = Path::new(program).file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let name: String = stem
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '-' { c.to_ascii_lowercase() } else { '-' })
            .collect::<String>()
            .trim_matches('-')
            .to_owned();
        let mut map = Mapping::new();
        map.insert("name".into(), if name.is_empty() { "run".into() } else { name.into() });
        map.insert("kind".into(), "command".into());
        map.insert("nodes".into(), 1u64.into());
        map.insert("gpus_per_node".into(), 0u64.into());
        match &self.sync {
            Some(dir) => map.insert("sync".into(), dir.to_string_lossy().into_owned().into()),
            None => {
                let workdir = self.workdir.clone().unwrap_or_else(|| cwd.to_owned());
                map.insert("workdir".into(), workdir.to_string_lossy().into_owned().into())
            }
        };
        map.insert("command".into(), Value::Sequence(self.command.iter().map(|a| a.as_str().into()).collect()));
        self.overrides.set(&mut map)?;
        Ok(JobFile {
            yaml: serde_yaml_ng::to_string(&Value::Mapping(map))?,
            source_name: "cohort run".into(),
            base_dir: cwd.to_string_lossy().into_owned(),
            ..JobFile::default()
        })
    }
}

/// `cohort validate`: each file's own checks (YAML, fields, ms-swift flags of
/// the version it names), no controller. Exit 2 when one is invalid.
pub fn validate(files: &[JobFile]) -> ExitCode {
    let mut valid = true;
    for file in files {
        match JobSpec::from_yaml(&file.yaml, &file.source_name) {
            Ok(spec) => {
                let size = match &spec.workload {
                    Workload::Pipeline(p) => format!("{} stage(s)", p.stages.len()),
                    _ => format!("{} node(s) × {} GPU(s)", spec.nodes, spec.gpus_per_node),
                };
                let mut summary =
                    format!("{}: ok: {} job {:?}, {size}", file.source_name, kind_name(&spec.workload), spec.name);
                if let Workload::MegatronSft(m) = &spec.workload {
                    summary.push_str(&format!(", {}", m.layout(spec.nodes, spec.gpus_per_node)));
                }
                say!("{summary}");
                for w in spec.warnings() {
                    eprintln!("warning: {}: {}: {}", file.source_name, w.field, w.message);
                }
            }
            Err(errors) => {
                valid = false;
                eprintln!("{errors}");
            }
        }
    }
    if valid {
        ExitCode::SUCCESS
    } else {
        eprintln!("(the controller checks more at submit: users, secrets, limits; `cohort plan` asks it)");
        ExitCode::from(2)
    }
}

fn kind_name(workload: &Workload) -> &'static str {
    match workload {
        Workload::Command(_) => "command",
        Workload::MegatronSft(_) => "megatron-sft",
        Workload::Pipeline(_) => "pipeline",
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn file(yaml: &str) -> JobFile {
        JobFile { yaml: yaml.into(), source_name: "job.yaml".into(), ..Default::default() }
    }

    #[test]
    fn overrides_win_over_the_file_and_keep_the_rest() {
        let overrides = Overrides {
            nodes: Some(4),
            queue: Some("team-a".into()),
            env: vec![("NCCL_DEBUG".into(), "INFO".into()), ("NEW".into(), "1".into())],
            ..Default::default()
        };
        let yaml = "name: a\nkind: command\nnodes: 2\nenv:\n  NCCL_DEBUG: WARN\n  KEEP: x\ncommand: [hostname]\n";
        let changed = overrides.apply(file(yaml)).unwrap();
        let spec = JobSpec::from_yaml(&changed.yaml, &changed.source_name).unwrap();
        assert_eq!(spec.nodes, 4);
        assert_eq!(spec.queue.as_deref(), Some("team-a"));
        assert_eq!(spec.env.get("NCCL_DEBUG").map(String::as_str), Some("INFO"));
        assert_eq!(spec.env.get("KEEP").map(String::as_str), Some("x"));
        assert_eq!(spec.env.get("NEW").map(String::as_str), Some("1"));
        assert_eq!(changed.source_name, "job.yaml (with --nodes 4 --queue team-a --env NCCL_DEBUG=… --env NEW=…)");
        // Nothing to set: the text itself, line numbers and comments kept.
        assert_eq!(Overrides::default().apply(file(yaml)).unwrap().yaml, yaml);
    }

    #[test]
    fn after_flags_add_to_the_files_after() {
        let after = vec![parse_after("prep-3").unwrap(), parse_after("eval-4:notok").unwrap()];
        let overrides = Overrides { after, ..Default::default() };
        let yaml = "name: a\nkind: command\nnodes: 1\nafter: train-2:any\ncommand: [hostname]\n";
        let spec = JobSpec::from_yaml(&overrides.apply(file(yaml)).unwrap().yaml, "x").unwrap();
        let written: Vec<String> = spec.after.iter().map(ToString::to_string).collect();
        assert_eq!(written, ["train-2:any", "prep-3:ok", "eval-4:notok"]);
        let err = overrides.apply(file("name: a\nafter: {job: x}\n")).unwrap_err().to_string();
        assert!(err.contains("`after` in the job file is not a job or a list"), "{err}");
        assert!(parse_after("prep-3:afterok").unwrap_err().contains("JOB:notok"));
    }

    #[test]
    fn a_bad_env_flag_or_file_env_is_named() {
        assert!(parse_env("NOEQUALS").unwrap_err().contains("NAME=VALUE"));
        assert!(parse_env("1X=2").unwrap_err().contains("not an environment variable name"));
        assert_eq!(parse_env("A=b=c").unwrap(), ("A".into(), "b=c".into()));
        let overrides = Overrides { env: vec![("A".into(), "1".into())], ..Default::default() };
        let err = overrides.apply(file("name: a\nkind: command\nenv: [x]\ncommand: [x]\n")).unwrap_err();
        assert!(err.to_string().contains("`env` in the job file is not a mapping"), "{err}");
    }

    #[test]
    fn an_inline_command_is_a_valid_command_job() {
        let inline = Inline {
            overrides: Overrides { nodes: Some(2), gpus_per_node: Some(8), ..Default::default() },
            workdir: None,
            sync: None,
            command: vec!["/usr/bin/torchrun".into(), "--nproc-per-node".into(), "8".into(), "train.py".into()],
        };
        let job = inline.job_file(Path::new("/work/proj")).unwrap();
        let spec = JobSpec::from_yaml(&job.yaml, &job.source_name).unwrap();
        assert_eq!((spec.name.as_str(), spec.nodes, spec.gpus_per_node), ("torchrun", 2, 8));
        assert_eq!(spec.workdir.as_deref(), Some("/work/proj"));
        let Workload::Command(command) = &spec.workload else { panic!("{:?}", spec.workload) };
        assert_eq!(command.argv, ["/usr/bin/torchrun", "--nproc-per-node", "8", "train.py"]);

        // --sync: the directory is synced instead, and the processes run in its copy.
        let synced = Inline { sync: Some(".".into()), ..inline };
        let job = synced.job_file(Path::new("/work/proj")).unwrap();
        let spec = JobSpec::from_yaml(&job.yaml, &job.source_name).unwrap();
        assert_eq!((spec.workdir, spec.sync.map(|s| s.dir)), (None, Some(".".to_owned())));
        assert_eq!(job.base_dir, "/work/proj");
    }

    #[test]
    fn an_inline_job_without_a_command_says_where_it_goes() {
        // clap requires the command first; the library refuses too.
        let inline = Inline { overrides: Overrides::default(), workdir: None, sync: None, command: Vec::new() };
        let err = inline.job_file(Path::new("/work")).unwrap_err();
        assert!(err.to_string().contains("cohort run needs a command after `--`"), "{err}");
    }
}
