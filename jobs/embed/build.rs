//! Turn the tokenizer's `vocab.txt` into a static table sorted by token, so
//! the job starts with no parsing (every task is a fresh instance).
//!
//! `cargo xtask build-jobs` sets `TIDEPOOL_VOCAB` to the verified file it
//! fetched; building without it is an error that says what to run.

use std::{env, fs, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=TIDEPOOL_VOCAB");
    let Some(path) = env::var_os("TIDEPOOL_VOCAB") else {
        panic!("TIDEPOOL_VOCAB is not set: build jobs with `cargo xtask build-jobs`, which fetches and verifies the tokenizer vocabulary");
    };
    let path = PathBuf::from(path);
    println!("cargo:rerun-if-changed={}", path.display());
    let text = fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read vocabulary {}: {e}", path.display()));
    let mut table: Vec<(&str, usize)> = text.lines().enumerate().map(|(i, t)| (t, i)).collect();
    table.sort_unstable();
    table.dedup_by(|a, b| a.0 == b.0);
    // The job skips this check at run time (`WordPiece::from_presorted`);
    // binary search needs strictly increasing tokens, byte-wise as `str`
    // compares.
    assert!(
        table.windows(2).all(|w| w[0].0 < w[1].0),
        "vocabulary table is not strictly sorted"
    );
    let mut out = String::from("/// (token, id) sorted by token; generated from vocab.txt.\npub static VOCAB: &[(&str, u32)] = &[\n");
    for (tok, id) in table {
        out.push_str(&format!("({tok:?}, {id}),\n"));
    }
    out.push_str("];\n");
    let dest = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("vocab.rs");
    fs::write(&dest, out).unwrap_or_else(|e| panic!("cannot write {}: {e}", dest.display()));
}
