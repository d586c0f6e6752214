//! The SAIF method against independent computations on the offline SmolLM2: discovery's statistics against a hand
//! tally of a hand-made SAE's activations; steering against a hand-computed vector; an evaluation's numbers
//! against its own samples.

use std::path::PathBuf;

use saif::data::{self, Placement, PromptStyle};
use saif::discover::{discover, DiscoverOptions};
use saif::evaluate::{self, EvalOptions, Method};
use saif::progress::silent;
use saif::steer::{latent_vector, Steering};
use saif::{Activation, Sae, SaeInfo};
use saif_engine::{block_on, Engine, Hooks, LoadOptions, LogitsWanted, Positions, Scope, Segment};

fn smollm2() -> Engine {
    let dir = std::env::var_os("SAIF_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/saif/models"));
    let path = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(path.exists(), "{} is missing: run `make setup`", path.display());
    let file = std::fs::File::open(path).unwrap();
    Engine::load_cpu(&mut std::io::BufReader::new(file), &LoadOptions { max_context: Some(512), ..Default::default() })
        .unwrap()
}

const LAYER: usize = 20;

/// The residual at the last token of `ids` after `layer`.
fn last_residual(engine: &mut Engine, ids: &[u32], layer: usize, hooks: Hooks) -> Vec<f32> {
    engine.model.reset();
    let hooks = hooks.read(layer, Positions::Last);
    let out = block_on(engine.model.forward(ids, Segment::Prompt, &hooks, LogitsWanted::Last)).unwrap();
    out.captures.into_iter().find(|c| c.layer == layer).unwrap().values
}

/// A ReLU SAE of four latents over SmolLM2's residual, made by hand: latent 0 reads the direction from a negative's
/// residual to its positive's (so it fires more with the instruction), latents 1 to 3 fixed pseudo-random
/// directions; the biases put each latent near its firing threshold.
fn hand_sae(engine: &mut Engine) -> Sae {
    let d = engine.config().hidden;
    let instruction = data::instruction("translate-fr").unwrap();
    let content = data::discovery_contents()[200];
    let with = data::prompt(engine, content, Some(&instruction.canonical("x")), Placement::After, PromptStyle::Chat);
    let without = data::prompt(engine, content, None, Placement::After, PromptStyle::Chat);
    let pos = last_residual(engine, &with.unwrap().ids, LAYER, Hooks::none());
    let neg = last_residual(engine, &without.unwrap().ids, LAYER, Hooks::none());
    let mut directions: Vec<Vec<f32>> = vec![pos.iter().zip(&neg).map(|(p, n)| p - n).collect()];
    let mut state = 12345u64;
    for _ in 0..3 {
        directions.push(
            (0..d)
                .map(|_| {
                    state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    ((state >> 40) as f32 / (1u64 << 24) as f32) - 0.5
                })
                .collect(),
        );
    }
    let unit: Vec<Vec<f32>> = directions
        .iter()
        .map(|v| {
            let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.iter().map(|x| x / n).collect()
        })
        .collect();
    // Thresholds: half way along the positive's and negative's projections for latent 0; the negative's for the rest.
    let along = |h: &[f32], u: &[f32]| h.iter().zip(u).map(|(a, b)| a * b).sum::<f32>();
    let b_enc: Vec<f32> = unit
        .iter()
        .enumerate()
        .map(|(j, u)| if j == 0 { -(along(&pos, u) + along(&neg, u)) / 2.0 } else { -along(&neg, u) })
        .collect();
    let mut w_enc = vec![0f32; d * 4];
    for (j, u) in unit.iter().enumerate() {
        for i in 0..d {
            w_enc[i * 4 + j] = u[i];
        }
    }
    let w_dec: Vec<f32> = unit.iter().flatten().map(|x| x * 3.0).collect();
    Sae {
        info: SaeInfo {
            activation: Activation::Relu,
            d_in: d,
            d_sae: 4,
            layer: Some(LAYER),
            model: None,
            trained_on: None,
            extra: serde_json::json!({}),
        },
        w_enc,
        w_dec,
        b_enc,
        b_dec: vec![0.0; d],
        threshold: vec![0.0; 4],
    }
}

#[test]
fn discovery_statistics_match_a_hand_tally() {
    let mut engine = smollm2();
    let sae = hand_sae(&mut engine);
    let instruction = data::instruction("translate-fr").unwrap();
    let options = DiscoverOptions { contents: 6, tau: 0.0, k: 4, keyword: "x".into(), ..DiscoverOptions::default() };
    let found = block_on(discover(&mut engine, &sae, LAYER, instruction, &options, silent)).unwrap();

    // By hand: the same six contents, with the phrasings in turn, through the engine's read hook, then
    // relu(h . w_j + b_j) in f64 and the tallies.
    let (mut fired, mut sum) = ([[0usize; 4]; 2], [[0f64; 4]; 2]);
    for (i, content) in data::discovery_contents().iter().take(6).enumerate() {
        let phrasing = instruction.phrasing_for(i, "x");
        for (side, text) in [(0, Some(phrasing.as_str())), (1, None)] {
            let prompt = data::prompt(&engine, content, text, Placement::After, PromptStyle::Chat).unwrap();
            let h = last_residual(&mut engine, &prompt.ids, LAYER, Hooks::none());
            for j in 0..4 {
                let pre: f64 =
                    (0..h.len()).map(|i| h[i] as f64 * sae.w_enc[i * 4 + j] as f64).sum::<f64>() + sae.b_enc[j] as f64;
                let a = pre.max(0.0);
                if a > 0.0 {
                    fired[side][j] += 1;
                }
                sum[side][j] += a;
            }
        }
    }
    let mut expected: Vec<(usize, f64)> =
        (0..4).map(|j| (j, (sum[0][j] - sum[1][j]) / 6.0)).filter(|e| e.1 > 0.0).collect();
    expected.sort_by(|a, b| b.1.total_cmp(&a.1));
    assert!(!expected.is_empty() && expected[0].0 == 0, "the hand-made instruction latent comes first: {expected:?}");
    assert_eq!(
        found.latents.iter().map(|l| l.id).collect::<Vec<_>>(),
        expected.iter().map(|e| e.0).collect::<Vec<_>>()
    );
    for l in &found.latents {
        let j = l.id;
        assert!((l.freq_pos as f64 - fired[0][j] as f64 / 6.0).abs() < 1e-6, "latent {j} freq_pos");
        assert!((l.freq_neg as f64 - fired[1][j] as f64 / 6.0).abs() < 1e-6, "latent {j} freq_neg");
        let tol = |x: f64| 1e-3 * (1.0 + x.abs());
        assert!((l.mean_pos as f64 - sum[0][j] / 6.0).abs() < tol(sum[0][j] / 6.0), "latent {j} mean_pos");
        assert!((l.mean_neg as f64 - sum[1][j] / 6.0).abs() < tol(sum[1][j] / 6.0), "latent {j} mean_neg");
    }
    assert_eq!((found.positives, found.negatives), (6, 6));
}

#[test]
fn steering_adds_the_hand_computed_vector() {
    let mut engine = smollm2();
    let sae = hand_sae(&mut engine);
    let latents = [(0usize, 1.5f32), (2, -0.75)];
    let multiplier = 2.0;
    let vector = latent_vector(&sae, &latents, multiplier).unwrap();
    // By hand, in f64, from the decoder rows.
    let d = engine.config().hidden;
    let hand: Vec<f32> = (0..d)
        .map(|i| {
            latents.iter().map(|&(j, s)| multiplier as f64 * s as f64 * sae.w_dec[j * d + i] as f64).sum::<f64>() as f32
        })
        .collect();
    for (a, b) in vector.iter().zip(&hand) {
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }
    // In the model: the residual after the next layer is what adding the hand vector gives, and not the clean one.
    let ids = engine.tokenizer.encode_prompt(&engine.chat.render("The cat sleeps.", None)).unwrap();
    let steering = Steering::Add { layer: LAYER, vector, scope: Scope::All };
    let steered = last_residual(&mut engine, &ids, LAYER + 1, steering.hooks());
    let by_hand = last_residual(&mut engine, &ids, LAYER + 1, Hooks::none().add(LAYER, hand, Scope::All));
    let clean = last_residual(&mut engine, &ids, LAYER + 1, Hooks::none());
    for (a, b) in steered.iter().zip(&by_hand) {
        assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
    }
    assert!(steered.iter().zip(&clean).any(|(a, b)| (a - b).abs() > 1e-2));
    // Latents the SAE lacks, and strengths that overflow, are refused.
    assert!(latent_vector(&sae, &[(4, 1.0)], 1.0).unwrap_err().to_string().contains("latent 4 does not exist"));
    assert!(latent_vector(&sae, &[(0, 3e38)], 10.0).unwrap_err().to_string().contains("overflow"));
    assert!(latent_vector(&sae, &[(0, f32::NAN)], 1.0).is_err());
}

#[test]
fn an_evaluation_reports_what_its_samples_say() {
    let mut engine = smollm2();
    let instruction = data::instruction("uppercase").unwrap();
    let contents: Vec<String> = data::heldout_contents().iter().take(3).map(|s| s.to_string()).collect();
    let mut options = EvalOptions::new(Method::Prompt, 0, 1.0, 1);
    options.max_new_tokens = 8;
    let report = block_on(evaluate::run(&mut engine, instruction, &contents, None, &options, silent)).unwrap();
    assert_eq!((report.n, report.samples.len()), (3, 3));
    let loose = report.samples.iter().filter(|s| s.loose).count();
    assert_eq!(report.loose, loose as f64 / 3.0);
    assert_eq!(report.loose_ci, saif::metrics::wilson(loose, 3));
    for s in &report.samples {
        let check = saif::check::Check::for_instruction(instruction, &s.content, "x");
        assert_eq!(check.judge(&s.output), saif::check::Verdict { strict: s.strict, loose: s.loose });
    }
    assert!(report.fluency.perplexity.is_finite() && report.fluency.mean_tokens > 0.0);
    // Empty contents and a steering method without an SAE are refused before any work.
    assert!(block_on(evaluate::run(&mut engine, instruction, &[], None, &options, silent)).is_err());
    let saif_options = EvalOptions::new(Method::Saif, LAYER, 1.0, 4);
    let err = block_on(evaluate::run(&mut engine, instruction, &contents, None, &saif_options, silent)).unwrap_err();
    assert!(err.to_string().contains("needs an SAE"), "{err}");
    let nan = EvalOptions::new(Method::Diffmean, LAYER, f32::NAN, 4);
    let err = block_on(evaluate::run(&mut engine, instruction, &contents, None, &nan, silent)).unwrap_err();
    assert!(err.to_string().contains("not a finite number"), "{err}");
}
