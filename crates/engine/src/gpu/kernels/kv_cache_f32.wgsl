// The KV cache in f32 (the default), prepended to attention.wgsl. Each form of the cache gives attention the same
// four functions over value indices of KC and VC ([position][kv_heads * head_dim]); kv_cache_f16.wgsl and
// kv_cache_f16_packed.wgsl hold the f16 forms. CPU twin: model/kv_cache.rs's f32 rows.

@group(0) @binding(2) var<storage, read_write> KC: array<f32>;
@group(0) @binding(3) var<storage, read_write> VC: array<f32>;

// `x` as the cache keeps it.
fn as_cached(x: f32) -> f32 {
    return x;
}

fn cached_key(i: u32) -> f32 {
    return KC[i];
}

fn cached_value(i: u32) -> f32 {
    return VC[i];
}

// Stores values i and i + 1 (i even) together: the f16 forms write them as one word.
fn store_key_pair(i: u32, x: f32, y: f32) {
    KC[i] = x;
    KC[i + 1u] = y;
}

fn store_value_pair(i: u32, x: f32, y: f32) {
    VC[i] = x;
    VC[i + 1u] = y;
}
