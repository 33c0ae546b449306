//! The node's own ms-swift decides (issue 13): which ms-swift command a job
//! runs, what its argv is, and how a node's answer refuses a launch.
//!
//! The agent runs the rendered argv through the installed ms-swift's parser
//! (agent/src/preflight/swift_argcheck.py) with the job's interpreter; this
//! module builds the request and turns the answers into refusal lines.

use cohort_proto::{PreflightReport, SwiftArgcheck, SwiftArgcheckResult};
use cohort_shared::spec::{JobSpec, Workload};

/// `(program, subcommand)` of an ms-swift CLI and the command name the check script takes.
const COMMANDS: &[(&str, &str, &str)] = &[
    ("megatron", "sft", "megatron-sft"),
    ("megatron", "export", "megatron-export"),
    ("swift", "export", "swift-export"),
    ("swift", "infer", "swift-infer"),
    ("swift", "eval", "swift-eval"),
];

/// The check for a command line that runs an ms-swift CLI: the first
/// `swift|megatron <subcommand>` in it (`/usr/bin/swift export ...`,
/// `env X=1 swift infer ...`), with everything after it.
pub(super) fn from_argv(argv: &[String]) -> Option<SwiftArgcheck> {
    let base = |word: &str| word.rsplit('/').next().unwrap_or(word).to_owned();
    argv.windows(2).enumerate().find_map(|(i, pair)| {
        let (program, sub) = (base(&pair[0]), pair[1].as_str());
        COMMANDS
            .iter()
            .find(|(p, s, _)| *p == program && *s == sub)
            .map(|(_, _, command)| SwiftArgcheck { command: (*command).to_owned(), argv: argv[i + 2..].to_vec() })
    })
}

/// What the node's ms-swift must accept for `spec`, whose rendered argv (one
/// node's process) is `argv`. A megatron-sft job is checked as `megatron sft`
/// whatever its `program:` (a wrapper still passes ms-swift's flags), unless the
/// program itself names another ms-swift command; a command job only when it
/// runs an ms-swift CLI (the built-in pipeline steps do).
pub(super) fn for_job(spec: &JobSpec, argv: &[String]) -> Option<SwiftArgcheck> {
    match &spec.workload {
        Workload::MegatronSft(m) => {
            let flags = argv.get(m.program.len()..).unwrap_or_default().to_vec();
            let named = from_argv(&m.program.iter().cloned().chain(std::iter::once(String::new())).collect::<Vec<_>>());
            let command = named.map(|c| c.command).unwrap_or_else(|| "megatron-sft".to_owned());
            Some(SwiftArgcheck { command, argv: flags })
        }
        Workload::Command(c) => from_argv(&c.argv),
        Workload::Pipeline(_) => None,
    }
}

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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use cohort_proto::SwiftFlagProblem;

    fn words(text: &str) -> Vec<String> {
        text.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn ms_swift_commands_are_found_in_a_command_line() {
        let check = from_argv(&words("/opt/venv/bin/swift export --model m --to_mcore true")).unwrap();
        assert_eq!(check.command, "swift-export");
        assert_eq!(check.argv, words("--model m --to_mcore true"));
        assert_eq!(from_argv(&words("env A=1 megatron sft --lr 1")).unwrap().command, "megatron-sft");
        assert!(from_argv(&words("python3 train.py --swift export")).is_none());
        assert!(from_argv(&words("swift")).is_none());
    }

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
