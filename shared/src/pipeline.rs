//! What the stages of a pipeline run: each stage becomes one job file (two for
//! `infer` and `eval`: before and after training), an ordinary `command` or
//! `megatron-sft` job with the pipeline's shared settings, its references
//! (`${stages.sft.output}`) replaced by the paths of the stages it names.
//! The built-in steps render the ms-swift command lines users type by hand.

pub mod report;

use std::collections::BTreeMap;

use serde_yaml_ng::{Mapping, Value};
use sha2::{Digest, Sha256};

use crate::megatron::SwiftVersion;
use crate::spec::stages::{PipelineSpec, PipelineStage, StepKind, placeholders};

pub use crate::spec::stage_document::Part;

/// One gang launch of a stage.
#[derive(Debug, Clone, PartialEq)]
pub struct StageRun {
    pub part: Part,
    /// The run's job file: `kind: command` or `kind: megatron-sft`.
    pub document: Mapping,
    /// What the run writes for the report: the answers file of an infer run,
    /// the output directory of an eval run.
    pub result_path: Option<String>,
}

/// What a stage's references resolve to when it starts.
#[derive(Debug, Clone, Default)]
pub struct Resolved {
    /// Output path of every stage that has one (finished stages, and this one).
    pub outputs: BTreeMap<String, String>,
    /// Newest complete checkpoint of finished megatron-sft stages.
    pub checkpoints: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    #[error("stage {stage}: `${{{reference}}}` cannot be resolved: {why}")]
    Unresolved { stage: String, reference: String, why: String },
    #[error("stage {stage}: {message}")]
    Invalid { stage: String, message: String },
}

/// Defaults of the built-in steps where ms-swift's own would not serve the pipeline. The
/// conversions take ms-swift's defaults (no `torch_dtype`, no precision test) unless the stage
/// sets them. `infer` answers deterministically (temperature 0; ms-swift's None samples with the
/// model's generation config) so that the before/after answers are comparable, and with a bound
/// on the answer length (ms-swift's None is unbounded up to max_model_len).
pub const DEFAULT_MAX_NEW_TOKENS: &str = "2048";
pub const DEFAULT_TEMPERATURE: &str = "0";
/// ms-swift's own evaluation backend (evalscope), its default too.
pub const DEFAULT_EVAL_BACKEND: &str = "Native";

/// What a conversion stage sets beyond its input and output; None leaves ms-swift's default
/// (`torch_dtype` None: the checkpoint's own dtype; `test_convert_precision` false:
/// 3.12.6 `swift/llm/argument/export_args.py:74`, 4.6.0 `swift/arguments/export_args.py:75`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConvertOptions {
    pub torch_dtype: Option<String>,
    pub test_convert_precision: Option<bool>,
}

impl ConvertOptions {
    fn args(&self) -> Vec<String> {
        let mut argv = Vec::new();
        if let Some(dtype) = &self.torch_dtype {
            argv.extend(words(&["--torch_dtype", dtype]));
        }
        if let Some(test) = self.test_convert_precision {
            argv.extend(words(&["--test_convert_precision", bool_text(test)]));
        }
        argv
    }
}

/// `swift export` refuses an output directory that exists (`FileExistsError`) unless
/// `--exist_ok true` (3.12.6 `swift/llm/argument/export_args.py:85,118-119`; 4.6.0
/// `swift/arguments/export_args.py:87,120-121`), and a retried stage finds the directory its
/// failed attempt half wrote; with the flag ms-swift writes over it.
const EXIST_OK: [&str; 2] = ["--exist_ok", "true"];

/// `swift export --model M --to_mcore true --output_dir O --exist_ok true [--torch_dtype D]
/// [--test_convert_precision B]`. The same line in 3.x and 4.x (the "Traditional Method" of
/// the 4.x docs); `swift export` runs as one process on one GPU, never under torchrun.
pub fn to_mcore_args(_version: SwiftVersion, model: &str, output: &str, options: &ConvertOptions) -> Vec<String> {
    let mut argv = words(&["swift", "export", "--model", model, "--to_mcore", "true", "--output_dir", output]);
    argv.extend(words(&EXIST_OK));
    argv.extend(options.args());
    argv
}

/// `swift export --mcore_model C --to_hf true --output_dir O --exist_ok true [...]`.
/// `C` is the directory holding `latest_checkpointed_iteration.txt`: the save
/// directory in 3.x before 3.10, a `checkpoint-N` directory in 3.10+ and 4.x.
pub fn to_hf_args(_version: SwiftVersion, mcore_model: &str, output: &str, options: &ConvertOptions) -> Vec<String> {
    let mut argv = words(&["swift", "export", "--mcore_model", mcore_model, "--to_hf", "true", "--output_dir", output]);
    argv.extend(words(&EXIST_OK));
    argv.extend(options.args());
    argv
}

/// `swift infer --model M --val_dataset P --result_path R --stream false --temperature 0 --max_new_tokens 2048`:
/// every prompt row of `P` answered once; ms-swift appends one JSON line per
/// row to `R` (`response`, `labels`, `messages` with the answer appended).
pub fn infer_args(
    _version: SwiftVersion,
    model: &str,
    prompts: &str,
    result_path: &str,
    temperature: &str,
    max_new_tokens: &str,
) -> Vec<String> {
    words(&[
        "swift",
        "infer",
        "--model",
        model,
        "--val_dataset",
        prompts,
        "--result_path",
        result_path,
        "--stream",
        "false",
        "--temperature",
        temperature,
        "--max_new_tokens",
        max_new_tokens,
    ])
}

/// `swift eval --model M --eval_backend Native --eval_dataset a b --eval_output_dir O [--eval_limit N]`:
/// evalscope's reports (`<O>/<time>/reports/<model>/<dataset>.json`) hold the scores.
pub fn eval_args(
    _version: SwiftVersion,
    model: &str,
    backend: &str,
    benchmarks: &[String],
    output: &str,
    limit: Option<&str>,
) -> Vec<String> {
    let mut argv = words(&["swift", "eval", "--model", model, "--eval_backend", backend, "--eval_dataset"]);
    argv.extend(benchmarks.iter().cloned());
    argv.extend(words(&["--eval_output_dir", output]));
    if let Some(limit) = limit {
        argv.extend(words(&["--eval_limit", limit]));
    }
    argv
}

fn words(items: &[&str]) -> Vec<String> {
    items.iter().map(|item| (*item).to_owned()).collect()
}

fn bool_text(value: bool) -> &'static str {
    if value { "true" } else { "false" }
}

/// The key of a converted checkpoint in the conversion cache: the same source
/// model (by content digest), layout and ms-swift version give the same key.
pub fn conversion_key(model_digest: &str, tp: u32, pp: u32, version: SwiftVersion) -> String {
    let text = format!("{model_digest}\ntp={tp}\npp={pp}\nswift={}", version.major());
    let digest = Sha256::digest(text.as_bytes());
    digest.iter().take(10).map(|b| format!("{b:02x}")).collect()
}

impl PipelineSpec {
    /// `<output_dir>/<job id>/<stage>`.
    pub fn default_output(&self, job_id: &str, stage: &str) -> String {
        format!("{}/{job_id}/{stage}", self.output_dir.trim_end_matches('/'))
    }

    /// Stages in an order where each comes after the stages it depends on
    /// (file order among independent ones). The spec has no cycle.
    pub fn order(&self) -> Vec<&PipelineStage> {
        let mut done: Vec<&str> = Vec::new();
        let mut order = Vec::new();
        while order.len() < self.stages.len() {
            let before = order.len();
            for stage in &self.stages {
                if !done.contains(&stage.name.as_str())
                    && stage.depends_on.iter().all(|dep| done.contains(&dep.as_str()))
                {
                    done.push(&stage.name);
                    order.push(stage);
                }
            }
            if order.len() == before {
                break;
            }
        }
        order
    }

    /// The tensor- and pipeline-parallel sizes a to_mcore stage converts for:
    /// its own fields, else those of the first megatron-sft stage that reads
    /// its output, else 1 and 1.
    pub fn conversion_layout(&self, stage: &PipelineStage) -> (u32, u32) {
        let own = |key: &str| stage.text(key).and_then(|t| t.parse::<u32>().ok());
        let reference = format!("${{stages.{}.output}}", stage.name);
        let consumer = self.stages.iter().find(|s| {
            s.kind == StepKind::MegatronSft
                && crate::spec::stages::strings(&Value::Mapping(s.raw.clone())).iter().any(|t| t.contains(&reference))
        });
        let consumer_size = |key: &str| {
            let megatron = consumer?.raw.get("megatron")?;
            crate::job_file::scalar::scalar_text(megatron.get(key)?).ok()?.parse::<u32>().ok()
        };
        let tp = own("tensor_model_parallel_size").or_else(|| consumer_size("tensor_model_parallel_size")).unwrap_or(1);
        let pp =
            own("pipeline_model_parallel_size").or_else(|| consumer_size("pipeline_model_parallel_size")).unwrap_or(1);
        (tp, pp)
    }

    /// The model a to_mcore stage converts (before substitution).
    pub fn conversion_source(&self, stage: &PipelineStage) -> Option<String> {
        stage.text("model").or_else(|| self.model.clone())
    }

    /// The stage's output path: its `output:` (references resolved), else the default.
    pub fn stage_output(
        &self,
        stage: &PipelineStage,
        job_id: &str,
        resolved: &Resolved,
    ) -> Result<String, RenderError> {
        match stage.text("output") {
            Some(text) => substitute(&text, &stage.name, resolved, &BTreeMap::new()),
            None => Ok(self.default_output(job_id, &stage.name)),
        }
    }

    /// The job files of a stage's runs. `resolved.outputs` must hold this
    /// stage's output and those of every stage it references.
    pub fn runs(
        &self,
        stage: &PipelineStage,
        pipeline_name: &str,
        resolved: &Resolved,
    ) -> Result<Vec<StageRun>, RenderError> {
        let own_output = resolved.outputs.get(&stage.name).cloned().ok_or_else(|| RenderError::Invalid {
            stage: stage.name.clone(),
            message: "its output path is not known".into(),
        })?;
        let version = self.swift_version;
        let convert = ConvertOptions {
            torch_dtype: stage.text("torch_dtype"),
            test_convert_precision: stage.flag("test_convert_precision"),
        };
        let extra = stage.list("extra_args");
        let base = |part: Part| self.base_document(stage, pipeline_name, part);
        let mut vars = BTreeMap::from([("output".to_owned(), own_output.clone())]);
        let runs = match stage.kind {
            StepKind::MegatronSft | StepKind::Command => {
                let document = self.gang_document(stage, pipeline_name, Some(&own_output));
                vec![StageRun { part: Part::Main, document, result_path: None }]
            }
            StepKind::ToMcore => {
                let model = self.conversion_source(stage).unwrap_or_default();
                let mut argv = to_mcore_args(version, &model, &own_output, &convert);
                argv.extend(extra);
                vec![single_gpu(Part::Main, base(Part::Main), argv, None)]
            }
            StepKind::ToHf => {
                let model = stage.text("model").unwrap_or_default();
                let mut argv = to_hf_args(version, &model, &own_output, &convert);
                argv.extend(extra);
                vec![single_gpu(Part::Main, base(Part::Main), argv, None)]
            }
            StepKind::Infer => {
                let prompts = stage.text("prompts").unwrap_or_default();
                let temperature = stage.text("temperature").unwrap_or_else(|| DEFAULT_TEMPERATURE.to_owned());
                let tokens = stage.text("max_new_tokens").unwrap_or_else(|| DEFAULT_MAX_NEW_TOKENS.to_owned());
                self.comparison_models(stage)
                    .into_iter()
                    .map(|(part, model)| {
                        let result = format!("{own_output}/{}.jsonl", part.suffix());
                        let mut argv = infer_args(version, &model, &prompts, &result, &temperature, &tokens);
                        argv.extend(extra.iter().cloned());
                        single_gpu(part, base(part), argv, Some(result))
                    })
                    .collect()
            }
            StepKind::Eval => {
                let benchmarks = stage.list("benchmarks");
                vars.insert("benchmarks".into(), benchmarks.join(","));
                let backend = stage.text("backend").unwrap_or_else(|| DEFAULT_EVAL_BACKEND.to_owned());
                let limit = stage.text("limit");
                let tool = stage.list("command");
                self.comparison_models(stage)
                    .into_iter()
                    .map(|(part, model)| {
                        let dir = format!("{own_output}/{}", part.suffix());
                        let mut argv = if tool.is_empty() {
                            eval_args(version, &model, &backend, &benchmarks, &dir, limit.as_deref())
                        } else {
                            // The job's own evaluation tool: ${model} and ${output} are this run's.
                            tool.iter().map(|arg| arg.replace("${model}", &model).replace("${output}", &dir)).collect()
                        };
                        argv.extend(extra.iter().cloned());
                        single_gpu(part, base(part), argv, Some(dir))
                    })
                    .collect()
            }
        };
        runs.into_iter()
            .map(|mut run| {
                substitute_value_map(&mut run.document, &stage.name, resolved, &vars)?;
                if let Some(path) = &run.result_path {
                    run.result_path = Some(substitute(path, &stage.name, resolved, &vars)?);
                }
                Ok(run)
            })
            .collect()
    }

    /// (before, after) models of an infer or eval stage.
    fn comparison_models(&self, stage: &PipelineStage) -> Vec<(Part, String)> {
        let before = stage.text("before").or_else(|| self.model.clone()).unwrap_or_default();
        let after = stage.text("after").unwrap_or_default();
        vec![(Part::Before, before), (Part::After, after)]
    }
}

fn single_gpu(part: Part, mut document: Mapping, argv: Vec<String>, result_path: Option<String>) -> StageRun {
    document.insert("kind".into(), Value::String("command".into()));
    document.insert("nodes".into(), Value::Number(1.into()));
    document.insert("gpus_per_node".into(), Value::Number(1.into()));
    document.insert("command".into(), Value::Sequence(argv.into_iter().map(Value::String).collect()));
    StageRun { part, document, result_path }
}

/// Replaces `${stages.NAME.output}`, `${stages.NAME.checkpoint}` and the
/// stage's own `${output}` (and `${benchmarks}`) in a text.
pub fn substitute(
    text: &str,
    stage: &str,
    resolved: &Resolved,
    vars: &BTreeMap<String, String>,
) -> Result<String, RenderError> {
    if !text.contains("${") {
        return Ok(text.to_owned());
    }
    let mut out = text.to_owned();
    for inner in placeholders(text) {
        let unresolved = |why: &str| RenderError::Unresolved {
            stage: stage.to_owned(),
            reference: inner.clone(),
            why: why.to_owned(),
        };
        let value = if let Some(rest) = inner.strip_prefix("stages.") {
            let (name, field) = rest.rsplit_once('.').ok_or_else(|| unresolved("write ${stages.NAME.output}"))?;
            let table = match field {
                "output" => &resolved.outputs,
                "checkpoint" => &resolved.checkpoints,
                _ => return Err(unresolved("only .output and .checkpoint exist")),
            };
            table.get(name).cloned().ok_or_else(|| unresolved("that stage has not produced it"))?
        } else if let Some(value) = vars.get(&inner) {
            value.clone()
        } else {
            // Not ours (e.g. a shell variable in a command's argument): left as written.
            continue;
        };
        out = out.replace(&format!("${{{inner}}}"), &value);
    }
    Ok(out)
}

fn substitute_value_map(
    map: &mut Mapping,
    stage: &str,
    resolved: &Resolved,
    vars: &BTreeMap<String, String>,
) -> Result<(), RenderError> {
    for (_, value) in map.iter_mut() {
        substitute_value(value, stage, resolved, vars)?;
    }
    Ok(())
}

fn substitute_value(
    value: &mut Value,
    stage: &str,
    resolved: &Resolved,
    vars: &BTreeMap<String, String>,
) -> Result<(), RenderError> {
    match value {
        Value::String(text) => *text = substitute(text, stage, resolved, vars)?,
        Value::Sequence(items) => {
            for item in items {
                substitute_value(item, stage, resolved, vars)?;
            }
        }
        Value::Mapping(map) => substitute_value_map(map, stage, resolved, vars)?,
        _ => {}
    }
    Ok(())
}

/// The stage's run job file as YAML text.
pub fn document_yaml(document: &Mapping) -> String {
    serde_yaml_ng::to_string(&Value::Mapping(document.clone())).unwrap_or_default()
}
