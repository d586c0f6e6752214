//! The transformer on the CPU with candle-core tensors: quantized weights stay quantized in memory and are
//! dequantized block by block inside each matrix product (`quant`); everything else is f32 candle ops. Runs
//! natively and in wasm.
//!
//! One decoder layer, for the three architectures (Gemma-only steps marked):
//!
//! ```text
//! a = attn_norm(h)
//! q, k, v = a Wq, a Wk, a Wv          -> per head; q_norm, k_norm (Gemma 3); RoPE
//! o = softmax(mask(cap(q k^T * scale))) v Wo    (cap: Gemma 2's softcap; mask: causal, sliding window)
//! h = h + post_attn_norm(o)           (post norm: Gemma)
//! m = down(act(gate(ffn_norm(h))) * up(ffn_norm(h)))   act: GELU-tanh (Gemma) or SiLU (Llama)
//! h = h + post_ffn_norm(m)            (post norm: Gemma)
//! ```
//!
//! The hook point `resid_post[L]` is `h` after layer L.

use std::io::{Read, Seek};
use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor};
use candle_nn::kv_cache::KvCache;

use super::{check_request, LanguageModel, LocalBoxFuture, LogitsWanted, StepOutput};
use crate::config::{rope_cos_sin, Activation, ModelConfig, RopeLayout};
use crate::error::{EngineError, Result, TensorContext};
use crate::gguf::GgufFile;
use crate::hooks::{Capture, Hooks, Segment};
use crate::quant::QuantMatrix;

/// Choices made when loading, not stored in the file.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Cap on the context (tokens in the KV cache); `None` keeps the model's own.
    pub max_context: Option<usize>,
}

/// A weight matrix as the file stores it, applied to f32 activations (see `quant`).
struct Linear(QuantMatrix);

impl Linear {
    /// `x`: [n, cols] -> [n, rows].
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let n = x.dims2().context("matrix product input")?.0;
        let values = x.flatten_all().and_then(|v| v.to_vec1::<f32>()).context("matrix product input")?;
        let out = self.0.matmul(&values)?;
        Tensor::from_vec(out, (n, self.0.rows()), &Device::Cpu).context("matrix product")
    }
}

struct Layer {
    attn_norm: Tensor,
    wq: Linear,
    wk: Linear,
    wv: Linear,
    wo: Linear,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    post_attn_norm: Option<Tensor>,
    ffn_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
    post_ffn_norm: Option<Tensor>,
    cache: KvCache,
}

/// The token embedding, kept quantized: rows are dequantized on lookup (the 270M table is 671 MB in f32).
struct Embedding(QuantMatrix);

impl Embedding {
    fn lookup(&self, tokens: &[u32]) -> Result<Tensor> {
        let hidden = self.0.cols();
        let mut rows = vec![0f32; tokens.len() * hidden];
        for (row, &t) in rows.chunks_mut(hidden).zip(tokens) {
            self.0.dequantize_rows(t as usize, row)?;
        }
        Tensor::from_vec(rows, (tokens.len(), hidden), &Device::Cpu).context("embedding rows")
    }
}

pub struct CpuModel {
    config: ModelConfig,
    embedding: Embedding,
    layers: Vec<Layer>,
    final_norm: Tensor,
    lm_head: Linear,
    /// RoPE frequency divisors (Llama 3's `rope_freqs.weight`), one per pair of dimensions.
    rope_factors: Option<Vec<f32>>,
    position: usize,
    max_context: usize,
}

/// Reads tensors from the file with shape checks that name the tensor.
struct Loader<'a, R> {
    gguf: &'a GgufFile,
    reader: &'a mut R,
}

impl<R: Read + Seek> Loader<'_, R> {
    fn qtensor(&mut self, name: &str) -> Result<QTensor> {
        self.gguf.tensor(self.reader, name)
    }

    fn vector(&mut self, name: &str, len: usize) -> Result<Tensor> {
        let t = self.qtensor(name)?.dequantize(&Device::Cpu).context(name)?;
        let t = t.flatten_all().context(name)?;
        if t.elem_count() != len {
            return Err(EngineError::BadTensor {
                name: name.into(),
                why: format!("expected {len} values, found {}", t.elem_count()),
            });
        }
        Ok(t)
    }

    fn opt_vector(&mut self, name: &str, len: usize) -> Result<Option<Tensor>> {
        if self.gguf.has_tensor(name) {
            self.vector(name, len).map(Some)
        } else {
            Ok(None)
        }
    }

    fn linear(&mut self, name: &str, rows: usize, cols: usize) -> Result<Linear> {
        let q = self.qtensor(name)?;
        linear_from(name, Arc::new(q), rows, cols)
    }
}

fn linear_from(name: &str, q: Arc<QTensor>, rows: usize, cols: usize) -> Result<Linear> {
    let dims = q.shape().dims().to_vec();
    if dims != [rows, cols] {
        return Err(EngineError::BadTensor {
            name: name.into(),
            why: format!("expected shape [{rows}, {cols}], found {dims:?}"),
        });
    }
    QuantMatrix::new(name, q).map(Linear)
}

impl CpuModel {
    /// Loads every tensor of the model from `reader` (the file `gguf` was parsed from).
    pub fn load<R: Read + Seek>(gguf: &GgufFile, reader: &mut R, options: &LoadOptions) -> Result<Self> {
        Self::load_with_progress(gguf, reader, options, |_, _| {})
    }

    /// As `load`, calling `progress(done, total)` after each layer.
    pub fn load_with_progress<R: Read + Seek>(
        gguf: &GgufFile,
        reader: &mut R,
        options: &LoadOptions,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Self> {
        let config = ModelConfig::from_gguf(gguf)?;
        let c = &config;
        let mut ld = Loader { gguf, reader };

        let table = Arc::new(ld.qtensor("token_embd.weight")?);
        let tdims = table.shape().dims().to_vec();
        if tdims != [c.vocab_size, c.hidden] {
            return Err(EngineError::BadTensor {
                name: "token_embd.weight".into(),
                why: format!("expected shape [{}, {}], found {tdims:?}", c.vocab_size, c.hidden),
            });
        }
        let embedding = Embedding(QuantMatrix::new("token_embd.weight", table.clone())?);

        let total = c.n_layers + 2;
        progress(1, total);
        let mut layers = Vec::with_capacity(c.n_layers);
        for i in 0..c.n_layers {
            let n = |s: &str| format!("blk.{i}.{s}.weight");
            let gemma = c.architecture.has_post_norms();
            layers.push(Layer {
                attn_norm: ld.vector(&n("attn_norm"), c.hidden)?,
                wq: ld.linear(&n("attn_q"), c.q_dim(), c.hidden)?,
                wk: ld.linear(&n("attn_k"), c.kv_dim(), c.hidden)?,
                wv: ld.linear(&n("attn_v"), c.kv_dim(), c.hidden)?,
                wo: ld.linear(&n("attn_output"), c.hidden, c.q_dim())?,
                q_norm: if c.qk_norm { Some(ld.vector(&n("attn_q_norm"), c.head_dim)?) } else { None },
                k_norm: if c.qk_norm { Some(ld.vector(&n("attn_k_norm"), c.head_dim)?) } else { None },
                post_attn_norm: if gemma { Some(ld.vector(&n("post_attention_norm"), c.hidden)?) } else { None },
                ffn_norm: ld.vector(&n("ffn_norm"), c.hidden)?,
                gate: ld.linear(&n("ffn_gate"), c.ffn_hidden, c.hidden)?,
                up: ld.linear(&n("ffn_up"), c.ffn_hidden, c.hidden)?,
                down: ld.linear(&n("ffn_down"), c.hidden, c.ffn_hidden)?,
                post_ffn_norm: if gemma { Some(ld.vector(&n("post_ffw_norm"), c.hidden)?) } else { None },
                cache: KvCache::new(2, 256),
            });
            progress(i + 2, total);
        }
        let final_norm = ld.vector("output_norm.weight", c.hidden)?;
        let lm_head = if gguf.has_tensor("output.weight") {
            ld.linear("output.weight", c.vocab_size, c.hidden)?
        } else {
            linear_from("token_embd.weight (tied output)", table, c.vocab_size, c.hidden)?
        };
        let rope_factors = match ld.opt_vector("rope_freqs.weight", c.head_dim / 2)? {
            Some(t) => Some(t.to_vec1::<f32>().context("rope_freqs")?),
            None => None,
        };
        progress(total, total);
        let max_context = options.max_context.map_or(c.context_length, |m| m.min(c.context_length)).max(1);
        Ok(Self { config, embedding, layers, final_norm, lm_head, rope_factors, position: 0, max_context })
    }

    /// cos and sin of the RoPE angles for positions `start..start + n` ([n, head_dim / 2] each).
    fn rope_tables(&self, base: f32, start: usize, n: usize) -> Result<(Tensor, Tensor)> {
        let half = self.config.head_dim / 2;
        let (cos, sin) = rope_cos_sin(self.config.head_dim, base, self.rope_factors.as_deref(), start..start + n);
        let cos = Tensor::from_vec(cos, (n, half), &Device::Cpu).context("rope")?;
        let sin = Tensor::from_vec(sin, (n, half), &Device::Cpu).context("rope")?;
        Ok((cos, sin))
    }

    /// Additive attention mask for queries at `start..start + n` over keys `0..start + n`, with the query rows
    /// repeated for each of the `group` query heads that share a key head. `None` when nothing is masked.
    fn attention_mask(&self, start: usize, n: usize, window: Option<usize>, group: usize) -> Result<Option<Tensor>> {
        let total = start + n;
        let hidden_by_window = window.is_some_and(|w| total > w);
        if n == 1 && !hidden_by_window {
            return Ok(None);
        }
        let mut mask = vec![0f32; group * n * total];
        for g in 0..group {
            for i in 0..n {
                let q = start + i;
                let row = &mut mask[(g * n + i) * total..(g * n + i + 1) * total];
                for (j, m) in row.iter_mut().enumerate() {
                    let visible = j <= q && window.is_none_or(|w| q - j < w);
                    if !visible {
                        *m = f32::NEG_INFINITY;
                    }
                }
            }
        }
        Tensor::from_vec(mask, (group * n, total), &Device::Cpu).map(Some).context("mask")
    }

    fn attention(&mut self, layer: usize, a: &Tensor, start: usize) -> Result<Tensor> {
        let c = &self.config;
        let (n, _) = a.dims2().context("attention input")?;
        let (nh, nkv, hd) = (c.n_heads, c.n_kv_heads, c.head_dim);
        let group = nh / nkv;
        let spec = c.layers[layer];
        let (cos, sin) = self.rope_tables(spec.rope_base, start, n)?;
        let mask = self.attention_mask(start, n, spec.window, group)?;
        let (scale, softcap, eps, layout) = (c.attention_scale as f64, c.attn_softcap, c.rms_eps, c.rope_layout);
        let l = &mut self.layers[layer];

        // [n, heads * hd] -> [1, heads, n, hd]
        let heads = |x: Tensor, h: usize| -> Result<Tensor> {
            x.reshape((n, h, hd))
                .and_then(|x| x.transpose(0, 1))
                .and_then(|x| x.contiguous())
                .and_then(|x| x.unsqueeze(0))
                .context("split heads")
        };
        let mut q = heads(l.wq.forward(a)?, nh)?;
        let mut k = heads(l.wk.forward(a)?, nkv)?;
        let v = heads(l.wv.forward(a)?, nkv)?;
        if let (Some(qn), Some(kn)) = (&l.q_norm, &l.k_norm) {
            q = candle_nn::ops::rms_norm(&q, qn, eps).context("q norm")?;
            k = candle_nn::ops::rms_norm(&k, kn, eps).context("k norm")?;
        }
        let rope = match layout {
            RopeLayout::Halves => candle_nn::rotary_emb::rope,
            RopeLayout::Interleaved => candle_nn::rotary_emb::rope_i,
        };
        let q = rope(&q, &cos, &sin).context("rope q")?;
        let k = rope(&k, &cos, &sin).context("rope k")?;
        let (k_all, v_all) = l.cache.append(&k, &v).context("kv cache")?;

        // The `group` query heads of one key head attend together: [1, nkv, group * n, hd].
        let q = (q * scale).context("scale")?.reshape((1, nkv, group * n, hd)).context("group heads")?;
        let mut scores = q.matmul(&k_all.t().context("k^T")?.contiguous().context("k^T")?).context("q k^T")?;
        if let Some(cap) = softcap {
            scores = ((scores / cap as f64).context("softcap")?.tanh().context("softcap")? * cap as f64)
                .context("softcap")?;
        }
        if let Some(mask) = mask {
            scores = scores.broadcast_add(&mask).context("mask")?;
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores).context("softmax")?;
        let out = probs.matmul(&v_all.contiguous().context("v")?).context("attention values")?;
        debug_assert_eq!(out.dims(), &[1, nkv, group * n, hd]);
        // [1, nkv, group * n, hd] -> [1, nh, n, hd] -> [n, nh * hd]
        let out = out
            .reshape((nh, n, hd))
            .and_then(|o| o.transpose(0, 1))
            .and_then(|o| o.contiguous())
            .and_then(|o| o.reshape((n, nh * hd)))
            .context("merge heads")?;
        l.wo.forward(&out)
    }

    fn mlp(&self, layer: usize, m: &Tensor) -> Result<Tensor> {
        let l = &self.layers[layer];
        let gate = l.gate.forward(m)?;
        let up = l.up.forward(m)?;
        let act = match self.config.activation {
            Activation::GeluTanh => gate.gelu(),
            Activation::Silu => gate.silu(),
        }
        .context("activation")?;
        l.down.forward(&(act * up).context("gating")?)
    }

    fn norm(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        candle_nn::ops::rms_norm(x, w, self.config.rms_eps).context("rms norm")
    }

    /// The forward pass, synchronously (see `LanguageModel::forward`).
    pub fn forward_sync(
        &mut self,
        tokens: &[u32],
        segment: Segment,
        hooks: &Hooks,
        logits: LogitsWanted,
    ) -> Result<StepOutput> {
        check_request(&self.config, self.position, self.max_context, tokens, hooks)?;
        let start = self.position;
        let n = tokens.len();
        let hidden = self.config.hidden;
        let mut h = self.embedding.lookup(tokens)?;
        if let Some(s) = self.config.embedding_scale {
            h = (h * s as f64).context("embedding scale")?;
        }
        let mut captures = Vec::new();
        for i in 0..self.config.n_layers {
            let a = self.norm(&h, &self.layers[i].attn_norm)?;
            let mut o = self.attention(i, &a, start)?;
            if let Some(w) = &self.layers[i].post_attn_norm {
                o = self.norm(&o, w)?;
            }
            h = (h + o).context("residual")?;
            let m = self.norm(&h, &self.layers[i].ffn_norm)?;
            let mut m = self.mlp(i, &m)?;
            if let Some(w) = &self.layers[i].post_ffn_norm {
                m = self.norm(&m, w)?;
            }
            h = (h + m).context("residual")?;

            if hooks.touches(i) {
                for off in hooks.read_offsets(i, start, n) {
                    let values = h.get(off).and_then(|r| r.to_vec1::<f32>()).context("reading resid_post")?;
                    captures.push(Capture { layer: i, position: start + off, values });
                }
                if let Some(v) = hooks.added_vector(i, segment) {
                    let v = Tensor::from_vec(v, (1, hidden), &Device::Cpu).context("steering vector")?;
                    h = h.broadcast_add(&v).context("adding steering vector")?;
                }
                if let Some(rows) = hooks.added_rows(i, start, n, hidden) {
                    let rows = Tensor::from_vec(rows, (n, hidden), &Device::Cpu).context("per-position rows")?;
                    h = (h + rows).context("adding per-position rows")?;
                }
            }
        }
        self.position += n;

        let rows = match logits {
            LogitsWanted::Last => h.narrow(0, n - 1, 1).context("last row")?,
            LogitsWanted::All => h,
        };
        let normed = self.norm(&rows, &self.final_norm)?;
        let mut out = self.lm_head.forward(&normed)?;
        if let Some(cap) = self.config.final_softcap {
            out = ((out / cap as f64).and_then(|x| x.tanh()).and_then(|x| x * cap as f64)).context("final softcap")?;
        }
        let out = out.to_dtype(DType::F32).context("logits")?;
        let vocab = self.lm_head.0.rows();
        let flat = out.flatten_all().and_then(|x| x.to_vec1::<f32>()).context("logits")?;
        let (last, all) = match logits {
            LogitsWanted::Last => (flat, None),
            LogitsWanted::All => (flat[(n - 1) * vocab..].to_vec(), Some(flat)),
        };
        Ok(StepOutput { logits: last, all_logits: all, captures })
    }
}

impl LanguageModel for CpuModel {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn position(&self) -> usize {
        self.position
    }

    fn max_context(&self) -> usize {
        self.max_context
    }

    fn reset(&mut self) {
        for l in &mut self.layers {
            l.cache.reset();
        }
        self.position = 0;
    }

    fn forward<'a>(
        &'a mut self,
        tokens: &'a [u32],
        segment: Segment,
        hooks: &'a Hooks,
        logits: LogitsWanted,
    ) -> LocalBoxFuture<'a, Result<StepOutput>> {
        Box::pin(std::future::ready(self.forward_sync(tokens, segment, hooks, logits)))
    }

    fn backend_name(&self) -> String {
        "cpu".into()
    }
}
