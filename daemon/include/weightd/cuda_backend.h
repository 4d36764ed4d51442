// CudaBackend: arenas in CUDA VMM allocations exported as POSIX file descriptors (backend.h).
//
//   WD_ASSIGN_OR_RETURN(std::unique_ptr<Backend> b, MakeBackend("cuda"));
//   WD_ASSIGN_OR_RETURN(auto a, b->Allocate({.bytes = n, .device = 0, .label = "llama/rank0"}));
//   auto* ca = static_cast<CudaArena*>(a.get());   // a->kind() == ArenaKind::kCudaVmm
//   cudaMemcpyAsync(reinterpret_cast<void*>(ca->device_ptr()), src, n, kind, stream);
//
// An arena is one cuMemCreate allocation (CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, pinned
// device memory on `device`), its size rounded up to the allocation granularity, mapped
// read-write in the daemon (cuMemAddressReserve + cuMemMap + cuMemSetAccess) and zero-filled.
// Export() returns a fresh cuMemExportToShareableHandle fd: the memory stays alive while any
// process holds that fd or a mapping, even after the daemon released its own (measured on the
// H100, MEASURED.md). Clients import it and map it PROT_READ.
//
// Errors: OOM is RESOURCE_EXHAUSTED naming the arena label (model/rank), the bytes needed and the
// bytes free on the device (cuMemGetInfo); everything allocated so far is released (VmmAllocation
// is RAII). Devices are identified to clients by UUID (device_uuid()), so differing
// CUDA_VISIBLE_DEVICES between daemon and worker do not matter.
//
// The driver is loaded at run time (detail/cuda_driver.h): a build with CUDA still starts, with
// the host backend, on a machine without a GPU driver. Thread-safe: Allocate may be called
// concurrently; arenas follow backend.h.
#ifndef WEIGHTD_CUDA_BACKEND_H_
#define WEIGHTD_CUDA_BACKEND_H_

#include <cstdint>
#include <memory>
#include <string>

#include "weightd/backend.h"

namespace weightd {

class CudaArena : public Arena {
 public:
  // Device address of byte 0, valid in the daemon's CUDA context of device() while the arena
  // lives.
  virtual uint64_t device_ptr() const = 0;
  // "GPU-..." UUID of the device holding the arena.
  virtual const std::string& device_uuid() const = 0;
};

class CudaBackend final : public Backend {
 public:
  // FAILED_PRECONDITION when no driver or no device is present.
  static absl::StatusOr<std::unique_ptr<CudaBackend>> Create();
  absl::string_view name() const override { return "cuda"; }
  absl::StatusOr<std::unique_ptr<Arena>> Allocate(const ArenaRequest& request) override;
  int device_count() const { return device_count_; }

 private:
  CudaBackend() = default;
  int device_count_ = 0;
};

// True when this build has the CUDA backend and a driver with at least one device is present.
bool CudaDeviceAvailable();

}  // namespace weightd

#endif  // WEIGHTD_CUDA_BACKEND_H_
