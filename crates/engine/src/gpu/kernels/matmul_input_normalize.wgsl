// The RMSNorm of the input row a normalizing product has put into X4 (appended by gpu/kernels.rs after
// matmul_input_add_norm.wgsl and matmul_input_embed_norm.wgsl, which declare X4 and NORM): the squares of the
// values li, li + 64, ... summed as rmsnorm.wgsl does, then each value times 1 / rms and its weight.

// Normalizes X4 in place, after a barrier that makes every thread's values visible. Every thread must call it.
fn normalize_input(li: u32) {
    workgroupBarrier();
    var squares = 0.0;
    for (var i = li; i < P.cols; i += 64u) {
        let h = X4[i / 4u][i % 4u];
        squares += h * h;
    }
    let r = row_inverse_rms(squares, li, P.cols, P.eps);
    for (var v = li; v < P.cols / 4u; v += 64u) {
        let i = 4u * v;
        X4[v] = X4[v] * r * vec4<f32>(NORM[i], NORM[i + 1u], NORM[i + 2u], NORM[i + 3u]);
    }
    workgroupBarrier();
}
