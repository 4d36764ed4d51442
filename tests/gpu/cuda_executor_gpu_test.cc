// ExecutePlanCuda on a real device: a small Llama checkpoint with random bytes, loaded at T=1 and
// T=2, as stored and cast to fp32, chunked small enough that sources span several units, from the
// load's own pinned ring and from a daemon's shared one (CudaStaging), read with pread and with
// io_uring, gives exactly the bytes of ExecutePlanHost (the executor `weightctl shard` shares),
// and a CRC32C for every target equal to the CRC32C of those bytes. Skips without a device.
// Device memory is written and read back with driver copies only, never dereferenced from the
// host.
#include <cuda.h>
#include <fcntl.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "support/synthetic_checkpoint.h"
#include "weightd/checkpoint.h"
#include "weightd/crc32c.h"
#include "weightd/cuda_backend.h"
#include "weightd/detail/cuda_driver.h"
#include "weightd/detail/cuda_resources.h"
#include "weightd/detail/staging_ring.h"
#include "weightd/detail/uring_reader.h"
#include "weightd/executor.h"
#include "weightd/host_backend.h"
#include "weightd/plan.h"

namespace weightd {
namespace {

// Overwrites the data section of every safetensors file in `dir` with pseudo-random bytes.
void Randomize(const std::filesystem::path& dir) {
  std::mt19937_64 rng(42);
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    if (e.path().extension() != ".safetensors") continue;
    const int fd = ::open(e.path().c_str(), O_RDWR | O_CLOEXEC);
    ASSERT_GE(fd, 0);
    uint64_t header = 0;
    ASSERT_EQ(::pread(fd, &header, 8, 0), 8);
    const uint64_t begin = 8 + header;
    const uint64_t size = std::filesystem::file_size(e.path());
    std::vector<uint64_t> buf((size - begin + 7) / 8);
    for (uint64_t& x : buf) x = rng();
    ASSERT_EQ(::pwrite(fd, buf.data(), size - begin, static_cast<off_t>(begin)),
              static_cast<ssize_t>(size - begin));
    ::close(fd);
  }
}

TEST(CudaExecutorGpuTest, MatchesHostExecutorAtT1AndT2WithAndWithoutCast) {
  if (!CudaDeviceAvailable()) GTEST_SKIP() << "no CUDA device: " << CudaDriver::Get().status();
  auto cuda = CudaBackend::Create();
  ASSERT_TRUE(cuda.ok()) << cuda.status();
  const CudaDriver& cu = **CudaDriver::Get();
  auto ctx = CudaPrimaryContext::Retain(cu, 0);
  ASSERT_TRUE(ctx.ok()) << ctx.status();
  CudaContextGuard guard(cu);
  ASSERT_TRUE(guard.Use(ctx->get()).ok());
  HostBackend host;
  const std::filesystem::path dir =
      std::filesystem::temp_directory_path() / ("wd_cuda_exec_" + std::to_string(::getpid()));
  ASSERT_TRUE(testing::WriteSyntheticCheckpoint(dir.string(),
                                                testing::LlamaTensors(256, 4, 2, 64, 512, 1000, 2),
                                                2, testing::LlamaConfig(256, 4, 2, 512, 1000, 2)));
  Randomize(dir);
  auto ckpt = Checkpoint::Open(dir.string());
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  // A shared ring of 1 MiB over 3 workers: slots of 144 KiB, smaller than the embedding, so
  // sources are cut to the slot.
  auto shared = CreateCudaStaging(1 << 20, 3, 0);
  ASSERT_TRUE(shared.ok()) << shared.status();
  const bool have_uring = UringReader::Create({}).ok();
  for (int variant = 0; variant < 8; ++variant) {
    const int tp = variant & 1 ? 2 : 1;
    const bool fp32 = variant & 2;
    const bool use_shared = variant & 4;
    const IoMode mode = variant % 3 == 0 ? IoMode::kUring : IoMode::kPread;
    {
      SCOPED_TRACE(absl::StrCat("tp ", tp, fp32 ? " fp32" : " as stored",
                                use_shared ? " shared ring " : " own ring ", IoModeName(mode)));
      PlanOptions opts;
      opts.tp = tp;
      if (fp32) opts.dtype = DType::kF32;
      auto plan = BuildPlan(*ckpt, opts);
      ASSERT_TRUE(plan.ok()) << plan.status();
      ExecutorOptions eo;
      eo.threads = 3;
      eo.chunk_bytes = 64 << 10;
      eo.io_mode = mode;
      if (use_shared) eo.staging = shared->get();
      std::vector<std::unique_ptr<Arena>> h, d;
      std::vector<Arena*> hr, dr;
      for (const RankPlan& r : plan->ranks) {
        auto ha = host.Allocate({r.arena_bytes, -1, "host"});
        auto da = (*cuda)->Allocate({r.arena_bytes, 0, "cuda"});
        ASSERT_TRUE(ha.ok() && da.ok()) << ha.status() << da.status();
        // Zero-fills must really write: start from garbage on the device.
        ASSERT_EQ(
            cu.MemsetD8(static_cast<CudaArena*>(da->get())->device_ptr(), 0xEE, r.arena_bytes),
            CUDA_SUCCESS);
        hr.push_back(ha->get());
        dr.push_back(da->get());
        h.push_back(std::move(*ha));
        d.push_back(std::move(*da));
      }
      // The memsets ran on the legacy stream, which the executor's non-blocking streams do not
      // wait for.
      ASSERT_EQ(cu.CtxSynchronize(), CUDA_SUCCESS);
      LoadProgress hp, dp;
      TargetChecksums hc, dc;
      ASSERT_TRUE(ExecutePlanHost(*plan, hr, eo, &hp, &hc).ok());
      const absl::Status s = ExecutePlanCuda(*plan, dr, eo, &dp, &dc);
      ASSERT_TRUE(s.ok()) << s;
      EXPECT_EQ(dp.bytes_done.load(), dp.bytes_total.load());
      EXPECT_EQ(dp.bytes_uring.load() + dp.bytes_pread.load(), dp.bytes_total.load());
      if (mode == IoMode::kUring && have_uring) {
        EXPECT_GT(dp.bytes_uring.load(), 0u) << "io_uring did not feed the CUDA path";
      }
      if (mode == IoMode::kPread) {
        EXPECT_EQ(dp.bytes_uring.load(), 0u);
      }
      if (use_shared) {
        EXPECT_EQ((*shared)->ring().in_use(), 0) << "the load kept a shared slot";
      }
      for (size_t r = 0; r < plan->ranks.size(); ++r) {
        std::vector<std::byte> got(plan->ranks[r].arena_bytes);
        ASSERT_EQ(
            cu.MemcpyDtoH(got.data(), static_cast<CudaArena*>(dr[r])->device_ptr(), got.size()),
            CUDA_SUCCESS);
        const std::byte* want = hr[r]->writable().data();
        for (size_t t = 0; t < plan->ranks[r].targets.size(); ++t) {
          const PlanTarget& pt = plan->ranks[r].targets[t];
          EXPECT_EQ(std::memcmp(got.data() + pt.offset, want + pt.offset, pt.nbytes), 0)
              << "rank " << r << " target " << pt.name;
          EXPECT_EQ(dc.crc[r][t], Crc32c(want + pt.offset, pt.nbytes)) << pt.name;
        }
      }
    }
  }
  std::filesystem::remove_all(dir);
}

// With the daemon's ring, units are cut to a slot; a tensor whose rows are wider than a slot
// cannot be, and its load fails naming it and the flag to raise, before any DMA.
TEST(CudaExecutorGpuTest, RowsWiderThanASharedSlotAreRefusedNamingTheTensor) {
  if (!CudaDeviceAvailable()) GTEST_SKIP() << "no CUDA device: " << CudaDriver::Get().status();
  auto cuda = CudaBackend::Create();
  ASSERT_TRUE(cuda.ok()) << cuda.status();
  // 1 MiB over 16 workers: the smallest slot, 64 KiB.
  auto shared = CreateCudaStaging(1 << 20, 16, 0);
  ASSERT_TRUE(shared.ok()) << shared.status();
  ASSERT_EQ((*shared)->ring().slot_bytes(), 64u << 10);
  const std::filesystem::path dir =
      std::filesystem::temp_directory_path() / ("wd_cuda_wide_" + std::to_string(::getpid()));
  // Rows of 80,000 bytes: a unit holds whole rows.
  ASSERT_TRUE(testing::WriteSyntheticCheckpoint(
      dir.string(), {{"small.weight", "BF16", {4, 64}}, {"wide.weight", "BF16", {2, 40000}}}, 1,
      "{}"));
  auto ckpt = Checkpoint::Open(dir.string());
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  PlanOptions opts;
  opts.recipe_name = "hf";
  auto plan = BuildPlan(*ckpt, opts);
  ASSERT_TRUE(plan.ok()) << plan.status();
  auto arena = (*cuda)->Allocate({plan->ranks[0].arena_bytes, 0, "wide"});
  ASSERT_TRUE(arena.ok()) << arena.status();
  std::vector<Arena*> dr = {arena->get()};
  ExecutorOptions eo;
  eo.threads = 2;
  eo.staging = shared->get();
  LoadProgress p;
  const absl::Status s = ExecutePlanCuda(*plan, dr, eo, &p, nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
  EXPECT_THAT(std::string(s.message()), ::testing::HasSubstr("wide.weight"));
  EXPECT_THAT(std::string(s.message()), ::testing::HasSubstr("--pinned-budget"));
  EXPECT_EQ(p.bytes_done.load(), 0u);
  EXPECT_EQ((*shared)->ring().in_use(), 0);
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace weightd
