//! The bottom floor: shared types and primitives that every module above may import and that import nothing above them.

pub mod stream;
