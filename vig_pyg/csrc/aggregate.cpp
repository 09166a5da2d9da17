// Channel-wise max over each node's k neighbours: the aggregation of ViG's MRConv.
//
// In PyTorch this is a gather of the (N, k, C) neighbour rows followed by a max over k: the gathered
// tensor is written to memory and read back (72 MB at Pyramid ViG's first stage, batch 8), and MR then
// subtracts the centre and interleaves [x, m] in two more passes. Here every output row is reduced
// straight from the source rows, which stay in cache, and MR's interleaved input row is written once.
//
// Semantics match index_select + amax(dim=1): NaN wins (the first NaN met), and the reported position is
// the first neighbour holding the maximum, as torch.max with indices reports it.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "vectorize.h"

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>


namespace {

// Positions are tracked in an integer as wide as the scalar, so that the selects vectorise lane by lane.
template <typename scalar_t>
using lane_int_t = std::conditional_t<sizeof(scalar_t) == 4, int32_t, int64_t>;

// best[c] = max(best[c], row[c]), NaN propagating as in amax. The pointers are parameters marked
// __restrict (GCC ignores it on local variables and otherwise runs a scalar loop behind an overlap check).
template <typename scalar_t>
inline void max_into(const scalar_t* __restrict row, scalar_t* __restrict best, int64_t c) {
  for (int64_t i = 0; i < c; ++i) {
    const scalar_t v = row[i];
    const scalar_t b = best[i];
    best[i] = (v > b || v != v) ? v : b;
  }
}

// The same, recording in pos[c] the neighbour j that holds each maximum. Strictly greater, so ties keep
// the first winner; a NaN replaces a number, not an earlier NaN. Selects rather than branches, so that
// the compiler vectorises it.
template <typename scalar_t>
inline void max_into_tracking(const scalar_t* __restrict row, scalar_t* __restrict best,
                              lane_int_t<scalar_t>* __restrict pos, int64_t c, lane_int_t<scalar_t> j) {
  using int_t = lane_int_t<scalar_t>;
  for (int64_t i = 0; i < c; ++i) {
    const scalar_t v = row[i];
    const scalar_t b = best[i];
    const int_t take = -static_cast<int_t>((v > b) | ((v != v) & (b == b)));
    best[i] = take ? v : b;
    pos[i] = (pos[i] & ~take) | (j & take);
  }
}

// One output row: best[c] = max_j src[nbr[j]][c] and, with pos, the first j reaching it. Bounds were
// checked by the caller.
template <typename scalar_t>
VIG_PYG_CLONES void row_max(const scalar_t* src, const int64_t* nbr, int64_t k, int64_t c, scalar_t* best,
                            lane_int_t<scalar_t>* pos) {
  std::copy(src + nbr[0] * c, src + nbr[0] * c + c, best);
  if (pos == nullptr) {
    for (int64_t j = 1; j < k; ++j) {
      max_into(src + nbr[j] * c, best, c);
    }
    return;
  }
  std::fill(pos, pos + c, 0);
  for (int64_t j = 1; j < k; ++j) {
    max_into_tracking(src + nbr[j] * c, best, pos, c, static_cast<lane_int_t<scalar_t>>(j));
  }
}

// MR's linear input row: [x_0, m_0 - x_0, x_1, m_1 - x_1, ...].
template <typename scalar_t>
VIG_PYG_CLONES void interleave_relative(const scalar_t* __restrict x, const scalar_t* __restrict best,
                                        int64_t c, scalar_t* __restrict out) {
  for (int64_t i = 0; i < c; ++i) {
    out[2 * i] = x[i];
    out[2 * i + 1] = best[i] - x[i];
  }
}

void check_inputs(const char* op, const at::Tensor& x_src, const at::Tensor& index, int64_t k) {
  TORCH_CHECK(x_src.device().is_cpu() && index.device().is_cpu(), op, ": tensors must be on the CPU");
  TORCH_CHECK(x_src.dim() == 2, op, ": x_src must be (num_sources, C), got ", x_src.sizes());
  TORCH_CHECK(x_src.scalar_type() == at::kFloat || x_src.scalar_type() == at::kDouble, op,
              ": features must be float32 or float64, got ", x_src.scalar_type());
  TORCH_CHECK(index.dim() == 1 && index.scalar_type() == at::kLong, op, ": index must be 1-D int64");
  TORCH_CHECK(k >= 1 && k <= 256, op, ": k must be in [1, 256] (positions are bytes), got ", k);
  TORCH_CHECK(index.numel() % k == 0, op, ": index has ", index.numel(), " entries, not a multiple of k=", k);
  TORCH_CHECK(x_src.size(0) > 0 || index.numel() == 0, op, ": no source nodes to gather from");
  if (index.numel() > 0) {
    const auto [lo, hi] = at::aminmax(index);
    TORCH_CHECK(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < x_src.size(0), op, ": index out of range [0, ",
                x_src.size(0), ")");
  }
}

// Rows [0, n) of the result: best (n, c) or, with x_dst, MR's interleaved (n, 2c); positions (n, c).
template <typename scalar_t>
void reduce_rows(const scalar_t* src, const int64_t* index, int64_t n, int64_t k, int64_t c,
                 const scalar_t* x_dst, scalar_t* out, uint8_t* positions) {
  using int_t = lane_int_t<scalar_t>;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, k * c));  // rows per task: tens of microseconds
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> scratch(x_dst != nullptr ? c : 0);
    std::vector<int_t> pos(positions != nullptr ? c : 0);
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* best = x_dst != nullptr ? scratch.data() : out + r * c;
      row_max<scalar_t>(src, index + r * k, k, c, best, positions != nullptr ? pos.data() : nullptr);
      if (x_dst != nullptr) {
        interleave_relative<scalar_t>(x_dst + r * c, best, c, out + r * 2 * c);
      }
      if (positions != nullptr) {
        std::copy(pos.begin(), pos.end(), positions + r * c);  // j < k <= 256: fits a byte
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> run(const char* op, const at::Tensor& x_src, const at::Tensor* x_dst,
                                       const at::Tensor& index, int64_t k, bool positions) {
  check_inputs(op, x_src, index, k);
  const int64_t n = index.numel() / k, c = x_src.size(1);
  const at::Tensor src = x_src.contiguous(), idx = index.contiguous();
  at::Tensor dst;
  if (x_dst != nullptr) {
    TORCH_CHECK(x_dst->device().is_cpu() && x_dst->scalar_type() == x_src.scalar_type(), op,
                ": x_dst must be a CPU tensor of the dtype of x_src");
    TORCH_CHECK(x_dst->dim() == 2 && x_dst->size(0) == n && x_dst->size(1) == c, op, ": x_dst must be (",
                n, ", ", c, ") for ", index.numel(), " indices and k=", k, ", got ", x_dst->sizes());
    dst = x_dst->contiguous();
  }
  at::Tensor out = at::empty({n, x_dst != nullptr ? 2 * c : c}, src.options());
  at::Tensor pos = at::empty({positions ? n : 0, c}, src.options().dtype(at::kByte));
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "reduce_rows", [&] {
    reduce_rows<scalar_t>(src.const_data_ptr<scalar_t>(), idx.const_data_ptr<int64_t>(), n, k, c,
                          x_dst != nullptr ? dst.const_data_ptr<scalar_t>() : nullptr,
                          out.mutable_data_ptr<scalar_t>(),
                          positions ? pos.mutable_data_ptr<uint8_t>() : nullptr);
  });
  return {out, pos};
}

std::tuple<at::Tensor, at::Tensor> neighbor_max(const at::Tensor& x_src, const at::Tensor& index, int64_t k,
                                                bool positions) {
  return run("neighbor_max", x_src, nullptr, index, k, positions);
}

std::tuple<at::Tensor, at::Tensor> max_relative(const at::Tensor& x_src, const at::Tensor& x_dst,
                                                const at::Tensor& index, int64_t k, bool positions) {
  return run("max_relative", x_src, &x_dst, index, k, positions);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vig_pyg_cpu, m) {
  m.def("neighbor_max(Tensor x_src, Tensor index, int k, bool positions) -> (Tensor, Tensor)");
  m.def("max_relative(Tensor x_src, Tensor x_dst, Tensor index, int k, bool positions) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vig_pyg_cpu, CPU, m) {
  m.impl("neighbor_max", &neighbor_max);
  m.impl("max_relative", &max_relative);
}
