//! Which ms-swift command a job runs and the argv the node's own ms-swift
//! parser must accept (issue 13): part of each node's prepare command.

use cohort_proto::SwiftArgcheck;
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
pub fn from_argv(argv: &[String]) -> Option<SwiftArgcheck> {
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
pub fn for_job(spec: &JobSpec, argv: &[String]) -> Option<SwiftArgcheck> {
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

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
}
