// GGUF blocks read inside shaders: the raw bytes of a weight matrix sit in `W` (u32 words, as the file stores them).
// Three functions per type, the twins of crates/engine/src/quant/blocks.rs:
//   decode_<type>(row, c)       the row's values 32c .. 32c + 31 as the dot product takes them (a `Chunk`);
//   dot_decoded_<type>(w, x)    the dot product of a decoded chunk with X4[x .. x + 8] (8 vec4s of activations),
//                               in the order blocks::dot_row sums; a product of several tokens decodes a chunk once
//                               and takes it to each token, with the same numbers as one token's product;
//   value_<type>(row, i)        the row's value i alone (blocks::dequantize), for the embedding lookup.
// `row` is the byte offset of a row's first block. Every field of every block starts at an even byte offset.
// The including kernel declares `W` and, for the dot products, `X4: array<vec4<f32>>`; gpu/kernels.rs appends
// `decode_chunk`, `dot_decoded` and `value_at`, bound to the matrix's type.

// 32 values as a type's dot product takes them (before its scales), and up to three scales.
struct Chunk {
    q: array<vec4<f32>, 8>,
    a: f32,
    b: f32,
    c: f32,
}

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

fn nibbles_lo(q: u32) -> vec4<f32> {
    return vec4<f32>(unpack4xU8(q & 0x0f0f0f0fu));
}

fn nibbles_hi(q: u32) -> vec4<f32> {
    return vec4<f32>(unpack4xU8((q >> 4u) & 0x0f0f0f0fu));
}

// Four bits b .. b + 3 of `bits` as 0 or 1 each.
fn bits4(bits: u32, b: u32) -> vec4<f32> {
    let v = bits >> b;
    return vec4<f32>(f32(v & 1u), f32((v >> 1u) & 1u), f32((v >> 2u) & 1u), f32((v >> 3u) & 1u));
}

fn sum4(v: vec4<f32>) -> f32 {
    return v.x + v.y + v.z + v.w;
}

// --- F32, F16, BF16: plain numbers -------------------------------------------------------------------------

// F32, F16 and BF16 chunks hold their values; their dot product is a plain sum.
fn dot_plain(w: Chunk, x: u32) -> f32 {
    var s = 0.0;
    for (var i = 0u; i < 8u; i++) {
        s += dot(w.q[i], X4[x + i]);
    }
    return s;
}

fn decode_f32(row: u32, c: u32) -> Chunk {
    let base = (row >> 2u) + 32u * c;
    var w: Chunk;
    for (var i = 0u; i < 8u; i++) {
        w.q[i] = vec4<f32>(bitcast<f32>(W[base + 4u * i]), bitcast<f32>(W[base + 4u * i + 1u]),
                           bitcast<f32>(W[base + 4u * i + 2u]), bitcast<f32>(W[base + 4u * i + 3u]));
    }
    return w;
}

fn dot_decoded_f32(w: Chunk, x: u32) -> f32 {
    return dot_plain(w, x);
}

fn value_f32(row: u32, i: u32) -> f32 {
    return bitcast<f32>(W[(row >> 2u) + i]);
}

// Chunk c of a row of 16-bit values, two to a word: f16, or bf16 where `bf16` (a constant at every call, so the
// branch folds away).
fn decode_halves(row: u32, c: u32, bf16: bool) -> Chunk {
    let base = row + 64u * c;
    var w: Chunk;
    for (var i = 0u; i < 8u; i++) {
        let words = vec2<u32>(word_at(base + 8u * i), word_at(base + 8u * i + 4u));
        if bf16 {
            w.q[i] = vec4<f32>(bf16_pair(words.x), bf16_pair(words.y));
        } else {
            w.q[i] = vec4<f32>(unpack2x16float(words.x), unpack2x16float(words.y));
        }
    }
    return w;
}

fn decode_f16(row: u32, c: u32) -> Chunk {
    return decode_halves(row, c, false);
}

fn dot_decoded_f16(w: Chunk, x: u32) -> f32 {
    return dot_plain(w, x);
}

fn value_f16(row: u32, i: u32) -> f32 {
    return half_at(row + 2u * i);
}

fn bf16_pair(w: u32) -> vec2<f32> {
    return vec2<f32>(bitcast<f32>(w << 16u), bitcast<f32>(w & 0xffff0000u));
}

fn decode_bf16(row: u32, c: u32) -> Chunk {
    return decode_halves(row, c, true);
}

fn dot_decoded_bf16(w: Chunk, x: u32) -> f32 {
    return dot_plain(w, x);
}

fn value_bf16(row: u32, i: u32) -> f32 {
    let off = row + 2u * i;
    return bitcast<f32>(((W[off >> 2u] >> ((off & 2u) * 8u)) & 0xffffu) << 16u);
}

// --- block_q4_0 (18 bytes, 32 values): d (f16), 16 bytes of nibbles -------------------------------------------
// Value j = (low nibble of byte j - 8) d; value j + 16 = (high nibble of byte j - 8) d.

fn decode_q4_0(row: u32, c: u32) -> Chunk {
    let b = row + 18u * c;
    var w: Chunk;
    for (var i = 0u; i < 4u; i++) {
        let q = word_at(b + 2u + 4u * i);
        w.q[i] = nibbles_lo(q) - 8.0;
        w.q[4u + i] = nibbles_hi(q) - 8.0;
    }
    w.a = half_at(b);
    return w;
}

// Q4_0 and Q5_0: values j and j + 16 summed in pairs, then scaled.
fn dot_halves_scaled(w: Chunk, x: u32) -> f32 {
    var s = 0.0;
    for (var i = 0u; i < 4u; i++) {
        s += dot(w.q[i], X4[x + i]) + dot(w.q[4u + i], X4[x + 4u + i]);
    }
    return s * w.a;
}

fn dot_decoded_q4_0(w: Chunk, x: u32) -> f32 {
    return dot_halves_scaled(w, x);
}

fn value_q4_0(row: u32, i: u32) -> f32 {
    let b = row + 18u * (i / 32u);
    let j = i % 32u;
    let q = (byte_at(b + 2u + j % 16u) >> (4u * (j / 16u))) & 0xfu;
    return (f32(q) - 8.0) * half_at(b);
}

// --- block_q4_1 (20 bytes): d, m (f16), 16 bytes of nibbles; value = nibble d + m ------------------------------

fn decode_q4_1(row: u32, c: u32) -> Chunk {
    let b = row + 20u * c;
    var w: Chunk;
    for (var i = 0u; i < 4u; i++) {
        let q = word_at(b + 4u + 4u * i);
        w.q[i] = nibbles_lo(q);
        w.q[4u + i] = nibbles_hi(q);
    }
    w.a = half_at(b);
    w.b = half_at(b + 2u);
    return w;
}

fn dot_decoded_q4_1(w: Chunk, x: u32) -> f32 {
    var s = 0.0;
    var sx = 0.0;
    for (var i = 0u; i < 4u; i++) {
        let x0 = X4[x + i];
        let x1 = X4[x + 4u + i];
        s += dot(w.q[i], x0) + dot(w.q[4u + i], x1);
        sx += sum4(x0 + x1);
    }
    return s * w.a + sx * w.b;
}

fn value_q4_1(row: u32, i: u32) -> f32 {
    let b = row + 20u * (i / 32u);
    let j = i % 32u;
    let q = (byte_at(b + 4u + j % 16u) >> (4u * (j / 16u))) & 0xfu;
    return f32(q) * half_at(b) + half_at(b + 2u);
}

// --- block_q5_0 (22 bytes): d (f16), 32 fifth bits (u32), 16 bytes of low nibbles; value = (q - 16) d ----------
// Value j takes bit j of the fifth bits, value j + 16 bit j + 16.

fn decode_q5_0(row: u32, c: u32) -> Chunk {
    let b = row + 22u * c;
    let qh = word_at(b + 2u);
    var w: Chunk;
    for (var i = 0u; i < 4u; i++) {
        let q = word_at(b + 6u + 4u * i);
        w.q[i] = nibbles_lo(q) + 16.0 * bits4(qh, 4u * i) - 16.0;
        w.q[4u + i] = nibbles_hi(q) + 16.0 * bits4(qh, 16u + 4u * i) - 16.0;
    }
    w.a = half_at(b);
    return w;
}

fn dot_decoded_q5_0(w: Chunk, x: u32) -> f32 {
    return dot_halves_scaled(w, x);
}

fn value_q5_0(row: u32, i: u32) -> f32 {
    let b = row + 22u * (i / 32u);
    let j = i % 32u;
    let low = (byte_at(b + 6u + j % 16u) >> (4u * (j / 16u))) & 0xfu;
    let high = ((word_at(b + 2u) >> j) & 1u) << 4u;
    return (f32(low | high) - 16.0) * half_at(b);
}

// --- block_q8_0 (34 bytes): d (f16), 32 signed bytes; value = q d ---------------------------------------------

fn decode_q8_0(row: u32, c: u32) -> Chunk {
    let b = row + 34u * c;
    var w: Chunk;
    for (var i = 0u; i < 8u; i++) {
        w.q[i] = vec4<f32>(unpack4xI8(word_at(b + 2u + 4u * i)));
    }
    w.a = half_at(b);
    return w;
}

fn dot_decoded_q8_0(w: Chunk, x: u32) -> f32 {
    return dot_plain(w, x) * w.a;
}

fn value_q8_0(row: u32, i: u32) -> f32 {
    let b = row + 34u * (i / 32u);
    let q = byte_at(b + 2u + i % 32u);
    return f32(extractBits(bitcast<i32>(q), 0u, 8u)) * half_at(b);
}

// --- block_q4_K (144 bytes, 256 values) -----------------------------------------------------------------------
// d, dmin (f16), 12 bytes of 6-bit scales and minimums, 128 bytes of nibbles. Sub-block j (32 values) takes the
// low (j even) or high (j odd) nibbles of bytes 32 (j / 2) ..; value = d sc_j q - dmin m_j.

// Scale and minimum (6 bits each) of sub-block j of a Q4_K block whose 12 scale bytes start at `s`.
fn scale_min_k4(s: u32, j: u32) -> vec2<f32> {
    if (j < 4u) {
        return vec2<f32>(f32(byte_at(s + j) & 63u), f32(byte_at(s + j + 4u) & 63u));
    }
    let sc = (byte_at(s + j + 4u) & 0xfu) | ((byte_at(s + j - 4u) >> 6u) << 4u);
    let mn = (byte_at(s + j + 4u) >> 4u) | ((byte_at(s + j) >> 6u) << 4u);
    return vec2<f32>(f32(sc), f32(mn));
}

fn decode_q4_k(row: u32, c: u32) -> Chunk {
    let b = row + 144u * (c / 8u);
    let j = c % 8u;
    let sm = scale_min_k4(b + 4u, j);
    let qs = b + 16u + 32u * (j / 2u);
    let shift = 4u * (j % 2u);
    var w: Chunk;
    for (var i = 0u; i < 8u; i++) {
        w.q[i] = vec4<f32>(unpack4xU8((word_at(qs + 4u * i) >> shift) & 0x0f0f0f0fu));
    }
    w.a = half_at(b) * sm.x;
    w.b = half_at(b + 2u) * sm.y;
    return w;
}

fn dot_decoded_q4_k(w: Chunk, x: u32) -> f32 {
    var s = 0.0;
    var sx = 0.0;
    for (var i = 0u; i < 8u; i++) {
        let xv = X4[x + i];
        s += dot(w.q[i], xv);
        sx += sum4(xv);
    }
    return w.a * s - w.b * sx;
}

fn value_q4_k(row: u32, i: u32) -> f32 {
    let b = row + 144u * (i / 256u);
    let j = (i % 256u) / 32u;
    let sm = scale_min_k4(b + 4u, j);
    let q = (byte_at(b + 16u + 32u * (j / 2u) + i % 32u) >> (4u * (j % 2u))) & 0xfu;
    return half_at(b) * sm.x * f32(q) - half_at(b + 2u) * sm.y;
}

// --- block_q6_K (210 bytes, 256 values) -----------------------------------------------------------------------
// 128 bytes of low nibbles, 64 bytes of 2-bit highs, 16 signed scales (one per 16 values), d (f16). In each half of
// 128 values, run k (values 32k .. 32k + 31) takes its low bits from byte l + 32 (k % 2) of the half's 64 (nibble
// k / 2) and its high bits from byte l of the half's 32 (bits 2k); value = d s (q - 32).

fn signed_byte(off: u32) -> f32 {
    return f32(extractBits(bitcast<i32>(byte_at(off)), 0u, 8u));
}

fn decode_q6_k(row: u32, c: u32) -> Chunk {
    let b = row + 210u * (c / 8u);
    let h = (c % 8u) / 4u;
    let k = c % 4u;
    let ql = b + 64u * h + 32u * (k % 2u);
    let qh = b + 128u + 32u * h;
    let sc = b + 192u + 8u * h + 2u * k;
    var w: Chunk;
    for (var i = 0u; i < 8u; i++) {
        let lo = (word_at(ql + 4u * i) >> (4u * (k / 2u))) & 0x0f0f0f0fu;
        let hi = (word_at(qh + 4u * i) >> (2u * k)) & 0x03030303u;
        w.q[i] = vec4<f32>(unpack4xU8(lo | (hi << 4u))) - 32.0;
    }
    w.a = half_at(b + 208u);
    w.b = signed_byte(sc);
    w.c = signed_byte(sc + 1u);
    return w;
}

fn dot_decoded_q6_k(w: Chunk, x: u32) -> f32 {
    var s0 = 0.0;
    var s1 = 0.0;
    for (var i = 0u; i < 8u; i++) {
        let p = dot(w.q[i], X4[x + i]);
        if (i < 4u) {
            s0 += p;
        } else {
            s1 += p;
        }
    }
    return w.a * (w.b * s0 + w.c * s1);
}

fn value_q6_k(row: u32, i: u32) -> f32 {
    let b = row + 210u * (i / 256u);
    let h = (i % 256u) / 128u;
    let k = (i % 128u) / 32u;
    let l = i % 32u;
    let low = (byte_at(b + 64u * h + 32u * (k % 2u) + l) >> (4u * (k / 2u))) & 0xfu;
    let high = (byte_at(b + 128u + 32u * h + l) >> (2u * k)) & 3u;
    let scale = signed_byte(b + 192u + 8u * h + 2u * k + l / 16u);
    return half_at(b + 208u) * scale * (f32(low | (high << 4u)) - 32.0);
}
