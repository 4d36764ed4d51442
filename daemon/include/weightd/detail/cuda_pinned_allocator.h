// CudaPinnedAllocator: staging memory from cuMemHostAlloc (page-locked, DMA-able at the full
// PCIe rate: 55 GB/s against 7 GB/s pageable on the H100 machine). For StagingRing.
// Allocate the ring once per load at most, never per chunk: pinning 8 GiB took 3.6 s
// there. Portable (CU_MEMHOSTALLOC_PORTABLE): one ring serves copies to every device of a
// multi-GPU load.
//
// The driver ties pinned memory to the context current at allocation, and both calls need one:
// the allocator makes `context` current around each call (and restores the caller's). That
// context must outlive the memory (the executor holds the primary context's retain for the
// load and frees the ring first). Only built with WEIGHTD_ENABLE_CUDA. Thread-safe.
#ifndef WEIGHTD_DETAIL_CUDA_PINNED_ALLOCATOR_H_
#define WEIGHTD_DETAIL_CUDA_PINNED_ALLOCATOR_H_

#include "weightd/detail/staging_ring.h"

struct CUctx_st;  // CUcontext, without <cuda.h> in a daemon header

namespace weightd {

struct CudaDriver;

class CudaPinnedAllocator final : public StagingAllocator {
 public:
  CudaPinnedAllocator(const CudaDriver& cu, CUctx_st* context) : cu_(cu), context_(context) {}
  absl::string_view name() const override { return "cuMemHostAlloc"; }
  // RESOURCE_EXHAUSTED with the CUDA error text when the allocation fails.
  absl::StatusOr<std::byte*> Allocate(uint64_t bytes) override;
  void Free(std::byte* p, uint64_t bytes) noexcept override;

 private:
  const CudaDriver& cu_;
  CUctx_st* context_;
};

}  // namespace weightd

#endif  // WEIGHTD_DETAIL_CUDA_PINNED_ALLOCATOR_H_
