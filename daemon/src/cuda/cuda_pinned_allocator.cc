#include "weightd/detail/cuda_pinned_allocator.h"

#include "absl/strings/str_cat.h"
#include "weightd/detail/cuda_check.h"
#include "weightd/log.h"

namespace weightd {

absl::StatusOr<std::byte*> CudaPinnedAllocator::Allocate(uint64_t bytes) {
  void* p = nullptr;
  // Portable: the ring serves copies to every device of a multi-GPU load.
  const cudaError_t e = cudaHostAlloc(&p, bytes, cudaHostAllocPortable);
  if (e != cudaSuccess) {
    absl::Status s = CudaRuntimeError(e, "cudaHostAlloc", __FILE__, __LINE__);
    return absl::ResourceExhaustedError(
        absl::StrCat(bytes, " bytes of pinned staging memory: ", s.message()));
  }
  return static_cast<std::byte*>(p);
}

void CudaPinnedAllocator::Free(std::byte* p, uint64_t) noexcept {
  if (p == nullptr) return;
  const cudaError_t e = cudaFreeHost(p);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    LogWarning("cudaFreeHost failed: %s", cudaGetErrorString(e));
  }
}

}  // namespace weightd
