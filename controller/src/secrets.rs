//! Secret `env` values (`NAME: {value: ..., secret: true}` in the job file)
//! reach the processes but never leave the controller otherwise: every job the
//! job API or the HTTP API returns goes through [`redact_job`] first.

use cohort_proto::{GangPlan, Job, JobFile};
use cohort_shared::spec::JobSpec;

/// What a secret value is shown as.
pub const REDACTED: &str = "<secret>";

/// What the job file is shown as when its secrets cannot be cut out of it.
const WITHHELD: &str = "# the job file is withheld: it holds secret env values\n";

/// Hides the secret env values of a job: in every process's environment and
/// in the job file as submitted.
pub fn redact_job(job: &mut Job) {
    if job.secret_env.is_empty() {
        return;
    }
    if let Some(plan) = job.plan.as_mut() {
        redact_plan(plan, &job.secret_env);
    }
    if let Some(file) = job.file.as_mut() {
        redact_file(file, &job.secret_env);
    }
}

/// Hides the values of the `secret` variables in every process of a plan.
pub fn redact_plan(plan: &mut GangPlan, secret: &[String]) {
    for node in &mut plan.nodes {
        for process in &mut node.processes {
            for var in process.env.iter_mut().filter(|v| secret.contains(&v.name)) {
                var.value = REDACTED.into();
            }
        }
    }
}

/// Replaces each secret value in the YAML text; when the result does not
/// parse back to a file whose secrets all read [`REDACTED`] (a value written
/// with escapes, or one that also occurs elsewhere in the file), the whole
/// text is withheld instead: a secret is never shown by accident.
fn redact_file(file: &mut JobFile, secret: &[String]) {
    let Ok(spec) = JobSpec::from_yaml(&file.yaml, &file.source_name) else {
        file.yaml = WITHHELD.into();
        return;
    };
    let mut text = file.yaml.clone();
    for name in secret {
        match spec.env.get(name) {
            Some(value) if !value.is_empty() => text = text.replace(value.as_str(), REDACTED),
            _ => {}
        }
    }
    let clean = JobSpec::from_yaml(&text, &file.source_name).is_ok_and(|redacted| {
        secret.iter().all(|name| redacted.env.get(name).is_none_or(|v| v == REDACTED || v.is_empty()))
            && spec.env.iter().all(|(name, value)| secret.contains(name) || redacted.env.get(name) == Some(value))
    });
    file.yaml = if clean { text } else { WITHHELD.into() };
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use cohort_proto::{EnvVar, NodeAssignment, ProcessSpec};

    fn job(yaml: &str) -> Job {
        let spec = JobSpec::from_yaml(yaml, "job.yaml").unwrap();
        let env = spec.env.iter().map(|(k, v)| EnvVar { name: k.clone(), value: v.clone() }).collect();
        Job {
            secret_env: spec.secret_env.iter().cloned().collect(),
            file: Some(JobFile { yaml: yaml.into(), source_name: "job.yaml".into(), ..Default::default() }),
            plan: Some(GangPlan {
                nodes: vec![NodeAssignment {
                    processes: vec![ProcessSpec { env, ..Default::default() }],
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn shown(job: &Job) -> String {
        format!("{job:?}")
    }

    #[test]
    fn secret_values_leave_neither_the_plan_nor_the_file() {
        let yaml = "name: s\nkind: command\nnodes: 1\nenv:\n  HF_TOKEN: {value: hf_abc123, secret: true}\n  PLAIN: visible\ncommand: [true]\n";
        let mut j = job(yaml);
        assert!(shown(&j).contains("hf_abc123"));
        redact_job(&mut j);
        assert!(!shown(&j).contains("hf_abc123"), "{j:?}");
        let env = &j.plan.as_ref().unwrap().nodes[0].processes[0].env;
        assert_eq!(env.iter().find(|v| v.name == "HF_TOKEN").unwrap().value, REDACTED);
        assert_eq!(env.iter().find(|v| v.name == "PLAIN").unwrap().value, "visible");
        let file = &j.file.as_ref().unwrap().yaml;
        assert!(
            file.contains("HF_TOKEN: {value: <secret>, secret: true}") && file.contains("PLAIN: visible"),
            "{file}"
        );
    }

    #[test]
    fn a_secret_written_with_escapes_withholds_the_whole_file() {
        let yaml = "name: s\nkind: command\nnodes: 1\nenv:\n  PW: {value: \"a\\tb\", secret: true}\ncommand: [true]\n";
        let mut j = job(yaml);
        redact_job(&mut j);
        assert_eq!(j.file.as_ref().unwrap().yaml, WITHHELD);
        assert!(!shown(&j).contains("a\\tb") && !shown(&j).contains("a\tb"));
    }

    #[test]
    fn a_secret_equal_to_another_value_withholds_the_whole_file() {
        let yaml =
            "name: s\nkind: command\nnodes: 1\nenv:\n  A: {value: same, secret: true}\n  B: same\ncommand: [true]\n";
        let mut j = job(yaml);
        redact_job(&mut j);
        assert_eq!(j.file.as_ref().unwrap().yaml, WITHHELD);
    }
}
