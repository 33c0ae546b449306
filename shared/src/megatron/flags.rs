//! The ms-swift `megatron sft` flags Cohort knows, and the spellings that differ
//! between the 3.x and 4.x dialects. The list only feeds "did you mean"
//! warnings: an unknown flag is still passed through.

use super::SwiftVersion;

/// Keys of the `megatron:` section that are Cohort settings, not flags.
pub const RESERVED_KEYS: &[&str] = &["swift_version", "extra_args", "program"];

/// (3.x spelling, 4.x spelling) pairs. The 4.x side of `load` has two spellings.
const RENAMED: &[(&str, &[&str])] = &[
    ("load", &["model", "mcore_model"]),
    ("save", &["output_dir"]),
    ("save_interval", &["save_steps"]),
    ("max_epochs", &["num_train_epochs"]),
    ("log_interval", &["logging_steps"]),
];

/// The spelling to use instead of `flag` under `version`, when `flag` belongs
/// to the other dialect: `output_dir` under 3.x gives `save`.
pub fn dialect_replacement(version: SwiftVersion, flag: &str) -> Option<String> {
    match version {
        SwiftVersion::V3 => RENAMED.iter().find(|(_, v4)| v4.contains(&flag)).map(|(v3, _)| format!("`{v3}`")),
        SwiftVersion::V4 => RENAMED
            .iter()
            .find(|(v3, _)| *v3 == flag)
            .map(|(_, v4)| v4.iter().map(|s| format!("`{s}`")).collect::<Vec<_>>().join(" or ")),
    }
}

/// Flags spelt the same way in both dialects.
#[rustfmt::skip]
const COMMON: &[&str] = &[
    // model, template, data
    "model_type", "model_revision", "template", "system", "max_length", "truncation_strategy",
    "torch_dtype", "dataset", "val_dataset", "split_dataset_ratio", "dataset_num_proc",
    "dataset_shuffle", "val_dataset_shuffle", "streaming", "load_from_cache_file", "columns",
    "strict", "packing", "padding_free", "lazy_tokenize", "num_workers", "model_author",
    "model_name", "seed", "data_seed", "use_hf", "hub_token", "check_model",
    "custom_register_path", "custom_dataset_info", "loss_scale", "agent_template",
    "enable_thinking", "new_special_tokens", "task_type", "num_labels", "attn_impl",
    "interleave_prob", "stopping_strategy", "remove_unused_columns", "download_mode",
    "enable_channel_loss", "max_pixels", "vit_gradient_checkpointing",
    // parallelism
    "tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size",
    "expert_model_parallel_size", "expert_tensor_parallel_size", "sequence_parallel",
    "virtual_pipeline_model_parallel_size", "decoder_first_pipeline_num_layers",
    "decoder_last_pipeline_num_layers", "account_for_embedding_in_pipeline_split",
    "account_for_loss_in_pipeline_split", "use_distributed_optimizer", "overlap_grad_reduce",
    "overlap_param_gather", "distributed_backend", "distributed_timeout_minutes",
    "tp_comm_overlap", "cp_comm_type",
    // batch, schedule, recompute
    "micro_batch_size", "global_batch_size", "train_iters", "recompute_granularity",
    "recompute_method", "recompute_num_layers", "recompute_modules", "use_cpu_initialization",
    "deterministic_mode", "train_dataloader_shuffle", "dataloader_type",
    "gradient_accumulation_fusion", "cross_entropy_loss_fusion", "cross_entropy_fusion_impl",
    "calculate_per_token_loss", "attention_backend", "manual_gc", "manual_gc_interval",
    "finetune", "eval_iters", "eval_interval", "eval_steps",
    // optimizer and learning rate
    "optimizer", "optimizer_cpu_offload", "optimizer_offload_fraction",
    "use_precision_aware_optimizer", "lr", "lr_decay_style", "lr_decay_iters",
    "lr_warmup_iters", "lr_warmup_fraction", "lr_warmup_init", "min_lr", "weight_decay",
    "clip_grad", "adam_beta1", "adam_beta2", "adam_eps", "sgd_momentum",
    // precision
    "fp16", "bf16", "attention_softmax_in_fp32", "initial_loss_scale", "min_loss_scale",
    "loss_scale_window", "hysteresis", "fp8_format", "fp8_recipe", "fp8_amax_history_len",
    "fp8_amax_compute_algo", "fp8_param_gather",
    // checkpoints
    "ckpt_format", "no_save_optim", "no_save_rng", "no_load_optim", "no_load_rng",
    "save_safetensors", "load_safetensors", "async_save", "use_persistent_ckpt_worker",
    "dist_ckpt_optim_fully_reshardable", "exit_on_missing_checkpoint", "add_version",
    "save_total_limit", "no_initialization", "use_checkpoint_opt_param_scheduler",
    "adapter_load", "mcore_adapter", "ref_load", "ref_model", "ref_adapter_load",
    // logging
    "tensorboard_dir", "tensorboard_queue_size", "log_throughput", "log_params_norm",
    "log_timers_to_tensorboard", "log_memory_to_tensorboard", "log_validation_ppl_to_tensorboard",
    "no_log_learning_rate_to_tensorboard", "wandb_project", "wandb_exp_name", "wandb_save_dir",
    "report_to", "logging_level",
    // tuners
    "train_type", "tuner_type", "freeze_llm", "freeze_vit", "freeze_aligner", "target_modules",
    "target_regex", "modules_to_save", "lora_rank", "lora_alpha", "lora_dropout", "lora_bias",
    "lora_dtype", "use_rslora",
    // mixture of experts
    "moe_grouped_gemm", "moe_router_topk", "moe_aux_loss_coeff", "moe_z_loss_coeff",
    "moe_token_dispatcher_type", "moe_shared_expert_overlap", "moe_permute_fusion",
    "moe_expert_capacity_factor", "moe_router_dtype", "moe_layer_freq",
    "moe_router_load_balancing_type",
    // architecture overrides
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
    "group_query_attention", "num_query_groups", "max_position_embeddings",
    "position_embedding_type", "rotary_base", "rotary_percent", "rope_scaling", "normalization",
    "norm_epsilon", "swiglu", "untie_embeddings_and_output_weights", "disable_bias_linear",
    "add_qkv_bias", "attention_dropout", "hidden_dropout", "kv_channels", "qk_layernorm",
    "transformer_impl", "padded_vocab_size",
];

/// Every flag Cohort knows under `version`, in no particular order.
pub fn known_flags(version: SwiftVersion) -> impl Iterator<Item = &'static str> {
    let dialect: Vec<&'static str> = match version {
        SwiftVersion::V3 => RENAMED.iter().map(|(v3, _)| *v3).collect(),
        SwiftVersion::V4 => RENAMED.iter().flat_map(|(_, v4)| v4.iter().copied()).collect(),
    };
    COMMON.iter().copied().chain(dialect)
}

/// Whether `flag` is one Cohort knows under `version`.
pub fn is_known(version: SwiftVersion, flag: &str) -> bool {
    known_flags(version).any(|known| known == flag)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dialects_name_each_others_spellings() {
        assert_eq!(dialect_replacement(SwiftVersion::V3, "output_dir").as_deref(), Some("`save`"));
        assert_eq!(dialect_replacement(SwiftVersion::V3, "mcore_model").as_deref(), Some("`load`"));
        assert_eq!(dialect_replacement(SwiftVersion::V3, "model").as_deref(), Some("`load`"));
        assert_eq!(dialect_replacement(SwiftVersion::V4, "load").as_deref(), Some("`model` or `mcore_model`"));
        assert_eq!(dialect_replacement(SwiftVersion::V4, "log_interval").as_deref(), Some("`logging_steps`"));
        assert_eq!(dialect_replacement(SwiftVersion::V3, "save"), None);
        assert_eq!(dialect_replacement(SwiftVersion::V4, "lr"), None);
    }

    #[test]
    fn known_flags_follow_the_dialect() {
        assert!(is_known(SwiftVersion::V3, "save_interval"));
        assert!(!is_known(SwiftVersion::V4, "save_interval"));
        assert!(is_known(SwiftVersion::V4, "save_steps"));
        assert!(is_known(SwiftVersion::V4, "lr"));
        assert!(!is_known(SwiftVersion::V3, "lrr"));
    }

    #[test]
    fn no_flag_is_listed_twice_or_reserved() {
        let mut all: Vec<&str> = COMMON.to_vec();
        all.extend(RENAMED.iter().map(|(v3, _)| *v3));
        all.extend(RENAMED.iter().flat_map(|(_, v4)| v4.iter().copied()));
        let count = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), count);
        assert!(!all.iter().any(|flag| RESERVED_KEYS.contains(flag)));
    }
}
