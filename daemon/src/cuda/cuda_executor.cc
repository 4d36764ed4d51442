// ExecutePlanCuda (executor.h): the plan into CUDA VMM arenas by DMA from pinned staging slots.
//
// Per work unit (the same row-aligned chunks as the host executor, sources in file order, each
// checkpoint byte read once): pread into a cudaHostAlloc'ed StagingRing slot, then per piece
//   - same dtype, the piece's rows contiguous on both sides -> one cudaMemcpyAsync per plane,
//   - same dtype, strided (row-/column-parallel slices)     -> cudaMemcpy2DAsync per plane,
//                                                             src pitch = source row bytes,
//                                                             dst pitch = target row bytes,
//   - dtype-changing                                        -> the unit's bytes once into a
//     per-worker device scratch buffer, then kernels::LaunchConvert2DDevice per plane.
// Each worker thread owns one stream per device (the workers take units round-robin, so the
// streams do too); a worker's scratch is reused only in its own stream's order. After a unit's
// last copy one event per (device, slot) is recorded, and the slot's fence synchronizes it
// before the ring hands the slot out again. Zero-fills are cudaMemsetAsync.
//
// Checksums: a verbatim target (one piece, whole source, same dtype) gets its CRC32C from the
// staging bytes while they are in cache, as in the host executor. Every other target (slices,
// casts, fused) is copied back after the load (cudaMemcpy D2H, slot by slot) and checksummed
// there: the manifest then always carries a CRC32C of the bytes actually on the device, at the
// cost of one extra D2H pass over the non-verbatim bytes (PCIe D2H is far faster than reading
// the checkpoint).
//
// Teardown order (Resources::~Resources): synchronize every stream, run the ring's fences,
// destroy events, free scratch, destroy streams; the ring (pinned memory) goes last, so no DMA
// can still read a freed slot on an error path.
#include <fcntl.h>

#include <algorithm>
#include <atomic>
#include <map>
#include <memory>
#include <thread>
#include <vector>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "weightd/crc32c.h"
#include "weightd/cuda_backend.h"
#include "weightd/detail/cuda_check.h"
#include "weightd/detail/cuda_pinned_allocator.h"
#include "weightd/detail/staging_ring.h"
#include "weightd/detail/work_units.h"
#include "weightd/executor.h"
#include "weightd/file_util.h"
#include "weightd/kernels/convert_cuda.h"
#include "weightd/kernels/copy.h"
#include "weightd/log.h"
#include "weightd/status_macros.h"
#include "weightd/unique_fd.h"

namespace weightd {
namespace {

using detail::PieceRef;
using detail::WorkUnit;

// CUDA objects of one load. Not thread-safe to create or destroy; the workers only read it.
struct Resources {
  std::unique_ptr<StagingRing> ring;
  std::vector<int> devices;                        // distinct devices of the arenas
  std::vector<std::vector<cudaStream_t>> streams;  // [device index][worker]
  std::vector<std::vector<cudaEvent_t>> events;    // [device index][slot]
  std::vector<std::vector<void*>> scratch;         // [device index][worker], slot_bytes each

  Resources() = default;
  Resources(const Resources&) = delete;
  Resources& operator=(const Resources&) = delete;
  ~Resources() {
    for (size_t d = 0; d < devices.size(); ++d) {
      if (cudaSetDevice(devices[d]) != cudaSuccess) (void)cudaGetLastError();
      for (cudaStream_t s : streams[d]) {
        if (s != nullptr && cudaStreamSynchronize(s) != cudaSuccess) {
          LogWarning("cudaStreamSynchronize at load teardown: %s",
                     cudaGetErrorString(cudaGetLastError()));
        }
      }
    }
    if (ring != nullptr) (void)ring->DrainFences();
    for (size_t d = 0; d < devices.size(); ++d) {
      if (cudaSetDevice(devices[d]) != cudaSuccess) (void)cudaGetLastError();
      for (cudaEvent_t e : events[d]) {
        if (e != nullptr) (void)cudaEventDestroy(e);
      }
      for (void* p : scratch[d]) {
        if (p != nullptr) (void)cudaFree(p);
      }
      for (cudaStream_t s : streams[d]) {
        if (s != nullptr) (void)cudaStreamDestroy(s);
      }
    }
    (void)cudaGetLastError();
  }
};

// Issues the copies of rows [row_begin, row_end) of one piece's source, held in `stage` (host,
// pinned) and, for a cast, in `dev_src` (device, same layout), into the target at `dst_target`.
absl::Status CopyPieceRowsDevice(const PlanPiece& p, DType src_dtype, DType dst_dtype,
                                 const std::byte* stage, const std::byte* dev_src,
                                 int64_t row_begin, int64_t row_end, std::byte* dst_target,
                                 cudaStream_t stream) {
  const int64_t ss = DTypeSize(src_dtype);
  const int64_t ds = DTypeSize(dst_dtype);
  const int64_t src_pitch = p.src_shape[2] * ss;
  const int64_t dst_pitch = p.dst_shape[2] * ds;
  const int64_t width = p.extent[2];
  for (int64_t i = 0; i < p.extent[0]; ++i) {
    const int64_t plane_row0 = (p.src_start[0] + i) * p.src_shape[1] + p.src_start[1];
    const int64_t j_begin = std::max<int64_t>(0, row_begin - plane_row0);
    const int64_t j_end = std::min<int64_t>(p.extent[1], row_end - plane_row0);
    if (j_begin >= j_end) continue;
    const int64_t src_off = (plane_row0 + j_begin - row_begin) * src_pitch + p.src_start[2] * ss;
    const int64_t d_elem =
        ((p.dst_start[0] + i) * p.dst_shape[1] + p.dst_start[1] + j_begin) * p.dst_shape[2] +
        p.dst_start[2];
    std::byte* dst = dst_target + d_elem * ds;
    const int64_t height = j_end - j_begin;
    if (src_dtype != dst_dtype) {
      WD_RETURN_IF_ERROR(kernels::LaunchConvert2DDevice(src_dtype, dev_src + src_off, src_pitch,
                                                        dst_dtype, dst, dst_pitch, width, height,
                                                        stream));
    } else if ((width == p.src_shape[2] && width == p.dst_shape[2]) || height == 1) {
      WD_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dst, stage + src_off,
                                              static_cast<size_t>(height * width * ss),
                                              cudaMemcpyHostToDevice, stream));
    } else {
      WD_CUDA_RETURN_IF_ERROR(
          cudaMemcpy2DAsync(dst, static_cast<size_t>(dst_pitch), stage + src_off,
                            static_cast<size_t>(src_pitch), static_cast<size_t>(width * ss),
                            static_cast<size_t>(height), cudaMemcpyHostToDevice, stream));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status ExecutePlanCuda(const Plan& plan, std::span<Arena* const> rank_arenas,
                             const ExecutorOptions& options, LoadProgress* progress,
                             TargetChecksums* checksums) {
  if (rank_arenas.size() != plan.ranks.size()) {
    return absl::InternalError(absl::StrCat("executor got ", rank_arenas.size(), " arenas for ",
                                            plan.ranks.size(), " ranks"));
  }
  Resources res;
  std::vector<std::byte*> bases(plan.ranks.size());
  std::vector<size_t> dev_index(plan.ranks.size());
  for (size_t r = 0; r < plan.ranks.size(); ++r) {
    Arena* a = rank_arenas[r];
    if (a->kind() != ArenaKind::kCudaVmm || !a->writable().empty() ||
        a->size() < plan.ranks[r].arena_bytes) {
      return absl::InternalError(absl::StrCat("arena of rank ", plan.ranks[r].rank,
                                              " is not a CUDA arena of at least ",
                                              plan.ranks[r].arena_bytes, " bytes"));
    }
    const auto* ca = static_cast<const CudaArena*>(a);
    bases[r] = reinterpret_cast<std::byte*>(static_cast<uintptr_t>(ca->device_ptr()));
    auto it = std::find(res.devices.begin(), res.devices.end(), a->device());
    dev_index[r] = static_cast<size_t>(it - res.devices.begin());
    if (it == res.devices.end()) res.devices.push_back(a->device());
  }
  auto rank_error = [&](size_t r, const absl::Status& s) {
    return Annotate(
        s, absl::StrCat("rank ", plan.ranks[r].rank, " on CUDA device ", rank_arenas[r]->device()));
  };

  const int threads = std::max(1, options.threads);
  const uint64_t chunk = std::max<uint64_t>(
      64 << 10, std::min(options.chunk_bytes, options.buffer_budget / (threads + 1)));
  WD_ASSIGN_OR_RETURN(detail::WorkPlan work, detail::BuildWorkPlan(plan, rank_arenas, chunk));
  const std::vector<std::vector<PieceRef>>& by_source = work.by_source;
  const std::vector<WorkUnit>& units = work.units;
  const std::vector<int>& verbatim = work.verbatim;
  const bool any_cast = work.any_cast;
  const uint64_t total = work.total_bytes, largest = work.largest_unit;
  progress->bytes_total.store(total);

  std::vector<UniqueFd> files(plan.files.size());
  for (size_t f = 0; f < plan.files.size(); ++f) {
    WD_ASSIGN_OR_RETURN(files[f], UniqueFd::Open(plan.files[f].path, O_RDONLY));
  }
  // Slots hold a whole unit (a row group wider than the chunk gets a larger slot); one slot per
  // worker plus one, so a worker can read its next unit while its last one is still in DMA.
  const uint64_t slot_bytes = (std::max<uint64_t>({largest, chunk, 4096}) + 4095) / 4096 * 4096;
  const int slots = threads + 1;
  WD_ASSIGN_OR_RETURN(
      res.ring, StagingRing::Create(
                    std::make_shared<CudaPinnedAllocator>(),
                    {.budget = slot_bytes * slots, .slot_bytes = slot_bytes, .max_slots = slots}));
  res.streams.assign(res.devices.size(), std::vector<cudaStream_t>(threads, nullptr));
  res.events.assign(res.devices.size(), std::vector<cudaEvent_t>(res.ring->slots(), nullptr));
  res.scratch.assign(res.devices.size(), std::vector<void*>(threads, nullptr));
  for (size_t d = 0; d < res.devices.size(); ++d) {
    WD_CUDA_RETURN_IF_ERROR(cudaSetDevice(res.devices[d]));
    for (cudaStream_t& s : res.streams[d]) {
      WD_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    }
    for (cudaEvent_t& e : res.events[d]) {
      WD_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    }
    if (any_cast) {
      for (void*& p : res.scratch[d]) WD_CUDA_RETURN_IF_ERROR(cudaMalloc(&p, slot_bytes));
    }
  }

  std::vector<uint32_t> unit_crc(units.size(), 0);
  std::atomic<size_t> next{0};
  absl::Mutex mu;
  absl::Status first_error;  // guarded by mu
  std::atomic<bool> failed{false};
  auto fail = [&](absl::Status s) {
    absl::MutexLock l(&mu);
    if (first_error.ok()) first_error = std::move(s);
    failed = true;
  };
  auto worker = [&](int w) {
    for (;;) {
      if (failed.load(std::memory_order_relaxed)) return;
      if (progress->cancel.load(std::memory_order_relaxed)) {
        fail(absl::CancelledError("load cancelled (unload --force)"));
        return;
      }
      const size_t i = next.fetch_add(1);
      if (i >= units.size()) return;
      const WorkUnit& u = units[i];
      const PlanSource& src = plan.sources[u.source];
      const uint64_t len = u.end - u.begin;
      absl::StatusOr<StagingSlot> slot = res.ring->Acquire();
      if (!slot.ok()) return fail(slot.status());
      absl::Status s =
          PreadExact(files[src.file].get(), slot->data(), len, src.offset + u.begin,
                     absl::StrCat(plan.files[src.file].path, " (tensor '", src.name, "')"));
      if (!s.ok()) return fail(s);
      progress->bytes_pread.fetch_add(len, std::memory_order_relaxed);
      if (verbatim[u.source] >= 0) unit_crc[i] = Crc32c(slot->data(), len);

      std::vector<bool> used(res.devices.size(), false);
      std::vector<bool> staged(res.devices.size(), false);  // unit copied to scratch
      size_t current = res.devices.size();                  // device index made current last
      for (const PieceRef& pr : by_source[u.source]) {
        const PlanPiece& p = *pr.piece;
        const PlanTarget& t = plan.ranks[pr.rank].targets[p.target];
        const size_t d = dev_index[pr.rank];
        cudaStream_t stream = res.streams[d][w];
        s = [&]() -> absl::Status {
          if (current != d) WD_CUDA_RETURN_IF_ERROR(cudaSetDevice(res.devices[d]));
          current = d;
          used[d] = true;
          if (src.dtype != t.dtype && !staged[d]) {
            WD_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(res.scratch[d][w], slot->data(), len,
                                                    cudaMemcpyHostToDevice, stream));
            staged[d] = true;
          }
          return CopyPieceRowsDevice(
              p, src.dtype, t.dtype, slot->data(), static_cast<std::byte*>(res.scratch[d][w]),
              static_cast<int64_t>(u.begin / pr.row_bytes),
              static_cast<int64_t>(u.end / pr.row_bytes), bases[pr.rank] + t.offset, stream);
        }();
        if (!s.ok()) {
          return fail(Annotate(rank_error(pr.rank, s), absl::StrCat("tensor '", t.name, "'")));
        }
      }
      std::vector<cudaEvent_t> wait;
      for (size_t d = 0; d < res.devices.size(); ++d) {
        if (!used[d]) continue;
        cudaEvent_t e = res.events[d][slot->index()];
        const cudaError_t err = cudaSetDevice(res.devices[d]) != cudaSuccess
                                    ? cudaGetLastError()
                                    : cudaEventRecord(e, res.streams[d][w]);
        if (err != cudaSuccess) {
          return fail(CudaRuntimeError(err, "cudaEventRecord", __FILE__, __LINE__));
        }
        wait.push_back(e);
      }
      slot->SetFence([wait = std::move(wait)]() -> absl::Status {
        for (cudaEvent_t e : wait) WD_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(e));
        return absl::OkStatus();
      });
      progress->bytes_done.fetch_add(len, std::memory_order_relaxed);
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

  for (size_t r = 0; r < plan.ranks.size(); ++r) {
    const RankPlan& rp = plan.ranks[r];
    const size_t d = dev_index[r];
    WD_CUDA_RETURN_IF_ERROR(cudaSetDevice(res.devices[d]));
    for (const PlanZeroFill& z : rp.zero_fills) {
      if (z.target >= rp.targets.size() || z.offset + z.nbytes > rp.targets[z.target].nbytes) {
        return absl::InternalError(
            absl::StrCat("zero-fill of rank ", rp.rank, " lies outside its target"));
      }
      const cudaError_t e = cudaMemsetAsync(bases[r] + rp.targets[z.target].offset + z.offset, 0,
                                            z.nbytes, res.streams[d][0]);
      if (e != cudaSuccess) {
        return rank_error(r, CudaRuntimeError(e, "cudaMemsetAsync", __FILE__, __LINE__));
      }
    }
  }
  for (size_t d = 0; d < res.devices.size(); ++d) {
    WD_CUDA_RETURN_IF_ERROR(cudaSetDevice(res.devices[d]));
    for (cudaStream_t s : res.streams[d]) {
      const cudaError_t e = cudaStreamSynchronize(s);
      if (e != cudaSuccess) {
        return Annotate(CudaRuntimeError(e, "cudaStreamSynchronize", __FILE__, __LINE__),
                        absl::StrCat("CUDA device ", res.devices[d]));
      }
    }
  }

  if (checksums != nullptr) {
    detail::AssignVerbatimChecksums(plan, work, unit_crc, checksums);
    // The rest: read the finished target back through one slot.
    absl::StatusOr<StagingSlot> slot = res.ring->Acquire();
    if (!slot.ok()) return slot.status();
    for (size_t r = 0; r < plan.ranks.size(); ++r) {
      WD_CUDA_RETURN_IF_ERROR(cudaSetDevice(rank_arenas[r]->device()));
      const RankPlan& rp = plan.ranks[r];
      for (size_t t = 0; t < rp.targets.size(); ++t) {
        if (checksums->crc[r][t] >= 0) continue;
        uint32_t crc = 0;
        const std::byte* dev = bases[r] + rp.targets[t].offset;
        for (uint64_t off = 0; off < rp.targets[t].nbytes; off += slot->size()) {
          const uint64_t n = std::min<uint64_t>(slot->size(), rp.targets[t].nbytes - off);
          const cudaError_t e = cudaMemcpy(slot->data(), dev + off, n, cudaMemcpyDeviceToHost);
          if (e != cudaSuccess) {
            return rank_error(
                r, CudaRuntimeError(e, "cudaMemcpy (checksum read-back)", __FILE__, __LINE__));
          }
          crc = Crc32cCombine(crc, Crc32c(slot->data(), n), n);
        }
        checksums->crc[r][t] = crc;
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace weightd
