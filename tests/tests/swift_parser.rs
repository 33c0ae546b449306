//! The REAL ms-swift decides: every example job, every rendered stage of the example
//! pipeline and a corpus of megatron-sft flag sets drawn from the checked-in flag tables
//! (shared/swift-flags/) go through ms-swift's own parser (agent/src/preflight/swift_argcheck.py
//! in the venvs of tools/swift-flags/venvs.sh, which tests/run.sh creates).
//!
//! The corpus proves the tables right: the real parser must take every flag set built from a
//! table's valid values and refuse every one with a deliberately wrong flag, value or
//! abbreviation. All argvs of a version go through ONE Python process (`--batch`): importing
//! ms-swift takes seconds.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use cohort_shared::pipeline::{Resolved, document_yaml};
use cohort_shared::spec::stages::StepKind;
use cohort_shared::spec::{JobSpec, Workload};
use cohort_tests::{megatron_lm_path, repo_root, swift_python};
use serde_json::{Value, json};

/// The ms-swift version each `swift_version` major is checked against.
fn version_for_major(major: u8) -> &'static str {
    match major {
        3 => "3.12.6",
        4 => "4.6.0",
        other => panic!("no ms-swift venv for swift_version {other}"),
    }
}

/// One argv to check: the argcheck command (`megatron-sft`, ...), the argv after the
/// program, where it came from, and the expectation.
struct Case {
    label: String,
    command: String,
    argv: Vec<String>,
    /// For a refused case: the flag the parser must name.
    refused_flag: Option<String>,
}

/// `megatron sft --lr 1` -> (`megatron-sft`, [`--lr`, `1`]); None for other programs.
fn split_program(argv: &[String]) -> Option<(String, Vec<String>)> {
    let (program, sub) = (argv.first()?.as_str(), argv.get(1)?.as_str());
    let known = matches!((program, sub), ("megatron", "sft" | "export") | ("swift", "export" | "infer" | "eval"));
    known.then(|| (format!("{program}-{sub}"), argv[2..].to_vec()))
}

/// Runs every case through the real parser of `version` in one process; returns its answers.
fn run_batch(version: &str, cases: &[Case]) -> Vec<Value> {
    let batch: Vec<Value> = cases.iter().map(|c| json!([c.command, c.argv])).collect();
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), serde_json::to_vec(&batch).unwrap()).unwrap();
    let script = repo_root().join("agent/src/preflight/swift_argcheck.py");
    let out = Command::new(swift_python(version))
        .arg(&script)
        .arg("--batch")
        .arg(file.path())
        .env("MEGATRON_LM_PATH", megatron_lm_path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let answers: Vec<Value> = stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .collect();
    assert_eq!(
        answers.len(),
        cases.len(),
        "ms-swift {version}: {} answers for {} argvs; stderr:\n{}",
        answers.len(),
        cases.len(),
        String::from_utf8_lossy(&out.stderr)
    );
    for (case, answer) in cases.iter().zip(&answers) {
        assert_eq!(answer["error"], Value::Null, "{}: the parser could not judge: {answer}", case.label);
        assert_eq!(answer["ms_swift"], json!(version), "{}", case.label);
    }
    answers
}

/// Every mismatch between expectation and the real parser, one line each.
fn mismatches(version: &str, cases: &[Case], answers: &[Value]) -> Vec<String> {
    let mut bad = Vec::new();
    for (case, answer) in cases.iter().zip(answers) {
        let ok = answer["ok"] == json!(true);
        match &case.refused_flag {
            None if !ok => bad.push(format!(
                "ms-swift {version} refuses {}: {}\n    argv: {:?}",
                case.label, answer["problems"], case.argv
            )),
            Some(flag) => {
                let named = answer["problems"].as_array().is_some_and(|ps| ps.iter().any(|p| p["flag"] == json!(flag)));
                if ok || !named {
                    bad.push(format!(
                        "ms-swift {version} should refuse {flag} in {}: answered {answer}\n    argv: {:?}",
                        case.label, case.argv
                    ));
                }
            }
            None => {}
        }
    }
    bad
}

/// The argvs Cohort renders from the examples, grouped by the ms-swift version that checks them.
fn example_cases() -> BTreeMap<&'static str, Vec<Case>> {
    let mut by_version: BTreeMap<&'static str, Vec<Case>> = BTreeMap::new();
    let dir = repo_root().join("examples/jobs");
    let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    for path in files.iter().filter(|p| p.extension().is_some_and(|e| e == "yaml")) {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(path).unwrap();
        let spec = JobSpec::from_yaml(&text, &name).unwrap_or_else(|e| panic!("{name}: {e}"));
        match &spec.workload {
            Workload::MegatronSft(m) => {
                let (command, argv) = split_program(&m.render_args()).expect("megatron sft");
                by_version.entry(version_for_major(m.swift_version.major())).or_default().push(Case {
                    label: name.clone(),
                    command,
                    argv,
                    refused_flag: None,
                });
            }
            Workload::Pipeline(p) => {
                let version = version_for_major(p.swift_version.major());
                for (stage, argv) in pipeline_argvs(&spec, p, path) {
                    if let Some((command, argv)) = split_program(&argv) {
                        by_version.entry(version).or_default().push(Case {
                            label: format!("{name} stage {stage}"),
                            command,
                            argv,
                            refused_flag: None,
                        });
                    }
                }
            }
            Workload::Command(_) => {}
        }
    }
    by_version
}

/// Every run of every stage, references resolved as the controller resolves them (a made-up
/// checkpoint path for finished megatron-sft stages).
fn pipeline_argvs(
    spec: &JobSpec,
    p: &cohort_shared::spec::stages::PipelineSpec,
    path: &Path,
) -> Vec<(String, Vec<String>)> {
    let job_id = format!("{}-1", spec.name);
    let mut resolved = Resolved::default();
    let mut out = Vec::new();
    for stage in p.order() {
        let output = p.stage_output(stage, &job_id, &resolved).unwrap();
        resolved.outputs.insert(stage.name.clone(), output.clone());
        if stage.kind == StepKind::MegatronSft {
            resolved.checkpoints.insert(stage.name.clone(), format!("{output}/v0-20261205-070000/checkpoint-50"));
        }
        for run in p.runs(stage, &spec.name, &resolved).unwrap_or_else(|e| panic!("{}: {e}", path.display())) {
            let yaml = document_yaml(&run.document);
            let run_spec = JobSpec::from_yaml(&yaml, "run").unwrap_or_else(|e| panic!("{e}\n{yaml}"));
            let argv = match &run_spec.workload {
                Workload::Command(c) => c.argv.clone(),
                Workload::MegatronSft(m) => m.render_args(),
                Workload::Pipeline(_) => panic!("nested pipeline"),
            };
            out.push((format!("{} ({:?})", stage.name, run.part), argv));
        }
    }
    out
}

#[test]
fn example_jobs_and_pipeline_stages_parse_with_the_real_ms_swift() {
    let mut bad = Vec::new();
    for (version, cases) in example_cases() {
        let answers = run_batch(version, &cases);
        println!("ms-swift {version}: {} rendered example argvs checked by the real parser", cases.len());
        bad.extend(mismatches(version, &cases, &answers));
    }
    assert!(bad.is_empty(), "the real ms-swift refuses rendered examples:\n{}", bad.join("\n"));
}

/// One flag of a table (TABLES.md section 1).
struct Flag {
    name: String,
    dest: String,
    kind: String,
    list: bool,
    choices: Option<Vec<String>>,
    value_optional: bool,
}

fn table_flags(version: &str, command: &str) -> Vec<Flag> {
    let path = repo_root().join(format!("shared/swift-flags/ms-swift-{version}.json"));
    let table: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let flags = table["commands"][command]["flags"].as_array().unwrap_or_else(|| panic!("{command} in {path:?}"));
    flags
        .iter()
        .filter(|f| f["cli_usable"] != json!(false))
        .map(|f| {
            let name = f["name"].as_str().unwrap().to_owned();
            Flag {
                dest: f["alias_of"].as_str().or(f["negates"].as_str()).unwrap_or(&name).replace('-', "_"),
                kind: f["type"].as_str().unwrap().to_owned(),
                list: f["list"] == json!(true),
                choices: f["choices"].as_array().map(|c| c.iter().map(|v| v.as_str().unwrap().to_owned()).collect()),
                value_optional: f["value_optional"] == json!(true),
                name,
            }
        })
        .collect()
}

/// A small deterministic generator (xorshift64*): the corpus is the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// A value argparse takes for one element of the flag's type.
fn valid_value(rng: &mut Rng, flag: &Flag) -> String {
    if let Some(choices) = &flag.choices {
        return rng.pick(choices).clone();
    }
    match flag.kind.as_str() {
        "bool" => (*rng.pick(&["true", "false", "yes", "no", "1", "0", "True", "FALSE"])).to_owned(),
        "int" => (*rng.pick(&["0", "1", "7", "128", "4096"])).to_owned(),
        "float" => (*rng.pick(&["1e-05", "0.5", "3", "2.0", "0"])).to_owned(),
        "json" => r#"{"a": 1}"#.to_owned(),
        _ => (*rng.pick(&["x", "/tmp/some path", "qwen3", "a,b"])).to_owned(),
    }
}

/// `--flag value...` with valid values.
fn valid_args(rng: &mut Rng, flag: &Flag) -> Vec<String> {
    let mut args = vec![format!("--{}", flag.name)];
    match flag.kind.as_str() {
        "switch" => {}
        "bool" if flag.value_optional && rng.below(3) == 0 => {}
        _ if flag.list => (0..1 + rng.below(3)).for_each(|_| args.push(valid_value(rng, flag))),
        _ => args.push(valid_value(rng, flag)),
    }
    args
}

/// A set of 1..=6 valid flags with distinct fields (a later flag could undo an earlier one).
fn valid_set(rng: &mut Rng, flags: &[Flag], avoid: &str) -> Vec<String> {
    let mut seen = BTreeSet::from([avoid.to_owned()]);
    let mut argv = Vec::new();
    for _ in 0..1 + rng.below(6) {
        let flag = rng.pick(flags);
        if seen.insert(flag.dest.clone()) {
            argv.extend(valid_args(rng, flag));
        }
    }
    argv
}

/// The corpus for one version: valid flag sets, and flag sets with one deliberate error each.
fn corpus(version: &str, size: usize) -> Vec<Case> {
    let flags = table_flags(version, "megatron sft");
    let names: BTreeSet<&str> = flags.iter().map(|f| f.name.as_str()).collect();
    let mut rng = Rng(0x5EED_0000_0000_0001 ^ version.bytes().fold(0, |h, b| h * 31 + u64::from(b)));
    let mut cases = Vec::new();
    for i in 0..size {
        cases.push(Case {
            label: format!("valid set {i}"),
            command: "megatron-sft".into(),
            argv: valid_set(&mut rng, &flags, ""),
            refused_flag: None,
        });
    }
    let by_kind = |kind: &str| flags.iter().filter(|f| f.kind == kind && f.choices.is_none()).collect::<Vec<_>>();
    let (ints, floats, bools) = (by_kind("int"), by_kind("float"), by_kind("bool"));
    let with_choices: Vec<&Flag> = flags.iter().filter(|f| f.choices.is_some()).collect();
    // A proper prefix that only one flag starts with: argparse's allow_abbrev would take it.
    let abbreviations: Vec<(String, &str)> = names
        .iter()
        .filter_map(|n| {
            let prefix = &n[..n.len().checked_sub(2).filter(|&l| l >= 3)?];
            let starting: Vec<_> = names.iter().filter(|m| m.starts_with(prefix)).collect();
            (starting.len() == 1).then(|| (prefix.to_owned(), *n))
        })
        .collect();
    for i in 0..size {
        let (flag, bad): (String, Vec<String>) = match i % 6 {
            0 => {
                let f = rng.pick(&ints);
                (f.name.clone(), vec![format!("--{}", f.name), "three".into()])
            }
            1 => {
                let f = rng.pick(&floats);
                (f.name.clone(), vec![format!("--{}", f.name), "1e-5x".into()])
            }
            2 => {
                let f = rng.pick(&bools);
                (f.name.clone(), vec![format!("--{}", f.name), "maybe".into()])
            }
            3 => {
                let f = rng.pick(&with_choices);
                (f.name.clone(), vec![format!("--{}", f.name), "not_a_choice".into()])
            }
            4 => {
                let (prefix, _) = rng.pick(&abbreviations);
                (prefix.clone(), vec![format!("--{prefix}"), "1".into()])
            }
            _ => {
                // Not a flag, and no flag starts with it either.
                let base = &rng.pick(&flags).name;
                let unknown = format!("{base}_zz_not_a_flag");
                assert!(!names.iter().any(|n| n.starts_with(&unknown)));
                (unknown.clone(), vec![format!("--{unknown}"), "4".into()])
            }
        };
        let dest = flag.replace('-', "_");
        let mut argv = valid_set(&mut rng, &flags, &dest);
        // Before one of the valid flags, or at the end.
        let mut starts: Vec<usize> =
            argv.iter().enumerate().filter(|(_, a)| a.starts_with("--")).map(|(i, _)| i).collect();
        starts.push(argv.len());
        let at = *rng.pick(&starts);
        argv.splice(at..at, bad);
        cases.push(Case {
            label: format!("invalid set {i}"),
            command: "megatron-sft".into(),
            argv,
            refused_flag: Some(format!("--{flag}")),
        });
    }
    cases
}

#[test]
fn flag_tables_agree_with_the_real_parser_on_a_generated_corpus() {
    let mut bad = Vec::new();
    for version in ["3.12.6", "4.6.0"] {
        let cases = corpus(version, 150);
        let answers = run_batch(version, &cases);
        println!(
            "ms-swift {version}: {} generated megatron sft argvs checked by the real parser ({} valid, {} invalid)",
            cases.len(),
            cases.iter().filter(|c| c.refused_flag.is_none()).count(),
            cases.iter().filter(|c| c.refused_flag.is_some()).count()
        );
        bad.extend(mismatches(version, &cases, &answers));
    }
    assert!(bad.is_empty(), "{} disagreements between the tables and the real parser:\n{}", bad.len(), bad.join("\n"));
}

/// The agent passes the script text through `python -c`, one argv per process: one JSON line,
/// exit 0 when it could judge, 3 when it could not.
#[test]
fn argcheck_through_python_c_as_the_agent_runs_it() {
    let script = std::fs::read_to_string(repo_root().join("agent/src/preflight/swift_argcheck.py")).unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(swift_python("4.6.0")).arg("-c").arg(&script).args(args).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let [line] = stdout.lines().collect::<Vec<_>>()[..] else { panic!("one JSON line expected: {stdout}") };
        (out.status.code(), serde_json::from_str::<Value>(line).unwrap())
    };
    let (code, answer) = run(&["megatron-sft", "--num_workers", "4", "--lr_warmup_it", "3", "--lr", "1e-5"]);
    assert_eq!(code, Some(0), "{answer}");
    assert_eq!(answer["ok"], json!(false), "{answer}");
    let flags: Vec<&str> = answer["problems"].as_array().unwrap().iter().map(|p| p["flag"].as_str().unwrap()).collect();
    assert_eq!(flags, ["--lr_warmup_it", "--num_workers"], "{answer}");
    assert!(answer["problems"][1]["message"].as_str().unwrap().contains("--dataloader_num_workers"), "{answer}");

    let (code, answer) = run(&["no-such-command"]);
    assert_eq!(code, Some(3), "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("unknown command"), "{answer}");
}
