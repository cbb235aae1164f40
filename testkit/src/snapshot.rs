//! Snapshot tests: every `DIR/NAME.EXT` is rendered (`ok` or an error's
//! text) and compared with `DIR/NAME.expected`. Case names say what to
//! expect: `ok-*` must render `ok`, every other case must be refused.
//! `TIDEPOOL_BLESS=1` writes the expected files instead (check the new texts
//! by eye first).

use std::path::Path;

/// Run every case in `dir` with extension `ext` through `render` (given the
/// case's name and text, it returns `Ok(())` or the error), and panic with
/// every difference from the `.expected` files. At least `min_cases` cases
/// must be there (so a moved folder cannot pass by being empty).
pub fn check_dir<E: std::fmt::Display>(
    dir: &Path,
    ext: &str,
    min_cases: usize,
    render: impl Fn(&str, &str) -> Result<(), E>,
) {
    let bless = std::env::var_os("TIDEPOOL_BLESS").is_some();
    let mut cases: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    cases.sort();
    assert!(
        cases.len() >= min_cases,
        "fixtures missing from {}",
        dir.display()
    );
    let mut failures = Vec::new();
    for case in &cases {
        let text = std::fs::read_to_string(case).expect("read case");
        let name = case
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("case name");
        let got = match render(name, &text) {
            Ok(()) => "ok\n".to_owned(),
            Err(e) => format!("{e}\n"),
        };
        assert_eq!(name.starts_with("ok-"), got == "ok\n", "{name}: {got}");
        let expected_path = case.with_extension("expected");
        if bless {
            std::fs::write(&expected_path, &got).expect("bless");
            continue;
        }
        let expected = std::fs::read_to_string(&expected_path).unwrap_or_else(|_| {
            panic!(
                "{} missing; run with TIDEPOOL_BLESS=1",
                expected_path.display()
            )
        });
        if expected != got {
            failures.push(format!("{name}:\n--- expected\n{expected}--- got\n{got}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
