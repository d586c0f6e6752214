// Picking the next token on the GPU, so that decoding reads back one token id instead of the logits. One
// workgroup scans the vocabulary. Greedy: the first maximum (where the LM head has no softcap, a greedy pick skips
// this kernel: the LM head keeps each workgroup's largest logit itself, matmul_largest.wgsl). Random: keep the tokens at least as likely as the
// k-th (top-k) and then those whose mass first reaches p (top-p), both thresholds found by bisection on the
// logits' order-preserving integer keys, and take the kept token with the largest l / T + Gumbel noise, the noise
// hashed from (seed, step, token). CPU twin, draw for draw: crates/engine/src/sampler.rs (`pick`).

struct Params {
    vocab: u32,
    random: u32,      // 0: greedy
    top_k: u32,       // 0: no top-k
    top_p: f32,       // 1: no top-p
    temperature: f32,
    seed_lo: u32,
    seed_hi: u32,
    step: u32,
}

@group(0) @binding(0) var<storage, read> L: array<f32>;
@group(0) @binding(1) var<storage, read_write> OUT: array<u32>;
@group(0) @binding(2) var<uniform> P: Params;

const N: u32 = 256u;
var<workgroup> best_value: array<f32, 256>;
var<workgroup> best_index: array<u32, 256>;
var<workgroup> total: array<f32, 256>;

// Larger floats give larger keys; NaN gives 0, below every number.
fn key(x: f32) -> u32 {
    if (x != x) {
        return 0u;
    }
    let b = bitcast<u32>(x);
    return select(b | 0x80000000u, ~b, (b >> 31u) == 1u);
}

fn mix32(v: u32) -> u32 {
    var x = v;
    x ^= x >> 16u;
    x *= 0x7feb352du;
    x ^= x >> 15u;
    x *= 0x846ca68bu;
    x ^= x >> 16u;
    return x;
}

fn gumbel(i: u32) -> f32 {
    let h = mix32(mix32(mix32(P.seed_lo ^ mix32(P.seed_hi)) ^ P.step) ^ i);
    let u = (f32(h >> 8u) + 0.5) / 16777216.0;
    return -log(-log(u));
}

fn sum_all(v: f32, li: u32) -> f32 {
    total[li] = v;
    workgroupBarrier();
    for (var half = N / 2u; half > 0u; half >>= 1u) {
        if (li < half) {
            total[li] += total[li + half];
        }
        workgroupBarrier();
    }
    // A value every thread agrees on (it steers the bisection loops, whose barriers need uniform control flow).
    let r = workgroupUniformLoad(&total[0]);
    workgroupBarrier();
    return r;
}

// The largest (score, lower index first) over the workgroup.
fn arg_best(v: f32, i: u32, li: u32) -> u32 {
    best_value[li] = v;
    best_index[li] = i;
    workgroupBarrier();
    for (var half = N / 2u; half > 0u; half >>= 1u) {
        if (li < half) {
            let ov = best_value[li + half];
            let oi = best_index[li + half];
            if (ov > best_value[li] || (ov == best_value[li] && oi < best_index[li])) {
                best_value[li] = ov;
                best_index[li] = oi;
            }
        }
        workgroupBarrier();
    }
    let r = workgroupUniformLoad(&best_index[0]);
    workgroupBarrier();
    return r;
}

@compute @workgroup_size(256)
fn main(@builtin(local_invocation_index) li: u32) {
    // The maximum logit (greedy's answer, and the reference for the probabilities).
    var v = -3.4e38;
    var at = 0xffffffffu;
    for (var i = li; i < P.vocab; i += N) {
        let x = L[i];
        if (x > v) {
            v = x;
            at = i;
        }
    }
    let top = arg_best(v, at, li);
    if (P.random == 0u) {
        if (li == 0u) {
            OUT[0] = top;
        }
        return;
    }
    let max_logit = L[top];

    // top-k: the largest key t with at least k tokens at or above it.
    var threshold = 0u;
    if (P.top_k > 0u) {
        var lo = 0u;
        var hi = 0xffffffffu;
        for (var it = 0u; it < 32u; it++) {
            if (lo >= hi) {
                break;
            }
            let mid = lo + (hi - lo) / 2u + 1u;
            var c = 0.0;
            for (var i = li; i < P.vocab; i += N) {
                c += select(0.0, 1.0, key(L[i]) >= mid);
            }
            if (sum_all(c, li) >= f32(P.top_k)) {
                lo = mid;
            } else {
                hi = mid - 1u;
            }
        }
        threshold = lo;
    }

    // top-p: among the kept, the largest key t whose tokens at or above it hold at least p of the mass.
    if (P.top_p < 1.0) {
        var m = 0.0;
        for (var i = li; i < P.vocab; i += N) {
            if (key(L[i]) >= threshold) {
                m += exp((L[i] - max_logit) / P.temperature);
            }
        }
        let goal = P.top_p * sum_all(m, li);
        var lo = threshold;
        var hi = key(max_logit);
        for (var it = 0u; it < 32u; it++) {
            if (lo >= hi) {
                break;
            }
            let mid = lo + (hi - lo) / 2u + 1u;
            var s = 0.0;
            for (var i = li; i < P.vocab; i += N) {
                if (key(L[i]) >= mid) {
                    s += exp((L[i] - max_logit) / P.temperature);
                }
            }
            if (sum_all(s, li) >= goal) {
                lo = mid;
            } else {
                hi = mid - 1u;
            }
        }
        threshold = lo;
    }

    // Gumbel-max over the kept tokens.
    var score = -3.4e38;
    var pick = 0xffffffffu;
    for (var i = li; i < P.vocab; i += N) {
        if (key(L[i]) >= threshold) {
            let s = L[i] / P.temperature + gumbel(i);
            if (s > score) {
                score = s;
                pick = i;
            }
        }
    }
    let chosen = arg_best(score, pick, li);
    if (li == 0u) {
        OUT[0] = chosen;
    }
}
