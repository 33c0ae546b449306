//! A flag name and value checked against the flag table of the job's ms-swift
//! version: unknown flags (with a "did you mean" in that version), the other
//! dialect's spelling (with the rename), argparse abbreviations, wrong types,
//! values outside `choices`, switches given a value, lists where one value goes.

use super::table::{CommandFlags, Flag, FlagType, Lookup, MEGATRON_SFT, SwiftRelease};
use super::{FlagValue, parse_bool};
use crate::job_file::did_you_mean;

/// Keys of the `megatron:` section that are Cohort settings, not flags.
pub const RESERVED_KEYS: &[&str] = &["swift_version", "extra_args", "program"];

/// A flag that ms-swift renamed between the 3.x and 4.x dialects: `from` is
/// absent in every table of major `major` and each of `to` is present (a unit
/// test checks both against the tables).
struct Rename {
    from: &'static str,
    to: &'static [&'static str],
    major: u16,
    /// What else changes besides the name.
    note: &'static str,
}

const fn rename(from: &'static str, to: &'static [&'static str], major: u16, note: &'static str) -> Rename {
    Rename { from, to, major, note }
}

const OPPOSITE: &str = " with the opposite value";

#[rustfmt::skip]
const RENAMES: &[Rename] = &[
    // 3.x spelling -> 4.x spelling
    rename("load", &["model", "mcore_model"], 4, " (`model`: a Hugging Face model, which 4.x loads itself; `mcore_model`: an mcore checkpoint)"),
    rename("save", &["output_dir"], 4, ""),
    rename("save_interval", &["save_steps"], 4, ""),
    rename("max_epochs", &["num_train_epochs"], 4, ""),
    rename("log_interval", &["logging_steps"], 4, ""),
    rename("train_type", &["tuner_type"], 4, ""),
    rename("eval_interval", &["eval_steps"], 4, ""),
    rename("num_workers", &["dataloader_num_workers"], 4, ""),
    rename("no_initialization", &["perform_initialization"], 4, OPPOSITE),
    rename("adapter_load", &["mcore_adapter"], 4, ""),
    rename("ref_load", &["mcore_ref_model"], 4, ""),
    rename("distributed_backend", &["ddp_backend"], 4, ""),
    rename("distributed_timeout_minutes", &["ddp_timeout"], 4, " (in seconds, not minutes)"),
    rename("manual_gc_interval", &["manual_gc_steps"], 4, ""),
    // 4.x spelling -> 3.x spelling
    rename("mcore_model", &["load"], 3, ""),
    rename("output_dir", &["save"], 3, ""),
    rename("save_steps", &["save_interval"], 3, ""),
    rename("num_train_epochs", &["max_epochs"], 3, ""),
    rename("logging_steps", &["log_interval"], 3, ""),
    rename("tuner_type", &["train_type"], 3, ""),
    rename("eval_steps", &["eval_interval"], 3, ""),
    rename("dataloader_num_workers", &["num_workers"], 3, ""),
    rename("perform_initialization", &["no_initialization"], 3, OPPOSITE),
    rename("mcore_adapter", &["adapter_load"], 3, ""),
    rename("mcore_ref_model", &["ref_load"], 3, ""),
    rename("manual_gc_steps", &["manual_gc_interval"], 3, ""),
    rename("gradient_accumulation_fusion", &["no_gradient_accumulation_fusion"], 3, OPPOSITE),
];

/// The job's ms-swift version and how the job wrote it, for messages, and the
/// command whose flags are checked.
#[derive(Clone, Copy, Debug)]
pub struct FlagContext<'a> {
    pub release: SwiftRelease,
    /// `swift_version` as written (`3`, `"3.10"`).
    pub written: &'a str,
    /// A command of the tables: [`MEGATRON_SFT`], `swift export`, ...
    pub command: &'a str,
}

impl<'a> FlagContext<'a> {
    /// `megatron sft` flags of `release`.
    pub fn megatron_sft(release: SwiftRelease, written: &'a str) -> Self {
        FlagContext { release, written, command: MEGATRON_SFT }
    }

    fn flags(&self) -> Option<&'static CommandFlags> {
        self.release.table().command(self.command)
    }

    /// `ms-swift 3.12.6 (swift_version 3)`
    fn version(&self) -> String {
        format!("ms-swift {} (swift_version {})", self.release, self.written)
    }
}

/// The flag `name` (without dashes) of the context's command and version, or
/// why ms-swift's parser would not take `--{name}` as the user meant it.
pub fn check_name(context: FlagContext<'_>, name: &str) -> Result<&'static Flag, String> {
    let command = context.command;
    let Some(sft) = context.flags() else {
        return Err(format!("{} has no `{command}` command", context.version()));
    };
    let lookup = sft.lookup(name);
    if let Lookup::Exact(flag) = lookup {
        return Ok(flag);
    }
    let release = context.release;
    // The dialect renames are those of `megatron sft`.
    let mut renames = RENAMES.iter().filter(|_| command == MEGATRON_SFT);
    if let Some(rename) = renames.find(|r| r.from == name && r.major == release.major()) {
        let other = if release.major() == 3 { 4 } else { 3 };
        let to = rename.to.iter().map(|t| format!("`{t}`")).collect::<Vec<_>>().join(" or ");
        return Err(format!(
            "`{name}` is the ms-swift {other}.x spelling; with swift_version {} write {to}{} (ms-swift {release} has no --{name}), or set swift_version: {other}",
            context.written, rename.note
        ));
    }
    match lookup {
        Lookup::Abbreviation(targets) if targets.len() == 1 => Err(format!(
            "`{name}` is not a {command} flag of {}, only an abbreviation that argparse would silently take as --{}; write the whole flag name `{}`",
            context.version(),
            targets[0],
            targets[0]
        )),
        Lookup::Abbreviation(targets) => Err(format!(
            "`{name}` is not a {command} flag of {}; argparse would refuse it as an abbreviation of several flags ({}); write the whole name of the one you mean",
            context.version(),
            targets.iter().map(|t| format!("--{t}")).collect::<Vec<_>>().join(", ")
        )),
        Lookup::Exact(_) | Lookup::Unknown => {
            let mut message = format!("`{name}` is not a {command} flag of {}", context.version());
            if let Some(close) = did_you_mean(name, sft.canonical_names()) {
                message.push_str(&format!("; did you mean `{close}`?"));
            } else if let Some(other) = newest_release_with(command, name, release) {
                let written = if other.major() == release.major() {
                    format!("\"{}.{}\"", other.major(), other.minor())
                } else {
                    other.major().to_string()
                };
                message.push_str(&format!(
                    "; ms-swift {other} has it: if the nodes run that version, set swift_version: {written}"
                ));
            } else {
                message.push_str(&format!("; its flags are listed in shared/swift-flags/ms-swift-{release}.json"));
            }
            Err(message)
        }
    }
}

/// The newest other version whose `command` has exactly `name`, one of the
/// same major first.
fn newest_release_with(command: &str, name: &str, except: SwiftRelease) -> Option<SwiftRelease> {
    SwiftRelease::available()
        .filter(|release| *release != except)
        .filter(|release| release.table().command(command).is_some_and(|flags| flags.flag(name).is_some()))
        .max_by_key(|release| (release.major() == except.major(), *release))
}

impl Flag {
    /// Whether ms-swift's parser takes `value` for this flag; the error names
    /// what it expects. A value is checked only as far as the parser itself
    /// checks it (a JSON-typed value may also be a file path, so it is not parsed).
    pub fn check_value(&self, value: &FlagValue) -> Result<(), String> {
        let name = self.canonical();
        if self.kind == FlagType::Switch {
            let form = match &self.negates {
                Some(field) => format!("write `{field}: false` instead (or `--{}` alone in extra_args)", self.name),
                None => format!("write `--{}` alone in extra_args", self.name),
            };
            return Err(format!("`{}` is a switch that takes no value; {form}", self.name));
        }
        if !self.cli_usable {
            return Err(format!(
                "ms-swift's parser refuses every value of `{name}` on the command line (a Dict-typed field argparse cannot build); leave it out"
            ));
        }
        match value {
            FlagValue::List(items) if !self.list => Err(format!(
                "`{name}` takes one value ({}), got a list of {}; write `{name}: <value>`",
                self.expected(),
                items.len()
            )),
            FlagValue::List(items) => items.iter().try_for_each(|item| self.check_one(item)),
            FlagValue::Scalar(text) if self.list && text.contains(char::is_whitespace) => Err(format!(
                "`{name}` takes several values, but {text:?} would reach ms-swift as ONE value with spaces in it; write a list (`{name}: [a, b]`), or a one-element list if the spaces belong to the value"
            )),
            FlagValue::Scalar(text) => self.check_one(text),
        }
    }

    /// One value of the flag (the only one, or one element of a list).
    pub fn check_one(&self, text: &str) -> Result<(), String> {
        let name = self.canonical();
        let typed = match self.kind {
            FlagType::Bool => parse_bool(text).is_some(),
            FlagType::Int => python_int(text),
            FlagType::Float => python_float(text),
            FlagType::Str | FlagType::Json | FlagType::Switch => true,
        };
        if !typed {
            return Err(format!("`{name}` takes {}, got {text:?}", self.kind));
        }
        match &self.choices {
            Some(choices) if !choices.iter().any(|choice| choice == text) => {
                let hint = did_you_mean(text, choices.iter().map(String::as_str))
                    .map(|close| format!("; did you mean `{close}`?"))
                    .unwrap_or_default();
                Err(format!("`{name}` must be one of {}, got {text:?}{hint}", choices.join(", ")))
            }
            _ => Ok(()),
        }
    }

    fn expected(&self) -> String {
        match &self.choices {
            Some(choices) => format!("one of {}", choices.join(", ")),
            None => self.kind.to_string(),
        }
    }
}

/// What Python's `int()` takes: optional sign, digits, single underscores between digits.
fn python_int(text: &str) -> bool {
    let digits = text.trim().trim_start_matches(['+', '-']);
    let stripped = text.trim();
    stripped.len() - digits.len() <= 1
        && !digits.is_empty()
        && !digits.starts_with('_')
        && !digits.ends_with('_')
        && !digits.contains("__")
        && digits.chars().all(|c| c.is_ascii_digit() || c == '_')
}

/// What Python's `float()` takes, as far as Rust's parser agrees (both read
/// `1e-5`, `.5`, `5.`, `inf`, `nan`); underscores between digits are dropped first.
fn python_float(text: &str) -> bool {
    let trimmed = text.trim();
    if trimmed.contains("__") || trimmed.starts_with('_') || trimmed.ends_with('_') {
        return false;
    }
    trimmed.replace('_', "").parse::<f64>().is_ok()
}

/// Checks the `--flag value ...` tokens of `extra_args`: each `--name` (also
/// `--name=value`) as a flag name, and its values where the count makes them
/// clear. Returns (index of the token, message) per problem.
pub fn check_extra_args(context: FlagContext<'_>, args: &[String]) -> Vec<(usize, String)> {
    let mut problems = Vec::new();
    let mut index = 0;
    while index < args.len() {
        let token = &args[index];
        let Some(body) = token.strip_prefix("--") else {
            // ms-swift refuses any string its parser leaves over (remaining_argv).
            problems.push((
                index,
                format!(
                    "{token:?} follows no --flag; ms-swift refuses leftover arguments (write flags as `--name value`)"
                ),
            ));
            index += 1;
            continue;
        };
        let (name, inline) = match body.split_once('=') {
            Some((name, value)) => (name, Some(value.to_owned())),
            None => (body, None),
        };
        let start = index;
        index += 1;
        let mut values: Vec<String> = inline.into_iter().collect();
        while index < args.len() && !args[index].starts_with("--") {
            values.push(args[index].clone());
            index += 1;
        }
        let flag = match check_name(context, name) {
            Ok(flag) => flag,
            Err(message) => {
                problems.push((start, message));
                continue;
            }
        };
        let verdict = match (values.len(), flag.kind) {
            (0, FlagType::Switch) => Ok(()),
            (0, FlagType::Bool) if flag.value_optional => Ok(()),
            (0, _) => Err(format!("`{token}` needs a value ({})", flag.expected())),
            (1, _) => flag.check_value(&FlagValue::Scalar(values.remove(0))),
            (_, _) => flag.check_value(&FlagValue::List(values)),
        };
        if let Err(message) = verdict {
            problems.push((start, message));
        }
    }
    problems
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::megatron::SwiftVersion;

    #[test]
    fn every_rename_holds_in_every_table_of_its_major() {
        let mut checked = 0;
        for rename in RENAMES {
            for release in SwiftRelease::available().filter(|r| r.major() == rename.major) {
                let sft = release.table().command(MEGATRON_SFT).unwrap();
                assert!(sft.flag(rename.from).is_none(), "{release} has --{}, so it is no rename there", rename.from);
                for to in rename.to {
                    assert!(sft.flag(to).is_some(), "{release} lacks --{to}, offered for --{}", rename.from);
                }
                checked += 1;
            }
            // The old spelling must exist in the other dialect, else it is no rename at all.
            let other = SwiftRelease::newest(if rename.major == 3 { SwiftVersion::V4 } else { SwiftVersion::V3 });
            assert!(
                other.table().command(MEGATRON_SFT).unwrap().flag(rename.from).is_some(),
                "ms-swift {other} lacks --{}",
                rename.from
            );
        }
        assert!(checked >= RENAMES.len());
    }

    #[test]
    fn python_number_syntax() {
        for good in ["3", "-3", "+3", "1_000", " 7 "] {
            assert!(python_int(good), "{good}");
        }
        for bad in ["three", "3.0", "1e3", "", "-", "_1", "1__0", "--3"] {
            assert!(!python_int(bad), "{bad}");
        }
        for good in ["1e-5", ".5", "5.", "inf", "nan", "3", "1_0.5"] {
            assert!(python_float(good), "{good}");
        }
        for bad in ["fast", "1e", "1,5"] {
            assert!(!python_float(bad), "{bad}");
        }
    }
}
