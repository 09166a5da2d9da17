// Exact top-k along the last dimension for small k: the selection step of ViG's dense kNN search.
//
// torch.topk on CPU copies every row into (value, index) pairs and runs nth_element over all of them;
// at ViG's shapes (k = 9 to 45 of 49 to 784 keys, tens of thousands of rows) that measured about 7 ns
// per score. Here one vectorised pass takes the maxima of G strided groups of the row (group g holds
// scores g, g + G, g + 2G, ...). The k-th largest of those maxima is a lower bound on the row's k-th best
// score, since k different groups reach it, and with G about 2k it is tight: about 12 scores pass it for
// the top 9 of 196. A vectorised pass collects them, and only they are sorted (1.5x the previous
// insertion scan over the whole row at Pyramid ViG's first stage, 2.4x-3.5x torch.topk there).
//
// Semantics match torch.topk(largest=True, sorted=True).indices: NaN ranks above every number, and
// equal scores keep their order of appearance (torch.topk leaves the order of ties unspecified).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "vectorize.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <utility>
#include <vector>


namespace {

// Candidates are sorted by insertion up to this many; more (rows full of ties or of -inf, where the
// bound is weak) are partitioned first.
constexpr int64_t kInsertionMaxCandidates = 64;

template <typename scalar_t>
inline bool ranks_above(scalar_t a, scalar_t b) {
  return a > b || (std::isnan(a) && !std::isnan(b));
}

// Puts (v, j) at its place in the sorted best[0..p], moving the entries it ranks above one slot down
// (whatever was at best[p] is overwritten). Ties stay behind: only scores ranking strictly above move.
template <typename scalar_t, typename Above>
inline void insert_at(scalar_t* best, int64_t* where, int64_t p, scalar_t v, int64_t j, Above above) {
  while (p > 0 && above(v, best[p - 1])) {
    best[p] = best[p - 1];
    where[p] = where[p - 1];
    --p;
  }
  best[p] = v;
  where[p] = j;
}

// Keeps in best[0..k) the k highest of (v, j) offered in order of j, sorted; `filled` counts how many
// are held. A score that does not rank above the last held one is dropped (ties: the earlier stays).
template <typename scalar_t, typename Above>
inline void offer(scalar_t* best, int64_t* where, int64_t k, int64_t& filled, scalar_t v, int64_t j,
                  Above above) {
  if (filled < k) {
    insert_at(best, where, filled++, v, j, above);
  } else if (above(v, best[k - 1])) {
    insert_at(best, where, k - 1, v, j, above);
  }
}

// group_max[g] = max of row[g], row[g + groups], ... over the whole chunks of the row (a tail shorter
// than a chunk is left out: a bound from fewer scores is still a bound). Elementwise over chunks, so it
// vectorises; the pointers are __restrict parameters because GCC ignores the qualifier on locals.
template <typename scalar_t>
VIG_PYG_CLONES void strided_group_max(const scalar_t* __restrict row, int64_t n, int64_t groups,
                                      scalar_t* __restrict group_max) {
  std::copy(row, row + groups, group_max);
  for (int64_t start = groups; start + groups <= n; start += groups) {
    const scalar_t* __restrict chunk = row + start;
    for (int64_t g = 0; g < groups; ++g) {
      group_max[g] = chunk[g] > group_max[g] ? chunk[g] : group_max[g];
    }
  }
}

// The k-th largest of the group maxima, without branches: the smallest maximum that fewer than k
// others exceed. Counting is elementwise over groups, so it vectorises.
template <typename scalar_t>
VIG_PYG_CLONES scalar_t kth_largest(const scalar_t* __restrict group_max, int64_t groups, int64_t k,
                                    int32_t* __restrict exceeded_by) {
  for (int64_t g = 0; g < groups; ++g) {
    exceeded_by[g] = 0;
  }
  for (int64_t h = 0; h < groups; ++h) {
    const scalar_t other = group_max[h];
    for (int64_t g = 0; g < groups; ++g) {
      exceeded_by[g] += other > group_max[g];
    }
  }
  scalar_t kth = std::numeric_limits<scalar_t>::infinity();
  for (int64_t g = 0; g < groups; ++g) {
    kth = (exceeded_by[g] < k && group_max[g] < kth) ? group_max[g] : kth;
  }
  return kth;
}

template <typename scalar_t>
VIG_PYG_CLONES bool has_nan(const scalar_t* __restrict row, int64_t n) {
  int32_t nan = 0;  // an int, not a bool: the reduction vectorises
  for (int64_t j = 0; j < n; ++j) {
    nan |= row[j] != row[j];
  }
  return nan != 0;
}

// Positions of the scores >= bound, in order; returns their count. Chunks of 8 scores are tested as a
// whole first (vectorised), and most chunks hold none.
template <typename scalar_t>
VIG_PYG_CLONES int64_t collect_at_least(const scalar_t* __restrict row, int64_t n, scalar_t bound,
                                        int64_t* __restrict position) {
  constexpr int64_t kChunk = 8;
  int64_t c = 0;
  int64_t j = 0;
  for (; j + kChunk <= n; j += kChunk) {
    int32_t any = 0;
    for (int64_t i = 0; i < kChunk; ++i) {
      any |= row[j + i] >= bound;
    }
    if (any) {
      for (int64_t i = 0; i < kChunk; ++i) {  // every slot is written, the count advances on a pass
        position[c] = j + i;
        c += row[j + i] >= bound;
      }
    }
  }
  for (; j < n; ++j) {
    position[c] = j;
    c += row[j] >= bound;
  }
  return c;
}

// A row without NaN: bound, collect the positions of the scores >= bound (at least k, in order), and
// keep the best k of them sorted by (score descending, position ascending).
template <typename scalar_t>
void select_row(const scalar_t* row, int64_t n, int64_t k, int64_t groups, scalar_t* group_max,
                int32_t* exceeded_by, scalar_t* best, int64_t* position, std::pair<scalar_t, int64_t>* pairs,
                int64_t* where) {
  strided_group_max(row, n, groups, group_max);
  const scalar_t bound = kth_largest(group_max, groups, k, exceeded_by);
  const int64_t c = collect_at_least(row, n, bound, position);
  if (c <= kInsertionMaxCandidates) {
    int64_t filled = 0;
    for (int64_t i = 0; i < c; ++i) {
      offer(best, where, k, filled, row[position[i]], position[i], std::greater<scalar_t>());
    }
    return;
  }
  for (int64_t i = 0; i < c; ++i) {
    pairs[i] = {row[position[i]], position[i]};
  }
  const auto before = [](const std::pair<scalar_t, int64_t>& a, const std::pair<scalar_t, int64_t>& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  if (c > k) {
    std::nth_element(pairs, pairs + k, pairs + c, before);
  }
  std::sort(pairs, pairs + k, before);
  for (int64_t i = 0; i < k; ++i) {
    where[i] = pairs[i].second;
  }
}

// Rows with a NaN: every score offered in turn, NaN ranked first.
template <typename scalar_t>
void select_with_nan(const scalar_t* row, int64_t n, int64_t k, scalar_t* best, int64_t* where) {
  int64_t filled = 0;
  for (int64_t j = 0; j < n; ++j) {
    offer(best, where, k, filled, row[j], j, ranks_above<scalar_t>);
  }
}

template <typename scalar_t>
void select_rows(const scalar_t* scores, int64_t* out, int64_t rows, int64_t n, int64_t k) {
  // About 2k groups, at least 16, a multiple of 8 (whole vectors): about 12 candidates for the top 9 of
  // 196. More groups pass fewer candidates but cost more to rank (4k measured slower at every size).
  const int64_t groups = std::min(n, std::max<int64_t>(16, (2 * k + 7) / 8 * 8));
  const int64_t grain = std::max<int64_t>(1, 16384 / n);  // rows per task: a few microseconds each
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> best(k), group_max(groups);
    std::vector<int32_t> exceeded_by(groups);
    std::vector<int64_t> position(n);
    std::vector<std::pair<scalar_t, int64_t>> pairs(n);
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* row = scores + r * n;
      int64_t* where = out + r * k;
      if (has_nan(row, n)) {
        select_with_nan(row, n, k, best.data(), where);
      } else {
        select_row(row, n, k, groups, group_max.data(), exceeded_by.data(), best.data(), position.data(),
                   pairs.data(), where);
      }
    }
  });
}

at::Tensor small_topk(const at::Tensor& score, int64_t k) {
  TORCH_CHECK(score.device().is_cpu(), "small_topk: score must be a CPU tensor");
  TORCH_CHECK(score.scalar_type() == at::kFloat || score.scalar_type() == at::kDouble,
              "small_topk: score must be float32 or float64, got ", score.scalar_type());
  TORCH_CHECK(score.dim() >= 1, "small_topk: score needs at least one dimension");
  const int64_t n = score.size(-1);
  TORCH_CHECK(k >= 1 && k <= n, "small_topk: k must be in [1, ", n, "], got ", k);
  const at::Tensor s = score.contiguous();
  std::vector<int64_t> sizes = s.sizes().vec();
  sizes.back() = k;
  at::Tensor out = at::empty(sizes, s.options().dtype(at::kLong));
  const int64_t rows = s.numel() / n;
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "small_topk", [&] {
    select_rows<scalar_t>(s.const_data_ptr<scalar_t>(), out.mutable_data_ptr<int64_t>(), rows, n, k);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vig_pyg_cpu, m) {
  m.def("small_topk(Tensor score, int k) -> Tensor");
}

TORCH_LIBRARY_IMPL(vig_pyg_cpu, CPU, m) {
  m.impl("small_topk", &small_topk);
}
