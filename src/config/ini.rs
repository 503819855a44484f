//! Stage 1: INI text → raw sections with line numbers. rust-ini parses; a line
//! scan of our own finds where each section and key is, which rust-ini does not report.

use std::collections::HashMap;

use super::section::Problems;

pub(super) struct RawEntry {
    pub(super) key: String,
    pub(super) value: String,
    pub(super) line: Option<usize>,
}

pub(super) struct RawSection {
    /// `None` for keys before the first header (rust-ini's general section).
    pub(super) name: Option<String>,
    pub(super) line: Option<usize>,
    pub(super) entries: Vec<RawEntry>,
}

/// Where things are, from a line scan; rust-ini reports no positions for keys.
pub(super) struct ScannedSection {
    pub(super) name: Option<String>,
    pub(super) line: Option<usize>,
    pub(super) keys: Vec<ScannedKey>,
}

pub(super) struct ScannedKey {
    pub(super) key: String,
    pub(super) line: usize,
    /// `key =   ; comment`: rust-ini would return "; comment" as the value.
    pub(super) comment_only: bool,
}

pub(super) fn read_raw(text: &str, out: &mut Problems) -> Option<Vec<RawSection>> {
    let (normalized, layout) = scan(text, out)?;
    let options = ini::ParseOption {
        enabled_quote: false,
        enabled_escape: false,
        ..Default::default()
    };
    let parsed = match ini::Ini::load_from_str_opt(&normalized, options) {
        Ok(parsed) => parsed,
        Err(e) => {
            out.error(Some(e.line), format!("syntax error: {}", e.msg));
            return None;
        }
    };

    // Pair rust-ini's sections and keys with the scan by occurrence: the n-th
    // `[x]` is the n-th scanned `[x]`, the n-th `k` in it the n-th scanned `k`.
    // Each name's occurrences are queued once, so a file of many sections or
    // keys (duplicates included) is paired in linear time, not quadratic.
    let mut scanned_sections = occurrences(layout.iter().map(|s| (s.name.as_deref(), s)));
    let mut sections = Vec::new();
    for (name, props) in parsed.iter() {
        let scanned = scanned_sections.get_mut(&name).and_then(Iterator::next);
        let mut scanned_keys = occurrences(
            scanned
                .iter()
                .flat_map(|s| s.keys.iter().map(|k| (k.key.as_str(), k))),
        );
        let entries: Vec<RawEntry> = props
            .iter()
            .map(|(key, value)| {
                let at = scanned_keys.get_mut(key).and_then(Iterator::next);
                let comment_only = at.is_some_and(|k| k.comment_only);
                RawEntry {
                    key: key.to_owned(),
                    value: if comment_only {
                        String::new()
                    } else {
                        value.trim().to_owned()
                    },
                    line: at.map(|k| k.line),
                }
            })
            .collect();
        if name.is_none() && entries.is_empty() {
            continue;
        }
        sections.push(RawSection {
            name: name.map(str::to_owned),
            line: scanned.and_then(|s| s.line),
            entries,
        });
    }
    Some(sections)
}

/// Each name's items in order of appearance, to be taken one by one.
fn occurrences<'a, K: Eq + std::hash::Hash, T>(
    items: impl Iterator<Item = (K, &'a T)>,
) -> HashMap<K, std::vec::IntoIter<&'a T>> {
    let mut by_name: HashMap<K, Vec<&'a T>> = HashMap::new();
    for (name, item) in items {
        by_name.entry(name).or_default().push(item);
    }
    by_name
        .into_iter()
        .map(|(k, v)| (k, v.into_iter()))
        .collect()
}

/// Checks the line structure and returns the text rust-ini should parse: comment
/// lines blanked and lines trimmed (rust-ini reads an indented `; comment` as part
/// of the next key), same line count, so its error lines stay right.
pub(super) fn scan(text: &str, out: &mut Problems) -> Option<(String, Vec<ScannedSection>)> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut normalized = String::with_capacity(text.len());
    let mut layout = vec![ScannedSection {
        name: None,
        line: None,
        keys: Vec::new(),
    }];
    let mut ok = true;
    for (index, raw) in text.split('\n').enumerate() {
        let n = index + 1;
        let line = raw.trim();
        if index > 0 {
            normalized.push('\n');
        }
        if line.is_empty() || line.starts_with([';', '#']) {
            continue;
        }
        if line.contains('\r') {
            // rust-ini ends a line at a bare CR without counting it, so the
            // text after it would become a key of its own, on no line the
            // admin can find. CRLF line ends are fine: trim took that CR.
            out.error(
                Some(n),
                "a carriage return (CR) inside the line; save the file with LF or CRLF line ends"
                    .to_owned(),
            );
            ok = false;
            continue;
        }
        if let Some(rest) = line.strip_prefix('[') {
            match rest.split_once(']') {
                None => {
                    out.error(Some(n), "section header has no closing ]".to_owned());
                    ok = false;
                }
                Some((_, after))
                    if !(after.trim().is_empty() || after.trim_start().starts_with([';', '#'])) =>
                {
                    out.error(
                        Some(n),
                        "unexpected text after the section header's ]".to_owned(),
                    );
                    ok = false;
                }
                // rust-ini reads `\]` as part of the name and goes on to the
                // next `]`, lines later if need be: the sections would part ways.
                Some((name, _)) if name.contains('\\') => {
                    out.error(
                        Some(n),
                        "a section name may not contain \\; the sections are [daemon] and [tenant:NAME]"
                            .to_owned(),
                    );
                    ok = false;
                }
                Some((name, _)) => layout.push(ScannedSection {
                    name: Some(name.trim().to_owned()),
                    line: Some(n),
                    keys: Vec::new(),
                }),
            }
        } else if let Some((key, value)) = line.split_once(['=', ':']) {
            if key.trim().is_empty() {
                out.error(
                    Some(n),
                    "a line starts with = but has no key before it".to_owned(),
                );
                ok = false;
            } else if key.contains('\\') {
                // rust-ini reads `\=` as part of the key and ends it at a later
                // `=` or `:`, so its keys and this scan's would part ways. The
                // key is not echoed: it may be a password written without one.
                out.error(
                    Some(n),
                    "a key may not contain \\; keys are names such as relay or password_file"
                        .to_owned(),
                );
                ok = false;
            } else if line.ends_with('\\') {
                // rust-ini would join the next line to this one; nobody expects that here.
                out.error(
                    Some(n),
                    format!(
                        "{}: a value may not end with \\ (it would continue on the next line); \
                         put such a password in password_file",
                        key.trim()
                    ),
                );
                ok = false;
            } else if let Some(current) = layout.last_mut() {
                current.keys.push(ScannedKey {
                    key: key.trim().to_owned(),
                    line: n,
                    comment_only: value.starts_with([' ', '\t'])
                        && value.trim_start().starts_with([';', '#']),
                });
            }
        } else {
            // The line's text is not echoed: it may be a password written without a key.
            out.error(
                Some(n),
                "expected key = value, a [section] header or a ; comment".to_owned(),
            );
            ok = false;
        }
        normalized.push_str(line);
    }
    ok.then_some((normalized, layout))
}
