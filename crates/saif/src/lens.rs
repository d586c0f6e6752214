//! What a latent means: its logit lens (the tokens its decoder direction promotes when read out through the final
//! norm and the unembedding, `W_U (g * W_dec[j])`) and the corpus snippets where it fires most.

use std::io::{Read, Seek};
use std::sync::Arc;

use saif_engine::quant::QuantMatrix;
use saif_engine::{Engine, EngineError, GgufFile, Hooks, LogitsWanted, Positions, Readout, Segment};
use serde::Serialize;

use crate::corpus::{line_tokens, skipped_position};
use crate::sae::Sae;

/// The unembedding and final-norm weights of a model, read from its GGUF.
pub struct LogitLens {
    unembed: QuantMatrix,
    norm: Vec<f32>,
}

/// Latents scored per matrix product (bounds memory: 256 x 262,144 logits for Gemma).
const LATENTS_PER_PASS: usize = 256;

impl LogitLens {
    pub fn from_gguf<R: Read + Seek>(reader: &mut R) -> Result<Self, EngineError> {
        let gguf = GgufFile::read(reader)?;
        let name = if gguf.has_tensor("output.weight") { "output.weight" } else { "token_embd.weight" };
        let unembed = QuantMatrix::new(name, Arc::new(gguf.tensor(reader, name)?))?;
        let norm_t = gguf.tensor(reader, "output_norm.weight")?;
        let norm = norm_t
            .dequantize(&candle_core::Device::Cpu)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| EngineError::InvalidRequest(format!("output_norm.weight: {e}")))?;
        Ok(Self { unembed, norm })
    }

    /// The lens of a loaded model (its backend keeps the unembedding on the CPU).
    pub fn from_readout(readout: Readout) -> Self {
        Self { unembed: readout.unembedding, norm: readout.final_norm }
    }

    /// The latents whose decoder direction promotes any of `tokens` most, best first, with the logit it adds per
    /// unit of activation: `max_t (g * W_dec[j]) . W_U[t]`. No table is needed: one pass over the decoder.
    pub fn latents_promoting(&self, sae: &Sae, tokens: &[u32], top: usize) -> Result<Vec<(usize, f32)>, EngineError> {
        let d = sae.info.d_in;
        let mut readers = Vec::with_capacity(tokens.len());
        for &t in tokens {
            if t as usize >= self.unembed.rows() {
                return Err(EngineError::InvalidRequest(format!("token {t} is outside the vocabulary")));
            }
            let mut row = vec![0f32; d];
            self.unembed.dequantize_rows(t as usize, &mut row)?;
            row.iter_mut().zip(&self.norm).for_each(|(u, g)| *u *= g);
            readers.push(row);
        }
        let mut scored: Vec<(usize, f32)> = (0..sae.info.d_sae)
            .map(|j| {
                let w = sae.decoder_row(j);
                let best = readers.iter().map(|u| saif_engine::quant::dot(w, u)).fold(f32::NEG_INFINITY, f32::max);
                (j, best)
            })
            .collect();
        scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        scored.truncate(top);
        Ok(scored)
    }

    /// For each latent in `latents`, the `n` tokens its decoder direction promotes most, with their logits.
    pub fn top_tokens(&self, sae: &Sae, latents: &[usize], n: usize) -> Result<Vec<Vec<(u32, f32)>>, EngineError> {
        let d = sae.info.d_in;
        let vocab = self.unembed.rows();
        let mut out = Vec::with_capacity(latents.len());
        for group in latents.chunks(LATENTS_PER_PASS) {
            let mut x = Vec::with_capacity(group.len() * d);
            for &j in group {
                x.extend(sae.decoder_row(j).iter().zip(&self.norm).map(|(w, g)| w * g));
            }
            let logits = self.unembed.matmul(&x)?;
            for row in logits.chunks(vocab) {
                out.push(saif_engine::sampler::top_candidates(row, Some(n)));
            }
        }
        Ok(out)
    }
}

/// Where a latent fired in a corpus.
#[derive(Debug, Clone, Serialize)]
pub struct Firing {
    pub activation: f32,
    pub line: usize,
    pub position: usize,
    /// The text around the token, the token itself between « and ».
    pub snippet: String,
}

/// The `n` strongest activations of `latent` over `lines`.
pub async fn top_firings(
    engine: &mut Engine,
    sae: &Sae,
    layer: usize,
    latent: usize,
    lines: &[String],
    n: usize,
) -> Result<Vec<Firing>, EngineError> {
    let mut best: Vec<(f32, usize, usize, Vec<u32>)> = Vec::new();
    let hooks = Hooks::none().read(layer, Positions::All);
    for (index, line) in lines.iter().enumerate() {
        let ids = line_tokens(engine, line)?;
        if ids.len() < 2 {
            continue;
        }
        engine.model.reset();
        let out = engine.model.forward(&ids, Segment::Prompt, &hooks, LogitsWanted::Last).await?;
        for cap in out.captures.iter().filter(|c| !skipped_position(c.position)) {
            let a = sae.encode(&cap.values)[latent];
            if a > 0.0 && (best.len() < n || a > best.last().map_or(0.0, |b| b.0)) {
                best.push((a, index, cap.position, ids.clone()));
                best.sort_by(|x, y| y.0.total_cmp(&x.0));
                best.truncate(n);
            }
        }
    }
    best.into_iter()
        .map(|(activation, line, position, ids)| {
            let from = position.saturating_sub(8);
            let before = engine.tokenizer.decode(&ids[from..position])?;
            let token = engine.tokenizer.decode(&ids[position..position + 1])?;
            let after = engine.tokenizer.decode(&ids[position + 1..(position + 4).min(ids.len())])?;
            Ok(Firing { activation, line, position, snippet: format!("{before}«{token}»{after}") })
        })
        .collect()
}

/// The longest token string a `lens.json` may give a latent (the app shows a few tokens per latent, never more).
const MAX_LENS_TOKEN_BYTES: usize = 256;

/// Reads a `lens.json` written by `saif sae-lens`: `{"top_tokens": [[token, ...], ...]}`, one list per latent of an
/// SAE with `d_sae` latents. The file travels beside an SAE and may come from anyone, so it is checked, not trusted.
pub fn read_lens_json(bytes: &[u8], d_sae: usize) -> Result<Vec<Vec<String>>, String> {
    #[derive(serde::Deserialize)]
    struct LensFile {
        top_tokens: Vec<Vec<String>>,
    }
    let file: LensFile = serde_json::from_slice(bytes)
        .map_err(|e| format!("lens.json is not a lens file ({{\"top_tokens\": ...}}): {e}"))?;
    if file.top_tokens.len() != d_sae {
        return Err(format!("lens.json describes {} latents but the SAE has {d_sae}", file.top_tokens.len()));
    }
    if let Some((latent, _)) =
        file.top_tokens.iter().enumerate().find(|(_, t)| t.iter().any(|s| s.len() > MAX_LENS_TOKEN_BYTES))
    {
        return Err(format!("lens.json: latent {latent} has a token longer than {MAX_LENS_TOKEN_BYTES} bytes"));
    }
    Ok(file.top_tokens)
}
