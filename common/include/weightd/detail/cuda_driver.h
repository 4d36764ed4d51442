// CudaDriver: the CUDA driver API entry points weightd uses, loaded at run time.
//
//   WD_ASSIGN_OR_RETURN(const CudaDriver* cu, CudaDriver::Get());   // FAILED_PRECONDITION
//   WD_CU_RETURN_IF_ERROR(*cu, cu->MemGetInfo(&free, &total));       //   without a driver
//
// Why not link libcuda: the daemon must start (host backend) on machines without a GPU driver,
// where the dynamic loader would refuse a binary that needs libcuda.so.1. So libcuda.so.1 is
// dlopen'ed once and every entry point resolved through the driver's own cuGetProcAddress at
// the CUDA 12.0 ABI (so e.g. "cuMemGetInfo" resolves to the _v2 function cuda.h maps it to).
// Part of weightd::common (the daemon's CUDA backend and the client's device-arena import share
// it), but only built with WEIGHTD_ENABLE_CUDA, which defines WEIGHTD_HAVE_CUDA_DRIVER for its
// users. Includes <cuda.h>, so it stays out of client-facing headers. Thread-safe: Get() loads
// once; the table is immutable afterwards.
#ifndef WEIGHTD_DETAIL_CUDA_DRIVER_H_
#define WEIGHTD_DETAIL_CUDA_DRIVER_H_

#include <cuda.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace weightd {

struct CudaDriver {
  // The loaded driver, or FAILED_PRECONDITION naming what is missing (no libcuda.so.1, cuInit
  // failed, e.g. no device or a driver older than the toolkit).
  static absl::StatusOr<const CudaDriver*> Get();

  CUresult (*Init)(unsigned int) = nullptr;
  CUresult (*DriverGetVersion)(int*) = nullptr;
  CUresult (*GetErrorName)(CUresult, const char**) = nullptr;
  CUresult (*GetErrorString)(CUresult, const char**) = nullptr;
  CUresult (*DeviceGetCount)(int*) = nullptr;
  CUresult (*DeviceGet)(CUdevice*, int) = nullptr;
  CUresult (*DeviceGetUuid)(CUuuid*, CUdevice) = nullptr;
  CUresult (*DevicePrimaryCtxRetain)(CUcontext*, CUdevice) = nullptr;
  CUresult (*DevicePrimaryCtxRelease)(CUdevice) = nullptr;
  CUresult (*CtxSetCurrent)(CUcontext) = nullptr;
  CUresult (*CtxGetCurrent)(CUcontext*) = nullptr;
  CUresult (*CtxSynchronize)() = nullptr;
  CUresult (*MemGetInfo)(size_t*, size_t*) = nullptr;
  CUresult (*MemGetAllocationGranularity)(size_t*, const CUmemAllocationProp*,
                                          CUmemAllocationGranularity_flags) = nullptr;
  CUresult (*MemCreate)(CUmemGenericAllocationHandle*, size_t, const CUmemAllocationProp*,
                        unsigned long long) = nullptr;
  CUresult (*MemRelease)(CUmemGenericAllocationHandle) = nullptr;
  CUresult (*MemAddressReserve)(CUdeviceptr*, size_t, size_t, CUdeviceptr,
                                unsigned long long) = nullptr;
  CUresult (*MemAddressFree)(CUdeviceptr, size_t) = nullptr;
  CUresult (*MemMap)(CUdeviceptr, size_t, size_t, CUmemGenericAllocationHandle,
                     unsigned long long) = nullptr;
  CUresult (*MemUnmap)(CUdeviceptr, size_t) = nullptr;
  CUresult (*MemSetAccess)(CUdeviceptr, size_t, const CUmemAccessDesc*, size_t) = nullptr;
  CUresult (*MemExportToShareableHandle)(void*, CUmemGenericAllocationHandle,
                                         CUmemAllocationHandleType, unsigned long long) = nullptr;
  CUresult (*MemImportFromShareableHandle)(CUmemGenericAllocationHandle*, void*,
                                           CUmemAllocationHandleType) = nullptr;
  CUresult (*MemsetD8)(CUdeviceptr, unsigned char, size_t) = nullptr;
  CUresult (*MemcpyDtoH)(void*, CUdeviceptr, size_t) = nullptr;

  // "cuMemCreate(&h, n, &prop, 0) failed: CUDA_ERROR_OUT_OF_MEMORY (out of memory) at file:line".
  absl::Status Error(CUresult r, absl::string_view call, absl::string_view file, int line) const;
};

// Device UUID as "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx" (nvidia-smi's form).
std::string FormatGpuUuid(const CUuuid& uuid);

}  // namespace weightd

// Evaluates a driver call through `drv` (a CudaDriver&); on failure returns a Status carrying
// the stringified call, file and line.
#define WD_CU_RETURN_IF_ERROR(drv, call)                     \
  do {                                                       \
    const CUresult wd_cu_ = (call);                          \
    if (wd_cu_ != CUDA_SUCCESS) {                            \
      return (drv).Error(wd_cu_, #call, __FILE__, __LINE__); \
    }                                                        \
  } while (0)

#endif  // WEIGHTD_DETAIL_CUDA_DRIVER_H_
