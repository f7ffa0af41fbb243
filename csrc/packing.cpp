// Packing engine: the hot loops of sequence planning, nothing else.
//
// Every function takes item lengths (already cut to <= capacity by the over-long policy,
// all >= 1) and returns flat numpy arrays; megatron_pack/packing/plan.py turns them into a
// plan and megatron_pack/packing/reference.py holds the readable twin of each loop.
// The two must agree exactly, so the tie-break rules below are part of the contract:
//   * "sort by length descending" means ties in ascending item index (a stable sort);
//   * best fit takes the bin with the smallest remaining capacity >= length, ties to the
//     lowest bin index;
//   * shuffles are Fisher-Yates driven by splitmix64, j = next() % (i + 1), i = n-1 .. 1.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;
using i64 = int64_t;
using u64 = uint64_t;
using Lengths = py::array_t<i64, py::array::c_style | py::array::forcecast>;

namespace {

struct SplitMix64 {
    u64 state;
    u64 next() {
        u64 z = (state += 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        return z ^ (z >> 31);
    }
};

std::vector<i64> permutation(i64 n, u64 seed) {
    std::vector<i64> perm(n);
    std::iota(perm.begin(), perm.end(), 0);
    SplitMix64 rng{seed};
    for (i64 i = n - 1; i > 0; --i) {
        i64 j = static_cast<i64>(rng.next() % static_cast<u64>(i + 1));
        std::swap(perm[i], perm[j]);
    }
    return perm;
}

py::array_t<i64> to_numpy(std::vector<i64>&& v) {
    // Hand the buffer to numpy without a copy; the capsule frees it.
    auto* heap = new std::vector<i64>(std::move(v));
    py::capsule owner(heap, [](void* p) { delete static_cast<std::vector<i64>*>(p); });
    return py::array_t<i64>(static_cast<py::ssize_t>(heap->size()), heap->data(), owner);
}

const i64* checked(const Lengths& lengths, i64 capacity) {
    if (lengths.ndim() != 1) throw std::invalid_argument("lengths must be 1-D");
    if (capacity < 1) throw std::invalid_argument("max_seq_length must be >= 1");
    const i64* L = lengths.data();
    for (i64 i = 0; i < lengths.shape(0); ++i)
        if (L[i] < 1 || L[i] > capacity)
            throw std::invalid_argument("item " + std::to_string(i) + " has length " +
                                        std::to_string(L[i]) + ", outside [1, " +
                                        std::to_string(capacity) + "]");
    return L;
}

// Indices sorted by length descending, ties by index: a counting sort, O(n + capacity).
std::vector<i64> sort_desc(const i64* L, i64 n, i64 capacity) {
    std::vector<i64> count(capacity + 2, 0);
    for (i64 i = 0; i < n; ++i) ++count[capacity - L[i]];
    i64 run = 0;
    for (auto& c : count) { i64 t = c; c = run; run += t; }
    std::vector<i64> order(n);
    for (i64 i = 0; i < n; ++i) order[count[capacity - L[i]]++] = i;
    return order;
}

// Smallest set index >= i over [0, n): a 64-ary bit tree, O(log_64 n) per operation.
class NextSet {
  public:
    explicit NextSet(i64 n) {
        i64 m = n;
        do { m = (m + 63) / 64; levels_.emplace_back(m, 0); } while (m > 1);
    }
    void set(i64 i) {
        for (auto& lv : levels_) { lv[i >> 6] |= 1ull << (i & 63); i >>= 6; }
    }
    void clear(i64 i) {
        for (auto& lv : levels_) {
            lv[i >> 6] &= ~(1ull << (i & 63));
            if (lv[i >> 6]) break;  // the word is still non-empty: parents stay set
            i >>= 6;
        }
    }
    i64 next(i64 i) const {
        size_t d = 0;
        while (d < levels_.size()) {
            i64 w = i >> 6;
            if (w >= static_cast<i64>(levels_[d].size())) return -1;
            u64 bits = levels_[d][w] & (~0ull << (i & 63));
            if (bits) {
                i = (w << 6) + __builtin_ctzll(bits);
                while (d > 0) { --d; i = (i << 6) + __builtin_ctzll(levels_[d][i]); }
                return i;
            }
            i = w + 1;
            ++d;
        }
        return -1;
    }

  private:
    std::vector<std::vector<u64>> levels_;
};

// Open bins bucketed by remaining capacity; each bucket is a min-heap of bin ids so the
// lowest-index bin wins ties.
class BestFit {
  public:
    explicit BestFit(i64 capacity) : capacity_(capacity), nonempty_(capacity + 1), buckets_(capacity + 1) {}

    // Returns the bin the item went to (bins are numbered from 0 in creation order).
    i64 place(i64 length) {
        i64 cap = nonempty_.next(length);
        i64 bin;
        if (cap < 0) {
            bin = num_bins_++;
            cap = capacity_;
        } else {
            auto& heap = buckets_[cap];
            std::pop_heap(heap.begin(), heap.end(), std::greater<i64>());
            bin = heap.back();
            heap.pop_back();
            if (heap.empty()) nonempty_.clear(cap);
        }
        i64 left = cap - length;
        if (left > 0) {  // a full bin can take nothing more: forget it
            auto& heap = buckets_[left];
            if (heap.empty()) { nonempty_.set(left); touched_.push_back(left); }
            heap.push_back(bin);
            std::push_heap(heap.begin(), heap.end(), std::greater<i64>());
        }
        return bin;
    }
    i64 num_bins() const { return num_bins_; }
    // Close every bin (start of a new window) in time proportional to what was used.
    void reset() {
        for (i64 c : touched_) {
            if (!buckets_[c].empty()) { buckets_[c].clear(); nonempty_.clear(c); }
        }
        touched_.clear();
        num_bins_ = 0;
    }

  private:
    i64 capacity_;
    i64 num_bins_ = 0;
    NextSet nonempty_;
    std::vector<std::vector<i64>> buckets_;
    std::vector<i64> touched_;
};

// Best-fit-decreasing of the items `idx` (already in placement order) appended to order/offsets.
void bfd_into(const i64* L, const std::vector<i64>& idx, BestFit& fit, std::vector<i64>& order,
              std::vector<i64>& offsets) {
    std::vector<i64> bin_of(idx.size());
    for (size_t k = 0; k < idx.size(); ++k) bin_of[k] = fit.place(L[idx[k]]);
    // Group by bin, keeping placement order inside a bin (counting sort on bin id).
    i64 nb = fit.num_bins();
    std::vector<i64> start(nb + 1, 0);
    for (i64 b : bin_of) ++start[b + 1];
    for (i64 b = 0; b < nb; ++b) start[b + 1] += start[b];
    i64 base = static_cast<i64>(order.size());
    order.resize(base + idx.size());
    std::vector<i64> fill(start.begin(), start.end() - 1);
    for (size_t k = 0; k < idx.size(); ++k) order[base + fill[bin_of[k]]++] = idx[k];
    for (i64 b = 1; b <= nb; ++b) offsets.push_back(base + start[b]);
}

py::tuple order_result(std::vector<i64>&& order, std::vector<i64>&& offsets) {
    return py::make_tuple(to_numpy(std::move(order)), to_numpy(std::move(offsets)));
}

}  // namespace

py::array_t<i64> shuffle(i64 n, u64 seed) {
    std::vector<i64> perm;
    {
        py::gil_scoped_release nogil;
        perm = permutation(n, seed);
    }
    return to_numpy(std::move(perm));
}

py::tuple pack_padding(const Lengths& lengths, i64 capacity) {
    checked(lengths, capacity);
    i64 n = lengths.shape(0);
    std::vector<i64> order(n), offsets(n + 1);
    std::iota(order.begin(), order.end(), 0);
    std::iota(offsets.begin(), offsets.end(), 0);
    return order_result(std::move(order), std::move(offsets));
}

py::tuple pack_greedy(const Lengths& lengths, i64 capacity) {
    const i64* L = checked(lengths, capacity);
    i64 n = lengths.shape(0);
    std::vector<i64> order, offsets{0};
    {
        py::gil_scoped_release nogil;
        order = sort_desc(L, n, capacity);
        i64 fill = 0;
        for (i64 k = 0; k < n; ++k) {
            i64 len = L[order[k]];
            if (fill + len > capacity) { offsets.push_back(k); fill = 0; }
            fill += len;
        }
        if (n > 0) offsets.push_back(n);
    }
    return order_result(std::move(order), std::move(offsets));
}

py::tuple pack_bfd(const Lengths& lengths, i64 capacity) {
    const i64* L = checked(lengths, capacity);
    i64 n = lengths.shape(0);
    std::vector<i64> order, offsets{0};
    {
        py::gil_scoped_release nogil;
        std::vector<i64> idx = sort_desc(L, n, capacity);
        BestFit fit(capacity);
        bfd_into(L, idx, fit, order, offsets);
    }
    return order_result(std::move(order), std::move(offsets));
}

py::tuple pack_windowed_bfd(const Lengths& lengths, i64 capacity, i64 window, u64 seed) {
    const i64* L = checked(lengths, capacity);
    if (window < 1) throw std::invalid_argument("window must be >= 1");
    i64 n = lengths.shape(0);
    std::vector<i64> order, offsets{0};
    {
        py::gil_scoped_release nogil;
        order.reserve(n);
        std::vector<i64> perm = permutation(n, seed);
        BestFit fit(capacity);
        std::vector<i64> idx;
        for (i64 w0 = 0; w0 < n; w0 += window) {
            i64 w1 = std::min(n, w0 + window);
            // Positions in the shuffled order, longest first; ties keep shuffled order.
            idx.resize(w1 - w0);
            std::iota(idx.begin(), idx.end(), w0);
            std::stable_sort(idx.begin(), idx.end(),
                             [&](i64 a, i64 b) { return L[perm[a]] > L[perm[b]]; });
            for (auto& p : idx) p = perm[p];
            fit.reset();
            bfd_into(L, idx, fit, order, offsets);
        }
    }
    return order_result(std::move(order), std::move(offsets));
}

// Best-fit decreasing inside each group [group_offsets[g], group_offsets[g + 1]) of items, in
// the given item order (per-step packing: a group is one optimizer step's conversations).
// Longest first inside a group, ties by position; bins never span groups. Returns
// (order, seq_offsets, group_seq_offsets): group g holds sequences
// group_seq_offsets[g] .. group_seq_offsets[g + 1].
py::tuple pack_bfd_groups(const Lengths& lengths, const Lengths& group_offsets, i64 capacity) {
    const i64* L = checked(lengths, capacity);
    i64 n = lengths.shape(0);
    if (group_offsets.ndim() != 1 || group_offsets.shape(0) < 1)
        throw std::invalid_argument("group_offsets must be 1-D, non-empty");
    const i64* G = group_offsets.data();
    i64 ng = group_offsets.shape(0) - 1;
    if (G[0] != 0 || G[ng] != n) throw std::invalid_argument("group_offsets must run from 0 to len(lengths)");
    for (i64 g = 0; g < ng; ++g)
        if (G[g + 1] < G[g]) throw std::invalid_argument("group_offsets must be non-decreasing");
    std::vector<i64> order, offsets{0}, group_seq{0};
    {
        py::gil_scoped_release nogil;
        order.reserve(n);
        BestFit fit(capacity);
        std::vector<i64> idx;
        for (i64 g = 0; g < ng; ++g) {
            idx.resize(G[g + 1] - G[g]);
            std::iota(idx.begin(), idx.end(), G[g]);
            std::stable_sort(idx.begin(), idx.end(), [&](i64 a, i64 b) { return L[a] > L[b]; });
            fit.reset();
            bfd_into(L, idx, fit, order, offsets);
            group_seq.push_back(static_cast<i64>(offsets.size()) - 1);
        }
    }
    return py::make_tuple(to_numpy(std::move(order)), to_numpy(std::move(offsets)), to_numpy(std::move(group_seq)));
}

// Shuffle, lay items end to end, cut every `capacity` tokens. Returns per piece the item,
// the token range inside it, the sequence offsets, and how many items were cut.
py::tuple pack_random(const Lengths& lengths, i64 capacity, u64 seed) {
    const i64* L = checked(lengths, capacity);
    i64 n = lengths.shape(0);
    std::vector<i64> item, lo, hi, offsets{0};
    i64 num_split = 0;
    {
        py::gil_scoped_release nogil;
        std::vector<i64> perm = permutation(n, seed);
        item.reserve(n + n / 4);
        lo.reserve(n + n / 4);
        hi.reserve(n + n / 4);
        i64 fill = 0;
        for (i64 k = 0; k < n; ++k) {
            i64 it = perm[k], len = L[it], off = 0, pieces = 0;
            while (off < len) {
                i64 take = std::min(len - off, capacity - fill);
                item.push_back(it);
                lo.push_back(off);
                hi.push_back(off + take);
                ++pieces;
                off += take;
                fill += take;
                if (fill == capacity) { offsets.push_back(static_cast<i64>(item.size())); fill = 0; }
            }
            if (pieces > 1) ++num_split;
        }
        if (fill > 0) offsets.push_back(static_cast<i64>(item.size()));
    }
    return py::make_tuple(to_numpy(std::move(item)), to_numpy(std::move(lo)), to_numpy(std::move(hi)),
                          to_numpy(std::move(offsets)), num_split);
}

// The cut-at-turns over-long policy: cut each conversation at turn starts, taking as many
// whole turns per item as fit; a turn longer than capacity is cut every capacity tokens.
// Conversation k has turn starts values[offsets[k]:offsets[k+1]]. Returns per item the
// conversation (index into lengths), start, end, and the number of cuts inside a turn.
py::tuple cut_at_turns(const Lengths& lengths, const Lengths& turn_offsets, const Lengths& turn_values,
                      i64 capacity) {
    if (capacity < 1) throw std::invalid_argument("max_seq_length must be >= 1");
    i64 n = lengths.shape(0);
    if (turn_offsets.ndim() != 1 || turn_offsets.shape(0) != n + 1)
        throw std::invalid_argument("turn_offsets must have len(lengths) + 1 entries");
    const i64 *L = lengths.data(), *off = turn_offsets.data(), *val = turn_values.data();
    if (n > 0 && (off[0] < 0 || off[n] > turn_values.shape(0)))
        throw std::invalid_argument("turn_offsets point outside turn_values");
    std::vector<i64> owner, start, end;
    i64 inside = 0;
    {
        py::gil_scoped_release nogil;
        std::vector<i64> bounds;
        for (i64 k = 0; k < n; ++k) {
            i64 len = L[k];
            bounds.clear();
            for (i64 t = off[k]; t < off[k + 1]; ++t)
                if (val[t] > 0 && val[t] < len) bounds.push_back(val[t]);
            bounds.push_back(len);
            std::sort(bounds.begin(), bounds.end());
            bounds.erase(std::unique(bounds.begin(), bounds.end()), bounds.end());
            i64 pos = 0;
            size_t b = 0;
            while (pos < len) {
                while (b < bounds.size() && bounds[b] <= pos) ++b;
                size_t j = b;
                while (j < bounds.size() && bounds[j] - pos <= capacity) ++j;
                i64 next = j > b ? bounds[j - 1] : pos + capacity;
                if (j == b) ++inside;
                owner.push_back(k);
                start.push_back(pos);
                end.push_back(next);
                pos = next;
            }
        }
    }
    return py::make_tuple(to_numpy(std::move(owner)), to_numpy(std::move(start)), to_numpy(std::move(end)),
                          inside);
}

// The blend schedule (megatron_pack/data/blend.py): the source of each of n draws, for sources
// with shares w_d (weights, or sizes when every sequence is read once; S = sum w_d, k sources
// with w_d > 0, delta = 1 / max(2k - 2, 1)). Draw t (1-based) may take source d only while
// count_d + delta <= t w_d / S (drawn, d is at most 1 - delta sequences ahead of its share), and
// takes among those the one whose next sequence is due first: the smallest
// (count_d + 1 - delta) / w_d (the time d would lag by more than 1 - delta), ties to the lower
// id. Tijdeman (1980, the chairman assignment problem) shows a schedule within 1 - delta of
// every share on both sides exists for any weights, so earliest deadline first -- optimal for
// unit jobs with release times and deadlines -- finds one. In integers: m = 1 / delta, release
// (m c + 1) S <= m t w_d, deadline key (m (c + 1) - 1) / w_d. Should float rounding leave no
// source released at the boundary, the draw falls back to c S < t w_d (still < 1 ahead).
// With two sources the rule is exactly the largest deficit w_d t - c_d S (Megatron-Core's, the
// one used before; ties to the lower id), so two-source blends use that arithmetic and keep
// their order bit for bit (float rounding would otherwise break exact ties differently).
// P is the product type: exact for integer sizes (__int128), IEEE double for weights.
template <typename T, typename P>
py::array_t<int32_t> blend_schedule(const py::array_t<T, py::array::c_style | py::array::forcecast>& shares, i64 n) {
    if (shares.ndim() != 1 || shares.shape(0) < 1) throw std::invalid_argument("shares must be 1-D and non-empty");
    if (n < 0) throw std::invalid_argument("n must be >= 0");
    const int k = static_cast<int>(shares.shape(0));
    const T* w = shares.data();
    T total = 0;
    int positive = 0;
    for (int d = 0; d < k; ++d) {
        if (!(w[d] >= 0)) throw std::invalid_argument("shares must be >= 0");
        total += w[d];
        positive += w[d] > 0;
    }
    if (!(total > 0)) throw std::invalid_argument("shares must not all be 0");
    const P m = positive > 1 ? P(2 * positive - 2) : P(1);
    py::array_t<int32_t> out(static_cast<py::ssize_t>(n));
    int32_t* o = out.mutable_data();
    bool stuck = false;
    {
        py::gil_scoped_release nogil;
        std::vector<i64> count(k, 0);
        auto earlier = [&](int a, int b) {  // a's next sequence is due before b's
            return (m * P(count[a] + 1) - 1) * P(w[b]) < (m * P(count[b] + 1) - 1) * P(w[a]);
        };
        for (i64 t = 1; t <= n; ++t) {
            int best = -1;
            if (positive == 2) {  // the rule is the largest deficit here: today's arithmetic, bit for bit
                for (int d = 0; d < k; ++d)
                    if (w[d] > 0 && (best < 0 || P(w[d]) * P(t) - P(count[d]) * P(total) >
                                                     P(w[best]) * P(t) - P(count[best]) * P(total)))
                        best = d;
                o[t - 1] = best;
                ++count[best];
                continue;
            }
            for (int d = 0; d < k; ++d)
                if (w[d] > 0 && (m * P(count[d]) + 1) * P(total) <= m * P(t) * P(w[d]) && (best < 0 || earlier(d, best)))
                    best = d;
            if (best < 0)  // float rounding at the boundary only: the plain bound, < 1 ahead
                for (int d = 0; d < k; ++d)
                    if (P(count[d]) * P(total) < P(t) * P(w[d]) && (best < 0 || earlier(d, best))) best = d;
            if (best < 0) { stuck = true; break; }  // cannot happen: the counts sum to t - 1 < t
            o[t - 1] = best;
            ++count[best];
        }
    }
    if (stuck) throw std::runtime_error("blend schedule: no source behind its share");
    return out;
}

PYBIND11_MODULE(_packing, m) {
    m.doc() = "megatron_pack packing engine (C++): the hot loops behind megatron_pack.data.packing";
    m.def("shuffle", &shuffle, py::arg("n"), py::arg("seed"),
          "Fisher-Yates permutation of range(n) driven by splitmix64(seed).");
    m.def("pack_padding", &pack_padding, py::arg("lengths"), py::arg("capacity"),
          "One item per sequence. Returns (order, seq_offsets).");
    m.def("pack_greedy", &pack_greedy, py::arg("lengths"), py::arg("capacity"),
          "Sort descending; append while it fits, else open a new sequence. Returns (order, seq_offsets).");
    m.def("pack_bfd", &pack_bfd, py::arg("lengths"), py::arg("capacity"),
          "Best-fit decreasing, O(n log capacity). Returns (order, seq_offsets).");
    m.def("pack_windowed_bfd", &pack_windowed_bfd, py::arg("lengths"), py::arg("capacity"),
          py::arg("window"), py::arg("seed"),
          "Shuffle, then best-fit decreasing inside each window of `window` items. Returns (order, seq_offsets).");
    m.def("pack_bfd_groups", &pack_bfd_groups, py::arg("lengths"), py::arg("group_offsets"), py::arg("capacity"),
          "Best-fit decreasing inside each group of consecutive items. "
          "Returns (order, seq_offsets, group_seq_offsets).");
    m.def("pack_random", &pack_random, py::arg("lengths"), py::arg("capacity"), py::arg("seed"),
          "Shuffle, concatenate, cut every capacity tokens. Returns (item, lo, hi, seq_offsets, num_split_items).");
    m.def("cut_at_turns", &cut_at_turns, py::arg("lengths"), py::arg("turn_offsets"), py::arg("turn_values"),
          py::arg("capacity"),
          "Cut over-long conversations at turn starts. Returns (owner, start, end, num_in_turn_cuts).");
    m.def("blend_schedule_sizes", &blend_schedule<i64, __int128>, py::arg("sizes"), py::arg("n"),
          "Blend schedule for integer shares (exact). Returns the int32 source id of each draw.");
    m.def("blend_schedule_weights", &blend_schedule<double, double>, py::arg("weights"), py::arg("n"),
          "Blend schedule for float weights. Returns the int32 source id of each draw.");
}
