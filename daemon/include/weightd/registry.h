// Registry: the daemon's models, their per-rank states, loads and leases.
//
//   Registry reg(backend.get(), config);
//   WD_RETURN_IF_ERROR(reg.StartLoad("llama", spec, peer));      // returns at once
//   reg.Status("llama")   // loading 40% ... ready
//   WD_ASSIGN_OR_RETURN(AttachGrant g, reg.Attach("llama", 0, peer, conn_id));
//   reg.ReleaseConnection(conn_id);                             // drops that connection's leases
//
// States of a rank: loading -> ready | failed(error); unloading while an unload is in progress
// (a forced unload of a loading model cancels the load). A failed model keeps its error and
// releases its memory; it stays listed until unloaded. Loads run on background threads, one per
// model, so the server keeps answering while they run.
//
// Authorization (docs/PROTOCOL.md): the daemon's own uid may do everything. Otherwise load and
// unload need the peer's uid in config allow_uids or its gid in allow_gids; attach, detach and
// status of a model need the model's allow lists (those given at load, else the config's).
// root is not special: list it to allow it.
//
// Thread-safety: all methods are thread-safe (one absl::Mutex guards the model table; each
// load's progress counters are atomics).
#ifndef WEIGHTD_REGISTRY_H_
#define WEIGHTD_REGISTRY_H_

#include <sys/types.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "weightd/backend.h"
#include "weightd/config.h"
#include "weightd/executor.h"
#include "weightd/handoff.h"
#include "weightd/protocol.h"
#include "weightd/unique_fd.h"

namespace weightd {

// The credentials of a connected peer: SO_PEERCRED, plus its supplementary groups from
// SO_PEERGROUPS. Both are captured by the kernel at connect(), so a peer cannot change them
// afterwards (unlike /proc/<pid>/status, which can be read after the pid is reused).
struct Peer {
  pid_t pid = 0;
  uid_t uid = 0;
  gid_t gid = 0;              // primary group
  std::vector<gid_t> groups;  // supplementary groups
};

enum class RankState : uint8_t { kLoading, kReady, kFailed, kUnloading };
absl::string_view RankStateName(RankState s);

struct LeaseInfo {
  uint64_t id = 0;
  uint64_t connection = 0;
  Peer peer;
  int rank = 0;
};

// The most leases one Status() call lists (the oldest first, in model and rank order), so that a
// status reply stays small whatever the number of leases; RankStatus::lease_count has them all.
inline constexpr size_t kStatusMaxListedLeases = 64;

// A snapshot for status replies.
struct RankStatus {
  int rank = 0;
  int device = -1;
  RankState state = RankState::kLoading;
  uint64_t arena_bytes = 0;
  uint32_t tensors = 0;
  uint64_t lease_count = 0;       // leases held on the rank
  std::vector<LeaseInfo> leases;  // some of them (kStatusMaxListedLeases)
};

struct ModelStatus {
  std::string name;
  std::string checkpoint;
  std::string backend;
  int tp = 1;
  std::string error;  // non-empty when failed
  std::vector<RankStatus> ranks;
  uint64_t bytes_total = 0;  // checkpoint bytes the load reads
  uint64_t bytes_done = 0;
  double load_seconds = 0;  // so far, or in total once finished
  double started_unix = 0;
  // "load" (read from the checkpoint), "fdstore" (re-adopted from systemd's fd store at start)
  // or "takeover" (received from the previous daemon).
  std::string origin = "load";
};

// Callbacks through which the daemon keeps systemd's fd store in step with the registry. Both
// run without the registry's lock held, on the thread that made the change (a load thread, or
// the caller of Unload), and must not call back into the registry. They run one at a time, in
// the order of the changes they report: an unload that comes while the load thread is still
// storing the model's fds waits for on_ready to return before its on_removed runs.
struct RegistryHooks {
  // A load finished: the model's fds (new descriptors, owned by the callee) with their names.
  std::function<void(std::vector<NamedFd>)> on_ready;
  // A ready model was unloaded: the names its fds were stored under.
  std::function<void(std::vector<std::string>)> on_removed;
};

// What an attaching client receives; the fds are new descriptors owned by the grant.
struct AttachGrant {
  uint64_t lease = 0;
  UniqueFd manifest;
  uint64_t manifest_bytes = 0;
  std::vector<UniqueFd> arenas;
  // Per arena (same order): the device UUID as 32 lowercase hex digits for a device arena,
  // empty for a host arena.
  std::vector<std::string> arena_device_uuids;
};

class Registry {
 public:
  Registry(Backend* backend, DaemonConfig config);
  ~Registry();  // Shutdown()
  Registry(const Registry&) = delete;
  Registry& operator=(const Registry&) = delete;

  // Validates (name, authorization, model_roots) and starts the load on a background thread.
  // ALREADY_EXISTS if `name` is taken (whatever its state), PERMISSION_DENIED for an
  // unauthorized peer or a checkpoint outside model_roots, INVALID_ARGUMENT for bad options.
  absl::Status StartLoad(const std::string& name, const LoadSpec& spec, const Peer& peer);

  // Models the peer may see (all of them when `name` is empty), sorted by name. Lists at most
  // kStatusMaxListedLeases leases in all.
  absl::StatusOr<std::vector<ModelStatus>> Status(const std::string& name, const Peer& peer) const;

  // A new lease of `connection` on (name, rank). RESOURCE_EXHAUSTED naming the config key when
  // the connection already holds max_leases_per_connection leases (on all models together).
  absl::StatusOr<AttachGrant> Attach(const std::string& name, int rank, const Peer& peer,
                                     uint64_t connection);
  // Releases one lease of `connection` on (name, rank). NOT_FOUND if it holds none.
  // Releases lease `lease` of `connection` on (name, rank); without `lease`, the first such
  // lease of the connection (old clients). NOT_FOUND when the connection holds none (a forced
  // unload already dropped it).
  absl::Status Detach(const std::string& name, int rank, uint64_t connection,
                      std::optional<uint64_t> lease = std::nullopt);
  void ReleaseConnection(uint64_t connection);

  // FAILED_PRECONDITION listing (some of) the attached pids unless `force`.
  absl::Status Unload(const std::string& name, bool force, const Peer& peer);

  // Prometheus text exposition.
  std::string Metrics() const;

  // Blocks until no load is running (tests, shutdown).
  void WaitForLoads();

  // Cancels the running loads and waits up to `timeout` for their threads; each logs that it
  // was cancelled because weightd is shutting down. Loads asked for afterwards are UNAVAILABLE.
  // Returns the names of the loads still running at the deadline (a read blocked in the
  // kernel, e.g. on a hung network filesystem, cannot be interrupted); their threads stay
  // joinable, so the caller either exits the process without destroying the registry or
  // accepts that the destructor waits for them.
  std::vector<std::string> Shutdown(absl::Duration timeout = absl::InfiniteDuration());

  bool MayAdminister(const Peer& peer) const;

  // Set once, before the first load.
  void SetHooks(RegistryHooks hooks);

  // Lists a model again from fds of an earlier daemon, without reading its checkpoint. Checks
  // the record against this daemon (backend), each manifest (seals, size, DecodeManifest, arena
  // sizes) and each arena (Backend::Adopt); a bad set is FAILED_PRECONDITION or INVALID_ARGUMENT
  // naming the model and the fd, and its fds are closed. ALREADY_EXISTS if the name is taken.
  // `origin` is "fdstore" or "takeover". Does not call on_ready (the fds are stored already).
  absl::Status Adopt(AdoptableModel model, absl::string_view origin);

  // Every ready model's fds with their names, for a successor. FAILED_PRECONDITION while a load
  // runs. Call Freeze(true) first so nothing changes until the handoff ends.
  absl::StatusOr<std::vector<NamedFd>> ExportAll();
  // While frozen, load and unload are UNAVAILABLE (a takeover is in progress).
  void Freeze(bool frozen);

  // Names of the models (for SIGHUP's preload diff).
  std::vector<std::string> ModelNames() const;

 private:
  struct Model;
  void RunLoad(std::shared_ptr<Model> model);
  // The model's fds (new descriptors) with their names; the model must be ready.
  absl::StatusOr<std::vector<NamedFd>> ExportLocked(const Model& m) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  static std::vector<std::string> FdNames(const Model& m);
  bool MayAttach(const Model& m, const Peer& peer) const;
  // model_roots, each resolved (realpath); those that do not exist are left out.
  std::vector<std::string> ResolvedRoots() const;
  // Takes `leases` off the per-connection counts (they are being dropped).
  void UncountLeases(const std::vector<LeaseInfo>& leases) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status CheckPath(const std::string& path, absl::string_view what) const;

  Backend* const backend_;
  const DaemonConfig config_;
  const uid_t self_uid_;
  mutable absl::Mutex mu_;
  std::map<std::string, std::shared_ptr<Model>> models_ ABSL_GUARDED_BY(mu_);
  struct LoadThread {
    std::thread thread;
    // Set as the thread's last act. (Holding the Model here instead would keep an unloaded
    // model's arenas alive until the next load.)
    std::shared_ptr<std::atomic<bool>> done;
  };
  // Joins the threads of finished loads (called when a new load starts).
  void ReapThreads() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  std::vector<LoadThread> threads_ ABSL_GUARDED_BY(mu_);
  // The pinned staging ring every CUDA load shares (executor.h: CudaStaging), made by the first
  // one, in the context of its first device; a failure to make it fails that load only.
  absl::StatusOr<CudaStaging*> Staging(int device) ABSL_LOCKS_EXCLUDED(staging_mu_);
  absl::Mutex staging_mu_;
  // Held from a load's Backend::Admit to its last Allocate, so that two loads cannot both be
  // admitted into the same free memory.
  absl::Mutex admission_mu_;
  std::unique_ptr<CudaStaging> staging_ ABSL_GUARDED_BY(staging_mu_);
  uint64_t next_lease_ ABSL_GUARDED_BY(mu_) = 1;
  // Leases held per connection, on all models (for max_leases_per_connection).
  std::map<uint64_t, uint64_t> connection_leases_ ABSL_GUARDED_BY(mu_);
  int running_loads_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t loads_total_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t loads_failed_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t attaches_total_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t detaches_total_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t bytes_loaded_total_ ABSL_GUARDED_BY(mu_) = 0;
  // Checkpoint bytes read by loads, finished or not: stays 0 across an fd-store restart.
  uint64_t bytes_read_total_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t adopted_total_ ABSL_GUARDED_BY(mu_) = 0;
  bool frozen_ ABSL_GUARDED_BY(mu_) = false;
  bool shutting_down_ ABSL_GUARDED_BY(mu_) = false;
  RegistryHooks hooks_;
  // Held by a change that calls a hook from before it releases mu_ until the hook returned, so
  // the hooks see the changes in mu_'s order. Acquired while holding mu_, never the reverse.
  absl::Mutex hooks_mu_ ABSL_ACQUIRED_AFTER(mu_);
};

}  // namespace weightd

#endif  // WEIGHTD_REGISTRY_H_
