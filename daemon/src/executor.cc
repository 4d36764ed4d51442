#include "weightd/executor.h"

#include <algorithm>
#include <cstring>
#include <memory>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "weightd/crc32c.h"
#include "weightd/detail/staging_ring.h"
#include "weightd/detail/uring_reader.h"
#include "weightd/detail/work_units.h"
#include "weightd/file_util.h"
#include "weightd/kernels/copy.h"
#include "weightd/status_macros.h"

namespace weightd {
namespace {

int64_t Prod(const Index3& a) { return a[0] * a[1] * a[2]; }

}  // namespace

// Checks that a piece stays inside its source, its target and the arena, so a plan that
// disagrees with itself fails the load instead of corrupting memory.
absl::Status CheckPlanPiece(const Plan& plan, const RankPlan& rp, const PlanPiece& p,
                            uint64_t arena_size) {
  auto bad = [&](absl::string_view why) {
    return absl::InternalError(absl::StrCat(
        "plan piece for target '", p.target < rp.targets.size() ? rp.targets[p.target].name : "?",
        "' of rank ", rp.rank, ": ", why));
  };
  if (p.source >= plan.sources.size()) return bad("source index out of range");
  if (p.target >= rp.targets.size()) return bad("target index out of range");
  const PlanSource& s = plan.sources[p.source];
  const PlanTarget& t = rp.targets[p.target];
  if (s.file >= plan.files.size()) return bad("source file index out of range");
  for (int d = 0; d < 3; ++d) {
    if (p.extent[d] < 0 || p.src_start[d] < 0 || p.dst_start[d] < 0 ||
        p.src_start[d] + p.extent[d] > p.src_shape[d] ||
        p.dst_start[d] + p.extent[d] > p.dst_shape[d]) {
      return bad(absl::StrCat("box exceeds its shape in dim ", d));
    }
  }
  if (static_cast<uint64_t>(Prod(p.src_shape)) * DTypeSize(s.dtype) != s.nbytes) {
    return bad(
        absl::StrCat("source view does not match the ", s.nbytes, " bytes of '", s.name, "'"));
  }
  if (static_cast<uint64_t>(Prod(p.dst_shape)) * DTypeSize(t.dtype) != t.nbytes) {
    return bad("target view does not match the target's bytes");
  }
  if (t.offset + t.nbytes > arena_size || t.offset + t.nbytes < t.offset) {
    return bad("target lies outside the arena");
  }
  return absl::OkStatus();
}

#ifndef WEIGHTD_HAVE_CUDA_BACKEND
absl::Status ExecutePlanCuda(const Plan&, std::span<Arena* const>, const ExecutorOptions&,
                             LoadProgress*, TargetChecksums*) {
  return absl::UnimplementedError(
      "the CUDA executor is not in this build (configured with WEIGHTD_ENABLE_CUDA=OFF)");
}

absl::StatusOr<std::unique_ptr<CudaStaging>> CreateCudaStaging(uint64_t, int, int) {
  return absl::UnimplementedError(
      "pinned CUDA staging is not in this build (configured with WEIGHTD_ENABLE_CUDA=OFF)");
}
#endif

absl::Status CopyArenaRanges(const Arena& from, Arena& to, std::span<const ArenaRange> ranges,
                             int threads, LoadProgress* progress) {
  for (const ArenaRange& r : ranges) {
    if (r.offset > from.size() || r.bytes > from.size() - r.offset || r.offset > to.size() ||
        r.bytes > to.size() - r.offset) {
      return absl::InternalError(absl::StrCat("arena copy of bytes [", r.offset, ", ",
                                              r.offset + r.bytes, ") leaves an arena of ",
                                              std::min(from.size(), to.size()), " bytes"));
    }
  }
  if (from.kind() == ArenaKind::kCudaVmm || to.kind() == ArenaKind::kCudaVmm) {
#ifdef WEIGHTD_HAVE_CUDA_BACKEND
    return CopyArenaRangesCuda(from, to, ranges);
#else
    return absl::UnimplementedError(
        "device arenas cannot be copied in this build (configured with WEIGHTD_ENABLE_CUDA=OFF)");
#endif
  }
  const std::span<const std::byte> src = from.readable();
  const int dst = to.host_fd();
  if (src.size() < from.size() || dst < 0) {
    return absl::InternalError("arena copy: an arena has no host view (sealed or not yet)");
  }
  // Ranges cut in steps of at most 64 MiB, taken by `threads` workers. pwrite, not a mapping of
  // `to`: fresh pages are not zeroed first and none needs unmapping before the seal.
  constexpr uint64_t kStep = 64ull << 20;
  std::vector<ArenaRange> steps;
  for (const ArenaRange& r : ranges) {
    for (uint64_t off = 0; off < r.bytes; off += kStep) {
      steps.push_back({r.offset + off, std::min(kStep, r.bytes - off)});
    }
  }
  std::atomic<size_t> next{0};
  absl::Mutex mu;
  absl::Status first;
  auto worker = [&] {
    for (size_t i; (i = next.fetch_add(1)) < steps.size();) {
      if (progress != nullptr && progress->cancel.load()) return;
      const ArenaRange& st = steps[i];
      absl::Status s = PwriteExact(dst, src.data() + st.offset, st.bytes, st.offset,
                                   absl::StrCat("the memfd of arena ", to.label()));
      if (!s.ok()) {
        absl::MutexLock l(&mu);
        if (first.ok()) first = std::move(s);
        return;
      }
    }
  };
  std::vector<std::thread> pool;
  const size_t workers = std::min<size_t>(std::max(1, threads), steps.size());
  for (size_t i = 1; i < workers; ++i) pool.emplace_back(worker);
  worker();
  for (std::thread& t : pool) t.join();
  if (!first.ok()) return first;
  if (progress != nullptr && progress->cancel.load()) {
    return absl::CancelledError("arena copy cancelled");
  }
  return absl::OkStatus();
}

absl::StatusOr<IoMode> ParseIoMode(absl::string_view text) {
  if (text == "auto") return IoMode::kAuto;
  if (text == "pread") return IoMode::kPread;
  if (text == "uring") return IoMode::kUring;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown io_mode '", text, "' (expected auto, pread or uring)"));
}

absl::string_view IoModeName(IoMode mode) {
  switch (mode) {
    case IoMode::kAuto:
      return "auto";
    case IoMode::kPread:
      return "pread";
    case IoMode::kUring:
      return "uring";
  }
  return "?";
}

absl::StatusOr<Manifest> BuildRankManifest(const Plan& plan, size_t rank_index, const Arena& arena,
                                           absl::string_view model, int device, int threads,
                                           const std::vector<int64_t>* known) {
  const RankPlan& rp = plan.ranks[rank_index];
  std::span<const std::byte> bytes = arena.readable();
  Manifest m;
  m.model = std::string(model);
  m.rank = static_cast<uint32_t>(rp.rank);
  m.device = device;
  m.arenas.push_back({arena.size(), arena.kind()});
  m.tensors.resize(rp.targets.size());
  for (size_t i = 0; i < rp.targets.size(); ++i) {
    const PlanTarget& t = rp.targets[i];
    ManifestTensor& mt = m.tensors[i];
    mt.name = t.name;
    mt.dtype = t.dtype;
    mt.shape = t.shape;
    mt.strides = ContiguousStrides(t.shape);
    mt.arena = 0;
    mt.offset = t.offset;
    mt.nbytes = t.nbytes;
    if (t.offset + t.nbytes > arena.size()) {
      return absl::InternalError(absl::StrCat("target '", t.name, "' lies outside its arena"));
    }
  }
  const bool host_view = bytes.size() >= arena.size();
  if (host_view || known != nullptr) {
    std::atomic<size_t> next{0};
    auto worker = [&]() {
      for (size_t i; (i = next.fetch_add(1)) < m.tensors.size();) {
        if (known != nullptr && i < known->size() && (*known)[i] >= 0) {
          m.tensors[i].crc32c = static_cast<uint32_t>((*known)[i]);
        } else if (host_view) {
          m.tensors[i].crc32c = Crc32c(bytes.data() + m.tensors[i].offset, m.tensors[i].nbytes);
        }
      }
    };
    std::vector<std::thread> pool;
    for (int i = 1; i < std::max(1, threads); ++i) pool.emplace_back(worker);
    worker();
    for (std::thread& t : pool) t.join();
  }
  return m;
}

absl::StatusOr<Manifest> BuildSegmentedManifest(const SegmentedPlan& sp, size_t rank,
                                                std::span<const Arena* const> arenas,
                                                absl::string_view model, int device, int threads,
                                                const std::vector<int64_t>* known) {
  if (rank >= sp.segments_of.size() || arenas.size() != sp.segments_of[rank].size()) {
    return absl::InternalError(absl::StrCat("manifest of rank index ", rank, ": ", arenas.size(),
                                            " arenas for its segments"));
  }
  const std::vector<size_t>& segs = sp.segments_of[rank];
  Manifest m;
  m.model = std::string(model);
  m.rank = static_cast<uint32_t>(sp.plan.ranks[segs[0]].rank);
  m.device = device;
  for (const Arena* a : arenas) m.arenas.push_back({a->size(), a->kind()});
  const std::vector<std::pair<size_t, uint32_t>>& where = sp.where[rank];
  m.tensors.resize(where.size());
  std::vector<std::span<const std::byte>> views(arenas.size());
  for (size_t k = 0; k < arenas.size(); ++k) {
    views[k] = arenas[k]->readable();
    if (views[k].size() < arenas[k]->size()) views[k] = {};
  }
  for (size_t i = 0; i < where.size(); ++i) {
    const auto [seg, local] = where[i];
    const uint32_t k = sp.segment_in_rank[seg];
    const PlanTarget& t = sp.plan.ranks[seg].targets[local];
    ManifestTensor& mt = m.tensors[i];
    mt.name = t.name;
    mt.dtype = t.dtype;
    mt.shape = t.shape;
    mt.strides = ContiguousStrides(t.shape);
    mt.arena = k;
    mt.offset = t.offset;
    mt.nbytes = t.nbytes;
    if (k >= arenas.size() || t.offset + t.nbytes > arenas[k]->size()) {
      return absl::InternalError(absl::StrCat("target '", t.name, "' lies outside its arena"));
    }
  }
  std::atomic<size_t> next{0};
  auto worker = [&]() {
    for (size_t i; (i = next.fetch_add(1)) < m.tensors.size();) {
      ManifestTensor& mt = m.tensors[i];
      if (known != nullptr && i < known->size() && (*known)[i] >= 0) {
        mt.crc32c = static_cast<uint32_t>((*known)[i]);
      } else if (!views[mt.arena].empty()) {
        mt.crc32c = Crc32c(views[mt.arena].data() + mt.offset, mt.nbytes);
      }
    }
  };
  std::vector<std::thread> pool;
  for (int i = 1; i < std::max(1, threads); ++i) pool.emplace_back(worker);
  worker();
  for (std::thread& t : pool) t.join();
  return m;
}

}  // namespace weightd
