// Device-side dtype conversion, host-callable, with the exact semantics of convert.h.
//
//   CudaContextGuard guard(cu);                                 // the stream's context
//   WD_RETURN_IF_ERROR(guard.Use(ctx));
//   WD_RETURN_IF_ERROR(kernels::LaunchConvertDevice(DType::kF32, src_dev, DType::kBF16, dst_dev,
//                                                   n, stream));
//
// The kernels are an embedded fatbin (kernels/src/convert.cu) launched through the CUDA driver
// table (weightd/detail/cuda_driver.h): no libcudart. Declared without CUDA headers so that daemon
// code that never touches CUDA types can include it: `stream` is a CUstream passed as void*
// (nullptr = the legacy default stream of the current context), `src`/`dst` are device addresses
// (CUdeviceptr values) valid until the stream reaches the work.
// Only available when weightd is built with WEIGHTD_ENABLE_CUDA (WEIGHTD_HAVE_CUDA_KERNELS).
//
// The stream's context must be current on the calling thread: the kernel module is loaded once
// per context (cuModuleLoadData, on first use in it) and kept for the life of the process.
// Enqueues asynchronously on `stream`. Errors: INVALID_ARGUMENT for an unsupported pair;
// FAILED_PRECONDITION without a driver or a current context; otherwise the driver's error naming
// the failing call and the conversion. Thread-safe.
#ifndef WEIGHTD_KERNELS_CONVERT_CUDA_H_
#define WEIGHTD_KERNELS_CONVERT_CUDA_H_

#include <cstdint>

#include "absl/status/status.h"
#include "weightd/dtype.h"

namespace weightd::kernels {

// `n` contiguous elements (a same-dtype call is a cuMemcpyDtoDAsync).
absl::Status LaunchConvertDevice(DType from, uint64_t src, DType to, uint64_t dst, int64_t n,
                                 void* stream);

// The 2-D form: `height` rows of `width` elements, row r of the source at
// src + r * src_pitch bytes and of the destination at dst + r * dst_pitch bytes (pitches in
// bytes, each row naturally aligned for its dtype). Same ordering and errors as above; a
// same-dtype call is a device-to-device cuMemcpy2DAsync.
absl::Status LaunchConvert2DDevice(DType from, uint64_t src, int64_t src_pitch, DType to,
                                   uint64_t dst, int64_t dst_pitch, int64_t width, int64_t height,
                                   void* stream);

}  // namespace weightd::kernels

#endif  // WEIGHTD_KERNELS_CONVERT_CUDA_H_
