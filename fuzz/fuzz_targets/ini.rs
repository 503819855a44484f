//! Fuzzes the configuration parser: any text an admin (or a broken editor,
//! or a truncated copy) may leave in pbxmail.ini. Nothing may panic
//! (arithmetic overflow included: cargo-fuzz builds with debug assertions),
//! and every error must point at a line of the input, where check-config
//! sends the admin.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;

// The parser's own files, as the daemon compiles them: the main crate is a
// binary only, so there is no library to depend on. `crate::base` and
// `crate::accounts` are the only things the config module reaches outside
// itself, and they import nothing above them.
#[path = "../../src/config/mod.rs"]
#[allow(dead_code, unused_imports)]
mod config;

// A path on an inline module names the directory its modules are read from.
#[path = "../../src/base"]
#[allow(dead_code)]
mod base {
    pub mod fs;
    pub mod names;
    pub mod relay;
    pub mod secret;
}

#[path = "../../src/accounts.rs"]
#[allow(dead_code)]
mod accounts;

fuzz_target!(|data: &[u8]| {
    // config::load reads the file with read_to_string: only UTF-8 reaches parse.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // A value naming a file makes the parser read it: keep the fuzzer off
    // devices and FIFOs that never end (a parser bug of its own, not this one).
    if text.contains("/dev") || text.contains("/proc") || text.contains("/sys") {
        return;
    }
    let lines = text.split('\n').count();
    if let Err(e) = config::parse(Path::new("fuzz.ini"), text) {
        assert!(!e.problems.is_empty());
        for problem in &e.problems {
            assert!(
                problem.line.is_some_and(|l| (1..=lines).contains(&l)),
                "{problem} is not on one of the {lines} lines"
            );
        }
    }
});
