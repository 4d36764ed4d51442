// Generations: updates, rollbacks and refreshes of loaded models (registry.h,
// docs/PROTOCOL.md "Generations").
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <map>
#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "registry_internal.h"
#include "weightd/checkpoint.h"
#include "weightd/handoff.h"
#include "weightd/log.h"
#include "weightd/manifest.h"
#include "weightd/registry.h"
#include "weightd/segment_plan.h"
#include "weightd/status_macros.h"
#include "weightd/update_plan.h"

namespace weightd {
namespace {

// The seals an update's memfd needs, so that its bytes cannot change while the update reads
// them.
constexpr int kUpdateSeals = F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW;
// Outcomes of finished updates kept for UpdateOutcome.
constexpr size_t kKeptOutcomes = 64;

// The byte ranges of `targets` (in offset order), adjacent ones merged across the alignment
// padding between them (zero in both arenas).
std::vector<ArenaRange> TargetRanges(const RankPlan& rp, const std::vector<uint32_t>& targets) {
  std::vector<ArenaRange> out;
  for (uint32_t t : targets) {
    const PlanTarget& pt = rp.targets[t];
    if (!out.empty() && pt.offset <= out.back().offset + out.back().bytes + kTargetAlignment) {
      out.back().bytes = pt.offset + pt.nbytes - out.back().offset;
    } else {
      out.push_back({pt.offset, pt.nbytes});
    }
  }
  return out;
}

// The model's state as an update or rollback sees it: OK when it serves a generation.
absl::Status CheckServing(const std::string& name, const std::vector<RankState>& states,
                          const std::string& error, bool finished, absl::string_view what) {
  if (!error.empty()) {
    return absl::FailedPreconditionError(
        absl::StrCat("model '", name, "' failed to load (", error, "); cannot ", what, " it"));
  }
  if (!finished) {
    return absl::FailedPreconditionError(absl::StrCat(
        "model '", name, "' is still loading; ", what, " it once its load has finished"));
  }
  for (RankState s : states) {
    if (s == RankState::kUnloading) {
      return absl::FailedPreconditionError(
          absl::StrCat("model '", name, "' is being unloaded; cannot ", what, " it"));
    }
  }
  return absl::OkStatus();
}

template <typename Ranks>
std::vector<RankState> States(const Ranks& ranks) {
  std::vector<RankState> out;
  for (const auto& r : ranks) out.push_back(r.state);
  return out;
}

}  // namespace

absl::StatusOr<Registry::UpdateTicket> Registry::StartUpdate(const std::string& name, UpdateSource source,
                                               const Peer& peer, uint64_t bound_connection) {
  if (!MayAdminister(peer)) {
    return absl::PermissionDeniedError(absl::StrCat(
        "uid ", peer.uid, " (gid ", peer.gid, ") may not update models: add it to allow_uids or ",
        "allow_gids in the daemon config"));
  }
  if (source.checkpoint.empty() == !source.memfd) {
    return absl::InvalidArgumentError(
        "an update takes its tensors from 'checkpoint' or from one memfd sent with the request, "
        "not both and not neither");
  }
  if (!source.checkpoint.empty()) {
    WD_RETURN_IF_ERROR(CheckPath(source.checkpoint, "update checkpoint"));
  } else {
    const int seals = ::fcntl(source.memfd.get(), F_GET_SEALS);
    if (seals < 0 || (seals & kUpdateSeals) != kUpdateSeals) {
      return absl::InvalidArgumentError(
          "the fd sent with the update is not a memfd sealed with F_SEAL_WRITE, F_SEAL_SHRINK "
          "and F_SEAL_GROW (its bytes could change while weightd reads them)");
    }
  }
  absl::MutexLock l(&mu_);
  if (shutting_down_) return absl::UnavailableError("weightd is shutting down");
  if (frozen_) {
    return absl::UnavailableError("weightd is handing over to its successor; retry in a moment");
  }
  auto it = models_.find(name);
  if (it == models_.end()) return absl::NotFoundError(absl::StrCat("no model named '", name, "'"));
  std::shared_ptr<Model> m = it->second;
  WD_RETURN_IF_ERROR(CheckServing(name, States(m->ranks), m->error, m->finished, "update"));
  if (m->update != nullptr && m->update->running) {
    return absl::FailedPreconditionError(
        absl::StrCat("model '", name, "' is already being updated to generation ",
                     m->update->generation, "; one update at a time"));
  }
  auto u = std::make_unique<Model::Update>();
  u->id = next_update_++;
  u->generation = m->current->number + 1;
  u->connection = bound_connection;
  u->started = absl::Now();
  const uint64_t id = u->id;
  const UpdateTicket ticket{id, u->generation};
  m->update = std::move(u);
  ++running_updates_;
  ++updates_total_;
  SpawnLocked([this, m, id, source = std::move(source)]() mutable {
    RunUpdate(std::move(m), id, std::move(source));
  });
  return ticket;
}

namespace {

// The manifests of `gen`'s ranks, decoded.
template <typename Gen>
absl::StatusOr<std::vector<Manifest>> Manifests(const Gen& gen, absl::string_view model) {
  std::vector<Manifest> out;
  for (const auto& rm : gen.ranks) {
    WD_ASSIGN_OR_RETURN(std::string bytes,
                        ReadSealedMemfd(rm->manifest.get(), rm->manifest_bytes,
                                        absl::StrCat("a manifest of model '", model, "'")));
    WD_ASSIGN_OR_RETURN(Manifest man, DecodeManifest(bytes));
    out.push_back(std::move(man));
  }
  return out;
}

// The segments an earlier daemon chose, read from the manifests of the arenas it handed over
// (each target's arena), so that a rebuilt plan lays out exactly the memory adopted whatever
// this daemon's arena_segment_bytes.
absl::StatusOr<SegmentAssignment> AssignmentFromManifests(const Plan& plan,
                                                          const std::vector<Manifest>& manifests,
                                                          absl::string_view model) {
  if (manifests.size() != plan.ranks.size()) {
    return absl::FailedPreconditionError(
        absl::StrCat("the rebuilt plan of model '", model, "' has ", plan.ranks.size(),
                     " ranks; the adopted memory ", manifests.size()));
  }
  SegmentAssignment out;
  for (size_t r = 0; r < plan.ranks.size(); ++r) {
    const RankPlan& rp = plan.ranks[r];
    const Manifest& man = manifests[r];
    if (man.tensors.size() != rp.targets.size()) {
      return absl::FailedPreconditionError(
          absl::StrCat("the rebuilt plan of model '", model, "' rank ", rp.rank, " has ",
                       rp.targets.size(), " targets; the adopted manifest ", man.tensors.size()));
    }
    std::vector<uint32_t>& seg = out.emplace_back();
    for (size_t t = 0; t < rp.targets.size(); ++t) {
      if (man.tensors[t].name != rp.targets[t].name) {
        return absl::FailedPreconditionError(absl::StrCat(
            "the rebuilt plan of model '", model, "' rank ", rp.rank, " has target '",
            rp.targets[t].name, "' where the adopted manifest has '", man.tensors[t].name, "'"));
      }
      seg.push_back(man.tensors[t].arena);
    }
  }
  return out;
}

}  // namespace

absl::StatusOr<std::shared_ptr<Registry::Generation>> Registry::BuildUpdate(
    Model& m, const UpdateSource& source, LoadProgress* progress, UpdateReport* result) {
  std::shared_ptr<const SegmentedPlan> plan;
  std::vector<std::string> skipped;
  std::shared_ptr<Generation> base;
  {
    absl::MutexLock l(&mu_);
    plan = m.plan;
    skipped = m.skipped;
    base = m.current;
  }
  WD_ASSIGN_OR_RETURN(std::vector<Manifest> base_manifests, Manifests(*base, m.name));
  if (plan == nullptr) {
    // Adopted from an earlier daemon: the plan is data derived from the checkpoint's headers
    // and the load options, so it is rebuilt from them (no tensor data is read), and split into
    // the segments the adopted manifests show.
    absl::StatusOr<PlannedModel> planned = PlanModel(m);
    absl::StatusOr<SegmentedPlan> sp = absl::InternalError("unset");
    if (planned.ok()) {
      absl::StatusOr<SegmentAssignment> a =
          AssignmentFromManifests(planned->plan, base_manifests, m.name);
      sp = a.ok() ? SplitPlan(planned->plan, *a) : absl::StatusOr<SegmentedPlan>(a.status());
    }
    if (!planned.ok() || !sp.ok()) {
      return Annotate(planned.ok() ? sp.status() : planned.status(),
                      absl::StrCat("model '", m.name,
                                   "' was handed over by an earlier daemon; updating it rebuilds "
                                   "its plan from the headers of checkpoint '",
                                   m.spec.checkpoint, "', which failed"));
    }
    plan = std::make_shared<const SegmentedPlan>(*std::move(sp));
    skipped = std::move(planned->skipped);
    absl::MutexLock l(&mu_);
    m.plan = plan;
    m.skipped = skipped;
  }
  // The plan must lay out exactly the memory of generation N (an adopted model's rebuilt plan
  // is checked here against what was adopted).
  for (size_t r = 0; r < plan->segments_of.size(); ++r) {
    const RankMemory& rm = *base->ranks[r];
    const Manifest& man = base_manifests[r];
    bool same = rm.segments.size() == plan->segments_of[r].size() &&
                man.tensors.size() == plan->where[r].size();
    for (size_t k = 0; same && k < rm.segments.size(); ++k) {
      same = rm.segments[k]->arena->size() == plan->plan.ranks[plan->segments_of[r][k]].arena_bytes;
    }
    for (size_t t = 0; same && t < man.tensors.size(); ++t) {
      const auto [s, local] = plan->where[r][t];
      same = man.tensors[t].arena == plan->segment_in_rank[s] &&
             man.tensors[t].offset == plan->plan.ranks[s].targets[local].offset;
    }
    if (!same) {
      return absl::InternalError(absl::StrCat("model '", m.name, "' rank ", m.ranks[r].rank,
                                              ": the plan's arenas differ from generation ",
                                              base->number, "'s"));
    }
  }
  const bool from_memfd = source.checkpoint.empty();
  std::vector<std::string> roots;
  if (!from_memfd) {
    roots = ResolvedRoots();
    if (!config_.model_roots.empty() && roots.empty()) {
      return absl::PermissionDeniedError("no configured model_roots directory exists");
    }
  }
  // A memfd is read through its /proc path: the daemon holds the fd until the update ends.
  const std::string path =
      from_memfd ? absl::StrCat("/proc/self/fd/", source.memfd.get()) : source.checkpoint;
  absl::StatusOr<Checkpoint> ckpt = Checkpoint::Open(path, roots);
  if (!ckpt.ok()) {
    return Annotate(ckpt.status(),
                    absl::StrCat("update of model '", m.name, "': reading the new tensors from ",
                                 from_memfd ? "the memfd sent with the request" : path));
  }
  // Over the segments: `up.plan.ranks` are the segments the new tensors touch, the only ones
  // that get new arenas.
  WD_ASSIGN_OR_RETURN(UpdatePlan up, BuildUpdatePlan(plan->plan, skipped, *ckpt, m.name));
  const uint64_t number = base->number + 1;

  std::vector<ArenaRequest> requests;
  uint64_t copy_bytes = 0;
  std::vector<std::vector<ArenaRange>> copies;
  std::vector<const Arena*> sources;
  for (size_t i = 0; i < up.plan.ranks.size(); ++i) {
    const size_t seg = up.rank_index[i];
    const size_t r = plan->rank_of[seg];
    const uint32_t k = plan->segment_in_rank[seg];
    const RankPlan& rp = up.plan.ranks[i];
    const Arena& from = *base->ranks[r]->segments[k]->arena;
    requests.push_back({rp.arena_bytes, m.ranks[r].device,
                        plan->segments_of[r].size() == 1
                            ? absl::StrCat(m.name, "/rank", rp.rank, "/gen", number)
                            : absl::StrCat(m.name, "/rank", rp.rank, "/seg", k, "/gen", number)});
    sources.push_back(&from);
    copies.push_back(TargetRanges(rp, up.copy[i]));
    for (const ArenaRange& range : copies.back()) copy_bytes += range.bytes;
  }
  progress->bytes_total = up.plan.read_bytes;  // what status shows as read
  WD_ASSIGN_OR_RETURN(std::vector<std::unique_ptr<Arena>> arenas,
                      AllocateArenas(m.name, requests));
  // Targets of a replaced segment that the update does not cover completely first take
  // generation N's bytes; the pieces then overwrite the parts that are new.
  for (size_t i = 0; i < arenas.size(); ++i) {
    WD_RETURN_IF_ERROR(
        CopyArenaRanges(*sources[i], *arenas[i], copies[i], config_.io_threads, progress));
  }
  if (progress->cancel.load()) return absl::CancelledError("update cancelled");
  std::vector<Arena*> raw;
  for (const auto& a : arenas) raw.push_back(a.get());
  TargetChecksums crcs;
  WD_RETURN_IF_ERROR(Execute(absl::StrCat("update of model '", m.name, "'"), up.plan, raw,
                             from_memfd ? std::optional<IoMode>(IoMode::kPread) : std::nullopt,
                             progress, &crcs));

  // Per model rank: its segments in the next generation (N's, the replaced ones swapped) and
  // the CRCs its manifest takes as known (N's, except for the targets new tensors fed).
  std::map<size_t, std::vector<std::shared_ptr<const Segment>>> touched;
  std::map<size_t, std::vector<int64_t>> known;
  for (size_t i = 0; i < arenas.size(); ++i) {
    const size_t seg = up.rank_index[i];
    const size_t r = plan->rank_of[seg];
    const uint32_t k = plan->segment_in_rank[seg];
    if (touched.count(r) == 0) {
      touched[r] = base->ranks[r]->segments;
      std::vector<int64_t>& kn = known[r];
      for (const ManifestTensor& mt : base_manifests[r].tensors) kn.push_back(mt.crc32c);
    }
    std::vector<int64_t>& kn = known[r];
    const std::vector<uint32_t>& input = plan->input_target[seg];
    for (uint32_t t : up.rewritten[i]) {
      kn[input[t]] = i < crcs.crc.size() && t < crcs.crc[i].size() ? crcs.crc[i][t] : -1;
    }
    result->bytes_allocated += arenas[i]->size();
    WD_ASSIGN_OR_RETURN(touched[r][k], MakeSegment(std::move(arenas[i])));
    result->targets_rewritten += up.rewritten[i].size();
  }
  auto next = std::make_shared<Generation>();
  next->number = number;
  next->ranks = base->ranks;
  for (auto& [r, segments] : touched) {
    WD_ASSIGN_OR_RETURN(next->ranks[r], SealRank(m.name, *plan, r, std::move(segments),
                                                 m.ranks[r].device, &known[r]));
  }
  size_t targets = 0;
  for (const auto& where : plan->where) targets += where.size();
  result->targets_copied = targets - result->targets_rewritten;
  result->ranks_rewritten = touched.size();
  result->segments_rewritten = up.plan.ranks.size();
  result->bytes_copied = copy_bytes;
  result->bytes_read = up.plan.read_bytes;
  result->generation = number;
  LogDebug(
      "update %s: %zu tensors (%zu ignored), %zu of %zu ranks and %zu of %zu arenas "
      "rewritten, %s allocated, %s copied",
      m.name, up.tensors_used, up.tensors_ignored, touched.size(), m.ranks.size(),
      up.plan.ranks.size(), plan->plan.ranks.size(), FormatBytes(result->bytes_allocated),
      FormatBytes(copy_bytes));
  return next;
}

void Registry::RunUpdate(std::shared_ptr<Model> m, uint64_t id, UpdateSource source) {
  const std::string& name = m->name;
  // Not replaced while it runs (StartUpdate refuses), but may be as soon as it is marked ended:
  // only touched under mu_ from then on.
  Model::Update& u = *m->update;
  const uint64_t target = u.generation;
  LogInfo("update %s: begin generation %llu from %s", name, static_cast<unsigned long long>(target),
          source.checkpoint.empty() ? std::string("tensors sent by a client") : source.checkpoint);
  ProgressLogger logger(absl::StrCat("update ", name), &u.progress, u.started);
  UpdateReport result;
  absl::StatusOr<std::shared_ptr<Generation>> built =
      BuildUpdate(*m, source, &u.progress, &result);
  logger.Stop();
  source.memfd.Reset();
  const absl::Duration elapsed = absl::Now() - u.started;
  absl::Status status = built.status();
  absl::StatusOr<std::vector<NamedFd>> stored = std::vector<NamedFd>();
  std::optional<absl::MutexLock> hooks_lock;
  bool store = false;
  {
    absl::MutexLock l(&mu_);
    --running_updates_;
    bytes_read_total_ += result.bytes_read;
    auto it = models_.find(name);
    const bool listed = it != models_.end() && it->second == m;
    if (u.progress.cancel.load() || !listed) {
      // Nothing is published once the update was cancelled, even if its last byte was written.
      status = absl::CancelledError(
          !u.cancel_reason.empty() ? u.cancel_reason
          : shutting_down_         ? "cancelled: weightd is shutting down"
          : !listed                ? "cancelled: the model was unloaded"
                                   : "cancelled");
    }
    u.running = false;
    u.elapsed = elapsed;
    result.seconds = absl::ToDoubleSeconds(elapsed);
    if (!status.ok()) {
      u.error = std::string(status.message());
      ++updates_failed_;
    } else {
      PublishLocked(*m, *std::move(built));
      if (hooks_.on_ready) {
        stored = ExportLocked(*m);
        store = true;
        hooks_lock.emplace(&hooks_mu_);
      }
    }
    outcomes_.emplace_back(id, status.ok() ? absl::StatusOr<UpdateReport>(result)
                                           : absl::StatusOr<UpdateReport>(status));
    while (outcomes_.size() > kKeptOutcomes) outcomes_.pop_front();
    Signal();
  }
  // An unpublished generation's memory is released outside the lock.
  built = std::shared_ptr<Generation>();
  if (store) {
    // The store holds one generation per model: the old fds go, the new ones come.
    hooks_.on_removed(RemovalNames(*m));
    if (!stored.ok()) {
      LogWarning("update %s: cannot export its fds for the fd store: %s", name,
                 stored.status().message());
    } else {
      hooks_.on_ready(std::move(*stored));
    }
  }
  hooks_lock.reset();
  const double secs = absl::ToDoubleSeconds(elapsed);
  if (status.ok()) {
    LogInfo("update %s: generation %llu published in %.3f s (%s read, %zu ranks rewritten)", name,
            static_cast<unsigned long long>(result.generation), secs,
            FormatBytes(result.bytes_read), result.ranks_rewritten);
  } else {
    LogError("update %s: failed after %.2f s, generation %llu serves on: %s", name, secs,
             static_cast<unsigned long long>(target - 1), status.message());
  }
}

std::optional<absl::StatusOr<UpdateReport>> Registry::UpdateOutcome(uint64_t id) const {
  absl::MutexLock l(&mu_);
  for (const auto& [name, m] : models_) {
    if (m->update != nullptr && m->update->id == id && m->update->running) return std::nullopt;
  }
  for (const auto& [done_id, outcome] : outcomes_) {
    if (done_id == id) return outcome;
  }
  // Still running on a model already unloaded (its thread ends soon), or long forgotten.
  if (id >= next_update_) return absl::NotFoundError(absl::StrCat("no update ", id));
  for (const LoadThread& t : threads_) {
    if (!t.done->load()) return std::nullopt;
  }
  return absl::NotFoundError(absl::StrCat("the outcome of update ", id, " is no longer kept"));
}

absl::StatusOr<uint64_t> Registry::CurrentGeneration(const std::string& name,
                                                     const Peer& peer) const {
  absl::MutexLock l(&mu_);
  auto it = models_.find(name);
  if (it == models_.end()) return absl::NotFoundError(absl::StrCat("no model named '", name, "'"));
  const Model& m = *it->second;
  if (!MayAttach(m, peer) && !MayAdminister(peer)) {
    return absl::PermissionDeniedError(
        absl::StrCat("uid ", peer.uid, " may not see model '", name, "'"));
  }
  return m.current != nullptr ? m.current->number : 0;
}

absl::StatusOr<RollbackReport> Registry::Rollback(const std::string& name, const Peer& peer) {
  if (!MayAdminister(peer)) {
    return absl::PermissionDeniedError(
        absl::StrCat("uid ", peer.uid, " (gid ", peer.gid, ") may not roll models back"));
  }
  RollbackReport out;
  std::shared_ptr<Model> m;
  absl::StatusOr<std::vector<NamedFd>> stored = std::vector<NamedFd>();
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
    m = it->second;
    WD_RETURN_IF_ERROR(CheckServing(name, States(m->ranks), m->error, m->finished, "roll back"));
    if (m->update != nullptr && m->update->running) {
      return absl::FailedPreconditionError(
          absl::StrCat("model '", name, "' is being updated to generation ",
                       m->update->generation, "; roll back once the update has ended"));
    }
    auto prev = m->generations.find(m->previous);
    if (m->previous == 0 || prev == m->generations.end()) {
      return absl::FailedPreconditionError(absl::StrCat(
          "model '", name, "' keeps no previous generation (generation ", m->current->number,
          " is its only one",
          config_.keep_previous_generation
              ? "; it has not been updated since it was loaded or handed over)"
              : "; set keep_previous_generation in the daemon config to keep one)"));
    }
    auto next = std::make_shared<Generation>();
    next->number = m->current->number + 1;
    next->ranks = prev->second->ranks;
    out.restored = m->previous;
    out.generation = next->number;
    PublishLocked(*m, std::move(next));
    ++rollbacks_total_;
    if (hooks_.on_ready) {
      stored = ExportLocked(*m);
      hooks_lock.emplace(&hooks_mu_);
    }
  }
  if (hooks_lock) {
    hooks_.on_removed(RemovalNames(*m));
    if (stored.ok()) hooks_.on_ready(std::move(*stored));
  }
  hooks_lock.reset();
  LogInfo("rollback %s: generation %llu publishes the weights of generation %llu", name,
          static_cast<unsigned long long>(out.generation),
          static_cast<unsigned long long>(out.restored));
  return out;
}

absl::StatusOr<AttachGrant> Registry::Refresh(const std::string& name, int rank,
                                              uint64_t connection, uint64_t lease) {
  absl::MutexLock l(&mu_);
  auto it = models_.find(name);
  if (it == models_.end()) return absl::NotFoundError(absl::StrCat("no model named '", name, "'"));
  Model& m = *it->second;
  auto li = std::find_if(m.leases.begin(), m.leases.end(), [&](const LeaseInfo& x) {
    return x.connection == connection && x.rank == rank && x.id == lease;
  });
  if (li == m.leases.end()) {
    return absl::NotFoundError(absl::StrCat("this connection holds no lease ", lease,
                                            " on model '", name, "' rank ", rank,
                                            " (a forced unload releases them)"));
  }
  size_t slot = 0;
  while (slot < m.ranks.size() && m.ranks[slot].rank != rank) ++slot;
  if (m.current == nullptr || slot == m.ranks.size()) {
    return absl::InternalError(absl::StrCat("model '", name, "' has a lease without a generation"));
  }
  if (li->generation == m.current->number) {
    AttachGrant g;
    g.lease = lease;
    g.generation = li->generation;
    g.unchanged = true;
    return g;
  }
  WD_ASSIGN_OR_RETURN(AttachGrant g, GrantLocked(m, slot));
  g.lease = lease;
  li->generation = g.generation;
  ++refreshes_total_;
  PruneLocked(m);
  return g;
}

}  // namespace weightd
