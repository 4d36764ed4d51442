#include "weightd/detail/staging_ring.h"

#include <sys/mman.h>

#include <algorithm>
#include <cerrno>
#include <utility>

#include "absl/strings/str_cat.h"
#include "weightd/status_macros.h"

namespace weightd {
namespace {
constexpr uint64_t kPage = 4096;
uint64_t RoundUp(uint64_t n, uint64_t a) { return (n + a - 1) / a * a; }
}  // namespace

absl::StatusOr<std::byte*> PageAllocator::Allocate(uint64_t bytes) {
  void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) {
    return absl::ResourceExhaustedError(
        ErrnoError(errno, absl::StrCat("mmap of a ", bytes, "-byte staging buffer")).message());
  }
  // Best effort: without CAP_IPC_LOCK the memlock limit is usually small, and unpinned memory
  // is still correct, only subject to reclaim.
  if (lock_) (void)::mlock(p, bytes);
  return static_cast<std::byte*>(p);
}

void PageAllocator::Free(std::byte* p, uint64_t bytes) noexcept {
  if (p != nullptr) ::munmap(p, bytes);
}

StagingSlot::StagingSlot(StagingSlot&& o) noexcept
    : ring_(std::exchange(o.ring_, nullptr)),
      index_(std::exchange(o.index_, -1)),
      data_(std::exchange(o.data_, nullptr)),
      size_(std::exchange(o.size_, 0)),
      fence_(std::exchange(o.fence_, nullptr)),
      owner_(std::exchange(o.owner_, nullptr)) {}

StagingSlot& StagingSlot::operator=(StagingSlot&& o) noexcept {
  if (this != &o) {
    Release();
    ring_ = std::exchange(o.ring_, nullptr);
    index_ = std::exchange(o.index_, -1);
    data_ = std::exchange(o.data_, nullptr);
    size_ = std::exchange(o.size_, 0);
    fence_ = std::exchange(o.fence_, nullptr);
    owner_ = std::exchange(o.owner_, nullptr);
  }
  return *this;
}

StagingSlot::~StagingSlot() { Release(); }

void StagingSlot::SetFence(std::function<absl::Status()> fence, const void* owner) {
  fence_ = std::move(fence);
  owner_ = owner;
}

void StagingSlot::Release() noexcept {
  if (ring_ == nullptr) return;
  std::exchange(ring_, nullptr)
      ->Return(std::exchange(index_, -1),
               {std::exchange(fence_, nullptr), std::exchange(owner_, nullptr)});
  data_ = nullptr;
  size_ = 0;
}

absl::StatusOr<std::unique_ptr<StagingRing>> StagingRing::Create(
    std::shared_ptr<StagingAllocator> allocator, const StagingRingOptions& options) {
  const uint64_t slot = RoundUp(std::max<uint64_t>(options.slot_bytes, kPage), kPage);
  if (slot > options.budget) {
    return absl::InvalidArgumentError(absl::StrCat("a staging slot of ", slot,
                                                   " bytes exceeds the pinned budget of ",
                                                   options.budget, " bytes"));
  }
  uint64_t n = options.budget / slot;
  if (options.max_slots > 0) n = std::min<uint64_t>(n, options.max_slots);
  std::unique_ptr<StagingRing> ring(new StagingRing(std::move(allocator), slot));
  ring->buffers_.reserve(n);
  for (uint64_t i = 0; i < n; ++i) {
    absl::StatusOr<std::byte*> p = ring->allocator_->Allocate(slot);
    // ~StagingRing frees the slots allocated so far.
    if (!p.ok()) {
      return Annotate(p.status(), absl::StrCat("allocating staging slot ", i, " of ", n, " (",
                                               ring->allocator_->name(), ")"));
    }
    ring->buffers_.push_back(*p);
  }
  absl::MutexLock l(&ring->mu_);
  ring->fences_.resize(n);
  for (int i = static_cast<int>(n) - 1; i >= 0; --i) ring->free_.push_back(i);
  return ring;
}

StagingRing::~StagingRing() {
  (void)DrainFences();
  for (std::byte* b : buffers_) allocator_->Free(b, slot_bytes_);
}

std::pair<int, StagingRing::Fence> StagingRing::Take() {
  const int index = free_.back();
  free_.pop_back();
  Fence fence = std::exchange(fences_[index], Fence{});
  if (fence.wait) running_.push_back(fence.owner);
  ++in_use_;
  peak_in_use_ = std::max(peak_in_use_, in_use_);
  return {index, std::move(fence)};
}

absl::StatusOr<StagingSlot> StagingRing::Finish(int index, Fence fence) {
  StagingSlot slot;
  slot.ring_ = this;
  slot.index_ = index;
  slot.data_ = buffers_[index];
  slot.size_ = slot_bytes_;
  if (!fence.wait) return slot;
  absl::Status s = fence.wait();
  {
    absl::MutexLock l(&mu_);
    running_.erase(std::find(running_.begin(), running_.end(), fence.owner));
  }
  // A failing fence: the slot goes back without one (its destructor returns it).
  if (!s.ok()) return Annotate(s, absl::StrCat("waiting for the consumer of staging slot ", index));
  return slot;
}

absl::StatusOr<StagingSlot> StagingRing::Acquire() {
  std::pair<int, Fence> taken;
  {
    absl::MutexLock l(&mu_);
    mu_.Await(absl::Condition(
        +[](std::vector<int>* f) { return !f->empty(); }, &free_));
    taken = Take();
  }
  return Finish(taken.first, std::move(taken.second));
}

absl::StatusOr<StagingSlot> StagingRing::TryAcquire() {
  std::pair<int, Fence> taken;
  {
    absl::MutexLock l(&mu_);
    if (free_.empty()) return StagingSlot();
    taken = Take();
  }
  return Finish(taken.first, std::move(taken.second));
}

void StagingRing::Return(int index, Fence fence) noexcept {
  absl::MutexLock l(&mu_);
  fences_[index] = std::move(fence);
  free_.push_back(index);
  --in_use_;
}

int StagingRing::in_use() const {
  absl::MutexLock l(&mu_);
  return in_use_;
}

int StagingRing::peak_in_use() const {
  absl::MutexLock l(&mu_);
  return peak_in_use_;
}

absl::Status StagingRing::DrainFences() { return Drain(nullptr, /*all=*/true); }

absl::Status StagingRing::DrainFences(const void* owner) { return Drain(owner, /*all=*/false); }

absl::Status StagingRing::Drain(const void* owner, bool all) {
  std::vector<Fence> pending;
  {
    absl::MutexLock l(&mu_);
    for (Fence& f : fences_) {
      if (f.wait && (all || f.owner == owner)) pending.push_back(std::exchange(f, Fence{}));
    }
  }
  absl::Status first;
  for (Fence& f : pending) {
    absl::Status s = f.wait();
    if (first.ok() && !s.ok()) first = s;
  }
  // Fences that an Acquire on another thread took out before us.
  absl::MutexLock l(&mu_);
  struct Args {
    const std::vector<const void*>* running;
    const void* owner;
    bool all;
  } args{&running_, owner, all};
  mu_.Await(absl::Condition(
      +[](Args* a) {
        return a->all ? a->running->empty()
                      : std::find(a->running->begin(), a->running->end(), a->owner) ==
                            a->running->end();
      },
      &args));
  return first;
}

}  // namespace weightd
