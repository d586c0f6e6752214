//! How a forward pass becomes dispatches: the buffers every call shares (`Scratch`), one prepared dispatch (`Op`),
//! and the plans of the model's parts (the embedding, a layer, the head), built once at load by a `Planner` from
//! the model's description (`ModelConfig`) and its weights on the GPU. `model.rs` records them per call.
//!
//! Steps that follow one another share a dispatch where a kernel can take the next step in its prologue or
//! epilogue. A layer (Gemma-only steps marked; [1] marks what a one-token call, a decoding step, fuses further):
//!   a = norm h | qkv = a [Wq; Wk; Wv] (one product per run of equal weight types)
//!     [1: the products take the norm themselves; the first layer's also look the token's embedding up where
//!      the table is in one buffer and the layer does not fold Gemma's post-norms (SmolLM2)] |
//!   heads: q_norm/k_norm (Gemma 3), RoPE, q -> Q, k -> K[pos], v -> V[pos] | attention -> attn
//!     [1: one dispatch, attend_step] |
//!   Llama: h += attn Wo; a = norm h      Gemma: o = attn Wo; h += post_norm(o); a = norm h (one dispatch) |
//!     [1, Gemma: the gate|up products take the add and the norm] |
//!   g = act(a Wg) * (a Wu) (one product over the stacked gate and up rows) [1, Llama: the product takes the norm] |
//!   Llama: h += g Wd                     Gemma: o = g Wd; h += post_norm(o)
//!     [1, Gemma, no hook after the layer: the next layer's q|k|v products, or the LM head, take the add]
//! then the hooks on h. The head's final norm goes into the LM head the same way. A Gemma product that takes a
//! residual add cannot write the sum where the other workgroups read h, so one-token calls keep h in two buffers:
//! the q|k|v products write it to `Scratch::h_sum`, the gate|up products back to `h`. While decoding, SmolLM2 takes
//! 5 dispatches a layer, Gemma 3 5 or 6 (its q|k|v weights are of one or two types).

use bytemuck::Pod;

use super::context::Gpu;
use super::kernels::*;
use super::upload::{GateUp, LayerWeights};
use super::weights::GpuMatrix;
use crate::config::{Activation, ModelConfig, RopeLayout};
use crate::error::{EngineError, Result};

/// Tokens one command buffer processes; longer prompts go through in several calls.
pub const MAX_TOKENS_PER_CALL: usize = 128;

/// How many workgroups a dispatch needs, from the number of tokens in the call.
#[derive(Clone, Copy)]
pub(super) enum Grid {
    /// A matrix product over `rows` output rows (`per_group` per workgroup); `last_only` uses only the last token.
    Matmul { rows: u32, per_group: u32, last_only: bool },
    /// One workgroup per row: `per_token` rows per token, or only the last token's when `last_only`.
    Rows { per_token: u32, last_only: bool },
    /// One thread per value: `per_token` values per token, 64 threads per workgroup.
    Threads { per_token: u32 },
    /// Attention: one workgroup per (head, token).
    Attention { heads: u32 },
    /// A single workgroup.
    One,
}

impl Grid {
    /// (workgroup counts, whether the matrix product takes its tiled variant)
    fn size(self, tokens: u32) -> ([u32; 3], bool) {
        match self {
            Grid::Matmul { rows, per_group, last_only } => {
                let inputs = if last_only { 1 } else { tokens };
                let tiled = inputs > 1;
                let tile = if tiled { PREFILL_TILE } else { 1 };
                let (x, y) = split_groups(rows.div_ceil(per_group));
                ([x, y, inputs.div_ceil(tile)], tiled)
            }
            Grid::Rows { per_token, last_only } => {
                ([if last_only { per_token } else { per_token * tokens }, 1, 1], false)
            }
            Grid::Threads { per_token } => {
                let (x, y) = split_groups((per_token * tokens).div_ceil(64));
                ([x, y, 1], false)
            }
            Grid::Attention { heads } => ([heads, tokens, 1], false),
            Grid::One => ([1, 1, 1], false),
        }
    }
}

/// What a matrix product reads.
#[derive(Clone, Copy)]
pub(super) enum Input<'a> {
    /// Rows of a buffer as they are.
    Plain(&'a wgpu::Buffer),
    /// The RMSNorm with `weights` of the rows of `x`: `normed`, written by the dispatch `Planner::input_norm`
    /// returns, for calls of several tokens; taken inside the product in one-token calls.
    Normalized { x: &'a wgpu::Buffer, weights: &'a wgpu::Buffer, normed: &'a wgpu::Buffer },
}

/// What a product that takes Gemma's residual add and the next norm itself (matmul_input_add_norm.wgsl) reads
/// besides its input rows x: `norm(x + post_norm(added))` with the norm's `weights`, or `norm(x)` without `added`;
/// the sum goes to `sum`.
#[derive(Clone, Copy)]
pub(super) struct AddNormInput<'a> {
    pub weights: &'a wgpu::Buffer,
    /// The output to add and its post-norm's weights.
    pub added: Option<(&'a wgpu::Buffer, &'a wgpu::Buffer)>,
    pub sum: &'a wgpu::Buffer,
}

/// What a product's dispatch does with its input before the product.
#[derive(Clone, Copy)]
enum Prologue<'a> {
    None,
    /// The RMSNorm with these weights.
    Norm(&'a wgpu::Buffer),
    /// `AddNormInput`, and whether the first dispatch writes the sum.
    AddNorm(AddNormInput<'a>, bool),
    /// The RMSNorm with these weights of the call's tokens' rows of the embedding `table`, and whether the first
    /// dispatch writes them into h.
    EmbedNorm {
        weights: &'a wgpu::Buffer,
        table: &'a GpuMatrix,
        writes_h: bool,
    },
}

/// Which calls a dispatch belongs to: some steps have a fused form for one-token calls (decoding).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Calls {
    All,
    OneToken,
    SeveralTokens,
    /// One-token calls in which the layer before left its last residual add pending (`CallShape::pending`).
    OneTokenPending,
    /// One-token calls in which it did not.
    OneTokenSettled,
    /// Calls that do not leave this layer's last residual add to the next product.
    UnlessLeftPending,
}

/// What the recorder knows of a call where a step has several forms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct CallShape {
    pub tokens: u32,
    /// Gemma's residual add after the layer before (h += post_ffn_norm(o)) waits in `Scratch::o` for the first
    /// product of this layer, or of the head, to take it: a one-token call with no hook after that layer.
    pub pending: bool,
    /// This layer leaves its own last residual add pending so.
    pub leaves_pending: bool,
}

impl CallShape {
    /// A call of `tokens` tokens with nothing pending.
    pub fn plain(tokens: u32) -> Self {
        Self { tokens, pending: false, leaves_pending: false }
    }
}

/// One prepared dispatch.
pub(super) struct Op {
    /// The kernel's name, for profiles (native only).
    #[cfg_attr(target_arch = "wasm32", allow(dead_code))]
    pub name: String,
    pipeline: wgpu::ComputePipeline,
    /// The tiled variant of a matrix product.
    tiled: Option<wgpu::ComputePipeline>,
    bind: wgpu::BindGroup,
    grid: Grid,
    calls: Calls,
    /// Kept alive for the bind group.
    _params: Option<wgpu::Buffer>,
}

impl Op {
    /// Whether a call of this shape runs this dispatch.
    pub fn runs_for(&self, call: CallShape) -> bool {
        let one = call.tokens == 1;
        match self.calls {
            Calls::All => true,
            Calls::OneToken => one,
            Calls::SeveralTokens => !one,
            Calls::OneTokenPending => one && call.pending,
            Calls::OneTokenSettled => one && !call.pending,
            Calls::UnlessLeftPending => !call.leaves_pending,
        }
    }

    /// The same dispatch, for `calls` only.
    fn only_for(self, calls: Calls) -> Self {
        Self { calls, ..self }
    }

    /// Records the dispatch into `pass` if a call of this shape runs it.
    pub fn record(&self, pass: &mut wgpu::ComputePass, call: CallShape) {
        if !self.runs_for(call) {
            return;
        }
        let (size, tiled) = self.grid.size(call.tokens);
        let pipeline = if tiled { self.tiled.as_ref().unwrap_or(&self.pipeline) } else { &self.pipeline };
        pass.set_pipeline(pipeline);
        pass.set_bind_group(0, &self.bind, &[]);
        pass.dispatch_workgroups(size[0], size[1], size[2]);
    }
}

/// Buffers every call reuses.
pub(super) struct Scratch {
    pub step: wgpu::Buffer,
    pub tokens: wgpu::Buffer,
    /// Where each token of the call stands in the KV cache (`TokenRow`s), which attention reads.
    pub token_rows: wgpu::Buffer,
    pub h: wgpu::Buffer,
    /// The residual stream's second buffer in one-token calls of models whose post-norms fold into the products
    /// (`Planner::folds_post_norms`): a layer's q|k|v product writes h there, and its gate|up product writes it
    /// back into `h`.
    pub h_sum: wgpu::Buffer,
    pub a: wgpu::Buffer,
    /// The fused q|k|v product's output, per token.
    pub qkv: wgpu::Buffer,
    pub q: wgpu::Buffer,
    pub attn: wgpu::Buffer,
    pub o: wgpu::Buffer,
    pub g: wgpu::Buffer,
    pub u: wgpu::Buffer,
    pub logits: wgpu::Buffer,
    pub picked: wgpu::Buffer,
    pub select_params: wgpu::Buffer,
    pub logits_read: wgpu::Buffer,
    pub picked_read: wgpu::Buffer,
    /// Bound where a layer has no q and k norms (the heads kernel does not read it then).
    pub no_norms: wgpu::Buffer,
}

impl Scratch {
    pub fn new(gpu: &Gpu, c: &ModelConfig) -> Self {
        let t = MAX_TOKENS_PER_CALL as u64;
        let f = 4u64;
        Self {
            step: gpu.uniform_with("step", bytemuck::bytes_of(&StepParams::default())),
            tokens: gpu.storage("tokens", t * 4),
            token_rows: gpu.storage("token rows", t * std::mem::size_of::<TokenRow>() as u64),
            h: gpu.storage("h", t * c.hidden as u64 * f),
            h_sum: gpu.storage("h sum", c.hidden as u64 * f),
            a: gpu.storage("a", t * c.hidden as u64 * f),
            qkv: gpu.storage("qkv", t * (c.q_dim() + 2 * c.kv_dim()) as u64 * f),
            q: gpu.storage("q", t * c.q_dim() as u64 * f),
            attn: gpu.storage("attn", t * c.q_dim() as u64 * f),
            o: gpu.storage("o", t * c.hidden as u64 * f),
            g: gpu.storage("g", t * c.ffn_hidden as u64 * f),
            u: gpu.storage("u", t * c.ffn_hidden as u64 * f),
            logits: gpu.storage("logits", c.vocab_size as u64 * f),
            picked: gpu.storage("picked", 4),
            select_params: uniform(gpu, "select", &SelectParams::default()),
            logits_read: gpu.readback("logits read", c.vocab_size as u64 * f),
            picked_read: gpu.readback("picked read", 4),
            no_norms: gpu.storage("no q/k norms", 16),
        }
    }
}

/// One layer's KV cache, allocated for the whole context.
pub(super) struct LayerCache {
    pub k: wgpu::Buffer,
    pub v: wgpu::Buffer,
}

impl LayerCache {
    pub fn new(gpu: &Gpu, c: &ModelConfig, context: usize, form: CacheForm) -> Self {
        let bytes = (context * c.kv_dim() * form.bytes_per_value()) as u64;
        Self { k: gpu.storage("k cache", bytes), v: gpu.storage("v cache", bytes) }
    }
}

/// A layer's RoPE table (cos, sin for every position of the context), shared by the layers of one base.
pub(super) struct RopeTable<'a> {
    pub cos: &'a wgpu::Buffer,
    pub sin: &'a wgpu::Buffer,
}

/// Where a matrix product writes: input row t's outputs start at `(t + S.start if at_position) * stride + col`.
#[derive(Clone, Copy)]
pub(super) struct Output<'a> {
    stride: usize,
    col: usize,
    /// Rows at the call's positions (the KV cache), not from 0.
    at_position: bool,
    /// Only the last input row (the LM head while generating).
    last_only: bool,
    /// Where an `Epilogue::StoreKeepingLargest` product keeps each workgroup's largest sum (`largest_slots` pairs).
    largest: Option<&'a wgpu::Buffer>,
}

impl Output<'_> {
    /// Output rows of `stride` values from column 0, one per input row.
    fn rows(stride: usize) -> Self {
        Self { stride, col: 0, at_position: false, last_only: false, largest: None }
    }
}

pub(super) fn uniform<T: Pod>(gpu: &Gpu, label: &str, value: &T) -> wgpu::Buffer {
    gpu.uniform_with(label, bytemuck::bytes_of(value))
}

/// Builds the plans of one model on one device.
pub(super) struct Planner<'a> {
    pub gpu: &'a Gpu,
    pub kernels: &'a Kernels,
    pub config: &'a ModelConfig,
    pub scratch: &'a Scratch,
}

impl Planner<'_> {
    /// A dispatch of `kernel` over `buffers`, then its parameters (if any) and the per-call step block.
    pub fn op(&self, kernel: &Kernel, buffers: &[&wgpu::Buffer], params: Option<wgpu::Buffer>, grid: Grid) -> Op {
        let mut all: Vec<&wgpu::Buffer> = buffers.to_vec();
        all.extend(&params);
        all.push(&self.scratch.step);
        Op {
            name: kernel.name.clone(),
            pipeline: kernel.pipeline().clone(),
            tiled: None,
            bind: kernel.bind(self.gpu, &all),
            grid,
            calls: Calls::All,
            _params: params,
        }
    }

    /// The dispatches of one matrix product `y = epilogue(m x)`, one per buffer of `m`'s rows. `label` prefixes
    /// the kernel's name in profiles. A normalized input gives two sets: the product of the norm's output for
    /// calls of several tokens, and, for one-token calls, products that take the norm themselves (see
    /// `input_norm`), where the row fits.
    pub fn product(
        &self,
        m: &GpuMatrix,
        input: Input,
        y: &wgpu::Buffer,
        out: Output,
        epilogue: Epilogue,
        label: &str,
    ) -> Result<Vec<Op>> {
        match input {
            Input::Plain(x) => self.product_of(m, x, Prologue::None, y, out, epilogue, label),
            Input::Normalized { x, weights, normed } => {
                let plain = self.product_of(m, normed, Prologue::None, y, out, epilogue, label)?;
                if !self.fuses_norms(m.cols) {
                    return Ok(plain);
                }
                let fused = self.product_of(m, x, Prologue::Norm(weights), y, out, epilogue, label)?;
                let plain = plain.into_iter().map(|op| op.only_for(Calls::SeveralTokens));
                Ok(plain.chain(fused.into_iter().map(|op| op.only_for(Calls::OneToken))).collect())
            }
        }
    }

    /// The RMSNorm of h (the last row only with `last_only`) with `weights` into `normed`, for products that read
    /// `Input::Normalized`; one-token calls skip it where those products take the norm themselves.
    pub fn input_norm(&self, weights: &wgpu::Buffer, normed: &wgpu::Buffer, last_only: bool) -> Op {
        let s = self.scratch;
        let grid = Grid::Rows { per_token: 1, last_only };
        let op = self.op(&self.kernels.norm, &[&s.h, normed, weights], Some(self.norm_params(last_only)), grid);
        if self.fuses_norms(self.config.hidden) {
            op.only_for(Calls::SeveralTokens)
        } else {
            op
        }
    }

    /// Whether one-token calls take the input norms inside products of `cols`-wide inputs.
    fn fuses_norms(&self, cols: usize) -> bool {
        cols == self.config.hidden && cols <= MAX_NORMALIZED_COLS
    }

    /// Whether one-token calls fold layer `w`'s post-norms and residual adds into the products that follow them:
    /// the layer has Gemma's two post-norms and its products can normalize rows of its width.
    pub fn folds_post_norms(&self, w: &LayerWeights) -> bool {
        w.post_attention_norm.is_some() && w.post_ffn_norm.is_some() && self.fuses_norms(self.config.hidden)
    }

    /// Whether one-token calls look the token's row of the embedding `table` up inside the first layer's q|k|v
    /// products (`first`: that layer's weights), leaving the embedding dispatch to calls of several tokens: where
    /// those products take their input norm themselves and the table is in one buffer. Not where the first layer
    /// folds Gemma's post-norms: its products take matmul_input_add_norm.wgsl's input instead.
    pub fn folds_embedding(&self, table: &GpuMatrix, first: &LayerWeights) -> bool {
        table.parts.len() == 1 && !self.folds_post_norms(first) && self.fuses_norms(self.config.hidden)
    }

    /// The first layer's product `m` of its normalized input (norm `weights`): for calls of several tokens, of the
    /// norm's output; for one-token calls, a product that looks the token's row up in `table` and normalizes it
    /// itself, the first of the layer's products (`writes_h`) also storing the row in h.
    #[allow(clippy::too_many_arguments)]
    fn embedding_product(
        &self,
        m: &GpuMatrix,
        table: &GpuMatrix,
        weights: &wgpu::Buffer,
        writes_h: bool,
        y: &wgpu::Buffer,
        out: Output,
        epilogue: Epilogue,
    ) -> Result<Vec<Op>> {
        let s = self.scratch;
        let plain = self.product_of(m, &s.a, Prologue::None, y, out, epilogue, "")?;
        let prologue = Prologue::EmbedNorm { weights, table, writes_h };
        let looked_up = self.product_of(m, &s.h, prologue, y, out, epilogue, "")?;
        let plain = plain.into_iter().map(|op| op.only_for(Calls::SeveralTokens));
        Ok(plain.chain(looked_up.into_iter().map(|op| op.only_for(Calls::OneToken))).collect())
    }

    /// The product of a normalized input: for calls of several tokens, of the norm's output `normed`; for one-token
    /// calls, one product per form in `one_token` (which calls run it, and the output to add with its post-norm's
    /// weights, if any) that takes the add and the norm itself (`AddNormInput`, `x` to `sum`).
    #[allow(clippy::too_many_arguments)]
    fn folding_product(
        &self,
        m: &GpuMatrix,
        (x, weights, normed, sum): (&wgpu::Buffer, &wgpu::Buffer, &wgpu::Buffer, &wgpu::Buffer),
        one_token: &[(Calls, Option<(&wgpu::Buffer, &wgpu::Buffer)>)],
        write_sum: bool,
        y: &wgpu::Buffer,
        out: Output,
        epilogue: Epilogue,
        label: &str,
    ) -> Result<Vec<Op>> {
        let plain = self.product_of(m, normed, Prologue::None, y, out, epilogue, label)?;
        let mut ops: Vec<Op> = plain.into_iter().map(|op| op.only_for(Calls::SeveralTokens)).collect();
        for &(calls, added) in one_token {
            let prologue = Prologue::AddNorm(AddNormInput { weights, added, sum }, write_sum);
            let folded = self.product_of(m, x, prologue, y, out, epilogue, label)?;
            ops.extend(folded.into_iter().map(|op| op.only_for(calls)));
        }
        Ok(ops)
    }

    /// The one-token forms of the first product after a layer that may leave its last residual add pending
    /// (`pending`: its output and post-norm's weights): with the add, and without it where nothing is pending.
    fn pending_forms<'b>(
        pending: Option<(&'b wgpu::Buffer, &'b wgpu::Buffer)>,
    ) -> Vec<(Calls, Option<(&'b wgpu::Buffer, &'b wgpu::Buffer)>)> {
        match pending {
            Some(added) => vec![(Calls::OneTokenSettled, None), (Calls::OneTokenPending, Some(added))],
            None => vec![(Calls::OneToken, None)],
        }
    }

    /// The product's dispatches reading `x`, with `prologue` on the way in.
    #[allow(clippy::too_many_arguments)]
    fn product_of(
        &self,
        m: &GpuMatrix,
        x: &wgpu::Buffer,
        prologue: Prologue,
        y: &wgpu::Buffer,
        out: Output,
        epilogue: Epilogue,
        label: &str,
    ) -> Result<Vec<Op>> {
        let gpu = self.gpu;
        let per_output = epilogue.weight_rows_per_output();
        if per_output > 1 && m.parts.len() != 1 {
            return Err(EngineError::Gpu(format!("{}: a gated product's rows must be in one buffer", m.name)));
        }
        // The kernel for one token per workgroup, and the tiled pipeline for several where there is one.
        let (pair, normalized);
        let (one, tiled): (&Kernel, _) = match prologue {
            Prologue::None => {
                pair = self.kernels.matmul(gpu, m.dtype, epilogue)?;
                (pair.pick(false), Some(pair.pick(true).pipeline().clone()))
            }
            Prologue::Norm(_) | Prologue::AddNorm(..) | Prologue::EmbedNorm { .. } => {
                let input = match prologue {
                    Prologue::AddNorm(..) => NormalizedInput::AddNorm,
                    Prologue::EmbedNorm { table, .. } => NormalizedInput::EmbedNorm(table.dtype),
                    _ => NormalizedInput::Norm,
                };
                normalized = self.kernels.normalized_matmul(gpu, m.dtype, epilogue, m.cols, input)?;
                (&normalized, None)
            }
        };
        let per_group = matmul_rows_per_group(gpu);
        // Each buffer's first row group's slot among the largest sums of an LM head picking greedily.
        let first_groups: Vec<u32> = m
            .parts
            .iter()
            .scan(0, |groups, part| {
                let first = *groups;
                *groups += ((part.rows / per_output) as u32).div_ceil(per_group);
                Some(first)
            })
            .collect();
        let largest = match (epilogue, out.largest) {
            (Epilogue::StoreKeepingLargest, Some(buffer)) => Some(buffer),
            (Epilogue::StoreKeepingLargest, None) => {
                return Err(EngineError::Gpu(format!("{}: no buffer for the largest sums", m.name)))
            }
            _ => None,
        };
        let ops = m
            .parts
            .iter()
            .enumerate()
            .map(|(index, part)| {
                let rows = (part.rows / per_output) as u32;
                let (groups_x, _) = split_groups(rows.div_ceil(per_group));
                let params = MatmulParams {
                    rows,
                    cols: m.cols as u32,
                    row_bytes: m.row_bytes as u32,
                    out_stride: out.stride as u32,
                    out_col: (out.col + part.first_row) as u32,
                    at_position: out.at_position as u32,
                    last_only: out.last_only as u32,
                    groups_x,
                    eps: self.config.rms_eps,
                    add: matches!(prologue, Prologue::AddNorm(AddNormInput { added: Some(_), .. }, _)) as u32,
                    write_sum: matches!(
                        prologue,
                        Prologue::AddNorm(_, true) | Prologue::EmbedNorm { writes_h: true, .. } if index == 0
                    ) as u32,
                    table_row_bytes: match prologue {
                        Prologue::EmbedNorm { table, .. } => table.row_bytes as u32,
                        _ => 0,
                    },
                    table_scale: self.config.embedding_scale.unwrap_or(1.0),
                    first_group: first_groups[index],
                    pad: [0; 2],
                };
                let params = uniform(gpu, &m.name, &params);
                let mut buffers = vec![&part.buffer, x, y];
                match prologue {
                    Prologue::None => {}
                    Prologue::Norm(weights) => buffers.push(weights),
                    Prologue::EmbedNorm { weights, table, .. } => {
                        // No input rows: the product looks them up in the table's one buffer.
                        let (table, tokens, h) = (&table.parts[0].buffer, &self.scratch.tokens, &self.scratch.h);
                        buffers = vec![&part.buffer, y, weights, table, tokens, h];
                    }
                    Prologue::AddNorm(input, _) => {
                        // Without an output to add, the norm's weights and the sum's buffer stand in for the
                        // unread bindings (any buffer that the dispatch does not write).
                        let (added, post) = input.added.unwrap_or((input.weights, input.weights));
                        buffers.extend([input.weights, added, post, input.sum]);
                    }
                }
                buffers.extend(largest);
                buffers.extend([&params, &self.scratch.step]);
                Op {
                    name: format!("{label}{}", one.name),
                    pipeline: one.pipeline().clone(),
                    tiled: tiled.clone(),
                    bind: one.bind(gpu, &buffers),
                    grid: Grid::Matmul { rows, per_group, last_only: out.last_only },
                    calls: Calls::All,
                    _params: Some(params),
                }
            })
            .collect();
        Ok(ops)
    }

    fn norm_params(&self, last_only: bool) -> wgpu::Buffer {
        let c = self.config;
        let params = NormParams { width: c.hidden as u32, last_only: last_only as u32, eps: c.rms_eps, pad: 0 };
        uniform(self.gpu, "norm", &params)
    }

    fn elementwise_params(&self, width: usize, rows: usize, cap: f32) -> wgpu::Buffer {
        uniform(self.gpu, "elementwise", &ElementwiseParams { width: width as u32, rows: rows as u32, cap, pad: 0 })
    }

    /// The token embedding into h, one dispatch per buffer of the table's rows; only for calls of several tokens
    /// where the first layer's products look the embedding up themselves (`folded`, `folds_embedding`).
    pub fn embedding(&self, table: &GpuMatrix, folded: bool) -> Vec<Op> {
        let (c, s) = (self.config, self.scratch);
        let parts = table.parts.iter().map(|part| {
            let params = EmbedParams {
                rows: part.rows as u32,
                first_row: part.first_row as u32,
                cols: c.hidden as u32,
                row_bytes: table.row_bytes as u32,
                scale: c.embedding_scale.unwrap_or(1.0),
                pad: [0; 3],
            };
            let kernel = self.kernels.embed(table.dtype);
            let grid = Grid::Threads { per_token: c.hidden as u32 };
            let op = self.op(kernel, &[&part.buffer, &s.tokens, &s.h], Some(uniform(self.gpu, "embed", &params)), grid);
            if folded {
                op.only_for(Calls::SeveralTokens)
            } else {
                op
            }
        });
        parts.collect()
    }

    /// Layer `i`: its dispatches in order, reading and writing the residual stream h: the attention half, then the
    /// MLP half. `pending`: the post-MLP norm's weights of the layer before, where one-token calls may leave its
    /// residual add to this layer's q|k|v product (`folds_post_norms`). `table`: the embedding, for the first layer
    /// where one-token calls look the token up in its q|k|v products (`folds_embedding`).
    #[allow(clippy::too_many_arguments)]
    pub fn layer(
        &self,
        i: usize,
        w: &LayerWeights,
        pending: Option<&wgpu::Buffer>,
        table: Option<&GpuMatrix>,
        cache: &LayerCache,
        rope: RopeTable,
    ) -> Result<Vec<Op>> {
        let (mut ops, mlp_input) = self.attention_half(i, w, pending, table, cache, rope)?;
        ops.extend(self.mlp_half(w, mlp_input)?);
        Ok(ops)
    }

    /// Layer `i`'s attention half: the input norm, the q|k|v products, the attention, its output product and its
    /// residual add, and the MLP's input norm; returns the dispatches and what the MLP's products read.
    fn attention_half<'w>(
        &'w self,
        i: usize,
        w: &'w LayerWeights,
        pending: Option<&wgpu::Buffer>,
        table: Option<&GpuMatrix>,
        cache: &LayerCache,
        rope: RopeTable,
    ) -> Result<(Vec<Op>, Input<'w>)> {
        let (c, s, k) = (self.config, self.scratch, self.kernels);
        let every_token = Grid::Rows { per_token: 1, last_only: false };
        let hidden_rows = Output::rows(c.hidden);
        let folds = self.folds_post_norms(w);
        let mut ops = Vec::new();

        // Where the post-norms fold, one-token calls take the pending residual add (if any) and the norm inside the
        // q|k|v products, the first of which writes h to `h_sum`.
        ops.push(self.input_norm(&w.attn_norm, &s.a, false));
        let attention_input = Input::Normalized { x: &s.h, weights: &w.attn_norm, normed: &s.a };
        for (n, (m, first_row)) in w.qkv.iter().enumerate() {
            let out = Output { col: *first_row, ..Output::rows(c.q_dim() + 2 * c.kv_dim()) };
            if let Some(table) = table {
                ops.extend(self.embedding_product(m, table, &w.attn_norm, n == 0, &s.qkv, out, Epilogue::Store)?);
            } else if folds {
                let buffers = (&s.h, &w.attn_norm, &s.a, &s.h_sum);
                let forms = Self::pending_forms(pending.map(|post| (&s.o, post)));
                ops.extend(self.folding_product(m, buffers, &forms, n == 0, &s.qkv, out, Epilogue::Store, "")?);
            } else {
                ops.extend(self.product(m, attention_input, &s.qkv, out, Epilogue::Store, "")?);
            }
        }
        ops.extend(self.attention(i, w, cache, rope));

        // The attention's output into the residual, and the MLP's input norm: where the post-norms fold, one-token
        // calls leave both to the gate|up products, which read h from `h_sum` and write the sum back to `h`.
        let attention_output = Input::Plain(&s.attn);
        let mlp_input = match &w.post_attention_norm {
            Some(post) => {
                ops.extend(self.product(&w.output, attention_output, &s.o, hidden_rows, Epilogue::Store, "")?);
                let buffers = [&s.o, &s.h, post, &s.a, &w.ffn_norm];
                let op = self.op(&k.norm_add_norm, &buffers, Some(self.norm_params(false)), every_token);
                ops.push(if folds { op.only_for(Calls::SeveralTokens) } else { op });
                Input::Plain(&s.a)
            }
            None => {
                ops.extend(self.product(&w.output, attention_output, &s.h, hidden_rows, Epilogue::Accumulate, "")?);
                ops.push(self.input_norm(&w.ffn_norm, &s.a, false));
                Input::Normalized { x: &s.h, weights: &w.ffn_norm, normed: &s.a }
            }
        };
        Ok((ops, mlp_input))
    }

    /// A layer's MLP half, from its input (`mlp_input`, as `attention_half` leaves it): the gated gate|up product,
    /// the down product and its residual add (after Gemma's post-norm).
    fn mlp_half<'s>(&'s self, w: &'s LayerWeights, mlp_input: Input<'s>) -> Result<Vec<Op>> {
        let (c, s, k) = (self.config, self.scratch, self.kernels);
        let every_token = Grid::Rows { per_token: 1, last_only: false };
        let hidden_rows = Output::rows(c.hidden);
        let folds = self.folds_post_norms(w);
        let mut ops = Vec::new();
        let ffn_rows = Output::rows(c.ffn_hidden);
        let activation = match c.activation {
            Activation::GeluTanh => GluActivation::Gelu,
            Activation::Silu => GluActivation::Silu,
        };
        // `mlp(m, y, epilogue, write_sum)`: the product of the MLP's input with `m`.
        let mlp = |m: &GpuMatrix, y: &wgpu::Buffer, epilogue: Epilogue, write_sum: bool| match (folds, w) {
            (true, LayerWeights { post_attention_norm: Some(post), .. }) => {
                let buffers = (&s.h_sum, &w.ffn_norm, &s.a, &s.h);
                let forms = [(Calls::OneToken, Some((&s.o, post)))];
                self.folding_product(m, buffers, &forms, write_sum, y, ffn_rows, epilogue, "")
            }
            _ => self.product(m, mlp_input, y, ffn_rows, epilogue, ""),
        };
        match &w.gate_up {
            GateUp::Stacked(m) => ops.extend(mlp(m, &s.g, Epilogue::Glu(activation), true)?),
            GateUp::Apart(gate, up) => {
                ops.extend(mlp(gate, &s.g, Epilogue::Store, true)?);
                ops.extend(mlp(up, &s.u, Epilogue::Store, false)?);
                let kernel = match activation {
                    GluActivation::Gelu => &k.glu_gelu,
                    GluActivation::Silu => &k.glu_silu,
                };
                let params = self.elementwise_params(c.ffn_hidden, 0, 0.0);
                ops.push(self.op(
                    kernel,
                    &[&s.u, &s.g],
                    Some(params),
                    Grid::Threads { per_token: c.ffn_hidden as u32 },
                ));
            }
        }
        match &w.post_ffn_norm {
            Some(post) => {
                // Where the post-norms fold, one-token calls may leave this residual add to the next product.
                ops.extend(self.product(&w.down, Input::Plain(&s.g), &s.o, hidden_rows, Epilogue::Store, "")?);
                let op = self.op(&k.norm_add, &[&s.o, &s.h, post], Some(self.norm_params(false)), every_token);
                ops.push(if folds { op.only_for(Calls::UnlessLeftPending) } else { op });
            }
            None => {
                ops.extend(self.product(&w.down, Input::Plain(&s.g), &s.h, hidden_rows, Epilogue::Accumulate, "")?)
            }
        }
        Ok(ops)
    }

    /// Layer `i`'s attention from the q|k|v rows to its output `attn`: the heads' preparation then the attention,
    /// or, in one-token calls, both in one dispatch.
    fn attention(&self, i: usize, w: &LayerWeights, cache: &LayerCache, rope: RopeTable) -> [Op; 3] {
        let (c, s, k) = (self.config, self.scratch, self.kernels);
        let heads = HeadsParams {
            heads: c.n_heads as u32,
            kv_heads: c.n_kv_heads as u32,
            head_dim: c.head_dim as u32,
            interleaved: (c.rope_layout == RopeLayout::Interleaved) as u32,
            qk_norm: c.qk_norm as u32,
            eps: c.rms_eps,
            pad: [0; 2],
        };
        let qk_norms = w.qk_norms.as_ref().unwrap_or(&s.no_norms);
        let heads = uniform(self.gpu, "heads", &heads);
        let prepare = self.op(
            &k.prepare_heads,
            &[&s.qkv, &s.q, &cache.k, &cache.v, qk_norms, rope.cos, rope.sin, &s.token_rows],
            Some(heads.clone()),
            Grid::Rows { per_token: (c.n_heads + 2 * c.n_kv_heads) as u32, last_only: false },
        );
        let attention = AttentionParams {
            heads: c.n_heads as u32,
            kv_heads: c.n_kv_heads as u32,
            head_dim: c.head_dim as u32,
            window: c.layers[i].window.unwrap_or(0) as u32,
            scale: c.attention_scale,
            softcap: c.attn_softcap.unwrap_or(0.0),
            pad: [0; 2],
        };
        let attention = uniform(self.gpu, "attention", &attention);
        let attend = self.op(
            &k.attention,
            &[&s.q, &cache.k, &cache.v, &s.attn, &s.token_rows],
            Some(attention.clone()),
            Grid::Attention { heads: c.n_heads as u32 },
        );
        let step = self.op(
            &k.attend_step,
            &[&s.qkv, &cache.k, &cache.v, &s.attn, qk_norms, rope.cos, rope.sin, &s.token_rows, &heads],
            Some(attention),
            Grid::Attention { heads: c.n_heads as u32 },
        );
        [prepare.only_for(Calls::SeveralTokens), attend.only_for(Calls::SeveralTokens), step.only_for(Calls::OneToken)]
    }

    /// The final norm, the LM head (one product per buffer of its rows) and Gemma 2's softcap, writing logits of
    /// the last token (`last_only`) or of every token into `logits`. `pending`: the last layer's post-MLP norm's
    /// weights, where one-token calls may leave its residual add to the LM head (`folds_post_norms`). `largest`:
    /// where the LM head keeps each workgroup's largest logit for a greedy pick (`largest_slots` pairs), for a head
    /// without a softcap, of the last token only.
    pub fn head(
        &self,
        final_norm: &wgpu::Buffer,
        lm_head: &GpuMatrix,
        logits: &wgpu::Buffer,
        last_only: bool,
        pending: Option<&wgpu::Buffer>,
        largest: Option<&wgpu::Buffer>,
    ) -> Result<Vec<Op>> {
        let (c, s) = (self.config, self.scratch);
        if largest.is_some() && (c.final_softcap.is_some() || !last_only) {
            return Err(EngineError::Gpu("only a last-token head without a softcap keeps its largest logits".into()));
        }
        let mut norm = self.input_norm(final_norm, &s.a, last_only);
        norm.name = "final norm".into();
        let mut ops = vec![norm];
        let out = Output { stride: c.vocab_size, col: 0, at_position: false, last_only, largest };
        let epilogue = if largest.is_some() { Epilogue::StoreKeepingLargest } else { Epilogue::Store };
        match pending {
            Some(post) if last_only => {
                let buffers = (&s.h, final_norm, &s.a, &s.h_sum);
                let forms = Self::pending_forms(Some((&s.o, post)));
                ops.extend(self.folding_product(lm_head, buffers, &forms, false, logits, out, epilogue, "lm head ")?)
            }
            _ => {
                let input = Input::Normalized { x: &s.h, weights: final_norm, normed: &s.a };
                ops.extend(self.product(lm_head, input, logits, out, epilogue, "lm head ")?);
            }
        }
        if let Some(cap) = c.final_softcap {
            let params = self.elementwise_params(c.vocab_size, if last_only { 1 } else { 0 }, cap);
            let grid = Grid::Threads { per_token: c.vocab_size as u32 };
            ops.push(self.op(&self.kernels.softcap, &[logits], Some(params), grid));
        }
        Ok(ops)
    }

    /// The slots of the largest logits of a greedy LM head (`head`'s `largest`): one per row group of each of its
    /// buffers.
    pub fn largest_slots(&self, lm_head: &GpuMatrix) -> usize {
        let per_group = matmul_rows_per_group(self.gpu) as usize;
        lm_head.parts.iter().map(|part| part.rows.div_ceil(per_group)).sum()
    }

    /// The token selection from the last logits (reads `select_params`, written per call).
    pub fn selection(&self) -> Op {
        let s = self.scratch;
        let kernel = &self.kernels.select;
        // The select kernel reads no step block: it binds only the logits, the result and its parameters.
        Op {
            name: kernel.name.clone(),
            pipeline: kernel.pipeline().clone(),
            tiled: None,
            bind: kernel.bind(self.gpu, &[&s.logits, &s.picked, &s.select_params]),
            grid: Grid::One,
            calls: Calls::All,
            _params: None,
        }
    }

    /// Adds a steering vector (in `vector`) to every row of h.
    pub fn steering(&self, vector: &wgpu::Buffer) -> Op {
        let params = self.elementwise_params(self.config.hidden, 0, 0.0);
        let grid = Grid::Threads { per_token: self.config.hidden as u32 };
        let mut op = self.op(&self.kernels.add_vector, &[vector, &self.scratch.h], Some(params), grid);
        op.name = "steering add".into();
        op
    }

    /// Sets every row's projection onto a direction (`unit`) to the value in `params`, written per call.
    pub fn projection(&self, unit: &wgpu::Buffer, params: &wgpu::Buffer) -> Op {
        let grid = Grid::Rows { per_token: 1, last_only: false };
        let mut op = self.op(&self.kernels.set_projection, &[unit, &self.scratch.h, params], None, grid);
        op.name = "set projection".into();
        op
    }

    /// Adds per-position rows (in `rows`, one per token of the call) to h.
    pub fn row_addition(&self, rows: &wgpu::Buffer) -> Op {
        let params = self.elementwise_params(self.config.hidden, 0, 0.0);
        let grid = Grid::Threads { per_token: self.config.hidden as u32 };
        let mut op = self.op(&self.kernels.add, &[rows, &self.scratch.h], Some(params), grid);
        op.name = "row add".into();
        op
    }
}
