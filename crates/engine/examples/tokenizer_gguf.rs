//! Writes a GGUF that holds only a model's tokenizer metadata (`general.architecture` and `tokenizer.*`), no
//! tensors: a few megabytes the browser tests embed to check tokenization without the model's weights.
//!
//!     cargo run --release -p saif-engine --example tokenizer_gguf -- MODEL.gguf OUT.gguf

use std::io::BufReader;

use candle_core::quantized::gguf_file;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, input, output] = &args[..] else {
        return Err("usage: tokenizer_gguf MODEL.gguf OUT.gguf".into());
    };
    let content = gguf_file::Content::read(&mut BufReader::new(std::fs::File::open(input)?))?;
    let mut keys: Vec<&String> =
        content.metadata.keys().filter(|k| k.starts_with("tokenizer.") || *k == "general.architecture").collect();
    keys.sort();
    let metadata: Vec<(&str, &gguf_file::Value)> = keys.iter().map(|k| (k.as_str(), &content.metadata[*k])).collect();
    let mut out = std::io::BufWriter::new(std::fs::File::create(output)?);
    gguf_file::write(&mut out, &metadata, &[])?;
    Ok(())
}
