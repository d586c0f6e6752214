//! The shape of a model, read from GGUF metadata: one struct for the three architectures, whose differences are
//! spelled out as fields (norm placement, activation, RoPE layout, windows, softcaps) rather than as separate code.

use serde::Serialize;

use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;

/// The model families the engine runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    Gemma3,
    Gemma2,
    Llama,
}

impl Architecture {
    pub fn from_gguf_name(name: &str) -> Result<Self> {
        match name {
            "gemma3" => Ok(Self::Gemma3),
            "gemma2" => Ok(Self::Gemma2),
            "llama" => Ok(Self::Llama),
            other => Err(EngineError::UnsupportedArchitecture(other.to_string())),
        }
    }

    pub fn gguf_name(self) -> &'static str {
        match self {
            Self::Gemma3 => "gemma3",
            Self::Gemma2 => "gemma2",
            Self::Llama => "llama",
        }
    }

    /// Gemma models normalise the output of attention and of the MLP again before the residual add.
    pub fn has_post_norms(self) -> bool {
        matches!(self, Self::Gemma3 | Self::Gemma2)
    }
}

/// The gated MLP's activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// GeGLU with the tanh approximation of GELU (Gemma).
    GeluTanh,
    /// SwiGLU (Llama).
    Silu,
}

/// Which pairs of a head's dimensions RoPE rotates together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RopeLayout {
    /// Dimension i with i + d/2 (GPT-NeoX style; Gemma in GGUF).
    Halves,
    /// Dimension 2i with 2i + 1 (llama.cpp permutes Llama's q/k weights into this layout when converting).
    Interleaved,
}

/// Attention span of one layer.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LayerAttention {
    /// A query at position i sees keys at j with i - window < j <= i; `None` means every earlier position.
    pub window: Option<usize>,
    pub rope_base: f32,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub name: String,
    /// A short stable name for files made for this model, e.g. SAEs: "smollm2-135m", "gemma-3-270m" (GGUF
    /// `general.basename` and `general.size_label`, lowercased).
    pub key: String,
    pub hidden: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub ffn_hidden: usize,
    pub vocab_size: usize,
    pub context_length: usize,
    pub rms_eps: f32,
    pub activation: Activation,
    pub rope_layout: RopeLayout,
    /// Per layer: sliding window and RoPE base.
    pub layers: Vec<LayerAttention>,
    /// Multiplies the scores q.k (1/sqrt(head_dim) for every model here).
    pub attention_scale: f32,
    /// Gemma 2: scores become cap * tanh(scores / cap).
    pub attn_softcap: Option<f32>,
    /// Gemma 2: logits become cap * tanh(logits / cap).
    pub final_softcap: Option<f32>,
    /// Gemma multiplies the token embedding by sqrt(hidden).
    pub embedding_scale: Option<f32>,
    /// Normalise q and k per head before RoPE (Gemma 3).
    pub qk_norm: bool,
}

impl ModelConfig {
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        let architecture = Architecture::from_gguf_name(gguf.architecture()?)?;
        let p = architecture.gguf_name();
        let key = |k: &str| format!("{p}.{k}");

        let hidden = gguf.get_usize(&key("embedding_length"))?;
        let n_layers = gguf.get_usize(&key("block_count"))?;
        let n_heads = gguf.get_usize(&key("attention.head_count"))?;
        let n_kv_heads = gguf.opt_usize(&key("attention.head_count_kv"))?.unwrap_or(n_heads);
        let head_dim = match gguf.opt_usize(&key("attention.key_length"))? {
            Some(d) => d,
            // No heads is refused below.
            None => hidden.checked_div(n_heads).unwrap_or(0),
        };
        if let Some(v) = gguf.opt_usize(&key("attention.value_length"))? {
            if v != head_dim {
                return Err(EngineError::MissingMetadata {
                    key: key("attention.value_length"),
                    why: format!("value length {v} differs from key length {head_dim}, which is not supported"),
                });
            }
        }
        if n_heads == 0 || n_kv_heads == 0 || n_heads % n_kv_heads != 0 {
            return Err(EngineError::MissingMetadata {
                key: key("attention.head_count_kv"),
                why: format!("{n_heads} query heads cannot be shared by {n_kv_heads} key/value heads"),
            });
        }
        let ffn_hidden = gguf.get_usize(&key("feed_forward_length"))?;
        let vocab_size = match gguf.get_str_array("tokenizer.ggml.tokens") {
            Ok(tokens) => tokens.len(),
            Err(_) => gguf
                .tensor_dims("token_embd.weight")
                .map(|d| d[0])
                .ok_or_else(|| EngineError::BadTensor { name: "token_embd.weight".into(), why: "missing".into() })?,
        };
        let context_length = gguf.get_usize(&key("context_length"))?;
        // The sizes everything else is built from: a zero would make empty layers (and divide by zero), and RoPE
        // turns a head's values in pairs.
        let sizes = [
            ("embedding_length", hidden),
            ("block_count", n_layers),
            ("attention.key_length", head_dim),
            ("feed_forward_length", ffn_hidden),
            ("context_length", context_length),
        ];
        for (name, value) in sizes {
            if value == 0 {
                return Err(EngineError::MissingMetadata { key: key(name), why: "is 0".into() });
            }
        }
        if vocab_size == 0 {
            let why = "the vocabulary is empty".into();
            return Err(EngineError::MissingMetadata { key: "tokenizer.ggml.tokens".into(), why });
        }
        if head_dim % 2 != 0 {
            let why = format!("a head of {head_dim} values: RoPE rotates them in pairs");
            return Err(EngineError::MissingMetadata { key: key("attention.key_length"), why });
        }
        let rms_eps = gguf.opt_f32(&key("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-6);
        let name = gguf.get_str("general.name").unwrap_or(p).to_string();
        let model_key = match (gguf.get_str("general.basename"), gguf.get_str("general.size_label")) {
            (Ok(base), Ok(size)) => format!("{base}-{size}"),
            _ => name.clone(),
        }
        .to_lowercase()
        .replace(|c: char| !c.is_ascii_alphanumeric() && c != '.', "-");
        let rope_base = gguf.opt_f32(&key("rope.freq_base"))?.unwrap_or(10_000.0);

        let layers = match architecture {
            Architecture::Gemma3 => {
                // 5 local layers then 1 global; local layers use the window and a base of 10,000.
                let window = gguf.opt_usize(&key("attention.sliding_window"))?;
                let pattern = gguf.opt_usize(&key("attention.sliding_window_pattern"))?.unwrap_or(6).max(1);
                let local_base = gguf.opt_f32(&key("rope.local_freq_base"))?.unwrap_or(10_000.0);
                (0..n_layers)
                    .map(|i| {
                        let global = (i + 1) % pattern == 0;
                        LayerAttention {
                            window: if global { None } else { window },
                            rope_base: if global { rope_base } else { local_base },
                        }
                    })
                    .collect()
            }
            Architecture::Gemma2 => {
                // Even layers local (window 4096), odd layers global; one RoPE base.
                let window = gguf.opt_usize(&key("attention.sliding_window"))?;
                (0..n_layers)
                    .map(|i| LayerAttention { window: if i % 2 == 0 { window } else { None }, rope_base })
                    .collect()
            }
            Architecture::Llama => (0..n_layers).map(|_| LayerAttention { window: None, rope_base }).collect(),
        };

        let gemma = architecture != Architecture::Llama;
        Ok(Self {
            architecture,
            name,
            key: model_key,
            hidden,
            n_layers,
            n_heads,
            n_kv_heads,
            head_dim,
            ffn_hidden,
            vocab_size,
            context_length,
            rms_eps,
            activation: if gemma { Activation::GeluTanh } else { Activation::Silu },
            rope_layout: if gemma { RopeLayout::Halves } else { RopeLayout::Interleaved },
            layers,
            attention_scale: 1.0 / (head_dim as f32).sqrt(),
            attn_softcap: match architecture {
                Architecture::Gemma2 => Some(gguf.opt_f32(&key("attn_logit_softcapping"))?.unwrap_or(50.0)),
                _ => None,
            },
            final_softcap: match architecture {
                Architecture::Gemma2 => Some(gguf.opt_f32(&key("final_logit_softcapping"))?.unwrap_or(30.0)),
                _ => None,
            },
            embedding_scale: gemma.then(|| (hidden as f32).sqrt()),
            qk_norm: architecture == Architecture::Gemma3,
        })
    }

    /// Width of all query heads together.
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// Width of all key (or value) heads together.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}

/// cos and sin of the RoPE angles at `positions` (row-major [position][head_dim / 2]): the angle of pair i at
/// position p is p / (base^(2i / head_dim) * factor_i), with Llama 3's per-pair factors where the file has them.
/// Computed in f64 once; the CPU path and the GPU's tables use this same function.
pub fn rope_cos_sin(
    head_dim: usize,
    base: f32,
    factors: Option<&[f32]>,
    positions: std::ops::Range<usize>,
) -> (Vec<f32>, Vec<f32>) {
    let half = head_dim / 2;
    let inv: Vec<f64> = (0..half)
        .map(|i| {
            let f = 1.0 / (base as f64).powf(2.0 * i as f64 / head_dim as f64);
            factors.map_or(f, |fs| f / fs[i] as f64)
        })
        .collect();
    let n = positions.len() * half;
    let (mut cos, mut sin) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for p in positions {
        for &f in &inv {
            let angle = p as f64 * f;
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
    (cos, sin)
}
