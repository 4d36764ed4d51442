// Executor: runs a Plan into per-rank arenas (host-addressable arenas; see backend.h).
//
//   LoadProgress progress;
//   std::vector<Arena*> arenas = {rank0.get(), rank1.get()};   // arenas[i] <- plan.ranks[i]
//   WD_RETURN_IF_ERROR(ExecutePlanHost(plan, arenas, {.threads = 4}, &progress));
//
// Every executor is the one read pipeline (detail/read_pipeline.h) with a different sink:
// ExecutePlanHost into host arenas, ExecutePlanCuda into device arenas, ExecutePlanToFiles into
// `weightctl shard`'s output files. Every checkpoint byte the plan needs is read exactly once,
// whatever the number of ranks: sources are visited in (file, offset) order and cut into
// row-aligned units of at most chunk_bytes that `threads` workers take lane by lane (one run of
// the file order each, detail::UnitQueue, so that they write different arenas). On the host a
// unit is read from the page cache in ~1 MiB steps (whole rows) into a per-thread buffer, and
// each step's pieces (whole tensors, tensor-parallel slices, fused q/k/v and gate/up, casts,
// replicas) are written into the arenas' memfds with pwrite/pwritev (detail/fd_sink.h),
// checksummed from the buffer while it is in cache; cold chunks read with io_uring go through a
// staging slot the same way. Buffer memory is bounded by threads x chunk_bytes within
// `buffer_budget` (a single source whose rows are wider than a chunk gets a one-off buffer of
// one row group). Zero-fills are written explicitly (the CUDA backend's memory is not zeroed for
// free, nor is an update's arena).
//
// Errors: the reader's message (file, offset, missing bytes) for a truncated shard, INTERNAL
// naming the piece for a plan inconsistent with its own arenas, CANCELLED when
// progress->cancel is set. Thread-safety: one call per plan; `progress` may be read
// concurrently from other threads.
#ifndef WEIGHTD_EXECUTOR_H_
#define WEIGHTD_EXECUTOR_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "weightd/backend.h"
#include "weightd/manifest.h"
#include "weightd/plan.h"
#include "weightd/segment_plan.h"

namespace weightd {

struct LoadProgress {
  std::atomic<uint64_t> bytes_total{0};  // checkpoint bytes the load reads
  std::atomic<uint64_t> bytes_done{0};
  std::atomic<uint64_t> bytes_uring{0};  // of bytes_done: read with io_uring into staging slots
  std::atomic<uint64_t> bytes_pread{0};  // of bytes_done: read with pread (page-cache path)
  std::atomic<bool> cancel{false};       // set by another thread to stop the load
};

// How checkpoint bytes are read:
//   kPread: pread in ~1 MiB steps into a per-thread buffer (or, for CUDA, into a staging slot);
//           the page-cache path.
//   kUring: io_uring, O_DIRECT where the filesystem allows, into a StagingRing slot, then copied
//           (and converted) from the slot. Falls back to kPread when io_uring is unavailable.
//   kAuto:  per chunk, mincore decides: at least kCachedThreshold resident -> kPread, else kUring.
enum class IoMode { kAuto, kPread, kUring };
absl::StatusOr<IoMode> ParseIoMode(absl::string_view text);
absl::string_view IoModeName(IoMode mode);

class StagingRing;

// The pinned staging memory of a daemon's CUDA loads (daemon/src/cuda/cuda_executor.cc): one
// StagingRing of cuMemHostAlloc'ed, portable slots shared by every concurrent load, so pinned
// memory stays within --pinned-budget however many loads run, and is paid for (pinning is slow:
// 3.6 s for 8 GiB on the H100 machine) once per daemon instead of once per load. Each worker
// holds one slot at a time, so loads sharing the ring only wait for each other, never deadlock.
// Slots are min(64 MiB, budget / (2 x workers + 1)), at least 64 KiB, as many as fit the budget:
// two loads' workers plus a read-back each get a slot. Units are cut to fit a slot; a source
// whose rows are wider than a slot fails its load with RESOURCE_EXHAUSTED naming the tensor.
// The memory is allocated in `device`'s primary context, which it retains until destroyed.
// Thread-safe; destroy only when no load uses it.
class CudaStaging {
 public:
  virtual ~CudaStaging() = default;
  virtual StagingRing& ring() = 0;
};
// UNIMPLEMENTED in a build without CUDA; the allocator's error (RESOURCE_EXHAUSTED) when the
// pinned memory cannot be had.
absl::StatusOr<std::unique_ptr<CudaStaging>> CreateCudaStaging(uint64_t budget, int workers,
                                                               int device);

struct ExecutorOptions {
  int threads = 4;
  uint64_t buffer_budget = 1ull << 30;  // bytes of read buffers in all threads together
  uint64_t chunk_bytes = 64ull << 20;   // largest single read
  IoMode io_mode = IoMode::kPread;      // kAuto pending the cold-read measurement on the H100
  unsigned uring_queue_depth = 64;      // SQ entries per reader thread's ring
  // ExecutePlanCuda only: the daemon's shared pinned ring. Null: the load pins its own ring of
  // (threads + 1) slots within buffer_budget (tests, tools).
  CudaStaging* staging = nullptr;
};

// CRC32C of the targets the executor checksummed while writing them, indexed [rank][target];
// -1 where it did not. The host executor checksums every target; the CUDA executor the
// verbatim ones from the staging bytes and the others by reading them back from the device.
struct TargetChecksums {
  std::vector<std::vector<int64_t>> crc;
};

// `checksums` may be null.
absl::Status ExecutePlanHost(const Plan& plan, std::span<Arena* const> rank_arenas,
                             const ExecutorOptions& options, LoadProgress* progress,
                             TargetChecksums* checksums = nullptr);

// The CUDA path (daemon/src/cuda/cuda_executor.cc): same reading order, units and errors as
// ExecutePlanHost, into CudaArena's (backend.h: writable() empty, kind() kCudaVmm) by DMA from a
// pinned staging ring (options.staging, or the load's own), read with io_uring and O_DIRECT as
// IoMode says (cuMemcpyHtoDAsync / cuMemcpy2DAsync through the driver table, casts as device
// kernels), on one stream per worker and device. Fills `checksums` for every target: verbatim
// targets from the staging bytes, the others by a parallel, double-buffered read-back of the
// finished target (see the .cc). Every CUDA error
// fails the load with a Status naming the rank and device (the registry adds the model name);
// all DMA is complete when it returns, on success or error. UNIMPLEMENTED in a build without
// CUDA.
absl::Status ExecutePlanCuda(const Plan& plan, std::span<Arena* const> rank_arenas,
                             const ExecutorOptions& options, LoadProgress* progress,
                             TargetChecksums* checksums = nullptr);

// One rank's output file for ExecutePlanToFiles: pre-sized (so plan zero-fills and gaps read as
// zeros) and open for writing; not owned, used only during the call.
struct OutputFile {
  int fd = -1;
  std::string path;                     // named in write errors (the temporary's path)
  std::vector<uint64_t> target_offset;  // [target] absolute file offset of its first byte
};

// The output-file sink (daemon/src/pipeline/fd_sink.cc; `weightctl shard`): the same reads and
// writes as ExecutePlanHost (FdSink), `options.threads` workers, each unit read into a
// per-thread buffer (~1 MiB steps from the page cache, options.chunk_bytes with io_uring: peak
// memory threads x chunk, plus one conversion buffer per worker, whatever the model size), then
// every piece written with pwrite/pwritev at its place in `files[rank index]` (casts converted
// on the way), or copied file to file (copy_file_range) where it is a whole contiguous block. Writeback of each written range is started
// at once (sync_file_range), so a later fsync has little left to wait for; durability and the
// final names are the caller's. Zero-fills write nothing (the files read as zeros there).
// `bytes_written` (may be null) gets the tensor bytes written. Errors name the output file and
// offset with the errno text (ENOSPC, EFBIG) or the reader's; CANCELLED when progress->cancel is
// set (another thread, a signal handler).
absl::Status ExecutePlanToFiles(const Plan& plan, std::span<const OutputFile> files,
                                const ExecutorOptions& options, LoadProgress* progress,
                                uint64_t* bytes_written = nullptr);

// A byte range of an arena.
struct ArenaRange {
  uint64_t offset = 0;
  uint64_t bytes = 0;
};

// Copies each of `ranges` from `from` (sealed) to the same offsets of `to` (not yet sealed), two
// arenas of one kind and size: parallel pwrites over `threads` for host arenas, a device-to-
// device copy (cuMemcpyDtoDAsync on one stream, complete when it returns) for CUDA arenas
// (cuda_executor.cc; UNIMPLEMENTED in a build without CUDA). An update uses it to carry the
// targets it does not rewrite into the next generation. INTERNAL for a range outside either
// arena; CANCELLED when progress->cancel is set (host arenas; the progress counts only
// checkpoint bytes read, so copies do not add to it).
absl::Status CopyArenaRanges(const Arena& from, Arena& to, std::span<const ArenaRange> ranges,
                             int threads, LoadProgress* progress = nullptr);
#ifdef WEIGHTD_HAVE_CUDA_BACKEND
absl::Status CopyArenaRangesCuda(const Arena& from, Arena& to,
                                 std::span<const ArenaRange> ranges);
#endif

// INTERNAL naming the piece when `p` leaves its source, its target or the arena (shared by the
// executors; a plan that disagrees with itself must fail the load, not corrupt memory).
absl::Status CheckPlanPiece(const Plan& plan, const RankPlan& rp, const PlanPiece& p,
                            uint64_t arena_size);

// The manifest of rank `rank_index` of `plan` after its arena was sealed: contiguous tensors in
// arena 0, with the CRC32C of each taken from `known` (ExecutePlanHost's, may be null) or else
// computed from the arena (in parallel over `threads`); for an arena without a host view
// (device arenas), tensors without a known CRC32C get 0.
absl::StatusOr<Manifest> BuildRankManifest(const Plan& plan, size_t rank_index, const Arena& arena,
                                           absl::string_view model, int device, int threads,
                                           const std::vector<int64_t>* known = nullptr);

// The manifest of input rank `rank` of a segmented plan (segment_plan.h) whose segments' arenas
// are sealed: arena k of the manifest is `arenas[k]` (segment sp.segments_of[rank][k]), tensors
// in the input rank's target order (names sorted, as an unsegmented manifest lists them) at
// their segment-relative offsets. CRC32C as BuildRankManifest, `known` indexed by the input
// rank's targets; only tensors without a known CRC32C are read (from host arenas).
absl::StatusOr<Manifest> BuildSegmentedManifest(const SegmentedPlan& sp, size_t rank,
                                                std::span<const Arena* const> arenas,
                                                absl::string_view model, int device, int threads,
                                                const std::vector<int64_t>* known = nullptr);

}  // namespace weightd

#endif  // WEIGHTD_EXECUTOR_H_
