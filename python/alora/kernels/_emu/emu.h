// CPU emulation of the CUDA subset used by cuda/lora.cu, so the kernels' indexing, tiling, split
// and reduction logic run (and are tested) on machines without a GPU. Pre-included before the
// kernel source with -DALORA_HOST_EMU. One OS thread per CUDA thread of a block; blocks run one
// after another, so the extern __shared__ arrays below are per-block shared memory.
#pragma once
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__

struct uint4 {
  unsigned x, y, z, w;
};
struct float4 {
  float x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
struct emu_dim3 {
  unsigned x = 1, y = 1, z = 1;
};

extern thread_local emu_dim3 threadIdx, blockIdx;
extern emu_dim3 blockDim, gridDim;

constexpr int kEmuSmemBytes = 64 * 1024;
extern float4 shrink_smem[kEmuSmemBytes / 16];
extern float4 expand_smem[kEmuSmemBytes / 16];

void __syncthreads();
float __shfl_xor_sync(unsigned mask, float v, int off);
[[noreturn]] inline void __trap() { std::abort(); }

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}
using std::fmaf;
using std::min;

// The three conversions lora_common.cuh does with PTX cvt, in software (round to nearest even).
inline float half_bits_to_f32(unsigned short b) {
  _Float16 h;
  std::memcpy(&h, &b, 2);
  return static_cast<float>(h);
}
inline unsigned short f32_to_half_bits(float f) {
  const _Float16 h = static_cast<_Float16>(f);
  unsigned short b;
  std::memcpy(&b, &h, 2);
  return b;
}
inline unsigned short f32_to_bf16_bits(float f) {
  unsigned u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<unsigned short>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<unsigned short>(u >> 16);
}
