//! Sparse autoencoders on the residual stream and the SAIF method (He et al. 2025, arXiv 2502.11356), on top of
//! `saif_engine`.
//!
//! `sae`: the SAE formats, encoding and decoding; `corpus`: texts and the activations a model makes on them;
//! `train`: TopK SAE training (on the CPU, or natively on a GPU); `eval`: FVU, L0, dead latents, loss recovered; `lens`: what a latent means;
//! `defaults`: the SAEs shipped for the offline models.

pub mod corpus;
pub mod defaults;
pub mod eval;
pub mod lens;
pub mod sae;
pub mod train;

pub use sae::{Activation, Sae, SaeError, SaeInfo, StoreAs};
