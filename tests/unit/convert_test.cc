// Dtype conversion: checked exhaustively against oracles that do not share the implementation's
// bit tricks (the compiler's IEEE _Float16 conversion; nearest-candidate search in double).
#include "weightd/kernels/convert.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "weightd/kernels/copy.h"

namespace weightd::kernels {
namespace {

float FromBits(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

// The bf16 nearest to x by direct comparison of the two neighbouring candidates, ties to even.
uint16_t OracleBF16(uint32_t bits) {
  const float x = FromBits(bits);
  if (std::isnan(x)) return 0x7FC0;
  const uint32_t lo = bits & 0xFFFF0000u;
  const uint32_t hi = lo + 0x10000u;
  const double dl = std::fabs(static_cast<double>(x) - FromBits(lo));
  // Above the largest finite bf16 the upper neighbour is 2^128, i.e. Inf.
  const double hv = ((hi >> 23) & 0xFF) == 0xFF ? std::copysign(std::ldexp(1.0, 128), x)
                                                : static_cast<double>(FromBits(hi));
  const double dh = std::fabs(hv - x);
  if (dh < dl || (dh == dl && ((lo >> 16) & 1))) return static_cast<uint16_t>(hi >> 16);
  return static_cast<uint16_t>(lo >> 16);
}

TEST(ConvertTest, F32ToBF16MatchesOracleOnStridedSweep) {
  // Every 2^32 / 97 pattern plus the neighbourhood of every rounding boundary pattern.
  for (uint64_t b = 0; b < (1ull << 32); b += 97) {
    const uint32_t x = static_cast<uint32_t>(b);
    ASSERT_EQ(F32ToBF16Bits(x), OracleBF16(x)) << std::hex << x;
  }
  for (uint32_t hi = 0; hi < 0x10000; hi += 3) {
    for (uint32_t low : {0x7FFFu, 0x8000u, 0x8001u, 0x0u, 0xFFFFu}) {
      const uint32_t x = (hi << 16) | low;
      ASSERT_EQ(F32ToBF16Bits(x), OracleBF16(x)) << std::hex << x;
    }
  }
}

TEST(ConvertTest, F32ToBF16SpecialValues) {
  EXPECT_EQ(F32ToBF16Bits(0x7F800000u), 0x7F80);  // +Inf
  EXPECT_EQ(F32ToBF16Bits(0xFF800000u), 0xFF80);  // -Inf
  EXPECT_EQ(F32ToBF16Bits(0x7FC00001u), 0x7FC0);  // NaN, torch's scalar answer
  EXPECT_EQ(F32ToBF16Bits(0xFF800001u), 0x7FC0);  // signalling negative NaN too
  EXPECT_EQ(F32ToBF16Bits(0x3F808000u), 0x3F80);  // tie, even stays
  EXPECT_EQ(F32ToBF16Bits(0x3F818000u), 0x3F82);  // tie, odd rounds up
  EXPECT_EQ(F32ToBF16Bits(0x7F7FFFFFu), 0x7F80);  // FLT_MAX rounds to Inf, as torch does
}

TEST(ConvertTest, F32ToF16MatchesCompilerIeeeConversion) {
  for (uint64_t b = 0; b < (1ull << 32); b += 31) {
    const uint32_t x = static_cast<uint32_t>(b);
    const float f = FromBits(x);
    if (std::isnan(f)) {
      EXPECT_EQ(F32ToF16Bits(x), ((x >> 16) & 0x8000) | 0x7E00);
      continue;
    }
    const _Float16 h = static_cast<_Float16>(f);
    uint16_t want;
    std::memcpy(&want, &h, 2);
    ASSERT_EQ(F32ToF16Bits(x), want) << std::hex << x << " " << f;
  }
}

TEST(ConvertTest, F32ToF16Boundaries) {
  auto bits = [](float f) {
    uint32_t b;
    std::memcpy(&b, &f, 4);
    return b;
  };
  EXPECT_EQ(F32ToF16Bits(bits(65504.f)), 0x7BFF);
  EXPECT_EQ(F32ToF16Bits(bits(65519.f)), 0x7BFF);
  EXPECT_EQ(F32ToF16Bits(bits(65520.f)), 0x7C00);               // overflow to +Inf
  EXPECT_EQ(F32ToF16Bits(bits(-1e6f)), 0xFC00);                 // -Inf
  EXPECT_EQ(F32ToF16Bits(bits(std::ldexp(1.f, -24))), 0x0001);  // smallest subnormal
  EXPECT_EQ(F32ToF16Bits(bits(std::ldexp(1.f, -25))), 0x0000);  // tie to even: zero
  EXPECT_EQ(F32ToF16Bits(bits(std::ldexp(3.f, -26))), 0x0001);  // above the tie
  EXPECT_EQ(F32ToF16Bits(bits(-0.f)), 0x8000);
}

TEST(ConvertTest, HalfWidthsToF32AreExactForAllPatterns) {
  for (uint32_t h = 0; h < 0x10000; ++h) {
    _Float16 hf;
    const uint16_t hb = static_cast<uint16_t>(h);
    std::memcpy(&hf, &hb, 2);
    const float want = static_cast<float>(hf);
    const uint32_t got = F16ToF32Bits(hb);
    if (std::isnan(want)) {
      EXPECT_TRUE(std::isnan(FromBits(got)));
      EXPECT_EQ(got & 0x007FE000u, static_cast<uint32_t>(h & 0x3FF) << 13);  // payload kept
    } else {
      uint32_t wb;
      std::memcpy(&wb, &want, 4);
      ASSERT_EQ(got, wb) << std::hex << h;
    }
    ASSERT_EQ(BF16ToF32Bits(hb), h << 16);
  }
}

TEST(ConvertTest, ConvertHostGoesThroughF32ForHalfPairs) {
  std::vector<uint16_t> src(0x10000), dst(0x10000);
  for (uint32_t i = 0; i < 0x10000; ++i) src[i] = static_cast<uint16_t>(i);
  ConvertHost(DType::kBF16, src.data(), DType::kF16, dst.data(), 0x10000);
  for (uint32_t i = 0; i < 0x10000; ++i) {
    ASSERT_EQ(dst[i], F32ToF16Bits(static_cast<uint32_t>(i) << 16));
  }
  ConvertHost(DType::kF16, src.data(), DType::kBF16, dst.data(), 0x10000);
  for (uint32_t i = 0; i < 0x10000; ++i) {
    ASSERT_EQ(dst[i], F32ToBF16Bits(F16ToF32Bits(static_cast<uint16_t>(i))));
  }
  EXPECT_TRUE(IsConvertible(DType::kF32, DType::kBF16));
  EXPECT_FALSE(IsConvertible(DType::kI32, DType::kF32));
}

TEST(CopyTest, RowWindowsAssembleTheSameTarget) {
  // A row-parallel piece: columns [2, 5) of a [4, 6] F32 tensor into a [4, 3] BF16 target,
  // applied once whole and once in windows of 1 and 3 rows.
  std::vector<float> src(24);
  for (int i = 0; i < 24; ++i) src[i] = static_cast<float>(i) + 0.5f;
  PlanPiece p;
  p.src_shape = {1, 4, 6};
  p.src_start = {0, 0, 2};
  p.dst_shape = {1, 4, 3};
  p.extent = {1, 4, 3};
  std::vector<uint16_t> whole(12), windows(12);
  CopyPieceRowsHost(p, DType::kF32, DType::kBF16, reinterpret_cast<const std::byte*>(src.data()), 0,
                    4, reinterpret_cast<std::byte*>(whole.data()));
  CopyPieceRowsHost(p, DType::kF32, DType::kBF16, reinterpret_cast<const std::byte*>(src.data()), 0,
                    1, reinterpret_cast<std::byte*>(windows.data()));
  CopyPieceRowsHost(p, DType::kF32, DType::kBF16,
                    reinterpret_cast<const std::byte*>(src.data() + 6), 1, 4,
                    reinterpret_cast<std::byte*>(windows.data()));
  for (int r = 0; r < 4; ++r) {
    for (int c = 0; c < 3; ++c) {
      float v = src[r * 6 + 2 + c];
      uint32_t b;
      std::memcpy(&b, &v, 4);
      EXPECT_EQ(whole[r * 3 + c], b >> 16) << r << "," << c;  // x.5 values are exact in bf16
    }
  }
  EXPECT_EQ(whole, windows);
  std::vector<uint8_t> z(16, 0xFF);
  ZeroFillHost({0, 4, 8}, reinterpret_cast<std::byte*>(z.data()));
  EXPECT_EQ(z,
            (std::vector<uint8_t>{255, 255, 255, 255, 0, 0, 0, 0, 0, 0, 0, 0, 255, 255, 255, 255}));
}

}  // namespace
}  // namespace weightd::kernels
