//! Daemon configuration files (`/etc/cohort/controller.toml`,
//! `/etc/cohort/agent.toml`): every long command-line flag can be written in
//! the file under its own name, e.g. `node-ttl = "10s"` for `--node-ttl 10s`.
//!
//! Precedence is flag > environment variable > file > built-in default. The
//! file's values become the defaults of clap's own arguments, so clap does the
//! merging, runs the same value parsers on file values as on flags, and any flag
//! added later is covered without further work. (figment was considered: it
//! needs every flag to be an `Option` that serde can merge, and loses clap's
//! value parsers and `--help` defaults.)

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::{Arg, ArgAction, Command, CommandFactory, FromArgMatches};

/// The id and long name of the flag that names the file.
pub const CONFIG_FLAG: &str = "config";

/// Where a daemon's configuration comes from.
#[derive(Debug, Clone, Copy)]
pub struct ConfigLocation {
    /// Used when neither `--config` nor `env` names a file; a missing default file is no error.
    pub default_path: &'static str,
    /// The environment variable that may name the file.
    pub env: &'static str,
}

/// A configuration file that cannot be used; names the file, the key and the fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {error}")]
    Read { path: PathBuf, error: std::io::Error },
    #[error("config file {path}: not valid TOML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("config file {path}: `{key}`: {message}")]
    Key { path: PathBuf, key: String, message: String },
}

/// Parses the process's command line over the configuration file. Exits with
/// clap's usage message on bad flags, like `Parser::parse`.
pub fn parse<P: CommandFactory + FromArgMatches>(location: ConfigLocation) -> Result<P, ConfigError> {
    match try_parse_from(location, std::env::args_os()) {
        Ok(parsed) => Ok(parsed),
        Err(ParseError::Config(e)) => Err(e),
        Err(ParseError::Clap(e)) => e.exit(),
    }
}

/// Why [`try_parse_from`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Clap(#[from] clap::Error),
}

/// [`parse`] over the given arguments (the first is the program name).
pub fn try_parse_from<P, I, T>(location: ConfigLocation, args: I) -> Result<P, ParseError>
where
    P: CommandFactory + FromArgMatches,
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let cmd = with_config_flag(P::command(), location);
    let (path, explicit) = config_path(&cmd, &args, location);
    let cmd = match read_table(&path, explicit)? {
        Some(table) => apply(cmd, &path, &table)?,
        None => cmd,
    };
    let matches = cmd.try_get_matches_from(args)?;
    Ok(P::from_arg_matches(&matches)?)
}

fn with_config_flag(cmd: Command, location: ConfigLocation) -> Command {
    cmd.arg(
        Arg::new(CONFIG_FLAG)
            .long(CONFIG_FLAG)
            .env(location.env)
            .value_name("FILE")
            .value_parser(clap::value_parser!(PathBuf))
            .help(format!(
                "Configuration file (TOML): any long flag as `name = value` [default: {}]",
                location.default_path
            )),
    )
}

/// The file to read, and whether the user named it (then it must exist).
fn config_path(cmd: &Command, args: &[OsString], location: ConfigLocation) -> (PathBuf, bool) {
    // A first, forgiving pass: other flags may still be missing (they can come from the file).
    let named = cmd
        .clone()
        .ignore_errors(true)
        .disable_help_flag(true)
        .disable_version_flag(true)
        .try_get_matches_from(args)
        .ok()
        .and_then(|m| m.get_one::<PathBuf>(CONFIG_FLAG).cloned());
    match named {
        Some(path) => (path, true),
        None => (PathBuf::from(location.default_path), false),
    }
}

fn read_table(path: &Path, explicit: bool) -> Result<Option<toml::Table>, ConfigError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if !explicit && e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(ConfigError::Read { path: path.to_owned(), error }),
    };
    text.parse::<toml::Table>()
        .map(Some)
        .map_err(|e| ConfigError::Syntax { path: path.to_owned(), message: e.to_string().trim_end().to_owned() })
}

/// Makes every key of `table` the default of the flag of that long name (in
/// the command and its subcommands).
fn apply(mut cmd: Command, path: &Path, table: &toml::Table) -> Result<Command, ConfigError> {
    let longs = long_flags(&cmd);
    for (key, value) in table {
        let long = key.replace('_', "-");
        let error = |message: String| ConfigError::Key { path: path.to_owned(), key: key.clone(), message };
        if long == CONFIG_FLAG {
            return Err(error("a config file cannot name another config file".into()));
        }
        if !longs.contains(long.as_str()) {
            let hint = strsim_closest(&long, &longs)
                .map(|best| format!("; did you mean `{best}`?"))
                .unwrap_or_else(|| format!("; keys are the long flags of `{} --help`", cmd.get_name()));
            return Err(error(format!("no flag --{long}{hint}")));
        }
        cmd = set_default(cmd, &long, value).map_err(error)?;
    }
    Ok(cmd)
}

fn long_flags(cmd: &Command) -> BTreeSet<String> {
    let mut longs: BTreeSet<String> = cmd
        .get_arguments()
        .filter_map(Arg::get_long)
        .filter(|l| !matches!(*l, "help" | "version" | CONFIG_FLAG))
        .map(str::to_owned)
        .collect();
    for sub in cmd.get_subcommands() {
        longs.extend(long_flags(sub));
    }
    longs
}

fn strsim_closest<'a>(key: &str, longs: &'a BTreeSet<String>) -> Option<&'a str> {
    longs
        .iter()
        .map(|l| (strsim::jaro_winkler(key, l), l))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, l)| l.as_str())
}

fn set_default(mut cmd: Command, long: &str, value: &toml::Value) -> Result<Command, String> {
    let ids: Vec<String> =
        cmd.get_arguments().filter(|a| a.get_long() == Some(long)).map(|a| a.get_id().to_string()).collect();
    for id in ids {
        let Some(arg) = cmd.get_arguments().find(|a| a.get_id() == id.as_str()) else { continue };
        let values = file_values(arg, value)?;
        validate(arg, &values)?;
        // A flag given in the file is no longer required on the command line.
        cmd = cmd.mut_arg(&id, |a| a.default_values(values).required(false));
    }
    let subs: Vec<String> = cmd.get_subcommands().map(|s| s.get_name().to_owned()).collect();
    for name in subs {
        let sub = cmd.find_subcommand(&name).cloned();
        if let Some(sub) = sub
            && long_flags(&sub).contains(long)
        {
            let sub = set_default(sub, long, value)?;
            cmd = cmd.mut_subcommand(&name, |_| sub);
        }
    }
    Ok(cmd)
}

/// The default value(s) a TOML value stands for, as command-line text.
fn file_values(arg: &Arg, value: &toml::Value) -> Result<Vec<String>, String> {
    let is_switch = matches!(arg.get_action(), ArgAction::SetTrue | ArgAction::SetFalse);
    if is_switch && !matches!(value, toml::Value::Boolean(_)) {
        return Err(format!("is a switch: write `true` or `false`, not {}", value.type_str()));
    }
    match value {
        toml::Value::Array(items) => {
            let items = items.iter().map(scalar).collect::<Result<Vec<_>, _>>()?;
            match (arg.get_value_delimiter(), arg.get_action()) {
                (Some(delimiter), _) => Ok(vec![items.join(&delimiter.to_string())]),
                (None, ArgAction::Append) => Ok(items),
                _ => Err("takes one value, not a list".into()),
            }
        }
        // `labels = { gpu = "h100", rack = "a" }` is `--labels gpu=h100,rack=a`.
        toml::Value::Table(table) => {
            let pairs =
                table.iter().map(|(k, v)| scalar(v).map(|v| format!("{k}={v}"))).collect::<Result<Vec<_>, _>>()?;
            Ok(vec![pairs.join(",")])
        }
        other => Ok(vec![scalar(other)?]),
    }
}

fn scalar(value: &toml::Value) -> Result<String, String> {
    match value {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        toml::Value::Datetime(d) => Ok(d.to_string()),
        other => Err(format!("expected a string, number or boolean, got {}", other.type_str())),
    }
}

/// Runs the flag's own value parser on the file's values, so a bad value is
/// reported against the file and key rather than as a bad default.
fn validate(arg: &Arg, values: &[String]) -> Result<(), String> {
    if matches!(arg.get_action(), ArgAction::SetTrue | ArgAction::SetFalse | ArgAction::Count) {
        return Ok(());
    }
    let probe = arg.clone().env(None).required(false).default_values(Vec::<String>::new()).global(false);
    let Some(long) = arg.get_long() else { return Ok(()) };
    let mut argv = vec!["config".to_owned()];
    for value in values {
        argv.push(format!("--{long}={value}"));
    }
    Command::new("config").arg(probe).try_get_matches_from(argv).map(|_| ()).map_err(|e| {
        let text = e.render().to_string();
        let first = text.lines().next().unwrap_or_default();
        first.strip_prefix("error: ").unwrap_or(first).to_owned()
    })
}
