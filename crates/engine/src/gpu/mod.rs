//! The WebGPU backend (wgpu): the same transformer as `model::cpu`, with WGSL kernels that read the GGUF's
//! quantized blocks directly, a KV cache in GPU memory, hooks on the residual stream, and token selection on the
//! device. Runs in browsers (WebGPU) and natively (Vulkan, Metal, DX12; Mesa's lavapipe on a CPU).
//!
//! `context` opens the device, `kernels` compiles the `.wgsl` files, `weights` holds matrices in GPU buffers,
//! `upload` reads a layer's weights from the GGUF onto the device, `plan` turns each part of the model into
//! dispatches (a layer's plan is `Planner::layer`), and `model` loads the model and runs the forward pass: a call
//! (`model::call`) or several sequences' steps at once (`model::batch`).

pub mod context;
pub mod kernels;
pub mod model;
mod plan;
mod upload;
pub mod weights;

pub use context::Gpu;
pub use model::GpuModel;

/// The wgpu this backend is built on, for crates that add kernels of their own (the SAE trainer).
pub use wgpu;
