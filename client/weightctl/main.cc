// weightctl: the command-line client of weightd.
#include <cstdio>
#include <cstring>

#include "absl/strings/string_view.h"
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
               "usage: weightctl COMMAND [options]\n\n"
               "weightctl talks to the weightd daemon and works on checkpoints directly.\n\n"
               "commands:\n");
  for (const Command& c : kCommands) {
    std::fprintf(out, "  %-16.*s %.*s\n", static_cast<int>(c.name.size()), c.name.data(),
                 static_cast<int>(c.summary.size()), c.summary.data());
  }
  std::fprintf(out, "\nRun 'weightctl COMMAND --help' for the options of one command.\n");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    PrintUsage(stderr);
    return 2;
  }
  const absl::string_view cmd = argv[1];
  if (cmd == "-h" || cmd == "--help" || cmd == "help") {
    PrintUsage(stdout);
    return 0;
  }
  for (const Command& c : kCommands) {
    if (c.name == cmd) return c.main(argc - 1, argv + 1);
  }
  std::fprintf(stderr, "weightctl: unknown command '%s'\n\n", argv[1]);
  PrintUsage(stderr);
  return 2;
}
