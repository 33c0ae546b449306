//! The job file each stage of a pipeline becomes: the pipeline's inherited
//! keys and env, a job name, and for megatron-sft and command stages the
//! stage's own keys. Pipeline validation checks a stage as this job file;
//! `pipeline` renders it with the references resolved.

use serde_yaml_ng::{Mapping, Value};

use super::stages::{PipelineSpec, PipelineStage};
use crate::job_file::scalar::scalar_text;
use crate::megatron::{SwiftRelease, SwiftVersion};

/// Which run of a stage: infer and eval run on the model before and after training.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Part {
    Main,
    Before,
    After,
}

impl Part {
    /// The suffix of the run's job id (`<pipeline>.<stage>` or `<pipeline>.<stage>.before`).
    pub fn suffix(self) -> &'static str {
        match self {
            Part::Main => "",
            Part::Before => "before",
            Part::After => "after",
        }
    }
}

impl PipelineSpec {
    /// The shared part of every run's job file: the inherited keys, the stage's
    /// env over the pipeline's, and a job name.
    pub(crate) fn base_document(&self, stage: &PipelineStage, pipeline_name: &str, part: Part) -> Mapping {
        let mut document = Mapping::new();
        let mut name = format!("{pipeline_name}-{}", stage.name.replace('_', "-"));
        if part != Part::Main {
            name.push('-');
            name.push_str(part.suffix());
        }
        name.truncate(super::MAX_NAME_LEN);
        document.insert("name".into(), Value::String(name.trim_end_matches('-').to_owned()));
        for (key, value) in &self.inherited {
            if key.as_str() != Some("env") {
                document.insert(key.clone(), value.clone());
            }
        }
        let mut env = match self.inherited.get("env") {
            Some(Value::Mapping(env)) => env.clone(),
            _ => Mapping::new(),
        };
        if let Some(Value::Mapping(own)) = stage.raw.get("env") {
            for (key, value) in own {
                env.insert(key.clone(), value.clone());
            }
        }
        if !env.is_empty() {
            document.insert("env".into(), Value::Mapping(env));
        }
        document
    }

    /// A megatron-sft or command stage as a job file. With `output`, a
    /// megatron-sft stage that names no save directory saves there.
    pub(crate) fn gang_document(&self, stage: &PipelineStage, pipeline_name: &str, output: Option<&str>) -> Mapping {
        let mut document = self.base_document(stage, pipeline_name, Part::Main);
        document.insert("kind".into(), Value::String(stage.kind.name().to_owned()));
        // A stage runs on one node unless it says otherwise.
        document.insert("nodes".into(), Value::Number(1.into()));
        for key in ["nodes", "gpus_per_node", "command", "launch"] {
            if let Some(value) = stage.raw.get(key) {
                document.insert(key.into(), value.clone());
            }
        }
        if let Some(Value::Mapping(section)) = stage.raw.get("megatron") {
            let mut section = section.clone();
            // The stage's own swift_version (3, 4 or "major.minor"), else the pipeline's; an
            // invalid one is reported when the stage is checked as the job it becomes.
            let own = section.get("swift_version").and_then(|v| scalar_text(v).ok());
            let version = match own.as_deref().map(SwiftRelease::resolve) {
                Some(Ok(release)) => release.dialect(),
                _ => self.swift_version,
            };
            if own.is_none() {
                let written = &self.swift_version_written;
                let value = match written.parse::<u64>() {
                    Ok(major) => Value::Number(major.into()),
                    Err(_) => Value::String(written.clone()),
                };
                section.insert("swift_version".into(), value);
            }
            let save_key = match version {
                SwiftVersion::V3 => "save",
                SwiftVersion::V4 => "output_dir",
            };
            if let Some(output) = output
                && !section.contains_key(save_key)
            {
                section.insert(save_key.into(), Value::String(output.to_owned()));
            }
            document.insert("megatron".into(), Value::Mapping(section));
        } else if let Some(other) = stage.raw.get("megatron") {
            document.insert("megatron".into(), other.clone());
        }
        document
    }
}

/// The job file a megatron-sft or command stage is checked as when the
/// pipeline is submitted (references still unresolved).
pub(super) fn stage_document_for_check(spec: &PipelineSpec, stage: &PipelineStage) -> Mapping {
    spec.gang_document(stage, "stage", Some("/stage-output"))
}
