// Decoding GGUF blocks inside shaders: the raw bytes of a weight matrix sit in `W` (an array of u32 words, as the
// file stores them) and are decoded 32 values at a time, so dequantization fuses into whatever reads them.
// The CPU twin of every function here is crates/engine/src/quant/blocks.rs (`dequantize`), which the GPU tests
// compare against.
//
// The including kernel declares `W` and appends `fn decode_chunk(row: u32, c: u32) -> array<f32, 32>` forwarding
// to the decoder of its type (see gpu/kernels.rs). `row` is the byte offset of a row's first block; chunk `c`
// holds the row's values 32c .. 32c + 31. Every field of every block starts at an even byte offset.

fn byte_at(off: u32) -> u32 {
    return (W[off >> 2u] >> ((off & 3u) * 8u)) & 0xffu;
}

// The 4 bytes at an even offset, little-endian.
fn word_at(off: u32) -> u32 {
    let i = off >> 2u;
    if ((off & 2u) == 0u) {
        return W[i];
    }
    return (W[i] >> 16u) | (W[i + 1u] << 16u);
}

// The f16 at an even offset.
fn half_at(off: u32) -> f32 {
    return unpack2x16float((W[off >> 2u] >> ((off & 2u) * 8u)) & 0xffffu).x;
}

fn decode_f32(row: u32, c: u32) -> array<f32, 32> {
    var v: array<f32, 32>;
    let base = (row >> 2u) + 32u * c;
    for (var l = 0u; l < 32u; l++) {
        v[l] = bitcast<f32>(W[base + l]);
    }
    return v;
}

fn decode_f16(row: u32, c: u32) -> array<f32, 32> {
    var v: array<f32, 32>;
    let base = row + 64u * c;
    for (var l = 0u; l < 16u; l++) {
        let pair = unpack2x16float(word_at(base + 4u * l));
        v[2u * l] = pair.x;
        v[2u * l + 1u] = pair.y;
    }
    return v;
}

fn decode_bf16(row: u32, c: u32) -> array<f32, 32> {
    var v: array<f32, 32>;
    let base = row + 64u * c;
    for (var l = 0u; l < 16u; l++) {
        let w = word_at(base + 4u * l);
        v[2u * l] = bitcast<f32>(w << 16u);
        v[2u * l + 1u] = bitcast<f32>(w & 0xffff0000u);
    }
    return v;
}

// block_q4_0 (18 bytes, 32 values): d (f16), 16 bytes of nibbles; value j = (low nibble j - 8) d, value j + 16 =
// (high nibble j - 8) d.
fn decode_q4_0(row: u32, c: u32) -> array<f32, 32> {
    var v: array<f32, 32>;
    let b = row + 18u * c;
    let d = half_at(b);
    for (var w = 0u; w < 4u; w++) {
        let q = word_at(b + 2u + 4u * w);
        for (var k = 0u; k < 4u; k++) {
            let byte = (q >> (8u * k)) & 0xffu;
            v[4u * w + k] = (f32(byte & 0xfu) - 8.0) * d;
            v[4u * w + k + 16u] = (f32(byte >> 4u) - 8.0) * d;
        }
    }
    return v;
}

// block_q4_1 (20 bytes): d, m (f16), 16 bytes of nibbles; value = nibble d + m.
fn decode_q4_1(row: u32, c: u32) -> array<f32, 32> {
    var v: array<f32, 32>;
    let b = row + 20u * c;
    let d = half_at(b);
    let m = half_at(b + 2u);
    for (var w = 0u; w < 4u; w++) {
        let q = word_at(b + 4u + 4u * w);
        for (var k = 0u; k < 4u; k++) {
            let byte = (q >> (8u * k)) & 0xffu;
            v[4u * w + k] = f32(byte & 0xfu) * d + m;
            v[4u * w + k + 16u] = f32(byte >> 4u) * d + m;
        }
    }
    return v;
}

// block_q5_0 (22 bytes): d (f16), 32 high bits (u32), 16 bytes of low nibbles; value = (5-bit q - 16) d.
fn decode_q5_0(row: u32, c: u32) -> array<f32, 32> {
    var v: array<f32, 32>;
    let b = row + 22u * c;
    let d = half_at(b);
    let qh = word_at(b + 2u);
    for (var w = 0u; w < 4u; w++) {
        let q = word_at(b + 6u + 4u * w);
        for (var k = 0u; k < 4u; k++) {
            let j = 4u * w + k;
            let byte = (q >> (8u * k)) & 0xffu;
            let h0 = ((qh >> j) << 4u) & 0x10u;
            let h1 = (qh >> (j + 12u)) & 0x10u;
            v[j] = (f32((byte & 0xfu) | h0) - 16.0) * d;
            v[j + 16u] = (f32((byte >> 4u) | h1) - 16.0) * d;
        }
    }
    return v;
}

// block_q8_0 (34 bytes): d (f16), 32 signed bytes; value = q d.
fn decode_q8_0(row: u32, c: u32) -> array<f32, 32> {
    var v: array<f32, 32>;
    let b = row + 34u * c;
    let d = half_at(b);
    for (var w = 0u; w < 8u; w++) {
        let q = word_at(b + 2u + 4u * w);
        for (var k = 0u; k < 4u; k++) {
            v[4u * w + k] = f32(extractBits(bitcast<i32>(q), 8u * k, 8u)) * d;
        }
    }
    return v;
}

// Scale and minimum (6 bits each) of sub-block j of a Q4_K block whose 12 scale bytes start at `s`.
fn scale_min_k4(s: u32, j: u32) -> vec2<f32> {
    if (j < 4u) {
        return vec2<f32>(f32(byte_at(s + j) & 63u), f32(byte_at(s + j + 4u) & 63u));
    }
    let sc = (byte_at(s + j + 4u) & 0xfu) | ((byte_at(s + j - 4u) >> 6u) << 4u);
    let mn = (byte_at(s + j + 4u) >> 4u) | ((byte_at(s + j) >> 6u) << 4u);
    return vec2<f32>(f32(sc), f32(mn));
}

// block_q4_K (144 bytes, 256 values): d, dmin (f16), 12 bytes of 6-bit scales and minimums, 128 bytes of
// nibbles. Sub-block j (32 values) takes the low (j even) or high (j odd) nibbles of bytes 32 (j / 2) ...;
// value = d sc_j q - dmin m_j.
fn decode_q4_k(row: u32, c: u32) -> array<f32, 32> {
    var v: array<f32, 32>;
    let b = row + 144u * (c / 8u);
    let j = c % 8u;
    let d = half_at(b);
    let dmin = half_at(b + 2u);
    let sm = scale_min_k4(b + 4u, j);
    let scale = d * sm.x;
    let minimum = dmin * sm.y;
    let shift = 4u * (j % 2u);
    let qs = b + 16u + 32u * (j / 2u);
    for (var w = 0u; w < 8u; w++) {
        let q = word_at(qs + 4u * w);
        for (var k = 0u; k < 4u; k++) {
            let nibble = (q >> (8u * k + shift)) & 0xfu;
            v[4u * w + k] = scale * f32(nibble) - minimum;
        }
    }
    return v;
}

// block_q6_K (210 bytes, 256 values): 128 bytes of low nibbles, 64 bytes of 2-bit highs, 16 signed scales (one per
// 16 values), d (f16). In each half of 128 values, run k (values 32k .. 32k + 31) takes low bits from byte
// l + 32 (k % 2) of the half's 64 (nibble k / 2), high bits from byte l of its 32 (bits 2k); value = d s (q - 32).
fn decode_q6_k(row: u32, c: u32) -> array<f32, 32> {
    var v: array<f32, 32>;
    let b = row + 210u * (c / 8u);
    let h = (c % 8u) / 4u;
    let k = c % 4u;
    let d = half_at(b + 208u);
    let ql = b + 64u * h + 32u * (k % 2u);
    let qh = b + 128u + 32u * h;
    let sc = b + 192u + 8u * h + 2u * k;
    let s0 = d * f32(extractBits(bitcast<i32>(byte_at(sc)), 0u, 8u));
    let s1 = d * f32(extractBits(bitcast<i32>(byte_at(sc + 1u)), 0u, 8u));
    for (var w = 0u; w < 8u; w++) {
        let lo = word_at(ql + 4u * w);
        let hi = word_at(qh + 4u * w);
        for (var i = 0u; i < 4u; i++) {
            let l = 4u * w + i;
            let q = ((lo >> (8u * i + 4u * (k / 2u))) & 0xfu) | (((hi >> (8u * i + 2u * k)) & 3u) << 4u);
            let s = select(s1, s0, l < 16u);
            v[l] = s * (f32(q) - 32.0);
        }
    }
    return v;
}
