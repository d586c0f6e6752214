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
use super::kv_cache::{CacheRows, CacheView, KvCache};
use super::value_sums;
use super::{check_request, BatchCall, LanguageModel, LocalBoxFuture, LogitsWanted, Picked, Readout, StepOutput};
use crate::config::{rope_cos_sin, Activation, ModelConfig, RopeLayout};
use crate::error::{EngineError, Result, TensorContext};
use crate::gguf::GgufFile;
use crate::hooks::{Capture, Hooks, Segment};
use crate::likelihood;
use crate::quant::{self, QuantMatrix, RowForm, BATCH_INVARIANT_ROWS};
use crate::sampler::{pick, Sampling};
use crate::team;
use crate::tensors::{FileMatrix, LayerTensors, TensorReader};

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

/// A prompt's rows per task of its attention (`CpuModel::attend`).
const ATTENDED_ROWS_PER_TASK: usize = 4;

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

    /// The attention block of `layer` over the rows of every call (`a`: the calls' rows, one after the other):
    /// the projections on all rows at once, attention per sequence against its own cache.
    fn attention(&mut self, layer: usize, a: &[f32], calls: &[BatchCall], row_form: RowForm) -> Result<Vec<f32>> {
        let end = calls.iter().map(|c| self.sequences[c.sequence].position + c.tokens.len()).max().unwrap_or(0);
        let (base, head_dim) = (self.config.layers[layer].rope_base, self.config.head_dim);
        self.rope.cover(base, head_dim, self.rope_factors.as_deref(), end, self.max_context);
        if calls.iter().all(|c| c.tokens.len() == 1) {
            return self.attention_steps(layer, a, calls, row_form);
        }
        let (c, l) = (&self.config, &self.layers[layer]);
        let [mut q, mut k, v] = Linear::values_each([&l.attn_q, &l.attn_k, &l.attn_v], a, row_form)?;
        let (q_dim, kv_dim) = (c.q_dim(), c.kv_dim());
        let mut out = vec![0f32; q.len()];
        // Each call's rows (its queries and keys made ready in place), its part of the output and its sequence,
        // taken out of `self` for the time of the step so that the sequences' attention (a fifth of a batched step
        // on SmolLM2) runs in parallel, each task writing its own cache.
        let mut sequences = std::mem::take(&mut self.sequences);
        let mut by_index: Vec<Option<&mut Sequence>> = sequences.iter_mut().map(Some).collect();
        let mut tasks = Vec::with_capacity(calls.len());
        let (mut rest_q, mut rest_k, mut rest_v, mut rest_out) = (&mut q[..], &mut k[..], &v[..], &mut out[..]);
        for call in calls {
            let sequence = by_index[call.sequence].take().expect("distinct sequences, checked by forward_calls");
            let n = call.tokens.len();
            let (q, after_q) = std::mem::take(&mut rest_q).split_at_mut(n * q_dim);
            let (k, after_k) = std::mem::take(&mut rest_k).split_at_mut(n * kv_dim);
            let (v, after_v) = rest_v.split_at(n * kv_dim);
            let (out, after_out) = std::mem::take(&mut rest_out).split_at_mut(n * q_dim);
            tasks.push((q, k, v, out, sequence));
            (rest_q, rest_k, rest_v, rest_out) = (after_q, after_k, after_v, after_out);
        }
        let this = &*self;
        // One sequence's rows on the pass's threads; several sequences each on a task of their own.
        let rows_in_parallel = tasks.len() == 1;
        let attend = |(q, k, v, out, sequence): (&mut [f32], &mut [f32], &[f32], &mut [f32], &mut Sequence)| {
            this.attend(layer, q, k, v, sequence, rows_in_parallel, out)
        };
        team::for_each_part_if(!rows_in_parallel, tasks, |_, task| attend(task));
        self.sequences = sequences;
        self.layers[layer].attn_output.values(&out, row_form)
    }

    /// `attention` for a decoding step of each call's sequence (one new row each), on plain rows of values: the
    /// queries, keys and values come from the products as they are, and the only tensors are the layer's input and
    /// output. Per sequence and layer, the tensor operations around each step's little arithmetic took longer than
    /// the arithmetic itself. Each sequence's new row goes into its cache (`step_row`), then its heads attend
    /// (`attend_heads_of`), on the pass's threads, each task writing its own part of the output: a single sequence's
    /// heads each on a task (on one thread, they left the others idle for a tenth of a SmolLM2 step), several
    /// sequences a task each.
    fn attention_steps(&mut self, layer: usize, a: &[f32], calls: &[BatchCall], row_form: RowForm) -> Result<Vec<f32>> {
        let (c, l) = (&self.config, &self.layers[layer]);
        let [q, k, v] = Linear::values_each([&l.attn_q, &l.attn_k, &l.attn_v], a, row_form)?;
        let (q_dim, kv_dim, hd) = (c.q_dim(), c.kv_dim(), c.head_dim);
        let norms = qk_norms(l);
        let mut sequences = std::mem::take(&mut self.sequences);
        let mut by_index: Vec<Option<&mut Sequence>> = sequences.iter_mut().map(Some).collect();
        let mut tasks: Vec<&mut Sequence> = calls
            .iter()
            .map(|call| by_index[call.sequence].take().expect("distinct sequences, checked by forward_calls"))
            .collect();
        let this = &*self;
        let step = |i: usize, sequence: &mut Sequence| {
            // The first head's keys asked for while the new row is made (`CacheRows::prefetch_start`).
            let len = sequence.position + 1;
            sequence.caches[layer].keys().prefetch_start(0, this.first_attended(layer, len)..len - 1);
            let rows = |x: &[f32], d: usize| x[i * d..(i + 1) * d].to_vec();
            this.step_row(layer, rows(&q, q_dim), rows(&k, kv_dim), &v[i * kv_dim..(i + 1) * kv_dim], norms, sequence)
        };
        let mut out = vec![0f32; calls.len() * q_dim];
        match tasks.as_mut_slice() {
            // One sequence: its step, then each of its heads on a task of its own.
            [sequence] => {
                let stepped = step(0, sequence);
                let cache = &sequence.caches[layer];
                team::for_each_part(out.chunks_exact_mut(hd), |h, out| {
                    let queries = &stepped.queries[h * hd..(h + 1) * hd];
                    this.attend_heads_of(layer, h..h + 1, queries, cache, stepped.len, out)
                });
            }
            // Several: a task per sequence, its step and then all its heads, in one round of tasks (as many tasks
            // as heads, each with its own scores to allocate, were slower).
            _ => team::for_each_part(tasks.into_iter().zip(out.chunks_exact_mut(q_dim)), |i, (sequence, out)| {
                let stepped = step(i, sequence);
                let heads = 0..c.n_heads;
                this.attend_heads_of(layer, heads, &stepped.queries, &sequence.caches[layer], stepped.len, out);
            }),
        }
        self.sequences = sequences;
        self.layers[layer].attn_output.values(&out, row_form)
    }

    /// The query heads `heads` of a sequence's decoding step at `layer` (`queries`: theirs, rotated and scaled) over
    /// the first `len` rows of its cache, into `out` (theirs, head after head): the heads that share a key-value head
    /// attended together (`attend_heads`).
    fn attend_heads_of(
        &self,
        layer: usize,
        heads: std::ops::Range<usize>,
        queries: &[f32],
        cache: &KvCache,
        len: usize,
        out: &mut [f32],
    ) {
        let (hd, group) = (self.config.head_dim, self.config.n_heads / self.config.n_kv_heads);
        let (keys, values) = (cache.keys(), cache.values());
        let mut h = heads.start;
        while h < heads.end {
            let end = ((h / group + 1) * group).min(heads.end);
            let at = (h - heads.start) * hd..(end - heads.start) * hd;
            self.attend_heads(layer, h..end, &queries[at.clone()], &keys, &values, len, &mut out[at]);
            h = end;
        }
    }

    /// Attention of one sequence's `n` new rows at `layer` (`queries`, `keys`, `v`: theirs, each [n, heads * hd];
    /// the queries and keys made ready in place) into `out` ([n, heads * hd]), appending the keys and values to the
    /// sequence's cache: each row as a decoding step at its position would be, bit for bit (`prepare_row`, then
    /// `attend_heads_of` over the rows up to its own), the causal mask being where each row's attention stops. The
    /// rows are prepared, then attend, a few at a time on the pass's threads where `rows_in_parallel` (a single
    /// prompt's attention took 17-26% of a 128-token prefill on one thread while the others waited). Candle's products
    /// per head, which this replaced, also computed the masked half of the scores.
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        layer: usize,
        queries: &mut [f32],
        keys: &mut [f32],
        v: &[f32],
        sequence: &mut Sequence,
        rows_in_parallel: bool,
        out: &mut [f32],
    ) {
        let c = &self.config;
        let (nh, nkv, hd) = (c.n_heads, c.n_kv_heads, c.head_dim);
        let (q_dim, kv_dim) = (nh * hd, nkv * hd);
        let start = sequence.position;
        let norms = qk_norms(&self.layers[layer]);
        let parts =
            queries.chunks_mut(ATTENDED_ROWS_PER_TASK * q_dim).zip(keys.chunks_mut(ATTENDED_ROWS_PER_TASK * kv_dim));
        let prepare = |part: usize, (queries, keys): (&mut [f32], &mut [f32])| {
            for (i, (q, k)) in queries.chunks_exact_mut(q_dim).zip(keys.chunks_exact_mut(kv_dim)).enumerate() {
                self.prepare_row(layer, q, k, norms, start + part * ATTENDED_ROWS_PER_TASK + i);
            }
        };
        team::for_each_part_if(rows_in_parallel, parts, prepare);
        let cache = &mut sequence.caches[layer];
        for (k, v) in keys.chunks_exact(kv_dim).zip(v.chunks_exact(kv_dim)) {
            cache.append_row(k, v, nkv);
        }
        let cache = &*cache;
        let attend = |part: usize, out: &mut [f32]| {
            for (i, out) in out.chunks_exact_mut(q_dim).enumerate() {
                let row = part * ATTENDED_ROWS_PER_TASK + i;
                let queries = &queries[row * q_dim..(row + 1) * q_dim];
                self.attend_heads_of(layer, 0..nh, queries, cache, start + row + 1, out);
            }
        };
        let parts = out.chunks_mut(ATTENDED_ROWS_PER_TASK * q_dim);
        team::for_each_part_if(rows_in_parallel, parts, attend);
    }

    /// One row's queries `q` and keys `k` at `layer`, at `position`, made ready for attention in place: Gemma 3's
    /// norms (`qk_norms`), RoPE, and the queries' scale.
    fn prepare_row(
        &self,
        layer: usize,
        q: &mut [f32],
        k: &mut [f32],
        qk_norms: Option<(&[f32], &[f32])>,
        position: usize,
    ) {
        let c = &self.config;
        let hd = c.head_dim;
        if let Some((qn, kn)) = qk_norms {
            q.chunks_exact_mut(hd).for_each(|head| rms_norm_in_place(head, qn, c.rms_eps));
            k.chunks_exact_mut(hd).for_each(|head| rms_norm_in_place(head, kn, c.rms_eps));
        }
        let (cos, sin) = self.rope.get(c.layers[layer].rope_base, hd / 2, position..position + 1);
        for head in q.chunks_exact_mut(hd).chain(k.chunks_exact_mut(hd)) {
            rotate(head, cos, sin, c.rope_layout);
        }
        // The queries scaled once for all heads.
        q.iter_mut().for_each(|x| *x *= c.attention_scale);
    }

    /// A decoding step's new row of one sequence at `layer` (`q`, `k`, `v`: its queries, keys and values;
    /// `qk_norms`: Gemma 3's query and key norm weights): made ready (`prepare_row`), the keys and values appended to
    /// the sequence's cache. The attention itself is `attend_heads`'. Batched and single-sequence steps both come
    /// here, and a prompt's rows take the same arithmetic (`attend`), so a sequence gets the same attention in any of
    /// them.
    fn step_row(
        &self,
        layer: usize,
        mut q: Vec<f32>,
        mut k: Vec<f32>,
        v: &[f32],
        qk_norms: Option<(&[f32], &[f32])>,
        sequence: &mut Sequence,
    ) -> Step {
        let position = sequence.position;
        self.prepare_row(layer, &mut q, &mut k, qk_norms, position);
        sequence.caches[layer].append_row(&k, v, self.config.n_kv_heads);
        Step { queries: q, len: position + 1 }
    }

    /// Attention at `layer` of the query heads `heads`, which share one key-value head (`queries`: theirs, rotated
    /// and scaled, head after head), over the first `len` rows of their sequence's cache (`keys`, `values`), or the
    /// last `window` of them, into `out` (head_dim values per head): each head's numbers as alone, bit for bit, with
    /// each key and value row read once for all.
    #[allow(clippy::too_many_arguments)]
    fn attend_heads(
        &self,
        layer: usize,
        heads: std::ops::Range<usize>,
        queries: &[f32],
        keys: &CacheView,
        values: &CacheView,
        len: usize,
        out: &mut [f32],
    ) {
        let c = &self.config;
        let kv_head = heads.start / (c.n_heads / c.n_kv_heads);
        debug_assert_eq!((heads.end - 1) / (c.n_heads / c.n_kv_heads), kv_head, "heads of one key-value head");
        match (keys, values) {
            (CacheView::F32(keys), CacheView::F32(values)) => {
                self.attend_heads_in(layer, heads, kv_head, queries, keys, values, len, out)
            }
            (CacheView::F16(keys), CacheView::F16(values)) => {
                self.attend_heads_in(layer, heads, kv_head, queries, keys, values, len, out)
            }
            _ => unreachable!("a cache's keys and values are of one type (`KvCache`)"),
        }
    }

    /// The first of the `len` rows of a sequence's cache that a new row attends to at `layer`: all of them, or the
    /// last `window` (sliding-window layers).
    fn first_attended(&self, layer: usize, len: usize) -> usize {
        self.config.layers[layer].window.map_or(0, |w| len.saturating_sub(w))
    }

    /// `attend_heads` on a cache of f32 or f16 values (an f16 cache's values widened as the kernels load them).
    #[allow(clippy::too_many_arguments)]
    fn attend_heads_in<V: quant::CacheValue>(
        &self,
        layer: usize,
        heads: std::ops::Range<usize>,
        kv_head: usize,
        queries: &[f32],
        keys: &CacheRows<V>,
        values: &CacheRows<V>,
        len: usize,
        out: &mut [f32],
    ) {
        let c = &self.config;
        let (hd, n) = (c.head_dim, heads.len());
        let first = self.first_attended(layer, len);
        let rows = len - first;
        let mut weights = vec![0f32; n * rows];
        // Each run of the cache asked for while the one before it is read (`CacheRows::prefetch_start`): the values
        // during the scores, the next head's keys during the sums.
        values.prefetch_start(kv_head, first..len);
        // Every head against every key, each score `dot`'s bit for bit, each key read once for all the heads.
        quant::dots_rows(queries, hd, first..len, |j| keys.row(kv_head, j), &mut weights);
        if let Some(cap) = c.attn_softcap {
            weights.iter_mut().for_each(|w| *w = (*w / cap).tanh() * cap);
        }
        softmax_rows(&mut weights, rows);
        if kv_head + 1 < c.n_kv_heads {
            keys.prefetch_start(kv_head + 1, first..len);
        }
        out.fill(0.0);
        value_sums::weighted_sums(out, hd, &weights, |j| values.row(kv_head, first + j));
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

/// A sequence's decoding step at one layer, its new row in the cache (`CpuModel::step_row`): the row's rotated,
/// scaled queries, and how many rows the cache holds.
struct Step {
    queries: Vec<f32>,
    len: usize,
}

/// RoPE's cos and sin for positions `0..len` ([len, head_dim / 2] each, row-major), one pair of tables per base,
/// grown (at least doubled) as sequences reach further. Recomputing them for every layer and call took 1.1% of a
/// Gemma prompt, in f64 `sin` and `cos`; each value is `rope_cos_sin`'s, whatever the range it was made in.
#[derive(Default)]
struct RopeTables {
    /// (base, cos, sin)
    bases: Vec<(f32, Vec<f32>, Vec<f32>)>,
}

impl RopeTables {
    /// Makes sure the tables of `base` cover positions `0..end` (growing them no further than `max_context`).
    fn cover(&mut self, base: f32, head_dim: usize, factors: Option<&[f32]>, end: usize, max_context: usize) {
        let at = match self.bases.iter().position(|b| b.0 == base) {
            Some(at) => at,
            None => {
                self.bases.push((base, Vec::new(), Vec::new()));
                self.bases.len() - 1
            }
        };
        let (_, cos, sin) = &mut self.bases[at];
        let have = cos.len() / (head_dim / 2).max(1);
        if end <= have {
            return;
        }
        let (more_cos, more_sin) = rope_cos_sin(head_dim, base, factors, have..end.max((2 * have).min(max_context)));
        cos.extend(more_cos);
        sin.extend(more_sin);
    }

    /// cos and sin of `base` for `positions` (`half` values each), which `cover` made.
    fn get(&self, base: f32, half: usize, positions: std::ops::Range<usize>) -> (&[f32], &[f32]) {
        let (_, cos, sin) = self.bases.iter().find(|b| b.0 == base).expect("RopeTables::cover first");
        let range = positions.start * half..positions.end * half;
        (&cos[range.clone()], &sin[range])
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

/// RoPE of one head at one position (`cos`, `sin`: head_dim / 2 values), as candle's `rope` (halves) and
/// `rope_i` (interleaved) compute it.
fn rotate(head: &mut [f32], cos: &[f32], sin: &[f32], layout: RopeLayout) {
    let half = head.len() / 2;
    for i in 0..half {
        let (a, b) = match layout {
            RopeLayout::Halves => (i, i + half),
            RopeLayout::Interleaved => (2 * i, 2 * i + 1),
        };
        let (x, y) = (head[a], head[b]);
        head[a] = x * cos[i] - y * sin[i];
        head[b] = x * sin[i] + y * cos[i];
    }
}

/// candle's `softmax_last_dim` of each row of `x` (rows of `len` values), with `activations::exp` (within a few ulp
/// of the C library's `expf`, which was a call per score; vectorized here, the sum then taken in order). Scores more
/// than 87.3 below the largest get e^-87.3 (about 1e-38) instead of less, which the sum, at least 1, cannot show.
/// Up to four rows side by side: the heads that share a key-value head (SmolLM2's 3, Gemma 3's 4). Each row's
/// maximum and sum are still one chain in the row's order (the same numbers bit for bit), and the rows' chains
/// overlap.
fn softmax_rows(x: &mut [f32], len: usize) {
    for group in x.chunks_mut(4 * len.max(1)) {
        let mut rows = group.chunks_exact_mut(len.max(1));
        match (rows.next(), rows.next(), rows.next(), rows.next()) {
            (Some(a), Some(b), Some(c), Some(d)) => softmax_side_by_side([a, b, c, d]),
            (Some(a), Some(b), Some(c), None) => softmax_side_by_side([a, b, c]),
            (Some(a), Some(b), None, _) => softmax_side_by_side([a, b]),
            (Some(a), None, ..) => softmax_side_by_side([a]),
            _ => {}
        }
    }
}

/// `softmax_rows`' arithmetic on `N` rows of one length at once.
fn softmax_side_by_side<const N: usize>(mut rows: [&mut [f32]; N]) {
    let len = rows[0].len();
    assert!(rows.iter().all(|row| row.len() == len), "rows of one length");
    let mut max = [f32::NEG_INFINITY; N];
    for i in 0..len {
        for (m, row) in max.iter_mut().zip(&rows) {
            *m = m.max(row[i]);
        }
    }
    for (row, m) in rows.iter_mut().zip(max) {
        row.iter_mut().for_each(|v| *v = activations::exp(*v - m));
    }
    let mut sum = [0f32; N];
    for i in 0..len {
        for (s, row) in sum.iter_mut().zip(&rows) {
            *s += row[i];
        }
    }
    for (row, s) in rows.iter_mut().zip(sum) {
        row.iter_mut().for_each(|v| *v /= s);
    }
}

/// Gemma 3's query and key norm weights of layer `l`, the form `step_row` takes; `None` for models without them.
fn qk_norms(l: &Layer) -> Option<(&[f32], &[f32])> {
    l.qk_norms.as_ref().map(|(q, k)| (&q[..], &k[..]))
}

#[cfg(test)]
mod tests {
    use super::{activations, prompt_groups, rms_norm_rows, softmax_rows, CpuModel, LoadOptions, Sequence};
    use super::{BATCH_INVARIANT_ROWS, READ_BATCH};
    use crate::config::ModelConfig;
    use crate::gguf::GgufFile;
    use crate::model::kv_cache::{CacheView, KvCache};
    use candle_core::DType;

    /// Rows of scores or activations, spread in sign and size.
    fn rows(n: usize, len: usize) -> Vec<f32> {
        (0..n * len).map(|i| ((i * 7919 % 613) as f32 - 300.0) * 0.037 * (1 + i % 5) as f32).collect()
    }

    /// `softmax_rows` gives each row the plain one-row loop's weights bit for bit (its maximum, then each
    /// exponential, then the sum in order, then each division): 1 to 9 rows, so groups of four and every smaller
    /// group, of 1, 5 and 64 values.
    #[test]
    fn softmax_rows_are_each_rows_softmax_bit_for_bit() {
        for len in [1, 5, 64] {
            for n in 1..=9 {
                let mut got = rows(n, len);
                let mut want = got.clone();
                for row in want.chunks_exact_mut(len) {
                    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                    row.iter_mut().for_each(|v| *v = activations::exp(*v - max));
                    let sum = row.iter().fold(0f32, |sum, v| sum + v);
                    row.iter_mut().for_each(|v| *v /= sum);
                }
                softmax_rows(&mut got, len);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "{n} rows of {len}");
            }
        }
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

    /// The softmax against the f64 formula on scores spread from far below the largest (weights that underflow)
    /// to ties: weights above 1e-6 within 2e-7 of their size, smaller ones within 1e-5 of theirs plus 1e-30. (With
    /// the C library's `expf` the worst were 1.1e-7 and 3.9e-6; with `activations::exp`, 1.4e-7 and 3.9e-6: the
    /// small weights' error is the f32 difference `score - max`'s.)
    #[test]
    fn softmax_is_the_f64_formula() {
        let scores: Vec<f32> = (0..300).map(|i| ((i * 7919 % 613) as f32 - 500.0) * 0.37).collect();
        let max = scores.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
        let exps: Vec<f64> = scores.iter().map(|&v| (v as f64 - max).exp()).collect();
        let total: f64 = exps.iter().sum();
        let mut got = scores.clone();
        softmax_rows(&mut got, scores.len());
        for (i, (&g, e)) in got.iter().zip(&exps).enumerate() {
            let want = e / total;
            let bound = if want > 1e-6 { 2e-7 * want } else { 1e-5 * want + 1e-30 };
            assert!((g as f64 - want).abs() <= bound, "weight {i}: {g} against {want}");
        }
    }

    /// A cache row of head `head` as f64 (an f16 cache's values widened).
    fn cache_row(view: &CacheView, head: usize, row: usize) -> Vec<f64> {
        match view {
            CacheView::F32(rows) => rows.row(head, row).iter().map(|&x| x as f64).collect(),
            CacheView::F16(rows) => rows.row(head, row).iter().map(|x| x.to_f64()).collect(),
        }
    }

    /// Attention of one decoding step in f64, by the formulas, from its prepared queries (`queries`: rotated and
    /// scaled, head after head) and the sequence's cache at `layer` as it holds its first `len` rows: per head, the
    /// scores against the keys of its key-value head over the layer's window (the last `window` rows), Gemma 2's
    /// softcap, the softmax, and the values weighted by it. Beside each value, the sum of its terms' magnitudes,
    /// which scales its rounding in f32.
    fn attention_in_f64(
        config: &ModelConfig,
        layer: usize,
        queries: &[f32],
        cache: &KvCache,
        len: usize,
    ) -> Vec<(f64, f64)> {
        let (hd, group) = (config.head_dim, config.n_heads / config.n_kv_heads);
        let first = config.layers[layer].window.map_or(0, |w| len.saturating_sub(w));
        let (keys, values) = (cache.keys(), cache.values());
        let mut out = Vec::new();
        for h in 0..config.n_heads {
            let q = &queries[h * hd..(h + 1) * hd];
            let scores: Vec<f64> = (first..len)
                .map(|j| {
                    let s: f64 = cache_row(&keys, h / group, j).iter().zip(q).map(|(k, &q)| k * q as f64).sum();
                    config.attn_softcap.map_or(s, |cap| (s / cap as f64).tanh() * cap as f64)
                })
                .collect();
            let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let total: f64 = exps.iter().sum();
            let rows: Vec<Vec<f64>> = (first..len).map(|j| cache_row(&values, h / group, j)).collect();
            for d in 0..hd {
                let terms = exps.iter().zip(&rows).map(|(e, v)| e / total * v[d]);
                out.push((terms.clone().sum(), terms.map(f64::abs).sum()));
            }
        }
        out
    }

    /// A prompt's rows attend as decoding steps at their positions would, bit for bit: `attend` on 11 rows after a
    /// first 3 (on the pass's threads and on one), against `step_row` and `attend_heads_of` row by row. On the
    /// fixtures' first and last layers, with f32 and f16 caches: the Gemmas' first layers have 4-token sliding
    /// windows, which the rows cross (Gemma 2's with its softcap); the last layers are global.
    /// The steps themselves against the formulas in f64 (`attention_in_f64`), from their prepared queries and the
    /// cache's rows: each value within 4e-6 of its terms' magnitudes.
    #[test]
    fn a_prompts_rows_attend_as_decoding_steps() {
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        for (name, cache) in ["tiny-gemma3", "tiny-gemma2", "tiny-llama"]
            .into_iter()
            .flat_map(|name| [(name, DType::F32), (name, DType::F16)])
        {
            let bytes = std::fs::read(fixtures.join(format!("{name}.gguf"))).unwrap();
            let mut reader = std::io::Cursor::new(bytes.as_slice());
            let gguf = GgufFile::read(&mut reader).unwrap();
            let options = LoadOptions { f16_cache: cache == DType::F16, ..Default::default() };
            let mut model = CpuModel::load(&gguf, &mut reader, &options).unwrap();
            let c = model.config.clone();
            let (q_dim, kv_dim, n_layers) = (c.q_dim(), c.kv_dim(), c.n_layers);
            // The first layer (the Gemmas' windowed) and the last (a global one in all three).
            assert_eq!(c.layers[0].window.is_some(), name != "tiny-llama", "{name}: the first layer's window");
            assert_eq!(c.layers[n_layers - 1].window, None, "{name}: the last layer's window");
            for layer in [0, n_layers - 1] {
                model.rope.cover(c.layers[layer].rope_base, c.head_dim, model.rope_factors.as_deref(), 14, 64);
                let values = |n: usize, d: usize, seed: usize| -> Vec<f32> {
                    (0..n * d).map(|i| (((i + seed) * 7919 % 1013) as f32 / 506.5 - 1.0) * 2.0).collect()
                };
                let (q, k, v) = (values(14, q_dim, 1), values(14, kv_dim, 2), values(14, kv_dim, 3));
                let rows = |x: &[f32], d: usize, r: std::ops::Range<usize>| x[r.start * d..r.end * d].to_vec();
                // Row by row, as decoding steps.
                let mut stepped = Sequence::new(n_layers, cache);
                let mut want = vec![0f32; 14 * q_dim];
                for (i, out) in want.chunks_exact_mut(q_dim).enumerate() {
                    let (qi, ki) = (rows(&q, q_dim, i..i + 1), rows(&k, kv_dim, i..i + 1));
                    let norms = super::qk_norms(&model.layers[layer]);
                    let step = model.step_row(layer, qi, ki, &v[i * kv_dim..(i + 1) * kv_dim], norms, &mut stepped);
                    let held = &stepped.caches[layer];
                    model.attend_heads_of(layer, 0..c.n_heads, &step.queries, held, step.len, out);
                    let reference = attention_in_f64(&c, layer, &step.queries, held, step.len);
                    for (d, (&got, (want, size))) in out.iter().zip(reference).enumerate() {
                        // The largest seen: 8.7e-7 of the terms' magnitudes (an f16 cache on tiny-gemma3).
                        assert!(
                            (got as f64 - want).abs() <= 4e-6 * size,
                            "{name}, {cache:?} cache, layer {layer}: row {i}, value {d}: {got} against {want} (terms \
                             of {size})"
                        );
                    }
                    stepped.position += 1;
                }
                for in_parallel in [true, false] {
                    let mut prompt = Sequence::new(n_layers, cache);
                    let mut got = vec![0f32; 14 * q_dim];
                    let (first, rest) = got.split_at_mut(3 * q_dim);
                    for (r, out) in [(0..3, first), (3..14, rest)] {
                        let (mut qr, mut kr) = (rows(&q, q_dim, r.clone()), rows(&k, kv_dim, r.clone()));
                        let vr = rows(&v, kv_dim, r.clone());
                        model.attend(layer, &mut qr, &mut kr, &vr, &mut prompt, in_parallel, out);
                        prompt.position += r.len();
                    }
                    let differs = got.iter().zip(&want).position(|(a, b)| a.to_bits() != b.to_bits());
                    assert_eq!(
                        differs, None,
                        "first value that differs: {name}, {cache:?} cache, layer {layer}, in parallel: {in_parallel}"
                    );
                }
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
