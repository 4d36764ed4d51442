// WD_CUDA_RETURN_IF_ERROR: CUDA runtime calls to Status (STYLE.md "Errors"). Includes
// cuda_runtime_api.h: only for .cc/.cu files of CUDA builds.
//
//   WD_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dst, src, n, cudaMemcpyHostToDevice, stream));
//
// The returned Status carries the stringified call, file, line and CUDA's error name and text;
// the sticky error state of the runtime is cleared (cudaGetLastError) so the next call does not
// report a stale failure.
#ifndef WEIGHTD_DETAIL_CUDA_CHECK_H_
#define WEIGHTD_DETAIL_CUDA_CHECK_H_

#include <cuda_runtime_api.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace weightd {

inline absl::Status CudaRuntimeError(cudaError_t e, const char* call, const char* file, int line) {
  (void)cudaGetLastError();
  const std::string msg = absl::StrCat(call, " failed: ", cudaGetErrorName(e), " (",
                                       cudaGetErrorString(e), ") at ", file, ":", line);
  if (e == cudaErrorMemoryAllocation) return absl::ResourceExhaustedError(msg);
  if (e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver) {
    return absl::FailedPreconditionError(msg);
  }
  return absl::InternalError(msg);
}

}  // namespace weightd

#define WD_CUDA_RETURN_IF_ERROR(call)                                          \
  do {                                                                         \
    const cudaError_t wd_cuda_ = (call);                                       \
    if (wd_cuda_ != cudaSuccess) {                                             \
      return ::weightd::CudaRuntimeError(wd_cuda_, #call, __FILE__, __LINE__); \
    }                                                                          \
  } while (0)

#endif  // WEIGHTD_DETAIL_CUDA_CHECK_H_
