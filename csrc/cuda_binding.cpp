// The CUDA ops of sparse_engine: TORCH_LIBRARY(sparse_engine_cuda) around the launchers of cuda/*.cu.
//
// Only ATen/c10 CPU headers are used (no c10/cuda, no libtorch_cuda at link time), so this file builds
// against any torch, CPU-only included (the split build of csrc/build_ext.py). Consequences:
// * the caller passes the CUDA stream as an integer (torch.cuda.current_stream().cuda_stream);
// * outputs and transposed copies are allocated through the dispatcher (torch's CUDA allocator);
// * the launchers select the tensors' device themselves.
// sparse_engine/ops/_cuda.py maps the reference signatures onto these schemas.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdio>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "cuda/kernels.h"
#include "messages.h"

namespace {

using at::Tensor;
using c10::optional;

using se_msg::check_int32_dim, se_msg::num, se_msg::real, se_msg::shape;  // messages.h

cudaStream_t as_stream(int64_t s) { return reinterpret_cast<cudaStream_t>(static_cast<intptr_t>(s)); }

void cuda_check(cudaError_t e, const char* what) {
  TORCH_CHECK(e == cudaSuccess, "sparse_engine CUDA ", what, " failed: ", cudaGetErrorString(e), " (error ",
              num(static_cast<int>(e)), ")");
}

int dtype_code(const Tensor& t, const char* name) {
  if (t.scalar_type() == at::kFloat) return 0;
  if (t.scalar_type() == at::kDouble) return 1;
  TORCH_CHECK_VALUE(false, name, " must be float32 or float64 for the CUDA backend, got ", t.scalar_type());
  return 0;
}

void check_cuda(const Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda(), name, " must be a CUDA tensor for the CUDA backend, got ", t.device());
}

void check_like(const Tensor& t, const Tensor& ref, const char* name, const char* ref_name) {
  check_cuda(t, name);
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " must be on ", ref.device(), " like ", ref_name, ", got ",
                    t.device());
  TORCH_CHECK_VALUE(t.scalar_type() == ref.scalar_type(), name, " must have the dtype of ", ref_name, " (",
                    ref.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), name, " must have the shape of ", ref_name, " ", shape(ref.sizes()), ", got ",
                    shape(t.sizes()));
}

Tensor mask_of(const optional<Tensor>& mask, const Tensor& ref) {
  if (!mask) return Tensor();
  check_cuda(*mask, "mask");
  TORCH_CHECK_VALUE(mask->device() == ref.device(), "mask must be on ", ref.device(), ", got ", mask->device());
  TORCH_CHECK_VALUE(mask->scalar_type() == at::kBool, "mask must be torch.bool, got ", mask->scalar_type());
  TORCH_CHECK_VALUE(mask->sizes() == ref.sizes(), "mask must have shape ", shape(ref.sizes()), ", got ", shape(mask->sizes()));
  return mask->contiguous();
}

const uint8_t* mask_ptr(const Tensor& t) { return t.defined() ? static_cast<const uint8_t*>(t.data_ptr()) : nullptr; }
const void* ptr_or_null(const Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }
int cuda_index(const Tensor& t) { return static_cast<int>(t.get_device()); }

// ------------------------------------------------------------------------------------- elementwise

Tensor reparam_fwd(const optional<Tensor>& m, const Tensor& w, const optional<Tensor>& mask, int64_t stream) {
  check_cuda(w, "w");
  const int dt = dtype_code(w, "w");
  if (m) check_like(*m, w, "m", "w");
  Tensor k = mask_of(mask, w), wc = w.contiguous(), mc = m ? m->contiguous() : Tensor();
  Tensor out = at::empty_like(wc);
  cuda_check(se_cuda::reparam_forward(dt, wc.numel(), ptr_or_null(mc), wc.data_ptr(), mask_ptr(k), out.data_ptr(),
                                      cuda_index(w), as_stream(stream)),
             "reparam_fwd");
  return out;
}

std::tuple<Tensor, Tensor> reparam_bwd(const Tensor& grad, const optional<Tensor>& m, const Tensor& w,
                                       const optional<Tensor>& mask, int64_t stream) {
  check_cuda(w, "w");
  const int dt = dtype_code(w, "w");
  check_like(grad, w, "grad", "w");
  if (m) check_like(*m, w, "m", "w");
  Tensor k = mask_of(mask, w), wc = w.contiguous(), gc = grad.contiguous(), mc = m ? m->contiguous() : Tensor();
  Tensor gw = at::empty_like(wc);
  Tensor gm = m ? at::empty_like(wc) : at::empty({0}, wc.options());
  cuda_check(se_cuda::reparam_backward(dt, wc.numel(), gc.data_ptr(), ptr_or_null(mc), wc.data_ptr(), mask_ptr(k),
                                       m ? gm.data_ptr() : nullptr, gw.data_ptr(), cuda_index(w), as_stream(stream)),
             "reparam_bwd");
  return {gm, gw};
}

std::tuple<Tensor, Tensor> signin_reset(const Tensor& m, const Tensor& w, const optional<Tensor>& mask, double beta,
                                        int64_t stream) {
  check_cuda(w, "w");
  const int dt = dtype_code(w, "w");
  check_like(m, w, "m", "w");
  TORCH_CHECK_VALUE(beta >= 0 && beta < std::numeric_limits<double>::infinity(),
                    "beta must be a finite number >= 0, got ", real(beta));
  Tensor k = mask_of(mask, w), wc = w.contiguous(), mc = m.contiguous();
  Tensor mo = at::empty_like(wc), wo = at::empty_like(wc);
  cuda_check(se_cuda::signin_reset(dt, wc.numel(), mc.data_ptr(), wc.data_ptr(), mask_ptr(k), beta, mo.data_ptr(),
                                   wo.data_ptr(), cuda_index(w), as_stream(stream)),
             "signin_reset");
  return {mo, wo};
}

// One launch (per kMaxStepTensors tensors) for the whole list: all tensors share dtype, device and
// hyperparameters; lr is a 0-dim tensor of the parameter dtype on their device (no host sync).
void fused_step(at::TensorList params, at::TensorList grads, const c10::List<optional<Tensor>>& buf1,
                const c10::List<optional<Tensor>>& buf2, const c10::List<optional<Tensor>>& masks, const Tensor& lr,
                int64_t step, c10::string_view kind, double momentum, double dampening, bool nesterov, double beta1,
                double beta2, double eps, double weight_decay, double alpha, bool maximize, int64_t stream) {
  const size_t n = params.size();
  TORCH_CHECK_VALUE(grads.size() == n && buf1.size() == n && buf2.size() == n && masks.size() == n,
                    "params, grads, buf1, buf2 and masks must have the same length, got ", num(n), ", ", num(grads.size()), ", ",
                    num(buf1.size()), ", ", num(buf2.size()), ", ", num(masks.size()));
  TORCH_CHECK_VALUE(step >= 1, "step must be >= 1 (1-based count of this step), got ", num(step));
  se_cuda::StepConfig cfg{};
  if (kind == "sgd") cfg.kind = 0;
  else if (kind == "adamw") cfg.kind = 1;
  else TORCH_CHECK_VALUE(false, "kind must be one of ('sgd', 'adamw'), got '", std::string(kind), "'");
  cfg.step = step;
  cfg.momentum = momentum;
  cfg.dampening = dampening;
  cfg.nesterov = nesterov;
  cfg.beta1 = beta1;
  cfg.beta2 = beta2;
  cfg.eps = eps;
  cfg.weight_decay = weight_decay;
  cfg.alpha = alpha;
  cfg.maximize = maximize;
  if (n == 0) return;
  const Tensor& p0 = params[0];
  check_cuda(p0, "params[0]");
  const int dt = dtype_code(p0, "params[0]");
  TORCH_CHECK_VALUE(lr.dim() == 0, "lr must be a 0-dim tensor, got shape ", shape(lr.sizes()));
  Tensor lr_t = lr.to(p0.device(), p0.scalar_type());  // the reference casts lr to the param dtype
  std::vector<se_cuda::StepTensor> table(n);
  std::vector<Tensor> keep;  // contiguous copies of grads / masks live until the launch is queued
  for (size_t i = 0; i < n; ++i) {
    const Tensor& p = params[i];
    const std::string idx = "[" + std::to_string(i) + "]";
    check_like(p, p0, ("params" + idx).c_str(), "params[0]");
    TORCH_CHECK_VALUE(p.is_contiguous(), "params", idx, " must be contiguous (it is updated in place)");
    check_like(grads[i], p, ("grads" + idx).c_str(), ("params" + idx).c_str());
    Tensor g = grads[i].contiguous();
    keep.push_back(g);
    se_cuda::StepTensor& t = table[i];
    t.param = p.data_ptr();
    t.grad = g.data_ptr();
    t.n = p.numel();
    t.buf1 = t.buf2 = nullptr;
    for (int which = 0; which < 2; ++which) {
      const optional<Tensor> b = which == 0 ? buf1.get(i) : buf2.get(i);
      if (!b) continue;
      const std::string name = (which == 0 ? "buf1" : "buf2") + idx;
      check_like(*b, p, name.c_str(), ("params" + idx).c_str());
      TORCH_CHECK_VALUE(b->is_contiguous(), name, " must be contiguous (it is updated in place)");
      (which == 0 ? t.buf1 : t.buf2) = b->data_ptr();
    }
    if (cfg.kind == 0 && momentum != 0.0)
      TORCH_CHECK_VALUE(t.buf1, "buf1", idx, " (momentum buffer) must be given when momentum != 0");
    if (cfg.kind == 1)
      TORCH_CHECK_VALUE(t.buf1 && t.buf2, "buf1", idx, " (exp_avg) and buf2", idx,
                        " (exp_avg_sq) must be given for kind='adamw'");
    Tensor k = mask_of(masks.get(i), p);
    if (k.defined()) keep.push_back(k);
    t.mask = mask_ptr(k);
  }
  cuda_check(se_cuda::fused_step_multi(dt, table.data(), static_cast<int>(n), lr_t.data_ptr(), cfg, cuda_index(p0),
                                       as_stream(stream)),
             "fused_step");
}

// --------------------------------------------------------------------------------- compact_linear

struct Csr {
  int64_t N, K, nnz;
  int dt;
  Tensor m, w, crow, col, row, ccol, row_t, perm;
};

Tensor index_tensor(const Tensor& t, const Tensor& ref, const char* name, int64_t numel) {
  check_cuda(t, name);
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " must be on ", ref.device(), ", got ", t.device());
  TORCH_CHECK_VALUE(t.scalar_type() == at::kInt, name, " must be int32 (layout index), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.numel() == numel, name, " must be 1-D with ", num(numel), " entries, got shape ",
                    shape(t.sizes()));
  return t.contiguous();
}

Csr check_csr(const optional<Tensor>& m_values, const Tensor& w_values, const Tensor& crow, const Tensor& col,
              const Tensor& row, const Tensor& ccol, const Tensor& row_t, const Tensor& perm, int64_t N, int64_t K) {
  Csr c;
  check_int32_dim(N, "out_features");
  check_int32_dim(K, "in_features");
  check_cuda(w_values, "w_values");
  c.dt = dtype_code(w_values, "w_values");
  TORCH_CHECK_VALUE(w_values.dim() == 1,
                    "the CUDA compact_linear takes CSR values (nnz,); got shape ", shape(w_values.sizes()),
                    " (BSR runs on the Triton or C++ backends)");
  c.N = N;
  c.K = K;
  c.nnz = w_values.size(0);
  check_int32_dim(c.nnz, "nnz (w_values.shape[0])");
  if (m_values) check_like(*m_values, w_values, "m_values", "w_values");
  c.w = w_values.contiguous();
  c.m = m_values ? m_values->contiguous() : Tensor();
  c.crow = index_tensor(crow, w_values, "crow", N + 1);
  c.col = index_tensor(col, w_values, "col", c.nnz);
  c.row = index_tensor(row, w_values, "row", c.nnz);
  c.ccol = index_tensor(ccol, w_values, "ccol", K + 1);
  c.row_t = index_tensor(row_t, w_values, "row_t", c.nnz);
  c.perm = index_tensor(perm, w_values, "perm", c.nnz);
  return c;
}

Tensor activations(const Tensor& t, const Csr& c, const char* name, int64_t cols, const char* what) {
  check_cuda(t, name);
  TORCH_CHECK_VALUE(t.device() == c.w.device(), name, " must be on ", c.w.device(), ", got ", t.device());
  TORCH_CHECK_VALUE(t.scalar_type() == c.w.scalar_type(), name, " must have the dtype of w_values (",
                    c.w.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(1) == cols, name, " must be (B, ", num(cols), ") (", what, "), got ", shape(t.sizes()));
  return t.contiguous();
}

const int32_t* i32(const Tensor& t) { return t.data_ptr<int32_t>(); }

Tensor compact_linear_fwd(const Tensor& x, const optional<Tensor>& m_values, const Tensor& w_values,
                          const optional<Tensor>& bias, const Tensor& crow, const Tensor& col, const Tensor& row,
                          const Tensor& ccol, const Tensor& row_t, const Tensor& perm, int64_t out_features,
                          int64_t in_features, int64_t stream) {
  Csr c = check_csr(m_values, w_values, crow, col, row, ccol, row_t, perm, out_features, in_features);
  Tensor xc = activations(x, c, "x", c.K, "in_features");
  Tensor b;
  if (bias) {
    check_cuda(*bias, "bias");
    TORCH_CHECK_VALUE(bias->scalar_type() == c.w.scalar_type() && bias->dim() == 1 && bias->size(0) == c.N &&
                          bias->device() == c.w.device(),
                      "bias must be (", num(c.N), ",) of dtype ", c.w.scalar_type(), " on ", c.w.device());
    b = bias->contiguous();
  }
  const int64_t B = xc.size(0);
  const int dev = cuda_index(xc);
  if (B <= se_cuda::kSmallBatch) {
    Tensor y = at::empty({B, c.N}, xc.options());
    cuda_check(se_cuda::csr_spmm(c.dt, B, c.N, c.K, c.nnz, i32(c.crow), i32(c.col), nullptr, ptr_or_null(c.m),
                                 c.w.data_ptr(), xc.data_ptr(), ptr_or_null(b), y.data_ptr(), dev, as_stream(stream)),
               "compact_linear forward");
    return y;
  }
  Tensor xT = xc.t().contiguous();  // (K, B): batch-contiguous, coalesced loads across the batch
  Tensor yT = at::empty({c.N, B}, xc.options());
  cuda_check(se_cuda::csr_spmm(c.dt, B, c.N, c.K, c.nnz, i32(c.crow), i32(c.col), nullptr, ptr_or_null(c.m),
                               c.w.data_ptr(), xT.data_ptr(), ptr_or_null(b), yT.data_ptr(), dev, as_stream(stream)),
             "compact_linear forward");
  return yT.t().contiguous();
}

std::tuple<Tensor, Tensor, Tensor> compact_linear_bwd(const Tensor& grad_y, const Tensor& x,
                                                      const optional<Tensor>& m_values, const Tensor& w_values,
                                                      const Tensor& crow, const Tensor& col, const Tensor& row,
                                                      const Tensor& ccol, const Tensor& row_t, const Tensor& perm,
                                                      int64_t out_features, int64_t in_features, bool needs_x_grad,
                                                      int64_t stream) {
  Csr c = check_csr(m_values, w_values, crow, col, row, ccol, row_t, perm, out_features, in_features);
  Tensor xc = activations(x, c, "x", c.K, "in_features");
  Tensor gy = activations(grad_y, c, "grad_y", c.N, "out_features");
  TORCH_CHECK_VALUE(gy.size(0) == xc.size(0), "grad_y must have the batch size of x (", num(xc.size(0)), "), got ",
                    num(gy.size(0)));
  const int64_t B = xc.size(0);
  const int dev = cuda_index(xc);
  const cudaStream_t s = as_stream(stream);
  Tensor gw = at::empty_like(c.w);
  Tensor gm = c.m.defined() ? at::empty_like(c.w) : at::empty({0}, c.w.options());
  Tensor gx;
  Tensor gyT, xT;
  // dX = dY θ through the transposed pattern: CSC pointers (ccol), rows (row_t), values via perm.
  // Not launched at all when x needs no gradient (a network input): g_x is then the (0,) placeholder.
  if (!needs_x_grad) {
    gx = at::empty({0}, xc.options());
  } else if (B <= se_cuda::kSmallBatch) {
    gx = at::empty({B, c.K}, xc.options());
    cuda_check(se_cuda::csr_spmm(c.dt, B, c.K, c.N, c.nnz, i32(c.ccol), i32(c.row_t), i32(c.perm), ptr_or_null(c.m),
                                 c.w.data_ptr(), gy.data_ptr(), nullptr, gx.data_ptr(), dev, s),
               "compact_linear dX");
  } else {
    gyT = gy.t().contiguous();
    Tensor gxT = at::empty({c.K, B}, xc.options());
    cuda_check(se_cuda::csr_spmm(c.dt, B, c.K, c.N, c.nnz, i32(c.ccol), i32(c.row_t), i32(c.perm), ptr_or_null(c.m),
                                 c.w.data_ptr(), gyT.data_ptr(), nullptr, gxT.data_ptr(), dev, s),
               "compact_linear dX");
    gx = gxT.t().contiguous();
  }
  // dθ on the pattern only (SDDMM) with the g_m / g_w epilogue.
  if (B < se_cuda::kSddmmWarpBatch) {
    cuda_check(se_cuda::csr_sddmm(c.dt, B, c.N, c.K, c.nnz, i32(c.row), i32(c.col), ptr_or_null(c.m), c.w.data_ptr(),
                                  gy.data_ptr(), xc.data_ptr(), c.m.defined() ? gm.data_ptr() : nullptr,
                                  gw.data_ptr(), dev, s),
               "compact_linear dtheta");
  } else {
    if (!gyT.defined()) gyT = gy.t().contiguous();
    xT = xc.t().contiguous();
    cuda_check(se_cuda::csr_sddmm(c.dt, B, c.N, c.K, c.nnz, i32(c.row), i32(c.col), ptr_or_null(c.m), c.w.data_ptr(),
                                  gyT.data_ptr(), xT.data_ptr(), c.m.defined() ? gm.data_ptr() : nullptr,
                                  gw.data_ptr(), dev, s),
               "compact_linear dtheta");
  }
  return {gx, gm, gw};
}

int64_t index_error(int64_t device) {
  int flag = 0;
  cuda_check(se_cuda::index_error(static_cast<int>(device), &flag), "index_error");
  return flag;
}

}  // namespace

TORCH_LIBRARY(sparse_engine_cuda, m) {
  m.def("reparam_fwd(Tensor? m, Tensor w, Tensor? mask, int stream) -> Tensor", &reparam_fwd);
  m.def("reparam_bwd(Tensor grad, Tensor? m, Tensor w, Tensor? mask, int stream) -> (Tensor, Tensor)", &reparam_bwd);
  m.def("signin_reset(Tensor m, Tensor w, Tensor? mask, float beta, int stream) -> (Tensor, Tensor)", &signin_reset);
  m.def(
      "fused_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)?[] buf1, Tensor(c!)?[] buf2, Tensor?[] masks, "
      "Tensor lr, int step, str kind, float momentum, float dampening, bool nesterov, float beta1, float beta2, "
      "float eps, float weight_decay, float alpha, bool maximize, int stream) -> ()",
      &fused_step);
  m.def(
      "compact_linear_fwd(Tensor x, Tensor? m_values, Tensor w_values, Tensor? bias, Tensor crow, Tensor col, "
      "Tensor row, Tensor ccol, Tensor row_t, Tensor perm, int out_features, int in_features, int stream) -> Tensor",
      &compact_linear_fwd);
  m.def(
      "compact_linear_bwd(Tensor grad_y, Tensor x, Tensor? m_values, Tensor w_values, Tensor crow, Tensor col, "
      "Tensor row, Tensor ccol, Tensor row_t, Tensor perm, int out_features, int in_features, "
      "bool needs_x_grad, int stream) -> (Tensor, Tensor, Tensor)",
      &compact_linear_bwd);
  m.def("index_error(int device) -> int", &index_error);
}

// `import sparse_engine._cuda_C` loads this library (registering the ops); it has no Python API.
PyMODINIT_FUNC PyInit__cuda_C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_cuda_C",
                                   "sparse_engine CUDA ops (torch.ops.sparse_engine_cuda)", -1, nullptr};
  return PyModule_Create(&def);
}
