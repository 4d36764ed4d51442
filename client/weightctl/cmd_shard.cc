// weightctl shard CKPT --tp T --out DIR: argument handling and signals. The work is
// WriteShardedCheckpoint (shard_output.h), which runs the daemon's read pipeline into output
// files (ExecutePlanToFiles).
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <csignal>
#include <iostream>
#include <string>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "weightd/args.h"
#include "weightctl/commands.h"
#include "weightctl/plan_args.h"
#include "weightctl/shard_output.h"
#include "weightd/checkpoint.h"
#include "weightd/executor.h"
#include "weightd/plan.h"

namespace weightd::cli {
namespace {

// Default read/write workers: half the cores, 1 to 4. Writing is the bound: on a 2-vCPU VM one
// worker (with its writeback started early) took 1.4-1.9 s for 2.5 GB at --tp 2, two workers
// 1.4-2.8 s, cp -r + sync 2.0-2.2 s (docs/BENCHMARKS.md, "Host load").
int DefaultThreads() {
  return static_cast<int>(std::clamp(std::thread::hardware_concurrency() / 2, 1u, 4u));
}

// The stop signal that arrived during a shard run (see StopSignalScope), 0 if none.
volatile std::sig_atomic_t g_stop_signal = 0;
// The run's cancel flag, set by the handler too (a lock-free atomic store is signal-safe).
std::atomic<bool>* g_cancel = nullptr;
static_assert(std::atomic<bool>::is_always_lock_free);

void RecordStopSignal(int sig) {
  g_stop_signal = sig;
  if (g_cancel != nullptr) g_cancel->store(true);
}

// While it lives, SIGINT, SIGTERM and SIGHUP only set g_stop_signal; the pipeline polls the
// run's cancel flag so that an interrupted run unwinds through StagedFiles' rollback instead of
// leaving its temporaries behind. A signal the caller ignores (nohup) stays ignored. The
// previous actions come back on destruction. Process-wide state: one at a time.
class StopSignalScope {
 public:
  explicit StopSignalScope(std::atomic<bool>* cancel) {
    g_cancel = cancel;
    struct sigaction sa = {};
    sa.sa_handler = RecordStopSignal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    for (size_t i = 0; i < std::size(kSignals); ++i) {
      sigaction(kSignals[i], nullptr, &old_[i]);
      if (old_[i].sa_handler != SIG_IGN) sigaction(kSignals[i], &sa, nullptr);
    }
  }
  StopSignalScope(const StopSignalScope&) = delete;
  StopSignalScope& operator=(const StopSignalScope&) = delete;
  ~StopSignalScope() {
    for (size_t i = 0; i < std::size(kSignals); ++i) sigaction(kSignals[i], &old_[i], nullptr);
    g_cancel = nullptr;
  }

 private:
  static constexpr int kSignals[] = {SIGINT, SIGTERM, SIGHUP};
  struct sigaction old_[std::size(kSignals)] = {};
};

const char* SignalName(int sig) {
  switch (sig) {
    case SIGINT:
      return "SIGINT";
    case SIGTERM:
      return "SIGTERM";
    case SIGHUP:
      return "SIGHUP";
    default:
      return "a signal";
  }
}

}  // namespace

int ShardMain(int argc, char** argv) {
  // Under RLIMIT_FSIZE a write past the limit raises SIGXFSZ, whose default action kills the
  // process with its temporaries on disk; ignored, the write fails with EFBIG and the run rolls
  // back like on a full disk.
  std::signal(SIGXFSZ, SIG_IGN);
  PlanArgs a;
  std::string out_dir;
  std::string threads_text;
  ArgParser p("weightctl shard",
              "Writes per-rank safetensors in vLLM's sharded-state layout, on the host.");
  AddPlanArgs(p, &a);
  p.Option("--out", "DIR", &out_dir, "output directory (required)");
  p.Option("--threads", "N", &threads_text,
           absl::StrCat("read/write workers (default ", DefaultThreads(), ")"));
  p.Epilog(
      "example: weightctl shard /models/Llama-3-8B --tp 4 --out /models/Llama-3-8B-tp4\n"
      "Loads with: vllm serve /models/Llama-3-8B-tp4 -tp 4 --load-format sharded_state\n"
      "Files are written under temporary names and renamed into place once all are complete;\n"
      "a failed or interrupted run leaves DIR as it was.");
  if (absl::Status s = p.Parse(argc, argv); !s.ok()) {
    std::cerr << "weightctl shard: " << s.message() << "\n";
    return 2;
  }
  if (p.help_requested()) {
    std::cout << p.Help();
    return 0;
  }
  absl::StatusOr<PlanOptions> o = ToPlanOptions(a);
  if (!o.ok() || out_dir.empty()) {
    std::cerr << "weightctl shard: " << (o.ok() ? "--out DIR is required" : o.status().message())
              << "\n";
    return 2;
  }
  ExecutorOptions options;
  options.threads = DefaultThreads();
  // Units of 16 MiB: peak memory threads x 16 MiB, whatever the model size.
  options.chunk_bytes = 16ull << 20;
  if (!threads_text.empty() && (!absl::SimpleAtoi(threads_text, &options.threads) ||
                                options.threads < 1 || options.threads > 256)) {
    std::cerr << "weightctl shard: --threads must be a whole number from 1 to 256, not '"
              << threads_text << "'\n";
    return 2;
  }
  absl::StatusOr<Checkpoint> ckpt = Checkpoint::Open(a.checkpoint);
  if (!ckpt.ok()) {
    std::cerr << "weightctl shard: " << ckpt.status().message() << "\n";
    return 1;
  }
  const auto t0 = std::chrono::steady_clock::now();
  absl::StatusOr<Plan> plan = BuildPlan(*ckpt, *o);
  if (!plan.ok()) {
    std::cerr << "weightctl shard: " << plan.status().message() << "\n";
    return 1;
  }
  ShardStats stats;
  LoadProgress progress;
  absl::Status s;
  {
    StopSignalScope stop_signals(&progress.cancel);
    s = WriteShardedCheckpoint(*ckpt, *plan, out_dir, options, &progress, &stats);
  }
  if (!s.ok()) {
    if (const int sig = g_stop_signal; sig != 0) {
      std::cerr << "weightctl shard: interrupted by " << SignalName(sig)
                << "; the output directory is as it was\n";
    } else {
      std::cerr << "weightctl shard: " << s.message() << "\n";
    }
    if (const int sig = g_stop_signal; sig != 0) {
      // The output is rolled back: now die of the signal, as a shell expects of a command it
      // interrupted.
      std::signal(sig, SIG_DFL);
      std::raise(sig);
    }
    return 1;
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::cout << absl::StrFormat(
      "wrote %d rank file(s) to %s\nread %s of %s checkpoint tensor bytes, wrote %s, in %.2f s: "
      "%.2f GB/s read, %.2f GB/s written\n",
      plan->ranks.size(), out_dir, HumanBytes(stats.read), HumanBytes(plan->checkpoint_bytes),
      HumanBytes(stats.written), secs, static_cast<double>(stats.read) / secs / 1e9,
      static_cast<double>(stats.written) / secs / 1e9);
  return 0;
}

}  // namespace weightd::cli
