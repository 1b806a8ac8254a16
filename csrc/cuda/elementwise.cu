// Elementwise CUDA kernels: reparam (θ = M ⊙ m ⊙ w, backward), the Sign-In reset, and the
// multi-tensor fused optimizer step.
//
// All memory-bound: one read of every input and one write of every output. fused_step updates a whole
// parameter group in one launch: the kernel arguments carry a table of (param, grad, buf1, buf2, mask, n)
// and each block finds its tensor by a binary search over the blocks' start offsets.
// Masks select (never multiply), so a NaN at a pruned coordinate never leaks. The arithmetic follows
// sparse_engine/reference.py operation by operation in the parameter dtype.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "kernels.h"

namespace se_cuda {
namespace {

constexpr int kThreads = 256;

int grid_for(int64_t n) {
  int64_t blocks = (n + kThreads - 1) / kThreads;
  if (blocks > 65535 * 8) blocks = 65535 * 8;  // grid-stride loops cover the rest
  return static_cast<int>(blocks < 1 ? 1 : blocks);
}

template <typename T>
__global__ void reparam_fwd_kernel(int64_t n, const T* __restrict__ m, const T* __restrict__ w,
                                   const uint8_t* __restrict__ mask, T* __restrict__ out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const T t = m ? m[i] * w[i] : w[i];
    out[i] = (!mask || mask[i]) ? t : T(0);
  }
}

template <typename T>
__global__ void reparam_bwd_kernel(int64_t n, const T* __restrict__ g, const T* __restrict__ m,
                                   const T* __restrict__ w, const uint8_t* __restrict__ mask, T* __restrict__ gm,
                                   T* __restrict__ gw) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const bool on = !mask || mask[i];
    if (m) {
      gm[i] = on ? g[i] * w[i] : T(0);
      gw[i] = on ? g[i] * m[i] : T(0);
    } else {
      gw[i] = on ? g[i] : T(0);
    }
  }
}

// m = sqrt((β + hypot(β, 2θ)) / 2), w = θ / m: no overflow for huge |θ|, no cancellation for tiny β.
template <typename T>
__global__ void signin_kernel(int64_t n, const T* __restrict__ m, const T* __restrict__ w,
                              const uint8_t* __restrict__ mask, T beta, T* __restrict__ mo, T* __restrict__ wo) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const T t = (!mask || mask[i]) ? m[i] * w[i] : T(0);
    const T s = hypot(beta, T(2) * t);
    const T mm = sqrt((beta + s) * T(0.5));
    mo[i] = mm;
    wo[i] = mm > T(0) ? t / mm : T(0);
  }
}

// ---------------------------------------------------------------------------------- fused_step

constexpr int kStepThreads = 256;
constexpr int kStepPerThread = 4;
constexpr int64_t kStepChunk = kStepThreads * kStepPerThread;  // elements per block

struct StepTable {
  StepTensor t[kMaxStepTensors];
  int64_t block_start[kMaxStepTensors + 1];
  int count;
};

template <typename T>
struct StepScalars {
  T two_alpha, wd, mom, one_m_damp, decay, w1, b2, one_m_b2, bc1, sqrt_bc2, eps;
};

template <typename T>
__device__ __forceinline__ void step_one(const StepConfig& c, const StepScalars<T>& s, T lr, T* p, const T* grad,
                                         T* b1, T* b2, const uint8_t* mask, int64_t i) {
  const bool on = !mask || mask[i];
  const T pi = p[i];
  T g = c.maximize ? -grad[i] : grad[i];
  if (c.alpha != 0.0) g = g + s.two_alpha * pi;
  if (c.kind == 0) {
    if (c.weight_decay != 0.0) g = g + s.wd * pi;
    if (c.momentum != 0.0) {
      const T nb = c.step == 1 ? g : b1[i] * s.mom + s.one_m_damp * g;
      g = c.nesterov ? g + s.mom * nb : nb;
      b1[i] = on ? nb : T(0);
    }
    p[i] = on ? pi - lr * g : pi;
  } else {
    const T decayed = pi * (T(1) - lr * s.wd);
    const T s0 = b1[i];
    // torch.lerp's two-sided formula, so that exp_avg matches torch bit for bit where it can.
    const T ea = s.w1 < T(0.5) ? s0 + s.w1 * (g - s0) : g - (g - s0) * (T(1) - s.w1);
    const T eas = b2[i] * s.b2 + s.one_m_b2 * g * g;
    const T denom = sqrt(eas) / s.sqrt_bc2 + s.eps;
    const T np = decayed - (lr / s.bc1) * ea / denom;
    b1[i] = on ? ea : T(0);
    b2[i] = on ? eas : T(0);
    p[i] = on ? np : pi;
  }
}

template <typename T>
__global__ void __launch_bounds__(kStepThreads)
    fused_step_kernel(StepTable table, StepConfig cfg, StepScalars<T> sc, const T* __restrict__ lr_ptr) {
  // Which tensor does this block belong to: binary search over the start offsets.
  const int64_t b = blockIdx.x;
  int lo = 0, hi = table.count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (table.block_start[mid] <= b) lo = mid;
    else hi = mid - 1;
  }
  const StepTensor& t = table.t[lo];
  const int64_t base = (b - table.block_start[lo]) * kStepChunk;
  const T lr = *lr_ptr;
  T* p = static_cast<T*>(t.param);
  const T* g = static_cast<const T*>(t.grad);
  T* b1 = static_cast<T*>(t.buf1);
  T* b2 = static_cast<T*>(t.buf2);
#pragma unroll
  for (int k = 0; k < kStepPerThread; ++k) {
    const int64_t i = base + k * kStepThreads + threadIdx.x;
    if (i < t.n) step_one<T>(cfg, sc, lr, p, g, b1, b2, t.mask, i);
  }
}

template <typename T>
StepScalars<T> scalars(const StepConfig& c) {
  StepScalars<T> s;
  s.two_alpha = static_cast<T>(2.0 * c.alpha);
  s.wd = static_cast<T>(c.weight_decay);
  s.mom = static_cast<T>(c.momentum);
  s.one_m_damp = static_cast<T>(1.0 - c.dampening);
  s.decay = T(0);
  s.w1 = static_cast<T>(1.0 - c.beta1);
  s.b2 = static_cast<T>(c.beta2);
  s.one_m_b2 = static_cast<T>(1.0 - c.beta2);
  // Bias corrections in double on the host, then cast, as the reference's Python floats are.
  const double bc1 = 1.0 - std::pow(c.beta1, static_cast<double>(c.step));
  const double bc2 = 1.0 - std::pow(c.beta2, static_cast<double>(c.step));
  s.bc1 = static_cast<T>(bc1);
  s.sqrt_bc2 = static_cast<T>(std::sqrt(bc2));
  s.eps = static_cast<T>(c.eps);
  return s;
}

template <typename T>
cudaError_t fused_step_t(const StepTensor* tensors, int count, const void* lr, const StepConfig& cfg,
                         cudaStream_t stream) {
  const StepScalars<T> sc = scalars<T>(cfg);
  for (int first = 0; first < count; first += kMaxStepTensors) {
    StepTable table;
    table.count = 0;
    int64_t blocks = 0;
    for (int k = first; k < count && table.count < kMaxStepTensors; ++k) {
      if (tensors[k].n == 0) continue;
      table.t[table.count] = tensors[k];
      table.block_start[table.count] = blocks;
      blocks += (tensors[k].n + kStepChunk - 1) / kStepChunk;
      ++table.count;
    }
    table.block_start[table.count] = blocks;
    if (table.count == 0) continue;
    if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
    fused_step_kernel<T><<<static_cast<unsigned>(blocks), kStepThreads, 0, stream>>>(table, cfg, sc,
                                                                                   static_cast<const T*>(lr));
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

}  // namespace

cudaError_t reparam_forward(int dtype, int64_t n, const void* m, const void* w, const uint8_t* mask, void* theta,
                            int device, cudaStream_t stream) {
  cudaError_t e = cudaSetDevice(device);
  if (e != cudaSuccess || n == 0) return e;
  if (dtype == 0)
    reparam_fwd_kernel<float><<<grid_for(n), kThreads, 0, stream>>>(
        n, static_cast<const float*>(m), static_cast<const float*>(w), mask, static_cast<float*>(theta));
  else
    reparam_fwd_kernel<double><<<grid_for(n), kThreads, 0, stream>>>(
        n, static_cast<const double*>(m), static_cast<const double*>(w), mask, static_cast<double*>(theta));
  return cudaGetLastError();
}

cudaError_t reparam_backward(int dtype, int64_t n, const void* grad, const void* m, const void* w,
                             const uint8_t* mask, void* g_m, void* g_w, int device, cudaStream_t stream) {
  cudaError_t e = cudaSetDevice(device);
  if (e != cudaSuccess || n == 0) return e;
  if (dtype == 0)
    reparam_bwd_kernel<float><<<grid_for(n), kThreads, 0, stream>>>(
        n, static_cast<const float*>(grad), static_cast<const float*>(m), static_cast<const float*>(w), mask,
        static_cast<float*>(g_m), static_cast<float*>(g_w));
  else
    reparam_bwd_kernel<double><<<grid_for(n), kThreads, 0, stream>>>(
        n, static_cast<const double*>(grad), static_cast<const double*>(m), static_cast<const double*>(w), mask,
        static_cast<double*>(g_m), static_cast<double*>(g_w));
  return cudaGetLastError();
}

cudaError_t signin_reset(int dtype, int64_t n, const void* m, const void* w, const uint8_t* mask, double beta,
                         void* m_out, void* w_out, int device, cudaStream_t stream) {
  cudaError_t e = cudaSetDevice(device);
  if (e != cudaSuccess || n == 0) return e;
  if (dtype == 0)
    signin_kernel<float><<<grid_for(n), kThreads, 0, stream>>>(
        n, static_cast<const float*>(m), static_cast<const float*>(w), mask, static_cast<float>(beta),
        static_cast<float*>(m_out), static_cast<float*>(w_out));
  else
    signin_kernel<double><<<grid_for(n), kThreads, 0, stream>>>(
        n, static_cast<const double*>(m), static_cast<const double*>(w), mask, beta, static_cast<double*>(m_out),
        static_cast<double*>(w_out));
  return cudaGetLastError();
}

cudaError_t fused_step_multi(int dtype, const StepTensor* tensors, int count, const void* lr, const StepConfig& cfg,
                             int device, cudaStream_t stream) {
  cudaError_t e = cudaSetDevice(device);
  if (e != cudaSuccess || count == 0) return e;
  return dtype == 0 ? fused_step_t<float>(tensors, count, lr, cfg, stream)
                    : fused_step_t<double>(tensors, count, lr, cfg, stream);
}

}  // namespace se_cuda
