//! `summarize`: a one-sentence summary and topic tags for one text item.
//!
//! Input JSON `{"text": "..."}` (an optional `"id"` is echoed back); output
//! JSON `{"id": ..., "summary": "...", "tags": ["humor", ...], "model":
//! "gemma3-270m"}`. Tags come only from the topic list (the `topics`
//! parameter, comma-separated; a default list otherwise); when the model
//! names none of them the tag is `other`.
//!
//! Two greedy generations with Gemma 3 270M through wasi-nn (`ggml`): one for
//! the summary, one for the topic. The catalogue's Gemma 3 270M is the
//! pretrained model (its GGUF has no chat template), so the prompts are
//! few-shot completions, not chat turns. Greedy decoding makes the output a pure
//! function of the input on one node build, and checkable elsewhere by the
//! `llm` tier's replay.

use serde::{Deserialize, Serialize};
use tidepool_guest::llm::{Llm, Options};
use tidepool_guest::{export_job, io, params, Job, JobError};

/// The model name the manifest binds to the verified GGUF file.
const MODEL: &str = "gemma3-270m";
/// Longest text accepted (bytes); longer items are refused, not cut.
const MAX_TEXT_BYTES: usize = 4096;
/// Summary length bound (tokens).
const SUMMARY_TOKENS: u32 = 48;
/// Topic answer length bound (tokens).
const TOPIC_TOKENS: u32 = 8;
/// At most this many tags per item.
const MAX_TAGS: usize = 3;
/// Few-shot examples for the summary (the model continues the pattern).
const SUMMARY_SHOTS: &str = "Write a one-sentence summary of each text.\n\n\
Text: The early bird gets the worm, but the second mouse gets the cheese.\n\
Summary: Being first is not always an advantage.\n\n\
Text: Never trust a computer you can't throw out a window.\n\
Summary: Machines deserve only as much trust as we can control.\n\n";
/// Few-shot examples for the topic.
const TOPIC_SHOTS: &str = "Text: A penny saved is a penny earned.\n\
Topic: money\n\n\
Text: Never trust a computer you can't throw out a window.\n\
Topic: technology\n\n\
Text: The early bird gets the worm, but the second mouse gets the cheese.\n\
Topic: animals\n\n";
/// Topics when the manifest gives none.
const DEFAULT_TOPICS: &str = "humor,love,life,work,money,politics,science,technology,religion,philosophy,art,literature,health,food,nature,animals,history,law,education,sports";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Request {
    #[serde(default)]
    id: Option<String>,
    text: String,
}

#[derive(Serialize)]
struct Response {
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    summary: String,
    tags: Vec<String>,
    model: &'static str,
}

struct Summarize;

impl Job for Summarize {
    fn run(input: Vec<u8>) -> Result<Vec<u8>, JobError> {
        let req: Request = io::from_json(&input)?;
        let text = req.text.trim();
        if text.is_empty() {
            return Err(JobError::invalid_input("the text is empty"));
        }
        if text.len() > MAX_TEXT_BYTES {
            return Err(JobError::invalid_input(format!(
                "the text is {} bytes; at most {MAX_TEXT_BYTES}",
                text.len()
            )));
        }
        let topics = topics();
        let llm = Llm::load(MODEL)?;
        let summary = llm.generate(
            &format!("{SUMMARY_SHOTS}Text: {}\nSummary:", one_line(text)),
            &Options::new(SUMMARY_TOKENS).with_stop("\n"),
        )?;
        let answer = llm.generate(
            &format!("{TOPIC_SHOTS}Text: {}\nTopic:", one_line(text)),
            &Options::new(TOPIC_TOKENS).with_stop("\n"),
        )?;
        io::to_json(&Response {
            id: req.id,
            summary: clean_summary(&summary.text),
            tags: pick_tags(&answer.text, &topics),
            model: MODEL,
        })
    }
}

/// The text on one line (the prompts are line-oriented).
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The topic list: the `topics` parameter, or the default.
fn topics() -> Vec<String> {
    let list = params()
        .into_iter()
        .find(|(k, _)| k == "topics")
        .map(|(_, v)| v)
        .unwrap_or_else(|| DEFAULT_TOPICS.to_owned());
    list.split(',')
        .map(|t| t.trim().to_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

/// Trim the model's sentence: whitespace, a leading label, markdown.
fn clean_summary(s: &str) -> String {
    let mut s = s.trim().trim_matches('*').trim();
    for label in [
        "Summary:",
        "summary:",
        "Sure, here's a summary:",
        "Here's a summary:",
    ] {
        if let Some(rest) = s.strip_prefix(label) {
            s = rest.trim();
        }
    }
    s.to_owned()
}

/// The listed topics the answer names, in the answer's order (at most
/// [`MAX_TAGS`]); `other` when it names none.
fn pick_tags(answer: &str, topics: &[String]) -> Vec<String> {
    let lower = answer.to_lowercase();
    let mut found: Vec<(usize, &String)> = topics
        .iter()
        .filter_map(|t| word_at(&lower, t).map(|i| (i, t)))
        .collect();
    found.sort();
    let mut tags: Vec<String> = found
        .into_iter()
        .map(|(_, t)| t.clone())
        .take(MAX_TAGS)
        .collect();
    if tags.is_empty() {
        tags.push("other".to_owned());
    }
    tags
}

/// Where `word` occurs in `hay` as a whole word.
fn word_at(hay: &str, word: &str) -> Option<usize> {
    let bytes = hay.as_bytes();
    let mut from = 0;
    while let Some(i) = hay[from..].find(word) {
        let at = from + i;
        let end = at + word.len();
        let before = at == 0 || !bytes[at - 1].is_ascii_alphanumeric();
        let after = end == bytes.len() || !bytes[end].is_ascii_alphanumeric();
        if before && after {
            return Some(at);
        }
        from = at + 1;
    }
    None
}

export_job!(Summarize);
