// Element conversion among the floating-point dtypes weightd casts between (BF16, F16, F32).
//
//   std::vector<uint16_t> out(n);
//   ConvertHost(DType::kF32, src, DType::kBF16, out.data(), n);   // bit-exact as torch's copy_
//
// Semantics shared by the CPU reference (convert_cpu.cc) and the CUDA kernel (convert.cu):
//   - F16 -> F32 and BF16 -> F32 are exact (NaN payloads kept).
//   - F32 -> BF16: round-to-nearest-even on the upper 16 bits; any NaN becomes 0x7FC0. This is
//     c10::detail::round_to_nearest_even, the scalar path torch's copy_ uses. (torch's AVX
//     path writes 0xFFFF and CUDA's cvt.rn writes 0x7FFF for NaN: all are NaN; weightd picks one
//     canonical answer so that every executor produces identical bytes.)
//   - F32 -> F16: IEEE round-to-nearest-even including subnormals; |x| >= 65520 gives +-Inf;
//     NaN becomes sign | 0x7E00 (c10's fp16_ieee_from_fp32_value).
//   - BF16 <-> F16 goes through F32 (two roundings), exactly as torch converts through float.
//   - Same dtype: a byte copy. Any other pair is rejected by IsConvertible().
// All functions are pure and thread-safe; counts are in elements.
#ifndef WEIGHTD_KERNELS_CONVERT_H_
#define WEIGHTD_KERNELS_CONVERT_H_

#include <cstddef>
#include <cstdint>

#include "weightd/dtype.h"

namespace weightd::kernels {

// True for a same-dtype copy or a pair of {BF16, F16, F32}.
bool IsConvertible(DType from, DType to) noexcept;

// True for BF16, F16 and F32: the dtypes --dtype may cast.
bool IsCastableFloat(DType t) noexcept;

// Scalar conversions (the reference every other path is tested against).
uint16_t F32ToBF16Bits(uint32_t f32_bits) noexcept;
uint16_t F32ToF16Bits(uint32_t f32_bits) noexcept;
uint32_t BF16ToF32Bits(uint16_t bf16_bits) noexcept;
uint32_t F16ToF32Bits(uint16_t f16_bits) noexcept;

// Converts `n` contiguous elements. `src` and `dst` must not overlap and need no alignment.
// Precondition: IsConvertible(from, to).
void ConvertHost(DType from, const void* src, DType to, void* dst, int64_t n) noexcept;

}  // namespace weightd::kernels

#endif  // WEIGHTD_KERNELS_CONVERT_H_
