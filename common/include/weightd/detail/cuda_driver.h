// CudaDriver: the CUDA driver API entry points weightd uses, loaded at run time.
//
//   WD_ASSIGN_OR_RETURN(const CudaDriver* cu, CudaDriver::Get());   // FAILED_PRECONDITION
//   WD_CU_RETURN_IF_ERROR(*cu, cu->MemGetInfo(&free, &total));       //   without a driver
//
// This table is the one seam between weightd and CUDA: the daemon, its executor, the kernel
// launcher and the client make every CUDA call through it, and nothing links libcudart or
// libcuda. Why: the daemon must start (host backend) on machines without a GPU driver, where the
// dynamic loader would refuse a binary that needs libcuda.so.1; and the test suite swaps in a
// simulated driver (tests/sim_cuda/) to run the whole CUDA backend without a GPU.
//
// libcuda.so.1 (or the library named by the environment variable WEIGHTD_CUDA_DRIVER, a testing
// knob, docs/CONFIG.md) is dlopen'ed once and every entry point resolved through the driver's
// own cuGetProcAddress_v2 by base name at the CUDA 12.0 ABI (so "cuMemAlloc" resolves to the _v2
// function cuda.h maps it to). Part of weightd::common, but only built with WEIGHTD_ENABLE_CUDA,
// which defines WEIGHTD_HAVE_CUDA_DRIVER for its users. Includes <cuda.h>, so it stays out of
// client-facing headers. Thread-safe: Get() loads once; the table is immutable afterwards.
#ifndef WEIGHTD_DETAIL_CUDA_DRIVER_H_
#define WEIGHTD_DETAIL_CUDA_DRIVER_H_

#include <cuda.h>

#include <string>

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
  CUresult (*MemcpyHtoD)(CUdeviceptr, const void*, size_t) = nullptr;

  // Contexts and device queries.
  CUresult (*CtxGetDevice)(CUdevice*) = nullptr;
  CUresult (*DeviceGetAttribute)(int*, CUdevice_attribute, CUdevice) = nullptr;
  CUresult (*DeviceGetName)(char*, int, CUdevice) = nullptr;
  CUresult (*MemGetAllocationPropertiesFromHandle)(CUmemAllocationProp*,
                                                   CUmemGenericAllocationHandle) = nullptr;

  // Streams and events.
  CUresult (*StreamCreate)(CUstream*, unsigned int) = nullptr;
  CUresult (*StreamDestroy)(CUstream) = nullptr;
  CUresult (*StreamSynchronize)(CUstream) = nullptr;
  CUresult (*StreamQuery)(CUstream) = nullptr;
  CUresult (*StreamWaitEvent)(CUstream, CUevent, unsigned int) = nullptr;
  CUresult (*EventCreate)(CUevent*, unsigned int) = nullptr;
  CUresult (*EventDestroy)(CUevent) = nullptr;
  CUresult (*EventRecord)(CUevent, CUstream) = nullptr;
  CUresult (*EventSynchronize)(CUevent) = nullptr;
  CUresult (*EventQuery)(CUevent) = nullptr;

  // Stream-ordered copies and fills.
  CUresult (*MemcpyHtoDAsync)(CUdeviceptr, const void*, size_t, CUstream) = nullptr;
  CUresult (*MemcpyDtoHAsync)(void*, CUdeviceptr, size_t, CUstream) = nullptr;
  CUresult (*MemcpyDtoDAsync)(CUdeviceptr, CUdeviceptr, size_t, CUstream) = nullptr;
  CUresult (*Memcpy2DAsync)(const CUDA_MEMCPY2D*, CUstream) = nullptr;
  CUresult (*MemsetD8Async)(CUdeviceptr, unsigned char, size_t, CUstream) = nullptr;

  // Plain device and pinned host memory.
  CUresult (*MemAlloc)(CUdeviceptr*, size_t) = nullptr;
  CUresult (*MemFree)(CUdeviceptr) = nullptr;
  CUresult (*MemHostAlloc)(void**, size_t, unsigned int) = nullptr;
  CUresult (*MemFreeHost)(void*) = nullptr;
  CUresult (*MemHostRegister)(void*, size_t, unsigned int) = nullptr;
  CUresult (*MemHostUnregister)(void*) = nullptr;

  // Modules and launches (the embedded kernel fatbin, kernels/src/launch.cc).
  CUresult (*ModuleLoadData)(CUmodule*, const void*) = nullptr;
  CUresult (*ModuleUnload)(CUmodule) = nullptr;
  CUresult (*ModuleGetFunction)(CUfunction*, CUmodule, const char*) = nullptr;
  CUresult (*LaunchKernel)(CUfunction, unsigned int, unsigned int, unsigned int, unsigned int,
                           unsigned int, unsigned int, unsigned int, CUstream, void**,
                           void**) = nullptr;

  // Optional (nullptr when the driver lacks it): a process-unique id per context, so a cache
  // keyed by context cannot confuse a destroyed context with a new one at the same address.
  CUresult (*CtxGetId)(CUcontext, unsigned long long*) = nullptr;

  // True when the loaded library is weightd's simulated driver (it exports wdsim_abi_version):
  // device memory and kernels are simulated on the CPU, so tests of what only hardware can show
  // (bit-exact device kernels, bandwidth) skip with that reason.
  bool simulated = false;
  // The path given to dlopen ("libcuda.so.1" unless WEIGHTD_CUDA_DRIVER names another).
  std::string library;

  // "cuMemCreate(&h, n, &prop, 0) failed: CUDA_ERROR_OUT_OF_MEMORY (out of memory) at file:line".
  absl::Status Error(CUresult r, absl::string_view call, absl::string_view file, int line) const;
};

// Makes a context current on the calling thread for the guard's scope and restores whatever was
// current before (the caller's own context, or none) when it ends; restore failures are ignored
// (there is nothing better to do in a destructor). Not movable: it belongs to one thread's scope.
//
//   CudaContextGuard guard(cu);
//   WD_RETURN_IF_ERROR(guard.Use(ctx));   // INTERNAL etc. naming cuCtxSetCurrent
//   ... driver calls in ctx ...
class CudaContextGuard {
 public:
  explicit CudaContextGuard(const CudaDriver& cu) noexcept;
  CudaContextGuard(const CudaContextGuard&) = delete;
  CudaContextGuard& operator=(const CudaContextGuard&) = delete;
  ~CudaContextGuard();

  // Makes `ctx` current (again, for a guard that switches between devices); the first call
  // arms the restore. The error names cuCtxSetCurrent; callers add the device.
  absl::Status Use(CUcontext ctx);

 private:
  const CudaDriver& cu_;
  CUcontext previous_ = nullptr;
  bool changed_ = false;
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
