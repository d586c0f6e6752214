#![no_main]
//! See saif_app::untrusted::sae_shapes.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = saif_app::untrusted::sae_shapes(data);
});
