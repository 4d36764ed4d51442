// CudaPinnedAllocator: staging memory from cudaHostAlloc (page-locked, DMA-able at the full
// PCIe rate: 55 GB/s against 7 GB/s pageable on the H100 machine). For StagingRing.
// Allocate the ring once per daemon, not per load: cudaHostAlloc of 8 GiB took 3.6 s there.
// Only built with WEIGHTD_ENABLE_CUDA. Thread-safe.
#ifndef WEIGHTD_DETAIL_CUDA_PINNED_ALLOCATOR_H_
#define WEIGHTD_DETAIL_CUDA_PINNED_ALLOCATOR_H_

#include "weightd/detail/staging_ring.h"

namespace weightd {

class CudaPinnedAllocator final : public StagingAllocator {
 public:
  absl::string_view name() const override { return "cudaHostAlloc"; }
  // RESOURCE_EXHAUSTED with the CUDA error text when the allocation fails.
  absl::StatusOr<std::byte*> Allocate(uint64_t bytes) override;
  void Free(std::byte* p, uint64_t bytes) noexcept override;
};

}  // namespace weightd

#endif  // WEIGHTD_DETAIL_CUDA_PINNED_ALLOCATOR_H_
