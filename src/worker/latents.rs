//! What the SAE in use reads in a prompt (every token's latents), latents searched by id or by the tokens they
//! promote, and a latent's top tokens through the logit lens where the SAE has no lens file.

use std::rc::Rc;

use saif::lens::LogitLens;
use saif_engine::{Engine, Hooks, Positions};

use super::saes::LoadedSae;
use super::{token_view, Failure, STATE};
use crate::protocol::{LatentReading, LatentView, SearchResults};

/// Latents whose top tokens are computed at most per reading when the SAE has no lens file (each costs a pass
/// over the vocabulary).
const LENS_ON_DEMAND: usize = 12;

/// The SAE's latents on every token of the prompt, and the strongest at its last token.
pub async fn read(
    engine: &mut Engine,
    sae: Rc<LoadedSae>,
    lens: Option<Rc<LogitLens>>,
    text: String,
    chat: bool,
    top: usize,
) -> Result<LatentReading, Failure> {
    let text = if chat { engine.chat.render(&text, None) } else { text };
    let ids = engine.tokenizer.encode_prompt(&text)?;
    if ids.is_empty() {
        return Err("the prompt is empty".into());
    }
    let hooks = Hooks::none().read(sae.layer, Positions::All);
    // Only the residual at the SAE's layer: the pass stops there, with no logits (Gemma's output matrix alone is
    // 178 MB to read).
    let captures = engine.model.read_prompt(&ids, &hooks).await?;
    let per_token: Vec<Vec<(u32, f32)>> = captures.iter().map(|c| sae.sae.encode_sparse(&c.values)).collect();
    let last_latents: Vec<(u32, f32)> = per_token.last().cloned().unwrap_or_default().into_iter().take(top).collect();
    let tokens = ids.iter().map(|&id| token_view(&engine.tokenizer, id)).collect();
    let mut seen: Vec<u32> = per_token.iter().flatten().map(|l| l.0).collect();
    seen.sort_unstable();
    seen.dedup();
    let lens_of = |ids: &[u32]| -> Vec<(u32, Vec<String>)> {
        match &sae.lens {
            Some(all) => ids.iter().map(|&j| (j, all[j as usize].clone())).collect(),
            None => ids.iter().take(LENS_ON_DEMAND).map(|&j| (j, computed(&sae, lens.as_deref(), engine, j))).collect(),
        }
    };
    let lens_list = match &sae.lens {
        Some(_) => lens_of(&seen),
        None => lens_of(&last_latents.iter().map(|l| l.0).collect::<Vec<_>>()),
    };
    let tokens_of = |j: u32| lens_list.iter().find(|l| l.0 == j).map(|l| l.1.clone()).unwrap_or_default();
    let last =
        last_latents.iter().map(|&(index, value)| LatentView { index, value, tokens: tokens_of(index) }).collect();
    Ok(LatentReading { sae: sae.summary.clone(), tokens, per_token, last, lens: lens_list })
}

/// The top tokens of latent `j` through the model's logit lens.
fn computed(sae: &LoadedSae, lens: Option<&LogitLens>, engine: &Engine, j: u32) -> Vec<String> {
    let Some(lens) = lens else { return Vec::new() };
    match lens.top_tokens(&sae.sae, &[j as usize], 8) {
        Ok(mut top) => top
            .pop()
            .unwrap_or_default()
            .iter()
            .map(|&(id, _)| engine.tokenizer.decode(&[id]).unwrap_or_default())
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// One latent's top tokens: from the lens file, or computed.
pub fn lens_tokens(sae: &LoadedSae, lens: Option<Rc<LogitLens>>, latent: u32) -> Result<Vec<String>, Failure> {
    if latent as usize >= sae.sae.info.d_sae {
        return Err(format!("latent {latent} does not exist: the SAE has latents 0..{}", sae.sae.info.d_sae - 1).into());
    }
    if let Some(all) = &sae.lens {
        return Ok(all[latent as usize].clone());
    }
    let lens = lens.ok_or("this model's backend keeps no logit lens")?;
    let (tokenizer, _) = STATE.with(|s| s.borrow().tokenizer.clone()).ok_or("load a model first")?;
    let top = lens.top_tokens(&sae.sae, &[latent as usize], 8)?;
    Ok(top[0].iter().map(|&(id, _)| tokenizer.decode(&[id]).unwrap_or_default()).collect())
}

/// Latents by id ("1247", "#1247") or by the vocabulary tokens a text matches ("French" matches "French" and
/// " French"), ranked by how strongly their decoder direction promotes those tokens.
pub fn search(query: &str, top: usize) -> Result<SearchResults, Failure> {
    let sae = super::current_sae()?;
    let q = query.trim();
    if q.is_empty() {
        return Err("type a latent's number or a token to search for".into());
    }
    let top = top.clamp(1, 200);
    let lens_tokens_of = |j: usize| sae.lens.as_ref().map(|l| l[j].clone()).unwrap_or_default();
    if let Ok(j) = q.trim_start_matches('#').parse::<usize>() {
        if j >= sae.sae.info.d_sae {
            return Err(format!("latent {j} does not exist: the SAE has latents 0..{}", sae.sae.info.d_sae - 1).into());
        }
        let latents = vec![LatentView { index: j as u32, value: 0.0, tokens: lens_tokens_of(j) }];
        return Ok(SearchResults { query: query.to_string(), matched: "latent id".into(), latents });
    }
    let lens = super::current_lens().ok_or("this model's backend keeps no logit lens")?;
    let vocabulary = vocabulary()?;
    let wanted = q.to_lowercase();
    let matches: Vec<u32> =
        vocabulary.iter().enumerate().filter(|(_, t)| **t == wanted).map(|(i, _)| i as u32).take(16).collect();
    if matches.is_empty() {
        return Err(format!("no token of the vocabulary reads \"{q}\"; try a single word").into());
    }
    let (tokenizer, _) = STATE.with(|s| s.borrow().tokenizer.clone()).ok_or("load a model first")?;
    let shown: Vec<String> =
        matches.iter().map(|&t| format!("{:?}", tokenizer.decode(&[t]).unwrap_or_default())).collect();
    let ranked = lens.latents_promoting(&sae.sae, &matches, top)?;
    let latents = ranked
        .into_iter()
        .map(|(j, score)| LatentView { index: j as u32, value: score, tokens: lens_tokens_of(j) })
        .collect();
    Ok(SearchResults { query: query.to_string(), matched: shown.join(" "), latents })
}

/// Every token's text, trimmed and lowercased, made once per model.
fn vocabulary() -> Result<Rc<Vec<String>>, Failure> {
    if let Some(v) = STATE.with(|s| s.borrow().vocabulary.clone()) {
        return Ok(v);
    }
    let (tokenizer, _) = STATE.with(|s| s.borrow().tokenizer.clone()).ok_or("load a model first")?;
    let words: Vec<String> = (0..tokenizer.vocab_size() as u32)
        .map(|id| tokenizer.decode(&[id]).unwrap_or_default().trim().to_lowercase())
        .collect();
    let words = Rc::new(words);
    STATE.with(|s| s.borrow_mut().vocabulary = Some(words.clone()));
    Ok(words)
}
