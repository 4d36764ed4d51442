// DaemonConfig: weightd's configuration file (JSON; every key and default in docs/CONFIG.md).
//
//   WD_ASSIGN_OR_RETURN(DaemonConfig c, LoadConfigFile("/etc/weightd/weightd.json"));
//   c.socket = "/tmp/w.sock";   // command-line flags override file values
//
// Unknown keys and wrong types are errors naming the key and the file. Pure value type; the
// functions are thread-safe.
#ifndef WEIGHTD_CONFIG_H_
#define WEIGHTD_CONFIG_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "weightd/protocol.h"

namespace weightd {

struct PreloadEntry {
  std::string name;
  LoadSpec spec;
};

struct DaemonConfig {
  std::string socket;            // empty = DefaultDaemonSocketPath()
  std::string backend = "auto";  // auto | cuda | host
  // Pinned staging memory of all CUDA loads together (one ring per daemon, executor.h:
  // CudaStaging); host loads use it as the bound of each load's read buffers.
  uint64_t pinned_budget = 1ull << 30;
  // Most bytes of arenas per CUDA device (BackendOptions); 0 = bounded by free memory only.
  uint64_t device_memory_budget = 0;
  // Most bytes of arenas the host backend holds (BackendOptions); 0 = bounded by MemAvailable
  // and the memory cgroup only.
  uint64_t host_memory_budget = 0;
  std::vector<uint32_t> allow_uids;  // default attach/admin list; the daemon's uid is implicit
  std::vector<uint32_t> allow_gids;
  std::vector<std::string> model_roots;  // empty = anywhere the daemon can read
  std::vector<PreloadEntry> preload;
  int max_connections = 1024;
  int max_connections_per_uid = 256;     // of max_connections, the most one uid may hold
  int max_leases_per_connection = 4096;  // attaches held at once on one connection
  // Keep the generation an update replaced, for `rollback` (one more copy of the ranks the
  // update rewrote stays in memory).
  bool keep_previous_generation = false;
  // Size target of a rank's arenas ("segments", segment_plan.h): consecutive decoder layers share
  // an arena until it would exceed this many bytes; embeddings, norms and lm_head have one of
  // their own. An update allocates and fills new arenas for the segments it touches only. 0 =
  // one arena per rank.
  uint64_t arena_segment_bytes = 256ull << 20;
  uint64_t max_request_bytes = kDefaultMaxRequestBytes;
  int hello_timeout_ms = 10000;   // clients that send no hello within this are disconnected
  int io_threads = 4;             // reader/copier threads per load
  std::string io_mode = "pread";  // pread | auto | uring (executor.h IoMode)
  std::string log_level = "info";
  uint32_t socket_mode = 0660;
  // Keys the file set that this version accepts but ignores, each with the reason: logged as
  // warnings at start and on reload (`host_prefault`, obsolete since host arenas are written
  // with pwrite).
  std::vector<std::string> warnings;
  // The HTTP listener for /metrics, /healthz and /readyz (http_endpoint.h ParseListenAddress;
  // validated when parsed); empty = none.
  std::string metrics_listen;
};

absl::StatusOr<DaemonConfig> ParseConfig(absl::string_view json, absl::string_view source);
absl::StatusOr<DaemonConfig> LoadConfigFile(const std::string& path);

// Parses a byte count: an integer, optionally with a suffix k/M/G/T (powers of 1000) or
// KiB/MiB/GiB/TiB (powers of 1024). Errors name `what`.
absl::StatusOr<uint64_t> ParseByteSize(absl::string_view text, absl::string_view what);

}  // namespace weightd

#endif  // WEIGHTD_CONFIG_H_
