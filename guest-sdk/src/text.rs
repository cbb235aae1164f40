//! Tokenization for BERT-family text models (MiniLM and friends).
//!
//! A dependency-light, deterministic re-implementation of the uncased BERT
//! tokenizer as Hugging Face `tokenizers` configures it for `bert-base-uncased`
//! (BertNormalizer with lowercasing, BertPreTokenizer, WordPiece with `##`
//! continuations). The host's test suite checks it token for token against
//! the `tokenizers` crate on real text.
//!
//! The vocabulary is a table sorted by token, so a job can embed it as static
//! data (no parsing or hashing at task start: every task is a fresh instance,
//! and a 30,000-entry hash map would cost more than the inference).

use unicode_normalization::UnicodeNormalization;
use unicode_properties::{GeneralCategory, GeneralCategoryGroup, UnicodeGeneralCategory};

/// The id of `[PAD]` in BERT vocabularies.
pub const PAD: u32 = 0;

/// A WordPiece vocabulary and the special tokens it uses.
#[derive(Debug, Clone)]
pub struct WordPiece<'v> {
    /// (token, id) sorted by token bytes; lives as long as the job's static data.
    sorted: std::borrow::Cow<'v, [(&'v str, u32)]>,
    /// Id of `[CLS]`, put before every sequence.
    cls: u32,
    /// Id of `[SEP]`, put after every sequence.
    sep: u32,
    /// Id of `[UNK]`, for words the vocabulary cannot spell.
    unk: u32,
}

/// Why a vocabulary cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VocabError(pub String);

impl std::fmt::Display for VocabError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for VocabError {}

impl<'v> WordPiece<'v> {
    /// Use a table already sorted by token (as generated at build time).
    pub fn from_sorted(sorted: &'v [(&'v str, u32)]) -> Result<Self, VocabError> {
        if sorted.windows(2).any(|w| w[0].0 >= w[1].0) {
            return Err(VocabError(
                "vocabulary table is not sorted by token or has duplicates".into(),
            ));
        }
        Self::with_table(std::borrow::Cow::Borrowed(sorted))
    }

    /// A table sorted at build time (strictly by token, as
    /// `jobs/embed/build.rs` emits and asserts), without checking the order
    /// again: in a fresh instance per task that check is ~30 000 string
    /// comparisons each time. An unsorted table is not unsafe, but lookups
    /// would miss tokens (they become `[UNK]`); use [`Self::from_sorted`]
    /// for tables made at run time.
    pub fn from_presorted(sorted: &'v [(&'v str, u32)]) -> Result<Self, VocabError> {
        Self::with_table(std::borrow::Cow::Borrowed(sorted))
    }

    /// Parse a `vocab.txt` (one token per line, id = line number).
    pub fn from_vocab_txt(text: &'v str) -> Result<Self, VocabError> {
        Self::with_table(std::borrow::Cow::Owned(sorted_table(text)))
    }

    fn with_table(sorted: std::borrow::Cow<'v, [(&'v str, u32)]>) -> Result<Self, VocabError> {
        let find = |t: &str| {
            sorted
                .binary_search_by(|(k, _)| (*k).cmp(t))
                .map(|i| sorted[i].1)
                .map_err(|_| VocabError(format!("vocabulary has no {t} token")))
        };
        let (cls, sep, unk) = (find("[CLS]")?, find("[SEP]")?, find("[UNK]")?);
        Ok(Self {
            sorted,
            cls,
            sep,
            unk,
        })
    }

    /// The id of `token`, if the vocabulary has it.
    pub fn id(&self, token: &str) -> Option<u32> {
        self.sorted
            .binary_search_by(|(k, _)| (*k).cmp(token))
            .ok()
            .map(|i| self.sorted[i].1)
    }

    /// `[CLS] tokens… [SEP]`, truncated so the whole is at most `max_len` ids.
    pub fn encode(&self, text: &str, max_len: usize) -> Vec<u32> {
        let mut ids = vec![self.cls];
        let budget = max_len.saturating_sub(2);
        for word in pre_tokenize(&normalize(text)) {
            if ids.len() > budget {
                break;
            }
            self.word_piece(&word, &mut ids);
        }
        ids.truncate(budget + 1);
        ids.push(self.sep);
        ids
    }

    /// Greedy longest-match-first split of one word, as BERT does it.
    fn word_piece(&self, word: &str, out: &mut Vec<u32>) {
        if word.chars().count() > 100 {
            out.push(self.unk);
            return;
        }
        let mut pieces = Vec::new();
        let mut start = 0;
        let mut buf = String::new();
        while start < word.len() {
            let mut end = word.len();
            let mut found = None;
            while start < end {
                buf.clear();
                if start > 0 {
                    buf.push_str("##");
                }
                buf.push_str(&word[start..end]);
                if let Some(id) = self.id(&buf) {
                    found = Some(id);
                    break;
                }
                // Step back one character (not one byte).
                end = word[..end]
                    .char_indices()
                    .next_back()
                    .map_or(start, |(i, _)| i);
            }
            match found {
                Some(id) => {
                    pieces.push(id);
                    start = end;
                }
                None => {
                    out.push(self.unk);
                    return;
                }
            }
        }
        out.extend(pieces);
    }
}

/// `vocab.txt` (id = line number) as (token, id) sorted by token, the first
/// id of a repeated token kept.
fn sorted_table(text: &str) -> Vec<(&str, u32)> {
    let mut table: Vec<(&str, u32)> = text
        .lines()
        .enumerate()
        .map(|(i, t)| (t, i as u32))
        .collect();
    table.sort_unstable();
    table.dedup_by(|a, b| a.0 == b.0);
    table
}

/// BertNormalizer: drop control characters, space out CJK ideographs, strip
/// accents (NFD, drop nonspacing marks) and lowercase.
fn normalize(text: &str) -> String {
    let mut cleaned = String::with_capacity(text.len());
    for c in text.chars() {
        if c == '\0' || c == '\u{fffd}' || is_control(c) {
            continue;
        }
        if is_whitespace(c) {
            cleaned.push(' ');
        } else if is_cjk(c) {
            cleaned.push(' ');
            cleaned.push(c);
            cleaned.push(' ');
        } else {
            cleaned.push(c);
        }
    }
    if cleaned.is_ascii() {
        // Most text: NFD leaves ASCII alone and it has no nonspacing marks,
        // so this is `strip_accents_and_lowercase` without the Unicode
        // tables (the tokenizer's main cost in a guest otherwise).
        cleaned.make_ascii_lowercase();
        return cleaned;
    }
    strip_accents_and_lowercase(&cleaned)
}

/// NFD, drop nonspacing marks, lowercase: the general path of [`normalize`].
fn strip_accents_and_lowercase(text: &str) -> String {
    text.nfd()
        .filter(|c| c.general_category() != GeneralCategory::NonspacingMark)
        .flat_map(char::to_lowercase)
        .collect()
}

/// BertPreTokenizer: split on whitespace, and isolate every punctuation mark.
fn pre_tokenize(text: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    for c in text.chars() {
        if is_whitespace(c) {
            if !cur.is_empty() {
                words.push(std::mem::take(&mut cur));
            }
        } else if is_punctuation(c) {
            if !cur.is_empty() {
                words.push(std::mem::take(&mut cur));
            }
            words.push(c.to_string());
        } else {
            cur.push(c);
        }
    }
    if !cur.is_empty() {
        words.push(cur);
    }
    words
}

// Each test below answers ASCII without the Unicode tables (the same
// answers: `ascii_shortcuts_agree_with_the_tables` checks all 128).

fn is_whitespace(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r')
        || (!c.is_ascii() && c.general_category() == GeneralCategory::SpaceSeparator)
}

fn is_control(c: char) -> bool {
    if c.is_ascii() {
        return c.is_ascii_control() && !matches!(c, '\t' | '\n' | '\r');
    }
    c.general_category_group() == GeneralCategoryGroup::Other
}

fn is_punctuation(c: char) -> bool {
    c.is_ascii_punctuation()
        || (!c.is_ascii() && c.general_category_group() == GeneralCategoryGroup::Punctuation)
}

fn is_cjk(c: char) -> bool {
    matches!(c as u32,
        0x4E00..=0x9FFF | 0x3400..=0x4DBF | 0x20000..=0x2A6DF | 0x2A700..=0x2B73F
        | 0x2B740..=0x2B81F | 0x2B820..=0x2CEAF | 0xF900..=0xFAFF | 0x2F800..=0x2FA1F)
}

#[cfg(test)]
mod tests {
    use super::*;

    const VOCAB: &str =
        "[PAD]\n[UNK]\n[CLS]\n[SEP]\nhello\nworld\n,\n!\nun\n##want\n##ed\nrun\n##ning\ncafe\n";

    #[test]
    fn splits_words_punctuation_and_pieces() {
        let wp = WordPiece::from_vocab_txt(VOCAB).expect("vocab");
        let ids = wp.encode("Hello, WORLD! unwanted running Café xyz", 128);
        assert_eq!(ids, vec![2, 4, 6, 5, 7, 8, 9, 10, 11, 12, 13, 1, 3]);
    }

    #[test]
    fn truncates_to_max_len_keeping_sep() {
        let wp = WordPiece::from_vocab_txt(VOCAB).expect("vocab");
        let ids = wp.encode("hello hello hello hello", 4);
        assert_eq!(ids, vec![2, 4, 4, 3]);
    }

    #[test]
    fn ascii_shortcuts_agree_with_the_tables() {
        for c in (0u8..128).map(char::from) {
            let space = matches!(c, ' ' | '\t' | '\n' | '\r')
                || c.general_category() == GeneralCategory::SpaceSeparator;
            let control = !matches!(c, '\t' | '\n' | '\r')
                && c.general_category_group() == GeneralCategoryGroup::Other;
            let punct = c.is_ascii_punctuation()
                || c.general_category_group() == GeneralCategoryGroup::Punctuation;
            assert_eq!(is_whitespace(c), space, "{c:?}");
            assert_eq!(is_control(c), control, "{c:?}");
            assert_eq!(is_punctuation(c), punct, "{c:?}");
        }
        let printable: String = (32u8..127).map(char::from).collect();
        assert_eq!(
            normalize(&printable),
            strip_accents_and_lowercase(&printable)
        );
        // And a non-ASCII text still takes the general path.
        assert_eq!(normalize("Café ÉTÉ"), "cafe ete");
    }

    #[test]
    fn a_presorted_table_tokenizes_as_a_checked_one() {
        let table = sorted_table(VOCAB);
        let text = "Hello, WORLD! unwanted running Café xyz";
        let checked = WordPiece::from_sorted(&table)
            .expect("sorted")
            .encode(text, 128);
        let trusted = WordPiece::from_presorted(&table)
            .expect("sorted")
            .encode(text, 128);
        assert_eq!(checked, trusted);
        assert_eq!(checked, vec![2, 4, 6, 5, 7, 8, 9, 10, 11, 12, 13, 1, 3]);
    }

    #[test]
    fn unsorted_table_is_refused() {
        let table = [("b", 1), ("a", 0)];
        assert!(WordPiece::from_sorted(&table).is_err());
    }
}
