#include "weightd/cuda_backend.h"

#include <fcntl.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <map>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "weightd/detail/cuda_driver.h"
#include "weightd/log.h"
#include "weightd/status_macros.h"

namespace weightd {
namespace {

CUmemAllocationProp DeviceProp(int device) {
  CUmemAllocationProp prop{};
  prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
  prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  prop.location.id = device;
  prop.requestedHandleTypes = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
  return prop;
}

uint64_t RoundUp(uint64_t bytes, uint64_t granularity) {
  // An empty arena still gets one granule: cuMemCreate refuses size 0.
  return (std::max<uint64_t>(bytes, 1) + granularity - 1) / granularity * granularity;
}


}  // namespace

// One device of a CudaBackend: its primary context, retained once and released when the last
// owner (the backend or one of the device's arenas) lets go. Immutable but for the byte count;
// thread-safe.
class CudaDeviceState {
 public:
  static absl::StatusOr<std::shared_ptr<CudaDeviceState>> Create(const CudaDriver& cu,
                                                                 int ordinal) {
    CUdevice dev;
    WD_CU_RETURN_IF_ERROR(cu, cu.DeviceGet(&dev, ordinal));
    CUuuid uuid{};
    WD_CU_RETURN_IF_ERROR(cu, cu.DeviceGetUuid(&uuid, dev));
    const CUmemAllocationProp prop = DeviceProp(ordinal);
    size_t granularity = 0;
    WD_CU_RETURN_IF_ERROR(
        cu, cu.MemGetAllocationGranularity(&granularity, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM));
    if (granularity == 0) {
      return absl::InternalError(
          absl::StrCat("the CUDA driver reports granularity 0 for device ", ordinal));
    }
    CUcontext ctx = nullptr;
    WD_CU_RETURN_IF_ERROR(cu, cu.DevicePrimaryCtxRetain(&ctx, dev));
    return std::shared_ptr<CudaDeviceState>(
        new CudaDeviceState(cu, ordinal, dev, ctx, FormatGpuUuid(uuid), granularity));
  }
  CudaDeviceState(const CudaDeviceState&) = delete;
  CudaDeviceState& operator=(const CudaDeviceState&) = delete;
  ~CudaDeviceState() {
    if (cu_.DevicePrimaryCtxRelease(dev_) != CUDA_SUCCESS) {
      LogWarning("cuDevicePrimaryCtxRelease of device %d (%s) failed", ordinal_, uuid_);
    }
  }

  const CudaDriver& cu() const { return cu_; }
  int ordinal() const { return ordinal_; }
  CUcontext context() const { return ctx_; }
  const std::string& uuid() const { return uuid_; }
  uint64_t granularity() const { return granularity_; }
  // Granularity-rounded bytes of this backend's live arenas on the device (device budget).
  std::atomic<uint64_t>& arena_bytes() { return arena_bytes_; }

 private:
  CudaDeviceState(const CudaDriver& cu, int ordinal, CUdevice dev, CUcontext ctx, std::string uuid,
                  uint64_t granularity)
      : cu_(cu),
        ordinal_(ordinal),
        dev_(dev),
        ctx_(ctx),
        uuid_(std::move(uuid)),
        granularity_(granularity) {}

  const CudaDriver& cu_;
  const int ordinal_;
  const CUdevice dev_;
  const CUcontext ctx_;
  const std::string uuid_;
  const uint64_t granularity_;
  std::atomic<uint64_t> arena_bytes_{0};
};

namespace {

// One VMM allocation: physical handle (created, or imported from an fd), reserved range,
// mapping, all on one device. Move-only; releases in reverse order of acquisition (unmap, free
// the range, release the handle) with the device's context current, logging failures, and only
// then drops its share of the device state.
class VmmAllocation {
 public:
  VmmAllocation() = default;
  VmmAllocation(const VmmAllocation&) = delete;
  VmmAllocation& operator=(const VmmAllocation&) = delete;
  VmmAllocation(VmmAllocation&& o) noexcept
      : dev_(std::move(o.dev_)),
        handle_(std::exchange(o.handle_, 0)),
        va_(std::exchange(o.va_, 0)),
        size_(std::exchange(o.size_, 0)),
        mapped_(std::exchange(o.mapped_, false)) {}
  ~VmmAllocation() { Reset(); }

  // A new allocation of `bytes` rounded up to the granularity. The caller has made the
  // device's context current.
  static absl::StatusOr<VmmAllocation> Create(std::shared_ptr<CudaDeviceState> dev, uint64_t bytes,
                                              const std::string& label) {
    const CudaDriver& cu = dev->cu();
    VmmAllocation a;
    a.dev_ = std::move(dev);
    const int device = a.dev_->ordinal();
    const CUmemAllocationProp prop = DeviceProp(device);
    const uint64_t size = RoundUp(bytes, a.dev_->granularity());
    const CUresult r = cu.MemCreate(&a.handle_, size, &prop, 0);
    if (r == CUDA_ERROR_OUT_OF_MEMORY) {
      a.handle_ = 0;
      size_t free_b = 0, total_b = 0;
      (void)cu.MemGetInfo(&free_b, &total_b);
      return absl::ResourceExhaustedError(absl::StrCat(
          "not enough GPU memory for ", label, ": needs ", size, " bytes on device ", device, " (",
          a.dev_->uuid(), "), ", free_b, " of ", total_b, " bytes free (cuMemGetInfo)"));
    }
    if (r != CUDA_SUCCESS) {
      a.handle_ = 0;
      return cu.Error(r, absl::StrCat("cuMemCreate(", size, " bytes) for ", label), __FILE__,
                      __LINE__);
    }
    WD_RETURN_IF_ERROR(a.MapReadWrite(size, label));
    return a;
  }

  // The allocation behind `fd` (cuMemExportToShareableHandle of an earlier daemon), mapped for
  // `bytes` rounded up to the granularity. `fd` stays open and owned by the caller: the import
  // takes its own reference to the memory. The caller has made the device's context current.
  static absl::StatusOr<VmmAllocation> Import(std::shared_ptr<CudaDeviceState> dev, int fd,
                                              uint64_t bytes, const std::string& label) {
    const CudaDriver& cu = dev->cu();
    VmmAllocation a;
    a.dev_ = std::move(dev);
    // The POSIX-fd handle type passes the descriptor itself, cast to a pointer.
    const CUresult r = cu.MemImportFromShareableHandle(
        &a.handle_, reinterpret_cast<void*>(static_cast<intptr_t>(fd)),
        CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR);
    if (r != CUDA_SUCCESS) {
      a.handle_ = 0;
      return absl::FailedPreconditionError(absl::StrCat(
          "arena ", label, " cannot be imported as a CUDA allocation: ",
          cu.Error(r, "cuMemImportFromShareableHandle", __FILE__, __LINE__).message()));
    }
    const uint64_t size = RoundUp(bytes, a.dev_->granularity());
    const absl::Status mapped = a.MapReadWrite(size, label);
    if (!mapped.ok()) {
      // cuMemMap refuses a size beyond the allocation: the likeliest cause is a record that
      // does not belong to this fd (or an allocation on another device).
      return absl::FailedPreconditionError(absl::StrCat(
          "arena ", label, " cannot be mapped at its recorded ", bytes, " bytes (", size,
          " rounded to the granularity) on device ", a.dev_->ordinal(), " (", a.dev_->uuid(),
          "); is the allocation behind its fd smaller, or on another device? ", mapped.message()));
    }
    return a;
  }

  void Reset() noexcept {
    if (dev_ == nullptr) return;
    const CudaDriver& cu = dev_->cu();
    {
      // Teardown may run on any thread (an unload, the registry's destructor).
      CudaContextGuard use(cu);
      if (absl::Status st = use.Use(static_cast<CUcontext>(dev_->context())); !st.ok()) {
        LogWarning("arena teardown: %s", std::string(st.message()));
      }
      if (mapped_ && cu.MemUnmap(va_, size_) != CUDA_SUCCESS) LogWarning("cuMemUnmap failed");
      if (va_ != 0 && cu.MemAddressFree(va_, size_) != CUDA_SUCCESS) {
        LogWarning("cuMemAddressFree failed");
      }
      if (handle_ != 0 && cu.MemRelease(handle_) != CUDA_SUCCESS) {
        LogWarning("cuMemRelease failed");
      }
    }
    mapped_ = false;
    va_ = 0;
    handle_ = 0;
    size_ = 0;
    dev_.reset();  // last: the primary context must outlive the mapping
  }

  const std::shared_ptr<CudaDeviceState>& device_state() const { return dev_; }
  CUmemGenericAllocationHandle handle() const { return handle_; }
  CUdeviceptr va() const { return va_; }
  uint64_t size() const { return size_; }

 private:
  // Reserves `size` bytes of address space, maps the handle there and grants this device
  // read-write access (the daemon writes by DMA, and may rewrite an adopted arena later).
  absl::Status MapReadWrite(uint64_t size, const std::string& label) {
    const CudaDriver& cu = dev_->cu();
    WD_CU_RETURN_IF_ERROR(cu, cu.MemAddressReserve(&va_, size, dev_->granularity(), 0, 0));
    size_ = size;
    WD_CU_RETURN_IF_ERROR(cu, cu.MemMap(va_, size, 0, handle_, 0));
    mapped_ = true;
    CUmemAccessDesc access{};
    access.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    access.location.id = dev_->ordinal();
    access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    const CUresult r = cu.MemSetAccess(va_, size, &access, 1);
    if (r != CUDA_SUCCESS) {
      return cu.Error(r, absl::StrCat("cuMemSetAccess(read-write) for ", label), __FILE__,
                      __LINE__);
    }
    return absl::OkStatus();
  }

  std::shared_ptr<CudaDeviceState> dev_;
  CUmemGenericAllocationHandle handle_ = 0;
  CUdeviceptr va_ = 0;
  uint64_t size_ = 0;
  bool mapped_ = false;
};

class VmmArena final : public CudaArena {
 public:
  // `adopted_fd` is the fd an adopted arena came from (Export() dups it); empty for a new one.
  VmmArena(VmmAllocation a, uint64_t size, std::string label, UniqueFd adopted_fd)
      : alloc_(std::move(a)),
        size_(size),
        label_(std::move(label)),
        adopted_fd_(std::move(adopted_fd)),
        sealed_(static_cast<bool>(adopted_fd_)) {
    alloc_.device_state()->arena_bytes() += alloc_.size();
  }
  ~VmmArena() override { alloc_.device_state()->arena_bytes() -= alloc_.size(); }

  uint64_t size() const override { return size_; }
  int device() const override { return alloc_.device_state()->ordinal(); }
  ArenaKind kind() const override { return ArenaKind::kCudaVmm; }
  std::span<std::byte> writable() override { return {}; }
  absl::string_view label() const override { return label_; }
  std::span<const std::byte> readable() const override { return {}; }
  absl::Status Seal() override {
    // Writes are DMA on the executor's streams, which it synchronizes before sealing; the
    // device memory itself has no seal: clients map it PROT_READ.
    sealed_ = true;
    return absl::OkStatus();
  }
  absl::StatusOr<UniqueFd> Export() const override {
    if (!sealed_) {
      return absl::FailedPreconditionError(
          absl::StrCat("arena ", label_, " is still being written"));
    }
    if (adopted_fd_) {
      // The fd that was handed to us refers to the same allocation; a dup of it cannot fail
      // the way re-exporting an imported handle might.
      UniqueFd fd(::fcntl(adopted_fd_.get(), F_DUPFD_CLOEXEC, 0));
      if (!fd) return ErrnoError(errno, absl::StrCat("dup of the adopted fd of arena ", label_));
      return fd;
    }
    const CudaDriver& cu = alloc_.device_state()->cu();
    // The driver wants a current context for the export (the simulated driver checks it too);
    // Export runs on server threads that have none.
    CudaContextGuard use(cu);
    WD_RETURN_IF_ERROR(use.Use(static_cast<CUcontext>(alloc_.device_state()->context())));
    int fd = -1;
    WD_CU_RETURN_IF_ERROR(
        cu, cu.MemExportToShareableHandle(&fd, alloc_.handle(),
                                          CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0));
    return UniqueFd(fd);
  }
  uint64_t device_ptr() const override { return alloc_.va(); }
  const std::string& device_uuid() const override { return alloc_.device_state()->uuid(); }
  void* context() const override { return alloc_.device_state()->context(); }

 private:
  // Destroyed in reverse: the fd closes, then the allocation is unmapped and released and drops
  // its share of the device state.
  VmmAllocation alloc_;
  uint64_t size_;
  std::string label_;
  UniqueFd adopted_fd_;
  bool sealed_;
};

// An fd whose seals include F_SEAL_WRITE is a host backend arena (a sealed memfd). Device fds
// have no seals (F_GET_SEALS fails on them), and a memfd standing in for device memory (a
// simulated driver) must stay writable, so it never carries F_SEAL_WRITE.
bool IsSealedMemfd(int fd) {
  const int seals = ::fcntl(fd, F_GET_SEALS);
  return seals >= 0 && (seals & F_SEAL_WRITE) != 0;
}

}  // namespace

CudaBackend::CudaBackend(int device_count, BackendOptions options)
    : device_count_(device_count), options_(options), devices_(device_count) {}

// The device states are shared with the arenas: each primary context is released by whichever
// of this backend and the device's arenas goes last (CudaDeviceState's destructor).
CudaBackend::~CudaBackend() = default;

absl::StatusOr<std::unique_ptr<CudaBackend>> CudaBackend::Create(const BackendOptions& options) {
  WD_ASSIGN_OR_RETURN(const CudaDriver* cu, CudaDriver::Get());
  int n = 0;
  WD_CU_RETURN_IF_ERROR(*cu, cu->DeviceGetCount(&n));
  if (n == 0) return absl::FailedPreconditionError("the CUDA driver reports no device");
  return std::unique_ptr<CudaBackend>(new CudaBackend(n, options));
}

absl::StatusOr<std::shared_ptr<CudaDeviceState>> CudaBackend::Device(int ordinal) {
  absl::MutexLock l(&mu_);
  std::shared_ptr<CudaDeviceState>& d = devices_[ordinal];
  if (d == nullptr) {
    WD_ASSIGN_OR_RETURN(const CudaDriver* cu, CudaDriver::Get());
    WD_ASSIGN_OR_RETURN(d, CudaDeviceState::Create(*cu, ordinal));
  }
  return d;
}

absl::StatusOr<int> CudaBackend::FindDevice(absl::string_view uuid, absl::string_view label) const {
  WD_ASSIGN_OR_RETURN(const CudaDriver* cu, CudaDriver::Get());
  std::vector<std::string> seen;
  for (int i = 0; i < device_count_; ++i) {
    CUdevice dev;
    WD_CU_RETURN_IF_ERROR(*cu, cu->DeviceGet(&dev, i));
    CUuuid u{};
    WD_CU_RETURN_IF_ERROR(*cu, cu->DeviceGetUuid(&u, dev));
    const std::string text = FormatGpuUuid(u);
    if (absl::EqualsIgnoreCase(text, uuid)) return i;
    seen.push_back(absl::StrCat(i, ": ", text));
  }
  return absl::FailedPreconditionError(absl::StrCat(
      "arena ", label, " is on device ", uuid, ", which this daemon does not see (visible: ",
      absl::StrJoin(seen, ", "), "); check CUDA_VISIBLE_DEVICES"));
}

absl::Status CudaBackend::Admit(absl::string_view model, absl::Span<const ArenaRequest> arenas) {
  struct Need {
    std::shared_ptr<CudaDeviceState> dev;
    uint64_t bytes = 0;
  };
  std::map<int, Need> per_device;
  for (const ArenaRequest& request : arenas) {
    const int device = request.device < 0 ? 0 : request.device;
    if (device >= device_count_) {
      return absl::InvalidArgumentError(absl::StrCat("arena ", request.label, " asks for device ",
                                                     device, " but ", device_count_,
                                                     " CUDA devices are visible to the daemon"));
    }
    Need& need = per_device[device];
    if (need.dev == nullptr) {
      WD_ASSIGN_OR_RETURN(need.dev, Device(device));
    }
    need.bytes += RoundUp(request.bytes, need.dev->granularity());
  }
  for (const auto& [device, need] : per_device) {
    const CudaDriver& cu = need.dev->cu();
    size_t free_b = 0, total_b = 0;
    {
      // cuMemGetInfo reports on the current context's device.
      CudaContextGuard use(cu);
      WD_RETURN_IF_ERROR(use.Use(static_cast<CUcontext>(need.dev->context())));
      WD_CU_RETURN_IF_ERROR(cu, cu.MemGetInfo(&free_b, &total_b));
    }
    const std::string where = absl::StrCat("device ", device, " (", need.dev->uuid(), ")");
    if (need.bytes > free_b) {
      return absl::ResourceExhaustedError(
          absl::StrCat("model '", model, "' needs ", need.bytes, " bytes of arenas on ", where,
                       ", but only ", free_b, " of ", total_b,
                       " bytes are free (cuMemGetInfo); unload a model or free the device first"));
    }
    const uint64_t budget = options_.device_memory_budget;
    const uint64_t held = need.dev->arena_bytes().load();
    if (budget > 0 && held + need.bytes > budget) {
      return absl::ResourceExhaustedError(
          absl::StrCat("model '", model, "' needs ", need.bytes, " bytes of arenas on ", where,
                       ", but device_memory_budget allows ", budget,
                       " bytes per device and weightd's arenas hold ", held, " there already (",
                       free_b, " bytes free); unload a model or raise device_memory_budget"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Arena>> CudaBackend::Allocate(const ArenaRequest& request) {
  const int device = request.device < 0 ? 0 : request.device;
  if (device >= device_count_) {
    return absl::InvalidArgumentError(absl::StrCat("arena ", request.label, " asks for device ",
                                                   device, " but ", device_count_,
                                                   " CUDA devices are visible to the daemon"));
  }
  WD_ASSIGN_OR_RETURN(std::shared_ptr<CudaDeviceState> dev, Device(device));
  const CudaDriver& cu = dev->cu();
  CudaContextGuard use(cu);
  WD_RETURN_IF_ERROR(use.Use(static_cast<CUcontext>(dev->context())));
  WD_ASSIGN_OR_RETURN(VmmAllocation a, VmmAllocation::Create(dev, request.bytes, request.label));
  // backend.h promises zero-filled arenas (and the padding up to the granularity stays zero,
  // which clients can see). The synchronous cuMemsetD8 runs at device bandwidth (about 6 ms for
  // a 16 GB rank on an H100), but cuCtxSynchronize also waits for work other threads queued in
  // this primary context, such as a concurrent load's copies; the executor overwrites most bytes
  // anyway, so zeroing only the gaps it leaves would be the faster, more intricate, choice.
  WD_CU_RETURN_IF_ERROR(cu, cu.MemsetD8(a.va(), 0, a.size()));
  WD_CU_RETURN_IF_ERROR(cu, cu.CtxSynchronize());
  return std::unique_ptr<Arena>(
      new VmmArena(std::move(a), request.bytes, request.label, UniqueFd()));
}

absl::StatusOr<std::unique_ptr<Arena>> CudaBackend::Adopt(UniqueFd fd,
                                                          const AdoptRequest& request) {
  const std::string& label = request.label;
  if (request.kind != ArenaKind::kCudaVmm) {
    return ArenaKindMismatch(label, request.kind, *this, "its record");
  }
  if (IsSealedMemfd(fd.get())) {
    return ArenaKindMismatch(label, ArenaKind::kHostMemfd, *this, "its fd, a sealed memfd");
  }
  int device = 0;
  if (!request.device_uuid.empty()) {
    WD_ASSIGN_OR_RETURN(device, FindDevice(request.device_uuid, label));
  } else {
    // A record of a daemon that kept no UUID: the ordinal is all there is.
    device = request.device < 0 ? 0 : request.device;
    if (device >= device_count_) {
      return absl::FailedPreconditionError(absl::StrCat("arena ", label, " was on device ", device,
                                                        " (its record has no device UUID), but "
                                                        "this daemon sees ",
                                                        device_count_, " CUDA devices"));
    }
  }
  WD_ASSIGN_OR_RETURN(std::shared_ptr<CudaDeviceState> dev, Device(device));
  CudaContextGuard use(dev->cu());
  WD_RETURN_IF_ERROR(use.Use(static_cast<CUcontext>(dev->context())));
  WD_ASSIGN_OR_RETURN(VmmAllocation a,
                      VmmAllocation::Import(std::move(dev), fd.get(), request.bytes, label));
  return std::unique_ptr<Arena>(new VmmArena(std::move(a), request.bytes, label, std::move(fd)));
}

bool CudaDeviceAvailable() {
  absl::StatusOr<const CudaDriver*> cu = CudaDriver::Get();
  if (!cu.ok()) return false;
  int n = 0;
  return (*cu)->DeviceGetCount(&n) == CUDA_SUCCESS && n > 0;
}

}  // namespace weightd
