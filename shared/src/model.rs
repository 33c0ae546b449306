//! Model architecture numbers that the parallelism checks and the memory
//! estimate need: layers, heads, KV heads, sizes. Read from a Hugging Face
//! `config.json` or from the built-in table of models Cohort knows by name.

use serde::Deserialize;

/// The Hugging Face config of Qwen3-8B, verbatim.
const QWEN3_8B_CONFIG: &str = include_str!("../models/qwen3-8b-config.json");

/// The architecture of a dense decoder-only transformer.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// The model's canonical name, e.g. `Qwen3-8B`.
    pub name: String,
    pub num_hidden_layers: u32,
    pub num_attention_heads: u32,
    /// Query groups (GQA); equals `num_attention_heads` for plain multi-head attention.
    pub num_key_value_heads: u32,
    pub hidden_size: u32,
    /// Per-head dimension. Qwen3 sets it explicitly (128) and it need not be
    /// `hidden_size / num_attention_heads`.
    pub head_dim: u32,
    /// The SwiGLU MLP's inner size.
    pub intermediate_size: u32,
    pub vocab_size: u32,
    /// Whether the output layer reuses the input embedding matrix.
    pub tie_word_embeddings: bool,
}

/// A `config.json` that does not describe a usable model.
#[derive(Debug, thiserror::Error)]
pub enum ModelConfigError {
    #[error("model {name}: config.json is not valid JSON: {source}")]
    Json { name: String, source: serde_json::Error },
    #[error("model {name}: config.json has no `{field}`; is this a decoder-only transformer config?")]
    MissingField { name: String, field: &'static str },
    #[error("model {name}: config.json field `{field}` {reason}")]
    Invalid { name: String, field: &'static str, reason: String },
}

/// The fields of a Hugging Face `config.json` that Cohort reads; others are ignored.
#[derive(Deserialize)]
struct HfConfig {
    num_hidden_layers: Option<u64>,
    num_attention_heads: Option<u64>,
    num_key_value_heads: Option<u64>,
    hidden_size: Option<u64>,
    head_dim: Option<u64>,
    intermediate_size: Option<u64>,
    vocab_size: Option<u64>,
    tie_word_embeddings: Option<bool>,
}

impl ModelConfig {
    /// Reads a Hugging Face `config.json`. `num_key_value_heads` defaults to the
    /// attention heads, `head_dim` to `hidden_size / num_attention_heads`, and
    /// `tie_word_embeddings` to false (the Llama/Qwen default).
    pub fn from_hf_json(name: &str, json: &str) -> Result<ModelConfig, ModelConfigError> {
        let raw: HfConfig =
            serde_json::from_str(json).map_err(|source| ModelConfigError::Json { name: name.to_owned(), source })?;
        let required = |value: Option<u64>, field: &'static str| -> Result<u32, ModelConfigError> {
            let value = value.ok_or_else(|| ModelConfigError::MissingField { name: name.to_owned(), field })?;
            positive_u32(name, field, value)
        };
        let num_hidden_layers = required(raw.num_hidden_layers, "num_hidden_layers")?;
        let num_attention_heads = required(raw.num_attention_heads, "num_attention_heads")?;
        let hidden_size = required(raw.hidden_size, "hidden_size")?;
        let intermediate_size = required(raw.intermediate_size, "intermediate_size")?;
        let vocab_size = required(raw.vocab_size, "vocab_size")?;
        let num_key_value_heads = match raw.num_key_value_heads {
            Some(value) => positive_u32(name, "num_key_value_heads", value)?,
            None => num_attention_heads,
        };
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(ModelConfigError::Invalid {
                name: name.to_owned(),
                field: "num_key_value_heads",
                reason: format!("({num_key_value_heads}) does not divide num_attention_heads ({num_attention_heads})"),
            });
        }
        let head_dim = match raw.head_dim {
            Some(value) => positive_u32(name, "head_dim", value)?,
            None if hidden_size % num_attention_heads == 0 => hidden_size / num_attention_heads,
            None => {
                return Err(ModelConfigError::Invalid {
                    name: name.to_owned(),
                    field: "hidden_size",
                    reason: format!(
                        "({hidden_size}) is not divisible by num_attention_heads ({num_attention_heads}) and no head_dim is given"
                    ),
                });
            }
        };
        Ok(ModelConfig {
            name: name.to_owned(),
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            hidden_size,
            head_dim,
            intermediate_size,
            vocab_size,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
        })
    }

    /// Parameter count of a dense decoder: token embeddings; per layer the
    /// q/k/v/o projections (no biases), the SwiGLU MLP (`3·hidden·intermediate`)
    /// and two RMSNorms; the final norm; and the output layer unless tied.
    /// Qwen3's per-head q/k norms (256 parameters a layer) are left out.
    pub fn parameter_count(&self) -> u64 {
        let hidden = u64::from(self.hidden_size);
        let q_width = u64::from(self.num_attention_heads) * u64::from(self.head_dim);
        let kv_width = u64::from(self.num_key_value_heads) * u64::from(self.head_dim);
        let attention = hidden * q_width * 2 + hidden * kv_width * 2;
        let mlp = 3 * hidden * u64::from(self.intermediate_size);
        let norms = 2 * hidden;
        let per_layer = attention + mlp + norms;
        let embedding = u64::from(self.vocab_size) * hidden;
        let output = if self.tie_word_embeddings { 0 } else { embedding };
        embedding + u64::from(self.num_hidden_layers) * per_layer + hidden + output
    }

    /// The built-in table: recognises a model by its name inside a path or hub
    /// id, case-insensitively: `"Qwen3-8B-mcore"`, `"/models/Qwen/Qwen3-8B"` and
    /// `"Qwen/Qwen3-8B"` all give Qwen3-8B. The name must stand alone, bounded by
    /// a non-alphanumeric character or the end, so `"Qwen3-8B"` never matches
    /// inside `"Qwen3-8B0"` or `"MyQwen3-8B"`. Ships Qwen3 0.6B, 1.7B, 4B, 8B, 14B, 32B.
    pub fn known(model_ref: &str) -> Option<ModelConfig> {
        let haystack = model_ref.to_ascii_lowercase();
        // The longest matching name wins, should one table name ever contain another.
        let name = KNOWN_MODELS
            .iter()
            .map(|model| model.name)
            .filter(|name| contains_standalone(&haystack, &name.to_ascii_lowercase()))
            .max_by_key(|name| name.len())?;
        known_by_name(name)
    }
}

fn positive_u32(name: &str, field: &'static str, value: u64) -> Result<u32, ModelConfigError> {
    match u32::try_from(value) {
        Ok(value) if value > 0 => Ok(value),
        _ => Err(ModelConfigError::Invalid {
            name: name.to_owned(),
            field,
            reason: format!("must be a positive 32-bit integer, got {value}"),
        }),
    }
}

/// True when `needle` occurs in `haystack` with no letter or digit on either side.
fn contains_standalone(haystack: &str, needle: &str) -> bool {
    haystack.match_indices(needle).any(|(start, _)| {
        let before = haystack[..start].chars().next_back();
        let after = haystack[start + needle.len()..].chars().next();
        !before.is_some_and(char::is_alphanumeric) && !after.is_some_and(char::is_alphanumeric)
    })
}

/// A row of the built-in table. Qwen3-8B comes from its embedded config.json;
/// the other rows are the numbers of their Hugging Face configs.
struct KnownModel {
    name: &'static str,
    layers: u32,
    heads: u32,
    kv_heads: u32,
    hidden: u32,
    intermediate: u32,
    tied: bool,
}

const QWEN3_VOCAB: u32 = 151_936;
const QWEN3_HEAD_DIM: u32 = 128;

#[rustfmt::skip]
const KNOWN_MODELS: &[KnownModel] = &[
    KnownModel { name: "Qwen3-0.6B", layers: 28, heads: 16, kv_heads: 8, hidden: 1024, intermediate: 3072, tied: true },
    KnownModel { name: "Qwen3-1.7B", layers: 28, heads: 16, kv_heads: 8, hidden: 2048, intermediate: 6144, tied: true },
    KnownModel { name: "Qwen3-4B", layers: 36, heads: 32, kv_heads: 8, hidden: 2560, intermediate: 9728, tied: true },
    KnownModel { name: "Qwen3-8B", layers: 36, heads: 32, kv_heads: 8, hidden: 4096, intermediate: 12288, tied: false },
    KnownModel { name: "Qwen3-14B", layers: 40, heads: 40, kv_heads: 8, hidden: 5120, intermediate: 17408, tied: false },
    KnownModel { name: "Qwen3-32B", layers: 64, heads: 64, kv_heads: 8, hidden: 5120, intermediate: 25600, tied: false },
];

fn known_by_name(name: &str) -> Option<ModelConfig> {
    if name == "Qwen3-8B" {
        // The embedded file is the source of truth for the flagship model.
        return ModelConfig::from_hf_json(name, QWEN3_8B_CONFIG).ok();
    }
    let row = KNOWN_MODELS.iter().find(|model| model.name == name)?;
    Some(ModelConfig {
        name: row.name.to_owned(),
        num_hidden_layers: row.layers,
        num_attention_heads: row.heads,
        num_key_value_heads: row.kv_heads,
        hidden_size: row.hidden,
        head_dim: QWEN3_HEAD_DIM,
        intermediate_size: row.intermediate,
        vocab_size: QWEN3_VOCAB,
        tie_word_embeddings: row.tied,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn qwen3_8b() -> ModelConfig {
        ModelConfig::known("Qwen3-8B").unwrap()
    }

    #[test]
    fn embedded_qwen3_8b_config_is_read() {
        let model = qwen3_8b();
        assert_eq!(
            model,
            ModelConfig {
                name: "Qwen3-8B".into(),
                num_hidden_layers: 36,
                num_attention_heads: 32,
                num_key_value_heads: 8,
                hidden_size: 4096,
                head_dim: 128,
                intermediate_size: 12288,
                vocab_size: 151_936,
                tie_word_embeddings: false,
            }
        );
    }

    #[test]
    fn table_row_agrees_with_the_embedded_config() {
        let row = KNOWN_MODELS.iter().find(|m| m.name == "Qwen3-8B").unwrap();
        let model = qwen3_8b();
        assert_eq!(
            (row.layers, row.heads, row.kv_heads, row.hidden, row.intermediate, row.tied),
            (
                model.num_hidden_layers,
                model.num_attention_heads,
                model.num_key_value_heads,
                model.hidden_size,
                model.intermediate_size,
                model.tie_word_embeddings
            )
        );
    }

    #[test]
    fn qwen3_8b_has_8_19_billion_parameters() {
        let count = qwen3_8b().parameter_count() as f64;
        assert!((count / 8.19e9 - 1.0).abs() < 0.01, "{count}");
        // The model card's non-embedding figure: 6.95 B.
        let embeddings = 2.0 * 151_936.0 * 4096.0;
        assert!(((count - embeddings) / 6.95e9 - 1.0).abs() < 0.01);
    }

    #[test]
    fn other_qwen3_sizes_match_their_model_cards() {
        // (name, total, non-embedding) in billions, from the Qwen3 model cards.
        for (name, total, non_embedding) in [
            ("Qwen3-0.6B", 0.6, 0.44),
            ("Qwen3-1.7B", 1.7, 1.4),
            ("Qwen3-4B", 4.0, 3.6),
            ("Qwen3-14B", 14.8, 13.2),
            ("Qwen3-32B", 32.8, 31.2),
        ] {
            let model = ModelConfig::known(name).unwrap();
            let count = model.parameter_count() as f64 / 1e9;
            let embedding = f64::from(model.vocab_size) * f64::from(model.hidden_size) / 1e9;
            let copies = if model.tie_word_embeddings { 1.0 } else { 2.0 };
            assert!((count / total - 1.0).abs() < 0.03, "{name}: {count}");
            let body = count - copies * embedding;
            assert!((body / non_embedding - 1.0).abs() < 0.03, "{name}: {body}");
        }
    }

    #[test]
    fn tied_embeddings_drop_the_output_layer() {
        let mut model = qwen3_8b();
        let untied = model.parameter_count();
        model.tie_word_embeddings = true;
        assert_eq!(untied - model.parameter_count(), 151_936 * 4096);
    }

    #[test]
    fn known_finds_names_inside_paths_and_hub_ids() {
        for reference in [
            "Qwen3-8B",
            "Qwen3-8B-mcore",
            "/models/Qwen/Qwen3-8B",
            "Qwen/Qwen3-8B",
            "qwen/qwen3-8b",
            "/mnt/shared/megatron_output/Qwen3-8B-sft/v0-20250101-000000",
        ] {
            assert_eq!(ModelConfig::known(reference).map(|m| m.name), Some("Qwen3-8B".into()), "{reference}");
        }
        assert_eq!(ModelConfig::known("Qwen/Qwen3-0.6B").map(|m| m.name), Some("Qwen3-0.6B".into()));
        assert_eq!(ModelConfig::known("Qwen3-14B-mcore").map(|m| m.name), Some("Qwen3-14B".into()));
    }

    #[test]
    fn known_needs_the_name_to_stand_alone() {
        for reference in ["Qwen3-80B", "Qwen3-8B0", "MyQwen3-8B", "Qwen2.5-7B", "", "Qwen3-30B-A3B", "Qwen3-8"] {
            assert_eq!(ModelConfig::known(reference), None, "{reference}");
        }
    }

    #[test]
    fn from_hf_json_applies_defaults() {
        let json = r#"{"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64,
                      "intermediate_size": 128, "vocab_size": 1000, "tie_word_embeddings": true}"#;
        let model = ModelConfig::from_hf_json("tiny", json).unwrap();
        assert_eq!(model.num_key_value_heads, 4);
        assert_eq!(model.head_dim, 16);
        assert!(model.tie_word_embeddings);
        // 1000·64 + 2·(4·64·64 + 3·64·128 + 2·64) + 64
        assert_eq!(model.parameter_count(), 64_000 + 2 * (16_384 + 24_576 + 128) + 64);
    }

    #[test]
    fn from_hf_json_errors_name_model_and_field() {
        let err = ModelConfig::from_hf_json("m", r#"{"num_hidden_layers": 2}"#).unwrap_err();
        assert!(matches!(err, ModelConfigError::MissingField { field: "num_attention_heads", .. }));
        assert!(err.to_string().starts_with("model m:"), "{err}");

        let err = ModelConfig::from_hf_json("m", "{").unwrap_err();
        assert!(matches!(err, ModelConfigError::Json { .. }));

        let json = r#"{"num_hidden_layers": 2, "num_attention_heads": 3, "hidden_size": 64,
                      "intermediate_size": 1, "vocab_size": 1}"#;
        let err = ModelConfig::from_hf_json("m", json).unwrap_err();
        assert!(matches!(err, ModelConfigError::Invalid { field: "hidden_size", .. }), "{err}");

        let json = r#"{"num_hidden_layers": 0, "num_attention_heads": 4, "hidden_size": 64,
                      "intermediate_size": 1, "vocab_size": 1}"#;
        let err = ModelConfig::from_hf_json("m", json).unwrap_err();
        assert!(matches!(err, ModelConfigError::Invalid { field: "num_hidden_layers", .. }), "{err}");
    }
}
