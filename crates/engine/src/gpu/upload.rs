//! The weights from the GGUF onto the GPU, with shape checks that name the tensor; a layer's matrices that one
//! product can compute together (q, k and v; gate and up) are stacked by rows as they go up.

use std::io::{Read, Seek};

use candle_core::quantized::QTensor;
use candle_core::Device;

use super::context::Gpu;
use super::weights::GpuMatrix;
use crate::config::ModelConfig;
use crate::error::{EngineError, Result, TensorContext};
use crate::gguf::GgufFile;
use crate::quant::QuantMatrix;

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

/// Reads tensors from the file and uploads them.
pub(super) struct Uploader<'a, R> {
    pub gpu: &'a Gpu,
    pub gguf: &'a GgufFile,
    pub reader: &'a mut R,
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
    pub fn matrix(&mut self, name: &str, rows: usize, cols: usize) -> Result<GpuMatrix> {
        Ok(self.matrix_kept(name, rows, cols)?.0)
    }

    /// As `matrix`, also keeping the blocks on the CPU.
    pub fn matrix_kept(&mut self, name: &str, rows: usize, cols: usize) -> Result<(GpuMatrix, QuantMatrix)> {
        let q = self.tensor(name, rows, cols)?;
        let gpu = upload_matrix(self.gpu, name, &q)?;
        Ok((gpu, QuantMatrix::new(name, std::sync::Arc::new(q))?))
    }

    /// A vector's values as f32 on the CPU.
    pub fn values(&mut self, name: &str, len: usize) -> Result<Vec<f32>> {
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
    pub fn vector(&mut self, name: &str, len: usize) -> Result<wgpu::Buffer> {
        let values = self.values(name, len)?;
        Ok(self.gpu.storage_with(name, bytemuck::cast_slice(&values)))
    }

    /// Layer `i`'s weights.
    pub fn layer(&mut self, i: usize, c: &ModelConfig) -> Result<LayerWeights> {
        let n = |s: &str| format!("blk.{i}.{s}.weight");
        let gpu = self.gpu;
        let qkv = {
            let q = self.tensor(&n("attn_q"), c.q_dim(), c.hidden)?;
            let k = self.tensor(&n("attn_k"), c.kv_dim(), c.hidden)?;
            let v = self.tensor(&n("attn_v"), c.kv_dim(), c.hidden)?;
            upload_stacked(gpu, &[(&n("attn_q"), &q), (&n("attn_k"), &k), (&n("attn_v"), &v)])?
        };
        let gate_up = {
            let gate = self.tensor(&n("ffn_gate"), c.ffn_hidden, c.hidden)?;
            let up = self.tensor(&n("ffn_up"), c.ffn_hidden, c.hidden)?;
            let stacked = upload_stacked(gpu, &[(&n("ffn_gate"), &gate), (&n("ffn_up"), &up)])?;
            match <[_; 1]>::try_from(stacked) {
                Ok([(m, _)]) if m.parts.len() == 1 => GateUp::Stacked(m),
                // Different types, or too large for one buffer: two products and an activation step.
                _ => GateUp::Apart(upload_matrix(gpu, &n("ffn_gate"), &gate)?, upload_matrix(gpu, &n("ffn_up"), &up)?),
            }
        };
        let post_norms = c.architecture.has_post_norms();
        Ok(LayerWeights {
            qkv,
            output: self.matrix(&n("attn_output"), c.hidden, c.q_dim())?,
            gate_up,
            down: self.matrix(&n("ffn_down"), c.hidden, c.ffn_hidden)?,
            attn_norm: self.vector(&n("attn_norm"), c.hidden)?,
            ffn_norm: self.vector(&n("ffn_norm"), c.hidden)?,
            post_attention_norm: post_norms.then(|| self.vector(&n("post_attention_norm"), c.hidden)).transpose()?,
            post_ffn_norm: post_norms.then(|| self.vector(&n("post_ffw_norm"), c.hidden)).transpose()?,
            qk_norms: if c.qk_norm {
                let mut both = self.values(&n("attn_q_norm"), c.head_dim)?;
                both.extend(self.values(&n("attn_k_norm"), c.head_dim)?);
                Some(gpu.storage_with("q and k norms", bytemuck::cast_slice(&both)))
            } else {
                None
            },
        })
    }
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
        let (mut rows, mut cols, mut bytes) = (0, 0, Vec::new());
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
