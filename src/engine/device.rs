//! Choosing where the models run: a real GPU through burn's `wgpu` backend when one is present,
//! otherwise burn's `flex` CPU backend. Software adapters (llvmpipe, lavapipe, SwiftShader) count as
//! no GPU. `INKSPECT_DEVICE=cpu|gpu|auto` overrides the choice.

use burn::prelude::{Device, DeviceKind};
use serde::{Deserialize, Serialize};

/// Which kind of device the user asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum DevicePreference {
    /// A real GPU when present, else the CPU.
    #[default]
    Auto,
    /// Always the CPU (`flex`).
    Cpu,
    /// A real GPU; falls back to the CPU with a warning when there is none.
    Gpu,
}

impl DevicePreference {
    /// The preference from `INKSPECT_DEVICE` (`cpu`, `gpu`, `auto`), if set and valid.
    pub fn from_env() -> Option<Self> {
        match std::env::var("INKSPECT_DEVICE")
            .ok()?
            .to_ascii_lowercase()
            .as_str()
        {
            "cpu" => Some(Self::Cpu),
            "gpu" => Some(Self::Gpu),
            "auto" => Some(Self::Auto),
            _ => None,
        }
    }
}

/// A chosen compute device and how to describe it to the user.
#[derive(Debug, Clone)]
pub struct ComputeDevice {
    /// The burn device (without autodiff).
    pub device: Device,
    /// Whether it is a GPU.
    pub is_gpu: bool,
    /// Human-readable description, e.g. "CPU (flex, 2 threads)" or "GPU: NVIDIA H200 (Vulkan)".
    pub description: String,
}

/// A real (hardware) GPU adapter found through wgpu.
#[derive(Debug, Clone)]
pub struct GpuAdapter {
    /// Adapter name.
    pub name: String,
    /// Graphics API (Vulkan, Metal, Dx12, ...).
    pub backend: String,
    /// The burn device kind that selects it.
    pub kind: DeviceKind,
}

/// Looks for a hardware GPU; always `None` in a build without the `gpu` feature.
#[cfg(not(feature = "gpu"))]
pub fn find_hardware_gpu() -> Option<GpuAdapter> {
    None
}

/// Looks for a hardware GPU. Software rasterisers (reported by wgpu as CPU adapters) are ignored.
#[cfg(feature = "gpu")]
pub fn find_hardware_gpu() -> Option<GpuAdapter> {
    use burn::tensor::wgpu::wgpu;
    let probe = std::panic::catch_unwind(|| {
        // Vulkan, Metal and DX12 only: a real GPU is reachable through one of them, and skipping
        // OpenGL avoids probing X11/Wayland displays (and their error messages) on headless boxes.
        let mut descriptor = wgpu::InstanceDescriptor::new_without_display_handle();
        descriptor.backends = wgpu::Backends::PRIMARY;
        let instance = wgpu::Instance::new(descriptor);
        let adapters = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()));
        let infos: Vec<wgpu::AdapterInfo> = adapters.iter().map(|a| a.get_info()).collect();
        infos
    });
    let infos = probe.ok()?;
    let mut discrete = 0;
    let mut integrated = 0;
    let mut virt = 0;
    let mut best: Option<GpuAdapter> = None;
    for info in infos {
        let software = info.device_type == wgpu::DeviceType::Cpu
            || ["llvmpipe", "lavapipe", "swiftshader", "software"]
                .iter()
                .any(|s| info.name.to_ascii_lowercase().contains(s));
        let kind = match info.device_type {
            wgpu::DeviceType::DiscreteGpu => {
                discrete += 1;
                DeviceKind::DiscreteGpu(discrete - 1)
            }
            wgpu::DeviceType::IntegratedGpu => {
                integrated += 1;
                DeviceKind::IntegratedGpu(integrated - 1)
            }
            wgpu::DeviceType::VirtualGpu => {
                virt += 1;
                DeviceKind::VirtualGpu(virt - 1)
            }
            _ => continue,
        };
        if software {
            continue;
        }
        let candidate = GpuAdapter {
            name: info.name.clone(),
            backend: format!("{:?}", info.backend),
            kind,
        };
        let better = match (&best, &candidate.kind) {
            (None, _) => true,
            (Some(b), DeviceKind::DiscreteGpu(_)) => !matches!(b.kind, DeviceKind::DiscreteGpu(_)),
            _ => false,
        };
        if better {
            best = Some(candidate);
        }
    }
    best
}

/// The CPU device (`flex`).
pub fn cpu_device() -> ComputeDevice {
    ComputeDevice {
        device: Device::flex(),
        is_gpu: false,
        description: format!("CPU (flex, {} threads)", rayon::current_num_threads()),
    }
}

/// Picks the device for `preference` (an `INKSPECT_DEVICE` setting takes precedence).
pub fn select_device(preference: DevicePreference) -> ComputeDevice {
    let preference = DevicePreference::from_env().unwrap_or(preference);
    if preference == DevicePreference::Cpu {
        return cpu_device();
    }
    match find_hardware_gpu() {
        #[cfg(feature = "gpu")]
        Some(gpu) => ComputeDevice {
            device: Device::wgpu(gpu.kind),
            is_gpu: true,
            description: format!("GPU: {} ({})", gpu.name, gpu.backend),
        },
        _ => {
            if preference == DevicePreference::Gpu {
                log::warn!("no hardware GPU found; using the CPU");
            }
            cpu_device()
        }
    }
}
