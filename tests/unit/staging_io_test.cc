// Staging ring, io_uring reader and page-cache residency (daemon/include/weightd/detail/).
#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "test_util.h"
#include "weightd/detail/page_cache.h"
#include "weightd/detail/staging_ring.h"
#include "weightd/detail/uring_reader.h"

namespace weightd {
namespace {

using ::testing::HasSubstr;

// Counts bytes outstanding (and the peak) and can fail the Nth allocation.
class CountingAllocator final : public StagingAllocator {
 public:
  absl::string_view name() const override { return "counting"; }
  absl::StatusOr<std::byte*> Allocate(uint64_t bytes) override {
    if (fail_at_ >= 0 && calls_++ == fail_at_) {
      return absl::ResourceExhaustedError("injected allocation failure");
    }
    absl::StatusOr<std::byte*> p = inner_.Allocate(bytes);
    if (p.ok()) {
      live_ += bytes;
      peak_ = std::max(peak_.load(), live_.load());
    }
    return p;
  }
  void Free(std::byte* p, uint64_t bytes) noexcept override {
    live_ -= bytes;
    inner_.Free(p, bytes);
  }
  int fail_at_ = -1;
  int calls_ = 0;
  std::atomic<uint64_t> live_{0}, peak_{0};

 private:
  PageAllocator inner_;
};

TEST(StagingRingTest, BudgetBoundsSlotsAndPeakBytes) {
  auto alloc = std::make_shared<CountingAllocator>();
  {
    auto ring = StagingRing::Create(alloc, {.budget = 10 << 20, .slot_bytes = 3 << 20});
    ASSERT_TRUE(ring.ok()) << ring.status();
    EXPECT_EQ((*ring)->slots(), 3);
    EXPECT_EQ((*ring)->allocated_bytes(), 9u << 20);
    std::vector<StagingSlot> held;
    for (int i = 0; i < 3; ++i) {
      auto s = (*ring)->Acquire();
      ASSERT_TRUE(s.ok());
      EXPECT_EQ(reinterpret_cast<uintptr_t>(s->data()) % 4096, 0u);
      std::memset(s->data(), i, s->size());  // the memory is really there
      held.push_back(std::move(*s));
    }
    EXPECT_EQ((*ring)->in_use(), 3);
    held.clear();
    EXPECT_EQ((*ring)->in_use(), 0);
    EXPECT_EQ((*ring)->peak_in_use(), 3);
  }
  EXPECT_LE(alloc->peak_.load(), 10u << 20);
  EXPECT_EQ(alloc->live_.load(), 0u);

  auto too_big = StagingRing::Create(alloc, {.budget = 1 << 20, .slot_bytes = 2 << 20});
  EXPECT_EQ(too_big.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(too_big.status().message()), HasSubstr("exceeds the pinned budget"));
}

TEST(StagingRingTest, AllocationFailureReleasesEverything) {
  auto alloc = std::make_shared<CountingAllocator>();
  alloc->fail_at_ = 2;
  auto ring = StagingRing::Create(alloc, {.budget = 8 << 20, .slot_bytes = 1 << 20});
  EXPECT_EQ(ring.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(ring.status().message()), HasSubstr("staging slot 2 of 8"));
  EXPECT_EQ(alloc->live_.load(), 0u);
}

TEST(StagingRingTest, AcquireWaitsForReleaseAndRunsFence) {
  auto ring = *StagingRing::Create(std::make_shared<PageAllocator>(),
                                   {.budget = 1 << 20, .slot_bytes = 1 << 20});
  ASSERT_EQ(ring->slots(), 1);
  std::atomic<int> fences{0};
  auto first = ring->Acquire();
  ASSERT_TRUE(first.ok());
  first->SetFence([&] {
    ++fences;
    return absl::OkStatus();
  });
  std::atomic<bool> got{false};
  std::thread t([&] {
    auto s = ring->Acquire();
    EXPECT_TRUE(s.ok());
    got = true;
  });
  absl::SleepFor(absl::Milliseconds(50));
  EXPECT_FALSE(got.load());  // the only slot is held
  EXPECT_EQ(fences.load(), 0);
  first->Release();
  t.join();
  EXPECT_TRUE(got.load());
  EXPECT_EQ(fences.load(), 1);  // the consumer's wait ran before reuse, once
  auto again = ring->Acquire();
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(fences.load(), 1);
}

TEST(StagingRingTest, FailingFenceAndErrorPathsLeakNoSlot) {
  auto ring = *StagingRing::Create(std::make_shared<PageAllocator>(),
                                   {.budget = 2 << 20, .slot_bytes = 1 << 20});
  {
    auto s = ring->Acquire();
    ASSERT_TRUE(s.ok());
    s->SetFence([] { return absl::InternalError("DMA failed: illegal address"); });
  }
  auto use = [&]() -> absl::Status {
    auto a = ring->Acquire();
    if (!a.ok()) return a.status();
    auto b = ring->Acquire();
    if (!b.ok()) return b.status();
    return absl::OkStatus();
  };
  absl::Status s = use();
  EXPECT_EQ(s.code(), absl::StatusCode::kInternal);
  EXPECT_THAT(std::string(s.message()), HasSubstr("illegal address"));
  EXPECT_THAT(std::string(s.message()), HasSubstr("consumer of staging slot"));
  EXPECT_EQ(ring->in_use(), 0);
  EXPECT_TRUE(use().ok());  // the failed fence is consumed; both slots usable again
  EXPECT_EQ(ring->in_use(), 0);
}

// A ring shared by several consumers: one consumer's DrainFences(owner) runs exactly its own
// pending fences, and also waits for one of them that another thread's Acquire is running.
TEST(StagingRingTest, DrainFencesOfOneOwnerLeavesTheOthers) {
  auto ring = *StagingRing::Create(std::make_shared<PageAllocator>(),
                                   {.budget = 3 << 20, .slot_bytes = 1 << 20});
  ASSERT_EQ(ring->slots(), 3);
  int a_owner = 0, b_owner = 0;
  std::atomic<int> a_runs{0}, b_runs{0};
  {
    auto s1 = ring->Acquire();
    auto s2 = ring->Acquire();
    auto s3 = ring->Acquire();
    ASSERT_TRUE(s1.ok() && s2.ok() && s3.ok());
    s1->SetFence([&] { return ++a_runs, absl::OkStatus(); }, &a_owner);
    s2->SetFence([&] { return ++a_runs, absl::OkStatus(); }, &a_owner);
    s3->SetFence([&] { return ++b_runs, absl::OkStatus(); }, &b_owner);
  }
  ASSERT_TRUE(ring->DrainFences(&a_owner).ok());
  EXPECT_EQ(a_runs.load(), 2);
  EXPECT_EQ(b_runs.load(), 0);
  ASSERT_TRUE(ring->DrainFences(&a_owner).ok());  // nothing of a is left to run
  EXPECT_EQ(a_runs.load(), 2);

  // A fence of a that is running inside another thread's Acquire: DrainFences(a) returns only
  // after it finished.
  absl::Notification running, release;
  std::atomic<bool> fence_done{false};
  {
    StagingRing& r = *ring;
    std::vector<StagingSlot> all;
    for (int i = 0; i < 3; ++i) all.push_back(*r.Acquire());  // runs b's fence
    EXPECT_EQ(b_runs.load(), 1);
    // Slot 0 goes back last, so it is the next one handed out.
    all[1].Release();
    all[2].Release();
    all[0].SetFence(
        [&] {
          running.Notify();
          release.WaitForNotification();
          fence_done = true;
          return absl::OkStatus();
        },
        &a_owner);
    all[0].Release();
  }
  std::thread acquirer([&] { EXPECT_TRUE(ring->Acquire().ok()); });
  running.WaitForNotification();
  std::atomic<bool> drained{false};
  std::thread drainer([&] {
    EXPECT_TRUE(ring->DrainFences(&a_owner).ok());
    drained = true;
  });
  absl::SleepFor(absl::Milliseconds(50));
  EXPECT_FALSE(drained.load()) << "DrainFences returned while the owner's fence still ran";
  release.Notify();
  drainer.join();
  acquirer.join();
  EXPECT_TRUE(fence_done.load());
  EXPECT_TRUE(drained.load());
}

TEST(StagingRingTest, TryAcquireNeverWaits) {
  auto ring = *StagingRing::Create(std::make_shared<PageAllocator>(),
                                   {.budget = 1 << 20, .slot_bytes = 1 << 20});
  auto held = ring->TryAcquire();
  ASSERT_TRUE(held.ok());
  EXPECT_TRUE(static_cast<bool>(*held));
  auto none = ring->TryAcquire();
  ASSERT_TRUE(none.ok());
  EXPECT_FALSE(static_cast<bool>(*none)) << "a second slot from a ring of one";
  held->Release();
  auto again = ring->TryAcquire();
  ASSERT_TRUE(again.ok());
  EXPECT_TRUE(static_cast<bool>(*again));
}

// A file of random bytes, read back through random extents.
class UringReaderTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    const std::string base = GetParam();
    if (::access(base.c_str(), W_OK) != 0) GTEST_SKIP() << base << " is not writable here";
    tmpl_ = base + "/weightd_uring_XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl_.data()), nullptr);
    data_.resize((5 << 20) + 1234);
    std::mt19937_64 rng(42);
    for (auto& c : data_) c = static_cast<char>(rng());
    path_ = tmpl_ + "/data.bin";
    FILE* f = std::fopen(path_.c_str(), "wb");
    ASSERT_NE(f, nullptr);
    ASSERT_EQ(std::fwrite(data_.data(), 1, data_.size(), f), data_.size());
    std::fclose(f);
    ring_ = *StagingRing::Create(std::make_shared<PageAllocator>(),
                                 {.budget = 8 << 20, .slot_bytes = 2 << 20});
  }
  void TearDown() override {
    if (!path_.empty()) ::unlink(path_.c_str());
    if (!tmpl_.empty()) ::rmdir(tmpl_.c_str());
  }

  // Reads `n` random extents (up to 1.5 MiB) and compares every byte.
  void ReadRandom(UringReader& r, ReadFile& f, int n, uint64_t seed) {
    std::mt19937_64 rng(seed);
    for (int i = 0; i < n; ++i) {
      const uint64_t len = rng() % (3 << 19);
      const uint64_t off = rng() % (data_.size() - len + 1);
      auto slot = ring_->Acquire();
      ASSERT_TRUE(slot.ok());
      auto got = r.ReadExtent(f, off, len, slot->data(), slot->size());
      ASSERT_TRUE(got.ok()) << got.status() << " off " << off << " len " << len;
      ASSERT_EQ(got->size(), len);
      ASSERT_EQ(std::memcmp(got->data(), data_.data() + off, len), 0)
          << "off " << off << " len " << len;
    }
    // The extent that ends exactly at end of file (aligned read past EOF).
    auto slot = ring_->Acquire();
    auto got = r.ReadExtent(f, data_.size() - 5000, 5000, slot->data(), slot->size());
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(std::memcmp(got->data(), data_.data() + data_.size() - 5000, 5000), 0);
  }

  std::string tmpl_, path_;
  std::string data_;
  std::unique_ptr<StagingRing> ring_;
};

TEST_P(UringReaderTest, RandomExtentsExactBytes) {
  auto f = ReadFile::Open(path_, true);
  ASSERT_TRUE(f.ok()) << f.status();
  RecordProperty("direct", (*f)->direct() ? "yes" : "no");
  auto r = UringReader::Create({.queue_depth = 64, .request_bytes = 256 << 10});
  ASSERT_TRUE(r.ok()) << r.status();
  ReadRandom(**r, **f, 200, 1);
  EXPECT_GT((*r)->stats().requests, 200u);
  EXPECT_LE((*r)->stats().peak_in_flight, 64u);
  EXPECT_EQ(ring_->in_use(), 0);
}

TEST_P(UringReaderTest, CapOnRequestsInFlight) {
  auto f = *ReadFile::Open(path_, true);
  auto r = *UringReader::Create({.queue_depth = 32, .max_in_flight = 4, .request_bytes = 4096});
  auto slot = *ring_->Acquire();
  auto got = r->ReadExtent(*f, 4096, 1 << 20, slot.data(), slot.size());
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(std::memcmp(got->data(), data_.data() + 4096, 1 << 20), 0);
  EXPECT_GE(r->stats().requests, 256u);
  EXPECT_LE(r->stats().peak_in_flight, 4u);
}

TEST_P(UringReaderTest, ShortReadsAreRequeued) {
  auto f = *ReadFile::Open(path_, true);
  std::atomic<int> calls{0};
  // Every completion delivers a third of what it read: unaligned for buffered reads; for
  // O_DIRECT (which stops short only on block boundaries, or at end of file) a whole number of
  // blocks, at least one.
  const bool direct = f->direct();
  auto hook = [&, direct](uint64_t, uint32_t, int res) {
    ++calls;
    if (res <= 3) return res;
    if (!direct) return res / 3;
    if (res <= 4096) return res;
    return std::max(4096, res / 3 / 4096 * 4096);
  };
  auto r = *UringReader::Create({.queue_depth = 16, .request_bytes = 64 << 10, .fault_hook = hook});
  ReadRandom(*r, *f, 40, 2);
  EXPECT_GT(r->stats().short_reads, 40u);
  EXPECT_GT(calls.load(), 0);
}

TEST_P(UringReaderTest, EagainAndEintrAreRetried) {
  auto f = *ReadFile::Open(path_, true);
  std::atomic<int> n{0};
  auto hook = [&](uint64_t, uint32_t, int res) {
    const int k = n++;
    if (k % 3 == 0) return -EAGAIN;
    if (k % 5 == 0) return -EINTR;
    return res;
  };
  auto r =
      *UringReader::Create({.queue_depth = 16, .request_bytes = 128 << 10, .fault_hook = hook});
  ReadRandom(*r, *f, 40, 3);
  EXPECT_GT(r->stats().retries, 10u);
}

TEST_P(UringReaderTest, IoErrorNamesFileAndOffsetAndReaderStaysUsable) {
  auto f = *ReadFile::Open(path_, true);
  std::atomic<bool> fail{true};
  auto hook = [&](uint64_t off, uint32_t, int res) {
    return fail.load() && off >= (1 << 20) ? -EIO : res;
  };
  auto r = *UringReader::Create({.queue_depth = 8, .request_bytes = 64 << 10, .fault_hook = hook});
  auto slot = *ring_->Acquire();
  auto got = r->ReadExtent(*f, 0, 2 << 20, slot.data(), slot.size());
  ASSERT_FALSE(got.ok());
  EXPECT_FALSE(got.ok());
  EXPECT_THAT(std::string(got.status().message()), HasSubstr("data.bin"));
  EXPECT_THAT(std::string(got.status().message()), HasSubstr("at offset 1048576"));
  EXPECT_THAT(std::string(got.status().message()), HasSubstr("Input/output error"));
  fail = false;
  got = r->ReadExtent(*f, 0, 2 << 20, slot.data(), slot.size());
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(std::memcmp(got->data(), data_.data(), 2 << 20), 0);
}

TEST_P(UringReaderTest, TruncatedFileIsDataLoss) {
  auto f = *ReadFile::Open(path_, true);
  auto r = *UringReader::Create({});
  ASSERT_EQ(::truncate(path_.c_str(), 3 << 20), 0);
  auto slot = *ring_->Acquire();
  auto got = r->ReadExtent(*f, (3 << 20) - 100000, 200000, slot.data(), slot.size());
  ASSERT_FALSE(got.ok());
  EXPECT_EQ(got.status().code(), absl::StatusCode::kDataLoss) << got.status();
  EXPECT_THAT(std::string(got.status().message()), HasSubstr("data.bin"));
  EXPECT_THAT(std::string(got.status().message()), HasSubstr("ends at byte 3145728"));
  EXPECT_THAT(std::string(got.status().message()), HasSubstr("100000 more bytes"));
  EXPECT_THAT(std::string(got.status().message()), HasSubstr("at offset 3045728"));
  // Unaligned end of file in the middle of a block.
  ASSERT_EQ(::truncate(path_.c_str(), (3 << 20) - 777), 0);
  got = r->ReadExtent(*f, (3 << 20) - 5000, 4900, slot.data(), slot.size());
  ASSERT_FALSE(got.ok());
  EXPECT_EQ(got.status().code(), absl::StatusCode::kDataLoss) << got.status();
  EXPECT_THAT(std::string(got.status().message()), HasSubstr("ends at byte 3144951"));
  slot.Release();
  EXPECT_EQ(ring_->in_use(), 0);
}

TEST_P(UringReaderTest, BadBufferIsInvalidArgument) {
  auto f = *ReadFile::Open(path_, true);
  auto r = *UringReader::Create({});
  auto slot = *ring_->Acquire();
  auto got = r->ReadExtent(*f, 100, 1000, slot.data() + 1, slot.size() - 1);
  EXPECT_EQ(got.status().code(), absl::StatusCode::kInvalidArgument);
  got = r->ReadExtent(*f, 100, slot.size(), slot.data(), slot.size());
  EXPECT_EQ(got.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(got.status().message()), HasSubstr("cannot hold the aligned read"));
}

TEST_P(UringReaderTest, DirectReadRefusedFallsBackToBuffered) {
  auto f = *ReadFile::Open(path_, true);
  if (!f->direct()) GTEST_SKIP() << GetParam() << " refuses O_DIRECT at open already";
  std::atomic<bool> once{true};
  auto hook = [&](uint64_t, uint32_t, int res) { return once.exchange(false) ? -EINVAL : res; };
  auto r = *UringReader::Create({.queue_depth = 8, .request_bytes = 64 << 10, .fault_hook = hook});
  ReadRandom(*r, *f, 10, 4);
  EXPECT_FALSE(f->direct());
  EXPECT_EQ(r->stats().direct_fallbacks, 1u);
}

TEST_P(UringReaderTest, DirectIoAvailability) {
  auto f = *ReadFile::Open(path_, true);
  // tmpfs refuses O_DIRECT at open (EINVAL) on kernels before 6.6; ext4 accepts it.
  RecordProperty("direct", f->direct() ? "yes" : "no");
  auto buffered = *ReadFile::Open(path_, false);
  EXPECT_FALSE(buffered->direct());
}

INSTANTIATE_TEST_SUITE_P(Filesystems, UringReaderTest,
                         ::testing::Values(std::string("/tmp"), std::string("/dev/shm")),
                         [](const auto& info) { return info.index == 0 ? "tmp" : "devshm"; });

TEST(PageCacheTest, FreshFileIsCachedAndDropMakesItCold) {
  weightd::testing::TempDir dir;
  const std::string path = dir.Write("cached.bin", std::string(8 << 20, 'x'));
  {
    UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
    auto f = ResidentFraction(fd.get(), 4096 + 17, 4 << 20, path);
    ASSERT_TRUE(f.ok()) << f.status();
    EXPECT_GE(*f, 0.99);
    EXPECT_EQ(*ResidentFraction(fd.get(), 0, 0, path), 1.0);
  }
  ASSERT_TRUE(DropFileFromPageCache(path).ok());
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  auto f = ResidentFraction(fd.get(), 0, 8 << 20, path);
  ASSERT_TRUE(f.ok()) << f.status();
  if (*f > 0.5) {
    GTEST_SKIP() << "posix_fadvise(DONTNEED) left " << *f * 100
                 << "% of the file resident on this filesystem";
  }
  EXPECT_LT(*f, kCachedThreshold);
  // Reading it back brings it in again.
  std::string back(8 << 20, '\0');
  ASSERT_EQ(::pread(fd.get(), back.data(), back.size(), 0), static_cast<ssize_t>(back.size()));
  EXPECT_GE(*ResidentFraction(fd.get(), 0, 8 << 20, path), 0.99);
}

TEST(PageCacheTest, MincoreErrorIsReported) {
  auto f = ResidentFraction(-1, 0, 4096, "nothing");
  EXPECT_FALSE(f.ok());
  EXPECT_THAT(std::string(f.status().message()), HasSubstr("nothing"));
}

}  // namespace
}  // namespace weightd
