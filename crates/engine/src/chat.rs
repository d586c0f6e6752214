//! Chat templates: how a user turn is wrapped before the model answers it. The GGUF's Jinja template is not
//! executed; the engine recognises the template family it belongs to and renders that family's turns.

use serde::Serialize;

use crate::config::Architecture;
use crate::gguf::GgufFile;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "family", rename_all = "lowercase")]
pub enum ChatTemplate {
    /// `<start_of_turn>user\n...<end_of_turn>\n<start_of_turn>model\n` (Gemma; BOS comes from the tokenizer).
    Gemma,
    /// `<|im_start|>user\n...<|im_end|>\n<|im_start|>assistant\n` (SmolLM2, Qwen), with the system turn the
    /// template inserts by default, if any.
    ChatMl { default_system: Option<String> },
    /// `<|start_header_id|>user<|end_header_id|>\n\n...<|eot_id|>` (Llama 3).
    Llama3,
}

impl ChatTemplate {
    /// The template family of a model: from `tokenizer.chat_template` where present, else from the architecture.
    pub fn from_gguf(gguf: &GgufFile, architecture: Architecture) -> Self {
        let template = gguf.get_str("tokenizer.chat_template").unwrap_or("");
        if template.contains("<|im_start|>") {
            ChatTemplate::ChatMl { default_system: chatml_default_system(template) }
        } else if template.contains("<|start_header_id|>") {
            ChatTemplate::Llama3
        } else if template.contains("<start_of_turn>") || architecture != Architecture::Llama {
            ChatTemplate::Gemma
        } else {
            ChatTemplate::ChatMl { default_system: None }
        }
    }

    /// The prompt for one user message, ending where the model's answer begins. `system` replaces the
    /// template's default system turn; `Some("")` leaves it out.
    pub fn render(&self, user: &str, system: Option<&str>) -> String {
        match self {
            ChatTemplate::Gemma => {
                // Gemma has no system role: its template prepends the system text to the user turn.
                let user = match system {
                    Some(s) if !s.is_empty() => format!("{s}\n\n{user}"),
                    _ => user.to_string(),
                };
                format!("<start_of_turn>user\n{user}<end_of_turn>\n<start_of_turn>model\n")
            }
            ChatTemplate::ChatMl { default_system } => {
                let system = system.or(default_system.as_deref()).filter(|s| !s.is_empty());
                let mut out = String::new();
                if let Some(s) = system {
                    out.push_str(&format!("<|im_start|>system\n{s}<|im_end|>\n"));
                }
                out.push_str(&format!("<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"));
                out
            }
            ChatTemplate::Llama3 => {
                let mut out = String::new();
                if let Some(s) = system.filter(|s| !s.is_empty()) {
                    out.push_str(&format!("<|start_header_id|>system<|end_header_id|>\n\n{s}<|eot_id|>"));
                }
                out.push_str(&format!(
                    "<|start_header_id|>user<|end_header_id|>\n\n{user}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
                ));
                out
            }
        }
    }
}

/// The literal system turn a ChatML template inserts when the conversation has none (SmolLM2's "You are a
/// helpful AI assistant named SmolLM...").
fn chatml_default_system(template: &str) -> Option<String> {
    let start = template.find("<|im_start|>system\n")? + "<|im_start|>system\n".len();
    let end = template[start..].find("<|im_end|>")? + start;
    let text = &template[start..end];
    // A template that inserts the caller's own system message has Jinja there, not text.
    let jinja = ["{{", "{%", "message[", "' +", "+ '"].iter().any(|j| text.contains(j));
    (!jinja).then(|| text.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_finds_smollm_default_system() {
        let t = "{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}";
        assert_eq!(
            chatml_default_system(t).as_deref(),
            Some("You are a helpful AI assistant named SmolLM, trained by Hugging Face")
        );
        assert_eq!(chatml_default_system("{{'<|im_start|>system\n' + message['content'] + '<|im_end|>'}}"), None);
    }

    #[test]
    fn renders_each_family() {
        assert_eq!(
            ChatTemplate::Gemma.render("hi", None),
            "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"
        );
        let chatml = ChatTemplate::ChatMl { default_system: Some("Be brief.".into()) };
        assert_eq!(
            chatml.render("hi", None),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(chatml.render("hi", Some("")), "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
    }
}
