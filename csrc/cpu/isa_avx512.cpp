// Row kernels for x86-64 with AVX-512 (F/VL/BW/DQ) + FMA: one 64-byte vector per register.
// Selected at run time; the rest of the build stays portable.
#include "kernels.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SE_AVX512_TARGET "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,bmi,bmi2,popcnt,f16c"
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target(SE_AVX512_TARGET))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,bmi,bmi2,popcnt,f16c")
#endif
#define SE_NATIVE_BYTES 64  // one AVX-512 register
#include "compact_impl.h"
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
namespace se_cpu {
const KernelTable& table_avx512() {
  static const KernelTable t{"avx512", &spmm_rows, &sddmm_rows, &scatter_rows, &pack_tile, &unpack_tile};
  return t;
}
}  // namespace se_cpu
#else
namespace se_cpu {
const KernelTable& table_avx512() {
  static const KernelTable t{nullptr, nullptr, nullptr, nullptr, nullptr, nullptr};
  return t;
}
}  // namespace se_cpu
#endif
