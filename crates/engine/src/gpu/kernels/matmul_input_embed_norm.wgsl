// The matrix products' activations for the first layer's first products in a one-token call (appended to
// matmul.wgsl, with TILE 1, and with quant.wgsl's decoders renamed to read the embedding table E: `table_value`):
// each workgroup looks its token's row up in the table, as embed.wgsl does, and normalizes it, as
// matmul_input_norm.wgsl does, so that a decoding step needs no embedding dispatch. Value for value:
//   h  = scale * E[token]
//   X4 = norm(h)
// and the workgroup of row group 0 of a product with P.write_sum == 1 stores h in H_OUT, the residual stream, for
// the layer's later steps. No workgroup reads H_OUT here.

@group(0) @binding(5) var<storage, read> NORM: array<f32>;         // the norm's weights
@group(0) @binding(6) var<storage, read> E: array<u32>;            // the embedding table's blocks
@group(0) @binding(7) var<storage, read> TOKENS: array<u32>;       // the call's token ids
@group(0) @binding(8) var<storage, read_write> H_OUT: array<f32>;  // [tokens][cols]: h, written once

override INPUT_VEC4S: u32 = 144u; // P.cols / 4, at most gpu/kernels.rs's MAX_NORMALIZED_COLS / 4

var<workgroup> X4: array<vec4<f32>, INPUT_VEC4S>;

// Looks up and normalizes input row `row` into X4 and returns its first vec4 there, 0; `first_group`: this is row
// group 0's workgroup. Every thread must call it. Threads write whole vec4s of X4, which
// matmul_input_normalize.wgsl's `normalize_input` then normalizes.
fn input_row(row: u32, li: u32, first_group: bool) -> u32 {
    let base = row * P.cols;
    let table_row = TOKENS[row] * P.table_row_bytes;
    let writes = P.write_sum == 1u && first_group;
    for (var v = li; v < P.cols / 4u; v += 64u) {
        let i = 4u * v;
        let h = vec4<f32>(table_value(table_row, i) * P.table_scale, table_value(table_row, i + 1u) * P.table_scale,
                          table_value(table_row, i + 2u) * P.table_scale, table_value(table_row, i + 3u) * P.table_scale);
        X4[v] = h;
        if (writes) {
            H_OUT[base + i] = h.x;
            H_OUT[base + i + 1u] = h.y;
            H_OUT[base + i + 2u] = h.z;
            H_OUT[base + i + 3u] = h.w;
        }
    }
    normalize_input(li);
    return 0u;
}
