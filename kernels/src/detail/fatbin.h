// The device kernels of weightd (convert.cu), compiled by nvcc -fatbin at build time and embedded
// as bytes by kernels/cmake/embed_fatbin.cmake: SASS for the architectures in
// WEIGHTD_CUDA_FATBIN_ARCHS plus PTX for the newest, so the driver JITs for GPUs newer than the
// build. Loaded with cuModuleLoadData (launch.cc). Immutable; thread-safe.
#ifndef WEIGHTD_KERNELS_DETAIL_FATBIN_H_
#define WEIGHTD_KERNELS_DETAIL_FATBIN_H_

#include <cstddef>

namespace weightd::kernels::detail {

extern const unsigned char kConvertFatbin[];  // 64-byte aligned
extern const size_t kConvertFatbinSize;       // bytes

}  // namespace weightd::kernels::detail

#endif  // WEIGHTD_KERNELS_DETAIL_FATBIN_H_
