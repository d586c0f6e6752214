// The greedy pick begun inside the LM head (appended to matmul.wgsl for LM heads whose tokens are picked greedily,
// one input row): each workgroup writes the largest of its rows' sums, as an order-preserving integer key, and
// that row, the first row among equal sums, so that the CPU picks the token from one pair per workgroup
// (gpu/model.rs, `pick_largest`) and a decoding step needs no select dispatch. Keys, not floats, so that no
// infinity or NaN is compared in the shader. Together: sampler::argmax of the logits, which the product still
// writes. Test: largest_products_pick_as_argmax.

@group(0) @binding(9) var<storage, read_write> LARGEST: array<u32>; // [slot][largest sum's key, its row]

var<workgroup> best_key: array<u32, 64>;
var<workgroup> best_row: array<u32, 64>;

// Larger floats give larger keys (select.wgsl's `key`); -0 gives +0's key, as argmax takes them as equal; NaN
// gives 0, below every number.
fn order_key(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    let magnitude = b & 0x7fffffffu;
    if (magnitude > 0x7f800000u) {
        return 0u;
    }
    if (magnitude == 0u) {
        return 0x80000000u;
    }
    return select(b | 0x80000000u, ~b, (b >> 31u) == 1u);
}

// Row group `group`'s largest sum into slot P.first_group + group; `holds_row`: this thread's `value` is the sum of
// row r of this buffer. Every thread must call it.
fn finish_group(group: u32, li: u32, holds_row: bool, value: f32, r: u32) {
    best_key[li] = select(0u, order_key(value), holds_row);
    best_row[li] = select(0xffffffffu, P.out_col + r, holds_row);
    workgroupBarrier();
    for (var half = 32u; half > 0u; half >>= 1u) {
        if (li < half) {
            let key = best_key[li + half];
            let row = best_row[li + half];
            if (key > best_key[li] || (key == best_key[li] && row < best_row[li])) {
                best_key[li] = key;
                best_row[li] = row;
            }
        }
        workgroupBarrier();
    }
    // A dispatch split over x and y may have workgroups past the last row group: they keep no slot.
    if (li == 0u && group * (64u / LANES) < P.rows) {
        let slot = P.first_group + group;
        LARGEST[2u * slot] = best_key[0];
        LARGEST[2u * slot + 1u] = best_row[0];
    }
}
