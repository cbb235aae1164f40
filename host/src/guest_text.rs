//! Text from a guest on its way to a log or a terminal: control characters
//! (newlines, carriage returns, terminal escape sequences) are escaped so a
//! guest cannot forge a node log line or move a terminal's cursor, and the
//! length is bounded.

/// `text` with every control character escaped (`\n`, `\u{1b}`, ...) and
/// cut to at most `max` bytes of the original (marked with `…`).
pub fn escape(text: &str, max: usize) -> String {
    let mut cut = text.len().min(max);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut out = String::with_capacity(cut + 8);
    for c in text[..cut].chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    if cut < text.len() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_length_bounded() {
        let forged = "done\n2026-11-30T00:00:00Z  INFO tidepool: node banned\r\u{1b}[2K";
        let e = escape(forged, 4096);
        assert!(
            !e.contains('\n') && !e.contains('\r') && !e.contains('\u{1b}'),
            "{e}"
        );
        assert!(
            e.starts_with("done\\n2026") && e.contains("\\u{1b}[2K"),
            "{e}"
        );
        assert_eq!(escape("plain text, é", 4096), "plain text, é");
        // Cut on a character boundary, marked.
        assert_eq!(escape("ééé", 3), "é…");
    }
}
