//! The transformer on the GPU: the same steps as `model::cpu`, as plans of kernel dispatches built once at load
//! (`plan.rs`: pipelines, bind groups and parameter blocks are never recreated; a layer's plan is `Planner::layer`),
//! recorded into one command encoder per forward call. Only the call's size (tokens, position) is written per call;
//! decoding reads back one token id (random sampling, select.wgsl) or one largest logit per workgroup of the LM head
//! (greedy, `pick_largest`).
//!
//! This file loads the model and answers `LanguageModel`; `call` runs one forward call (its inputs and hooks
//! written, its dispatches recorded, its outputs read), and `batch` runs several sequences' decoding steps as one.
use std::io::{Read, Seek};
use std::rc::Rc;

use super::context::Gpu;
use super::kernels::*;
use super::plan::{CallShape, LayerCache, Op, Planner, RopeTable, Scratch};
use super::upload::{self, LayerWeights};
use super::weights::GpuMatrix;
use crate::config::{rope_cos_sin, ModelConfig};
use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;
use crate::hooks::{Hooks, Segment};
use crate::model::cpu::LoadOptions;
use crate::model::{
    check_request, BackendStats, BatchCall, LanguageModel, LocalBoxFuture, LogitsWanted, Picked, Readout, StepOutput,
};
use crate::sampler::Sampling;
use crate::tensors::TensorReader;

pub use super::plan::MAX_TOKENS_PER_CALL;

mod batch;
mod call;

use batch::batch_context;
use call::Finish;

/// Context the KV cache is allocated for when the caller sets none (GPU memory is allocated up front).
pub const DEFAULT_GPU_CONTEXT: usize = 4096;

pub struct GpuModel {
    gpu: Rc<Gpu>,
    kernels: Kernels,
    config: ModelConfig,
    scratch: Scratch,
    embed_ops: Vec<Op>,
    layer_ops: Vec<Vec<Op>>,
    /// Per layer: whether one-token calls may leave its last residual add to the next product
    /// (`Planner::folds_post_norms`).
    folds: Vec<bool>,
    /// Final norm over the last token, LM head, softcap.
    head_last: Vec<Op>,
    select_op: Op,
    /// The head for greedy picks where the LM head keeps each workgroup's largest logit (no softcap), in place of
    /// `head_last` and the select dispatch.
    greedy_head: Option<GreedyHead>,
    /// What the plans bind, kept with them (the layers' plans are made again when the caches grow for a batch):
    /// each layer's KV cache and weights, the embedding, whether layer 0's product looks it up, and the RoPE
    /// tables (cos, sin) per base.
    caches: Vec<LayerCache>,
    layers: Vec<LayerWeights>,
    embedding: Rc<GpuMatrix>,
    folds_embedding: bool,
    rope_tables: Vec<(f32, wgpu::Buffer, wgpu::Buffer)>,
    /// The LM head and its norm, to build the all-positions variant on demand.
    head: HeadWeights,
    /// The unembedding's blocks and the final norm, kept on the CPU for the logit lens.
    readout: Readout,
    /// The head over every token of a call, made on demand (`ensure_head_all`).
    head_all: Option<HeadAll>,
    /// Per layer: the steering vector buffer and its `add_vector` dispatch, created on first use.
    steering: Vec<Option<(wgpu::Buffer, Op)>>,
    /// Per layer: a batch's steering vectors and per-position rows, one row per sequence (`batch_addition_op`).
    batch_additions: Vec<[Option<(wgpu::Buffer, Op)>; 2]>,
    /// Per layer: the projection's direction and parameter buffers and its `set_projection` dispatch, created on
    /// first use.
    projecting: Vec<Option<(wgpu::Buffer, wgpu::Buffer, Op)>>,
    /// Tokens in each sequence's cache (sequence 0's first; the others' once a batch has run).
    positions: Vec<usize>,
    max_context: usize,
    /// Sequences a batch may hold (`MAX_BATCH`, `BATCH_CACHE_BYTES`).
    capacity: usize,
    /// Steps `step_batch` ran (`BackendStats::batched_steps`).
    batched_steps: usize,
    /// GPU memory the model holds: what loading allocated, and the caches' growth for batches.
    memory: u64,
}

/// A head whose LM head keeps each workgroup's largest logit (matmul_largest.wgsl), from which the CPU picks the
/// token greedily (`pick_largest`).
struct GreedyHead {
    ops: Vec<Op>,
    /// `slots` pairs (the largest logit's order-preserving key, its row), and their readback.
    largest: wgpu::Buffer,
    largest_read: wgpu::Buffer,
    slots: usize,
}

/// The head over every token of calls of up to `tokens` tokens (all-positions logits, and a batch's rows): its
/// dispatches, the logits and their readback.
struct HeadAll {
    tokens: usize,
    ops: Vec<Op>,
    logits: wgpu::Buffer,
    read: wgpu::Buffer,
}

/// What the all-positions LM head needs.
struct HeadWeights {
    final_norm: wgpu::Buffer,
    lm_head: Rc<GpuMatrix>,
}

impl GpuModel {
    /// Loads the model from `reader` onto `gpu` (a GGUF whose header is `gguf`).
    pub fn load<R: Read + Seek>(gpu: Rc<Gpu>, gguf: &GgufFile, reader: &mut R, options: &LoadOptions) -> Result<Self> {
        Self::load_with_progress(gpu, gguf, reader, options, |_, _| {})
    }

    pub fn load_with_progress<R: Read + Seek>(
        gpu: Rc<Gpu>,
        gguf: &GgufFile,
        reader: &mut R,
        options: &LoadOptions,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Self> {
        let config = ModelConfig::from_gguf(gguf)?;
        let c = &config;
        let allocated_before = gpu.allocated();
        if options.int8_activations {
            return Err(EngineError::InvalidRequest(
                "8-bit activations are a CPU mode; the GPU path computes exact products".into(),
            ));
        }
        if c.head_dim > 256 || c.head_dim % 2 != 0 {
            return Err(EngineError::Gpu(format!(
                "head size {} is not supported on the GPU (at most 256)",
                c.head_dim
            )));
        }
        let max_context = options.max_context.unwrap_or(DEFAULT_GPU_CONTEXT).min(c.context_length).max(1);
        let total_parts = c.n_layers + 2;

        progress(0, total_parts);
        let mut ld = TensorReader { gguf, reader };
        let embedding_type: Vec<_> =
            gguf.tensors().iter().filter(|t| t.name == "token_embd.weight").map(|t| t.dtype).collect();
        let kernels = Kernels::with_cache(&gpu, &embedding_type, CacheForm::on(&gpu, options.f16_cache))?;
        let (embedding, embedding_cpu) = upload::matrix_kept(&gpu, ld.embedding(c)?)?;
        let embedding = Rc::new(embedding);
        progress(1, total_parts);
        let scratch = Scratch::new(&gpu, c);
        let plan = Planner { gpu: &gpu, kernels: &kernels, config: c, scratch: &scratch };

        // RoPE tables per distinct base, for every position of the context (computed in f64 like the CPU path).
        let rope_factors = ld.rope_factors(c)?;
        let mut rope_tables: Vec<(f32, wgpu::Buffer, wgpu::Buffer)> = Vec::new();
        for layer in &c.layers {
            if rope_tables.iter().any(|r| r.0 == layer.rope_base) {
                continue;
            }
            let (cos, sin) = rope_cos_sin(c.head_dim, layer.rope_base, rope_factors.as_deref(), 0..max_context);
            rope_tables.push((
                layer.rope_base,
                gpu.storage_with("rope cos", bytemuck::cast_slice(&cos)),
                gpu.storage_with("rope sin", bytemuck::cast_slice(&sin)),
            ));
        }

        let (mut caches, mut layers, mut layer_ops) = (Vec::new(), Vec::new(), Vec::new());
        let mut folds_embedding = false;
        for i in 0..c.n_layers {
            let weights = upload::layer(&gpu, ld.layer(c, i)?)?;
            let cache = LayerCache::new(&gpu, c, max_context, kernels.cache);
            if i == 0 {
                folds_embedding = plan.folds_embedding(&embedding, &weights);
            }
            layers.push(weights);
            let (table, rope) = (folds_embedding.then_some(&*embedding), rope_table(&rope_tables, c, i));
            layer_ops.push(layer_plan(&plan, &layers, i, table, &cache, rope)?);
            caches.push(cache);
            progress(i + 2, total_parts);
        }

        let embed_ops = plan.embedding(&embedding, folds_embedding);
        let final_norm_values = ld.final_norm(c)?;
        let final_norm = gpu.storage_with("output_norm.weight", bytemuck::cast_slice(&final_norm_values));
        let (lm_head, unembedding) = match ld.output(c)? {
            Some(output) => {
                let (m, cpu) = upload::matrix_kept(&gpu, output)?;
                (Rc::new(m), cpu)
            }
            None => (embedding.clone(), embedding_cpu),
        };
        let readout = Readout { unembedding, final_norm: final_norm_values };
        let pending = pending_post_norm(&plan, layers.last());
        let head_last = plan.head(&final_norm, &lm_head, &scratch.logits, true, pending, None)?;
        let greedy_head = match c.final_softcap {
            Some(_) => None,
            None => {
                let slots = plan.largest_slots(&lm_head);
                let largest = gpu.storage("largest logits", (slots * 8) as u64);
                let ops = plan.head(&final_norm, &lm_head, &scratch.logits, true, pending, Some(&largest))?;
                let largest_read = gpu.readback("largest logits read", (slots * 8) as u64);
                Some(GreedyHead { ops, largest, largest_read, slots })
            }
        };
        let folds = layers.iter().map(|w| plan.folds_post_norms(w)).collect();
        let select_op = plan.selection();
        progress(total_parts, total_parts);
        gpu.check()?;
        let n_layers = c.n_layers;
        let capacity = batch::capacity(&gpu, c, max_context, kernels.cache);
        Ok(Self {
            kernels,
            embed_ops,
            layer_ops,
            folds,
            head_last,
            select_op,
            greedy_head,
            caches,
            layers,
            embedding,
            folds_embedding,
            rope_tables,
            head: HeadWeights { final_norm, lm_head },
            readout,
            head_all: None,
            steering: (0..n_layers).map(|_| None).collect(),
            batch_additions: (0..n_layers).map(|_| [None, None]).collect(),
            projecting: (0..n_layers).map(|_| None).collect(),
            scratch,
            positions: vec![0],
            max_context,
            capacity,
            batched_steps: 0,
            memory: gpu.allocated() - allocated_before,
            config,
            gpu,
        })
    }

    /// The planner of this model's dispatches.
    fn planner(&self) -> Planner<'_> {
        Planner { gpu: &self.gpu, kernels: &self.kernels, config: &self.config, scratch: &self.scratch }
    }

    pub fn gpu(&self) -> &Rc<Gpu> {
        &self.gpu
    }

    /// Where the time of one forward call of `tokens` tokens goes (at the current position): every dispatch in a
    /// submission of its own, waited for and timed, summed per kernel. Slower than a real call (each dispatch
    /// pays a submission), but it shows which kernels dominate. Native only (the browser cannot block).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn profile_call(&mut self, tokens: &[u32]) -> Result<Vec<(String, f64, usize)>> {
        use std::time::Instant;
        self.check_request(0, tokens, &Hooks::none())?;
        let t = tokens.len().min(MAX_TOKENS_PER_CALL);
        let gpu = self.gpu.clone();
        let step = StepParams { tokens: t as u32, start: self.positions[0] as u32, pad: [0; 2] };
        gpu.queue.write_buffer(&self.scratch.step, 0, bytemuck::bytes_of(&step));
        gpu.queue.write_buffer(&self.scratch.tokens, 0, bytemuck::cast_slice(&tokens[..t]));
        let rows = TokenRow::of_call(0, self.positions[0] as u32, t as u32);
        gpu.queue.write_buffer(&self.scratch.token_rows, 0, bytemuck::cast_slice(&rows));
        let wait = || gpu.device.poll(wgpu::PollType::wait_indefinitely()).map(|_| ());
        let mut totals: Vec<(String, f64, usize)> = Vec::new();
        for (op, call) in self.ops_of_a_call(t as u32) {
            wait().map_err(|e| EngineError::GpuLost(e.to_string()))?;
            let start = Instant::now();
            let mut encoder = gpu.device.create_command_encoder(&Default::default());
            op.record(&mut encoder.begin_compute_pass(&Default::default()), call);
            gpu.queue.submit([encoder.finish()]);
            wait().map_err(|e| EngineError::GpuLost(e.to_string()))?;
            let ms = start.elapsed().as_secs_f64() * 1000.0;
            match totals.iter_mut().find(|e| e.0 == op.name) {
                Some(entry) => {
                    entry.1 += ms;
                    entry.2 += 1;
                }
                None => totals.push((op.name.clone(), ms, 1)),
            }
        }
        gpu.check()?;
        totals.sort_by(|a, b| b.1.total_cmp(&a.1));
        Ok(totals)
    }

    /// The shape of each layer's part of a call of `tokens` tokens, and of the head's: one-token calls that end in
    /// the head leave a layer's last residual add to the next product where the layer folds its post-norms and no
    /// hook (`hooked`, per layer) reads or changes h after it.
    fn call_shapes(&self, tokens: u32, hooked: &[bool], head: bool) -> (Vec<CallShape>, CallShape) {
        let n = self.folds.len();
        let leaves = |i: usize| tokens == 1 && self.folds[i] && !hooked[i] && (i + 1 < n || head);
        let layers =
            (0..n).map(|i| CallShape { tokens, pending: i > 0 && leaves(i - 1), leaves_pending: leaves(i) }).collect();
        (layers, CallShape { tokens, pending: n > 0 && leaves(n - 1), leaves_pending: false })
    }

    /// The dispatches a call of `tokens` tokens without hooks runs, through a greedy token selection, with each
    /// one's call shape.
    fn ops_of_a_call(&self, tokens: u32) -> Vec<(&Op, CallShape)> {
        let (layers, head) = self.call_shapes(tokens, &vec![false; self.folds.len()], true);
        let plain = CallShape::plain(tokens);
        let embed = self.embed_ops.iter().map(|op| (op, plain));
        let layer_ops = self.layer_ops.iter().zip(layers).flat_map(|(ops, call)| ops.iter().map(move |op| (op, call)));
        let head_ops: Vec<&Op> = match &self.greedy_head {
            Some(greedy) => greedy.ops.iter().collect(),
            None => self.head_last.iter().chain([&self.select_op]).collect(),
        };
        let head_ops = head_ops.into_iter().map(|op| (op, head));
        embed.chain(layer_ops).chain(head_ops).filter(|(op, call)| op.runs_for(*call)).collect()
    }

    fn check_request(&self, sequence: usize, tokens: &[u32], hooks: &Hooks) -> Result<()> {
        self.gpu.check()?;
        let position = self.positions.get(sequence).copied().unwrap_or(0);
        check_request(&self.config, position, self.sequence_context(sequence), tokens, hooks)
    }

    /// Makes sure the all-positions head exists for calls of `tokens` tokens.
    fn ensure_head_all(&mut self, tokens: usize) -> Result<()> {
        if self.head_all.as_ref().is_some_and(|h| h.tokens >= tokens) {
            return Ok(());
        }
        let bytes = (tokens * self.config.vocab_size * 4) as u64;
        let logits = self.gpu.storage("all logits", bytes);
        let ops = self.planner().head(&self.head.final_norm, &self.head.lm_head, &logits, false, None, None)?;
        let read = self.gpu.readback("all logits read", bytes);
        self.head_all = Some(HeadAll { tokens, ops, logits, read });
        Ok(())
    }
}

impl LanguageModel for GpuModel {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn position(&self) -> usize {
        self.positions[0]
    }

    fn max_context(&self) -> usize {
        self.max_context
    }

    fn reset(&mut self) {
        self.positions[0] = 0;
    }

    fn batch_capacity(&self) -> usize {
        self.capacity
    }

    fn sequence_context(&self, sequence: usize) -> usize {
        if sequence == 0 {
            self.max_context
        } else {
            batch_context(self.max_context)
        }
    }

    fn reset_sequence(&mut self, sequence: usize) {
        if let Some(p) = self.positions.get_mut(sequence) {
            *p = 0;
        }
    }

    fn sequence_position(&self, sequence: usize) -> usize {
        self.positions.get(sequence).copied().unwrap_or(0)
    }

    fn forward_batch<'a>(&'a mut self, calls: &'a [BatchCall<'a>]) -> LocalBoxFuture<'a, Result<Vec<StepOutput>>> {
        Box::pin(self.forward_calls(calls))
    }

    fn readout(&self) -> Option<Readout> {
        Some(self.readout.clone())
    }

    fn backend_name(&self) -> String {
        match self.kernels.cache {
            CacheForm::F32 => format!("wgpu: {}", self.gpu.describe()),
            CacheForm::F16 => format!("wgpu: {}, f16 cache", self.gpu.describe()),
            CacheForm::PackedF16 => format!("wgpu: {}, f16 cache packed in u32 words", self.gpu.describe()),
        }
    }

    #[cfg(not(target_arch = "wasm32"))]
    fn profile(&mut self, tokens: &[u32]) -> Option<Result<Vec<(String, f64, usize)>>> {
        Some(self.profile_call(tokens))
    }

    fn stats(&self) -> BackendStats {
        let per_token = self.ops_of_a_call(1).len();
        BackendStats {
            gpu_memory_bytes: Some(self.memory),
            dispatches_per_token: Some(per_token),
            batched_steps: Some(self.batched_steps),
        }
    }

    fn forward<'a>(
        &'a mut self,
        tokens: &'a [u32],
        segment: Segment,
        hooks: &'a Hooks,
        logits: LogitsWanted,
    ) -> LocalBoxFuture<'a, Result<StepOutput>> {
        Box::pin(async move {
            let out = self.run(0, tokens, segment, hooks, Finish::Logits(logits)).await?;
            Ok(StepOutput {
                logits: out.logits.expect("logits were asked for"),
                all_logits: out.all_logits,
                captures: out.captures,
            })
        })
    }

    fn forward_pick<'a>(
        &'a mut self,
        tokens: &'a [u32],
        segment: Segment,
        hooks: &'a Hooks,
        sampling: Sampling,
        step: u32,
    ) -> LocalBoxFuture<'a, Result<Picked>> {
        Box::pin(async move {
            let out = self.run(0, tokens, segment, hooks, Finish::Pick(sampling, step)).await?;
            Ok(Picked { token: out.token.expect("a token was picked"), captures: out.captures, logits: None })
        })
    }
}

/// The greedy pick from an LM head's largest logits per workgroup (`pairs`: a logit's order-preserving key, then
/// its row; see matmul_largest.wgsl): the largest, the first row among equals, 0 where none is above -inf, as
/// `sampler::argmax` picks from the whole row.
pub fn pick_largest(pairs: &[u32]) -> u32 {
    /// The key of -inf; NaN's is 0.
    const MINUS_INFINITY: u32 = !0xff80_0000;
    let mut best = (0, u32::MAX);
    for pair in pairs.chunks_exact(2) {
        let (key, row) = (pair[0], pair[1]);
        if key > best.0 || (key == best.0 && row < best.1) {
            best = (key, row);
        }
    }
    if best.0 <= MINUS_INFINITY {
        0
    } else {
        best.1
    }
}

/// The post-MLP norm's weights of the layer before (`previous`) where one-token calls may leave its residual add
/// to the next product.
fn pending_post_norm<'a>(plan: &Planner, previous: Option<&'a LayerWeights>) -> Option<&'a wgpu::Buffer> {
    previous.filter(|w| plan.folds_post_norms(w)).and_then(|w| w.post_ffn_norm.as_ref())
}

/// Layer i's plan over `cache`. `layers` holds layers 0 to i at least: the one before says whether one-token
/// calls leave its last residual add pending. `embedding`: the table layer 0's product looks tokens up in, where it
/// does.
fn layer_plan(
    plan: &Planner,
    layers: &[LayerWeights],
    i: usize,
    embedding: Option<&GpuMatrix>,
    cache: &LayerCache,
    rope: RopeTable,
) -> Result<Vec<Op>> {
    let pending = pending_post_norm(plan, i.checked_sub(1).map(|p| &layers[p]));
    plan.layer(i, &layers[i], pending, embedding.filter(|_| i == 0), cache, rope)
}

/// The RoPE table of layer i's base.
fn rope_table<'a>(tables: &'a [(f32, wgpu::Buffer, wgpu::Buffer)], c: &ModelConfig, i: usize) -> RopeTable<'a> {
    let (_, cos, sin) = tables.iter().find(|r| r.0 == c.layers[i].rope_base).expect("a table per base");
    RopeTable { cos, sin }
}
