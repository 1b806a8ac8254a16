// The C++ (CPU) ops of sparse_engine: one TORCH_LIBRARY(sparse_engine_C) schema file.
//
// Each op takes exactly the arguments of its reference in sparse_engine/ops/reference.py (see
// sparse_engine/ops/_cpp.py, which maps the Python signatures onto these schemas). This file only checks
// arguments and allocates; the kernels (csrc/cpu/*.cpp) see raw pointers. Namespace `sparse_engine_C`
// because `sparse_engine` belongs to the Python custom ops (sparse_engine/ops/__init__.py) that dispatch to us.
//
// Index structures are checked cheaply here (dtypes, sizes, compressed pointers: O(rows)); every
// col entry is range-checked inside the kernels as it is read, so a corrupt index
// raises a ValueError instead of reading out of bounds. (The CPU kernels read only crow/col: dX is a
// scatter from the CSR rows, see csrc/cpu/compact_linear.cpp.)
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdio>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "messages.h"
#include "cpu/kernels.h"
#include "cpu/sparse_conv.h"

namespace {

using at::Tensor;
using c10::optional;

using se_msg::check_int32_dim, se_msg::num, se_msg::real, se_msg::shape;  // messages.h

se_cpu::Dtype dtype_of(const Tensor& t, const char* name) {
  if (t.scalar_type() == at::kFloat) return se_cpu::kFloat32;
  if (t.scalar_type() == at::kDouble) return se_cpu::kFloat64;
  TORCH_CHECK_VALUE(false, name, " must be float32 or float64 for the C++ backend, got ", t.scalar_type());
  return se_cpu::kFloat32;
}

void check_cpu(const Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor for the C++ backend, got ", t.device());
  TORCH_CHECK_VALUE(!t.is_sparse() && t.layout() == at::kStrided, name, " must be a strided (dense) tensor");
}

void check_same(const Tensor& t, const Tensor& ref, const char* name, const char* ref_name) {
  check_cpu(t, name);
  TORCH_CHECK_VALUE(t.scalar_type() == ref.scalar_type(), name, " must have the dtype of ", ref_name, " (",
                    ref.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), name, " must have the shape of ", ref_name, " ", shape(ref.sizes()),
                    ", got ", shape(t.sizes()));
}

void check_mask(const optional<Tensor>& mask, const Tensor& ref, const char* ref_name) {
  if (!mask) return;
  check_cpu(*mask, "mask");
  TORCH_CHECK_VALUE(mask->scalar_type() == at::kBool, "mask must be torch.bool, got ", mask->scalar_type());
  TORCH_CHECK_VALUE(mask->sizes() == ref.sizes(), "mask must have the shape of ", ref_name, " ", shape(ref.sizes()),
                    ", got ", shape(mask->sizes()));
}

Tensor index_tensor(const Tensor& t, const char* name, int64_t numel) {
  check_cpu(t, name);
  TORCH_CHECK_VALUE(t.scalar_type() == at::kInt, name, " must be int32 (layout index), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1, name, " must be 1-D, got shape ", shape(t.sizes()));
  TORCH_CHECK_VALUE(numel < 0 || t.numel() == numel, name, " must have ", num(numel), " entries, got ", num(t.numel()));
  return t.contiguous();
}

// Compressed pointers: ptr[0] = 0, non-decreasing, ptr[-1] = nnz. O(rows); makes every [ptr[r], ptr[r+1])
// range safe for the kernels.
void check_pointers(const Tensor& ptr, int64_t nnz, const char* name) {
  const int32_t* p = ptr.data_ptr<int32_t>();
  const int64_t n = ptr.numel() - 1;
  TORCH_CHECK_VALUE(p[0] == 0, name, "[0] must be 0, got ", num(p[0]));
  // One branch-free pass (it vectorises), then the first offender for the message.
  bool ordered = true;
  for (int64_t r = 0; r < n; ++r) ordered &= p[r + 1] >= p[r];
  for (int64_t r = 0; !ordered && r < n; ++r)
    TORCH_CHECK_VALUE(p[r + 1] >= p[r], name, " must be non-decreasing: ", name, "[", num(r + 1), "] = ", num(p[r + 1]),
                      " < ", name, "[", num(r), "] = ", num(p[r]));
  TORCH_CHECK_VALUE(p[n] == nnz, name, "[-1] must equal the number of stored values ", num(nnz), ", got ", num(p[n]));
}

struct Compact {
  int64_t N, K, bn, bk, nnzb, nbr, nbc;
  se_cpu::Dtype dt;
  Tensor m, w, crow, col, row, ccol, row_t, perm;
  bool has_m;
  bool col16;  // col is 16-bit, read unsigned (CSR forward only)
};

Compact check_compact(const optional<Tensor>& m_values, const Tensor& w_values, const Tensor& crow,
                      const Tensor& col, const Tensor& row, const Tensor& ccol, const Tensor& row_t,
                      const Tensor& perm, int64_t out_features, int64_t in_features, bool transposed) {
  Compact c;
  check_int32_dim(out_features, "out_features");
  check_int32_dim(in_features, "in_features");
  check_cpu(w_values, "w_values");
  c.dt = dtype_of(w_values, "w_values");
  TORCH_CHECK_VALUE(w_values.dim() == 1 || w_values.dim() == 3,
                    "w_values must be 1-D (CSR, (nnz,)) or 3-D (BSR, (nnzb, bn, bk)), got shape ", shape(w_values.sizes()));
  c.N = out_features;
  c.K = in_features;
  c.nnzb = w_values.size(0);
  check_int32_dim(c.nnzb, "nnz (w_values.shape[0])");
  c.bn = w_values.dim() == 3 ? w_values.size(1) : 1;
  c.bk = w_values.dim() == 3 ? w_values.size(2) : 1;
  TORCH_CHECK_VALUE(c.bn >= 1 && c.bk >= 1, "BSR blocks must be at least 1x1, got ", num(c.bn), "x", num(c.bk));
  c.nbr = (c.N + c.bn - 1) / c.bn;
  c.nbc = (c.K + c.bk - 1) / c.bk;
  c.has_m = m_values.has_value();
  if (c.has_m) check_same(*m_values, w_values, "m_values", "w_values");
  c.w = w_values.contiguous();
  c.m = c.has_m ? m_values->contiguous() : Tensor();
  c.crow = index_tensor(crow, "crow", c.nbr + 1);
  // The forward of a CSR layer with K <= 65536 also takes 16-bit columns: an int16 tensor whose bits are
  // read as unsigned (0..65535; int16 rather than uint16 because torch pickles int16 tensors, not uint16
  // ones). The inference layers keep such a copy of their columns: half the index bytes to stream.
  c.col16 = col.defined() && col.scalar_type() == at::kShort;
  if (c.col16) {
    TORCH_CHECK_VALUE(!transposed && w_values.dim() == 1 && c.K <= 65536,
                      "col may be 16-bit (int16) only in the forward of a CSR layer with in_features <= 65536 "
                      "(this is ", transposed ? "a backward" : (w_values.dim() == 1 ? "a CSR forward" : "a BSR forward"),
                      ", in_features ", num(c.K), "); pass int32 col");
    check_cpu(col, "col");
    TORCH_CHECK_VALUE(col.dim() == 1 && col.numel() == c.nnzb, "col must be 1-D with ", num(c.nnzb),
                      " entries, got shape ", shape(col.sizes()));
    c.col = col.contiguous();
  } else {
    c.col = index_tensor(col, "col", c.nnzb);
  }
  if (row.defined()) c.row = index_tensor(row, "row", c.nnzb);  // undefined: the inference entry (no row)
  check_pointers(c.crow, c.nnzb, "crow");
  if (transposed) {
    // The CPU backward reads only the CSR side (dX by scatter); the transposed fields are part of the
    // op's signature (the CUDA kernels use them), so their sizes are still checked.
    c.ccol = index_tensor(ccol, "ccol", c.nbc + 1);
    c.row_t = index_tensor(row_t, "row_t", c.nnzb);
    c.perm = index_tensor(perm, "perm", c.nnzb);
  }
  return c;
}

Tensor activations(const Tensor& t, const char* name, int64_t cols, const Compact& c, const char* what) {
  check_cpu(t, name);
  TORCH_CHECK_VALUE(t.scalar_type() == c.w.scalar_type(), name, " must have the dtype of w_values (",
                    c.w.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(1) == cols, name, " must be (B, ", num(cols), ") (", what, "), got ",
                    shape(t.sizes()));
  return t.contiguous();
}

void raise_kernel_error(int err, const char* pass) {
  TORCH_CHECK_VALUE(err != 1, "compact_linear ", pass,
                    ": an index entry is out of range (col >= number of (block) columns); rebuild the index "
                    "or call index.validate()");
  TORCH_CHECK(err == 0, "compact_linear ", pass, ": internal error ", num(err));
}

Tensor workspace(int64_t bytes) { return at::empty({bytes > 0 ? bytes : 1}, at::TensorOptions().dtype(at::kByte)); }

const void* ptr_or_null(const Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

Tensor compact_linear_fwd(const Tensor& x, const optional<Tensor>& m_values, const Tensor& w_values,
                          const optional<Tensor>& bias, const Tensor& crow, const Tensor& col, const Tensor& row,
                          const Tensor& ccol, const Tensor& row_t, const Tensor& perm, int64_t out_features,
                          int64_t in_features) {
  Compact c = check_compact(m_values, w_values, crow, col, row, ccol, row_t, perm, out_features, in_features, false);
  Tensor xc = activations(x, "x", c.K, c, "in_features");
  Tensor b;
  if (bias) {
    check_cpu(*bias, "bias");
    TORCH_CHECK_VALUE(bias->scalar_type() == c.w.scalar_type() && bias->dim() == 1 && bias->size(0) == c.N,
                      "bias must be (", num(c.N), ",) of dtype ", c.w.scalar_type(), ", got ", shape(bias->sizes()), " ",
                      bias->scalar_type());
    b = bias->contiguous();
  }
  const int64_t B = xc.size(0);
  Tensor y = at::empty({B, c.N}, xc.options());
  // Batch 1 reads x in place and needs no workspace: no allocation then (it costs ~0.5 µs of a ~10 µs SpMV).
  const int64_t ws_bytes = se_cpu::forward_workspace_bytes(c.dt, B, c.N, c.K, c.nnzb, c.bn, c.bk);
  Tensor ws = ws_bytes > 0 ? workspace(ws_bytes) : Tensor();
  const int err = se_cpu::compact_linear_forward(c.dt, xc.data_ptr(), B, c.N, c.K, ptr_or_null(c.m), c.w.data_ptr(),
                                                 ptr_or_null(b), c.crow.data_ptr<int32_t>(),
                                                 c.col16 ? nullptr : c.col.data_ptr<int32_t>(),
                                                 c.col16 ? static_cast<const uint16_t*>(c.col.data_ptr()) : nullptr,
                                                 c.bn, c.bk, y.data_ptr(), ws.defined() ? ws.data_ptr() : nullptr);
  raise_kernel_error(err, "forward");
  return y;
}

std::tuple<Tensor, Tensor, Tensor> compact_linear_bwd(const Tensor& grad_y, const Tensor& x,
                                                      const optional<Tensor>& m_values, const Tensor& w_values,
                                                      const Tensor& crow, const Tensor& col, const Tensor& row,
                                                      const Tensor& ccol, const Tensor& row_t, const Tensor& perm,
                                                      int64_t out_features, int64_t in_features,
                                                      bool needs_x_grad) {
  Compact c = check_compact(m_values, w_values, crow, col, row, ccol, row_t, perm, out_features, in_features, true);
  Tensor xc = activations(x, "x", c.K, c, "in_features");
  Tensor gy = activations(grad_y, "grad_y", c.N, c, "out_features");
  TORCH_CHECK_VALUE(gy.size(0) == xc.size(0), "grad_y must have the batch size of x (", num(xc.size(0)), "), got ",
                    num(gy.size(0)));
  const int64_t B = xc.size(0);
  // Without needs_x_grad (x is a network input) g_x is the (0,) placeholder: the kernel gets a null g_x and
  // skips the dX scatter and its panels.
  Tensor gx = needs_x_grad ? at::empty({B, c.K}, xc.options()) : at::empty({0}, xc.options());
  Tensor gw = at::empty_like(c.w);
  Tensor gm = c.has_m ? at::empty_like(c.w) : at::empty({0}, c.w.options());
  Tensor ws = workspace(se_cpu::backward_workspace_bytes(c.dt, B, c.N, c.K, c.nnzb, c.bn, c.bk, needs_x_grad));
  const int err = se_cpu::compact_linear_backward(
      c.dt, gy.data_ptr(), xc.data_ptr(), B, c.N, c.K, ptr_or_null(c.m), c.w.data_ptr(), c.crow.data_ptr<int32_t>(),
      c.col.data_ptr<int32_t>(), c.nnzb, c.bn, c.bk, needs_x_grad ? gx.data_ptr() : nullptr,
      c.has_m ? gm.data_ptr() : nullptr, gw.data_ptr(), ws.data_ptr());
  raise_kernel_error(err, "backward");
  return {gx, gm, gw};
}

// compact_linear_train: the forward and its whole backward (dX, g_m, g_w and the bias sum) behind one
// autograd node, so that a training step costs one dispatcher call per layer per direction. The Python
// custom op (sparse_engine::compact_linear) costs ~tens of µs of argument handling per call, which is
// the whole budget of a small layer (LeNet-300-100 at 90 %); the math is the two ops above, unchanged.
// The gradients an autograd node returns for an op whose first four arguments are (x, m_values,
// w_values, bias) and whose other `nargs - 4` (index tensors, sizes) get none.
torch::autograd::variable_list input_grads(size_t nargs, Tensor gx, Tensor gm, Tensor gw, Tensor gb) {
  torch::autograd::variable_list out(nargs);
  out[0] = std::move(gx);
  out[1] = std::move(gm);
  out[2] = std::move(gw);
  out[3] = std::move(gb);
  return out;
}

struct CompactLinearFn : public torch::autograd::Function<CompactLinearFn> {
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& x, const optional<Tensor>& m_values,
                        const Tensor& w_values, const optional<Tensor>& bias, const Tensor& crow, const Tensor& col,
                        const Tensor& row, const Tensor& ccol, const Tensor& row_t, const Tensor& perm,
                        int64_t out_features, int64_t in_features) {
    ctx->save_for_backward({x, m_values.value_or(Tensor()), w_values, crow, col, row, ccol, row_t, perm});
    ctx->saved_data["dims"] = std::vector<int64_t>{out_features, in_features};
    ctx->saved_data["has_bias"] = bias.has_value();
    return compact_linear_fwd(x, m_values, w_values, bias, crow, col, row, ccol, row_t, perm, out_features,
                              in_features);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const auto dims = ctx->saved_data["dims"].toIntVector();
    const bool needs_x = ctx->needs_input_grad(0);
    const optional<Tensor> m = s[1].defined() ? optional<Tensor>(s[1]) : c10::nullopt;
    const Tensor gy = grads[0].contiguous();
    auto [gx, gm, gw] = compact_linear_bwd(gy, s[0], m, s[2], s[3], s[4], s[5], s[6], s[7], s[8], dims[0], dims[1],
                                           needs_x);
    return input_grads(12, needs_x ? gx : Tensor(), m ? gm : Tensor(), gw,
                       ctx->saved_data["has_bias"].toBool() ? gy.sum(0) : Tensor());
  }
};

Tensor compact_linear_train(const Tensor& x, const optional<Tensor>& m_values, const Tensor& w_values,
                            const optional<Tensor>& bias, const Tensor& crow, const Tensor& col, const Tensor& row,
                            const Tensor& ccol, const Tensor& row_t, const Tensor& perm, int64_t out_features,
                            int64_t in_features) {
  return CompactLinearFn::apply(x, m_values, w_values, bias, crow, col, row, ccol, row_t, perm, out_features,
                                in_features);
}

// -------------------------------------------------------------------------------- sparse_conv2d

// Checks of one sparse_conv2d call: x (B, C, H, W), CSR values (nnz,) over the (O, C*kh*kw) weight view.
// Unlike compact_linear, every index entry is range-checked here, up front: O(nnz) reads, nothing next to
// the O(nnz * B * Ho * Wo) convolution.
struct ConvCall {
  se_cpu::ConvGeom g;
  se_cpu::Dtype dt;
  Tensor x, m, w, crow, col, ccol, row_t, perm;
  int64_t nnz;
  bool has_m;
};

void check_entries(const Tensor& t, int64_t bound, const char* name, const char* what) {
  const int32_t* p = t.data_ptr<int32_t>();
  for (int64_t e = 0; e < t.numel(); ++e)
    TORCH_CHECK_VALUE(p[e] >= 0 && p[e] < bound, name, "[", num(e), "] = ", num(p[e]), " is out of range [0, ",
                      num(bound), ") (", what, "); rebuild the index or call index.validate()");
}

ConvCall check_conv(const Tensor& x, const optional<Tensor>& m_values, const Tensor& w_values, const Tensor& crow,
                    const Tensor& col, const Tensor& row, const Tensor& ccol, const Tensor& row_t, const Tensor& perm,
                    int64_t out_channels, int64_t kernel_h, int64_t kernel_w, int64_t stride_h, int64_t stride_w,
                    int64_t padding_h, int64_t padding_w, bool backward) {
  ConvCall c;
  check_cpu(w_values, "w_values");
  c.dt = dtype_of(w_values, "w_values");
  TORCH_CHECK_VALUE(w_values.dim() == 1, "w_values must be 1-D (CSR values (nnz,)); sparse_conv2d has no BSR "
                    "kernel, got shape ", shape(w_values.sizes()));
  check_cpu(x, "x");
  TORCH_CHECK_VALUE(x.scalar_type() == w_values.scalar_type(), "x must have the dtype of w_values (",
                    w_values.scalar_type(), "), got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 4, "x must be 4-D (B, C, H, W), got shape ", shape(x.sizes()));
  TORCH_CHECK_VALUE(kernel_h >= 1 && kernel_w >= 1, "kernel size must be >= 1, got ", num(kernel_h), "x",
                    num(kernel_w));
  TORCH_CHECK_VALUE(stride_h >= 1 && stride_w >= 1, "stride must be >= 1, got (", num(stride_h), ", ",
                    num(stride_w), ")");
  TORCH_CHECK_VALUE(padding_h >= 0 && padding_w >= 0, "padding must be >= 0, got (", num(padding_h), ", ",
                    num(padding_w), ")");
  check_int32_dim(out_channels, "out_channels");
  se_cpu::ConvGeom& g = c.g;
  g.B = x.size(0);
  g.C = x.size(1);
  g.H = x.size(2);
  g.W = x.size(3);
  g.O = out_channels;
  g.kh = kernel_h;
  g.kw = kernel_w;
  g.sh = stride_h;
  g.sw = stride_w;
  g.ph = padding_h;
  g.pw = padding_w;
  TORCH_CHECK_VALUE(g.H + 2 * g.ph >= g.kh && g.W + 2 * g.pw >= g.kw, "x is too small for the kernel ",
                    num(g.kh), "x", num(g.kw), " after padding: got shape ", shape(x.sizes()));
  g.Ho = (g.H + 2 * g.ph - g.kh) / g.sh + 1;
  g.Wo = (g.W + 2 * g.pw - g.kw) / g.sw + 1;
  const int64_t K = g.C * g.kh * g.kw;
  check_int32_dim(K, "in_channels * kernel_h * kernel_w");
  c.nnz = w_values.size(0);
  check_int32_dim(c.nnz, "nnz (w_values.shape[0])");
  c.has_m = m_values.has_value();
  if (c.has_m) check_same(*m_values, w_values, "m_values", "w_values");
  // channels_last x is read as it is (the kernels transpose each image into their own layout) and gives
  // channels_last y and g_x, as nn.Conv2d does; any other strides are copied to contiguous first
  g.nhwc = x.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
  c.x = x.contiguous(g.nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  c.w = w_values.contiguous();
  c.m = c.has_m ? m_values->contiguous() : Tensor();
  c.crow = index_tensor(crow, "crow", g.O + 1);
  c.col = index_tensor(col, "col", c.nnz);
  index_tensor(row, "row", c.nnz);
  check_pointers(c.crow, c.nnz, "crow");
  check_entries(c.col, K, "col", "in_channels * kernel_h * kernel_w columns");
  c.ccol = index_tensor(ccol, "ccol", K + 1);
  c.row_t = index_tensor(row_t, "row_t", c.nnz);
  c.perm = index_tensor(perm, "perm", c.nnz);
  if (backward) {  // only the backward reads the CSC side (dX gathers per input channel)
    check_pointers(c.ccol, c.nnz, "ccol");
    check_entries(c.row_t, g.O, "row_t", "out_channels rows");
    check_entries(c.perm, c.nnz, "perm", "stored values");
  }
  return c;
}

at::MemoryFormat format_of(const se_cpu::ConvGeom& g) {
  return g.nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

Tensor sparse_conv2d_fwd(const Tensor& x, const optional<Tensor>& m_values, const Tensor& w_values,
                         const optional<Tensor>& bias, const Tensor& crow, const Tensor& col, const Tensor& row,
                         const Tensor& ccol, const Tensor& row_t, const Tensor& perm, int64_t out_channels,
                         int64_t kernel_h, int64_t kernel_w, int64_t stride_h, int64_t stride_w, int64_t padding_h,
                         int64_t padding_w) {
  ConvCall c = check_conv(x, m_values, w_values, crow, col, row, ccol, row_t, perm, out_channels, kernel_h, kernel_w,
                          stride_h, stride_w, padding_h, padding_w, false);
  Tensor b;
  if (bias) {
    check_cpu(*bias, "bias");
    TORCH_CHECK_VALUE(bias->scalar_type() == c.w.scalar_type() && bias->dim() == 1 && bias->size(0) == c.g.O,
                      "bias must be (", num(c.g.O), ",) of dtype ", c.w.scalar_type(), ", got ", shape(bias->sizes()),
                      " ", bias->scalar_type());
    b = bias->contiguous();
  }
  Tensor y = at::empty({c.g.B, c.g.O, c.g.Ho, c.g.Wo}, c.x.options().memory_format(format_of(c.g)));
  const int err = se_cpu::sparse_conv2d_forward(c.dt, c.g, c.x.data_ptr(), ptr_or_null(c.m), c.w.data_ptr(),
                                                ptr_or_null(b), c.crow.data_ptr<int32_t>(), c.col.data_ptr<int32_t>(),
                                                c.nnz, y.data_ptr());
  TORCH_CHECK(err == 0, "sparse_conv2d forward: internal error ", num(err));
  return y;
}

std::tuple<Tensor, Tensor, Tensor> sparse_conv2d_bwd(const Tensor& grad_y, const Tensor& x,
                                                     const optional<Tensor>& m_values, const Tensor& w_values,
                                                     const Tensor& crow, const Tensor& col, const Tensor& row,
                                                     const Tensor& ccol, const Tensor& row_t, const Tensor& perm,
                                                     int64_t out_channels, int64_t kernel_h, int64_t kernel_w,
                                                     int64_t stride_h, int64_t stride_w, int64_t padding_h,
                                                     int64_t padding_w, bool needs_x_grad) {
  ConvCall c = check_conv(x, m_values, w_values, crow, col, row, ccol, row_t, perm, out_channels, kernel_h, kernel_w,
                          stride_h, stride_w, padding_h, padding_w, true);
  check_cpu(grad_y, "grad_y");
  TORCH_CHECK_VALUE(grad_y.scalar_type() == c.w.scalar_type(), "grad_y must have the dtype of w_values (",
                    c.w.scalar_type(), "), got ", grad_y.scalar_type());
  const std::vector<int64_t> ys{c.g.B, c.g.O, c.g.Ho, c.g.Wo};
  TORCH_CHECK_VALUE(grad_y.sizes() == at::IntArrayRef(ys), "grad_y must have the output shape ",
                    shape(at::IntArrayRef(ys)), ", got ", shape(grad_y.sizes()));
  Tensor gy = grad_y.contiguous(format_of(c.g));
  Tensor gx = needs_x_grad ? at::empty_like(c.x, format_of(c.g)) : at::empty({0}, c.x.options());
  Tensor gw = at::empty_like(c.w);
  Tensor gm = c.has_m ? at::empty_like(c.w) : at::empty({0}, c.w.options());
  const int err = se_cpu::sparse_conv2d_backward(
      c.dt, c.g, gy.data_ptr(), c.x.data_ptr(), ptr_or_null(c.m), c.w.data_ptr(), c.crow.data_ptr<int32_t>(),
      c.col.data_ptr<int32_t>(), c.ccol.data_ptr<int32_t>(), c.row_t.data_ptr<int32_t>(), c.perm.data_ptr<int32_t>(),
      c.nnz, needs_x_grad ? gx.data_ptr() : nullptr, c.has_m ? gm.data_ptr() : nullptr, gw.data_ptr());
  TORCH_CHECK(err == 0, "sparse_conv2d backward: internal error ", num(err));
  return {gx, gm, gw};
}

// sparse_conv2d_train: the direct convolution and its whole backward (dX, g_m, g_w and the bias sum)
// behind one autograd node, as compact_linear_train: the Python custom op's autograd cost ~0.2 ms of
// argument handling per call and direction (a 4->4 conv on a 4x4 image, fwd+bwd: 316 µs against 84 µs
// for nn.Conv2d), which a small ResNet pays for every conv of every step.
struct SparseConv2dFn : public torch::autograd::Function<SparseConv2dFn> {
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& x, const optional<Tensor>& m_values,
                        const Tensor& w_values, const optional<Tensor>& bias, const Tensor& crow, const Tensor& col,
                        const Tensor& row, const Tensor& ccol, const Tensor& row_t, const Tensor& perm,
                        int64_t out_channels, int64_t kernel_h, int64_t kernel_w, int64_t stride_h, int64_t stride_w,
                        int64_t padding_h, int64_t padding_w) {
    ctx->save_for_backward({x, m_values.value_or(Tensor()), w_values, crow, col, row, ccol, row_t, perm});
    ctx->saved_data["dims"] =
        std::vector<int64_t>{out_channels, kernel_h, kernel_w, stride_h, stride_w, padding_h, padding_w};
    ctx->saved_data["has_bias"] = bias.has_value();
    return sparse_conv2d_fwd(x, m_values, w_values, bias, crow, col, row, ccol, row_t, perm, out_channels, kernel_h,
                             kernel_w, stride_h, stride_w, padding_h, padding_w);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const auto d = ctx->saved_data["dims"].toIntVector();
    const bool needs_x = ctx->needs_input_grad(0);
    const optional<Tensor> m = s[1].defined() ? optional<Tensor>(s[1]) : c10::nullopt;
    const Tensor& gy = grads[0];  // laid out by sparse_conv2d_bwd in x's format; the bias sum takes any
    auto [gx, gm, gw] = sparse_conv2d_bwd(gy, s[0], m, s[2], s[3], s[4], s[5], s[6], s[7], s[8], d[0], d[1], d[2],
                                          d[3], d[4], d[5], d[6], needs_x);
    return input_grads(17, needs_x ? gx : Tensor(), m ? gm : Tensor(), gw,
                       ctx->saved_data["has_bias"].toBool() ? gy.sum({0, 2, 3}) : Tensor());
  }
};

Tensor sparse_conv2d_train(const Tensor& x, const optional<Tensor>& m_values, const Tensor& w_values,
                           const optional<Tensor>& bias, const Tensor& crow, const Tensor& col, const Tensor& row,
                           const Tensor& ccol, const Tensor& row_t, const Tensor& perm, int64_t out_channels,
                           int64_t kernel_h, int64_t kernel_w, int64_t stride_h, int64_t stride_w, int64_t padding_h,
                           int64_t padding_w) {
  return SparseConv2dFn::apply(x, m_values, w_values, bias, crow, col, row, ccol, row_t, perm, out_channels, kernel_h,
                               kernel_w, stride_h, stride_w, padding_h, padding_w);
}

// --------------------------------------------------------------------------------- elementwise ops

Tensor reparam_fwd(const optional<Tensor>& m, const Tensor& w, const optional<Tensor>& mask) {
  check_cpu(w, "w");
  const auto dt = dtype_of(w, "w");
  if (m) check_same(*m, w, "m", "w");
  check_mask(mask, w, "w");
  Tensor wc = w.contiguous(), mc = m ? m->contiguous() : Tensor(), kc = mask ? mask->contiguous() : Tensor();
  Tensor out = at::empty_like(wc);
  se_cpu::reparam_forward(dt, wc.numel(), ptr_or_null(mc), wc.data_ptr(),
                          kc.defined() ? static_cast<const uint8_t*>(kc.data_ptr()) : nullptr, out.data_ptr());
  return out;
}

std::tuple<Tensor, Tensor> reparam_bwd(const Tensor& grad, const optional<Tensor>& m, const Tensor& w,
                                       const optional<Tensor>& mask) {
  check_cpu(w, "w");
  const auto dt = dtype_of(w, "w");
  check_same(grad, w, "grad", "w");
  if (m) check_same(*m, w, "m", "w");
  check_mask(mask, w, "w");
  Tensor gc = grad.contiguous(), wc = w.contiguous(), mc = m ? m->contiguous() : Tensor();
  Tensor kc = mask ? mask->contiguous() : Tensor();
  Tensor gw = at::empty_like(wc);
  Tensor gm = m ? at::empty_like(wc) : at::empty({0}, wc.options());
  se_cpu::reparam_backward(dt, wc.numel(), gc.data_ptr(), ptr_or_null(mc), wc.data_ptr(),
                           kc.defined() ? static_cast<const uint8_t*>(kc.data_ptr()) : nullptr,
                           m ? gm.data_ptr() : nullptr, gw.data_ptr());
  return {gm, gw};
}

std::tuple<Tensor, Tensor> signin_reset(const Tensor& m, const Tensor& w, const optional<Tensor>& mask, double beta) {
  check_cpu(w, "w");
  const auto dt = dtype_of(w, "w");
  check_same(m, w, "m", "w");
  check_mask(mask, w, "w");
  TORCH_CHECK_VALUE(beta >= 0 && beta < std::numeric_limits<double>::infinity(),
                    "beta must be a finite number >= 0, got ", real(beta));
  Tensor mc = m.contiguous(), wc = w.contiguous(), kc = mask ? mask->contiguous() : Tensor();
  Tensor mo = at::empty_like(wc), wo = at::empty_like(wc);
  se_cpu::signin_reset(dt, wc.numel(), mc.data_ptr(), wc.data_ptr(),
                       kc.defined() ? static_cast<const uint8_t*>(kc.data_ptr()) : nullptr, beta, mo.data_ptr(),
                       wo.data_ptr());
  return {mo, wo};
}

bool all_finite(at::TensorList tensors, const c10::List<optional<Tensor>>& masks) {
  TORCH_CHECK_VALUE(masks.size() == tensors.size(), "masks must have one entry per tensor (", num(tensors.size()),
                    "), got ", num(masks.size()));
  for (size_t i = 0; i < tensors.size(); ++i) {
    const Tensor& t = tensors[i];
    const optional<Tensor> mask = masks.get(i);
    check_cpu(t, "tensors[i]");
    const auto dt = dtype_of(t, "tensors[i]");
    check_mask(mask, t, "tensors[i]");
    const Tensor tc = t.contiguous(), kc = mask ? mask->contiguous() : Tensor();
    if (!se_cpu::all_finite(dt, tc.numel(), tc.data_ptr(),
                            kc.defined() ? static_cast<const uint8_t*>(kc.data_ptr()) : nullptr))
      return false;
  }
  return true;
}

void require_inplace(const Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous (it is updated in place)");
}

se_cpu::StepConfig step_config(int64_t step, c10::string_view kind, double momentum, double dampening,
                               bool nesterov, double beta1, double beta2, double eps, double weight_decay,
                               bool maximize) {
  TORCH_CHECK_VALUE(step >= 1, "step must be >= 1 (1-based count of this step), got ", num(step));
  se_cpu::StepConfig cfg{};
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
  cfg.maximize = maximize;
  return cfg;
}

// Checks one tensor's arguments and runs the step; `lr_cache` holds lr cast to the last dtype seen.
void step_one(const Tensor& param, const Tensor& grad, const optional<Tensor>& buf1, const optional<Tensor>& buf2,
              const optional<Tensor>& mask, const Tensor& lr, const se_cpu::StepConfig& cfg, Tensor& lr_cache) {
  check_cpu(param, "param");
  const auto dt = dtype_of(param, "param");
  require_inplace(param, "param");
  check_same(grad, param, "grad", "param");
  check_mask(mask, param, "param");
  for (const auto* b : {&buf1, &buf2}) {
    if (*b) {
      check_same(**b, param, b == &buf1 ? "buf1" : "buf2", "param");
      require_inplace(**b, b == &buf1 ? "buf1" : "buf2");
    }
  }
  if (cfg.kind == 0 && cfg.momentum != 0.0)
    TORCH_CHECK_VALUE(buf1.has_value(), "buf1 (momentum buffer) must be given when momentum != 0");
  if (cfg.kind == 1)
    TORCH_CHECK_VALUE(buf1.has_value() && buf2.has_value(),
                      "buf1 (exp_avg) and buf2 (exp_avg_sq) must be given for kind='adamw'");
  if (!lr_cache.defined() || lr_cache.scalar_type() != param.scalar_type())
    lr_cache = lr.to(at::kCPU).to(param.scalar_type());  // the reference casts lr to the param dtype
  Tensor gc = grad.contiguous(), kc = mask ? mask->contiguous() : Tensor();
  se_cpu::fused_step(dt, param.numel(), param.data_ptr(), gc.data_ptr(), buf1 ? buf1->data_ptr() : nullptr,
                     buf2 ? buf2->data_ptr() : nullptr,
                     kc.defined() ? static_cast<const uint8_t*>(kc.data_ptr()) : nullptr, lr_cache.data_ptr(), cfg);
}

void fused_step(const Tensor& param, const Tensor& grad, const optional<Tensor>& buf1, const optional<Tensor>& buf2,
                const optional<Tensor>& mask, const Tensor& lr, int64_t step, c10::string_view kind,
                double momentum, double dampening, bool nesterov, double beta1, double beta2, double eps,
                double weight_decay, double alpha, bool maximize) {
  TORCH_CHECK_VALUE(lr.dim() == 0, "lr must be a 0-dim tensor, got shape ", shape(lr.sizes()));
  se_cpu::StepConfig cfg =
      step_config(step, kind, momentum, dampening, nesterov, beta1, beta2, eps, weight_decay, maximize);
  cfg.alpha = alpha;
  Tensor lr_cache;
  step_one(param, grad, buf1, buf2, mask, lr, cfg, lr_cache);
}

// The step over every tensor of an optimizer group in one call (same hyperparameters and step count; α
// per tensor: PILoT's α applies to the factors only). Per tensor the same kernel as fused_step, so the
// results are the same bits; what it saves is the per-tensor call overhead of the many small tensors
// (biases, small layers).
void fused_step_multi(at::TensorList params, at::TensorList grads, const c10::List<optional<Tensor>>& buf1,
                      const c10::List<optional<Tensor>>& buf2, const c10::List<optional<Tensor>>& masks,
                      const Tensor& lr, int64_t step, c10::string_view kind, double momentum, double dampening,
                      bool nesterov, double beta1, double beta2, double eps, double weight_decay,
                      at::ArrayRef<double> alphas, bool maximize) {
  const size_t n = params.size();
  TORCH_CHECK_VALUE(grads.size() == n && buf1.size() == n && buf2.size() == n && masks.size() == n &&
                        alphas.size() == n,
                    "params, grads, buf1, buf2, masks and alphas must have the same length, got ", num(n), ", ",
                    num(grads.size()), ", ", num(buf1.size()), ", ", num(buf2.size()), ", ", num(masks.size()),
                    ", ", num(alphas.size()));
  TORCH_CHECK_VALUE(lr.dim() == 0, "lr must be a 0-dim tensor, got shape ", shape(lr.sizes()));
  se_cpu::StepConfig cfg =
      step_config(step, kind, momentum, dampening, nesterov, beta1, beta2, eps, weight_decay, maximize);
  Tensor lr_cache;
  for (size_t i = 0; i < n; ++i) {
    cfg.alpha = alphas[i];
    step_one(params[i], grads[i], buf1.get(i), buf2.get(i), masks.get(i), lr, cfg, lr_cache);
  }
}

// ------------------------------------------------------------------------------------ ISA control

std::string isa() { return se_cpu::isa_name(); }

bool set_isa(c10::string_view name) {
  const std::string s(name);
  TORCH_CHECK_VALUE(s == "auto" || s == "base" || s == "avx2" || s == "avx512",
                    "isa must be one of auto, base, avx2, avx512, got '", s, "'");
  return se_cpu::set_isa(s.c_str());
}

int64_t set_panel_budget(int64_t bytes) { return se_cpu::set_panel_budget(bytes); }

}  // namespace

TORCH_LIBRARY(sparse_engine_C, m) {
  m.def(
      "compact_linear_fwd(Tensor x, Tensor? m_values, Tensor w_values, Tensor? bias, Tensor crow, Tensor col, "
      "Tensor row, Tensor ccol, Tensor row_t, Tensor perm, int out_features, int in_features) -> Tensor");
  m.def(
      "compact_linear_bwd(Tensor grad_y, Tensor x, Tensor? m_values, Tensor w_values, Tensor crow, Tensor col, "
      "Tensor row, Tensor ccol, Tensor row_t, Tensor perm, int out_features, int in_features, "
      "bool needs_x_grad=True) -> (Tensor, Tensor, Tensor)");
  m.def(
      "sparse_conv2d_fwd(Tensor x, Tensor? m_values, Tensor w_values, Tensor? bias, Tensor crow, Tensor col, "
      "Tensor row, Tensor ccol, Tensor row_t, Tensor perm, int out_channels, int kernel_h, int kernel_w, "
      "int stride_h, int stride_w, int padding_h, int padding_w) -> Tensor");
  m.def(
      "sparse_conv2d_bwd(Tensor grad_y, Tensor x, Tensor? m_values, Tensor w_values, Tensor crow, Tensor col, "
      "Tensor row, Tensor ccol, Tensor row_t, Tensor perm, int out_channels, int kernel_h, int kernel_w, "
      "int stride_h, int stride_w, int padding_h, int padding_w, bool needs_x_grad=True) -> (Tensor, Tensor, Tensor)");
  m.def(
      "compact_linear_train(Tensor x, Tensor? m_values, Tensor w_values, Tensor? bias, Tensor crow, Tensor col, "
      "Tensor row, Tensor ccol, Tensor row_t, Tensor perm, int out_features, int in_features) -> Tensor");
  m.def(
      "sparse_conv2d_train(Tensor x, Tensor? m_values, Tensor w_values, Tensor? bias, Tensor crow, Tensor col, "
      "Tensor row, Tensor ccol, Tensor row_t, Tensor perm, int out_channels, int kernel_h, int kernel_w, "
      "int stride_h, int stride_w, int padding_h, int padding_w) -> Tensor");
  m.def("reparam_fwd(Tensor? m, Tensor w, Tensor? mask) -> Tensor");
  m.def("reparam_bwd(Tensor grad, Tensor? m, Tensor w, Tensor? mask) -> (Tensor, Tensor)");
  m.def("signin_reset(Tensor m, Tensor w, Tensor? mask, float beta) -> (Tensor, Tensor)");
  m.def(
      "fused_step(Tensor(a!) param, Tensor grad, Tensor(b!)? buf1, Tensor(c!)? buf2, Tensor? mask, Tensor lr, "
      "int step, str kind, float momentum, float dampening, bool nesterov, float beta1, float beta2, float eps, "
      "float weight_decay, float alpha, bool maximize) -> ()");
  m.def(
      "fused_step_multi(Tensor(a!)[] params, Tensor[] grads, Tensor?[] buf1, Tensor?[] buf2, Tensor?[] masks, "
      "Tensor lr, int step, str kind, float momentum, float dampening, bool nesterov, float beta1, float beta2, "
      "float eps, float weight_decay, float[] alphas, bool maximize) -> ()");
  m.def("all_finite(Tensor[] tensors, Tensor?[] masks) -> bool");
  m.def("isa() -> str", &isa);
  m.def("set_isa(str name) -> bool", &set_isa);
  m.def("set_panel_budget(int bytes) -> int", &set_panel_budget);
}

TORCH_LIBRARY_IMPL(sparse_engine_C, CPU, m) {
  m.impl("compact_linear_fwd", &compact_linear_fwd);
  m.impl("compact_linear_bwd", &compact_linear_bwd);
  m.impl("sparse_conv2d_fwd", &sparse_conv2d_fwd);
  m.impl("sparse_conv2d_bwd", &sparse_conv2d_bwd);
  m.impl("compact_linear_train", &compact_linear_fwd);  // no autograd (inference mode): the forward
  m.impl("sparse_conv2d_train", &sparse_conv2d_fwd);
  m.impl("reparam_fwd", &reparam_fwd);
  m.impl("reparam_bwd", &reparam_bwd);
  m.impl("signin_reset", &signin_reset);
  m.impl("fused_step", &fused_step);
  m.impl("fused_step_multi", &fused_step_multi);
  m.impl("all_finite", &all_finite);
}

TORCH_LIBRARY_IMPL(sparse_engine_C, Autograd, m) {
  m.impl("compact_linear_train", &compact_linear_train);
  m.impl("sparse_conv2d_train", &sparse_conv2d_train);
}

// ------------------------------------------------------------------------ plain CPython entries
//
// sparse_engine._C.compact_linear_infer(x, values, bias, crow, col, out_features, in_features) -> y or None:
// compact_linear_fwd without m and without the index fields it does not read, called as a plain
// CPython function. A torch.ops call boxes its 12 arguments through the dispatcher (~4 µs, measured),
// more than a small layer's SpMV at batch 1; the inference layers call this instead. x may have any
// number of leading dimensions (y keeps them). It answers None, computing nothing, where x is a case
// for the registered op: a gradient is wanted (grad mode on and x, values or bias requiring one), or x
// is not a non-empty CPU tensor of values' dtype whose last dimension is in_features (the op then gives
// the autograd node or the error; ops.lean_inference_applies is the same rule in Python). Otherwise the
// same checks, kernel and results as the op. Deciding that here rather than in the layer's Python saves
// ~0.8 µs of attribute reads per call.
namespace {

const Tensor& tensor_arg(PyObject* o, const char* name) {
  TORCH_CHECK_TYPE(THPVariable_Check(o), name, " must be a torch.Tensor");
  return THPVariable_Unpack(o);
}

int64_t int_arg(PyObject* o, const char* name) {
  TORCH_CHECK_TYPE(PyLong_Check(o), name, " must be an int");
  return PyLong_AsLongLong(o);
}

// Multiply-adds (stored values x batch rows) from which the inference entry releases the GIL: ~20 µs
// of work at batch 1.
constexpr int64_t kReleaseGilWork = int64_t(1) << 16;

// Runs f with the GIL released (the kernels need no Python: other threads may run meanwhile).
template <typename F>
void without_gil(F&& f) {
  PyThreadState* state = PyEval_SaveThread();
  try {
    f();
  } catch (...) {
    PyEval_RestoreThread(state);
    throw;
  }
  PyEval_RestoreThread(state);
}

// Inside a catch block: the pending C++ error as the Python exception of its kind.
void set_python_error() {
  try {
    throw;
  } catch (const c10::ValueError& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
  } catch (const c10::TypeError& e) {
    PyErr_SetString(PyExc_TypeError, e.what_without_backtrace());
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
}

PyObject* py_compact_linear_infer(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  try {
    TORCH_CHECK_TYPE(nargs == 7, "compact_linear_infer takes 7 arguments (x, values, bias, crow, col, "
                     "out_features, in_features), got ", num(nargs));
    const Tensor& x = tensor_arg(args[0], "x");
    const Tensor& values = tensor_arg(args[1], "values");
    const optional<Tensor> bias = args[2] == Py_None ? optional<Tensor>() : optional<Tensor>(tensor_arg(args[2], "bias"));
    const Tensor& crow = tensor_arg(args[3], "crow");
    const Tensor& col = tensor_arg(args[4], "col");
    const int64_t n = int_arg(args[5], "out_features"), k = int_arg(args[6], "in_features");
    const bool grad = at::GradMode::is_enabled() &&
                      (x.requires_grad() || values.requires_grad() || (bias && bias->requires_grad()));
    if (grad || !x.device().is_cpu() || x.scalar_type() != values.scalar_type() || x.dim() == 0 ||
        x.size(-1) != k || x.numel() == 0)
      Py_RETURN_NONE;
    Tensor y;
    auto run = [&] {
      const Tensor x2 = x.dim() == 2 ? x : x.reshape({-1, k});
      y = compact_linear_fwd(x2, c10::nullopt, values, bias, crow, col, Tensor(), Tensor(), Tensor(), Tensor(), n, k);
      if (x.dim() != 2) {
        std::vector<int64_t> out(x.sizes().begin(), x.sizes().end());
        out.back() = n;
        y = y.view(out);
      }
    };
    // Other Python threads may run meanwhile, unless the product is small: releasing and retaking the
    // GIL costs ~0.3 µs, 3 % of a 300x784 layer at batch 1 (10 µs).
    if (values.numel() * (x.numel() / k) >= kReleaseGilWork) without_gil(run);
    else run();
    return THPVariable_Wrap(y);
  } catch (...) {
    set_python_error();
  }
  return nullptr;
}

// The optimizer's two calls per step, as plain CPython functions for the same reason: through
// torch.ops each boxes its lists (5 lists of tensors and 12 more arguments for fused_step_multi), which
// costs as much as the update of a small model's tensors (LeNet-300-100, 9 tensors, 1 thread: the
// optimizer step took 272 µs through torch.ops, 237 µs so). Same C++ functions, same checks, same results
// as the registered ops.

// A list or tuple of tensors (None entries allowed where `optional`), as the op schema's Tensor[] / Tensor?[].
std::vector<optional<Tensor>> tensor_list(PyObject* o, const char* name, bool optional_entries) {
  TORCH_CHECK_TYPE(PyList_Check(o) || PyTuple_Check(o), name, " must be a list of tensors");
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(o);
  PyObject** items = PySequence_Fast_ITEMS(o);
  std::vector<optional<Tensor>> out;
  out.reserve(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (items[i] == Py_None) {
      TORCH_CHECK_TYPE(optional_entries, name, "[", num(i), "] must be a torch.Tensor, got None");
      out.emplace_back();
    } else {
      out.emplace_back(tensor_arg(items[i], name));
    }
  }
  return out;
}

std::vector<Tensor> required(const std::vector<optional<Tensor>>& v) {
  std::vector<Tensor> out;
  out.reserve(v.size());
  for (const auto& t : v) out.push_back(*t);
  return out;
}

c10::List<optional<Tensor>> as_list(const std::vector<optional<Tensor>>& v) {
  c10::List<optional<Tensor>> out;
  out.reserve(v.size());
  for (const auto& t : v) out.push_back(t);
  return out;
}

double float_arg(PyObject* o, const char* name) {
  TORCH_CHECK_TYPE(PyFloat_Check(o) || (PyLong_Check(o) && !PyBool_Check(o)), name, " must be a float");
  const double v = PyFloat_AsDouble(o);
  if (v == -1.0 && PyErr_Occurred()) {  // an int too large for a double
    PyErr_Clear();
    TORCH_CHECK_VALUE(false, name, " does not fit a float");
  }
  return v;
}

bool bool_arg(PyObject* o, const char* name) {
  TORCH_CHECK_TYPE(PyBool_Check(o), name, " must be a bool");
  return o == Py_True;
}

// sparse_engine._C.fused_step_multi(params, grads, buf1, buf2, masks, lr, step, kind, momentum, dampening,
// nesterov, beta1, beta2, eps, weight_decay, alphas, maximize): the arguments of the op, positionally.
PyObject* py_fused_step_multi(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  try {
    TORCH_CHECK_TYPE(nargs == 17, "fused_step_multi takes 17 arguments, got ", num(nargs));
    const std::vector<Tensor> params = required(tensor_list(args[0], "params", false));
    const std::vector<Tensor> grads = required(tensor_list(args[1], "grads", false));
    const c10::List<optional<Tensor>> buf1 = as_list(tensor_list(args[2], "buf1", true));
    const c10::List<optional<Tensor>> buf2 = as_list(tensor_list(args[3], "buf2", true));
    const c10::List<optional<Tensor>> masks = as_list(tensor_list(args[4], "masks", true));
    const Tensor& lr = tensor_arg(args[5], "lr");
    const int64_t step = int_arg(args[6], "step");
    const char* kind_utf8 = PyUnicode_Check(args[7]) ? PyUnicode_AsUTF8(args[7]) : nullptr;
    TORCH_CHECK_TYPE(kind_utf8 != nullptr, "kind must be a str");
    const std::string kind = kind_utf8;
    const double momentum = float_arg(args[8], "momentum"), dampening = float_arg(args[9], "dampening");
    const bool nesterov = bool_arg(args[10], "nesterov");
    const double beta1 = float_arg(args[11], "beta1"), beta2 = float_arg(args[12], "beta2");
    const double eps = float_arg(args[13], "eps"), weight_decay = float_arg(args[14], "weight_decay");
    TORCH_CHECK_TYPE(PyList_Check(args[15]) || PyTuple_Check(args[15]), "alphas must be a list of floats");
    const Py_ssize_t na = PySequence_Fast_GET_SIZE(args[15]);
    std::vector<double> alphas(na);
    for (Py_ssize_t i = 0; i < na; ++i) alphas[i] = float_arg(PySequence_Fast_ITEMS(args[15])[i], "alphas[i]");
    const bool maximize = bool_arg(args[16], "maximize");
    without_gil([&] {
      fused_step_multi(params, grads, buf1, buf2, masks, lr, step, kind, momentum, dampening, nesterov, beta1,
                       beta2, eps, weight_decay, alphas, maximize);
    });
    Py_RETURN_NONE;
  } catch (...) {
    set_python_error();
  }
  return nullptr;
}

// sparse_engine._C.all_finite(tensors, masks) -> bool
PyObject* py_all_finite(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  try {
    TORCH_CHECK_TYPE(nargs == 2, "all_finite takes 2 arguments (tensors, masks), got ", num(nargs));
    const std::vector<Tensor> tensors = required(tensor_list(args[0], "tensors", false));
    const c10::List<optional<Tensor>> masks = as_list(tensor_list(args[1], "masks", true));
    bool ok = true;
    without_gil([&] { ok = all_finite(tensors, masks); });
    return PyBool_FromLong(ok);
  } catch (...) {
    set_python_error();
  }
  return nullptr;
}

PyMethodDef kMethods[] = {
    {"compact_linear_infer", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&py_compact_linear_infer)),
     METH_FASTCALL, "y = x θᵀ + b from CSR/BSR values, no autograd (eager inference)"},
    {"fused_step_multi", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&py_fused_step_multi)),
     METH_FASTCALL, "the fused_step_multi op as a CPython function (one optimizer group's step)"},
    {"all_finite", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&py_all_finite)), METH_FASTCALL,
     "the all_finite op as a CPython function"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

// `import sparse_engine._C` loads this library (and so registers the ops above). Its Python functions are
// the entries above (batch-1 inference, the optimizer's step); everything else is reached through
// torch.ops.sparse_engine_C.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "sparse_engine C++ ops (torch.ops.sparse_engine_C)",
                                   -1, kMethods};
  return PyModule_Create(&def);
}
