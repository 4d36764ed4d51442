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
    ForEachBlock(
        *pr.piece, src.dtype, t.dtype, static_cast<int64_t>(u.begin / pr.row_bytes),
        static_cast<int64_t>(u.end / pr.row_bytes), [&](const Block& b) {
          if (b.SrcContiguous(es) && b.DstContiguous(es)) {
            const uint64_t n = static_cast<uint64_t>(b.rows * b.width * es);
            runs.push_back({static_cast<uint64_t>(b.src_offset), n, base + b.dst_offset, pr.rank,
                            pr.piece->target, static_cast<uint64_t>(b.dst_offset)});
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
    while (k < runs.size() && iov.size() < static_cast<size_t>(kMaxIov) && pos - start < kCrcStep &&
           runs[k].src + skip == pos) {
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

void CrcSegments::Combine(const Plan& plan, std::vector<CrcSegments>& parts, TargetChecksums* out) {
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

namespace {

// One RunReadPipeline call: the state its workers share, and one method per stage.
class Pipeline {
 public:
  Pipeline(const Plan& plan, const WorkPlan& work, const PlanFiles& files, Sink& sink,
           const PipelineOptions& options, LoadProgress* progress)
      : plan_(plan),
        work_(work),
        files_(files),
        sink_(sink),
        options_(options),
        progress_(progress),
        threads_(std::max(1, options.threads)),
        segments_(threads_) {}

  absl::Status Execute(TargetChecksums* checksums);

 private:
  // A worker's own buffers, reused from unit to unit.
  struct Worker {
    SinkWorker* out = nullptr;
    LazyUringReader* uring = nullptr;
    CrcSegments* crc = nullptr;
    std::vector<std::byte> buffer;
    std::vector<Run> runs;
    std::vector<PieceRef> rest;
    std::vector<iovec> iov;
    std::vector<std::pair<uintptr_t, uintptr_t>> spans;
  };

  absl::Status Prepare();
  void Work(int w);
  absl::Status ReadUnit(Worker& wk, size_t i);
  // A unit read straight into host arenas; false in `*done` when it cannot be.
  absl::Status ReadInPlace(Worker& wk, size_t i, bool* done);
  // A unit read into a staging slot or the worker's buffer, then written by the sink.
  absl::Status ReadBuffered(Worker& wk, size_t i, UringReader* uring);
  absl::Status ZeroFills();
  void Fail(absl::Status s) {
    absl::MutexLock l(&mu_);
    if (first_error_.ok()) first_error_ = std::move(s);
    failed_ = true;
  }

  const Plan& plan_;
  const WorkPlan& work_;
  const PlanFiles& files_;
  Sink& sink_;
  const PipelineOptions& options_;
  LoadProgress* const progress_;
  const int threads_;
  std::vector<std::byte*> bases_;  // [rank] host memory of the arena, when in place
  bool in_place_ = true;
  StagingRing* sink_ring_ = nullptr;
  std::unique_ptr<StagingRing> own_ring_;
  StagingRing* ring_ = nullptr;        // sink_ring_ or own_ring_
  std::vector<CrcSegments> segments_;  // [worker]
  std::atomic<size_t> next_{0};
  std::atomic<bool> failed_{false};
  std::atomic<bool> uring_warned_{false};
  absl::Mutex mu_;
  absl::Status first_error_ ABSL_GUARDED_BY(mu_);
};

absl::Status Pipeline::Prepare() {
  progress_->bytes_total.store(work_.total_bytes);
  bases_.assign(plan_.ranks.size(), nullptr);
  for (size_t r = 0; r < plan_.ranks.size(); ++r) {
    bases_[r] = sink_.HostBase(r);
    in_place_ = in_place_ && bases_[r] != nullptr;
  }
  sink_ring_ = sink_.ring();
  if (sink_ring_ == nullptr && files_.staged()) {
    const uint64_t slot = (std::max<uint64_t>(options_.slot_bytes, 4096) + kDirectIoAlignment - 1) /
                          kDirectIoAlignment * kDirectIoAlignment;
    WD_ASSIGN_OR_RETURN(
        own_ring_, StagingRing::Create(
                       std::make_shared<PageAllocator>(),
                       {.budget = slot * threads_, .slot_bytes = slot, .max_slots = threads_}));
  }
  ring_ = sink_ring_ != nullptr ? sink_ring_ : own_ring_.get();
  return absl::OkStatus();
}

absl::Status Pipeline::ReadInPlace(Worker& wk, size_t i, bool* done) {
  *done = false;
  const WorkUnit& u = work_.units[i];
  const InPlace how = PlanInPlace(plan_, work_, u, bases_, wk.runs, wk.rest);
  if (how == InPlace::kNo) return absl::OkStatus();
  *done = true;
  const PlanSource& src = plan_.sources[u.source];
  const std::string label = absl::StrCat(files_.path(src.file), " (tensor '", src.name, "')");
  if (options_.prefault) Prefault(wk.runs, wk.spans);
  uint64_t read = 0;
  WD_RETURN_IF_ERROR(
      ReadRuns(files_.fd(src.file), src.offset + u.begin, wk.runs, wk.iov, *wk.crc, label, &read));
  progress_->bytes_pread.fetch_add(read, std::memory_order_relaxed);
  progress_->bytes_in_place.fetch_add(read, std::memory_order_relaxed);
  if (how == InPlace::kAll) return absl::OkStatus();
  // The replicas copy from the verbatim target just read.
  return wk.out->Write({i, &u, {wk.runs[0].dst, u.end - u.begin}, nullptr, wk.crc}, wk.rest);
}

absl::Status Pipeline::ReadBuffered(Worker& wk, size_t i, UringReader* uring) {
  const WorkUnit& u = work_.units[i];
  const PlanSource& src = plan_.sources[u.source];
  const uint64_t len = u.end - u.begin;
  StagingSlot slot;
  std::byte* dst;
  uint64_t capacity;
  if (uring != nullptr || sink_ring_ != nullptr) {
    WD_ASSIGN_OR_RETURN(slot, ring_->Acquire());
    dst = slot.data();
    capacity = slot.size();
  } else {
    if (wk.buffer.size() < len) wk.buffer.resize(len);
    dst = wk.buffer.data();
    capacity = wk.buffer.size();
  }
  WD_ASSIGN_OR_RETURN(std::span<const std::byte> bytes,
                      ReadInto(files_, uring, src.file, src.offset + u.begin, len, dst, capacity,
                               src.name, progress_));
  return wk.out->Write({i, &u, bytes, slot ? &slot : nullptr, wk.crc}, work_.by_source[u.source]);
}

absl::Status Pipeline::ReadUnit(Worker& wk, size_t i) {
  const WorkUnit& u = work_.units[i];
  const PlanSource& src = plan_.sources[u.source];
  UringReader* uring = nullptr;
  if (ring_ != nullptr &&
      files_.WantUring(src.file, src.offset + u.begin, u.end - u.begin, ring_->slot_bytes())) {
    uring = wk.uring->get();
  }
  if (uring == nullptr && sink_ring_ == nullptr) {
    WD_ASSIGN_OR_RETURN(
        const bool copied,
        sink_.CopyFromFile(*wk.out, {i, &u, {}, nullptr, wk.crc}, files_.fd(src.file),
                           src.offset + u.begin, work_.by_source[u.source]));
    if (copied) {
      progress_->bytes_pread.fetch_add(u.end - u.begin, std::memory_order_relaxed);
      return absl::OkStatus();
    }
  }
  if (uring == nullptr && sink_ring_ == nullptr && in_place_) {
    bool done = false;
    WD_RETURN_IF_ERROR(ReadInPlace(wk, i, &done));
    if (done) return absl::OkStatus();
  }
  return ReadBuffered(wk, i, uring);
}

void Pipeline::Work(int w) {
  absl::StatusOr<std::unique_ptr<SinkWorker>> out = sink_.NewWorker(w);
  if (!out.ok()) return Fail(out.status());
  LazyUringReader uring(options_.uring_queue_depth, &uring_warned_);
  Worker wk;
  wk.out = out->get();
  wk.uring = &uring;
  wk.crc = &segments_[w];
  const std::vector<WorkUnit>& units = work_.units;
  for (;;) {
    if (failed_.load(std::memory_order_relaxed)) return;
    if (progress_->cancel.load(std::memory_order_relaxed)) {
      return Fail(absl::CancelledError("load cancelled (unload --force)"));
    }
    const size_t i = next_.fetch_add(1);
    if (i >= units.size()) return;
    // The unit this worker will likely take next, read ahead by the kernel meanwhile (the
    // page-cache path only: in the staged modes a cold unit must stay cold for O_DIRECT).
    if (const size_t ahead = i + static_cast<size_t>(threads_);
        !files_.staged() && ahead < units.size()) {
      const WorkUnit& u = units[ahead];
      const PlanSource& s = plan_.sources[u.source];
      files_.WillNeed(s.file, s.offset + u.begin, u.end - u.begin);
    }
    absl::Status s = ReadUnit(wk, i);
    wk.crc->Flush();
    if (!s.ok()) return Fail(std::move(s));
    progress_->bytes_done.fetch_add(units[i].end - units[i].begin, std::memory_order_relaxed);
  }
}

absl::Status Pipeline::ZeroFills() {
  for (size_t r = 0; r < plan_.ranks.size(); ++r) {
    const RankPlan& rp = plan_.ranks[r];
    for (const PlanZeroFill& z : rp.zero_fills) {
      if (z.target >= rp.targets.size() || z.offset > rp.targets[z.target].nbytes ||
          z.nbytes > rp.targets[z.target].nbytes - z.offset) {
        return absl::InternalError(
            absl::StrCat("zero-fill of rank ", rp.rank, " lies outside its target"));
      }
      if (z.nbytes == 0) continue;
      WD_RETURN_IF_ERROR(sink_.ZeroFill(r, rp.targets[z.target].offset + z.offset, z.nbytes));
      segments_[0].AddKnown(r, z.target, z.offset, z.nbytes, CrcOfZeros(z.nbytes));
    }
  }
  return absl::OkStatus();
}

absl::Status Pipeline::Execute(TargetChecksums* checksums) {
  WD_RETURN_IF_ERROR(Prepare());
  {
    std::vector<std::thread> pool;
    const int n =
        static_cast<int>(std::min<size_t>(threads_, std::max<size_t>(work_.units.size(), 1)));
    for (int w = 1; w < n; ++w) pool.emplace_back(&Pipeline::Work, this, w);
    Work(0);
    for (std::thread& t : pool) t.join();
  }
  {
    absl::MutexLock l(&mu_);
    if (!first_error_.ok()) return first_error_;
  }
  WD_RETURN_IF_ERROR(files_.CheckUnchanged());
  WD_RETURN_IF_ERROR(ZeroFills());
  if (checksums != nullptr) CrcSegments::Combine(plan_, segments_, checksums);
  return absl::OkStatus();
}

}  // namespace

absl::Status RunReadPipeline(const Plan& plan, const WorkPlan& work, const PlanFiles& files,
                             Sink& sink, const PipelineOptions& options, LoadProgress* progress,
                             TargetChecksums* checksums) {
  return Pipeline(plan, work, files, sink, options, progress).Execute(checksums);
}

}  // namespace weightd::detail
