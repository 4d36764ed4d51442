// DeviceMapping: one device arena of an attachment, imported into this process read-only.
//
//   WD_ASSIGN_OR_RETURN(std::unique_ptr<DeviceMapping> m,
//                       DeviceMapping::Map(arena_fd, manifest_arena_size, uuid_hex));
//   const void* p = reinterpret_cast<const void*>(m->base() + offset);   // on m->ordinal()
//
// Map() loads the CUDA driver (weightd/detail/cuda_driver.h, dlopen'ed), picks the local device
// whose cuDeviceGetUuid equals `uuid_hex` (so the daemon's and this process's
// CUDA_VISIBLE_DEVICES may differ), retains its primary context, and imports the daemon's
// cuMemExportToShareableHandle fd: cuMemImportFromShareableHandle, cuMemAddressReserve of the
// size rounded up to the device's minimum granularity (as the daemon allocated it), cuMemMap,
// cuMemSetAccess with CU_MEM_ACCESS_FLAGS_PROT_READ. The destructor undoes these in reverse order
// (cuMemUnmap, cuMemAddressFree, cuMemRelease, cuDevicePrimaryCtxRelease), so a failure half-way
// through Map() releases what it got. Driver calls run with the device's primary context current
// and restore the caller's current context afterwards.
//
// Remap() replaces the memory behind the same address range by another allocation of the same
// size (Attachment::Refresh): cuMemImportFromShareableHandle of the new fd, cuMemUnmap, cuMemMap
// of the new handle at the same address, cuMemSetAccess read-only, and only then cuMemRelease of
// the old handle, so that a failure can map the old memory back.
//
// Private to the client; includes no CUDA header, so it compiles in builds without CUDA, where
// Map() always fails with UNAVAILABLE. Not thread-safe; the Attachment owning it serializes.
#ifndef WEIGHTD_CLIENT_DETAIL_DEVICE_MAPPING_H_
#define WEIGHTD_CLIENT_DETAIL_DEVICE_MAPPING_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace weightd {

struct CudaDriver;

class DeviceMapping {
 public:
  // `fd`: the arena fd; not consumed (the import takes its own reference to the memory).
  // `size`: the manifest's arena size in bytes. `uuid_hex`: the attach reply's `device_uuid`
  // (32 lowercase hex digits). UNAVAILABLE "no CUDA driver (...)" when the driver cannot be
  // loaded or this build has no CUDA; UNAVAILABLE "no local GPU with UUID ..." listing the
  // visible ones; other driver failures with the failing call (CudaDriver::Error).
  static absl::StatusOr<std::unique_ptr<DeviceMapping>> Map(int fd, uint64_t size,
                                                            absl::string_view uuid_hex);
  DeviceMapping(const DeviceMapping&) = delete;
  DeviceMapping& operator=(const DeviceMapping&) = delete;
  ~DeviceMapping();  // unmaps and releases; failures are written to stderr

  // Device address of the arena's byte 0 (a CUdeviceptr), valid until destruction.
  uint64_t base() const { return va_; }
  // The local CUDA ordinal (as this process numbers devices) holding the arena.
  int ordinal() const { return ordinal_; }
  // Maps the allocation `fd` exports (same size, on the same GPU: `uuid_hex` must be the one
  // Map() was given, else FAILED_PRECONDITION) at base() instead of the current one; base() and
  // ordinal() do not change. `fd` is not consumed. On failure the old memory stays mapped
  // read-only at base() and the error names the failing call; when even mapping the old memory
  // back failed, the error says so and the range is unmapped (mapped() is false: device
  // pointers into it fault, CopyToHost fails) until the DeviceMapping is destroyed.
  absl::Status Remap(int fd, absl::string_view uuid_hex);
  // False only after a Remap that could not restore the old memory.
  bool mapped() const { return mapped_; }

  // Copies bytes [offset, offset + n) of the arena to host memory `dst` (cuMemcpyDtoH,
  // synchronous). INVALID_ARGUMENT when the range leaves the mapping.
  absl::Status CopyToHost(uint64_t offset, void* dst, size_t n) const;

 private:
  DeviceMapping() = default;

  const CudaDriver* cu_ = nullptr;
  int device_ = 0;  // CUdevice
  int ordinal_ = -1;
  std::string uuid_;     // of the device, as Map() was given it
  void* ctx_ = nullptr;  // retained primary CUcontext of device_
  uint64_t handle_ = 0;  // CUmemGenericAllocationHandle from the import
  uint64_t va_ = 0;      // reserved range (CUdeviceptr)
  uint64_t size_ = 0;    // bytes reserved and mapped
  bool mapped_ = false;
};

}  // namespace weightd

#endif  // WEIGHTD_CLIENT_DETAIL_DEVICE_MAPPING_H_
