//! Batched generation gives every sequence exactly what generating it alone gives: the same tokens, the same
//! prompt logits and the same captures, bit for bit, with steering, projections and reads active and with
//! different sampling per sequence, and the same tokens as `generate` (whose products sum in another order). On the
//! CPU and on wgpu, which batches decoding steps whose hooks only add (on GPUs, and on lavapipe when told) and runs
//! the others one after the other.

mod common;

use common::*;
use saif_engine::{
    block_on, generate, generate_batch, pick, BatchCall, Engine, GenerateOptions, Generation, Hooks, LogitsWanted,
    Positions, Sampling, Scope, Segment, SequenceRequest,
};

fn requests_for(engine: &Engine) -> (Vec<Vec<u32>>, Vec<Hooks>, Vec<GenerateOptions>) {
    let (hidden, layers) = (engine.config().hidden, engine.config().n_layers);
    let v: Vec<f32> = (0..hidden).map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.6).collect();
    let unit: Vec<f32> = {
        let raw: Vec<f32> = (0..hidden).map(|i| (i * 5 % 9) as f32 - 4.0).collect();
        let n = norm(&raw) as f32;
        raw.iter().map(|x| x / n).collect()
    };
    let prompts = vec![
        vec![2, 40, 41, 42, 43],
        vec![2, 50],
        vec![2, 60, 61, 62, 63, 64, 65, 66],
        vec![2, 70, 71],
        vec![2, 80, 81, 82],
    ];
    let hooks = vec![
        Hooks::none(),
        Hooks::none().add(1, v.clone(), Scope::All).read(layers - 1, Positions::All),
        Hooks::none().add(0, v.clone(), Scope::Generated).read(1, Positions::Last),
        Hooks::none().project(1, unit, 2.0, Scope::All),
        Hooks::none().add(layers - 1, v, Scope::Prompt),
    ];
    let greedy = |n| GenerateOptions { max_new_tokens: n, sampling: Sampling::Greedy, stop_tokens: vec![] };
    let random = |n, seed| GenerateOptions {
        max_new_tokens: n,
        sampling: Sampling::Random { temperature: 0.8, top_k: Some(40), top_p: Some(0.9), seed },
        stop_tokens: vec![],
    };
    // Different lengths, so sequences leave the batch at different steps; one stops at a token it will pick.
    let options = vec![greedy(7), random(5, 3), greedy(9), random(4, 11), greedy(6)];
    (prompts, hooks, options)
}

/// Logits of two summation orders of the same exact product.
fn close(a: &[f32], b: &[f32], what: &str) {
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() <= 1e-4 * (1.0 + x.abs()), "{what}: logit {x} vs {y}");
    }
}

fn same(a: &Generation, b: &Generation, what: &str) {
    assert_eq!(a.ids, b.ids, "{what}: tokens");
    assert_eq!(a.stop, b.stop, "{what}: stop reason");
    assert_eq!(a.prompt_logits, b.prompt_logits, "{what}: prompt logits");
    assert_eq!(a.captures, b.captures, "{what}: captures");
}

#[test]
fn batched_generation_equals_generation_alone() {
    for name in ["tiny-llama", "tiny-gemma3", "tiny-gemma2"] {
        for backend in [Backend::Cpu, Backend::Wgpu, Backend::WgpuBatched] {
            let mut engine = load_on(&fixture_path(&format!("{name}.gguf")), backend);
            let (prompts, hooks, mut options) = requests_for(&engine);
            // A stop token sequence 2 reaches midway (its third greedy token alone).
            let alone =
                block_on(generate(engine.model.as_mut(), &prompts[2], &options[2], &hooks[2], |_| true)).unwrap();
            options[2].stop_tokens = vec![alone.ids[2]];
            let stops_after = alone.ids.iter().position(|&t| t == alone.ids[2]).unwrap() + 1;
            let requests: Vec<SequenceRequest> = (0..prompts.len())
                .map(|i| SequenceRequest { prompt: &prompts[i], hooks: &hooks[i], options: &options[i] })
                .collect();
            let batched = block_on(generate_batch(engine.model.as_mut(), &requests, |_, _| async { true })).unwrap();
            for (i, b) in batched.iter().enumerate() {
                let what = format!("{name} on {backend:?}, sequence {i}");
                let alone = block_on(generate_batch(engine.model.as_mut(), &requests[i..i + 1], |_, _| async { true }));
                same(&alone.unwrap()[0], b, &what);
                let a =
                    block_on(generate(engine.model.as_mut(), &prompts[i], &options[i], &hooks[i], |_| true)).unwrap();
                assert_eq!(a.ids, b.ids, "{what}: generate's tokens");
                if let (Some(x), Some(y)) = (&a.prompt_logits, &b.prompt_logits) {
                    close(x, y, &what); // the GPU keeps its logits on the device
                }
            }
            assert_eq!(batched[2].ids.len(), stops_after, "sequence 2 stopped at its stop token");
            assert_eq!(batched[2].stop, saif_engine::StopReason::EndToken);
        }
    }
}

/// Generates `texts` (chat turns) as one batch and each alone, `tokens` greedy tokens each, with `hooks[i]` on
/// sequence i, and checks every sequence is the same both ways; returns the batch's generations and the prompts.
fn check_smollm2_batch(
    engine: &mut Engine,
    texts: &[&str],
    hooks: &[Hooks],
    tokens: usize,
) -> (Vec<Generation>, Vec<Vec<u32>>, GenerateOptions) {
    let prompts: Vec<Vec<u32>> =
        texts.iter().map(|t| engine.tokenizer.encode_prompt(&engine.chat.render(t, None)).unwrap()).collect();
    let options =
        GenerateOptions { max_new_tokens: tokens, sampling: Sampling::Greedy, stop_tokens: engine.chat_stop_tokens() };
    let requests: Vec<SequenceRequest> = (0..texts.len())
        .map(|i| SequenceRequest { prompt: &prompts[i], hooks: &hooks[i], options: &options })
        .collect();
    let batched = block_on(generate_batch(engine.model.as_mut(), &requests, |_, _| async { true })).unwrap();
    for (i, b) in batched.iter().enumerate() {
        let alone = block_on(generate_batch(engine.model.as_mut(), &requests[i..i + 1], |_, _| async { true }));
        same(&alone.unwrap()[0], b, &format!("SmolLM2 sequence {i}"));
    }
    (batched, prompts, options)
}

/// On a real model too: four chat prompts of SmolLM2, greedy, one steered; also the same tokens as `generate`.
#[test]
fn batched_generation_equals_generation_alone_on_smollm2() {
    let mut engine = load(&model_path(SMOLLM));
    let hidden = engine.config().hidden;
    let texts = ["The cat sleeps.", "Write a haiku about rain.", "What is 2 + 2?", "Name three colours."];
    let v: Vec<f32> = (0..hidden).map(|i| if i % 2 == 0 { 0.5 } else { -0.5 }).collect();
    let hooks = [Hooks::none(), Hooks::none().add(20, v, Scope::All), Hooks::none(), Hooks::none()];
    let (batched, prompts, options) = check_smollm2_batch(&mut engine, &texts, &hooks, 12);
    for (i, b) in batched.iter().enumerate() {
        let a = block_on(generate(engine.model.as_mut(), &prompts[i], &options, &hooks[i], |_| true)).unwrap();
        assert_eq!(a.ids, b.ids, "SmolLM2 sequence {i}: generate's tokens");
    }
}

/// With the opt-in 8-bit activations, which round the activations of decoding steps (batched ones in
/// `quant::int8_rows`), and the opt-in f16 cache, whose rows the attention kernels widen as they load them, a
/// sequence still gets in a batch exactly what it gets alone.
#[test]
fn batched_generation_equals_generation_alone_with_int8_activations_and_an_f16_cache() {
    let reader = &mut std::io::BufReader::new(std::fs::File::open(model_path(SMOLLM)).unwrap());
    let options = saif_engine::LoadOptions { max_context: Some(256), int8_activations: true, f16_cache: true };
    let mut engine = Engine::load_cpu(reader, &options).unwrap();
    let hidden = engine.config().hidden;
    let v: Vec<f32> = (0..hidden).map(|i| if i % 2 == 0 { 0.5 } else { -0.5 }).collect();
    let hooks = [Hooks::none(), Hooks::none().add(20, v, Scope::All).read(10, Positions::Last), Hooks::none()];
    check_smollm2_batch(&mut engine, &["The cat sleeps.", "Write a haiku about rain.", "What is 2 + 2?"], &hooks, 8);
}

/// On the GPU, decoding steps whose hooks only add to the residual stream (steering vectors, per-position rows)
/// run as one call of a token per sequence (`BackendStats::batched_steps` counts them), each token attending over
/// its own sequence's cache rows: every sequence gets the tokens and prompt logits it gets alone, and a step's
/// logits are bit for bit those of the sequence's one-token call alone.
#[test]
fn steps_that_only_add_run_as_one_call_on_the_gpu() {
    for name in ["tiny-llama", "tiny-gemma3", "tiny-gemma2"] {
        let mut engine = load_on(&fixture_path(&format!("{name}.gguf")), Backend::WgpuBatched);
        let (prompts, _, options) = requests_for(&engine);
        let (hidden, layers) = (engine.config().hidden, engine.config().n_layers);
        let v: Vec<f32> = (0..hidden).map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.6).collect();
        let rows: Vec<f32> = (0..6 * hidden).map(|i| ((i * 3 % 13) as f32 - 6.0) * 0.3).collect();
        let hooks = [
            Hooks::none(),
            Hooks::none().add(1, v.clone(), Scope::All),
            Hooks::none().add(0, v.clone(), Scope::Generated).add_rows(1, 3, rows),
            Hooks::none(),
            Hooks::none().add(layers - 1, v, Scope::Prompt),
        ];
        let requests: Vec<SequenceRequest> = (0..prompts.len())
            .map(|i| SequenceRequest { prompt: &prompts[i], hooks: &hooks[i], options: &options[i] })
            .collect();
        let steps_before = engine.model.stats().batched_steps.unwrap();
        let batched = block_on(generate_batch(engine.model.as_mut(), &requests, |_, _| async { true })).unwrap();
        // Every step but those with one sequence left: the longest request decodes 9 tokens, the second 7.
        let steps = engine.model.stats().batched_steps.unwrap() - steps_before;
        assert_eq!(steps, 6, "{name}: steps run as one call");
        for (i, b) in batched.iter().enumerate() {
            let alone = block_on(generate_batch(engine.model.as_mut(), &requests[i..i + 1], |_, _| async { true }));
            same(&alone.unwrap()[0], b, &format!("{name} on the GPU, sequence {i}"));
        }

        // One step of sequences 0 to 2 as one call, against each sequence's one-token call alone.
        let step_logits = |engine: &mut Engine, together: bool| -> Vec<Vec<f32>> {
            let model = engine.model.as_mut();
            for s in 0..3 {
                model.reset_sequence(s);
                let call = [BatchCall { sequence: s, tokens: &prompts[s], segment: Segment::Prompt, hooks: &hooks[s] }];
                block_on(model.forward_batch(&call)).unwrap();
            }
            let tokens = [[5u32], [6], [7]];
            let calls: Vec<BatchCall> = (0..3)
                .map(|s| BatchCall { sequence: s, tokens: &tokens[s], segment: Segment::Generated, hooks: &hooks[s] })
                .collect();
            if together {
                block_on(model.forward_batch(&calls)).unwrap().into_iter().map(|o| o.logits).collect()
            } else {
                calls
                    .iter()
                    .map(|c| block_on(model.forward_batch(std::slice::from_ref(c))).unwrap()[0].logits.clone())
                    .collect()
            }
        };
        let (together, alone) = (step_logits(&mut engine, true), step_logits(&mut engine, false));
        for s in 0..3 {
            assert_eq!(together[s], alone[s], "{name}: sequence {s}'s step logits in one call and alone");
        }
    }
}

/// `forward_batch_pick` gives each sequence the token `pick` takes from the logits `forward_batch` gives it (the CPU
/// picks on its pass's threads), with greedy and sampled picks at different steps side by side, and an empty batch
/// gives nothing on either.
#[test]
fn batched_picks_are_the_picks_of_the_batched_logits() {
    let mut engine = load_on(&fixture_path("tiny-llama.gguf"), Backend::Cpu);
    let (prompts, hooks, _) = requests_for(&engine);
    let picks = [
        (Sampling::Greedy, 0),
        (Sampling::Random { temperature: 0.8, top_k: Some(40), top_p: Some(0.9), seed: 3 }, 4),
        (Sampling::Random { temperature: 1.3, top_k: None, top_p: None, seed: 5 }, 1),
        (Sampling::Greedy, 7),
    ];
    let tokens = [[5u32], [6], [7], [8]];
    // Sequences 0 to 3 after their prompts, then one step of the four together.
    let step = |engine: &mut Engine| {
        let model = engine.model.as_mut();
        for s in 0..4 {
            model.reset_sequence(s);
            let call = [BatchCall { sequence: s, tokens: &prompts[s], segment: Segment::Prompt, hooks: &hooks[s] }];
            block_on(model.forward_batch(&call)).unwrap();
        }
        (0..4)
            .map(|s| BatchCall { sequence: s, tokens: &tokens[s], segment: Segment::Generated, hooks: &hooks[s] })
            .collect::<Vec<_>>()
    };
    let calls = step(&mut engine);
    let outputs = block_on(engine.model.forward_batch(&calls)).unwrap();
    let calls = step(&mut engine);
    let picked = block_on(engine.model.forward_batch_pick(&calls, &picks)).unwrap();
    for (s, ((out, got), (sampling, at))) in outputs.iter().zip(&picked).zip(&picks).enumerate() {
        assert_eq!(got.token, pick(&out.logits, sampling, *at), "sequence {s}'s token");
        assert_eq!(got.captures, out.captures, "sequence {s}'s captures");
    }
    assert!(block_on(engine.model.forward_batch(&[])).unwrap().is_empty());
    assert!(block_on(engine.model.forward_batch_pick(&[], &[])).unwrap().is_empty());
}

/// Greedy batched steps pick without most of the logits where the output matrix screens them (Q8_0 on both offline
/// models, `quant::greedy_screen`): the tokens are still `argmax` of the step's logits. Sixteen chat prompts twice
/// over, as sequences 0-15 and 16-31, step by step: one set's logits from `forward_batch`, the other's picks from
/// `forward_batch_pick`, each fed the same tokens.
#[test]
fn greedy_batched_picks_are_argmax_of_the_logits_on_both_models() {
    for name in [SMOLLM, GEMMA] {
        let mut engine = load(&model_path(name));
        let prompts: Vec<Vec<u32>> = (0..16)
            .map(|i| {
                let text = format!("Say something about the number {}.", i * 7 + 3);
                engine.tokenizer.encode_prompt(&engine.chat.render(&text, None)).unwrap()
            })
            .collect();
        let none = Hooks::none();
        let model = engine.model.as_mut();
        for s in 0..32 {
            model.reset_sequence(s);
            let call = [BatchCall { sequence: s, tokens: &prompts[s % 16], segment: Segment::Prompt, hooks: &none }];
            block_on(model.forward_batch(&call)).unwrap();
        }
        let mut tokens: Vec<[u32; 1]> = vec![[prompts[0][0]]; 16];
        let picks = vec![(Sampling::Greedy, 0); 16];
        for step in 0..4 {
            fn calls<'a>(first: usize, tokens: &'a [[u32; 1]], none: &'a Hooks) -> Vec<BatchCall<'a>> {
                (0..16)
                    .map(|i| BatchCall {
                        sequence: first + i,
                        tokens: &tokens[i],
                        segment: Segment::Generated,
                        hooks: none,
                    })
                    .collect()
            }
            let outputs = block_on(model.forward_batch(&calls(0, &tokens, &none))).unwrap();
            let picked = block_on(model.forward_batch_pick(&calls(16, &tokens, &none), &picks)).unwrap();
            for (i, (out, got)) in outputs.iter().zip(&picked).enumerate() {
                assert_eq!(got.token, pick(&out.logits, &Sampling::Greedy, 0), "{name}, step {step}, sequence {i}");
            }
            tokens = picked.iter().map(|p| [p.token]).collect();
        }
    }
}

/// `next_token_nlls` (SAIF's fluency measure) reads several prompts in one pass on the CPU, in groups its logits'
/// memory allows, and gives each prompt exactly what reading it alone gives: `reset`, `forward` with all positions'
/// logits, then `token_nll` of each next token, bit for bit. Prompts long and short (under `BATCH_INVARIANT_ROWS`,
/// read alone) mixed, on the tiny models (Gemma 2's softcapped logits among them) and both offline models (Gemma
/// 3's groups of about three answers).
#[test]
fn next_token_nlls_equal_each_prompt_read_alone() {
    let tiny = ["tiny-llama", "tiny-gemma3", "tiny-gemma2"].map(|name| fixture_path(&format!("{name}.gguf")));
    for path in tiny.into_iter().chain([model_path(SMOLLM), model_path(GEMMA)]) {
        let mut engine = load_on(&path, Backend::Cpu);
        let vocab = engine.config().vocab_size;
        let prompts: Vec<Vec<u32>> = [9usize, 2, 33, 30, 4, 33, 12, 5, 1, 33]
            .iter()
            .enumerate()
            .map(|(i, &n)| (0..n).map(|j| ((i * 131 + j * 17) % (vocab.min(500) - 2) + 2) as u32).collect())
            .collect();
        let refs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
        let together = block_on(engine.model.next_token_nlls(&refs)).unwrap();
        assert_eq!(together.len(), prompts.len());
        for (i, prompt) in prompts.iter().enumerate() {
            engine.model.reset();
            let out =
                block_on(engine.model.forward(prompt, Segment::Prompt, &Hooks::none(), LogitsWanted::All)).unwrap();
            let alone = saif_engine::likelihood::next_token_nlls(&out.all_logits.unwrap(), vocab, prompt);
            let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&together[i]), bits(&alone), "{}: prompt {i} ({} tokens)", path.display(), prompt.len());
        }
    }
}
