#include "weightd/detail/read_pipeline.h"

#include <limits.h>
#include <sys/mman.h>
#include <sys/uio.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <memory>
#include <thread>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "weightd/crc32c.h"
#include "weightd/file_util.h"
#include "weightd/status_macros.h"

namespace weightd::detail {
namespace {

// Checksummed right after its read, a step of this size is still in cache.
constexpr uint64_t kCrcStep = 1 << 20;
constexpr int kMaxIov = IOV_MAX;
#ifdef MADV_POPULATE_WRITE
constexpr int kMadvPopulateWrite = MADV_POPULATE_WRITE;
#else
constexpr int kMadvPopulateWrite = 23;  // Linux 5.14; older kernels answer EINVAL
#endif

uint32_t CrcOfZeros(uint64_t n) {
  static const std::byte kZeros[64 << 10] = {};
  uint32_t crc = 0;
  for (uint64_t off = 0; off < n; off += sizeof(kZeros)) {
    crc = Crc32cExtend(crc, kZeros, std::min<uint64_t>(sizeof(kZeros), n - off));
  }
  return crc;
}

// A run of a unit read in place: `n` source bytes at `src` (from the unit's first byte) land at
// `dst`, which is byte `dst_offset` of target `target` of rank index `rank`.
struct Run {
  uint64_t src;
  uint64_t n;
  std::byte* dst;
  size_t rank;
  uint32_t target;
  uint64_t dst_offset;
};

// How a unit is read in place, if it can be.
enum class InPlace {
  kNo,        // read into a buffer
  kAll,       // `runs` place every piece
  kVerbatim,  // `runs` place one verbatim piece; the others are copied from its target
};

// Fills `runs` (sorted by source offset, no two overlapping) for reading unit `u` straight into
// the arenas at `bases`, or says why not: a piece that casts, or pieces that read the same bytes
// (replicated tensors) without a verbatim one among them.
InPlace PlanInPlace(const Plan& plan, const WorkPlan& work, const WorkUnit& u,
                    const std::vector<std::byte*>& bases, std::vector<Run>& runs,
                    std::vector<PieceRef>& rest) {
  runs.clear();
  rest.clear();
  const PlanSource& src = plan.sources[u.source];
  const std::vector<PieceRef>& pieces = work.by_source[u.source];
  const int v = work.verbatim[u.source];
  if (v >= 0 && pieces.size() > 1) {
    const PieceRef& pr = pieces[v];
    const PlanTarget& t = plan.ranks[pr.rank].targets[pr.piece->target];
    runs.push_back({0, u.end - u.begin, bases[pr.rank] + t.offset + u.begin, pr.rank,
                    pr.piece->target, u.begin});
    for (size_t k = 0; k < pieces.size(); ++k) {
      if (static_cast<int>(k) != v) rest.push_back(pieces[k]);
    }
    return InPlace::kVerbatim;
  }
  const int64_t es = DTypeSize(src.dtype);
  for (const PieceRef& pr : pieces) {
    const PlanTarget& t = plan.ranks[pr.rank].targets[pr.piece->target];
    if (t.dtype != src.dtype) return InPlace::kNo;
    std::byte* base = bases[pr.rank] + t.offset;
    ForEachBlock(*pr.piece, src.dtype, t.dtype, static_cast<int64_t>(u.begin / pr.row_bytes),
                 static_cast<int64_t>(u.end / pr.row_bytes), [&](const Block& b) {
                   if (b.SrcContiguous(es) && b.DstContiguous(es)) {
                     const uint64_t n = static_cast<uint64_t>(b.rows * b.width * es);
                     runs.push_back({static_cast<uint64_t>(b.src_offset), n, base + b.dst_offset,
                                     pr.rank, pr.piece->target,
                                     static_cast<uint64_t>(b.dst_offset)});
                     return;
                   }
                   for (int64_t r = 0; r < b.rows; ++r) {
                     const uint64_t d = static_cast<uint64_t>(b.dst_offset + r * b.dst_pitch);
                     runs.push_back({static_cast<uint64_t>(b.src_offset + r * b.src_pitch),
                                     static_cast<uint64_t>(b.width * es), base + d, pr.rank,
                                     pr.piece->target, d});
                   }
                 });
  }
  std::sort(runs.begin(), runs.end(), [](const Run& a, const Run& b) { return a.src < b.src; });
  for (size_t k = 1; k < runs.size(); ++k) {
    if (runs[k].src < runs[k - 1].src + runs[k - 1].n) return InPlace::kNo;
  }
  return InPlace::kAll;
}

// preadv of every iovec in `iov` from `offset`, resuming after short reads; the error of
// PreadExact (file, offset, missing bytes) for a truncated file.
absl::Status PreadvExact(int fd, std::span<iovec> iov, uint64_t offset, const std::string& label) {
  size_t first = 0;
  while (first < iov.size()) {
    const ssize_t r = ::preadv(fd, iov.data() + first,
                               static_cast<int>(std::min<size_t>(iov.size() - first, kMaxIov)),
                               static_cast<off_t>(offset));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) {
      // Let the plain read name the failure and the missing bytes.
      return PreadExact(fd, iov[first].iov_base, iov[first].iov_len, offset, label);
    }
    uint64_t got = static_cast<uint64_t>(r);
    offset += got;
    while (first < iov.size() && got >= iov[first].iov_len) got -= iov[first++].iov_len;
    if (got > 0) {
      iov[first].iov_base = static_cast<std::byte*>(iov[first].iov_base) + got;
      iov[first].iov_len -= got;
    }
  }
  return absl::OkStatus();
}

// Reads `runs` of the unit at file offset `file_offset` in steps of about kCrcStep (one preadv
// per step of file-contiguous runs; source gaps no piece needs are skipped), checksumming each
// step's runs right after the read.
absl::Status ReadRuns(int fd, uint64_t file_offset, const std::vector<Run>& runs,
                      std::vector<iovec>& iov, CrcSegments& crc, const std::string& label,
                      uint64_t* bytes_read) {
  struct Part {
    const Run* run;
    uint64_t skip, n;
  };
  std::vector<Part> parts;
  size_t k = 0;
  uint64_t skip = 0;
  while (k < runs.size()) {
    iov.clear();
    parts.clear();
    const uint64_t start = runs[k].src + skip;
    uint64_t pos = start;
    while (k < runs.size() && iov.size() < static_cast<size_t>(kMaxIov) &&
           pos - start < kCrcStep && runs[k].src + skip == pos) {
      const Run& r = runs[k];
      const uint64_t n = std::min(r.n - skip, kCrcStep - (pos - start));
      iov.push_back({r.dst + skip, n});
      parts.push_back({&r, skip, n});
      pos += n;
      skip += n;
      if (skip == r.n) {
        ++k;
        skip = 0;
      }
    }
    WD_RETURN_IF_ERROR(PreadvExact(fd, iov, file_offset + start, label));
    *bytes_read += pos - start;
    for (const Part& p : parts) {
      crc.Add(p.run->rank, p.run->target, p.run->dst_offset + p.skip, p.run->dst + p.skip, p.n);
    }
  }
  return absl::OkStatus();
}

// Faults in the destination pages of `runs` with one MADV_POPULATE_WRITE per stretch of
// adjacent pages. Advisory: the reads fault in whatever this leaves out.
void Prefault(const std::vector<Run>& runs, std::vector<std::pair<uintptr_t, uintptr_t>>& spans) {
  constexpr uintptr_t kPage = 4096;
  spans.clear();
  for (const Run& r : runs) {
    const auto b = reinterpret_cast<uintptr_t>(r.dst);
    spans.push_back({b & ~(kPage - 1), (b + r.n + kPage - 1) & ~(kPage - 1)});
  }
  std::sort(spans.begin(), spans.end());
  for (size_t k = 0; k < spans.size();) {
    uintptr_t b = spans[k].first, e = spans[k].second;
    for (++k; k < spans.size() && spans[k].first <= e; ++k) e = std::max(e, spans[k].second);
    (void)::madvise(reinterpret_cast<void*>(b), e - b, kMadvPopulateWrite);
  }
}

}  // namespace

void CrcSegments::Add(size_t rank, uint32_t target, uint64_t offset, const std::byte* data,
                      uint64_t n) {
  // Extending the open segment's CRC over the new bytes costs nothing beyond checksumming them;
  // combining a separate CRC (Crc32cCombine) would cost a GF(2) matrix product per row run,
  // which dominated loads whose slices are runs of a few KiB (row-parallel at TP=4).
  for (Segment& s : open_) {
    if (s.rank == rank && s.target == target && s.end == offset) {
      s.crc = Crc32cExtend(s.crc, data, n);
      s.end += n;
      return;
    }
  }
  AddKnown(rank, target, offset, n, Crc32c(data, n));
}

void CrcSegments::AddKnown(size_t rank, uint32_t target, uint64_t offset, uint64_t n,
                           uint32_t crc) {
  for (Segment& s : open_) {
    if (s.rank != rank || s.target != target) continue;
    if (s.end == offset) {
      s.crc = Crc32cCombine(s.crc, crc, n);
      s.end += n;
      return;
    }
    done_.push_back(s);
    s = {rank, target, offset, offset + n, crc};
    return;
  }
  open_.push_back({rank, target, offset, offset + n, crc});
}

void CrcSegments::Flush() {
  done_.insert(done_.end(), open_.begin(), open_.end());
  open_.clear();
}

void CrcSegments::Combine(const Plan& plan, std::vector<CrcSegments>& parts,
                          TargetChecksums* out) {
  out->crc.assign(plan.ranks.size(), {});
  for (size_t r = 0; r < plan.ranks.size(); ++r) {
    out->crc[r].assign(plan.ranks[r].targets.size(), -1);
    for (size_t t = 0; t < plan.ranks[r].targets.size(); ++t) {
      if (plan.ranks[r].targets[t].nbytes == 0) out->crc[r][t] = 0;
    }
  }
  std::vector<Segment> all;
  for (CrcSegments& p : parts) {
    p.Flush();
    all.insert(all.end(), p.done_.begin(), p.done_.end());
  }
  std::sort(all.begin(), all.end(), [](const Segment& a, const Segment& b) {
    return std::tie(a.rank, a.target, a.begin, a.end) < std::tie(b.rank, b.target, b.begin, b.end);
  });
  for (size_t k = 0; k < all.size();) {
    const size_t rank = all[k].rank;
    const uint32_t target = all[k].target;
    uint64_t end = 0;
    uint32_t crc = 0;
    bool tiled = true;
    for (; k < all.size() && all[k].rank == rank && all[k].target == target; ++k) {
      tiled = tiled && all[k].begin == end;
      crc = Crc32cCombine(crc, all[k].crc, all[k].end - all[k].begin);
      end = all[k].end;
    }
    if (tiled && end == plan.ranks[rank].targets[target].nbytes) out->crc[rank][target] = crc;
  }
}

absl::Status RunReadPipeline(const Plan& plan, const WorkPlan& work, const PlanFiles& files,
                             Sink& sink, const PipelineOptions& options, LoadProgress* progress,
                             TargetChecksums* checksums) {
  progress->bytes_total.store(work.total_bytes);
  const int threads = std::max(1, options.threads);
  // In place needs host memory for every rank.
  std::vector<std::byte*> bases(plan.ranks.size(), nullptr);
  bool in_place = true;
  for (size_t r = 0; r < plan.ranks.size(); ++r) {
    bases[r] = sink.HostBase(r);
    in_place = in_place && bases[r] != nullptr;
  }
  StagingRing* const sink_ring = sink.ring();
  std::unique_ptr<StagingRing> own_ring;
  if (sink_ring == nullptr && files.staged()) {
    const uint64_t slot =
        (std::max<uint64_t>(options.slot_bytes, 4096) + kDirectIoAlignment - 1) /
        kDirectIoAlignment * kDirectIoAlignment;
    WD_ASSIGN_OR_RETURN(own_ring, StagingRing::Create(std::make_shared<PageAllocator>(),
                                                      {.budget = slot * threads,
                                                       .slot_bytes = slot,
                                                       .max_slots = threads}));
  }
  StagingRing* const ring = sink_ring != nullptr ? sink_ring : own_ring.get();

  const std::vector<WorkUnit>& units = work.units;
  std::vector<CrcSegments> segments(threads);
  std::atomic<size_t> next{0};
  absl::Mutex mu;
  absl::Status first_error;  // guarded by mu
  std::atomic<bool> failed{false};
  std::atomic<bool> uring_warned{false};
  auto fail = [&](absl::Status s) {
    absl::MutexLock l(&mu);
    if (first_error.ok()) first_error = std::move(s);
    failed = true;
  };

  auto worker = [&](int w) {
    absl::StatusOr<std::unique_ptr<SinkWorker>> made = sink.NewWorker(w);
    if (!made.ok()) return fail(made.status());
    SinkWorker& out = **made;
    LazyUringReader reader(options.uring_queue_depth, &uring_warned);
    CrcSegments& crc = segments[w];
    std::vector<std::byte> buffer;
    std::vector<Run> runs;
    std::vector<PieceRef> rest;
    std::vector<iovec> iov;
    std::vector<std::pair<uintptr_t, uintptr_t>> spans;
    auto process = [&](size_t i) -> absl::Status {
      const WorkUnit& u = units[i];
      const PlanSource& src = plan.sources[u.source];
      const uint64_t len = u.end - u.begin;
      const uint64_t file_offset = src.offset + u.begin;
      UringReader* uring = nullptr;
      if (ring != nullptr && files.WantUring(src.file, file_offset, len, ring->slot_bytes())) {
        uring = reader.get();
      }
      if (uring == nullptr && sink_ring == nullptr && in_place) {
        const InPlace how = PlanInPlace(plan, work, u, bases, runs, rest);
        if (how != InPlace::kNo) {
          const std::string label =
              absl::StrCat(files.path(src.file), " (tensor '", src.name, "')");
          if (options.prefault) Prefault(runs, spans);
          uint64_t read = 0;
          WD_RETURN_IF_ERROR(ReadRuns(files.fd(src.file), file_offset, runs, iov, crc, label,
                                      &read));
          progress->bytes_pread.fetch_add(read, std::memory_order_relaxed);
          progress->bytes_in_place.fetch_add(read, std::memory_order_relaxed);
          if (how == InPlace::kAll) return absl::OkStatus();
          return out.Write({i, &u, {runs[0].dst, len}, nullptr, &crc}, rest);
        }
      }
      StagingSlot slot;
      std::byte* dst;
      uint64_t capacity;
      if (uring != nullptr || sink_ring != nullptr) {
        WD_ASSIGN_OR_RETURN(slot, ring->Acquire());
        dst = slot.data();
        capacity = slot.size();
      } else {
        if (buffer.size() < len) buffer.resize(len);
        dst = buffer.data();
        capacity = buffer.size();
      }
      WD_ASSIGN_OR_RETURN(std::span<const std::byte> bytes,
                          ReadInto(files, uring, src.file, file_offset, len, dst, capacity,
                                   src.name, progress));
      return out.Write({i, &u, bytes, slot ? &slot : nullptr, &crc},
                       work.by_source[u.source]);
    };
    for (;;) {
      if (failed.load(std::memory_order_relaxed)) return;
      if (progress->cancel.load(std::memory_order_relaxed)) {
        return fail(absl::CancelledError("load cancelled (unload --force)"));
      }
      const size_t i = next.fetch_add(1);
      if (i >= units.size()) return;
      // The unit this worker will likely take next, read ahead by the kernel meanwhile (the
      // page-cache path only: in the staged modes a cold unit must stay cold for O_DIRECT).
      if (const size_t ahead = i + static_cast<size_t>(threads);
          !files.staged() && ahead < units.size()) {
        const WorkUnit& u = units[ahead];
        const PlanSource& s = plan.sources[u.source];
        files.WillNeed(s.file, s.offset + u.begin, u.end - u.begin);
      }
      absl::Status s = process(i);
      crc.Flush();
      if (!s.ok()) return fail(std::move(s));
      progress->bytes_done.fetch_add(units[i].end - units[i].begin, std::memory_order_relaxed);
    }
  };
  {
    std::vector<std::thread> pool;
    const int n = static_cast<int>(std::min<size_t>(threads, std::max<size_t>(units.size(), 1)));
    for (int w = 1; w < n; ++w) pool.emplace_back(worker, w);
    worker(0);
    for (std::thread& t : pool) t.join();
  }
  {
    absl::MutexLock l(&mu);
    if (!first_error.ok()) return first_error;
  }
  WD_RETURN_IF_ERROR(files.CheckUnchanged());

  for (size_t r = 0; r < plan.ranks.size(); ++r) {
    const RankPlan& rp = plan.ranks[r];
    for (const PlanZeroFill& z : rp.zero_fills) {
      if (z.target >= rp.targets.size() || z.offset > rp.targets[z.target].nbytes ||
          z.nbytes > rp.targets[z.target].nbytes - z.offset) {
        return absl::InternalError(
            absl::StrCat("zero-fill of rank ", rp.rank, " lies outside its target"));
      }
      if (z.nbytes == 0) continue;
      WD_RETURN_IF_ERROR(sink.ZeroFill(r, rp.targets[z.target].offset + z.offset, z.nbytes));
      segments[0].AddKnown(r, z.target, z.offset, z.nbytes, CrcOfZeros(z.nbytes));
    }
  }
  if (checksums != nullptr) CrcSegments::Combine(plan, segments, checksums);
  return absl::OkStatus();
}

}  // namespace weightd::detail
