//! Paths and loaders shared by the engine's integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

use saif_engine::{Engine, LoadOptions};

/// The offline models (`make setup` puts them in ~/.cache/saif/models, or $SAIF_MODELS).
pub fn model_path(file: &str) -> PathBuf {
    let dir = std::env::var_os("SAIF_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/saif/models"));
    let path = dir.join(file);
    assert!(path.exists(), "{} is missing: run `make setup` (it fetches the offline models)", path.display());
    path
}

pub const GEMMA: &str = "gemma-3-270m-q4_k_m.gguf";
pub const SMOLLM: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// `../shared/golden/<name>` beside the repository.
pub fn golden_path(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/golden").join(name);
    assert!(path.exists(), "{} is missing (the shared folder beside the checkout)", path.display());
    path
}

/// The project's own references of the offline models (scripts/dev/make_references.py).
pub fn reference_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/reference").join(name)
}

pub fn fixture_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

pub fn load(path: &std::path::Path) -> Engine {
    let file = std::fs::File::open(path).unwrap();
    Engine::load_cpu(&mut std::io::BufReader::new(file), &LoadOptions::default())
        .unwrap_or_else(|e| panic!("loading {}: {e}", path.display()))
}

pub fn read_json(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

pub fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

pub fn norm(v: &[f32]) -> f64 {
    v.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt()
}
