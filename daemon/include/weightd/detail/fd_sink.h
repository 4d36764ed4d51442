// FdSink: the read pipeline's sink into descriptors (read_pipeline.h). Every unit's pieces are
// written with pwrite/pwritev at their place in one descriptor per rank, from the worker's read
// buffer (casts converted on the way). Two executors use it:
//   - ExecutePlanHost: the descriptors are the host arenas' memfds (Arena::host_fd()). Writing a
//     fresh memfd with pwrite fills whole pages without zeroing them first and leaves no page
//     table to tear down when the arena is sealed, where writes through a mapping pay a fault and
//     a zeroed page per 4 KiB and an munmap of every page at Seal(). Checksummed while writing.
//   - ExecutePlanToFiles (`weightctl shard`): the descriptors are pre-sized output files;
//     writeback starts as each range is written, and pieces that are whole contiguous blocks are
//     copied file to file by the kernel (copy_file_range) where the filesystems allow.
//
//   std::vector<OutputFile> out = ...;   // [rank index] fd, name for errors, target offsets
//   FdSink sink(plan, out, {.checksum = true, .zero_fill = true});
//   WD_RETURN_IF_ERROR(RunReadPipeline(plan, work, files, sink, options, &progress, &crcs));
//
// Pieces never overlap in their target, so workers writing different pieces of one target in
// parallel cannot lose each other's bytes. Errors name the descriptor's `path` and the offset
// with the errno text (ENOSPC, EFBIG, ENOMEM). Thread-safety: as every Sink.
#ifndef WEIGHTD_DETAIL_FD_SINK_H_
#define WEIGHTD_DETAIL_FD_SINK_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <span>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "weightd/detail/read_pipeline.h"
#include "weightd/executor.h"
#include "weightd/plan.h"

namespace weightd::detail {

struct FdSinkOptions {
  // CRC32C of every byte written, added to the unit's CrcSegments while the bytes are in cache.
  bool checksum = false;
  // sync_file_range after each write of 1 MiB or more (files headed for a disk and an fsync).
  bool start_writeback = false;
  // Whole contiguous same-dtype blocks copied file to file inside the kernel (CopyFromFile);
  // falls back to reading for the rest of the call where the filesystems refuse.
  bool copy_file_range = false;
  // Write the plan's zero-fills; off where the destination already reads as zeros there.
  bool zero_fill = false;
};

class FdSink final : public Sink {
 public:
  // `out[rank index]` must outlive the sink; its target_offset covers the rank's targets.
  FdSink(const Plan& plan, std::span<const OutputFile> out, FdSinkOptions options)
      : plan_(plan), out_(out), options_(options) {}

  absl::StatusOr<std::unique_ptr<SinkWorker>> NewWorker(int) override;
  absl::Status ZeroFill(size_t rank, uint32_t target, uint64_t offset, uint64_t bytes) override;
  absl::StatusOr<bool> CopyFromFile(SinkWorker& worker, const UnitBytes& unit, int fd,
                                    uint64_t file_offset,
                                    std::span<const PieceRef> pieces) override;
  // Tensor bytes written so far (zero-fills not counted).
  uint64_t written() const { return written_.load(); }

 private:
  class Worker;

  const Plan& plan_;
  std::span<const OutputFile> out_;
  const FdSinkOptions options_;
  std::atomic<uint64_t> written_{0};
  std::atomic<bool> copy_file_range_ok_{true};
};

}  // namespace weightd::detail

#endif  // WEIGHTD_DETAIL_FD_SINK_H_
