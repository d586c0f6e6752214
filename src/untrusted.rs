//! Every way the app reads bytes that a stranger could have written, as one function of those bytes each: a GGUF
//! model, the two SAE formats (and their shape checks, through `sae_shapes`), an SAE's `lens.json`, and a shared
//! link. The fuzz targets (`fuzz/`, `make fuzz`) and
//! the replay of their corpora and past crashes (`tests/untrusted.rs`) call these, so what is fuzzed is what the page
//! and the `saif` tool run.
//!
//! Each returns `Ok` with a one-line summary or `Err` with the message a visitor would see. A panic, a hang or an
//! allocation the input does not justify is a bug, whatever the input.

use saif::sae::Sae;
use saif_engine::{Engine, LoadOptions};

/// A GGUF file loaded as the page loads one on the CPU: header, tokenizer, weights, and the model's description.
pub fn gguf(bytes: &[u8]) -> Result<String, String> {
    let engine = Engine::from_bytes_cpu(bytes, &LoadOptions { max_context: Some(64), ..Default::default() })
        .map_err(|e| e.to_string())?;
    let c = engine.config();
    // Tokenizing and detokenizing use the vocabulary the file gave; a short text covers the merges and byte tokens.
    let ids = engine.tokenizer.encode("Héllo, world 1").map_err(|e| e.to_string())?;
    engine.tokenizer.decode(&ids).map_err(|e| e.to_string())?;
    Ok(format!("{:?}: {} layers of {}, {} tokens", c.architecture, c.n_layers, c.hidden, ids.len()))
}

/// Two files in one input: a little-endian `u32` length, that many bytes of the first file, then the second.
/// (An SAE is a weights file plus a config; the fuzzer mutates both, and the length too.)
pub fn split_pair(bytes: &[u8]) -> (&[u8], &[u8]) {
    let Some((len, rest)) = bytes.split_first_chunk::<4>() else { return (bytes, &[]) };
    let len = (u32::from_le_bytes(*len) as usize).min(rest.len());
    rest.split_at(len)
}

/// The inverse of `split_pair`, for writing seeds.
pub fn join_pair(first: &[u8], second: &[u8]) -> Vec<u8> {
    let mut out = (first.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(first);
    out.extend_from_slice(second);
    out
}

/// An SAE once read: encode and decode one vector, as attaching it to a model does.
fn exercise(sae: Sae) -> String {
    let x = vec![1.0; sae.info.d_in];
    let latents = sae.encode_sparse(&x);
    let back = sae.decode(&latents);
    format!(
        "{:?}, {} -> {} latents, {} active, {} back",
        sae.info.activation,
        sae.info.d_in,
        sae.info.d_sae,
        latents.len(),
        back.len()
    )
}

/// Gemma Scope 2: `config.json` then `params.safetensors`, framed by `split_pair`.
pub fn sae_gemma_scope(bytes: &[u8]) -> Result<String, String> {
    let (config, params) = split_pair(bytes);
    Sae::from_gemma_scope(params, config).map(exercise).map_err(|e| e.to_string())
}

/// SAELens: `cfg.json` then `sae_weights.safetensors`, framed by `split_pair`.
pub fn sae_lens(bytes: &[u8]) -> Result<String, String> {
    let (cfg, weights) = split_pair(bytes);
    Sae::from_sae_lens(weights, cfg).map(exercise).map_err(|e| e.to_string())
}

/// A `lens.json` for an SAE whose latent count is the input's first byte (the rest is the file).
pub fn lens_json(bytes: &[u8]) -> Result<String, String> {
    let (d_sae, file) = bytes.split_first().map(|(&n, rest)| (n as usize, rest)).unwrap_or((0, bytes));
    let lens = saif::lens::read_lens_json(file, d_sae)?;
    // The app looks a latent's tokens up by its id, for every id the SAE has.
    let tokens: usize = (0..d_sae).map(|id| lens[id].len()).sum();
    Ok(format!("{d_sae} latents, {tokens} tokens"))
}

/// A shared link's query string. Whatever it says, what the page takes from it stays inside the bounds the page
/// relies on, and the link the page writes for what it read reads back to itself (otherwise sharing a link twice
/// would change the experiment). Both are asserted, so that a fuzzer finds any input that breaks them.
pub fn link(bytes: &[u8]) -> Result<String, String> {
    use crate::link::{ModelChoice, MAX_MULTIPLIER, MAX_STEERED, MAX_STRENGTH, MAX_TEXT, MAX_URL};
    let query = std::str::from_utf8(bytes).map_err(|e| format!("not UTF-8: {e}"))?;
    let (state, ignored) = crate::link::parse(query);
    assert!(state.text.chars().count() <= MAX_TEXT, "a text of {} characters", state.text.chars().count());
    assert!(state.steer.len() <= MAX_STEERED, "{} latents steered", state.steer.len());
    assert!(state.steer.iter().all(|(_, s)| s.is_finite() && s.abs() <= MAX_STRENGTH), "{:?}", state.steer);
    assert!(state.multiplier.is_finite() && state.multiplier.abs() <= MAX_MULTIPLIER, "{}", state.multiplier);
    assert!(state.temperature.is_finite() && state.temperature >= 0.0, "{}", state.temperature);
    if let ModelChoice::Url(url) = &state.model {
        let parsed = url::Url::parse(url).expect("a model URL the link parser accepted parses");
        let local = matches!(parsed.host_str(), Some("localhost" | "127.0.0.1" | "[::1]"));
        assert!(url.len() <= MAX_URL, "a model URL of {} bytes", url.len());
        assert!(parsed.scheme() == "https" || (parsed.scheme() == "http" && local), "model URL {url}");
        assert!(parsed.username().is_empty() && parsed.password().is_none(), "model URL {url} carries a login");
    }
    let written = crate::link::to_query(&state);
    let (again, problems) = crate::link::parse(&written);
    assert!(problems.is_empty(), "the link {written:?}, written by the page, reads with problems: {problems:?}");
    assert_eq!(crate::link::to_query(&again), written, "the link {written:?} does not read back to itself");
    Ok(format!("{} parts ignored", ignored.len()))
}

/// An SAE built from the input's bytes rather than parsed from them: the tensors' presence, shapes and dtype, the
/// architecture and k, written as a well-formed safetensors file and config, then read by the Gemma Scope reader.
/// Byte-level mutation almost never gets a shape past safetensors' own checks (each shape must match its data's
/// length), so this target is the one that exercises the reader's shape checks; any input is a valid recipe.
pub fn sae_shapes(bytes: &[u8]) -> Result<String, String> {
    use safetensors::tensor::TensorView;
    use safetensors::Dtype;
    let mut next = bytes.iter().copied().chain(std::iter::repeat(0));
    let mut small = |limit: u8| next.next().unwrap_or(0) % limit;
    let (dtype, size) = [(Dtype::F32, 4), (Dtype::F16, 2), (Dtype::BF16, 2)][small(3) as usize];
    let names = ["w_enc", "w_dec", "b_enc", "b_dec", "threshold"];
    let mut tensors = Vec::new();
    for name in names {
        if small(8) == 0 {
            continue; // absent
        }
        let shape: Vec<usize> = (0..small(3) + 1).map(|_| small(9) as usize).collect();
        let elements: usize = shape.iter().product();
        let data: Vec<u8> = (0..elements * size).map(|i| (i * 37 % 251) as u8 & 0x3f).collect();
        tensors.push((name, shape, data));
    }
    let views: Vec<(&str, TensorView)> = tensors
        .iter()
        .map(|(name, shape, data)| (*name, TensorView::new(dtype, shape.clone(), data).expect("sizes match")))
        .collect();
    let params = safetensors::serialize(views, None).map_err(|e| e.to_string())?;
    let architecture = ["topk", "jump_relu", "relu"][small(3) as usize];
    let config = format!(r#"{{"architecture": "{architecture}", "k": {}, "layer": {}}}"#, small(12), small(4));
    Sae::from_gemma_scope(&params, config.as_bytes()).map(exercise).map_err(|e| e.to_string())
}
