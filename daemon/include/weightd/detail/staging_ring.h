// StagingRing: a fixed ring of page-aligned staging buffers, bounded by a memory budget whatever
// the model size. The CUDA path shares one ring between all loads of a daemon (executor.h,
// CudaStaging); the host path makes one per load.
//
//   WD_ASSIGN_OR_RETURN(auto ring, StagingRing::Create(PageAllocator(), {.budget = 1 << 30,
//                                                                         .slot_bytes = 16 <<
//                                                                         20}));
//   WD_ASSIGN_OR_RETURN(StagingSlot slot, ring->Acquire());   // blocks while all are in use
//   ... read into slot.data() (slot.size() bytes, 4 KiB aligned) ...
//   slot.SetFence([event] { return WaitEvent(event); });      // consumer still running (DMA)
//   // ~StagingSlot returns the slot; the next Acquire of it first runs the fence.
//
// A slot is reused only after its consumer finished: the fence a holder attaches is run (and
// must succeed) before the slot is handed out again. On the host the consumer is a synchronous
// memcpy, so no fence is needed; the CUDA executor attaches "cuEventSynchronize(event)".
// StagingSlot is an RAII handle: an error path that drops it cannot leak the slot.
//
// Shared rings: a fence may outlive the load that attached it (the slot can sit free with its
// fence until another load acquires it), and it refers to that load's CUDA events. So fences
// carry an owner tag, and a load calls DrainFences(owner) before destroying what its fences
// wait on: that runs the owner's pending fences and waits for any of them another thread's
// Acquire is running at that moment. After it returns no fence of the owner remains.
//
// Memory comes from a StagingAllocator: PageAllocator (mmap'd anonymous memory, optionally
// mlock'd) on the host, cuMemHostAlloc under CUDA (cuda_pinned_allocator.h). Allocation is
// all-or-nothing: a failure releases what was already allocated.
//
// Thread-safety: Acquire and slot release may run concurrently from any threads. A StagingSlot
// is used by one thread at a time. The ring must outlive its slots.
#ifndef WEIGHTD_DETAIL_STAGING_RING_H_
#define WEIGHTD_DETAIL_STAGING_RING_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"

namespace weightd {

// Where staging memory comes from. Implementations are thread-safe.
class StagingAllocator {
 public:
  virtual ~StagingAllocator() = default;
  virtual absl::string_view name() const = 0;
  // `bytes` of memory aligned to at least 4 KiB. RESOURCE_EXHAUSTED when it cannot be had.
  virtual absl::StatusOr<std::byte*> Allocate(uint64_t bytes) = 0;
  // Frees memory from Allocate (same `bytes`). Never fails visibly; errors are logged.
  virtual void Free(std::byte* p, uint64_t bytes) noexcept = 0;
};

// Anonymous private mmap; with `lock`, also mlock'd (a failing mlock -- RLIMIT_MEMLOCK -- is
// tolerated: the memory stays usable, only not pinned).
class PageAllocator final : public StagingAllocator {
 public:
  explicit PageAllocator(bool lock = false) : lock_(lock) {}
  absl::string_view name() const override { return lock_ ? "host-mlock" : "host"; }
  absl::StatusOr<std::byte*> Allocate(uint64_t bytes) override;
  void Free(std::byte* p, uint64_t bytes) noexcept override;

 private:
  bool lock_;
};

struct StagingRingOptions {
  uint64_t budget = 1ull << 30;       // bytes of all slots together (the --pinned-budget)
  uint64_t slot_bytes = 16ull << 20;  // bytes per slot; rounded up to 4 KiB
  int max_slots = 0;                  // 0 = as many as the budget allows
};

class StagingRing;

// Move-only handle to one slot; returns it to the ring when destroyed.
class StagingSlot {
 public:
  StagingSlot() noexcept = default;
  StagingSlot(const StagingSlot&) = delete;
  StagingSlot& operator=(const StagingSlot&) = delete;
  StagingSlot(StagingSlot&& o) noexcept;
  StagingSlot& operator=(StagingSlot&& o) noexcept;
  ~StagingSlot();

  std::byte* data() const noexcept { return data_; }
  uint64_t size() const noexcept { return size_; }
  int index() const noexcept { return index_; }
  explicit operator bool() const noexcept { return ring_ != nullptr; }
  // Attaches the wait for this slot's consumer; it runs before the slot is handed out again.
  // `owner` tags it for DrainFences(owner) (any pointer unique to the consumer; may be null).
  void SetFence(std::function<absl::Status()> fence, const void* owner = nullptr);
  // Returns the slot now (as the destructor would).
  void Release() noexcept;

 private:
  friend class StagingRing;
  StagingRing* ring_ = nullptr;
  int index_ = -1;
  std::byte* data_ = nullptr;
  uint64_t size_ = 0;
  std::function<absl::Status()> fence_;
  const void* owner_ = nullptr;
};

class StagingRing {
 public:
  // Allocates floor(budget / slot_bytes) slots (at least 1, at most max_slots). Errors:
  // INVALID_ARGUMENT when one slot exceeds the budget; the allocator's error otherwise.
  static absl::StatusOr<std::unique_ptr<StagingRing>> Create(
      std::shared_ptr<StagingAllocator> allocator, const StagingRingOptions& options);
  ~StagingRing();
  StagingRing(const StagingRing&) = delete;
  StagingRing& operator=(const StagingRing&) = delete;

  // Blocks until a slot is free, runs its pending fence, and hands it out. A failing fence is
  // returned (the slot goes back to the free list without a fence).
  absl::StatusOr<StagingSlot> Acquire();
  // As Acquire, but returns an empty slot at once when none is free (for an optional second
  // buffer: a holder that waits for a second slot could deadlock with other holders).
  absl::StatusOr<StagingSlot> TryAcquire();

  int slots() const noexcept { return static_cast<int>(buffers_.size()); }
  uint64_t slot_bytes() const noexcept { return slot_bytes_; }
  uint64_t allocated_bytes() const noexcept { return slot_bytes_ * buffers_.size(); }
  int in_use() const;
  int peak_in_use() const;  // most slots out at once since creation
  // Runs every pending fence (e.g. before the consumer's resources are destroyed).
  absl::Status DrainFences();
  // Runs the pending fences tagged `owner` and waits for those other threads are running; no
  // fence of `owner` remains afterwards. Returns the first failure.
  absl::Status DrainFences(const void* owner);

 private:
  StagingRing(std::shared_ptr<StagingAllocator> a, uint64_t slot_bytes)
      : allocator_(std::move(a)), slot_bytes_(slot_bytes) {}
  friend class StagingSlot;
  struct Fence {
    std::function<absl::Status()> wait;
    const void* owner = nullptr;
  };
  void Return(int index, Fence fence) noexcept;
  // Takes the last free slot (mu_ held, free_ not empty) and its pending fence, which the
  // caller then runs without the lock through Finish.
  std::pair<int, Fence> Take() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<StagingSlot> Finish(int index, Fence fence);
  absl::Status Drain(const void* owner, bool all);

  std::shared_ptr<StagingAllocator> allocator_;
  uint64_t slot_bytes_;
  std::vector<std::byte*> buffers_;
  mutable absl::Mutex mu_;
  std::vector<int> free_ ABSL_GUARDED_BY(mu_);
  std::vector<Fence> fences_ ABSL_GUARDED_BY(mu_);
  std::vector<const void*> running_ ABSL_GUARDED_BY(mu_);  // owners of fences being run
  int in_use_ ABSL_GUARDED_BY(mu_) = 0;
  int peak_in_use_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace weightd

#endif  // WEIGHTD_DETAIL_STAGING_RING_H_
