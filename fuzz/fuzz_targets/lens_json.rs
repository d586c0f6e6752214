#![no_main]
//! See saif_app::untrusted::lens_json.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = saif_app::untrusted::lens_json(data);
});
