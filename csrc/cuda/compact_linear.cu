// compact_linear (CSR, unstructured masks) on CUDA: y = x θᵀ + b with θ = m ⊙ w stored only at the
// active coordinates, formed on the fly from the compact values.
//
//   forward  SpMM over the rows of (crow, col)                       out[b, n] = Σ_j θ_j x[b, col_j]
//   dX       SpMM over the transposed pattern (ccol, row_t), values reached through perm
//   dθ       SDDMM on the pattern: g_j = <dY[:, row_j], X[:, col_j]>, then g_m = g⊙w, g_w = g⊙m
//
// Work ∝ nnz·B. Small batches (B <= kSmallBatch) keep row-major activations: one warp per output row,
// lanes split the row's entries, one accumulator per batch row, warp reduction. Larger batches use
// batch-contiguous activations (the binding transposes): one warp per (output row, 32 batch columns),
// the row's indices and values are loaded 32 at a time by the lanes and broadcast with shuffles, and the
// activation loads are coalesced across the batch.
// Index entries are range-checked as they are read: an out-of-range one is skipped and raises the
// per-device error word (index_error), never dereferenced.
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels.h"

namespace se_cuda {

__device__ int g_index_error;

namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;
constexpr unsigned kFull = 0xffffffffu;

template <typename T>
__device__ __forceinline__ T theta(const T* __restrict__ m, const T* __restrict__ w, int64_t v) {
  return m ? m[v] * w[v] : w[v];
}

__device__ __forceinline__ void flag_error() { atomicOr(&g_index_error, 1); }

// ------------------------------------------------------------------------------- SpMM, small batch

template <typename T>
__global__ void __launch_bounds__(kWarp * kWarpsPerBlock)
    spmm_small_kernel(int B, int64_t nout, int64_t nin, int64_t nnz, const int32_t* __restrict__ ptr,
                      const int32_t* __restrict__ idx, const int32_t* __restrict__ perm, const T* __restrict__ m,
                      const T* __restrict__ w, const T* __restrict__ in, const T* __restrict__ bias,
                      T* __restrict__ out) {
  const int lane = threadIdx.x % kWarp;
  const int64_t r = blockIdx.x * static_cast<int64_t>(kWarpsPerBlock) + threadIdx.x / kWarp;
  if (r >= nout) return;  // whole warp leaves together
  T acc[kSmallBatch];
#pragma unroll
  for (int b = 0; b < kSmallBatch; ++b) acc[b] = T(0);
  int64_t j0 = ptr[r], j1 = ptr[r + 1];
  if (j0 < 0 || j1 > nnz || j0 > j1) {  // corrupt pointers: touch nothing
    if (lane == 0) flag_error();
    j0 = j1 = 0;
  }
  for (int64_t j = j0 + lane; j < j1; j += kWarp) {
    const int64_t c = idx[j];
    const int64_t v = perm ? static_cast<int64_t>(perm[j]) : j;
    if (c < 0 || c >= nin || v < 0 || v >= nnz) {
      flag_error();
      continue;
    }
    const T t = theta(m, w, v);
#pragma unroll
    for (int b = 0; b < kSmallBatch; ++b)
      if (b < B) acc[b] += t * in[b * nin + c];
  }
#pragma unroll
  for (int b = 0; b < kSmallBatch; ++b) {
    if (b >= B) break;
    T s = acc[b];
#pragma unroll
    for (int off = kWarp / 2; off > 0; off /= 2) s += __shfl_down_sync(kFull, s, off);
    if (lane == 0) out[b * nout + r] = bias ? s + bias[r] : s;
  }
}

// ------------------------------------------------------------------------------ SpMM, batch lanes

template <typename T>
__global__ void __launch_bounds__(kWarp * kWarpsPerBlock)
    spmm_batch_kernel(int64_t B, int64_t nout, int64_t nin, int64_t nnz, const int32_t* __restrict__ ptr,
                      const int32_t* __restrict__ idx, const int32_t* __restrict__ perm, const T* __restrict__ m,
                      const T* __restrict__ w, const T* __restrict__ inT, const T* __restrict__ bias,
                      T* __restrict__ outT) {
  const int lane = threadIdx.x % kWarp;
  const int64_t r = blockIdx.x * static_cast<int64_t>(kWarpsPerBlock) + threadIdx.x / kWarp;
  if (r >= nout) return;
  const int64_t b = blockIdx.y * static_cast<int64_t>(kWarp) + lane;
  const bool active = b < B;
  T acc = T(0);
  int64_t j0 = ptr[r], j1 = ptr[r + 1];
  if (j0 < 0 || j1 > nnz || j0 > j1) {  // corrupt pointers: touch nothing
    if (lane == 0) flag_error();
    j0 = j1 = 0;
  }
  for (int64_t jb = j0; jb < j1; jb += kWarp) {
    // Lanes fetch 32 entries (index, value) cooperatively, then every lane uses all of them.
    const int64_t j = jb + lane;
    int64_t c = -1;
    T t = T(0);
    if (j < j1) {
      c = idx[j];
      const int64_t v = perm ? static_cast<int64_t>(perm[j]) : j;
      if (c < 0 || c >= nin || v < 0 || v >= nnz) {
        flag_error();
        c = -1;
      } else {
        t = theta(m, w, v);
      }
    }
    const int cnt = static_cast<int>(j1 - jb < kWarp ? j1 - jb : kWarp);
    for (int k = 0; k < cnt; ++k) {
      const int64_t ck = __shfl_sync(kFull, c, k);
      const T tk = __shfl_sync(kFull, t, k);
      if (active && ck >= 0) acc += tk * inT[ck * B + b];
    }
  }
  if (active) outT[r * B + b] = bias ? acc + bias[r] : acc;
}

// -------------------------------------------------------------------------------------- SDDMM

template <typename T>
__device__ __forceinline__ void sddmm_epilogue(T g, int64_t j, const T* __restrict__ m, const T* __restrict__ w,
                                               T* __restrict__ gm, T* __restrict__ gw) {
  if (m) {
    gm[j] = g * w[j];
    gw[j] = g * m[j];
  } else {
    gw[j] = g;
  }
}

// One thread per stored entry, row-major dY (B, N) and X (B, K): for small batches.
template <typename T>
__global__ void sddmm_thread_kernel(int64_t B, int64_t N, int64_t K, int64_t nnz, const int32_t* __restrict__ row,
                                    const int32_t* __restrict__ col, const T* __restrict__ m,
                                    const T* __restrict__ w, const T* __restrict__ dy, const T* __restrict__ x,
                                    T* __restrict__ gm, T* __restrict__ gw) {
  const int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (j >= nnz) return;
  const int64_t r = row[j], c = col[j];
  T g = T(0);
  if (r < 0 || r >= N || c < 0 || c >= K) {
    flag_error();
  } else {
    for (int64_t b = 0; b < B; ++b) g += dy[b * N + r] * x[b * K + c];
  }
  sddmm_epilogue(g, j, m, w, gm, gw);
}

// One warp per stored entry, lanes over the batch of batch-contiguous dYT (N, B) and XT (K, B).
template <typename T>
__global__ void __launch_bounds__(kWarp * kWarpsPerBlock)
    sddmm_warp_kernel(int64_t B, int64_t N, int64_t K, int64_t nnz, const int32_t* __restrict__ row,
                      const int32_t* __restrict__ col, const T* __restrict__ m, const T* __restrict__ w,
                      const T* __restrict__ dyT, const T* __restrict__ xT, T* __restrict__ gm, T* __restrict__ gw) {
  const int lane = threadIdx.x % kWarp;
  const int64_t j = blockIdx.x * static_cast<int64_t>(kWarpsPerBlock) + threadIdx.x / kWarp;
  if (j >= nnz) return;
  const int64_t r = row[j], c = col[j];
  const bool ok = r >= 0 && r < N && c >= 0 && c < K;
  T g = T(0);
  if (ok) {
    const T* a = dyT + r * B;
    const T* bb = xT + c * B;
    for (int64_t b = lane; b < B; b += kWarp) g += a[b] * bb[b];
  }
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) g += __shfl_down_sync(kFull, g, off);
  if (lane == 0) {
    if (!ok) flag_error();
    sddmm_epilogue(g, j, m, w, gm, gw);
  }
}

unsigned blocks_for(int64_t rows) {
  return static_cast<unsigned>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
}

template <typename T>
cudaError_t spmm_t(int64_t B, int64_t nout, int64_t nin, int64_t nnz, const int32_t* ptr, const int32_t* idx,
                   const int32_t* perm, const void* m, const void* w, const void* in, const void* bias, void* out,
                   cudaStream_t stream) {
  const dim3 block(kWarp * kWarpsPerBlock);
  if (B <= kSmallBatch) {
    spmm_small_kernel<T><<<blocks_for(nout), block, 0, stream>>>(
        static_cast<int>(B), nout, nin, nnz, ptr, idx, perm, static_cast<const T*>(m), static_cast<const T*>(w),
        static_cast<const T*>(in), static_cast<const T*>(bias), static_cast<T*>(out));
  } else {
    const int64_t ytiles = (B + kWarp - 1) / kWarp;
    if (ytiles > 65535) return cudaErrorInvalidConfiguration;
    const dim3 grid(blocks_for(nout), static_cast<unsigned>(ytiles));
    spmm_batch_kernel<T><<<grid, block, 0, stream>>>(B, nout, nin, nnz, ptr, idx, perm, static_cast<const T*>(m),
                                                     static_cast<const T*>(w), static_cast<const T*>(in),
                                                     static_cast<const T*>(bias), static_cast<T*>(out));
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t sddmm_t(int64_t B, int64_t N, int64_t K, int64_t nnz, const int32_t* row, const int32_t* col,
                    const void* m, const void* w, const void* dy, const void* x, void* gm, void* gw,
                    cudaStream_t stream) {
  if (B < kSddmmWarpBatch) {
    const int threads = 256;
    const unsigned grid = static_cast<unsigned>((nnz + threads - 1) / threads);
    sddmm_thread_kernel<T><<<grid, threads, 0, stream>>>(B, N, K, nnz, row, col, static_cast<const T*>(m),
                                                         static_cast<const T*>(w), static_cast<const T*>(dy),
                                                         static_cast<const T*>(x), static_cast<T*>(gm),
                                                         static_cast<T*>(gw));
  } else {
    sddmm_warp_kernel<T><<<blocks_for(nnz), kWarp * kWarpsPerBlock, 0, stream>>>(
        B, N, K, nnz, row, col, static_cast<const T*>(m), static_cast<const T*>(w), static_cast<const T*>(dy),
        static_cast<const T*>(x), static_cast<T*>(gm), static_cast<T*>(gw));
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t csr_spmm(int dtype, int64_t B, int64_t nout, int64_t nin, int64_t nnz, const int32_t* ptr,
                     const int32_t* idx, const int32_t* perm, const void* m, const void* w, const void* in,
                     const void* bias, void* out, int device, cudaStream_t stream) {
  cudaError_t e = cudaSetDevice(device);
  if (e != cudaSuccess || B == 0 || nout == 0) return e;
  return dtype == 0 ? spmm_t<float>(B, nout, nin, nnz, ptr, idx, perm, m, w, in, bias, out, stream)
                    : spmm_t<double>(B, nout, nin, nnz, ptr, idx, perm, m, w, in, bias, out, stream);
}

cudaError_t csr_sddmm(int dtype, int64_t B, int64_t N, int64_t K, int64_t nnz, const int32_t* row,
                      const int32_t* col, const void* m, const void* w, const void* dy, const void* x, void* g_m,
                      void* g_w, int device, cudaStream_t stream) {
  cudaError_t e = cudaSetDevice(device);
  if (e != cudaSuccess || nnz == 0) return e;
  return dtype == 0 ? sddmm_t<float>(B, N, K, nnz, row, col, m, w, dy, x, g_m, g_w, stream)
                    : sddmm_t<double>(B, N, K, nnz, row, col, m, w, dy, x, g_m, g_w, stream);
}

cudaError_t index_error(int device, int* flag) {
  cudaError_t e = cudaSetDevice(device);
  if (e != cudaSuccess) return e;
  e = cudaMemcpyFromSymbol(flag, g_index_error, sizeof(int));
  if (e != cudaSuccess) return e;
  const int zero = 0;
  return cudaMemcpyToSymbol(g_index_error, &zero, sizeof(int));
}

}  // namespace se_cuda
