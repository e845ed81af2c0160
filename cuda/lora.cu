// Batched low-rank matmul over a step's active tokens, grouped by adapter (DESIGN.md section 6).
//
//   shrink: V[i, j]       = sum_k x[tok[i], k] * A_pool[row(a, j), k]              j < rank(a)
//   expand: y[tok[i], o] += scale(a) * sum_j V[i, j] * Bt_pool[row(a, j), o]
//
// Segment a owns positions [seg_start[a], seg_start[a+1]) of token_idx; module m's rank rows
// of it are rows_m[seg_row_start[a] + j], j < seg_rank[a] (heterogeneous ranks, no padding;
// rows_m: module m's own row list, see Fusion below). Pool row c of
// module m starts at a_m + c * lda_m (A) and bt_m + c * ldb_m (Bt): explicit row strides in
// elements, one per pool, because the runtime's pools are strided views of the KV cache (row
// stride = the engine's row granularity, smaller than a row; rows in use never overlap). A
// contiguous pool passes lda = in_f, ldb = out. All sizes are runtime arguments; the dtype
// (fp32 / fp16 / bf16) and the token tile are template parameters, instantiated through
// extern "C" wrappers at the bottom. Accumulation is fp32 throughout.
//
// Split-K without atomics: shrink block (segment, token tile, split s) writes the partial sums
// of its K range to Vp[m, s, i, j] (fp32, [modules, splits, T_active, ldv]); expand sums the
// splits when it stages V. Every Vp element a segment needs is written, nothing is accumulated
// into memory, so Vp needs no zeroing. The decode form (TM = 4 tokens per tile) reads each
// adapter's A and Bt rows once for all its tokens; the segmented form (TM = 16) amortises
// them over token tiles of prefill chunks.
//
// Fusion: modules that share x (q/k/v, gate/up) pass up to three pools in one launch. Shrink
// stages the x tile once and runs every module's rows over it; expand spreads its column tiles
// over the modules' outputs, so a fused pair of launches replaces 2 * modules launches. The
// fused modules share the segments (token_idx, seg_start, seg_rank, seg_row_start, seg_scale)
// but each has its own row list (rows0-2: A row ids for shrink, Bt row ids for expand) and
// its own pool strides, as in the runtime, where every module's rows are distinct row ids of
// the shared KV arena. Module m's V lands in Vp[m]; expand reads Vp[m] for its module m, so
// the runtime may run one fused shrink and then expand each module on its own from its slice
// (a single-module expand given &Vp[m]). A single-module launch passes rows1 = rows2 = null.
#include "lora_common.cuh"

// ---------------------------------------------------------------------------------------------
// shrink: block = (segment blockIdx.x, token tile blockIdx.y [grid-stride], K split blockIdx.z).
// The x tile [TM, ks] is staged in shared memory as fp32; each warp takes RPW rank rows at a
// time, streams their K range with 16-byte loads (scalar fallback for unaligned sizes), keeps
// RPW * TM partial dot products per lane and reduce-scatters them across the warp.
// ---------------------------------------------------------------------------------------------
template <typename T, int TM, int RPW>
__device__ __forceinline__ void shrink_body(
    const T* __restrict__ x, const T* __restrict__ a0, const T* __restrict__ a1,
    const T* __restrict__ a2, int nmod, const long long* __restrict__ token_idx,
    const int* __restrict__ seg_start, const int* __restrict__ seg_rank,
    const int* __restrict__ seg_row_start, const int* __restrict__ rows0,
    const int* __restrict__ rows1, const int* __restrict__ rows2, float* __restrict__ vp, int in_f,
    int lda0, int lda1, int lda2, int ldv, int ks, int t_active, int vec_ok) {
  constexpr int VEC = DType<T>::VEC;
  constexpr int NV = RPW * TM;  // partial sums per lane
  constexpr int LPV = 32 / NV;  // lanes holding each reduced value
  static_assert(NV <= 32 && (NV & (NV - 1)) == 0, "RPW * TM must be a power of two <= 32");
  extern __shared__ float4 shrink_smem[];
  float* xs = reinterpret_cast<float*>(shrink_smem);  // [TM][ks]

  const int a = blockIdx.x;
  const int split = blockIdx.z;
  const int nsplit = gridDim.z;
  const int rank = seg_rank[a];
  const int s0 = seg_start[a];
  const int s1 = seg_start[a + 1];
  const int k0 = split * ks;
  if (rank <= 0 || s1 <= s0 || k0 >= in_f) return;  // block-uniform
  if (rank > ALORA_MAX_RANK) __trap();               // launchers reject this before launch
  const int klen = min(ks, in_f - k0);
  const int row0 = seg_row_start[a];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;

  for (int i0 = s0 + blockIdx.y * TM; i0 < s1; i0 += gridDim.y * TM) {
    const int nt = min(TM, s1 - i0);
    __syncthreads();  // the previous tile's readers are done with xs
    if (vec_ok) {
      const int nchunk = klen / VEC;  // vec_ok implies in_f % VEC == 0, ks % VEC == 0
      for (int c = threadIdx.x; c < TM * nchunk; c += blockDim.x) {
        const int t = c / nchunk;
        const int cc = c - t * nchunk;
        float v[VEC];
        if (t < nt) {
          load_vec_ro(x + token_idx[i0 + t] * static_cast<long long>(in_f) + k0 + cc * VEC, v);
        } else {
#pragma unroll
          for (int e = 0; e < VEC; ++e) v[e] = 0.f;
        }
        float4* dst = reinterpret_cast<float4*>(xs + t * ks + cc * VEC);
#pragma unroll
        for (int q = 0; q < VEC / 4; ++q) {
          dst[q] = make_float4(v[4 * q], v[4 * q + 1], v[4 * q + 2], v[4 * q + 3]);
        }
      }
    } else {
      for (int c = threadIdx.x; c < TM * klen; c += blockDim.x) {
        const int t = c / klen;
        const int k = c - t * klen;
        xs[t * ks + k] =
            t < nt ? DType<T>::load(x + token_idx[i0 + t] * static_cast<long long>(in_f) + k0 + k)
                   : 0.f;
      }
    }
    __syncthreads();

    for (int m = 0; m < nmod; ++m) {
      const T* pool = m == 0 ? a0 : (m == 1 ? a1 : a2);
      const long long lda = m == 0 ? lda0 : (m == 1 ? lda1 : lda2);
      const int* arows = (m == 0 ? rows0 : (m == 1 ? rows1 : rows2)) + row0;
      float* vout = vp + static_cast<long long>(m * nsplit + split) * t_active * ldv;
      for (int j0 = warp * RPW; j0 < rank; j0 += nwarps * RPW) {
        const T* ap[RPW];
#pragma unroll
        for (int r = 0; r < RPW; ++r) {
          // Rows past the rank re-read the last row (a cache hit) and are never written.
          ap[r] = pool + static_cast<long long>(__ldg(arows + min(j0 + r, rank - 1))) * lda + k0;
        }
        float acc[NV];
#pragma unroll
        for (int v = 0; v < NV; ++v) acc[v] = 0.f;

        if (vec_ok) {
          const int nchunk = klen / VEC;
#pragma unroll 1
          for (int c = lane; c < nchunk; c += 32) {
            float av[RPW][VEC];
#pragma unroll
            for (int r = 0; r < RPW; ++r) load_vec_ro(ap[r] + c * VEC, av[r]);
#pragma unroll
            for (int t = 0; t < TM; ++t) {
              const float4* src = reinterpret_cast<const float4*>(xs + t * ks + c * VEC);
              float xv[VEC];
#pragma unroll
              for (int q = 0; q < VEC / 4; ++q) {
                const float4 f = src[q];
                xv[4 * q] = f.x;
                xv[4 * q + 1] = f.y;
                xv[4 * q + 2] = f.z;
                xv[4 * q + 3] = f.w;
              }
#pragma unroll
              for (int r = 0; r < RPW; ++r) {
#pragma unroll
                for (int e = 0; e < VEC; ++e) acc[r * TM + t] = fmaf(av[r][e], xv[e], acc[r * TM + t]);
              }
            }
          }
        } else {
#pragma unroll 4
          for (int k = lane; k < klen; k += 32) {
            float av[RPW];
#pragma unroll
            for (int r = 0; r < RPW; ++r) av[r] = DType<T>::load(ap[r] + k);
#pragma unroll
            for (int t = 0; t < TM; ++t) {
              const float xv = xs[t * ks + k];
#pragma unroll
              for (int r = 0; r < RPW; ++r) acc[r * TM + t] = fmaf(av[r], xv, acc[r * TM + t]);
            }
          }
        }

        const float sum = warp_reduce_scatter<NV>(acc, lane);
        const int idx = lane / LPV;
        const int r = idx / TM;
        const int t = idx - r * TM;
        if (lane % LPV == 0 && t < nt && j0 + r < rank) {
          vout[static_cast<long long>(i0 + t) * ldv + j0 + r] = sum;
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// expand: block = (segment blockIdx.x, column tile blockIdx.y over all modules [grid-stride],
// token tile blockIdx.z [grid-stride]). The block stages scale * sum_splits(Vp) for TT tokens
// in shared memory; each thread owns VEC consecutive output columns and loops over the rank
// rows, so each Bt row slice is read once per token tile, with TMR tokens in registers.
// Only y rows of the segment's tokens are read and written (read-modify-write, no atomics:
// every (token, column) belongs to exactly one block).
// ---------------------------------------------------------------------------------------------
template <typename T, int TT, int TMR>
__device__ __forceinline__ void expand_body(
    T* __restrict__ y0, T* __restrict__ y1, T* __restrict__ y2, const T* __restrict__ bt0,
    const T* __restrict__ bt1, const T* __restrict__ bt2, int out0, int out1, int out2, int ldb0,
    int ldb1, int ldb2, int ct1, int ct2, int ct_total, const float* __restrict__ vp, int nsplit,
    int t_active, int ldv,
    const long long* __restrict__ token_idx, const int* __restrict__ seg_start,
    const int* __restrict__ seg_rank, const int* __restrict__ seg_row_start,
    const int* __restrict__ rows0, const int* __restrict__ rows1, const int* __restrict__ rows2,
    const float* __restrict__ seg_scale, int vec_mask) {
  constexpr int VEC = DType<T>::VEC;
  static_assert(TT % TMR == 0, "token tile must be a multiple of the register tile");
  // Dynamic shared memory: rs[ALORA_MAX_RANK] (the segment's Bt rows in the current module),
  // then vs[TT][rank] (V with the scale folded in); the launcher sizes it as
  // 4 * (ALORA_MAX_RANK + TT * max_rank).
  extern __shared__ float4 expand_smem[];
  int* rs = reinterpret_cast<int*>(expand_smem);
  float* vs = reinterpret_cast<float*>(expand_smem) + ALORA_MAX_RANK;

  const int a = blockIdx.x;
  const int rank = seg_rank[a];
  const int s0 = seg_start[a];
  const int s1 = seg_start[a + 1];
  if (rank <= 0 || s1 <= s0) return;   // block-uniform
  if (rank > ALORA_MAX_RANK) __trap();  // launchers reject this before launch
  const float scale = seg_scale[a];
  const int row0 = seg_row_start[a];
  const int ot = blockDim.x * VEC;

  for (int ct = blockIdx.y; ct < ct_total; ct += gridDim.y) {
    const int m = ct >= ct2 ? 2 : (ct >= ct1 ? 1 : 0);
    T* y = m == 0 ? y0 : (m == 1 ? y1 : y2);
    const T* bt = m == 0 ? bt0 : (m == 1 ? bt1 : bt2);
    const int out = m == 0 ? out0 : (m == 1 ? out1 : out2);
    const long long ldb = m == 0 ? ldb0 : (m == 1 ? ldb1 : ldb2);
    const bool vec = ((vec_mask >> m) & 1) != 0;
    const int o = (ct - (m == 0 ? 0 : (m == 1 ? ct1 : ct2))) * ot + threadIdx.x * VEC;
    const float* vm = vp + static_cast<long long>(m) * nsplit * t_active * ldv;
    const int* brows = (m == 0 ? rows0 : (m == 1 ? rows1 : rows2)) + row0;

    for (int i0 = s0 + blockIdx.z * TT; i0 < s1; i0 += gridDim.z * TT) {
      const int nt = min(TT, s1 - i0);
      __syncthreads();  // previous readers of vs and rs are done
      // The module's Bt rows: restaged per tile (rank ints, next to TT * rank * nsplit floats
      // of V) since a block's column tiles may span modules.
      for (int j = threadIdx.x; j < rank; j += blockDim.x) rs[j] = brows[j];
      for (int e = threadIdx.x; e < TT * rank; e += blockDim.x) {
        const int t = e / rank;
        const int j = e - t * rank;
        float s = 0.f;
        if (t < nt) {
          for (int sp = 0; sp < nsplit; ++sp) {
            s += __ldg(vm + (static_cast<long long>(sp) * t_active + i0 + t) * ldv + j);
          }
        }
        vs[e] = s * scale;
      }
      __syncthreads();  // publishes vs and rs
      if (o >= out) continue;  // no barrier below this point in the iteration

      for (int t0 = 0; t0 < nt; t0 += TMR) {
        float acc[TMR][VEC];
#pragma unroll
        for (int t = 0; t < TMR; ++t) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) acc[t][e] = 0.f;
        }
        if (vec) {  // vec implies out % VEC == 0, so o + VEC <= out
#pragma unroll 4
          for (int j = 0; j < rank; ++j) {
            float b[VEC];
            load_vec_ro(bt + static_cast<long long>(rs[j]) * ldb + o, b);
#pragma unroll
            for (int t = 0; t < TMR; ++t) {
              const float w = vs[(t0 + t) * rank + j];
#pragma unroll
              for (int e = 0; e < VEC; ++e) acc[t][e] = fmaf(w, b[e], acc[t][e]);
            }
          }
        } else {
#pragma unroll 2
          for (int j = 0; j < rank; ++j) {
            const T* brow = bt + static_cast<long long>(rs[j]) * ldb + o;
            float b[VEC];
#pragma unroll
            for (int e = 0; e < VEC; ++e) b[e] = o + e < out ? DType<T>::load(brow + e) : 0.f;
#pragma unroll
            for (int t = 0; t < TMR; ++t) {
              const float w = vs[(t0 + t) * rank + j];
#pragma unroll
              for (int e = 0; e < VEC; ++e) acc[t][e] = fmaf(w, b[e], acc[t][e]);
            }
          }
        }
#pragma unroll
        for (int t = 0; t < TMR; ++t) {
          if (t0 + t >= nt) break;
          T* yrow = y + token_idx[i0 + t0 + t] * static_cast<long long>(out) + o;
          if (vec) {
            float cur[VEC];
            load_vec(yrow, cur);
#pragma unroll
            for (int e = 0; e < VEC; ++e) cur[e] += acc[t][e];
            store_vec(yrow, cur);
          } else {
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
              if (o + e < out) DType<T>::store(yrow + e, DType<T>::load(yrow + e) + acc[t][e]);
            }
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// extern "C" entry points: alora_{shrink,expand}_{dec,seg}_{f32,f16,bf16}.
// dec: decode form, 4-token tiles; seg: segmented (prefill) form, 16-token tiles.
// ---------------------------------------------------------------------------------------------
#define ALORA_SHRINK(NAME, T, TM, RPW)                                                          \
  extern "C" __global__ void __launch_bounds__(256) NAME(                                      \
      const T* x, const T* a0, const T* a1, const T* a2, int nmod, const long long* token_idx, \
      const int* seg_start, const int* seg_rank, const int* seg_row_start, const int* rows0,   \
      const int* rows1, const int* rows2, float* vp, int in_f, int lda0, int lda1, int lda2,   \
      int ldv, int ks, int t_active, int vec_ok) {                                             \
    shrink_body<T, TM, RPW>(x, a0, a1, a2, nmod, token_idx, seg_start, seg_rank,               \
                            seg_row_start, rows0, rows1, rows2, vp, in_f, lda0, lda1, lda2,    \
                            ldv, ks, t_active, vec_ok);                                        \
  }

#define ALORA_EXPAND(NAME, T, TT, TMR)                                                          \
  extern "C" __global__ void __launch_bounds__(256) NAME(                                      \
      T* y0, T* y1, T* y2, const T* bt0, const T* bt1, const T* bt2, int out0, int out1,       \
      int out2, int ldb0, int ldb1, int ldb2, int ct1, int ct2, int ct_total, const float* vp, \
      int nsplit, int t_active, int ldv, const long long* token_idx, const int* seg_start,     \
      const int* seg_rank, const int* seg_row_start, const int* rows0, const int* rows1,       \
      const int* rows2, const float* seg_scale, int vec_mask) {                                \
    expand_body<T, TT, TMR>(y0, y1, y2, bt0, bt1, bt2, out0, out1, out2, ldb0, ldb1, ldb2, ct1, \
                            ct2, ct_total, vp, nsplit, t_active, ldv, token_idx, seg_start,    \
                            seg_rank, seg_row_start, rows0, rows1, rows2, seg_scale,           \
                            vec_mask);                                                         \
  }

#define ALORA_INSTANTIATE(SUFFIX, T)                        \
  ALORA_SHRINK(alora_shrink_dec_##SUFFIX, T, 4, 2)          \
  ALORA_SHRINK(alora_shrink_seg_##SUFFIX, T, 8, 4)          \
  ALORA_EXPAND(alora_expand_dec_##SUFFIX, T, 4, 4)          \
  ALORA_EXPAND(alora_expand_seg_##SUFFIX, T, 16, 8)

ALORA_INSTANTIATE(f32, float)
ALORA_INSTANTIATE(f16, alora_f16)
ALORA_INSTANTIATE(bf16, alora_bf16)
