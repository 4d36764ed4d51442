// LaunchConvertDevice against the CPU reference (kernels/convert.h), bit for bit, on random bit
// patterns plus NaN (quiet and signalling, both signs), +-Inf, subnormals, +-0 and values that
// overflow fp16.
#include <cuda_runtime_api.h>

#include <cstring>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "weightd/kernels/convert.h"
#include "weightd/kernels/convert_cuda.h"

namespace weightd {
namespace {

bool HaveDevice() {
  int n = 0;
  const bool ok = cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
  (void)cudaGetLastError();
  return ok;
}

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

TEST(ConvertGpuTest, MatchesCpuReferenceBitForBit) {
  if (!HaveDevice()) GTEST_SKIP() << "no CUDA device (cudaGetDeviceCount reports none)";
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
      void *d_in = nullptr, *d_out = nullptr;
      ASSERT_EQ(cudaMalloc(&d_in, in.size()), cudaSuccess);
      ASSERT_EQ(cudaMalloc(&d_out, got.size()), cudaSuccess);
      ASSERT_EQ(cudaMemcpy(d_in, in.data(), in.size(), cudaMemcpyHostToDevice), cudaSuccess);
      absl::Status s = kernels::LaunchConvertDevice(from, d_in, to, d_out, n, nullptr);
      ASSERT_TRUE(s.ok()) << s;
      ASSERT_EQ(cudaMemcpy(got.data(), d_out, got.size(), cudaMemcpyDeviceToHost), cudaSuccess);
      cudaFree(d_in);
      cudaFree(d_out);
      for (size_t i = 0; i < got.size(); ++i) {
        ASSERT_EQ(got[i], want[i]) << "byte " << i << " (element " << i / DTypeSize(to) << ")";
      }
    }
  }
}

}  // namespace
}  // namespace weightd
