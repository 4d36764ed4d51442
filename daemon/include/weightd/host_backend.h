// HostBackend: arenas in sealed memfds (see backend.h for the contract).
//
// Memory is charged to the daemon's memory cgroup while it holds the fd, and stays alive while
// any client holds an fd or mapping, even after the daemon dropped its own (an unload with
// attached clients frees nothing until they detach). Thread-safe.
//
// Admission. A memfd is ftruncate'd and then filled through page faults, so nothing is reserved
// when it is made, and a load larger than the memory left gets the whole daemon OOM-killed
// halfway through (fallocate would not help: inside a memory cgroup it is OOM-killed too). So
// Admit() refuses a load whose arenas exceed the smallest of
//   - the host_memory_budget less the bytes of every arena the backend holds (adopted included),
//   - MemAvailable (/proc/meminfo),
//   - the tightest memory cgroup limit of the daemon's cgroup and its ancestors, less usage
//     (v2: memory.max - memory.current; v1: memory.limit_in_bytes - memory.usage_in_bytes),
// the last two less the bytes of arenas still being filled (admitted, allocated, not yet
// resident: the kernel does not count them yet). RESOURCE_EXHAUSTED names the model, the bytes
// needed, the bytes available and the limit that decided. Unreadable /proc or cgroup files drop
// that check only.
#ifndef WEIGHTD_HOST_BACKEND_H_
#define WEIGHTD_HOST_BACKEND_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "weightd/backend.h"

namespace weightd {

// Where admission reads the system's memory state; tests point these at files of their own.
struct HostMemorySources {
  std::string meminfo = "/proc/meminfo";
  std::string self_cgroup = "/proc/self/cgroup";
  std::string cgroup_root = "/sys/fs/cgroup";
};

struct HostMemoryState {
  std::optional<uint64_t> mem_available;  // bytes; nullopt when meminfo could not be read
  std::optional<uint64_t> cgroup_left;    // bytes under the tightest cgroup limit; nullopt: none
  std::string cgroup;                     // the directory of that limit
};
HostMemoryState ReadHostMemory(const HostMemorySources& sources);

class HostBackend final : public Backend {
 public:
  // `memory_budget`: config host_memory_budget, 0 = none beyond the system's limits.
  explicit HostBackend(uint64_t memory_budget = 0, HostMemorySources sources = {});
  ~HostBackend() override;
  absl::string_view name() const override { return "host"; }
  ArenaKind arena_kind() const override { return ArenaKind::kHostMemfd; }
  absl::StatusOr<std::unique_ptr<Arena>> Allocate(const ArenaRequest& request) override;
  // Accepts a memfd with all four seals and exactly `request.bytes` bytes; the device fields
  // are ignored. A request or fd of a device arena is refused naming both kinds.
  absl::StatusOr<std::unique_ptr<Arena>> Adopt(UniqueFd fd, const AdoptRequest& request) override;
  // See the top of this file. Refuses before anything is allocated.
  absl::Status Admit(absl::string_view model, absl::Span<const ArenaRequest> arenas) override;
  // Bytes of the arenas alive now, and of those not yet resident (still being filled).
  uint64_t held_bytes() const;
  uint64_t pending_bytes() const;

  struct Ledger;  // the live arenas (host_backend.cc)

 private:
  uint64_t memory_budget_;
  HostMemorySources sources_;
  std::shared_ptr<Ledger> ledger_;
};

}  // namespace weightd

#endif  // WEIGHTD_HOST_BACKEND_H_
