//! Decoding with the KV cache gives the logits of recomputing the whole sequence, and a prompt fed in pieces gives
//! those of feeding it at once: on the real models and on the fixtures, whose 4-token windows make the cached and
//! the recomputed attention mask different keys.

mod common;

use common::*;
use saif_engine::{block_on, Engine, Hooks, LogitsWanted, Segment};

fn max_rel_diff(a: &[f32], b: &[f32]) -> f64 {
    let scale = b.iter().fold(0f64, |m, &x| m.max(x.abs() as f64)).max(1.0);
    a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).abs()).fold(0.0, f64::max) / scale
}

fn check_cache(engine: &mut Engine, prompt: &[u32], continuation: &[u32]) {
    let none = Hooks::none();
    engine.model.reset();
    block_on(engine.model.forward(prompt, Segment::Prompt, &none, LogitsWanted::Last)).unwrap();
    let mut seq = prompt.to_vec();
    let mut cached = Vec::new();
    for &t in continuation {
        cached
            .push(block_on(engine.model.forward(&[t], Segment::Generated, &none, LogitsWanted::Last)).unwrap().logits);
        seq.push(t);
    }
    assert_eq!(engine.model.position(), seq.len());
    // Recompute: one forward over the whole sequence, with logits at every position.
    engine.model.reset();
    let all = block_on(engine.model.forward(&seq, Segment::Prompt, &none, LogitsWanted::All)).unwrap();
    let all = all.all_logits.unwrap();
    let vocab = engine.config().vocab_size;
    for (i, logits) in cached.iter().enumerate() {
        let pos = prompt.len() + i;
        let fresh = &all[pos * vocab..(pos + 1) * vocab];
        let d = max_rel_diff(logits, fresh);
        assert!(d < 1e-4, "position {pos}: cached and recomputed logits differ by {d}");
    }
    // The same prompt in three pieces.
    engine.model.reset();
    let cut = [seq.len() / 3, 2 * seq.len() / 3];
    block_on(engine.model.forward(&seq[..cut[0]], Segment::Prompt, &none, LogitsWanted::Last)).unwrap();
    block_on(engine.model.forward(&seq[cut[0]..cut[1]], Segment::Prompt, &none, LogitsWanted::Last)).unwrap();
    let last =
        block_on(engine.model.forward(&seq[cut[1]..], Segment::Prompt, &none, LogitsWanted::Last)).unwrap().logits;
    let d = max_rel_diff(&last, &all[(seq.len() - 1) * vocab..]);
    assert!(d < 1e-4, "chunked prefill differs by {d}");
}

#[test]
fn cache_matches_recompute_on_fixtures() {
    cache_matches_recompute_on(Backend::Cpu);
}

#[test]
fn cache_matches_recompute_on_fixtures_on_the_gpu() {
    cache_matches_recompute_on(Backend::Wgpu);
}

fn cache_matches_recompute_on(backend: Backend) {
    for name in ["tiny-gemma3", "tiny-gemma2", "tiny-llama"] {
        let mut engine = load_on(&fixture_path(&format!("{name}.gguf")), backend);
        let prompt: Vec<u32> = (0..7).map(|i| 10 + 37 * i % 300).collect();
        let continuation: Vec<u32> = (0..9).map(|i| 20 + 53 * i % 290).collect();
        check_cache(&mut engine, &prompt, &continuation);
    }
}

#[test]
fn cache_matches_recompute_on_smollm2() {
    let mut engine = load(&model_path(SMOLLM));
    let prompt = engine.tokenizer.encode_prompt("The quick brown fox jumps over").unwrap();
    let continuation = engine.tokenizer.encode(" the lazy dog and runs into the forest").unwrap();
    check_cache(&mut engine, &prompt, &continuation);
}

#[test]
fn cache_matches_recompute_on_gemma3() {
    let mut engine = load(&model_path(GEMMA));
    let prompt = engine.tokenizer.encode_prompt("Les enfants jouent").unwrap();
    let continuation = engine.tokenizer.encode(" dans le jardin parce que").unwrap();
    check_cache(&mut engine, &prompt, &continuation);
}

/// The logits of a prompt and of each token of `continuation` decoded after it.
fn step_logits(engine: &mut Engine, prompt: &[u32], continuation: &[u32]) -> Vec<Vec<f32>> {
    let none = Hooks::none();
    engine.model.reset();
    let mut steps =
        vec![block_on(engine.model.forward(prompt, Segment::Prompt, &none, LogitsWanted::Last)).unwrap().logits];
    for &t in continuation {
        steps.push(block_on(engine.model.forward(&[t], Segment::Generated, &none, LogitsWanted::Last)).unwrap().logits);
    }
    steps
}

/// The largest `max_rel_diff` of any step.
fn largest_step_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    a.iter().zip(b).map(|(x, y)| max_rel_diff(x, y)).fold(0.0, f64::max)
}

/// The opt-in f16 cache on the GPU, in both its forms (f16 values with `shader-f16`, which lavapipe has, and f16
/// packed two to a u32 word, for SwiftShader and every device without it), on the fixtures and SmolLM2: a prompt
/// and decoding steps.
/// - The two forms hold the same bytes and give the same logits, bit for bit.
/// - The cache takes half the f32 cache's memory.
/// - Against the CPU's f16 cache: the backends' sums differ in order (by 1e-6 of the logits with f32 caches), and
///   near a rounding boundary that tips a value to the neighbouring f16, which the later layers amplify. Measured
///   (2026-12-05): each model's largest step differed by 0.12-0.47 of the f16 cache's own departure from the f32
///   cache (two GPU matrix-product forms differ from each other as much), so the bound is that departure itself.
///   The kernels' rounding is checked value by value in gpu_kernels.rs.
#[test]
fn an_f16_cache_on_the_gpu_matches_the_cpus() {
    let context = 256;
    let f16 = saif_engine::LoadOptions { max_context: Some(context), f16_cache: true, ..Default::default() };
    let f32 = saif_engine::LoadOptions { max_context: Some(context), ..Default::default() };
    let open = |path: &std::path::Path| std::io::BufReader::new(std::fs::File::open(path).unwrap());
    let on_gpu = |path: &std::path::Path, options: &saif_engine::LoadOptions, shader_f16: bool| {
        let gpu = block_on(saif_engine::gpu::Gpu::new()).unwrap();
        assert!(gpu.shader_f16, "{} offers no shader-f16", gpu.describe());
        let gpu = if shader_f16 { gpu } else { gpu.without_shader_f16() };
        block_on(Engine::load_wgpu(&mut open(path), options, Some(std::rc::Rc::new(gpu)))).unwrap()
    };
    for name in ["tiny-gemma3", "tiny-gemma2", "tiny-llama", "smollm2"] {
        let path = match name {
            "smollm2" => model_path(SMOLLM),
            fixture => fixture_path(&format!("{fixture}.gguf")),
        };
        let prompt: Vec<u32> = (0..7).map(|i| 10 + 37 * i % 300).collect();
        let continuation: Vec<u32> = (0..9).map(|i| 20 + 53 * i % 290).collect();
        let want = step_logits(&mut Engine::load_cpu(&mut open(&path), &f16).unwrap(), &prompt, &continuation);
        let rounding = largest_step_diff(&want, &step_logits(&mut load(&path), &prompt, &continuation));

        let f32_memory = on_gpu(&path, &f32, true).model.stats().gpu_memory_bytes.unwrap();
        let (mut native, mut packed) = (on_gpu(&path, &f16, true), on_gpu(&path, &f16, false));
        assert!(native.model.backend_name().ends_with("f16 cache"), "{}", native.model.backend_name());
        assert!(packed.model.backend_name().ends_with("packed in u32 words"), "{}", packed.model.backend_name());
        let c = native.config();
        let f32_cache_bytes = (2 * c.n_layers * native.model.max_context() * c.kv_dim() * 4) as u64;
        for engine in [&native, &packed] {
            let saved = f32_memory - engine.model.stats().gpu_memory_bytes.unwrap();
            assert_eq!(saved, f32_cache_bytes / 2, "{name}: memory the f16 cache saves");
        }
        let got = step_logits(&mut native, &prompt, &continuation);
        assert!(got == step_logits(&mut packed, &prompt, &continuation), "{name}: the packed form's logits");
        let d = largest_step_diff(&got, &want);
        eprintln!("{name}: GPU against CPU, f16 caches {d:.2e}; the f16 cache against the f32 cache {rounding:.2e}");
        assert!(d <= rounding, "{name}: the GPU's f16 cache departs from the CPU's by {d:.2e}");
    }
}
