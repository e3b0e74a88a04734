// The per-row half of the similarity kernel: a numerically stable softmax (or sigmoid) over all C labels and
// the top-k labels by score, ties broken by label order. Written once, for the GPU and the host.
//
// Every function here is __host__ __device__, and the row algorithm `softmax_topk_row` is a template over a
// `Block` (thread id, block size, barrier, atomic adds). On the GPU the block is a CUDA thread block
// (similarity.cu); in the tests it is a pool of host threads with a std::barrier
// (tests/service/kernels/host_block.cu), so the exact code the GPU runs, reductions, tails and tie handling
// included, is checked against numpy on a machine without a GPU.
//
// The row algorithm reads one row of cosines [C] (fp32, written by the logits GEMM) five times:
//   1. running (max, sum of exp) of the logits, merged over threads in a fixed tree; histogram of the top 8
//      bits of each cosine's order key (radix select, pass 1)
//   2-4. histograms of the next 8 bits among keys sharing the prefix found so far; after pass 4 the exact key
//      of the k-th largest cosine (the threshold), how many keys lie above it and how many equal it are known.
//      A pass whose bin holds exactly the places left ends the search early: every key with that prefix is in.
//   5. gather: keys above the threshold, plus the lowest-indexed keys equal to it (an ordered block scan, only
//      when there are more equal keys than places left); optionally the full probability row
// then ranks the k candidates by (score descending, label index ascending) and writes them in that order.
// Radix select instead of per-thread top-k lists: k goes up to 100, and per-thread lists of 100 would live in
// local memory; five reads of a row that sits in L2 cost less.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#ifdef __CUDACC__
#define CS_HD __host__ __device__ __forceinline__
// The templates below call the Block's methods, which are __device__ only for the CUDA block and host only for
// the test block: tell nvcc not to check the other side of each instantiation.
#define CS_EXEC_CHECK_DISABLE _Pragma("nv_exec_check_disable")
#else
#define CS_HD inline
#define CS_EXEC_CHECK_DISABLE
#endif

namespace clipserve {

// Threads per row block (a power of two: the tree reduction and the scan assume one). The row passes are bound by
// load latency, not bandwidth: more warps per block keep more loads in flight.
constexpr int kRowThreads = 512;
constexpr int kMaxTopK = 128;     // the service asks for k <= 100; larger k (or all labels) takes the full row
constexpr int kRadixBits = 8;
constexpr int kRadixBins = 1 << kRadixBits;

enum Activation : int { kSoftmax = 0, kSigmoid = 1 };

CS_HD float exp_f32(float x) {
#ifdef __CUDA_ARCH__
  return expf(x);  // full-precision expf (no --use_fast_math): within 2 ulp
#else
  return std::exp(x);
#endif
}

CS_HD uint32_t float_bits(float x) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(x);
#else
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return bits;
#endif
}

// An unsigned key that sorts like the float: flip all bits of negatives, only the sign bit of positives.
// -0 is first turned into +0 so the two zeros tie, as they do for numpy; NaN (never produced from finite
// embeddings) gets key 0 so it can never enter a top-k ahead of a number.
CS_HD uint32_t order_key(float x) {
  if (x != x) return 0u;
  const uint32_t bits = float_bits(x + 0.0f);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// Running softmax denominator: the largest logit seen and the sum of exp(logit - max). A state with sum 0 is
// empty (any element contributes exp(0) = 1 for the maximum), so merging never computes exp(-inf - -inf).
// (Logits are finite: they come from unit vectors times a finite scale.)
struct SoftmaxState {
  float max;
  float sum;
};

CS_HD SoftmaxState softmax_empty() { return SoftmaxState{-3.402823466e38f, 0.0f}; }

CS_HD SoftmaxState softmax_push(SoftmaxState s, float logit) {
  if (s.sum == 0.0f) return SoftmaxState{logit, 1.0f};
  if (logit <= s.max) return SoftmaxState{s.max, s.sum + exp_f32(logit - s.max)};
  return SoftmaxState{logit, s.sum * exp_f32(s.max - logit) + 1.0f};
}

CS_HD SoftmaxState softmax_merge(SoftmaxState a, SoftmaxState b) {
  if (a.sum == 0.0f) return b;
  if (b.sum == 0.0f) return a;
  const float m = a.max > b.max ? a.max : b.max;
  return SoftmaxState{m, a.sum * exp_f32(a.max - m) + b.sum * exp_f32(b.max - m)};
}

CS_HD float logit_of(float cosine, float scale, float bias) { return scale * cosine + bias; }

CS_HD float probability(float logit, SoftmaxState s, int activation) {
  if (activation == kSigmoid) return 1.0f / (1.0f + exp_f32(-logit));
  return exp_f32(logit - s.max) / s.sum;
}

// One radix-select step: given the histogram of the current digit among keys that share the prefix found so far,
// the digit (bin) that holds the k-th largest of them (k counts from 1), how many of them lie in higher bins,
// and how many are in the bin itself.
struct RadixStep {
  uint32_t bin;
  uint32_t above;   // keys with the prefix and a higher digit: all of them are in the top k
  uint32_t in_bin;  // keys with the prefix and this digit
};

CS_HD RadixStep radix_select_bin(const uint32_t* histogram, uint32_t k) {
  uint32_t above = 0;
  for (int bin = kRadixBins - 1; bin > 0; --bin) {
    if (above + histogram[bin] >= k) return RadixStep{static_cast<uint32_t>(bin), above, histogram[bin]};
    above += histogram[bin];
  }
  return RadixStep{0u, above, histogram[0]};
}

// The ranking order: higher key first, then lower label index. A strict total order, so ranks are unique.
CS_HD bool ranks_before(uint32_t key_a, int32_t index_a, uint32_t key_b, int32_t index_b) {
  return key_a > key_b || (key_a == key_b && index_a < index_b);
}

// Shared memory of one row block.
struct RowShared {
  uint32_t histogram[kRadixBins];
  SoftmaxState partial[kRowThreads];
  uint32_t scan[kRowThreads];
  float candidate_cosine[kMaxTopK];
  int32_t candidate_index[kMaxTopK];
  uint32_t above_count;  // gather slots for keys above the threshold
  uint32_t tie_count;    // gather slots for keys equal to it (the unordered fast path)
  RadixStep step;        // broadcast of thread 0's radix step
};

// Tree reduction of the threads' softmax states in a fixed order (so a row's result does not depend on timing).
CS_EXEC_CHECK_DISABLE
template <class Block>
CS_HD SoftmaxState reduce_softmax(Block& block, RowShared& shared, SoftmaxState mine) {
  const int t = block.thread(), n = block.size();
  shared.partial[t] = mine;
  block.sync();
  for (int stride = n / 2; stride > 0; stride /= 2) {
    if (t < stride) shared.partial[t] = softmax_merge(shared.partial[t], shared.partial[t + stride]);
    block.sync();
  }
  const SoftmaxState total = shared.partial[0];
  block.sync();  // partial[] is free again only once everyone has read the total
  return total;
}

// Exclusive prefix sum of one flag per thread (Hillis-Steele in shared memory); returns this thread's offset
// and sets `total`. Used only to break ties by label order, which is rare, so simplicity wins over speed.
CS_EXEC_CHECK_DISABLE
template <class Block>
CS_HD uint32_t exclusive_scan(Block& block, RowShared& shared, uint32_t flag, uint32_t& total) {
  const int t = block.thread(), n = block.size();
  shared.scan[t] = flag;
  block.sync();
  for (int offset = 1; offset < n; offset *= 2) {
    const uint32_t add = t >= offset ? shared.scan[t - offset] : 0u;
    block.sync();
    shared.scan[t] += add;
    block.sync();
  }
  total = shared.scan[n - 1];
  const uint32_t inclusive = shared.scan[t];
  block.sync();
  return inclusive - flag;
}

// Four floats at once: a 16-byte load on the GPU, plain reads on the host.
CS_HD void load4(const float* address, float* out) {
#ifdef __CUDA_ARCH__
  const float4 v = *reinterpret_cast<const float4*>(address);
  out[0] = v.x, out[1] = v.y, out[2] = v.z, out[3] = v.w;
#else
  std::memcpy(out, address, 4 * sizeof(float));
#endif
}

// visit(i, cosines[i]) for this thread's share of the row: 16-byte loads of four neighbours where the row is
// 16-byte aligned (the workspace pads rows to a multiple of four), then the tail; index order within a thread is
// not kept, and nothing below needs it (the ordered tie scan reads elements itself).
CS_EXEC_CHECK_DISABLE
template <class Block, class Visit>
CS_HD void for_each_cosine(const Block& block, const float* cosines, int count, const Visit& visit) {
  const int t = block.thread(), n = block.size();
  int start = 0;
  if (reinterpret_cast<uintptr_t>(cosines) % 16 == 0) {
    const int quads = count / 4;
    for (int q = t; q < quads; q += n) {
      float four[4];
      load4(cosines + 4 * q, four);
      for (int j = 0; j < 4; ++j) visit(4 * q + j, four[j]);
    }
    start = quads * 4;
  }
  for (int i = start + t; i < count; i += n) visit(i, cosines[i]);
}

// What a radix pass does with each cosine: count its digit if its key has the prefix found so far, and on the
// first pass also push its logit into the thread's softmax state. (Visitors are structs, not lambdas: nvcc's
// host/device checks cannot be switched off for a lambda, and the host test block is host-only.)
template <class Block>
struct HistogramVisit {
  Block& block;
  RowShared& shared;
  uint32_t prefix, mask;
  int shift;
  bool first_pass;
  float scale, bias;
  SoftmaxState& mine;

  CS_EXEC_CHECK_DISABLE
  CS_HD void operator()(int, float cosine) const {
    if (first_pass) mine = softmax_push(mine, logit_of(cosine, scale, bias));
    const uint32_t key = order_key(cosine);
    if ((key & mask) == prefix) block.histogram_add(shared.histogram, (key >> shift) & (kRadixBins - 1));
  }
};

// What the gather pass does with each cosine: claim a candidate slot if it is in the top k (unless ties must be
// taken in label order, done after), and write its probability when the full row is wanted.
template <class Block>
struct GatherVisit {
  Block& block;
  RowShared& shared;
  uint32_t threshold, mask, above;
  bool ordered_ties;
  float scale, bias;
  int activation;
  SoftmaxState softmax;
  float* probabilities;

  CS_EXEC_CHECK_DISABLE
  CS_HD void operator()(int i, float cosine) const {
    const uint32_t key = order_key(cosine) & mask;
    int slot = -1;
    if (key > threshold) {
      slot = static_cast<int>(block.atomic_add(&shared.above_count, 1u));
    } else if (key == threshold && !ordered_ties) {
      slot = static_cast<int>(above + block.atomic_add(&shared.tie_count, 1u));
    }
    if (slot >= 0) {
      shared.candidate_cosine[slot] = cosine;
      shared.candidate_index[slot] = i;
    }
    if (probabilities) probabilities[i] = probability(logit_of(cosine, scale, bias), softmax, activation);
  }
};

// One radix pass: histogram of digit `shift` among keys matching `prefix` under `mask`; thread 0 picks the bin.
CS_EXEC_CHECK_DISABLE
template <class Block>
CS_HD RadixStep radix_pass(Block& block, RowShared& shared, const float* cosines, int count, uint32_t prefix,
                           uint32_t mask, int shift, uint32_t k, SoftmaxState* softmax, float scale, float bias) {
  const int t = block.thread(), n = block.size();
  for (int bin = t; bin < kRadixBins; bin += n) shared.histogram[bin] = 0u;
  block.sync();
  SoftmaxState mine = softmax_empty();
  for_each_cosine(block, cosines, count,
                  HistogramVisit<Block>{block, shared, prefix, mask, shift, softmax != nullptr, scale, bias, mine});
  if (softmax) *softmax = reduce_softmax(block, shared, mine);  // its barriers also complete the histogram
  block.sync();
  if (t == 0) shared.step = radix_select_bin(shared.histogram, k);
  block.sync();
  const RadixStep step = shared.step;
  block.sync();
  return step;
}

// The whole row: top-k (cosine, probability, index) in rank order, and optionally every label's probability.
// Requires 1 <= k <= min(count, kMaxTopK) and block.size() a power of two <= kRowThreads.
CS_EXEC_CHECK_DISABLE
template <class Block>
CS_HD void softmax_topk_row(Block& block, RowShared& shared, const float* cosines, int count, int k, float scale,
                            float bias, int activation, float* top_cosine, float* top_probability,
                            int32_t* top_index, float* probabilities) {
  const int t = block.thread(), n = block.size();

  // Passes 1-4: the softmax state and the exact key of the k-th largest cosine.
  SoftmaxState softmax = softmax_empty();
  uint32_t prefix = 0u, mask = 0u, wanted = static_cast<uint32_t>(k), above = 0u, ties = 0u;
  for (int shift = 32 - kRadixBits; shift >= 0; shift -= kRadixBits) {
    const RadixStep step = radix_pass(block, shared, cosines, count, prefix, mask, shift, wanted,
                                      shift == 32 - kRadixBits ? &softmax : nullptr, scale, bias);
    prefix |= step.bin << shift;
    mask |= static_cast<uint32_t>(kRadixBins - 1) << shift;
    above += step.above;
    wanted -= step.above;  // places left for keys in this bin
    ties = step.in_bin;
    if (ties == wanted) break;  // the bin fills the places exactly: no need to look at lower digits
  }
  // Now, comparing keys under `mask` (all 32 bits unless the search ended early): `above` keys (< k) are larger
  // than the threshold `prefix`, `ties` keys equal it, and the top k takes `wanted` (1..ties) of those, the ones
  // with the lowest label indices. Fewer places than equal keys only happens with the full key (a real tie).
  const uint32_t threshold = prefix;
  const bool ordered_ties = ties > wanted;

  // Pass 5: gather candidates (and the full probability row).
  if (t == 0) shared.above_count = shared.tie_count = 0u;
  block.sync();
  for_each_cosine(block, cosines, count,
                  GatherVisit<Block>{block, shared, threshold, mask, above, ordered_ties, scale, bias, activation,
                                     softmax, probabilities});
  if (ordered_ties) {
    // More equal keys than places: take them in label order, one tile of n labels at a time.
    uint32_t taken = 0u;
    for (int base = 0; base < count && taken < wanted; base += n) {
      const int i = base + t;
      const uint32_t flag = (i < count && order_key(cosines[i]) == threshold) ? 1u : 0u;
      uint32_t tile_total = 0u;
      const uint32_t position = taken + exclusive_scan(block, shared, flag, tile_total);
      if (flag && position < wanted) {
        shared.candidate_cosine[above + position] = cosines[i];
        shared.candidate_index[above + position] = i;
      }
      taken += tile_total;
    }
  }
  block.sync();

  // Rank the k candidates (each against all others: k <= 128, so at most 16k comparisons) and write in order.
  for (int c = t; c < k; c += n) {
    const uint32_t key = order_key(shared.candidate_cosine[c]);
    const int32_t index = shared.candidate_index[c];
    int rank = 0;
    for (int other = 0; other < k; ++other) {
      rank += ranks_before(order_key(shared.candidate_cosine[other]), shared.candidate_index[other], key, index);
    }
    const float cosine = shared.candidate_cosine[c];
    top_cosine[rank] = cosine;
    top_probability[rank] = probability(logit_of(cosine, scale, bias), softmax, activation);
    top_index[rank] = index;
  }
  block.sync();
}

}  // namespace clipserve
