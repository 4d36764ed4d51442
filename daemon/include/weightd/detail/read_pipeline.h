// The read pipeline: the one path from a Plan to bytes at their destination, shared by every
// executor.
//
//   plan ──► work units ──► reads ─────────────► transforms ──► sink
//            (work_units.h:  (pread into a small   (row windows   (FdSink: pwrite into host
//             pieces grouped  per-thread buffer,    as Blocks,     arenas' memfds or into
//             by source, row- or io_uring +         casts, CRC32C  `weightctl shard`'s files;
//             aligned units)  O_DIRECT into a       while writing) DeviceArenaSink: CUDA DMA)
//                             staging slot)
//
//   detail::WorkPlan work = ...BuildWorkPlan(plan, arenas, chunk);
//   WD_ASSIGN_OR_RETURN(detail::PlanFiles files, detail::PlanFiles::Open(plan, io_mode));
//   MySink sink(...);
//   WD_RETURN_IF_ERROR(detail::RunReadPipeline(plan, work, files, sink, {.threads = 4}, &progress,
//                                              &checksums));
//
// What the pipeline does once for every sink: `threads` workers take units from a UnitQueue
// (work_units.h: each walks its own lane of the units in file order, far from the others, and
// steals half of the fullest lane when done); a unit is read into a staging slot when the files
// are read with io_uring or the sink owns a ring, else from the page cache into a per-thread
// buffer in steps of about 1 MiB (whole rows of every piece), each handed to the sink's worker,
// which applies the pieces' Blocks while the step is still in cache. Then the plan's zero-fills (checked to
// lie inside their targets), the check that no checkpoint file changed during the reads, and
// the target checksums (CrcSegments), from which BuildRankManifest takes the CRC32C of every
// target it can instead of a second pass over memory.
//
// Errors: the first error of any worker (the reader's: file, offset, missing bytes; the sink's:
// a write error naming the destination) stops the others at their next unit; CANCELLED when
// progress->cancel is set. Thread-safety: RunReadPipeline is one call per plan; a Sink is called
// from the workers concurrently (NewWorker on each worker's thread, ZeroFill from one thread
// after the workers), a SinkWorker only from the thread that made it.
#ifndef WEIGHTD_DETAIL_READ_PIPELINE_H_
#define WEIGHTD_DETAIL_READ_PIPELINE_H_

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "weightd/detail/staging_ring.h"
#include "weightd/detail/work_units.h"
#include "weightd/dtype.h"
#include "weightd/executor.h"
#include "weightd/plan.h"

namespace weightd::detail {

// One rectangle of a piece inside a window of source rows: `rows` rows of `width` elements.
// Source bytes start at src_offset from the window's first byte, a row every src_pitch bytes
// (source dtype); destination bytes at dst_offset from the target's first byte, a row every
// dst_pitch bytes (target dtype).
struct Block {
  int64_t src_offset = 0;
  int64_t src_pitch = 0;
  int64_t dst_offset = 0;
  int64_t dst_pitch = 0;
  int64_t rows = 0;
  int64_t width = 0;
  // Whether the block's rows are back to back on each side.
  bool SrcContiguous(int64_t src_elem) const { return rows == 1 || width * src_elem == src_pitch; }
  bool DstContiguous(int64_t dst_elem) const { return rows == 1 || width * dst_elem == dst_pitch; }
};

// Calls fn(const Block&) for each plane of `p` that has rows in the source window
// [row_begin, row_end) (rows of the piece's source view, kernels::SourceRows). The row-window
// arithmetic of every sink, in one place (kernels::CopyPieceRowsHost has the same semantics).
template <typename F>
void ForEachBlock(const PlanPiece& p, DType src_dtype, DType dst_dtype, int64_t row_begin,
                  int64_t row_end, F&& fn) {
  const int64_t ss = DTypeSize(src_dtype);
  const int64_t ds = DTypeSize(dst_dtype);
  for (int64_t i = 0; i < p.extent[0]; ++i) {
    const int64_t plane_row0 = (p.src_start[0] + i) * p.src_shape[1] + p.src_start[1];
    const int64_t j_begin = std::max<int64_t>(0, row_begin - plane_row0);
    const int64_t j_end = std::min<int64_t>(p.extent[1], row_end - plane_row0);
    if (j_begin >= j_end) continue;
    Block b;
    b.src_pitch = p.src_shape[2] * ss;
    b.dst_pitch = p.dst_shape[2] * ds;
    b.src_offset = (plane_row0 + j_begin - row_begin) * b.src_pitch + p.src_start[2] * ss;
    b.dst_offset =
        (((p.dst_start[0] + i) * p.dst_shape[1] + p.dst_start[1] + j_begin) * p.dst_shape[2] +
         p.dst_start[2]) *
        ds;
    b.rows = j_end - j_begin;
    b.width = p.extent[2];
    fn(static_cast<const Block&>(b));
  }
}

// The CRC32C of byte ranges of targets, gathered while they are written (one per worker, not
// thread-safe), then combined per target: a target whose recorded ranges tile it exactly gets a
// checksum, any other keeps -1 (BuildRankManifest then reads it).
class CrcSegments {
 public:
  // Records that bytes [offset, offset + n) of target `target` of rank index `rank` hold `data`
  // (checksummed now: call right after writing them). Consecutive ranges of one target extend
  // one segment.
  void Add(size_t rank, uint32_t target, uint64_t offset, const std::byte* data, uint64_t n);
  // Records a range whose CRC32C is already known.
  void AddKnown(size_t rank, uint32_t target, uint64_t offset, uint64_t n, uint32_t crc);
  // Closes the open segments (call at the end of each unit; cheap).
  void Flush();
  // Sizes `out` to the plan and fills every target the segments of `parts` tile.
  static void Combine(const Plan& plan, std::vector<CrcSegments>& parts, TargetChecksums* out);

 private:
  struct Segment {
    size_t rank;
    uint32_t target;
    uint64_t begin, end;
    uint32_t crc;
  };
  std::vector<Segment> open_;  // at most one per target, in the order they were opened
  std::vector<Segment> done_;
};

// The bytes of one unit, handed to a SinkWorker.
struct UnitBytes {
  size_t index = 0;  // in WorkPlan::units
  const WorkUnit* unit = nullptr;
  std::span<const std::byte> bytes;  // the unit's source bytes, [unit->begin, unit->end)
  StagingSlot* slot = nullptr;       // the slot holding `bytes`, or null (host memory)
  CrcSegments* crc = nullptr;        // this worker's checksums; the sink adds what it writes
};

// One worker's side of a sink (streams, scratch buffers, a descriptor): made and used on that
// worker's thread only.
class SinkWorker {
 public:
  virtual ~SinkWorker() = default;
  // Writes `pieces` (all of one source, unit.unit->source) from the unit's bytes. An error
  // names the destination (file and offset, rank and device).
  virtual absl::Status Write(const UnitBytes& unit, std::span<const PieceRef> pieces) = 0;
};

// A destination of the pipeline.
class Sink {
 public:
  virtual ~Sink() = default;
  // The ring every unit is read into (pinned memory for DMA), or null: the pipeline reads into
  // slots of its own ring when io_uring may be used, else in steps into a per-thread buffer.
  virtual StagingRing* ring() { return nullptr; }
  // Lets the sink take a unit straight from the checkpoint file (`fd`, the unit's first byte at
  // `file_offset`) without the pipeline reading it: true when it wrote every piece (FileSink:
  // copy_file_range, an in-kernel copy, for pieces that are whole contiguous blocks), false to
  // have it read as usual. Called on a worker thread.
  virtual absl::StatusOr<bool> CopyFromFile(SinkWorker& worker, const UnitBytes& unit, int fd,
                                            uint64_t file_offset,
                                            std::span<const PieceRef> pieces) {
    return false;
  }
  // Called on worker `worker`'s thread before its first unit.
  virtual absl::StatusOr<std::unique_ptr<SinkWorker>> NewWorker(int worker) = 0;
  // Zeroes bytes [offset, offset + bytes) of target `target` of rank index `rank` (a plan
  // zero-fill, already checked to lie inside the target), after every unit was written.
  virtual absl::Status ZeroFill(size_t rank, uint32_t target, uint64_t offset,
                                uint64_t bytes) = 0;
};

struct PipelineOptions {
  int threads = 4;
  unsigned uring_queue_depth = 64;
  // Bytes of each slot of the pipeline's own ring (staged io modes, sinks without a ring): the
  // largest unit plus two pages of O_DIRECT slack.
  uint64_t slot_bytes = 0;
};

// Runs every unit of `work` through `sink` (see the file comment). `checksums` (may be null) is
// sized to the plan and gets the CRC32C of each target the sink's writes tiled.
absl::Status RunReadPipeline(const Plan& plan, const WorkPlan& work, const PlanFiles& files,
                             Sink& sink, const PipelineOptions& options, LoadProgress* progress,
                             TargetChecksums* checksums);

}  // namespace weightd::detail

#endif  // WEIGHTD_DETAIL_READ_PIPELINE_H_
