// Exact top-k along the last dimension for small k: the selection step of ViG's dense kNN search.
//
// torch.topk on CPU copies every row into (value, index) pairs and runs nth_element over all of them;
// at ViG's shapes (k = 9 to 45 of 49 to 784 keys, tens of thousands of rows) that measured about 7 ns
// per score. Here a vectorised pass first finds a lower bound on each row's k-th best score. For small k
// the row is then scanned against a sorted list of the best k so far: almost every score is rejected by
// one comparison, and the few that enter the list are inserted without branches. For larger k only the
// scores above the bound are partitioned and sorted.
//
// Semantics match torch.topk(largest=True, sorted=True).indices: NaN ranks above every number, and
// equal scores keep their order of appearance (torch.topk leaves the order of ties unspecified).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <utility>
#include <vector>

namespace {

// Up to this k the insertion scan wins; above it, partitioning the candidates (measured at k = 9 to 45
// of 196 scores).
constexpr int64_t kInsertionMaxK = 16;

template <typename scalar_t>
inline bool ranks_above(scalar_t a, scalar_t b) {
  return a > b || (std::isnan(a) && !std::isnan(b));
}

// Rows without NaN. best[0..k) is sorted descending; v > best[k - 1] enters at its place and the last
// entry drops out. Every slot is rewritten from the old list with selects, no data-dependent branch:
// slot p takes best[p - 1] if v beats it, else v if v beats best[p], else keeps best[p].
template <typename scalar_t>
inline void insert_number(scalar_t* best, int64_t* where, int64_t k, scalar_t v, int64_t j) {
  for (int64_t p = k - 1; p > 0; --p) {
    const bool shift = v > best[p - 1];
    const bool here = v > best[p];
    best[p] = shift ? best[p - 1] : (here ? v : best[p]);
    where[p] = shift ? where[p - 1] : (here ? j : where[p]);
  }
  const bool first = v > best[0];
  best[0] = first ? v : best[0];
  where[0] = first ? j : where[0];
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

// A lower bound on the k-th best score, from k disjoint groups of the row: each group's maximum is one of
// k distinct scores >= the smallest of those maxima. Branch-free, vectorised by the compiler.
template <typename scalar_t>
scalar_t kth_best_lower_bound(const scalar_t* row, int64_t n, int64_t k) {
  const int64_t w = n / k;
  scalar_t bound = std::numeric_limits<scalar_t>::infinity();
  for (int64_t g = 0; g < k; ++g) {
    const scalar_t* group = row + g * w;
    scalar_t m = group[0];
    for (int64_t j = 1; j < w; ++j) {
      m = group[j] > m ? group[j] : m;
    }
    bound = m < bound ? m : bound;
  }
  return bound;
}

// Small k: scores below the bound are skipped by the scan without entering the list, which halves the
// insertions at ViG's sizes.
template <typename scalar_t>
void select_by_insertion(const scalar_t* row, int64_t n, int64_t k, scalar_t* best, int64_t* where) {
  const scalar_t bound = kth_best_lower_bound(row, n, k);
  // The first k scores >= bound fill the list in order (there are at least k; ties keep the earlier
  // index: only strictly larger scores move up).
  int64_t filled = 0;
  int64_t j = 0;
  for (; j < n && filled < k; ++j) {
    if (row[j] >= bound) {
      insert_at(best, where, filled++, row[j], j, std::greater<scalar_t>());
    }
  }
  scalar_t cut = best[k - 1];
  for (; j < n; ++j) {
    if (row[j] > cut) {
      insert_number(best, where, k, row[j], j);
      cut = best[k - 1];
    }
  }
}

// Larger k (the insertion's O(k) per entry adds up): the scores >= the bound are copied out with their
// positions, and only they are partitioned and sorted, by (score descending, position ascending).
template <typename scalar_t>
void select_by_partition(const scalar_t* row, int64_t n, int64_t k, std::pair<scalar_t, int64_t>* pairs,
                         int64_t* where) {
  const scalar_t bound = kth_best_lower_bound(row, n, k);
  int64_t c = 0;
  for (int64_t j = 0; j < n; ++j) {
    pairs[c] = {row[j], j};
    c += row[j] >= bound;
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

// Rows with a NaN: the same scan with NaN ranked first, by plain insertion.
template <typename scalar_t>
void select_with_nan(const scalar_t* row, int64_t n, int64_t k, scalar_t* best, int64_t* where) {
  int64_t filled = 0;
  for (int64_t j = 0; j < n; ++j) {
    const scalar_t v = row[j];
    if (filled == k && !ranks_above(v, best[k - 1])) {
      continue;
    }
    insert_at(best, where, filled < k ? filled++ : k - 1, v, j, ranks_above<scalar_t>);
  }
}

template <typename scalar_t>
void select_rows(const scalar_t* scores, int64_t* out, int64_t rows, int64_t n, int64_t k) {
  const int64_t grain = std::max<int64_t>(1, 16384 / n);  // rows per task: a few microseconds each
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> best(k);
    std::vector<std::pair<scalar_t, int64_t>> pairs(n);
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* row = scores + r * n;
      int64_t* where = out + r * k;
      bool nan = false;
      for (int64_t j = 0; j < n; ++j) {
        nan |= row[j] != row[j];
      }
      if (nan) {
        select_with_nan(row, n, k, best.data(), where);
      } else if (k <= kInsertionMaxK) {
        select_by_insertion(row, n, k, best.data(), where);
      } else {
        select_by_partition(row, n, k, pairs.data(), where);
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

TORCH_LIBRARY_FRAGMENT(vig_pyg, m) {
  m.def("small_topk(Tensor score, int k) -> Tensor");
}

TORCH_LIBRARY_IMPL(vig_pyg, CPU, m) {
  m.impl("small_topk", &small_topk);
}
