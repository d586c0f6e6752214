#![no_main]
//! See saif_app::untrusted::gguf.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = saif_app::untrusted::gguf(data);
});
