// Top-k by magnitude with error feedback over a flat fp32 buffer.
//
// Reference: ddp_hooks/compress/sparse.py (topk / signtopk) with error feedback:
//   v = p + e; keep the k largest |v|; message q = v on the kept set (topk) or
//   (sum|v_kept| / k) * sgn(v) (signtopk); e = v - q (v elsewhere).
// Exact: radix select on the 31-bit key of |v| (11 + 11 + 9 bit digits, histograms in global
// memory, the digit chosen on the device: no host synchronization), then one collecting pass.
// Approximate: one pass with a given threshold into a fixed-capacity output.
#include <cuda_runtime.h>

#include "common.cuh"
#include "launchers.h"

namespace ddp_hooks {

struct SelectState {  // lives in a device buffer of kSelectStateWords int64
  uint32_t prefix;     // bits of the k-th key decided so far
  uint32_t mask;       // which bits are decided
  int64_t remaining;   // how many of the k are still to be found among keys matching prefix
  int64_t above;       // keys strictly above the prefix range (already selected)
  int64_t count_gt;    // collecting: slots used by keys > threshold
  int64_t count_eq;    // collecting: slots used by keys == threshold
};

__device__ __forceinline__ uint32_t magnitude_key(float v) { return __float_as_uint(v) & 0x7fffffffu; }

// Level 0 also folds the error in: e <- p + e (every later pass reads e only).
__global__ void add_and_histogram(const float* __restrict__ p, float* __restrict__ e, int64_t n,
                                  unsigned long long* __restrict__ hist) {
  __shared__ unsigned int local[2048];
  for (int b = threadIdx.x; b < 2048; b += blockDim.x) local[b] = 0;
  __syncthreads();
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const float v = p[i] + e[i];
    e[i] = v;
    atomicAdd(&local[magnitude_key(v) >> 20], 1u);
  }
  __syncthreads();
  for (int b = threadIdx.x; b < 2048; b += blockDim.x)
    if (local[b]) atomicAdd(&hist[b], (unsigned long long)local[b]);
}

__global__ void histogram_level(const float* __restrict__ v, int64_t n, const SelectState* __restrict__ st,
                                int shift, int bins, unsigned long long* __restrict__ hist) {
  __shared__ unsigned int local[2048];
  for (int b = threadIdx.x; b < bins; b += blockDim.x) local[b] = 0;
  __syncthreads();
  const uint32_t prefix = st->prefix, mask = st->mask;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const uint32_t key = magnitude_key(v[i]);
    if ((key & mask) == prefix) atomicAdd(&local[(key >> shift) & (bins - 1)], 1u);
  }
  __syncthreads();
  for (int b = threadIdx.x; b < bins; b += blockDim.x)
    if (local[b]) atomicAdd(&hist[b], (unsigned long long)local[b]);
}

__global__ void init_state(SelectState* st, int64_t k) {
  if (threadIdx.x == 0 && blockIdx.x == 0) st->remaining = k;
}

// One thread: walk the histogram from the top, pick the digit holding the remaining-th key.
__global__ void choose_digit(const unsigned long long* __restrict__ hist, int bins, int shift, SelectState* st) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  int64_t remaining = st->remaining;
  for (int b = bins - 1; b >= 0; --b) {
    const int64_t c = (int64_t)hist[b];
    if (c >= remaining || b == 0) {
      st->prefix |= (uint32_t)b << shift;
      st->mask |= (uint32_t)(bins - 1) << shift;
      st->remaining = remaining;
      return;
    }
    remaining -= c;
    st->above += c;
  }
}

// Keys above the threshold all go; of the keys equal to it, the first `remaining` to arrive.
__global__ void collect(const float* __restrict__ v, int64_t n, SelectState* st, int64_t k,
                        int64_t* __restrict__ idx, float* __restrict__ val) {
  const uint32_t threshold = st->prefix;
  const int64_t above = st->above, remaining = st->remaining;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const float x = v[i];
    const uint32_t key = magnitude_key(x);
    int64_t slot = -1;
    if (key > threshold) {
      slot = atomicAdd(reinterpret_cast<unsigned long long*>(&st->count_gt), 1ull);
    } else if (key == threshold) {
      const int64_t s = atomicAdd(reinterpret_cast<unsigned long long*>(&st->count_eq), 1ull);
      if (s < remaining) slot = above + s;
    }
    if (slot >= 0 && slot < k) {
      idx[slot] = i;
      val[slot] = x;
    }
  }
}

__global__ void abs_sum(const float* __restrict__ val, int64_t k, double* __restrict__ total) {
  double a = 0.0;
  for (int64_t j = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; j < k; j += (int64_t)gridDim.x * blockDim.x)
    a += fabs((double)val[j]);
  for (int s = 16; s > 0; s >>= 1) a += __shfl_down_sync(0xffffffffu, a, s);
  if ((threadIdx.x & 31) == 0) atomicAdd(total, a);
}

// Message values (topk: v; signtopk: +-scale) and the error feedback e[idx] = v - q.
__global__ void finish_message(float* __restrict__ e, const int64_t* __restrict__ idx, float* __restrict__ val,
                               int64_t k, const double* __restrict__ total, bool sign) {
  const float scale = sign ? (float)(*total / (double)k) : 0.f;
  for (int64_t j = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; j < k; j += (int64_t)gridDim.x * blockDim.x) {
    const float x = val[j];
    const float q = sign ? (x >= 0.f ? scale : -scale) : x;
    val[j] = q;
    e[idx[j]] = x - q;
  }
}

// One pass: v = p + e; |v| >= threshold goes to the output (up to capacity), e = v - q.
__global__ void threshold_select(const float* __restrict__ p, float* __restrict__ e, int64_t n,
                                 const float* __restrict__ threshold, int64_t capacity,
                                 unsigned long long* __restrict__ count, int64_t* __restrict__ idx,
                                 float* __restrict__ val) {
  const float t = *threshold;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const float v = p[i] + e[i];
    float rest = v;
    if (fabsf(v) >= t) {
      const unsigned long long s = atomicAdd(count, 1ull);
      if ((int64_t)s < capacity) {
        idx[s] = i;
        val[s] = v;
        rest = 0.f;
      }
    }
    e[i] = rest;
  }
}

}  // namespace ddp_hooks

namespace ddp_hooks {

static_assert(sizeof(SelectState) <= kSelectStateWords * sizeof(int64_t), "state buffer too small");

// state: kSelectStateWords int64 (zeroed here); hist: 3 * 2048 uint64; idx, val: k; total: 1 double.
int launch_topk_ef(const float* p, float* e, int64_t n, int64_t k, bool sign, int64_t* state,
                           unsigned long long* hist, int64_t* idx, float* val, double* total, cudaStream_t stream) {
  cudaMemsetAsync(state, 0, sizeof(int64_t) * kSelectStateWords, stream);
  cudaMemsetAsync(hist, 0, sizeof(unsigned long long) * 3 * 2048, stream);
  cudaMemsetAsync(total, 0, sizeof(double), stream);
  auto* st = reinterpret_cast<SelectState*>(state);
  init_state<<<1, 1, 0, stream>>>(st, k);
  const int grid = blocks_for(n);
  add_and_histogram<<<grid, kThreads, 0, stream>>>(p, e, n, hist);
  choose_digit<<<1, 1, 0, stream>>>(hist, 2048, 20, st);
  histogram_level<<<grid, kThreads, 0, stream>>>(e, n, st, 9, 2048, hist + 2048);
  choose_digit<<<1, 1, 0, stream>>>(hist + 2048, 2048, 9, st);
  histogram_level<<<grid, kThreads, 0, stream>>>(e, n, st, 0, 512, hist + 4096);
  choose_digit<<<1, 1, 0, stream>>>(hist + 4096, 512, 0, st);
  collect<<<grid, kThreads, 0, stream>>>(e, n, st, k, idx, val);
  if (sign) abs_sum<<<blocks_for(k), kThreads, 0, stream>>>(val, k, total);
  finish_message<<<blocks_for(k), kThreads, 0, stream>>>(e, idx, val, k, total, sign);
  return static_cast<int>(cudaGetLastError());
}

// idx, val: capacity (zeroed by the caller); count: 1 uint64 (zeroed by the caller).
int launch_threshold_ef(const float* p, float* e, int64_t n, const float* threshold, int64_t capacity,
                                unsigned long long* count, int64_t* idx, float* val, cudaStream_t stream) {
  threshold_select<<<blocks_for(n), kThreads, 0, stream>>>(p, e, n, threshold, capacity, count, idx, val);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace ddp_hooks
