//! The transformer on the CPU: quantized weights stay quantized in memory and are dequantized block by block inside
//! each matrix product (`quant`); the norms, attention and activations are f32 code on plain rows of values, with
//! candle's arithmetic where candle had the operation (the hooks still take candle tensors). Runs natively and in
//! wasm.
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
//!
//! This file loads the model, runs a pass over the layers and its hooks, and answers `LanguageModel`; `attention`
//! makes each sequence's new rows ready, keeps them in its KV cache and attends over it.
//!
//! Several sequences can run in one call (`forward_batch`), each with its own KV cache and position: their rows
//! share the matrix products, attention runs per sequence (the sequences in parallel), and so do the hooks.
//! Batched calls compute every row of every product independently of the other rows (decoding steps in
//! `QuantMatrix::matmul_exact_rows`, long prompts in the prompt form, which is row-independent from
//! `BATCH_INVARIANT_ROWS` rows on), so a sequence gets the same numbers in any batch; single-sequence decoding
//! steps (`forward`) take the fastest product form for their size, which sums in another order (the same tokens
//! but at near-ties).

use std::io::{Read, Seek};
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor};

use super::activations;
use super::kv_cache::KvCache;
use super::{check_request, BatchCall, LanguageModel, LocalBoxFuture, LogitsWanted, Picked, Readout, StepOutput};
use crate::config::{Activation, ModelConfig};
use crate::error::{EngineError, Result, TensorContext};
use crate::gguf::GgufFile;
use crate::hooks::{Capture, Hooks, Segment};
use crate::likelihood;
use crate::quant::{self, QuantMatrix, RowForm, BATCH_INVARIANT_ROWS};
use crate::sampler::{pick, Sampling};
use crate::team;
use crate::tensors::{FileMatrix, LayerTensors, TensorReader};

mod attention;

use attention::RopeTables;

/// Choices made when loading, not stored in the file.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Cap on the context (tokens in the KV cache); `None` keeps the model's own.
    pub max_context: Option<usize>,
    /// Round the activations to 8 bits and multiply in integers, as llama.cpp does: faster, not exact
    /// (docs/benchmarks.md measures the departure). One sequence's decoding steps: `quant::int8`; prompts and
    /// batched steps: `quant::int8_rows`, each sequence still with the same numbers in any batch. Off by default;
    /// the CPU path only (the GPU loader refuses it).
    pub int8_activations: bool,
    /// Keep the keys and values in f16, as llama.cpp does by default: half the bytes for attention to read (a
    /// batched step's attention reads more bytes than its products once sequences hold a hundred tokens), each key
    /// and value rounded once; the arithmetic stays f32. Not exact (docs/benchmarks.md measures the departure). Off
    /// by default. On the GPU, stored as f16 with `shader-f16`, else packed two to a word (`gpu::kernels::CacheForm`).
    pub f16_cache: bool,
}

/// A weight matrix as the file stores it, applied to f32 activations (see `quant`).
struct Linear(QuantMatrix);

impl Linear {
    /// The products of several matrices with the same rows of values (`x`: [n * cols]; each product [n * rows]),
    /// in one parallel region (`QuantMatrix::matmul_each`), each row computed as `row_form` says.
    fn values_each<const N: usize>(linears: [&Linear; N], x: &[f32], row_form: RowForm) -> Result<[Vec<f32>; N]> {
        let outs = QuantMatrix::matmul_each(&linears.map(|l| &l.0), x, row_form)?;
        Ok(outs.try_into().unwrap_or_else(|_| unreachable!("one product per matrix")))
    }

    /// `values_each` of one matrix.
    fn values(&self, x: &[f32], row_form: RowForm) -> Result<Vec<f32>> {
        let [out] = Self::values_each([self], x, row_form)?;
        Ok(out)
    }
}

/// One layer's weights: the matrices wrapped for the products, the norms' weights as plain values (`norm_rows`).
type Layer = LayerTensors<Linear, Vec<f32>>;

/// One sequence's state: its keys and values per layer, and how many tokens it holds.
struct Sequence {
    caches: Vec<KvCache>,
    position: usize,
}

impl Sequence {
    /// An empty sequence whose caches hold their rows in `dtype`.
    fn new(n_layers: usize, dtype: DType) -> Self {
        Self { caches: (0..n_layers).map(|_| KvCache::new(dtype)).collect(), position: 0 }
    }

    fn reset(&mut self) {
        self.caches.iter_mut().for_each(KvCache::reset);
        self.position = 0;
    }
}

/// Sequences one batched call may hold.
const MAX_SEQUENCES: usize = 64;

/// Prompts `read_prompts` reads in one pass.
const READ_BATCH: usize = super::PROMPTS_PER_READ;

/// The most logits `CpuModel::next_token_nlls_sync` holds at once (a pass's prompts, every position): 96 MB,
/// about three answers of 32 tokens on Gemma 3 (262,144 logits a position), sixteen on SmolLM2.
const LIKELIHOOD_LOGITS: usize = 24 << 20;

/// Rows per task of `CpuModel::norm_rows`, which splits from twice that many rows on.
const NORM_ROWS_PER_TASK: usize = 4;

/// The token embedding, kept quantized: rows are dequantized on lookup (the 270M table is 671 MB in f32).
struct Embedding(QuantMatrix);

impl Embedding {
    /// The tokens' rows, one after the other.
    fn lookup(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        let hidden = self.0.cols();
        let mut rows = vec![0f32; tokens.len() * hidden];
        for (row, &t) in rows.chunks_mut(hidden).zip(tokens) {
            self.0.dequantize_rows(t as usize, row)?;
        }
        Ok(rows)
    }
}

pub struct CpuModel {
    config: ModelConfig,
    embedding: Embedding,
    layers: Vec<Layer>,
    final_norm: Vec<f32>,
    lm_head: Linear,
    /// RoPE frequency divisors (Llama 3's `rope_freqs.weight`), one per pair of dimensions.
    rope_factors: Option<Vec<f32>>,
    /// RoPE's cos and sin per base, for the positions reached so far.
    rope: RopeTables,
    /// Sequence 0 is the one `forward` runs; batched calls use more, created on first use.
    sequences: Vec<Sequence>,
    max_context: usize,
    /// F32, or F16 where loaded with `LoadOptions::f16_cache`.
    cache_dtype: DType,
}

impl Linear {
    /// A matrix from the file, ready for the products (`int8_activations`: `LoadOptions::int8_activations`).
    fn new(m: FileMatrix, int8_activations: bool) -> Result<Self> {
        Self::shared(&m.name, Arc::new(m.tensor), int8_activations)
    }

    /// `new` of a matrix that something else also holds (the embedding table, where the LM head is tied to it).
    fn shared(name: &str, q: Arc<QTensor>, int8_activations: bool) -> Result<Self> {
        Ok(Linear(QuantMatrix::new(name, q)?.with_int8_activations(int8_activations).for_decoding()?))
    }
}

impl CpuModel {
    /// Loads every tensor of the model from `reader` (the file `gguf` was parsed from).
    pub fn load<R: Read + Seek>(gguf: &GgufFile, reader: &mut R, options: &LoadOptions) -> Result<Self> {
        Self::load_with_progress(gguf, reader, options, |_, _| {})
    }

    /// As `load`, calling `progress(done, total)` before the first tensor and after each layer.
    pub fn load_with_progress<R: Read + Seek>(
        gguf: &GgufFile,
        reader: &mut R,
        options: &LoadOptions,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Self> {
        let config = ModelConfig::from_gguf(gguf)?;
        let c = &config;
        let mut ld = TensorReader { gguf, reader };
        let int8 = options.int8_activations;
        let total = c.n_layers + 2;
        progress(0, total);

        let table = ld.embedding(c)?;
        let (table_name, table) = (table.name, Arc::new(table.tensor));
        let embedding = Embedding(QuantMatrix::new(&table_name, table.clone())?);
        progress(1, total);
        let mut layers = Vec::with_capacity(c.n_layers);
        for i in 0..c.n_layers {
            layers.push(ld.layer(c, i)?.map(|m| Linear::new(m, int8), Ok)?);
            progress(i + 2, total);
        }
        let final_norm = ld.final_norm(c)?;
        let lm_head = match ld.output(c)? {
            Some(output) => Linear::new(output, int8)?,
            None => Linear::shared(&format!("{table_name} (tied output)"), table, int8)?,
        };
        let rope_factors = ld.rope_factors(c)?;
        progress(total, total);
        let max_context = options.max_context.map_or(c.context_length, |m| m.min(c.context_length)).max(1);
        let cache_dtype = if options.f16_cache { DType::F16 } else { DType::F32 };
        let sequences = vec![Sequence::new(c.n_layers, cache_dtype)];
        let rope = RopeTables::default();
        Ok(Self {
            config,
            embedding,
            layers,
            final_norm,
            lm_head,
            rope_factors,
            rope,
            sequences,
            max_context,
            cache_dtype,
        })
    }

    fn mlp(&self, layer: usize, m: &[f32], row_form: RowForm) -> Result<Vec<f32>> {
        let l = &self.layers[layer];
        // On plain rows of values: the copies in and out of tensors around the activation and the gating took a
        // fifth of the MLP's time in a batched step.
        let [mut gated, up] = Linear::values_each([&l.ffn_gate, &l.ffn_up], m, row_form)?;
        let activation = self.config.activation;
        let gate = |gated: &mut [f32], up: &[f32]| {
            match activation {
                Activation::GeluTanh => activations::gelu_tanh(gated),
                Activation::Silu => activations::silu(gated),
            }
            gated.iter_mut().zip(up).for_each(|(g, u)| *g *= u);
        };
        // A batched step's rows are gated on the pass's threads (value by value, so in any split the same
        // numbers): on one thread, SmolLM2's 16 rows of 1,536 took 2% of the step.
        let ff = l.ffn_up.0.rows();
        let rows = up.len() / ff;
        team::for_each_part_if(rows >= 4, gated.chunks_exact_mut(ff), |i, row| gate(row, &up[i * ff..(i + 1) * ff]));
        l.ffn_down.values(&gated, row_form)
    }

    /// RMSNorm of each row of `x` with weights `w`, candle's arithmetic (`rms_norm_in_place`), into a new output.
    fn norm_rows(&self, x: &[f32], w: &[f32]) -> Vec<f32> {
        self.rows_normed(w, x.len(), x.chunks(NORM_ROWS_PER_TASK * w.len()), |x| x)
    }

    /// `h += added`, then `norm_rows(h, w)`, each task adding its rows and normalizing them: the residual stream's
    /// addition ran on one thread while the others waited, and then the norm's copy of the stream.
    fn add_then_norm(&self, h: &mut [f32], added: &[f32], w: &[f32]) -> Vec<f32> {
        assert_eq!(h.len(), added.len(), "an added row per row of the stream");
        let chunk = NORM_ROWS_PER_TASK * w.len();
        self.rows_normed(w, h.len(), h.chunks_mut(chunk).zip(added.chunks(chunk)), |(h, added)| {
            add_rows(h, added);
            let h: &[f32] = h;
            h
        })
    }

    /// `len` values normalized row by row with weights `w` into a new output: `source` gives each part's rows (of
    /// `NORM_ROWS_PER_TASK` rows, the last one shorter), which are copied into the output and normalized there.
    /// On the pass's threads, a part per task, where there are parts for two: a batched step's norms on one thread
    /// took 3-4% of the step (candle's own `rms_norm` splits rows among rayon's threads, but in a pass they are the
    /// team's, spinning).
    fn rows_normed<'a, P: Send>(
        &self,
        w: &[f32],
        len: usize,
        parts: impl IntoIterator<Item = P>,
        source: impl Fn(P) -> &'a [f32] + Sync,
    ) -> Vec<f32> {
        let (chunk, eps) = (NORM_ROWS_PER_TASK * w.len(), self.config.rms_eps);
        let mut out: Vec<f32> = Vec::with_capacity(len);
        let written = AtomicUsize::new(0);
        let norm = |(part, room): (P, &mut [MaybeUninit<f32>])| {
            let rows = room.write_copy_of_slice(source(part));
            rms_norm_rows(rows, w, eps);
            written.fetch_add(rows.len(), Ordering::Relaxed);
        };
        let parts = parts.into_iter().zip(out.spare_capacity_mut()[..len].chunks_mut(chunk.max(1)));
        team::for_each_part_if(len >= 2 * chunk, parts, |_, part| norm(part));
        // Each room was written whole (`write_copy_of_slice` takes a source of its length); check that they cover
        // the output.
        assert_eq!(written.into_inner(), len, "parts that cover the rows");
        // SAFETY: the first `len` values were written (checked just above).
        unsafe { out.set_len(len) };
        out
    }

    /// The forward pass of sequence 0, synchronously (see `LanguageModel::forward`).
    pub fn forward_sync(
        &mut self,
        tokens: &[u32],
        segment: Segment,
        hooks: &Hooks,
        logits: LogitsWanted,
    ) -> Result<StepOutput> {
        let call = BatchCall { sequence: 0, tokens, segment, hooks };
        Ok(self.forward_calls(&[call], logits, RowForm::Fastest)?.pop().expect("one output per call"))
    }

    /// One forward call for each of `calls` (distinct sequences), synchronously (see
    /// `LanguageModel::forward_batch`). `LogitsWanted::All` is for a single call. `row_form`: every row of every
    /// product computed independently of the others (batched calls), or in the fastest form.
    pub fn forward_calls(
        &mut self,
        calls: &[BatchCall],
        logits: LogitsWanted,
        row_form: RowForm,
    ) -> Result<Vec<StepOutput>> {
        if calls.len() > 1 && logits == LogitsWanted::All {
            return Err(EngineError::InvalidRequest("all-position logits are for one sequence at a time".into()));
        }
        let vocab = self.lm_head.0.rows();
        self.run_calls(calls, PassHead::Logits(logits), row_form, |out| {
            // No logits where there were no calls.
            let (mut captures, Some((flat, wanted))) = (out.captures, out.logits) else { return Vec::new() };
            match wanted {
                LogitsWanted::All => {
                    let last = flat[flat.len() - vocab..].to_vec();
                    vec![StepOutput {
                        logits: last,
                        all_logits: Some(flat),
                        captures: captures.pop().unwrap_or_default(),
                    }]
                }
                LogitsWanted::Last if captures.len() == 1 => {
                    vec![StepOutput { logits: flat, all_logits: None, captures: captures.pop().unwrap_or_default() }]
                }
                LogitsWanted::Last => team::map(captures.len(), |i| flat[i * vocab..(i + 1) * vocab].to_vec())
                    .into_iter()
                    .zip(captures)
                    .map(|(logits, captures)| StepOutput { logits, all_logits: None, captures })
                    .collect(),
            }
        })
    }

    /// `forward_calls` for the last token of each call, then each call's next token picked from its logits
    /// (`picks[i]`: call i's sampling and generation step) on the pass's threads, the logits kept here (see
    /// `LanguageModel::forward_batch_pick`). A batched step whose picks are all greedy may skip most of the logits
    /// (`PassHead::GreedyTokens`): the same tokens.
    pub fn forward_calls_picking(
        &mut self,
        calls: &[BatchCall],
        picks: &[(Sampling, u32)],
        row_form: RowForm,
    ) -> Result<Vec<Picked>> {
        if picks.len() != calls.len() {
            return Err(EngineError::InvalidRequest(format!("{} picks for {} calls", picks.len(), calls.len())));
        }
        let vocab = self.lm_head.0.rows();
        let greedy = picks.iter().all(|(sampling, _)| *sampling == Sampling::Greedy);
        let head = match greedy && row_form == RowForm::IndependentSteps {
            true => PassHead::GreedyTokens,
            false => PassHead::Logits(LogitsWanted::Last),
        };
        self.run_calls(calls, head, row_form, |out| {
            let tokens = match (out.greedy_tokens, out.logits) {
                (Some(tokens), _) => tokens,
                (None, Some((flat, _))) => {
                    let pick_one = |i: usize| pick(&flat[i * vocab..(i + 1) * vocab], &picks[i].0, picks[i].1);
                    if calls.len() > 1 {
                        team::map(calls.len(), pick_one)
                    } else {
                        vec![pick_one(0)]
                    }
                }
                // No logits where there were no calls.
                (None, None) => return Vec::new(),
            };
            tokens
                .into_iter()
                .zip(out.captures)
                .map(|(token, captures)| Picked { token, captures, logits: None })
                .collect()
        })
    }

    /// A pass over `calls` that ends as `head` says, then `finish` on what it gives, on the pass's threads.
    fn run_calls<R: Send>(
        &mut self,
        calls: &[BatchCall],
        head: PassHead,
        row_form: RowForm,
        finish: impl FnOnce(PassOutput) -> R + Send,
    ) -> Result<R> {
        // Natively and in the browser's threaded build, the whole pass runs on one of rayon's threads, so that
        // each of its ~200 parallel matrix products per token forks and joins among the pool's threads instead of
        // parking the caller and waking it again (SmolLM2's decoding on 2 cores: 30 tokens/s before, 36 after),
        // and the pool's other threads spin through the pass as its team (`team.rs`), so that no product waits
        // for a sleeping thread to wake. The plain wasm build has no threads: the pass runs here.
        let pass = || self.forward_calls_here(calls, head, row_form).map(finish);
        #[cfg(any(not(target_arch = "wasm32"), target_feature = "atomics"))]
        return rayon::scope(|scope| team::with_team(scope, pass));
        #[cfg(all(target_arch = "wasm32", not(target_feature = "atomics")))]
        pass()
    }

    fn forward_calls_here(&mut self, calls: &[BatchCall], head: PassHead, row_form: RowForm) -> Result<PassOutput> {
        for (i, call) in calls.iter().enumerate() {
            if call.sequence >= MAX_SEQUENCES {
                return Err(EngineError::InvalidRequest(format!(
                    "sequence {} of a batch: this backend holds sequences 0..{}",
                    call.sequence,
                    MAX_SEQUENCES - 1
                )));
            }
            if calls[..i].iter().any(|c| c.sequence == call.sequence) {
                return Err(EngineError::InvalidRequest(format!("sequence {} twice in one batch", call.sequence)));
            }
            while self.sequences.len() <= call.sequence {
                self.sequences.push(Sequence::new(self.config.n_layers, self.cache_dtype));
            }
            let position = self.sequences[call.sequence].position;
            check_request(&self.config, position, self.max_context, call.tokens, call.hooks)?;
        }
        if calls.is_empty() {
            return Ok(PassOutput { logits: None, greedy_tokens: None, captures: Vec::new() });
        }
        let hidden = self.config.hidden;
        let all_tokens: Vec<u32> = calls.iter().flat_map(|c| c.tokens.iter().copied()).collect();
        // The residual stream as plain rows of values, one call's rows after the other: the tensor operations
        // around each norm, add and product (allocations and copies) ran on one thread while the others spun,
        // 6.3% of a SmolLM2 --int8 batched step's samples against 4.4% without them.
        let mut h = self.embedding.lookup(&all_tokens)?;
        if let Some(s) = self.config.embedding_scale {
            // candle's `h * s`: an affine map, `x * s + 0`.
            h.iter_mut().for_each(|x| *x = *x * s + 0.0);
        }
        let mut captures: Vec<Vec<Capture>> = vec![Vec::new(); calls.len()];
        // Reads only: the layers up to the last one a hook touches.
        let layers = match head {
            PassHead::Logits(_) | PassHead::GreedyTokens => self.config.n_layers,
            PassHead::Reads => {
                (0..self.config.n_layers).rev().find(|&i| calls.iter().any(|c| c.hooks.touches(i))).map_or(0, |i| i + 1)
            }
        };
        // The next layer's input, normalized with the addition that ends a layer where no hook comes between.
        let mut next_input = None;
        for i in 0..layers {
            let a = match next_input.take() {
                Some(a) => a,
                None => self.norm_rows(&h, &self.layers[i].attn_norm),
            };
            let mut o = self.attention(i, &a, calls, row_form)?;
            if let Some(w) = &self.layers[i].post_attention_norm {
                o = self.norm_rows(&o, w);
            }
            let m = self.add_then_norm(&mut h, &o, &self.layers[i].ffn_norm);
            let mut m = self.mlp(i, &m, row_form)?;
            if let Some(w) = &self.layers[i].post_ffn_norm {
                m = self.norm_rows(&m, w);
            }
            let hooked = calls.iter().any(|c| c.hooks.touches(i));
            if !hooked && i + 1 < layers {
                next_input = Some(self.add_then_norm(&mut h, &m, &self.layers[i + 1].attn_norm));
            } else {
                add_rows(&mut h, &m);
            }

            if hooked {
                let mut row = 0;
                for (c, call) in calls.iter().enumerate() {
                    let n = call.tokens.len();
                    let rows = &mut h[row * hidden..(row + n) * hidden];
                    if call.hooks.touches(i) {
                        let part = Tensor::from_slice(rows, (n, hidden), &Device::Cpu).context("a sequence's rows")?;
                        let start = self.sequences[call.sequence].position;
                        let part = apply_hooks(part, call, i, start, hidden, &mut captures[c])?;
                        rows.copy_from_slice(&part.flatten_all().and_then(|p| p.to_vec1::<f32>()).context("hooks")?);
                    }
                    row += n;
                }
            }
        }
        for call in calls {
            self.sequences[call.sequence].position += call.tokens.len();
        }

        let logits = match head {
            PassHead::Reads => return Ok(PassOutput { logits: None, greedy_tokens: None, captures }),
            PassHead::Logits(wanted) => wanted,
            PassHead::GreedyTokens => LogitsWanted::Last,
        };
        // The rows whose logits are wanted: every row of a single call, or the last row of each call.
        let rows = match logits {
            LogitsWanted::All => h,
            LogitsWanted::Last => {
                let mut last = Vec::with_capacity(calls.len() * hidden);
                let mut end = 0;
                for call in calls {
                    end += call.tokens.len();
                    last.extend_from_slice(&h[(end - 1) * hidden..end * hidden]);
                }
                last
            }
        };
        let normed = self.norm_rows(&rows, &self.final_norm);
        // Greedy tokens straight from the normed rows, where the output matrix screens them (`quant::greedy_screen`).
        // Not where a final softcap follows: tanh can round distinct logits to equal ones, which changes the pick.
        if head == PassHead::GreedyTokens && self.config.final_softcap.is_none() {
            if let Some(tokens) = self.lm_head.0.argmax_exact_rows(&normed)? {
                return Ok(PassOutput { logits: None, greedy_tokens: Some(tokens), captures });
            }
        }
        // The logits as the product's own rows of values: Gemma's 262,144 logits per sequence were copied twice
        // more on their way out, 34 MB per batched step of 16.
        let [mut flat] = Linear::values_each([&self.lm_head], &normed, row_form)?;
        if let Some(cap) = self.config.final_softcap {
            let n = flat.len();
            let out = Tensor::from_vec(flat, n, &Device::Cpu).context("logits")?;
            let out =
                (out / cap as f64).and_then(|x| x.tanh()).and_then(|x| x * cap as f64).context("final softcap")?;
            flat = out.to_dtype(DType::F32).and_then(|x| x.to_vec1::<f32>()).context("logits")?;
        }
        Ok(PassOutput { logits: Some((flat, logits)), greedy_tokens: None, captures })
    }
}

/// Prompts of `lens` tokens in groups for `CpuModel::read_groups`, by index: those of `BATCH_INVARIANT_ROWS`
/// tokens or more together, in order, `READ_BATCH` at most a group and `budget` at most of `cost` (of a prompt's
/// length); each shorter prompt alone. Only from that many rows on does a row get, beside others, what it gets alone.
fn prompt_groups(lens: &[usize], cost: impl Fn(usize) -> usize, budget: usize) -> Vec<Vec<usize>> {
    let mut groups: Vec<Vec<usize>> = Vec::new();
    // The group that long prompts join, and its cost so far.
    let (mut open, mut held): (Option<usize>, usize) = (None, 0);
    for (i, &len) in lens.iter().enumerate() {
        match open {
            _ if len < BATCH_INVARIANT_ROWS => groups.push(vec![i]),
            Some(g) if groups[g].len() < READ_BATCH && held + cost(len) <= budget => {
                groups[g].push(i);
                held += cost(len);
            }
            _ => {
                open = Some(groups.len());
                groups.push(vec![i]);
                held = cost(len);
            }
        }
    }
    groups
}

/// The residual stream's addition: `h += added`, value by value.
fn add_rows(h: &mut [f32], added: &[f32]) {
    h.iter_mut().zip(added).for_each(|(h, a)| *h += a);
}

/// How a batch's rows are computed. Every row gets the numbers it gets in any other batch. A decoding step of every
/// sequence (one token each) may round its activations where the model was loaded so (`int8_rows`). Prompts of at
/// least `BATCH_INVARIANT_ROWS` tokens take the prompt form (a decoded band and gemm, or `int8_rows` where the
/// model rounds), which gives a row the same numbers among any rows from that many on: several times faster than
/// the rows form for a prompt, and what `forward` computes for the same prompt alone. Other mixes take the exact
/// rows form.
fn batch_row_form(calls: &[BatchCall]) -> RowForm {
    if calls.iter().all(|c| c.tokens.len() == 1) {
        RowForm::IndependentSteps
    } else if calls.iter().all(|c| c.tokens.len() >= BATCH_INVARIANT_ROWS) {
        RowForm::Fastest
    } else {
        RowForm::Independent
    }
}

/// How a pass ends after its layers.
#[derive(Clone, Copy, PartialEq, Eq)]
enum PassHead {
    /// With no logits: only the hooks' reads, the pass stopping after the last layer a hook touches
    /// (`LanguageModel::read_prompt`).
    Reads,
    /// With the logits asked for.
    Logits(LogitsWanted),
    /// With each call's greedy token at its last position, picked without most of the logits where the output
    /// matrix screens them (`QuantMatrix::argmax_exact_rows`), else with the last position's logits. Batched
    /// decoding steps only: the screen's exact values are those of their rows form.
    GreedyTokens,
}

/// What a pass gives after its layers: the logits (every position of a single call's, or the last position's of
/// each call, row after row) or the greedy tokens, as its head asked, and each call's captures.
struct PassOutput {
    logits: Option<(Vec<f32>, LogitsWanted)>,
    greedy_tokens: Option<Vec<u32>>,
    captures: Vec<Vec<Capture>>,
}

/// The hooks of one call on its rows `h` ([n, hidden], positions `start..start + n`) at `layer`: reads into
/// `captures`, then adds, per-position additions and the projection (see `hooks`).
fn apply_hooks(
    mut h: Tensor,
    call: &BatchCall,
    layer: usize,
    start: usize,
    hidden: usize,
    captures: &mut Vec<Capture>,
) -> Result<Tensor> {
    let (hooks, n) = (call.hooks, call.tokens.len());
    if !hooks.touches(layer) {
        return Ok(h);
    }
    for off in hooks.read_offsets(layer, start, n) {
        let values = h.get(off).and_then(|r| r.to_vec1::<f32>()).context("reading resid_post")?;
        captures.push(Capture { layer, position: start + off, values });
    }
    if let Some(v) = hooks.added_vector(layer, call.segment) {
        let v = Tensor::from_vec(v, (1, hidden), &Device::Cpu).context("steering vector")?;
        h = h.broadcast_add(&v).context("adding steering vector")?;
    }
    if let Some(rows) = hooks.added_rows(layer, start, n, hidden) {
        let rows = Tensor::from_vec(rows, (n, hidden), &Device::Cpu).context("per-position rows")?;
        h = (h + rows).context("adding per-position rows")?;
    }
    if let Some(p) = hooks.projection(layer, call.segment) {
        h = set_projection(&h, &p.unit, p.value)?;
    }
    Ok(h)
}

/// `h' = h + (value - h.u) u` for every row of `h` ([n, hidden]), by `hooks::set_projection`.
fn set_projection(h: &Tensor, unit: &[f32], value: f32) -> Result<Tensor> {
    let dims = h.dims2().context("projection")?;
    let mut rows = h.flatten_all().and_then(|t| t.to_vec1::<f32>()).context("projection")?;
    crate::hooks::set_projection(&mut rows, unit, value);
    Tensor::from_vec(rows, dims, &Device::Cpu).context("setting the projection")
}

impl LanguageModel for CpuModel {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn position(&self) -> usize {
        self.sequences[0].position
    }

    fn max_context(&self) -> usize {
        self.max_context
    }

    fn reset(&mut self) {
        self.sequences[0].reset();
    }

    fn batch_capacity(&self) -> usize {
        MAX_SEQUENCES
    }

    fn readout(&self) -> Option<Readout> {
        Some(Readout { unembedding: self.lm_head.0.clone(), final_norm: self.final_norm.clone() })
    }

    fn reset_sequence(&mut self, sequence: usize) {
        if let Some(s) = self.sequences.get_mut(sequence) {
            s.reset();
        }
    }

    fn sequence_position(&self, sequence: usize) -> usize {
        self.sequences.get(sequence).map_or(0, |s| s.position)
    }

    fn forward_batch<'a>(&'a mut self, calls: &'a [BatchCall<'a>]) -> LocalBoxFuture<'a, Result<Vec<StepOutput>>> {
        Box::pin(std::future::ready(self.forward_calls(calls, LogitsWanted::Last, batch_row_form(calls))))
    }

    fn forward_batch_pick<'a>(
        &'a mut self,
        calls: &'a [BatchCall<'a>],
        picks: &'a [(Sampling, u32)],
    ) -> LocalBoxFuture<'a, Result<Vec<Picked>>> {
        Box::pin(std::future::ready(self.forward_calls_picking(calls, picks, batch_row_form(calls))))
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

    /// A greedy decoding step of sequence 0 picks through the output matrix's screen where a single row is screened
    /// (in wasm: `quant::greedy_screen::screens_single_rows`), as a batched step does: the same token without most
    /// of the logits (Gemma 3's output product was about a third of the page's decoding, computed whole). There a
    /// step's products equal the rows form's bit for bit (tests/wasm.rs), so the layers give the same numbers
    /// either way. Prompts, whose logits `generate` keeps, other sampling and native steps take `forward`.
    fn forward_pick<'a>(
        &'a mut self,
        tokens: &'a [u32],
        segment: Segment,
        hooks: &'a Hooks,
        sampling: Sampling,
        step: u32,
    ) -> LocalBoxFuture<'a, Result<Picked>> {
        let screened = tokens.len() == 1
            && segment == Segment::Generated
            && sampling == Sampling::Greedy
            && quant::greedy_screen::screens_single_rows();
        let picked = match screened {
            true => {
                let call = [BatchCall { sequence: 0, tokens, segment, hooks }];
                self.forward_calls_picking(&call, &[(sampling, step)], RowForm::IndependentSteps)
                    .map(|mut picked| picked.pop().expect("one pick per call"))
            }
            false => self
                .forward_sync(tokens, segment, hooks, LogitsWanted::Last)
                .map(|out| Picked::from_logits(out, &sampling, step)),
        };
        Box::pin(std::future::ready(picked))
    }

    fn read_prompt<'a>(&'a mut self, tokens: &'a [u32], hooks: &'a Hooks) -> LocalBoxFuture<'a, Result<Vec<Capture>>> {
        let out = self.read_prompts_sync(&[(tokens, hooks)]);
        Box::pin(std::future::ready(out.map(|mut all| all.pop().expect("one list per prompt"))))
    }

    fn read_prompts<'a>(
        &'a mut self,
        prompts: &'a [(&'a [u32], &'a Hooks)],
    ) -> LocalBoxFuture<'a, Result<Vec<Vec<Capture>>>> {
        Box::pin(std::future::ready(self.read_prompts_sync(prompts)))
    }

    fn next_token_nlls<'a>(&'a mut self, prompts: &'a [&'a [u32]]) -> LocalBoxFuture<'a, Result<Vec<Vec<f64>>>> {
        Box::pin(std::future::ready(self.next_token_nlls_sync(prompts)))
    }

    fn backend_name(&self) -> String {
        "cpu".into()
    }
}

impl CpuModel {
    /// `next_token_nlls`: the prompts as sequences of one pass (`prompt_groups`), each pass holding the logits of at
    /// most `LIKELIHOOD_LOGITS` values (Gemma 3's 262,144 a position), with the products in the prompt form, which
    /// gives a row the same numbers among any rows from `BATCH_INVARIANT_ROWS` on; shorter prompts are read alone. So
    /// each prompt gets what reading it alone gives. The likelihoods are computed on the pass's threads.
    fn next_token_nlls_sync(&mut self, prompts: &[&[u32]]) -> Result<Vec<Vec<f64>>> {
        let vocab = self.lm_head.0.rows();
        let lens: Vec<usize> = prompts.iter().map(|p| p.len()).collect();
        let groups = prompt_groups(&lens, |len| len * vocab, LIKELIHOOD_LOGITS);
        let none = Hooks::none();
        self.read_groups(
            prompts.len(),
            groups,
            |i| (prompts[i], &none),
            PassHead::Logits(LogitsWanted::All),
            |out, calls| {
                let Some((flat, _)) = out.logits else { return Vec::new() };
                // Every position after a prompt's first, over all the group's prompts, as (row, token).
                let mut pairs = Vec::new();
                let mut row = 0;
                for call in calls {
                    pairs.extend((1..call.tokens.len()).map(|p| (row + p - 1, call.tokens[p])));
                    row += call.tokens.len();
                }
                let nlls = team::map(pairs.len(), |j| {
                    let (row, token) = pairs[j];
                    likelihood::token_nll(&flat[row * vocab..(row + 1) * vocab], token)
                });
                let mut nlls = nlls.into_iter();
                calls.iter().map(|c| nlls.by_ref().take(c.tokens.len().saturating_sub(1)).collect()).collect()
            },
        )
    }

    /// `read_prompts` (and `read_prompt`, a list of one): the prompts as sequences of one pass, `READ_BATCH` at a
    /// time, each weight band decoded once for all of them (discovery reads twice as fast). The products take the
    /// prompt form, which gives a row the same numbers among any rows from `BATCH_INVARIANT_ROWS` on; shorter
    /// prompts are read alone, so every prompt gets exactly what it gets alone (tests/hooks.rs).
    fn read_prompts_sync(&mut self, prompts: &[(&[u32], &Hooks)]) -> Result<Vec<Vec<Capture>>> {
        let lens: Vec<usize> = prompts.iter().map(|(p, _)| p.len()).collect();
        let groups = prompt_groups(&lens, |_| 0, 0);
        self.read_groups(prompts.len(), groups, |i| prompts[i], PassHead::Reads, |out, _| out.captures)
    }

    /// Reads each group of prompts (indices among `count`) as the sequences of one pass in the prompt form, those
    /// sequences emptied before and after, and gives what `finish` makes of each pass, one item per prompt, back in
    /// the prompts' order.
    fn read_groups<'p, T: Send>(
        &mut self,
        count: usize,
        groups: impl IntoIterator<Item = Vec<usize>>,
        prompt: impl Fn(usize) -> (&'p [u32], &'p Hooks),
        head: PassHead,
        finish: impl Fn(PassOutput, &[BatchCall]) -> Vec<T> + Sync,
    ) -> Result<Vec<T>> {
        let mut all: Vec<Option<T>> = (0..count).map(|_| None).collect();
        for group in groups {
            let calls: Vec<BatchCall> = group
                .iter()
                .enumerate()
                .map(|(sequence, &i)| {
                    let (tokens, hooks) = prompt(i);
                    BatchCall { sequence, tokens, segment: Segment::Prompt, hooks }
                })
                .collect();
            let reset = |model: &mut Self| (0..calls.len()).for_each(|s| model.reset_sequence(s));
            reset(self);
            let out = self.run_calls(&calls, head, RowForm::Fastest, |out| finish(out, &calls));
            reset(self);
            for (&i, item) in group.iter().zip(out?) {
                all[i] = Some(item);
            }
        }
        Ok(all.into_iter().map(|item| item.expect("every prompt read")).collect())
    }
}

/// candle's `rms_norm` of one row: `x / sqrt(mean(x^2) + eps) * weights`.
fn rms_norm_in_place(x: &mut [f32], weights: &[f32], eps: f32) {
    let sum2: f32 = x.iter().map(|v| v * v).sum();
    scale_by_rms(x, weights, sum2, eps);
}

/// The end of `rms_norm_in_place`, from the row's sum of squares.
fn scale_by_rms(x: &mut [f32], weights: &[f32], sum2: f32, eps: f32) {
    let m = (sum2 / x.len() as f32 + eps).sqrt();
    for (v, w) in x.iter_mut().zip(weights) {
        *v = *v / m * w;
    }
}

/// `rms_norm_in_place` of each row of `rows` (rows of `weights.len()` values), four rows' sums of squares side by
/// side. Each row's sum is still one chain of additions in the row's order (the same numbers bit for bit), and
/// four chains overlap where one left the adder waiting on each addition (576 of them per SmolLM2 row): a batched
/// SmolLM2 step's norms took 22.3-27.0 ms per 64 steps so, against 30.6-34.2 row by row (docs/benchmarks.md).
fn rms_norm_rows(rows: &mut [f32], weights: &[f32], eps: f32) {
    let n = weights.len();
    let mut fours = rows.chunks_exact_mut(4 * n);
    for four in &mut fours {
        // `Iterator::sum`'s start (a square is never -0.0, so either zero gives the same sums).
        let mut sums = [-0.0f32; 4];
        for i in 0..n {
            for (r, sum) in sums.iter_mut().enumerate() {
                let v = four[r * n + i];
                *sum += v * v;
            }
        }
        for (row, sum) in four.chunks_exact_mut(n).zip(sums) {
            scale_by_rms(row, weights, sum, eps);
        }
    }
    fours.into_remainder().chunks_exact_mut(n.max(1)).for_each(|row| rms_norm_in_place(row, weights, eps));
}

#[cfg(test)]
mod tests {
    use super::{prompt_groups, rms_norm_rows};
    use super::{BATCH_INVARIANT_ROWS, READ_BATCH};

    /// Rows of scores or activations, spread in sign and size.
    pub(super) fn rows(n: usize, len: usize) -> Vec<f32> {
        (0..n * len).map(|i| ((i * 7919 % 613) as f32 - 300.0) * 0.037 * (1 + i % 5) as f32).collect()
    }

    /// `rms_norm_rows` gives each row the plain one-row loop's values bit for bit (its sum of squares in order,
    /// then `x / sqrt(mean + eps) * w`): 1 to 9 rows of 576 and of 3, so groups of four and the rows left over.
    #[test]
    fn norm_rows_are_each_rows_norm_bit_for_bit() {
        for len in [3, 576] {
            let weights: Vec<f32> = (0..len).map(|i| 0.5 + (i % 7) as f32 * 0.1).collect();
            for n in 1..=9 {
                let mut got = rows(n, len);
                let mut want = got.clone();
                for row in want.chunks_exact_mut(len) {
                    let mut sum2 = 0f32;
                    row.iter().for_each(|v| sum2 += v * v);
                    let m = (sum2 / len as f32 + 1e-5).sqrt();
                    row.iter_mut().zip(&weights).for_each(|(v, w)| *v = *v / m * w);
                }
                rms_norm_rows(&mut got, &weights, 1e-5);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "{n} rows of {len}");
            }
        }
    }

    /// Long prompts join the open group until it holds `READ_BATCH` or the budget would be passed; short ones go
    /// alone, without closing it. By hand: lengths 40, 3, 40, 40, 2, 40 (3 and 2 short), a budget of 100 tokens.
    #[test]
    fn prompts_are_grouped_by_length_count_and_budget() {
        const { assert!(3 < BATCH_INVARIANT_ROWS && 40 >= BATCH_INVARIANT_ROWS) };
        let groups = prompt_groups(&[40, 3, 40, 40, 2, 40], |len| len, 100);
        assert_eq!(groups, vec![vec![0, 2], vec![1], vec![3, 5], vec![4]]);
        // Without a budget, `READ_BATCH` to a group.
        let lens = vec![40; READ_BATCH + 1];
        let groups = prompt_groups(&lens, |_| 0, 0);
        assert_eq!(groups, vec![(0..READ_BATCH).collect::<Vec<_>>(), vec![READ_BATCH]]);
    }
}
