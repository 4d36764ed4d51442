// Backend: where a model's per-rank arenas live, and how they are written and exported.
//
//   WD_ASSIGN_OR_RETURN(std::unique_ptr<Backend> b, MakeBackend("auto"));
//   WD_ASSIGN_OR_RETURN(std::unique_ptr<Arena> a, b->Allocate({.bytes = n, .device = -1,
//                                                              .label = "llama/rank0"}));
//   std::span<std::byte> w = a->writable();   // host backend: a shared writable mapping
//   ... executor fills w ...
//   WD_RETURN_IF_ERROR(a->Seal());            // drop write access; exportable from now on
//   WD_ASSIGN_OR_RETURN(UniqueFd fd, a->Export());   // a new fd to send to a client
//
// Two implementations share this interface:
//   - `host` (host_backend.h): an arena is a memfd written through a MAP_SHARED mapping; Seal()
//     unmaps it and adds F_SEAL_WRITE|F_SEAL_SHRINK|F_SEAL_GROW|F_SEAL_SEAL, so a client's
//     PROT_WRITE MAP_SHARED mapping fails (EPERM) and the bytes cannot change once lent.
//   - `cuda` (cuda_backend.h): an arena is a cuMemCreate allocation with a POSIX-fd handle; writable()
//     is empty (device memory is not host-addressable) and the CUDA executor writes it by DMA
//     through the `device_ptr` it gets from the CUDA-specific subclass. Export() returns a fresh
//     cuMemExportToShareableHandle fd.
// Executors choose their path from Arena::writable(): non-empty means host-addressable.
//
// Thread-safety: Backend::Allocate may be called concurrently. An Arena is written by the
// executor's threads (disjoint ranges) before Seal(); after Seal() its const methods and
// Export() are safe to call concurrently.
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
#include "weightd/manifest.h"
#include "weightd/unique_fd.h"

namespace weightd {

struct ArenaRequest {
  uint64_t bytes = 0;  // size of the arena
  int device = -1;     // CUDA device ordinal; -1 = host memory
  std::string label;   // shows in /proc/<pid>/fd and in errors, e.g. "llama/rank0"
};

class Arena {
 public:
  virtual ~Arena() = default;
  virtual uint64_t size() const = 0;
  virtual int device() const = 0;
  virtual ArenaKind kind() const = 0;
  // Writable host view until Seal(); empty for device arenas and after Seal().
  virtual std::span<std::byte> writable() = 0;
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
  // Allocates a zero-filled arena. RESOURCE_EXHAUSTED when memory is short.
  virtual absl::StatusOr<std::unique_ptr<Arena>> Allocate(const ArenaRequest& request) = 0;
  // Takes back an arena that an earlier daemon exported (systemd's fd store, `--takeover`):
  // verifies that `fd` is a finished arena of this backend of exactly `bytes` bytes and returns
  // it sealed. Takes ownership of `fd` (closed on error). FAILED_PRECONDITION naming `label` for
  // an fd of the wrong kind, size or seals; UNIMPLEMENTED for a backend that cannot adopt.
  virtual absl::StatusOr<std::unique_ptr<Arena>> Adopt(UniqueFd fd, uint64_t bytes, int device,
                                                       absl::string_view label) {
    return absl::UnimplementedError(
        absl::StrCat("backend '", name(), "' cannot adopt arenas of an earlier daemon"));
  }
};

// `kind` is "host", "cuda" or "auto" (cuda when compiled in and a device is present, else
// host). "cuda" without a CUDA build is FAILED_PRECONDITION saying so.
absl::StatusOr<std::unique_ptr<Backend>> MakeBackend(absl::string_view kind);

// A sealed memfd holding `bytes` (the manifest a client receives). `label` names it.
absl::StatusOr<UniqueFd> MakeSealedMemfd(absl::string_view label, absl::string_view bytes);

}  // namespace weightd

#endif  // WEIGHTD_BACKEND_H_
