// Argument-check helpers shared by the C++ (ops.cpp) and CUDA (cuda_binding.cpp) bindings.
//
// Numbers and shapes enter error messages as strings made here, never through std::ostream's numeric
// insertion (c10::str): on one GPU image (torch 2.11 wheel, extension built by Ubuntu's GCC 13.3) an
// integer formatted into a TORCH_CHECK message from an extension segfaulted, while strings and dtypes
// did not. std::to_string / snprintf need no C++ locale.
#pragma once

#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdio>
#include <limits>
#include <string>

namespace se_msg {

constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();

inline std::string num(int64_t v) { return std::to_string(v); }

inline std::string real(double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.17g", v);
  return buf;
}

inline std::string shape(c10::IntArrayRef s) {
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + (s.size() == 1 ? ",)" : ")");
}

// A dimension that an int32 layout index must be able to address.
inline void check_int32_dim(int64_t v, const char* name) {
  TORCH_CHECK_VALUE(v >= 0 && v <= kInt32Max, name, " = ", num(v), " is outside the int32 index range [0, ",
                    num(kInt32Max), "]: compact layouts index with int32; split the layer or keep it dense");
}

}  // namespace se_msg
