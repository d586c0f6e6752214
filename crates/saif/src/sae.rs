//! Sparse autoencoders on the residual stream: the file formats (Gemma Scope 2's `params.safetensors` +
//! `config.json`, SAELens' `sae_weights.safetensors` + `cfg.json`), encoding into latents and decoding back.
//!
//! Every SAE is held in one form, Gemma Scope's: `pre = x W_enc + b_enc`, latents `a = act(pre)`, reconstruction
//! `x_hat = a W_dec + b_dec`, with `W_enc` of shape [d_in, d_sae] and `W_dec` of shape [d_sae, d_in]. Formats that
//! subtract `b_dec` from the input first (SAELens' `apply_b_dec_to_input`, TopK SAEs) are folded into `b_enc` when
//! read. The activation is JumpReLU (`pre` where `pre > threshold`), TopK (the k largest of `relu(pre)`) or ReLU.

use std::path::Path;

use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors};
use saif_engine::ModelFingerprint;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

#[derive(Debug, thiserror::Error)]
pub enum SaeError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("not an SAE file: {0}")]
    Format(String),
    /// The SAE does not belong to the model it is used with.
    #[error("this SAE does not fit the model: {0}")]
    Mismatch(String),
    /// The SAE fits the model's shape but records another model: refused unless the user asks for it anyway.
    #[error("this SAE was trained on another model ({differences}): it was trained on {trained_on}")]
    OtherModel { trained_on: String, differences: String },
}

pub type Result<T> = std::result::Result<T, SaeError>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Activation {
    JumpRelu,
    TopK { k: usize },
    Relu,
}

/// What an SAE says about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SaeInfo {
    pub activation: Activation,
    pub d_in: usize,
    pub d_sae: usize,
    /// The decoder layer whose `resid_post` it reads, where the file says.
    pub layer: Option<usize>,
    /// The model it was trained on, where the file says (e.g. "smollm2-135m", "gemma-3-270m").
    pub model: Option<String>,
    /// That model's fingerprint, where the config records one (`model_fingerprint`: SAEs this project trains or
    /// stamps with `saif sae-stamp`).
    #[serde(default)]
    pub trained_on: Option<ModelFingerprint>,
    /// Anything else the file's config holds (training details, provenance).
    pub extra: Value,
}

pub struct Sae {
    pub info: SaeInfo,
    /// [d_in, d_sae], row-major.
    pub w_enc: Vec<f32>,
    /// [d_sae, d_in], row-major.
    pub w_dec: Vec<f32>,
    pub b_enc: Vec<f32>,
    pub b_dec: Vec<f32>,
    /// JumpReLU thresholds (zeros for other activations).
    pub threshold: Vec<f32>,
}

/// How weights are stored when saved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreAs {
    F32,
    F16,
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| SaeError::Io { path: path.display().to_string(), source })
}

/// A tensor of a safetensors file (named `file` in messages) as f32, with its shape.
fn tensor_f32(st: &SafeTensors, file: &str, names: &[&str]) -> Result<Option<(Vec<f32>, Vec<usize>)>> {
    let Some(view) = names.iter().find_map(|n| st.tensor(n).ok()) else { return Ok(None) };
    let data = view.data();
    let values = match view.dtype() {
        Dtype::F32 => data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        Dtype::F16 => data.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        Dtype::BF16 => data.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        other => {
            return Err(SaeError::Format(format!(
                "{file}: tensor {} is {other:?}; F32, F16 or BF16 expected",
                names[0]
            )))
        }
    };
    Ok(Some((values, view.shape().to_vec())))
}

fn parse_json(bytes: &[u8], what: &str) -> Result<Value> {
    serde_json::from_slice(bytes).map_err(|e| SaeError::Format(format!("{what} is not valid JSON: {e}")))
}

impl std::fmt::Debug for Sae {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sae").field("info", &self.info).finish_non_exhaustive()
    }
}

impl Sae {
    /// Reads an SAE folder: Gemma Scope 2 (`params.safetensors`, `config.json`) or SAELens
    /// (`sae_weights.safetensors`, `cfg.json`).
    pub fn load_dir(dir: &Path) -> Result<Self> {
        let gemma_scope = dir.join("params.safetensors");
        let sae_lens = dir.join("sae_weights.safetensors");
        if gemma_scope.exists() {
            let config =
                if dir.join("config.json").exists() { read(&dir.join("config.json"))? } else { b"{}".to_vec() };
            Self::from_gemma_scope(&read(&gemma_scope)?, &config)
        } else if sae_lens.exists() {
            Self::from_sae_lens(&read(&sae_lens)?, &read(&dir.join("cfg.json"))?)
        } else {
            Err(SaeError::Format(format!(
                "{} holds neither params.safetensors (Gemma Scope 2) nor sae_weights.safetensors (SAELens)",
                dir.display()
            )))
        }
    }

    /// Gemma Scope 2: `w_enc [d_in, d_sae]`, `w_dec [d_sae, d_in]`, `b_enc`, `b_dec`, `threshold`, and a config.
    pub fn from_gemma_scope(params: &[u8], config: &[u8]) -> Result<Self> {
        const FILE: &str = "params.safetensors";
        let st = SafeTensors::deserialize(params).map_err(|e| SaeError::Format(format!("{FILE}: {e}")))?;
        let config = parse_json(config, "config.json")?;
        let missing = |name: &str| SaeError::Format(format!("{FILE} has no {name} tensor"));
        let w_enc = tensor_f32(&st, FILE, &["w_enc", "W_enc"])?.ok_or_else(|| missing("w_enc"))?;
        let w_dec = tensor_f32(&st, FILE, &["w_dec", "W_dec"])?.ok_or_else(|| missing("w_dec"))?;
        let b_enc = tensor_f32(&st, FILE, &["b_enc"])?.map(|t| t.0);
        let b_dec = tensor_f32(&st, FILE, &["b_dec"])?.map(|t| t.0);
        let threshold = tensor_f32(&st, FILE, &["threshold"])?.map(|t| t.0);
        let activation = match config.get("architecture").or_else(|| config.get("activation")).and_then(Value::as_str) {
            Some("topk" | "top_k" | "TopK") => {
                let k = config
                    .get("k")
                    .and_then(Value::as_u64)
                    .ok_or_else(|| SaeError::Format("config.json says the activation is TopK but gives no k".into()))?;
                Activation::TopK { k: to_usize(k) }
            }
            Some("relu" | "standard") => Activation::Relu,
            Some("jump_relu" | "jumprelu" | "JumpReLU") | None => Activation::JumpRelu,
            Some(other) => return Err(SaeError::Format(format!("config.json: unknown SAE architecture \"{other}\""))),
        };
        if let Some(hook) = config.get("hook").or_else(|| config.get("hook_name")).and_then(Value::as_str) {
            check_hook(hook, "config.json")?;
        }
        let layer = config.get("layer").and_then(Value::as_u64).map(to_usize);
        let model = config.get("model_name").or_else(|| config.get("model")).and_then(Value::as_str).map(String::from);
        let trained_on = fingerprint_in(&config, "config.json")?;
        let mut sae =
            Self::assemble(FILE, activation, w_enc, w_dec, b_enc, b_dec, threshold, layer, model, config, false)?;
        sae.info.trained_on = trained_on;
        Ok(sae)
    }

    /// SAELens: `W_enc`, `W_dec`, `b_enc`, `b_dec`, optional `threshold`, and `cfg.json`.
    pub fn from_sae_lens(weights: &[u8], cfg: &[u8]) -> Result<Self> {
        const FILE: &str = "sae_weights.safetensors";
        let st = SafeTensors::deserialize(weights).map_err(|e| SaeError::Format(format!("{FILE}: {e}")))?;
        let cfg = parse_json(cfg, "cfg.json")?;
        let missing = |name: &str| SaeError::Format(format!("{FILE} has no {name} tensor"));
        let w_enc = tensor_f32(&st, FILE, &["W_enc"])?.ok_or_else(|| missing("W_enc"))?;
        let w_dec = tensor_f32(&st, FILE, &["W_dec"])?.ok_or_else(|| missing("W_dec"))?;
        let threshold = tensor_f32(&st, FILE, &["threshold"])?.map(|t| t.0);
        // SAELens names its architectures; an unknown one is refused rather than read as a ReLU SAE.
        let activation = match cfg.get("architecture").and_then(Value::as_str) {
            Some("jumprelu") => Activation::JumpRelu,
            Some("topk") => {
                let k = cfg.pointer("/activation_fn_kwargs/k").or_else(|| cfg.get("k")).and_then(Value::as_u64);
                Activation::TopK {
                    k: to_usize(k.ok_or_else(|| SaeError::Format("cfg.json: a TopK SAE without k".into()))?),
                }
            }
            Some("standard") | None => Activation::Relu,
            Some(other) => {
                return Err(SaeError::Format(format!(
                    "cfg.json: unknown SAE architecture \"{other}\" (standard, jumprelu and topk are read)"
                )))
            }
        };
        // "blocks.12.hook_resid_post" -> 12; the steering hooks add to the residual stream after a block, so an
        // SAE trained on another hook point would be read at the wrong place.
        let layer = match cfg.get("hook_name").and_then(Value::as_str) {
            Some(hook) => {
                check_hook(hook, "cfg.json")?;
                Some(hook.split('.').nth(1).and_then(|l| l.parse().ok()).ok_or_else(|| {
                    SaeError::Format(format!(
                        "cfg.json: hook_name \"{hook}\" names no layer (blocks.N.hook_resid_post)"
                    ))
                })?)
            }
            None => None,
        };
        let model = cfg.get("model_name").and_then(Value::as_str).map(String::from);
        let fold = cfg.get("apply_b_dec_to_input").and_then(Value::as_bool).unwrap_or(false);
        let trained_on = fingerprint_in(&cfg, "cfg.json")?;
        let mut sae = Self::assemble(
            FILE,
            activation,
            w_enc,
            w_dec,
            tensor_f32(&st, FILE, &["b_enc"])?.map(|t| t.0),
            tensor_f32(&st, FILE, &["b_dec"])?.map(|t| t.0),
            threshold,
            layer,
            model,
            cfg,
            fold,
        )?;
        sae.info.trained_on = trained_on;
        Ok(sae)
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        file: &str,
        activation: Activation,
        (w_enc, enc_shape): (Vec<f32>, Vec<usize>),
        (w_dec, dec_shape): (Vec<f32>, Vec<usize>),
        b_enc: Option<Vec<f32>>,
        b_dec: Option<Vec<f32>>,
        threshold: Option<Vec<f32>>,
        layer: Option<usize>,
        model: Option<String>,
        config: Value,
        subtract_b_dec_from_input: bool,
    ) -> Result<Self> {
        let [d_in, d_sae] = enc_shape[..] else {
            return Err(SaeError::Format(format!("{file}: w_enc has shape {enc_shape:?}; [d_in, d_sae] expected")));
        };
        // An empty dimension would leave the biases' size to the header alone: [0, 10^9] takes no bytes.
        if d_in == 0 || d_sae == 0 {
            return Err(SaeError::Format(format!("{file}: w_enc has shape {enc_shape:?}, with nothing in it")));
        }
        if dec_shape != [d_sae, d_in] {
            return Err(SaeError::Format(format!("{file}: w_dec has shape {dec_shape:?}; [{d_sae}, {d_in}] expected")));
        }
        let b_enc = b_enc.unwrap_or_else(|| vec![0.0; d_sae]);
        let b_dec = b_dec.unwrap_or_else(|| vec![0.0; d_in]);
        let threshold = threshold.unwrap_or_else(|| vec![0.0; d_sae]);
        if b_enc.len() != d_sae || b_dec.len() != d_in || threshold.len() != d_sae {
            return Err(SaeError::Format(format!("{file}: bias or threshold lengths do not match w_enc")));
        }
        if let Activation::TopK { k } = activation {
            if k == 0 || k > d_sae {
                return Err(SaeError::Format(format!("{file} holds {d_sae} latents; TopK with k = {k} cannot be")));
            }
        }
        let mut sae = Self {
            info: SaeInfo { activation, d_in, d_sae, layer, model, trained_on: None, extra: config },
            w_enc,
            w_dec,
            b_enc,
            b_dec,
            threshold,
        };
        if subtract_b_dec_from_input {
            // (x - b_dec) W_enc + b_enc = x W_enc + (b_enc - b_dec W_enc)
            let shift = sae.pre_activations_of(&sae.b_dec.clone(), false);
            sae.b_enc.iter_mut().zip(shift).for_each(|(b, s)| *b -= s);
        }
        Ok(sae)
    }

    /// `x W_enc` (+ `b_enc` when `with_bias`).
    fn pre_activations_of(&self, x: &[f32], with_bias: bool) -> Vec<f32> {
        let d_sae = self.info.d_sae;
        let mut pre = if with_bias { self.b_enc.clone() } else { vec![0.0; d_sae] };
        for (i, &xi) in x.iter().enumerate() {
            if xi != 0.0 {
                let row = &self.w_enc[i * d_sae..(i + 1) * d_sae];
                pre.iter_mut().zip(row).for_each(|(p, w)| *p += xi * w);
            }
        }
        pre
    }

    /// Checks that this SAE was trained on `model`, where it records the model it was trained on. SAEs that record
    /// none (Gemma Scope's, SAELens') are only checked for their shape, by `check_fits`.
    pub fn check_model(&self, model: &ModelFingerprint) -> Result<()> {
        let Some(trained_on) = &self.info.trained_on else { return Ok(()) };
        let differences = trained_on.differences(model);
        if differences.is_empty() {
            return Ok(());
        }
        Err(SaeError::OtherModel { trained_on: trained_on.to_string(), differences: differences.join(", ") })
    }

    /// Checks that this SAE reads a residual stream of `hidden` values and a layer the model has.
    pub fn check_fits(&self, hidden: usize, n_layers: usize, layer: usize) -> Result<()> {
        if self.info.d_in != hidden {
            return Err(SaeError::Mismatch(format!(
                "it reads vectors of {} values but the model's residual stream has {hidden}{}",
                self.info.d_in,
                self.info.model.as_deref().map(|m| format!(" (it was made for {m})")).unwrap_or_default()
            )));
        }
        if layer >= n_layers {
            return Err(SaeError::Mismatch(format!("layer {layer} does not exist (the model has {n_layers})")));
        }
        Ok(())
    }

    /// The latent activations of one residual vector, dense.
    pub fn encode(&self, x: &[f32]) -> Vec<f32> {
        let mut pre = self.pre_activations_of(x, true);
        self.activate(&mut pre);
        pre
    }

    /// Applies the activation to pre-activations in place.
    pub fn activate(&self, pre: &mut [f32]) {
        match self.info.activation {
            Activation::Relu => pre.iter_mut().for_each(|p| *p = p.max(0.0)),
            Activation::JumpRelu => pre.iter_mut().zip(&self.threshold).for_each(|(p, t)| {
                if *p <= *t {
                    *p = 0.0
                }
            }),
            Activation::TopK { k } => top_k_relu(pre, k),
        }
    }

    /// The nonzero latents of one residual vector as (index, activation), largest first.
    pub fn encode_sparse(&self, x: &[f32]) -> Vec<(u32, f32)> {
        let dense = self.encode(x);
        let mut active: Vec<(u32, f32)> =
            dense.iter().enumerate().filter(|(_, &a)| a != 0.0).map(|(i, &a)| (i as u32, a)).collect();
        active.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        active
    }

    /// The reconstruction of the residual vector from latents (index, activation).
    pub fn decode(&self, latents: &[(u32, f32)]) -> Vec<f32> {
        let d_in = self.info.d_in;
        let mut x = self.b_dec.clone();
        for &(j, a) in latents {
            let row = &self.w_dec[j as usize * d_in..(j as usize + 1) * d_in];
            x.iter_mut().zip(row).for_each(|(v, w)| *v += a * w);
        }
        x
    }

    /// The decoder direction of latent `j` (what steering adds).
    pub fn decoder_row(&self, j: usize) -> &[f32] {
        &self.w_dec[j * self.info.d_in..(j + 1) * self.info.d_in]
    }

    /// Writes the SAE in Gemma Scope 2's layout: `params.safetensors` and `config.json`.
    pub fn save_dir(&self, dir: &Path, store: StoreAs) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|source| SaeError::Io { path: dir.display().to_string(), source })?;
        let (d_in, d_sae) = (self.info.d_in, self.info.d_sae);
        let bytes = |v: &[f32]| -> Vec<u8> {
            match store {
                StoreAs::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                StoreAs::F16 => v.iter().flat_map(|x| f16::from_f32(*x).to_le_bytes()).collect(),
            }
        };
        let dtype = match store {
            StoreAs::F32 => Dtype::F32,
            StoreAs::F16 => Dtype::F16,
        };
        let data = [
            ("w_enc", bytes(&self.w_enc), vec![d_in, d_sae]),
            ("w_dec", bytes(&self.w_dec), vec![d_sae, d_in]),
            ("b_enc", bytes(&self.b_enc), vec![d_sae]),
            ("b_dec", bytes(&self.b_dec), vec![d_in]),
            ("threshold", bytes(&self.threshold), vec![d_sae]),
        ];
        let views: Vec<(&str, safetensors::tensor::TensorView)> = data
            .iter()
            .map(|(name, b, shape)| {
                (*name, safetensors::tensor::TensorView::new(dtype, shape.clone(), b).expect("sizes match"))
            })
            .collect();
        let file = safetensors::serialize(views, None).map_err(|e| SaeError::Format(e.to_string()))?;
        let path = dir.join("params.safetensors");
        std::fs::write(&path, file).map_err(|source| SaeError::Io { path: path.display().to_string(), source })?;
        let mut config = match &self.info.extra {
            Value::Object(m) => Value::Object(m.clone()),
            _ => json!({}),
        };
        let arch = match self.info.activation {
            Activation::JumpRelu => json!("jump_relu"),
            Activation::TopK { .. } => json!("topk"),
            Activation::Relu => json!("relu"),
        };
        config["architecture"] = arch;
        if let Activation::TopK { k } = self.info.activation {
            config["k"] = json!(k);
        }
        config["d_in"] = json!(d_in);
        config["d_sae"] = json!(d_sae);
        config["hook"] = json!("resid_post");
        config["encoder"] = json!("pre = x @ w_enc + b_enc");
        if let Some(l) = self.info.layer {
            config["layer"] = json!(l);
        }
        if let Some(m) = &self.info.model {
            config["model_name"] = json!(m);
        }
        if let Some(fingerprint) = &self.info.trained_on {
            config["model_fingerprint"] = json!(fingerprint);
        }
        config["dtype"] = json!(if store == StoreAs::F16 { "float16" } else { "float32" });
        let path = dir.join("config.json");
        let text = serde_json::to_string_pretty(&config).expect("JSON values serialize");
        std::fs::write(&path, text).map_err(|source| SaeError::Io { path: path.display().to_string(), source })
    }
}

/// Keeps the `k` largest positive values (the lowest index among equals), zeroes the rest.
/// The SAE must read the residual stream after a block (resid_post), where the engine's hooks read and add.
/// The `model_fingerprint` a config records, if any; one that is there but malformed is an error, not a silence.
fn fingerprint_in(config: &Value, file: &str) -> Result<Option<ModelFingerprint>> {
    match config.get("model_fingerprint") {
        None | Some(Value::Null) => Ok(None),
        Some(v) => serde_json::from_value(v.clone())
            .map(Some)
            .map_err(|e| SaeError::Format(format!("{file}: model_fingerprint is not a model's fingerprint: {e}"))),
    }
}

/// A count from a config file; one too large for this machine's `usize` (32 bits in wasm) saturates, so that the
/// range checks that follow refuse it instead of reading it wrapped.
fn to_usize(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

fn check_hook(hook: &str, file: &str) -> Result<()> {
    if hook.ends_with("resid_post") {
        Ok(())
    } else {
        Err(SaeError::Format(format!(
            "{file}: the SAE reads \"{hook}\", but only residual-stream SAEs after a block (resid_post) are supported"
        )))
    }
}

pub fn top_k_relu(values: &mut [f32], k: usize) {
    if k == 0 {
        values.iter_mut().for_each(|v| *v = 0.0);
        return;
    }
    let mut positive: Vec<f32> = values.iter().copied().filter(|v| *v > 0.0).collect();
    if positive.len() <= k {
        values.iter_mut().for_each(|v| *v = v.max(0.0));
        return;
    }
    // The k-th largest value; everything above it stays, and as many equal to it as there is room for.
    let at = positive.len() - k;
    let threshold = *positive.select_nth_unstable_by(at, |a, b| a.total_cmp(b)).1;
    let mut room_for_ties = k - values.iter().filter(|v| **v > threshold).count();
    for v in values.iter_mut() {
        if *v > threshold {
            continue;
        }
        if *v == threshold && room_for_ties > 0 {
            room_for_ties -= 1;
        } else {
            *v = 0.0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_keeps_the_largest_positive_values() {
        let mut v = vec![0.5, -1.0, 3.0, 2.0, 0.0, 2.0];
        top_k_relu(&mut v, 2);
        assert_eq!(v, vec![0.0, 0.0, 3.0, 2.0, 0.0, 0.0]);
        let mut v = vec![0.5, -1.0, 3.0];
        top_k_relu(&mut v, 0);
        assert_eq!(v, vec![0.0; 3], "k = 0 keeps nothing");
        let mut v = vec![-1.0, 0.3, 0.0];
        top_k_relu(&mut v, 2);
        assert_eq!(v, vec![0.0, 0.3, 0.0]);
    }
}
