//! One section's keys, checked against the known names, and the problems
//! found so far: typos get a suggestion, a pasted password is never echoed.

use std::collections::HashMap;
use std::path::PathBuf;

use super::ini::{RawEntry, RawSection};
use super::Problem;

pub(super) struct Problems {
    pub(super) file: PathBuf,
    pub(super) errors: Vec<Problem>,
    pub(super) warnings: Vec<Problem>,
}

impl Problems {
    pub(super) fn error(&mut self, line: Option<usize>, message: String) {
        self.errors.push(Problem {
            file: self.file.clone(),
            line,
            message,
        });
    }

    pub(super) fn warning(&mut self, line: Option<usize>, message: String) {
        self.warnings.push(Problem {
            file: self.file.clone(),
            line,
            message,
        });
    }
}

/// One section's keys after checking names; values are read by key name.
pub(super) struct Section<'a> {
    /// `[daemon]` or `[tenant:acme]`, the prefix of every message.
    pub(super) label: String,
    pub(super) line: Option<usize>,
    pub(super) values: HashMap<&'static str, &'a RawEntry>,
}

impl<'a> Section<'a> {
    pub(super) fn new(
        raw: &'a RawSection,
        label: String,
        known: &'static [&'static str],
        elsewhere: (&str, &[&str]),
        out: &mut Problems,
    ) -> Self {
        let mut values: HashMap<&'static str, &'a RawEntry> = HashMap::new();
        for entry in &raw.entries {
            let Some(key) = known.iter().copied().find(|k| *k == entry.key) else {
                let hint = if elsewhere.1.contains(&entry.key.as_str()) {
                    format!("; it belongs in {}", elsewhere.0)
                } else {
                    closest(&entry.key, known)
                        .map(|k| format!("; did you mean {k}?"))
                        .unwrap_or_default()
                };
                // Only a word that looks like a key is quoted back: a line such
                // as "S3cret:pw" is a password pasted without its key.
                let looks_like_key = !entry.key.is_empty()
                    && entry.key.len() <= 40
                    && entry
                        .key
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
                let message = if looks_like_key {
                    format!("{label} unknown key {:?}{hint}", entry.key)
                } else {
                    format!(
                        "{label} this line is not a known key (not shown: it may be a password \
                         pasted without \"password =\"); write key = value"
                    )
                };
                out.error(entry.line, message);
                continue;
            };
            if let Some(first) = values.get(key) {
                let at = first_at(first.line);
                out.error(
                    entry.line,
                    format!("{label} {key}: given twice{at}; keep one"),
                );
                continue;
            }
            values.insert(key, entry);
        }
        Section {
            label,
            line: raw.line,
            values,
        }
    }

    /// An absent section: every key takes its default.
    pub(super) fn empty(label: &str) -> Self {
        Section {
            label: label.to_owned(),
            line: None,
            values: HashMap::new(),
        }
    }

    /// The non-empty value of `key`; an empty value means "default".
    pub(super) fn get(&self, key: &str) -> Option<&'a str> {
        self.values
            .get(key)
            .map(|e| e.value.as_str())
            .filter(|v| !v.is_empty())
    }

    pub(super) fn is_set(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// The key's line, else the section header's (where a missing key belongs).
    pub(super) fn line(&self, key: &str) -> Option<usize> {
        self.values.get(key).and_then(|e| e.line).or(self.line)
    }

    /// Parses `key` if set; a bad value becomes an error at its line and `None`.
    pub(super) fn value<T>(
        &self,
        out: &mut Problems,
        key: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        let raw = self.get(key)?;
        match parse(raw) {
            Ok(v) => Some(v),
            Err(e) => {
                self.error(out, key, &e);
                None
            }
        }
    }

    /// Parses `key` if set, else (or when its value is bad) gives `default`.
    pub(super) fn value_or<T>(
        &self,
        out: &mut Problems,
        key: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
        default: T,
    ) -> T {
        self.value(out, key, parse).unwrap_or(default)
    }

    pub(super) fn error(&self, out: &mut Problems, key: &str, message: &str) {
        out.error(self.line(key), format!("{} {key}: {message}", self.label));
    }

    pub(super) fn warning(&self, out: &mut Problems, key: &str, message: &str) {
        out.warning(self.line(key), format!("{} {key}: {message}", self.label));
    }
}

/// ` (first at line N)`, for a key or section given twice; empty when the
/// first one's line is unknown.
pub(super) fn first_at(line: Option<usize>) -> String {
    line.map(|l| format!(" (first at line {l})"))
        .unwrap_or_default()
}

/// The known key nearest to a misspelt one, if it is close enough to be a typo.
pub(super) fn closest<'k>(key: &str, known: &[&'k str]) -> Option<&'k str> {
    known
        .iter()
        .map(|k| (edit_distance(key, k), *k))
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

pub(super) fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = Vec::with_capacity(b.len() + 1);
        cur.push(i + 1);
        // Walks the previous row as (diagonal, above) pairs; the left cell is cur's last.
        for (cb, (&diagonal, &above)) in b.iter().zip(prev.iter().zip(prev.iter().skip(1))) {
            let left = cur.last().copied().unwrap_or_default();
            let substitute = diagonal + usize::from(ca != *cb);
            cur.push(substitute.min(above + 1).min(left + 1));
        }
        prev = cur;
    }
    prev.last().copied().unwrap_or_default()
}
