// The attention's inputs from one fused q|k|v product: per token, the q heads, then the k heads, then the v heads,
// each `head_dim` values. One workgroup per (token, head):
//   q head   Gemma 3's per-head norm (when `qk_norm`), then RoPE, into Q[t]
//   k head   the same with k's norm weights, into the key cache at position start + t
//   v head   copied into the value cache at position start + t
// RoPE's cos and sin come from a table the CPU computes once per base (GPU sin/cos lose precision on the large
// angles of late positions). Layouts: `halves` pairs dimension i with i + d/2 (Gemma), `interleaved` pairs 2i
// with 2i + 1 (Llama as llama.cpp stores it).
// CPU twins: candle_nn::ops::rms_norm and candle_nn::rotary_emb::rope / rope_i, as model/cpu.rs uses them.

struct Params {
    heads: u32,
    kv_heads: u32,
    head_dim: u32,      // even, <= 256
    interleaved: u32,
    qk_norm: u32,       // 1: normalize q and k heads with NORMS first
    eps: f32,
    pad0: u32,
    pad1: u32,
}

@group(0) @binding(0) var<storage, read> QKV: array<f32>;        // [tokens][(heads + 2 kv_heads) * head_dim]
@group(0) @binding(1) var<storage, read_write> Q: array<f32>;    // [tokens][heads * head_dim]
@group(0) @binding(2) var<storage, read_write> KC: array<f32>;   // [position][kv_heads * head_dim]
@group(0) @binding(3) var<storage, read_write> VC: array<f32>;   // [position][kv_heads * head_dim]
@group(0) @binding(4) var<storage, read> NORMS: array<f32>;      // q's norm weights, then k's (head_dim each)
@group(0) @binding(5) var<storage, read> COS: array<f32>;        // [position][head_dim / 2]
@group(0) @binding(6) var<storage, read> SIN: array<f32>;
@group(0) @binding(7) var<uniform> P: Params;
@group(0) @binding(8) var<uniform> S: Step;

@compute @workgroup_size(64)
fn prepare_heads(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let per_token = P.heads + 2u * P.kv_heads;
    let t = wg.x / per_token;
    let head = wg.x % per_token;
    if (t >= S.tokens) {
        return;
    }
    let d = P.head_dim;
    let src = (t * per_token + head) * d;
    let kv_width = P.kv_heads * d;
    if (head >= P.heads + P.kv_heads) {
        let dst = (S.start + t) * kv_width + (head - P.heads - P.kv_heads) * d;
        for (var i = li; i < d; i += 64u) {
            VC[dst + i] = QKV[src + i];
        }
        return;
    }
    let is_q = head < P.heads;
    var r = 1.0;
    if (P.qk_norm == 1u) {
        var squares = 0.0;
        for (var i = li; i < d; i += 64u) {
            squares += QKV[src + i] * QKV[src + i];
        }
        r = row_inverse_rms(squares, li, d, P.eps);
    }
    let weights = select(d, 0u, is_q);
    let half = d / 2u;
    for (var i = li; i < half; i += 64u) {
        var a = i;
        var b = i + half;
        if (P.interleaved == 1u) {
            a = 2u * i;
            b = 2u * i + 1u;
        }
        var x = QKV[src + a];
        var y = QKV[src + b];
        if (P.qk_norm == 1u) {
            x = x * r * NORMS[weights + a];
            y = y * r * NORMS[weights + b];
        }
        let angle = (S.start + t) * half + i;
        let c = COS[angle];
        let s = SIN[angle];
        let rx = x * c - y * s;
        let ry = y * c + x * s;
        if (is_q) {
            let dst = (t * P.heads + head) * d;
            Q[dst + a] = rx;
            Q[dst + b] = ry;
        } else {
            let dst = (S.start + t) * kv_width + (head - P.heads) * d;
            KC[dst + a] = rx;
            KC[dst + b] = ry;
        }
    }
}
