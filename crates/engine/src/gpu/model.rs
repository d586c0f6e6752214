//! The transformer on the GPU: the same steps as `model::cpu`, as a plan of kernel dispatches built once at load
//! (pipelines, bind groups and parameter blocks are never recreated), recorded into one command encoder per
//! forward call. Only the call's size (tokens, position) is written per call; decoding reads back one token id.
//!
//! Steps that follow one another are fused where a kernel can take the next step in its epilogue. Per layer
//! (Gemma-only steps marked):
//!   norm h -> a | qkv = a [Wq; Wk; Wv] (one product per run of equal weight types) |
//!   heads: q_norm/k_norm (Gemma 3), RoPE, q -> Q, k -> K[pos], v -> V[pos] | attention -> attn |
//!   Llama: h += attn Wo                  Gemma: o = attn Wo; h += post_norm(o); a = norm(h)
//!   Llama: a = norm h |
//!   g = act(a Wg) * (a Wu) (one product over the stacked gate and up rows) |
//!   Llama: h += g Wd                     Gemma: o = g Wd; h += post_norm(o) |
//!   hooks on h
//! then the final norm, the LM head (rows split over several buffers where needed), Gemma 2's softcap, and the
//! token selection. SmolLM2 takes 8 dispatches a layer (15 before the fusion), Gemma 3 9 or 10 (17 before).

use std::io::{Read, Seek};
use std::rc::Rc;

use bytemuck::Pod;
use candle_core::quantized::QTensor;
use candle_core::Device;

use super::context::Gpu;
use super::kernels::*;
use super::weights::GpuMatrix;
use crate::config::{rope_cos_sin, Activation, ModelConfig, RopeLayout};
use crate::error::{EngineError, Result, TensorContext};
use crate::gguf::GgufFile;
use crate::hooks::{Capture, Hooks, Segment};
use crate::model::cpu::LoadOptions;
use crate::model::{
    check_request, BackendStats, LanguageModel, LocalBoxFuture, LogitsWanted, Picked, Readout, StepOutput,
};
use crate::quant::QuantMatrix;
use crate::sampler::Sampling;

/// Tokens one command buffer processes; longer prompts go through in several calls.
pub const MAX_TOKENS_PER_CALL: usize = 128;

/// Context the KV cache is allocated for when the caller sets none (GPU memory is allocated up front).
pub const DEFAULT_GPU_CONTEXT: usize = 4096;

/// How many workgroups a dispatch needs, from the number of tokens in the call.
#[derive(Clone, Copy)]
enum Grid {
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

/// One prepared dispatch.
struct Op {
    /// The kernel's name, for profiles (native only).
    #[cfg_attr(target_arch = "wasm32", allow(dead_code))]
    name: String,
    pipeline: wgpu::ComputePipeline,
    /// The tiled variant of a matrix product.
    tiled: Option<wgpu::ComputePipeline>,
    bind: wgpu::BindGroup,
    grid: Grid,
    /// Kept alive for the bind group.
    _params: Option<wgpu::Buffer>,
}

impl Op {
    fn record(&self, pass: &mut wgpu::ComputePass, tokens: u32) {
        let (size, tiled) = self.grid.size(tokens);
        let pipeline = if tiled { self.tiled.as_ref().unwrap_or(&self.pipeline) } else { &self.pipeline };
        pass.set_pipeline(pipeline);
        pass.set_bind_group(0, &self.bind, &[]);
        pass.dispatch_workgroups(size[0], size[1], size[2]);
    }
}

/// Buffers every call reuses.
struct Scratch {
    step: wgpu::Buffer,
    tokens: wgpu::Buffer,
    h: wgpu::Buffer,
    a: wgpu::Buffer,
    /// The fused q|k|v product's output, per token.
    qkv: wgpu::Buffer,
    q: wgpu::Buffer,
    attn: wgpu::Buffer,
    o: wgpu::Buffer,
    g: wgpu::Buffer,
    u: wgpu::Buffer,
    logits: wgpu::Buffer,
    picked: wgpu::Buffer,
    select_params: wgpu::Buffer,
    logits_read: wgpu::Buffer,
    picked_read: wgpu::Buffer,
}

struct LayerCache {
    k: wgpu::Buffer,
    v: wgpu::Buffer,
}

pub struct GpuModel {
    gpu: Rc<Gpu>,
    kernels: Kernels,
    config: ModelConfig,
    scratch: Scratch,
    embed_ops: Vec<Op>,
    layer_ops: Vec<Vec<Op>>,
    /// Final norm over the last token, LM head, softcap.
    head_last: Vec<Op>,
    select_op: Op,
    _caches: Vec<LayerCache>,
    /// The LM head and its norm, to build the all-positions variant on demand.
    head: HeadWeights,
    /// The unembedding's blocks and the final norm, kept on the CPU for the logit lens.
    readout: Readout,
    /// The all-positions head for calls of up to `.0` tokens, with its logits buffer.
    head_all: Option<(usize, Vec<Op>, wgpu::Buffer)>,
    /// Per layer: the steering vector buffer and its `add_vector` dispatch, created on first use.
    steering: Vec<Option<(wgpu::Buffer, Op)>>,
    /// Per layer: the projection's direction and parameter buffers and its `set_projection` dispatch, created on
    /// first use.
    projecting: Vec<Option<(wgpu::Buffer, wgpu::Buffer, Op)>>,
    _weights: Vec<GpuMatrix>,
    _vectors: Vec<wgpu::Buffer>,
    position: usize,
    max_context: usize,
    /// GPU memory allocated while loading.
    memory: u64,
}

/// What the all-positions LM head needs.
struct HeadWeights {
    final_norm: wgpu::Buffer,
    lm_head: Rc<GpuMatrix>,
}

/// The MLP's gate and up matrices: stacked by rows for one gated product, or apart where they cannot be.
enum GateUp {
    Stacked(GpuMatrix),
    Apart(GpuMatrix, GpuMatrix),
}

/// Where a matrix product writes: input row t's outputs start at `(t + S.start if at_position) * stride + col`.
#[derive(Clone, Copy)]
struct Output {
    stride: usize,
    col: usize,
    /// Rows at the call's positions (the KV cache), not from 0.
    at_position: bool,
    /// Only the last input row (the LM head while generating).
    last_only: bool,
}

impl Output {
    /// Output rows of `stride` values from column 0, one per input row.
    fn rows(stride: usize) -> Self {
        Self { stride, col: 0, at_position: false, last_only: false }
    }
}

/// The dispatches of one matrix product `y = epilogue(m x)`, one per buffer of `m`'s rows. `label` prefixes the
/// kernel's name in profiles.
#[allow(clippy::too_many_arguments)]
fn product_ops(
    gpu: &Gpu,
    kernels: &Kernels,
    step: &wgpu::Buffer,
    m: &GpuMatrix,
    x: &wgpu::Buffer,
    y: &wgpu::Buffer,
    out: Output,
    epilogue: Epilogue,
    label: &str,
) -> Result<Vec<Op>> {
    let pair = kernels.matmul(gpu, m.dtype, epilogue)?;
    let per_output = epilogue.weight_rows_per_output();
    if per_output > 1 && m.parts.len() != 1 {
        return Err(EngineError::Gpu(format!("{}: a gated product's rows must be in one buffer", m.name)));
    }
    let per_group = matmul_rows_per_group(gpu);
    let ops = m
        .parts
        .iter()
        .map(|part| {
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
            };
            let params = uniform(gpu, &m.name, &params);
            let one = pair.pick(false);
            Op {
                name: format!("{label}{}", one.name),
                pipeline: one.pipeline().clone(),
                tiled: Some(pair.pick(true).pipeline().clone()),
                bind: one.bind(gpu, &[&part.buffer, x, y, &params, step]),
                grid: Grid::Matmul { rows, per_group, last_only: out.last_only },
                _params: Some(params),
            }
        })
        .collect();
    Ok(ops)
}

/// A matrix's blocks on the GPU.
fn upload_matrix(gpu: &Gpu, name: &str, q: &QTensor) -> Result<GpuMatrix> {
    let (rows, cols) = q.shape().dims2().context(name)?;
    GpuMatrix::upload(gpu, name, q.dtype(), rows, cols, &q.data().context(name)?)
}

/// Matrices with the same columns stacked by rows (the first's rows, then the second's, ...), so that one
/// product computes them all: one GPU matrix per run of neighbours of the same type, with the stack row where
/// the run starts.
fn upload_stacked(gpu: &Gpu, matrices: &[(&str, &QTensor)]) -> Result<Vec<(GpuMatrix, usize)>> {
    let mut runs = Vec::new();
    let mut first_row = 0;
    let mut i = 0;
    while i < matrices.len() {
        let dtype = matrices[i].1.dtype();
        let run: Vec<_> = matrices[i..].iter().take_while(|m| m.1.dtype() == dtype).collect();
        let name = run.iter().map(|m| m.0).collect::<Vec<_>>().join(" + ");
        let (mut rows, mut bytes) = (0, Vec::new());
        let mut cols = 0;
        for (part_name, q) in &run {
            let (r, c) = q.shape().dims2().context(part_name)?;
            rows += r;
            cols = c;
            bytes.extend_from_slice(&q.data().context(part_name)?);
        }
        runs.push((GpuMatrix::upload(gpu, &name, dtype, rows, cols, &bytes)?, first_row));
        first_row += rows;
        i += run.len();
    }
    Ok(runs)
}

/// Reads tensors from the file and uploads them, with shape checks that name the tensor.
struct Uploader<'a, R> {
    gpu: &'a Gpu,
    gguf: &'a GgufFile,
    reader: &'a mut R,
}

impl<R: Read + Seek> Uploader<'_, R> {
    /// A weight matrix's blocks on the CPU, its shape checked.
    fn tensor(&mut self, name: &str, rows: usize, cols: usize) -> Result<QTensor> {
        let q = self.gguf.tensor(self.reader, name)?;
        let dims = q.shape().dims().to_vec();
        if dims != [rows, cols] {
            return Err(EngineError::BadTensor {
                name: name.into(),
                why: format!("expected [{rows}, {cols}], found {dims:?}"),
            });
        }
        Ok(q)
    }

    /// A weight matrix, raw blocks as stored.
    fn matrix(&mut self, name: &str, rows: usize, cols: usize) -> Result<GpuMatrix> {
        Ok(self.matrix_kept(name, rows, cols)?.0)
    }

    /// As `matrix`, also keeping the blocks on the CPU.
    fn matrix_kept(&mut self, name: &str, rows: usize, cols: usize) -> Result<(GpuMatrix, QuantMatrix)> {
        let q = self.tensor(name, rows, cols)?;
        let gpu = upload_matrix(self.gpu, name, &q)?;
        Ok((gpu, QuantMatrix::new(name, std::sync::Arc::new(q))?))
    }

    /// A vector's values as f32 on the CPU.
    fn values(&mut self, name: &str, len: usize) -> Result<Vec<f32>> {
        let t = self.gguf.tensor(self.reader, name)?.dequantize(&Device::Cpu).context(name)?;
        let values = t.flatten_all().and_then(|t| t.to_vec1::<f32>()).context(name)?;
        if values.len() != len {
            return Err(EngineError::BadTensor {
                name: name.into(),
                why: format!("expected {len} values, found {}", values.len()),
            });
        }
        Ok(values)
    }

    /// A vector (a norm's weights) on the GPU as f32.
    fn vector(&mut self, name: &str, len: usize) -> Result<wgpu::Buffer> {
        let values = self.values(name, len)?;
        Ok(self.gpu.storage_with(name, bytemuck::cast_slice(&values)))
    }
}

fn uniform<T: Pod>(gpu: &Gpu, label: &str, value: &T) -> wgpu::Buffer {
    gpu.uniform_with(label, bytemuck::bytes_of(value))
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
        let c = config.clone();
        let allocated_before = gpu.allocated();
        if c.head_dim > 256 || c.head_dim % 2 != 0 {
            return Err(EngineError::Gpu(format!(
                "head size {} is not supported on the GPU (at most 256)",
                c.head_dim
            )));
        }
        let max_context = options.max_context.unwrap_or(DEFAULT_GPU_CONTEXT).min(c.context_length).max(1);
        let total_parts = c.n_layers + 2;
        let mut weights: Vec<GpuMatrix> = Vec::new();
        let mut vectors: Vec<wgpu::Buffer> = Vec::new();

        progress(0, total_parts);
        let mut ld = Uploader { gpu: &gpu, gguf, reader };
        let embedding_type: Vec<_> =
            gguf.tensors().iter().filter(|t| t.name == "token_embd.weight").map(|t| t.dtype).collect();
        let kernels = Kernels::new(&gpu, &embedding_type)?;

        let (embedding, embedding_cpu) = ld.matrix_kept("token_embd.weight", c.vocab_size, c.hidden)?;
        let embedding = Rc::new(embedding);
        progress(1, total_parts);
        let t = MAX_TOKENS_PER_CALL as u64;
        let f = 4u64;
        let scratch = Scratch {
            step: gpu.uniform_with("step", bytemuck::bytes_of(&StepParams::default())),
            tokens: gpu.storage("tokens", t * 4),
            h: gpu.storage("h", t * c.hidden as u64 * f),
            a: gpu.storage("a", t * c.hidden as u64 * f),
            qkv: gpu.storage("qkv", t * (c.q_dim() + 2 * c.kv_dim()) as u64 * f),
            q: gpu.storage("q", t * c.q_dim() as u64 * f),
            attn: gpu.storage("attn", t * c.q_dim() as u64 * f),
            o: gpu.storage("o", t * c.hidden as u64 * f),
            g: gpu.storage("g", t * c.ffn_hidden as u64 * f),
            u: gpu.storage("u", t * c.ffn_hidden as u64 * f),
            logits: gpu.storage("logits", c.vocab_size as u64 * f),
            picked: gpu.storage("picked", 4),
            select_params: uniform(&gpu, "select", &SelectParams::default()),
            logits_read: gpu.readback("logits read", c.vocab_size as u64 * f),
            picked_read: gpu.readback("picked read", 4),
        };
        let s = &scratch;

        // RoPE tables per distinct base, for every position of the context (computed in f64 like the CPU path).
        let rope_factors = if gguf.has_tensor("rope_freqs.weight") {
            Some(ld.values("rope_freqs.weight", c.head_dim / 2)?)
        } else {
            None
        };
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

        let k = &kernels;
        let op = |kernel: &Kernel, buffers: &[&wgpu::Buffer], params: Option<wgpu::Buffer>, grid: Grid| -> Op {
            let mut all: Vec<&wgpu::Buffer> = buffers.to_vec();
            if let Some(p) = &params {
                all.push(p);
            }
            all.push(&s.step);
            Op {
                name: kernel.name.clone(),
                pipeline: kernel.pipeline().clone(),
                tiled: None,
                bind: kernel.bind(&gpu, &all),
                grid,
                _params: params,
            }
        };
        let product = |m: &GpuMatrix, x: &wgpu::Buffer, y: &wgpu::Buffer, out: Output, epilogue: Epilogue| {
            product_ops(&gpu, k, &s.step, m, x, y, out, epilogue, "")
        };
        let norm_params = |width: usize, rows_per_token: usize, last_only: bool| {
            uniform(
                &gpu,
                "norm",
                &NormParams {
                    width: width as u32,
                    rows_per_token: rows_per_token as u32,
                    last_only: last_only as u32,
                    eps: c.rms_eps,
                },
            )
        };
        let ew_params = |width: usize, rows: usize, cap: f32| {
            uniform(&gpu, "elementwise", &ElementwiseParams { width: width as u32, rows: rows as u32, cap, pad: 0 })
        };

        let embed_ops: Vec<Op> = embedding
            .parts
            .iter()
            .map(|part| {
                let params = uniform(
                    &gpu,
                    "embed",
                    &EmbedParams {
                        rows: part.rows as u32,
                        first_row: part.first_row as u32,
                        cols: c.hidden as u32,
                        row_bytes: embedding.row_bytes as u32,
                        scale: c.embedding_scale.unwrap_or(1.0),
                        pad: [0; 3],
                    },
                );
                op(
                    k.embed(embedding.dtype),
                    &[&part.buffer, &s.tokens, &s.h],
                    Some(params),
                    Grid::Threads { per_token: c.hidden as u32 },
                )
            })
            .collect();

        let mut caches = Vec::with_capacity(c.n_layers);
        let mut layer_ops = Vec::with_capacity(c.n_layers);
        let gemma = c.architecture.has_post_norms();
        let glu = match c.activation {
            Activation::GeluTanh => GluActivation::Gelu,
            Activation::Silu => GluActivation::Silu,
        };
        let qkv_width = c.q_dim() + 2 * c.kv_dim();
        // Bound where a layer has no q and k norms (the kernel does not read it then).
        let no_norms = gpu.storage("no q/k norms", 16);
        for i in 0..c.n_layers {
            let n = |s: &str| format!("blk.{i}.{s}.weight");
            let cache = LayerCache {
                k: gpu.storage("k cache", (max_context * c.kv_dim() * 4) as u64),
                v: gpu.storage("v cache", (max_context * c.kv_dim() * 4) as u64),
            };
            let qkv = {
                let q = ld.tensor(&n("attn_q"), c.q_dim(), c.hidden)?;
                let k = ld.tensor(&n("attn_k"), c.kv_dim(), c.hidden)?;
                let v = ld.tensor(&n("attn_v"), c.kv_dim(), c.hidden)?;
                upload_stacked(&gpu, &[(&n("attn_q"), &q), (&n("attn_k"), &k), (&n("attn_v"), &v)])?
            };
            let wo = ld.matrix(&n("attn_output"), c.hidden, c.q_dim())?;
            let gate_up = {
                let gate = ld.tensor(&n("ffn_gate"), c.ffn_hidden, c.hidden)?;
                let up = ld.tensor(&n("ffn_up"), c.ffn_hidden, c.hidden)?;
                let stacked = upload_stacked(&gpu, &[(&n("ffn_gate"), &gate), (&n("ffn_up"), &up)])?;
                match <[_; 1]>::try_from(stacked) {
                    Ok([(m, _)]) if m.parts.len() == 1 => GateUp::Stacked(m),
                    // Different types, or too large for one buffer: two products and an activation step.
                    _ => GateUp::Apart(
                        upload_matrix(&gpu, &n("ffn_gate"), &gate)?,
                        upload_matrix(&gpu, &n("ffn_up"), &up)?,
                    ),
                }
            };
            let down = ld.matrix(&n("ffn_down"), c.hidden, c.ffn_hidden)?;
            let attn_norm = ld.vector(&n("attn_norm"), c.hidden)?;
            let ffn_norm = ld.vector(&n("ffn_norm"), c.hidden)?;
            let post_attn = if gemma { Some(ld.vector(&n("post_attention_norm"), c.hidden)?) } else { None };
            let post_ffn = if gemma { Some(ld.vector(&n("post_ffw_norm"), c.hidden)?) } else { None };
            let qk_norms = if c.qk_norm {
                let mut both = ld.values(&n("attn_q_norm"), c.head_dim)?;
                both.extend(ld.values(&n("attn_k_norm"), c.head_dim)?);
                Some(gpu.storage_with("q and k norms", bytemuck::cast_slice(&both)))
            } else {
                None
            };
            let spec = c.layers[i];
            let (_, cos, sin) = rope_tables.iter().find(|r| r.0 == spec.rope_base).expect("a table per base");
            let every_token = Grid::Rows { per_token: 1, last_only: false };

            // Attention.
            let mut ops =
                vec![op(&k.norm, &[&s.h, &s.a, &attn_norm], Some(norm_params(c.hidden, 1, false)), every_token)];
            for (m, first_row) in &qkv {
                let out = Output { col: *first_row, ..Output::rows(qkv_width) };
                ops.extend(product(m, &s.a, &s.qkv, out, Epilogue::Store)?);
            }
            let heads_params = HeadsParams {
                heads: c.n_heads as u32,
                kv_heads: c.n_kv_heads as u32,
                head_dim: c.head_dim as u32,
                interleaved: (c.rope_layout == RopeLayout::Interleaved) as u32,
                qk_norm: c.qk_norm as u32,
                eps: c.rms_eps,
                pad: [0; 2],
            };
            ops.push(op(
                &k.prepare_heads,
                &[&s.qkv, &s.q, &cache.k, &cache.v, qk_norms.as_ref().unwrap_or(&no_norms), cos, sin],
                Some(uniform(&gpu, "heads", &heads_params)),
                Grid::Rows { per_token: (c.n_heads + 2 * c.n_kv_heads) as u32, last_only: false },
            ));
            let attn_params = AttentionParams {
                heads: c.n_heads as u32,
                kv_heads: c.n_kv_heads as u32,
                head_dim: c.head_dim as u32,
                window: spec.window.unwrap_or(0) as u32,
                scale: c.attention_scale,
                softcap: c.attn_softcap.unwrap_or(0.0),
                pad: [0; 2],
            };
            ops.push(op(
                &k.attention,
                &[&s.q, &cache.k, &cache.v, &s.attn],
                Some(uniform(&gpu, "attention", &attn_params)),
                Grid::Attention { heads: c.n_heads as u32 },
            ));
            // The attention's output into the residual, and the MLP's input norm.
            match &post_attn {
                Some(post) => {
                    ops.extend(product(&wo, &s.attn, &s.o, Output::rows(c.hidden), Epilogue::Store)?);
                    ops.push(op(
                        &k.norm_add_norm,
                        &[&s.o, &s.h, post, &s.a, &ffn_norm],
                        Some(norm_params(c.hidden, 1, false)),
                        every_token,
                    ));
                }
                None => {
                    ops.extend(product(&wo, &s.attn, &s.h, Output::rows(c.hidden), Epilogue::Accumulate)?);
                    ops.push(op(&k.norm, &[&s.h, &s.a, &ffn_norm], Some(norm_params(c.hidden, 1, false)), every_token));
                }
            }
            // The MLP.
            match &gate_up {
                GateUp::Stacked(m) => {
                    ops.extend(product(m, &s.a, &s.g, Output::rows(c.ffn_hidden), Epilogue::Glu(glu))?)
                }
                GateUp::Apart(gate, up) => {
                    ops.extend(product(gate, &s.a, &s.g, Output::rows(c.ffn_hidden), Epilogue::Store)?);
                    ops.extend(product(up, &s.a, &s.u, Output::rows(c.ffn_hidden), Epilogue::Store)?);
                    let act = match glu {
                        GluActivation::Gelu => &k.glu_gelu,
                        GluActivation::Silu => &k.glu_silu,
                    };
                    ops.push(op(
                        act,
                        &[&s.u, &s.g],
                        Some(ew_params(c.ffn_hidden, 0, 0.0)),
                        Grid::Threads { per_token: c.ffn_hidden as u32 },
                    ));
                }
            }
            match &post_ffn {
                Some(post) => {
                    ops.extend(product(&down, &s.g, &s.o, Output::rows(c.hidden), Epilogue::Store)?);
                    ops.push(op(&k.norm_add, &[&s.o, &s.h, post], Some(norm_params(c.hidden, 1, false)), every_token));
                }
                None => ops.extend(product(&down, &s.g, &s.h, Output::rows(c.hidden), Epilogue::Accumulate)?),
            }

            vectors.extend([attn_norm, ffn_norm]);
            vectors.extend(post_attn);
            vectors.extend(post_ffn);
            vectors.extend(qk_norms);
            weights.extend(qkv.into_iter().map(|(m, _)| m));
            weights.extend([wo, down]);
            match gate_up {
                GateUp::Stacked(m) => weights.push(m),
                GateUp::Apart(gate, up) => weights.extend([gate, up]),
            }
            caches.push(cache);
            layer_ops.push(ops);
            progress(i + 2, total_parts);
        }
        vectors.push(no_norms);

        let final_norm_values = ld.values("output_norm.weight", c.hidden)?;
        let final_norm = gpu.storage_with("output_norm.weight", bytemuck::cast_slice(&final_norm_values));
        let (lm_head, unembedding) = if gguf.has_tensor("output.weight") {
            let (m, cpu) = ld.matrix_kept("output.weight", c.vocab_size, c.hidden)?;
            (Rc::new(m), cpu)
        } else {
            (embedding.clone(), embedding_cpu)
        };
        let readout = Readout { unembedding, final_norm: final_norm_values };
        let head_last = Self::head_ops(&gpu, &kernels, &c, &scratch, &final_norm, &lm_head, &scratch.logits, true)?;
        let select_op = {
            let bind = kernels.select.bind(&gpu, &[&scratch.logits, &scratch.picked, &scratch.select_params]);
            Op {
                name: kernels.select.name.clone(),
                pipeline: kernels.select.pipeline().clone(),
                tiled: None,
                bind,
                grid: Grid::One,
                _params: None,
            }
        };
        progress(total_parts, total_parts);
        gpu.check()?;
        let embedding = Rc::try_unwrap(embedding).ok();
        weights.extend(embedding);
        Ok(Self {
            kernels,
            config,
            embed_ops,
            layer_ops,
            head_last,
            select_op,
            _caches: caches,
            head: HeadWeights { final_norm, lm_head },
            readout,
            head_all: None,
            steering: (0..c.n_layers).map(|_| None).collect(),
            projecting: (0..c.n_layers).map(|_| None).collect(),
            _weights: weights,
            _vectors: vectors.into_iter().chain(rope_tables.into_iter().flat_map(|r| [r.1, r.2])).collect(),
            scratch,
            position: 0,
            max_context,
            memory: gpu.allocated() - allocated_before,
            gpu,
        })
    }

    /// The final norm, the LM head (one product per part of its rows) and Gemma 2's softcap, writing logits of
    /// the last token (`last_only`) or of every token into `logits`.
    #[allow(clippy::too_many_arguments)]
    fn head_ops(
        gpu: &Gpu,
        k: &Kernels,
        c: &ModelConfig,
        s: &Scratch,
        final_norm: &wgpu::Buffer,
        lm_head: &GpuMatrix,
        logits: &wgpu::Buffer,
        last_only: bool,
    ) -> Result<Vec<Op>> {
        let mut ops = Vec::new();
        let params = uniform(
            gpu,
            "final norm",
            &NormParams { width: c.hidden as u32, rows_per_token: 1, last_only: last_only as u32, eps: c.rms_eps },
        );
        ops.push(Op {
            name: "final norm".into(),
            pipeline: k.norm.pipeline().clone(),
            tiled: None,
            bind: k.norm.bind(gpu, &[&s.h, &s.a, final_norm, &params, &s.step]),
            grid: Grid::Rows { per_token: 1, last_only },
            _params: Some(params),
        });
        let out = Output { stride: c.vocab_size, col: 0, at_position: false, last_only };
        ops.extend(product_ops(gpu, k, &s.step, lm_head, &s.a, logits, out, Epilogue::Store, "lm head ")?);
        if let Some(cap) = c.final_softcap {
            let rows = if last_only { 1 } else { 0 };
            let params = uniform(gpu, "softcap", &ElementwiseParams { width: c.vocab_size as u32, rows, cap, pad: 0 });
            ops.push(Op {
                name: k.softcap.name.clone(),
                pipeline: k.softcap.pipeline().clone(),
                tiled: None,
                bind: k.softcap.bind(gpu, &[logits, &params, &s.step]),
                grid: Grid::Threads { per_token: c.vocab_size as u32 },
                _params: Some(params),
            });
        }
        Ok(ops)
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
        self.check_request(tokens, &Hooks::none())?;
        let t = tokens.len().min(MAX_TOKENS_PER_CALL);
        let gpu = self.gpu.clone();
        let step = StepParams { tokens: t as u32, start: self.position as u32, pad: [0; 2] };
        gpu.queue.write_buffer(&self.scratch.step, 0, bytemuck::bytes_of(&step));
        gpu.queue.write_buffer(&self.scratch.tokens, 0, bytemuck::cast_slice(&tokens[..t]));
        let wait = || gpu.device.poll(wgpu::PollType::wait_indefinitely()).map(|_| ());
        let mut totals: Vec<(String, f64, usize)> = Vec::new();
        let ops = self
            .embed_ops
            .iter()
            .chain(self.layer_ops.iter().flatten())
            .chain(&self.head_last)
            .chain([&self.select_op]);
        for op in ops {
            wait().map_err(|e| EngineError::GpuLost(e.to_string()))?;
            let start = Instant::now();
            let mut encoder = gpu.device.create_command_encoder(&Default::default());
            op.record(&mut encoder.begin_compute_pass(&Default::default()), t as u32);
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

    fn check_request(&self, tokens: &[u32], hooks: &Hooks) -> Result<()> {
        self.gpu.check()?;
        check_request(&self.config, self.position, self.max_context, tokens, hooks)
    }

    /// The add_vector dispatch of layer `layer`'s steering buffer, created on first use.
    fn steering_op(&mut self, layer: usize) -> &(wgpu::Buffer, Op) {
        if self.steering[layer].is_none() {
            let c = &self.config;
            let buffer = self.gpu.storage("steering", (c.hidden * 4) as u64);
            let params = uniform(
                &self.gpu,
                "steering",
                &ElementwiseParams { width: c.hidden as u32, rows: 0, cap: 0.0, pad: 0 },
            );
            let k = &self.kernels.add_vector;
            let bind = k.bind(&self.gpu, &[&buffer, &self.scratch.h, &params, &self.scratch.step]);
            let op = Op {
                name: "steering add".into(),
                pipeline: k.pipeline().clone(),
                tiled: None,
                bind,
                grid: Grid::Threads { per_token: c.hidden as u32 },
                _params: Some(params),
            };
            self.steering[layer] = Some((buffer, op));
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
            let k = &self.kernels.set_projection;
            let bind = k.bind(&self.gpu, &[&unit, &self.scratch.h, &params, &self.scratch.step]);
            let op = Op {
                name: "set projection".into(),
                pipeline: k.pipeline().clone(),
                tiled: None,
                bind,
                grid: Grid::Rows { per_token: 1, last_only: false },
                _params: None,
            };
            self.projecting[layer] = Some((unit, params, op));
        }
        self.projecting[layer].as_ref().expect("just created")
    }

    /// Makes sure the all-positions head exists for calls of `tokens` tokens.
    fn ensure_head_all(&mut self, tokens: usize) -> Result<()> {
        if self.head_all.as_ref().is_some_and(|h| h.0 >= tokens) {
            return Ok(());
        }
        let logits = self.gpu.storage("all logits", (tokens * self.config.vocab_size * 4) as u64);
        let ops = Self::head_ops(
            &self.gpu,
            &self.kernels,
            &self.config,
            &self.scratch,
            &self.head.final_norm,
            &self.head.lm_head,
            &logits,
            false,
        )?;
        self.head_all = Some((tokens, ops, logits));
        Ok(())
    }

    /// Runs one call of at most MAX_TOKENS_PER_CALL tokens. `finish` says what the last call of a forward ends
    /// with; earlier calls of a long prompt end after the layers.
    async fn run_call(
        &mut self,
        tokens: &[u32],
        segment: Segment,
        hooks: &Hooks,
        reads: &[(usize, usize)],
        finish: Finish,
    ) -> Result<CallOutput> {
        let n = tokens.len();
        let start = self.position;
        let hidden = self.config.hidden;
        let gpu = self.gpu.clone();
        gpu.queue.write_buffer(
            &self.scratch.step,
            0,
            bytemuck::bytes_of(&StepParams { tokens: n as u32, start: start as u32, pad: [0; 2] }),
        );
        gpu.queue.write_buffer(&self.scratch.tokens, 0, bytemuck::cast_slice(tokens));
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
        let mut steered = vec![false; self.config.n_layers];
        for layer in 0..self.config.n_layers {
            if let Some(v) = hooks.added_vector(layer, segment) {
                let (buffer, _) = self.steering_op(layer);
                gpu.queue.write_buffer(buffer, 0, bytemuck::cast_slice(&v));
                steered[layer] = true;
            }
        }
        // Projections for this call's segment: direction and value written before the commands that read them.
        let mut projected = vec![false; self.config.n_layers];
        for layer in 0..self.config.n_layers {
            if let Some(p) = hooks.projection(layer, segment) {
                let params = ProjectParams { width: hidden as u32, value: p.value, pad: [0; 2] };
                let (unit, params_buffer, _) = self.projection_op(layer);
                gpu.queue.write_buffer(unit, 0, bytemuck::cast_slice(&p.unit));
                gpu.queue.write_buffer(params_buffer, 0, bytemuck::bytes_of(&params));
                projected[layer] = true;
            }
        }
        // Per-position additions (evaluations only): a buffer and a dispatch made for this call.
        let row_ops: Vec<Option<(wgpu::Buffer, Op)>> = (0..self.config.n_layers)
            .map(|layer| {
                let rows = hooks.added_rows(layer, start, n, hidden)?;
                let buffer = gpu.storage_with("rows", bytemuck::cast_slice(&rows));
                let params =
                    uniform(&gpu, "rows", &ElementwiseParams { width: hidden as u32, rows: 0, cap: 0.0, pad: 0 });
                let k = &self.kernels.add;
                let bind = k.bind(&gpu, &[&buffer, &self.scratch.h, &params, &self.scratch.step]);
                let op = Op {
                    name: "row add".into(),
                    pipeline: k.pipeline().clone(),
                    tiled: None,
                    bind,
                    grid: Grid::Threads { per_token: hidden as u32 },
                    _params: Some(params),
                };
                Some((buffer, op))
            })
            .collect();
        // Captures: (layer, offset in this call) in layer order, copied out of h after their layer.
        let captures: Vec<(usize, usize)> =
            reads.iter().filter(|r| r.1 >= start && r.1 < start + n).map(|&(layer, p)| (layer, p - start)).collect();
        let capture_read =
            (!captures.is_empty()).then(|| gpu.readback("captures", (captures.len() * hidden * 4) as u64));

        let mut encoder = gpu.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("forward") });
        let t = n as u32;
        // Passes forget the encoder's borrow so that captures can end one, copy, and begin the next.
        let mut pass = Some(encoder.begin_compute_pass(&Default::default()).forget_lifetime());
        for op in &self.embed_ops {
            op.record(pass.as_mut().unwrap(), t);
        }
        let mut next_capture = 0;
        for layer in 0..self.config.n_layers {
            for op in &self.layer_ops[layer] {
                op.record(pass.as_mut().unwrap(), t);
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
                let (_, op) = self.steering[layer].as_ref().expect("made above");
                op.record(pass.as_mut().unwrap(), t);
            }
            if let Some((_, op)) = &row_ops[layer] {
                op.record(pass.as_mut().unwrap(), t);
            }
            if projected[layer] {
                let (_, _, op) = self.projecting[layer].as_ref().expect("made above");
                op.record(pass.as_mut().unwrap(), t);
            }
        }
        match finish {
            Finish::Layers => {}
            Finish::Logits(LogitsWanted::Last) | Finish::Pick(..) => {
                for op in &self.head_last {
                    op.record(pass.as_mut().unwrap(), t);
                }
            }
            Finish::Logits(LogitsWanted::All) => {
                for op in &self.head_all.as_ref().expect("ensured above").1 {
                    op.record(pass.as_mut().unwrap(), t);
                }
            }
        }
        if let Finish::Pick(..) = finish {
            self.select_op.record(pass.as_mut().unwrap(), t);
        }
        drop(pass);
        let vocab = self.config.vocab_size;
        let all_read = match finish {
            Finish::Logits(LogitsWanted::Last) => {
                encoder.copy_buffer_to_buffer(
                    &self.scratch.logits,
                    0,
                    &self.scratch.logits_read,
                    0,
                    (vocab * 4) as u64,
                );
                None
            }
            Finish::Logits(LogitsWanted::All) => {
                let bytes = (n * vocab * 4) as u64;
                let read = gpu.readback("all logits read", bytes);
                encoder.copy_buffer_to_buffer(&self.head_all.as_ref().expect("ensured").2, 0, &read, 0, bytes);
                Some(read)
            }
            Finish::Pick(..) => {
                encoder.copy_buffer_to_buffer(&self.scratch.picked, 0, &self.scratch.picked_read, 0, 4);
                None
            }
            Finish::Layers => None,
        };
        gpu.queue.submit([encoder.finish()]);
        self.position += n;

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
                let all = gpu.read_f32(all_read.as_ref().expect("made above"), n * vocab).await?;
                out.logits = Some(all[(n - 1) * vocab..].to_vec());
                out.all_logits = Some(all);
            }
            Finish::Pick(..) => {
                let bytes = gpu.read(&self.scratch.picked_read, 4).await?;
                out.token = Some(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]));
            }
            Finish::Layers => gpu.check()?,
        }
        Ok(out)
    }

    /// A forward over any number of tokens, in calls of at most MAX_TOKENS_PER_CALL.
    async fn run(&mut self, tokens: &[u32], segment: Segment, hooks: &Hooks, finish: Finish) -> Result<CallOutput> {
        self.check_request(tokens, hooks)?;
        // What the read hooks want over the whole forward, as (layer, absolute position): `Last` means the last
        // token of the forward, not of each internal call.
        let start = self.position;
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
            let out = self.run_call(chunk, segment, hooks, &reads, this_finish).await?;
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

#[derive(Clone, Copy)]
enum Finish {
    /// Stop after the layers (an early chunk of a long prompt).
    Layers,
    Logits(LogitsWanted),
    Pick(Sampling, u32),
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
        self.position
    }

    fn max_context(&self) -> usize {
        self.max_context
    }

    fn reset(&mut self) {
        self.position = 0;
    }

    fn readout(&self) -> Option<Readout> {
        Some(self.readout.clone())
    }

    fn backend_name(&self) -> String {
        format!("wgpu: {}", self.gpu.describe())
    }

    #[cfg(not(target_arch = "wasm32"))]
    fn profile(&mut self, tokens: &[u32]) -> Option<Result<Vec<(String, f64, usize)>>> {
        Some(self.profile_call(tokens))
    }

    fn stats(&self) -> BackendStats {
        let per_token =
            self.embed_ops.len() + self.layer_ops.iter().map(|l| l.len()).sum::<usize>() + self.head_last.len() + 1; // token selection
        BackendStats { gpu_memory_bytes: Some(self.memory), dispatches_per_token: Some(per_token) }
    }

    fn forward<'a>(
        &'a mut self,
        tokens: &'a [u32],
        segment: Segment,
        hooks: &'a Hooks,
        logits: LogitsWanted,
    ) -> LocalBoxFuture<'a, Result<StepOutput>> {
        Box::pin(async move {
            let out = self.run(tokens, segment, hooks, Finish::Logits(logits)).await?;
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
            let out = self.run(tokens, segment, hooks, Finish::Pick(sampling, step)).await?;
            Ok(Picked { token: out.token.expect("a token was picked"), captures: out.captures, logits: None })
        })
    }
}
