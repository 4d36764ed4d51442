// ExecutePlanCuda (executor.h): the plan into CUDA VMM arenas by DMA from pinned staging slots.
//
// Every CUDA call goes through the driver table (detail/cuda_driver.h): no libcudart, so the
// test suite can run this file against its simulated driver.
//
// Per work unit (the same row-aligned chunks as the host executor, sources in file order, each
// checkpoint byte read once, cut to fit a slot): read into a cuMemHostAlloc'ed StagingRing slot
// (io_uring with O_DIRECT or pread, chosen per unit by IoMode as on the host), then per piece
//   - same dtype, the piece's rows contiguous on both sides -> one cuMemcpyHtoDAsync per plane,
//   - same dtype, strided (row-/column-parallel slices)     -> cuMemcpy2DAsync per plane,
//                                                             src pitch = source row bytes,
//                                                             dst pitch = target row bytes,
//   - dtype-changing                                        -> the unit's bytes once into a
//     per-worker device scratch buffer, then kernels::LaunchConvert2DDevice per plane.
// Each worker thread owns one stream per device (the workers take units round-robin, so the
// streams do too); a worker's scratch is reused only in its own stream's order. After a unit's
// copies one event per (device, slot) is recorded, and the slot's fence synchronizes it before
// the ring hands the slot out again. The fence is attached on every path once a copy may have
// been enqueued, errors included: a slot is never rewritten under an in-flight DMA. Zero-fills
// are cuMemsetD8Async.
//
// The ring is normally the daemon's (CudaStaging, shared by concurrent loads): fences are
// tagged with the load's Resources, and the load drains its own fences before destroying the
// events they wait on (staging_ring.h).
//
// Contexts: the load retains each device's primary context (CudaPrimaryContext, released when
// the load ends) and every thread makes the device's context current (CudaContextGuard, which
// restores the thread's previous one) before its driver calls: the driver keeps the current
// context per thread, and the workers are fresh threads.
//
// Checksums: a verbatim target (one piece, whole source, same dtype) gets its CRC32C from the
// staging bytes while they are in cache, as in the host executor. Every other target (slices,
// casts, fused) is copied back after the load and checksummed there: the manifest then always
// carries a CRC32C of the bytes actually on the device. The read-back is cut into slot-sized
// pieces that the workers take in parallel, each on its own stream, double-buffered (a second
// slot when the ring has one free: the next piece's D2H runs while the last one is
// checksummed), and the pieces' CRCs are combined per target.
//
// Teardown order (Resources::~Resources): synchronize every stream, run the load's fences,
// destroy events, free scratch, destroy streams, free the load's own ring if any, and last release
// the primary contexts; so no DMA can still read a freed slot on an error path, and every DMA
// has completed when ExecutePlanCuda returns, on success or error.
#include <cuda.h>

#include <algorithm>
#include <atomic>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "weightd/crc32c.h"
#include "weightd/cuda_backend.h"
#include "weightd/detail/cuda_driver.h"
#include "weightd/detail/cuda_pinned_allocator.h"
#include "weightd/detail/cuda_resources.h"
#include "weightd/detail/read_pipeline.h"
#include "weightd/detail/staging_ring.h"
#include "weightd/detail/work_units.h"
#include "weightd/executor.h"
#include "weightd/kernels/convert_cuda.h"
#include "weightd/log.h"
#include "weightd/status_macros.h"

namespace weightd {
namespace {

using detail::PieceRef;
using detail::WorkUnit;

// The CUDA objects of one device for one load.
struct DeviceResources {
  int ordinal = -1;
  CudaPrimaryContext ctx;
  std::vector<CudaStream> streams;        // [worker]
  std::vector<CudaEvent> events;          // [slot]
  std::vector<CudaEvent> readback;        // [2 x worker]: the checksum read-back's buffers
  std::vector<CudaDeviceBuffer> scratch;  // [worker], slot_bytes each (only with casts)
};

// CUDA objects of one load. Not thread-safe to create or destroy; the workers only read it.
struct Resources {
  const CudaDriver* cu = nullptr;
  std::vector<DeviceResources> devices;   // distinct devices of the arenas
  std::unique_ptr<StagingRing> own_ring;  // without a daemon ring: pinned in devices[0]'s context
  StagingRing* ring = nullptr;            // own_ring or the daemon's

  Resources() = default;
  Resources(const Resources&) = delete;
  Resources& operator=(const Resources&) = delete;
  ~Resources() {
    if (cu == nullptr) return;
    {
      CudaContextGuard guard(*cu);
      for (DeviceResources& d : devices) {
        if (d.ctx.get() == nullptr || !guard.Use(d.ctx.get()).ok()) continue;
        for (const CudaStream& s : d.streams) {
          const CUresult r = cu->StreamSynchronize(s.get());
          if (r != CUDA_SUCCESS) {
            LogWarning(
                "CUDA device %d at load teardown: %s", d.ordinal,
                std::string(cu->Error(r, "cuStreamSynchronize", __FILE__, __LINE__).message()));
          }
        }
      }
    }
    if (ring != nullptr) {
      const absl::Status s = ring->DrainFences(this);
      if (!s.ok()) LogWarning("staging fences at load teardown: %s", std::string(s.message()));
    }
    for (DeviceResources& d : devices) {
      d.events.clear();
      d.readback.clear();
      d.scratch.clear();
      d.streams.clear();
    }
    own_ring.reset();
    devices.clear();  // releases the primary contexts
  }
};

// What a slot's fence waits for on one device: the event recorded after the unit's copies, or,
// when recording failed, the whole stream they were enqueued on.
struct SlotWait {
  int ordinal;
  CUcontext ctx;
  CUevent event;  // nullptr: wait for `stream`
  CUstream stream;
};

std::function<absl::Status()> SlotFence(const CudaDriver& cu, std::vector<SlotWait> waits) {
  return [cu = &cu, waits = std::move(waits)]() -> absl::Status {
    CudaContextGuard guard(*cu);
    absl::Status first;
    // Waits for every device even after an error: each may still be reading the slot.
    for (const SlotWait& w : waits) {
      absl::Status s = guard.Use(w.ctx);
      if (s.ok()) {
        const CUresult r =
            w.event != nullptr ? cu->EventSynchronize(w.event) : cu->StreamSynchronize(w.stream);
        if (r != CUDA_SUCCESS) {
          s = cu->Error(r,
                        w.event != nullptr ? "cuEventSynchronize (staging slot fence)"
                                           : "cuStreamSynchronize (staging slot fence)",
                        __FILE__, __LINE__);
        }
      }
      if (first.ok() && !s.ok()) first = Annotate(s, absl::StrCat("CUDA device ", w.ordinal));
    }
    return first;
  };
}

// Issues the copies of one Block of a piece, held in `stage` (host, pinned) and, for a cast, in
// `dev_src` (device, same layout), into the target at `dst_target`.
absl::Status CopyBlockDevice(const CudaDriver& cu, const detail::Block& b, DType src_dtype,
                             DType dst_dtype, const std::byte* stage, CUdeviceptr dev_src,
                             CUdeviceptr dst_target, CUstream stream) {
  const int64_t ss = DTypeSize(src_dtype);
  const CUdeviceptr dst = dst_target + static_cast<CUdeviceptr>(b.dst_offset);
  if (src_dtype != dst_dtype) {
    return kernels::LaunchConvert2DDevice(
        src_dtype, dev_src + static_cast<CUdeviceptr>(b.src_offset), b.src_pitch, dst_dtype, dst,
        b.dst_pitch, b.width, b.rows, stream);
  }
  if (b.SrcContiguous(ss) && b.DstContiguous(ss)) {
    WD_CU_RETURN_IF_ERROR(cu,
                          cu.MemcpyHtoDAsync(dst, stage + b.src_offset,
                                             static_cast<size_t>(b.rows * b.width * ss), stream));
    return absl::OkStatus();
  }
  CUDA_MEMCPY2D copy{};
  copy.srcMemoryType = CU_MEMORYTYPE_HOST;
  copy.srcHost = stage + b.src_offset;
  copy.srcPitch = static_cast<size_t>(b.src_pitch);
  copy.dstMemoryType = CU_MEMORYTYPE_DEVICE;
  copy.dstDevice = dst;
  copy.dstPitch = static_cast<size_t>(b.dst_pitch);
  copy.WidthInBytes = static_cast<size_t>(b.width * ss);
  copy.Height = static_cast<size_t>(b.rows);
  WD_CU_RETURN_IF_ERROR(cu, cu.Memcpy2DAsync(&copy, stream));
  return absl::OkStatus();
}

// The device arenas of one load as the read pipeline's sink: every unit is read into a slot of
// the pinned ring, then DMA'd (or staged on the device and converted) by the worker's stream.
class DeviceArenaSink final : public detail::Sink {
 public:
  DeviceArenaSink(const Plan& plan, const detail::WorkPlan& work, Resources& res,
                  std::vector<CUdeviceptr> bases, std::vector<size_t> dev_index,
                  std::span<Arena* const> arenas, CudaContextGuard& guard)
      : plan_(plan),
        work_(work),
        res_(res),
        cu_(*res.cu),
        bases_(std::move(bases)),
        dev_index_(std::move(dev_index)),
        arenas_(arenas),
        guard_(guard) {}

  StagingRing* ring() override { return res_.ring; }

  absl::StatusOr<std::unique_ptr<detail::SinkWorker>> NewWorker(int worker) override {
    return std::make_unique<Worker>(*this, worker);
  }

  // On the calling thread's context (guard_), on stream 0 of the rank's device.
  absl::Status ZeroFill(size_t rank, uint32_t target, uint64_t offset, uint64_t bytes) override {
    const DeviceResources& dr = res_.devices[dev_index_[rank]];
    WD_RETURN_IF_ERROR(RankError(rank, guard_.Use(dr.ctx.get())));
    const CUdeviceptr at = bases_[rank] + plan_.ranks[rank].targets[target].offset + offset;
    const CUresult e = cu_.MemsetD8Async(at, 0, bytes, dr.streams[0].get());
    if (e != CUDA_SUCCESS) {
      return RankError(rank, cu_.Error(e, "cuMemsetD8Async (zero-fill)", __FILE__, __LINE__));
    }
    return absl::OkStatus();
  }

  absl::Status RankError(size_t r, const absl::Status& s) const {
    return Annotate(
        s, absl::StrCat("rank ", plan_.ranks[r].rank, " on CUDA device ", arenas_[r]->device()));
  }
  absl::Status DeviceError(size_t d, const absl::Status& s) const {
    return Annotate(s, absl::StrCat("CUDA device ", res_.devices[d].ordinal));
  }

 private:
  class Worker final : public detail::SinkWorker {
   public:
    Worker(DeviceArenaSink& sink, int w) : sink_(sink), w_(w), guard_(*sink.res_.cu) {}
    absl::Status Write(const detail::UnitBytes& unit, std::span<const PieceRef> pieces) override;

   private:
    // Makes device index `d`'s context current on this thread.
    absl::Status Use(size_t d) {
      if (current_ == d) return absl::OkStatus();
      current_ = kNone;
      WD_RETURN_IF_ERROR(sink_.DeviceError(d, guard_.Use(sink_.res_.devices[d].ctx.get())));
      current_ = d;
      return absl::OkStatus();
    }
    absl::Status Enqueue(const detail::UnitBytes& unit, std::span<const PieceRef> pieces,
                         std::vector<bool>& used);

    static constexpr size_t kNone = ~size_t{0};
    DeviceArenaSink& sink_;
    int w_;
    CudaContextGuard guard_;
    size_t current_ = kNone;
  };

  const Plan& plan_;
  const detail::WorkPlan& work_;
  Resources& res_;
  const CudaDriver& cu_;
  std::vector<CUdeviceptr> bases_;
  std::vector<size_t> dev_index_;
  std::span<Arena* const> arenas_;
  CudaContextGuard& guard_;
};

// Enqueues the copies of every piece; `used[d]`: a copy may have been enqueued on device d.
absl::Status DeviceArenaSink::Worker::Enqueue(const detail::UnitBytes& unit,
                                              std::span<const PieceRef> pieces,
                                              std::vector<bool>& used) {
  const Plan& plan = sink_.plan_;
  const CudaDriver& cu = sink_.cu_;
  const detail::WorkUnit& u = *unit.unit;
  const PlanSource& src = plan.sources[u.source];
  const uint64_t len = u.end - u.begin;
  std::vector<bool> staged(used.size(), false);  // unit copied to the device's scratch
  for (const PieceRef& pr : pieces) {
    const PlanPiece& p = *pr.piece;
    const PlanTarget& t = plan.ranks[pr.rank].targets[p.target];
    const size_t d = sink_.dev_index_[pr.rank];
    DeviceResources& dr = sink_.res_.devices[d];
    const CUstream stream = dr.streams[w_].get();
    absl::Status s = [&]() -> absl::Status {
      WD_RETURN_IF_ERROR(Use(d));
      used[d] = true;
      CUdeviceptr scratch = 0;
      if (src.dtype != t.dtype) {
        scratch = dr.scratch[w_].get();
        if (!staged[d]) {
          WD_CU_RETURN_IF_ERROR(cu, cu.MemcpyHtoDAsync(scratch, unit.bytes.data(), len, stream));
          staged[d] = true;
        }
      }
      absl::Status copied;
      detail::ForEachBlock(p, src.dtype, t.dtype, static_cast<int64_t>(u.begin / pr.row_bytes),
                           static_cast<int64_t>(u.end / pr.row_bytes), [&](const detail::Block& b) {
                             if (!copied.ok()) return;
                             copied =
                                 CopyBlockDevice(cu, b, src.dtype, t.dtype, unit.bytes.data(),
                                                 scratch, sink_.bases_[pr.rank] + t.offset, stream);
                           });
      return copied;
    }();
    if (!s.ok())
      return Annotate(sink_.RankError(pr.rank, s), absl::StrCat("tensor '", t.name, "'"));
  }
  return absl::OkStatus();
}

absl::Status DeviceArenaSink::Worker::Write(const detail::UnitBytes& unit,
                                            std::span<const PieceRef> pieces) {
  const CudaDriver& cu = sink_.cu_;
  const detail::WorkUnit& u = *unit.unit;
  const uint64_t len = u.end - u.begin;
  // A verbatim target's CRC32C from the staging bytes while they are in cache; the others are
  // read back from the device after the load.
  if (sink_.work_.verbatim[u.source] >= 0) {
    const uint32_t crc = Crc32c(unit.bytes.data(), len);
    for (const PieceRef& pr : pieces) {
      if (detail::IsVerbatim(sink_.plan_, sink_.plan_.ranks[pr.rank], *pr.piece)) {
        unit.crc->AddKnown(pr.rank, pr.piece->target, u.begin, len, crc);
      }
    }
  }
  std::vector<bool> used(sink_.res_.devices.size(), false);
  absl::Status s = Enqueue(unit, pieces, used);
  // The fence, on success and error alike: every device this unit may have enqueued a copy on
  // must be done with the slot before the ring hands it out again.
  std::vector<SlotWait> waits;
  for (size_t d = 0; d < used.size(); ++d) {
    if (!used[d]) continue;
    DeviceResources& dr = sink_.res_.devices[d];
    SlotWait wait{dr.ordinal, dr.ctx.get(), dr.events[unit.slot->index()].get(),
                  dr.streams[w_].get()};
    absl::Status r = Use(d);
    if (r.ok()) {
      const CUresult e = cu.EventRecord(wait.event, wait.stream);
      if (e != CUDA_SUCCESS) {
        r = sink_.DeviceError(
            d, cu.Error(e, "cuEventRecord (staging slot fence)", __FILE__, __LINE__));
      }
    }
    if (!r.ok()) {
      wait.event = nullptr;
      if (s.ok()) s = r;
    }
    waits.push_back(wait);
  }
  if (!waits.empty()) unit.slot->SetFence(SlotFence(cu, std::move(waits)), &sink_.res_);
  return s;
}

// Creates the streams, scratch buffers and events of every device of the load.
absl::Status CreateDeviceResources(Resources& res, CudaContextGuard& guard, int threads,
                                   bool any_cast, bool readback) {
  const CudaDriver& cu = *res.cu;
  for (DeviceResources& dr : res.devices) {
    const absl::Status s = [&]() -> absl::Status {
      WD_RETURN_IF_ERROR(guard.Use(dr.ctx.get()));
      for (int w = 0; w < threads; ++w) {
        WD_ASSIGN_OR_RETURN(CudaStream stream, CudaStream::Create(cu));
        dr.streams.push_back(std::move(stream));
        if (any_cast) {
          WD_ASSIGN_OR_RETURN(CudaDeviceBuffer b,
                              CudaDeviceBuffer::Allocate(cu, res.ring->slot_bytes()));
          dr.scratch.push_back(std::move(b));
        }
      }
      for (int i = 0; i < res.ring->slots(); ++i) {
        WD_ASSIGN_OR_RETURN(CudaEvent e, CudaEvent::Create(cu));
        dr.events.push_back(std::move(e));
      }
      for (int i = 0; readback && i < 2 * threads; ++i) {
        WD_ASSIGN_OR_RETURN(CudaEvent e, CudaEvent::Create(cu));
        dr.readback.push_back(std::move(e));
      }
      return absl::OkStatus();
    }();
    if (!s.ok()) return Annotate(s, absl::StrCat("CUDA device ", dr.ordinal));
  }
  return absl::OkStatus();
}

// The ring the load stages through: the daemon's (options.staging), or its own of one slot per
// worker plus one (a worker reads its next unit while its last one is still in DMA).
absl::Status AttachRing(Resources& res, const detail::WorkPlan& work, const Plan& plan,
                        const ExecutorOptions& options, uint64_t chunk, int threads) {
  constexpr uint64_t kSlack = 2 * kDirectIoAlignment;
  if (options.staging != nullptr) {
    res.ring = &options.staging->ring();
    if (work.largest_unit > res.ring->slot_bytes()) {
      const auto it = std::find_if(work.units.begin(), work.units.end(), [&](const WorkUnit& u) {
        return u.end - u.begin > res.ring->slot_bytes();
      });
      return absl::ResourceExhaustedError(
          absl::StrCat("tensor '", plan.sources[it->source].name, "' is read in row groups of ",
                       it->end - it->begin, " bytes, more than a pinned staging slot (",
                       res.ring->slot_bytes(), " bytes); raise --pinned-budget"));
    }
    return absl::OkStatus();
  }
  const uint64_t slot_bytes =
      (std::max<uint64_t>({work.largest_unit, chunk, 4096}) + kSlack + 4095) / 4096 * 4096;
  const int slots = threads + 1;
  WD_ASSIGN_OR_RETURN(
      res.own_ring,
      StagingRing::Create(
          std::make_shared<CudaPinnedAllocator>(*res.cu, res.devices[0].ctx.get()),
          {.budget = slot_bytes * slots, .slot_bytes = slot_bytes, .max_slots = slots}));
  res.ring = res.own_ring.get();
  return absl::OkStatus();
}

// The CRC32C of every target still at -1 in `checksums`: slot-sized pieces copied back from
// the device in parallel, double-buffered per worker, and combined per target.
absl::Status ReadBackChecksums(const Plan& plan, Resources& res, const DeviceArenaSink& sink,
                               const std::vector<CUdeviceptr>& bases,
                               const std::vector<size_t>& dev_index, int threads,
                               TargetChecksums* checksums) {
  const CudaDriver& cu = *res.cu;
  StagingRing& ring = *res.ring;
  const uint64_t slot_bytes = ring.slot_bytes();
  struct Piece {
    size_t rank, target;
    uint64_t offset, bytes;
    uint32_t crc = 0;
  };
  std::vector<Piece> pieces;
  for (size_t r = 0; r < plan.ranks.size(); ++r) {
    for (size_t t = 0; t < plan.ranks[r].targets.size(); ++t) {
      if (checksums->crc[r][t] >= 0) continue;
      const uint64_t n = plan.ranks[r].targets[t].nbytes;
      for (uint64_t off = 0; off < n; off += slot_bytes) {
        pieces.push_back({r, t, off, std::min(slot_bytes, n - off)});
      }
    }
  }
  if (pieces.empty()) return absl::OkStatus();
  std::atomic<size_t> next{0};
  absl::Mutex mu;
  absl::Status first_error;  // guarded by mu
  std::atomic<bool> failed{false};
  auto fail = [&](absl::Status s) {
    absl::MutexLock l(&mu);
    if (first_error.ok()) first_error = std::move(s);
    failed = true;
  };
  auto reader = [&](int w) {
    CudaContextGuard wguard(cu);
    // Buffer b of this worker: its slot, and the piece whose D2H into it is in flight.
    StagingSlot buf[2];
    struct InFlight {
      size_t piece, device;
      bool recorded;  // else: wait for the whole stream
    };
    std::optional<InFlight> flight[2];
    // Waits for buffer b's copy and checksums it; `check` false on error paths (only waits).
    auto complete = [&](int b, bool check) -> absl::Status {
      if (!flight[b]) return absl::OkStatus();
      const InFlight f = *std::exchange(flight[b], std::nullopt);
      const DeviceResources& dr = res.devices[f.device];
      Piece& p = pieces[f.piece];
      WD_RETURN_IF_ERROR(wguard.Use(dr.ctx.get()));
      const CUresult r = f.recorded ? cu.EventSynchronize(dr.readback[2 * w + b].get())
                                    : cu.StreamSynchronize(dr.streams[w].get());
      WD_CU_RETURN_IF_ERROR(cu, r);
      if (check) p.crc = Crc32c(buf[b].data(), p.bytes);
      return absl::OkStatus();
    };
    auto wait_all = [&]() {
      for (int b = 0; b < 2; ++b) (void)complete(b, false);
    };
    absl::StatusOr<StagingSlot> first = ring.Acquire();
    if (!first.ok()) return fail(first.status());
    buf[0] = std::move(*first);
    absl::StatusOr<StagingSlot> second = ring.TryAcquire();
    if (second.ok()) buf[1] = std::move(*second);
    const int nbuf = buf[1] ? 2 : 1;
    for (int k = 0;; ++k) {
      const int b = k % nbuf;
      absl::Status s = complete(b, true);
      if (!s.ok()) {
        wait_all();
        return fail(Annotate(s, "checksum read-back"));
      }
      if (failed.load(std::memory_order_relaxed)) return wait_all();
      const size_t i = next.fetch_add(1);
      if (i >= pieces.size()) break;
      const Piece& p = pieces[i];
      const size_t d = dev_index[p.rank];
      const DeviceResources& dr = res.devices[d];
      const CUstream stream = dr.streams[w].get();
      s = [&]() -> absl::Status {
        WD_RETURN_IF_ERROR(wguard.Use(dr.ctx.get()));
        flight[b] = InFlight{i, d, false};
        WD_CU_RETURN_IF_ERROR(
            cu, cu.MemcpyDtoHAsync(
                    buf[b].data(),
                    bases[p.rank] + plan.ranks[p.rank].targets[p.target].offset + p.offset, p.bytes,
                    stream));
        WD_CU_RETURN_IF_ERROR(cu, cu.EventRecord(dr.readback[2 * w + b].get(), stream));
        flight[b]->recorded = true;
        return absl::OkStatus();
      }();
      if (!s.ok()) {
        wait_all();
        return fail(sink.RankError(p.rank, Annotate(s, "checksum read-back")));
      }
    }
    for (int b = 0; b < nbuf; ++b) {
      // In issue order: the older copy first.
      const absl::Status s = complete(b, true);
      if (!s.ok()) {
        wait_all();
        return fail(Annotate(s, "checksum read-back"));
      }
    }
  };
  {
    std::vector<std::thread> pool;
    const int n = static_cast<int>(std::min<size_t>(threads, pieces.size()));
    for (int w = 1; w < n; ++w) pool.emplace_back(reader, w);
    reader(0);
    for (std::thread& t : pool) t.join();
  }
  {
    absl::MutexLock l(&mu);
    if (!first_error.ok()) return first_error;
  }
  for (size_t k = 0; k < pieces.size();) {
    const Piece& head = pieces[k];
    uint32_t crc = 0;
    for (; k < pieces.size() && pieces[k].rank == head.rank && pieces[k].target == head.target;
         ++k) {
      crc = Crc32cCombine(crc, pieces[k].crc, pieces[k].bytes);
    }
    checksums->crc[head.rank][head.target] = crc;
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
  WD_ASSIGN_OR_RETURN(const CudaDriver* driver, CudaDriver::Get());
  const CudaDriver& cu = *driver;
  Resources res;
  res.cu = &cu;
  std::vector<CUdeviceptr> bases(plan.ranks.size());
  std::vector<size_t> dev_index(plan.ranks.size());
  for (size_t r = 0; r < plan.ranks.size(); ++r) {
    Arena* a = rank_arenas[r];
    if (a->kind() != ArenaKind::kCudaVmm || !a->writable().empty() ||
        a->size() < plan.ranks[r].arena_bytes) {
      return absl::InternalError(absl::StrCat("arena of rank ", plan.ranks[r].rank,
                                              " is not a CUDA arena of at least ",
                                              plan.ranks[r].arena_bytes, " bytes"));
    }
    bases[r] = static_cast<const CudaArena*>(a)->device_ptr();
    auto it = std::find_if(res.devices.begin(), res.devices.end(),
                           [&](const DeviceResources& d) { return d.ordinal == a->device(); });
    dev_index[r] = static_cast<size_t>(it - res.devices.begin());
    if (it == res.devices.end()) {
      WD_ASSIGN_OR_RETURN(CudaPrimaryContext ctx, CudaPrimaryContext::Retain(cu, a->device()));
      res.devices.push_back({.ordinal = a->device(), .ctx = std::move(ctx)});
    }
  }
  if (res.devices.empty()) return absl::OkStatus();  // a plan without ranks

  const int threads = std::max(1, options.threads);
  // Units are cut to fit a slot, with two pages to spare for an O_DIRECT read's aligned
  // superset. The daemon's ring fixes the slot; a load's own ring fits its largest unit.
  constexpr uint64_t kSlack = 2 * kDirectIoAlignment;
  const uint64_t chunk =
      options.staging != nullptr
          ? options.staging->ring().slot_bytes() - kSlack
          : std::max<uint64_t>(
                64 << 10, std::min(options.chunk_bytes, options.buffer_budget / (threads + 1)));
  WD_ASSIGN_OR_RETURN(detail::WorkPlan work, detail::BuildWorkPlan(plan, rank_arenas, chunk));
  WD_ASSIGN_OR_RETURN(detail::PlanFiles files, detail::PlanFiles::Open(plan, options.io_mode));
  WD_RETURN_IF_ERROR(AttachRing(res, work, plan, options, chunk, threads));
  // This thread's context for setup, zero-fills and read-back; restored on return.
  CudaContextGuard guard(cu);
  WD_RETURN_IF_ERROR(
      CreateDeviceResources(res, guard, threads, work.any_cast, checksums != nullptr));

  DeviceArenaSink sink(plan, work, res, bases, dev_index, rank_arenas, guard);
  TargetChecksums known;
  WD_RETURN_IF_ERROR(detail::RunReadPipeline(
      plan, work, files, sink, {.threads = threads, .uring_queue_depth = options.uring_queue_depth},
      progress, &known));
  for (size_t d = 0; d < res.devices.size(); ++d) {
    const absl::Status s = [&]() -> absl::Status {
      WD_RETURN_IF_ERROR(guard.Use(res.devices[d].ctx.get()));
      for (const CudaStream& stream : res.devices[d].streams) {
        WD_CU_RETURN_IF_ERROR(cu, cu.StreamSynchronize(stream.get()));
      }
      return absl::OkStatus();
    }();
    if (!s.ok()) return sink.DeviceError(d, s);
  }
  if (checksums == nullptr) return absl::OkStatus();
  *checksums = std::move(known);
  return ReadBackChecksums(plan, res, sink, bases, dev_index, threads, checksums);
}

// The daemon's pinned staging (executor.h). The ring is freed before the context it was
// allocated in is released.
class CudaStagingImpl final : public CudaStaging {
 public:
  StagingRing& ring() override { return *ring_; }

 private:
  friend absl::StatusOr<std::unique_ptr<CudaStaging>> CreateCudaStaging(uint64_t, int, int);
  CudaPrimaryContext ctx_;
  std::unique_ptr<StagingRing> ring_;
};

absl::StatusOr<std::unique_ptr<CudaStaging>> CreateCudaStaging(uint64_t budget, int workers,
                                                               int device) {
  WD_ASSIGN_OR_RETURN(const CudaDriver* cu, CudaDriver::Get());
  auto staging = std::make_unique<CudaStagingImpl>();
  WD_ASSIGN_OR_RETURN(staging->ctx_, CudaPrimaryContext::Retain(*cu, device));
  const uint64_t share = budget / (2 * static_cast<uint64_t>(std::max(1, workers)) + 1);
  const uint64_t slot =
      std::max<uint64_t>(64 << 10, std::min<uint64_t>(64 << 20, share) / 4096 * 4096);
  WD_ASSIGN_OR_RETURN(staging->ring_, StagingRing::Create(std::make_shared<CudaPinnedAllocator>(
                                                              *cu, staging->ctx_.get()),
                                                          {.budget = budget, .slot_bytes = slot}));
  return staging;
}

}  // namespace weightd

namespace weightd {

absl::Status CopyArenaRangesCuda(const Arena& from, Arena& to, std::span<const ArenaRange> ranges) {
  if (from.kind() != ArenaKind::kCudaVmm || to.kind() != ArenaKind::kCudaVmm) {
    return absl::InternalError("arena copy between a host arena and a device arena");
  }
  const auto& src = static_cast<const CudaArena&>(from);
  auto& dst = static_cast<CudaArena&>(to);
  if (src.context() != dst.context()) {
    return absl::InternalError(
        absl::StrCat("arena copy between devices ", src.device(), " and ", dst.device()));
  }
  WD_ASSIGN_OR_RETURN(const CudaDriver* driver, CudaDriver::Get());
  const CudaDriver& cu = *driver;
  CudaContextGuard guard(cu);
  WD_RETURN_IF_ERROR(guard.Use(static_cast<CUcontext>(dst.context())));
  WD_ASSIGN_OR_RETURN(CudaStream stream, CudaStream::Create(cu));
  for (const ArenaRange& r : ranges) {
    if (r.bytes == 0) continue;
    WD_CU_RETURN_IF_ERROR(
        cu, cu.MemcpyDtoDAsync(dst.device_ptr() + r.offset, src.device_ptr() + r.offset, r.bytes,
                               stream.get()));
  }
  WD_CU_RETURN_IF_ERROR(cu, cu.StreamSynchronize(stream.get()));
  return absl::OkStatus();
}

}  // namespace weightd
