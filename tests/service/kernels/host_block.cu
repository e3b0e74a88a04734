// The similarity kernel's row algorithm on the host: a CUDA thread block played by host threads.
//
// HostBlock gives softmax_topk_row (service/kernels/similarity.cuh) what CudaBlock gives it on the GPU: a thread
// id, the block size, a barrier (std::barrier) and an atomic add on shared memory. Each of `threads` host threads
// runs the same templated code the GPU runs, over the same strided indices, meeting at the same barriers, so the
// tests exercise reductions, tails (C not a multiple of the block) and tie handling without a GPU.
// Compiled by nvcc as host code (tests/service/kernels/test_row_logic.py), so the __host__ __device__ functions
// are the ones nvcc also compiles for the device.
#include <barrier>
#include <cstdint>
#include <thread>
#include <vector>

#include "similarity.cuh"

namespace {

struct HostBlock {
  int id;
  int count;
  std::barrier<>* barrier;
  int thread() const { return id; }
  int size() const { return count; }
  void sync() const { barrier->arrive_and_wait(); }
  uint32_t atomic_add(uint32_t* address, uint32_t value) const {
    return __atomic_fetch_add(address, value, __ATOMIC_RELAXED);
  }
  void histogram_add(uint32_t* histogram, uint32_t bin) const { atomic_add(&histogram[bin], 1u); }
};

}  // namespace

extern "C" {

// Rows of cosines (`stride` floats apart) -> top-k per row, as clipserve_softmax_topk writes them. Returns 0, or -1 for
// arguments the kernel does not take.
int host_softmax_topk(const float* cosines, int stride, int rows, int count, int k, float scale, float bias,
                      int activation, int threads, float* top_cosine, float* top_probability, int32_t* top_index,
                      float* probabilities) {
  if (threads < 1 || threads > clipserve::kRowThreads || (threads & (threads - 1)) != 0) return -1;
  if (k < 1 || k > count || k > clipserve::kMaxTopK) return -1;
  clipserve::RowShared shared;
  std::barrier<> barrier(threads);
  std::vector<std::thread> pool;
  for (int id = 0; id < threads; ++id) {
    pool.emplace_back([&, id] {
      HostBlock block{id, threads, &barrier};
      for (int row = 0; row < rows; ++row) {
        const size_t top = static_cast<size_t>(row) * k;
        clipserve::softmax_topk_row(block, shared, cosines + static_cast<size_t>(row) * stride, count, k, scale,
                                    bias, activation, top_cosine + top, top_probability + top, top_index + top,
                                    probabilities ? probabilities + static_cast<size_t>(row) * count : nullptr);
      }
    });
  }
  for (auto& thread : pool) thread.join();
  return 0;
}

uint32_t host_order_key(float x) { return clipserve::order_key(x); }

// Pushes `count` logits one by one into a running state, as one GPU thread does over its stride.
void host_softmax_push(const float* logits, int count, float* max, float* sum) {
  clipserve::SoftmaxState state = clipserve::softmax_empty();
  for (int i = 0; i < count; ++i) state = clipserve::softmax_push(state, logits[i]);
  *max = state.max;
  *sum = state.sum;
}

void host_softmax_merge(float max_a, float sum_a, float max_b, float sum_b, float* max, float* sum) {
  const clipserve::SoftmaxState merged = clipserve::softmax_merge({max_a, sum_a}, {max_b, sum_b});
  *max = merged.max;
  *sum = merged.sum;
}

void host_radix_select_bin(const uint32_t* histogram, uint32_t k, uint32_t* bin, uint32_t* above, uint32_t* in_bin) {
  const clipserve::RadixStep step = clipserve::radix_select_bin(histogram, k);
  *bin = step.bin;
  *above = step.above;
  *in_bin = step.in_bin;
}

}  // extern "C"
