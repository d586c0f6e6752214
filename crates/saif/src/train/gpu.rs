//! The training step on a GPU through wgpu: the same step as `cpu.rs`, with the gradients written out by hand
//! (sae_step.wgsl says which is which) and everything kept in GPU memory between steps. Per step the CPU uploads
//! the batch and the dead-latent flags, records the step's dispatches (prepared once) and reads back four numbers
//! and the fired flags. Natively only: a browser cannot wait for the GPU inside a step.
//!
//! The kernels, one family per file in `kernels/`: dense f32 products (`dense_matmul.wgsl`), TopK and AuxK
//! selection (`top_k.wgsl`), the element-wise forward and backward passes (`sae_step.wgsl`), Adam and the
//! decoder's row normalisation (`adam.wgsl`). tests/gpu_training.rs checks them against the CPU step.

use bytemuck::{Pod, Zeroable};
use saif_engine::gpu::kernels::{compute_kernel, split_groups, Kernel, Slot};
use saif_engine::gpu::{wgpu, Gpu};

use super::{Batch, State, StepOutcome, Stepper, TrainConfig, TrainError, BETA1, BETA2, EPS};

const DENSE_MATMUL: &str = include_str!("kernels/dense_matmul.wgsl");
const TOP_K: &str = include_str!("kernels/top_k.wgsl");
const SAE_STEP: &str = include_str!("kernels/sae_step.wgsl");
const ADAM: &str = include_str!("kernels/adam.wgsl");

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct MatmulParams {
    m: u32,
    n: u32,
    k: u32,
    pad: u32,
    a_row: u32,
    a_col: u32,
    b_row: u32,
    b_col: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct TopKParams {
    rows: u32,
    width: u32,
    k: u32,
    aux_k: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct StepParams {
    rows: u32,
    d: u32,
    width: u32,
    aux_on: u32,
    inv_var: f32,
    aux_weight: f32,
    pad: [u32; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct AdamParams {
    lr: f32,
    c1: f32,
    c2: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    rows: u32,
    cols: u32,
    one_minus_beta1: f32,
    one_minus_beta2: f32,
    pad: [u32; 2],
}

impl AdamParams {
    /// Adam at step `t` (from 1) with rate `lr`; the row count and width are for `normalize_rows`.
    fn at_step(t: usize, lr: f64, rows: usize, cols: usize) -> Self {
        let t = t as i32;
        Self {
            lr: lr as f32,
            c1: (1.0 - BETA1.powi(t)) as f32,
            c2: (1.0 - BETA2.powi(t)) as f32,
            beta1: BETA1 as f32,
            beta2: BETA2 as f32,
            eps: EPS as f32,
            rows: rows as u32,
            cols: cols as u32,
            one_minus_beta1: (1.0 - BETA1) as f32,
            one_minus_beta2: (1.0 - BETA2) as f32,
            pad: [0; 2],
        }
    }
}

/// A matrix in GPU memory as a product reads it: its buffer, its shape as stored (row-major), and whether the
/// product uses its transpose.
#[derive(Clone, Copy)]
pub(crate) struct Operand<'a> {
    pub buffer: &'a wgpu::Buffer,
    pub rows: usize,
    pub cols: usize,
    pub transposed: bool,
}

impl<'a> Operand<'a> {
    pub fn new(buffer: &'a wgpu::Buffer, rows: usize, cols: usize) -> Self {
        Self { buffer, rows, cols, transposed: false }
    }

    pub fn t(self) -> Self {
        Self { transposed: !self.transposed, ..self }
    }

    /// (rows, cols, row stride, column stride) of the matrix the product sees.
    fn view(&self) -> (u32, u32, u32, u32) {
        let (r, c) = (self.rows as u32, self.cols as u32);
        if self.transposed {
            (c, r, 1, c)
        } else {
            (r, c, c, 1)
        }
    }
}

/// The two forms of the dense product in dense_matmul.wgsl.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Matmul {
    /// 64 x 64 tiles through workgroup memory: GPUs.
    Tiled,
    /// 4 x 4 blocks straight from memory, no barriers: adapters that are CPU programs (measured 1.6 times faster
    /// on lavapipe, 2 cores).
    Direct,
}

/// The product for this adapter.
pub fn adapter_matmul(gpu: &Gpu) -> Matmul {
    if gpu.runs_on_cpu() {
        Matmul::Direct
    } else {
        Matmul::Tiled
    }
}

/// One dispatch, prepared once and recorded again every step.
struct Dispatch {
    name: String,
    pipeline: wgpu::ComputePipeline,
    bind_group: wgpu::BindGroup,
    groups: (u32, u32),
}

/// The trainer's pipelines.
pub(crate) struct TrainKernels {
    matmul: Kernel,
    /// Output rows and columns one workgroup of `matmul` covers (64 tiled on GPUs, 32 direct on CPU adapters).
    matmul_tile: u32,
    top_k: Kernel,
    center: Kernel,
    bias_relu: Kernel,
    residual: Kernel,
    column_stats: Kernel,
    total_stats: Kernel,
    aux_residual: Kernel,
    pre_grad: Kernel,
    b_enc_grad: Kernel,
    b_dec_grad: Kernel,
    adam: Kernel,
    normalize_rows: Kernel,
}

/// How sae_step.wgsl declares each of its bindings.
fn step_slot(binding: u32) -> (u32, Slot) {
    let slot = match binding {
        0 => Slot::Uniform,
        1 | 2 | 5 | 6 | 9 | 12 | 14 | 15 | 18 => Slot::Read,
        _ => Slot::Write,
    };
    (binding, slot)
}

impl TrainKernels {
    /// The pipelines, with the product `adapter_matmul` chooses for this adapter.
    pub fn new(gpu: &Gpu) -> Result<Self, TrainError> {
        Self::with_matmul(gpu, adapter_matmul(gpu))
    }

    /// The pipelines with a given product kernel.
    fn with_matmul(gpu: &Gpu, matmul: Matmul) -> Result<Self, TrainError> {
        use Slot::{Read as R, Uniform as U, Write as W};
        let step = |entry: &str, bindings: &[u32]| {
            let slots: Vec<(u32, Slot)> = bindings.iter().map(|&b| step_slot(b)).collect();
            compute_kernel(gpu, entry, SAE_STEP, entry, &slots)
        };
        let (matmul_entry, matmul_tile) = match matmul {
            Matmul::Tiled => ("main", 64),
            Matmul::Direct => ("direct", 32),
        };
        let kernels = Self {
            matmul: compute_kernel(gpu, "dense_matmul", DENSE_MATMUL, matmul_entry, &[(0, R), (1, R), (2, W), (3, U)]),
            matmul_tile,
            top_k: compute_kernel(gpu, "top_k", TOP_K, "main", &[(0, R), (1, R), (2, W), (3, W), (4, U)]),
            center: step("center", &[0, 1, 2, 3]),
            bias_relu: step("bias_relu", &[0, 4, 5]),
            residual: step("residual", &[0, 1, 2, 6, 7, 8]),
            column_stats: step("column_stats", &[0, 9, 10]),
            total_stats: step("total_stats", &[0, 10, 11]),
            aux_residual: step("aux_residual", &[0, 6, 7, 8, 12, 13]),
            pre_grad: step("pre_grad", &[0, 14, 15, 16]),
            b_enc_grad: step("b_enc_grad", &[0, 16, 17]),
            b_dec_grad: step("b_dec_grad", &[0, 8, 17, 18, 19]),
            adam: compute_kernel(gpu, "adam", ADAM, "adam", &[(0, U), (1, W), (2, R), (3, W), (4, W)]),
            normalize_rows: compute_kernel(gpu, "normalize_rows", ADAM, "normalize_rows", &[(0, U), (5, W)]),
        };
        gpu.check()?;
        Ok(kernels)
    }

    /// The dispatch of `c = a b` (`c` row-major), named `name` in profiles; returns it with the uniform buffer it
    /// reads.
    fn product(&self, gpu: &Gpu, name: &str, a: Operand, b: Operand, c: &wgpu::Buffer) -> (Dispatch, wgpu::Buffer) {
        let (m, k, a_row, a_col) = a.view();
        let (k_b, n, b_row, b_col) = b.view();
        assert_eq!(k, k_b, "the inner dimensions of a product agree");
        let params = MatmulParams { m, n, k, pad: 0, a_row, a_col, b_row, b_col };
        let uniform = gpu.uniform_with("dense_matmul params", bytemuck::bytes_of(&params));
        let groups = (n.div_ceil(self.matmul_tile), m.div_ceil(self.matmul_tile));
        let mut dispatch = dispatch(gpu, &self.matmul, &[a.buffer, b.buffer, c, &uniform], groups);
        dispatch.name = format!("dense_matmul {name}");
        (dispatch, uniform)
    }
}

fn dispatch(gpu: &Gpu, kernel: &Kernel, buffers: &[&wgpu::Buffer], groups: (u32, u32)) -> Dispatch {
    Dispatch {
        name: kernel.name.clone(),
        pipeline: kernel.pipeline().clone(),
        bind_group: kernel.bind(gpu, buffers),
        groups,
    }
}

/// Workgroups of 256 threads covering `threads`, over x and y when there are many.
fn groups_for(threads: usize) -> (u32, u32) {
    split_groups((threads as u32).div_ceil(256))
}

/// Records `dispatches` in one compute pass.
fn record(encoder: &mut wgpu::CommandEncoder, dispatches: &[Dispatch]) {
    let mut pass =
        encoder.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some("sae step"), timestamp_writes: None });
    for d in dispatches {
        pass.set_pipeline(&d.pipeline);
        pass.set_bind_group(0, &d.bind_group, &[]);
        pass.dispatch_workgroups(d.groups.0, d.groups.1, 1);
    }
}

fn f32_bytes(values: &[f32]) -> &[u8] {
    bytemuck::cast_slice(values)
}

/// Appends copies of `sources` (each with its size in bytes) into `readback` to `encoder`'s work, submits it all at
/// once, and returns each source's bytes. `None` allocates a readback buffer for this call (the training step keeps
/// its own). Async, so that the kernel checks below also run in a browser, which reads GPU memory back only once
/// its event loop runs.
async fn submit_and_read(
    gpu: &Gpu,
    mut encoder: wgpu::CommandEncoder,
    readback: Option<&wgpu::Buffer>,
    sources: &[(&wgpu::Buffer, u64)],
) -> Result<Vec<Vec<u8>>, TrainError> {
    let total: u64 = sources.iter().map(|s| s.1).sum();
    let fresh;
    let readback = match readback {
        Some(buffer) => buffer,
        None => {
            fresh = gpu.readback("sae readback", total);
            &fresh
        }
    };
    let mut at = 0;
    for (buffer, bytes) in sources {
        encoder.copy_buffer_to_buffer(buffer, 0, readback, at, *bytes);
        at += bytes;
    }
    gpu.queue.submit([encoder.finish()]);
    let bytes = gpu.read(readback, total).await?;
    let mut out = Vec::new();
    let mut at = 0;
    for (_, size) in sources {
        out.push(bytes[at..at + *size as usize].to_vec());
        at += *size as usize;
    }
    Ok(out)
}

/// `submit_and_read` for the training step, which waits for the GPU on this thread (natively only: a browser
/// cannot block, and `GpuStepper::new` refuses there).
fn submit_and_wait(
    gpu: &Gpu,
    encoder: wgpu::CommandEncoder,
    readback: Option<&wgpu::Buffer>,
    sources: &[(&wgpu::Buffer, u64)],
) -> Result<Vec<Vec<u8>>, TrainError> {
    #[cfg(not(target_arch = "wasm32"))]
    return saif_engine::block_on(submit_and_read(gpu, encoder, readback, sources));
    #[cfg(target_arch = "wasm32")]
    {
        let _ = (gpu, encoder, readback, sources);
        Err(TrainError::Gpu("training on the GPU runs natively (saif train-sae), not in a browser".into()))
    }
}

/// `a b` on the GPU with the product kernel `form`, for checks against a CPU reference.
pub async fn dense_product(
    gpu: &Gpu,
    form: Matmul,
    a: (&[f32], usize, usize, bool),
    b: (&[f32], usize, usize, bool),
) -> Result<Vec<f32>, TrainError> {
    let kernels = TrainKernels::with_matmul(gpu, form)?;
    let (ab, bb) = (gpu.storage_with("a", f32_bytes(a.0)), gpu.storage_with("b", f32_bytes(b.0)));
    let mut a_op = Operand::new(&ab, a.1, a.2);
    let mut b_op = Operand::new(&bb, b.1, b.2);
    if a.3 {
        a_op = a_op.t();
    }
    if b.3 {
        b_op = b_op.t();
    }
    let (m, n) = (a_op.view().0 as usize, b_op.view().1 as usize);
    let c = gpu.storage("c", (m * n * 4) as u64);
    let (d, _uniform) = kernels.product(gpu, "", a_op, b_op, &c);
    let mut encoder = gpu.device.create_command_encoder(&Default::default());
    record(&mut encoder, &[d]);
    let bytes = submit_and_read(gpu, encoder, None, &[(&c, (m * n * 4) as u64)]).await?;
    Ok(bytemuck::cast_slice(&bytes[0]).to_vec())
}

/// The TopK selection of each row of `pre` (`rows x width`, after ReLU) and the AuxK selection among `dead`
/// latents, on the GPU: returns the `2 rows x width` latents (TopK rows, then AuxK rows) and the fired flags.
pub async fn top_k_rows(
    gpu: &Gpu,
    pre: &[f32],
    rows: usize,
    width: usize,
    k: usize,
    aux_k: usize,
    dead: &[bool],
) -> Result<(Vec<f32>, Vec<bool>), TrainError> {
    let kernels = TrainKernels::new(gpu)?;
    let pre_buffer = gpu.storage_with("pre", f32_bytes(pre));
    let dead: Vec<u32> = dead.iter().map(|&d| d as u32).collect();
    let dead_buffer = gpu.storage_with("dead", bytemuck::cast_slice(&dead));
    let lat = gpu.storage("lat", (2 * rows * width * 4) as u64);
    let fired = gpu.storage("fired", (width * 4) as u64);
    let params = TopKParams { rows: rows as u32, width: width as u32, k: k as u32, aux_k: aux_k as u32 };
    let uniform = gpu.uniform_with("top_k params", bytemuck::bytes_of(&params));
    let d =
        dispatch(gpu, &kernels.top_k, &[&pre_buffer, &dead_buffer, &lat, &fired, &uniform], split_groups(rows as u32));
    let mut encoder = gpu.device.create_command_encoder(&Default::default());
    record(&mut encoder, &[d]);
    let sources = [(&lat, (2 * rows * width * 4) as u64), (&fired, (width * 4) as u64)];
    let bytes = submit_and_read(gpu, encoder, None, &sources).await?;
    let fired: &[u32] = bytemuck::cast_slice(&bytes[1]);
    Ok((bytemuck::cast_slice(&bytes[0]).to_vec(), fired.iter().map(|&f| f != 0).collect()))
}

/// One Adam update of a parameter on the GPU (`adam.wgsl`'s `adam`), at step `t` (from 1) with rate `lr`: the
/// parameter and both moments after it. Its CPU twin is `cpu::adam_update`.
pub async fn adam_update(
    gpu: &Gpu,
    [param, grad, m, v]: [&[f32]; 4],
    t: usize,
    lr: f64,
) -> Result<[Vec<f32>; 3], TrainError> {
    let kernels = TrainKernels::new(gpu)?;
    let params = AdamParams::at_step(t, lr, 0, 0);
    let uniform = gpu.uniform_with("adam params", bytemuck::bytes_of(&params));
    let buffers = [param, grad, m, v].map(|values| gpu.storage_with("adam operand", f32_bytes(values)));
    let [p, g, mb, vb] = &buffers;
    let d = dispatch(gpu, &kernels.adam, &[&uniform, p, g, mb, vb], groups_for(param.len()));
    let mut encoder = gpu.device.create_command_encoder(&Default::default());
    record(&mut encoder, &[d]);
    let size = (param.len() * 4) as u64;
    let bytes = submit_and_read(gpu, encoder, None, &[(p, size), (mb, size), (vb, size)]).await?;
    Ok([0, 1, 2].map(|i| bytemuck::cast_slice(&bytes[i]).to_vec()))
}

/// `w` (`rows x cols`) with its rows divided by their norms on the GPU (`adam.wgsl`'s `normalize_rows`). Its CPU
/// twin is `cpu::normalize_rows`.
pub async fn normalized_rows(gpu: &Gpu, w: &[f32], rows: usize, cols: usize) -> Result<Vec<f32>, TrainError> {
    let kernels = TrainKernels::new(gpu)?;
    let params = AdamParams::at_step(1, 0.0, rows, cols);
    let uniform = gpu.uniform_with("normalize params", bytemuck::bytes_of(&params));
    let buffer = gpu.storage_with("w", f32_bytes(w));
    let d = dispatch(gpu, &kernels.normalize_rows, &[&uniform, &buffer], groups_for(rows));
    let mut encoder = gpu.device.create_command_encoder(&Default::default());
    record(&mut encoder, &[d]);
    let bytes = submit_and_read(gpu, encoder, None, &[(&buffer, (w.len() * 4) as u64)]).await?;
    Ok(bytemuck::cast_slice(&bytes[0]).to_vec())
}

pub(crate) struct GpuStepper<'g> {
    gpu: &'g Gpu,
    config: TrainConfig,
    d: usize,
    x: wgpu::Buffer,
    dead: wgpu::Buffer,
    fired: wgpu::Buffer,
    stats_err: wgpu::Buffer,
    stats_aux: wgpu::Buffer,
    /// Where each step's statistics and fired flags come back (one buffer for the whole run).
    step_readback: wgpu::Buffer,
    /// `w_enc, b_enc, w_dec, b_dec` (`NAMES` order), and Adam's moments of each.
    params: [wgpu::Buffer; 4],
    m: [wgpu::Buffer; 4],
    v: [wgpu::Buffer; 4],
    step_params: wgpu::Buffer,
    top_k_params: wgpu::Buffer,
    adam_params: wgpu::Buffer,
    /// The step's dispatches in order, and the uniform buffers of its products.
    dispatches: Vec<Dispatch>,
    _uniforms: Vec<wgpu::Buffer>,
}

impl<'g> GpuStepper<'g> {
    pub fn new(gpu: &'g Gpu, state: &State, d: usize, config: &TrainConfig) -> Result<Self, TrainError> {
        if cfg!(target_arch = "wasm32") {
            return Err(TrainError::Gpu("training on the GPU runs natively (saif train-sae), not in a browser".into()));
        }
        let (rows, width) = (config.batch, config.d_sae);
        let largest = (2 * rows * width).max(d * width) as u64 * 4;
        let limit = (gpu.limits.max_storage_buffer_binding_size as u64).min(gpu.limits.max_buffer_size);
        if largest > limit {
            return Err(TrainError::Gpu(format!(
                "a batch of {rows} with {width} latents needs {largest} bytes in one buffer, more than this GPU's \
                 {limit}: use a smaller --batch or --backend cpu"
            )));
        }
        let kernels = TrainKernels::new(gpu)?;
        let f32s = |label: &str, count: usize| gpu.storage(label, (count * 4) as u64);
        let load = |label: &str, values: &[f32]| gpu.storage_with(label, f32_bytes(values));
        let params = [0, 1, 2, 3].map(|i| load("sae param", &state.params[i]));
        let m = [0, 1, 2, 3].map(|i| load("adam m", &state.m[i]));
        let v = [0, 1, 2, 3].map(|i| load("adam v", &state.v[i]));
        let grads = [0, 1, 2, 3].map(|i| f32s("sae grad", state.params[i].len()));
        let [w_enc, b_enc, w_dec, b_dec] = &params;
        let (x, xc, err, aux_err) =
            (f32s("x", rows * d), f32s("xc", rows * d), f32s("err", rows * d), f32s("aux err", rows * d));
        let (pre, gpre) = (f32s("pre", rows * width), f32s("grad pre", rows * width));
        let (lat2, glat2) = (f32s("latents", 2 * rows * width), f32s("grad latents", 2 * rows * width));
        let (r2, g2) = (f32s("recon", 2 * rows * d), f32s("grad recon", 2 * rows * d));
        let cols = f32s("column stats", 2 * d);
        let (stats_err, stats_aux) = (f32s("stats err", 2), f32s("stats aux", 2));
        let dead = gpu.storage("dead", (width * 4) as u64);
        let fired = gpu.storage("fired", (width * 4) as u64);
        let step_params = gpu.uniform_with("sae step params", &[0; std::mem::size_of::<StepParams>()]);
        let top_k_params = gpu.uniform_with("top_k params", &[0; std::mem::size_of::<TopKParams>()]);
        let adam_params = gpu.uniform_with("adam params", &[0; std::mem::size_of::<AdamParams>()]);
        let sp = &step_params;

        let mut uniforms = Vec::new();
        let mut product = |name: &str, a: Operand, b: Operand, c: &wgpu::Buffer| {
            let (d, u) = kernels.product(gpu, name, a, b, c);
            uniforms.push(u);
            d
        };
        let on = |kernel: &Kernel, buffers: &[&wgpu::Buffer], threads: usize| {
            dispatch(gpu, kernel, buffers, groups_for(threads))
        };
        let k = &kernels;
        let (xd, rw) = (rows * d, rows * width);
        let mut dispatches = vec![
            on(&k.center, &[sp, &x, b_dec, &xc], xd),
            product("xc W_enc", Operand::new(&xc, rows, d), Operand::new(w_enc, d, width), &pre),
            on(&k.bias_relu, &[sp, &pre, b_enc], rw),
            dispatch(gpu, &k.top_k, &[&pre, &dead, &lat2, &fired, &top_k_params], split_groups(rows as u32)),
            product("lat W_dec", Operand::new(&lat2, 2 * rows, width), Operand::new(w_dec, width, d), &r2),
            on(&k.residual, &[sp, &x, b_dec, &r2, &err, &g2], xd),
            on(&k.column_stats, &[sp, &err, &cols], d),
            dispatch(gpu, &k.total_stats, &[sp, &cols, &stats_err], (1, 1)),
            on(&k.aux_residual, &[sp, &r2, &err, &g2, &stats_err, &aux_err], xd),
            on(&k.column_stats, &[sp, &aux_err, &cols], d),
            dispatch(gpu, &k.total_stats, &[sp, &cols, &stats_aux], (1, 1)),
            product("G W_dec^T", Operand::new(&g2, 2 * rows, d), Operand::new(w_dec, width, d).t(), &glat2),
            on(&k.pre_grad, &[sp, &glat2, &lat2, &gpre], rw),
            product("lat^T G", Operand::new(&lat2, 2 * rows, width).t(), Operand::new(&g2, 2 * rows, d), &grads[2]),
            product("xc^T Gpre", Operand::new(&xc, rows, d).t(), Operand::new(&gpre, rows, width), &grads[0]),
            on(&k.b_enc_grad, &[sp, &gpre, &grads[1]], width),
            on(&k.b_dec_grad, &[sp, &g2, &grads[1], w_enc, &grads[3]], d),
        ];
        for i in 0..4 {
            let buffers = [&adam_params, &params[i], &grads[i], &m[i], &v[i]];
            dispatches.push(on(&k.adam, &buffers, state.params[i].len()));
        }
        dispatches.push(on(&k.normalize_rows, &[&adam_params, w_dec], width));
        gpu.check()?;
        Ok(Self {
            gpu,
            config: config.clone(),
            d,
            x,
            dead,
            fired,
            stats_err,
            stats_aux,
            step_readback: gpu.readback("sae step readback", 16 + (width * 4) as u64),
            params,
            m,
            v,
            step_params,
            top_k_params,
            adam_params,
            dispatches,
            _uniforms: uniforms,
        })
    }
}

impl GpuStepper<'_> {
    /// Uploads a step's batch, dead flags and parameters; returns the batch's variance and whether AuxK is on.
    fn upload(&mut self, batch: &Batch) -> (f64, bool) {
        let (gpu, config, d) = (self.gpu, &self.config, self.d);
        let (rows, width) = (batch.rows, config.d_sae);
        assert_eq!(rows, config.batch, "every batch is full");
        // The batch's variance (summed over columns), which the FVU divides by.
        let mut variance = 0.0;
        for j in 0..d {
            let column = batch.x.iter().skip(j).step_by(d);
            let mean = column.clone().map(|&v| v as f64).sum::<f64>() / rows as f64;
            variance += column.map(|&v| (v as f64 - mean).powi(2)).sum::<f64>();
        }
        let aux_on = batch.n_dead > 0 && config.aux_weight > 0.0;
        let aux_k = if aux_on { config.aux_k.min(batch.n_dead) } else { 0 };
        let queue = &gpu.queue;
        queue.write_buffer(&self.x, 0, f32_bytes(batch.x));
        let dead: Vec<u32> = batch.dead.iter().map(|&d| d as u32).collect();
        queue.write_buffer(&self.dead, 0, bytemuck::cast_slice(&dead));
        let step = StepParams {
            rows: rows as u32,
            d: d as u32,
            width: width as u32,
            aux_on: aux_on as u32,
            inv_var: (1.0 / variance) as f32,
            aux_weight: config.aux_weight as f32,
            pad: [0; 2],
        };
        queue.write_buffer(&self.step_params, 0, bytemuck::bytes_of(&step));
        let top_k = TopKParams { rows: rows as u32, width: width as u32, k: config.k as u32, aux_k: aux_k as u32 };
        queue.write_buffer(&self.top_k_params, 0, bytemuck::bytes_of(&top_k));
        let adam = AdamParams::at_step(batch.t, config.lr, width, d);
        queue.write_buffer(&self.adam_params, 0, bytemuck::bytes_of(&adam));
        (variance, aux_on)
    }

    /// Milliseconds per kernel of one step, each dispatch submitted and waited for alone (for `saif bench-train
    /// --profile`; the step itself is left half done, so the stepper is not used for training afterwards).
    pub(crate) fn profile(&mut self, batch: &Batch) -> Result<Vec<(String, f64)>, TrainError> {
        self.upload(batch);
        let gpu = self.gpu;
        let wait = || gpu.device.poll(wgpu::PollType::wait_indefinitely()).map_err(|e| TrainError::Gpu(e.to_string()));
        let mut totals: Vec<(String, f64)> = Vec::new();
        for d in &self.dispatches {
            wait()?;
            let start = std::time::Instant::now();
            let mut encoder = gpu.device.create_command_encoder(&Default::default());
            record(&mut encoder, std::slice::from_ref(d));
            gpu.queue.submit([encoder.finish()]);
            wait()?;
            let ms = start.elapsed().as_secs_f64() * 1000.0;
            match totals.iter_mut().find(|t| t.0 == d.name) {
                Some(t) => t.1 += ms,
                None => totals.push((d.name.clone(), ms)),
            }
        }
        gpu.check()?;
        totals.sort_by(|a, b| b.1.total_cmp(&a.1));
        Ok(totals)
    }
}

impl Stepper for GpuStepper<'_> {
    fn step(&mut self, batch: &Batch) -> Result<StepOutcome, TrainError> {
        let (variance, aux_on) = self.upload(batch);
        let (gpu, width) = (self.gpu, self.config.d_sae);
        let mut encoder = gpu.device.create_command_encoder(&Default::default());
        encoder.clear_buffer(&self.fired, 0, None);
        record(&mut encoder, &self.dispatches);
        let sources = [(&self.stats_err, 8), (&self.stats_aux, 8), (&self.fired, (width * 4) as u64)];
        let out = submit_and_wait(gpu, encoder, Some(&self.step_readback), &sources)?;
        let (err, aux): (&[f32], &[f32]) = (bytemuck::cast_slice(&out[0]), bytemuck::cast_slice(&out[1]));
        let fired: &[u32] = bytemuck::cast_slice(&out[2]);
        Ok(StepOutcome {
            fvu: err[0] as f64 / variance,
            aux_loss: if aux_on { aux[0] as f64 / err[1] as f64 } else { 0.0 },
            fired: fired.iter().map(|&f| f != 0).collect(),
        })
    }

    fn state(&mut self) -> Result<State, TrainError> {
        let refs: Vec<(&wgpu::Buffer, u64)> =
            self.params.iter().chain(&self.m).chain(&self.v).map(|b| (b, b.size())).collect();
        let encoder = self.gpu.device.create_command_encoder(&Default::default());
        let bytes = submit_and_wait(self.gpu, encoder, None, &refs)?;
        let lengths = [self.d * self.config.d_sae, self.config.d_sae, self.config.d_sae * self.d, self.d];
        let mut vectors =
            bytes.iter().enumerate().map(|(i, b)| bytemuck::cast_slice::<u8, f32>(b)[..lengths[i % 4]].to_vec());
        let mut four = || [(); 4].map(|_| vectors.next().expect("twelve buffers"));
        Ok(State { params: four(), m: four(), v: four() })
    }
}
