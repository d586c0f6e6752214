//! Weight matrices on the GPU, as the GGUF stores them (raw blocks), split by rows into several buffers where a
//! matrix exceeds the device's largest storage binding.

use candle_core::quantized::GgmlDType;

use super::context::Gpu;
use crate::error::{EngineError, Result};

/// Rows `first_row .. first_row + rows` of a matrix, in one buffer.
pub struct Part {
    pub buffer: wgpu::Buffer,
    pub first_row: usize,
    pub rows: usize,
}

pub struct GpuMatrix {
    pub name: String,
    pub dtype: GgmlDType,
    pub rows: usize,
    pub cols: usize,
    pub row_bytes: usize,
    pub parts: Vec<Part>,
}

impl GpuMatrix {
    /// Uploads `bytes` (rows x cols values of `dtype`, row after row), in parts no larger than the device binds.
    pub fn upload(gpu: &Gpu, name: &str, dtype: GgmlDType, rows: usize, cols: usize, bytes: &[u8]) -> Result<Self> {
        let limit = (gpu.limits.max_storage_buffer_binding_size as u64).min(gpu.limits.max_buffer_size) as usize;
        Self::upload_with_limit(gpu, name, dtype, rows, cols, bytes, limit)
    }

    /// As `upload`, with parts of at most `limit` bytes.
    pub fn upload_with_limit(
        gpu: &Gpu,
        name: &str,
        dtype: GgmlDType,
        rows: usize,
        cols: usize,
        bytes: &[u8],
        limit: usize,
    ) -> Result<Self> {
        if !cols.is_multiple_of(32) || !cols.is_multiple_of(dtype.block_size()) {
            return Err(EngineError::BadTensor {
                name: name.into(),
                why: format!("rows of {cols} values cannot be read 32 at a time on the GPU"),
            });
        }
        let row_bytes = cols / dtype.block_size() * dtype.type_size();
        if bytes.len() != rows * row_bytes {
            return Err(EngineError::BadTensor { name: name.into(), why: "size does not match its shape".into() });
        }
        // Leave room for the 4-byte padding of a part.
        let rows_per_part = ((limit - 4) / row_bytes).min(rows).max(1);
        if row_bytes > limit - 4 {
            return Err(EngineError::Gpu(format!("{name}: one row is larger than the device's largest buffer")));
        }
        let mut parts = Vec::new();
        let mut first = 0;
        while first < rows {
            let n = rows_per_part.min(rows - first);
            let buffer = gpu.storage_with(name, &bytes[first * row_bytes..(first + n) * row_bytes]);
            parts.push(Part { buffer, first_row: first, rows: n });
            first += n;
        }
        Ok(Self { name: name.to_string(), dtype, rows, cols, row_bytes, parts })
    }

    pub fn bytes(&self) -> u64 {
        (self.rows * self.row_bytes) as u64
    }
}
