// Shared helpers for the LoRA kernels: storage types, fp32 conversion, 16-byte vector I/O and
// a warp reduce-scatter. Self-contained on purpose: no CUDA toolkit headers are needed, so NVRTC
// compiles it with no include path (Python loader and the Rust benches alike).
#pragma once

// Largest adapter rank the kernels accept; the launchers reject larger ones before launch.
#define ALORA_MAX_RANK 128

// Storage-only 16-bit float types; all arithmetic happens in fp32.
struct alora_f16 {
  unsigned short bits;
};
struct alora_bf16 {
  unsigned short bits;
};

#ifndef ALORA_HOST_EMU
// Raw 16-bit patterns <-> fp32 with the hardware conversions (round to nearest even).
__device__ __forceinline__ float half_bits_to_f32(unsigned short b) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(b));
  return f;
}
__device__ __forceinline__ unsigned short f32_to_half_bits(float f) {
  unsigned short b;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(b) : "f"(f));
  return b;
}
__device__ __forceinline__ unsigned short f32_to_bf16_bits(float f) {
  unsigned short b;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(b) : "f"(f));  // sm_80+
  return b;
}
#endif  // ALORA_HOST_EMU: the CPU emulator (alora/kernels/_emu) supplies these three

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(alora_f16 v) { return half_bits_to_f32(v.bits); }
__device__ __forceinline__ float to_f32(alora_bf16 v) {
  return __uint_as_float(static_cast<unsigned>(v.bits) << 16);
}

template <typename T>
struct DType;

template <>
struct DType<float> {
  static constexpr int VEC = 4;  // elements per 16-byte vector
  __device__ static __forceinline__ float load(const float* p) { return *p; }
  __device__ static __forceinline__ void store(float* p, float v) { *p = v; }
  __device__ static __forceinline__ void unpack(uint4 u, float (&o)[VEC]) {
    o[0] = __uint_as_float(u.x);
    o[1] = __uint_as_float(u.y);
    o[2] = __uint_as_float(u.z);
    o[3] = __uint_as_float(u.w);
  }
  __device__ static __forceinline__ uint4 pack(const float (&o)[VEC]) {
    return make_uint4(__float_as_uint(o[0]), __float_as_uint(o[1]), __float_as_uint(o[2]),
                      __float_as_uint(o[3]));
  }
};

template <>
struct DType<alora_f16> {
  static constexpr int VEC = 8;
  __device__ static __forceinline__ float load(const alora_f16* p) { return to_f32(*p); }
  __device__ static __forceinline__ void store(alora_f16* p, float v) {
    p->bits = f32_to_half_bits(v);
  }
  __device__ static __forceinline__ void unpack(uint4 u, float (&o)[VEC]) {
    const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      o[2 * i] = half_bits_to_f32(static_cast<unsigned short>(w[i] & 0xffffu));
      o[2 * i + 1] = half_bits_to_f32(static_cast<unsigned short>(w[i] >> 16));
    }
  }
  __device__ static __forceinline__ uint4 pack(const float (&o)[VEC]) {
    unsigned w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      w[i] = static_cast<unsigned>(f32_to_half_bits(o[2 * i])) |
             (static_cast<unsigned>(f32_to_half_bits(o[2 * i + 1])) << 16);
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
};

template <>
struct DType<alora_bf16> {
  static constexpr int VEC = 8;
  __device__ static __forceinline__ float load(const alora_bf16* p) { return to_f32(*p); }
  __device__ static __forceinline__ void store(alora_bf16* p, float v) {
    p->bits = f32_to_bf16_bits(v);
  }
  __device__ static __forceinline__ void unpack(uint4 u, float (&o)[VEC]) {
    const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      o[2 * i] = __uint_as_float(w[i] << 16);
      o[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
  __device__ static __forceinline__ uint4 pack(const float (&o)[VEC]) {
    unsigned w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      w[i] = static_cast<unsigned>(f32_to_bf16_bits(o[2 * i])) |
             (static_cast<unsigned>(f32_to_bf16_bits(o[2 * i + 1])) << 16);
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
};

// 16-byte read-only load (pools, x): the non-coherent path, never used on y.
template <typename T>
__device__ __forceinline__ void load_vec_ro(const T* p, float (&o)[DType<T>::VEC]) {
  DType<T>::unpack(__ldg(reinterpret_cast<const uint4*>(p)), o);
}
template <typename T>
__device__ __forceinline__ void load_vec(const T* p, float (&o)[DType<T>::VEC]) {
  DType<T>::unpack(*reinterpret_cast<const uint4*>(p), o);
}
template <typename T>
__device__ __forceinline__ void store_vec(T* p, const float (&o)[DType<T>::VEC]) {
  *reinterpret_cast<uint4*>(p) = DType<T>::pack(o);
}

// Warp reduce-scatter of N per-lane partial sums (N a power of two, <= 32): afterwards every
// lane holds the full warp sum of value number `lane / (32 / N)`. Costs N - 1 + log2(32 / N)
// shuffles instead of 5 * N for N independent butterflies.
// One halving step of the reduce-scatter: lanes with bit `OFF` set keep the upper half of the
// N live values, the others the lower half, and each adds its partner's copy of what it keeps.
// Template recursion (not a loop) keeps every register-array index a compile-time constant.
template <int N, int OFF>
struct ReduceScatterStep {
  __device__ static __forceinline__ void run(float* v, int lane) {
    const bool upper = (lane & OFF) != 0;
#pragma unroll
    for (int i = 0; i < N / 2; ++i) {
      const float send = upper ? v[i] : v[i + N / 2];
      const float keep = upper ? v[i + N / 2] : v[i];
      v[i] = keep + __shfl_xor_sync(0xffffffffu, send, OFF);
    }
    ReduceScatterStep<N / 2, OFF / 2>::run(v, lane);
  }
};
template <int OFF>
struct ReduceScatterStep<1, OFF> {
  __device__ static __forceinline__ void run(float*, int) {}
};

// Warp reduce-scatter of N per-lane partial sums (N a power of two, <= 32): afterwards every
// lane holds the full warp sum of value number `lane / (32 / N)`. Costs N - 1 + log2(32 / N)
// shuffles instead of 5 * N for N independent butterflies.
template <int N>
__device__ __forceinline__ float warp_reduce_scatter(float (&v)[N], int lane) {
  static_assert(N >= 1 && N <= 32 && (N & (N - 1)) == 0, "N must be a power of two <= 32");
  ReduceScatterStep<N, 16>::run(v, lane);
  float s = v[0];
#pragma unroll
  for (int off = 16 / N; off >= 1; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
  return s;
}
