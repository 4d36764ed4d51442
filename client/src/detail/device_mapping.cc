#include "detail/device_mapping.h"

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "weightd/status_macros.h"

#if WEIGHTD_HAVE_CUDA_DRIVER
#include "weightd/detail/cuda_driver.h"
#endif

namespace weightd {

#if WEIGHTD_HAVE_CUDA_DRIVER

namespace {

std::string UuidHex(const CUuuid& uuid) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string out;
  for (const char c : uuid.bytes) {
    const auto b = static_cast<unsigned char>(c);
    out.push_back(kDigits[b >> 4]);
    out.push_back(kDigits[b & 15]);
  }
  return out;
}

absl::Status Check(const CudaDriver& cu, CUresult r, const char* call, int line) {
  if (r == CUDA_SUCCESS) return absl::OkStatus();
  return cu.Error(r, call, __FILE__, line);
}

void Warn(const CudaDriver& cu, CUresult r, const char* call) {
  if (r == CUDA_SUCCESS) return;
  std::fprintf(stderr, "weightd client: %s\n",
               std::string(cu.Error(r, call, __FILE__, __LINE__).message()).c_str());
}

}  // namespace

absl::StatusOr<std::unique_ptr<DeviceMapping>> DeviceMapping::Map(int fd, uint64_t size,
                                                                  absl::string_view uuid_hex) {
  absl::StatusOr<const CudaDriver*> loaded = CudaDriver::Get();
  if (!loaded.ok()) {
    return absl::UnavailableError(absl::StrCat("no CUDA driver (", loaded.status().message(), ")"));
  }
  const CudaDriver& cu = **loaded;
  int count = 0;
  WD_CU_RETURN_IF_ERROR(cu, cu.DeviceGetCount(&count));
  CUdevice dev = 0;
  int ordinal = -1;
  std::vector<std::string> visible;
  for (int i = 0; i < count && ordinal < 0; ++i) {
    CUdevice d = 0;
    WD_CU_RETURN_IF_ERROR(cu, cu.DeviceGet(&d, i));
    CUuuid u{};
    WD_CU_RETURN_IF_ERROR(cu, cu.DeviceGetUuid(&u, d));
    std::string hex = UuidHex(u);
    if (hex == uuid_hex) {
      dev = d;
      ordinal = i;
    }
    visible.push_back(absl::StrCat(i, ":", hex));
  }
  if (ordinal < 0) {
    return absl::UnavailableError(
        absl::StrCat("no local GPU with UUID ", uuid_hex,
                     " (visible: ", visible.empty() ? "none" : absl::StrJoin(visible, ", "),
                     "; the worker must see the daemon's GPU, check CUDA_VISIBLE_DEVICES)"));
  }

  std::unique_ptr<DeviceMapping> m(new DeviceMapping());
  m->cu_ = &cu;
  m->device_ = dev;
  m->ordinal_ = ordinal;
  m->uuid_ = std::string(uuid_hex);
  CUcontext ctx = nullptr;
  WD_CU_RETURN_IF_ERROR(cu, cu.DevicePrimaryCtxRetain(&ctx, dev));
  m->ctx_ = ctx;
  CudaContextGuard guard(cu);
  WD_RETURN_IF_ERROR(guard.Use(ctx));

  CUmemAllocationProp prop{};
  prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
  prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  prop.location.id = dev;
  prop.requestedHandleTypes = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
  size_t gran = 0;
  WD_CU_RETURN_IF_ERROR(
      cu, cu.MemGetAllocationGranularity(&gran, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM));
  if (gran == 0) gran = 1;
  // The daemon reserved max(size, 1) rounded up to this granularity (cuda_backend.cc); mapping
  // a different size than the physical allocation fails with CUDA_ERROR_INVALID_VALUE.
  const uint64_t rounded = (std::max<uint64_t>(size, 1) + gran - 1) / gran * gran;

  CUmemGenericAllocationHandle handle = 0;
  // The POSIX-fd handle type takes the fd itself, cast to a pointer (CUDA driver API docs).
  WD_CU_RETURN_IF_ERROR(cu, cu.MemImportFromShareableHandle(
                                &handle, reinterpret_cast<void*>(static_cast<intptr_t>(fd)),
                                CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR));
  m->handle_ = handle;
  CUdeviceptr va = 0;
  WD_CU_RETURN_IF_ERROR(cu, cu.MemAddressReserve(&va, rounded, gran, 0, 0));
  m->va_ = va;
  m->size_ = rounded;
  WD_CU_RETURN_IF_ERROR(cu, cu.MemMap(va, rounded, 0, handle, 0));
  m->mapped_ = true;
  CUmemAccessDesc access{};
  access.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  access.location.id = dev;
  access.flags = CU_MEM_ACCESS_FLAGS_PROT_READ;
  WD_CU_RETURN_IF_ERROR(cu, cu.MemSetAccess(va, rounded, &access, 1));
  return m;
}

absl::Status DeviceMapping::Remap(int fd, absl::string_view uuid_hex) {
  if (uuid_hex != uuid_) {
    return absl::FailedPreconditionError(absl::StrCat("the new memory is on the GPU with UUID ",
                                                      uuid_hex, ", the mapped one on ", uuid_));
  }
  if (!mapped_) {
    return absl::FailedPreconditionError(
        "the range is unmapped since an earlier refresh failed to restore it");
  }
  const CudaDriver& cu = *cu_;
  CudaContextGuard guard(cu);
  WD_RETURN_IF_ERROR(guard.Use(static_cast<CUcontext>(ctx_)));
  CUmemGenericAllocationHandle next = 0;
  WD_RETURN_IF_ERROR(Check(
      cu,
      cu.MemImportFromShareableHandle(&next, reinterpret_cast<void*>(static_cast<intptr_t>(fd)),
                                      CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR),
      "cuMemImportFromShareableHandle", __LINE__));
  CUmemAccessDesc access{};
  access.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  access.location.id = device_;
  access.flags = CU_MEM_ACCESS_FLAGS_PROT_READ;
  // The handle that ends up unused is released: the new one on failure, the old one on success.
  absl::Status failure = Check(cu, cu.MemUnmap(va_, size_), "cuMemUnmap", __LINE__);
  if (failure.ok()) {
    failure = Check(cu, cu.MemMap(va_, size_, 0, next, 0), "cuMemMap", __LINE__);
    if (failure.ok()) {
      failure = Check(cu, cu.MemSetAccess(va_, size_, &access, 1), "cuMemSetAccess", __LINE__);
      if (failure.ok()) {
        Warn(cu, cu.MemRelease(handle_), "cuMemRelease");
        handle_ = next;
        return absl::OkStatus();
      }
      Warn(cu, cu.MemUnmap(va_, size_), "cuMemUnmap");
    }
    // The range is unmapped now: put the old memory back where the caller's pointers expect it.
    absl::Status restore = Check(cu, cu.MemMap(va_, size_, 0, handle_, 0), "cuMemMap", __LINE__);
    if (restore.ok()) {
      restore = Check(cu, cu.MemSetAccess(va_, size_, &access, 1), "cuMemSetAccess", __LINE__);
      if (!restore.ok()) Warn(cu, cu.MemUnmap(va_, size_), "cuMemUnmap");
    }
    if (!restore.ok()) {
      mapped_ = false;
      failure = absl::Status(failure.code(), absl::StrCat(failure.message(),
                                                          "; mapping the old memory back failed "
                                                          "too, the range is unmapped: ",
                                                          restore.message()));
    }
  }
  Warn(cu, cu.MemRelease(next), "cuMemRelease");
  return failure;
}

DeviceMapping::~DeviceMapping() {
  if (cu_ == nullptr) return;
  const CudaDriver& cu = *cu_;
  {
    // The unmap and frees need a context; the primary one is released only after the caller's
    // context is restored, so a process that retains nothing else lets it go.
    CudaContextGuard guard(cu);
    if (const absl::Status s = guard.Use(static_cast<CUcontext>(ctx_)); !s.ok()) {
      std::fprintf(stderr, "weightd client: %s\n", std::string(s.message()).c_str());
    }
    if (mapped_) Warn(cu, cu.MemUnmap(va_, size_), "cuMemUnmap");
    if (va_ != 0) Warn(cu, cu.MemAddressFree(va_, size_), "cuMemAddressFree");
    if (handle_ != 0) Warn(cu, cu.MemRelease(handle_), "cuMemRelease");
  }
  if (ctx_ != nullptr) Warn(cu, cu.DevicePrimaryCtxRelease(device_), "cuDevicePrimaryCtxRelease");
}

absl::Status DeviceMapping::CopyToHost(uint64_t offset, void* dst, size_t n) const {
  if (!mapped_) {
    return absl::FailedPreconditionError(
        "the device arena is unmapped (a refresh failed to map the old memory back)");
  }
  if (offset > size_ || n > size_ - offset) {
    return absl::InvalidArgumentError(absl::StrCat("bytes [", offset, ", ", offset + n,
                                                   ") leave the ", size_, "-byte device arena"));
  }
  const CudaDriver& cu = *cu_;
  CudaContextGuard guard(cu);
  WD_RETURN_IF_ERROR(guard.Use(static_cast<CUcontext>(ctx_)));
  WD_CU_RETURN_IF_ERROR(cu, cu.MemcpyDtoH(dst, va_ + offset, n));
  return absl::OkStatus();
}

#else  // !WEIGHTD_HAVE_CUDA_DRIVER

absl::StatusOr<std::unique_ptr<DeviceMapping>> DeviceMapping::Map(int fd, uint64_t size,
                                                                  absl::string_view uuid_hex) {
  return absl::UnavailableError(
      "no CUDA driver (this weightd client was built without CUDA: WEIGHTD_ENABLE_CUDA=OFF)");
}

absl::Status DeviceMapping::Remap(int fd, absl::string_view uuid_hex) {
  return absl::UnavailableError("no CUDA driver (this weightd client was built without CUDA)");
}

DeviceMapping::~DeviceMapping() = default;

absl::Status DeviceMapping::CopyToHost(uint64_t offset, void* dst, size_t n) const {
  return absl::UnavailableError("no CUDA driver (this weightd client was built without CUDA)");
}

#endif  // WEIGHTD_HAVE_CUDA_DRIVER

}  // namespace weightd
