//! The built-in SAIF data: the instructions (each with many phrasings, in English and in other languages, so that
//! the latents found encode the instruction rather than its wording) and the content sentences they are applied
//! to, split into a discovery set and a held-out set. All of it is written for this project
//! (`crates/saif/data/`).
//!
//! A SAIF prompt is a content with or without an instruction: positives are `content + instruction` (or the
//! instruction first, by `Placement`), negatives the content alone. An instruction-tuned model sees the text as a
//! user turn of its chat template; a pretrained model sees it as plain text followed by a newline.

use std::sync::OnceLock;

use saif_engine::{Engine, EngineError};
use serde::{Deserialize, Serialize};

const INSTRUCTIONS_JSON: &str = include_str!("../data/instructions.json");
const DISCOVERY: &str = include_str!("../data/contents-discovery.txt");
const HELDOUT: &str = include_str!("../data/contents-heldout.txt");

/// What following an instruction means, which decides how an output is checked (`check`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    Translation,
    Summary,
    Keyword,
    Uppercase,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Instruction {
    /// `translate-fr`, `translate-es`, `translate-de`, `summarize`, `include-word`, `uppercase`.
    pub id: String,
    pub label: String,
    pub task: Task,
    /// ISO 639-1 code of the language a translation goes into.
    #[serde(default)]
    pub target_language: Option<String>,
    /// Phrasings by the language they are written in ("en", "fr", "es", "de"). `include-word` phrasings hold
    /// `{word}`, filled with the experiment's keyword.
    pub phrasings: std::collections::BTreeMap<String, Vec<String>>,
}

#[derive(Deserialize)]
struct InstructionFile {
    instructions: Vec<Instruction>,
    keywords: Vec<String>,
}

fn file() -> &'static InstructionFile {
    static FILE: OnceLock<InstructionFile> = OnceLock::new();
    FILE.get_or_init(|| serde_json::from_str(INSTRUCTIONS_JSON).expect("crates/saif/data/instructions.json parses"))
}

/// Every built-in instruction.
pub fn instructions() -> &'static [Instruction] {
    &file().instructions
}

/// The ids of the built-in instructions, for messages.
pub fn instruction_ids() -> Vec<&'static str> {
    instructions().iter().map(|i| i.id.as_str()).collect()
}

/// The built-in instruction `id`, or an error that lists the known ones.
pub fn instruction(id: &str) -> Result<&'static Instruction, EngineError> {
    instructions().iter().find(|i| i.id == id).ok_or_else(|| {
        EngineError::InvalidRequest(format!(
            "unknown instruction \"{id}\"; the built-in ones are {}",
            instruction_ids().join(", ")
        ))
    })
}

/// The keywords `include-word` is tried with; the first is the default.
pub fn keywords() -> &'static [String] {
    &file().keywords
}

/// The default keyword of `include-word`.
pub fn default_keyword() -> &'static str {
    &keywords()[0]
}

fn lines(text: &'static str) -> Vec<&'static str> {
    text.lines().map(str::trim).filter(|l| !l.is_empty()).collect()
}

/// Contents for discovery (and for anything tuned: sweeps choose their settings on these).
pub fn discovery_contents() -> Vec<&'static str> {
    lines(DISCOVERY)
}

/// Contents never used for discovery or tuning: evaluations report on these.
pub fn heldout_contents() -> Vec<&'static str> {
    lines(HELDOUT)
}

impl Instruction {
    /// Every phrasing, English first, then the other languages in name order, with `{word}` filled.
    pub fn all_phrasings(&self, keyword: &str) -> Vec<String> {
        let english = self.phrasings.get("en").into_iter().flatten();
        let others = self.phrasings.iter().filter(|(lang, _)| *lang != "en").flat_map(|(_, p)| p);
        english.chain(others).map(|p| p.replace("{word}", keyword)).collect()
    }

    /// The phrasing used with the `i`-th content: the phrasings in turn, so every one is used about equally.
    pub fn phrasing_for(&self, i: usize, keyword: &str) -> String {
        let all = self.all_phrasings(keyword);
        all[i % all.len()].clone()
    }

    /// The phrasing prompting uses: the first English one (a plain, clear request).
    pub fn canonical(&self, keyword: &str) -> String {
        self.all_phrasings(keyword)[0].clone()
    }
}

/// Where the instruction goes relative to the content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Placement {
    /// `content` then the instruction (SAIF reports better latents this way).
    #[default]
    After,
    Before,
}

impl Placement {
    pub fn parse(s: &str) -> Result<Self, EngineError> {
        match s {
            "after" => Ok(Placement::After),
            "before" => Ok(Placement::Before),
            other => Err(EngineError::InvalidRequest(format!("placement \"{other}\": after or before"))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Placement::After => "after",
            Placement::Before => "before",
        }
    }
}

/// How a model is fed a SAIF prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PromptStyle {
    /// A user turn of the model's chat template (instruction-tuned models).
    Chat,
    /// The text and a newline (pretrained models).
    Plain,
}

impl PromptStyle {
    /// Chat for instruction-tuned models, plain text for pretrained ones.
    pub fn for_engine(engine: &Engine) -> Self {
        if engine.instruction_tuned() {
            PromptStyle::Chat
        } else {
            PromptStyle::Plain
        }
    }
}

/// A SAIF prompt as token ids, with where its instruction ends.
#[derive(Debug, Clone)]
pub struct Prompt {
    pub ids: Vec<u32>,
    /// The first position after the instruction, or, without one, after the point where it would have ended (so
    /// that positives and negatives are read at matching positions; see `discover`).
    pub after_instruction: usize,
}

/// The user's text of a prompt: the content, with the instruction after or before it.
pub fn user_text(content: &str, instruction: Option<&str>, placement: Placement) -> String {
    match (instruction, placement) {
        (None, _) => content.to_string(),
        (Some(i), Placement::After) => format!("{content}\n{i}"),
        (Some(i), Placement::Before) => format!("{i}\n{content}"),
    }
}

/// The full text a model is fed for `user`.
pub fn render(engine: &Engine, user: &str, style: PromptStyle) -> String {
    match style {
        PromptStyle::Chat => engine.chat.render(user, None),
        PromptStyle::Plain => format!("{user}\n"),
    }
}

/// Tokenizes a SAIF prompt and finds where its instruction ends.
///
/// With the instruction after the content, reading "after the instruction" covers the template's closing tokens;
/// before the content, it covers the content too. Without an instruction the same stretch is measured from the
/// content's end (after) or its start (before).
pub fn prompt(
    engine: &Engine,
    content: &str,
    instruction: Option<&str>,
    placement: Placement,
    style: PromptStyle,
) -> Result<Prompt, EngineError> {
    let full = render(engine, &user_text(content, instruction, placement), style);
    let ids = engine.tokenizer.encode_prompt(&full)?;
    // The text up to the end of the instruction (or of where it would be), rendered the same way.
    let upto = match (instruction, placement) {
        (Some(i), Placement::After) => user_text(content, Some(i), placement),
        (Some(i), Placement::Before) => i.to_string(),
        (None, Placement::After) => content.to_string(),
        (None, Placement::Before) => String::new(),
    };
    let head = format!("{}{upto}", render_prefix(engine, style));
    let after_instruction = engine.tokenizer.encode_prompt(&head)?.len().min(ids.len().saturating_sub(1));
    Ok(Prompt { ids, after_instruction })
}

/// The template's text before the user's words (the same for every user text).
fn render_prefix(engine: &Engine, style: PromptStyle) -> String {
    let marker = "\u{1}";
    let rendered = render(engine, marker, style);
    rendered.split(marker).next().unwrap_or("").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_data_is_complete() {
        let ids = instruction_ids();
        assert_eq!(ids, ["translate-fr", "translate-es", "translate-de", "summarize", "include-word", "uppercase"]);
        for i in instructions() {
            let english = i.phrasings.get("en").map_or(0, Vec::len);
            let other: usize = i.phrasings.iter().filter(|(l, _)| *l != "en").map(|(_, p)| p.len()).sum();
            assert!(english >= 8 && other >= 4, "{}: {english} English and {other} other phrasings", i.id);
            assert_eq!(i.task == Task::Translation, i.target_language.is_some(), "{}", i.id);
            if i.task == Task::Keyword {
                assert!(i.all_phrasings("X").iter().all(|p| p.matches('X').count() >= 1 && !p.contains("{word}")));
            }
        }
        let (d, h) = (discovery_contents(), heldout_contents());
        assert!(d.len() + h.len() >= 300 && h.len() >= 100, "{} + {}", d.len(), h.len());
        let mut all: Vec<&str> = d.iter().chain(&h).copied().collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), d.len() + h.len(), "contents are distinct");
        assert!(instruction("translate-xx").unwrap_err().to_string().contains("translate-fr"));
    }

    #[test]
    fn the_instruction_goes_after_or_before_the_content() {
        assert_eq!(user_text("A cat.", Some("Translate."), Placement::After), "A cat.\nTranslate.");
        assert_eq!(user_text("A cat.", Some("Translate."), Placement::Before), "Translate.\nA cat.");
        assert_eq!(user_text("A cat.", None, Placement::Before), "A cat.");
    }
}
