// Blockwise scaled sign with error feedback and bit packing, and unpack-average.
//
// Reference: ddp_hooks/compress/sign.py. For blocks [offsets[b], offsets[b+1]) of v = p + rho*e:
//   scale_b = float(sum_fp64(|v_b|) / d_b); bit i = (v_i >= 0), packed LSB first, padding bits 1;
//   e_out_i = v_i - (bit ? scale : -scale).
// Two passes over p and e (the block sums must be known before the signs are scaled):
// 20.1 bytes per fp32 element. For blocks of at most kOnePassMax elements (EFSignSGDM's
// block_size), sign_ef_one_pass keeps a block in registers: one CTA reads p and e once and
// writes e_out and the packed signs once, 12.25 bytes per element (with the zeroing of words).
#include <cuda_runtime.h>

#include "common.cuh"
#include "launchers.h"

namespace ddp_hooks {

// Pass 1: fp64 sums of |p + rho*e| per block. A warp whose 32 elements lie in one block adds
// them with one atomic; warps that straddle a boundary add element by element.
__global__ void block_abs_sums(const float* __restrict__ p, const float* __restrict__ e, float rho,
                               const int64_t* __restrict__ offsets, int64_t nblocks, int64_t n,
                               double* __restrict__ sums) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = (int64_t)gridDim.x * (blockDim.x >> 5);
  for (int64_t w = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5; w * 32 < n; w += warps) {
    const int64_t i = w * 32 + lane;
    double a = 0.0;
    if (i < n) a = fabs((double)fmaf(rho, e[i], p[i]));
    const int64_t first = block_of(offsets, nblocks, w * 32);
    const int64_t last_i = (w * 32 + 31 < n ? w * 32 + 31 : n - 1);
    if (offsets[first + 1] > last_i) {  // the whole warp is in one block
      for (int s = 16; s > 0; s >>= 1) a += __shfl_down_sync(0xffffffffu, a, s);
      if (lane == 0) atomicAdd(&sums[first], a);
    } else if (i < n) {
      atomicAdd(&sums[block_of(offsets, nblocks, i)], a);
    }
  }
}

__global__ void finish_scales(const double* __restrict__ sums, const int64_t* __restrict__ offsets,
                              int64_t nblocks, float* __restrict__ scales) {
  int64_t b = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (b < nblocks) scales[b] = (float)(sums[b] / (double)(offsets[b + 1] - offsets[b]));
}

// Pass 2: one warp per 32 elements: ballot of the signs, and the error feedback.
__global__ void sign_pack_ef(const float* __restrict__ p, const float* __restrict__ e, float rho,
                             const int64_t* __restrict__ offsets, int64_t nblocks, int64_t n,
                             const float* __restrict__ scales, uint32_t* __restrict__ words,
                             float* __restrict__ e_out) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = (int64_t)gridDim.x * (blockDim.x >> 5);
  for (int64_t w = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5; w * 32 < n; w += warps) {
    const int64_t i = w * 32 + lane;
    float v = 0.f;
    bool bit = true;  // padding bits are 1
    if (i < n) {
      v = fmaf(rho, e[i], p[i]);
      bit = v >= 0.f;
    }
    const uint32_t word = __ballot_sync(0xffffffffu, bit);
    if (lane == 0) words[w] = word;
    if (i < n) {
      const float s = scales[block_of(offsets, nblocks, i)];
      e_out[i] = v - (bit ? s : -s);
    }
  }
}

// One CTA per block b, up to kOnePassMax elements held kPerThread per thread (element
// lo + t + k * kThreads, coalesced). The fp64 sum is reduced in a fixed tree order. Packed
// bits go to 32-bit words aligned to the whole stream: each warp's ballot is shifted into
// the two words it touches in shared memory; words wholly inside the block are stored,
// the first and last (shared with neighbouring blocks) are OR-ed atomically into words,
// which the launcher zeroes first; bits past n are set to 1 by the last block.
constexpr int kPerThread = 16;
constexpr int64_t kOnePassMax = static_cast<int64_t>(kThreads) * kPerThread;
static_assert(kOnePassMax == kOnePassMaxBlock, "launchers.h announces the one-pass block limit");

__global__ void sign_ef_one_pass(const float* __restrict__ p, const float* __restrict__ e, float rho,
                                 const int64_t* __restrict__ offsets, int64_t n, float* __restrict__ scales,
                                 uint32_t* __restrict__ words, float* __restrict__ e_out) {
  __shared__ double partial[kThreads / 32];
  __shared__ uint32_t bits[kOnePassMax / 32 + 2];
  __shared__ float scale_shared;
  const int64_t b = blockIdx.x;
  const int64_t lo = offsets[b], hi = offsets[b + 1];
  const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
  const int64_t w0 = lo >> 5;                       // first stream word this block touches
  const int nwords = static_cast<int>(((hi - 1) >> 5) - w0 + 1);
  for (int k = t; k < nwords; k += kThreads) bits[k] = 0u;
  float v[kPerThread];
  double a = 0.0;
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {
    const int64_t i = lo + t + static_cast<int64_t>(k) * kThreads;
    v[k] = i < hi ? fmaf(rho, e[i], p[i]) : 0.f;
    if (i < hi) a += fabs(static_cast<double>(v[k]));
  }
  for (int s = 16; s > 0; s >>= 1) a += __shfl_down_sync(0xffffffffu, a, s);
  if (lane == 0) partial[warp] = a;
  __syncthreads();
  if (t == 0) {
    double sum = 0.0;
    for (int k = 0; k < kThreads / 32; ++k) sum += partial[k];
    scale_shared = static_cast<float>(sum / static_cast<double>(hi - lo));
    scales[b] = scale_shared;
  }
  __syncthreads();
  const float sc = scale_shared;
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {
    const int64_t base = lo + static_cast<int64_t>(k) * kThreads + warp * 32;  // this warp's 32 elements
    const int64_t i = base + lane;
    const bool bit = i < hi && v[k] >= 0.f;
    const uint32_t ballot = __ballot_sync(0xffffffffu, bit);
    if (i < hi) e_out[i] = v[k] - (bit ? sc : -sc);
    if (lane == 0 && base < hi && ballot) {  // elements base.. land at stream bit base
      const int64_t word = (base >> 5) - w0;
      const int shift = static_cast<int>(base & 31);
      atomicOr(&bits[word], ballot << shift);
      if (shift) atomicOr(&bits[word + 1], ballot >> (32 - shift));
    }
  }
  __syncthreads();
  for (int k = t; k < nwords; k += kThreads) {
    const int64_t word = w0 + k;
    uint32_t value = bits[k];
    if (hi == n && word == ((n - 1) >> 5) && (n & 31)) value |= ~0u << (n & 31);  // padding bits 1
    const bool shared_first = k == 0 && (lo & 31);
    const bool shared_last = k == nwords - 1 && (hi & 31) && hi != n;
    if (shared_first || shared_last) atomicOr(&words[word], value);
    else words[word] = value;
  }
}

// out[i] = (sum over rows r, in order, of (bit_r(i) ? scale_r(block(i)) : -scale_r(block(i)))) / n
// for i < offsets[nblocks]; 0 beyond (padding). One thread per byte of the packed rows.
__global__ void unpack_average(const uint8_t* __restrict__ rows, int64_t row_bytes, int64_t nrows,
                               const float* __restrict__ scales, int64_t scale_stride,
                               const int64_t* __restrict__ offsets, int64_t nblocks, int64_t n,
                               float* __restrict__ out) {
  const int64_t end = offsets[nblocks];
  const float inv = 1.0f / (float)nrows;
  for (int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; t * 8 < n;
       t += (int64_t)gridDim.x * blockDim.x) {
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    int64_t blk[8];
    int64_t b = t * 8 < end ? block_of(offsets, nblocks, t * 8) : 0;
    for (int k = 0; k < 8; ++k) {
      const int64_t i = t * 8 + k;
      while (i < end && offsets[b + 1] <= i) ++b;
      blk[k] = i < end ? b : -1;
    }
    for (int64_t r = 0; r < nrows; ++r) {
      const uint8_t byte = rows[r * row_bytes + t];
      const float* s = scales + r * scale_stride;
      for (int k = 0; k < 8; ++k) {
        if (blk[k] >= 0) {
          const float v = s[blk[k]];
          acc[k] += ((byte >> k) & 1) ? v : -v;
        }
      }
    }
    for (int k = 0; k < 8; ++k) {
      const int64_t i = t * 8 + k;
      if (i < n) out[i] = blk[k] >= 0 ? acc[k] * inv : 0.f;
    }
  }
}

}  // namespace ddp_hooks

namespace ddp_hooks {

int launch_sign_compress_ef(const float* p, const float* e, float rho, const int64_t* offsets,
                                    int64_t nblocks, int64_t n, double* sums, float* scales, uint32_t* words,
                                    float* e_out, cudaStream_t stream) {
  const int grid = blocks_for((n + 31) / 32 * 32);
  cudaMemsetAsync(sums, 0, sizeof(double) * nblocks, stream);
  block_abs_sums<<<grid, kThreads, 0, stream>>>(p, e, rho, offsets, nblocks, n, sums);
  finish_scales<<<blocks_for(nblocks), kThreads, 0, stream>>>(sums, offsets, nblocks, scales);
  sign_pack_ef<<<grid, kThreads, 0, stream>>>(p, e, rho, offsets, nblocks, n, scales, words, e_out);
  return static_cast<int>(cudaGetLastError());
}

int launch_sign_ef_one_pass(const float* p, const float* e, float rho, const int64_t* offsets, int64_t nblocks,
                            int64_t n, float* scales, uint32_t* words, float* e_out, cudaStream_t stream) {
  cudaMemsetAsync(words, 0, sizeof(uint32_t) * ((n + 31) / 32), stream);
  sign_ef_one_pass<<<static_cast<unsigned>(nblocks), kThreads, 0, stream>>>(p, e, rho, offsets, n, scales, words, e_out);
  return static_cast<int>(cudaGetLastError());
}

int launch_unpack_average(const uint8_t* rows, int64_t row_bytes, int64_t nrows, const float* scales,
                                  int64_t scale_stride, const int64_t* offsets, int64_t nblocks, int64_t n,
                                  float* out, cudaStream_t stream) {
  unpack_average<<<blocks_for((n + 7) / 8), kThreads, 0, stream>>>(rows, row_bytes, nrows, scales, scale_stride,
                                                                    offsets, nblocks, n, out);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace ddp_hooks
