// The matrix products' activations as they are (appended to matmul.wgsl): X4 is the input buffer.

@group(0) @binding(1) var<storage, read> X4: array<vec4<f32>>; // [tokens][cols / 4]

// The first vec4 of input row `row` in X4.
fn input_row(row: u32, li: u32, first_group: bool) -> u32 {
    return row * P.cols / 4u;
}
