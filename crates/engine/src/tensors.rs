//! The model's tensors as a GGUF file names them, described once for both backends: which tensors a layer and the
//! model's two ends have, their shapes, and which ones only some architectures carry. `TensorReader` reads them
//! with shape checks that name the tensor; the CPU model (`model::cpu`) wraps the matrices for its products and the
//! GPU model (`gpu::upload`) stacks q|k|v and gate|up and uploads them. A new architecture's tensors go here, and
//! neither backend repeats a name or a shape.

use std::io::{Read, Seek};

use candle_core::quantized::QTensor;
use candle_core::Device;

use crate::config::ModelConfig;
use crate::error::{EngineError, Result, TensorContext};
use crate::gguf::GgufFile;

/// A weight matrix from the file, still quantized, its shape checked, with the name that errors give.
pub struct FileMatrix {
    pub name: String,
    pub tensor: QTensor,
}

/// One decoder layer's tensors, in each backend's form of a matrix (`M`) and of a norm's weights (`V`). The
/// fields are named as the file names the tensors (`blk.{i}.{field}.weight`), but for the query and key norms.
pub struct LayerTensors<M, V> {
    pub attn_norm: V,
    pub attn_q: M,
    pub attn_k: M,
    pub attn_v: M,
    pub attn_output: M,
    /// Gemma 3's per-head norms of the queries and of the keys (`attn_q_norm`, `attn_k_norm`).
    pub qk_norms: Option<(V, V)>,
    /// Gemma's norm of the attention's output, before it is added to the residual stream.
    pub post_attention_norm: Option<V>,
    pub ffn_norm: V,
    pub ffn_gate: M,
    pub ffn_up: M,
    pub ffn_down: M,
    /// Gemma's norm of the MLP's output (`post_ffw_norm`), before it is added to the residual stream.
    pub post_ffn_norm: Option<V>,
}

impl<M, V> LayerTensors<M, V> {
    /// The same layer with every matrix put in another form by `matrix` and every norm's weights by `vector`.
    pub fn map<M2, V2>(
        self,
        mut matrix: impl FnMut(M) -> Result<M2>,
        mut vector: impl FnMut(V) -> Result<V2>,
    ) -> Result<LayerTensors<M2, V2>> {
        let post_attention_norm = self.post_attention_norm.map(&mut vector).transpose()?;
        let post_ffn_norm = self.post_ffn_norm.map(&mut vector).transpose()?;
        let qk_norms = match self.qk_norms {
            Some((q, k)) => Some((vector(q)?, vector(k)?)),
            None => None,
        };
        Ok(LayerTensors {
            attn_norm: vector(self.attn_norm)?,
            attn_q: matrix(self.attn_q)?,
            attn_k: matrix(self.attn_k)?,
            attn_v: matrix(self.attn_v)?,
            attn_output: matrix(self.attn_output)?,
            qk_norms,
            post_attention_norm,
            ffn_norm: vector(self.ffn_norm)?,
            ffn_gate: matrix(self.ffn_gate)?,
            ffn_up: matrix(self.ffn_up)?,
            ffn_down: matrix(self.ffn_down)?,
            post_ffn_norm,
        })
    }
}

/// Reads the model's tensors from the file `gguf` was parsed from.
pub struct TensorReader<'a, R> {
    pub gguf: &'a GgufFile,
    pub reader: &'a mut R,
}

impl<R: Read + Seek> TensorReader<'_, R> {
    /// The token embedding, [vocab, hidden].
    pub fn embedding(&mut self, c: &ModelConfig) -> Result<FileMatrix> {
        self.matrix("token_embd.weight", c.vocab_size, c.hidden)
    }

    /// Layer `i`'s tensors, those of its architecture only.
    pub fn layer(&mut self, c: &ModelConfig, i: usize) -> Result<LayerTensors<FileMatrix, Vec<f32>>> {
        let n = |s: &str| format!("blk.{i}.{s}.weight");
        let post_norms = c.architecture.has_post_norms();
        Ok(LayerTensors {
            attn_norm: self.values(&n("attn_norm"), c.hidden)?,
            attn_q: self.matrix(&n("attn_q"), c.q_dim(), c.hidden)?,
            attn_k: self.matrix(&n("attn_k"), c.kv_dim(), c.hidden)?,
            attn_v: self.matrix(&n("attn_v"), c.kv_dim(), c.hidden)?,
            attn_output: self.matrix(&n("attn_output"), c.hidden, c.q_dim())?,
            qk_norms: match c.qk_norm {
                true => {
                    Some((self.values(&n("attn_q_norm"), c.head_dim)?, self.values(&n("attn_k_norm"), c.head_dim)?))
                }
                false => None,
            },
            post_attention_norm: post_norms.then(|| self.values(&n("post_attention_norm"), c.hidden)).transpose()?,
            ffn_norm: self.values(&n("ffn_norm"), c.hidden)?,
            ffn_gate: self.matrix(&n("ffn_gate"), c.ffn_hidden, c.hidden)?,
            ffn_up: self.matrix(&n("ffn_up"), c.ffn_hidden, c.hidden)?,
            ffn_down: self.matrix(&n("ffn_down"), c.hidden, c.ffn_hidden)?,
            post_ffn_norm: post_norms.then(|| self.values(&n("post_ffw_norm"), c.hidden)).transpose()?,
        })
    }

    /// The final norm's weights, applied before the LM head.
    pub fn final_norm(&mut self, c: &ModelConfig) -> Result<Vec<f32>> {
        self.values("output_norm.weight", c.hidden)
    }

    /// The LM head, [vocab, hidden]; `None` where the file ties it to the token embedding.
    pub fn output(&mut self, c: &ModelConfig) -> Result<Option<FileMatrix>> {
        match self.gguf.has_tensor("output.weight") {
            true => self.matrix("output.weight", c.vocab_size, c.hidden).map(Some),
            false => Ok(None),
        }
    }

    /// Llama 3's RoPE frequency divisors, one per pair of a head's dimensions, where the file has them.
    pub fn rope_factors(&mut self, c: &ModelConfig) -> Result<Option<Vec<f32>>> {
        match self.gguf.has_tensor("rope_freqs.weight") {
            true => self.values("rope_freqs.weight", c.head_dim / 2).map(Some),
            false => Ok(None),
        }
    }

    /// A matrix of `rows` x `cols` (`[rows, cols]`, outermost first), as stored.
    fn matrix(&mut self, name: &str, rows: usize, cols: usize) -> Result<FileMatrix> {
        let tensor = self.gguf.tensor(self.reader, name)?;
        let dims = tensor.shape().dims();
        if dims != [rows, cols] {
            return Err(EngineError::BadTensor {
                name: name.into(),
                why: format!("expected shape [{rows}, {cols}], found {dims:?}"),
            });
        }
        Ok(FileMatrix { name: name.into(), tensor })
    }

    /// A vector of `len` values (a norm's weights), as f32 whatever the file's type.
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
}
