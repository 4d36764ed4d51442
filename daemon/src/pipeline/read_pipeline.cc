#include "weightd/detail/read_pipeline.h"

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

// Bytes of each read from the page cache (rounded down to whole rows): small enough that the
// sink writes them while they are still in cache (L2) after the read.
constexpr uint64_t kReadStep = 1 << 20;

uint32_t CrcOfZeros(uint64_t n) {
  static const std::byte kZeros[64 << 10] = {};
  uint32_t crc = 0;
  for (uint64_t off = 0; off < n; off += sizeof(kZeros)) {
    crc = Crc32cExtend(crc, kZeros, std::min<uint64_t>(sizeof(kZeros), n - off));
  }
  return crc;
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
        segments_(threads_),
        queue_(work, threads_) {}

  absl::Status Execute(TargetChecksums* checksums);

 private:
  // A worker's own buffers, reused from unit to unit.
  struct Worker {
    SinkWorker* out = nullptr;
    LazyUringReader* uring = nullptr;
    CrcSegments* crc = nullptr;
    std::vector<std::byte> buffer;
  };

  absl::Status Prepare();
  void Work(int w);
  absl::Status ReadUnit(Worker& wk, size_t i);
  // A unit read into a staging slot (io_uring, or the sink's ring), then written by the sink.
  absl::Status ReadIntoSlot(Worker& wk, size_t i, UringReader* uring);
  // A unit read from the page cache into the worker's buffer in steps of kReadStep, each
  // written by the sink right after its read.
  absl::Status ReadInSteps(Worker& wk, size_t i);
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
  StagingRing* sink_ring_ = nullptr;
  std::unique_ptr<StagingRing> own_ring_;
  StagingRing* ring_ = nullptr;        // sink_ring_ or own_ring_
  std::vector<CrcSegments> segments_;  // [worker]
  UnitQueue queue_;
  std::atomic<bool> failed_{false};
  std::atomic<bool> uring_warned_{false};
  absl::Mutex mu_;
  absl::Status first_error_ ABSL_GUARDED_BY(mu_);
};

absl::Status Pipeline::Prepare() {
  progress_->bytes_total.store(work_.total_bytes);
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

absl::Status Pipeline::ReadIntoSlot(Worker& wk, size_t i, UringReader* uring) {
  const WorkUnit& u = work_.units[i];
  const PlanSource& src = plan_.sources[u.source];
  WD_ASSIGN_OR_RETURN(StagingSlot slot, ring_->Acquire());
  WD_ASSIGN_OR_RETURN(std::span<const std::byte> bytes,
                      ReadInto(files_, uring, src.file, src.offset + u.begin, u.end - u.begin,
                               slot.data(), slot.size(), src.name, progress_));
  return wk.out->Write({i, &u, bytes, &slot, wk.crc}, work_.by_source[u.source]);
}

absl::Status Pipeline::ReadInSteps(Worker& wk, size_t i) {
  const WorkUnit& u = work_.units[i];
  const PlanSource& src = plan_.sources[u.source];
  // Whole row groups of every piece reading this source.
  const uint64_t rows = work_.row_align[u.source];
  const uint64_t step = std::max(rows, kReadStep - kReadStep % rows);
  if (wk.buffer.size() < std::min(step, u.end - u.begin)) {
    wk.buffer.resize(std::min(step, u.end - u.begin));
  }
  for (uint64_t b = u.begin; b < u.end; b += step) {
    if (failed_.load(std::memory_order_relaxed)) return absl::OkStatus();
    const WorkUnit part{u.source, b, std::min(u.end, b + step)};
    WD_ASSIGN_OR_RETURN(std::span<const std::byte> bytes,
                        ReadInto(files_, nullptr, src.file, src.offset + b, part.end - b,
                                 wk.buffer.data(), wk.buffer.size(), src.name, progress_));
    WD_RETURN_IF_ERROR(wk.out->Write({i, &part, bytes, nullptr, wk.crc}, work_.by_source[u.source]));
  }
  return absl::OkStatus();
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
  if (uring == nullptr && sink_ring_ == nullptr) return ReadInSteps(wk, i);
  return ReadIntoSlot(wk, i, uring);
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
    std::optional<size_t> ahead;
    const std::optional<size_t> next = queue_.Take(w, &ahead);
    if (!next) return;
    const size_t i = *next;
    // The unit this worker will likely take next, read ahead by the kernel meanwhile (the
    // page-cache path only: in the staged modes a cold unit must stay cold for O_DIRECT).
    if (ahead && !files_.staged()) {
      const WorkUnit& u = units[*ahead];
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
      WD_RETURN_IF_ERROR(sink_.ZeroFill(r, z.target, z.offset, z.nbytes));
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
