// ExecutePlanHost (executor.h): the read pipeline into host arenas, through FdSink
// (detail/fd_sink.h) writing each arena's memfd with pwrite.
//
// Why pwrite and not a mapping: on the development VM (2 vCPU, docs/BENCHMARKS.md "Host load")
// reading a 2.54 GB checkpoint into a MAP_SHARED mapping of a fresh memfd took 0.86-0.93 s, plus
// 0.06-0.11 s to unmap it before F_SEAL_WRITE; reading it in 1 MiB steps into a reused buffer and
// pwrite-ing the steps into the memfd took 0.72-0.74 s, and sealing 0.01 s. A first write through
// a mapping faults each page and zeroes it before the copy; pwrite of a whole page skips the
// zeroing, and no page table is left to tear down. The CRC32C of each step is taken from the
// buffer while it is in cache.
#include "absl/strings/str_cat.h"
#include "weightd/detail/fd_sink.h"
#include "weightd/detail/read_pipeline.h"
#include "weightd/detail/work_units.h"
#include "weightd/executor.h"
#include "weightd/status_macros.h"

namespace weightd {

absl::Status ExecutePlanHost(const Plan& plan, std::span<Arena* const> rank_arenas,
                             const ExecutorOptions& options, LoadProgress* progress,
                             TargetChecksums* checksums) {
  const int threads = std::max(1, options.threads);
  // Units of at most a chunk; in the staged modes a cold unit is read with O_DIRECT into a slot
  // of the chunk and two pages (its 4 KiB-aligned superset). From the page cache a unit is read
  // in steps of about 1 MiB into a per-thread buffer of that size.
  const uint64_t slack = options.io_mode != IoMode::kPread ? 2 * kDirectIoAlignment : 0;
  const uint64_t chunk = std::max<uint64_t>(
      64 << 10, std::min(options.chunk_bytes, options.buffer_budget / threads - slack));
  // Also checks that there is an arena for every rank and that the plan fits them.
  WD_ASSIGN_OR_RETURN(detail::WorkPlan work, detail::BuildWorkPlan(plan, rank_arenas, chunk));
  std::vector<OutputFile> out(plan.ranks.size());
  for (size_t r = 0; r < plan.ranks.size(); ++r) {
    const Arena& a = *rank_arenas[r];
    if (a.host_fd() < 0 || a.size() < plan.ranks[r].arena_bytes) {
      return absl::InternalError(absl::StrCat("arena ", a.label(), " of rank ", plan.ranks[r].rank,
                                              " is not a writable host memfd of at least ",
                                              plan.ranks[r].arena_bytes, " bytes"));
    }
    out[r].fd = a.host_fd();
    out[r].path = absl::StrCat("the memfd of arena ", a.label());
    for (const PlanTarget& t : plan.ranks[r].targets) out[r].target_offset.push_back(t.offset);
  }
  WD_ASSIGN_OR_RETURN(detail::PlanFiles files, detail::PlanFiles::Open(plan, options.io_mode));
  // A fresh memfd reads as zeros already, but the arena of an update holds bytes copied from the
  // previous generation: zero-fills are written.
  detail::FdSink sink(plan, out, {.checksum = true, .zero_fill = true});
  return detail::RunReadPipeline(plan, work, files, sink,
                                 {.threads = threads,
                                  .uring_queue_depth = options.uring_queue_depth,
                                  .slot_bytes = chunk + slack},
                                 progress, checksums);
}

}  // namespace weightd
