//! Generation in the page: the default output and, when latents steer, the steered one from the same seed, both
//! streamed. On a backend that batches (the CPU) the two form one batch of two sequences; elsewhere they run one
//! after the other. Each output's tokens per second is measured on its own tokens.

use std::cell::RefCell;
use std::rc::Rc;

use saif::steer::{latent_vector, Steering};
use saif_engine::{Engine, GenerateOptions, Hooks, SequenceRequest};

use super::saes::LoadedSae;
use super::{now_ms, post, Failure, STOP};
use crate::protocol::{GenerateRequest, GenerationSummary, Output, OutputSummary, Response};

pub async fn generate(
    id: u32,
    engine: &mut Engine,
    request: GenerateRequest,
    sae: Option<Rc<LoadedSae>>,
) -> Result<GenerationSummary, Failure> {
    let text = if request.chat { engine.chat.render(&request.prompt, None) } else { request.prompt.clone() };
    let prompt = engine.tokenizer.encode_prompt(&text)?;
    let stop_tokens = if request.chat { engine.chat_stop_tokens() } else { engine.stop_tokens() };
    let options = GenerateOptions { max_new_tokens: request.max_new_tokens, sampling: request.sampling, stop_tokens };
    let steered_hooks = match &request.steering {
        Some(spec) if !spec.latents.is_empty() => {
            let sae = sae.ok_or("steering needs an SAE: none is in use")?;
            let latents: Vec<(usize, f32)> = spec.latents.iter().map(|&(j, s)| (j as usize, s)).collect();
            let vector = latent_vector(&sae.sae, &latents, spec.multiplier)?;
            Some(Steering::Add { layer: sae.layer, vector, scope: spec.scope }.hooks())
        }
        _ => None,
    };
    let none = Hooks::none();
    let mut requests = vec![SequenceRequest { prompt: &prompt, hooks: &none, options: &options }];
    if let Some(hooks) = &steered_hooks {
        requests.push(SequenceRequest { prompt: &prompt, hooks, options: &options });
    }
    let outputs = [Output::Default, Output::Steered];
    let ids: RefCell<Vec<Vec<u32>>> = RefCell::new(vec![Vec::new(); requests.len()]);
    let times: RefCell<Vec<Vec<f64>>> = RefCell::new(vec![Vec::new(); requests.len()]);
    let tokenizer = engine.tokenizer.clone();
    STOP.with(|s| s.set(false));
    let started = now_ms();
    let generations = saif_engine::generate_batch(engine.model.as_mut(), &requests, |i, token| {
        times.borrow_mut()[i].push(now_ms());
        ids.borrow_mut()[i].push(token);
        let text = tokenizer.decode(&ids.borrow()[i]).unwrap_or_default();
        post(id, Response::Text { output: outputs[i], text, tokens: ids.borrow()[i].len() });
        async {
            // Let a Stop request (or a tokenization) in between tokens.
            super::yield_to_messages().await;
            !STOP.with(|s| s.get())
        }
    })
    .await?;
    let times = times.into_inner();
    let first_token = times.iter().filter_map(|t| t.first()).fold(f64::INFINITY, |a, &b| a.min(b));
    let mut summaries = Vec::new();
    for (g, t) in generations.iter().zip(&times) {
        let tokens_per_s = match (t.first(), t.last()) {
            (Some(&a), Some(&b)) if t.len() > 1 && b > a => (t.len() - 1) as f64 / ((b - a) / 1000.0),
            _ => 0.0,
        };
        summaries.push(OutputSummary {
            text: engine.tokenizer.decode(&g.ids)?,
            ids: g.ids.clone(),
            stop: serde_json::to_value(g.stop).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default(),
            tokens_per_s,
        });
    }
    let mut summaries = summaries.into_iter();
    Ok(GenerationSummary {
        default: summaries.next().expect("the default output"),
        steered: summaries.next(),
        prompt_tokens: prompt.len(),
        time_to_first_token_ms: if first_token.is_finite() { first_token - started } else { 0.0 },
    })
}
