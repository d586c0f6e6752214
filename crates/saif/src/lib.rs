//! Sparse autoencoders on the residual stream and the SAIF method (He et al. 2025, arXiv 2502.11356), on top of
//! `saif_engine`.
//!
//! SAEs: `sae` (formats, encoding, decoding), `corpus` (texts and the activations a model makes on them), `train`
//! (TopK SAE training, on the CPU or natively on a GPU), `eval` (FVU, L0, dead latents, loss recovered), `lens`
//! (what a latent means), `residual_norm` (the residual stream's size at an SAE's layer, recorded in its config),
//! `defaults` (the SAEs shipped for the offline models).
//!
//! The SAIF method, in the order an experiment runs: `data` (the built-in instructions and contents, and the
//! prompts made from them) -> `discover` (the latents that encode an instruction) -> `steer` (SAE latents,
//! difference-in-means and random latents as residual-stream hooks) -> `evaluate` (methods on held-out contents,
//! judged by `check`, summarised by `metrics`) -> `sweep` (one setting varied, drawn by `chart`). `progress`
//! reports on and stops the long tasks.

pub mod chart;
pub mod check;
pub mod corpus;
pub mod data;
pub mod defaults;
pub mod discover;
pub mod eval;
pub mod evaluate;
pub mod lens;
pub mod metrics;
pub mod progress;
pub mod residual_norm;
pub mod sae;
pub mod steer;
pub mod sweep;
pub mod train;

pub use sae::{Activation, Sae, SaeError, SaeInfo, StoreAs};
