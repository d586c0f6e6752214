//! The `saif` command-line contract: one JSON object on stdout with --json, a non-zero exit and a message on
//! stderr on error. Checked on the offline models against the golden references and on the engine's fixtures.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn saif(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_saif")).args(args).output().expect("saif runs")
}

fn json_ok(args: &[&str]) -> Value {
    parse_ok(args, saif(args))
}

fn parse_ok(args: &[&str], out: Output) -> Value {
    assert!(out.status.success(), "saif {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.trim().lines().count(), 1, "one JSON object on one line: {stdout}");
    serde_json::from_str(&stdout).unwrap()
}

fn models() -> PathBuf {
    std::env::var_os("SAIF_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/saif/models"))
}

fn model(file: &str) -> String {
    let p = models().join(file);
    assert!(p.exists(), "{} is missing: run `make setup`", p.display());
    p.to_string_lossy().into_owned()
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn golden(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(repo().join("../shared/golden").join(name)).unwrap()).unwrap()
}

const GEMMA: &str = "gemma-3-270m-q4_k_m.gguf";
const SMOL: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

#[test]
fn tokenize_prints_ids_without_bos() {
    let g = golden("gemma-3-270m-q4_k_m.json");
    let case = &g["tokenizer"][0];
    let out = json_ok(&["tokenize", "--model", &model(GEMMA), "--text", case["text"].as_str().unwrap(), "--json"]);
    assert_eq!(out, serde_json::json!({ "ids": case["ids"] }));
}

#[test]
fn logits_report_input_ids_top_and_residual_norms() {
    let g = golden("gemma-3-270m-q4_k_m.json");
    let p = &g["prompts"][0];
    let out = json_ok(&[
        "logits",
        "--model",
        &model(GEMMA),
        "--prompt",
        p["prompt"].as_str().unwrap(),
        "--top",
        "10",
        "--resid",
        "0,5,11,17",
        "--json",
    ]);
    assert_eq!(out["input_ids"], p["input_ids"]);
    let top = out["top"].as_array().unwrap();
    assert_eq!(top.len(), 10);
    assert_eq!(top[0]["id"], p["top10_ids"][0]);
    assert!((top[0]["logit"].as_f64().unwrap() - p["top10_logits"][0].as_f64().unwrap()).abs() < 0.25);
    for layer in ["0", "5", "11", "17"] {
        let got = out["resid_post"][layer]["norm"].as_f64().unwrap();
        let want = p["resid_post_last_token"][layer]["norm"].as_f64().unwrap();
        assert!((got / want - 1.0).abs() < 0.02, "layer {layer}: {got} vs {want}");
    }
}

#[test]
fn generate_greedy_matches_the_reference_and_keeps_eos() {
    let g = golden("smollm2-135m-instruct-q4_1.json");
    let p = g["prompts"].as_array().unwrap().iter().find(|p| p["greedy16_ids"].as_array().unwrap().len() < 16).unwrap();
    let out = json_ok(&[
        "generate",
        "--model",
        &model(SMOL),
        "--prompt",
        p["prompt"].as_str().unwrap(),
        "--max-new-tokens",
        "16",
        "--greedy",
        "--json",
    ]);
    assert_eq!(out["ids"], p["greedy16_ids"]);
    assert!(out["text"].is_string());
}

#[test]
fn sampling_with_a_seed_is_repeatable() {
    let m = model(SMOL);
    let run = |seed: &str| {
        json_ok(&[
            "generate",
            "--model",
            &m,
            "--prompt",
            "Once upon a time",
            "--max-new-tokens",
            "12",
            "--temperature",
            "1.0",
            "--top-p",
            "0.95",
            "--top-k",
            "50",
            "--seed",
            seed,
            "--json",
        ])["ids"]
            .clone()
    };
    assert_eq!(run("7"), run("7"));
    assert_ne!(run("7"), run("8"));
}

#[test]
fn chat_mode_wraps_the_prompt_and_stops_at_the_end_of_the_turn() {
    let out = json_ok(&[
        "generate",
        "--model",
        &model(SMOL),
        "--prompt",
        "What is 2 + 2? Answer with one number.",
        "--chat",
        "--max-new-tokens",
        "24",
        "--json",
    ]);
    let ids = out["ids"].as_array().unwrap();
    assert!(ids.len() < 24, "a short answer ends its turn: {out}");
    assert_eq!(ids.last().unwrap(), 2, "<|im_end|> ends the answer");
    assert!(out["text"].as_str().unwrap().contains('4'), "{out}");
}

#[test]
fn bench_reports_throughput_with_the_machine() {
    let fixture = repo().join("crates/engine/tests/fixtures/tiny-llama.gguf");
    let out = json_ok(&[
        "bench",
        "--model",
        fixture.to_str().unwrap(),
        "--prompt-tokens",
        "16",
        "--decode-tokens",
        "4",
        "--runs",
        "2",
        "--json",
    ]);
    assert_eq!(out["backend"], "cpu");
    assert!(out["prefill_tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(out["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
    assert_eq!(out["prefill_tokens_per_s_runs"].as_array().unwrap().len(), 2);
    assert!(out["machine"]["cpu"].as_str().is_some_and(|s| !s.is_empty()));
}

#[test]
fn errors_exit_non_zero_with_a_message() {
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["tokenize".into(), "--model".into(), "/nonexistent.gguf".into(), "--text".into(), "x".into()],
            "cannot open",
        ),
        (
            vec![
                "tokenize".into(),
                "--model".into(),
                repo().join("Cargo.toml").to_string_lossy().into(),
                "--text".into(),
                "x".into(),
            ],
            "not a GGUF file",
        ),
        (
            vec![
                "generate".into(),
                "--model".into(),
                model(SMOL),
                "--prompt".into(),
                "x".into(),
                "--temperature".into(),
                "-1".into(),
            ],
            "temperature",
        ),
        (
            vec![
                "logits".into(),
                "--model".into(),
                model(SMOL),
                "--prompt".into(),
                "x".into(),
                "--resid".into(),
                "30".into(),
            ],
            "layer 30",
        ),
    ];
    for (args, needle) in cases {
        let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        let out = saif(&args);
        assert!(!out.status.success(), "{args:?} should fail");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(needle), "{args:?}: stderr {stderr:?} lacks {needle:?}");
        assert!(out.stdout.is_empty(), "{args:?}: nothing on stdout on error");
    }
}

#[test]
fn text_output_without_json() {
    let out = saif(&["tokenize", "--model", &model(SMOL), "--text", "Hello, world!"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("19556") && serde_json::from_str::<Value>(&text).is_err(), "{text}");
}

/// train-sae, sae-lens, sae-eval and sae-latent on the engine's tiny Llama fixture: the JSON contract, an SAE in
/// Gemma Scope 2's layout that says it is TopK, and a clear refusal of an SAE made for another model.
#[test]
fn sae_commands_train_describe_and_evaluate() {
    let dir = std::env::temp_dir().join(format!("saif-cli-sae-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let corpus = dir.join("corpus.txt");
    let lines: Vec<String> = (0..40)
        .map(|i| format!("line {i}: the cat sat on the mat and the dog ran to the river {}", i * 7))
        .chain(["[chat] Translate the text into French. The weather is nice.".to_string()])
        .collect();
    std::fs::write(&corpus, lines.join("\n")).unwrap();
    let fixture = repo().join("crates/engine/tests/fixtures/tiny-llama.gguf");
    let fixture = fixture.to_str().unwrap();
    let out = dir.join("sae");
    let train_args = [
        "train-sae",
        "--model",
        fixture,
        "--layer",
        "2",
        "--width",
        "64",
        "--k",
        "4",
        "--tokens",
        "400",
        "--epochs",
        "2",
        "--batch",
        "64",
        "--corpus",
        corpus.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--json",
    ];
    // The activation cache goes under SAIF_CACHE: here the test's own folder, not the user's.
    let train = || Command::new(env!("CARGO_BIN_EXE_saif")).args(train_args).env("SAIF_CACHE", &dir).output().unwrap();
    let first = train();
    assert!(!String::from_utf8_lossy(&first.stderr).contains("from the cache"));
    let trained = parse_ok(&train_args, first);
    assert_eq!(trained["saes"][0]["layer"], 2);
    assert_eq!(trained["saes"][0]["tokens"], 400);
    let config: Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        (config["architecture"].as_str(), config["k"].as_u64(), config["layer"].as_u64()),
        (Some("topk"), Some(4), Some(2))
    );
    let params = std::fs::read(out.join("params.safetensors")).unwrap();
    // Again with the same seed: the activations come from the cache and the SAE is the same, byte for byte.
    let second = train();
    assert!(String::from_utf8_lossy(&second.stderr).contains("activations from the cache"));
    assert!(second.status.success());
    assert!(std::fs::read(out.join("params.safetensors")).unwrap() == params, "same seed, same SAE");
    assert_eq!(trained["saes"][0]["trained_on"], "cpu");

    // The same run with --backend wgpu (lavapipe where there is no GPU), with a cache of its own: the activations
    // collected and the SAE trained on the GPU, about as good.
    let gpu_out = dir.join("sae-gpu");
    let mut gpu_args: Vec<&str> = train_args.to_vec();
    let at = gpu_args.iter().position(|a| *a == "--out").unwrap() + 1;
    gpu_args[at] = gpu_out.to_str().unwrap();
    gpu_args.extend(["--backend", "wgpu"]);
    let run = Command::new(env!("CARGO_BIN_EXE_saif")).args(&gpu_args).env("SAIF_CACHE", dir.join("gpu")).output();
    let on_gpu = parse_ok(&gpu_args, run.unwrap());
    assert!(on_gpu["saes"][0]["trained_on"].as_str().unwrap().starts_with("wgpu"), "{on_gpu}");
    let fvu_of = |sae: &Path| {
        let args = ["sae-eval", "--model", fixture, "--sae", sae.to_str().unwrap(), "--contents"];
        json_ok(&[&args[..], &[corpus.to_str().unwrap(), "--json"]].concat())["fvu"].as_f64().unwrap()
    };
    let (cpu_fvu, gpu_fvu) = (fvu_of(&out), fvu_of(&gpu_out));
    assert!((cpu_fvu - gpu_fvu).abs() < 0.01, "FVU after training on the CPU {cpu_fvu}, on the GPU {gpu_fvu}");

    let lens = json_ok(&["sae-lens", "--model", fixture, "--sae", out.to_str().unwrap(), "--json"]);
    assert_eq!(lens["latents"], 64);
    let lens_file: Value = serde_json::from_str(&std::fs::read_to_string(out.join("lens.json")).unwrap()).unwrap();
    assert_eq!(lens_file["top_tokens"].as_array().unwrap().len(), 64);

    let eval = json_ok(&[
        "sae-eval",
        "--model",
        fixture,
        "--sae",
        out.to_str().unwrap(),
        "--contents",
        corpus.to_str().unwrap(),
        "--json",
    ]);
    for key in ["layer", "fvu", "l0", "dead_fraction", "ce_loss_clean", "ce_loss_sae", "ce_loss_zero", "ce_recovered"] {
        assert!(eval[key].is_number(), "sae-eval lacks {key}: {eval}");
    }
    assert_eq!(eval["layer"], 2);
    assert!(eval["l0"].as_f64().unwrap() <= 4.0);

    let latent = json_ok(&[
        "sae-latent",
        "--model",
        fixture,
        "--sae",
        out.to_str().unwrap(),
        "--latent",
        "3",
        "--corpus",
        corpus.to_str().unwrap(),
        "--lines",
        "10",
        "--top",
        "5",
        "--json",
    ]);
    assert_eq!(latent["logit_lens"].as_array().unwrap().len(), 5);
    assert!(latent["top_activations"].as_array().unwrap().len() <= 5);

    // Widths and epochs go one per layer, or one for all; any other count is refused before any work.
    let bad = saif(&[
        "train-sae",
        "--model",
        fixture,
        "--layer",
        "1,2",
        "--width",
        "64,32,16",
        "--corpus",
        corpus.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--width gives 3 values for 2 layers"));

    // The fixture's SAE on SmolLM2 (576 wide, not 256): refused with the reason.
    let wrong = saif(&[
        "sae-eval",
        "--model",
        &model(SMOL),
        "--sae",
        out.to_str().unwrap(),
        "--contents",
        corpus.to_str().unwrap(),
    ]);
    assert!(!wrong.status.success());
    assert!(
        String::from_utf8_lossy(&wrong.stderr).contains("does not fit"),
        "{}",
        String::from_utf8_lossy(&wrong.stderr)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// bench-train times the training step on both backends, and profiles the GPU's kernels.
#[test]
fn bench_train_times_the_step_on_both_backends() {
    let shape = ["bench-train", "--d", "32", "--width", "64", "--k", "4", "--batch", "64", "--steps", "2", "--json"];
    let cpu = json_ok(&shape);
    assert_eq!(cpu["timing"]["device"], "cpu");
    assert!(cpu["timing"]["ms_per_step"].as_f64().unwrap() > 0.0 && cpu["timing"]["kernels"].is_null());
    let gpu = json_ok(&[&shape[..], &["--backend", "wgpu", "--profile"]].concat());
    assert!(gpu["timing"]["device"].as_str().unwrap().starts_with("wgpu"));
    let kernels = gpu["timing"]["kernels"].as_array().unwrap();
    assert!(kernels.iter().any(|k| k[0] == "top_k") && kernels.iter().any(|k| k[0] == "adam"), "{kernels:?}");
    let bad = saif(&["bench-train", "--k", "0"]);
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("--k must be"));
}

/// The SAIF commands' JSON contract on SmolLM2 with its shipped SAE, kept small: discovery on a few contents, an
/// evaluation on two, a sweep of two values, and `saif steer`'s two outputs from the same seed.
#[test]
fn saif_commands_print_their_contract() {
    let smol = model(SMOL);
    let discovered = json_ok(&[
        "discover",
        "--model",
        &smol,
        "--instruction",
        "translate-fr",
        "--k",
        "5",
        "--discovery-contents",
        "6",
        "--json",
    ]);
    assert_eq!(discovered["instruction"], "translate-fr");
    let latents = discovered["latents"].as_array().unwrap();
    assert!(!latents.is_empty() && latents.len() <= 5);
    for l in latents {
        for field in ["id", "freq_pos", "freq_neg", "mean_pos", "mean_neg", "delta", "top_tokens"] {
            assert!(l.get(field).is_some(), "latent without {field}: {l}");
        }
        assert!(l["freq_pos"].as_f64().unwrap() >= 0.5, "tau 0.5 keeps latents firing on half the positives");
        let d = l["mean_pos"].as_f64().unwrap() - l["mean_neg"].as_f64().unwrap();
        assert!((d - l["delta"].as_f64().unwrap()).abs() < 1e-5);
    }
    let deltas: Vec<f64> = latents.iter().map(|l| l["delta"].as_f64().unwrap()).collect();
    assert!(deltas.windows(2).all(|w| w[0] >= w[1]), "ranked by delta: {deltas:?}");

    let contents = std::env::temp_dir().join(format!("saif-contents-{}.txt", std::process::id()));
    std::fs::write(&contents, "The cat sleeps on the warm sofa.\nWe walked to the market in the rain.\n").unwrap();
    let c = contents.to_str().unwrap();
    let evaluated = json_ok(&[
        "eval",
        "--model",
        &smol,
        "--instruction",
        "uppercase",
        "--method",
        "prompt",
        "--contents",
        c,
        "--max-new-tokens",
        "6",
        "--seed",
        "0",
        "--json",
    ]);
    assert_eq!(
        (evaluated["method"].as_str(), evaluated["instruction"].as_str(), evaluated["n"].as_u64()),
        (Some("prompt"), Some("uppercase"), Some(2))
    );
    for field in ["strict", "loose", "strict_ci", "loose_ci", "fluency", "samples"] {
        assert!(evaluated.get(field).is_some(), "eval without {field}");
    }
    let samples = evaluated["samples"].as_array().unwrap();
    assert_eq!(samples.len(), 2);
    let loose = samples.iter().filter(|s| s["loose"] == true).count() as f64 / 2.0;
    assert_eq!(evaluated["loose"].as_f64().unwrap(), loose);

    let out = std::env::temp_dir().join(format!("saif-sweep-{}", std::process::id()));
    let swept = json_ok(&[
        "sweep",
        "--model",
        &smol,
        "--instruction",
        "translate-fr",
        "--param",
        "alpha",
        "--values",
        "0.5,1",
        "--methods",
        "diffmean",
        "--discovery-contents",
        "4",
        "--limit",
        "2",
        "--max-new-tokens",
        "4",
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(swept["rows"].as_array().unwrap().len(), 2);
    for ext in ["json", "csv", "svg"] {
        assert!(out.join(format!("sweep-translate-fr-alpha.{ext}")).exists(), "{ext} written");
    }
    let csv = std::fs::read_to_string(out.join("sweep-translate-fr-alpha.csv")).unwrap();
    assert_eq!(csv.lines().count(), 3, "a header and a line per point");

    // The wgpu path (lavapipe here) evaluates too: difference-in-means, its projection variant, on two contents.
    for method in ["diffmean", "diffmean-project"] {
        let gpu = json_ok(&[
            "eval",
            "--model",
            &smol,
            "--backend",
            "wgpu",
            "--instruction",
            "translate-fr",
            "--method",
            method,
            "--discovery-contents",
            "2",
            "--contents",
            c,
            "--max-new-tokens",
            "3",
            "--json",
        ]);
        assert_eq!(gpu["n"], 2, "{method} on wgpu");
    }

    let steered = json_ok(&[
        "steer",
        "--model",
        &smol,
        "--latent",
        "5:1,6:-1",
        "--prompt",
        "The capital of France is",
        "--max-new-tokens",
        "6",
        "--greedy",
        "--json",
    ]);
    let g = golden("smollm2-135m-instruct-q4_1.json");
    assert_eq!(steered["default"]["ids"], serde_json::json!(g["prompts"][0]["greedy16_ids"].as_array().unwrap()[..6]));
    assert_ne!(steered["steered"]["ids"], steered["default"]["ids"], "the steering changes the output");
    let _ = std::fs::remove_dir_all(&out);
    let _ = std::fs::remove_file(&contents);
}

/// The SAIF commands' errors: a clear message and a non-zero exit, before any long work.
#[test]
fn saif_commands_refuse_bad_input() {
    let smol = model(SMOL);
    let empty = std::env::temp_dir().join(format!("saif-empty-{}.txt", std::process::id()));
    std::fs::write(&empty, "\n\n").unwrap();
    let gemma_sae =
        repo().join("public/saes/gemma-3-270m").join(format!("layer_{}", shipped_layers("gemma-3-270m")[0]));
    let smol_layers = shipped_layers("smollm2-135m");
    let smol_sae =
        repo().join("public/saes/smollm2-135m").join(format!("layer_{}", smol_layers[smol_layers.len() - 1]));
    let wrong_layer = smol_layers[0].to_string();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["discover", "--instruction", "translate-xx"],
            "unknown instruction \"translate-xx\"; the built-in ones are translate-fr",
        ),
        (
            vec!["eval", "--instruction", "translate-fr", "--method", "none", "--contents", empty.to_str().unwrap()],
            "holds no contents",
        ),
        (
            vec!["discover", "--instruction", "translate-fr", "--sae", gemma_sae.to_str().unwrap()],
            "does not fit the model",
        ),
        (
            vec![
                "discover",
                "--instruction",
                "translate-fr",
                "--sae",
                smol_sae.to_str().unwrap(),
                "--layer",
                &wrong_layer,
            ],
            "trained on layer",
        ),
        (vec!["eval", "--instruction", "translate-fr", "--method", "saif", "--alpha", "NaN"], "not a finite number"),
        (
            vec!["eval", "--instruction", "translate-fr", "--method", "diffmean", "--alpha", "inf"],
            "not a finite number",
        ),
        (vec!["discover", "--instruction", "translate-fr", "--k", "1000000"], "k = 1000000"),
        (vec!["eval", "--instruction", "translate-fr", "--method", "magic"], "unknown method \"magic\""),
        (vec!["steer", "--latent", "999999:1", "--prompt", "x"], "latent 999999 does not exist"),
        (vec!["steer", "--latent", "1:1e38", "--mult", "1e10", "--prompt", "x"], "overflows"),
    ];
    for (args, message) in cases {
        let mut all = args.clone();
        all.extend(["--model", &smol]);
        let out = saif(&all);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "saif {args:?} succeeded");
        assert!(stderr.contains(message), "saif {args:?}: {stderr}");
    }
    let _ = std::fs::remove_file(&empty);
}

fn shipped_layers(key: &str) -> Vec<u64> {
    let index: Value =
        serde_json::from_str(&std::fs::read_to_string(repo().join("public/saes/index.json")).unwrap()).unwrap();
    index[key]["layers"].as_array().unwrap().iter().map(|l| l.as_u64().unwrap()).collect()
}

#[test]
fn an_sae_recording_another_model_is_refused_unless_asked_or_stamped() {
    // SmolLM2's own SAE, its record changed to say a pretrained model: same shape, another model.
    let smol = model(SMOL);
    let layer = shipped_layers("smollm2-135m")[0];
    let shipped = repo().join(format!("public/saes/smollm2-135m/layer_{layer}"));
    let dir = std::env::temp_dir().join(format!("saif-other-model-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(shipped.join("params.safetensors"), dir.join("params.safetensors")).unwrap();
    let mut config: Value = serde_json::from_slice(&std::fs::read(shipped.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model_fingerprint"]["instruction_tuned"], true, "the shipped SAE records SmolLM2-Instruct");
    config["model_fingerprint"]["instruction_tuned"] = Value::Bool(false);
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let sae = dir.to_str().unwrap();

    let lens = ["sae-lens", "--model", &smol, "--sae", sae, "--top", "1", "--json"];
    let refused = saif(&lens);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        stderr.contains("trained on another model (pretrained against instruction-tuned)")
            && stderr.contains("--any-model"),
        "{stderr}"
    );
    let mut anyway = lens.to_vec();
    anyway.push("--any-model");
    json_ok(&anyway);
    // Stamping records the loaded model, after which it is accepted without the flag.
    let stamped = json_ok(&["sae-stamp", "--model", &smol, "--sae", sae, "--json"]);
    assert_eq!(stamped["model_fingerprint"]["instruction_tuned"], true);
    // It records the residual norm at the SAE's layer: the shipped SAE's record, measured on the same model.
    let norm = stamped["residual_norm"].as_f64().unwrap();
    let shipped_norm = config["residual_norm"]["mean"].as_f64().unwrap();
    assert!((norm - shipped_norm).abs() <= 1e-4 * shipped_norm, "stamped {norm}, shipped {shipped_norm}");
    let restamped: Value = serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(restamped["residual_norm"]["mean"], stamped["residual_norm"]);
    assert_eq!(restamped["model_fingerprint"], stamped["model_fingerprint"]);
    json_ok(&lens);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `saif rejudge` applies today's checkers to stored answers: a one-word loop that an older checker counted as
/// French stops counting, real French still counts, and the accuracies, intervals, CSV and chart follow.
#[test]
fn rejudge_applies_todays_checkers_to_stored_answers() {
    let dir = std::env::temp_dir().join(format!("saif-rejudge-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let samples = serde_json::json!([
        { "content": "The cat sleeps on the sofa.", "output": "Translate Translate Translate Translate Translate Translate", "strict": true, "loose": true },
        { "content": "The children walked to school.", "output": "Les enfants sont allés à l'école ensemble parce que le bus était en retard.", "strict": true, "loose": true },
    ]);
    let report = serde_json::json!({
        "method": "diffmean", "instruction": "translate-fr", "layer": 17, "alpha": 4.0, "k": null, "n": 2,
        "strict": 1.0, "loose": 1.0, "strict_ci": [0.34, 1.0], "loose_ci": [0.34, 1.0],
        "fluency": { "perplexity": 3.0, "repetition": 0.9, "mean_tokens": 24.0 }, "steering_norm": 10.0,
        "samples": samples, "seconds": 12.5,
    });
    let report_file = dir.join("eval.json");
    std::fs::write(&report_file, report.to_string()).unwrap();
    let mut row = report.clone();
    for (k, v) in [("param", "alpha"), ("value", "4"), ("placement", "after")] {
        row[k] = v.into();
    }
    row["k"] = 15.into();
    row["perplexity"] = 3.0.into();
    row["repetition"] = 0.9.into();
    let sweep_file = dir.join("sweep-translate-fr-alpha.json");
    let sweep = serde_json::json!({ "rows": [row], "seconds": 1.0, "title": "translate-fr: alpha" });
    std::fs::write(&sweep_file, serde_json::to_string_pretty(&sweep).unwrap()).unwrap();

    let out = json_ok(&["rejudge", report_file.to_str().unwrap(), sweep_file.to_str().unwrap(), "--json"]);
    let points: Vec<&Value> =
        out["judged"].as_array().unwrap().iter().flat_map(|j| j["points"].as_array().unwrap()).collect();
    assert_eq!(points.len(), 2);
    assert!(points.iter().all(|p| p["changed"] == 1 && p["loose_before"] == 1.0 && p["loose"] == 0.5), "{points:?}");

    let judged: Value = serde_json::from_str(&std::fs::read_to_string(&report_file).unwrap()).unwrap();
    assert_eq!(judged["samples"][0]["loose"], false);
    assert_eq!(judged["samples"][1]["loose"], true);
    assert_eq!((judged["strict"].as_f64(), judged["loose"].as_f64()), (Some(0.5), Some(0.5)));
    // Wilson's 95% interval for 1 success in 2, computed here from its formula (p = 0.5, n = 2, z = 1.96).
    let z2 = 1.96f64 * 1.96;
    let centre = (0.5 + z2 / 4.0) / (1.0 + z2 / 2.0);
    let half = 1.96 * (0.25 / 2.0 + z2 / 16.0).sqrt() / (1.0 + z2 / 2.0);
    let ci = judged["loose_ci"].as_array().unwrap();
    assert!(
        (ci[0].as_f64().unwrap() - (centre - half)).abs() < 1e-3
            && (ci[1].as_f64().unwrap() - (centre + half)).abs() < 1e-3,
        "{ci:?}"
    );
    assert_eq!(judged["seconds"], 12.5, "fields beyond the report's are kept");
    assert!(!std::fs::read_to_string(&report_file).unwrap().trim_end().contains('\n'), "kept on one line");

    let csv = std::fs::read_to_string(dir.join("sweep-translate-fr-alpha.csv")).unwrap();
    assert!(csv.lines().nth(1).unwrap().contains(",0.5000,"), "{csv}");
    assert!(std::fs::read_to_string(dir.join("sweep-translate-fr-alpha.svg")).unwrap().contains("<svg"));

    // A sweep written before sweeps kept their answers cannot be judged again, and says so.
    let mut old = sweep.clone();
    old["rows"][0]["samples"] = serde_json::json!([]);
    std::fs::write(&sweep_file, old.to_string()).unwrap();
    let out = saif(&["rejudge", sweep_file.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("written before sweeps kept their answers"));
    std::fs::remove_dir_all(&dir).unwrap();
}
