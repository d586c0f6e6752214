//! Paths and loaders shared by the engine's integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

use saif_engine::gpu::kernels::MatmulForm;
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
    load_on(path, Backend::Cpu)
}

/// Which backend a test runs the model on.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Backend {
    Cpu,
    /// wgpu on the machine's adapter: Mesa's lavapipe (Vulkan on the CPU) where there is no GPU.
    Wgpu,
    /// wgpu with the real-GPU form of the matrix products (16 threads share a row), whatever the adapter: so the
    /// form real GPUs get is run on lavapipe too.
    WgpuCooperative,
    /// wgpu with the matrix products' lanes added by subgroup shuffles (lavapipe has subgroups of 8).
    WgpuSubgroup,
    /// wgpu with decoding steps of several sequences run as one call, as GPUs run them (lavapipe, a CPU program,
    /// runs them one at a time unless told).
    WgpuBatched,
}

pub fn load_on(path: &std::path::Path, backend: Backend) -> Engine {
    let file = std::fs::File::open(path).unwrap();
    let reader = &mut std::io::BufReader::new(file);
    let options = LoadOptions { max_context: Some(1024), ..Default::default() };
    let engine = match backend {
        Backend::Cpu => Engine::load_cpu(reader, &options),
        Backend::Wgpu => saif_engine::block_on(Engine::load_wgpu(reader, &options, None)),
        Backend::WgpuCooperative => saif_engine::block_on(async {
            let gpu = saif_engine::gpu::Gpu::new().await?.with_matmul_form(MatmulForm::Cooperative);
            Engine::load_wgpu(reader, &options, Some(std::rc::Rc::new(gpu))).await
        }),
        Backend::WgpuBatched => saif_engine::block_on(async {
            let gpu = saif_engine::gpu::Gpu::new().await?.with_batched_steps(true);
            Engine::load_wgpu(reader, &options, Some(std::rc::Rc::new(gpu))).await
        }),
        Backend::WgpuSubgroup => saif_engine::block_on(async {
            let gpu = saif_engine::gpu::Gpu::new().await?;
            assert!(gpu.subgroup_size.is_some(), "{} offers no subgroups", gpu.describe());
            let gpu = gpu.with_matmul_form(MatmulForm::Subgroup);
            Engine::load_wgpu(reader, &options, Some(std::rc::Rc::new(gpu))).await
        }),
    };
    engine.unwrap_or_else(|e| panic!("loading {} on {backend:?}: {e}", path.display()))
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
