//! One forward call on the GPU, in three steps: its inputs and its hooks' values written (`write_inputs`), its
//! dispatches recorded into one command encoder and submitted (`record`), and what it gives back read
//! (`read_outputs`). A prompt longer than `MAX_TOKENS_PER_CALL` runs as several calls (`run`). The hooks sit
//! between the layers: reads copy h out, steering vectors and projections are dispatches of their own.

use super::{pick_largest, GpuModel, GreedyHead};
use crate::error::Result;
use crate::gpu::kernels::{ProjectParams, SelectParams, StepParams, TokenRow};
use crate::gpu::plan::{uniform, CallShape, Op, MAX_TOKENS_PER_CALL};
use crate::hooks::{Capture, Hooks, Segment};
use crate::model::LogitsWanted;
use crate::sampler::Sampling;

impl GpuModel {
    /// A forward of sequence `sequence` over any number of tokens, in calls of at most MAX_TOKENS_PER_CALL.
    pub(super) async fn run(
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
pub(super) enum Finish {
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
pub(super) struct CallOutput {
    pub(super) logits: Option<Vec<f32>>,
    pub(super) all_logits: Option<Vec<f32>>,
    pub(super) token: Option<u32>,
    pub(super) captures: Vec<Capture>,
}
