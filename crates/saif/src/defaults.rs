//! What the project ships for the offline models, found without any flag:
//! - the SAEs, `public/saes/<model key>/layer_<L>/` (the app serves the same folder). Search order: `$SAIF_SAES`,
//!   the repository the `saif` binary was built in (`<exe>/../../public/saes`), `./public/saes`;
//! - the steering settings the sweeps found best per model and instruction (`crates/saif/data/steering.json`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Steering settings for one model and instruction.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SteeringDefaults {
    /// The layer steered and read by the SAE.
    pub layer: usize,
    /// SAIF's strength (the multiplier of the latents' mean activations).
    pub alpha: f32,
    /// Latents steered with.
    pub k: usize,
    /// Difference-in-means' strength at the same layer.
    pub diffmean_alpha: f32,
}

/// The recorded settings for `model_key` and `instruction` (its own entry, else the model's "*" entry).
pub fn steering(model_key: &str, instruction: &str) -> Option<SteeringDefaults> {
    let all: serde_json::Value = serde_json::from_str(include_str!("../data/steering.json")).ok()?;
    let model = all.get("models")?.get(model_key)?;
    let entry = model.get(instruction).or_else(|| model.get("*"))?;
    serde_json::from_value(entry.clone()).ok()
}

pub fn search_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("SAIF_SAES") {
        dirs.push(PathBuf::from(d));
    }
    if let Ok(exe) = std::env::current_exe() {
        // target/release/saif -> the repository root
        if let Some(root) = exe.parent().and_then(Path::parent).and_then(Path::parent) {
            dirs.push(root.join("public/saes"));
        }
    }
    dirs.push(PathBuf::from("public/saes"));
    dirs
}

/// The shipped layers of a model's SAEs, ascending, with their folders.
pub fn shipped(model_key: &str) -> Vec<(usize, PathBuf)> {
    for dir in search_dirs() {
        let model_dir = dir.join(model_key);
        let Ok(entries) = std::fs::read_dir(&model_dir) else { continue };
        let mut layers: Vec<(usize, PathBuf)> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let layer = name.strip_prefix("layer_")?.parse().ok()?;
                e.path().join("params.safetensors").exists().then(|| (layer, e.path()))
            })
            .collect();
        if !layers.is_empty() {
            layers.sort();
            return layers;
        }
    }
    Vec::new()
}

/// The shipped SAE of `model_key` at `layer`, or at its last shipped layer when `layer` is `None`.
pub fn find(model_key: &str, layer: Option<usize>) -> Option<(usize, PathBuf)> {
    let all = shipped(model_key);
    match layer {
        Some(l) => all.into_iter().find(|(x, _)| *x == l),
        None => all.into_iter().last(),
    }
}
