//! Lone UTF-16 surrogates in JSON text, made parseable.
//!
//! A JavaScript string may hold half of a surrogate pair (a name cut in
//! the middle of an emoji: `"hi😀".slice(0, 3)`), and `JSON.stringify`
//! writes it as an escape, `"hi\ud83d"` — valid JSON that `JSON.parse`
//! (and so the Node gateway) accepts. A Rust `String` cannot hold it, so
//! `serde_json` refuses the whole packet, which would close the client's
//! connection over one character. Before parsing, each lone surrogate
//! escape becomes `\ufffd` (the replacement character a browser shows for
//! it anyway); a well-formed pair is kept.
//!
//! Written by hand: `serde_json` has no lossy mode for this, and the
//! rewrite must know JSON's escapes (`\\ud83d` is a backslash, then text).

use std::borrow::Cow;

/// `text` with every lone surrogate escape replaced by `\ufffd`; borrowed
/// (no copy) when it has none, which is every packet without `\u`.
pub(crate) fn replace_lone_surrogates(text: &str) -> Cow<'_, str> {
    // Fast path: no `\u` escape at all (JSON.stringify escapes only control
    // characters and lone surrogates).
    if !text.contains("\\u") {
        return Cow::Borrowed(text);
    }
    let b = text.as_bytes();
    let mut out: Option<String> = None;
    let mut copied = 0;
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'\\' {
            i += 1;
            continue;
        }
        // An escape: `\` and one character, or `\uXXXX`.
        let Some(unit) = escape_unit(b, i) else {
            i += 2;
            continue;
        };
        match unit {
            0xD800..=0xDBFF => {
                if escape_unit(b, i + 6).is_some_and(|n| (0xDC00..=0xDFFF).contains(&n)) {
                    i += 12; // a pair: kept
                    continue;
                }
            }
            0xDC00..=0xDFFF => {}
            _ => {
                i += 6;
                continue;
            }
        }
        let o = out.get_or_insert_with(|| String::with_capacity(text.len()));
        o.push_str(&text[copied..i]);
        o.push_str("\\ufffd");
        i += 6;
        copied = i;
    }
    match out {
        None => Cow::Borrowed(text),
        Some(mut o) => {
            o.push_str(&text[copied..]);
            Cow::Owned(o)
        }
    }
}

/// The code unit of a `\uXXXX` escape starting at `i`, if there is one.
fn escape_unit(b: &[u8], i: usize) -> Option<u16> {
    let e = b.get(i..i + 6)?;
    if e[0] != b'\\' || e[1] != b'u' {
        return None;
    }
    let hex = std::str::from_utf8(&e[2..]).ok()?;
    u16::from_str_radix(hex, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixed(s: &str) -> String {
        replace_lone_surrogates(s).into_owned()
    }

    #[test]
    fn a_lone_half_becomes_the_replacement_character() {
        assert_eq!(
            fixed(r#"["e",{"n":"hi\ud83d"}]"#),
            r#"["e",{"n":"hi\ufffd"}]"#
        );
        assert_eq!(
            fixed(r#""\uDC00x""#),
            r#""\ufffdx""#,
            "a lone trailing half"
        );
        assert_eq!(
            fixed(r#""\ud83d\u0041""#),
            r#""\ufffd\u0041""#,
            "a leading half followed by another escape"
        );
        assert_eq!(fixed(r#""\ud83d\ud83d\ude00""#), r#""\ufffd\ud83d\ude00""#);
        let v: serde_json::Value = serde_json::from_str(&fixed(r#"{"n":"hi\ud83d"}"#)).unwrap();
        assert_eq!(v["n"], "hi\u{fffd}");
    }

    #[test]
    fn pairs_other_escapes_and_escaped_backslashes_are_left_alone() {
        for s in [
            r#"["e",{"n":"\ud83d\ude00"}]"#,
            r#""\\ud83d""#,
            r#""\\\\ud83d""#,
            r#""\u00e9\n\"""#,
            r#""plain text, no escape""#,
            r#""\u12""#, // malformed: serde_json's to refuse
        ] {
            assert!(
                matches!(replace_lone_surrogates(s), Cow::Borrowed(_)),
                "{s} was rewritten"
            );
        }
        let v: serde_json::Value = serde_json::from_str(r#""\\ud83d""#).unwrap();
        assert_eq!(v, "\\ud83d", "a backslash, then text");
    }

    #[test]
    fn an_escaped_backslash_before_a_lone_half_is_not_an_escape_of_it() {
        assert_eq!(fixed(r#""\\\ud83d""#), r#""\\\ufffd""#);
    }
}
