// How a plan becomes read work (the first stage of read_pipeline.h): pieces grouped by source
// over all ranks, and each source cut into row-aligned units so that every checkpoint byte is
// read exactly once. Shared by every sink, which differ only in where a unit's bytes go.
// Pure functions over a Plan; thread-safe.
#ifndef WEIGHTD_DETAIL_WORK_UNITS_H_
#define WEIGHTD_DETAIL_WORK_UNITS_H_

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "weightd/backend.h"
#include "weightd/detail/uring_reader.h"
#include "weightd/executor.h"
#include "weightd/mapped_file.h"
#include "weightd/plan.h"
#include "weightd/unique_fd.h"

namespace weightd::detail {

struct PieceRef {
  size_t rank;
  const PlanPiece* piece;
  uint64_t row_bytes;  // bytes per row of this piece's source view
};

struct WorkUnit {
  uint32_t source;
  uint64_t begin, end;  // byte range within the source
};

// A piece that copies its whole source, unchanged, onto its whole target: the source's bytes
// are the target's bytes (the CUDA executor checksums them from the staging slot).
bool IsVerbatim(const Plan& plan, const RankPlan& rp, const PlanPiece& p);

struct WorkPlan {
  std::vector<std::vector<PieceRef>> by_source;  // [source] pieces of every rank that read it
  std::vector<int> verbatim;       // [source] index in by_source of a verbatim piece, or -1
  std::vector<uint64_t> row_align;  // [source] bytes of the smallest whole row group of every piece
  std::vector<WorkUnit> units;     // sources in plan order (file order), each cut into units
  std::vector<size_t> first_unit;  // [source] index of its first unit
  uint64_t total_bytes = 0;        // bytes of the sources read
  uint64_t largest_unit = 0;       // bytes; a row wider than `chunk` makes a unit larger
  bool any_cast = false;           // some piece changes dtype
};

// Checks every piece (CheckPlanPiece against its rank's arena), groups them and cuts units of
// about `chunk` bytes whose boundaries fall on a row of every piece's view of the source.
absl::StatusOr<WorkPlan> BuildWorkPlan(const Plan& plan, std::span<Arena* const> rank_arenas,
                                       uint64_t chunk);
// The same, against rank arenas of `arena_bytes[rank index]` bytes (sinks without arenas).
absl::StatusOr<WorkPlan> BuildWorkPlan(const Plan& plan, std::span<const uint64_t> arena_bytes,
                                       uint64_t chunk);

// Hands the units of a WorkPlan out to `workers` threads. Each worker walks a lane of its own,
// a run of consecutive units holding about 1/workers of the bytes, so that workers read and
// write far apart: in different layers, hence different segment arenas, whose memfds each
// serialize their writers (a write holds the inode's lock while it copies). A worker whose lane
// is done takes the second half of what is left of the fullest lane. Every unit is handed out
// exactly once. Thread-safe.
class UnitQueue {
 public:
  UnitQueue(const WorkPlan& work, int workers);
  // The next unit for `worker`, or nullopt when none is left. `ahead` gets the unit this worker
  // will take after it if nothing is stolen (for read-ahead), or nullopt.
  std::optional<size_t> Take(int worker, std::optional<size_t>* ahead);

 private:
  struct Lane {
    size_t next = 0, end = 0;
  };
  absl::Mutex mu_;
  std::vector<Lane> lanes_ ABSL_GUARDED_BY(mu_);
};

// The plan's checkpoint files opened for reading units, and the choice of how each unit is read
// (IoMode). Shared by the executors; thread-safe once opened.
class PlanFiles {
 public:
  // Opens every file of `plan` buffered (one descriptor per file); in the staged modes (kAuto,
  // kUring) also with O_DIRECT (a second one), and in kAuto maps each one for mincore (an
  // unmappable file counts as cached). A file whose identity differs from the plan's record
  // (PlanFile::identity: replaced or rewritten since its header was read) is DATA_LOSS.
  static absl::StatusOr<PlanFiles> Open(const Plan& plan, IoMode mode);
  bool staged() const { return mode_ != IoMode::kPread; }
  int fd(uint32_t file) const { return files_[file]->buffered_fd(); }
  const std::string& path(uint32_t file) const { return files_[file]->path(); }
  ReadFile& direct(uint32_t file) const { return *files_[file]; }
  // Asks the kernel to start reading bytes [offset, offset + length) of `file` into the page
  // cache now (POSIX_FADV_WILLNEED; advisory, no error): a worker's next unit then arrives from
  // the disk while it copies the current one.
  void WillNeed(uint32_t file, uint64_t offset, uint64_t length) const;
  // After the last read: DATA_LOSS naming the first file that changed since it was opened
  // (rewritten in place during the load), so a mixed snapshot is never served as ready.
  absl::Status CheckUnchanged() const;
  // Whether bytes [offset, offset + length) of `file` go through io_uring into a buffer of
  // `capacity` bytes: kUring whenever they fit, kAuto when they fit and less than
  // kCachedThreshold of them is in the page cache, kPread never.
  bool WantUring(uint32_t file, uint64_t offset, uint64_t length, uint64_t capacity) const;

 private:
  IoMode mode_ = IoMode::kPread;
  std::vector<std::unique_ptr<ReadFile>> files_;
  std::vector<MappedFile> maps_;
};

// One worker thread's io_uring reader, made on first use. When io_uring is unavailable (sysctl,
// seccomp) get() returns null from then on, and the load logs it once (`warned` is the load's
// flag, shared by its workers).
class LazyUringReader {
 public:
  LazyUringReader(unsigned queue_depth, std::atomic<bool>* warned)
      : queue_depth_(queue_depth), warned_(warned) {}
  UringReader* get();

 private:
  unsigned queue_depth_;
  std::atomic<bool>* warned_;
  std::unique_ptr<UringReader> reader_;
  bool failed_ = false;
};

// Reads bytes [offset, offset + length) of `file` into `buffer` (4 KiB aligned, `capacity`
// bytes): with `uring` (the caller's choice, from files.WantUring) or, when null, pread. Returns
// the span of the bytes inside `buffer` (an O_DIRECT read starts at the aligned offset below)
// and counts them in progress->bytes_uring or bytes_pread. Errors name the file and `tensor`.
absl::StatusOr<std::span<const std::byte>> ReadInto(const PlanFiles& files, UringReader* uring,
                                                    uint32_t file, uint64_t offset, uint64_t length,
                                                    std::byte* buffer, uint64_t capacity,
                                                    absl::string_view tensor,
                                                    LoadProgress* progress);

}  // namespace weightd::detail

#endif  // WEIGHTD_DETAIL_WORK_UNITS_H_
