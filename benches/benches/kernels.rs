//! Latency of the LoRA kernels (`cuda/lora.cu`, fp16, hidden 4096) on decode and prefill
//! shapes: ranks 8-128, 1-512 tokens, 1-64 adapters. The kernels are compiled from
//! `alora_core::kernels::SOURCES` (the text the Python loader compiles) with NVRTC to a cubin
//! for the device's compute capability, loaded through cudarc (dynamic loading: this builds and
//! runs without CUDA; on a machine without a GPU it says so and exits successfully).
//!
//! Timing: CUDA events around a batch of launches on one stream, after a warm-up (criterion's
//! `iter_custom`), then a fixed median pass whose results go to stdout and, when
//! `ALORA_KERNEL_BENCH_JSON` names a file, to that file as JSON. Before timing, each case counts
//! its flops (2 * T * r * (in + out)) and bytes: the adapters' A and Bt rows (the decode
//! target: rows over time, against peak bandwidth) and all bytes moved (x, y read-modify-write,
//! partial V).
//!
//! The launch planning mirrors `python/alora/kernels/launch.py` (same forms, K split, grids).

use alora_core::kernels::SOURCES;
use criterion::{BenchmarkId, Criterion, Throughput};
use cudarc::driver::{
    sys, CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg,
};
use std::ffi::CString;
use std::sync::Arc;
use std::time::Duration;

const HIDDEN: usize = 4096;
const ELEM: usize = 2; // fp16
const MAX_RANK: usize = 128;
const PAGE_ROWS: usize = 8;
const GRID_YZ_MAX: usize = 65535;

/// One benchmark shape: `adapters` segments of `tokens_per_adapter` tokens, all of rank `rank`.
#[derive(Clone, Copy)]
struct Shape {
    adapters: usize,
    tokens_per_adapter: usize,
    rank: usize,
}

impl Shape {
    fn tokens(&self) -> usize {
        self.adapters * self.tokens_per_adapter
    }
    fn label(&self) -> String {
        format!("T{}_A{}_r{}", self.tokens(), self.adapters, self.rank)
    }
    /// Bytes of the active adapters' A and Bt rows: the decode form's physical floor.
    fn row_bytes(&self) -> u64 {
        (self.adapters * self.rank * (HIDDEN + HIDDEN) * ELEM) as u64
    }
    fn flops(&self) -> u64 {
        (2 * self.tokens() * self.rank * (HIDDEN + HIDDEN)) as u64
    }
}

fn shapes() -> Vec<Shape> {
    let mut v = Vec::new();
    // decode: one token per sequence, every sequence on its own adapter
    for adapters in [1, 8, 32, 64] {
        for rank in [8, 16, 64, 128] {
            v.push(Shape {
                adapters,
                tokens_per_adapter: 1,
                rank,
            });
        }
    }
    // decode batch of 256 sequences over 64 adapters
    v.push(Shape {
        adapters: 64,
        tokens_per_adapter: 4,
        rank: 16,
    });
    // prefill chunks
    for (adapters, tokens, rank) in [
        (1, 256, 16),
        (8, 32, 16),
        (8, 32, 64),
        (8, 64, 16),
        (1, 256, 128),
    ] {
        v.push(Shape {
            adapters,
            tokens_per_adapter: tokens,
            rank,
        });
    }
    v
}

/// `name` with its quoted includes of other kernel files inlined, as the Python loader does.
fn translation_unit(name: &str, seen: &mut Vec<String>) -> Result<String, String> {
    let text = SOURCES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, t)| *t)
        .ok_or_else(|| format!("kernel source {name} not embedded"))?;
    seen.push(name.to_string());
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let inc = line
            .trim()
            .strip_prefix("#include \"")
            .and_then(|s| s.strip_suffix('"'));
        match inc {
            Some(inc) if seen.iter().any(|s| s == inc) => {}
            Some(inc) => out.push_str(&translation_unit(inc, seen)?),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    Ok(out)
}

fn compile_cubin(arch: &str) -> Result<Vec<u8>, String> {
    use cudarc::nvrtc::{result, sys as nv};
    let src =
        CString::new(translation_unit("lora.cu", &mut Vec::new())?).map_err(|e| e.to_string())?;
    let prog = result::create_program(&src, Some(c"lora.cu")).map_err(|e| format!("{e:?}"))?;
    let opts = [
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
    ];
    // SAFETY: `prog` comes from create_program and is destroyed once, below.
    unsafe {
        if let Err(e) = result::compile_program(prog, &opts) {
            let log = result::get_program_log(prog).unwrap_or_default();
            let log: String = log.iter().map(|&c| c as u8 as char).collect();
            let _ = result::destroy_program(prog);
            return Err(format!("NVRTC: {e:?}\n{log}"));
        }
        let mut size = 0usize;
        let cubin = match nv::nvrtcGetCUBINSize(prog, &mut size).result() {
            Ok(()) => {
                let mut buf = vec![0u8; size];
                nv::nvrtcGetCUBIN(prog, buf.as_mut_ptr().cast())
                    .result()
                    .map(|()| buf)
                    .map_err(|e| format!("nvrtcGetCUBIN: {e:?}"))
            }
            Err(e) => Err(format!("nvrtcGetCUBINSize: {e:?}")),
        };
        let _ = result::destroy_program(prog);
        cubin
    }
}

struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    shrink_dec: CudaFunction,
    shrink_seg: CudaFunction,
    expand_dec: CudaFunction,
    expand_seg: CudaFunction,
    num_sms: usize,
    name: String,
    arch: String,
    /// Theoretical DRAM bandwidth in GB/s (memory clock * bus width * 2), when the driver says.
    peak_gbps: Option<f64>,
}

impl Gpu {
    fn open() -> Result<Gpu, String> {
        // SAFETY: only probes whether the shared libraries can be loaded.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err("no CUDA driver library (libcuda) on this machine".into());
        }
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Err(
                "no NVRTC library (libnvrtc.so.13): add its directory to LD_LIBRARY_PATH".into(),
            );
        }
        let ctx = CudaContext::new(0).map_err(|e| format!("no usable CUDA device: {e:?}"))?;
        let (major, minor) = ctx.compute_capability().map_err(|e| format!("{e:?}"))?;
        let arch = format!("sm_{major}{minor}");
        let cubin = compile_cubin(&arch)?;
        let module = ctx
            .load_module(cudarc::nvrtc::Ptx::from_binary(cubin))
            .map_err(|e| format!("loading the cubin: {e:?}"))?;
        let f = |n: &str| module.load_function(n).map_err(|e| format!("{n}: {e:?}"));
        let attr = |a| ctx.attribute(a).ok().map(|v| v as f64);
        use sys::CUdevice_attribute as A;
        let peak_gbps = match (
            attr(A::CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE),
            attr(A::CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH),
        ) {
            (Some(khz), Some(bits)) if khz > 0.0 && bits > 0.0 => {
                Some(khz * 1e3 * 2.0 * bits / 8.0 / 1e9)
            }
            _ => None,
        };
        // Per-slice event tracking would add host work to every launch; timing needs none.
        // SAFETY: every launch here is on one stream, so no cross-stream ordering is lost.
        unsafe { ctx.disable_event_tracking() };
        Ok(Gpu {
            stream: ctx.default_stream(),
            shrink_dec: f("alora_shrink_dec_f16")?,
            shrink_seg: f("alora_shrink_seg_f16")?,
            expand_dec: f("alora_expand_dec_f16")?,
            expand_seg: f("alora_expand_seg_f16")?,
            num_sms: ctx
                .attribute(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
                .map_err(|e| format!("{e:?}"))? as usize,
            name: ctx.name().unwrap_or_default(),
            arch,
            peak_gbps,
            ctx,
        })
    }
}

/// Device buffers and launch geometry of one shape (planning as in launch.py).
struct Problem {
    shape: Shape,
    x: CudaSlice<u16>,
    a: CudaSlice<u16>,
    bt: CudaSlice<u16>,
    y: CudaSlice<u16>,
    vp: CudaSlice<f32>,
    token_idx: CudaSlice<i64>,
    seg_start: CudaSlice<i32>,
    seg_rank: CudaSlice<i32>,
    seg_row_start: CudaSlice<i32>,
    rows: CudaSlice<i32>,
    seg_scale: CudaSlice<f32>,
    dec: bool,
    ks: usize,
    nsplit: usize,
    shrink_cfg: LaunchConfig,
    expand_cfg: LaunchConfig,
    ct_total: usize,
}

fn lcg(state: &mut u64) -> u64 {
    *state = state
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    *state >> 33
}

fn random_f16(n: usize, seed: u64) -> Vec<u16> {
    let mut s = seed;
    (0..n)
        .map(|_| half::f16::from_f32((lcg(&mut s) % 2001) as f32 / 1000.0 - 1.0).to_bits())
        .collect()
}

impl Problem {
    fn new(gpu: &Gpu, shape: Shape) -> Result<Problem, String> {
        let st = &gpu.stream;
        let e = |e: cudarc::driver::DriverError| format!("{e:?}");
        let t = shape.tokens();
        let r_pool = shape.adapters * shape.rank;
        let mut s = 7u64;
        // Tokens of one adapter scattered over the step; rows scattered in pages of 8.
        let mut token_idx: Vec<i64> = (0..t as i64).collect();
        for i in (1..t).rev() {
            token_idx.swap(i, lcg(&mut s) as usize % (i + 1));
        }
        let pages = r_pool.div_ceil(PAGE_ROWS);
        let mut page_order: Vec<usize> = (0..pages).collect();
        for i in (1..pages).rev() {
            page_order.swap(i, lcg(&mut s) as usize % (i + 1));
        }
        let rows: Vec<i32> = (0..r_pool)
            .map(|j| (page_order[j / PAGE_ROWS] * PAGE_ROWS + j % PAGE_ROWS) as i32)
            .collect();
        let pool_rows = pages * PAGE_ROWS;
        let seg_start: Vec<i32> = (0..=shape.adapters)
            .map(|a| (a * shape.tokens_per_adapter) as i32)
            .collect();
        let seg_row_start: Vec<i32> = (0..=shape.adapters)
            .map(|a| (a * shape.rank) as i32)
            .collect();

        let dec = shape.tokens_per_adapter <= 4;
        let (tm, tt, rpw, max_ks) = if dec {
            (4, 4, 2, 2048)
        } else {
            (8, 16, 4, 1024)
        };
        let shrink_tiles = shape.tokens_per_adapter.div_ceil(tm).min(GRID_YZ_MAX);
        let mut ks = max_ks.min(HIDDEN.next_power_of_two()).max(256);
        while ks > 256 && shape.adapters * shrink_tiles * HIDDEN.div_ceil(ks) < 2 * gpu.num_sms {
            ks /= 2;
        }
        let nsplit = HIDDEN.div_ceil(ks);
        let expand_tiles = shape.tokens_per_adapter.div_ceil(tt).min(GRID_YZ_MAX);
        let vec = 16 / ELEM;
        let mut threads = 128;
        while threads > 32
            && shape.adapters * expand_tiles * HIDDEN.div_ceil(threads * vec) < 2 * gpu.num_sms
        {
            threads /= 2;
        }
        let ct_total = HIDDEN.div_ceil(threads * vec);
        Ok(Problem {
            shape,
            x: st.clone_htod(&random_f16(t * HIDDEN, 1)).map_err(e)?,
            a: st
                .clone_htod(&random_f16(pool_rows * HIDDEN, 2))
                .map_err(e)?,
            bt: st
                .clone_htod(&random_f16(pool_rows * HIDDEN, 3))
                .map_err(e)?,
            y: st.clone_htod(&random_f16(t * HIDDEN, 4)).map_err(e)?,
            vp: st.alloc_zeros::<f32>(nsplit * t * shape.rank).map_err(e)?,
            token_idx: st.clone_htod(&token_idx).map_err(e)?,
            seg_start: st.clone_htod(&seg_start).map_err(e)?,
            seg_rank: st
                .clone_htod(&vec![shape.rank as i32; shape.adapters])
                .map_err(e)?,
            seg_row_start: st.clone_htod(&seg_row_start).map_err(e)?,
            rows: st.clone_htod(&rows).map_err(e)?,
            seg_scale: st.clone_htod(&vec![0.5f32; shape.adapters]).map_err(e)?,
            dec,
            ks,
            nsplit,
            shrink_cfg: LaunchConfig {
                grid_dim: (shape.adapters as u32, shrink_tiles as u32, nsplit as u32),
                block_dim: (32 * shape.rank.div_ceil(rpw).clamp(1, 8) as u32, 1, 1),
                shared_mem_bytes: (tm * ks * 4) as u32,
            },
            expand_cfg: LaunchConfig {
                grid_dim: (
                    shape.adapters as u32,
                    ct_total.min(GRID_YZ_MAX) as u32,
                    expand_tiles as u32,
                ),
                block_dim: (threads as u32, 1, 1),
                shared_mem_bytes: (4 * (MAX_RANK + tt * shape.rank)) as u32,
            },
            ct_total,
        })
    }

    /// All bytes the two kernels move: rows, x, y read and written, partial V written and read.
    fn total_bytes(&self) -> u64 {
        let t = self.shape.tokens();
        let v = (self.nsplit * t * self.shape.rank * 4 * 2) as u64;
        self.shape.row_bytes() + (t * HIDDEN * ELEM * 3) as u64 + v
    }

    fn shrink(&mut self, gpu: &Gpu) -> Result<(), cudarc::driver::DriverError> {
        let f = if self.dec {
            &gpu.shrink_dec
        } else {
            &gpu.shrink_seg
        };
        let (null, one, in_f, zero) = (0u64, 1i32, HIDDEN as i32, 0i32);
        let (ldv, ks, t, vec_ok) = (
            self.shape.rank as i32,
            self.ks as i32,
            self.shape.tokens() as i32,
            1i32,
        );
        let mut b = gpu.stream.launch_builder(f);
        b.arg(&self.x).arg(&self.a).arg(&null).arg(&null).arg(&one);
        b.arg(&self.token_idx)
            .arg(&self.seg_start)
            .arg(&self.seg_rank)
            .arg(&self.seg_row_start);
        // One row list per module (rows0-2): a single module, the other two null.
        b.arg(&self.rows).arg(&null).arg(&null);
        // Row strides of the three A pools (contiguous [R, in] here; unused slots 0).
        b.arg(&mut self.vp)
            .arg(&in_f)
            .arg(&in_f)
            .arg(&zero)
            .arg(&zero)
            .arg(&ldv)
            .arg(&ks)
            .arg(&t)
            .arg(&vec_ok);
        // SAFETY: argument list and types match alora_shrink_*_f16 in cuda/lora.cu.
        unsafe { b.launch(self.shrink_cfg) }.map(|_| ())
    }

    fn expand(&mut self, gpu: &Gpu) -> Result<(), cudarc::driver::DriverError> {
        let f = if self.dec {
            &gpu.expand_dec
        } else {
            &gpu.expand_seg
        };
        let (null, out, zero) = (0u64, HIDDEN as i32, 0i32);
        let ct = self.ct_total as i32;
        let (nsplit, t, ldv, vec_mask) = (
            self.nsplit as i32,
            self.shape.tokens() as i32,
            self.shape.rank as i32,
            1i32,
        );
        let mut b = gpu.stream.launch_builder(f);
        b.arg(&mut self.y)
            .arg(&null)
            .arg(&null)
            .arg(&self.bt)
            .arg(&null)
            .arg(&null);
        b.arg(&out).arg(&zero).arg(&zero);
        b.arg(&out).arg(&zero).arg(&zero); // row strides of the Bt pools (contiguous [R, out])
        b.arg(&ct).arg(&ct).arg(&ct);
        b.arg(&self.vp).arg(&nsplit).arg(&t).arg(&ldv);
        b.arg(&self.token_idx)
            .arg(&self.seg_start)
            .arg(&self.seg_rank)
            .arg(&self.seg_row_start);
        // Bt row lists per module (rows0-2): the bench's Bt rows share the A row ids.
        b.arg(&self.rows).arg(&null).arg(&null);
        b.arg(&self.seg_scale).arg(&vec_mask);
        // SAFETY: argument list and types match alora_expand_*_f16 in cuda/lora.cu.
        unsafe { b.launch(self.expand_cfg) }.map(|_| ())
    }

    fn run(&mut self, gpu: &Gpu, op: Op) -> Result<(), cudarc::driver::DriverError> {
        match op {
            Op::Shrink => self.shrink(gpu),
            Op::Expand => self.expand(gpu),
            Op::Both => self.shrink(gpu).and_then(|()| self.expand(gpu)),
        }
    }

    /// Device time of `iters` back-to-back runs, from CUDA events.
    fn time(
        &mut self,
        gpu: &Gpu,
        op: Op,
        iters: u64,
    ) -> Result<Duration, cudarc::driver::DriverError> {
        let timing = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        let start = gpu.stream.record_event(timing)?;
        for _ in 0..iters {
            self.run(gpu, op)?;
        }
        let end = gpu.stream.record_event(timing)?;
        let ms = start.elapsed_ms(&end)?;
        Ok(Duration::from_secs_f64(ms as f64 / 1e3))
    }

    fn op_bytes(&self, op: Op) -> u64 {
        match op {
            Op::Shrink => (self.shape.adapters * self.shape.rank * HIDDEN * ELEM) as u64,
            Op::Expand => (self.shape.adapters * self.shape.rank * HIDDEN * ELEM) as u64,
            Op::Both => self.shape.row_bytes(),
        }
    }
}

#[derive(Clone, Copy)]
enum Op {
    Shrink,
    Expand,
    Both,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Shrink => "shrink",
            Op::Expand => "expand",
            Op::Both => "shrink+expand",
        }
    }
}

const OPS: [Op; 3] = [Op::Shrink, Op::Expand, Op::Both];

fn criterion_benches(c: &mut Criterion, gpu: &Gpu, problems: &mut [Problem]) {
    for p in problems.iter_mut() {
        let mut group = c.benchmark_group(format!("lora_kernels/{}", p.shape.label()));
        for op in OPS {
            // Throughput in adapter-row bytes: criterion's GB/s is the decode target's numerator.
            group.throughput(Throughput::Bytes(p.op_bytes(op)));
            group.bench_function(
                BenchmarkId::new(op.name(), if p.dec { "dec" } else { "seg" }),
                |b| b.iter_custom(|iters| p.time(gpu, op, iters).expect("CUDA launch failed")),
            );
        }
        group.finish();
    }
}

/// Median per-run device time over `samples` batches of `batch` runs, after a warm-up.
fn median_us(p: &mut Problem, gpu: &Gpu, op: Op) -> Result<f64, cudarc::driver::DriverError> {
    const SAMPLES: usize = 31;
    const BATCH: u64 = 20;
    p.time(gpu, op, 50)?;
    let mut v: Vec<f64> = (0..SAMPLES)
        .map(|_| {
            p.time(gpu, op, BATCH)
                .map(|d| d.as_secs_f64() * 1e6 / BATCH as f64)
        })
        .collect::<Result<_, _>>()?;
    v.sort_by(|a, b| a.total_cmp(b));
    Ok(v[SAMPLES / 2])
}

fn summary(gpu: &Gpu, problems: &mut [Problem]) -> Result<String, cudarc::driver::DriverError> {
    let mut json = Vec::new();
    println!(
        "\n{:<18} {:<14} {:>4} {:>10} {:>12} {:>10} {:>10} {:>9}",
        "shape", "op", "form", "median us", "row bytes", "rows GB/s", "all GB/s", "% peak"
    );
    for p in problems.iter_mut() {
        for op in OPS {
            let us = median_us(p, gpu, op)?;
            let rows_gbs = p.op_bytes(op) as f64 / us / 1e3;
            let all_bytes = match op {
                Op::Both => p.total_bytes(),
                _ => p.op_bytes(op),
            };
            let all_gbs = all_bytes as f64 / us / 1e3;
            let pct = gpu.peak_gbps.map(|peak| 100.0 * rows_gbs / peak);
            println!(
                "{:<18} {:<14} {:>4} {:>10.2} {:>12} {:>10.1} {:>10.1} {:>9}",
                p.shape.label(),
                op.name(),
                if p.dec { "dec" } else { "seg" },
                us,
                p.op_bytes(op),
                rows_gbs,
                all_gbs,
                pct.map(|x| format!("{x:.1}")).unwrap_or_else(|| "-".into())
            );
            json.push(format!(
                "{{\"shape\":\"{}\",\"tokens\":{},\"adapters\":{},\"rank\":{},\"op\":\"{}\",\"form\":\"{}\",\"median_us\":{:.3},\"row_bytes\":{},\"all_bytes\":{},\"flops\":{},\"rows_gbps\":{:.2},\"all_gbps\":{:.2},\"pct_peak_rows\":{}}}",
                p.shape.label(),
                p.shape.tokens(),
                p.shape.adapters,
                p.shape.rank,
                op.name(),
                if p.dec { "dec" } else { "seg" },
                us,
                p.op_bytes(op),
                all_bytes,
                p.shape.flops(),
                rows_gbs,
                all_gbs,
                pct.map(|x| format!("{x:.2}")).unwrap_or_else(|| "null".into())
            ));
        }
    }
    Ok(format!(
        "{{\"device\":\"{}\",\"arch\":\"{}\",\"num_sms\":{},\"peak_gbps\":{},\"hidden\":{},\"dtype\":\"fp16\",\"results\":[\n{}\n]}}\n",
        gpu.name.replace('"', "'"),
        gpu.arch,
        gpu.num_sms,
        gpu.peak_gbps.map(|p| format!("{p:.1}")).unwrap_or_else(|| "null".into()),
        HIDDEN,
        json.join(",\n")
    ))
}

fn main() {
    // Compile-only mode (no GPU needed): checks that NVRTC accepts the embedded sources.
    if let Ok(arch) = std::env::var("ALORA_KERNEL_BENCH_COMPILE_ONLY") {
        // SAFETY: only probes whether the shared library can be loaded.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            println!("lora kernel compile check skipped: no NVRTC library (libnvrtc.so.13)");
            return;
        }
        match compile_cubin(&arch) {
            Ok(cubin) => println!(
                "compiled lora.cu for {arch}: {} bytes of cubin",
                cubin.len()
            ),
            Err(e) => {
                eprintln!("compiling lora.cu for {arch} failed: {e}");
                std::process::exit(1);
            }
        }
        return;
    }
    let gpu = match Gpu::open() {
        Ok(g) => g,
        Err(why) => {
            println!("lora kernel benches skipped: {why}");
            return;
        }
    };
    println!(
        "{} ({}, {} SMs, peak {} GB/s)",
        gpu.name,
        gpu.arch,
        gpu.num_sms,
        gpu.peak_gbps
            .map(|p| format!("{p:.0}"))
            .unwrap_or_else(|| "?".into())
    );
    let mut problems: Vec<Problem> = shapes()
        .into_iter()
        .map(|s| Problem::new(&gpu, s))
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| {
            eprintln!("setting up the kernel benches failed: {e}");
            std::process::exit(1);
        });
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .sample_size(20)
        .configure_from_args();
    criterion_benches(&mut c, &gpu, &mut problems);
    c.final_summary();
    match summary(&gpu, &mut problems) {
        Ok(json) => {
            if let Ok(path) = std::env::var("ALORA_KERNEL_BENCH_JSON") {
                if let Err(e) = std::fs::write(&path, json) {
                    eprintln!("writing {path}: {e}");
                    std::process::exit(1);
                }
            }
        }
        Err(e) => {
            eprintln!("timing failed: {e:?}");
            std::process::exit(1);
        }
    }
    let _ = gpu.ctx.synchronize();
}
