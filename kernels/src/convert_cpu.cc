// CPU reference of the dtype conversions (see convert.h for the semantics).
#include <cstring>

#include "weightd/kernels/convert.h"

namespace weightd::kernels {

bool IsCastableFloat(DType t) noexcept {
  return t == DType::kBF16 || t == DType::kF16 || t == DType::kF32;
}

bool IsConvertible(DType from, DType to) noexcept {
  return from == to || (IsCastableFloat(from) && IsCastableFloat(to));
}

uint16_t F32ToBF16Bits(uint32_t x) noexcept {
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
  // Adding 0x7FFF plus the lowest kept bit rounds ties to even; Inf stays Inf because its low
  // half is zero, and the largest finite values correctly carry into Inf.
  const uint32_t bias = 0x7FFFu + ((x >> 16) & 1u);
  return static_cast<uint16_t>((x + bias) >> 16);
}

uint16_t F32ToF16Bits(uint32_t x) noexcept {
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7FFFFFFFu;
  if (ax > 0x7F800000u) return sign | 0x7E00;
  // 65520 is the midpoint between the largest half (65504, odd mantissa) and 2^16: it and
  // everything above round to Inf.
  if (ax >= 0x477FF000u) return sign | 0x7C00;
  if (ax >= 0x38800000u) {  // normal half range, |x| >= 2^-14
    const uint32_t rounded = ax + 0xFFFu + ((ax >> 13) & 1u);
    return sign | static_cast<uint16_t>((rounded - 0x38000000u) >> 13);
  }
  // |x| <= 2^-25 is at most half of the smallest subnormal (2^-24); the tie goes to even (0).
  if (ax <= 0x33000000u) return sign;
  const uint32_t e = ax >> 23;
  const uint32_t m = (ax & 0x7FFFFFu) | 0x800000u;
  const uint32_t shift = 126u - e;  // 14..24 in this range
  uint32_t r = m >> shift;
  const uint32_t rem = m & ((1u << shift) - 1u);
  const uint32_t half = 1u << (shift - 1u);
  if (rem > half || (rem == half && (r & 1u))) ++r;  // may carry into the smallest normal: fine
  return sign | static_cast<uint16_t>(r);
}

uint32_t BF16ToF32Bits(uint16_t h) noexcept { return static_cast<uint32_t>(h) << 16; }

uint32_t F16ToF32Bits(uint16_t h) noexcept {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t man = h & 0x3FFu;
  if (exp == 0x1F) return sign | 0x7F800000u | (man << 13);  // Inf, NaN with its payload
  if (exp != 0) return sign | ((exp + 112u) << 23) | (man << 13);
  if (man == 0) return sign;
  // Subnormal half: normalize; every half subnormal is a normal float.
  int e = 113;
  while ((man & 0x400u) == 0) {
    man <<= 1;
    --e;
  }
  return sign | (static_cast<uint32_t>(e) << 23) | ((man & 0x3FFu) << 13);
}

namespace {

template <typename In, typename Out, typename F>
void Loop(const void* src, void* dst, int64_t n, F f) {
  const auto* s = static_cast<const unsigned char*>(src);
  auto* d = static_cast<unsigned char*>(dst);
  for (int64_t i = 0; i < n; ++i) {
    In v;
    std::memcpy(&v, s + i * sizeof(In), sizeof(In));
    const Out o = f(v);
    std::memcpy(d + i * sizeof(Out), &o, sizeof(Out));
  }
}

}  // namespace

void ConvertHost(DType from, const void* src, DType to, void* dst, int64_t n) noexcept {
  if (from == to) {
    std::memcpy(dst, src, static_cast<size_t>(n) * DTypeSize(from));
    return;
  }
  switch (from) {
    case DType::kF32:
      if (to == DType::kBF16) Loop<uint32_t, uint16_t>(src, dst, n, F32ToBF16Bits);
      if (to == DType::kF16) Loop<uint32_t, uint16_t>(src, dst, n, F32ToF16Bits);
      return;
    case DType::kBF16:
      if (to == DType::kF32) Loop<uint16_t, uint32_t>(src, dst, n, BF16ToF32Bits);
      if (to == DType::kF16) {
        Loop<uint16_t, uint16_t>(src, dst, n,
                                 [](uint16_t v) { return F32ToF16Bits(BF16ToF32Bits(v)); });
      }
      return;
    case DType::kF16:
      if (to == DType::kF32) Loop<uint16_t, uint32_t>(src, dst, n, F16ToF32Bits);
      if (to == DType::kBF16) {
        Loop<uint16_t, uint16_t>(src, dst, n,
                                 [](uint16_t v) { return F32ToBF16Bits(F16ToF32Bits(v)); });
      }
      return;
    default:
      return;
  }
}

}  // namespace weightd::kernels
