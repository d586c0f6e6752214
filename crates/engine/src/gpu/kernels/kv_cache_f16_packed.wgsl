// The opt-in f16 KV cache on devices without `shader-f16` (SwiftShader, Linux Chrome with NVIDIA), prepended to
// attention.wgsl: two f16 values to a u32 word, value i in the low half of word i / 2 (the byte layout of an
// array<f16>, kv_cache_f16.wgsl's form). Core WGSL's pack2x16float and unpack2x16float convert them. A word is
// written whole, so the values of one word are stored together (store_*_pair). CPU twin: model/kv_cache.rs's f16
// rows.

@group(0) @binding(2) var<storage, read_write> KC: array<u32>;
@group(0) @binding(3) var<storage, read_write> VC: array<u32>;

fn as_cached(x: f32) -> f32 {
    return unpack2x16float(pack2x16float(vec2<f32>(x, 0.0))).x;
}

fn cached_key(i: u32) -> f32 {
    return unpack2x16float(KC[i >> 1u])[i & 1u];
}

fn cached_value(i: u32) -> f32 {
    return unpack2x16float(VC[i >> 1u])[i & 1u];
}

fn store_key_pair(i: u32, x: f32, y: f32) {
    KC[i >> 1u] = pack2x16float(vec2<f32>(x, y));
}

fn store_value_pair(i: u32, x: f32, y: f32) {
    VC[i >> 1u] = pack2x16float(vec2<f32>(x, y));
}
