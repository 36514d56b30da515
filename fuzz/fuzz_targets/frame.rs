//! Binary COPY framing must never panic, and must not depend on how the stream is chunked.
//! Run: `cargo fuzz run frame` (needs cargo-fuzz and a nightly or RUSTC_BOOTSTRAP=1 toolchain).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| pgdelta::fuzzing::frame(data));
