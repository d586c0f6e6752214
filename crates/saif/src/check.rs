//! Deterministic checkers: did an output follow the instruction? No model judges here, so the same output always
//! gets the same verdict, natively and in the browser.
//!
//! - translation: an independent language identifier (`whatlang`) names the target language;
//! - keyword: the word appears, ignoring case (IFEval's keyword check);
//! - uppercase: letters appear and none is lowercase (IFEval's `isupper`);
//! - summary: shorter than its content (in words) and sharing at least two of its content words.
//!
//! *Strict* means the raw output passes; *loose* means one of IFEval's loose variants passes: the output without
//! its first line, without its last line, without both, and each of these (and the output itself) with `*`
//! removed. Loose forgives "Sure! Here is the translation:" lines and markdown, nothing else.

use serde::{Deserialize, Serialize};

use crate::data::{Instruction, Task};

/// What an output is checked for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Check {
    /// The output is in this language (ISO 639-1: "fr", "es", "de", "en").
    Language {
        code: String,
    },
    Keyword {
        word: String,
    },
    Uppercase,
    /// A summary of `content`.
    Summary {
        content: String,
    },
}

impl Check {
    /// The check of `instruction` applied to `content` (with `keyword` for `include-word`).
    pub fn for_instruction(instruction: &Instruction, content: &str, keyword: &str) -> Self {
        match instruction.task {
            Task::Translation => {
                Check::Language { code: instruction.target_language.clone().unwrap_or_else(|| "en".into()) }
            }
            Task::Keyword => Check::Keyword { word: keyword.to_string() },
            Task::Uppercase => Check::Uppercase,
            Task::Summary => Check::Summary { content: content.to_string() },
        }
    }

    /// Whether `text` passes, as it is.
    pub fn passes(&self, text: &str) -> bool {
        let text = text.trim();
        if text.is_empty() {
            return false;
        }
        match self {
            Check::Language { code } => language_of(text).is_some_and(|l| l == code.as_str()),
            Check::Keyword { word } => text.to_lowercase().contains(&word.to_lowercase()),
            Check::Uppercase => text.chars().any(char::is_uppercase) && !text.chars().any(char::is_lowercase),
            Check::Summary { content } => is_summary(content, text),
        }
    }

    /// Strict and loose verdicts on one output.
    pub fn judge(&self, output: &str) -> Verdict {
        let strict = self.passes(output);
        let loose = strict || loose_variants(output).iter().any(|v| self.passes(v));
        Verdict { strict, loose }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    pub strict: bool,
    pub loose: bool,
}

/// IFEval's loose variants of a response: without the first line, without the last, without both, and these and
/// the response itself with every `*` removed.
pub fn loose_variants(text: &str) -> Vec<String> {
    let lines: Vec<&str> = text.split('\n').collect();
    let join = |ls: &[&str]| ls.join("\n").trim().to_string();
    let n = lines.len();
    let first = join(&lines[n.min(1)..]);
    let last = join(&lines[..n.saturating_sub(1)]);
    let both = if n >= 2 { join(&lines[1..n - 1]) } else { String::new() };
    let plain = [text.to_string(), first, last, both];
    let starless: Vec<String> = plain.iter().map(|v| v.replace('*', "")).collect();
    plain.into_iter().chain(starless).filter(|v| !v.trim().is_empty()).collect()
}

/// The languages the identifier chooses among: those the instructions translate into, English, and their
/// nearest neighbours (so that Italian or Portuguese output is not counted as Spanish).
const CANDIDATES: [(whatlang::Lang, &str); 8] = [
    (whatlang::Lang::Eng, "en"),
    (whatlang::Lang::Fra, "fr"),
    (whatlang::Lang::Spa, "es"),
    (whatlang::Lang::Deu, "de"),
    (whatlang::Lang::Ita, "it"),
    (whatlang::Lang::Por, "pt"),
    (whatlang::Lang::Nld, "nl"),
    (whatlang::Lang::Cat, "ca"),
];

/// The fewest different words a text must hold for its language to be named.
const MIN_DISTINCT_WORDS: usize = 3;

/// The language of `text` (ISO 639-1) among `CANDIDATES`, or `None` when it has too few letters or too few
/// different words to tell.
///
/// The identifier reads the text's vocabulary (each word once, in order of first appearance), not the text: a
/// steered model that loops on one word ("Translate Translate Translate…") or two would otherwise be judged by
/// the letter statistics of that word alone, which `whatlang` readily takes for French. How often words repeat is
/// what the fluency measure reports.
pub fn language_of(text: &str) -> Option<&'static str> {
    let words = vocabulary(text);
    if words.len() < MIN_DISTINCT_WORDS || words.iter().map(|w| w.chars().count()).sum::<usize>() < 8 {
        return None;
    }
    let detector = whatlang::Detector::with_allowlist(CANDIDATES.iter().map(|c| c.0).collect());
    let lang = detector.detect_lang(&words.join(" "))?;
    CANDIDATES.iter().find(|c| c.0 == lang).map(|c| c.1)
}

/// The different words of `text`, lowercased and stripped of punctuation, in order of first appearance. A word is
/// a run of letters and apostrophes (so "l'école" stays one word, as does "aujourd'hui").
fn vocabulary(text: &str) -> Vec<String> {
    let mut seen = Vec::<String>::new();
    for word in text.split(|c: char| !c.is_alphabetic() && c != '\'' && c != '’') {
        let word = word.trim_matches(|c: char| c == '\'' || c == '’').to_lowercase();
        if !word.is_empty() && !seen.contains(&word) {
            seen.push(word);
        }
    }
    seen
}

/// Lowercase words of at least four letters that are not among the commonest English words.
fn content_words(text: &str) -> Vec<String> {
    const COMMON: [&str; 24] = [
        "that", "this", "with", "from", "have", "were", "they", "their", "there", "what", "when", "which", "will",
        "would", "about", "been", "into", "than", "then", "them", "your", "some", "very", "just",
    ];
    text.split(|c: char| !c.is_alphanumeric() && c != '\'')
        .map(str::to_lowercase)
        .filter(|w| w.chars().count() >= 4 && !COMMON.contains(&w.as_str()))
        .collect()
}

fn word_count(text: &str) -> usize {
    text.split_whitespace().filter(|w| w.chars().any(char::is_alphanumeric)).count()
}

/// Shorter than the content and sharing at least two of its content words (one, if it has only one).
fn is_summary(content: &str, text: &str) -> bool {
    let source = content_words(content);
    let mut shared: Vec<String> = content_words(text).into_iter().filter(|w| source.contains(w)).collect();
    shared.sort_unstable();
    shared.dedup();
    word_count(text) < word_count(content) && !source.is_empty() && shared.len() >= source.len().min(2)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lang(code: &str) -> Check {
        Check::Language { code: code.into() }
    }

    /// Labelled examples in several languages, written for this test.
    #[test]
    fn the_language_identifier_names_languages() {
        let labelled = [
            ("The children walked to school together because the bus was late again.", "en"),
            ("Les enfants sont allés à l'école ensemble parce que le bus était encore en retard.", "fr"),
            ("Los niños caminaron juntos a la escuela porque el autobús llegó tarde otra vez.", "es"),
            ("Die Kinder gingen zusammen zur Schule, weil der Bus wieder zu spät kam.", "de"),
            ("I bambini sono andati a scuola insieme perché l'autobus era di nuovo in ritardo.", "it"),
            ("Mon voisin cultive des tomates dans son jardin depuis vingt ans.", "fr"),
            ("Mi vecino cultiva tomates en su jardín desde hace veinte años.", "es"),
            ("Mein Nachbar baut seit zwanzig Jahren Tomaten in seinem Garten an.", "de"),
        ];
        for (text, want) in labelled {
            assert_eq!(language_of(text), Some(want), "{text}");
            assert!(lang(want).passes(text));
        }
        assert_eq!(language_of("Oui."), None, "too short to tell");
        assert!(!lang("fr").passes(""));
    }

    /// Loops of one or two words, the way strongly steered models fail, name no language; a looping answer with a
    /// real vocabulary is still judged by that vocabulary (its repetition shows in the fluency measure).
    #[test]
    fn repeating_one_word_is_no_language() {
        let looping = "Translate Translate Translate Translate Translate Translate Translate Translate";
        assert_eq!(language_of(looping), None);
        assert!(!lang("fr").passes(looping));
        assert_eq!(language_of("vous vous vous vous vous vous vous vous vous vous"), None);
        assert_eq!(language_of("La liste\n\nLa liste\n\nLa liste\n\nLa liste"), None, "two words");
        assert_eq!(vocabulary("Le chat, le Chat! L'école."), vec!["le", "chat", "l'école"]);
        let framed_loop = "The French translation\nTranslate Translate Translate Translate Translate";
        assert!(!lang("fr").judge(framed_loop).loose);
        assert_eq!(
            language_of("Le chat dort sur le canapé, le chat dort sur le canapé, le chat dort sur le canapé."),
            Some("fr")
        );
    }

    #[test]
    fn loose_variants_follow_ifeval() {
        let v = loose_variants("Sure! Here it is:\n**Le chat dort.**\nHope this helps");
        assert!(v.contains(&"**Le chat dort.**".to_string()));
        assert!(v.contains(&"Le chat dort.".to_string()));
        assert!(v.contains(&"Sure! Here it is:\n**Le chat dort.**".to_string()));
        assert_eq!(v.len(), 8);
        assert_eq!(loose_variants("one line"), vec!["one line".to_string(); 2]);
        assert!(loose_variants("").is_empty());
    }

    #[test]
    fn strict_and_loose_verdicts() {
        let fr = lang("fr");
        let framed = "Here is the French translation of your sentence:\nLe chat dort sur le canapé depuis ce matin.";
        assert_eq!(fr.judge(framed), Verdict { strict: false, loose: true });
        assert_eq!(fr.judge("Le chat dort sur le canapé depuis ce matin."), Verdict { strict: true, loose: true });
        assert_eq!(
            fr.judge("The cat has been sleeping on the sofa since this morning."),
            Verdict { strict: false, loose: false }
        );

        let upper = Check::Uppercase;
        assert_eq!(upper.judge("THE CAT SLEEPS ON THE SOFA."), Verdict { strict: true, loose: true });
        assert_eq!(upper.judge("Sure:\nTHE CAT SLEEPS."), Verdict { strict: false, loose: true });
        assert_eq!(upper.judge("The cat sleeps."), Verdict { strict: false, loose: false });
        assert!(!upper.passes("123 !!"), "no letters");

        let word = Check::Keyword { word: "lantern".into() };
        assert!(word.passes("She lit the Lantern at dusk."));
        assert!(!word.passes("She lit the lamp at dusk."));

        let content = "The old bakery on the corner closed last winter after the owners retired and moved away.";
        let summary = Check::Summary { content: content.into() };
        assert!(summary.passes("The bakery closed when its owners retired."));
        assert!(!summary.passes("It closed."), "shares too little");
        assert!(!summary.passes(content), "not shorter");
        assert!(!summary.passes("Bakeries are nice places to buy bread and cakes in the morning."));
    }
}
