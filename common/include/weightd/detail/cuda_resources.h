// Move-only owners of CUDA driver objects (STYLE.md "Resources"), over the CudaDriver table.
//
//   WD_ASSIGN_OR_RETURN(CudaPrimaryContext ctx, CudaPrimaryContext::Retain(cu, /*ordinal=*/0));
//   CudaContextGuard guard(cu);
//   WD_RETURN_IF_ERROR(guard.Use(ctx.get()));
//   WD_ASSIGN_OR_RETURN(CudaStream stream, CudaStream::Create(cu));
//   WD_ASSIGN_OR_RETURN(CudaEvent done, CudaEvent::Create(cu));
//   WD_ASSIGN_OR_RETURN(CudaDeviceBuffer scratch, CudaDeviceBuffer::Allocate(cu, 1 << 20));
//
// Streams, events and buffers are created in the context current on the calling thread and
// remember it: their destructors make it current for the one destroying call and restore the
// caller's, so they may be destroyed from any thread. Destructors are noexcept and log failures
// (a lost device cannot be argued with at teardown). Destroying a stream does not wait for its
// work: synchronize first when host memory it reads is about to be freed.
// The context a resource was created in must outlive it (hold a CudaPrimaryContext longer).
// Only built with WEIGHTD_ENABLE_CUDA (WEIGHTD_HAVE_CUDA_DRIVER). Each object is used by one
// thread at a time; the driver itself is thread-safe.
#ifndef WEIGHTD_DETAIL_CUDA_RESOURCES_H_
#define WEIGHTD_DETAIL_CUDA_RESOURCES_H_

#include <cuda.h>

#include <cstddef>

#include "absl/status/statusor.h"
#include "weightd/detail/cuda_driver.h"

namespace weightd {

// One reference on a device's primary context (cuDevicePrimaryCtxRetain), released by the
// destructor (cuDevicePrimaryCtxRelease). Retaining does not make it current.
class CudaPrimaryContext {
 public:
  CudaPrimaryContext() noexcept = default;
  CudaPrimaryContext(const CudaPrimaryContext&) = delete;
  CudaPrimaryContext& operator=(const CudaPrimaryContext&) = delete;
  CudaPrimaryContext(CudaPrimaryContext&& o) noexcept;
  CudaPrimaryContext& operator=(CudaPrimaryContext&& o) noexcept;
  ~CudaPrimaryContext();

  // Errors name the device ordinal and the failing call.
  static absl::StatusOr<CudaPrimaryContext> Retain(const CudaDriver& cu, int ordinal);

  CUcontext get() const noexcept { return ctx_; }
  int ordinal() const noexcept { return ordinal_; }

 private:
  void Reset() noexcept;
  const CudaDriver* cu_ = nullptr;
  CUdevice device_ = 0;
  int ordinal_ = -1;
  CUcontext ctx_ = nullptr;
};

// A stream of the current context (cuStreamCreate; non-blocking by default, so it never
// serializes with the legacy default stream another library in the process may use).
class CudaStream {
 public:
  CudaStream() noexcept = default;
  CudaStream(const CudaStream&) = delete;
  CudaStream& operator=(const CudaStream&) = delete;
  CudaStream(CudaStream&& o) noexcept;
  CudaStream& operator=(CudaStream&& o) noexcept;
  ~CudaStream();

  static absl::StatusOr<CudaStream> Create(const CudaDriver& cu,
                                           unsigned int flags = CU_STREAM_NON_BLOCKING);

  CUstream get() const noexcept { return stream_; }
  CUcontext context() const noexcept { return ctx_; }

 private:
  void Reset() noexcept;
  const CudaDriver* cu_ = nullptr;
  CUcontext ctx_ = nullptr;
  CUstream stream_ = nullptr;
};

// An event of the current context (cuEventCreate; timing disabled by default: cheaper to record
// and to wait on, and weightd only uses events as fences).
class CudaEvent {
 public:
  CudaEvent() noexcept = default;
  CudaEvent(const CudaEvent&) = delete;
  CudaEvent& operator=(const CudaEvent&) = delete;
  CudaEvent(CudaEvent&& o) noexcept;
  CudaEvent& operator=(CudaEvent&& o) noexcept;
  ~CudaEvent();

  static absl::StatusOr<CudaEvent> Create(const CudaDriver& cu,
                                          unsigned int flags = CU_EVENT_DISABLE_TIMING);

  CUevent get() const noexcept { return event_; }
  CUcontext context() const noexcept { return ctx_; }

 private:
  void Reset() noexcept;
  const CudaDriver* cu_ = nullptr;
  CUcontext ctx_ = nullptr;
  CUevent event_ = nullptr;
};

// `bytes` of device memory in the current context (cuMemAlloc), freed by cuMemFree. For scratch
// buffers; arenas that are shared with other processes are VMM allocations (cuda_backend.h).
class CudaDeviceBuffer {
 public:
  CudaDeviceBuffer() noexcept = default;
  CudaDeviceBuffer(const CudaDeviceBuffer&) = delete;
  CudaDeviceBuffer& operator=(const CudaDeviceBuffer&) = delete;
  CudaDeviceBuffer(CudaDeviceBuffer&& o) noexcept;
  CudaDeviceBuffer& operator=(CudaDeviceBuffer&& o) noexcept;
  ~CudaDeviceBuffer();

  // RESOURCE_EXHAUSTED naming the bytes when the device is out of memory.
  static absl::StatusOr<CudaDeviceBuffer> Allocate(const CudaDriver& cu, size_t bytes);

  CUdeviceptr get() const noexcept { return ptr_; }
  size_t size() const noexcept { return size_; }

 private:
  void Reset() noexcept;
  const CudaDriver* cu_ = nullptr;
  CUcontext ctx_ = nullptr;
  CUdeviceptr ptr_ = 0;
  size_t size_ = 0;
};

}  // namespace weightd

#endif  // WEIGHTD_DETAIL_CUDA_RESOURCES_H_
