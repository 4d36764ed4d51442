// CudaBackend (VMM arenas exported as fds) on a real device: export to a second process that maps
// the memory PROT_READ and sees the bytes, a write through that mapping fails, OOM names the
// arena and the free bytes, and MakeBackend("cuda") works. Skips without a device.
#include <cuda.h>
#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "weightd/cuda_backend.h"
#include "weightd/detail/cuda_driver.h"
#include "weightd/detail/cuda_resources.h"

namespace weightd {
namespace {

using ::testing::HasSubstr;

class CudaBackendGpuTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!CudaDeviceAvailable()) {
      GTEST_SKIP() << "no CUDA device: " << CudaDriver::Get().status();
    }
    auto b = CudaBackend::Create();
    ASSERT_TRUE(b.ok()) << b.status();
    backend_ = std::move(*b);
    cu_ = *CudaDriver::Get();
    auto ctx = CudaPrimaryContext::Retain(*cu_, 0);
    ASSERT_TRUE(ctx.ok()) << ctx.status();
    ctx_ = std::move(*ctx);
    guard_ = std::make_unique<CudaContextGuard>(*cu_);
    ASSERT_TRUE(guard_->Use(ctx_.get()).ok());
  }
  void TearDown() override { guard_.reset(); }

  std::unique_ptr<CudaBackend> backend_;
  // Device 0's primary context, current on the test's thread: the driver calls below need one.
  const CudaDriver* cu_ = nullptr;
  CudaPrimaryContext ctx_;
  std::unique_ptr<CudaContextGuard> guard_;
};

TEST_F(CudaBackendGpuTest, ExportedArenaReadableAndReadOnlyInAnotherProcess) {
  const uint64_t n = (3 << 20) + 100;  // not a multiple of the 2 MiB granularity
  auto a = backend_->Allocate({n, 0, "test/rank0"});
  ASSERT_TRUE(a.ok()) << a.status();
  auto* ca = static_cast<CudaArena*>(a->get());
  EXPECT_EQ(ca->kind(), ArenaKind::kCudaVmm);
  EXPECT_TRUE(ca->writable().empty());
  EXPECT_THAT(ca->device_uuid(), ::testing::StartsWith("GPU-"));
  std::vector<uint8_t> pattern(n);
  for (uint64_t i = 0; i < n; ++i) pattern[i] = static_cast<uint8_t>(i * 131 + 7);
  ASSERT_EQ(cu_->MemcpyHtoD(ca->device_ptr(), pattern.data(), n), CUDA_SUCCESS);
  EXPECT_EQ(ca->Export().status().code(), absl::StatusCode::kFailedPrecondition);
  ASSERT_TRUE(ca->Seal().ok());
  auto fd = ca->Export();
  ASSERT_TRUE(fd.ok()) << fd.status();
  const int raw = fd->get();
  ASSERT_EQ(::fcntl(raw, F_SETFD, 0), 0);  // inherited by the child across exec
  ::setenv("WD_TEST_FD", std::to_string(raw).c_str(), 1);
  ::setenv("WD_TEST_BYTES", std::to_string(n).c_str(), 1);
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    // A fresh CUDA user: the child must not reuse the parent's context after fork.
    ::execl("/proc/self/exe", "/proc/self/exe", "--gtest_filter=CudaBackendGpuTest.ChildImport",
            nullptr);
    ::_exit(99);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ::unsetenv("WD_TEST_FD");
  // The child re-ran this binary's ChildImport test with the fd number and size set above.
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "child status " << status;
}

// Imports an fd passed in WD_TEST_FD (inherited across exec) and checks PROT_READ mapping and
// that a memset through it fails. Runs as a normal test too, where it skips.
TEST_F(CudaBackendGpuTest, ChildImport) {
  const char* fd_env = std::getenv("WD_TEST_FD");
  if (fd_env == nullptr) GTEST_SKIP() << "only meaningful as the child of the export test";
  const int fd = std::atoi(fd_env);
  const uint64_t n = std::strtoull(std::getenv("WD_TEST_BYTES"), nullptr, 10);
  const CudaDriver& cu = *cu_;
  CUmemGenericAllocationHandle h;
  ASSERT_EQ(cu.MemImportFromShareableHandle(&h, reinterpret_cast<void*>(static_cast<intptr_t>(fd)),
                                            CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR),
            CUDA_SUCCESS);
  const uint64_t size = (n + (2 << 20) - 1) / (2 << 20) * (2 << 20);
  CUdeviceptr va;
  ASSERT_EQ(cu.MemAddressReserve(&va, size, 0, 0, 0), CUDA_SUCCESS);
  ASSERT_EQ(cu.MemMap(va, size, 0, h, 0), CUDA_SUCCESS);
  CUmemAccessDesc acc{};
  acc.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  acc.location.id = 0;
  acc.flags = CU_MEM_ACCESS_FLAGS_PROT_READ;
  ASSERT_EQ(cu.MemSetAccess(va, size, &acc, 1), CUDA_SUCCESS);
  std::vector<uint8_t> got(n);
  ASSERT_EQ(cu.MemcpyDtoH(got.data(), va, n), CUDA_SUCCESS);
  for (uint64_t i = 0; i < n; ++i) ASSERT_EQ(got[i], static_cast<uint8_t>(i * 131 + 7)) << i;
  EXPECT_NE(cu.MemsetD8(va, 0, 4096), CUDA_SUCCESS);
}

TEST_F(CudaBackendGpuTest, OutOfMemoryNamesArenaAndFreeBytes) {
  auto a = backend_->Allocate({1ull << 50, 0, "huge/rank3"});
  ASSERT_FALSE(a.ok());
  EXPECT_EQ(a.status().code(), absl::StatusCode::kResourceExhausted) << a.status();
  EXPECT_THAT(std::string(a.status().message()), HasSubstr("huge/rank3"));
  EXPECT_THAT(std::string(a.status().message()), HasSubstr("bytes free"));
  // Nothing leaked: a normal allocation still works.
  EXPECT_TRUE(backend_->Allocate({1 << 20, 0, "small/rank0"}).ok());
}

TEST_F(CudaBackendGpuTest, MakeBackendCuda) {
  auto b = MakeBackend("cuda");
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ((*b)->name(), "cuda");
  EXPECT_EQ(backend_->Allocate({1, 7777, "x/rank0"}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace weightd
