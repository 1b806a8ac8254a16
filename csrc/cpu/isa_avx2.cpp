// Row kernels for x86-64 with AVX2 + FMA (selected at run time: the build itself stays portable).
#include "kernels.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,bmi,bmi2,popcnt,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,bmi,bmi2,popcnt,f16c")
#endif
#define SE_NATIVE_BYTES 32  // one AVX2 register: the row kernels split 64-byte panel vectors into these
#include "compact_impl.h"
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
namespace se_cpu {
const KernelTable& table_avx2() {
  static const KernelTable t{"avx2", &spmm_rows, &sddmm_rows, &scatter_rows, &pack_tile, &unpack_tile};
  return t;
}
}  // namespace se_cpu
#else
namespace se_cpu {
const KernelTable& table_avx2() {
  static const KernelTable t{nullptr, nullptr, nullptr, nullptr, nullptr, nullptr};
  return t;
}
}  // namespace se_cpu
#endif
