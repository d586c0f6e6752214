//! The WebGPU backend (wgpu): the same transformer as `model::cpu`, with WGSL kernels that read the GGUF's
//! quantized blocks directly, a KV cache in GPU memory, hooks on the residual stream, and token selection on the
//! device. Runs in browsers (WebGPU) and natively (Vulkan, Metal, DX12; Mesa's lavapipe on a CPU).
//!
//! `context` opens the device, `kernels` compiles the `.wgsl` files, `weights` uploads matrices, `model` plans
//! and records the forward pass.

pub mod context;
pub mod kernels;
pub mod model;
pub mod weights;

pub use context::Gpu;
pub use model::GpuModel;

/// The wgpu this backend is built on, for crates that add kernels of their own (the SAE trainer).
pub use wgpu;
