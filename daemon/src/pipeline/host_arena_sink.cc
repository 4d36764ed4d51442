// ExecutePlanHost (executor.h): the read pipeline into host arenas (sealed memfds once loaded).
//
// Most units never pass through a buffer: the pipeline reads them in place (read_pipeline.h),
// one preadv per step scattering the file's bytes into the arenas of every rank, checksummed
// right after the read. The HostArenaSink below writes the rest: units read with io_uring into
// a staging slot (cold files), pieces that cast, and the replicas of a replicated tensor (copied
// from the rank that read it in place). It checksums each row run it writes while the run is in
// cache, so every target gets its CRC32C without a second pass over the arena.
#include <cstring>

#include "absl/strings/str_cat.h"
#include "weightd/detail/read_pipeline.h"
#include "weightd/detail/work_units.h"
#include "weightd/executor.h"
#include "weightd/kernels/convert.h"
#include "weightd/status_macros.h"

namespace weightd {
namespace {

using detail::Block;
using detail::PieceRef;

constexpr uint64_t kCopyStep = 1 << 20;

class HostArenaSink final : public detail::Sink {
 public:
  HostArenaSink(const Plan& plan, std::vector<std::byte*> bases)
      : plan_(plan), bases_(std::move(bases)) {}

  std::byte* HostBase(size_t rank) override { return bases_[rank]; }

  absl::StatusOr<std::unique_ptr<detail::SinkWorker>> NewWorker(int) override {
    return std::make_unique<Worker>(*this);
  }

  absl::Status ZeroFill(size_t rank, uint64_t offset, uint64_t bytes) override {
    // A fresh memfd reads as zeros already, but a reused arena does not.
    std::memset(bases_[rank] + offset, 0, bytes);
    return absl::OkStatus();
  }

 private:
  class Worker final : public detail::SinkWorker {
   public:
    explicit Worker(const HostArenaSink& sink) : sink_(sink) {}
    absl::Status Write(const detail::UnitBytes& unit, std::span<const PieceRef> pieces) override;

   private:
    const HostArenaSink& sink_;
  };

  const Plan& plan_;
  std::vector<std::byte*> bases_;
};

absl::Status HostArenaSink::Worker::Write(const detail::UnitBytes& unit,
                                          std::span<const PieceRef> pieces) {
  const Plan& plan = sink_.plan_;
  const PlanSource& src = plan.sources[unit.unit->source];
  const int64_t ss = DTypeSize(src.dtype);
  for (const PieceRef& pr : pieces) {
    const uint32_t target = pr.piece->target;
    const PlanTarget& t = plan.ranks[pr.rank].targets[target];
    const int64_t ds = DTypeSize(t.dtype);
    std::byte* const base = sink_.bases_[pr.rank] + t.offset;
    // Records `n` bytes just written at `d` (offset in the target) while they are in cache.
    auto written = [&](int64_t d, uint64_t n) {
      unit.crc->Add(pr.rank, target, static_cast<uint64_t>(d), base + d, n);
    };
    detail::ForEachBlock(
        *pr.piece, src.dtype, t.dtype, static_cast<int64_t>(unit.unit->begin / pr.row_bytes),
        static_cast<int64_t>(unit.unit->end / pr.row_bytes), [&](const Block& b) {
          const std::byte* s = unit.bytes.data() + b.src_offset;
          if (src.dtype == t.dtype && b.SrcContiguous(ss) && b.DstContiguous(ds)) {
            const uint64_t n = static_cast<uint64_t>(b.rows * b.width * ss);
            for (uint64_t off = 0; off < n; off += kCopyStep) {
              const uint64_t k = std::min(kCopyStep, n - off);
              std::memcpy(base + b.dst_offset + off, s + off, k);
              written(b.dst_offset + static_cast<int64_t>(off), k);
            }
            return;
          }
          for (int64_t r = 0; r < b.rows; ++r) {
            const int64_t d = b.dst_offset + r * b.dst_pitch;
            kernels::ConvertHost(src.dtype, s + r * b.src_pitch, t.dtype, base + d, b.width);
            written(d, static_cast<uint64_t>(b.width * ds));
          }
        });
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status ExecutePlanHost(const Plan& plan, std::span<Arena* const> rank_arenas,
                             const ExecutorOptions& options, LoadProgress* progress,
                             TargetChecksums* checksums) {
  if (rank_arenas.size() != plan.ranks.size()) {
    return absl::InternalError(absl::StrCat("executor got ", rank_arenas.size(), " arenas for ",
                                            plan.ranks.size(), " ranks"));
  }
  std::vector<std::byte*> bases(plan.ranks.size());
  for (size_t r = 0; r < plan.ranks.size(); ++r) {
    std::span<std::byte> w = rank_arenas[r]->writable();
    if (w.size() < plan.ranks[r].arena_bytes || (w.empty() && plan.ranks[r].arena_bytes > 0)) {
      return absl::InternalError(absl::StrCat("arena of rank ", plan.ranks[r].rank,
                                              " is not host-writable or smaller than ",
                                              plan.ranks[r].arena_bytes, " bytes"));
    }
    bases[r] = w.data();
  }
  const int threads = std::max(1, options.threads);
  // Units of at most a chunk; in the staged modes a cold unit is read with O_DIRECT into a slot
  // of the chunk and two pages (its 4 KiB-aligned superset).
  const uint64_t slack = options.io_mode != IoMode::kPread ? 2 * kDirectIoAlignment : 0;
  const uint64_t chunk = std::max<uint64_t>(
      64 << 10, std::min(options.chunk_bytes, options.buffer_budget / threads - slack));
  WD_ASSIGN_OR_RETURN(detail::WorkPlan work, detail::BuildWorkPlan(plan, rank_arenas, chunk));
  WD_ASSIGN_OR_RETURN(detail::PlanFiles files, detail::PlanFiles::Open(plan, options.io_mode));
  HostArenaSink sink(plan, std::move(bases));
  return detail::RunReadPipeline(plan, work, files, sink,
                                 {.threads = threads,
                                  .uring_queue_depth = options.uring_queue_depth,
                                  .slot_bytes = chunk + slack,
                                  .prefault = options.prefault},
                                 progress, checksums);
}

}  // namespace weightd
