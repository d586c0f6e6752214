//! Sparse autoencoders on the residual stream and the SAIF method (He et al. 2025, arXiv 2502.11356), on top of
//! `saif_engine`.
//!
//! `sae`: the SAE formats, encoding and decoding.

pub mod sae;

pub use sae::{Activation, Sae, SaeError, SaeInfo, StoreAs};
