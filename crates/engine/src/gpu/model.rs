//! The transformer on the GPU: the same steps as `model::cpu`, as plans of kernel dispatches built once at load
//! (`plan.rs`: pipelines, bind groups and parameter blocks are never recreated), recorded into one command encoder
//! per forward call. Only the call's size (tokens, position) is written per call; decoding reads back one token id
//! (random sampling, select.wgsl) or one largest logit per workgroup of the LM head (greedy, `pick_largest`).
//! Hooks sit between layers: reads copy h out, steering vectors and projections are dispatches of their own.

use std::io::{Read, Seek};
use std::rc::Rc;

use super::context::Gpu;
use super::kernels::*;
use super::plan::{uniform, CallShape, LayerCache, Op, Planner, RopeTable, Scratch};
use super::upload::{self, LayerWeights};
use super::weights::GpuMatrix;
use crate::config::{rope_cos_sin, ModelConfig};
use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;
use crate::hooks::{Capture, Hooks, Segment};
use crate::model::cpu::LoadOptions;
use crate::model::{
    check_request, BackendStats, BatchCall, LanguageModel, LocalBoxFuture, LogitsWanted, Picked, Readout, StepOutput,
};
use crate::sampler::Sampling;
use crate::tensors::TensorReader;

pub use super::plan::MAX_TOKENS_PER_CALL;

/// Context the KV cache is allocated for when the caller sets none (GPU memory is allocated up front).
pub const DEFAULT_GPU_CONTEXT: usize = 4096;

/// Batched decoding: the most sequences one call holds, the tokens each sequence but the first may hold (sequence 0
/// keeps the whole context), and the GPU memory their caches may take, which lowers the first where the model's
/// cache rows are large. The caches grow to hold a batch's sequences when it comes.
const MAX_BATCH: usize = 16;
const BATCH_CONTEXT: usize = 1024;
const BATCH_CACHE_BYTES: usize = 256 << 20;

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
        let sequence_bytes = 2 * n_layers * batch_context(max_context) * c.kv_dim() * kernels.cache.bytes_per_value();
        let capacity = match gpu.batches_steps {
            true => (1 + BATCH_CACHE_BYTES / sequence_bytes.max(1)).min(MAX_BATCH),
            false => 1,
        };
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

    /// The cache row of sequence `sequence`'s position 0: sequence 0's rows first, then `batch_context` rows for
    /// each other sequence.
    fn first_row(&self, sequence: usize) -> usize {
        match sequence {
            0 => 0,
            s => self.max_context + (s - 1) * batch_context(self.max_context),
        }
    }

    /// Makes the caches hold `sequences` sequences (the rows they hold kept), and the layers' plans bind them. A
    /// model that never batches keeps sequence 0's rows alone; a batch pays for the growth once.
    fn ensure_batch_caches(&mut self, sequences: usize) -> Result<()> {
        let held = self.positions.len();
        if sequences <= held {
            return Ok(());
        }
        let rows = self.first_row(sequences);
        let (gpu, c, form) = (self.gpu.clone(), &self.config, self.kernels.cache);
        let caches: Vec<LayerCache> = (0..c.n_layers).map(|_| LayerCache::new(&gpu, c, rows, form)).collect();
        let mut encoder = gpu.device.create_command_encoder(&Default::default());
        let row_bytes = c.kv_dim() * form.bytes_per_value();
        let kept = (self.first_row(held) * row_bytes) as u64;
        for (old, new) in self.caches.iter().zip(&caches) {
            encoder.copy_buffer_to_buffer(&old.k, 0, &new.k, 0, kept);
            encoder.copy_buffer_to_buffer(&old.v, 0, &new.v, 0, kept);
        }
        gpu.queue.submit([encoder.finish()]);
        let plan = self.planner();
        let table = self.folds_embedding.then_some(&*self.embedding);
        let layer_ops = (0..c.n_layers)
            .map(|i| layer_plan(&plan, &self.layers, i, table, &caches[i], rope_table(&self.rope_tables, c, i)))
            .collect::<Result<Vec<_>>>()?;
        gpu.check()?;
        self.memory += (rows - self.first_row(held)) as u64 * (2 * c.n_layers * row_bytes) as u64;
        self.layer_ops = layer_ops;
        self.caches = caches;
        self.positions.resize(sequences, 0);
        Ok(())
    }

    /// The add_vector dispatch of layer `layer`'s steering buffer, created on first use.
    fn steering_op(&mut self, layer: usize) -> &(wgpu::Buffer, Op) {
        if self.steering[layer].is_none() {
            let vector = self.gpu.storage("steering", (self.config.hidden * 4) as u64);
            let op = self.planner().steering(&vector);
            self.steering[layer] = Some((vector, op));
        }
        self.steering[layer].as_ref().expect("just created")
    }

    /// The set_projection dispatch of layer `layer`, with its direction and parameter buffers, created on first use.
    fn projection_op(&mut self, layer: usize) -> &(wgpu::Buffer, wgpu::Buffer, Op) {
        if self.projecting[layer].is_none() {
            let hidden = self.config.hidden;
            let unit = self.gpu.storage("projection direction", (hidden * 4) as u64);
            let params =
                uniform(&self.gpu, "projection", &ProjectParams { width: hidden as u32, ..Default::default() });
            let op = self.planner().projection(&unit, &params);
            self.projecting[layer] = Some((unit, params, op));
        }
        self.projecting[layer].as_ref().expect("just created")
    }

    /// `forward_batch`: a call alone runs as `forward` does, in its own sequence's cache rows; one-token calls of
    /// several sequences whose hooks only add vectors run as one call of a token per sequence (`step_batch`);
    /// other mixes (reads, projections, prompts) run one call after the other.
    async fn forward_calls(&mut self, calls: &[BatchCall<'_>]) -> Result<Vec<StepOutput>> {
        for (i, c) in calls.iter().enumerate() {
            if c.sequence >= self.capacity {
                return Err(EngineError::InvalidRequest(format!(
                    "sequence {} is beyond the {} sequences a batch holds on the GPU",
                    c.sequence, self.capacity
                )));
            }
            if calls[..i].iter().any(|d| d.sequence == c.sequence) {
                return Err(EngineError::InvalidRequest(format!("sequence {} is twice in one batch", c.sequence)));
            }
        }
        self.ensure_batch_caches(calls.iter().map(|c| c.sequence + 1).max().unwrap_or(1))?;
        if calls.len() > 1 && calls.iter().all(|c| c.tokens.len() == 1 && self.only_adds(c)) {
            return self.step_batch(calls).await;
        }
        let mut outputs = Vec::with_capacity(calls.len());
        for c in calls {
            let out = self.run(c.sequence, c.tokens, c.segment, c.hooks, Finish::Logits(LogitsWanted::Last)).await?;
            let logits = out.logits.expect("logits were asked for");
            outputs.push(StepOutput { logits, all_logits: None, captures: out.captures });
        }
        Ok(outputs)
    }

    /// Whether a one-token call's hooks do nothing but add to the residual stream (no reads, no projections).
    fn only_adds(&self, call: &BatchCall) -> bool {
        let position = self.positions.get(call.sequence).copied().unwrap_or(0);
        (0..self.config.n_layers).all(|layer| {
            call.hooks.projection(layer, call.segment).is_none()
                && call.hooks.read_offsets(layer, position, 1).is_empty()
        })
    }

    /// One-token calls of distinct sequences as one call of their tokens: the products read each weight once for
    /// all of them, attention reads each token's own cache rows (`TokenRow`), and each sequence's steering vector
    /// and per-position row are added to its own row, in the order a call alone adds them. The head computes every
    /// row's logits (`head_all`), which are read back.
    async fn step_batch(&mut self, calls: &[BatchCall<'_>]) -> Result<Vec<StepOutput>> {
        for c in calls {
            self.check_request(c.sequence, c.tokens, c.hooks)?;
        }
        let (n, hidden, vocab) = (calls.len(), self.config.hidden, self.config.vocab_size);
        let gpu = self.gpu.clone();
        let step = StepParams { tokens: n as u32, start: 0, pad: [0; 2] };
        gpu.queue.write_buffer(&self.scratch.step, 0, bytemuck::bytes_of(&step));
        let tokens: Vec<u32> = calls.iter().map(|c| c.tokens[0]).collect();
        gpu.queue.write_buffer(&self.scratch.tokens, 0, bytemuck::cast_slice(&tokens));
        let rows: Vec<TokenRow> = calls
            .iter()
            .map(|c| TokenRow { first: self.first_row(c.sequence) as u32, position: self.positions[c.sequence] as u32 })
            .collect();
        gpu.queue.write_buffer(&self.scratch.token_rows, 0, bytemuck::cast_slice(&rows));
        self.ensure_head_all(n)?;
        // Per layer: the sequences' steering vectors as rows of one addition, then their per-position rows as
        // another (zeros for the sequences without), written before the commands that read them.
        let mut used = vec![[false; 2]; self.config.n_layers];
        for (layer, used) in used.iter_mut().enumerate() {
            let vectors: Vec<Option<Vec<f32>>> = calls.iter().map(|c| c.hooks.added_vector(layer, c.segment)).collect();
            let at_positions: Vec<Option<Vec<f32>>> =
                calls.iter().map(|c| c.hooks.added_rows(layer, self.positions[c.sequence], 1, hidden)).collect();
            for (kind, rows) in [vectors, at_positions].into_iter().enumerate() {
                if rows.iter().any(Option::is_some) {
                    let mut values = vec![0f32; n * hidden];
                    for (row, added) in values.chunks_exact_mut(hidden).zip(&rows) {
                        if let Some(added) = added {
                            row.copy_from_slice(added);
                        }
                    }
                    let (buffer, _) = self.batch_addition_op(layer, kind);
                    gpu.queue.write_buffer(buffer, 0, bytemuck::cast_slice(&values));
                    used[kind] = true;
                }
            }
        }
        let hooked: Vec<bool> = used.iter().map(|u| u[0] || u[1]).collect();
        let (layer_calls, _) = self.call_shapes(n as u32, &hooked, false);
        let plain = CallShape::plain(n as u32);
        let head = self.head_all.as_ref().expect("ensured above");
        let mut encoder = gpu.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("batch") });
        {
            let mut pass = encoder.begin_compute_pass(&Default::default());
            for op in &self.embed_ops {
                op.record(&mut pass, plain);
            }
            for layer in 0..self.config.n_layers {
                for op in &self.layer_ops[layer] {
                    op.record(&mut pass, layer_calls[layer]);
                }
                for (kind, op) in self.batch_additions[layer].iter().enumerate() {
                    if let (true, Some((_, op))) = (used[layer][kind], op) {
                        op.record(&mut pass, plain);
                    }
                }
            }
            for op in &head.ops {
                op.record(&mut pass, plain);
            }
        }
        encoder.copy_buffer_to_buffer(&head.logits, 0, &head.read, 0, (n * vocab * 4) as u64);
        gpu.queue.submit([encoder.finish()]);
        for c in calls {
            self.positions[c.sequence] += 1;
        }
        self.batched_steps += 1;
        let all = gpu.read_f32(&self.head_all.as_ref().expect("ensured above").read, n * vocab).await?;
        Ok(all
            .chunks_exact(vocab)
            .map(|l| StepOutput { logits: l.to_vec(), all_logits: None, captures: Vec::new() })
            .collect())
    }

    /// Layer `layer`'s addition of a row per sequence of a batch (`kind` 0: the steering vectors, 1: the
    /// per-position rows), its buffer of `capacity` rows and its dispatch made on first use.
    fn batch_addition_op(&mut self, layer: usize, kind: usize) -> &(wgpu::Buffer, Op) {
        if self.batch_additions[layer][kind].is_none() {
            let buffer = self.gpu.storage("batch additions", (self.capacity * self.config.hidden * 4) as u64);
            let op = self.planner().row_addition(&buffer);
            self.batch_additions[layer][kind] = Some((buffer, op));
        }
        self.batch_additions[layer][kind].as_ref().expect("just created")
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

    /// Runs one call of at most MAX_TOKENS_PER_CALL tokens. `finish` says what the last call of a forward ends
    /// with; earlier calls of a long prompt end after the layers. Three steps: the inputs and the hooks' values
    /// written (`write_inputs`), the commands recorded and submitted (`record`), the outputs read (`read_outputs`).
    async fn run_call(&mut self, call: Call<'_>) -> Result<CallOutput> {
        let (start, n, finish) = (self.positions[call.sequence], call.tokens.len(), call.finish);
        let hooks = self.write_inputs(call)?;
        self.record(&hooks, n, finish);
        self.positions[call.sequence] += n;
        self.read_outputs(hooks, start, n, finish).await
    }

    /// Writes a call's inputs (its tokens, their rows and positions, the pick's settings) and the values of the
    /// hooks it runs between the layers: what `record` records and `read_outputs` reads.
    fn write_inputs(&mut self, call: Call<'_>) -> Result<CallHooks> {
        let Call { sequence, tokens, segment, hooks, reads, finish } = call;
        let n = tokens.len();
        let start = self.positions[sequence];
        let hidden = self.config.hidden;
        let gpu = self.gpu.clone();
        gpu.queue.write_buffer(
            &self.scratch.step,
            0,
            bytemuck::bytes_of(&StepParams { tokens: n as u32, start: start as u32, pad: [0; 2] }),
        );
        gpu.queue.write_buffer(&self.scratch.tokens, 0, bytemuck::cast_slice(tokens));
        let rows = TokenRow::of_call(self.first_row(sequence) as u32, start as u32, n as u32);
        gpu.queue.write_buffer(&self.scratch.token_rows, 0, bytemuck::cast_slice(&rows));
        if let Finish::Pick(sampling, step) = finish {
            let params = match sampling {
                Sampling::Greedy => SelectParams { vocab: self.config.vocab_size as u32, ..Default::default() },
                Sampling::Random { temperature, top_k, top_p, seed } => SelectParams {
                    vocab: self.config.vocab_size as u32,
                    random: 1,
                    top_k: top_k.unwrap_or(0).min(u32::MAX as usize) as u32,
                    top_p: top_p.unwrap_or(1.0),
                    temperature,
                    seed_lo: seed as u32,
                    seed_hi: (seed >> 32) as u32,
                    step,
                },
            };
            gpu.queue.write_buffer(&self.scratch.select_params, 0, bytemuck::bytes_of(&params));
        }
        if matches!(finish, Finish::Logits(LogitsWanted::All)) {
            self.ensure_head_all(n)?;
        }
        // Steering vectors for this call's segment, written before the commands that read them.
        let steered: Vec<bool> = (0..self.config.n_layers)
            .map(|layer| {
                let Some(v) = hooks.added_vector(layer, segment) else { return false };
                let (buffer, _) = self.steering_op(layer);
                gpu.queue.write_buffer(buffer, 0, bytemuck::cast_slice(&v));
                true
            })
            .collect();
        // Projections for this call's segment: direction and value written before the commands that read them.
        let projected: Vec<bool> = (0..self.config.n_layers)
            .map(|layer| {
                let Some(p) = hooks.projection(layer, segment) else { return false };
                let params = ProjectParams { width: hidden as u32, value: p.value, pad: [0; 2] };
                let (unit, params_buffer, _) = self.projection_op(layer);
                gpu.queue.write_buffer(unit, 0, bytemuck::cast_slice(&p.unit));
                gpu.queue.write_buffer(params_buffer, 0, bytemuck::bytes_of(&params));
                true
            })
            .collect();
        // Per-position additions (evaluations only): a buffer and a dispatch made for this call.
        let row_ops: Vec<Option<(wgpu::Buffer, Op)>> = (0..self.config.n_layers)
            .map(|layer| {
                let rows = hooks.added_rows(layer, start, n, hidden)?;
                let buffer = gpu.storage_with("rows", bytemuck::cast_slice(&rows));
                let op = self.planner().row_addition(&buffer);
                Some((buffer, op))
            })
            .collect();
        let captures: Vec<(usize, usize)> =
            reads.iter().filter(|r| r.1 >= start && r.1 < start + n).map(|&(layer, p)| (layer, p - start)).collect();
        let capture_read =
            (!captures.is_empty()).then(|| gpu.readback("captures", (captures.len() * hidden * 4) as u64));
        Ok(CallHooks { steered, projected, row_ops, captures, capture_read })
    }

    /// The LM head a call that ends in `finish` records: a greedy pick ends in the one that keeps its largest
    /// logits, where there is one.
    fn greedy_head(&self, finish: Finish) -> Option<&GreedyHead> {
        match finish {
            Finish::Pick(Sampling::Greedy, _) => self.greedy_head.as_ref(),
            _ => None,
        }
    }

    /// Records a call of `n` tokens in one command buffer and submits it: the embedding, each layer's dispatches
    /// and then its hooks (`call`: captures copied out of h, then the steering, the per-position additions and the
    /// projection), and the head and the copies of what `finish` reads.
    fn record(&self, call: &CallHooks, n: usize, finish: Finish) {
        let (gpu, hidden) = (&self.gpu, self.config.hidden);
        let CallHooks { steered, projected, row_ops, captures, capture_read } = call;
        let mut encoder = gpu.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("forward") });
        let t = n as u32;
        let hooked: Vec<bool> = (0..self.config.n_layers)
            .map(|l| steered[l] || row_ops[l].is_some() || projected[l] || captures.iter().any(|c| c.0 == l))
            .collect();
        let ends_in_head = matches!(finish, Finish::Pick(..) | Finish::Logits(LogitsWanted::Last));
        let greedy = self.greedy_head(finish);
        let (layer_calls, head_call) = self.call_shapes(t, &hooked, ends_in_head);
        let plain = CallShape::plain(t);
        // Passes forget the encoder's borrow so that captures can end one, copy, and begin the next.
        let mut pass = Some(encoder.begin_compute_pass(&Default::default()).forget_lifetime());
        for op in &self.embed_ops {
            op.record(pass.as_mut().unwrap(), plain);
        }
        let mut next_capture = 0;
        for layer in 0..self.config.n_layers {
            for op in &self.layer_ops[layer] {
                op.record(pass.as_mut().unwrap(), layer_calls[layer]);
            }
            // Reads see the stream before this layer's steering vector.
            if captures[next_capture..].iter().any(|c| c.0 == layer) {
                drop(pass.take());
                while next_capture < captures.len() && captures[next_capture].0 == layer {
                    let offset = captures[next_capture].1;
                    let bytes = (hidden * 4) as u64;
                    encoder.copy_buffer_to_buffer(
                        &self.scratch.h,
                        offset as u64 * bytes,
                        capture_read.as_ref().expect("made when there are captures"),
                        next_capture as u64 * bytes,
                        bytes,
                    );
                    next_capture += 1;
                }
                pass = Some(encoder.begin_compute_pass(&Default::default()).forget_lifetime());
            }
            if steered[layer] {
                let (_, op) = self.steering[layer].as_ref().expect("made by write_inputs");
                op.record(pass.as_mut().unwrap(), plain);
            }
            if let Some((_, op)) = &row_ops[layer] {
                op.record(pass.as_mut().unwrap(), plain);
            }
            if projected[layer] {
                let (_, _, op) = self.projecting[layer].as_ref().expect("made by write_inputs");
                op.record(pass.as_mut().unwrap(), plain);
            }
        }
        match finish {
            Finish::Layers => {}
            Finish::Logits(LogitsWanted::Last) | Finish::Pick(..) => {
                let head = greedy.map_or(&self.head_last, |g| &g.ops);
                for op in head {
                    op.record(pass.as_mut().unwrap(), head_call);
                }
            }
            Finish::Logits(LogitsWanted::All) => {
                for op in &self.head_all.as_ref().expect("ensured by write_inputs").ops {
                    op.record(pass.as_mut().unwrap(), plain);
                }
            }
        }
        if matches!(finish, Finish::Pick(..)) && greedy.is_none() {
            self.select_op.record(pass.as_mut().unwrap(), plain);
        }
        drop(pass);
        let vocab = self.config.vocab_size;
        match finish {
            Finish::Logits(LogitsWanted::Last) => {
                encoder.copy_buffer_to_buffer(
                    &self.scratch.logits,
                    0,
                    &self.scratch.logits_read,
                    0,
                    (vocab * 4) as u64,
                );
            }
            Finish::Logits(LogitsWanted::All) => {
                let head = self.head_all.as_ref().expect("ensured by write_inputs");
                encoder.copy_buffer_to_buffer(&head.logits, 0, &head.read, 0, (n * vocab * 4) as u64);
            }
            Finish::Pick(..) => match greedy {
                Some(g) => encoder.copy_buffer_to_buffer(&g.largest, 0, &g.largest_read, 0, (g.slots * 8) as u64),
                None => encoder.copy_buffer_to_buffer(&self.scratch.picked, 0, &self.scratch.picked_read, 0, 4),
            },
            Finish::Layers => {}
        }
        gpu.queue.submit([encoder.finish()]);
    }

    /// Reads what a call of `n` tokens from position `start` gives back once its commands ran: the captures
    /// (`call`) and what `finish` asked for.
    async fn read_outputs(&self, call: CallHooks, start: usize, n: usize, finish: Finish) -> Result<CallOutput> {
        let (gpu, hidden, vocab) = (&self.gpu, self.config.hidden, self.config.vocab_size);
        let greedy = self.greedy_head(finish);
        let CallHooks { captures, capture_read, .. } = call;
        let mut out = CallOutput::default();
        if let Some(read) = &capture_read {
            let values = gpu.read_f32(read, captures.len() * hidden).await?;
            out.captures = captures
                .iter()
                .enumerate()
                .map(|(i, &(layer, offset))| Capture {
                    layer,
                    position: start + offset,
                    values: values[i * hidden..(i + 1) * hidden].to_vec(),
                })
                .collect();
        }
        match finish {
            Finish::Logits(LogitsWanted::Last) => {
                out.logits = Some(gpu.read_f32(&self.scratch.logits_read, vocab).await?)
            }
            Finish::Logits(LogitsWanted::All) => {
                let all = gpu.read_f32(&self.head_all.as_ref().expect("ensured").read, n * vocab).await?;
                out.logits = Some(all[(n - 1) * vocab..].to_vec());
                out.all_logits = Some(all);
            }
            Finish::Pick(..) => match greedy {
                Some(g) => {
                    let bytes = gpu.read(&g.largest_read, (g.slots * 8) as u64).await?;
                    let words: Vec<u32> =
                        bytes.chunks_exact(4).map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]])).collect();
                    out.token = Some(pick_largest(&words));
                }
                None => {
                    let bytes = gpu.read(&self.scratch.picked_read, 4).await?;
                    out.token = Some(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]));
                }
            },
            Finish::Layers => gpu.check()?,
        }
        Ok(out)
    }

    /// A forward of sequence `sequence` over any number of tokens, in calls of at most MAX_TOKENS_PER_CALL.
    async fn run(
        &mut self,
        sequence: usize,
        tokens: &[u32],
        segment: Segment,
        hooks: &Hooks,
        finish: Finish,
    ) -> Result<CallOutput> {
        self.check_request(sequence, tokens, hooks)?;
        // What the read hooks want over the whole forward, as (layer, absolute position): `Last` means the last
        // token of the forward, not of each internal call.
        let start = self.positions[sequence];
        let mut reads = Vec::new();
        for layer in 0..self.config.n_layers {
            reads.extend(hooks.read_offsets(layer, start, tokens.len()).into_iter().map(|o| (layer, start + o)));
        }
        let chunks: Vec<&[u32]> = tokens.chunks(MAX_TOKENS_PER_CALL).collect();
        let mut total = CallOutput::default();
        let mut all_logits = Vec::new();
        let keep_all = matches!(finish, Finish::Logits(LogitsWanted::All));
        for (i, chunk) in chunks.iter().enumerate() {
            let last = i + 1 == chunks.len();
            let this_finish = if last || keep_all { finish } else { Finish::Layers };
            let call = Call { sequence, tokens: chunk, segment, hooks, reads: &reads, finish: this_finish };
            let out = self.run_call(call).await?;
            total.captures.extend(out.captures);
            if let Some(all) = out.all_logits {
                all_logits.extend(all);
            }
            if last {
                total.logits = out.logits;
                total.token = out.token;
            }
        }
        if keep_all {
            total.all_logits = Some(all_logits);
        }
        Ok(total)
    }
}

/// One call of a forward: at most MAX_TOKENS_PER_CALL of its tokens, what its hooks do, what the whole forward's
/// read hooks want (as (layer, absolute position)), and what the call ends with.
#[derive(Clone, Copy)]
struct Call<'a> {
    sequence: usize,
    tokens: &'a [u32],
    segment: Segment,
    hooks: &'a Hooks,
    reads: &'a [(usize, usize)],
    finish: Finish,
}

#[derive(Clone, Copy)]
enum Finish {
    /// Stop after the layers (an early chunk of a long prompt).
    Layers,
    Logits(LogitsWanted),
    Pick(Sampling, u32),
}

/// The hooks one call runs between the layers, their values written (`GpuModel::write_inputs`): per layer, whether
/// its steering vector is added, its per-position additions (a buffer and a dispatch made for the call), whether
/// its projection is set; and the captures, (layer, offset in the call) in layer order, copied out of h after their
/// layer into `capture_read`.
struct CallHooks {
    steered: Vec<bool>,
    projected: Vec<bool>,
    row_ops: Vec<Option<(wgpu::Buffer, Op)>>,
    captures: Vec<(usize, usize)>,
    capture_read: Option<wgpu::Buffer>,
}

#[derive(Default)]
struct CallOutput {
    logits: Option<Vec<f32>>,
    all_logits: Option<Vec<f32>>,
    token: Option<u32>,
    captures: Vec<Capture>,
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

/// Tokens each sequence of a batch but sequence 0 holds, for a model whose sequence 0 holds `max_context`.
fn batch_context(max_context: usize) -> usize {
    BATCH_CONTEXT.min(max_context)
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
