// Elementwise ops: reparam (θ = M ⊙ m ⊙ w and its backward), the Sign-In reset, and fused_step.
//
// All memory-bound: one pass that reads each input once and writes each output once (the reference
// makes a temporary per arithmetic op). The mask is applied by selection, never by multiplication,
// so a NaN/inf at a pruned coordinate never leaks (reference.py conventions). The arithmetic follows
// reference.py operation by operation, in the parameter dtype, so results agree to rounding.
#include <omp.h>

#include <cmath>
#include <cstring>
#include <type_traits>

#include "kernels.h"

namespace se_cpu {
namespace {

bool worth_threads(int64_t n) { return n >= (1 << 16) && omp_get_max_threads() > 1; }

// on ? a : b without a branch: a bitwise blend. A `?:` on a random mask compiled to a scalar branch
// here (the baseline ISA has no byte-to-float blend), mispredicting on every other pruned coordinate
// (measured: ~10x slower than a plain multiply on a 300x784 layer at 10% density). Bitwise selection
// is exact (NaN/inf at a pruned coordinate never leak) and vectorises with integer ops.
template <typename T>
inline T blend(bool on, T a, T b) {
  using U = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  U ua, ub;
  std::memcpy(&ua, &a, sizeof(T));
  std::memcpy(&ub, &b, sizeof(T));
  const U keep = U(0) - U(on);
  const U r = (ua & keep) | (ub & ~keep);
  T out;
  std::memcpy(&out, &r, sizeof(T));
  return out;
}

// The mask and m presence are template parameters: a per-element `mask ? ... : ...` on a runtime
// pointer kept the loops scalar and branchy (a random 10% mask mispredicts), ~10x slower than a
// vectorised select. With them fixed at compile time the selects become blends.
template <typename T, bool HasM, bool HasMask>
void reparam_fwd_loop(int64_t n, const T* __restrict m, const T* __restrict w, const uint8_t* __restrict mask,
                      T* __restrict out) {
#pragma omp parallel for simd schedule(static) if (worth_threads(n))
  for (int64_t i = 0; i < n; ++i) {
    const T t = HasM ? m[i] * w[i] : w[i];
    out[i] = HasMask ? blend(mask[i] != 0, t, T(0)) : t;
  }
}

template <typename T>
void reparam_fwd_t(int64_t n, const T* m, const T* w, const uint8_t* mask, T* out) {
  if (m && mask) reparam_fwd_loop<T, true, true>(n, m, w, mask, out);
  else if (m) reparam_fwd_loop<T, true, false>(n, m, w, mask, out);
  else if (mask) reparam_fwd_loop<T, false, true>(n, m, w, mask, out);
  else reparam_fwd_loop<T, false, false>(n, m, w, mask, out);
}

template <typename T, bool HasM, bool HasMask>
void reparam_bwd_loop(int64_t n, const T* __restrict g, const T* __restrict m, const T* __restrict w,
                      const uint8_t* __restrict mask, T* __restrict gm, T* __restrict gw) {
#pragma omp parallel for simd schedule(static) if (worth_threads(n))
  for (int64_t i = 0; i < n; ++i) {
    // Select after multiplying: a pruned w or m may hold anything, and 0 * NaN would be NaN.
    const bool on = !HasMask || mask[i] != 0;
    if (HasM) {
      gm[i] = blend(on, g[i] * w[i], T(0));
      gw[i] = blend(on, g[i] * m[i], T(0));
    } else {
      gw[i] = blend(on, g[i], T(0));
    }
  }
}

template <typename T>
void reparam_bwd_t(int64_t n, const T* g, const T* m, const T* w, const uint8_t* mask, T* gm, T* gw) {
  if (m && mask) reparam_bwd_loop<T, true, true>(n, g, m, w, mask, gm, gw);
  else if (m) reparam_bwd_loop<T, true, false>(n, g, m, w, mask, gm, gw);
  else if (mask) reparam_bwd_loop<T, false, true>(n, g, m, w, mask, gm, gw);
  else reparam_bwd_loop<T, false, false>(n, g, m, w, mask, gm, gw);
}

// m = sqrt((β + hypot(β, 2θ)) / 2), w = θ / m (0 where m == 0): no overflow of 4θ² for huge |θ| and no
// cancellation for tiny β. float32 storage computes in float32, like the reference.
template <typename T>
void signin_t(int64_t n, const T* __restrict m, const T* __restrict w, const uint8_t* __restrict mask,
              double beta_d, T* __restrict mo, T* __restrict wo) {
  const T beta = static_cast<T>(beta_d);
#pragma omp parallel for schedule(static) if (worth_threads(n))
  for (int64_t i = 0; i < n; ++i) {
    const T t = blend(!mask || mask[i], m[i] * w[i], T(0));
    const T s = std::hypot(beta, T(2) * t);
    const T mm = std::sqrt((beta + s) * T(0.5));
    mo[i] = mm;
    wo[i] = mm > T(0) ? t / mm : T(0);
  }
}

// SGD. The mask, momentum, its first step and Nesterov are template parameters and every scalar a local of
// the loop's own function: with the flags read per element from the config, and the loop outlined by
// `omp parallel for` (its scalars then reached through the shared-variable block), it did not vectorise
// (measured: 61 µs vs ~12 µs for the 53k values of LeNet-300-100 at 10 %, a tenth of its step).
template <typename T, bool HasMask, bool Mom, bool First, bool Nest>
void sgd_range(int64_t i0, int64_t i1, T* __restrict p, const T* __restrict grad, T* __restrict b1,
               const uint8_t* __restrict mask, const T lr, const T two_alpha, const T wd, const T mom,
               const T one_m_damp, const bool use_alpha, const bool use_wd, const bool maximize) {
#pragma omp simd
  for (int64_t i = i0; i < i1; ++i) {
    const bool on = !HasMask || mask[i];
    const T pi = p[i];
    T g = maximize ? -grad[i] : grad[i];
    if (use_alpha) g = g + two_alpha * pi;
    if (use_wd) g = g + wd * pi;
    if constexpr (Mom) {
      const T nb = First ? g : b1[i] * mom + one_m_damp * g;
      g = Nest ? g + mom * nb : nb;
      b1[i] = HasMask ? blend(on, nb, T(0)) : nb;
    }
    p[i] = HasMask ? blend(on, pi - lr * g, pi) : pi - lr * g;
  }
}

template <typename T, bool HasMask, bool Mom, bool First, bool Nest>
void sgd_loop(int64_t n, T* p, const T* grad, T* b1, const uint8_t* mask, T lr, const StepConfig& c) {
  const T two_alpha = static_cast<T>(2.0 * c.alpha), wd = static_cast<T>(c.weight_decay);
  const T mom = static_cast<T>(c.momentum), one_m_damp = static_cast<T>(1.0 - c.dampening);
  const bool use_alpha = c.alpha != 0.0, use_wd = c.weight_decay != 0.0, maximize = c.maximize;
  if (!worth_threads(n)) {
    sgd_range<T, HasMask, Mom, First, Nest>(0, n, p, grad, b1, mask, lr, two_alpha, wd, mom, one_m_damp, use_alpha,
                                            use_wd, maximize);
    return;
  }
#pragma omp parallel
  {
    const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t i0 = n * t / nt, i1 = n * (t + 1) / nt;
    sgd_range<T, HasMask, Mom, First, Nest>(i0, i1, p, grad, b1, mask, lr, two_alpha, wd, mom, one_m_damp, use_alpha,
                                            use_wd, maximize);
  }
}

template <typename T, bool HasMask, bool Mom>
void sgd_t(int64_t n, T* p, const T* grad, T* b1, const uint8_t* mask, T lr, const StepConfig& c) {
  const bool first = c.step == 1;
  if (first && c.nesterov) sgd_loop<T, HasMask, Mom, true, true>(n, p, grad, b1, mask, lr, c);
  else if (first) sgd_loop<T, HasMask, Mom, true, false>(n, p, grad, b1, mask, lr, c);
  else if (c.nesterov) sgd_loop<T, HasMask, Mom, false, true>(n, p, grad, b1, mask, lr, c);
  else sgd_loop<T, HasMask, Mom, false, false>(n, p, grad, b1, mask, lr, c);
}

template <typename T>
void fused_step_t(int64_t n, T* __restrict p, const T* __restrict grad, T* __restrict b1, T* __restrict b2,
                  const uint8_t* __restrict mask, T lr, const StepConfig& c) {
  const T two_alpha = static_cast<T>(2.0 * c.alpha);
  const T wd = static_cast<T>(c.weight_decay);
  const bool use_alpha = c.alpha != 0.0;
  if (c.kind == 0) {
    const bool mom = c.momentum != 0.0;
    if (mask && mom) sgd_t<T, true, true>(n, p, grad, b1, mask, lr, c);
    else if (mask) sgd_t<T, true, false>(n, p, grad, b1, mask, lr, c);
    else if (mom) sgd_t<T, false, true>(n, p, grad, b1, mask, lr, c);
    else sgd_t<T, false, false>(n, p, grad, b1, mask, lr, c);
  } else {
    const T decay = T(1) - lr * wd;
    const T w1 = static_cast<T>(1.0 - c.beta1), b2c = static_cast<T>(c.beta2);
    const T one_m_b2 = static_cast<T>(1.0 - c.beta2);
    const T bc1 = static_cast<T>(1.0 - std::pow(c.beta1, static_cast<double>(c.step)));
    const T sqrt_bc2 = static_cast<T>(std::sqrt(1.0 - std::pow(c.beta2, static_cast<double>(c.step))));
    const T eps = static_cast<T>(c.eps);
    const T step_size = lr / bc1;
#pragma omp parallel for simd schedule(static) if (worth_threads(n))
    for (int64_t i = 0; i < n; ++i) {
      const bool on = !mask || mask[i];
      const T pi = p[i];
      T g = c.maximize ? -grad[i] : grad[i];
      if (use_alpha) g = g + two_alpha * pi;
      const T decayed = pi * decay;
      // torch.lerp(start, end, weight): start + weight*(end-start) for weight < 0.5, else
      // end - (end-start)*(1-weight); reproduced so that both agree bit for bit where possible.
      const T s0 = b1[i];
      const T ea = w1 < T(0.5) ? s0 + w1 * (g - s0) : g - (g - s0) * (T(1) - w1);
      const T eas = b2[i] * b2c + one_m_b2 * g * g;
      const T denom = std::sqrt(eas) / sqrt_bc2 + eps;
      const T np = decayed - step_size * ea / denom;
      b1[i] = blend(on, ea, T(0));
      b2[i] = blend(on, eas, T(0));
      p[i] = blend(on, np, pi);
    }
  }
}

// x - x is 0 where x is finite and NaN at NaN and ±inf; a NaN stays in the sum (any order), so one
// vectorised reduction answers for the whole tensor. Masked coordinates add 0 (selected, not multiplied).
template <typename T, bool HasMask>
bool finite_loop(int64_t n, const T* __restrict x, const uint8_t* __restrict mask) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) {
    const T d = x[i] - x[i];
    acc += HasMask ? blend(mask[i] != 0, d, T(0)) : d;
  }
  return acc == T(0);
}

template <typename T>
bool finite_t(int64_t n, const T* x, const uint8_t* mask) {
  return mask ? finite_loop<T, true>(n, x, mask) : finite_loop<T, false>(n, x, mask);
}

}  // namespace

bool all_finite(Dtype dt, int64_t n, const void* x, const uint8_t* mask) {
  if (dt == kFloat32) return finite_t(n, static_cast<const float*>(x), mask);
  return finite_t(n, static_cast<const double*>(x), mask);
}

void reparam_forward(Dtype dt, int64_t n, const void* m, const void* w, const uint8_t* mask, void* theta) {
  if (dt == kFloat32)
    reparam_fwd_t(n, static_cast<const float*>(m), static_cast<const float*>(w), mask, static_cast<float*>(theta));
  else
    reparam_fwd_t(n, static_cast<const double*>(m), static_cast<const double*>(w), mask,
                  static_cast<double*>(theta));
}

void reparam_backward(Dtype dt, int64_t n, const void* grad, const void* m, const void* w, const uint8_t* mask,
                      void* g_m, void* g_w) {
  if (dt == kFloat32)
    reparam_bwd_t(n, static_cast<const float*>(grad), static_cast<const float*>(m), static_cast<const float*>(w),
                  mask, static_cast<float*>(g_m), static_cast<float*>(g_w));
  else
    reparam_bwd_t(n, static_cast<const double*>(grad), static_cast<const double*>(m),
                  static_cast<const double*>(w), mask, static_cast<double*>(g_m), static_cast<double*>(g_w));
}

void signin_reset(Dtype dt, int64_t n, const void* m, const void* w, const uint8_t* mask, double beta,
                  void* m_out, void* w_out) {
  if (dt == kFloat32)
    signin_t(n, static_cast<const float*>(m), static_cast<const float*>(w), mask, beta,
             static_cast<float*>(m_out), static_cast<float*>(w_out));
  else
    signin_t(n, static_cast<const double*>(m), static_cast<const double*>(w), mask, beta,
             static_cast<double*>(m_out), static_cast<double*>(w_out));
}

void fused_step(Dtype dt, int64_t n, void* param, const void* grad, void* buf1, void* buf2, const uint8_t* mask,
                const void* lr, const StepConfig& cfg) {
  if (dt == kFloat32)
    fused_step_t(n, static_cast<float*>(param), static_cast<const float*>(grad), static_cast<float*>(buf1),
                 static_cast<float*>(buf2), mask, *static_cast<const float*>(lr), cfg);
  else
    fused_step_t(n, static_cast<double*>(param), static_cast<const double*>(grad), static_cast<double*>(buf1),
                 static_cast<double*>(buf2), mask, *static_cast<const double*>(lr), cfg);
}

}  // namespace se_cpu
