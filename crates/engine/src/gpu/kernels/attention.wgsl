// Attention, from the fused q|k|v product's output to the heads' outputs. Entry points:
//   prepare_heads  one workgroup per (token, head) of the q|k|v output:
//                    q head  Gemma 3's per-head norm (when `qk_norm`), then RoPE, into Q[t]
//                    k head  the same with k's norm weights, into the key cache at token t's row
//                    v head  copied into the value cache at token t's row
//   attend         one workgroup per (query token, head): causal attention of Q over the caches
//   attend_step    one-token steps only, one workgroup per head: prepare_heads and attend in one dispatch. Every
//                  workgroup prepares its own q head and its kv head's new k and v in workgroup memory, and takes
//                  the new key from there; the last q head of each kv group also writes them into the caches for
//                  later steps. The other workgroups never read the cache row being written, so no workgroup waits
//                  on another, and the result is bit for bit that of prepare_heads then attend.
// Attention uses grouped key/value heads, sliding windows and Gemma 2's softcap. Keys are taken 64 at a time with
// an online softmax (running maximum and sum, rescaled as larger scores arrive), so any context length fits in
// fixed workgroup memory. A query at position p sees keys j with p - window < j <= p (window 0: all j <= p).
// Where each token of a call stands comes from ROWS: its position, and the cache row that holds its sequence's
// position 0 (0 for the model's one sequence; each sequence of a batch has rows of its own). Position p of that
// sequence is cache row first + p.
// The caches KC and VC are declared by the file gpu/kernels.rs prepends, one per form of the cache: f32
// (kv_cache_f32.wgsl), f16 (kv_cache_f16.wgsl, with `shader-f16`) or f16 packed two to a word
// (kv_cache_f16_packed.wgsl). Attention reads and writes them only through that file's functions, and writes a
// row's values two at a time, so that a packed word is written whole by one thread.
// RoPE's cos and sin come from a table the CPU computes once per base (GPU sin/cos lose precision on the large
// angles of late positions). Layouts: `halves` pairs dimension i with i + d/2 (Gemma), `interleaved` pairs 2i
// with 2i + 1 (Llama as llama.cpp stores it).
// CPU twins: tests/gpu_cases's `rms_norm_cpu` (the norm's formula) and `rope_cpu` (candle_nn's rope / rope_i),
// and CpuModel::attention (model/cpu.rs).

struct HeadsParams {
    heads: u32,
    kv_heads: u32,
    head_dim: u32,      // even, <= 256
    interleaved: u32,
    qk_norm: u32,       // 1: normalize q and k heads with NORMS first
    eps: f32,
    pad0: u32,
    pad1: u32,
}

struct AttentionParams {
    heads: u32,
    kv_heads: u32,
    head_dim: u32,   // <= 256
    window: u32,     // 0: no window
    scale: f32,      // multiplies q.k
    softcap: f32,    // 0: none; else scores become softcap * tanh(scores / softcap)
    pad0: u32,
    pad1: u32,
}

@group(0) @binding(0) var<storage, read> QKV: array<f32>;        // [tokens][(heads + 2 kv_heads) * head_dim]
@group(0) @binding(1) var<storage, read_write> Q: array<f32>;    // [tokens][heads * head_dim]
// Bindings 2 and 3: the key and value caches KC and VC, [cache row][kv_heads * head_dim] (kv_cache_*.wgsl).
@group(0) @binding(4) var<storage, read> NORMS: array<f32>;      // q's norm weights, then k's (head_dim each)
@group(0) @binding(5) var<storage, read> COS: array<f32>;        // [position][head_dim / 2]
@group(0) @binding(6) var<storage, read> SIN: array<f32>;
@group(0) @binding(7) var<uniform> H: HeadsParams;
@group(0) @binding(8) var<uniform> S: Step;
@group(0) @binding(9) var<storage, read_write> O: array<f32>;    // [tokens][heads * head_dim]
@group(0) @binding(10) var<uniform> A: AttentionParams;
@group(0) @binding(11) var<storage, read> ROWS: array<TokenRow>; // one per token of the call

struct TokenRow {
    first: u32,     // the cache row of the token's sequence's position 0
    position: u32,  // the token's position in its sequence
}

// --- Preparing the heads -------------------------------------------------------------------------------------

// 1 / rms of the head at `src` of QKV when the heads are normalized, else 1. Every thread must call it.
fn head_inverse_rms(src: u32, li: u32) -> f32 {
    if (H.qk_norm == 0u) {
        return 1.0;
    }
    var squares = 0.0;
    for (var i = li; i < H.head_dim; i += 64u) {
        squares += QKV[src + i] * QKV[src + i];
    }
    return row_inverse_rms(squares, li, H.head_dim, H.eps);
}

// Pair i of a head after its norm and RoPE: the dimensions a and b it fills and their values x and y.
struct RotatedPair {
    a: u32,
    b: u32,
    x: f32,
    y: f32,
}

// Pair i of the head at `src` of QKV at `position`, normalized with the weights at `weights` of NORMS and
// `inverse_rms` (from head_inverse_rms), then rotated.
fn rotated_pair(src: u32, weights: u32, inverse_rms: f32, position: u32, i: u32) -> RotatedPair {
    let half = H.head_dim / 2u;
    var a = i;
    var b = i + half;
    if (H.interleaved == 1u) {
        a = 2u * i;
        b = 2u * i + 1u;
    }
    var x = QKV[src + a];
    var y = QKV[src + b];
    if (H.qk_norm == 1u) {
        x = x * inverse_rms * NORMS[weights + a];
        y = y * inverse_rms * NORMS[weights + b];
    }
    let angle = position * half + i;
    let c = COS[angle];
    let s = SIN[angle];
    return RotatedPair(a, b, x * c - y * s, y * c + x * s);
}

@compute @workgroup_size(64)
fn prepare_heads(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let per_token = H.heads + 2u * H.kv_heads;
    let t = wg.x / per_token;
    let head = wg.x % per_token;
    if (t >= S.tokens) {
        return;
    }
    let d = H.head_dim;
    let src = (t * per_token + head) * d;
    let kv_width = H.kv_heads * d;
    let row = ROWS[t];
    if (head >= H.heads + H.kv_heads) {
        let dst = (row.first + row.position) * kv_width + (head - H.heads - H.kv_heads) * d;
        for (var i = li; i < d / 2u; i += 64u) {
            store_value_pair(dst + 2u * i, QKV[src + 2u * i], QKV[src + 2u * i + 1u]);
        }
        return;
    }
    let is_q = head < H.heads;
    let r = head_inverse_rms(src, li);
    let weights = select(d, 0u, is_q);
    for (var i = li; i < d / 2u; i += 64u) {
        let pair = rotated_pair(src, weights, r, row.position, i);
        if (is_q) {
            let dst = (t * H.heads + head) * d;
            Q[dst + pair.a] = pair.x;
            Q[dst + pair.b] = pair.y;
        } else {
            k_new[pair.a] = pair.x;
            k_new[pair.b] = pair.y;
        }
    }
    // A key head's pairs (i, i + d/2 in the `halves` layout) are not the cache's pairs of neighbours: gathered first.
    if (!is_q) {
        workgroupBarrier();
        let dst = (row.first + row.position) * kv_width + (head - H.heads) * d;
        for (var i = li; i < d / 2u; i += 64u) {
            store_key_pair(dst + 2u * i, k_new[2u * i], k_new[2u * i + 1u]);
        }
    }
}

// --- Attending -----------------------------------------------------------------------------------------------

var<workgroup> q: array<f32, 256>;      // the query head, times the scale
var<workgroup> p: array<f32, 64>;       // a chunk's softmax weights
var<workgroup> red: array<f32, 64>;
var<workgroup> k_new: array<f32, 256>;  // attend_step: the step's own key and value, as the caches keep them
                                        // (prepare_heads: a key head before it is stored)
var<workgroup> v_new: array<f32, 256>;

fn reduce_max(v: f32, li: u32) -> f32 {
    red[li] = v;
    workgroupBarrier();
    for (var half = 32u; half > 0u; half >>= 1u) {
        if (li < half) {
            red[li] = max(red[li], red[li + half]);
        }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}

// The attention of query head `head` of token t, standing at `row`, already in `q`, over its sequence's cached
// keys and values. With `fresh`, the key and value at its position come from k_new and v_new instead of the caches.
fn attend_head(head: u32, t: u32, row: TokenRow, fresh: bool, li: u32) {
    let hd = A.head_dim;
    let kv_head = head / (A.heads / A.kv_heads);
    let kv_width = A.kv_heads * hd;
    let position = row.position;
    var oldest = 0u;
    if (A.window > 0u && position + 1u > A.window) {
        oldest = position + 1u - A.window;
    }
    var running_max = -3.0e38;
    var running_sum = 0.0;
    var acc: array<f32, 4>; // this thread's dimensions li, li + 64, li + 128, li + 192
    for (var chunk = oldest; chunk <= position; chunk += 64u) {
        let j = chunk + li;
        var score = -3.0e38;
        if (j <= position) {
            var s = 0.0;
            if (fresh && j == position) {
                for (var d = 0u; d < hd; d++) {
                    s += q[d] * k_new[d];
                }
            } else {
                let k_base = (row.first + j) * kv_width + kv_head * hd;
                for (var d = 0u; d < hd; d++) {
                    s += q[d] * cached_key(k_base + d);
                }
            }
            if (A.softcap > 0.0) {
                s = A.softcap * safe_tanh(s / A.softcap);
            }
            score = s;
        }
        let chunk_max = reduce_max(score, li);
        let new_max = max(running_max, chunk_max);
        let rescale = exp(running_max - new_max);
        var w = 0.0;
        if (j <= position) {
            w = exp(score - new_max);
        }
        p[li] = w;
        let chunk_sum = workgroup_sum(w, li);
        running_sum = running_sum * rescale + chunk_sum;
        running_max = new_max;
        let keys = min(64u, position + 1u - chunk);
        // The last chunk holds `position`; with `fresh` its value is not read from the cache.
        let holds_fresh = fresh && chunk + keys == position + 1u;
        let cached = select(keys, keys - 1u, holds_fresh);
        for (var n = 0u; n < 4u; n++) {
            let d = li + 64u * n;
            if (d < hd) {
                var s = acc[n] * rescale;
                for (var i = 0u; i < cached; i++) {
                    s += p[i] * cached_value((row.first + chunk + i) * kv_width + kv_head * hd + d);
                }
                if (holds_fresh) {
                    s += p[keys - 1u] * v_new[d];
                }
                acc[n] = s;
            }
        }
        workgroupBarrier();
    }
    let o_base = t * A.heads * hd + head * hd;
    for (var n = 0u; n < 4u; n++) {
        let d = li + 64u * n;
        if (d < hd) {
            O[o_base + d] = acc[n] / running_sum;
        }
    }
}

@compute @workgroup_size(64)
fn attend(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let head = wg.x;
    let t = wg.y;
    let hd = A.head_dim;
    let q_base = t * A.heads * hd + head * hd;
    for (var d = li; d < hd; d += 64u) {
        q[d] = Q[q_base + d] * A.scale;
    }
    workgroupBarrier();
    attend_head(head, t, ROWS[t], false, li);
}

@compute @workgroup_size(64)
fn attend_step(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let head = wg.x;
    let row = ROWS[0];
    let position = row.position;
    let d = H.head_dim;
    let group = H.heads / H.kv_heads;
    let kv_head = head / group;
    // This step's q head and its kv head's k and v in the q|k|v output (one token: row 0).
    let q_src = head * d;
    let k_src = (H.heads + kv_head) * d;
    let v_src = (H.heads + H.kv_heads + kv_head) * d;
    // The last q head of the group writes: on an adapter that runs workgroups in order (lavapipe), a workgroup that
    // wrongly read the new row from the cache would read it before it is written, and the tests would see it.
    let writes_cache = head % group == group - 1u;
    let kv_dst = (row.first + position) * H.kv_heads * d + kv_head * d;

    let q_rms = head_inverse_rms(q_src, li);
    let k_rms = head_inverse_rms(k_src, li);
    for (var i = li; i < d / 2u; i += 64u) {
        let qp = rotated_pair(q_src, 0u, q_rms, position, i);
        q[qp.a] = qp.x * A.scale;
        q[qp.b] = qp.y * A.scale;
        let kp = rotated_pair(k_src, d, k_rms, position, i);
        k_new[kp.a] = as_cached(kp.x);
        k_new[kp.b] = as_cached(kp.y);
    }
    for (var i = li; i < d; i += 64u) {
        v_new[i] = as_cached(QKV[v_src + i]);
    }
    workgroupBarrier();
    if (writes_cache) {
        for (var i = li; i < d / 2u; i += 64u) {
            store_key_pair(kv_dst + 2u * i, k_new[2u * i], k_new[2u * i + 1u]);
            store_value_pair(kv_dst + 2u * i, v_new[2u * i], v_new[2u * i + 1u]);
        }
    }
    attend_head(head, 0u, row, true, li);
}
