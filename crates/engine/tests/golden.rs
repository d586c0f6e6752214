//! The offline models against reference outputs of an independent implementation (Hugging Face transformers in
//! float32 on the same GGUF weights, ../shared/golden): token ids; per prompt the top-1 token, at least 8 of the
//! top 10 shared, the top-1 logit within 0.25 and the residual norms within 2%; 16 greedy tokens equal on at least
//! 4 of 5 prompts. The same criteria hold on the project's own further references (tests/reference).

mod common;

use common::*;
use saif_engine::sampler::top_candidates;
use saif_engine::{block_on, generate, Engine, GenerateOptions, Hooks, LogitsWanted, Positions, Sampling, Segment};

fn check_tokenizer(engine: &Engine, golden: &serde_json::Value) {
    for case in golden["tokenizer"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(engine.tokenizer.encode(text).unwrap(), ids(&case["ids"]), "tokenizing {text:?}");
    }
}

fn check_prompts(engine: &mut Engine, golden: &serde_json::Value) {
    let mut greedy_equal = 0;
    let prompts = golden["prompts"].as_array().unwrap();
    for p in prompts {
        let prompt = p["prompt"].as_str().unwrap();
        let input = engine.tokenizer.encode_prompt(prompt).unwrap();
        assert_eq!(input, ids(&p["input_ids"]), "input ids of {prompt:?}");

        let layers: Vec<usize> =
            p["resid_post_last_token"].as_object().unwrap().keys().map(|k| k.parse().unwrap()).collect();
        let hooks = layers.iter().fold(Hooks::none(), |h, &l| h.read(l, Positions::Last));
        engine.model.reset();
        let out = block_on(engine.model.forward(&input, Segment::Prompt, &hooks, LogitsWanted::Last)).unwrap();

        let top: Vec<(u32, f32)> = top_candidates(&out.logits, Some(10));
        let want_ids = ids(&p["top10_ids"]);
        let want_logits = floats(&p["top10_logits"]);
        assert_eq!(top[0].0, want_ids[0], "top-1 token of {prompt:?}");
        let shared = top.iter().filter(|(id, _)| want_ids.contains(id)).count();
        assert!(shared >= 8, "{prompt:?}: only {shared} of the top 10 shared");
        let dlogit = (top[0].1 as f64 - want_logits[0]).abs();
        assert!(dlogit <= 0.25, "{prompt:?}: top-1 logit {} vs {}", top[0].1, want_logits[0]);

        for c in &out.captures {
            let want = p["resid_post_last_token"][c.layer.to_string()]["norm"].as_f64().unwrap();
            let rel = (norm(&c.values) / want - 1.0).abs();
            assert!(rel <= 0.02, "{prompt:?}: resid_post[{}] norm {} vs {want}", c.layer, norm(&c.values));
        }
        assert_eq!(out.captures.len(), layers.len());

        let options =
            GenerateOptions { max_new_tokens: 16, sampling: Sampling::Greedy, stop_tokens: engine.stop_tokens() };
        let generation = block_on(generate(engine.model.as_mut(), &input, &options, &Hooks::none(), |_| true)).unwrap();
        let want = ids(&p["greedy16_ids"]);
        if generation.ids == want {
            greedy_equal += 1;
        } else {
            eprintln!("{prompt:?}: greedy tokens differ:\n  got  {:?}\n  want {want:?}", generation.ids);
        }
    }
    assert!(greedy_equal >= 4, "greedy tokens equal on only {greedy_equal} of {} prompts", prompts.len());
}

fn check_model(file: &str, golden: &str, reference: &str, backend: Backend) {
    let golden = read_json(&golden_path(golden));
    let reference = read_json(&reference_path(reference));
    let mut engine = load_on(&model_path(file), backend);
    check_tokenizer(&engine, &golden);
    check_prompts(&mut engine, &golden);
    // Prompts the golden files lack (Spanish, German, code, chat turns, and 600-token prompts that cross Gemma 3's
    // 512-token sliding window), with references made the same way (scripts/dev/make_references.py).
    assert!(reference["prompts"].as_array().unwrap().iter().any(|p| p["input_ids"].as_array().unwrap().len() > 512));
    check_prompts(&mut engine, &reference);
}

#[test]
fn gemma3_270m_matches_the_reference() {
    check_model(GEMMA, "gemma-3-270m-q4_k_m.json", "gemma-3-270m-q4_k_m.json", Backend::Cpu);
}

#[test]
fn smollm2_135m_matches_the_reference() {
    check_model(SMOLLM, "smollm2-135m-instruct-q4_1.json", "SmolLM2-135M-Instruct.Q4_1.json", Backend::Cpu);
}

/// The same criteria on the GPU backend (lavapipe where the machine has no GPU).
#[test]
fn gemma3_270m_matches_the_reference_on_the_gpu() {
    check_model(GEMMA, "gemma-3-270m-q4_k_m.json", "gemma-3-270m-q4_k_m.json", Backend::Wgpu);
}

#[test]
fn smollm2_135m_matches_the_reference_on_the_gpu() {
    check_model(SMOLLM, "smollm2-135m-instruct-q4_1.json", "SmolLM2-135M-Instruct.Q4_1.json", Backend::Wgpu);
}

/// Two of SmolLM2's golden answers end early with EOS (id 2), which must be the last generated token.
#[test]
fn generation_stops_after_eos_and_keeps_it() {
    let golden = read_json(&golden_path("smollm2-135m-instruct-q4_1.json"));
    let mut engine = load(&model_path(SMOLLM));
    let mut seen = 0;
    for p in golden["prompts"].as_array().unwrap() {
        let want = ids(&p["greedy16_ids"]);
        if want.len() == 16 {
            continue;
        }
        let input = engine.tokenizer.encode_prompt(p["prompt"].as_str().unwrap()).unwrap();
        let options =
            GenerateOptions { max_new_tokens: 16, sampling: Sampling::Greedy, stop_tokens: engine.stop_tokens() };
        let g = block_on(generate(engine.model.as_mut(), &input, &options, &Hooks::none(), |_| true)).unwrap();
        assert_eq!(g.ids, want);
        assert_eq!(*g.ids.last().unwrap(), engine.tokenizer.eos().unwrap());
        assert_eq!(g.stop, saif_engine::StopReason::EndToken);
        seen += 1;
    }
    assert!(seen >= 1, "the golden file has no early-ending answer to check");
}
