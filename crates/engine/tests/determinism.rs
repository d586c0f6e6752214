//! The same seed gives the same output: byte-identical logits and tokens from run to run on one backend, and the
//! same tokens and text on the CPU and on wgpu, for every sampling setting the page offers (greedy, temperature
//! alone, top-k, top-p, and all three). A visitor who shares a link with a seed must see what its author saw.

mod common;

use common::*;
use saif_engine::{block_on, generate, Engine, GenerateOptions, Generation, Hooks, Sampling};

fn settings() -> Vec<Sampling> {
    let random = |temperature, top_k, top_p| Sampling::Random { temperature, top_k, top_p, seed: 11 };
    vec![
        Sampling::Greedy,
        random(1.0, None, None),
        random(0.7, Some(5), None),
        random(1.3, None, Some(0.9)),
        random(0.9, Some(40), Some(0.95)),
    ]
}

fn run(engine: &mut Engine, sampling: &Sampling) -> Generation {
    let prompt = [2u32, 30, 31, 32, 33];
    let options = GenerateOptions { max_new_tokens: 12, sampling: *sampling, stop_tokens: vec![] };
    block_on(generate(engine.model.as_mut(), &prompt, &options, &Hooks::none(), |_| true)).unwrap()
}

/// The prompt's logits as bit patterns (None where the backend did not read them back).
fn bits(logits: &Option<Vec<f32>>) -> Option<Vec<u32>> {
    logits.as_ref().map(|l| l.iter().map(|x| x.to_bits()).collect())
}

#[test]
fn the_same_seed_gives_the_same_output_across_runs_and_backends() {
    for name in ["tiny-llama", "tiny-gemma3"] {
        let path = fixture_path(&format!("{name}.gguf"));
        let mut cpu = load_on(&path, Backend::Cpu);
        let mut cpu_again = load_on(&path, Backend::Cpu);
        let mut gpu = load_on(&path, Backend::Wgpu);
        let mut outputs = Vec::new();
        for sampling in settings() {
            let a = run(&mut cpu, &sampling);
            // The same engine again (its cache reset by generate), and a fresh load of the same file.
            let b = run(&mut cpu, &sampling);
            let c = run(&mut cpu_again, &sampling);
            assert!(a.prompt_logits.is_some(), "the CPU reads the prompt's logits back");
            for other in [&b, &c] {
                assert_eq!(a.ids, other.ids, "{name} {sampling:?}: tokens differ between CPU runs");
                assert_eq!(bits(&a.prompt_logits), bits(&other.prompt_logits), "{name} {sampling:?}: logits differ");
            }
            let g = run(&mut gpu, &sampling);
            let g_again = run(&mut gpu, &sampling);
            assert_eq!(bits(&g.prompt_logits), bits(&g_again.prompt_logits), "{name} {sampling:?}: wgpu runs differ");
            assert_eq!(a.ids, g.ids, "{name} {sampling:?}: the CPU and wgpu give other tokens");
            assert_eq!(cpu.tokenizer.decode(&a.ids).unwrap(), gpu.tokenizer.decode(&g.ids).unwrap());
            outputs.push(a.ids);
        }
        // The settings are not all one: sampling draws other tokens than greedy decoding.
        assert!(outputs.iter().any(|ids| ids != &outputs[0]), "{name}: every setting gave the greedy tokens");
    }
}
