// Direct sparse 2-D convolution on CPU (csrc/cpu/sparse_conv.cpp): no im2col.
#pragma once

#include <cstdint>

#include "kernels.h"

namespace se_cpu {

// Geometry of one convolution: x (B, C, H, W) -> y (B, O, Ho, Wo), kernel kh x kw, dilation 1, groups 1,
// zero padding ph / pw on both sides. The weight pattern is a CSR over the (O, C*kh*kw) view. x, y,
// grad_y and g_x are contiguous in (B, C, H, W) order, or with nhwc in (B, H, W, C) order (channels_last).
struct ConvGeom {
  int64_t B, C, H, W, O, kh, kw, sh, sw, ph, pw, Ho, Wo;
  bool nhwc = false;
};

// y = conv(x, theta) + bias with theta = m*w (m nullable) at the CSR coordinates. Returns 0.
int sparse_conv2d_forward(Dtype dt, const ConvGeom& g, const void* x, const void* m, const void* w,
                          const void* bias, const int32_t* crow, const int32_t* col, int64_t nnz, void* y);

// g_x (nullable: skipped) by the transposed convolution gathered per input channel through the CSC side
// (ccol over C*kh*kw columns, row_t, perm); dtheta on the pattern only (SDDMM) with the g_m = dtheta*w,
// g_w = dtheta*m epilogue (g_m nullable when m is). Index entries must have been range-checked.
int sparse_conv2d_backward(Dtype dt, const ConvGeom& g, const void* gy, const void* x, const void* m,
                           const void* w, const int32_t* crow, const int32_t* col, const int32_t* ccol,
                           const int32_t* row_t, const int32_t* perm, int64_t nnz, void* gx, void* gm, void* gw);

}  // namespace se_cpu
