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
