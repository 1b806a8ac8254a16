// Launchers of the CUDA kernels: raw pointers, a stream, a cudaError_t. No torch headers, so that each
// .cu compiles with nvcc alone (CI checks sm_80 and sm_90 without a GPU) and links into a plain C++
// extension (csrc/cuda_binding.cpp) against any torch build.
//
// dtype codes: 0 = float32, 1 = float64. Every launcher first selects `device` (the caller's tensors'
// device: the extension links its own copy of the CUDA runtime, whose current device is not torch's).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace se_cuda {

// ------------------------------------------------------------------------------------ elementwise

cudaError_t reparam_forward(int dtype, int64_t n, const void* m, const void* w, const uint8_t* mask, void* theta,
                            int device, cudaStream_t stream);
cudaError_t reparam_backward(int dtype, int64_t n, const void* grad, const void* m, const void* w,
                             const uint8_t* mask, void* g_m, void* g_w, int device, cudaStream_t stream);
cudaError_t signin_reset(int dtype, int64_t n, const void* m, const void* w, const uint8_t* mask, double beta,
                         void* m_out, void* w_out, int device, cudaStream_t stream);

// ------------------------------------------------------------------------- multi-tensor fused_step

struct StepTensor {
  void* param;
  const void* grad;
  void* buf1;            // nullable
  void* buf2;            // nullable
  const uint8_t* mask;   // nullable
  int64_t n;
};

struct StepConfig {
  int kind;  // 0 = sgd, 1 = adamw
  int64_t step;
  double momentum, dampening;
  int nesterov;
  double beta1, beta2, eps, weight_decay, alpha;
  int maximize;
};

// One kernel launch updates up to kMaxStepTensors tensors (a pointer table in the kernel arguments);
// longer lists take ceil(count / kMaxStepTensors) launches. All tensors share dtype and hyperparameters.
// lr points to one element of the parameter dtype on the device (no host synchronisation).
constexpr int kMaxStepTensors = 40;
cudaError_t fused_step_multi(int dtype, const StepTensor* tensors, int count, const void* lr,
                             const StepConfig& cfg, int device, cudaStream_t stream);

// --------------------------------------------------------------------------------- compact_linear
//
// CSR only (1x1 blocks). A compressed structure (ptr, idx) with optional value permutation:
//   out[b, r] = sum_{j in ptr[r]..ptr[r+1]} theta(v(j)) * in[b, idx[j]],  v(j) = perm ? perm[j] : j,
//   theta(v) = m ? m[v] * w[v] : w[v].
// forward: (crow, col, no perm) over x; dX: (ccol, row_t, perm) over grad_y.
// Layouts: row-major (B, rows) when B <= kSmallBatch, else batch-contiguous (rows, B): the binding
// transposes. Out-of-range idx / perm entries are skipped (never dereferenced) and flagged in the
// per-device error word (index_error()).
constexpr int64_t kSmallBatch = 8;
cudaError_t csr_spmm(int dtype, int64_t B, int64_t nout, int64_t nin, int64_t nnz, const int32_t* ptr,
                     const int32_t* idx, const int32_t* perm, const void* m, const void* w, const void* in,
                     const void* bias, void* out, int device, cudaStream_t stream);

// g(j) = sum_b dY[b, row[j]] * X[b, col[j]] then g_m = g*w, g_w = g*m (g_w = g when m is null).
// Row-major dY (B, N), X (B, K) when B < 32, else batch-contiguous dYT (N, B), XT (K, B).
cudaError_t csr_sddmm(int dtype, int64_t B, int64_t N, int64_t K, int64_t nnz, const int32_t* row,
                      const int32_t* col, const void* m, const void* w, const void* dy, const void* x, void* g_m,
                      void* g_w, int device, cudaStream_t stream);
constexpr int64_t kSddmmWarpBatch = 32;

// Reads and clears the per-device index error word (synchronises the device). 0 = no error.
cudaError_t index_error(int device, int* flag);

}  // namespace se_cuda
