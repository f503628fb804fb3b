// Shared helpers of ddp_hooks' kernels.
#pragma once
#include <cstdint>

namespace ddp_hooks {

constexpr int kThreads = 256;

// Index of the block holding element i: offsets has nblocks + 1 entries, offsets[0] = 0.
__device__ __forceinline__ int64_t block_of(const int64_t* offsets, int64_t nblocks, int64_t i) {
  int64_t lo = 0, hi = nblocks;  // invariant: offsets[lo] <= i < offsets[hi]
  while (hi - lo > 1) {
    int64_t mid = (lo + hi) >> 1;
    if (offsets[mid] <= i) lo = mid; else hi = mid;
  }
  return lo;
}

inline int blocks_for(int64_t work, int per_block = kThreads) {
  int64_t b = (work + per_block - 1) / per_block;
  return static_cast<int>(b < 1 ? 1 : (b > 65535LL * 32 ? 65535LL * 32 : b));
}

}  // namespace ddp_hooks
