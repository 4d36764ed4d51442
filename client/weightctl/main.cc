// weightctl: the command-line client of weightd.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"
#include "weightd/version.h"
#include "weightctl/commands.h"

namespace {

struct Command {
  absl::string_view name;
  int (*main)(int, char**);
  absl::string_view summary;
};

constexpr Command kCommands[] = {
    {"inspect", weightd::cli::InspectMain,
     "list the tensors, files and architecture of a checkpoint"},
    // Daemon commands.
    {"load", weightd::cli::LoadMain, "ask the daemon to load a checkpoint"},
    {"status", weightd::cli::StatusMain,
     "models, ranks, leases, generations, load and update progress"},
    {"list", weightd::cli::ListMain, "list the daemon's models"},
    {"attach", weightd::cli::AttachMain, "attach to a rank, summarize, optionally verify"},
    {"unload", weightd::cli::UnloadMain, "unload a model"},
    {"metrics", weightd::cli::MetricsMain, "print the daemon's Prometheus metrics"},
    // Generations: live weight updates.
    {"update", weightd::cli::UpdateMain, "publish new weights as the model's next generation"},
    {"rollback", weightd::cli::RollbackMain, "serve the previous generation's weights again"},
    {"wait-generation", weightd::cli::WaitGenerationMain,
     "wait until a model's generation passes N, print it"},
    {"plan", weightd::cli::PlanMain, "show how a checkpoint maps to per-rank engine parameters"},
    {"shard", weightd::cli::ShardMain,
     "write per-rank safetensors in vLLM's sharded-state layout (offline)"},
};

void PrintUsage(FILE* out) {
  std::fprintf(out,
               "usage: weightctl [--socket PATH] COMMAND [options]\n\n"
               "weightctl talks to the weightd daemon and works on checkpoints directly.\n\n"
               "global options (before the command; the daemon commands also take --socket "
               "after it):\n"
               "  --socket PATH    the daemon's socket (default: $WEIGHTD_SOCKET, then\n"
               "                   $XDG_RUNTIME_DIR/weightd.sock, then /run/weightd/weightd.sock)\n"
               "  -h, --help       this text\n"
               "  --version        print the version and git revision\n\n"
               "commands:\n");
  for (const Command& c : kCommands) {
    std::fprintf(out, "  %-16.*s %.*s\n", static_cast<int>(c.name.size()), c.name.data(),
                 static_cast<int>(c.summary.size()), c.summary.data());
  }
  std::fprintf(out,
               "\nRun 'weightctl COMMAND --help' for the options of one command.\n\n"
               "exit status: 0 on success, 1 on an error (the daemon's or the command's, on\n"
               "stderr), 2 on a usage error. Data goes to stdout, errors and progress to stderr.\n");
}

}  // namespace

int main(int argc, char** argv) {
  // Global options come before the command, as in `git -C DIR` or `docker -H HOST`.
  int i = 1;
  for (; i < argc; ++i) {
    absl::string_view a = argv[i];
    if (a == "-h" || a == "--help" || a == "help") {
      PrintUsage(stdout);
      return 0;
    }
    if (a == "--version") {
      std::printf("weightctl %s (git %s)\n", std::string(weightd::Version()).c_str(),
                  std::string(weightd::GitRevision()).c_str());
      return 0;
    }
    std::string socket;
    if (a == "--socket") {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "weightctl: --socket needs a value\n");
        return 2;
      }
      socket = argv[++i];
    } else if (absl::ConsumePrefix(&a, "--socket=")) {
      socket = std::string(a);
    } else if (!a.empty() && a[0] == '-') {
      std::fprintf(stderr, "weightctl: unknown global option '%s' (options of a command go "
                   "after it)\n\n", argv[i]);
      PrintUsage(stderr);
      return 2;
    } else {
      break;
    }
    if (socket.empty()) {
      std::fprintf(stderr, "weightctl: --socket needs a non-empty path\n");
      return 2;
    }
    // Every daemon command finds its socket through $WEIGHTD_SOCKET unless it is given its own
    // --socket, which wins.
    ::setenv("WEIGHTD_SOCKET", socket.c_str(), 1);
  }
  if (i >= argc) {
    PrintUsage(stderr);
    return 2;
  }
  const absl::string_view cmd = argv[i];
  for (const Command& c : kCommands) {
    if (c.name == cmd) return c.main(argc - i, argv + i);
  }
  std::fprintf(stderr, "weightctl: unknown command '%s'\n\n", argv[i]);
  PrintUsage(stderr);
  return 2;
}
