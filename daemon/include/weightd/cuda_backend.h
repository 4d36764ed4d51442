// CudaBackend: arenas in CUDA VMM allocations exported as POSIX file descriptors (backend.h).
//
//   WD_ASSIGN_OR_RETURN(std::unique_ptr<Backend> b, MakeBackend("cuda"));
//   WD_RETURN_IF_ERROR(b->Admit("llama", requests));   // before allocating any of them
//   WD_ASSIGN_OR_RETURN(auto a, b->Allocate({.bytes = n, .device = 0, .label = "llama/rank0"}));
//   auto* ca = static_cast<CudaArena*>(a.get());   // a->kind() == ArenaKind::kCudaVmm
//   cuCtxSetCurrent(static_cast<CUcontext>(ca->context()));
//   cuMemcpyHtoDAsync(ca->device_ptr(), src, n, stream);
//
// An arena is one cuMemCreate allocation (CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, pinned
// device memory on `device`), its size rounded up to the allocation granularity, mapped
// read-write in the daemon (cuMemAddressReserve + cuMemMap + cuMemSetAccess) and zero-filled.
// Export() returns a fresh cuMemExportToShareableHandle fd: the memory stays alive while any
// process holds that fd or a mapping, even after the daemon released its own (measured on the
// H100, MEASURED.md). Clients import it and map it PROT_READ.
//
// Adopt() takes such an fd back after a restart: it finds the device by its UUID (the ordinal
// may differ under the successor's CUDA_VISIBLE_DEVICES), imports the fd
// (cuMemImportFromShareableHandle), maps the recorded size read-write (a later live update may
// rewrite the arena) and keeps the fd, so Export() of an adopted arena is a dup of it.
//
// Contexts: each device's primary context is retained once per backend, when the device is
// first used, and released when the backend and every arena of that device are gone: arenas
// share ownership of their device's state (CudaDeviceState), so no destruction order can
// release a context under a live mapping. Within an arena the order is: unmap, free the
// address range, release the allocation handle, close the adopted fd (if any), drop the device
// state (whose last owner releases the primary context). Every driver call runs with the
// device's context made current by a scope guard that restores the caller's context.
//
// Errors: OOM is RESOURCE_EXHAUSTED naming the arena label (model/rank), the bytes needed and the
// bytes free on the device (cuMemGetInfo); everything allocated so far is released (RAII).
// Admit() refuses a load that does not fit before anything is allocated. Devices are identified
// to clients by UUID (device_uuid()), so differing CUDA_VISIBLE_DEVICES between daemon and
// worker do not matter.
//
// The driver is loaded at run time (detail/cuda_driver.h): a build with CUDA still starts, with
// the host backend, on a machine without a GPU driver. Thread-safe: Admit, Allocate and Adopt
// may be called concurrently; arenas follow backend.h.
#ifndef WEIGHTD_CUDA_BACKEND_H_
#define WEIGHTD_CUDA_BACKEND_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "weightd/backend.h"

namespace weightd {

// One device as a CudaBackend uses it (retained primary context, UUID, granularity); defined
// in cuda_backend.cc and shared by the backend and the device's arenas.
class CudaDeviceState;

class CudaArena : public Arena {
 public:
  // Device address of byte 0, valid in context() while the arena lives.
  virtual uint64_t device_ptr() const = 0;
  // "GPU-..." UUID of the device holding the arena.
  virtual const std::string& device_uuid() const = 0;
  // The CUcontext (device()'s primary context, as void* to keep cuda.h out of this header) in
  // which device_ptr() is mapped. Retained while the arena lives; a user makes it current and
  // must not release it, so the executor needs no retain of its own.
  virtual void* context() const = 0;
};

class CudaBackend final : public Backend {
 public:
  // FAILED_PRECONDITION when no driver or no device is present. Retains no context yet.
  static absl::StatusOr<std::unique_ptr<CudaBackend>> Create(const BackendOptions& options = {});
  // Drops the backend's share of each device state; contexts of devices that still hold arenas
  // are released with their last arena.
  ~CudaBackend() override;

  absl::string_view name() const override { return "cuda"; }
  ArenaKind arena_kind() const override { return ArenaKind::kCudaVmm; }
  // Per device the load uses: the granularity-rounded sum of its arenas there must fit in
  // cuMemGetInfo's free bytes, and, with a device_memory_budget, in the budget less the bytes
  // this backend's arenas hold on the device already. INVALID_ARGUMENT for a device ordinal
  // this daemon does not see.
  absl::Status Admit(absl::string_view model, absl::Span<const ArenaRequest> arenas) override;
  absl::StatusOr<std::unique_ptr<Arena>> Allocate(const ArenaRequest& request) override;
  // `fd` must be an fd of cuMemExportToShareableHandle (POSIX fd handle type) of an allocation
  // of at least `request.bytes` bytes on the device `request.device_uuid` names (or, without a
  // UUID, ordinal `request.device`). FAILED_PRECONDITION naming the label when the import or
  // the mapping fails (e.g. the allocation is smaller), the device is not visible, or the
  // arena is of the other kind (a sealed host memfd: both kinds are named).
  absl::StatusOr<std::unique_ptr<Arena>> Adopt(UniqueFd fd, const AdoptRequest& request) override;

  int device_count() const { return device_count_; }

 private:
  CudaBackend(int device_count, BackendOptions options);
  // The state of device `ordinal` (0 <= ordinal < device_count_), created on first use.
  absl::StatusOr<std::shared_ptr<CudaDeviceState>> Device(int ordinal);
  // The ordinal of the device whose UUID is `uuid`; FAILED_PRECONDITION naming `label` and
  // listing the UUIDs this daemon sees otherwise.
  absl::StatusOr<int> FindDevice(absl::string_view uuid, absl::string_view label) const;

  const int device_count_;
  const BackendOptions options_;
  absl::Mutex mu_;
  std::vector<std::shared_ptr<CudaDeviceState>> devices_ ABSL_GUARDED_BY(mu_);  // by ordinal
};

// True when this build has the CUDA backend and a driver with at least one device is present.
bool CudaDeviceAvailable();

}  // namespace weightd

#endif  // WEIGHTD_CUDA_BACKEND_H_
