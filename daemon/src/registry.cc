#include "weightd/registry.h"

#include <fcntl.h>
#include <limits.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <optional>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "registry_internal.h"
#include "weightd/checkpoint.h"
#include "weightd/cuda_backend.h"
#include "weightd/detail/metrics_text.h"
#include "weightd/detail/staging_ring.h"
#include "weightd/log.h"
#include "weightd/manifest.h"
#include "weightd/plan.h"
#include "weightd/status_macros.h"

namespace weightd {

absl::string_view RankStateName(RankState s) {
  switch (s) {
    case RankState::kLoading:
      return "loading";
    case RankState::kReady:
      return "ready";
    case RankState::kFailed:
      return "failed";
    case RankState::kUnloading:
      return "unloading";
  }
  return "?";
}

namespace {

// "GPU-01234567-89ab-cdef-0123-456789abcdef" (CudaArena::device_uuid) -> the 32 hex digits the
// attach reply carries (docs/PROTOCOL.md), which clients compare with cuDeviceGetUuid's bytes.
std::string UuidHex(absl::string_view gpu_uuid) {
  absl::ConsumePrefix(&gpu_uuid, "GPU-");
  std::string hex;
  for (const char ch : gpu_uuid) {
    if (ch != '-') hex.push_back(ch);
  }
  return hex;
}

bool Contains(const std::vector<uint32_t>& v, uint32_t x) {
  return std::find(v.begin(), v.end(), x) != v.end();
}

std::string IdsText(const std::vector<uint32_t>& v) {
  return v.empty() ? "none" : absl::StrJoin(v, ",");
}

}  // namespace

Registry::Registry(Backend* backend, DaemonConfig config)
    : backend_(backend),
      config_(std::move(config)),
      self_uid_(::geteuid()),
      event_fd_(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)),
      reaper_(std::make_unique<Reaper>()) {}

void Registry::Signal() const {
  const uint64_t one = 1;
  if (event_fd_) (void)!::write(event_fd_.get(), &one, sizeof(one));
}

void Registry::SpawnLocked(absl::AnyInvocable<void() &&> body) {
  ReapThreads();
  auto done = std::make_shared<std::atomic<bool>>(false);
  threads_.push_back({std::thread([body = std::move(body), done]() mutable {
                        std::move(body)();
                        done->store(true);
                      }),
                      done});
}

void Registry::PublishLocked(Model& m, std::shared_ptr<Generation> next) {
  if (m.current != nullptr) {
    m.previous = config_.keep_previous_generation ? m.current->number : 0;
  }
  m.current = std::move(next);
  m.generations[m.current->number] = m.current;
  Signal();
  PruneLocked(m);
}

void Registry::PruneLocked(Model& m) {
  std::vector<std::shared_ptr<Generation>> dropped;
  for (auto it = m.generations.begin(); it != m.generations.end();) {
    const uint64_t n = it->first;
    const bool needed =
        (m.current != nullptr && n == m.current->number) || n == m.previous ||
        std::any_of(m.leases.begin(), m.leases.end(),
                    [n](const LeaseInfo& li) { return li.generation == n; });
    if (needed) {
      ++it;
    } else {
      dropped.push_back(std::move(it->second));
      it = m.generations.erase(it);
    }
  }
  reaper_->Add(std::move(dropped));
}

Registry::~Registry() { Shutdown(); }

std::vector<std::string> Registry::Shutdown(absl::Duration timeout) {
  int running = 0;
  {
    absl::MutexLock l(&mu_);
    shutting_down_ = true;
    running = running_loads_ + running_updates_;
    for (auto& [name, m] : models_) {
      m->progress.cancel = true;
      if (m->update != nullptr) m->update->progress.cancel = true;
    }
  }
  if (running > 0) LogInfo("shutdown: cancelling %d running loads and updates", running);
  const absl::Time deadline = absl::Now() + timeout;
  for (;;) {
    absl::MutexLock l(&mu_);
    ReapThreads();
    if (threads_.empty() || absl::Now() >= deadline) break;
    mu_.AwaitWithDeadline(absl::Condition(
                              +[](Registry* r) ABSL_NO_THREAD_SAFETY_ANALYSIS {
                                return r->running_loads_ + r->running_updates_ == 0;
                              },
                              this),
                          std::min(deadline, absl::Now() + absl::Milliseconds(50)));
  }
  std::vector<std::string> stuck;
  absl::MutexLock l(&mu_);
  for (const auto& [name, m] : models_) {
    for (const Model::Rank& r : m->ranks) {
      if (r.state == RankState::kLoading || r.state == RankState::kUnloading) {
        stuck.push_back(name);
        break;
      }
    }
    if (m->update != nullptr && m->update->running &&
        (stuck.empty() || stuck.back() != name)) {
      stuck.push_back(name);
    }
  }
  if (stuck.empty() && !threads_.empty()) stuck.push_back("(a load ending)");
  return stuck;
}

absl::StatusOr<CudaStaging*> Registry::Staging(int device) {
  absl::MutexLock l(&staging_mu_);
  if (staging_ == nullptr) {
    absl::StatusOr<std::unique_ptr<CudaStaging>> s =
        CreateCudaStaging(config_.pinned_budget, config_.io_threads, device);
    if (!s.ok()) {
      return Annotate(s.status(),
                      absl::StrCat("pinned staging of ", FormatBytes(config_.pinned_budget),
                                   " (--pinned-budget)"));
    }
    staging_ = std::move(*s);
    LogInfo("pinned staging: %s in %d slots of %s, shared by all CUDA loads",
            FormatBytes(staging_->ring().allocated_bytes()), staging_->ring().slots(),
            FormatBytes(staging_->ring().slot_bytes()));
  }
  return staging_.get();
}

void Registry::ReapThreads() {
  // A finished model's thread has at most its last log line left to run.
  for (auto it = threads_.begin(); it != threads_.end();) {
    if (it->done->load()) {
      it->thread.join();
      it = threads_.erase(it);
    } else {
      ++it;
    }
  }
}

namespace {

// True when the peer's primary or any supplementary group is listed.
bool InAllowedGroup(const std::vector<uint32_t>& allowed, const Peer& peer) {
  if (Contains(allowed, peer.gid)) return true;
  for (gid_t g : peer.groups) {
    if (Contains(allowed, g)) return true;
  }
  return false;
}

}  // namespace

bool Registry::MayAdminister(const Peer& peer) const {
  return peer.uid == self_uid_ || Contains(config_.allow_uids, peer.uid) ||
         InAllowedGroup(config_.allow_gids, peer);
}

void Registry::UncountLeases(const std::vector<LeaseInfo>& leases) {
  for (const LeaseInfo& li : leases) {
    auto held = connection_leases_.find(li.connection);
    if (held != connection_leases_.end() && --held->second == 0) connection_leases_.erase(held);
  }
}

bool Registry::MayAttach(const Model& m, const Peer& peer) const {
  return peer.uid == self_uid_ || Contains(m.allow_uids, peer.uid) ||
         InAllowedGroup(m.allow_gids, peer);
}

std::vector<std::string> Registry::ResolvedRoots() const {
  std::vector<std::string> roots;
  for (const std::string& root : config_.model_roots) {
    char rr[PATH_MAX];
    if (::realpath(root.c_str(), rr) != nullptr) roots.push_back(rr);
  }
  return roots;
}

absl::Status Registry::CheckPath(const std::string& path, absl::string_view what) const {
  char resolved[PATH_MAX];
  if (::realpath(path.c_str(), resolved) == nullptr) {
    return ErrnoError(errno, absl::StrCat(what, " '", path, "'"));
  }
  if (config_.model_roots.empty()) return absl::OkStatus();
  const std::string real = resolved;
  for (const std::string& r : ResolvedRoots()) {
    if (r == "/" || real == r ||
        (real.size() > r.size() && real.compare(0, r.size(), r) == 0 && real[r.size()] == '/')) {
      return absl::OkStatus();
    }
  }
  return absl::PermissionDeniedError(absl::StrCat(what, " '", path, "' (resolved to '", real,
                                                  "') is outside the configured model_roots (",
                                                  absl::StrJoin(config_.model_roots, ", "), ")"));
}

absl::Status Registry::StartLoad(const std::string& name, const LoadSpec& spec, const Peer& peer) {
  if (!MayAdminister(peer)) {
    return absl::PermissionDeniedError(absl::StrCat(
        "uid ", peer.uid, " (gid ", peer.gid, ") may not load models: add it to allow_uids or ",
        "allow_gids in the daemon config"));
  }
  WD_RETURN_IF_ERROR(CheckPath(spec.checkpoint, "checkpoint"));
  if (!spec.recipe_file.empty()) WD_RETURN_IF_ERROR(CheckPath(spec.recipe_file, "recipe file"));
  if (!spec.dtype.empty() && !ParseDTypeAlias(spec.dtype)) {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown dtype '", spec.dtype, "' (try bf16, fp16, fp32)"));
  }
  std::vector<int> ranks = spec.ranks;
  if (ranks.empty()) {
    for (int r = 0; r < spec.tp; ++r) ranks.push_back(r);
  }
  std::vector<int> sorted = ranks;
  std::sort(sorted.begin(), sorted.end());
  if (std::adjacent_find(sorted.begin(), sorted.end()) != sorted.end()) {
    return absl::InvalidArgumentError("'ranks' lists a rank twice");
  }
  if (!spec.devices.empty() && spec.devices.size() != ranks.size()) {
    return absl::InvalidArgumentError(absl::StrCat("'devices' has ", spec.devices.size(),
                                                   " entries for ", ranks.size(), " ranks"));
  }
  auto m = std::make_shared<Model>();
  m->name = name;
  m->spec = spec;
  m->allow_uids = spec.allow_uids.value_or(config_.allow_uids);
  m->allow_gids = spec.allow_gids.value_or(config_.allow_gids);
  m->started = absl::Now();
  for (size_t i = 0; i < ranks.size(); ++i) {
    Model::Rank r;
    r.rank = ranks[i];
    r.device = spec.devices.empty() ? ranks[i] : spec.devices[i];
    if (backend_->name() == "host") r.device = -1;
    m->ranks.push_back(std::move(r));
  }
  absl::MutexLock l(&mu_);
  if (shutting_down_) return absl::UnavailableError("weightd is shutting down");
  if (frozen_) {
    return absl::UnavailableError("weightd is handing over to its successor; retry in a moment");
  }
  if (models_.count(name) != 0) {
    return absl::AlreadyExistsError(
        absl::StrCat("a model named '", name, "' already exists (state ",
                     RankStateName(models_[name]->ranks.empty() ? RankState::kReady
                                                                : models_[name]->ranks[0].state),
                     "); unload it first or choose another name"));
  }
  models_[name] = m;
  ++running_loads_;
  ++loads_total_;
  SpawnLocked([this, m = std::move(m)]() mutable { RunLoad(std::move(m)); });
  return absl::OkStatus();
}

absl::StatusOr<Registry::PlannedModel> Registry::PlanModel(const Model& m) const {
  // Every file the load reads must resolve inside model_roots, symlinks followed: the
  // directory's check at StartLoad does not cover a shard that links out of it.
  const std::vector<std::string> roots = ResolvedRoots();
  if (!config_.model_roots.empty() && roots.empty()) {
    return absl::PermissionDeniedError("no configured model_roots directory exists");
  }
  WD_ASSIGN_OR_RETURN(Checkpoint ckpt, Checkpoint::Open(m.spec.checkpoint, roots));
  PlanOptions opts;
  opts.tp = m.spec.tp;
  if (m.ranks.size() == 1) opts.rank = m.ranks[0].rank;
  if (!m.spec.dtype.empty()) opts.dtype = ParseDTypeAlias(m.spec.dtype);
  opts.expert_parallel = m.spec.expert_parallel;
  opts.skip_substrings = m.spec.skip;
  if (!m.spec.recipe_file.empty()) opts.recipe_file = m.spec.recipe_file;
  if (!m.spec.recipe.empty()) opts.recipe_name = m.spec.recipe;
  PlannedModel out;
  WD_ASSIGN_OR_RETURN(out.plan, BuildPlan(ckpt, opts));
  // Keep only the ranks this model holds, in the model's order.
  std::vector<RankPlan> kept;
  for (const Model::Rank& r : m.ranks) {
    auto it = std::find_if(out.plan.ranks.begin(), out.plan.ranks.end(),
                           [&](const RankPlan& rp) { return rp.rank == r.rank; });
    if (it == out.plan.ranks.end()) {
      return absl::InternalError(absl::StrCat("the plan has no rank ", r.rank));
    }
    kept.push_back(std::move(*it));
  }
  out.plan.ranks = std::move(kept);
  // Checkpoint tensors the plan does not read (an update may carry them; they are ignored).
  std::vector<std::string> read;
  for (const PlanSource& src : out.plan.sources) read.push_back(src.name);
  std::sort(read.begin(), read.end());
  for (const CheckpointTensor& t : ckpt.tensors()) {
    if (!std::binary_search(read.begin(), read.end(), t.name)) out.skipped.push_back(t.name);
  }
  std::sort(out.skipped.begin(), out.skipped.end());
  return out;
}

absl::StatusOr<std::vector<std::unique_ptr<Arena>>> Registry::AllocateArenas(
    absl::string_view name, const std::vector<ArenaRequest>& requests) {
  // All arenas are checked before the first is allocated, so a load that does not fit fails at
  // once instead of after filling some devices.
  absl::MutexLock admission(&admission_mu_);
  absl::Status admitted = backend_->Admit(name, requests);
  if (absl::IsResourceExhausted(admitted)) {
    // Generations dropped just before (the one an update replaced, a lease's last one) are
    // freed by the reaper: still counted as held until it has run. Wait for it, then ask again.
    reaper_->Drain();
    admitted = backend_->Admit(name, requests);
  }
  WD_RETURN_IF_ERROR(admitted);
  std::vector<std::unique_ptr<Arena>> arenas;
  for (const ArenaRequest& request : requests) {
    WD_ASSIGN_OR_RETURN(auto a, backend_->Allocate(request));
    arenas.push_back(std::move(a));
  }
  return arenas;
}

absl::Status Registry::Execute(absl::string_view what, const Plan& plan,
                               std::span<Arena* const> arenas, std::optional<IoMode> io_mode,
                               LoadProgress* progress, TargetChecksums* crcs) {
  ExecutorOptions eo;
  eo.threads = config_.io_threads;
  eo.buffer_budget = config_.pinned_budget;
  eo.io_mode = io_mode.value_or(ParseIoMode(config_.io_mode).value_or(IoMode::kAuto));
  // Device arenas have no host view (backend.h): they are written by the CUDA executor.
  if (arenas.empty() || arenas[0]->kind() != ArenaKind::kCudaVmm) {
    return ExecutePlanHost(plan, arenas, eo, progress, crcs);
  }
  absl::StatusOr<CudaStaging*> staging = Staging(arenas[0]->device());
  if (!staging.ok()) return Annotate(staging.status(), absl::StrCat("CUDA ", what));
  eo.staging = *staging;
  const absl::Status s = ExecutePlanCuda(plan, arenas, eo, progress, crcs);
  if (!s.ok()) return Annotate(s, absl::StrCat("CUDA ", what));
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<const Registry::Segment>> Registry::MakeSegment(
    std::unique_ptr<Arena> arena) {
  WD_RETURN_IF_ERROR(arena->Seal());
  auto seg = std::make_shared<Segment>();
  seg->arena = std::move(arena);
  seg->id = next_arena_id_.fetch_add(1);
  return seg;
}

absl::StatusOr<std::shared_ptr<const Registry::RankMemory>> Registry::SealRank(
    absl::string_view model, const SegmentedPlan& plan, size_t r,
    std::vector<std::shared_ptr<const Segment>> segments, int device,
    const std::vector<int64_t>* known) const {
  std::vector<const Arena*> arenas;
  for (const auto& seg : segments) arenas.push_back(seg->arena.get());
  WD_ASSIGN_OR_RETURN(Manifest man, BuildSegmentedManifest(plan, r, arenas, model, device,
                                                           config_.io_threads, known));
  const std::string bytes = EncodeManifest(man);
  auto rm = std::make_shared<RankMemory>();
  WD_ASSIGN_OR_RETURN(rm->manifest,
                      MakeSealedMemfd(absl::StrCat(model, "/rank", man.rank, "/manifest"), bytes));
  rm->manifest_bytes = bytes.size();
  rm->tensors = static_cast<uint32_t>(man.tensors.size());
  rm->segments = std::move(segments);
  return rm;
}

void Registry::RunLoad(std::shared_ptr<Model> m) {
  LogInfo("load %s: begin %s tp=%d ranks=%d backend=%s", m->name, m->spec.checkpoint,
          m->spec.tp, static_cast<int>(m->ranks.size()), std::string(backend_->name()));
  ProgressLogger logger(absl::StrCat("load ", m->name), &m->progress, m->started);
  absl::StatusOr<BuiltLoad> built = BuildLoad(*m);
  logger.Stop();
  const absl::Status status = built.status();
  FinishLoad(m, status, built.ok() ? std::move(*built) : BuiltLoad{});
}

absl::StatusOr<Registry::BuiltLoad> Registry::BuildLoad(Model& m) {
  const std::string& name = m.name;
  WD_ASSIGN_OR_RETURN(PlannedModel planned, PlanModel(m));
  WD_ASSIGN_OR_RETURN(
      SegmentedPlan sp,
      SplitPlan(planned.plan, ChooseSegments(planned.plan, config_.arena_segment_bytes)));
  const Plan& plan = sp.plan;
  std::vector<ArenaRequest> requests;
  for (size_t s = 0; s < plan.ranks.size(); ++s) {
    const size_t r = sp.rank_of[s];
    requests.push_back(
        {plan.ranks[s].arena_bytes, m.ranks[r].device,
         sp.segments_of[r].size() == 1
             ? absl::StrCat(name, "/rank", plan.ranks[s].rank)
             : absl::StrCat(name, "/rank", plan.ranks[s].rank, "/seg", sp.segment_in_rank[s])});
  }
  WD_ASSIGN_OR_RETURN(std::vector<std::unique_ptr<Arena>> arenas, AllocateArenas(name, requests));
  std::vector<Arena*> raw;
  for (const auto& a : arenas) raw.push_back(a.get());
  const absl::Time t_exec = absl::Now();
  TargetChecksums crcs;
  WD_RETURN_IF_ERROR(Execute(absl::StrCat("load of model '", name, "'"), plan, raw, std::nullopt,
                             &m.progress, &crcs));
  const absl::Time t_seal = absl::Now();
  LogDebug("load %s: plan+allocate %.3f s, read+copy %.3f s (%zu arenas)", name,
           absl::ToDoubleSeconds(t_exec - m.started), absl::ToDoubleSeconds(t_seal - t_exec),
           arenas.size());
  auto gen = std::make_shared<Generation>();
  gen->number = 1;
  for (size_t r = 0; r < sp.segments_of.size(); ++r) {
    std::vector<std::shared_ptr<const Segment>> segments;
    for (size_t s : sp.segments_of[r]) {
      WD_ASSIGN_OR_RETURN(auto seg, MakeSegment(std::move(arenas[s])));
      segments.push_back(std::move(seg));
    }
    std::vector<int64_t> known(sp.where[r].size(), -1);
    for (size_t t = 0; t < known.size(); ++t) {
      const auto [s, local] = sp.where[r][t];
      if (s < crcs.crc.size() && local < crcs.crc[s].size()) known[t] = crcs.crc[s][local];
    }
    WD_ASSIGN_OR_RETURN(auto rm,
                        SealRank(name, sp, r, std::move(segments), m.ranks[r].device, &known));
    gen->ranks.push_back(std::move(rm));
  }
  LogDebug("load %s: seal+checksums+manifests %.3f s", name,
           absl::ToDoubleSeconds(absl::Now() - t_seal));
  return BuiltLoad{std::move(gen), std::make_shared<const SegmentedPlan>(std::move(sp)),
                   std::move(planned.skipped)};
}

void Registry::FinishLoad(const std::shared_ptr<Model>& m, const absl::Status& status,
                          BuiltLoad built) {
  const std::string& name = m->name;
  const absl::Duration elapsed = absl::Now() - m->started;
  const uint64_t bytes = m->progress.bytes_total.load();
  bool cancelled = false, shutdown = false;
  absl::StatusOr<std::vector<NamedFd>> stored = std::vector<NamedFd>();
  std::optional<absl::MutexLock> hooks_lock;
  {
    absl::MutexLock l(&mu_);
    bytes_read_total_ += m->progress.bytes_done.load();
    cancelled = m->unload_requested;
    // The executor's error names the only other cause of a cancel (unload --force).
    shutdown = !cancelled && !status.ok() && shutting_down_;
    m->finished = true;
    m->elapsed = elapsed;
    --running_loads_;
    if (m->unload_requested) {
      auto it = models_.find(name);
      if (it != models_.end() && it->second == m) models_.erase(it);
      Signal();
    } else if (shutdown) {
      m->error = "cancelled: weightd is shutting down";
      for (Model::Rank& r : m->ranks) r.state = RankState::kFailed;
    } else if (!status.ok()) {
      ++loads_failed_;
      m->error = std::string(status.message());
      for (Model::Rank& r : m->ranks) r.state = RankState::kFailed;
    } else {
      bytes_loaded_total_ += bytes;
      for (size_t i = 0; i < m->ranks.size(); ++i) {
        m->ranks[i].state = RankState::kReady;
        m->ranks[i].parts = static_cast<int>(built.generation->ranks[i]->segments.size());
      }
      m->plan = std::move(built.plan);
      m->skipped = std::move(built.skipped);
      PublishLocked(*m, std::move(built.generation));
      if (hooks_.on_ready) {
        stored = ExportLocked(*m);
        // Taken before mu_ is released: an unload of this model waits for the store to have
        // its fds before it removes them (registry.h, hooks_mu_).
        hooks_lock.emplace(&hooks_mu_);
      }
    }
  }
  // Memory of a load that did not finish is released outside the lock.
  built.generation.reset();
  if (!stored.ok()) {
    LogWarning("load %s: cannot export its fds for the fd store: %s", name,
               stored.status().message());
  } else if (!stored->empty()) {
    hooks_.on_ready(std::move(*stored));
  }
  hooks_lock.reset();
  const double secs = absl::ToDoubleSeconds(elapsed);
  if (cancelled) {
    LogInfo("load %s: cancelled after %.2f s; unloaded", name, secs);
  } else if (shutdown) {
    LogInfo("load %s: cancelled after %.2f s: weightd is shutting down", name, secs);
  } else if (status.ok()) {
    LogInfo("load %s: done %s in %.3f s (%.2f GB/s)", name, FormatBytes(bytes), secs,
            secs > 0 ? bytes / secs / 1e9 : 0.0);
  } else {
    LogError("load %s: failed after %.2f s: %s", name, secs, status.message());
  }
}

absl::StatusOr<std::vector<ModelStatus>> Registry::Status(const std::string& name,
                                                          const Peer& peer) const {
  absl::MutexLock l(&mu_);
  std::vector<ModelStatus> out;
  size_t listed = 0;
  for (const auto& [n, m] : models_) {
    if (!name.empty() && n != name) continue;
    if (!MayAttach(*m, peer) && !MayAdminister(peer)) {
      if (!name.empty()) {
        return absl::PermissionDeniedError(
            absl::StrCat("uid ", peer.uid, " may not see model '", name, "'"));
      }
      continue;
    }
    ModelStatus s;
    s.name = n;
    s.checkpoint = m->spec.checkpoint;
    s.backend = std::string(backend_->name());
    s.tp = m->spec.tp;
    s.error = m->error;
    s.bytes_total = m->progress.bytes_total.load();
    s.bytes_done = m->progress.bytes_done.load();
    s.load_seconds = absl::ToDoubleSeconds(m->finished ? m->elapsed : absl::Now() - m->started);
    s.started_unix = absl::ToDoubleSeconds(m->started - absl::UnixEpoch());
    s.origin = m->origin;
    s.generation = m->current != nullptr ? m->current->number : 0;
    s.previous_generation = m->previous;
    if (m->update != nullptr) {
      const Model::Update& u = *m->update;
      ModelStatus::Update su;
      su.state = u.running ? "running" : (u.error.empty() ? "done" : "failed");
      su.generation = u.generation;
      su.bytes_total = u.progress.bytes_total.load();
      su.bytes_done = u.progress.bytes_done.load();
      su.seconds = absl::ToDoubleSeconds(u.running ? absl::Now() - u.started : u.elapsed);
      su.error = u.error;
      s.update = std::move(su);
    }
    std::map<int, size_t> index;  // rank -> its place in s.ranks
    for (size_t i = 0; i < m->ranks.size(); ++i) {
      const Model::Rank& r = m->ranks[i];
      RankStatus rs;
      rs.rank = r.rank;
      rs.device = r.device;
      rs.state = r.state;
      if (m->current != nullptr) {
        rs.arena_bytes = m->current->ranks[i]->bytes();
        rs.arenas = static_cast<uint32_t>(m->current->ranks[i]->segments.size());
        rs.tensors = m->current->ranks[i]->tensors;
      }
      index[r.rank] = s.ranks.size();
      s.ranks.push_back(std::move(rs));
    }
    for (const LeaseInfo& li : m->leases) {
      auto at = index.find(li.rank);
      if (at == index.end()) continue;
      RankStatus& rs = s.ranks[at->second];
      ++rs.lease_count;
      if (listed < kStatusMaxListedLeases) {
        rs.leases.push_back(li);
        ++listed;
      }
    }
    out.push_back(std::move(s));
  }
  if (!name.empty() && out.empty()) {
    return absl::NotFoundError(absl::StrCat("no model named '", name, "'"));
  }
  return out;
}

absl::StatusOr<AttachGrant> Registry::Attach(const std::string& name, int rank, const Peer& peer,
                                             uint64_t connection) {
  absl::MutexLock l(&mu_);
  auto it = models_.find(name);
  if (it == models_.end()) return absl::NotFoundError(absl::StrCat("no model named '", name, "'"));
  Model& m = *it->second;
  if (!MayAttach(m, peer)) {
    return absl::PermissionDeniedError(absl::StrCat(
        "uid ", peer.uid, " (gid ", peer.gid, ", pid ", peer.pid, ") may not attach model '", name,
        "' (allowed uids: ", IdsText(m.allow_uids), "; gids: ", IdsText(m.allow_gids), ")"));
  }
  size_t slot = m.ranks.size();
  std::vector<int> held;
  for (size_t i = 0; i < m.ranks.size(); ++i) {
    held.push_back(m.ranks[i].rank);
    if (m.ranks[i].rank == rank) slot = i;
  }
  if (slot == m.ranks.size()) {
    return absl::NotFoundError(absl::StrCat("model '", name, "' holds ranks ",
                                            absl::StrJoin(held, ","), ", not rank ", rank));
  }
  switch (m.ranks[slot].state) {
    case RankState::kLoading: {
      const uint64_t t = m.progress.bytes_total.load(), d = m.progress.bytes_done.load();
      return absl::UnavailableError(absl::StrCat(
          "model '", name, "' rank ", rank, " is still loading (", t ? 100 * d / t : 0, "% done)"));
    }
    case RankState::kFailed:
      return absl::FailedPreconditionError(
          absl::StrCat("model '", name, "' failed to load: ", m.error));
    case RankState::kUnloading:
      return absl::FailedPreconditionError(absl::StrCat("model '", name, "' is being unloaded"));
    case RankState::kReady:
      break;
  }
  if (auto held = connection_leases_.find(connection);
      held != connection_leases_.end() &&
      held->second >= static_cast<uint64_t>(config_.max_leases_per_connection)) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "this connection already holds ", held->second,
        " leases, the most one connection may hold (config max_leases_per_connection); detach "
        "some first"));
  }
  WD_ASSIGN_OR_RETURN(AttachGrant g, GrantLocked(m, slot));
  g.lease = next_lease_++;
  m.leases.push_back({g.lease, connection, peer, rank, g.generation});
  ++connection_leases_[connection];
  ++attaches_total_;
  return g;
}

absl::StatusOr<AttachGrant> Registry::GrantLocked(const Model& m, size_t slot) const {
  if (m.current == nullptr) {
    return absl::InternalError(absl::StrCat("model '", m.name, "' is ready without a generation"));
  }
  const RankMemory& rm = *m.current->ranks[slot];
  AttachGrant g;
  g.generation = m.current->number;
  g.manifest = UniqueFd(::fcntl(rm.manifest.get(), F_DUPFD_CLOEXEC, 0));
  if (!g.manifest) return ErrnoError(errno, "dup of a manifest memfd");
  g.manifest_bytes = rm.manifest_bytes;
  for (const auto& seg : rm.segments) {
    WD_ASSIGN_OR_RETURN(UniqueFd a, seg->arena->Export());
    g.arenas.push_back(std::move(a));
    g.arena_device_uuids.push_back(
        seg->arena->kind() == ArenaKind::kCudaVmm
            ? UuidHex(static_cast<const CudaArena&>(*seg->arena).device_uuid())
            : std::string());
    g.arena_ids.push_back(seg->id);
  }
  return g;
}

absl::Status Registry::Detach(const std::string& name, int rank, uint64_t connection,
                              std::optional<uint64_t> lease) {
  absl::MutexLock l(&mu_);
  auto it = models_.find(name);
  if (it != models_.end()) {
    auto& leases = it->second->leases;
    auto li = std::find_if(leases.begin(), leases.end(), [&](const LeaseInfo& x) {
      return x.connection == connection && x.rank == rank && (!lease || x.id == *lease);
    });
    if (li != leases.end()) {
      UncountLeases({*li});
      leases.erase(li);
      ++detaches_total_;
      PruneLocked(*it->second);
      return absl::OkStatus();
    }
  }
  if (lease) {
    return absl::NotFoundError(absl::StrCat("this connection holds no lease ", *lease,
                                            " on model '", name, "' rank ", rank,
                                            " (a forced unload releases them)"));
  }
  return absl::NotFoundError(
      absl::StrCat("this connection holds no lease on model '", name, "' rank ", rank));
}

void Registry::ReleaseConnection(uint64_t connection) {
  size_t released = 0;
  {
    absl::MutexLock l(&mu_);
    for (auto& [name, m] : models_) {
      const size_t n =
          std::erase_if(m->leases, [&](const LeaseInfo& x) { return x.connection == connection; });
      released += n;
      if (n > 0) PruneLocked(*m);
      // An update sent with `wait` belongs to its connection: the requester is gone.
      if (m->update != nullptr && m->update->running && m->update->connection == connection) {
        m->update->cancel_reason = "cancelled: the connection that asked for it closed";
        m->update->progress.cancel = true;
        LogInfo("update %s: cancelled: the connection that asked for it closed", name);
      }
    }
    detaches_total_ += released;
    connection_leases_.erase(connection);
  }
  if (released > 0) {
    LogDebug("connection %llu closed: %zu leases released",
             static_cast<unsigned long long>(connection), released);
  }
}

absl::Status Registry::Unload(const std::string& name, bool force, const Peer& peer) {
  if (!MayAdminister(peer)) {
    return absl::PermissionDeniedError(
        absl::StrCat("uid ", peer.uid, " (gid ", peer.gid, ") may not unload models"));
  }
  std::shared_ptr<Model> victim;
  std::optional<absl::MutexLock> hooks_lock;
  {
    absl::MutexLock l(&mu_);
    if (frozen_) {
      return absl::UnavailableError("weightd is handing over to its successor; retry in a moment");
    }
    auto it = models_.find(name);
    if (it == models_.end()) {
      return absl::NotFoundError(absl::StrCat("no model named '", name, "'"));
    }
    Model& m = *it->second;
    if (!m.leases.empty() && !force) {
      // A bounded message, whatever the number of leases: the first holders, each once.
      constexpr size_t kListed = 16;
      std::vector<std::pair<pid_t, int>> who;
      bool others = false;
      for (const LeaseInfo& li : m.leases) {
        const std::pair<pid_t, int> key(li.peer.pid, li.rank);
        if (std::find(who.begin(), who.end(), key) != who.end()) continue;
        if (who.size() == kListed) {
          others = true;
          break;
        }
        who.push_back(key);
      }
      std::string text = absl::StrJoin(who, ", ", [](std::string* out, const auto& x) {
        absl::StrAppend(out, "pid ", x.first, " (rank ", x.second, ")");
      });
      if (others) absl::StrAppend(&text, " and others");
      if (m.leases.size() > who.size()) absl::StrAppend(&text, " (", m.leases.size(), " leases)");
      return absl::FailedPreconditionError(
          absl::StrCat("model '", name, "' is attached by ", text, "; detach them or use force"));
    }
    if (!m.finished) {
      if (!force) {
        return absl::FailedPreconditionError(
            absl::StrCat("model '", name, "' is still loading; use force to cancel the load"));
      }
      m.unload_requested = true;
      m.progress.cancel = true;
      for (Model::Rank& r : m.ranks) r.state = RankState::kUnloading;
      LogInfo("unload %s: cancelling the running load", name);
      return absl::OkStatus();
    }
    if (m.update != nullptr && m.update->running) {
      if (!force) {
        return absl::FailedPreconditionError(absl::StrCat(
            "model '", name, "' is being updated to generation ", m.update->generation,
            "; use force to cancel the update and unload"));
      }
      m.update->cancel_reason = "cancelled by a forced unload";
      m.update->progress.cancel = true;
      LogInfo("unload %s: cancelling the running update", name);
    }
    for (Model::Rank& r : m.ranks) r.state = RankState::kUnloading;
    UncountLeases(m.leases);
    victim = std::move(it->second);
    models_.erase(it);
    Signal();  // wait_generation on it ends with NOT_FOUND
    // A failed model was never stored. The lock is taken before mu_ is released, so the removal
    // comes after whatever hook an earlier change started (registry.h, hooks_mu_).
    if (hooks_.on_removed && victim->error.empty()) hooks_lock.emplace(&hooks_mu_);
  }
  // Arenas are freed outside the lock; clients still holding fds keep their memory alive.
  LogInfo("unload %s: done%s (%zu leases dropped)", name, force ? " (forced)" : "",
          victim->leases.size());
  if (hooks_lock) hooks_.on_removed(RemovalNames(*victim));
  hooks_lock.reset();
  victim.reset();
  return absl::OkStatus();
}

void Registry::WaitForLoads() {
  for (;;) {
    std::vector<LoadThread> threads;
    {
      absl::MutexLock l(&mu_);
      if (threads_.empty()) break;
      threads.swap(threads_);
    }
    for (LoadThread& t : threads) t.thread.join();
  }
  reaper_->Drain();
}

std::string Registry::Metrics() const {
  absl::MutexLock l(&mu_);
  MetricFamily models("weightd_models", "gauge", "Models in the registry, whatever their state.");
  models.Add("", models_.size());
  MetricFamily loads("weightd_loads_total", "counter", "Loads started.");
  loads.Add("", loads_total_);
  MetricFamily failed("weightd_loads_failed_total", "counter", "Loads that failed.");
  failed.Add("", loads_failed_);
  MetricFamily running("weightd_loads_running", "gauge", "Loads in progress.");
  running.Add("", running_loads_);
  MetricFamily attaches("weightd_attaches_total", "counter", "Leases granted by attach.");
  attaches.Add("", attaches_total_);
  MetricFamily detaches("weightd_detaches_total", "counter",
                        "Leases released by detach or by their connection closing (not those "
                        "dropped by a forced unload).");
  detaches.Add("", detaches_total_);
  MetricFamily loaded("weightd_loaded_bytes_total", "counter",
                      "Checkpoint bytes of the loads that finished ready.");
  loaded.Add("", bytes_loaded_total_);
  MetricFamily read("weightd_checkpoint_bytes_read_total", "counter",
                    "Checkpoint bytes read by loads (0 after a restart that re-adopted every "
                    "model).");
  read.Add("", bytes_read_total_);
  MetricFamily adopted("weightd_models_adopted_total", "counter",
                       "Models taken over from an earlier daemon (fd store or takeover) without "
                       "reading their checkpoint.");
  adopted.Add("", adopted_total_);
  MetricFamily ready("weightd_rank_ready", "gauge", "1 when the rank is ready.");
  MetricFamily arena("weightd_rank_arena_bytes", "gauge", "Bytes of the rank's arena.");
  MetricFamily arenas("weightd_rank_arenas", "gauge",
                      "Arenas (segments) of the rank in the newest generation.");
  MetricFamily leases("weightd_rank_leases", "gauge", "Leases held on the rank.");
  MetricFamily done("weightd_load_bytes_done", "gauge",
                    "Checkpoint bytes the model's load has read so far.");
  MetricFamily total("weightd_load_bytes_total", "gauge",
                     "Checkpoint bytes the model's load reads in all.");
  MetricFamily updates("weightd_updates_total", "counter", "Updates started.");
  updates.Add("", updates_total_);
  MetricFamily updates_failed("weightd_updates_failed_total", "counter",
                              "Updates that failed or were cancelled (nothing published).");
  updates_failed.Add("", updates_failed_);
  MetricFamily rollbacks("weightd_rollbacks_total", "counter", "Rollbacks published.");
  rollbacks.Add("", rollbacks_total_);
  MetricFamily refreshes("weightd_refreshes_total", "counter",
                         "Leases moved to a newer generation by refresh.");
  refreshes.Add("", refreshes_total_);
  MetricFamily generation("weightd_model_generation", "gauge",
                          "The model's newest published generation (1 after its load).");
  MetricFamily memory("weightd_model_arena_bytes", "gauge",
                      "Bytes of the model's arenas in memory, all held generations together, each "
                      "arena counted once (generations share the arenas an update did not "
                      "touch).");
  MetricFamily held("weightd_model_generations_held", "gauge",
                    "Generations of the model in memory: the newest, a kept previous one, and "
                    "older ones that leases still map.");
  for (const auto& [n, m] : models_) {
    const std::string model = Labels({{"model", n}});
    done.Add(model, m->progress.bytes_done.load());
    total.Add(model, m->progress.bytes_total.load());
    generation.Add(model, m->current != nullptr ? m->current->number : 0);
    held.Add(model, m->generations.size());
    // Every arena once, however many generations share it.
    std::set<const Segment*> distinct;
    uint64_t held_bytes = 0;
    for (const auto& [number, gen] : m->generations) {
      for (const auto& rm : gen->ranks) {
        for (const auto& seg : rm->segments) {
          if (distinct.insert(seg.get()).second) held_bytes += seg->arena->size();
        }
      }
    }
    memory.Add(model, held_bytes);
    std::map<int, uint64_t> per_rank;
    for (const LeaseInfo& li : m->leases) ++per_rank[li.rank];
    for (size_t i = 0; i < m->ranks.size(); ++i) {
      const Model::Rank& r = m->ranks[i];
      const std::string labels = Labels({{"model", n}, {"rank", absl::StrCat(r.rank)}});
      ready.Add(labels, r.state == RankState::kReady ? 1 : 0);
      arena.Add(labels, m->current != nullptr ? m->current->ranks[i]->bytes() : 0);
      arenas.Add(labels, m->current != nullptr ? m->current->ranks[i]->segments.size() : 0);
      leases.Add(labels, per_rank[r.rank]);
    }
  }
  std::string out;
  for (const MetricFamily* f :
       {&models,  &loads,   &failed,         &running,    &attaches,  &detaches, &loaded, &read,
        &adopted, &updates, &updates_failed, &rollbacks,  &refreshes, &ready,    &arena,  &arenas,
        &leases,  &done,    &total,          &generation, &held,      &memory}) {
    f->AppendTo(&out);
  }
  return out;
}

void Registry::SetHooks(RegistryHooks hooks) { hooks_ = std::move(hooks); }

std::vector<std::string> Registry::RemovalNames(const Model& m) {
  std::vector<std::string> names = FdNames(m);
  std::reverse(names.begin(), names.end());  // the record first
  return names;
}

std::vector<std::string> Registry::FdNames(const Model& m) {
  std::vector<std::string> names;
  for (const Model::Rank& r : m.ranks) {
    for (int part = 0; part < r.parts; ++part) {
      names.push_back(EncodeFdName(FdKind::kArena, m.name, r.rank, part));
    }
    names.push_back(EncodeFdName(FdKind::kManifest, m.name, r.rank));
  }
  // The record goes last when storing and first when removing: a record in the store always
  // has its fds (a crash between the two leaves fds without a record, which start-up drops).
  names.push_back(EncodeFdName(FdKind::kRecord, m.name));
  return names;
}

absl::StatusOr<std::vector<NamedFd>> Registry::ExportLocked(const Model& m) const {
  ModelRecord rec;
  rec.name = m.name;
  rec.backend = std::string(backend_->name());
  rec.spec = m.spec;
  rec.allow_uids = m.allow_uids;
  rec.allow_gids = m.allow_gids;
  rec.bytes_total = m.progress.bytes_total.load();
  rec.load_seconds = absl::ToDoubleSeconds(m.elapsed);
  rec.loaded_unix = absl::ToDoubleSeconds(m.started - absl::UnixEpoch());
  rec.generation = m.current != nullptr ? m.current->number : 0;
  std::vector<NamedFd> out;
  for (size_t i = 0; i < m.ranks.size(); ++i) {
    const Model::Rank& r = m.ranks[i];
    if (r.state != RankState::kReady || m.current == nullptr) {
      return absl::FailedPreconditionError(
          absl::StrCat("model '", m.name, "' rank ", r.rank, " is not ready"));
    }
    const RankMemory& rm = *m.current->ranks[i];
    const Arena& first = *rm.segments.front()->arena;
    RankRecord rr;
    rr.rank = r.rank;
    rr.device = r.device;
    rr.arena_bytes = rm.bytes();
    rr.manifest_bytes = rm.manifest_bytes;
    rr.tensors = rm.tensors;
    rr.parts = static_cast<int>(rm.segments.size());
    rr.arena_kind = first.kind();
    if (rr.arena_kind == ArenaKind::kCudaVmm) {
      rr.device_uuid = static_cast<const CudaArena&>(first).device_uuid();
    }
    rec.ranks.push_back(std::move(rr));
    for (size_t part = 0; part < rm.segments.size(); ++part) {
      WD_ASSIGN_OR_RETURN(UniqueFd arena, rm.segments[part]->arena->Export());
      out.push_back(
          {EncodeFdName(FdKind::kArena, m.name, r.rank, static_cast<int>(part)), std::move(arena)});
    }
    UniqueFd man(::fcntl(rm.manifest.get(), F_DUPFD_CLOEXEC, 0));
    if (!man) return ErrnoError(errno, "dup of a manifest memfd");
    out.push_back({EncodeFdName(FdKind::kManifest, m.name, r.rank), std::move(man)});
  }
  WD_ASSIGN_OR_RETURN(UniqueFd record,
                      MakeSealedMemfd(absl::StrCat(m.name, "/record"), EncodeModelRecord(rec)));
  out.push_back({EncodeFdName(FdKind::kRecord, m.name), std::move(record)});
  return out;
}

absl::StatusOr<std::vector<NamedFd>> Registry::ExportAll() {
  absl::MutexLock l(&mu_);
  if (running_loads_ + running_updates_ > 0) {
    return absl::FailedPreconditionError(
        absl::StrCat(running_loads_, " loads and ", running_updates_,
                     " updates are running; retry the takeover when they have finished"));
  }
  std::vector<NamedFd> out;
  for (const auto& [name, m] : models_) {
    if (!m->error.empty()) continue;  // a failed model holds no memory to hand over
    WD_ASSIGN_OR_RETURN(std::vector<NamedFd> fds, ExportLocked(*m));
    for (NamedFd& f : fds) out.push_back(std::move(f));
  }
  return out;
}

void Registry::Freeze(bool frozen) {
  absl::MutexLock l(&mu_);
  frozen_ = frozen;
}

std::vector<std::string> Registry::ModelNames() const {
  absl::MutexLock l(&mu_);
  std::vector<std::string> out;
  for (const auto& [name, m] : models_) out.push_back(name);
  return out;
}

absl::Status Registry::Adopt(AdoptableModel in, absl::string_view origin) {
  const ModelRecord& rec = in.record;
  const std::string& name = rec.name;
  auto bad = [&](const absl::Status& s) {
    return absl::Status(s.code(), absl::StrCat("adopting model '", name, "': ", s.message()));
  };
  // A record of the other backend is refused per arena by Backend::Adopt, whose message names
  // both arena kinds and the --backend that adopts them.
  auto m = std::make_shared<Model>();
  m->name = name;
  m->spec = rec.spec;
  m->allow_uids = rec.allow_uids;
  m->allow_gids = rec.allow_gids;
  m->started = absl::UnixEpoch() + absl::Seconds(rec.loaded_unix);
  m->elapsed = absl::Seconds(rec.load_seconds);
  m->finished = true;
  m->origin = std::string(origin);
  m->progress.bytes_total = rec.bytes_total;
  m->progress.bytes_done = rec.bytes_total;
  auto gen = std::make_shared<Generation>();
  gen->number = std::max<uint64_t>(1, rec.generation);
  for (AdoptableRank& ar : in.ranks) {
    const RankRecord& rr = ar.record;
    const std::string what = absl::StrCat("rank ", rr.rank);
    auto bytes = ReadSealedMemfd(ar.manifest.get(), rr.manifest_bytes,
                                 absl::StrCat("the manifest memfd of ", what));
    if (!bytes.ok()) return bad(bytes.status());
    if (bytes->size() != rr.manifest_bytes) {
      return bad(absl::FailedPreconditionError(absl::StrCat("the manifest of ", what, " has ",
                                                            bytes->size(), " bytes, the record ",
                                                            rr.manifest_bytes)));
    }
    auto man = DecodeManifest(*bytes);
    if (!man.ok()) return bad(Annotate(man.status(), absl::StrCat("manifest of ", what)));
    if (man->model != name || static_cast<int>(man->rank) != rr.rank ||
        man->arenas.size() != ar.arenas.size() || man->tensors.size() != rr.tensors ||
        man->arenas.empty()) {
      return bad(absl::FailedPreconditionError(
          absl::StrCat("the manifest of ", what, " (model '", man->model, "' rank ", man->rank,
                       ", ", man->arenas.size(), " arenas, ", man->tensors.size(),
                       " tensors) does not match the record (", ar.arenas.size(), " arenas, ",
                       rr.tensors, " tensors)")));
    }
    uint64_t manifest_total = 0;
    for (const ManifestArena& ma : man->arenas) {
      manifest_total += ma.size;
      if (ma.kind != rr.arena_kind) {
        return bad(absl::FailedPreconditionError(absl::StrCat(
            "the manifest of ", what, " describes an arena of ", ArenaKindText(ma.kind),
            ", the record arenas of ", ArenaKindText(rr.arena_kind))));
      }
    }
    if (manifest_total != rr.arena_bytes) {
      return bad(absl::FailedPreconditionError(
          absl::StrCat("the manifest of ", what, " describes ", man->arenas.size(), " arenas of ",
                       manifest_total, " bytes in all, the record ", rr.arena_bytes, " bytes of ",
                       ArenaKindText(rr.arena_kind))));
    }
    auto rm = std::make_shared<RankMemory>();
    int device = rr.device;
    for (size_t part = 0; part < ar.arenas.size(); ++part) {
      AdoptRequest request;
      request.bytes = man->arenas[part].size;
      request.kind = rr.arena_kind;
      request.device = rr.device;
      request.device_uuid = rr.device_uuid;
      request.label = ar.arenas.size() == 1 ? absl::StrCat(name, "/rank", rr.rank)
                                            : absl::StrCat(name, "/rank", rr.rank, "/part", part);
      auto arena = backend_->Adopt(std::move(ar.arenas[part]), request);
      if (!arena.ok()) return bad(arena.status());
      // A device arena is found by its UUID, so its ordinal here may differ from the record's.
      if ((*arena)->kind() == ArenaKind::kCudaVmm) device = (*arena)->device();
      auto seg = std::make_shared<Segment>();
      seg->arena = std::move(*arena);
      seg->id = next_arena_id_.fetch_add(1);
      rm->segments.push_back(std::move(seg));
    }
    Model::Rank r;
    r.rank = rr.rank;
    r.device = device;
    r.state = RankState::kReady;
    r.parts = static_cast<int>(rm->segments.size());
    rm->manifest = std::move(ar.manifest);
    rm->manifest_bytes = rr.manifest_bytes;
    rm->tensors = rr.tensors;
    gen->ranks.push_back(std::move(rm));
    m->ranks.push_back(std::move(r));
  }
  m->current = gen;
  m->generations[gen->number] = std::move(gen);
  absl::MutexLock l(&mu_);
  if (models_.count(name) != 0) {
    return bad(absl::AlreadyExistsError("a model of that name is already listed"));
  }
  models_[name] = std::move(m);
  ++adopted_total_;
  return absl::OkStatus();
}

}  // namespace weightd
