//! The shareable link: the page's state as a query string (`?model=...&text=...`), read on arrival and rewritten
//! as the visitor changes things. A malformed link never breaks the page: what cannot be read falls back to the
//! default, and the page says what it ignored.

use crate::catalog;
use crate::protocol::BackendChoice;

/// The longest text a link may carry (links get cut by mail clients and chat apps beyond a few thousand bytes).
pub const MAX_TEXT: usize = 4000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelChoice {
    /// A model of the catalog, by id.
    Catalog(&'static str),
    /// Any GGUF file by URL.
    Url(String),
}

impl ModelChoice {
    fn as_param(&self) -> &str {
        match self {
            ModelChoice::Catalog(id) => id,
            ModelChoice::Url(url) => url,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkState {
    pub model: ModelChoice,
    /// The prompt.
    pub text: String,
    pub backend: BackendChoice,
    /// Whether the prompt goes through the model's chat template.
    pub chat: bool,
}

impl Default for LinkState {
    fn default() -> Self {
        Self {
            model: ModelChoice::Catalog(catalog::DEFAULT_MODEL),
            text: "Translate into French: The weather is nice today.".into(),
            backend: BackendChoice::Auto,
            chat: true,
        }
    }
}

/// Reads a query string (with or without the leading `?`). Returns the state and a note per ignored part.
pub fn parse(query: &str) -> (LinkState, Vec<String>) {
    let mut state = LinkState::default();
    let mut problems = Vec::new();
    for (key, value) in form_urlencoded::parse(query.trim_start_matches('?').as_bytes()) {
        match key.as_ref() {
            "model" => match parse_model(&value) {
                Ok(m) => state.model = m,
                Err(why) => problems.push(why),
            },
            "text" if value.chars().count() > MAX_TEXT => {
                problems.push(format!("the link's text is longer than {MAX_TEXT} characters; it was cut"));
                state.text = value.chars().take(MAX_TEXT).collect();
            }
            "text" => state.text = value.into_owned(),
            "backend" => match BackendChoice::from_id(&value) {
                Some(b) => state.backend = b,
                None => problems.push(format!("unknown backend \"{value}\" ignored (auto, webgpu or cpu)")),
            },
            "chat" => match value.as_ref() {
                "1" => state.chat = true,
                "0" => state.chat = false,
                other => problems.push(format!("chat={other} ignored (1 or 0)")),
            },
            other => problems.push(format!("unknown link parameter \"{other}\" ignored")),
        }
    }
    (state, problems)
}

fn parse_model(value: &str) -> Result<ModelChoice, String> {
    if let Some(m) = catalog::find(value) {
        return Ok(ModelChoice::Catalog(m.id));
    }
    let lower = value.to_ascii_lowercase();
    let web =
        lower.starts_with("https://") || lower.starts_with("http://localhost") || lower.starts_with("http://127.0.0.1");
    if web && !value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Ok(ModelChoice::Url(value.to_string()))
    } else {
        Err(format!(
            "the link names the model \"{}\", which is neither a known model nor an https:// address; the default is used",
            value.chars().take(80).collect::<String>()
        ))
    }
}

/// The query string for a state (with the leading `?`).
pub fn to_query(state: &LinkState) -> String {
    let mut s = form_urlencoded::Serializer::new(String::from("?"));
    s.append_pair("model", state.model.as_param());
    s.append_pair("text", &state.text);
    s.append_pair("backend", state.backend.id());
    s.append_pair("chat", if state.chat { "1" } else { "0" });
    s.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_survives_the_round_trip() {
        let state = LinkState {
            model: ModelChoice::Catalog("gemma-3-270m"),
            text: "Voilà l'été & 12,50 €?".into(),
            backend: BackendChoice::Cpu,
            chat: false,
        };
        assert_eq!(parse(&to_query(&state)), (state, vec![]));
        let url = LinkState { model: ModelChoice::Url("https://example.org/m.gguf?x=1".into()), ..Default::default() };
        assert_eq!(parse(&to_query(&url)).0, url);
    }

    #[test]
    fn malformed_links_fall_back_and_say_why() {
        let (state, problems) = parse("?model=javascript:alert(1)&text=%E2%82&colour=red&backend=tpu&chat=yes");
        assert_eq!(state.model, LinkState::default().model);
        assert_eq!(state.text, "\u{fffd}"); // invalid UTF-8 is replaced, not fatal
        assert_eq!((state.backend, state.chat), (BackendChoice::Auto, true));
        assert_eq!(problems.len(), 4, "{problems:?}");
        assert!(problems[0].contains("neither a known model"));
        assert!(problems[1].contains("colour"));
        assert!(problems[2].contains("tpu") && problems[3].contains("chat"));
        let (state, problems) = parse(&format!("text={}", "a".repeat(MAX_TEXT + 10)));
        assert_eq!(state.text.len(), MAX_TEXT);
        assert_eq!(problems.len(), 1);
        assert_eq!(parse(""), (LinkState::default(), vec![]));
    }
}
