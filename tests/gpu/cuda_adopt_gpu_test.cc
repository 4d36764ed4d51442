// CudaBackend::Adopt and Admit on a device (real, or the simulated driver): a second process
// adopts an exported arena by its device UUID and sees the bytes; a wrong size, an unknown UUID
// and a host memfd are refused naming the arena; admission refuses what does not fit before
// allocating; arenas keep their device's context alive after the backend is gone. Only the
// driver table is used (no cudart), and device memory is never touched from the host except by
// cuMemcpyDtoH / cuMemsetD8. Skips without a device.
#include <cuda.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "support/process.h"
#include "weightd/cuda_backend.h"
#include "weightd/detail/cuda_driver.h"

namespace weightd {
namespace {

using ::testing::HasSubstr;

constexpr char kFdEnv[] = "WD_ADOPT_TEST_FD";
constexpr char kBytesEnv[] = "WD_ADOPT_TEST_BYTES";
constexpr char kUuidEnv[] = "WD_ADOPT_TEST_UUID";
constexpr uint64_t kPatternBlock = 64 << 10;

const CudaDriver& Cu() { return **CudaDriver::Get(); }

// Byte value of block `i` of the test pattern (cuMemsetD8 per 64 KiB block: the driver table
// has no host-to-device copy to fill it byte by byte).
uint8_t PatternByte(uint64_t block) { return static_cast<uint8_t>(block * 37 + 11); }

// Runs `fn` with the arena's context current, restoring the test thread's context afterwards.
template <typename Fn>
CUresult InContext(const CudaArena& a, Fn fn) {
  CUcontext previous = nullptr;
  CUresult r = Cu().CtxGetCurrent(&previous);
  if (r != CUDA_SUCCESS) return r;
  r = Cu().CtxSetCurrent(static_cast<CUcontext>(a.context()));
  if (r != CUDA_SUCCESS) return r;
  r = fn();
  const CUresult restored = Cu().CtxSetCurrent(previous);
  return r != CUDA_SUCCESS ? r : restored;
}

CUresult FillPattern(const CudaArena& a, uint64_t bytes) {
  return InContext(a, [&] {
    for (uint64_t off = 0, i = 0; off < bytes; off += kPatternBlock, ++i) {
      const uint64_t n = std::min(kPatternBlock, bytes - off);
      const CUresult r = Cu().MemsetD8(a.device_ptr() + off, PatternByte(i), n);
      if (r != CUDA_SUCCESS) return r;
    }
    return Cu().CtxSynchronize();
  });
}

std::vector<uint8_t> ReadBack(const CudaArena& a, uint64_t bytes) {
  std::vector<uint8_t> out(bytes);
  EXPECT_EQ(InContext(a, [&] { return Cu().MemcpyDtoH(out.data(), a.device_ptr(), bytes); }),
            CUDA_SUCCESS);
  return out;
}

AdoptRequest Request(uint64_t bytes, std::string uuid, std::string label) {
  AdoptRequest r;
  r.bytes = bytes;
  r.kind = ArenaKind::kCudaVmm;
  r.device = 0;
  r.device_uuid = std::move(uuid);
  r.label = std::move(label);
  return r;
}

class CudaAdoptGpuTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!CudaDeviceAvailable()) {
      GTEST_SKIP() << "no CUDA device: " << CudaDriver::Get().status();
    }
    auto b = CudaBackend::Create();
    ASSERT_TRUE(b.ok()) << b.status();
    backend_ = std::move(*b);
  }

  // A sealed arena of `bytes` on device 0, filled with the pattern when `fill`.
  std::unique_ptr<Arena> Sealed(uint64_t bytes, const std::string& label, bool fill) {
    auto a = backend_->Allocate({bytes, 0, label});
    EXPECT_TRUE(a.ok()) << a.status();
    if (!a.ok()) return nullptr;
    if (fill) {
      EXPECT_EQ(FillPattern(static_cast<const CudaArena&>(**a), bytes), CUDA_SUCCESS);
    }
    EXPECT_TRUE((*a)->Seal().ok());
    return std::move(*a);
  }

  std::unique_ptr<CudaBackend> backend_;
};

TEST_F(CudaAdoptGpuTest, SecondProcessAdoptsAnExportedArenaByUuid) {
  const uint64_t n = (3 << 20) + 100;  // not a multiple of the granularity
  std::unique_ptr<Arena> a = Sealed(n, "demo/rank0", /*fill=*/true);
  ASSERT_NE(a, nullptr);
  auto fd = a->Export();
  ASSERT_TRUE(fd.ok()) << fd.status();
  ASSERT_EQ(::fcntl(fd->get(), F_SETFD, 0), 0);  // inherited by the child across exec
  ::setenv(kFdEnv, std::to_string(fd->get()).c_str(), 1);
  ::setenv(kBytesEnv, std::to_string(n).c_str(), 1);
  ::setenv(kUuidEnv, static_cast<const CudaArena&>(*a).device_uuid().c_str(), 1);
  const std::string log = ::testing::TempDir() + "/cuda_adopt_child.log";
  // A fresh process, as a successor daemon is: a forked child must not reuse our context.
  const pid_t pid =
      testing::Spawn({"/proc/self/exe", "--gtest_filter=CudaAdoptGpuTest.ChildAdopts"}, log, log);
  const int rc = testing::WaitFor(pid, std::chrono::seconds(60));
  ::unsetenv(kFdEnv);
  EXPECT_EQ(rc, 0) << testing::Slurp(log);
  EXPECT_THAT(testing::Slurp(log), HasSubstr("[       OK ] CudaAdoptGpuTest.ChildAdopts"));
}

// The successor's side: adopts the fd named in the environment. Skips as a normal test.
TEST_F(CudaAdoptGpuTest, ChildAdopts) {
  const char* fd_env = std::getenv(kFdEnv);
  if (fd_env == nullptr) GTEST_SKIP() << "only meaningful as the child of the adopt test";
  const uint64_t n = std::strtoull(std::getenv(kBytesEnv), nullptr, 10);
  const std::string uuid = std::getenv(kUuidEnv);
  UniqueFd fd(std::atoi(fd_env));
  struct stat before;
  ASSERT_EQ(::fstat(fd.get(), &before), 0);
  // A bogus ordinal: the UUID alone must find the device.
  AdoptRequest request = Request(n, uuid, "demo/rank0");
  request.device = 4242;
  auto adopted = backend_->Adopt(std::move(fd), request);
  ASSERT_TRUE(adopted.ok()) << adopted.status();
  const auto& ca = static_cast<const CudaArena&>(**adopted);
  EXPECT_EQ(ca.kind(), ArenaKind::kCudaVmm);
  EXPECT_EQ(ca.size(), n);
  EXPECT_EQ(ca.device_uuid(), uuid);
  EXPECT_GE(ca.device(), 0);
  EXPECT_LT(ca.device(), backend_->device_count());
  EXPECT_NE(ca.context(), nullptr);
  const std::vector<uint8_t> got = ReadBack(ca, n);
  for (uint64_t i = 0; i < n; ++i) {
    ASSERT_EQ(got[i], PatternByte(i / kPatternBlock)) << "byte " << i;
  }
  // Export() of an adopted arena is a dup of the fd it came from.
  auto again = ca.Export();
  ASSERT_TRUE(again.ok()) << again.status();
  struct stat after;
  ASSERT_EQ(::fstat(again->get(), &after), 0);
  EXPECT_EQ(after.st_ino, before.st_ino);
  EXPECT_EQ(after.st_dev, before.st_dev);
  // Mapped read-write: a live update may rewrite an adopted arena.
  EXPECT_EQ(InContext(ca, [&] { return Cu().MemsetD8(ca.device_ptr(), 0x5a, 4096); }),
            CUDA_SUCCESS);
  EXPECT_EQ(ReadBack(ca, 1)[0], 0x5a);
}

TEST_F(CudaAdoptGpuTest, LargerRecordedSizeIsRefusedAndNothingLeaks) {
  std::unique_ptr<Arena> a = Sealed(1 << 20, "small/rank0", /*fill=*/false);
  ASSERT_NE(a, nullptr);
  const std::string uuid = static_cast<const CudaArena&>(*a).device_uuid();
  auto fd = a->Export();
  ASSERT_TRUE(fd.ok()) << fd.status();
  auto wrong = backend_->Adopt(std::move(*fd), Request(1ull << 30, uuid, "small/rank0"));
  ASSERT_EQ(wrong.status().code(), absl::StatusCode::kFailedPrecondition) << wrong.status();
  EXPECT_THAT(std::string(wrong.status().message()), HasSubstr("arena small/rank0"));
  EXPECT_THAT(std::string(wrong.status().message()), HasSubstr("cannot be mapped"));
  // Nothing of the failed import stays mapped: the same allocation adopts at its real size.
  auto fd2 = a->Export();
  ASSERT_TRUE(fd2.ok()) << fd2.status();
  auto right = backend_->Adopt(std::move(*fd2), Request(1 << 20, uuid, "small/rank0"));
  EXPECT_TRUE(right.ok()) << right.status();
}

TEST_F(CudaAdoptGpuTest, UnknownUuidIsRefusedListingTheVisibleDevices) {
  std::unique_ptr<Arena> a = Sealed(1 << 20, "gone/rank1", /*fill=*/false);
  ASSERT_NE(a, nullptr);
  auto fd = a->Export();
  ASSERT_TRUE(fd.ok()) << fd.status();
  const std::string absent = "GPU-00000000-dead-beef-0000-000000000000";
  auto r = backend_->Adopt(std::move(*fd), Request(1 << 20, absent, "gone/rank1"));
  ASSERT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition) << r.status();
  const std::string m(r.status().message());
  EXPECT_THAT(m, HasSubstr("arena gone/rank1"));
  EXPECT_THAT(m, HasSubstr(absent));
  EXPECT_THAT(m, HasSubstr(static_cast<const CudaArena&>(*a).device_uuid()));
  EXPECT_THAT(m, HasSubstr("CUDA_VISIBLE_DEVICES"));
}

// Records of daemons that kept no UUID fall back to the ordinal.
TEST_F(CudaAdoptGpuTest, RecordWithoutUuidUsesTheOrdinal) {
  std::unique_ptr<Arena> a = Sealed(1 << 20, "old/rank0", /*fill=*/true);
  ASSERT_NE(a, nullptr);
  auto fd = a->Export();
  ASSERT_TRUE(fd.ok()) << fd.status();
  auto adopted = backend_->Adopt(std::move(*fd), Request(1 << 20, "", "old/rank0"));
  ASSERT_TRUE(adopted.ok()) << adopted.status();
  EXPECT_EQ((*adopted)->device(), 0);
  EXPECT_EQ(ReadBack(static_cast<const CudaArena&>(**adopted), 1)[0], PatternByte(0));
  auto fd2 = a->Export();
  ASSERT_TRUE(fd2.ok()) << fd2.status();
  AdoptRequest far = Request(1 << 20, "", "old/rank9");
  far.device = backend_->device_count();
  auto r = backend_->Adopt(std::move(*fd2), far);
  ASSERT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition) << r.status();
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("arena old/rank9"));
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("no device UUID"));
}

TEST_F(CudaAdoptGpuTest, HostMemfdIsRefusedNamingBothKinds) {
  auto memfd = MakeSealedMemfd("host-arena", std::string(4096, 'x'));
  ASSERT_TRUE(memfd.ok()) << memfd.status();
  // The record claims a device arena, but the fd is a sealed memfd.
  auto by_fd = backend_->Adopt(std::move(*memfd), Request(4096, "", "mixed/rank0"));
  ASSERT_EQ(by_fd.status().code(), absl::StatusCode::kFailedPrecondition) << by_fd.status();
  std::string m(by_fd.status().message());
  EXPECT_THAT(m, HasSubstr("arena mixed/rank0 is a host memfd"));
  EXPECT_THAT(m, HasSubstr("CUDA VMM device memory"));
  EXPECT_THAT(m, HasSubstr("--backend host"));
  // The record itself says host memfd.
  AdoptRequest host = Request(4096, "", "mixed/rank1");
  host.kind = ArenaKind::kHostMemfd;
  auto memfd2 = MakeSealedMemfd("host-arena", std::string(4096, 'x'));
  ASSERT_TRUE(memfd2.ok()) << memfd2.status();
  auto by_record = backend_->Adopt(std::move(*memfd2), host);
  ASSERT_EQ(by_record.status().code(), absl::StatusCode::kFailedPrecondition);
  m = std::string(by_record.status().message());
  EXPECT_THAT(m, HasSubstr("arena mixed/rank1 is a host memfd (according to its record)"));
  EXPECT_THAT(m, HasSubstr("backend 'cuda' keeps its arenas in CUDA VMM device memory"));
}

TEST_F(CudaAdoptGpuTest, ImportOfANonCudaFdIsRefused) {
  int p[2];
  ASSERT_EQ(::pipe2(p, O_CLOEXEC), 0);
  UniqueFd keep(p[1]);
  auto r = backend_->Adopt(UniqueFd(p[0]), Request(4096, "", "pipe/rank0"));
  ASSERT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition) << r.status();
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("arena pipe/rank0 cannot be imported"));
}

TEST_F(CudaAdoptGpuTest, AdmissionRefusesBeforeAllocating) {
  const ArenaRequest huge[] = {{1ull << 50, 0, "huge/rank0"}, {1 << 20, 0, "huge/rank1"}};
  const absl::Status s = backend_->Admit("huge", huge);
  ASSERT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("model 'huge'"));
  EXPECT_THAT(std::string(s.message()), HasSubstr("on device 0 (GPU-"));
  EXPECT_THAT(std::string(s.message()), HasSubstr("bytes are free"));
  const ArenaRequest small[] = {{1 << 20, 0, "small/rank0"}};
  EXPECT_TRUE(backend_->Admit("small", small).ok());
  const ArenaRequest nowhere[] = {{1 << 20, backend_->device_count(), "far/rank0"}};
  EXPECT_EQ(backend_->Admit("far", nowhere).code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(CudaAdoptGpuTest, AdmissionHonoursTheDeviceMemoryBudget) {
  auto b = CudaBackend::Create({.device_memory_budget = 8 << 20});
  ASSERT_TRUE(b.ok()) << b.status();
  auto held = (*b)->Allocate({4 << 20, 0, "held/rank0"});
  ASSERT_TRUE(held.ok()) << held.status();
  const ArenaRequest over[] = {{6 << 20, 0, "over/rank0"}};
  const absl::Status s = (*b)->Admit("over", over);
  ASSERT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("model 'over' needs"));
  EXPECT_THAT(std::string(s.message()), HasSubstr("device_memory_budget allows 8388608"));
  const ArenaRequest fits[] = {{2 << 20, 0, "fits/rank0"}};
  EXPECT_TRUE((*b)->Admit("fits", fits).ok());
  held->reset();  // its bytes no longer count
  EXPECT_TRUE((*b)->Admit("over", over).ok());
}

// Arenas share their device's retained context: one outlives the backend and stays usable, and
// backend calls leave the caller's (here: no) current context as it was.
TEST_F(CudaAdoptGpuTest, ArenaOutlivesBackendAndCallerContextIsKept) {
  ASSERT_EQ(Cu().CtxSetCurrent(nullptr), CUDA_SUCCESS);
  auto a = backend_->Allocate({(1 << 20) + 3, 0, "zeros/rank0"});
  ASSERT_TRUE(a.ok()) << a.status();
  CUcontext now = reinterpret_cast<CUcontext>(1);
  ASSERT_EQ(Cu().CtxGetCurrent(&now), CUDA_SUCCESS);
  EXPECT_EQ(now, nullptr);
  backend_.reset();
  const auto& ca = static_cast<const CudaArena&>(**a);
  const std::vector<uint8_t> got = ReadBack(ca, ca.size());
  for (uint64_t i = 0; i < got.size(); ++i) ASSERT_EQ(got[i], 0) << "byte " << i;  // zero-filled
  a->reset();
}

}  // namespace
}  // namespace weightd
