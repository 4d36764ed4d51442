#include "weightd/detail/cuda_driver.h"

#include <dlfcn.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <type_traits>

#include "absl/strings/str_cat.h"

namespace weightd {
namespace {

using GetProcAddressFn = CUresult (*)(const char*, void**, int, cuuint64_t,
                                      CUdriverProcAddressQueryResult*);

// The library to load: WEIGHTD_CUDA_DRIVER (testing knob, docs/CONFIG.md) or libcuda.so.1.
std::string DriverLibrary() {
  const char* env = std::getenv("WEIGHTD_CUDA_DRIVER");
  return env != nullptr && *env != '\0' ? std::string(env) : std::string("libcuda.so.1");
}

absl::StatusOr<const CudaDriver*> Load() {
  const std::string path = DriverLibrary();
  // RTLD_NODELETE: function pointers stay valid for the life of the process.
  void* lib = ::dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE);
  if (lib == nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat("no CUDA driver: dlopen(", path, ") failed: ", ::dlerror()));
  }
  auto gpa = reinterpret_cast<GetProcAddressFn>(::dlsym(lib, "cuGetProcAddress_v2"));
  if (gpa == nullptr) {
    return absl::FailedPreconditionError(absl::StrCat("the CUDA driver is too old: ", path,
                                                      " has no cuGetProcAddress_v2 (needs 12.0+)"));
  }
  static CudaDriver d;
  d.library = path;
  d.simulated = ::dlsym(lib, "wdsim_abi_version") != nullptr;
  absl::Status missing;
  auto get = [&](auto*& fn, const char* name) {
    void* p = nullptr;
    CUdriverProcAddressQueryResult q{};
    if (gpa(name, &p, 12000, CU_GET_PROC_ADDRESS_DEFAULT, &q) != CUDA_SUCCESS || p == nullptr) {
      if (missing.ok()) {
        missing = absl::FailedPreconditionError(absl::StrCat("the CUDA driver ", d.library,
                                                             " lacks ", name, " (query result ",
                                                             static_cast<int>(q), ")"));
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
  get(d.MemcpyHtoD, "cuMemcpyHtoD");
  get(d.CtxGetDevice, "cuCtxGetDevice");
  get(d.DeviceGetAttribute, "cuDeviceGetAttribute");
  get(d.DeviceGetName, "cuDeviceGetName");
  get(d.MemGetAllocationPropertiesFromHandle, "cuMemGetAllocationPropertiesFromHandle");
  get(d.StreamCreate, "cuStreamCreate");
  get(d.StreamDestroy, "cuStreamDestroy");
  get(d.StreamSynchronize, "cuStreamSynchronize");
  get(d.StreamQuery, "cuStreamQuery");
  get(d.StreamWaitEvent, "cuStreamWaitEvent");
  get(d.EventCreate, "cuEventCreate");
  get(d.EventDestroy, "cuEventDestroy");
  get(d.EventRecord, "cuEventRecord");
  get(d.EventSynchronize, "cuEventSynchronize");
  get(d.EventQuery, "cuEventQuery");
  get(d.MemcpyHtoDAsync, "cuMemcpyHtoDAsync");
  get(d.MemcpyDtoHAsync, "cuMemcpyDtoHAsync");
  get(d.MemcpyDtoDAsync, "cuMemcpyDtoDAsync");
  get(d.Memcpy2DAsync, "cuMemcpy2DAsync");
  get(d.MemsetD8Async, "cuMemsetD8Async");
  get(d.MemAlloc, "cuMemAlloc");
  get(d.MemFree, "cuMemFree");
  get(d.MemHostAlloc, "cuMemHostAlloc");
  get(d.MemFreeHost, "cuMemFreeHost");
  get(d.MemHostRegister, "cuMemHostRegister");
  get(d.MemHostUnregister, "cuMemHostUnregister");
  get(d.ModuleLoadData, "cuModuleLoadData");
  get(d.ModuleUnload, "cuModuleUnload");
  get(d.ModuleGetFunction, "cuModuleGetFunction");
  get(d.LaunchKernel, "cuLaunchKernel");
  if (!missing.ok()) return missing;
  {
    // Optional: only a cache key refinement (CtxGetId's comment in the header).
    void* p = nullptr;
    CUdriverProcAddressQueryResult q{};
    if (gpa("cuCtxGetId", &p, 12000, CU_GET_PROC_ADDRESS_DEFAULT, &q) == CUDA_SUCCESS) {
      d.CtxGetId = reinterpret_cast<decltype(d.CtxGetId)>(p);
    }
  }
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

CudaContextGuard::CudaContextGuard(const CudaDriver& cu) noexcept : cu_(cu) {
  if (cu_.CtxGetCurrent(&previous_) != CUDA_SUCCESS) previous_ = nullptr;
}

CudaContextGuard::~CudaContextGuard() {
  if (changed_) (void)cu_.CtxSetCurrent(previous_);
}

absl::Status CudaContextGuard::Use(CUcontext ctx) {
  changed_ = true;
  const CUresult r = cu_.CtxSetCurrent(ctx);
  if (r != CUDA_SUCCESS) {
    return cu_.Error(r, ctx == nullptr ? "cuCtxSetCurrent(nullptr)" : "cuCtxSetCurrent(context)",
                     __FILE__, __LINE__);
  }
  return absl::OkStatus();
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
