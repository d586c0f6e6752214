// Prepended to every kernel (gpu/kernels.rs): the per-call block all kernels read at their last binding. Twin of
// `StepParams` in gpu/kernels.rs.

struct Step {
    tokens: u32,      // tokens in this call
    start: u32,       // position of the first of them
    pad0: u32,
    pad1: u32,
}
