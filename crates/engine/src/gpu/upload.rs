//! The weights onto the GPU, as read by `tensors::TensorReader` (which names and checks them); a layer's matrices
//! that one product can compute together (q, k and v; gate and up) are stacked by rows as they go up.

use std::sync::Arc;

use super::context::Gpu;
use super::weights::GpuMatrix;
use crate::error::{Result, TensorContext};
use crate::quant::QuantMatrix;
use crate::tensors::{FileMatrix, LayerTensors};

/// The MLP's gate and up matrices: stacked by rows for one gated product, or apart where they cannot be.
pub(super) enum GateUp {
    Stacked(GpuMatrix),
    Apart(GpuMatrix, GpuMatrix),
}

/// One layer's weights on the GPU, as its plan (`plan.rs`) reads them.
pub(super) struct LayerWeights {
    /// q, k and v stacked by rows: one matrix per run of equal weight types, with the stack row it starts at.
    pub qkv: Vec<(GpuMatrix, usize)>,
    pub output: GpuMatrix,
    pub gate_up: GateUp,
    pub down: GpuMatrix,
    pub attn_norm: wgpu::Buffer,
    pub ffn_norm: wgpu::Buffer,
    /// Gemma's norms of the attention's and the MLP's outputs.
    pub post_attention_norm: Option<wgpu::Buffer>,
    pub post_ffn_norm: Option<wgpu::Buffer>,
    /// Gemma 3's per-head norms: q's weights, then k's.
    pub qk_norms: Option<wgpu::Buffer>,
}

/// Uploads a layer's tensors (`tensors::LayerTensors`) in the form its plan reads.
pub(super) fn layer(gpu: &Gpu, t: LayerTensors<FileMatrix, Vec<f32>>) -> Result<LayerWeights> {
    let qkv = upload_stacked(gpu, &[&t.attn_q, &t.attn_k, &t.attn_v])?;
    let gate_up = match <[_; 1]>::try_from(upload_stacked(gpu, &[&t.ffn_gate, &t.ffn_up])?) {
        Ok([(m, _)]) if m.parts.len() == 1 => GateUp::Stacked(m),
        // Different types, or too large for one buffer: two products and an activation step.
        _ => GateUp::Apart(matrix(gpu, &t.ffn_gate)?, matrix(gpu, &t.ffn_up)?),
    };
    let vector = |name: &str, values: &[f32]| gpu.storage_with(name, bytemuck::cast_slice(values));
    Ok(LayerWeights {
        qkv,
        output: matrix(gpu, &t.attn_output)?,
        gate_up,
        down: matrix(gpu, &t.ffn_down)?,
        attn_norm: vector("attn_norm", &t.attn_norm),
        ffn_norm: vector("ffn_norm", &t.ffn_norm),
        post_attention_norm: t.post_attention_norm.map(|w| vector("post_attention_norm", &w)),
        post_ffn_norm: t.post_ffn_norm.map(|w| vector("post_ffw_norm", &w)),
        qk_norms: t.qk_norms.map(|(q, k)| vector("q and k norms", &[q, k].concat())),
    })
}

/// A matrix's blocks on the GPU as stored, and on the CPU: the unembedding the logit lens reads (`Readout`).
pub(super) fn matrix_kept(gpu: &Gpu, m: FileMatrix) -> Result<(GpuMatrix, QuantMatrix)> {
    let on_gpu = matrix(gpu, &m)?;
    Ok((on_gpu, QuantMatrix::new(&m.name, Arc::new(m.tensor))?))
}

/// A matrix's blocks on the GPU as stored.
fn matrix(gpu: &Gpu, m: &FileMatrix) -> Result<GpuMatrix> {
    let (rows, cols) = m.tensor.shape().dims2().context(&m.name)?;
    GpuMatrix::upload(gpu, &m.name, m.tensor.dtype(), rows, cols, &m.tensor.data().context(&m.name)?)
}

/// Matrices with the same columns stacked by rows (the first's rows, then the second's, ...), so that one
/// product computes them all: one GPU matrix per run of neighbours of the same type, with the stack row where
/// the run starts.
fn upload_stacked(gpu: &Gpu, matrices: &[&FileMatrix]) -> Result<Vec<(GpuMatrix, usize)>> {
    let mut runs = Vec::new();
    let mut first_row = 0;
    let mut i = 0;
    while i < matrices.len() {
        let dtype = matrices[i].tensor.dtype();
        let run: Vec<_> = matrices[i..].iter().take_while(|m| m.tensor.dtype() == dtype).collect();
        let name = run.iter().map(|m| &m.name[..]).collect::<Vec<_>>().join(" + ");
        let (mut rows, mut cols, mut bytes) = (0, 0, Vec::new());
        for m in &run {
            let (r, c) = m.tensor.shape().dims2().context(&m.name)?;
            rows += r;
            cols = c;
            bytes.extend_from_slice(&m.tensor.data().context(&m.name)?);
        }
        runs.push((GpuMatrix::upload(gpu, &name, dtype, rows, cols, &bytes)?, first_row));
        first_row += rows;
        i += run.len();
    }
    Ok(runs)
}
