// Backend: where a model's per-rank arenas live, and how they are written and exported.
//
//   WD_ASSIGN_OR_RETURN(std::unique_ptr<Backend> b, MakeBackend("auto"));
//   WD_ASSIGN_OR_RETURN(std::unique_ptr<Arena> a, b->Allocate({.bytes = n, .device = -1,
//                                                              .label = "llama/rank0"}));
//   int fd = a->host_fd();                    // host backend: the memfd, pwrite(2) fills it
//   ... executor fills it (or a->writable(), a shared writable mapping) ...
//   WD_RETURN_IF_ERROR(a->Seal());            // drop write access; exportable from now on
//   WD_ASSIGN_OR_RETURN(UniqueFd fd, a->Export());   // a new fd to send to a client
//
// Two implementations share this interface:
//   - `host` (host_backend.h): an arena is a memfd, written with pwrite(2) (the executor) or
//     through a MAP_SHARED mapping (writable(): tests, tools); Seal() unmaps that mapping and adds
//     F_SEAL_WRITE|F_SEAL_SHRINK|F_SEAL_GROW|F_SEAL_SEAL, so a client's PROT_WRITE MAP_SHARED
//     mapping fails (EPERM) and the bytes cannot change once lent. pwrite is the fast way: whole
//     pages written into a fresh memfd are not zeroed first, and pages never mapped writable
//     cost nothing to unmap at Seal().
//   - `cuda` (cuda_backend.h): an arena is a cuMemCreate allocation with a POSIX-fd handle;
//     writable() is empty (device memory is not host-addressable) and the CUDA executor writes it
//     by DMA through the `device_ptr` it gets from the CUDA-specific subclass. Export() returns a
//     cuMemExportToShareableHandle fd.
// Executors choose their path from Arena::host_fd() and writable(): a descriptor or a non-empty
// view means host memory.
//
// A restart hands arenas to the next daemon (handoff.h); Adopt() takes one back, refusing an
// arena of the other kind (a host memfd offered to `cuda` or a device fd offered to `host`)
// with a message naming both kinds.
//
// Thread-safety: Backend::Allocate, Admit and Adopt may be called concurrently. An Arena is
// written by the executor's threads (disjoint ranges) before Seal(); after Seal() its const
// methods and Export() are safe to call concurrently.
#ifndef WEIGHTD_BACKEND_H_
#define WEIGHTD_BACKEND_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "weightd/manifest.h"
#include "weightd/unique_fd.h"

namespace weightd {

struct ArenaRequest {
  uint64_t bytes = 0;  // size of the arena
  int device = -1;     // CUDA device ordinal; -1 = host memory
  std::string label;   // shows in /proc/<pid>/fd and in errors, e.g. "llama/rank0"
};

// An arena of an earlier daemon, as its model record describes it (handoff.h RankRecord).
struct AdoptRequest {
  uint64_t bytes = 0;  // the arena's size as recorded (before rounding to any granularity)
  ArenaKind kind = ArenaKind::kHostMemfd;  // what the earlier daemon exported
  // The device as the earlier daemon saw it. `device_uuid` ("GPU-...") identifies it when set,
  // because the ordinal depends on CUDA_VISIBLE_DEVICES, which the successor may order
  // differently; records written before the UUID was kept leave it empty, and `device` is used.
  int device = -1;
  std::string device_uuid;
  std::string label;  // "llama/rank0", for errors
};

// Options every backend receives; each uses the ones that concern it.
struct BackendOptions {
  // Most bytes of arenas one CUDA device may hold (config `device_memory_budget`); 0 = no cap
  // beyond the device's free memory. Checked by Admit(), so a load over it fails before it
  // allocates anything.
  uint64_t device_memory_budget = 0;
  // Most bytes of arenas the host backend may hold (config `host_memory_budget`); 0 = bounded
  // by MemAvailable and the memory cgroup only (host_backend.h).
  uint64_t host_memory_budget = 0;
};

// "a host memfd", "CUDA VMM device memory": for messages.
absl::string_view ArenaKindText(ArenaKind kind);
// "host_memfd", "cuda_vmm": the spelling in model records (handoff.h).
absl::string_view ArenaKindToken(ArenaKind kind);

class Arena {
 public:
  virtual ~Arena() = default;
  virtual uint64_t size() const = 0;
  virtual int device() const = 0;
  virtual ArenaKind kind() const = 0;
  // Writable host view until Seal(); empty for device arenas and after Seal().
  virtual std::span<std::byte> writable() = 0;
  // A descriptor of the arena's host memory that pwrite(2) fills, valid until Seal(); -1 for
  // device arenas and after Seal(). Owned by the arena.
  virtual int host_fd() const { return -1; }
  // What the arena is called in errors: "llama/rank0/seg2".
  virtual absl::string_view label() const = 0;
  // Ends writing and makes the arena exportable. Errors carry the failing syscall.
  virtual absl::Status Seal() = 0;
  // Read-only host view after Seal() (checksums); empty for device arenas.
  virtual std::span<const std::byte> readable() const = 0;
  // A new descriptor for a client; the caller owns it. FAILED_PRECONDITION before Seal().
  virtual absl::StatusOr<UniqueFd> Export() const = 0;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual absl::string_view name() const = 0;  // "host", "cuda"
  // The kind of every arena this backend allocates and adopts.
  virtual ArenaKind arena_kind() const = 0;
  // Checks, before a load allocates anything, that its arenas fit: `arenas` are all of the
  // load of `model`. RESOURCE_EXHAUSTED naming the model, the device, the bytes needed and the
  // bytes free (or the budget left). Advisory: another process may take the memory between
  // this check and Allocate(), which then fails with its own RESOURCE_EXHAUSTED. The default
  // admits everything.
  virtual absl::Status Admit(absl::string_view model, absl::Span<const ArenaRequest> arenas) {
    return absl::OkStatus();
  }
  // Allocates a zero-filled arena. RESOURCE_EXHAUSTED when memory is short.
  virtual absl::StatusOr<std::unique_ptr<Arena>> Allocate(const ArenaRequest& request) = 0;
  // Takes back an arena that an earlier daemon exported (systemd's fd store, `--takeover`):
  // verifies that `fd` is a finished arena of this backend's kind holding at least
  // `request.bytes` bytes (host: exactly) and returns it sealed. Takes ownership of `fd` (closed
  // on error, with everything acquired for it). FAILED_PRECONDITION naming `request.label` for
  // an arena of the other kind (naming both kinds), of the wrong size or seals, or on a device
  // this daemon does not see; UNIMPLEMENTED for a backend that cannot adopt.
  virtual absl::StatusOr<std::unique_ptr<Arena>> Adopt(UniqueFd fd, const AdoptRequest& request) {
    return absl::UnimplementedError(
        absl::StrCat("backend '", name(), "' cannot adopt arenas of an earlier daemon"));
  }
};

// Adopt()'s refusal of an arena of the other kind: FAILED_PRECONDITION naming `label`, both
// kinds, where the offered kind was learned (`according_to`: "its record", "its fd") and the
// --backend that adopts it.
absl::Status ArenaKindMismatch(absl::string_view label, ArenaKind offered, const Backend& backend,
                               absl::string_view according_to);

// `kind` is "host", "cuda" or "auto": cuda when this build has the CUDA backend and the driver
// reports a device (CudaDeviceAvailable()), else host. "cuda" without a CUDA build, driver or
// device is FAILED_PRECONDITION saying which. When `reason` is set it receives one line saying
// which backend was chosen and why (for the daemon's start-up log).
absl::StatusOr<std::unique_ptr<Backend>> MakeBackend(absl::string_view kind,
                                                     const BackendOptions& options = {},
                                                     std::string* reason = nullptr);

// A sealed memfd holding `bytes` (the manifest a client receives). `label` names it.
absl::StatusOr<UniqueFd> MakeSealedMemfd(absl::string_view label, absl::string_view bytes);

}  // namespace weightd

#endif  // WEIGHTD_BACKEND_H_
