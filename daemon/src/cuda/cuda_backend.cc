#include "weightd/cuda_backend.h"

#include <utility>

#include "absl/strings/str_cat.h"
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

// Makes the device's primary context current for the calling thread (retained for the process
// lifetime: the daemon keeps its arenas until it exits).
absl::Status UseDevice(const CudaDriver& cu, int device) {
  CUdevice dev;
  WD_CU_RETURN_IF_ERROR(cu, cu.DeviceGet(&dev, device));
  CUcontext ctx;
  WD_CU_RETURN_IF_ERROR(cu, cu.DevicePrimaryCtxRetain(&ctx, dev));
  WD_CU_RETURN_IF_ERROR(cu, cu.CtxSetCurrent(ctx));
  return absl::OkStatus();
}

// One VMM allocation: physical handle, reserved range, mapping. Move-only; releases in reverse
// order of acquisition (unmap, free the range, release the handle), logging failures.
class VmmAllocation {
 public:
  VmmAllocation() = default;
  VmmAllocation(const VmmAllocation&) = delete;
  VmmAllocation& operator=(const VmmAllocation&) = delete;
  VmmAllocation(VmmAllocation&& o) noexcept
      : cu_(o.cu_),
        handle_(std::exchange(o.handle_, 0)),
        va_(std::exchange(o.va_, 0)),
        size_(std::exchange(o.size_, 0)),
        mapped_(std::exchange(o.mapped_, false)) {}
  ~VmmAllocation() { Reset(); }

  static absl::StatusOr<VmmAllocation> Create(const CudaDriver& cu, int device, uint64_t bytes,
                                              const std::string& label) {
    VmmAllocation a;
    a.cu_ = &cu;
    const CUmemAllocationProp prop = DeviceProp(device);
    size_t gran = 0;
    WD_CU_RETURN_IF_ERROR(
        cu, cu.MemGetAllocationGranularity(&gran, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM));
    const uint64_t size = (std::max<uint64_t>(bytes, 1) + gran - 1) / gran * gran;
    const CUresult r = cu.MemCreate(&a.handle_, size, &prop, 0);
    if (r == CUDA_ERROR_OUT_OF_MEMORY) {
      size_t free_b = 0, total_b = 0;
      (void)cu.MemGetInfo(&free_b, &total_b);
      return absl::ResourceExhaustedError(
          absl::StrCat("not enough GPU memory for ", label, ": needs ", size, " bytes on device ",
                       device, ", ", free_b, " of ", total_b, " bytes free (cuMemGetInfo)"));
    }
    if (r != CUDA_SUCCESS) {
      a.handle_ = 0;
      return cu.Error(r, absl::StrCat("cuMemCreate(", size, " bytes) for ", label), __FILE__,
                      __LINE__);
    }
    a.size_ = size;
    WD_CU_RETURN_IF_ERROR(cu, cu.MemAddressReserve(&a.va_, size, gran, 0, 0));
    WD_CU_RETURN_IF_ERROR(cu, cu.MemMap(a.va_, size, 0, a.handle_, 0));
    a.mapped_ = true;
    CUmemAccessDesc access{};
    access.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    access.location.id = device;
    access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    WD_CU_RETURN_IF_ERROR(cu, cu.MemSetAccess(a.va_, size, &access, 1));
    return a;
  }

  void Reset() noexcept {
    if (cu_ == nullptr) return;
    if (mapped_ && cu_->MemUnmap(va_, size_) != CUDA_SUCCESS) LogWarning("cuMemUnmap failed");
    if (va_ != 0 && cu_->MemAddressFree(va_, size_) != CUDA_SUCCESS) {
      LogWarning("cuMemAddressFree failed");
    }
    if (handle_ != 0 && cu_->MemRelease(handle_) != CUDA_SUCCESS) LogWarning("cuMemRelease failed");
    mapped_ = false;
    va_ = 0;
    handle_ = 0;
  }

  CUmemGenericAllocationHandle handle() const { return handle_; }
  CUdeviceptr va() const { return va_; }
  uint64_t size() const { return size_; }

 private:
  const CudaDriver* cu_ = nullptr;
  CUmemGenericAllocationHandle handle_ = 0;
  CUdeviceptr va_ = 0;
  uint64_t size_ = 0;
  bool mapped_ = false;
};

class VmmArena final : public CudaArena {
 public:
  VmmArena(const CudaDriver& cu, VmmAllocation a, uint64_t size, int device, std::string uuid,
           std::string label)
      : cu_(cu),
        alloc_(std::move(a)),
        size_(size),
        device_(device),
        uuid_(std::move(uuid)),
        label_(std::move(label)) {}
  uint64_t size() const override { return size_; }
  int device() const override { return device_; }
  ArenaKind kind() const override { return ArenaKind::kCudaVmm; }
  std::span<std::byte> writable() override { return {}; }
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
    int fd = -1;
    WD_CU_RETURN_IF_ERROR(
        cu_, cu_.MemExportToShareableHandle(&fd, alloc_.handle(),
                                            CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0));
    return UniqueFd(fd);
  }
  uint64_t device_ptr() const override { return alloc_.va(); }
  const std::string& device_uuid() const override { return uuid_; }

 private:
  const CudaDriver& cu_;
  VmmAllocation alloc_;
  uint64_t size_;
  int device_;
  std::string uuid_;
  std::string label_;
  bool sealed_ = false;
};

}  // namespace

absl::StatusOr<std::unique_ptr<CudaBackend>> CudaBackend::Create() {
  WD_ASSIGN_OR_RETURN(const CudaDriver* cu, CudaDriver::Get());
  int n = 0;
  WD_CU_RETURN_IF_ERROR(*cu, cu->DeviceGetCount(&n));
  if (n == 0) return absl::FailedPreconditionError("the CUDA driver reports no device");
  std::unique_ptr<CudaBackend> b(new CudaBackend());
  b->device_count_ = n;
  return b;
}

absl::StatusOr<std::unique_ptr<Arena>> CudaBackend::Allocate(const ArenaRequest& request) {
  WD_ASSIGN_OR_RETURN(const CudaDriver* cu, CudaDriver::Get());
  const int device = request.device < 0 ? 0 : request.device;
  if (device >= device_count_) {
    return absl::InvalidArgumentError(absl::StrCat("arena ", request.label, " asks for device ",
                                                   device, " but ", device_count_,
                                                   " CUDA devices are visible to the daemon"));
  }
  WD_RETURN_IF_ERROR(UseDevice(*cu, device));
  CUdevice dev;
  WD_CU_RETURN_IF_ERROR(*cu, cu->DeviceGet(&dev, device));
  CUuuid uuid{};
  WD_CU_RETURN_IF_ERROR(*cu, cu->DeviceGetUuid(&uuid, dev));
  WD_ASSIGN_OR_RETURN(VmmAllocation a,
                      VmmAllocation::Create(*cu, device, request.bytes, request.label));
  // backend.h promises zero-filled arenas (and the padding up to the granularity stays zero).
  WD_CU_RETURN_IF_ERROR(*cu, cu->MemsetD8(a.va(), 0, a.size()));
  WD_CU_RETURN_IF_ERROR(*cu, cu->CtxSynchronize());
  return std::unique_ptr<Arena>(
      new VmmArena(*cu, std::move(a), request.bytes, device, FormatGpuUuid(uuid), request.label));
}

bool CudaDeviceAvailable() {
  absl::StatusOr<const CudaDriver*> cu = CudaDriver::Get();
  if (!cu.ok()) return false;
  int n = 0;
  return (*cu)->DeviceGetCount(&n) == CUDA_SUCCESS && n > 0;
}

}  // namespace weightd
