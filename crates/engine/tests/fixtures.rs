//! Small random models of each architecture, in every quantization the engine reads, against Hugging Face
//! transformers run on the same weights dequantized by gguf-py (scripts/dev/make_fixtures.py). Gemma 2 has no
//! real file offline, so this is where its softcaps and alternating windows are checked; the windows are 4 tokens
//! wide and the prompts 13, so every sliding layer masks.

mod common;

use common::*;
use saif_engine::{block_on, generate, GenerateOptions, Hooks, LogitsWanted, Positions, Sampling, Segment};

fn check_fixture(name: &str, backend: Backend) {
    let mut engine = load_on(&fixture_path(&format!("{name}.gguf")), backend);
    let reference = read_json(&fixture_path(&format!("{name}.json")));
    let n_layers = engine.config().n_layers;
    for case in reference["cases"].as_array().unwrap() {
        let input = ids(&case["input_ids"]);
        let hooks = (0..n_layers).fold(Hooks::none(), |h, l| h.read(l, Positions::Last));
        engine.model.reset();
        let out = block_on(engine.model.forward(&input, Segment::Prompt, &hooks, LogitsWanted::Last)).unwrap();
        let want = floats(&case["last_logits"]);
        assert_eq!(out.logits.len(), want.len());
        for (i, (&g, &w)) in out.logits.iter().zip(&want).enumerate() {
            assert!((g as f64 - w).abs() <= 1e-3 + 1e-3 * w.abs(), "{name} {input:?}: logit {i}: {g} vs {w}");
        }
        for c in &out.captures {
            let r = &case["resid_post_last_token"][c.layer.to_string()];
            let want_norm = r["norm"].as_f64().unwrap();
            assert!((norm(&c.values) / want_norm - 1.0).abs() < 1e-4, "{name}: resid_post[{}] norm", c.layer);
            for (g, w) in c.values.iter().zip(floats(&r["first8"])) {
                assert!((*g as f64 - w).abs() <= 1e-3 + 1e-4 * w.abs(), "{name}: resid_post[{}] {g} vs {w}", c.layer);
            }
        }
        let options = GenerateOptions { max_new_tokens: 8, sampling: Sampling::Greedy, stop_tokens: vec![] };
        let g = block_on(generate(engine.model.as_mut(), &input, &options, &Hooks::none(), |_| true)).unwrap();
        assert_eq!(g.ids, ids(&case["greedy8_ids"]), "{name} {input:?}: greedy tokens");
    }
}

#[test]
fn tiny_gemma3_matches_transformers() {
    check_fixture("tiny-gemma3", Backend::Cpu);
}

#[test]
fn tiny_gemma3_matches_transformers_on_the_gpu() {
    check_fixture("tiny-gemma3", Backend::Wgpu);
}

#[test]
fn tiny_gemma2_matches_transformers() {
    check_fixture("tiny-gemma2", Backend::Cpu);
}

#[test]
fn tiny_gemma2_matches_transformers_on_the_gpu() {
    check_fixture("tiny-gemma2", Backend::Wgpu);
}

#[test]
fn tiny_llama_matches_transformers() {
    check_fixture("tiny-llama", Backend::Cpu);
}

#[test]
fn tiny_llama_matches_transformers_on_the_gpu() {
    check_fixture("tiny-llama", Backend::Wgpu);
}

/// The real-GPU form of the matrix products (16 threads per row), run on this machine's adapter whatever it is.
#[test]
fn tiny_models_match_transformers_with_cooperative_rows() {
    for name in ["tiny-gemma3", "tiny-gemma2", "tiny-llama"] {
        check_fixture(name, Backend::WgpuCooperative);
    }
}

/// The matrix products' lanes added by subgroup shuffles, as GPUs with subgroups get them.
#[test]
fn tiny_models_match_transformers_with_subgroup_rows() {
    for name in ["tiny-gemma3", "tiny-gemma2", "tiny-llama"] {
        check_fixture(name, Backend::WgpuSubgroup);
    }
}

#[test]
fn fixtures_use_every_supported_quantization() {
    for name in ["tiny-gemma3", "tiny-gemma2", "tiny-llama"] {
        let bytes = std::fs::read(fixture_path(&format!("{name}.gguf"))).unwrap();
        let gguf = saif_engine::GgufFile::from_bytes(&bytes).unwrap();
        let used: std::collections::BTreeSet<_> =
            gguf.tensors().iter().map(|t| saif_engine::gguf::type_name(t.dtype)).collect();
        for t in saif_engine::gguf::SUPPORTED_TYPES {
            assert!(used.contains(saif_engine::gguf::type_name(t)), "{name} lacks {}", saif_engine::gguf::type_name(t));
        }
    }
}
