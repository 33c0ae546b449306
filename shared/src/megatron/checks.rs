//! The parallelism rules that Megatron and ms-swift enforce only after every
//! node has started (or, for some, silently ignore); checked up front so that a
//! bad layout is a job-file error, reported all at once, each with a fix.

use super::table::MEGATRON_SFT;
use super::{MegatronSpec, ParallelLayout, parse_bool};
use crate::job_file::Problems;
use crate::model::ModelConfig;

const SECTION: &str = "megatron";
const TP: &str = "tensor_model_parallel_size";
const PP: &str = "pipeline_model_parallel_size";
const CP: &str = "context_parallel_size";

/// Where the job runs: either number may be missing when the job file had a
/// problem there already; the checks that need it are then skipped.
pub(crate) struct Cluster {
    pub nodes: Option<u32>,
    pub gpus_per_node: Option<u32>,
}

pub(crate) fn check_parallelism(
    spec: &MegatronSpec,
    cluster: &Cluster,
    model: Option<&ModelConfig>,
    problems: &mut Problems,
) {
    let mut size = |key: &str, default: u32| match spec.positive_int(key) {
        Ok(value) => Some(value.unwrap_or(default)),
        Err(message) => {
            problems.at(&[SECTION, key], message);
            None
        }
    };
    let tp = size(TP, 1);
    let pp = size(PP, 1);
    let cp = size(CP, 1);
    let micro_batch = size("micro_batch_size", 1);
    let global_batch = size("global_batch_size", super::DEFAULT_GLOBAL_BATCH_SIZE);
    let recompute_chunk = check_recompute(spec, problems);

    if let Some(tp) = tp {
        check_sequence_parallel(spec, tp, problems);
    }
    let gpus = cluster.gpus_per_node.filter(|&gpus| gpus > 0);
    if let (Some(tp), Some(gpus)) = (tp, gpus)
        && gpus % tp != 0
    {
        problems.at(
                &[SECTION, TP],
                format!(
                    "TP {tp} does not divide gpus_per_node {gpus}, so a tensor-parallel group would span nodes (TP needs NVLink bandwidth); use a TP that divides {gpus} ({}) and scale across nodes with DP or PP",
                    list(&divisors(gpus))
                ),
            );
    }
    if let (Some(nodes), Some(gpus), Some(tp), Some(pp), Some(cp), Some(micro), Some(global)) =
        (cluster.nodes.filter(|&n| n > 0), gpus, tp, pp, cp, micro_batch, global_batch)
    {
        let layout = ParallelLayout::new(nodes.saturating_mul(gpus), tp, pp, cp, micro, global);
        check_world(spec, &layout, nodes, gpus, problems);
        if layout.dp > 0 {
            check_batch(&layout, problems);
        }
    }
    if let Some(model) = model {
        if let Some(tp) = tp {
            check_heads(model, tp, problems);
        }
        if let Some(pp) = pp {
            check_layers(spec, model, pp, recompute_chunk, problems);
        }
    }
}

fn check_sequence_parallel(spec: &MegatronSpec, tp: u32, problems: &mut Problems) {
    let Some(text) = spec.scalar("sequence_parallel") else {
        return;
    };
    match parse_bool(text) {
        None => problems.at(&[SECTION, "sequence_parallel"], format!("{text:?} is not true or false")),
        Some(true) if tp == 1 => problems.at(
            &[SECTION, "sequence_parallel"],
            format!("needs {TP} > 1; with TP 1 ms-swift silently turns it off; remove sequence_parallel or raise {TP}"),
        ),
        Some(_) => {}
    }
}

fn check_world(spec: &MegatronSpec, layout: &ParallelLayout, nodes: u32, gpus: u32, problems: &mut Problems) {
    if layout.dp > 0 {
        return;
    }
    let model_parallel = u64::from(layout.tp) * u64::from(layout.pp) * u64::from(layout.cp);
    // Blame the size that cannot divide the world on its own, else the last one set.
    let sizes = [(TP, layout.tp), (PP, layout.pp), (CP, layout.cp)];
    let set: Vec<&(&str, u32)> = sizes.iter().filter(|(key, _)| spec.flags.contains_key(*key)).collect();
    let field =
        set.iter().find(|(_, size)| !layout.world.is_multiple_of(*size)).or(set.last()).map_or("nodes", |(key, _)| key);
    let path: Vec<&str> = if field == "nodes" { vec!["nodes"] } else { vec![SECTION, field] };
    problems.at(
        &path,
        format!(
            "world size {} ({nodes} nodes × {gpus} GPUs) is not divisible by TP {} × PP {} × CP {} = {model_parallel}; choose sizes whose product divides {}",
            layout.world, layout.tp, layout.pp, layout.cp, layout.world
        ),
    );
}

fn check_batch(layout: &ParallelLayout, problems: &mut Problems) {
    let step = u64::from(layout.micro_batch) * u64::from(layout.dp);
    let global = u64::from(layout.global_batch);
    if global % step == 0 {
        return;
    }
    let below = global / step * step;
    let suggestion = if below == 0 { format!("{step}") } else { format!("{below} or {}", below + step) };
    problems.at(
        &[SECTION, "global_batch_size"],
        format!(
            "{global} is not divisible by micro_batch_size {} × data-parallel size {} (= {step}); use a multiple of {step}, e.g. {suggestion}",
            layout.micro_batch, layout.dp
        ),
    );
}

fn check_heads(model: &ModelConfig, tp: u32, problems: &mut Problems) {
    let heads = model.num_attention_heads;
    let kv_heads = model.num_key_value_heads;
    let fix = || {
        let valid: Vec<u32> = divisors(heads).into_iter().filter(|d| kv_heads.is_multiple_of(*d)).collect();
        format!("use a TP that divides both {heads} attention heads and {kv_heads} KV heads: {}", list(&valid))
    };
    if !heads.is_multiple_of(tp) {
        problems.at(
            &[SECTION, TP],
            format!("{}'s {heads} attention heads are not divisible by TP {tp}; {}", model.name, fix()),
        );
    }
    if !kv_heads.is_multiple_of(tp) {
        problems.at(
            &[SECTION, TP],
            format!("{}'s {kv_heads} KV heads (query groups) are not divisible by TP {tp}; {}", model.name, fix()),
        );
    }
}

fn check_layers(
    spec: &MegatronSpec,
    model: &ModelConfig,
    pp: u32,
    recompute_chunk: Option<u32>,
    problems: &mut Problems,
) {
    let layers = model.num_hidden_layers;
    // Uneven first/last stages are Megatron's own escape from this rule.
    let uneven = ["decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers"]
        .iter()
        .any(|key| spec.flags.contains_key(*key));
    if uneven {
        return;
    }
    if !layers.is_multiple_of(pp) {
        problems.at(
            &[SECTION, PP],
            format!(
                "{}'s {layers} layers are not divisible by PP {pp}; use a PP among {} (or set decoder_first_pipeline_num_layers / decoder_last_pipeline_num_layers)",
                model.name,
                list(&divisors(layers))
            ),
        );
        return;
    }
    let per_stage = layers / pp;
    // megatron-core core_r0.15.0 transformer_block.py:466-476: uniform recompute walks the
    // stage's layers in chunks of recompute_num_layers and indexes past the last layer
    // (IndexError at the first step) when the chunk does not divide them.
    if let Some(chunk) = recompute_chunk
        && !per_stage.is_multiple_of(chunk)
    {
        problems.at(
                &[SECTION, "recompute_num_layers"],
                format!(
                    "{layers} layers / PP {pp} = {per_stage} layers per pipeline stage, which recompute_method uniform cannot split into chunks of {chunk}; use a recompute_num_layers among {}",
                    list(&divisors(per_stage))
                ),
            );
    }
}

/// The recompute settings as megatron-core enforces them (it raises at start-up,
/// on every rank), with ms-swift's defaults from the job's flag table
/// (`recompute_granularity` selective, `recompute_method` and
/// `recompute_num_layers` None). Returns the chunk size of uniform full
/// recompute, which must also divide the layers of a pipeline stage.
fn check_recompute(spec: &MegatronSpec, problems: &mut Problems) -> Option<u32> {
    // A recompute flag refused already (bad type or choice) is left out of `spec`;
    // judging the rest against its default would only add noise.
    let keys = ["recompute_granularity", "recompute_method", "recompute_num_layers"];
    if keys.iter().any(|key| problems.reported(&format!("{SECTION}.{key}"))) {
        return None;
    }
    let sft = spec.release.table().command(MEGATRON_SFT);
    let default = |key: &str| sft.and_then(|sft| sft.flag(key)).and_then(|flag| flag.default_text());
    let granularity =
        spec.scalar("recompute_granularity").map(str::to_owned).or_else(|| default("recompute_granularity"));
    let method = spec.scalar("recompute_method").map(str::to_owned).or_else(|| default("recompute_method"));
    let layers_set = spec.flags.contains_key("recompute_num_layers");
    let layers = spec.scalar("recompute_num_layers").and_then(|text| text.trim().parse::<i64>().ok());
    let shown = |value: &str| {
        if spec.flags.contains_key("recompute_granularity") {
            value.to_owned()
        } else {
            format!("{value} (ms-swift's default)")
        }
    };
    match granularity.as_deref() {
        // ms-swift turns `none` into None (3.12.6 megatron_args.py:721-722, 4.6.0
        // megatron_args.py:847-848), and megatron-core checks nothing more without a
        // granularity (core_r0.15.0 transformer_config.py:904).
        None | Some("none") => None,
        Some("selective") => {
            // Megatron-LM core_r0.15.0 megatron/training/arguments.py:914-917 (3.x);
            // ms-swift 4.6.0 megatron_args.py:849-850.
            if method.is_some() {
                problems.at(
                    &[SECTION, "recompute_method"],
                    format!(
                        "only applies to recompute_granularity full, but the granularity is {}; remove recompute_method or set recompute_granularity: full",
                        shown("selective")
                    ),
                );
            }
            // core_r0.15.0 transformer_config.py:929-935.
            if layers_set {
                problems.at(
                    &[SECTION, "recompute_num_layers"],
                    format!(
                        "must not be set with recompute_granularity {} (megatron-core refuses it there); remove recompute_num_layers or set recompute_granularity: full",
                        shown("selective")
                    ),
                );
            }
            None
        }
        Some("full") => {
            // core_r0.15.0 transformer_config.py:911-920: full needs a method.
            if method.is_none() {
                problems.at(
                    &[SECTION, "recompute_granularity"],
                    "full needs recompute_method: uniform (recompute every chunk of recompute_num_layers layers) or block (recompute the first recompute_num_layers layers of each pipeline stage); megatron-core refuses full without a method",
                );
            }
            // core_r0.15.0 transformer_config.py:922-927: and a layer count (ms-swift's default is None).
            if !layers_set {
                problems.at(
                    &[SECTION, "recompute_granularity"],
                    "full needs recompute_num_layers (ms-swift's default is None, which megatron-core refuses): the layers per recompute chunk with uniform, the layers recomputed per pipeline stage with block",
                );
            }
            match (method.as_deref(), layers) {
                // transformer_block.py:470-476: a chunk of 0 (or less) never advances.
                (Some("uniform"), Some(chunk)) if chunk < 1 => {
                    problems.at(
                        &[SECTION, "recompute_num_layers"],
                        format!("{chunk} layers per uniform recompute chunk never advances through the layers; use at least 1"),
                    );
                    None
                }
                (Some("uniform"), Some(chunk)) => u32::try_from(chunk).ok(),
                _ => None,
            }
        }
        // Only reachable when the flags went unchecked (an invalid swift_version).
        Some(_) => None,
    }
}

/// Divisors in ascending order; pairs up to the square root keep huge inputs cheap.
fn divisors(n: u32) -> Vec<u32> {
    let mut low = Vec::new();
    let mut high = Vec::new();
    let mut d: u32 = 1;
    while u64::from(d) * u64::from(d) <= u64::from(n) {
        if n.is_multiple_of(d) {
            low.push(d);
            if d != n / d {
                high.push(n / d);
            }
        }
        d += 1;
    }
    low.extend(high.into_iter().rev());
    low
}

fn list(numbers: &[u32]) -> String {
    numbers.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")
}
