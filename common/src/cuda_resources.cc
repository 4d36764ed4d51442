#include "weightd/detail/cuda_resources.h"

#include <cstdio>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "weightd/status_macros.h"

namespace weightd {
namespace {

// Shared by the daemon and the client library, which log differently: stderr is the one sink
// both have. Teardown failures are rare (a lost device) and worth one line each.
void WarnTeardown(const CudaDriver& cu, CUresult r, const char* call) {
  if (r == CUDA_SUCCESS) return;
  std::fprintf(stderr, "weightd: %s\n",
               std::string(cu.Error(r, call, __FILE__, __LINE__).message()).c_str());
}

absl::StatusOr<CUcontext> CurrentContext(const CudaDriver& cu, const char* what) {
  CUcontext ctx = nullptr;
  WD_CU_RETURN_IF_ERROR(cu, cu.CtxGetCurrent(&ctx));
  if (ctx == nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat("creating a CUDA ", what, " needs a current context (none on this thread)"));
  }
  return ctx;
}

}  // namespace

CudaPrimaryContext::CudaPrimaryContext(CudaPrimaryContext&& o) noexcept
    : cu_(std::exchange(o.cu_, nullptr)),
      device_(o.device_),
      ordinal_(std::exchange(o.ordinal_, -1)),
      ctx_(std::exchange(o.ctx_, nullptr)) {}

CudaPrimaryContext& CudaPrimaryContext::operator=(CudaPrimaryContext&& o) noexcept {
  if (this != &o) {
    Reset();
    cu_ = std::exchange(o.cu_, nullptr);
    device_ = o.device_;
    ordinal_ = std::exchange(o.ordinal_, -1);
    ctx_ = std::exchange(o.ctx_, nullptr);
  }
  return *this;
}

CudaPrimaryContext::~CudaPrimaryContext() { Reset(); }

void CudaPrimaryContext::Reset() noexcept {
  if (ctx_ != nullptr) {
    WarnTeardown(*cu_, cu_->DevicePrimaryCtxRelease(device_), "cuDevicePrimaryCtxRelease");
  }
  ctx_ = nullptr;
}

absl::StatusOr<CudaPrimaryContext> CudaPrimaryContext::Retain(const CudaDriver& cu, int ordinal) {
  CudaPrimaryContext c;
  absl::Status s = [&]() -> absl::Status {
    WD_CU_RETURN_IF_ERROR(cu, cu.DeviceGet(&c.device_, ordinal));
    CUcontext ctx = nullptr;
    WD_CU_RETURN_IF_ERROR(cu, cu.DevicePrimaryCtxRetain(&ctx, c.device_));
    c.cu_ = &cu;
    c.ordinal_ = ordinal;
    c.ctx_ = ctx;
    return absl::OkStatus();
  }();
  if (!s.ok()) return Annotate(s, absl::StrCat("primary context of CUDA device ", ordinal));
  return c;
}

CudaStream::CudaStream(CudaStream&& o) noexcept
    : cu_(std::exchange(o.cu_, nullptr)),
      ctx_(std::exchange(o.ctx_, nullptr)),
      stream_(std::exchange(o.stream_, nullptr)) {}

CudaStream& CudaStream::operator=(CudaStream&& o) noexcept {
  if (this != &o) {
    Reset();
    cu_ = std::exchange(o.cu_, nullptr);
    ctx_ = std::exchange(o.ctx_, nullptr);
    stream_ = std::exchange(o.stream_, nullptr);
  }
  return *this;
}

CudaStream::~CudaStream() { Reset(); }

void CudaStream::Reset() noexcept {
  if (stream_ == nullptr) return;
  CudaContextGuard guard(*cu_);
  (void)guard.Use(ctx_);  // a failure shows again, with its name, in the destroy below
  WarnTeardown(*cu_, cu_->StreamDestroy(stream_), "cuStreamDestroy");
  stream_ = nullptr;
}

absl::StatusOr<CudaStream> CudaStream::Create(const CudaDriver& cu, unsigned int flags) {
  WD_ASSIGN_OR_RETURN(CUcontext ctx, CurrentContext(cu, "stream"));
  CudaStream s;
  WD_CU_RETURN_IF_ERROR(cu, cu.StreamCreate(&s.stream_, flags));
  s.cu_ = &cu;
  s.ctx_ = ctx;
  return s;
}

CudaEvent::CudaEvent(CudaEvent&& o) noexcept
    : cu_(std::exchange(o.cu_, nullptr)),
      ctx_(std::exchange(o.ctx_, nullptr)),
      event_(std::exchange(o.event_, nullptr)) {}

CudaEvent& CudaEvent::operator=(CudaEvent&& o) noexcept {
  if (this != &o) {
    Reset();
    cu_ = std::exchange(o.cu_, nullptr);
    ctx_ = std::exchange(o.ctx_, nullptr);
    event_ = std::exchange(o.event_, nullptr);
  }
  return *this;
}

CudaEvent::~CudaEvent() { Reset(); }

void CudaEvent::Reset() noexcept {
  if (event_ == nullptr) return;
  CudaContextGuard guard(*cu_);
  (void)guard.Use(ctx_);
  WarnTeardown(*cu_, cu_->EventDestroy(event_), "cuEventDestroy");
  event_ = nullptr;
}

absl::StatusOr<CudaEvent> CudaEvent::Create(const CudaDriver& cu, unsigned int flags) {
  WD_ASSIGN_OR_RETURN(CUcontext ctx, CurrentContext(cu, "event"));
  CudaEvent e;
  WD_CU_RETURN_IF_ERROR(cu, cu.EventCreate(&e.event_, flags));
  e.cu_ = &cu;
  e.ctx_ = ctx;
  return e;
}

CudaDeviceBuffer::CudaDeviceBuffer(CudaDeviceBuffer&& o) noexcept
    : cu_(std::exchange(o.cu_, nullptr)),
      ctx_(std::exchange(o.ctx_, nullptr)),
      ptr_(std::exchange(o.ptr_, 0)),
      size_(std::exchange(o.size_, 0)) {}

CudaDeviceBuffer& CudaDeviceBuffer::operator=(CudaDeviceBuffer&& o) noexcept {
  if (this != &o) {
    Reset();
    cu_ = std::exchange(o.cu_, nullptr);
    ctx_ = std::exchange(o.ctx_, nullptr);
    ptr_ = std::exchange(o.ptr_, 0);
    size_ = std::exchange(o.size_, 0);
  }
  return *this;
}

CudaDeviceBuffer::~CudaDeviceBuffer() { Reset(); }

void CudaDeviceBuffer::Reset() noexcept {
  if (ptr_ == 0) return;
  CudaContextGuard guard(*cu_);
  (void)guard.Use(ctx_);
  WarnTeardown(*cu_, cu_->MemFree(ptr_), "cuMemFree");
  ptr_ = 0;
  size_ = 0;
}

absl::StatusOr<CudaDeviceBuffer> CudaDeviceBuffer::Allocate(const CudaDriver& cu, size_t bytes) {
  WD_ASSIGN_OR_RETURN(CUcontext ctx, CurrentContext(cu, "device buffer"));
  CudaDeviceBuffer b;
  const CUresult r = cu.MemAlloc(&b.ptr_, bytes);
  if (r != CUDA_SUCCESS) {
    return Annotate(cu.Error(r, "cuMemAlloc", __FILE__, __LINE__),
                    absl::StrCat(bytes, " bytes of device scratch memory"));
  }
  b.cu_ = &cu;
  b.ctx_ = ctx;
  b.size_ = bytes;
  return b;
}

}  // namespace weightd
