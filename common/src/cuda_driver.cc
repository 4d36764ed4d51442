#include "weightd/detail/cuda_driver.h"

#include <dlfcn.h>

#include <cstdio>
#include <string>

#include "absl/strings/str_cat.h"

namespace weightd {
namespace {

using GetProcAddressFn = CUresult (*)(const char*, void**, int, cuuint64_t,
                                      CUdriverProcAddressQueryResult*);

absl::StatusOr<const CudaDriver*> Load() {
  // RTLD_NODELETE: function pointers stay valid for the life of the process.
  void* lib = ::dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE);
  if (lib == nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat("no CUDA driver: dlopen(libcuda.so.1) failed: ", ::dlerror()));
  }
  auto gpa = reinterpret_cast<GetProcAddressFn>(::dlsym(lib, "cuGetProcAddress_v2"));
  if (gpa == nullptr) {
    return absl::FailedPreconditionError(
        "the CUDA driver is too old: libcuda.so.1 has no cuGetProcAddress_v2 (needs 12.0+)");
  }
  static CudaDriver d;
  absl::Status missing;
  auto get = [&](auto*& fn, const char* name) {
    void* p = nullptr;
    CUdriverProcAddressQueryResult q{};
    if (gpa(name, &p, 12000, CU_GET_PROC_ADDRESS_DEFAULT, &q) != CUDA_SUCCESS || p == nullptr) {
      if (missing.ok()) {
        missing = absl::FailedPreconditionError(
            absl::StrCat("the CUDA driver lacks ", name, " (query result ", q, ")"));
      }
      return;
    }
    fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(p);
  };
  get(d.Init, "cuInit");
  get(d.DriverGetVersion, "cuDriverGetVersion");
  get(d.GetErrorName, "cuGetErrorName");
  get(d.GetErrorString, "cuGetErrorString");
  get(d.DeviceGetCount, "cuDeviceGetCount");
  get(d.DeviceGet, "cuDeviceGet");
  get(d.DeviceGetUuid, "cuDeviceGetUuid");
  get(d.DevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain");
  get(d.DevicePrimaryCtxRelease, "cuDevicePrimaryCtxRelease");
  get(d.CtxSetCurrent, "cuCtxSetCurrent");
  get(d.CtxGetCurrent, "cuCtxGetCurrent");
  get(d.CtxSynchronize, "cuCtxSynchronize");
  get(d.MemGetInfo, "cuMemGetInfo");
  get(d.MemGetAllocationGranularity, "cuMemGetAllocationGranularity");
  get(d.MemCreate, "cuMemCreate");
  get(d.MemRelease, "cuMemRelease");
  get(d.MemAddressReserve, "cuMemAddressReserve");
  get(d.MemAddressFree, "cuMemAddressFree");
  get(d.MemMap, "cuMemMap");
  get(d.MemUnmap, "cuMemUnmap");
  get(d.MemSetAccess, "cuMemSetAccess");
  get(d.MemExportToShareableHandle, "cuMemExportToShareableHandle");
  get(d.MemImportFromShareableHandle, "cuMemImportFromShareableHandle");
  get(d.MemsetD8, "cuMemsetD8");
  get(d.MemcpyDtoH, "cuMemcpyDtoH");
  if (!missing.ok()) return missing;
  const CUresult r = d.Init(0);
  if (r != CUDA_SUCCESS) {
    return absl::FailedPreconditionError(d.Error(r, "cuInit(0)", __FILE__, __LINE__).message());
  }
  return &d;
}

}  // namespace

absl::StatusOr<const CudaDriver*> CudaDriver::Get() {
  static const absl::StatusOr<const CudaDriver*> loaded = Load();
  return loaded;
}

absl::Status CudaDriver::Error(CUresult r, absl::string_view call, absl::string_view file,
                               int line) const {
  const char* name = "?";
  const char* text = "?";
  if (GetErrorName != nullptr) GetErrorName(r, &name);
  if (GetErrorString != nullptr) GetErrorString(r, &text);
  const std::string msg =
      absl::StrCat(call, " failed: ", name, " (", text, ") at ", file, ":", line);
  switch (r) {
    case CUDA_ERROR_OUT_OF_MEMORY:
      return absl::ResourceExhaustedError(msg);
    case CUDA_ERROR_INVALID_VALUE:
    case CUDA_ERROR_INVALID_DEVICE:
      return absl::InvalidArgumentError(msg);
    case CUDA_ERROR_NO_DEVICE:
    case CUDA_ERROR_NOT_INITIALIZED:
    case CUDA_ERROR_NOT_SUPPORTED:
      return absl::FailedPreconditionError(msg);
    default:
      return absl::InternalError(msg);
  }
}

std::string FormatGpuUuid(const CUuuid& uuid) {
  const auto* b = reinterpret_cast<const unsigned char*>(uuid.bytes);
  char out[64];
  std::snprintf(out, sizeof(out),
                "GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", b[0],
                b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13],
                b[14], b[15]);
  return out;
}

}  // namespace weightd
