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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every built-in instruction has an entry of its own for SmolLM2, read back unchanged, on a layer with a
    /// shipped SAE: a typo in steering.json would otherwise only show as defaults that silently differ.
    #[test]
    fn every_instruction_has_recorded_settings_on_a_shipped_layer() {
        let file: serde_json::Value = serde_json::from_str(include_str!("../data/steering.json")).unwrap();
        let smollm2 = &file["models"]["smollm2-135m"];
        let saes = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../public/saes/smollm2-135m");
        for instruction in crate::data::instructions() {
            let id = instruction.id.as_str();
            let entry = smollm2.get(id).unwrap_or_else(|| panic!("{id} has no entry of its own"));
            let recorded = steering("smollm2-135m", id).unwrap();
            assert_eq!(&serde_json::to_value(recorded).unwrap(), entry, "{id}");
            assert!(
                saes.join(format!("layer_{}", recorded.layer)).is_dir(),
                "{id}: no SAE at layer {}",
                recorded.layer
            );
            assert!(recorded.alpha > 0.0 && recorded.diffmean_alpha > 0.0 && recorded.k >= 1, "{id}: {recorded:?}");
        }
        assert_eq!(steering("no-such-model", "translate-fr"), None);
    }
}
