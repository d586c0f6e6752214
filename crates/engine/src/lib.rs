//! The inference engine behind SAIF in the browser: GGUF models (Gemma 3, Gemma 2, Llama) with a KV cache,
//! residual-stream hooks for SAEs and steering, and sampling. It has no UI and runs natively and in wasm.
//!
//! Reading order, bottom up: `gguf` (the file) -> `config` (the model's shape) -> `tensors` (its weights by name)
//! -> `tokenizer` and `chat` (text to ids) -> `model` (the forward pass, per backend) with `hooks` -> `sampler` and
//! `generate` (tokens out).
//! `Engine` bundles a loaded model with its tokenizer for the command-line tool and the app.

pub mod bench;
pub mod chat;
pub mod config;
pub mod error;
pub mod fingerprint;
pub mod generate;
pub mod gguf;
mod gguf_guard;
pub mod gpu;
pub mod hooks;
pub mod likelihood;
pub mod model;
pub mod quant;
pub mod sampler;
mod team;
pub mod tensors;
pub mod tokenizer;

mod engine;

pub use chat::ChatTemplate;
pub use config::{Architecture, ModelConfig};
pub use engine::{Engine, LoadStep};
pub use error::{EngineError, Result};
pub use fingerprint::ModelFingerprint;
pub use generate::{
    generate, generate_async, generate_batch, GenerateOptions, Generation, SequenceRequest, StopReason,
};
pub use gguf::GgufFile;
pub use hooks::{Capture, Hooks, Positions, Scope, Segment};
pub use likelihood::token_nll;
#[cfg(not(target_arch = "wasm32"))]
pub use model::block_on;
pub use model::cpu::{CpuModel, LoadOptions};
pub use model::{BackendStats, BatchCall, LanguageModel, LocalBoxFuture, LogitsWanted, Picked, Readout, StepOutput};
pub use sampler::{pick, Sampling};
pub use tokenizer::Tokenizer;
