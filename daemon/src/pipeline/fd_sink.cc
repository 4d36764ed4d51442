// FdSink (detail/fd_sink.h) and ExecutePlanToFiles (executor.h). Every Block of every piece is
// written at its place in its rank's descriptor:
//   - same dtype, contiguous on both sides  -> one pwrite of the block,
//   - same dtype, destination rows contiguous -> one pwritev per IOV_MAX rows (a slice's rows),
//   - destination rows apart (a piece filling some columns of its target) -> a pwrite per row,
//   - casts: converted into the worker's conversion buffer, then written as above.
// No write reads the descriptor back. With `checksum`, each written range's CRC32C is taken from
// the bytes just handed to the kernel (the read step, or the conversion buffer), still in cache.
#include <fcntl.h>
#include <limits.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "weightd/crc32c.h"
#include "weightd/detail/fd_sink.h"
#include "weightd/detail/read_pipeline.h"
#include "weightd/detail/work_units.h"
#include "weightd/executor.h"
#include "weightd/file_util.h"
#include "weightd/kernels/convert.h"
#include "weightd/status_macros.h"

namespace weightd {
namespace detail {
namespace {

// Writes of at least this many bytes start their writeback at once.
constexpr uint64_t kWritebackBytes = 1 << 20;
// Largest conversion buffer: casts of larger blocks are converted and written in parts.
constexpr uint64_t kConvertBytes = 4 << 20;

absl::Status WriteError(int err, const OutputFile& f, uint64_t offset) {
  return ErrnoError(err, absl::StrCat("writing ", f.path, " at offset ", offset));
}

absl::Status PwritevAll(const OutputFile& f, std::span<iovec> iov, uint64_t offset) {
  return PwritevExact(f.fd, iov, offset, f.path);
}

absl::Status PwriteAll(const OutputFile& f, const std::byte* data, uint64_t n, uint64_t offset) {
  return PwriteExact(f.fd, data, n, offset, f.path);
}

// Starts writeback of bytes just written, so that the final fsync finds them on their way to
// the disk; advisory, its errors surface at fsync.
void StartWriteback(const OutputFile& f, uint64_t offset, uint64_t n) {
  if (n >= kWritebackBytes) {
    (void)::sync_file_range(f.fd, static_cast<off_t>(offset), static_cast<off_t>(n),
                            SYNC_FILE_RANGE_WRITE);
  }
}

}  // namespace

class FdSink::Worker final : public SinkWorker {
 public:
  explicit Worker(FdSink& sink) : sink_(sink) {}
  absl::Status Write(const UnitBytes& unit, std::span<const PieceRef> pieces) override;

 private:
  // Where block rows land: rank index, target, and the target's first byte in the descriptor.
  struct Dest {
    size_t rank;
    uint32_t target;
    const OutputFile& out;
    uint64_t target_at;
  };
  absl::Status WriteBlock(const Dest& d, const Block& b, DType from, DType to,
                          const std::byte* src, CrcSegments* crc);
  FdSink& sink_;
  std::vector<iovec> iov_;
  std::vector<std::byte> convert_;
};

absl::StatusOr<std::unique_ptr<SinkWorker>> FdSink::NewWorker(int) {
  return std::make_unique<Worker>(*this);
}

// Writes block `b` (source bytes at `src`) into `d`; with a `crc`, checksums what it writes.
absl::Status FdSink::Worker::WriteBlock(const Dest& d, const Block& b, DType from, DType to,
                                        const std::byte* src, CrcSegments* crc) {
  const OutputFile& f = d.out;
  const uint64_t at = d.target_at + static_cast<uint64_t>(b.dst_offset);
  const int64_t ss = DTypeSize(from), ds = DTypeSize(to);
  const uint64_t row_out = static_cast<uint64_t>(b.width * ds);
  // `n` bytes at `data` were written at byte `offset` of the target.
  auto written = [&](uint64_t offset, const std::byte* data, uint64_t n) {
    if (crc != nullptr) crc->Add(d.rank, d.target, offset, data, n);
  };
  const auto dst0 = static_cast<uint64_t>(b.dst_offset);
  if (!b.DstContiguous(ds)) {
    // Rows apart in the file: one write per row.
    for (int64_t r = 0; r < b.rows; ++r) {
      const std::byte* s = src + r * b.src_pitch;
      if (from != to) {
        if (convert_.size() < row_out) convert_.resize(row_out);
        kernels::ConvertHost(from, s, to, convert_.data(), b.width);
        s = convert_.data();
      }
      WD_RETURN_IF_ERROR(PwriteAll(f, s, row_out, at + r * b.dst_pitch));
      written(dst0 + r * b.dst_pitch, s, row_out);
    }
    return absl::OkStatus();
  }
  const uint64_t total = row_out * b.rows;
  if (from != to) {
    // Converted in parts of whole rows that fit the conversion buffer.
    const int64_t per =
        std::max<int64_t>(1, static_cast<int64_t>(kConvertBytes / std::max<uint64_t>(row_out, 1)));
    for (int64_t r0 = 0; r0 < b.rows; r0 += per) {
      const int64_t n = std::min(per, b.rows - r0);
      if (convert_.size() < row_out * n) convert_.resize(row_out * n);
      for (int64_t r = 0; r < n; ++r) {
        kernels::ConvertHost(from, src + (r0 + r) * b.src_pitch, to, convert_.data() + r * row_out,
                             b.width);
      }
      WD_RETURN_IF_ERROR(PwriteAll(f, convert_.data(), row_out * n, at + r0 * row_out));
      written(dst0 + r0 * row_out, convert_.data(), row_out * n);
    }
  } else if (b.SrcContiguous(ss)) {
    WD_RETURN_IF_ERROR(PwriteAll(f, src, total, at));
    written(dst0, src, total);
  } else {
    // A slice: its rows are apart in the source, back to back in the file.
    for (int64_t r0 = 0; r0 < b.rows; r0 += IOV_MAX) {
      const int64_t n = std::min<int64_t>(IOV_MAX, b.rows - r0);
      iov_.clear();
      for (int64_t r = 0; r < n; ++r) {
        iov_.push_back({const_cast<std::byte*>(src + (r0 + r) * b.src_pitch), row_out});
      }
      WD_RETURN_IF_ERROR(PwritevAll(f, iov_, at + r0 * row_out));
      for (int64_t r = 0; r < n; ++r) {
        written(dst0 + (r0 + r) * row_out, src + (r0 + r) * b.src_pitch, row_out);
      }
    }
  }
  if (sink_.options_.start_writeback) StartWriteback(f, at, total);
  return absl::OkStatus();
}

absl::Status FdSink::Worker::Write(const UnitBytes& unit, std::span<const PieceRef> pieces) {
  const Plan& plan = sink_.plan_;
  const PlanSource& src = plan.sources[unit.unit->source];
  uint64_t written = 0;
  for (const PieceRef& pr : pieces) {
    const PlanTarget& t = plan.ranks[pr.rank].targets[pr.piece->target];
    const OutputFile& f = sink_.out_[pr.rank];
    const Dest d{pr.rank, pr.piece->target, f, f.target_offset[pr.piece->target]};
    CrcSegments* crc = sink_.options_.checksum ? unit.crc : nullptr;
    absl::Status s;
    ForEachBlock(*pr.piece, src.dtype, t.dtype,
                 static_cast<int64_t>(unit.unit->begin / pr.row_bytes),
                 static_cast<int64_t>(unit.unit->end / pr.row_bytes), [&](const Block& b) {
                   if (!s.ok()) return;
                   s = WriteBlock(d, b, src.dtype, t.dtype, unit.bytes.data() + b.src_offset, crc);
                   written += static_cast<uint64_t>(b.rows * b.width * DTypeSize(t.dtype));
                 });
    WD_RETURN_IF_ERROR(s);
  }
  sink_.written_.fetch_add(written, std::memory_order_relaxed);
  return absl::OkStatus();
}

namespace {

// Copies `n` bytes of `in` at `in_offset` to `f` at `offset` inside the kernel.
absl::Status CopyRange(int in, uint64_t in_offset, const OutputFile& f, uint64_t offset,
                       uint64_t n) {
  auto in_off = static_cast<off64_t>(in_offset);
  auto out_off = static_cast<off64_t>(offset);
  while (n > 0) {
    const ssize_t k = ::copy_file_range(in, &in_off, f.fd, &out_off, n, 0);
    if (k < 0) {
      if (errno == EINTR) continue;
      return WriteError(errno, f, static_cast<uint64_t>(out_off));
    }
    if (k == 0) {
      return absl::DataLossError(absl::StrCat("copying into ", f.path, " at offset ", out_off,
                                              ": the checkpoint ended ", n,
                                              " bytes early (file truncated?)"));
    }
    n -= static_cast<uint64_t>(k);
  }
  return absl::OkStatus();
}

}  // namespace

// Pieces that are whole contiguous blocks of unchanged bytes (whole tensors, row slices, fused
// parts) are copied file to file by the kernel, the way `cp` copies: no user-space buffer, and
// on this development VM several times faster than write(2) into fresh page-cache pages.
absl::StatusOr<bool> FdSink::CopyFromFile(SinkWorker&, const UnitBytes& unit, int fd,
                                          uint64_t file_offset, std::span<const PieceRef> pieces) {
  // Bytes the kernel copies are not seen here, so cannot be checksummed on the way.
  if (!options_.copy_file_range || options_.checksum ||
      !copy_file_range_ok_.load(std::memory_order_relaxed)) {
    return false;
  }
  const PlanSource& src = plan_.sources[unit.unit->source];
  const int64_t es = DTypeSize(src.dtype);
  bool all = true;
  for (const PieceRef& pr : pieces) {
    const PlanTarget& t = plan_.ranks[pr.rank].targets[pr.piece->target];
    if (t.dtype != src.dtype) return false;
    ForEachBlock(
        *pr.piece, src.dtype, t.dtype, static_cast<int64_t>(unit.unit->begin / pr.row_bytes),
        static_cast<int64_t>(unit.unit->end / pr.row_bytes),
        [&](const Block& b) { all = all && b.SrcContiguous(es) && b.DstContiguous(es); });
    if (!all) return false;
  }
  uint64_t written = 0;
  for (const PieceRef& pr : pieces) {
    const PlanTarget& t = plan_.ranks[pr.rank].targets[pr.piece->target];
    const OutputFile& f = out_[pr.rank];
    const uint64_t target_at = f.target_offset[pr.piece->target];
    absl::Status s;
    ForEachBlock(
        *pr.piece, src.dtype, t.dtype, static_cast<int64_t>(unit.unit->begin / pr.row_bytes),
        static_cast<int64_t>(unit.unit->end / pr.row_bytes), [&](const Block& b) {
          if (!s.ok()) return;
          const uint64_t n = static_cast<uint64_t>(b.rows * b.width * es);
          s = CopyRange(fd, file_offset + b.src_offset, f, target_at + b.dst_offset, n);
          if (s.ok()) {
            if (options_.start_writeback) StartWriteback(f, target_at + b.dst_offset, n);
            written += n;
          }
        });
    if (!s.ok()) {
      // A filesystem pair without copy_file_range (EXDEV before 5.3, EOPNOTSUPP, EINVAL): read
      // and write instead, for this unit and the rest of the run. Nothing was written wrongly:
      // the unit is simply written again.
      if (written == 0 && (absl::IsInvalidArgument(s) || absl::IsUnimplemented(s) ||
                           absl::StrContains(s.message(), "cross-device"))) {
        copy_file_range_ok_ = false;
        return false;
      }
      return s;
    }
  }
  written_.fetch_add(written, std::memory_order_relaxed);
  return true;
}

absl::Status FdSink::ZeroFill(size_t rank, uint32_t target, uint64_t offset, uint64_t bytes) {
  if (!options_.zero_fill) return absl::OkStatus();
  static const std::byte kZeros[64 << 10] = {};
  const OutputFile& f = out_[rank];
  const uint64_t at = f.target_offset[target] + offset;
  for (uint64_t done = 0; done < bytes;) {
    const uint64_t n = std::min<uint64_t>(sizeof(kZeros), bytes - done);
    WD_RETURN_IF_ERROR(PwriteAll(f, kZeros, n, at + done));
    done += n;
  }
  return absl::OkStatus();
}

}  // namespace detail

absl::Status ExecutePlanToFiles(const Plan& plan, std::span<const OutputFile> files,
                                const ExecutorOptions& options, LoadProgress* progress,
                                uint64_t* bytes_written) {
  if (files.size() != plan.ranks.size()) {
    return absl::InternalError(absl::StrCat("executor got ", files.size(), " output files for ",
                                            plan.ranks.size(), " ranks"));
  }
  std::vector<uint64_t> sizes;
  for (size_t r = 0; r < plan.ranks.size(); ++r) {
    if (files[r].target_offset.size() != plan.ranks[r].targets.size()) {
      return absl::InternalError(absl::StrCat(
          "output file ", files[r].path, " has offsets for ", files[r].target_offset.size(),
          " of the ", plan.ranks[r].targets.size(), " targets of rank ", plan.ranks[r].rank));
    }
    sizes.push_back(plan.ranks[r].arena_bytes);
  }
  const int threads = std::max(1, options.threads);
  const uint64_t slack = options.io_mode != IoMode::kPread ? 2 * kDirectIoAlignment : 0;
  const uint64_t chunk = std::max<uint64_t>(64 << 10, options.chunk_bytes);
  WD_ASSIGN_OR_RETURN(detail::WorkPlan work, detail::BuildWorkPlan(plan, sizes, chunk));
  WD_ASSIGN_OR_RETURN(detail::PlanFiles in, detail::PlanFiles::Open(plan, options.io_mode));
  detail::FdSink sink(plan, files, {.start_writeback = true, .copy_file_range = true});
  absl::Status s = detail::RunReadPipeline(plan, work, in, sink,
                                           {.threads = threads,
                                            .uring_queue_depth = options.uring_queue_depth,
                                            .slot_bytes = chunk + slack},
                                           progress, nullptr);
  if (bytes_written != nullptr) *bytes_written = sink.written();
  return s;
}

}  // namespace weightd
