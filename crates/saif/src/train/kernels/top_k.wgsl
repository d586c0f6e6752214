// TopK activation for the SAE trainer (Gao et al. 2024). Per row of the encoder's ReLU outputs: the k largest
// positive values (among equals, the lower index first) become the row's latents, and for the AuxK loss the aux_k
// largest among the latents marked dead become its auxiliary latents. Every latent kept in the first selection is
// marked as fired. CPU twin: `top_k_mask` (crates/saif/src/train/mod.rs, over `top_k_relu` in sae.rs).
//
// One workgroup per row. Positive floats order like their bit patterns, so the k-th largest value is found by
// bisection on the bits: the largest t with at least k eligible values whose bits are >= t.

struct Params {
    rows: u32,
    width: u32,
    k: u32,
    aux_k: u32, // 0: no auxiliary selection (its rows are zeroed)
}

@group(0) @binding(0) var<storage, read> PRE: array<f32>;         // rows x width, after ReLU
@group(0) @binding(1) var<storage, read> DEAD: array<u32>;        // width: 1 where the latent is dead
@group(0) @binding(2) var<storage, read_write> LAT: array<f32>;   // 2 rows x width: TopK rows, then AuxK rows
@group(0) @binding(3) var<storage, read_write> FIRED: array<atomic<u32>>; // width
@group(0) @binding(4) var<uniform> P: Params;

const N: u32 = 256u;
var<workgroup> total: array<u32, 256>;

fn count_all(c: u32, li: u32) -> u32 {
    total[li] = c;
    workgroupBarrier();
    for (var half = N / 2u; half > 0u; half >>= 1u) {
        if (li < half) {
            total[li] += total[li + half];
        }
        workgroupBarrier();
    }
    let r = workgroupUniformLoad(&total[0]);
    workgroupBarrier();
    return r;
}

// The bits of a value that may be selected, or 0 (a value that is not positive, or not dead for AuxK).
fn key(row: u32, i: u32, aux: bool) -> u32 {
    let v = PRE[row * P.width + i];
    if (!(v > 0.0) || (aux && DEAD[i] == 0u)) {
        return 0u;
    }
    return bitcast<u32>(v);
}

// Eligible values of the row with bits >= t (t >= 1).
fn count_at_least(row: u32, t: u32, aux: bool, li: u32) -> u32 {
    var c = 0u;
    for (var i = li; i < P.width; i += N) {
        c += select(0u, 1u, key(row, i, aux) >= t);
    }
    return count_all(c, li);
}

// Writes the selection of `k` values of input row `row` into output row `out`.
fn select_top(row: u32, out: u32, k: u32, aux: bool, li: u32) {
    let eligible = count_at_least(row, 1u, aux, li);
    // Keep values with bits >= threshold; of those equal to it, only the first `room`.
    var threshold = 1u;
    var room = 0xffffffffu;
    if (k == 0u) {
        threshold = 0xffffffffu;
    } else if (eligible > k) {
        var lo = 1u;
        var hi = 0x7f800000u;
        for (var it = 0u; it < 32u; it++) {
            if (lo >= hi) {
                break;
            }
            let mid = lo + (hi - lo + 1u) / 2u;
            if (count_at_least(row, mid, aux, li) >= k) {
                lo = mid;
            } else {
                hi = mid - 1u;
            }
        }
        threshold = lo;
        let above = count_at_least(row, threshold + 1u, aux, li);
        let equal = count_at_least(row, threshold, aux, li) - above;
        if (equal > k - above) {
            room = k - above;
        }
    }
    for (var i = li; i < P.width; i += N) {
        let b = key(row, i, aux);
        let keep = b > threshold || (b == threshold && room == 0xffffffffu && b != 0u);
        LAT[out * P.width + i] = select(0.0, bitcast<f32>(b), keep);
        if (keep && !aux) {
            atomicStore(&FIRED[i], 1u);
        }
    }
    // Ties at the threshold with too little room: the lower indices, in order, by one thread.
    if (room != 0xffffffffu) {
        storageBarrier();
        if (li == 0u) {
            var left = room;
            for (var i = 0u; i < P.width && left > 0u; i++) {
                if (key(row, i, aux) == threshold) {
                    LAT[out * P.width + i] = bitcast<f32>(threshold);
                    if (!aux) {
                        atomicStore(&FIRED[i], 1u);
                    }
                    left -= 1u;
                }
            }
        }
    }
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let row = wg.x + wg.y * groups.x;
    if (row >= P.rows) {
        return;
    }
    select_top(row, row, P.k, false, li);
    select_top(row, P.rows + row, P.aux_k, true, li);
}
