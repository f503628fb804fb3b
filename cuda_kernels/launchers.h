// Host entry points of the kernels: raw device pointers and a stream, no torch types, so that
// the .cu files build with nvcc alone and bindings.cpp owns every torch detail. Each returns
// the cudaError_t of its launches as an int (0: success).
#pragma once
#include <cstdint>

typedef struct CUstream_st* cudaStream_t;

namespace ddp_hooks {

constexpr int64_t kSelectStateWords = 8;
constexpr int64_t kOnePassMaxBlock = 4096;  // sign_ef_one_pass: blocks of at most this many elements

int launch_sign_compress_ef(const float* p, const float* e, float rho, const int64_t* offsets,
                                    int64_t nblocks, int64_t n, double* sums, float* scales, uint32_t* words,
                                    float* e_out, cudaStream_t stream);
int launch_sign_ef_one_pass(const float* p, const float* e, float rho, const int64_t* offsets, int64_t nblocks,
                            int64_t n, float* scales, uint32_t* words, float* e_out, cudaStream_t stream);
int launch_unpack_average(const uint8_t* rows, int64_t row_bytes, int64_t nrows, const float* scales,
                                  int64_t scale_stride, const int64_t* offsets, int64_t nblocks, int64_t n,
                                  float* out, cudaStream_t stream);
int launch_topk_ef(const float* p, float* e, int64_t n, int64_t k, bool sign, int64_t* state,
                           unsigned long long* hist, int64_t* idx, float* val, double* total, cudaStream_t stream);
int launch_threshold_ef(const float* p, float* e, int64_t n, const float* threshold, int64_t capacity,
                                unsigned long long* count, int64_t* idx, float* val, cudaStream_t stream);

}  // namespace ddp_hooks
