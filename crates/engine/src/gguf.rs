//! Reading GGUF files: candle-core parses the format; this module checks what candle does not (the magic, every
//! length and shape in the header against the file's size, before candle allocates anything (`gguf_guard`), that
//! every tensor's data lies inside the file, that every quantization is one the engine reads) and turns candle's
//! low-level errors into messages a person can act on.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};

use candle_core::quantized::k_quants::{BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ6K, BlockQ8_0};
use candle_core::quantized::{gguf_file, GgmlDType, QStorage, QTensor, QuantizedType};
use half::{bf16, f16};

use crate::error::{EngineError, ExpectedBytes, Result, TensorContext};

pub use gguf_file::Value;

/// The quantizations the engine reads (and, later, the WebGPU kernels implement).
pub const SUPPORTED_TYPES: [GgmlDType; 9] = [
    GgmlDType::F32,
    GgmlDType::F16,
    GgmlDType::BF16,
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q8_0,
    GgmlDType::Q4K,
    GgmlDType::Q6K,
];

/// ggml's own name for a quantization, as llama.cpp and Hugging Face show it.
pub fn type_name(dtype: GgmlDType) -> &'static str {
    match dtype {
        GgmlDType::F32 => "F32",
        GgmlDType::F16 => "F16",
        GgmlDType::BF16 => "BF16",
        GgmlDType::Q4_0 => "Q4_0",
        GgmlDType::Q4_1 => "Q4_1",
        GgmlDType::Q5_0 => "Q5_0",
        GgmlDType::Q5_1 => "Q5_1",
        GgmlDType::Q8_0 => "Q8_0",
        GgmlDType::Q8_1 => "Q8_1",
        GgmlDType::Q2K => "Q2_K",
        GgmlDType::Q3K => "Q3_K",
        GgmlDType::Q4K => "Q4_K",
        GgmlDType::Q5K => "Q5_K",
        GgmlDType::Q6K => "Q6_K",
        GgmlDType::Q8K => "Q8_K",
    }
}

/// One tensor as the header describes it.
#[derive(Debug, Clone)]
pub struct TensorSummary {
    pub name: String,
    pub dtype: GgmlDType,
    /// Dimensions, outermost first (rows, columns for a matrix).
    pub dims: Vec<usize>,
    pub bytes: u64,
}

/// A parsed GGUF header: metadata and tensor directory. Tensor data is read on demand from the same reader.
pub struct GgufFile {
    content: gguf_file::Content,
    file_size: u64,
}

impl GgufFile {
    /// Parses and checks the header of a GGUF file. Only the header is read; the reader must be the whole file.
    pub fn read<R: Read + Seek>(reader: &mut R) -> Result<Self> {
        let file_size = reader.seek(SeekFrom::End(0))?;
        reader.seek(SeekFrom::Start(0))?;
        let mut magic = [0u8; 4];
        let got = read_up_to(reader, &mut magic)?;
        if got < 4 {
            return Err(EngineError::Truncated {
                what: "it ends before the 4-byte magic".into(),
                actual: file_size,
                expected: ExpectedBytes(Some(4)),
            });
        }
        if &magic != b"GGUF" {
            return Err(EngineError::NotGguf { found: describe_magic(&magic) });
        }
        crate::gguf_guard::check_header(reader, file_size)?;
        reader.seek(SeekFrom::Start(0))?;
        let content = gguf_file::Content::read(reader).map_err(|e| header_error(e, file_size))?;
        let file = Self { content, file_size };
        file.check_tensors()?;
        Ok(file)
    }

    /// Parses the header of a GGUF file held in memory (the browser's case).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        Self::read(&mut std::io::Cursor::new(bytes))
    }

    /// Every tensor's data must lie inside the file and use a quantization the engine reads.
    fn check_tensors(&self) -> Result<()> {
        for t in self.tensors() {
            if !SUPPORTED_TYPES.contains(&t.dtype) {
                return Err(EngineError::UnsupportedTensorType {
                    tensor: format!("tensor {}", t.name),
                    dtype: type_name(t.dtype).into(),
                });
            }
            let block = t.dtype.block_size() as u64;
            let elements = t.dims.iter().fold(1u64, |acc, &d| acc.saturating_mul(d as u64));
            if elements % block != 0 {
                return Err(EngineError::BadTensor {
                    name: t.name.clone(),
                    why: format!("{elements} {} elements are not whole blocks of {block}", type_name(t.dtype)),
                });
            }
            let info = &self.content.tensor_infos[&t.name];
            let end = self.content.tensor_data_offset.checked_add(info.offset).and_then(|x| x.checked_add(t.bytes));
            if !matches!(end, Some(end) if end <= self.file_size) {
                return Err(EngineError::Truncated {
                    what: format!("tensor {} ends past the end of the file", t.name),
                    actual: self.file_size,
                    expected: ExpectedBytes(Some(self.data_end())),
                });
            }
        }
        Ok(())
    }

    /// The byte where the last tensor's data ends: the least size a complete file has.
    pub fn data_end(&self) -> u64 {
        self.tensors()
            .iter()
            .map(|t| {
                self.content
                    .tensor_data_offset
                    .saturating_add(self.content.tensor_infos[&t.name].offset)
                    .saturating_add(t.bytes)
            })
            .max()
            .unwrap_or(self.content.tensor_data_offset)
    }

    pub fn file_size(&self) -> u64 {
        self.file_size
    }

    /// `general.architecture`, e.g. "gemma3" or "llama".
    pub fn architecture(&self) -> Result<&str> {
        self.get_str("general.architecture")
    }

    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    pub fn get_str(&self, key: &str) -> Result<&str> {
        match self.get(key) {
            Some(Value::String(s)) => Ok(s),
            Some(other) => Err(missing(key, &format!("expected a string, found {:?}", other.value_type()))),
            None => Err(missing(key, "required")),
        }
    }

    /// An unsigned integer of any width (writers differ in the width they pick).
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        match self.get(key) {
            Some(v) => {
                value_as_u64(v).ok_or_else(|| missing(key, &format!("expected an integer, found {:?}", v.value_type())))
            }
            None => Err(missing(key, "required")),
        }
    }

    pub fn get_usize(&self, key: &str) -> Result<usize> {
        self.get_u64(key).map(|v| v as usize)
    }

    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(_) => self.get_usize(key).map(Some),
        }
    }

    pub fn opt_f32(&self, key: &str) -> Result<Option<f32>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::F32(v)) => Ok(Some(*v)),
            Some(Value::F64(v)) => Ok(Some(*v as f32)),
            Some(v) => match value_as_u64(v) {
                Some(i) => Ok(Some(i as f32)),
                None => Err(missing(key, &format!("expected a number, found {:?}", v.value_type()))),
            },
        }
    }

    pub fn opt_bool(&self, key: &str) -> Option<bool> {
        match self.get(key) {
            Some(Value::Bool(b)) => Some(*b),
            _ => None,
        }
    }

    /// An array of strings (the vocabulary, the merges).
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>> {
        match self.get(key) {
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.as_str()),
                    other => Err(missing(key, &format!("expected strings, found {:?}", other.value_type()))),
                })
                .collect(),
            Some(other) => Err(missing(key, &format!("expected an array, found {:?}", other.value_type()))),
            None => Err(missing(key, "required")),
        }
    }

    /// An array of numbers as f32 (token scores); `None` when absent.
    pub fn opt_f32_array(&self, key: &str) -> Result<Option<Vec<f32>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::F32(x) => Ok(*x),
                    Value::F64(x) => Ok(*x as f32),
                    other => Err(missing(key, &format!("expected numbers, found {:?}", other.value_type()))),
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(other) => Err(missing(key, &format!("expected an array, found {:?}", other.value_type()))),
        }
    }

    /// An array of integers (token types); `None` when absent.
    pub fn opt_i64_array(&self, key: &str) -> Result<Option<Vec<i64>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| value_as_i64(v).ok_or_else(|| missing(key, "expected integers")))
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(other) => Err(missing(key, &format!("expected an array, found {:?}", other.value_type()))),
        }
    }

    /// The tensor directory, sorted by name.
    pub fn tensors(&self) -> Vec<TensorSummary> {
        let mut out: Vec<_> = self
            .content
            .tensor_infos
            .iter()
            .map(|(name, info)| {
                let dims = info.shape.dims().to_vec();
                // u64 and saturating: usize is 32 bits in wasm (`gguf_guard` has already refused shapes that overflow).
                let elems = dims.iter().fold(1u64, |acc, &d| acc.saturating_mul(d as u64));
                let bytes =
                    (elems / info.ggml_dtype.block_size() as u64).saturating_mul(info.ggml_dtype.type_size() as u64);
                TensorSummary { name: name.clone(), dtype: info.ggml_dtype, dims, bytes }
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// Dimensions of a tensor, outermost first.
    pub fn tensor_dims(&self, name: &str) -> Option<&[usize]> {
        self.content.tensor_infos.get(name).map(|i| i.shape.dims())
    }

    /// Reads one tensor's data (still quantized) from the file.
    pub fn tensor<R: Read + Seek>(&self, reader: &mut R, name: &str) -> Result<QTensor> {
        if !self.has_tensor(name) {
            return Err(EngineError::BadTensor { name: name.into(), why: "missing from the file".into() });
        }
        let info = &self.content.tensor_infos[name];
        let dims = info.shape.dims().to_vec();
        let elements: usize = dims.iter().product();
        let bytes = elements / info.ggml_dtype.block_size() * info.ggml_dtype.type_size();
        reader.seek(SeekFrom::Start(self.content.tensor_data_offset + info.offset))?;
        let blocks = read_blocks(reader, info.ggml_dtype, bytes).map_err(|e| match e {
            EngineError::Io(e) => EngineError::Io(std::io::Error::new(e.kind(), format!("reading tensor {name}: {e}"))),
            e => e,
        })?;
        QTensor::new(QStorage::Cpu(blocks), dims).context(&format!("reading tensor {name}"))
    }

    /// A one-line rendering of each metadata entry, long arrays summarised: what the app shows after loading.
    pub fn metadata_summary(&self) -> Vec<(String, String)> {
        let mut out: Vec<_> = self.content.metadata.iter().map(|(k, v)| (k.clone(), summarize_value(v))).collect();
        out.sort();
        out
    }
}

fn missing(key: &str, why: &str) -> EngineError {
    EngineError::MissingMetadata { key: key.into(), why: why.into() }
}

fn value_as_u64(v: &Value) -> Option<u64> {
    match *v {
        Value::U8(x) => Some(x as u64),
        Value::U16(x) => Some(x as u64),
        Value::U32(x) => Some(x as u64),
        Value::U64(x) => Some(x),
        Value::I8(x) if x >= 0 => Some(x as u64),
        Value::I16(x) if x >= 0 => Some(x as u64),
        Value::I32(x) if x >= 0 => Some(x as u64),
        Value::I64(x) if x >= 0 => Some(x as u64),
        _ => None,
    }
}

fn value_as_i64(v: &Value) -> Option<i64> {
    match *v {
        Value::I8(x) => Some(x as i64),
        Value::I16(x) => Some(x as i64),
        Value::I32(x) => Some(x as i64),
        Value::I64(x) => Some(x),
        _ => value_as_u64(v).map(|x| x as i64),
    }
}

fn summarize_value(v: &Value) -> String {
    match v {
        Value::String(s) if s.chars().count() > 120 => {
            format!("{}… ({} characters)", s.chars().take(120).collect::<String>(), s.chars().count())
        }
        Value::String(s) => s.clone(),
        Value::Array(items) if items.len() > 8 => format!("[{} items]", items.len()),
        Value::Array(items) => format!("[{}]", items.iter().map(summarize_value).collect::<Vec<_>>().join(", ")),
        Value::Bool(b) => b.to_string(),
        Value::F32(x) => x.to_string(),
        Value::F64(x) => x.to_string(),
        other => value_as_i64(other).map(|x| x.to_string()).unwrap_or_else(|| format!("{other:?}")),
    }
}

/// Reads as many bytes as are there, up to `buf.len()`.
fn read_up_to<R: Read>(reader: &mut R, buf: &mut [u8]) -> Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match reader.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn describe_magic(magic: &[u8; 4]) -> String {
    if magic.iter().all(|b| b.is_ascii_graphic() || *b == b' ') {
        format!("\"{}\"", String::from_utf8_lossy(magic))
    } else {
        format!("bytes {:02x} {:02x} {:02x} {:02x}", magic[0], magic[1], magic[2], magic[3])
    }
}

/// candle reports a short read as an I/O error and an unknown tensor type by its number: say what they mean.
fn header_error(e: candle_core::Error, file_size: u64) -> EngineError {
    let text = e.to_string();
    if text.contains("failed to fill whole buffer") || text.contains("UnexpectedEof") {
        return EngineError::Truncated {
            what: "it ends inside the header (metadata or tensor directory)".into(),
            actual: file_size,
            expected: ExpectedBytes(None),
        };
    }
    if let Some(code) = text.strip_prefix("unknown dtype for tensor ").map(|s| s.trim().to_string()) {
        return EngineError::UnsupportedTensorType { tensor: "a tensor".into(), dtype: format!("ggml type {code}") };
    }
    if text.contains("unsupported magic/version") {
        return EngineError::InvalidRequest(format!("unsupported GGUF version ({text}); versions 1 to 3 are read"));
    }
    EngineError::Tensor { context: "reading the GGUF header".into(), source: e }
}

/// Reads `bytes` bytes of `dtype` blocks at the reader's position. candle's own reader reads them into a buffer and
/// then copies that into the blocks; for Gemma's 178 MB embedding those two copies took 0.2-0.28 s natively. Here
/// they are read once, into memory the allocator hands out zeroed.
fn read_blocks<R: Read>(reader: &mut R, dtype: GgmlDType, bytes: usize) -> Result<Box<dyn QuantizedType>> {
    fn read<T: Send + Sync + 'static, R: Read>(reader: &mut R, bytes: usize) -> Result<Box<dyn QuantizedType>>
    where
        Vec<T>: QuantizedType,
    {
        let count = bytes / std::mem::size_of::<T>();
        let mut blocks = zeroed::<T>(count)?;
        // SAFETY: the vector's `count` elements are initialised (zeroed) and span exactly these bytes.
        let raw =
            unsafe { std::slice::from_raw_parts_mut(blocks.as_mut_ptr() as *mut u8, count * std::mem::size_of::<T>()) };
        reader.read_exact(raw)?;
        Ok(Box::new(blocks))
    }
    match dtype {
        GgmlDType::F32 => read::<f32, R>(reader, bytes),
        GgmlDType::F16 => read::<f16, R>(reader, bytes),
        GgmlDType::BF16 => read::<bf16, R>(reader, bytes),
        GgmlDType::Q4_0 => read::<BlockQ4_0, R>(reader, bytes),
        GgmlDType::Q4_1 => read::<BlockQ4_1, R>(reader, bytes),
        GgmlDType::Q5_0 => read::<BlockQ5_0, R>(reader, bytes),
        GgmlDType::Q8_0 => read::<BlockQ8_0, R>(reader, bytes),
        GgmlDType::Q4K => read::<BlockQ4K, R>(reader, bytes),
        GgmlDType::Q6K => read::<BlockQ6K, R>(reader, bytes),
        other => Err(EngineError::UnsupportedTensorType { tensor: "a tensor".into(), dtype: type_name(other).into() }),
    }
}

/// A Q8_0 matrix of `rows x cols` values whose blocks `fill` writes into zeroed bytes, row after row: how the CPU
/// path stores rows it rewrites (`QuantMatrix::for_decoding`) without a second copy.
pub(crate) fn q8_0_matrix(rows: usize, cols: usize, fill: impl FnOnce(&mut [u8])) -> Result<QTensor> {
    const { assert!(std::mem::size_of::<BlockQ8_0>() == 34, "ggml's block_q8_0: an f16 and 32 bytes") };
    let count = rows * cols / 32;
    let mut blocks = zeroed::<BlockQ8_0>(count)?;
    // SAFETY: as in `read_blocks`: the vector's `count` elements are initialised (zeroed) and span these bytes.
    let raw = unsafe { std::slice::from_raw_parts_mut(blocks.as_mut_ptr() as *mut u8, count * 34) };
    fill(raw);
    QTensor::new(QStorage::Cpu(Box::new(blocks)), vec![rows, cols]).context("a Q8_0 matrix")
}

/// `count` values whose bytes are all zero, from the allocator's zeroed memory (which the system zeroes lazily).
/// Only for plain data: floats, and GGML blocks of integers and f16 scales, for which all-zero bytes is a value.
fn zeroed<T>(count: usize) -> Result<Vec<T>> {
    let layout = std::alloc::Layout::array::<T>(count)
        .map_err(|_| EngineError::Io(std::io::Error::other(format!("{count} blocks do not fit in memory"))))?;
    if layout.size() == 0 {
        return Ok(Vec::new());
    }
    // SAFETY: the layout is not empty; the allocation is checked; all-zero bytes are a valid T (see above), so all
    // `count` elements are initialised, and the vector owns the allocation with the layout it was made with.
    unsafe {
        let ptr = std::alloc::alloc_zeroed(layout) as *mut T;
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        Ok(Vec::from_raw_parts(ptr, count, count))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every tensor of the fixture files, read once into its blocks, holds the bytes candle's own reader gives.
    #[test]
    fn tensors_read_as_candle_reads_them() {
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        for name in ["tiny-gemma3.gguf", "tiny-gemma2.gguf", "tiny-llama.gguf"] {
            let bytes = std::fs::read(fixtures.join(name)).unwrap();
            let mut reader = std::io::Cursor::new(bytes.as_slice());
            let gguf = GgufFile::read(&mut reader).unwrap();
            let tensors = gguf.tensors();
            assert!(tensors.len() > 5, "{name}");
            for t in tensors {
                let ours = gguf.tensor(&mut reader, &t.name).unwrap();
                let candle = gguf.content.tensor(&mut reader, &t.name, &candle_core::Device::Cpu).unwrap();
                assert_eq!((ours.dtype(), ours.shape()), (candle.dtype(), candle.shape()), "{name}: {}", t.name);
                assert_eq!(ours.data().unwrap(), candle.data().unwrap(), "{name}: {}", t.name);
            }
        }
    }
}
