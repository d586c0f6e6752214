//! Batched decoding on the GPU: one-token calls of several sequences as one call of a token per sequence. Each
//! sequence keeps its own rows of the layers' caches (sequence 0 the whole context, the others `BATCH_CONTEXT`),
//! grown when a batch first needs them; the products read each weight once for all the rows, attention reads each
//! row's own cache rows, and each sequence's steering is added to its own row.

use super::call::Finish;
use super::{layer_plan, rope_table, GpuModel};
use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::gpu::context::Gpu;
use crate::gpu::kernels::{CacheForm, StepParams, TokenRow};
use crate::gpu::plan::{CallShape, LayerCache, Op};
use crate::model::{BatchCall, LogitsWanted, StepOutput};

/// Batched decoding: the most sequences one call holds, the tokens each sequence but the first may hold (sequence 0
/// keeps the whole context), and the GPU memory their caches may take, which lowers the first where the model's
/// cache rows are large. The caches grow to hold a batch's sequences when it comes.
const MAX_BATCH: usize = 16;
const BATCH_CONTEXT: usize = 1024;
const BATCH_CACHE_BYTES: usize = 256 << 20;

/// Sequences a batch may hold on `gpu` for a model whose sequence 0 holds `max_context` tokens in caches of
/// `form`: one where the device does not run batched steps.
pub(super) fn capacity(gpu: &Gpu, c: &ModelConfig, max_context: usize, form: CacheForm) -> usize {
    let sequence_bytes = 2 * c.n_layers * batch_context(max_context) * c.kv_dim() * form.bytes_per_value();
    match gpu.batches_steps {
        true => (1 + BATCH_CACHE_BYTES / sequence_bytes.max(1)).min(MAX_BATCH),
        false => 1,
    }
}

impl GpuModel {
    /// `forward_batch`: a call alone runs as `forward` does, in its own sequence's cache rows; one-token calls of
    /// several sequences whose hooks only add vectors run as one call of a token per sequence (`step_batch`);
    /// other mixes (reads, projections, prompts) run one call after the other.
    pub(super) async fn forward_calls(&mut self, calls: &[BatchCall<'_>]) -> Result<Vec<StepOutput>> {
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

    /// The cache row of sequence `sequence`'s position 0: sequence 0's rows first, then `batch_context` rows for
    /// each other sequence.
    pub(super) fn first_row(&self, sequence: usize) -> usize {
        match sequence {
            0 => 0,
            s => self.max_context + (s - 1) * batch_context(self.max_context),
        }
    }
}

/// Tokens each sequence of a batch but sequence 0 holds, for a model whose sequence 0 holds `max_context`.
pub(super) fn batch_context(max_context: usize) -> usize {
    BATCH_CONTEXT.min(max_context)
}
