//! The WGSL kernels (one family per `.wgsl` file in `kernels/`), compiled into pipelines with explicit bind group
//! layouts, and the uniform parameter blocks they read (`#[repr(C)]` twins of the WGSL structs).

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use bytemuck::{Pod, Zeroable};
use candle_core::quantized::GgmlDType;

use super::context::Gpu;
use crate::error::{EngineError, Result};

const COMMON: &str = include_str!("kernels/common.wgsl");
const QUANT: &str = include_str!("kernels/quant.wgsl");
const MATMUL: &str = include_str!("kernels/matmul.wgsl");
const MATMUL_INPUT: &str = include_str!("kernels/matmul_input.wgsl");
const MATMUL_INPUT_NORM: &str = include_str!("kernels/matmul_input_norm.wgsl");
const MATMUL_INPUT_ADD_NORM: &str = include_str!("kernels/matmul_input_add_norm.wgsl");
const MATMUL_INPUT_EMBED_NORM: &str = include_str!("kernels/matmul_input_embed_norm.wgsl");
const MATMUL_INPUT_NORMALIZE: &str = include_str!("kernels/matmul_input_normalize.wgsl");
const MATMUL_LARGEST: &str = include_str!("kernels/matmul_largest.wgsl");
const MATMUL_LANES: &str = include_str!("kernels/matmul_lanes.wgsl");
const MATMUL_LANES_SUBGROUP: &str = include_str!("kernels/matmul_lanes_subgroup.wgsl");
const EMBED: &str = include_str!("kernels/embed.wgsl");
const RMSNORM: &str = include_str!("kernels/rmsnorm.wgsl");
const ATTENTION: &str = include_str!("kernels/attention.wgsl");
const KV_CACHE_F32: &str = include_str!("kernels/kv_cache_f32.wgsl");
const KV_CACHE_F16: &str = include_str!("kernels/kv_cache_f16.wgsl");
const KV_CACHE_F16_PACKED: &str = include_str!("kernels/kv_cache_f16_packed.wgsl");
const ELEMENTWISE: &str = include_str!("kernels/elementwise.wgsl");
const SELECT: &str = include_str!("kernels/select.wgsl");
const PROJECT: &str = include_str!("kernels/project.wgsl");

/// Tokens per workgroup of the matrix product when a call has many (prompts); decoding uses 1.
pub const PREFILL_TILE: u32 = 8;

/// How a kernel sees one binding.
#[derive(Clone, Copy)]
pub enum Slot {
    Read,
    Write,
    Uniform,
}

/// A compute pipeline with the layout its bind groups are made for.
pub struct Kernel {
    pub name: String,
    pipeline: wgpu::ComputePipeline,
    layout: wgpu::BindGroupLayout,
    bindings: Vec<u32>,
}

impl Kernel {
    /// A bind group with `buffers` at the kernel's bindings, in order.
    pub fn bind(&self, gpu: &Gpu, buffers: &[&wgpu::Buffer]) -> wgpu::BindGroup {
        assert_eq!(buffers.len(), self.bindings.len(), "kernel {} takes {} buffers", self.name, self.bindings.len());
        let entries: Vec<wgpu::BindGroupEntry> = self
            .bindings
            .iter()
            .zip(buffers)
            .map(|(&binding, buffer)| wgpu::BindGroupEntry { binding, resource: buffer.as_entire_binding() })
            .collect();
        gpu.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(&self.name),
            layout: &self.layout,
            entries: &entries,
        })
    }

    pub fn pipeline(&self) -> &wgpu::ComputePipeline {
        &self.pipeline
    }
}

fn build(gpu: &Gpu, name: &str, source: &str, entry: &str, slots: &[(u32, Slot)], constants: &[(&str, f64)]) -> Kernel {
    let layout = bind_group_layout(gpu, name, slots);
    build_with_layout(gpu, name, source, entry, layout, slots, constants)
}

/// A pipeline for entry point `entry` of a WGSL `source` that uses the bindings `slots` (binding number, access),
/// for kernels that live outside this crate (the SAE trainer's).
pub fn compute_kernel(gpu: &Gpu, name: &str, source: &str, entry: &str, slots: &[(u32, Slot)]) -> Kernel {
    build(gpu, name, source, entry, slots, &[])
}

fn bind_group_layout(gpu: &Gpu, name: &str, slots: &[(u32, Slot)]) -> wgpu::BindGroupLayout {
    let entries: Vec<wgpu::BindGroupLayoutEntry> = slots
        .iter()
        .map(|&(binding, slot)| wgpu::BindGroupLayoutEntry {
            binding,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: match slot {
                Slot::Read => wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Storage { read_only: true },
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
                Slot::Write => wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Storage { read_only: false },
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
                Slot::Uniform => wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Uniform,
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
            },
            count: None,
        })
        .collect();
    gpu.device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor { label: Some(name), entries: &entries })
}

/// A pipeline for an existing layout, so that variants of one kernel (tile sizes) share bind groups.
fn build_with_layout(
    gpu: &Gpu,
    name: &str,
    source: &str,
    entry: &str,
    layout: wgpu::BindGroupLayout,
    slots: &[(u32, Slot)],
    constants: &[(&str, f64)],
) -> Kernel {
    // WGSL wants its `enable` directives before any declaration, so they go above common.wgsl.
    let (enables, body): (Vec<&str>, Vec<&str>) = source.lines().partition(|l| l.starts_with("enable "));
    let (enables, body) = (enables.join("\n"), body.join("\n"));
    let module = gpu.device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some(name),
        source: wgpu::ShaderSource::Wgsl(format!("{enables}\n{COMMON}\n{body}").into()),
    });
    let pipeline_layout = gpu.device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
        label: Some(name),
        bind_group_layouts: &[&layout],
        push_constant_ranges: &[],
    });
    let pipeline = gpu.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some(name),
        layout: Some(&pipeline_layout),
        module: &module,
        entry_point: Some(entry),
        compilation_options: wgpu::PipelineCompilationOptions { constants, ..Default::default() },
        cache: None,
    });
    Kernel { name: name.to_string(), pipeline, layout, bindings: slots.iter().map(|s| s.0).collect() }
}

/// The suffix of a GGUF type's functions in quant.wgsl.
fn type_suffix(dtype: GgmlDType) -> Result<&'static str> {
    Ok(match dtype {
        GgmlDType::F32 => "f32",
        GgmlDType::F16 => "f16",
        GgmlDType::BF16 => "bf16",
        GgmlDType::Q4_0 => "q4_0",
        GgmlDType::Q4_1 => "q4_1",
        GgmlDType::Q5_0 => "q5_0",
        GgmlDType::Q8_0 => "q8_0",
        GgmlDType::Q4K => "q4_k",
        GgmlDType::Q6K => "q6_k",
        other => return Err(EngineError::Gpu(format!("no GPU decoder for {other:?}"))),
    })
}

/// `source` after quant.wgsl, with `decode_chunk`, `dot_decoded` and `value_at` bound to `dtype`'s functions.
fn with_decoder(source: &str, dtype: GgmlDType) -> Result<String> {
    let t = type_suffix(dtype)?;
    // quant.wgsl's dot products read `X4`; a kernel that only decodes values (the embedding) gets a private
    // stand-in so the module compiles.
    let stand_in = if source.contains(" X4: ") { "" } else { "var<private> X4: array<vec4<f32>, 8>;" };
    Ok(format!(
        "{QUANT}\n{source}\n{stand_in}\n\
         fn decode_chunk(row: u32, c: u32) -> Chunk {{ return decode_{t}(row, c); }}\n\
         fn dot_decoded(w: Chunk, x: u32) -> f32 {{ return dot_decoded_{t}(w, x); }}\n\
         fn value_at(row: u32, i: u32) -> f32 {{ return value_{t}(row, i); }}\n"
    ))
}

/// quant.wgsl's decoders reading an embedding table `E` instead of the weights `W`, every function renamed with a
/// `table_` prefix, and `table_value` bound to `dtype`'s values: for a product that looks its input up in a table
/// of another type than its weights (matmul_input_embed_norm.wgsl).
fn table_decoder(dtype: GgmlDType) -> Result<String> {
    let t = type_suffix(dtype)?;
    let names = QUANT.lines().filter_map(|line| line.strip_prefix("fn ")?.split('(').next());
    let mut source = QUANT.replace("W[", "E[").replace("Chunk", "TableChunk");
    for name in names {
        source = renamed_calls(&source, name, &format!("table_{name}"));
    }
    Ok(format!("{source}\nfn table_value(row: u32, i: u32) -> f32 {{ return table_value_{t}(row, i); }}\n"))
}

/// `source` with every `name(` that is not the tail of a longer identifier written `new(`.
fn renamed_calls(source: &str, name: &str, new: &str) -> String {
    let pattern = format!("{name}(");
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(at) = rest.find(&pattern) {
        let tail_of_longer = rest[..at].chars().next_back().is_some_and(|c| c.is_alphanumeric() || c == '_');
        out.push_str(&rest[..at]);
        out.push_str(if tail_of_longer { name } else { new });
        out.push('(');
        rest = &rest[at + pattern.len()..];
    }
    out.push_str(rest);
    out
}

use Slot::{Read as R, Uniform as U, Write as W};

/// What a matrix product does with each finished sum (matmul.wgsl's EPILOGUE), so that the step after it needs
/// no dispatch of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Epilogue {
    /// Y = W x.
    Store,
    /// Y += W x: a residual add.
    Accumulate,
    /// Y = act(W_gate x) * (W_up x), with W holding the gate's rows and then the up product's rows.
    Glu(GluActivation),
    /// Y = W x, and each workgroup's largest sum with its row (matmul_largest.wgsl): an LM head picking greedily.
    StoreKeepingLargest,
}

/// The gate's activation in a gated MLP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GluActivation {
    /// Gemma's GeGLU (the tanh form of GELU).
    Gelu,
    /// Llama's SwiGLU.
    Silu,
}

impl Epilogue {
    /// The shader's EPILOGUE constant.
    fn constant(self) -> f64 {
        match self {
            Self::Store | Self::StoreKeepingLargest => 0.0,
            Self::Accumulate => 1.0,
            Self::Glu(GluActivation::Gelu) => 2.0,
            Self::Glu(GluActivation::Silu) => 3.0,
        }
    }

    /// The bindings of the product's kernel: `slots` (the weights, the input, the output, what the input reads),
    /// then, for `StoreKeepingLargest`, the largest sums' slots, then the parameters and the step block.
    fn slots(self, slots: &[(u32, Slot)]) -> Vec<(u32, Slot)> {
        let mut all = slots.to_vec();
        if self == Self::StoreKeepingLargest {
            all.push((9, W));
        }
        all.extend([(3, U), (4, U)]);
        all
    }

    /// Rows of W per output row.
    pub fn weight_rows_per_output(self) -> usize {
        match self {
            Self::Glu(_) => 2,
            _ => 1,
        }
    }
}

/// What a normalizing product takes before its norm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NormalizedInput {
    /// Its input rows as they are (matmul_input_norm.wgsl).
    Norm,
    /// Its input rows plus another output, normalized by its own norm, as Gemma's post-norms add into the
    /// residual stream (matmul_input_add_norm.wgsl).
    AddNorm,
    /// The rows of an embedding table of this type that the call's tokens pick (matmul_input_embed_norm.wgsl).
    EmbedNorm(GgmlDType),
}

/// A normalizing product's weight type, epilogue, row width and input.
type NormalizedKey = (GgmlDType, Epilogue, usize, NormalizedInput);

/// The widest input row a product can normalize itself (matmul_input_norm.wgsl's workgroup array).
pub const MAX_NORMALIZED_COLS: usize = 2304;

/// One matrix product's two pipelines, sharing a bind group layout: one token per workgroup (decoding) and
/// PREFILL_TILE tokens per workgroup (prompts).
pub struct MatmulKernels {
    one: Kernel,
    tiled: Kernel,
}

impl MatmulKernels {
    pub fn pick(&self, tiled: bool) -> &Kernel {
        if tiled {
            &self.tiled
        } else {
            &self.one
        }
    }
}

/// Every pipeline the model needs, built once per device. The matrix products, one pair per weight type and
/// epilogue, are built on first use, so that a model only compiles the variants it dispatches.
pub struct Kernels {
    matmul: RefCell<HashMap<(GgmlDType, Epilogue), Rc<MatmulKernels>>>,
    normalized_matmul: RefCell<HashMap<NormalizedKey, Rc<Kernel>>>,
    /// How the products share a row among threads on this device, and how many threads do.
    form: MatmulForm,
    lanes: u32,
    /// How the attention kernels hold the KV cache.
    pub cache: CacheForm,
    embed: HashMap<GgmlDType, Kernel>,
    pub norm: Kernel,
    pub norm_add: Kernel,
    pub norm_add_norm: Kernel,
    pub prepare_heads: Kernel,
    pub attention: Kernel,
    /// prepare_heads and attention in one dispatch, for one-token steps.
    pub attend_step: Kernel,
    pub glu_gelu: Kernel,
    pub glu_silu: Kernel,
    pub add: Kernel,
    pub add_vector: Kernel,
    pub softcap: Kernel,
    pub select: Kernel,
    pub set_projection: Kernel,
}

impl Kernels {
    /// Builds the pipelines for an f32 KV cache; `types` are the weight types the embedding lookup may read.
    pub fn new(gpu: &Gpu, types: &[GgmlDType]) -> Result<Self> {
        Self::with_cache(gpu, types, CacheForm::F32)
    }

    /// Builds the pipelines, with attention over a KV cache of form `cache`.
    pub fn with_cache(gpu: &Gpu, types: &[GgmlDType], cache: CacheForm) -> Result<Self> {
        if cache == CacheForm::F16 && !gpu.shader_f16 {
            return Err(EngineError::Gpu(format!("{} cannot hold f16 values in shaders", gpu.describe())));
        }
        let mut embed = HashMap::new();
        for &t in types {
            if embed.contains_key(&t) {
                continue;
            }
            let source = with_decoder(EMBED, t)?;
            let slots = [(0, R), (1, R), (2, W), (3, U), (4, U)];
            embed.insert(t, build(gpu, &format!("embed {t:?}"), &source, "main", &slots, &[]));
        }
        let norm_slots = [(0, R), (1, W), (2, R), (3, U), (4, U)];
        // Buffers first, then the parameters, as every other kernel binds them.
        let norm_twice_slots = [(0, R), (1, W), (2, R), (5, W), (6, R), (3, U), (4, U)];
        // attention.wgsl's bindings: q|k|v 0, Q 1, the caches 2 and 3, q/k norms 4, cos 5, sin 6, HeadsParams 7,
        // Step 8, the output 9, AttentionParams 10, the call's token rows 11.
        let heads_slots = [(0, R), (1, W), (2, W), (3, W), (4, R), (5, R), (6, R), (11, R), (7, U), (8, U)];
        let attention_slots = [(1, W), (2, W), (3, W), (9, W), (11, R), (10, U), (8, U)];
        let step_slots = [(0, R), (2, W), (3, W), (9, W), (4, R), (5, R), (6, R), (11, R), (7, U), (10, U), (8, U)];
        let ew = [(0, R), (1, W), (2, U), (3, U)];
        let attention = format!("{}\n{ATTENTION}", cache.source());
        let kernels = Self {
            norm: build(gpu, "norm", RMSNORM, "norm", &norm_slots, &[]),
            norm_add: build(gpu, "norm_add", RMSNORM, "norm_add", &norm_slots, &[]),
            norm_add_norm: build(gpu, "norm_add_norm", RMSNORM, "norm_add_norm", &norm_twice_slots, &[]),
            prepare_heads: build(gpu, "prepare_heads", &attention, "prepare_heads", &heads_slots, &[]),
            attention: build(gpu, "attention", &attention, "attend", &attention_slots, &[]),
            attend_step: build(gpu, "attend_step", &attention, "attend_step", &step_slots, &[]),
            glu_gelu: build(gpu, "glu_gelu", ELEMENTWISE, "glu_gelu", &ew, &[]),
            glu_silu: build(gpu, "glu_silu", ELEMENTWISE, "glu_silu", &ew, &[]),
            add: build(gpu, "add", ELEMENTWISE, "add", &ew, &[]),
            add_vector: build(gpu, "add_vector", ELEMENTWISE, "add_vector", &ew, &[]),
            softcap: build(gpu, "softcap", ELEMENTWISE, "softcap", &ew[1..], &[]),
            select: build(gpu, "select", SELECT, "main", &[(0, R), (1, W), (2, U)], &[]),
            set_projection: build(gpu, "set_projection", PROJECT, "set_projection", &ew, &[]),
            matmul: RefCell::new(HashMap::new()),
            normalized_matmul: RefCell::new(HashMap::new()),
            form: gpu.matmul_form,
            lanes: matmul_lanes(gpu),
            cache,
            embed,
        };
        gpu.check()?;
        Ok(kernels)
    }

    /// The matrix product of `dtype` weights with `epilogue`, built on first use.
    pub fn matmul(&self, gpu: &Gpu, dtype: GgmlDType, epilogue: Epilogue) -> Result<Rc<MatmulKernels>> {
        if let Some(built) = self.matmul.borrow().get(&(dtype, epilogue)) {
            return Ok(built.clone());
        }
        let source = self.matmul_source(dtype, MATMUL_INPUT, epilogue)?;
        let slots = epilogue.slots(&[(0, R), (1, R), (2, W)]);
        let name = matmul_name(dtype, epilogue, "");
        let one = build(gpu, &name, &source, "main", &slots, &self.matmul_constants(1, epilogue));
        let tiles = self.matmul_constants(PREFILL_TILE, epilogue);
        let name = format!("{name} x{PREFILL_TILE}");
        let tiled = build_with_layout(gpu, &name, &source, "main", one.layout.clone(), &slots, &tiles);
        gpu.check()?;
        let built = Rc::new(MatmulKernels { one, tiled });
        self.matmul.borrow_mut().insert((dtype, epilogue), built.clone());
        Ok(built)
    }

    /// The matrix product of the RMSNorm of its `cols`-wide input (at most MAX_NORMALIZED_COLS), one token per
    /// workgroup (decoding), built on first use. It binds the norm's weights after the output (then, for
    /// `NormalizedInput::AddNorm`, the output to add, its norm's weights and where the sum goes), and reads the
    /// norm's epsilon from `MatmulParams::eps`. `NormalizedInput::EmbedNorm` binds no input rows: the weights,
    /// the output, the norm's weights, the embedding table, the token ids and where h goes.
    pub fn normalized_matmul(
        &self,
        gpu: &Gpu,
        dtype: GgmlDType,
        epilogue: Epilogue,
        cols: usize,
        input: NormalizedInput,
    ) -> Result<Rc<Kernel>> {
        if cols > MAX_NORMALIZED_COLS || !cols.is_multiple_of(32) {
            return Err(EngineError::Gpu(format!("a product cannot normalize rows of {cols} values")));
        }
        let key = (dtype, epilogue, cols, input);
        if let Some(built) = self.normalized_matmul.borrow().get(&key) {
            return Ok(built.clone());
        }
        let snippet = match input {
            NormalizedInput::Norm => MATMUL_INPUT_NORM.to_string(),
            NormalizedInput::AddNorm => format!("{MATMUL_INPUT_ADD_NORM}\n{MATMUL_INPUT_NORMALIZE}"),
            NormalizedInput::EmbedNorm(table) => {
                format!("{MATMUL_INPUT_EMBED_NORM}\n{MATMUL_INPUT_NORMALIZE}\n{}", table_decoder(table)?)
            }
        };
        let prefix = match input {
            NormalizedInput::Norm => "norm + ",
            NormalizedInput::AddNorm => "add, norm + ",
            NormalizedInput::EmbedNorm(_) => "embed, norm + ",
        };
        let source = self.matmul_source(dtype, &snippet, epilogue)?;
        let slots = epilogue.slots(match input {
            NormalizedInput::Norm => &[(0, R), (1, R), (2, W), (5, R)],
            NormalizedInput::AddNorm => &[(0, R), (1, R), (2, W), (5, R), (6, R), (7, R), (8, W)],
            NormalizedInput::EmbedNorm(_) => &[(0, R), (2, W), (5, R), (6, R), (7, R), (8, W)],
        });
        let name = matmul_name(dtype, epilogue, prefix);
        let [tile, lanes, e] = self.matmul_constants(1, epilogue);
        let constants = [tile, lanes, e, ("INPUT_VEC4S", (cols / 4) as f64)];
        let built = Rc::new(build(gpu, &name, &source, "main", &slots, &constants));
        gpu.check()?;
        self.normalized_matmul.borrow_mut().insert(key, built.clone());
        Ok(built)
    }

    /// matmul.wgsl with the decoder of `dtype`, the activations' snippet `input`, this device's lane sums and
    /// what each workgroup finishes with for `epilogue`.
    fn matmul_source(&self, dtype: GgmlDType, input: &str, epilogue: Epilogue) -> Result<String> {
        // Natively only: wgpu 27's WebGPU backend does not pass the browser's subgroups feature through, so a page's
        // device never has them.
        let lanes_sum = if self.form == MatmulForm::Subgroup { MATMUL_LANES_SUBGROUP } else { MATMUL_LANES };
        // Every product but a greedy LM head finishes with nothing.
        let finish = match epilogue {
            Epilogue::StoreKeepingLargest => MATMUL_LARGEST,
            _ => "fn finish_group(group: u32, li: u32, holds_row: bool, value: f32, r: u32) {}",
        };
        with_decoder(&format!("{MATMUL}\n{input}\n{lanes_sum}\n{finish}"), dtype)
    }

    fn matmul_constants(&self, tile: u32, epilogue: Epilogue) -> [(&'static str, f64); 3] {
        [("TILE", tile as f64), ("LANES", self.lanes as f64), ("EPILOGUE", epilogue.constant())]
    }

    pub fn embed(&self, dtype: GgmlDType) -> &Kernel {
        &self.embed[&dtype]
    }
}

/// A product's name in profiles: "matmul Q4_1", "norm + matmul Q8_0 Glu(Silu)".
fn matmul_name(dtype: GgmlDType, epilogue: Epilogue, prefix: &str) -> String {
    match epilogue {
        Epilogue::Store => format!("{prefix}matmul {dtype:?}"),
        other => format!("{prefix}matmul {dtype:?} {other:?}"),
    }
}

/// How the matrix products (kernels/matmul.wgsl) share the work of one output row among threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatmulForm {
    /// One thread per row, no exchange through workgroup memory: for adapters that are CPU programs (lavapipe,
    /// SwiftShader), where it measured several times faster.
    PerRow,
    /// 16 threads per row, each reading every 16th chunk (coalesced reads, more threads in flight), their partial
    /// sums added through workgroup memory: for real GPUs.
    Cooperative,
    /// The cooperative form with the partial sums added by subgroup shuffles instead, for devices with subgroups;
    /// as many threads per row as the smallest subgroup holds, at most 16.
    Subgroup,
}

impl MatmulForm {
    /// `per-row`, `cooperative` or `subgroup`.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "per-row" => Ok(Self::PerRow),
            "cooperative" => Ok(Self::Cooperative),
            "subgroup" => Ok(Self::Subgroup),
            _ => Err(EngineError::InvalidRequest(format!(
                "unknown matrix-product form {name:?}: use per-row, cooperative or subgroup"
            ))),
        }
    }
}

/// How the KV cache holds its keys and values on the device: the file of kernels/kv_cache_*.wgsl that attention.wgsl
/// is built with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheForm {
    /// f32, the default, whose numbers the golden tests hold.
    F32,
    /// f16 (`LoadOptions::f16_cache`) on a device with `shader-f16`: half the memory and half the bytes attention
    /// reads, each value rounded once on its way in.
    F16,
    /// f16 packed two to a u32 word, for devices without `shader-f16`: the same bytes and values as `F16`.
    PackedF16,
}

impl CacheForm {
    /// The form a model loaded with (`f16`) or without an f16 cache gets on `gpu`.
    pub fn on(gpu: &Gpu, f16: bool) -> Self {
        match (f16, gpu.shader_f16) {
            (false, _) => Self::F32,
            (true, true) => Self::F16,
            (true, false) => Self::PackedF16,
        }
    }

    pub fn bytes_per_value(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::PackedF16 => 2,
        }
    }

    fn source(self) -> &'static str {
        match self {
            Self::F32 => KV_CACHE_F32,
            Self::F16 => KV_CACHE_F16,
            Self::PackedF16 => KV_CACHE_F16_PACKED,
        }
    }
}

/// Threads sharing one row of a matrix product on `gpu` (the shader's LANES).
pub fn matmul_lanes(gpu: &Gpu) -> u32 {
    match gpu.matmul_form {
        MatmulForm::PerRow => 1,
        MatmulForm::Cooperative => 16,
        MatmulForm::Subgroup => gpu.subgroup_size.unwrap_or(16).min(16),
    }
}

/// Output rows one workgroup of the matrix product covers.
pub fn matmul_rows_per_group(gpu: &Gpu) -> u32 {
    64 / matmul_lanes(gpu)
}

/// Where one token of a call stands (attention.wgsl's `TokenRow`): its position, and the KV cache row that holds its
/// sequence's position 0.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Debug, Default, PartialEq)]
pub struct TokenRow {
    pub first: u32,
    pub position: u32,
}

impl TokenRow {
    /// The rows of `tokens` consecutive tokens of the sequence whose cache starts at row `first`, from `start`.
    pub fn of_call(first: u32, start: u32, tokens: u32) -> Vec<Self> {
        (0..tokens).map(|t| Self { first, position: start + t }).collect()
    }
}

/// The per-call uniform every kernel reads: tokens in the call and the position of the first.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Debug, Default)]
pub struct StepParams {
    pub tokens: u32,
    pub start: u32,
    pub pad: [u32; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Debug, Default)]
pub struct MatmulParams {
    pub rows: u32,
    pub cols: u32,
    pub row_bytes: u32,
    pub out_stride: u32,
    pub out_col: u32,
    pub at_position: u32,
    pub last_only: u32,
    pub groups_x: u32,
    /// The input norm's epsilon, for `Kernels::normalized_matmul`.
    pub eps: f32,
    /// `NormalizedInput::AddNorm` only: 1 to add the post-normalized output first.
    pub add: u32,
    /// `NormalizedInput::AddNorm` and `EmbedNorm` only: 1 for the product whose row group 0 writes h.
    pub write_sum: u32,
    /// `NormalizedInput::EmbedNorm` only: the embedding table's bytes per row and scale.
    pub table_row_bytes: u32,
    pub table_scale: f32,
    /// `Epilogue::StoreKeepingLargest` only: the slot of this buffer's first row group.
    pub first_group: u32,
    pub pad: [u32; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Debug, Default)]
pub struct EmbedParams {
    pub rows: u32,
    pub first_row: u32,
    pub cols: u32,
    pub row_bytes: u32,
    pub scale: f32,
    pub pad: [u32; 3],
}

/// Twin of rmsnorm.wgsl's `Params`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Debug, Default)]
pub struct NormParams {
    pub width: u32,
    pub last_only: u32,
    pub eps: f32,
    pub pad: u32,
}

/// Twin of attention.wgsl's `HeadsParams`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Debug, Default)]
pub struct HeadsParams {
    pub heads: u32,
    pub kv_heads: u32,
    pub head_dim: u32,
    pub interleaved: u32,
    pub qk_norm: u32,
    pub eps: f32,
    pub pad: [u32; 2],
}

/// Twin of attention.wgsl's `AttentionParams`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Debug, Default)]
pub struct AttentionParams {
    pub heads: u32,
    pub kv_heads: u32,
    pub head_dim: u32,
    pub window: u32,
    pub scale: f32,
    pub softcap: f32,
    pub pad: [u32; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Debug, Default)]
pub struct ElementwiseParams {
    pub width: u32,
    pub rows: u32,
    pub cap: f32,
    pub pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Debug, Default)]
pub struct ProjectParams {
    pub width: u32,
    pub value: f32,
    pub pad: [u32; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Debug, Default)]
pub struct SelectParams {
    pub vocab: u32,
    pub random: u32,
    pub top_k: u32,
    pub top_p: f32,
    pub temperature: f32,
    pub seed_lo: u32,
    pub seed_hi: u32,
    pub step: u32,
}

/// Workgroup counts for `groups` workgroups along one dimension, split over x and y when there are more than a
/// dispatch dimension holds (65,535). Returns (x, y); kernels recover the index as x + y * x_count.
pub fn split_groups(groups: u32) -> (u32, u32) {
    const MAX: u32 = 65_535;
    if groups <= MAX {
        (groups.max(1), 1)
    } else {
        (MAX, groups.div_ceil(MAX))
    }
}
