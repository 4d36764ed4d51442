// Device code only: the conversion kernel of weightd's embedded fatbin, with the semantics of
// convert.h and the argument block of device_kernels.h. Compiled by nvcc with -fatbin (never
// linked into a host object: kernels/CMakeLists.txt) and launched through the driver API by
// launch.cc. The bit manipulation mirrors convert_cpu.cc instead of using cuda_bf16.h
// intrinsics because cvt.rn.bf16.f32 writes 0x7FFF for NaN while weightd's contract (torch's
// scalar path) is 0x7FC0.
#include <cstdint>

#include "weightd/kernels/device_kernels.h"

namespace weightd::kernels {
namespace {

// weightd::DType values (dtype.h, which nvcc does not see: it includes Abseil). launch.cc
// static_asserts that these match.
constexpr int32_t kDTypeF32 = 1;
constexpr int32_t kDTypeF16 = 2;
constexpr int32_t kDTypeBF16 = 3;

__device__ __forceinline__ uint16_t DevF32ToBF16(uint32_t x) {
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
  return static_cast<uint16_t>((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16);
}

__device__ __forceinline__ uint16_t DevF32ToF16(uint32_t x) {
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7FFFFFFFu;
  if (ax > 0x7F800000u) return sign | 0x7E00;
  if (ax >= 0x477FF000u) return sign | 0x7C00;
  if (ax >= 0x38800000u) {
    return sign | static_cast<uint16_t>((ax + 0xFFFu + ((ax >> 13) & 1u) - 0x38000000u) >> 13);
  }
  if (ax <= 0x33000000u) return sign;
  const uint32_t shift = 126u - (ax >> 23);
  const uint32_t m = (ax & 0x7FFFFFu) | 0x800000u;
  uint32_t r = m >> shift;
  const uint32_t rem = m & ((1u << shift) - 1u);
  const uint32_t half = 1u << (shift - 1u);
  if (rem > half || (rem == half && (r & 1u))) ++r;
  return sign | static_cast<uint16_t>(r);
}

__device__ __forceinline__ uint32_t DevF16ToF32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t man = h & 0x3FFu;
  if (exp == 0x1F) return sign | 0x7F800000u | (man << 13);
  if (exp != 0) return sign | ((exp + 112u) << 23) | (man << 13);
  if (man == 0) return sign;
  // Normalize the subnormal: its top set bit p (0..9) becomes the implicit bit.
  const uint32_t p = 31u - static_cast<uint32_t>(__clz(man));
  return sign | ((p + 103u) << 23) | (((man << (10u - p)) & 0x3FFu) << 13);
}

enum Op : int { kNone, kF32ToBF16, kF32ToF16, kBF16ToF32, kF16ToF32, kBF16ToF16, kF16ToBF16 };

__device__ __forceinline__ int OpFor(int32_t from, int32_t to) {
  if (from == kDTypeF32 && to == kDTypeBF16) return kF32ToBF16;
  if (from == kDTypeF32 && to == kDTypeF16) return kF32ToF16;
  if (from == kDTypeBF16 && to == kDTypeF32) return kBF16ToF32;
  if (from == kDTypeF16 && to == kDTypeF32) return kF16ToF32;
  if (from == kDTypeBF16 && to == kDTypeF16) return kBF16ToF16;
  if (from == kDTypeF16 && to == kDTypeBF16) return kF16ToBF16;
  return kNone;
}

// One element of `op` from *s to *d (both pointers to the element, naturally aligned).
__device__ __forceinline__ void ConvertOne(int op, const unsigned char* s, unsigned char* d) {
  switch (op) {
    case kF32ToBF16:
      *reinterpret_cast<uint16_t*>(d) = DevF32ToBF16(*reinterpret_cast<const uint32_t*>(s));
      break;
    case kF32ToF16:
      *reinterpret_cast<uint16_t*>(d) = DevF32ToF16(*reinterpret_cast<const uint32_t*>(s));
      break;
    case kBF16ToF32:
      *reinterpret_cast<uint32_t*>(d) = static_cast<uint32_t>(*reinterpret_cast<const uint16_t*>(s))
                                        << 16;
      break;
    case kF16ToF32:
      *reinterpret_cast<uint32_t*>(d) = DevF16ToF32(*reinterpret_cast<const uint16_t*>(s));
      break;
    case kBF16ToF16:
      *reinterpret_cast<uint16_t*>(d) =
          DevF32ToF16(static_cast<uint32_t>(*reinterpret_cast<const uint16_t*>(s)) << 16);
      break;
    case kF16ToBF16:
      *reinterpret_cast<uint16_t*>(d) =
          DevF32ToBF16(DevF16ToF32(*reinterpret_cast<const uint16_t*>(s)));
      break;
    default:
      break;
  }
}

}  // namespace
}  // namespace weightd::kernels

// `a.height` rows of `a.width` elements, grid-stride over all of them (a 1-D conversion is one
// row). An unsupported pair writes nothing: the launcher refuses those before launching.
extern "C" __global__ void wd_convert_2d(weightd::kernels::Convert2DArgs a) {
  using namespace weightd::kernels;
  const int op = OpFor(a.from, a.to);
  if (op == kNone) return;
  const int64_t src_size = a.from == kDTypeF32 ? 4 : 2;
  const int64_t dst_size = a.to == kDTypeF32 ? 4 : 2;
  const auto* src = static_cast<const unsigned char*>(a.src);
  auto* dst = static_cast<unsigned char*>(a.dst);
  const int64_t n = a.width * a.height;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    // 64-bit division is dozens of instructions; a 1-D conversion (one row) needs none.
    const int64_t row = a.height == 1 ? 0 : i / a.width;
    const int64_t col = i - row * a.width;
    ConvertOne(op, src + row * a.src_pitch + col * src_size,
               dst + row * a.dst_pitch + col * dst_size);
  }
}
