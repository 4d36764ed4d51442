// weightctl commands that talk to the daemon: load, status, list, attach, unload, metrics.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "weightctl/args.h"
#include "weightctl/commands.h"
#include "weightd/client.h"

namespace weightd::cli {
namespace {

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "weightctl: %s: %s\n",
               std::string(absl::StatusCodeToString(s.code())).c_str(),
               std::string(s.message()).c_str());
  return 1;
}

// Parses, handles --help and usage errors. Returns -1 to continue, else the exit code.
int ParseOrExit(ArgParser& p, int argc, char** argv) {
  const absl::Status s = p.Parse(argc, argv);
  if (p.help_requested()) {
    std::cout << p.Help();
    return 0;
  }
  if (!s.ok()) {
    std::fprintf(stderr, "weightctl: %s\n", std::string(s.message()).c_str());
    return 2;
  }
  return -1;
}

void AddSocket(ArgParser& p, std::string* socket) {
  p.Option("--socket", "PATH", socket,
           "daemon socket (default: $WEIGHTD_SOCKET, $XDG_RUNTIME_DIR/weightd.sock, "
           "/run/weightd/weightd.sock)");
}

std::string ProgressLine(const ModelInfo& m) {
  const double frac = m.bytes_total ? static_cast<double>(m.bytes_done) / m.bytes_total : 0.0;
  const double gbps = m.seconds > 0 ? m.bytes_done / m.seconds / 1e9 : 0.0;
  if (m.state != "loading") {
    std::string line = absl::StrFormat("%-20s %-9s tp=%d ranks=%zu %s", m.name, m.state, m.tp,
                                       m.ranks.size(), HumanBytes(m.bytes_total));
    if (m.state == "ready") {
      absl::StrAppendFormat(&line, " loaded in %.3f s (%.2f GB/s)", m.seconds, gbps);
    }
    if (!m.error.empty()) absl::StrAppend(&line, "\n    error: ", m.error);
    return line;
  }
  constexpr int kWidth = 30;
  const int filled = static_cast<int>(frac * kWidth);
  const double eta = gbps > 0 ? (m.bytes_total - m.bytes_done) / (gbps * 1e9) : 0.0;
  return absl::StrFormat("%-20s loading   [%s%s] %5.1f%% %s / %s %.2f GB/s ETA %.1f s", m.name,
                         std::string(filled, '#'), std::string(kWidth - filled, '.'), 100 * frac,
                         HumanBytes(m.bytes_done), HumanBytes(m.bytes_total), gbps, eta);
}

void PrintModel(const ModelInfo& m) {
  std::printf("%s\n", ProgressLine(m).c_str());
  for (const RankStatusInfo& r : m.ranks) {
    // The daemon lists only some leases: their pids, each once, and "..." for the rest.
    std::vector<std::string> pids;
    for (const LeaseStatus& l : r.leases) {
      std::string pid = absl::StrCat(l.pid);
      if (std::find(pids.begin(), pids.end(), pid) == pids.end()) pids.push_back(std::move(pid));
    }
    if (r.lease_count > r.leases.size()) pids.push_back("...");
    std::printf("    rank %d: %-9s device %d, %s, %u tensors, %llu leases%s%s\n", r.rank,
                r.state.c_str(), r.device, HumanBytes(r.arena_bytes).c_str(), r.tensors,
                static_cast<unsigned long long>(r.lease_count), pids.empty() ? "" : " pids ",
                absl::StrJoin(pids, ",").c_str());
  }
}

// Redraws the progress of `name` (or all models) until nothing is loading. Returns the final
// snapshot. On a terminal it redraws in place; otherwise it prints nothing.
absl::StatusOr<std::vector<ModelInfo>> WatchLoads(Client& c, const std::optional<std::string>& name,
                                                  bool draw) {
  int lines = 0;
  for (;;) {
    auto st = c.Status(name);
    if (!st.ok()) return st.status();
    bool loading = false;
    for (const ModelInfo& m : *st) loading |= m.state == "loading" || m.state == "unloading";
    if (draw) {
      for (int i = 0; i < lines; ++i) std::printf("\033[1A\033[2K");
      lines = 0;
      for (const ModelInfo& m : *st) {
        std::printf("%s\n", ProgressLine(m).c_str());
        ++lines;
      }
      std::fflush(stdout);
    }
    if (!loading) return st;
    std::this_thread::sleep_for(std::chrono::milliseconds(draw ? 250 : 100));
  }
}

}  // namespace

int LoadMain(int argc, char** argv) {
  std::string name, ckpt, socket, tp = "1", ranks, devices, dtype, recipe, recipe_name;
  std::vector<std::string> skip;
  bool ep = false, wait = false;
  ArgParser p("weightctl load", "Asks the daemon to load a checkpoint under NAME.");
  p.Positional("NAME", &name, "model name (unique in the daemon)");
  p.Positional("CKPT", &ckpt, "checkpoint directory or .safetensors file (as the daemon sees it)");
  p.Option("--tp", "T", &tp, "tensor-parallel degree (default 1)");
  p.Option("--ranks", "LIST", &ranks, "ranks to hold, e.g. 0,1 (default: all)");
  p.Option("--devices", "LIST", &devices, "device of each held rank (default: rank r on r)");
  p.Option("--dtype", "DTYPE", &dtype, "target float dtype: bf16, fp16, fp32");
  p.Repeated("--skip", "SUBSTR", &skip, "skip tensors whose name contains SUBSTR (repeatable)");
  p.Option("--recipe", "FILE", &recipe, "JSON recipe extending or overriding the built-in one");
  p.Option("--recipe-name", "NAME", &recipe_name, "force a built-in recipe (hf, llama, ...)");
  p.Flag("--expert-parallel", &ep, "split experts across ranks instead of slicing them");
  p.Flag("--wait", &wait, "wait until the load ends (progress bar on a terminal)");
  AddSocket(p, &socket);
  p.Epilog("example:\n  weightctl load llama /models/Llama-3-8B --tp 2 --wait\n");
  if (int rc = ParseOrExit(p, argc, argv); rc >= 0) return rc;
  LoadOptions o;
  auto t = ParseInt("--tp", tp);
  if (!t.ok()) return Fail(t.status());
  o.tp = static_cast<int>(*t);
  if (!ranks.empty()) {
    auto v = ParseIntList("--ranks", ranks);
    if (!v.ok()) return Fail(v.status());
    o.ranks.assign(v->begin(), v->end());
  }
  if (!devices.empty()) {
    auto v = ParseIntList("--devices", devices);
    if (!v.ok()) return Fail(v.status());
    o.devices.assign(v->begin(), v->end());
  }
  // The daemon resolves paths from its own working directory: send absolute ones.
  std::error_code ec;
  if (const auto abs = std::filesystem::absolute(ckpt, ec); !ec) ckpt = abs.string();
  if (!recipe.empty()) {
    if (const auto abs = std::filesystem::absolute(recipe, ec); !ec) recipe = abs.string();
  }
  o.dtype = dtype;
  o.skip = skip;
  o.recipe_file = recipe;
  o.recipe = recipe_name;
  o.expert_parallel = ep;
  auto c = Client::Connect(socket);
  if (!c.ok()) return Fail(c.status());
  if (absl::Status s = c->Load(name, ckpt, o); !s.ok()) return Fail(s);
  if (!wait) {
    std::printf("loading %s (see: weightctl status %s)\n", name.c_str(), name.c_str());
    return 0;
  }
  auto st = WatchLoads(*c, name, ::isatty(STDOUT_FILENO));
  if (!st.ok()) return Fail(st.status());
  const ModelInfo& m = st->front();
  if (!::isatty(STDOUT_FILENO)) std::printf("%s\n", ProgressLine(m).c_str());
  return m.state == "ready" ? 0 : 1;
}

int StatusMain(int argc, char** argv) {
  std::string name, socket;
  bool as_json = false;
  ArgParser p("weightctl status",
              "Shows models, their ranks, leases and load progress. On a terminal, follows "
              "running loads with a progress bar until they end.");
  p.Flag("--json", &as_json, "print JSON");
  AddSocket(p, &socket);
  std::vector<std::string> rest;
  p.Repeated("--model", "NAME", &rest, "show only NAME (or give NAME as the argument)");
  // NAME is an optional positional, which ArgParser has no notion of: take the first bare
  // argument that is not an option's value out of argv.
  std::vector<char*> args;
  for (int i = 0; i < argc; ++i) {
    const absl::string_view a = argv[i];
    if (i > 0 && name.empty() && !a.empty() && a[0] != '-') {
      name = argv[i];
      continue;
    }
    args.push_back(argv[i]);
    if ((a == "--socket" || a == "--model") && i + 1 < argc) args.push_back(argv[++i]);
  }
  argc = static_cast<int>(args.size());
  argv = args.data();
  if (int rc = ParseOrExit(p, argc, argv); rc >= 0) return rc;
  if (!rest.empty()) name = rest.back();
  auto c = Client::Connect(socket);
  if (!c.ok()) return Fail(c.status());
  std::optional<std::string> which;
  if (!name.empty()) which = name;
  absl::StatusOr<std::vector<ModelInfo>> st;
  if (!as_json && ::isatty(STDOUT_FILENO)) {
    st = WatchLoads(*c, which, true);
    if (!st.ok()) return Fail(st.status());
    std::printf("\n");
  } else {
    st = c->Status(which);
  }
  if (!st.ok()) return Fail(st.status());
  if (as_json) {
    std::printf("%s\n", ModelsToJson(*st, 2).c_str());
    return 0;
  }
  if (st->empty()) std::printf("no models\n");
  for (const ModelInfo& m : *st) PrintModel(m);
  return 0;
}

int ListMain(int argc, char** argv) {
  std::string socket;
  ArgParser p("weightctl list", "Lists the models the daemon holds (name, state, ranks).");
  AddSocket(p, &socket);
  if (int rc = ParseOrExit(p, argc, argv); rc >= 0) return rc;
  auto c = Client::Connect(socket);
  if (!c.ok()) return Fail(c.status());
  auto l = c->List();
  if (!l.ok()) return Fail(l.status());
  for (const ModelInfo& m : *l) {
    std::vector<int> ranks;
    for (const RankStatusInfo& r : m.ranks) ranks.push_back(r.rank);
    std::printf("%s\t%s\ttp=%d\tranks=%s\n", m.name.c_str(), m.state.c_str(), m.tp,
                absl::StrJoin(ranks, ",").c_str());
  }
  return 0;
}

int AttachMain(int argc, char** argv) {
  std::string name, socket, rank = "0", hold;
  bool verify = false;
  ArgParser p("weightctl attach",
              "Attaches to one rank of a model (maps its memory read-only), prints a summary "
              "and detaches.");
  p.Positional("NAME", &name, "model name");
  p.Option("--rank", "R", &rank, "rank to attach (default 0)");
  p.Flag("--verify", &verify, "check every tensor against the manifest's CRC32C");
  p.Option("--hold", "SECONDS", &hold, "keep the attachment this long before detaching");
  AddSocket(p, &socket);
  if (int rc = ParseOrExit(p, argc, argv); rc >= 0) return rc;
  auto r = ParseInt("--rank", rank);
  if (!r.ok()) return Fail(r.status());
  auto c = Client::Connect(socket);
  if (!c.ok()) return Fail(c.status());
  const auto t0 = std::chrono::steady_clock::now();
  auto a = c->Attach(name, static_cast<int>(*r));
  if (!a.ok()) return Fail(a.status());
  const double attach_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  std::printf("model %s rank %d: %zu tensors, %s, lease %llu, attached in %.2f ms\n", name.c_str(),
              a->rank(), a->tensors().size(), HumanBytes(a->total_bytes()).c_str(),
              static_cast<unsigned long long>(a->lease()), attach_ms);
  if (verify) {
    const auto t1 = std::chrono::steady_clock::now();
    const absl::Status s = a->Verify();
    const double secs =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count();
    if (!s.ok()) return Fail(s);
    std::printf("verify: OK, %zu tensors match their CRC32C (%.2f GB/s)\n", a->tensors().size(),
                secs > 0 ? a->total_bytes() / secs / 1e9 : 0.0);
  }
  std::fflush(stdout);
  if (!hold.empty()) {
    auto h = ParseInt("--hold", hold);
    if (!h.ok()) return Fail(h.status());
    std::this_thread::sleep_for(std::chrono::seconds(*h));
  }
  return 0;
}

int UnloadMain(int argc, char** argv) {
  std::string name, socket;
  bool force = false;
  std::string wait_text = "30";
  ArgParser p("weightctl unload",
              "Unloads a model. Refused while clients are attached (their pids are listed) "
              "unless --force; a forced unload frees memory when the last client detaches.");
  p.Positional("NAME", &name, "model name");
  p.Flag("--force", &force, "unload even if attached, or cancel a running load");
  p.Option("--wait-seconds", "N", &wait_text,
           "how long to wait for a cancelled load to stop before exiting 3 (default 30)");
  AddSocket(p, &socket);
  if (int rc = ParseOrExit(p, argc, argv); rc >= 0) return rc;
  auto c = Client::Connect(socket);
  if (!c.ok()) return Fail(c.status());
  auto wait = ParseInt("--wait-seconds", wait_text);
  if (!wait.ok()) return Fail(wait.status());
  const int wait_s = static_cast<int>(*wait);
  if (absl::Status s = c->Unload(name, force); !s.ok()) return Fail(s);
  // A forced unload of a running load only asks it to stop: say "unloaded" once the model is
  // gone, and the truth if it is not after `wait_s`.
  std::string state;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(wait_s);
  for (;;) {
    auto st = c->Status(name);
    if (!st.ok() && st.status().code() == absl::StatusCode::kNotFound) break;
    if (!st.ok()) return Fail(st.status());
    if (st->empty()) break;
    state = st->front().state;
    if (std::chrono::steady_clock::now() >= deadline) {
      std::fprintf(stderr,
                   "weightctl: %s is still %s %d s after the unload was accepted (its load was "
                   "asked to stop); check again with weightctl status\n",
                   name.c_str(), state.c_str(), wait_s);
      return 3;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  std::printf("unloaded %s\n", name.c_str());
  return 0;
}

int MetricsMain(int argc, char** argv) {
  std::string socket;
  ArgParser p("weightctl metrics", "Prints the daemon's metrics (Prometheus text format).");
  AddSocket(p, &socket);
  if (int rc = ParseOrExit(p, argc, argv); rc >= 0) return rc;
  auto c = Client::Connect(socket);
  if (!c.ok()) return Fail(c.status());
  auto m = c->Metrics();
  if (!m.ok()) return Fail(m.status());
  std::fputs(m->c_str(), stdout);
  return 0;
}

}  // namespace weightd::cli
