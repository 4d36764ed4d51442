// Device-side dtype conversion, host-callable, with the exact semantics of convert.h.
//
//   WD_RETURN_IF_ERROR(kernels::LaunchConvertDevice(DType::kF32, src_dev, DType::kBF16, dst_dev,
//                                                   n, stream));
//
// Declared without CUDA headers so that daemon code that never touches CUDA types can include
// it: `stream` is a cudaStream_t passed as void* (nullptr = the legacy default stream).
// Only available when weightd is built with WEIGHTD_ENABLE_CUDA (WEIGHTD_HAVE_CUDA_KERNELS).
// Enqueues asynchronously on `stream`; `src`/`dst` are device pointers valid until the stream
// reaches the kernel. Errors: InvalidArgument for an unsupported pair, Internal with the CUDA
// error text when the launch fails.
#ifndef WEIGHTD_KERNELS_CONVERT_CUDA_H_
#define WEIGHTD_KERNELS_CONVERT_CUDA_H_

#include <cstdint>

#include "absl/status/status.h"
#include "weightd/dtype.h"

namespace weightd::kernels {

absl::Status LaunchConvertDevice(DType from, const void* src, DType to, void* dst, int64_t n,
                                 void* stream);

// The 2-D form: `height` rows of `width` elements, row r of the source at
// src + r * src_pitch bytes and of the destination at dst + r * dst_pitch bytes (pitches in
// bytes, each row naturally aligned for its dtype). Same ordering and errors as above; a
// same-dtype call is a cudaMemcpy2DAsync.
absl::Status LaunchConvert2DDevice(DType from, const void* src, int64_t src_pitch, DType to,
                                   void* dst, int64_t dst_pitch, int64_t width, int64_t height,
                                   void* stream);

}  // namespace weightd::kernels

#endif  // WEIGHTD_KERNELS_CONVERT_CUDA_H_
