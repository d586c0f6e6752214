//! Errors are values with messages a person can act on, all the way up to the page and the command line.

use std::fmt;

/// Everything that can go wrong while loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The bytes do not start with the GGUF magic: someone picked the wrong file.
    #[error("not a GGUF file: it starts with {found} instead of \"GGUF\" (is this a safetensors, zip or HTML file?)")]
    NotGguf { found: String },

    /// The file ends before the header, the metadata or a tensor's data does.
    #[error("the GGUF file is truncated: {what} (the file has {actual} bytes{expected}); download it again")]
    Truncated { what: String, actual: u64, expected: ExpectedBytes },

    /// A length, count, shape or offset in the GGUF header that the file cannot hold (a crafted or damaged file).
    #[error("the GGUF header is malformed near byte {at}: {what}")]
    MalformedGguf { at: u64, what: String },

    /// The GGUF is readable but describes a model family this engine does not implement.
    #[error(
        "unsupported architecture \"{0}\": this engine runs gemma3, gemma2 and llama (SmolLM2, Llama 3) GGUF files"
    )]
    UnsupportedArchitecture(String),

    /// A tensor is stored in a quantization this engine does not read.
    #[error("tensor {tensor} uses the unsupported quantization {dtype}; supported: {}", SUPPORTED_TYPES_TEXT)]
    UnsupportedTensorType { tensor: String, dtype: String },

    /// A metadata key the architecture needs is absent or has the wrong type.
    #[error("the GGUF metadata lacks {key} ({why})")]
    MissingMetadata { key: String, why: String },

    /// A tensor the architecture needs is absent or has an unexpected shape.
    #[error("tensor {name}: {why}")]
    BadTensor { name: String, why: String },

    /// The tokenizer described by the metadata cannot be built.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// Prompt plus generation would not fit in the context window.
    #[error("the input is {tokens} tokens but the context holds {context}; shorten the prompt or lower the number of new tokens")]
    ContextOverflow { tokens: usize, context: usize },

    /// A caller passed something inconsistent (a hook on a layer that does not exist, an empty prompt...).
    #[error("{0}")]
    InvalidRequest(String),

    /// An error from the tensor library, with the step that hit it.
    #[error("{context}: {source}")]
    Tensor { context: String, source: candle_core::Error },

    /// No usable GPU, or the GPU refused something at load time.
    #[error("GPU: {0}")]
    Gpu(String),

    /// The GPU device was lost or failed while running; results after this are unusable.
    #[error("{0}; the model has to be loaded again (the CPU backend always works)")]
    GpuLost(String),

    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),

    /// The caller asked a long task (a discovery, an evaluation) to stop.
    #[error("stopped on request")]
    Stopped,
}

/// The quantizations this engine reads, for error messages and docs.
pub const SUPPORTED_TYPES_TEXT: &str = "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q6_K";

/// "expected N bytes" where it is known, nothing otherwise.
#[derive(Debug, Clone, Copy)]
pub struct ExpectedBytes(pub Option<u64>);

impl fmt::Display for ExpectedBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(n) => write!(f, ", at least {n} expected"),
            None => Ok(()),
        }
    }
}

pub type Result<T> = std::result::Result<T, EngineError>;

/// Adds the step that failed to a candle error.
pub(crate) trait TensorContext<T> {
    fn context(self, what: &str) -> Result<T>;
}

impl<T> TensorContext<T> for candle_core::Result<T> {
    fn context(self, what: &str) -> Result<T> {
        self.map_err(|source| EngineError::Tensor { context: what.to_string(), source })
    }
}
