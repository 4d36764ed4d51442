// The device conversion kernel (embedded fatbin, launched through the driver table) against the
// CPU reference (kernels/convert.h), bit for bit, on random bit patterns plus NaN (quiet and
// signalling, both signs), +-Inf, subnormals, +-0 and values that overflow fp16; and the 2-D
// launch's layout (pitches, untouched gaps) and same-dtype 2-D copies. Skips without a device;
// the bit-exactness test also skips under the simulated driver, whose kernels are the CPU
// reference itself. Device memory is only read back with copies, never dereferenced.
#include <cuda.h>

#include <cstring>
#include <random>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "weightd/cuda_backend.h"
#include "weightd/detail/cuda_driver.h"
#include "weightd/detail/cuda_resources.h"
#include "weightd/kernels/convert.h"
#include "weightd/kernels/convert_cuda.h"

namespace weightd {
namespace {

using ::testing::HasSubstr;

constexpr char kSimulatedReason[] =
    "simulated driver: runs the CPU reference; bit-exactness of the device kernel needs a real "
    "GPU";

// Device 0's primary context, current on the test's thread for the fixture's lifetime.
class ConvertGpuTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!CudaDeviceAvailable()) GTEST_SKIP() << "no CUDA device: " << CudaDriver::Get().status();
    cu_ = *CudaDriver::Get();
    auto ctx = CudaPrimaryContext::Retain(*cu_, 0);
    ASSERT_TRUE(ctx.ok()) << ctx.status();
    ctx_ = std::move(*ctx);
    guard_ = std::make_unique<CudaContextGuard>(*cu_);
    ASSERT_TRUE(guard_->Use(ctx_.get()).ok());
  }
  void TearDown() override { guard_.reset(); }

  CudaDeviceBuffer Alloc(size_t n) {
    auto b = CudaDeviceBuffer::Allocate(*cu_, n);
    EXPECT_TRUE(b.ok()) << b.status();
    return b.ok() ? std::move(*b) : CudaDeviceBuffer();
  }

  const CudaDriver* cu_ = nullptr;
  CudaPrimaryContext ctx_;
  std::unique_ptr<CudaContextGuard> guard_;
};

std::vector<uint8_t> Inputs(DType from, size_t n) {
  std::mt19937_64 rng(7);
  std::vector<uint8_t> out(n * DTypeSize(from));
  for (auto& b : out) b = static_cast<uint8_t>(rng());
  if (from == DType::kF32) {
    const uint32_t special[] = {0x7FC00000u, 0xFFC00000u, 0x7F800001u, 0x7F800000u, 0xFF800000u,
                                0x00000001u, 0x807FFFFFu, 0x00000000u, 0x80000000u, 0x477FF000u,
                                0x477FEFFFu, 0x47800000u, 0xC7800000u, 0x33000000u, 0x33000001u,
                                0x38800000u, 0x387FFFFFu, 0x3F7FFFFFu};
    std::memcpy(out.data(), special, sizeof(special));
  } else {
    const uint16_t special[] = {0x7E00, 0xFE00, 0x7C01, 0x7C00, 0xFC00, 0x0001, 0x83FF,
                                0x0000, 0x8000, 0x7BFF, 0x7FC0, 0xFF80, 0x7F80, 0x0080};
    std::memcpy(out.data(), special, sizeof(special));
  }
  return out;
}

TEST_F(ConvertGpuTest, MatchesCpuReferenceBitForBit) {
  if (cu_->simulated) GTEST_SKIP() << kSimulatedReason;
  const DType kinds[] = {DType::kF32, DType::kBF16, DType::kF16};
  const size_t n = (1 << 20) + 37;
  for (DType from : kinds) {
    for (DType to : kinds) {
      if (from == to || !kernels::IsConvertible(from, to)) continue;
      SCOPED_TRACE(::testing::Message() << DTypeName(from) << " -> " << DTypeName(to));
      const std::vector<uint8_t> in = Inputs(from, n);
      std::vector<uint8_t> want(n * DTypeSize(to)), got(want.size());
      kernels::ConvertHost(from, reinterpret_cast<const std::byte*>(in.data()), to,
                           reinterpret_cast<std::byte*>(want.data()), n);
      CudaDeviceBuffer d_in = Alloc(in.size());
      CudaDeviceBuffer d_out = Alloc(got.size());
      ASSERT_EQ(cu_->MemcpyHtoD(d_in.get(), in.data(), in.size()), CUDA_SUCCESS);
      absl::Status s = kernels::LaunchConvertDevice(from, d_in.get(), to, d_out.get(), n, nullptr);
      ASSERT_TRUE(s.ok()) << s;
      ASSERT_EQ(cu_->CtxSynchronize(), CUDA_SUCCESS);
      ASSERT_EQ(cu_->MemcpyDtoH(got.data(), d_out.get(), got.size()), CUDA_SUCCESS);
      for (size_t i = 0; i < got.size(); ++i) {
        ASSERT_EQ(got[i], want[i]) << "byte " << i << " (element " << i / DTypeSize(to) << ")";
      }
    }
  }
}

// Rows land at their pitches and the bytes between rows stay untouched, for a conversion and for
// a same-dtype (cuMemcpy2DAsync) call, on a stream of our own. BF16 -> F32 is exact, so this is a
// check of the launch's layout, meaningful under the simulated driver too.
TEST_F(ConvertGpuTest, TwoDimensionalLaunchHonoursPitches) {
  auto stream = CudaStream::Create(*cu_);
  ASSERT_TRUE(stream.ok()) << stream.status();
  constexpr int64_t kWidth = 5, kHeight = 7, kSrcPitch = 16, kDstPitch = 32;  // bytes
  std::vector<uint16_t> src(kSrcPitch / 2 * kHeight);
  for (size_t i = 0; i < src.size(); ++i) src[i] = static_cast<uint16_t>(0x3F80 + i);  // BF16
  CudaDeviceBuffer d_src = Alloc(src.size() * 2);
  CudaDeviceBuffer d_dst = Alloc(kDstPitch * kHeight);
  ASSERT_EQ(cu_->MemcpyHtoD(d_src.get(), src.data(), src.size() * 2), CUDA_SUCCESS);
  for (DType to : {DType::kF32, DType::kBF16}) {
    SCOPED_TRACE(DTypeName(to));
    ASSERT_EQ(cu_->MemsetD8(d_dst.get(), 0xAB, kDstPitch * kHeight), CUDA_SUCCESS);
    const absl::Status s =
        kernels::LaunchConvert2DDevice(DType::kBF16, d_src.get(), kSrcPitch, to, d_dst.get(),
                                       kDstPitch, kWidth, kHeight, stream->get());
    ASSERT_TRUE(s.ok()) << s;
    ASSERT_EQ(cu_->StreamSynchronize(stream->get()), CUDA_SUCCESS);
    std::vector<uint8_t> got(kDstPitch * kHeight);
    ASSERT_EQ(cu_->MemcpyDtoH(got.data(), d_dst.get(), got.size()), CUDA_SUCCESS);
    const int64_t ds = DTypeSize(to);
    for (int64_t r = 0; r < kHeight; ++r) {
      for (int64_t b = 0; b < kDstPitch; ++b) {
        const uint8_t byte = got[r * kDstPitch + b];
        if (b >= kWidth * ds) {
          ASSERT_EQ(byte, 0xAB) << "row " << r << " byte " << b << " (gap)";
          continue;
        }
        const uint16_t in = src[r * kSrcPitch / 2 + b / ds];
        const uint32_t want = to == DType::kF32 ? static_cast<uint32_t>(in) << 16 : in;
        ASSERT_EQ(byte, static_cast<uint8_t>(want >> (8 * (b % ds))))
            << "row " << r << " byte " << b;
      }
    }
  }
}

TEST(ConvertGpuNoDeviceTest, RejectsUnsupportedPairBeforeTouchingTheDriver) {
  const absl::Status s =
      kernels::LaunchConvert2DDevice(DType::kF32, 0, 4, DType::kI32, 0, 4, 1, 1, nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("F32 to I32"));
}

}  // namespace
}  // namespace weightd
