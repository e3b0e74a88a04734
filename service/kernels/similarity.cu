// The CUDA similarity kernel: image embeddings [B, D] x label matrix [C, D] -> per image the top-k labels
// (cosine, probability, index), optionally every label's probability. Loaded by service/gpu/similarity.py through
// the CUDA driver API on raw device pointers, so it runs on buffers owned by TensorRT, ONNX Runtime, CuPy or torch.
//
// Two launches, and why the split is here:
//   clipserve_cosines_*      a tiled GEMM, tensor cores (WMMA, fp32 accumulation) for fp16/bf16 and plain fp32
//                            FMA for fp32 (TF32 would cost the 1e-5 parity with the CPU path), writing cosines
//                            [B, C] fp32 to a workspace;
//   clipserve_softmax_topk   one block per image over its whole row (similarity.cuh).
// The softmax needs the maximum over all C labels and the top-k needs every label, but a GEMM block sees only
// a 64-label slice: fusing would mean per-slice partial states and up to k candidates per slice (100 x 1,563
// slices x B rows at C = 100,000) merged afterwards, more traffic than re-reading cosines that are still in L2.
// The host side bounds the workspace by launching in groups of rows.
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include "similarity.cuh"

namespace clipserve {

struct CudaBlock {
  __device__ int thread() const { return static_cast<int>(threadIdx.x); }
  __device__ int size() const { return static_cast<int>(blockDim.x); }
  __device__ void sync() const { __syncthreads(); }
  __device__ uint32_t atomic_add(uint32_t* address, uint32_t value) const { return atomicAdd(address, value); }
  // Cosines of one row are close together, so most keys of a radix pass fall into one bin: plain atomics would
  // serialise 32 ways per warp. Lanes with the same bin add once, by their count.
  __device__ void histogram_add(uint32_t* histogram, uint32_t bin) const {
    namespace cg = cooperative_groups;
    const cg::coalesced_group active = cg::coalesced_threads();
    const cg::coalesced_group same = cg::labeled_partition(active, bin);
    if (same.thread_rank() == 0) atomicAdd(&histogram[bin], same.size());
  }
};

// The cosine workspace: rows `stride` floats apart, stride a multiple of kLabelTile (64) and the rows allocated
// rounded up to whole image tiles, so a GEMM block stores its full tile without bounds checks (padding is never
// read) and every row starts 16-byte aligned for the row passes' 16-byte loads.
constexpr int kLabelTile = 64;  // labels per GEMM block
constexpr int kFmaImageTile = 64;    // images per fp32 GEMM block
constexpr int kWmmaImageTile = 128;  // images per fp16/bf16 GEMM block

// Grids put image tiles on x: the blocks that share a label tile run next to each other, so each label tile comes
// from HBM once and from L2 for the other image tiles (labels are the big operand: C x D against B x D).

// fp32: 256 threads, each a 4x4 sub-tile of a 64 x 64 tile, operands staged through shared memory 16 dimensions
// at a time.
__device__ void cosines_fma(const float* images, const float* labels, int rows, int count, int dim, float* cosines,
                            int stride) {
  constexpr int kDepth = 16;
  __shared__ float image_tile[kDepth][kFmaImageTile + 4];  // [d][image]: the +4 keeps the 4-wide reads conflict-free
  __shared__ float label_tile[kDepth][kLabelTile + 4];
  const int t = static_cast<int>(threadIdx.x);
  const int row0 = static_cast<int>(blockIdx.x) * kFmaImageTile, col0 = static_cast<int>(blockIdx.y) * kLabelTile;
  const int tm = (t / 16) * 4, tn = (t % 16) * 4;
  // 16-byte loads when every row starts 16-byte aligned (D a multiple of 4 and aligned bases, as engine outputs
  // are); element loads otherwise. The branch is uniform across the grid.
  const bool vector = dim % 4 == 0 && (reinterpret_cast<uintptr_t>(images) | reinterpret_cast<uintptr_t>(labels)) % 16 == 0;
  float acc[4][4] = {};
  for (int d0 = 0; d0 < dim; d0 += kDepth) {
    if (vector) {
      for (int e = t; e < kFmaImageTile * (kDepth / 4); e += 256) {
        const int m = e / (kDepth / 4), part = (e % (kDepth / 4)) * 4, d = d0 + part;
        const int r = row0 + m, c = col0 + m;
        float4 a = make_float4(0.0f, 0.0f, 0.0f, 0.0f), b = a;
        if (r < rows && d < dim) a = *reinterpret_cast<const float4*>(images + static_cast<size_t>(r) * dim + d);
        if (c < count && d < dim) b = *reinterpret_cast<const float4*>(labels + static_cast<size_t>(c) * dim + d);
        image_tile[part][m] = a.x, image_tile[part + 1][m] = a.y, image_tile[part + 2][m] = a.z;
        image_tile[part + 3][m] = a.w;
        label_tile[part][m] = b.x, label_tile[part + 1][m] = b.y, label_tile[part + 2][m] = b.z;
        label_tile[part + 3][m] = b.w;
      }
    } else {
      for (int e = t; e < kFmaImageTile * kDepth; e += 256) {
        const int m = e / kDepth, d = d0 + e % kDepth;
        const int r = row0 + m, c = col0 + m;
        image_tile[e % kDepth][m] = (r < rows && d < dim) ? images[static_cast<size_t>(r) * dim + d] : 0.0f;
        label_tile[e % kDepth][m] = (c < count && d < dim) ? labels[static_cast<size_t>(c) * dim + d] : 0.0f;
      }
    }
    __syncthreads();
#pragma unroll
    for (int d = 0; d < kDepth; ++d) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = image_tile[d][tm + i], b[i] = label_tile[d][tn + i];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j) {
      const int r = row0 + tm + i, c = col0 + tn + j;
      if (r < rows && c < count) cosines[static_cast<size_t>(r) * stride + c] = acc[i][j];
    }
}

// fp16/bf16: 256 threads = 8 warps over a 128 x 64 tile, each warp a 32 x 32 piece as 2 x 2 WMMA 16x16x16 fragments
// with fp32 accumulators; operands staged through shared memory 32 dimensions at a time, zero-padded at the edges
// so any B, C and D work; accumulators stored straight to the (padded) workspace.
//
// With kResiduals the label matrix comes in two halves, [2C, D]: each fp32 label vector rounded to T, then what
// that rounding lost, also in T. Both are multiplied into the same fp32 accumulator, so the labels count at about
// fp32 accuracy (bf16 alone moves probabilities by up to 6e-3 against the CPU path at logit scale 100; high + low
// by about 1e-5) while the image embeddings are exactly what the engine produced, for twice the tensor-core
// work. Without, labels are [C, D] in T: half the work, CPU-path parity only to the rounding of the labels.
template <typename T, bool kResiduals>
__device__ void cosines_wmma(const T* images, const T* labels, int rows, int count, int dim, float* cosines,
                             int stride) {
  using namespace nvcuda;
  constexpr int kDepth = 32, kStride = kDepth + 8;  // +8 halves: rows stay 16-byte aligned, fewer bank conflicts
  constexpr int kThreads = 256;
  __shared__ __align__(32) T image_tile[kWmmaImageTile][kStride];
  __shared__ __align__(32) T label_tile[kLabelTile][kStride];  // [label][d] = the labels' transpose, col-major
  __shared__ __align__(32) T residual_tile[kResiduals ? kLabelTile : 1][kStride];
  const int t = static_cast<int>(threadIdx.x), warp = t / 32;
  const int row0 = static_cast<int>(blockIdx.x) * kWmmaImageTile, col0 = static_cast<int>(blockIdx.y) * kLabelTile;
  const int wm = (warp / 2) * 32, wn = (warp % 2) * 32;
  const T zero = T(0.0f);
  const T* residuals = labels + static_cast<size_t>(count) * dim;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
  // 16-byte loads (8 elements) when every row starts 16-byte aligned, element loads otherwise (uniform branch).
  const bool vector = dim % 8 == 0 && (reinterpret_cast<uintptr_t>(images) | reinterpret_cast<uintptr_t>(labels)) % 16 == 0;
  for (int d0 = 0; d0 < dim; d0 += kDepth) {
    if (vector) {
      constexpr int kParts = kDepth / 8;
      for (int e = t; e < kWmmaImageTile * kParts; e += kThreads) {
        const int m = e / kParts, part = (e % kParts) * 8, d = d0 + part, r = row0 + m;
        uint4 a = make_uint4(0u, 0u, 0u, 0u);  // all-zero bits are +0 in fp16 and bf16
        if (r < rows && d < dim) a = *reinterpret_cast<const uint4*>(images + static_cast<size_t>(r) * dim + d);
        *reinterpret_cast<uint4*>(&image_tile[m][part]) = a;
      }
      for (int e = t; e < kLabelTile * kParts; e += kThreads) {
        const int m = e / kParts, part = (e % kParts) * 8, d = d0 + part, c = col0 + m;
        uint4 b = make_uint4(0u, 0u, 0u, 0u), low = b;
        if (c < count && d < dim) {
          b = *reinterpret_cast<const uint4*>(labels + static_cast<size_t>(c) * dim + d);
          if constexpr (kResiduals) low = *reinterpret_cast<const uint4*>(residuals + static_cast<size_t>(c) * dim + d);
        }
        *reinterpret_cast<uint4*>(&label_tile[m][part]) = b;
        if constexpr (kResiduals) *reinterpret_cast<uint4*>(&residual_tile[m][part]) = low;
      }
    } else {
      for (int e = t; e < kWmmaImageTile * kDepth; e += kThreads) {
        const int m = e / kDepth, d = d0 + e % kDepth, r = row0 + m;
        image_tile[m][e % kDepth] = (r < rows && d < dim) ? images[static_cast<size_t>(r) * dim + d] : zero;
      }
      for (int e = t; e < kLabelTile * kDepth; e += kThreads) {
        const int m = e / kDepth, d = d0 + e % kDepth, c = col0 + m;
        const bool inside = c < count && d < dim;
        label_tile[m][e % kDepth] = inside ? labels[static_cast<size_t>(c) * dim + d] : zero;
        if constexpr (kResiduals) residual_tile[m][e % kDepth] = inside ? residuals[static_cast<size_t>(c) * dim + d] : zero;
      }
    }
    __syncthreads();
#pragma unroll
    for (int d = 0; d < kDepth; d += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b[2], low[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], &image_tile[wm + 16 * i][d], kStride);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        wmma::load_matrix_sync(b[j], &label_tile[wn + 16 * j][d], kStride);
        if constexpr (kResiduals) wmma::load_matrix_sync(low[j], &residual_tile[wn + 16 * j][d], kStride);
      }
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          if constexpr (kResiduals) wmma::mma_sync(acc[i][j], a[i], low[j], acc[i][j]);  // the small part first
          wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
        }
    }
    __syncthreads();
  }
  // Straight to the workspace: its rows cover whole image tiles and its stride whole label tiles, so the full
  // fragments fit; the stride (a multiple of 64 floats) keeps every fragment's address 32-byte aligned. Fragments
  // wholly past B or C are skipped (the condition is the same across the warp): with a few images, writing all
  // 128 rows would multiply the stores many times over.
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int r = row0 + wm + 16 * i, c = col0 + wn + 16 * j;
      if (r < rows && c < count) {
        float* out = cosines + static_cast<size_t>(r) * stride + c;
        wmma::store_matrix_sync(out, acc[i][j], stride, wmma::mem_row_major);
      }
    }
}

}  // namespace clipserve

// Entry points: C names for cuModuleGetFunction. Grids: cosines (image tiles, label tiles), 256 threads; the fp32
// tile is 64 images, the fp16/bf16 tile 128; softmax_topk one block of kRowThreads per image. The fp16/bf16 label
// matrices are [2C, D] (rounded, then residuals) and [C, D] for the *_single variants (see cosines_wmma).
extern "C" __global__ void __launch_bounds__(256) clipserve_cosines_f32(const float* images, const float* labels,
                                                                         int rows, int count, int dim,
                                                                         float* cosines, int stride) {
  clipserve::cosines_fma(images, labels, rows, count, dim, cosines, stride);
}

extern "C" __global__ void __launch_bounds__(256) clipserve_cosines_f16(const __half* images, const __half* labels,
                                                                         int rows, int count, int dim,
                                                                         float* cosines, int stride) {
  clipserve::cosines_wmma<__half, true>(images, labels, rows, count, dim, cosines, stride);
}

extern "C" __global__ void __launch_bounds__(256) clipserve_cosines_bf16(const __nv_bfloat16* images,
                                                                          const __nv_bfloat16* labels, int rows,
                                                                          int count, int dim, float* cosines,
                                                                          int stride) {
  clipserve::cosines_wmma<__nv_bfloat16, true>(images, labels, rows, count, dim, cosines, stride);
}

extern "C" __global__ void __launch_bounds__(256)
    clipserve_cosines_f16_single(const __half* images, const __half* labels, int rows, int count, int dim,
                                 float* cosines, int stride) {
  clipserve::cosines_wmma<__half, false>(images, labels, rows, count, dim, cosines, stride);
}

extern "C" __global__ void __launch_bounds__(256)
    clipserve_cosines_bf16_single(const __nv_bfloat16* images, const __nv_bfloat16* labels, int rows, int count,
                                  int dim, float* cosines, int stride) {
  clipserve::cosines_wmma<__nv_bfloat16, false>(images, labels, rows, count, dim, cosines, stride);
}

// Rows of `cosines` start `stride` floats apart; probabilities (every label's, [rows, count]) may be null.
extern "C" __global__ void __launch_bounds__(clipserve::kRowThreads)
    clipserve_softmax_topk(const float* cosines, int stride, int rows, int count, int k, float scale, float bias,
                           int activation, float* top_cosine, float* top_probability, int* top_index,
                           float* probabilities) {
  __shared__ clipserve::RowShared shared;
  clipserve::CudaBlock block;
  const size_t row = blockIdx.x;
  if (row >= static_cast<size_t>(rows)) return;
  clipserve::softmax_topk_row(block, shared, cosines + row * stride, count, k, scale, bias, activation,
                              top_cosine + row * k, top_probability + row * k, top_index + row * k,
                              probabilities ? probabilities + row * count : nullptr);
}
