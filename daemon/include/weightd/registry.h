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
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/functional/any_invocable.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "weightd/backend.h"
#include "weightd/config.h"
#include "weightd/executor.h"
#include "weightd/handoff.h"
#include "weightd/protocol.h"
#include "weightd/segment_plan.h"
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
  uint64_t generation = 0;  // the generation the lease maps
};

// The most leases one Status() call lists (the oldest first, in model and rank order), so that a
// status reply stays small whatever the number of leases; RankStatus::lease_count has them all.
inline constexpr size_t kStatusMaxListedLeases = 64;

// A snapshot for status replies.
struct RankStatus {
  int rank = 0;
  int device = -1;
  RankState state = RankState::kLoading;
  uint64_t arena_bytes = 0;  // of all its arenas (segments) together
  uint32_t arenas = 0;       // its arenas in the newest generation
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
  uint64_t generation = 0;           // the newest, published generation; 0 until loaded
  uint64_t previous_generation = 0;  // the kept previous one (rollback), 0 = none
  // The running or last update, when there was one.
  struct Update {
    std::string state;  // "running", "failed", "done"
    uint64_t generation = 0;  // the generation it builds or built
    uint64_t bytes_total = 0, bytes_done = 0;  // bytes read and copied
    double seconds = 0;
    std::string error;
  };
  std::optional<Update> update;
};

// Where an update's new tensors come from (docs/PROTOCOL.md "Generations").
struct UpdateSource {
  std::string checkpoint;  // a checkpoint directory or file, checked against model_roots
  UniqueFd memfd;          // or: a sealed memfd holding a safetensors file
};

// What a finished update did.
struct UpdateReport {
  uint64_t generation = 0;
  double seconds = 0;
  uint64_t bytes_read = 0;  // of the update's tensors
  size_t ranks_rewritten = 0;
  size_t targets_rewritten = 0;  // targets (of all ranks) fed by new tensors
  size_t targets_copied = 0;     // targets carried over from the previous generation
  // Arenas (segments, segment_plan.h) of all ranks that the update replaced, their bytes (the
  // new memory it allocated) and the bytes of them it copied from the previous generation
  // (targets of a replaced segment that the new tensors do not cover completely). The other
  // arenas are shared with the previous generation.
  size_t segments_rewritten = 0;
  uint64_t bytes_allocated = 0;
  uint64_t bytes_copied = 0;
};

struct RollbackReport {
  uint64_t generation = 0;  // the new number
  uint64_t restored = 0;    // the generation whose weights it publishes again
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
  uint64_t generation = 0;
  // refresh only: the lease maps the newest generation already (no fds).
  bool unchanged = false;
  UniqueFd manifest;
  uint64_t manifest_bytes = 0;
  std::vector<UniqueFd> arenas;
  // Per arena (same order): the device UUID as 32 lowercase hex digits for a device arena,
  // empty for a host arena.
  std::vector<std::string> arena_device_uuids;
  // Per arena: its daemon-wide identity (Registry::Segment::id). Equal ids are the same memory,
  // so a refreshing client keeps the mapping of an arena it maps already.
  std::vector<uint64_t> arena_ids;
};

class Reaper;  // registry_internal.h

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

  // FAILED_PRECONDITION listing (some of) the attached pids unless `force`. A forced unload
  // cancels a running update.
  absl::Status Unload(const std::string& name, bool force, const Peer& peer);

  // ---- generations (docs/PROTOCOL.md "Generations") ----
  // Validates the request and the new tensors against the model's plan (names, dtypes, shapes;
  // errors in registry.h's UpdatePlan terms), then builds the next generation on a background
  // thread. Returns the update's id (for UpdateOutcome). `bound_connection` (0 = none): closing
  // that connection (ReleaseConnection) cancels the update.
  struct UpdateTicket {
    uint64_t id = 0;
    uint64_t generation = 0;  // the one it builds
  };
  absl::StatusOr<UpdateTicket> StartUpdate(const std::string& name, UpdateSource source,
                                           const Peer& peer, uint64_t bound_connection = 0);
  // The outcome of update `id`: nullopt while it runs; its error, or what it published.
  // NOT_FOUND once forgotten (the registry keeps the last 64 outcomes).
  std::optional<absl::StatusOr<UpdateReport>> UpdateOutcome(uint64_t id) const;
  // The model's newest generation (0 while it loads), for wait_generation. NOT_FOUND,
  // PERMISSION_DENIED as Attach.
  absl::StatusOr<uint64_t> CurrentGeneration(const std::string& name, const Peer& peer) const;
  // Publishes the kept previous generation again, as the next number.
  absl::StatusOr<RollbackReport> Rollback(const std::string& name, const Peer& peer);
  // Moves lease `lease` of `connection` on (name, rank) to the newest generation: a grant of
  // its fds, or `unchanged` when the lease maps it already. NOT_FOUND when the connection does
  // not hold that lease.
  absl::StatusOr<AttachGrant> Refresh(const std::string& name, int rank, uint64_t connection,
                                      uint64_t lease);
  // An eventfd (non-blocking, owned by the registry) that becomes readable whenever a
  // generation is published, an update ends or a model is removed; the server waits on it to
  // answer wait_generation and `update` with `wait`. Read it to clear it.
  int event_fd() const { return event_fd_.get(); }

  // Prometheus text exposition.
  std::string Metrics() const;

  // Blocks until no load or update is running and the memory of dropped generations is freed
  // (tests, shutdown).
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
  struct Segment;
  struct RankMemory;
  struct Generation;
  struct PlannedModel;
  struct BuiltLoad;
  // A load's thread: BuildLoad, then FinishLoad.
  void RunLoad(std::shared_ptr<Model> model);
  // Plans, allocates, reads and seals generation 1 of `m`; runs without mu_.
  absl::StatusOr<BuiltLoad> BuildLoad(Model& m);
  // Publishes what BuildLoad built (or records why it did not), hands the arenas to the fd
  // store, and logs the outcome.
  void FinishLoad(const std::shared_ptr<Model>& m, const absl::Status& status, BuiltLoad built);
  void RunUpdate(std::shared_ptr<Model> model, uint64_t id, UpdateSource source);
  // Builds the next generation of `m` from `source` (update.cc); runs without mu_.
  absl::StatusOr<std::shared_ptr<Generation>> BuildUpdate(Model& m, const UpdateSource& source,
                                                          LoadProgress* progress,
                                                          UpdateReport* result);
  // The model's plan (its ranks only) and the checkpoint tensors it skips, from its LoadSpec.
  absl::StatusOr<PlannedModel> PlanModel(const Model& m) const;
  // Admission of all `requests` together, then their allocation (held under admission_mu_).
  absl::StatusOr<std::vector<std::unique_ptr<Arena>>> AllocateArenas(
      absl::string_view name, const std::vector<ArenaRequest>& requests);
  // Runs `plan` into `arenas` with the executor their kind needs (the CUDA one from the shared
  // staging ring); `what` ("load of model 'x'") prefixes CUDA errors.
  absl::Status Execute(absl::string_view what, const Plan& plan, std::span<Arena* const> arenas,
                       std::optional<IoMode> io_mode, LoadProgress* progress,
                       TargetChecksums* crcs);
  // Seals a freshly written arena and gives it its id.
  absl::StatusOr<std::shared_ptr<const Segment>> MakeSegment(std::unique_ptr<Arena> arena);
  // The memory of input rank `r` of `plan` from its sealed `segments` (segments_of[r] order)
  // and its manifest (CRCs from `known`, indexed by the rank's targets, where >= 0).
  absl::StatusOr<std::shared_ptr<const RankMemory>> SealRank(
      absl::string_view model, const SegmentedPlan& plan, size_t r,
      std::vector<std::shared_ptr<const Segment>> segments, int device,
      const std::vector<int64_t>* known) const;
  // Makes `next` the newest generation, keeping the current one as previous when configured
  // to, and signals event_fd(); PruneLocked()s.
  void PublishLocked(Model& m, std::shared_ptr<Generation> next)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Drops the generations of `m` that are neither newest nor kept previous and that no lease
  // maps; the reaper frees their memory on its own thread.
  void PruneLocked(Model& m) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // A grant of the newest generation's fds for rank slot `r` (attach, refresh).
  absl::StatusOr<AttachGrant> GrantLocked(const Model& m, size_t r) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Signal() const;
  // Starts a background thread (a load's or an update's).
  void SpawnLocked(absl::AnyInvocable<void() &&> body) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The model's fds (new descriptors) with their names; the model must be ready.
  absl::StatusOr<std::vector<NamedFd>> ExportLocked(const Model& m) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  static std::vector<std::string> FdNames(const Model& m);
  // FdNames in the order the fd store removes them: the record first.
  static std::vector<std::string> RemovalNames(const Model& m);
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
  std::atomic<uint64_t> next_arena_id_{1};
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
  int running_updates_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t next_update_ ABSL_GUARDED_BY(mu_) = 1;
  uint64_t updates_total_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t updates_failed_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t rollbacks_total_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t refreshes_total_ ABSL_GUARDED_BY(mu_) = 0;
  // The last outcomes of updates, by id (UpdateOutcome).
  std::deque<std::pair<uint64_t, absl::StatusOr<UpdateReport>>> outcomes_ ABSL_GUARDED_BY(mu_);
  UniqueFd event_fd_;
  // Frees dropped generations off the caller's thread (registry_internal.h). Last member: it is
  // destroyed first, freeing what it holds before the models go.
  std::unique_ptr<Reaper> reaper_;
  bool shutting_down_ ABSL_GUARDED_BY(mu_) = false;
  RegistryHooks hooks_;
  // Held by a change that calls a hook from before it releases mu_ until the hook returned, so
  // the hooks see the changes in mu_'s order. Acquired while holding mu_, never the reverse.
  absl::Mutex hooks_mu_ ABSL_ACQUIRED_AFTER(mu_);
};

}  // namespace weightd

#endif  // WEIGHTD_REGISTRY_H_
