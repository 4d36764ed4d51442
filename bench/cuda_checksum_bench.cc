// The cost of the CUDA executor's checksums: ExecutePlanCuda of a Llama-shaped checkpoint cast
// to fp32 (so no target is a verbatim copy and every CRC32C comes from the read-back), timed with
// and without checksums, at 1 and 4 workers. The difference is the read-back's cost. Median of 5
// runs each, after one warm-up; the checkpoint is in the page cache. For comparison, the serial
// read-back the executor used before (one 64 MiB pinned buffer, a synchronous D2H then a CRC32C
// of each piece in turn, one thread) is timed over the same targets.
//
//   cuda_checksum_bench [MiB]        (default 256; device 0 of the driver weightd would load)
//
// On the simulated driver (WEIGHTD_CUDA_DRIVER=.../libwdsim_cuda.so WDSIM_DEVICES=1x8GiB) copies
// are memcpy, so the figures show the read-back's parallelism and overlap, not PCIe; they are no
// GPU result.
#include <cuda.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "support/synthetic_checkpoint.h"
#include "weightd/checkpoint.h"
#include "weightd/crc32c.h"
#include "weightd/cuda_backend.h"
#include "weightd/detail/cuda_driver.h"
#include "weightd/detail/cuda_resources.h"
#include "weightd/executor.h"
#include "weightd/plan.h"

namespace weightd {
namespace {

int Run(int argc, char** argv) {
  const int64_t mib = argc > 1 ? std::atoll(argv[1]) : 256;
  auto cuda = CudaBackend::Create();
  if (!cuda.ok()) {
    std::fprintf(stderr, "no CUDA device: %s\n", cuda.status().ToString().c_str());
    return 1;
  }
  // hidden 1024, 8 heads of 128, intermediate 4096: about 25 MiB of bf16 per layer.
  const int64_t layers = std::max<int64_t>(1, mib / 25);
  const std::string dir =
      std::filesystem::temp_directory_path() / ("wd_checksum_bench_" + std::to_string(::getpid()));
  if (!testing::WriteSyntheticCheckpoint(
          dir, testing::LlamaTensors(1024, 8, 8, 128, 4096, 32000, layers), 4,
          testing::LlamaConfig(1024, 8, 8, 4096, 32000, layers))) {
    std::fprintf(stderr, "cannot write %s\n", dir.c_str());
    return 1;
  }
  auto ckpt = Checkpoint::Open(dir);
  PlanOptions po;
  po.dtype = DType::kF32;
  auto plan = BuildPlan(*ckpt, po);
  if (!plan.ok()) {
    std::fprintf(stderr, "%s\n", plan.status().ToString().c_str());
    return 1;
  }
  auto arena = (*cuda)->Allocate({plan->ranks[0].arena_bytes, 0, "bench"});
  if (!arena.ok()) {
    std::fprintf(stderr, "%s\n", arena.status().ToString().c_str());
    return 1;
  }
  std::vector<Arena*> arenas = {arena->get()};
  auto staging = CreateCudaStaging(1ull << 30, 4, 0);
  std::printf("checkpoint %.0f MiB read, %.0f MiB on the device (fp32)\n",
              plan->sources.empty() ? 0.0 : [&] {
                uint64_t n = 0;
                for (const PlanSource& s : plan->sources) n += s.nbytes;
                return n / 1048576.0;
              }(),
              plan->ranks[0].arena_bytes / 1048576.0);
  std::printf("| workers | load without checksums (ms) | with checksums (ms) | read-back (ms) |\n");
  std::printf("|---|---|---|---|\n");
  for (int threads : {1, 4}) {
    double ms[2];
    for (int with = 0; with < 2; ++with) {
      std::vector<double> t;
      for (int i = 0; i < 6; ++i) {
        ExecutorOptions eo;
        eo.threads = threads;
        eo.staging = staging->get();
        LoadProgress p;
        TargetChecksums c;
        const auto t0 = std::chrono::steady_clock::now();
        const absl::Status s = ExecutePlanCuda(*plan, arenas, eo, &p, with ? &c : nullptr);
        const auto t1 = std::chrono::steady_clock::now();
        if (!s.ok()) {
          std::fprintf(stderr, "%s\n", s.ToString().c_str());
          return 1;
        }
        if (i > 0) t.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
      }
      std::sort(t.begin(), t.end());
      ms[with] = t[t.size() / 2];
    }
    std::printf("| %d | %.1f | %.1f | %.1f |\n", threads, ms[0], ms[1], ms[1] - ms[0]);
  }
  // The serial read-back, on this thread in device 0's primary context.
  const CudaDriver& cu = **CudaDriver::Get();
  auto ctx = CudaPrimaryContext::Retain(cu, 0);
  CudaContextGuard guard(cu);
  if (!ctx.ok() || !guard.Use(ctx->get()).ok()) return 1;
  constexpr size_t kBuf = 64 << 20;
  void* buf = nullptr;
  if (cu.MemHostAlloc(&buf, kBuf, 0) != CUDA_SUCCESS) return 1;
  std::vector<double> serial;
  const CUdeviceptr base = static_cast<CudaArena*>(arenas[0])->device_ptr();
  for (int i = 0; i < 6; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    uint32_t sink = 0;
    for (const PlanTarget& t : plan->ranks[0].targets) {
      uint32_t crc = 0;
      for (uint64_t off = 0; off < t.nbytes; off += kBuf) {
        const uint64_t n = std::min<uint64_t>(kBuf, t.nbytes - off);
        if (cu.MemcpyDtoH(buf, base + t.offset + off, n) != CUDA_SUCCESS) return 1;
        crc = Crc32cCombine(crc, Crc32c(buf, n), n);
      }
      sink ^= crc;
    }
    const auto t1 = std::chrono::steady_clock::now();
    if (i > 0) serial.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
    if (sink == 0x12345678) std::printf(" ");  // keeps the loop
  }
  cu.MemFreeHost(buf);
  std::sort(serial.begin(), serial.end());
  std::printf("serial read-back (previous method): %.1f ms\n", serial[serial.size() / 2]);
  std::filesystem::remove_all(dir);
  return 0;
}

}  // namespace
}  // namespace weightd

int main(int argc, char** argv) { return weightd::Run(argc, argv); }
