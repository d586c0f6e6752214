//! The GPU device: adapter, device with the adapter's real limits, buffers, readback, and device loss.
//!
//! Limits: WebGPU's defaults cap a storage binding at 128 MiB, below the 178 MB embedding table of Gemma 3 270M;
//! the device is asked for whatever the adapter offers, and larger matrices are split (`weights`). No optional
//! feature is required (`shader-f16` is absent on SwiftShader and on Linux Chrome with NVIDIA): f16 values are
//! unpacked from u32 words in the shaders. `shader-f16` and subgroups are asked for where the adapter offers them,
//! and used by the f16 KV cache and the matrix products' lane sums.

use std::sync::{Arc, Mutex};

use wgpu::util::DeviceExt;

use crate::error::{EngineError, Result};
use crate::gpu::kernels::MatmulForm;

/// A device and its queue, shared by everything the GPU backend creates.
pub struct Gpu {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    pub limits: wgpu::Limits,
    /// How the matrix products share a row among threads: chosen from the adapter, changed with `with_matmul_form`
    /// before any model or kernel is built on this device.
    pub matmul_form: MatmulForm,
    /// The smallest subgroup the device runs, where it has subgroups (the device is asked for them whenever the
    /// adapter offers them).
    pub subgroup_size: Option<u32>,
    /// Whether shaders may declare f16 values (`shader-f16`, asked for whenever the adapter offers it); the f16 KV
    /// cache stores them as such, or packs two to a u32 word without it (`kernels::CacheForm`).
    pub shader_f16: bool,
    /// Whether models on this device run the decoding steps of several sequences as one call (`GpuModel`'s
    /// batches): on GPUs, where a call's products read each weight once for all its tokens. Not on adapters that
    /// are CPU programs (lavapipe, SwiftShader): there the products' several-token form decodes every weight once
    /// per token anyway, and a step of 2 or 4 sequences took as long as 5 or 6 single steps (docs/benchmarks.md).
    pub batches_steps: bool,
    /// Set by the device-lost callback and by uncaptured validation or out-of-memory errors.
    failure: Arc<Mutex<Option<String>>>,
    /// Bytes of every buffer created through this struct (buffers are only freed with their owner).
    allocated: std::cell::Cell<u64>,
}

impl Gpu {
    /// Opens the best GPU the platform offers (WebGPU in a browser; Vulkan, Metal or DX12 natively).
    pub async fn new() -> Result<Self> {
        #[cfg(target_arch = "wasm32")]
        let descriptor = wgpu::InstanceDescriptor { backends: wgpu::Backends::BROWSER_WEBGPU, ..Default::default() };
        #[cfg(not(target_arch = "wasm32"))]
        let descriptor = wgpu::InstanceDescriptor::from_env_or_default();
        let instance = wgpu::Instance::new(&descriptor);
        let adapter = instance
            .request_adapter(&wgpu::RequestAdapterOptions {
                power_preference: wgpu::PowerPreference::HighPerformance,
                force_fallback_adapter: false,
                compatible_surface: None,
            })
            .await
            .map_err(|e| EngineError::Gpu(format!("no GPU adapter is available ({e}); use the CPU backend")))?;
        #[allow(unused_mut)]
        let mut info = adapter.get_info();
        // wgpu cannot see a browser adapter's description: ask WebGPU for it, and whether it is a CPU (SwiftShader).
        #[cfg(target_arch = "wasm32")]
        if let Some((description, software)) = web_adapter_description().await {
            info.name = description;
            if software {
                info.device_type = wgpu::DeviceType::Cpu;
            }
        }
        let limits = adapter.limits();
        let features = adapter.features() & (wgpu::Features::SUBGROUP | wgpu::Features::SHADER_F16);
        // A backend that does not say how small its subgroups get is taken at WebGPU's smallest, 4.
        let subgroup_size = features
            .contains(wgpu::Features::SUBGROUP)
            .then_some(limits.min_subgroup_size.max(4))
            .filter(|s| s.is_power_of_two());
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("saif"),
                required_features: features,
                required_limits: limits.clone(),
                experimental_features: Default::default(),
                memory_hints: wgpu::MemoryHints::Performance,
                trace: Default::default(),
            })
            .await
            .map_err(|e| EngineError::Gpu(format!("the GPU refused a device: {e}")))?;
        let failure = Arc::new(Mutex::new(None));
        let lost = failure.clone();
        device.set_device_lost_callback(move |reason, message| {
            if let Ok(mut f) = lost.lock() {
                f.get_or_insert(format!("the GPU device was lost ({reason:?}: {message})"));
            }
        });
        let errors = failure.clone();
        device.on_uncaptured_error(Arc::new(move |error: wgpu::Error| {
            if let Ok(mut f) = errors.lock() {
                f.get_or_insert(format!("GPU error: {error}"));
            }
        }));
        let on_cpu = info.device_type == wgpu::DeviceType::Cpu;
        let gpu = Self {
            device,
            queue,
            info,
            limits,
            matmul_form: MatmulForm::Cooperative,
            subgroup_size,
            shader_f16: features.contains(wgpu::Features::SHADER_F16),
            batches_steps: !on_cpu,
            failure,
            allocated: std::cell::Cell::new(0),
        };
        // A thread per row on adapters that are CPU programs; on GPUs, rows shared by 16 threads (or by one
        // subgroup's worth) that add up their sums through subgroup shuffles where the device has them.
        let form = match (gpu.runs_on_cpu(), gpu.subgroup_size) {
            (true, _) => MatmulForm::PerRow,
            (false, Some(_)) => MatmulForm::Subgroup,
            (false, None) => MatmulForm::Cooperative,
        };
        let gpu = gpu.with_matmul_form(form);
        // Natively, SAIF_GPU_SHADER_F16=0 keeps the shaders off f16 values (to compare the f16 cache's two forms on
        // one GPU), and SAIF_GPU_BATCH=0|1 says whether decoding steps of several sequences run as one call.
        #[cfg(not(target_arch = "wasm32"))]
        let gpu = match std::env::var("SAIF_GPU_SHADER_F16") {
            Ok(v) if v == "0" => gpu.without_shader_f16(),
            _ => gpu,
        };
        #[cfg(not(target_arch = "wasm32"))]
        let gpu = match std::env::var("SAIF_GPU_BATCH").as_deref() {
            Ok("0") => gpu.with_batched_steps(false),
            Ok("1") => gpu.with_batched_steps(true),
            _ => gpu,
        };
        // Natively, SAIF_GPU_MATMUL=per-row|cooperative|subgroup overrides the adapter's form (to compare them on
        // one GPU).
        #[cfg(not(target_arch = "wasm32"))]
        if let Ok(name) = std::env::var("SAIF_GPU_MATMUL") {
            let form = MatmulForm::parse(&name)?;
            if form == MatmulForm::Subgroup && gpu.subgroup_size.is_none() {
                return Err(EngineError::InvalidRequest(format!("{} has no subgroups", gpu.describe())));
            }
            return Ok(gpu.with_matmul_form(form));
        }
        Ok(gpu)
    }

    /// The same device with its matrix products in `form` (tests run every form on every adapter). `Subgroup` on
    /// a device without subgroups gives `Cooperative`.
    pub fn with_matmul_form(mut self, form: MatmulForm) -> Self {
        self.matmul_form = match form {
            MatmulForm::Subgroup if self.subgroup_size.is_none() => MatmulForm::Cooperative,
            other => other,
        };
        self
    }

    /// The same device with its shaders kept off f16 values (tests run both forms of the f16 cache on an adapter
    /// that has them). The device keeps the feature; only what is built from here on leaves it unused.
    pub fn without_shader_f16(mut self) -> Self {
        self.shader_f16 = false;
        self
    }

    /// The same device with models running several sequences' decoding steps as one call, or not (tests run the
    /// batches on lavapipe). Set before a model is loaded.
    pub fn with_batched_steps(mut self, batches: bool) -> Self {
        self.batches_steps = batches;
        self
    }

    /// A one-line description of the adapter, for reports ("NVIDIA H100 (Vulkan)").
    pub fn describe(&self) -> String {
        let backend = format!("{:?}", self.info.backend);
        if self.info.name.is_empty() {
            backend
        } else {
            format!("{} ({backend})", self.info.name)
        }
    }

    /// Whether the adapter is itself a CPU program (lavapipe, SwiftShader).
    pub fn runs_on_cpu(&self) -> bool {
        self.info.device_type == wgpu::DeviceType::Cpu
    }

    /// Fails once the device was lost or reported an error: every later result would be garbage.
    pub fn check(&self) -> Result<()> {
        match self.failure.lock().ok().and_then(|f| f.clone()) {
            Some(message) => Err(EngineError::GpuLost(message)),
            None => Ok(()),
        }
    }

    /// Marks the device as failed (tests use it to check that loss is reported).
    pub fn fail(&self, message: &str) {
        if let Ok(mut f) = self.failure.lock() {
            f.get_or_insert(message.to_string());
        }
    }

    /// Bytes of the buffers created through this struct so far.
    pub fn allocated(&self) -> u64 {
        self.allocated.get()
    }

    fn count(&self, buffer: wgpu::Buffer) -> wgpu::Buffer {
        self.allocated.set(self.allocated.get() + buffer.size());
        buffer
    }

    /// A storage buffer holding `bytes` (padded to a multiple of 4).
    pub fn storage_with(&self, label: &str, bytes: &[u8]) -> wgpu::Buffer {
        let mut padded;
        let contents = if bytes.len().is_multiple_of(4) && !bytes.is_empty() {
            bytes
        } else {
            padded = bytes.to_vec();
            padded.resize(bytes.len().div_ceil(4).max(1) * 4, 0);
            &padded
        };
        self.count(self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some(label),
            contents,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
        }))
    }

    /// A zeroed storage buffer of `bytes` bytes.
    pub fn storage(&self, label: &str, bytes: u64) -> wgpu::Buffer {
        self.count(self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: bytes.max(4).div_ceil(4) * 4,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        }))
    }

    /// A uniform buffer holding `bytes`, writable later.
    pub fn uniform_with(&self, label: &str, bytes: &[u8]) -> wgpu::Buffer {
        self.count(self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some(label),
            contents: bytes,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        }))
    }

    /// A buffer the CPU can map to read results back.
    pub fn readback(&self, label: &str, bytes: u64) -> wgpu::Buffer {
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: bytes.max(4).div_ceil(4) * 4,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    }

    /// Waits until `buffer` (a readback buffer the queue has written) can be read, then returns its first
    /// `bytes` bytes.
    pub async fn read(&self, buffer: &wgpu::Buffer, bytes: u64) -> Result<Vec<u8>> {
        let slice = buffer.slice(0..bytes.div_ceil(4) * 4);
        let (sender, receiver) = futures_channel::oneshot::channel();
        slice.map_async(wgpu::MapMode::Read, move |result| {
            let _ = sender.send(result);
        });
        #[cfg(not(target_arch = "wasm32"))]
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| EngineError::GpuLost(format!("waiting for the GPU failed: {e}")))?;
        let mapped = receiver.await.map_err(|_| EngineError::GpuLost("the GPU dropped a readback".into()))?;
        mapped.map_err(|e| EngineError::GpuLost(format!("reading GPU memory failed: {e}")))?;
        let data = slice.get_mapped_range()[..bytes as usize].to_vec();
        buffer.unmap();
        self.check()?;
        Ok(data)
    }

    /// Reads back f32 values.
    pub async fn read_f32(&self, buffer: &wgpu::Buffer, count: usize) -> Result<Vec<f32>> {
        let bytes = self.read(buffer, (count * 4) as u64).await?;
        Ok(bytemuck::cast_slice(&bytes).to_vec())
    }
}

/// The browser's description of its WebGPU adapter (`GPUAdapter.info`), and whether it runs on the CPU
/// (SwiftShader, or a fallback adapter).
#[cfg(target_arch = "wasm32")]
async fn web_adapter_description() -> Option<(String, bool)> {
    use js_sys::{Function, Promise, Reflect};
    use wasm_bindgen::JsCast;
    let navigator = Reflect::get(&js_sys::global(), &"navigator".into()).ok()?;
    let gpu = Reflect::get(&navigator, &"gpu".into()).ok().filter(|g| !g.is_undefined())?;
    let request: Function = Reflect::get(&gpu, &"requestAdapter".into()).ok()?.dyn_into().ok()?;
    let promise: Promise = request.call0(&gpu).ok()?.dyn_into().ok()?;
    let adapter = wasm_bindgen_futures::JsFuture::from(promise).await.ok().filter(|a| !a.is_null())?;
    let info = Reflect::get(&adapter, &"info".into()).ok()?;
    let field = |key: &str| Reflect::get(&info, &key.into()).ok().and_then(|v| v.as_string()).unwrap_or_default();
    let (vendor, architecture, description) = (field("vendor"), field("architecture"), field("description"));
    let fallback = Reflect::get(&adapter, &"isFallbackAdapter".into()).ok().and_then(|v| v.as_bool()).unwrap_or(false);
    let software = fallback
        || architecture.to_lowercase().contains("swiftshader")
        || description.to_lowercase().contains("swiftshader");
    let text = [vendor, architecture, description].into_iter().filter(|s| !s.is_empty()).collect::<Vec<_>>().join(" ");
    Some((text, software))
}
