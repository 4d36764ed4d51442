// HostBackend: arenas in sealed memfds (see backend.h for the contract).
//
// Memory is charged to the daemon's memory cgroup while it holds the fd, and stays alive while
// any client holds an fd or mapping, even after the daemon dropped its own (an unload with
// attached clients frees nothing until they detach). Thread-safe.
#ifndef WEIGHTD_HOST_BACKEND_H_
#define WEIGHTD_HOST_BACKEND_H_

#include <memory>

#include "weightd/backend.h"

namespace weightd {

class HostBackend final : public Backend {
 public:
  absl::string_view name() const override { return "host"; }
  ArenaKind arena_kind() const override { return ArenaKind::kHostMemfd; }
  absl::StatusOr<std::unique_ptr<Arena>> Allocate(const ArenaRequest& request) override;
  // Accepts a memfd with all four seals and exactly `request.bytes` bytes; the device fields
  // are ignored. A request or fd of a device arena is refused naming both kinds.
  absl::StatusOr<std::unique_ptr<Arena>> Adopt(UniqueFd fd, const AdoptRequest& request) override;
};

}  // namespace weightd

#endif  // WEIGHTD_HOST_BACKEND_H_
