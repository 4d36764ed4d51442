// CUDA conversion kernel with the semantics of convert.h. The bit manipulation mirrors
// convert_cpu.cc instead of using cuda_bf16.h intrinsics because cvt.rn.bf16.f32 writes 0x7FFF
// for NaN while weightd's contract (torch's scalar path) is 0x7FC0.
#include <cuda_runtime.h>

#include <cstdint>

#include "absl/strings/str_cat.h"
#include "weightd/kernels/convert_cuda.h"

namespace weightd::kernels {
namespace {

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

enum Op : int { kF32ToBF16, kF32ToF16, kBF16ToF32, kF16ToF32, kBF16ToF16, kF16ToBF16 };

__global__ void ConvertKernel(int op, const void* __restrict__ src, void* __restrict__ dst,
                              int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    switch (op) {
      case kF32ToBF16:
        static_cast<uint16_t*>(dst)[i] = DevF32ToBF16(static_cast<const uint32_t*>(src)[i]);
        break;
      case kF32ToF16:
        static_cast<uint16_t*>(dst)[i] = DevF32ToF16(static_cast<const uint32_t*>(src)[i]);
        break;
      case kBF16ToF32:
        static_cast<uint32_t*>(dst)[i] = static_cast<uint32_t>(static_cast<const uint16_t*>(src)[i])
                                         << 16;
        break;
      case kF16ToF32:
        static_cast<uint32_t*>(dst)[i] = DevF16ToF32(static_cast<const uint16_t*>(src)[i]);
        break;
      case kBF16ToF16:
        static_cast<uint16_t*>(dst)[i] =
            DevF32ToF16(static_cast<uint32_t>(static_cast<const uint16_t*>(src)[i]) << 16);
        break;
      case kF16ToBF16:
        static_cast<uint16_t*>(dst)[i] =
            DevF32ToBF16(DevF16ToF32(static_cast<const uint16_t*>(src)[i]));
        break;
    }
  }
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
  }
}

// `height` rows of `width` elements; rows start `src_pitch` / `dst_pitch` bytes apart.
__global__ void Convert2DKernel(int op, const unsigned char* __restrict__ src, int64_t src_pitch,
                                int src_size, unsigned char* __restrict__ dst, int64_t dst_pitch,
                                int dst_size, int64_t width, int64_t height) {
  const int64_t n = width * height;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / width;
    const int64_t col = i - row * width;
    ConvertOne(op, src + row * src_pitch + col * src_size, dst + row * dst_pitch + col * dst_size);
  }
}

int OpFor(DType from, DType to) {
  if (from == DType::kF32 && to == DType::kBF16) return kF32ToBF16;
  if (from == DType::kF32 && to == DType::kF16) return kF32ToF16;
  if (from == DType::kBF16 && to == DType::kF32) return kBF16ToF32;
  if (from == DType::kF16 && to == DType::kF32) return kF16ToF32;
  if (from == DType::kBF16 && to == DType::kF16) return kBF16ToF16;
  if (from == DType::kF16 && to == DType::kBF16) return kF16ToBF16;
  return -1;
}

}  // namespace

absl::Status LaunchConvertDevice(DType from, const void* src, DType to, void* dst, int64_t n,
                                 void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  if (n == 0) return absl::OkStatus();
  if (from == to) {
    const cudaError_t err = cudaMemcpyAsync(dst, src, static_cast<size_t>(n) * DTypeSize(from),
                                            cudaMemcpyDeviceToDevice, s);
    if (err != cudaSuccess) {
      (void)cudaGetLastError();
      return absl::InternalError(absl::StrCat("cudaMemcpyAsync: ", cudaGetErrorString(err)));
    }
    return absl::OkStatus();
  }
  int op = -1;
  if (from == DType::kF32 && to == DType::kBF16) op = kF32ToBF16;
  if (from == DType::kF32 && to == DType::kF16) op = kF32ToF16;
  if (from == DType::kBF16 && to == DType::kF32) op = kBF16ToF32;
  if (from == DType::kF16 && to == DType::kF32) op = kF16ToF32;
  if (from == DType::kBF16 && to == DType::kF16) op = kBF16ToF16;
  if (from == DType::kF16 && to == DType::kBF16) op = kF16ToBF16;
  if (op < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("no device conversion from ", DTypeName(from), " to ", DTypeName(to)));
  }
  constexpr int kThreads = 256;
  const int64_t want = (n + kThreads - 1) / kThreads;
  // Grid-stride loop: cap the grid so huge tensors do not need 2^31 blocks.
  const int blocks = static_cast<int>(want < 65535 * 8 ? want : 65535 * 8);
  ConvertKernel<<<blocks, kThreads, 0, s>>>(op, src, dst, n);
  const cudaError_t err = cudaGetLastError();  // also clears a non-sticky launch error
  if (err != cudaSuccess) {
    return absl::InternalError(absl::StrCat("ConvertKernel launch (", DTypeName(from), " -> ",
                                            DTypeName(to), ", n=", n,
                                            "): ", cudaGetErrorString(err)));
  }
  return absl::OkStatus();
}

absl::Status LaunchConvert2DDevice(DType from, const void* src, int64_t src_pitch, DType to,
                                   void* dst, int64_t dst_pitch, int64_t width, int64_t height,
                                   void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  if (width == 0 || height == 0) return absl::OkStatus();
  if (from == to) {
    const cudaError_t err =
        cudaMemcpy2DAsync(dst, static_cast<size_t>(dst_pitch), src, static_cast<size_t>(src_pitch),
                          static_cast<size_t>(width) * DTypeSize(from), static_cast<size_t>(height),
                          cudaMemcpyDeviceToDevice, s);
    if (err != cudaSuccess) {
      (void)cudaGetLastError();
      return absl::InternalError(absl::StrCat("cudaMemcpy2DAsync: ", cudaGetErrorString(err)));
    }
    return absl::OkStatus();
  }
  const int op = OpFor(from, to);
  if (op < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("no device conversion from ", DTypeName(from), " to ", DTypeName(to)));
  }
  constexpr int kThreads = 256;
  const int64_t want = (width * height + kThreads - 1) / kThreads;
  const int blocks = static_cast<int>(want < 65535 * 8 ? want : 65535 * 8);
  Convert2DKernel<<<blocks, kThreads, 0, s>>>(
      op, static_cast<const unsigned char*>(src), src_pitch, static_cast<int>(DTypeSize(from)),
      static_cast<unsigned char*>(dst), dst_pitch, static_cast<int>(DTypeSize(to)), width, height);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    return absl::InternalError(absl::StrCat("Convert2DKernel launch (", DTypeName(from), " -> ",
                                            DTypeName(to), ", ", height, " rows of ", width,
                                            "): ", cudaGetErrorString(err)));
  }
  return absl::OkStatus();
}

}  // namespace weightd::kernels
