//! The SAEs the project ships for the offline models, found without any flag: `public/saes/<model key>/layer_<L>/`
//! (the app serves the same folder). Search order: `$SAIF_SAES`, the repository the `saif` binary was built in
//! (`<exe>/../../public/saes`), `./public/saes`.

use std::path::{Path, PathBuf};

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
