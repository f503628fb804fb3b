// Python bindings of ddp_hooks' CUDA kernels (built by ddp_hooks/kernels.py). Tensors in,
// raw pointers to the launchers in launchers.h; the caller passes the current CUDA stream.
#include <torch/extension.h>

#include "launchers.h"

namespace {

cudaStream_t as_stream(int64_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

void check(int err, const char* what) { TORCH_CHECK(err == 0, what, " failed with CUDA error ", err); }

void check_fp32(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.scalar_type() == torch::kFloat && t.is_contiguous(), name,
              " must be a contiguous CUDA float32 tensor");
}

}  // namespace

// (packed uint8 of ceil(n/8) bytes, fp32 scales per block); e_out = v - C(v), v = p + rho * e.
// one_pass: every block has at most kOnePassMaxBlock elements (the caller knows its blocks).
std::vector<torch::Tensor> sign_compress_ef(torch::Tensor p, torch::Tensor e, double rho, torch::Tensor offsets,
                                            torch::Tensor e_out, int64_t stream, bool one_pass) {
  check_fp32(p, "p");
  check_fp32(e, "e");
  check_fp32(e_out, "e_out");
  TORCH_CHECK(e.numel() == p.numel() && e_out.numel() == p.numel(), "e and e_out must have p's size");
  TORCH_CHECK(offsets.is_cuda() && offsets.scalar_type() == torch::kLong && offsets.numel() >= 2,
              "offsets must be CUDA int64 block boundaries [0, ..., n]");
  const int64_t n = p.numel(), nblocks = offsets.numel() - 1;
  auto scales = torch::empty({nblocks}, p.options());
  auto words = torch::empty({(n + 31) / 32}, p.options().dtype(torch::kInt));
  auto* word_ptr = reinterpret_cast<uint32_t*>(words.data_ptr<int>());
  if (one_pass) {
    check(ddp_hooks::launch_sign_ef_one_pass(p.data_ptr<float>(), e.data_ptr<float>(), static_cast<float>(rho),
                                             offsets.data_ptr<int64_t>(), nblocks, n, scales.data_ptr<float>(),
                                             word_ptr, e_out.data_ptr<float>(), as_stream(stream)),
          "sign_ef_one_pass");
  } else {
    auto sums = torch::empty({nblocks}, p.options().dtype(torch::kDouble));
    check(ddp_hooks::launch_sign_compress_ef(p.data_ptr<float>(), e.data_ptr<float>(), static_cast<float>(rho),
                                             offsets.data_ptr<int64_t>(), nblocks, n, sums.data_ptr<double>(),
                                             scales.data_ptr<float>(), word_ptr, e_out.data_ptr<float>(),
                                             as_stream(stream)),
          "sign_compress_ef");
  }
  return {words.view(torch::kByte).narrow(0, 0, (n + 7) / 8), scales};
}

// out[i] = mean over rows of +-scale_row(block(i)) by the row's sign bit i; 0 past the blocks.
torch::Tensor unpack_average_out(torch::Tensor rows, torch::Tensor scales, torch::Tensor offsets, torch::Tensor out,
                                 int64_t stream) {
  TORCH_CHECK(rows.is_cuda() && rows.scalar_type() == torch::kByte && rows.dim() == 2 && rows.is_contiguous(),
              "rows must be a contiguous CUDA uint8 (nrows, nbytes) tensor");
  check_fp32(scales, "scales");
  check_fp32(out, "out");
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == rows.size(0), "scales must be (nrows, >= nblocks)");
  TORCH_CHECK(rows.size(1) * 8 >= out.numel(), "rows hold fewer bits than out has elements");
  const int64_t nblocks = offsets.numel() - 1;
  TORCH_CHECK(scales.size(1) >= nblocks, "scales has fewer columns than there are blocks");
  check(ddp_hooks::launch_unpack_average(rows.data_ptr<uint8_t>(), rows.size(1), rows.size(0), scales.data_ptr<float>(),
                                         scales.size(1), offsets.data_ptr<int64_t>(), nblocks, out.numel(),
                                         out.data_ptr<float>(), as_stream(stream)),
        "unpack_average");
  return out;
}

// Exact top-k of |p + e| (unordered): (int64 indices (k), fp32 message (k)); e becomes v - q.
std::vector<torch::Tensor> topk_ef(torch::Tensor p, torch::Tensor e, int64_t k, bool sign, int64_t stream) {
  check_fp32(p, "p");
  check_fp32(e, "e");
  TORCH_CHECK(e.numel() == p.numel(), "e must have p's size");
  TORCH_CHECK(k >= 1 && k <= p.numel(), "k must be in [1, numel], got ", k);
  auto opts = p.options();
  auto state = torch::empty({ddp_hooks::kSelectStateWords}, opts.dtype(torch::kLong));
  auto hist = torch::empty({3 * 2048}, opts.dtype(torch::kLong));
  auto idx = torch::empty({k}, opts.dtype(torch::kLong));
  auto val = torch::empty({k}, opts);
  auto total = torch::empty({1}, opts.dtype(torch::kDouble));
  check(ddp_hooks::launch_topk_ef(p.data_ptr<float>(), e.data_ptr<float>(), p.numel(), k, sign,
                                  state.data_ptr<int64_t>(), reinterpret_cast<unsigned long long*>(hist.data_ptr<int64_t>()),
                                  idx.data_ptr<int64_t>(), val.data_ptr<float>(), total.data_ptr<double>(),
                                  as_stream(stream)),
        "topk_ef");
  return {idx, val};
}

// One pass with a device threshold: (indices (capacity), values (capacity), count (1)).
std::vector<torch::Tensor> threshold_ef(torch::Tensor p, torch::Tensor e, torch::Tensor threshold, int64_t capacity,
                                        int64_t stream) {
  check_fp32(p, "p");
  check_fp32(e, "e");
  check_fp32(threshold, "threshold");
  auto opts = p.options();
  auto idx = torch::zeros({capacity}, opts.dtype(torch::kLong));
  auto val = torch::zeros({capacity}, opts);
  auto count = torch::zeros({1}, opts.dtype(torch::kLong));
  check(ddp_hooks::launch_threshold_ef(p.data_ptr<float>(), e.data_ptr<float>(), p.numel(), threshold.data_ptr<float>(),
                                       capacity, reinterpret_cast<unsigned long long*>(count.data_ptr<int64_t>()),
                                       idx.data_ptr<int64_t>(), val.data_ptr<float>(), as_stream(stream)),
        "threshold_ef");
  return {idx, val, count};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sign_compress_ef", &sign_compress_ef, "blockwise scaled sign + error feedback + bit packing");
  m.attr("ONE_PASS_MAX_BLOCK") = ddp_hooks::kOnePassMaxBlock;
  m.def("unpack_average_out", &unpack_average_out, "unpack, scale and average packed sign messages");
  m.def("topk_ef", &topk_ef, "exact top-k by magnitude with error feedback (radix select)");
  m.def("threshold_ef", &threshold_ef, "one-pass threshold selection with error feedback");
}
