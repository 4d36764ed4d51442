#include "weightd/detail/cuda_pinned_allocator.h"

#include <string>

#include "absl/strings/str_cat.h"
#include "weightd/detail/cuda_driver.h"
#include "weightd/log.h"
#include "weightd/status_macros.h"

namespace weightd {

absl::StatusOr<std::byte*> CudaPinnedAllocator::Allocate(uint64_t bytes) {
  CudaContextGuard guard(cu_);
  WD_RETURN_IF_ERROR(guard.Use(context_));
  void* p = nullptr;
  const CUresult r = cu_.MemHostAlloc(&p, bytes, CU_MEMHOSTALLOC_PORTABLE);
  if (r != CUDA_SUCCESS) {
    const absl::Status s = cu_.Error(r, "cuMemHostAlloc", __FILE__, __LINE__);
    return absl::ResourceExhaustedError(
        absl::StrCat(bytes, " bytes of pinned staging memory: ", s.message()));
  }
  return static_cast<std::byte*>(p);
}

void CudaPinnedAllocator::Free(std::byte* p, uint64_t bytes) noexcept {
  if (p == nullptr) return;
  CudaContextGuard guard(cu_);
  absl::Status s = guard.Use(context_);
  if (s.ok()) {
    const CUresult r = cu_.MemFreeHost(p);
    if (r != CUDA_SUCCESS) s = cu_.Error(r, "cuMemFreeHost", __FILE__, __LINE__);
  }
  if (!s.ok()) {
    LogWarning("freeing %d bytes of pinned staging memory: %s", bytes, std::string(s.message()));
  }
}

}  // namespace weightd
