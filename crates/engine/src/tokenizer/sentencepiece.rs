//! SentencePiece BPE (Gemma's `tokenizer.ggml.model = "llama"`), encoded straight from the pieces' scores.
//!
//! SentencePiece merges, again and again, the adjacent pair of symbols whose concatenation is a normal piece with
//! the highest score. The `tokenizers` crate can run this as a BPE whose merge list holds every split of every
//! normal piece into two pieces, ranked by score. For Gemma 3 that list has 513,511 merges, and building it took
//! 1.9 s of the page's 4.8 s from a visit to the first token (docs/benchmarks.md). This model needs only the
//! vocabulary: it looks each candidate pair's concatenation up when it meets it. Its pieces are kept in one string
//! with a hash table of ids, so Gemma's whole tokenizer builds in 0.02-0.04 s natively, against 0.8 s for the merge
//! list. It is a `tokenizers::Model`, so the normalizer, the added tokens and the decoder stay the crate's.
//!
//! It reproduces that BPE exactly, including its tie-breaks (equal scores: the smaller left id, then the smaller
//! right id, then the leftmost pair) and its fallbacks (a character outside the vocabulary becomes its bytes'
//! `<0xNN>` pieces, or the unknown piece, consecutive unknowns fused). The tests compare the two on many texts.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};
use std::hash::BuildHasher;

use hashbrown::hash_table::{Entry, HashTable};
use hashbrown::DefaultHashBuilder;
use std::path::{Path, PathBuf};

use tokenizers::models::bpe::BpeTrainer;
use tokenizers::{Model, Token};

use super::TYPE_NORMAL;

pub struct SentencePieceBpe {
    /// Every piece, as stored (`▁` for a space), one after the other: one allocation, not 262,144.
    text: String,
    /// Where each id's piece lies in `text`.
    spans: Vec<(u32, u32)>,
    /// Each piece's id, found by the piece's text; the first of duplicate pieces wins, as in llama.cpp.
    ids: HashTable<u32>,
    hasher: DefaultHashBuilder,
    /// By id (of a piece's first occurrence): the score a merge into this piece ranks by, `None` where no normal
    /// piece has this text (no merge makes it).
    merge_score: Vec<Option<f32>>,
    /// The ids of the byte pieces `<0x00>`..`<0xFF>`, where the vocabulary has `<0x00>` (byte fallback).
    bytes: Option<Vec<Option<u32>>>,
    unk: Option<u32>,
}

impl SentencePieceBpe {
    pub fn new(tokens: &[&str], scores: &[f32], types: &[i64], unk: Option<u32>) -> Self {
        let mut text = String::with_capacity(tokens.iter().map(|t| t.len()).sum());
        let mut spans = Vec::with_capacity(tokens.len());
        for t in tokens {
            spans.push((text.len() as u32, (text.len() + t.len()) as u32));
            text.push_str(t);
        }
        let piece = |id: u32| {
            let (start, end) = spans[id as usize];
            &text[start as usize..end as usize]
        };
        let hasher = DefaultHashBuilder::default();
        let mut ids = HashTable::with_capacity(tokens.len());
        let mut merge_score = vec![None; tokens.len()];
        for (i, t) in tokens.iter().enumerate() {
            let first = match ids.entry(hasher.hash_one(t), |&id| piece(id) == *t, |&id| hasher.hash_one(piece(id))) {
                Entry::Occupied(e) => *e.get(),
                Entry::Vacant(e) => *e.insert(i as u32).get(),
            } as usize;
            if types[i] == TYPE_NORMAL {
                // Of duplicate normal pieces, the lowest score ranks the merge (the BPE this reproduces keeps the
                // last of equal merges in its score-sorted list).
                merge_score[first] = Some(merge_score[first].map_or(scores[i], |s: f32| s.min(scores[i])));
            }
        }
        let mut model = Self { text, spans, ids, hasher, merge_score, bytes: None, unk };
        model.bytes = model.id("<0x00>").map(|_| (0..=255u8).map(|b| model.id(&format!("<0x{b:02X}>"))).collect());
        model
    }

    fn piece(&self, id: u32) -> &str {
        let (start, end) = self.spans[id as usize];
        &self.text[start as usize..end as usize]
    }

    fn id(&self, piece: &str) -> Option<u32> {
        self.ids.find(self.hasher.hash_one(piece), |&id| self.piece(id) == piece).copied()
    }

    /// The merge of symbols `left` and `right`, where their concatenation is a normal piece (`joined` is scratch
    /// space, reused across a text's candidate pairs).
    fn merge(&self, joined: &mut String, left: u32, right: u32, pos: usize) -> Option<Merge> {
        joined.clear();
        joined.push_str(self.piece(left));
        joined.push_str(self.piece(right));
        let id = self.id(joined)?;
        let score = self.merge_score[id as usize]?;
        Some(Merge { score, left, right, pos, id })
    }

    /// The initial symbols of `text`: one per character in the vocabulary, its bytes' pieces otherwise, or the
    /// unknown piece (consecutive unknowns fused into one, and written once a known character follows, as the
    /// `tokenizers` BPE does).
    fn symbols(&self, text: &str) -> Vec<Symbol> {
        let mut symbols: Vec<Symbol> = Vec::with_capacity(text.len());
        let push = |symbols: &mut Vec<Symbol>, id: u32, len: usize| {
            let n = symbols.len() as isize;
            symbols.push(Symbol { id, len, prev: n - 1, next: n + 1 });
        };
        let mut unknown: Option<usize> = None;
        for c in text.chars() {
            let mut buf = [0u8; 4];
            let s = c.encode_utf8(&mut buf);
            if let Some(id) = self.id(s) {
                if let (Some(len), Some(unk)) = (unknown.take(), self.unk) {
                    push(&mut symbols, unk, len);
                }
                push(&mut symbols, id, s.len());
            } else if let Some(pieces) =
                self.bytes.as_ref().and_then(|b| s.bytes().map(|byte| b[byte as usize]).collect::<Option<Vec<_>>>())
            {
                for id in pieces {
                    push(&mut symbols, id, 1);
                }
            } else if self.unk.is_some() {
                unknown = Some(unknown.unwrap_or(0) + s.len());
            }
        }
        if let (Some(len), Some(unk)) = (unknown, self.unk) {
            push(&mut symbols, unk, len);
        }
        if let Some(last) = symbols.last_mut() {
            last.next = -1;
        }
        symbols
    }
}

/// A symbol of the text being encoded, in a linked list of the symbols still standing.
#[derive(Clone, Copy)]
struct Symbol {
    id: u32,
    /// Bytes of the text it covers; 0 once merged into its left neighbour.
    len: usize,
    prev: isize,
    next: isize,
}

/// A candidate merge of the symbol at `pos` with its right neighbour into piece `id`.
struct Merge {
    score: f32,
    left: u32,
    right: u32,
    pos: usize,
    id: u32,
}

impl Ord for Merge {
    /// The best merge is the greatest: higher score, then smaller left id, smaller right id, smaller position.
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then(other.left.cmp(&self.left))
            .then(other.right.cmp(&self.right))
            .then(other.pos.cmp(&self.pos))
    }
}

impl PartialOrd for Merge {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Merge {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Merge {}

impl Model for SentencePieceBpe {
    /// Never used: these models come from GGUF files, not from training.
    type Trainer = BpeTrainer;

    fn tokenize(&self, sequence: &str) -> tokenizers::Result<Vec<Token>> {
        let mut symbols = self.symbols(sequence);
        let mut joined = String::new();
        let mut queue: BinaryHeap<Merge> = (1..symbols.len())
            .filter_map(|i| self.merge(&mut joined, symbols[i - 1].id, symbols[i].id, i - 1))
            .collect();
        while let Some(top) = queue.pop() {
            let here = symbols[top.pos];
            // Skip merges that went stale: the symbol was merged away, or its neighbour changed.
            if here.len == 0 || here.next < 0 || here.id != top.left {
                continue;
            }
            let right = symbols[here.next as usize];
            if right.id != top.right {
                continue;
            }
            symbols[top.pos] = Symbol { id: top.id, len: here.len + right.len, prev: here.prev, next: right.next };
            symbols[here.next as usize].len = 0;
            if right.next >= 0 {
                symbols[right.next as usize].prev = top.pos as isize;
                queue.extend(self.merge(&mut joined, top.id, symbols[right.next as usize].id, top.pos));
            }
            if here.prev >= 0 {
                let prev = here.prev as usize;
                queue.extend(self.merge(&mut joined, symbols[prev].id, top.id, prev));
            }
        }
        let mut offset = 0;
        Ok(symbols
            .iter()
            .filter(|s| s.len > 0)
            .map(|s| {
                offset += s.len;
                Token::new(s.id, self.piece(s.id).to_string(), (offset - s.len, offset))
            })
            .collect())
    }

    fn token_to_id(&self, token: &str) -> Option<u32> {
        self.id(token)
    }

    fn id_to_token(&self, id: u32) -> Option<String> {
        ((id as usize) < self.spans.len()).then(|| self.piece(id).to_string())
    }

    fn get_vocab(&self) -> HashMap<String, u32> {
        self.ids.iter().map(|&id| (self.piece(id).to_string(), id)).collect()
    }

    fn get_vocab_size(&self) -> usize {
        self.spans.len()
    }

    fn save(&self, _folder: &Path, _prefix: Option<&str>) -> tokenizers::Result<Vec<PathBuf>> {
        Err("a GGUF's SentencePiece vocabulary is not saved as files".into())
    }

    fn get_trainer(&self) -> BpeTrainer {
        BpeTrainer::default()
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use tokenizers::models::bpe::{Vocab, BPE};

    use super::*;
    use crate::gguf::GgufFile;

    /// The twin: SentencePiece as a `tokenizers` BPE with every split of every normal piece as a merge, ranked by
    /// the merged piece's score (higher first), ties by the ids of the two halves (what this engine used before).
    fn merge_list_bpe(tokens: &[&str], scores: &[f32], types: &[i64], unk: Option<u32>) -> BPE {
        let mut vocab = Vocab::default();
        for (i, t) in tokens.iter().enumerate() {
            vocab.entry(t.to_string()).or_insert(i as u32);
        }
        let mut ranked: Vec<(f32, u32, u32)> = Vec::new();
        for (i, piece) in tokens.iter().enumerate() {
            if types[i] != TYPE_NORMAL {
                continue;
            }
            for (split, _) in piece.char_indices().skip(1) {
                let (left, right) = piece.split_at(split);
                if let (Some(&l), Some(&r)) = (vocab.get(left), vocab.get(right)) {
                    ranked.push((scores[i], l, r));
                }
            }
        }
        ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        let merges = ranked
            .into_iter()
            .map(|(_, l, r)| (tokens[l as usize].to_string(), tokens[r as usize].to_string()))
            .collect();
        let byte_fallback = vocab.contains_key("<0x00>");
        let mut builder = BPE::builder().vocab_and_merges(vocab, merges).byte_fallback(byte_fallback).fuse_unk(true);
        if let Some(unk) = unk {
            builder = builder.unk_token(tokens[unk as usize].to_string());
        }
        builder.build().unwrap()
    }

    fn ids(model: &impl Model, text: &str) -> Vec<(u32, (usize, usize))> {
        model.tokenize(text).unwrap().into_iter().map(|t| (t.id, t.offsets)).collect()
    }

    /// A small vocabulary, worked by hand: where two merges score the same, the one with the smaller left id goes
    /// first; a character outside the vocabulary becomes its bytes, or the unknown piece.
    #[test]
    fn merges_by_score_then_by_ids_as_worked_by_hand() {
        //             0    1    2    3     4     5      6        7         8         9       10
        let tokens = ["a", "b", "c", "ab", "bc", "abc", "<unk>", "▁", "<0x00>", "<0xC3>", "<0xA9>"];
        // <unk> is type 2 (unknown), the byte pieces type 6 (byte); the rest are normal.
        let mut types = vec![TYPE_NORMAL; tokens.len()];
        types[6] = 2;
        types[8..].iter_mut().for_each(|t| *t = 6);
        let check = |scores: &[f32], text: &str, want: &[u32]| {
            let model = SentencePieceBpe::new(&tokens, scores, &types, Some(6));
            let got: Vec<u32> = ids(&model, text).into_iter().map(|t| t.0).collect();
            assert_eq!(got, want, "{text:?} with scores {scores:?}");
            let twin = merge_list_bpe(&tokens, scores, &types, Some(6));
            assert_eq!(ids(&model, text), ids(&twin, text), "{text:?} with scores {scores:?}, against the twin");
        };
        let flat = [0.0; 11];
        // ab and bc tie; a (0) is a smaller left id than b (1): ab first, then ab + c = abc.
        check(&flat, "abc", &[5]);
        // bc scores higher: bc first, then a + bc = abc.
        let mut bc_first = flat;
        bc_first[4] = 1.0;
        check(&bc_first, "abc", &[5]);
        // Where abc is not a normal piece (here user-defined), no merge makes it: the first merge decides.
        let mut user_abc = types.clone();
        user_abc[5] = 4;
        let model = SentencePieceBpe::new(&tokens, &flat, &user_abc, Some(6));
        assert_eq!(ids(&model, "abc").iter().map(|t| t.0).collect::<Vec<_>>(), [3, 2]);
        let model = SentencePieceBpe::new(&tokens, &bc_first, &user_abc, Some(6));
        assert_eq!(ids(&model, "abc").iter().map(|t| t.0).collect::<Vec<_>>(), [0, 4]);
        // Equal pairs: the leftmost merges first ("abab": ab, ab).
        check(&flat, "abab", &[3, 3]);
        // é is not a piece: its two bytes; ж has no byte pieces here (only 0x00, 0xC3, 0xA9): unknown, fused.
        check(&flat, "aéb", &[0, 9, 10, 1]);
        check(&flat, "жжa", &[6, 0]);
    }

    fn gemma() -> Option<GgufFile> {
        let dir = std::env::var_os("SAIF_MODELS")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/saif/models"));
        let path = dir.join("gemma-3-270m-q4_k_m.gguf");
        assert!(path.exists(), "{} is missing: run `make setup` (it fetches the offline models)", path.display());
        Some(GgufFile::read(&mut std::fs::File::open(path).unwrap()).unwrap())
    }

    /// Gemma 3's 262,144 pieces: the same tokens and offsets as the twin on the project's content sentences, text in
    /// other scripts, and random strings over a mixed alphabet (ties, byte fallback, long runs).
    #[test]
    fn matches_the_merge_list_bpe_on_gemma_3() {
        let gguf = gemma().unwrap();
        let tokens = gguf.get_str_array("tokenizer.ggml.tokens").unwrap();
        let scores = gguf.opt_f32_array("tokenizer.ggml.scores").unwrap().unwrap();
        let types = gguf.opt_i64_array("tokenizer.ggml.token_type").unwrap().unwrap();
        let unk = gguf.opt_usize("tokenizer.ggml.unknown_token_id").unwrap().map(|u| u as u32);
        let model = SentencePieceBpe::new(&tokens, &scores, &types, unk);
        let twin = merge_list_bpe(&tokens, &scores, &types, unk);

        let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../saif/data");
        let mut texts: Vec<String> = ["contents-discovery.txt", "contents-heldout.txt"]
            .iter()
            .flat_map(|f| std::fs::read_to_string(data.join(f)).unwrap().lines().map(String::from).collect::<Vec<_>>())
            .collect();
        assert!(texts.len() >= 300);
        texts.extend(
            [
                "Traduisez en français : le chat dort sur le canapé.",
                "Übersetze ins Deutsche: Straße, Größe, Mädchen.",
                "¿Puedes resumir esto? Añádelo, señor.",
                "東京は日本の首都です。北京是中国的首都。",
                "Москва — столица России. Ελληνικά. العربية. עברית. हिन्दी.",
                "Emoji 🙂🚀👩‍👩‍👧 and private use \u{e000}\u{f8ff}, controls \u{1}\u{7f}.",
                "    indented\t\ttabs\n\n\nnewlines   and   runs      of spaces",
                "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
                "1234567890 3.14159 1,000,000 0x7fff_ffff",
                "",
            ]
            .map(String::from),
        );
        // Random strings over a mixed alphabet, from a fixed seed.
        let alphabet: Vec<char> =
            "abcdefghijklmnopqrstuvwxyz  eeaaoo.,!?'éèàçñüöß日本語中文ру€🙂\n\t0123".chars().collect();
        let mut state = 0x9e3779b97f4a7c15u64;
        for _ in 0..300 {
            let mut text = String::new();
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            for _ in 0..(state % 60) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                text.push(alphabet[(state % alphabet.len() as u64) as usize]);
            }
            texts.push(text);
        }
        for text in &texts {
            // As the normalizer hands text to the model: spaces as ▁, one in front.
            let normalized = format!("▁{}", text.replace(' ', "▁"));
            assert_eq!(ids(&model, &normalized), ids(&twin, &normalized), "tokenizing {text:?}");
        }
    }
}
