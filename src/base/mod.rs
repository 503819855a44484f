//! The bottom floor: shared types and primitives (names, addresses, secrets,
//! the clock and time formats,
//! record framing, fs helpers, the stream type) that every module above may
//! import and that import nothing above them.

pub mod address;
pub mod clock;
pub mod framing;
pub mod fs;
pub mod hex;
#[cfg(test)]
pub mod mutate;
pub mod names;
pub mod relay;
pub mod secret;
pub mod stream;
pub mod text;
pub mod time;
