enable f16;

// The opt-in f16 KV cache (`LoadOptions::f16_cache`) on devices with `shader-f16`, prepended to attention.wgsl:
// each key and value is rounded to f16 once, on its way into the cache, and widened back to f32 where attention
// reads it. Same memory layout as kv_cache_f16_packed.wgsl, the form for devices without the feature, and the same
// values. CPU twin: model/kv_cache.rs's f16 rows (half's round-to-nearest-even).

@group(0) @binding(2) var<storage, read_write> KC: array<f16>;
@group(0) @binding(3) var<storage, read_write> VC: array<f16>;

fn as_cached(x: f32) -> f32 {
    return f32(f16(x));
}

fn cached_key(i: u32) -> f32 {
    return f32(KC[i]);
}

fn cached_value(i: u32) -> f32 {
    return f32(VC[i]);
}

fn store_key_pair(i: u32, x: f32, y: f32) {
    KC[i] = f16(x);
    KC[i + 1u] = f16(y);
}

fn store_value_pair(i: u32, x: f32, y: f32) {
    VC[i] = f16(x);
    VC[i + 1u] = f16(y);
}
