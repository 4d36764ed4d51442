// The registry's model records, shared by registry.cc and update.cc. Internal to the daemon.
#ifndef WEIGHTD_DAEMON_SRC_REGISTRY_INTERNAL_H_
#define WEIGHTD_DAEMON_SRC_REGISTRY_INTERNAL_H_

#include <deque>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "weightd/log.h"
#include "weightd/plan.h"
#include "weightd/registry.h"
#include "weightd/segment_plan.h"

namespace weightd {

// Logs a load's or an update's progress every 2 s from a thread of its own until Stop().
class ProgressLogger {
 public:
  ProgressLogger(std::string what, const LoadProgress* progress, absl::Time started)
      : thread_([this, what = std::move(what), progress, started] {
          while (!done_.WaitForNotificationWithTimeout(absl::Seconds(2))) {
            const uint64_t d = progress->bytes_done.load(), t = progress->bytes_total.load();
            if (t == 0) continue;
            const double secs = absl::ToDoubleSeconds(absl::Now() - started);
            LogInfo("%s: progress %s of %s (%.0f%%, %.2f GB/s)", what, FormatBytes(d),
                    FormatBytes(t), 100.0 * d / t, secs > 0 ? d / secs / 1e9 : 0.0);
          }
        }) {}
  ProgressLogger(const ProgressLogger&) = delete;
  ProgressLogger& operator=(const ProgressLogger&) = delete;
  ~ProgressLogger() { Stop(); }
  void Stop() {
    if (!thread_.joinable()) return;
    done_.Notify();
    thread_.join();
  }

 private:
  absl::Notification done_;
  std::thread thread_;
};


// Frees memory off the caller's thread. Releasing a generation's arenas (gigabytes of shmem
// pages or device memory) takes hundreds of milliseconds, which must not happen on the server's
// event loop (a refresh or detach that drops an old generation's last lease) nor delay a reply.
class Reaper {
 public:
  Reaper() : thread_([this] { Run(); }) {}
  Reaper(const Reaper&) = delete;
  Reaper& operator=(const Reaper&) = delete;
  ~Reaper() {  // frees what is queued, then returns
    {
      absl::MutexLock l(&mu_);
      stop_ = true;
    }
    thread_.join();
  }
  template <typename T>
  void Add(std::vector<std::shared_ptr<T>> items) {
    if (items.empty()) return;
    absl::MutexLock l(&mu_);
    for (auto& p : items) queue_.push_back(std::move(p));
  }
  // Returns once everything queued before the call is freed.
  void Drain() {
    absl::MutexLock l(&mu_);
    mu_.Await(absl::Condition(
        +[](Reaper* r) ABSL_NO_THREAD_SAFETY_ANALYSIS { return r->queue_.empty() && !r->busy_; },
        this));
  }

 private:
  void Run() {
    for (;;) {
      std::shared_ptr<void> item;
      {
        absl::MutexLock l(&mu_);
        mu_.Await(absl::Condition(
            +[](Reaper* r) ABSL_NO_THREAD_SAFETY_ANALYSIS { return r->stop_ || !r->queue_.empty(); },
            this));
        if (queue_.empty()) return;  // stop_ and nothing left
        item = std::move(queue_.front());
        queue_.pop_front();
        busy_ = true;
      }
      item.reset();
      absl::MutexLock l(&mu_);
      busy_ = false;
    }
  }
  absl::Mutex mu_;
  std::deque<std::shared_ptr<void>> queue_ ABSL_GUARDED_BY(mu_);
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  bool busy_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

// One arena of a rank (a segment, segment_plan.h), sealed. Generations share it where an update
// left its targets alone, so it is freed with the last generation that holds it.
struct Registry::Segment {
  std::unique_ptr<Arena> arena;
  // Unique among the arenas of this daemon's lifetime: an attach reply's `arena_ids`, by which a
  // refreshing client knows the arenas it maps already.
  uint64_t id = 0;
};

// One rank's memory in one generation: its segments in manifest arena order and its manifest.
// Generations share it where an update left the whole rank alone.
struct Registry::RankMemory {
  std::vector<std::shared_ptr<const Segment>> segments;
  UniqueFd manifest;
  uint64_t manifest_bytes = 0;
  uint32_t tensors = 0;
  uint64_t bytes() const {
    uint64_t n = 0;
    for (const auto& s : segments) n += s->arena->size();
    return n;
  }
};

struct Registry::Generation {
  uint64_t number = 0;
  std::vector<std::shared_ptr<const RankMemory>> ranks;  // in Model::ranks order
};

struct Registry::Model {
  struct Rank {
    int rank = 0;
    int device = -1;
    RankState state = RankState::kLoading;
    // Arenas (segments) per generation: set once, under mu_, when the first generation is
    // published or adopted (the plan fixes it); read without the lock afterwards.
    int parts = 1;
  };
  struct Update {
    uint64_t id = 0;
    uint64_t generation = 0;
    uint64_t connection = 0;  // closing it cancels the update (0 = none)
    LoadProgress progress;
    absl::Time started;
    absl::Duration elapsed;
    bool running = true;
    std::string error;
    std::string cancel_reason;  // set with progress.cancel
  };
  std::string name;
  LoadSpec spec;
  std::vector<uint32_t> allow_uids, allow_gids;
  LoadProgress progress;
  absl::Time started;
  absl::Duration elapsed;  // valid once `finished`
  bool finished = false;
  bool unload_requested = false;
  std::string error;
  std::vector<Rank> ranks;
  std::vector<LeaseInfo> leases;
  std::string origin = "load";
  // The newest generation (null until the load finished), the number of the kept previous one
  // (0 = none), and every generation still alive: those two and any a lease maps.
  std::shared_ptr<Generation> current;
  uint64_t previous = 0;
  std::map<uint64_t, std::shared_ptr<Generation>> generations;
  // The plan the load ran (its ranks only, split into segments) and the checkpoint tensors it
  // skips; null for a model adopted from an earlier daemon until its first update rebuilds them.
  std::shared_ptr<const SegmentedPlan> plan;
  std::vector<std::string> skipped;
  std::unique_ptr<Update> update;  // the running or last update
};

// A model's plan, as PlanModel builds it.
struct Registry::PlannedModel {
  Plan plan;
  std::vector<std::string> skipped;  // sorted
};

// What a load built: generation 1, the plan kept for updates, the checkpoint tensors skipped.
struct Registry::BuiltLoad {
  std::shared_ptr<Generation> generation;
  std::shared_ptr<const SegmentedPlan> plan;
  std::vector<std::string> skipped;
};

}  // namespace weightd

#endif  // WEIGHTD_DAEMON_SRC_REGISTRY_INTERNAL_H_
