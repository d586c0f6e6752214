//! The residual-stream hooks: reads capture `resid_post` at the asked positions; adds change the stream exactly
//! as `h + v` would, in the scope asked for.

mod common;

use common::*;
use saif_engine::{block_on, generate, GenerateOptions, Hooks, LogitsWanted, Positions, Sampling, Scope, Segment};

#[test]
fn reads_capture_the_asked_positions() {
    let mut engine = load(&fixture_path("tiny-gemma3.gguf"));
    let prompt = [2u32, 40, 41, 42, 43, 44];
    let hooks = Hooks::none().read(1, Positions::All).read(4, Positions::At(vec![0, 3, 9])).read(5, Positions::Last);
    engine.model.reset();
    let out = block_on(engine.model.forward(&prompt, Segment::Prompt, &hooks, LogitsWanted::Last)).unwrap();
    let at = |layer: usize| out.captures.iter().filter(|c| c.layer == layer).map(|c| c.position).collect::<Vec<_>>();
    assert_eq!(at(1), vec![0, 1, 2, 3, 4, 5]);
    assert_eq!(at(4), vec![0, 3]);
    assert_eq!(at(5), vec![5]);
    // Position 9 falls in a later call.
    let out =
        block_on(engine.model.forward(&[50, 51, 52, 53], Segment::Generated, &hooks, LogitsWanted::Last)).unwrap();
    let at = |layer: usize| out.captures.iter().filter(|c| c.layer == layer).map(|c| c.position).collect::<Vec<_>>();
    assert_eq!(at(4), vec![9]);
    assert_eq!(at(5), vec![9]);
}

/// Adding v to resid_post of the last layer must give logits = W_U rmsnorm(h + v), computed here in f64 from the
/// file's own tensors.
#[test]
fn an_add_on_the_last_layer_equals_the_manual_computation() {
    let path = fixture_path("tiny-llama.gguf");
    let mut engine = load(&path);
    let (hidden, last) = (engine.config().hidden, engine.config().n_layers - 1);
    let prompt = [10u32, 20, 30];
    engine.model.reset();
    let reads = Hooks::none().read(last, Positions::Last);
    let clean = block_on(engine.model.forward(&prompt, Segment::Prompt, &reads, LogitsWanted::Last)).unwrap();
    let h = &clean.captures[0].values;
    let v: Vec<f32> = (0..hidden).map(|i| ((i * 31 % 17) as f32 - 8.0) * 0.5).collect();
    engine.model.reset();
    let adds = Hooks::none().add(last, v.clone(), Scope::All);
    let steered = block_on(engine.model.forward(&prompt, Segment::Prompt, &adds, LogitsWanted::Last)).unwrap();

    let x: Vec<f64> = h.iter().zip(&v).map(|(&a, &b)| a as f64 + b as f64).collect();
    let unembed = Unembedding::of(&path);
    assert_eq!(x.len(), hidden);
    for (id, want) in unembed.logits(&x).into_iter().enumerate() {
        let got = steered.logits[id] as f64;
        assert!((got - want).abs() < 1e-3 * (1.0 + want.abs()), "logit {id}: {got} vs {want}");
    }
    assert!((steered.logits[0] - clean.logits[0]).abs() > 1e-3, "the vector changed nothing");
}

#[test]
fn zero_vectors_change_nothing_and_scopes_are_respected() {
    let mut engine = load(&fixture_path("tiny-gemma2.gguf"));
    let hidden = engine.config().hidden;
    let prompt = [2u32, 60, 61, 62, 63, 64];
    let options = GenerateOptions { max_new_tokens: 6, sampling: Sampling::Greedy, stop_tokens: vec![] };
    let run = |engine: &mut saif_engine::Engine, hooks: &Hooks| {
        block_on(generate(engine.model.as_mut(), &prompt, &options, hooks, |_| true)).unwrap()
    };
    let clean = run(&mut engine, &Hooks::none());
    let zero = run(&mut engine, &Hooks::none().add(1, vec![0.0; hidden], Scope::All));
    assert_eq!(clean.prompt_logits, zero.prompt_logits);
    assert_eq!(clean.ids, zero.ids);

    let v: Vec<f32> = (0..hidden).map(|i| if i % 3 == 0 { 25.0 } else { -10.0 }).collect();
    // Generated-only: the prompt's logits are untouched.
    let generated_only = run(&mut engine, &Hooks::none().add(1, v.clone(), Scope::Generated));
    assert_eq!(generated_only.prompt_logits, clean.prompt_logits);
    // Prompt-only and all: the prompt's logits move.
    let prompt_only = run(&mut engine, &Hooks::none().add(1, v.clone(), Scope::Prompt));
    let all = run(&mut engine, &Hooks::none().add(1, v, Scope::All));
    assert_ne!(prompt_only.prompt_logits, clean.prompt_logits);
    assert_eq!(prompt_only.prompt_logits, all.prompt_logits);
}

/// The GPU backend's hooks give what the CPU backend's give: the same captures, the same steered logits and
/// tokens, in every scope.
#[test]
fn gpu_hooks_match_cpu_hooks() {
    for name in ["tiny-gemma3", "tiny-llama"] {
        let path = fixture_path(&format!("{name}.gguf"));
        let mut cpu = load_on(&path, Backend::Cpu);
        let mut gpu = load_on(&path, Backend::Wgpu);
        let hidden = cpu.config().hidden;
        let v: Vec<f32> = (0..hidden).map(|i| ((i * 13 % 7) as f32 - 3.0) * 0.8).collect();
        let prompt = [2u32, 44, 45, 46, 47];
        for scope in [Scope::All, Scope::Prompt, Scope::Generated] {
            let hooks = Hooks::none().read(1, Positions::All).read(2, Positions::Last).add(1, v.clone(), scope);
            let options = GenerateOptions {
                max_new_tokens: 5,
                sampling: Sampling::Random { temperature: 0.9, top_k: Some(50), top_p: Some(0.95), seed: 3 },
                stop_tokens: vec![],
            };
            let a = block_on(generate(cpu.model.as_mut(), &prompt, &options, &hooks, |_| true)).unwrap();
            let b = block_on(generate(gpu.model.as_mut(), &prompt, &options, &hooks, |_| true)).unwrap();
            assert_eq!(a.ids, b.ids, "{name} {scope:?}: tokens");
            assert_eq!(a.captures.len(), b.captures.len());
            for (x, y) in a.captures.iter().zip(&b.captures) {
                assert_eq!((x.layer, x.position), (y.layer, y.position));
                for (p, q) in x.values.iter().zip(&y.values) {
                    assert!((p - q).abs() <= 1e-4 * (1.0 + p.abs()), "{name} {scope:?}: capture {p} vs {q}");
                }
            }
        }
    }
}

/// A lost GPU device turns every later call into a clear error, not garbage or a panic.
#[test]
fn a_lost_gpu_device_is_reported() {
    let gpu = std::rc::Rc::new(block_on(saif_engine::gpu::Gpu::new()).unwrap());
    let bytes = std::fs::read(fixture_path("tiny-llama.gguf")).unwrap();
    let mut engine = block_on(saif_engine::Engine::load_wgpu(
        &mut std::io::Cursor::new(&bytes),
        &saif_engine::LoadOptions::default(),
        Some(gpu.clone()),
    ))
    .unwrap();
    assert!(block_on(engine.model.forward(&[5, 6], Segment::Prompt, &Hooks::none(), LogitsWanted::Last)).is_ok());
    gpu.device.destroy();
    let _ = gpu.device.poll(wgpu::PollType::Poll);
    let err = block_on(engine.model.forward(&[7], Segment::Generated, &Hooks::none(), LogitsWanted::Last)).unwrap_err();
    assert!(matches!(err, saif_engine::EngineError::GpuLost(_)), "{err}");
    assert!(err.to_string().contains("lost") && err.to_string().contains("CPU backend"), "{err}");
}

/// Per-position additions: adding -h at every position of the last layer zeroes the stream there, so every
/// logit of every position is 0 (the final norm of a zero vector is zero), on both backends.
#[test]
fn per_position_additions_reach_every_position_on_both_backends() {
    for backend in [Backend::Cpu, Backend::Wgpu] {
        let mut engine = load_on(&fixture_path("tiny-llama.gguf"), backend);
        let (last, hidden) = (engine.config().n_layers - 1, engine.config().hidden);
        let prompt = [5u32, 6, 7, 8];
        engine.model.reset();
        let reads = Hooks::none().read(last, Positions::All);
        let out = block_on(engine.model.forward(&prompt, Segment::Prompt, &reads, LogitsWanted::Last)).unwrap();
        let minus_h: Vec<f32> = out.captures.iter().flat_map(|c| c.values.iter().map(|v| -v)).collect();
        assert_eq!(minus_h.len(), prompt.len() * hidden);
        engine.model.reset();
        let zeroing = Hooks::none().add_rows(last, 0, minus_h);
        let out = block_on(engine.model.forward(&prompt, Segment::Prompt, &zeroing, LogitsWanted::All)).unwrap();
        let all = out.all_logits.unwrap();
        assert!(all.iter().all(|&l| l.abs() < 1e-4), "{backend:?}: logits of a zeroed stream");
        assert!(out.logits.iter().all(|&l| l.abs() < 1e-4));
    }
}

/// Setting the projection of resid_post of the last layer onto u to c must give logits = W_U rmsnorm(h + (c - h.u) u),
/// computed here in f64 from the file's own tensors, on both backends.
#[test]
fn a_projection_on_the_last_layer_equals_the_manual_computation() {
    let path = fixture_path("tiny-llama.gguf");
    for backend in [Backend::Cpu, Backend::Wgpu] {
        let mut engine = load_on(&path, backend);
        let (hidden, last) = (engine.config().hidden, engine.config().n_layers - 1);
        let prompt = [10u32, 20, 30];
        engine.model.reset();
        let reads = Hooks::none().read(last, Positions::Last);
        let clean = block_on(engine.model.forward(&prompt, Segment::Prompt, &reads, LogitsWanted::Last)).unwrap();
        let h = &clean.captures[0].values;
        let raw: Vec<f64> = (0..hidden).map(|i| ((i * 29 % 13) as f64 - 6.0) * 0.3).collect();
        let norm = raw.iter().map(|x| x * x).sum::<f64>().sqrt();
        let unit: Vec<f32> = raw.iter().map(|x| (x / norm) as f32).collect();
        let c = 7.5f32;
        engine.model.reset();
        let hooks = Hooks::none().project(last, unit.clone(), c, Scope::All);
        let steered = block_on(engine.model.forward(&prompt, Segment::Prompt, &hooks, LogitsWanted::Last)).unwrap();

        let along: f64 = h.iter().zip(&unit).map(|(&a, &u)| a as f64 * u as f64).sum();
        let x: Vec<f64> = h.iter().zip(&unit).map(|(&a, &u)| a as f64 + (c as f64 - along) * u as f64).collect();
        for (id, want) in Unembedding::of(&path).logits(&x).into_iter().enumerate() {
            let got = steered.logits[id] as f64;
            assert!((got - want).abs() < 1e-3 * (1.0 + want.abs()), "{backend:?} logit {id}: {got} vs {want}");
        }
        assert!((steered.logits[0] - clean.logits[0]).abs() > 1e-3, "{backend:?}: the projection changed nothing");
    }
}

/// A generated-only hook leaves every prompt position's logits alone and changes the generated positions'; a
/// prompt-only hook does the opposite (the generated tokens' logits move only through the prompt's keys and values,
/// so they are compared on the same fed tokens, with the cache made under the hook). Both kinds of steering, both
/// backends.
#[test]
fn generated_and_prompt_scopes_touch_only_their_positions() {
    let path = fixture_path("tiny-gemma3.gguf");
    for backend in [Backend::Cpu, Backend::Wgpu] {
        let mut engine = load_on(&path, backend);
        let hidden = engine.config().hidden;
        let v: Vec<f32> = (0..hidden).map(|i| if i % 2 == 0 { 4.0 } else { -3.0 }).collect();
        let unit: Vec<f32> = {
            let n = (hidden as f32).sqrt();
            (0..hidden).map(|_| 1.0 / n).collect()
        };
        let prompt = [2u32, 40, 41, 42];
        let next = [43u32, 44];
        // Logits after every prompt position, and after each fed generated token, under `hooks`.
        let run = |engine: &mut saif_engine::Engine, hooks: &Hooks| {
            engine.model.reset();
            let p = block_on(engine.model.forward(&prompt, Segment::Prompt, hooks, LogitsWanted::All)).unwrap();
            let g = block_on(engine.model.forward(&next, Segment::Generated, hooks, LogitsWanted::All)).unwrap();
            (p.all_logits.unwrap(), g.all_logits.unwrap())
        };
        let clean = run(&mut engine, &Hooks::none());
        for hooks in [
            Hooks::none().add(1, v.clone(), Scope::Generated),
            Hooks::none().project(1, unit.clone(), 6.0, Scope::Generated),
        ] {
            let (p, g) = run(&mut engine, &hooks);
            assert_eq!(p, clean.0, "{backend:?}: a generated-only hook changed the prompt's logits");
            assert!(differ(&g, &clean.1), "{backend:?}: a generated-only hook changed nothing it covers");
        }
        for hooks in
            [Hooks::none().add(1, v.clone(), Scope::Prompt), Hooks::none().project(1, unit.clone(), 6.0, Scope::Prompt)]
        {
            let (p, g) = run(&mut engine, &hooks);
            assert!(differ(&p, &clean.0), "{backend:?}: a prompt-only hook left the prompt alone");
            // The generated positions differ only through the cache: the same hook on an empty cache of
            // generated tokens alone must leave them untouched.
            engine.model.reset();
            let alone = block_on(engine.model.forward(&next, Segment::Generated, &hooks, LogitsWanted::All)).unwrap();
            engine.model.reset();
            let alone_clean =
                block_on(engine.model.forward(&next, Segment::Generated, &Hooks::none(), LogitsWanted::All)).unwrap();
            assert_eq!(
                alone.all_logits, alone_clean.all_logits,
                "{backend:?}: a prompt-only hook ran on generated tokens"
            );
            assert!(differ(&g, &clean.1), "through the cache, the prompt's change reaches later tokens");
        }
    }
}

/// The scopes against residuals computed by hand. A vector added to resid_post of the last layer changes nothing
/// that later positions attend to, so every position's logits must be W_U rmsnorm(h_p + v) where the scope covers
/// p and W_U rmsnorm(h_p) where it does not, h_p being the clean stream read at p. Prompt positions and fed
/// generated tokens, every scope, both backends, computed in f64 from the file's own tensors.
#[test]
fn each_scope_steers_exactly_its_positions_by_hand_computed_residuals() {
    let path = fixture_path("tiny-llama.gguf");
    let unembed = Unembedding::of(&path);
    let prompt = [10u32, 20, 30, 11];
    let next = [40u32, 41, 42];
    for backend in [Backend::Cpu, Backend::Wgpu] {
        let mut engine = load_on(&path, backend);
        let (hidden, last) = (engine.config().hidden, engine.config().n_layers - 1);
        let v: Vec<f32> = (0..hidden).map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.6).collect();
        // Every position's logits, prompt then generated, with the clean stream read at each.
        let run = |engine: &mut saif_engine::Engine, hooks: &Hooks| {
            engine.model.reset();
            let p = block_on(engine.model.forward(&prompt, Segment::Prompt, hooks, LogitsWanted::All)).unwrap();
            let g = block_on(engine.model.forward(&next, Segment::Generated, hooks, LogitsWanted::All)).unwrap();
            let logits = [p.all_logits.unwrap(), g.all_logits.unwrap()].concat();
            let clean: Vec<Vec<f32>> = p.captures.into_iter().chain(g.captures).map(|c| c.values).collect();
            (logits, clean)
        };
        for scope in [Scope::All, Scope::Prompt, Scope::Generated] {
            let hooks = Hooks::none().read(last, Positions::All).add(last, v.clone(), scope);
            let (logits, clean) = run(&mut engine, &hooks);
            let vocab = logits.len() / (prompt.len() + next.len());
            assert_eq!(clean.len(), prompt.len() + next.len());
            // Written out rather than asked of `Scope::covers`, so that a wrong `covers` cannot move the expectation.
            let covers = |p: usize| match scope {
                Scope::All => true,
                Scope::Prompt => p < prompt.len(),
                Scope::Generated => p >= prompt.len(),
            };
            let mut moved = 0;
            for (p, h) in clean.iter().enumerate() {
                let covered = covers(p);
                let x: Vec<f64> =
                    h.iter().zip(&v).map(|(&a, &b)| a as f64 + if covered { b as f64 } else { 0.0 }).collect();
                let want = unembed.logits(&x);
                let got = &logits[p * vocab..(p + 1) * vocab];
                for (id, (&g, &w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g as f64 - w).abs() < 1e-3 * (1.0 + w.abs()),
                        "{backend:?} {scope:?} position {p} logit {id}: {g} vs {w} (covered: {covered})"
                    );
                }
                let unsteered = unembed.logits(&h.iter().map(|&a| a as f64).collect::<Vec<_>>());
                if covered && want.iter().zip(&unsteered).any(|(a, b)| (a - b).abs() > 0.1) {
                    moved += 1;
                }
            }
            assert_eq!(
                moved,
                (0..clean.len()).filter(|&p| covers(p)).count(),
                "{backend:?} {scope:?}: the vector must move every covered position"
            );
        }
    }
}

/// The model's unembedding, W_U rmsnorm(x), in f64 from the file's own tensors (tied embeddings, no softcap:
/// the Llama fixture).
struct Unembedding {
    w_u: Vec<Vec<f32>>,
    norm: Vec<f32>,
    eps: f64,
}

impl Unembedding {
    fn of(path: &std::path::Path) -> Self {
        let bytes = std::fs::read(path).unwrap();
        let gguf = saif_engine::GgufFile::from_bytes(&bytes).unwrap();
        let mut cursor = std::io::Cursor::new(&bytes);
        let dev = candle_core::Device::Cpu;
        let mut tensor = |name: &str| gguf.tensor(&mut cursor, name).unwrap().dequantize(&dev).unwrap();
        let w_u = tensor("token_embd.weight").to_vec2::<f32>().unwrap();
        let norm = tensor("output_norm.weight").to_vec1::<f32>().unwrap();
        let eps = saif_engine::ModelConfig::from_gguf(&gguf).unwrap().rms_eps as f64;
        Unembedding { w_u, norm, eps }
    }

    fn logits(&self, x: &[f64]) -> Vec<f64> {
        let rms = (x.iter().map(|a| a * a).sum::<f64>() / x.len() as f64 + self.eps).sqrt();
        self.w_u
            .iter()
            .map(|row| row.iter().zip(x).zip(&self.norm).map(|((&w, &a), &g)| w as f64 * a / rms * g as f64).sum())
            .collect()
    }
}

fn differ(a: &[f32], b: &[f32]) -> bool {
    a.iter().zip(b).any(|(x, y)| (x - y).abs() > 1e-4)
}

/// Reading a prompt alone (`read_prompt`, which on the CPU stops after the last hooked layer and computes no
/// logits) captures exactly what a full forward pass captures, and leaves the model reset, on both backends.
#[test]
fn read_prompt_captures_what_a_full_pass_captures() {
    for name in ["tiny-llama", "tiny-gemma3"] {
        for backend in [Backend::Cpu, Backend::Wgpu] {
            let mut engine = load_on(&fixture_path(&format!("{name}.gguf")), backend);
            let prompt = [2u32, 40, 41, 42, 43];
            for hooks in [
                Hooks::none().read(0, Positions::All),
                Hooks::none().read(1, Positions::Last).read(0, Positions::At(vec![1, 3])),
                Hooks::none().read(engine.config().n_layers - 1, Positions::Last),
            ] {
                engine.model.reset();
                let full =
                    block_on(engine.model.forward(&prompt, Segment::Prompt, &hooks, LogitsWanted::Last)).unwrap();
                block_on(engine.model.forward(&[50], Segment::Generated, &Hooks::none(), LogitsWanted::Last)).unwrap();
                let read = block_on(engine.model.read_prompt(&prompt, &hooks)).unwrap();
                let what = format!("{name} on {backend:?}");
                assert!(!read.is_empty(), "{what}: something was read");
                assert_eq!(read, full.captures, "{what}: the captures");
                assert_eq!(engine.model.position(), 0, "{what}: the model is reset after the read");
            }
        }
    }
}

/// Reading several prompts at once (`read_prompts`: on the CPU, one batched pass) captures for each prompt what
/// `read_prompt` captures for it alone, and leaves every sequence it used reset, on both backends.
#[test]
fn read_prompts_captures_what_each_prompt_alone_captures() {
    for name in ["tiny-llama", "tiny-gemma3"] {
        for backend in [Backend::Cpu, Backend::Wgpu] {
            let mut engine = load_on(&fixture_path(&format!("{name}.gguf")), backend);
            let last = engine.config().n_layers - 1;
            // Prompts of different lengths, with different hooks each (as discovery's positives and negatives).
            let prompts: Vec<Vec<u32>> = vec![
                vec![2, 40, 41, 42, 43, 44, 45],
                vec![2, 7, 8, 9, 10, 11],
                (0..40).map(|i| 2 + (i * 37) % 200).collect(),
                vec![2, 60, 61, 62, 63, 64, 65, 66, 67],
                vec![2, 70],
            ];
            let hooks = [
                Hooks::none().read(last, Positions::Last),
                Hooks::none().read(0, Positions::All),
                Hooks::none().read(1, Positions::At(vec![3, 39])),
                Hooks::none().read(last, Positions::At(vec![5, 6, 7, 8])),
                Hooks::none().read(0, Positions::Last),
            ];
            let calls: Vec<(&[u32], &Hooks)> = prompts.iter().map(|p| &p[..]).zip(&hooks).collect();
            let together = block_on(engine.model.read_prompts(&calls)).unwrap();
            let what = format!("{name} on {backend:?}");
            assert_eq!(together.len(), prompts.len(), "{what}: one list per prompt");
            for (i, (prompt, hooks)) in calls.iter().enumerate() {
                let alone = block_on(engine.model.read_prompt(prompt, hooks)).unwrap();
                assert!(!alone.is_empty(), "{what}: prompt {i} read something");
                assert_eq!(together[i], alone, "{what}: prompt {i}'s captures");
            }
            for sequence in 0..prompts.len() {
                assert_eq!(engine.model.sequence_position(sequence), 0, "{what}: sequence {sequence} is reset");
            }
        }
    }
}

/// The same on Gemma 3 270M, whose matrices are large enough for the prompt form's bands to reach the kernels
/// whose sums depend on the shape (the fixtures' do not): prompts of discovery's length in batches of 2 and 5, a
/// 3-token one among them (read alone), bit for bit what each gives alone.
#[test]
fn read_prompts_of_a_real_model_equal_each_read_alone() {
    let mut engine = load_on(&model_path(GEMMA), Backend::Cpu);
    let mut prompts: Vec<Vec<u32>> =
        (0..4u32).map(|s| (0..30 + 3 * s).map(|i| 2 + (i * 37 + s * 101) % 5000).collect()).collect();
    prompts.insert(2, vec![2, 600, 601]);
    let hooks = [Hooks::none().read(5, Positions::Last), Hooks::none().read(2, Positions::All)];
    for hooks in &hooks {
        let calls: Vec<(&[u32], &Hooks)> = prompts.iter().map(|p| (&p[..], hooks)).collect();
        for n in [2, 5] {
            let together = block_on(engine.model.read_prompts(&calls[..n])).unwrap();
            for (i, &(prompt, hooks)) in calls[..n].iter().enumerate() {
                let alone = block_on(engine.model.read_prompt(prompt, hooks)).unwrap();
                assert_eq!(together[i], alone, "prompt {i} of {n}");
            }
        }
    }
}
