// Runs one kernel of cuda/lora.cu on the CPU (see emu.h). Built by alora.kernels.emulate as
//   g++ -std=c++20 -O1 -pthread -shared -fPIC -DALORA_HOST_EMU -include emu.h harness.cpp
// with lora.cu (its includes inlined) next to it. The entry points take the kernel's own
// arguments behind a grid/block/shared-memory header, like a launch.
#include "lora_tu.cu"

#include <cstdio>
#include <functional>
#include <string>
#include <thread>

thread_local emu_dim3 threadIdx, blockIdx;
emu_dim3 blockDim, gridDim;
float4 shrink_smem[kEmuSmemBytes / 16];
float4 expand_smem[kEmuSmemBytes / 16];

namespace {
std::unique_ptr<std::barrier<>> g_block_bar;
std::vector<std::unique_ptr<std::barrier<>>> g_warp_bar;
std::vector<float> g_shfl;  // [warps][32]

// Runs `body` for every CUDA thread of every block. Blocks run in sequence; before each one,
// shared memory is filled with NaN so reading anything not staged this block shows up.
int run_grid(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned shmem,
             const std::function<void()>& body) {
  if (bx == 0 || bx % 32 != 0 || bx > 1024 || shmem > kEmuSmemBytes) return 1;
  gridDim = {gx, gy, gz};
  blockDim = {bx, 1, 1};
  const unsigned warps = bx / 32;
  g_block_bar = std::make_unique<std::barrier<>>(bx);
  g_warp_bar.clear();
  for (unsigned w = 0; w < warps; ++w) g_warp_bar.push_back(std::make_unique<std::barrier<>>(32));
  g_shfl.assign(warps * 32, 0.f);
  const float nan = std::nanf("");
  std::vector<std::thread> threads;
  for (unsigned t = 0; t < bx; ++t) {
    threads.emplace_back([=, &body] {
      threadIdx = {t, 0, 0};
      for (unsigned z = 0; z < gz; ++z)
        for (unsigned y = 0; y < gy; ++y)
          for (unsigned x = 0; x < gx; ++x) {
            if (t == 0) {
              std::fill_n(reinterpret_cast<float*>(shrink_smem), kEmuSmemBytes / 4, nan);
              std::fill_n(reinterpret_cast<float*>(expand_smem), kEmuSmemBytes / 4, nan);
            }
            g_block_bar->arrive_and_wait();  // shared memory poisoned before anyone runs
            blockIdx = {x, y, z};
            body();
            g_block_bar->arrive_and_wait();  // block done before the next reuses shared memory
          }
    });
  }
  for (auto& th : threads) th.join();
  return 0;
}
}  // namespace

void __syncthreads() { g_block_bar->arrive_and_wait(); }

float __shfl_xor_sync(unsigned, float v, int off) {
  const unsigned t = threadIdx.x, w = t / 32, lane = t % 32;
  g_shfl[w * 32 + lane] = v;
  g_warp_bar[w]->arrive_and_wait();
  const float r = g_shfl[w * 32 + (lane ^ static_cast<unsigned>(off))];
  g_warp_bar[w]->arrive_and_wait();
  return r;
}

#define EMU_SHRINK(NAME, T)                                                                       \
  if (name == #NAME) {                                                                            \
    return run_grid(gx, gy, gz, bx, shmem, [&] {                                                  \
      NAME(static_cast<const T*>(x), static_cast<const T*>(a0), static_cast<const T*>(a1),        \
           static_cast<const T*>(a2), nmod, token_idx, seg_start, seg_rank, seg_row_start,       \
           rows0, rows1, rows2, vp, in_f, lda0, lda1, lda2, ldv, ks, t_active, vec_ok);          \
    });                                                                                           \
  }

#define EMU_EXPAND(NAME, T)                                                                       \
  if (name == #NAME) {                                                                            \
    return run_grid(gx, gy, gz, bx, shmem, [&] {                                                  \
      NAME(static_cast<T*>(y0), static_cast<T*>(y1), static_cast<T*>(y2),                         \
           static_cast<const T*>(bt0), static_cast<const T*>(bt1), static_cast<const T*>(bt2),    \
           out0, out1, out2, ldb0, ldb1, ldb2, ct1, ct2, ct_total, vp, nsplit, t_active, ldv,     \
           token_idx, seg_start, seg_rank, seg_row_start, rows0, rows1, rows2, seg_scale,         \
           vec_mask);                                                                             \
    });                                                                                           \
  }

extern "C" int emu_shrink(const char* kernel, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                          unsigned shmem, const void* x, const void* a0, const void* a1,
                          const void* a2, int nmod, const long long* token_idx,
                          const int* seg_start, const int* seg_rank, const int* seg_row_start,
                          const int* rows0, const int* rows1, const int* rows2, float* vp,
                          int in_f, int lda0, int lda1, int lda2, int ldv, int ks, int t_active,
                          int vec_ok) {
  const std::string name(kernel);
  EMU_SHRINK(alora_shrink_dec_f32, float)
  EMU_SHRINK(alora_shrink_seg_f32, float)
  EMU_SHRINK(alora_shrink_dec_f16, alora_f16)
  EMU_SHRINK(alora_shrink_seg_f16, alora_f16)
  EMU_SHRINK(alora_shrink_dec_bf16, alora_bf16)
  EMU_SHRINK(alora_shrink_seg_bf16, alora_bf16)
  return 2;
}

extern "C" int emu_expand(const char* kernel, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                          unsigned shmem, void* y0, void* y1, void* y2, const void* bt0,
                          const void* bt1, const void* bt2, int out0, int out1, int out2,
                          int ldb0, int ldb1, int ldb2, int ct1, int ct2, int ct_total,
                          const float* vp, int nsplit, int t_active, int ldv,
                          const long long* token_idx, const int* seg_start, const int* seg_rank,
                          const int* seg_row_start, const int* rows0, const int* rows1,
                          const int* rows2, const float* seg_scale, int vec_mask) {
  const std::string name(kernel);
  EMU_EXPAND(alora_expand_dec_f32, float)
  EMU_EXPAND(alora_expand_seg_f32, float)
  EMU_EXPAND(alora_expand_dec_f16, alora_f16)
  EMU_EXPAND(alora_expand_seg_f16, alora_f16)
  EMU_EXPAND(alora_expand_dec_bf16, alora_bf16)
  EMU_EXPAND(alora_expand_seg_bf16, alora_bf16)
  return 2;
}
