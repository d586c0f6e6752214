//! Text for SAEs: corpus files (one text per line) and the residual-stream activations a model produces on them.
//!
//! Two markers start special lines: "[chat] " is a user turn, wrapped in the model's chat template; "[prompt] " is
//! a SAIF prompt, fed as SAIF feeds the model (a chat turn for an instruction-tuned model, plain text and a newline
//! for a pretrained one; `data::render`). In both, the two characters `\n` stand for a line break.

use saif_engine::{Engine, EngineError, Hooks, LogitsWanted, Positions, Segment};

/// The most tokens of one text that are used (longer texts are cut: they add little and cost attention time).
pub const MAX_TOKENS_PER_TEXT: usize = 128;

/// The texts of a corpus file, blank lines skipped.
pub fn read_lines(path: &std::path::Path) -> std::io::Result<Vec<String>> {
    Ok(std::fs::read_to_string(path)?.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect())
}

/// The token ids a model is fed for a corpus line: chat lines in its chat template, BOS where it wants one, at most
/// `MAX_TOKENS_PER_TEXT`.
pub fn line_tokens(engine: &Engine, line: &str) -> Result<Vec<u32>, EngineError> {
    let text = if let Some(user) = line.strip_prefix("[chat] ") {
        engine.chat.render(&user.replace("\\n", "\n"), None)
    } else if let Some(user) = line.strip_prefix("[prompt] ") {
        crate::data::render(engine, &user.replace("\\n", "\n"), crate::data::PromptStyle::for_engine(engine))
    } else {
        line.to_string()
    };
    let mut ids = engine.tokenizer.encode_prompt(&text)?;
    ids.truncate(MAX_TOKENS_PER_TEXT);
    Ok(ids)
}

/// Positions an SAE neither learns nor is judged on: the first token of every text, where models park attention
/// ("attention sinks") and the residual stream is hundreds of times larger than elsewhere.
pub fn skipped_position(position: usize) -> bool {
    position == 0
}

/// Residual-stream activations of several layers, row after row (`d` values per row).
pub struct Activations {
    pub layers: Vec<usize>,
    pub d: usize,
    /// Per layer: rows of `d` values.
    pub rows: Vec<Vec<f32>>,
    /// Per row: (line index, position in the line).
    pub origin: Vec<(u32, u32)>,
}

impl Activations {
    pub fn len(&self) -> usize {
        self.origin.len()
    }

    pub fn is_empty(&self) -> bool {
        self.origin.is_empty()
    }
}

/// Runs `lines` through the model (from `first_line` on) and keeps `resid_post` of `layers` at every position but
/// the skipped ones, until `max_tokens` rows. `progress(rows, lines)` is called after each line.
pub async fn collect(
    engine: &mut Engine,
    lines: &[String],
    layers: &[usize],
    max_tokens: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<Activations, EngineError> {
    let d = engine.config().hidden;
    let mut acts = Activations { layers: layers.to_vec(), d, rows: vec![Vec::new(); layers.len()], origin: Vec::new() };
    let hooks = layers.iter().fold(Hooks::none(), |h, &l| h.read(l, Positions::All));
    for (index, line) in lines.iter().enumerate() {
        if acts.len() >= max_tokens {
            break;
        }
        let ids = line_tokens(engine, line)?;
        if ids.len() < 2 {
            continue;
        }
        engine.model.reset();
        let out = engine.model.forward(&ids, Segment::Prompt, &hooks, LogitsWanted::Last).await?;
        let room = max_tokens - acts.len();
        let mut kept = 0;
        for (slot, &layer) in layers.iter().enumerate() {
            kept = 0;
            for c in out.captures.iter().filter(|c| c.layer == layer && !skipped_position(c.position)) {
                if kept == room {
                    break;
                }
                acts.rows[slot].extend_from_slice(&c.values);
                kept += 1;
            }
        }
        acts.origin.extend((1..=kept).map(|p| (index as u32, p as u32)));
        progress(acts.len(), index + 1);
    }
    Ok(acts)
}
