// weightctl commands that talk to the daemon: load, status, list, attach, unload, metrics, and
// the generation commands update, rollback, wait-generation (docs/PROTOCOL.md "Generations").
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/time/time.h"
#include "weightd/args.h"
#include "weightctl/commands.h"
#include "weightd/client.h"
#include "weightd/protocol.h"

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

// " generation 3 (previous 2)"; empty from a daemon without generations.
std::string GenerationText(const ModelInfo& m) {
  if (m.generation == 0) return "";
  std::string out = absl::StrCat(" generation ", m.generation);
  if (m.previous_generation != 0) absl::StrAppend(&out, " (previous ", m.previous_generation, ")");
  return out;
}

// "[#####.....]  40.0% 1.2 GB / 3.0 GB 2.10 GB/s ETA 0.9 s" of `done` bytes out of `total`.
std::string Bar(uint64_t done, uint64_t total, double seconds) {
  constexpr int kWidth = 30;
  const double frac = total ? static_cast<double>(done) / total : 0.0;
  const double gbps = seconds > 0 ? done / seconds / 1e9 : 0.0;
  const int filled = std::clamp(static_cast<int>(frac * kWidth), 0, kWidth);
  const double eta = gbps > 0 && total > done ? (total - done) / (gbps * 1e9) : 0.0;
  return absl::StrFormat("[%s%s] %5.1f%% %s / %s %.2f GB/s ETA %.1f s", std::string(filled, '#'),
                         std::string(kWidth - filled, '.'), 100 * frac, HumanBytes(done),
                         HumanBytes(total), gbps, eta);
}

// The model's update, for status: running with a bar, or how the last one ended.
std::string UpdateLine(const UpdateStatus& u) {
  if (u.state == "running") {
    return absl::StrFormat("update to generation %d: %s", u.generation,
                           Bar(u.bytes_done, u.bytes_total, u.seconds));
  }
  std::string line = absl::StrFormat("update to generation %d: %s after %.3f s, %s read",
                                     u.generation, u.state, u.seconds, HumanBytes(u.bytes_done));
  if (!u.error.empty()) absl::StrAppend(&line, ": ", u.error);
  return line;
}

std::string ProgressLine(const ModelInfo& m) {
  const double gbps = m.seconds > 0 ? m.bytes_done / m.seconds / 1e9 : 0.0;
  if (m.state != "loading") {
    std::string line =
        absl::StrFormat("%-20s %-9s tp=%d ranks=%zu %s%s", m.name, m.state, m.tp, m.ranks.size(),
                        HumanBytes(m.bytes_total), GenerationText(m));
    if (m.state == "ready") {
      absl::StrAppendFormat(&line, " loaded in %.3f s (%.2f GB/s)", m.seconds, gbps);
    }
    if (!m.error.empty()) absl::StrAppend(&line, "\n    error: ", m.error);
    return line;
  }
  return absl::StrFormat("%-20s loading   %s", m.name, Bar(m.bytes_done, m.bytes_total, m.seconds));
}

void PrintModel(const ModelInfo& m) {
  std::printf("%s\n", ProgressLine(m).c_str());
  if (m.update) std::printf("    %s\n", UpdateLine(*m.update).c_str());
  for (const RankStatusInfo& r : m.ranks) {
    // The daemon lists only some leases: their pids, each once, and "..." for the rest.
    std::vector<std::string> pids;
    for (const LeaseStatus& l : r.leases) {
      std::string pid = absl::StrCat(l.pid);
      if (std::find(pids.begin(), pids.end(), pid) == pids.end()) pids.push_back(std::move(pid));
    }
    if (r.lease_count > r.leases.size()) pids.push_back("...");
    // "in N arenas" from daemons that report segments.
    const std::string arenas =
        r.arenas > 0 ? absl::StrCat(" in ", r.arenas, r.arenas == 1 ? " arena" : " arenas") : "";
    std::printf("    rank %d: %-9s device %d, %s%s, %u tensors, %llu leases%s%s\n", r.rank,
                r.state.c_str(), r.device, HumanBytes(r.arena_bytes).c_str(), arenas.c_str(),
                r.tensors,
                static_cast<unsigned long long>(r.lease_count), pids.empty() ? "" : " pids ",
                absl::StrJoin(pids, ",").c_str());
  }
}

// Redraws the progress of `name` (or all models) until nothing is loading. Returns the final
// snapshot. With `draw` (a terminal) it redraws in place, and leaves the final lines on screen
// when `keep_final`, else erases them (the caller prints its own); otherwise it prints nothing.
absl::StatusOr<std::vector<ModelInfo>> WatchLoads(Client& c, const std::optional<std::string>& name,
                                                  bool draw, bool keep_final = true) {
  int lines = 0;
  for (;;) {
    auto st = c.Status(name);
    if (!st.ok()) return st.status();
    bool loading = false;
    for (const ModelInfo& m : *st) loading |= m.state == "loading" || m.state == "unloading";
    // Nothing to follow and nothing drawn yet: the caller prints the final state itself.
    if (!loading && lines == 0 && !keep_final) return st;
    if (draw) {
      for (int i = 0; i < lines; ++i) std::printf("\033[1A\033[2K");
      lines = 0;
      for (const ModelInfo& m : *st) {
        std::printf("%s\n", ProgressLine(m).c_str());
        ++lines;
      }
      std::fflush(stdout);
    }
    if (!loading) {
      if (draw && !keep_final) {
        for (int i = 0; i < lines; ++i) std::printf("\033[1A\033[2K");
        std::fflush(stdout);
      }
      return st;
    }
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
    // Follows running loads, then prints each model once, in full.
    st = WatchLoads(*c, which, true, /*keep_final=*/false);
    if (!st.ok()) return Fail(st.status());
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

int UpdateMain(int argc, char** argv) {
  std::string name, ckpt, socket;
  bool wait = false;
  ArgParser p("weightctl update",
              "Publishes new weights for a loaded model as its next generation: the tensors of "
              "CKPT (any subset of the model's checkpoint tensors, same names, dtypes and "
              "shapes) go through the model's load plan into new arenas, and attached workers "
              "move to them with a refresh. The current generation serves until then.");
  p.Positional("NAME", &name, "model name");
  p.Positional("CKPT", &ckpt, "checkpoint directory or .safetensors file (as the daemon sees it)");
  p.Flag("--wait", &wait,
         "follow the update until the new generation is published (progress bar on a "
         "terminal, then one line); exit 1 with the error if it fails");
  AddSocket(p, &socket);
  p.Epilog(
      "Without --wait it prints the generation the update will publish and returns; follow it\n"
      "with 'weightctl status NAME' or 'weightctl wait-generation NAME --after N-1'.\n"
      "Interrupting --wait stops the watching only: the update goes on.\n\n"
      "example:\n  weightctl update llama /models/llama-step-2000 --wait\n");
  if (int rc = ParseOrExit(p, argc, argv); rc >= 0) return rc;
  // The daemon resolves paths from its own working directory: send an absolute one.
  std::error_code ec;
  if (const auto abs = std::filesystem::absolute(ckpt, ec); !ec) ckpt = abs.string();
  auto c = Client::Connect(socket);
  if (!c.ok()) return Fail(c.status());
  auto started = c->Update(name, ckpt, /*wait=*/false);
  if (!started.ok()) return Fail(started.status());
  const uint64_t target = started->generation;
  if (!wait) {
    std::printf("updating %s to generation %llu (see: weightctl status %s)\n", name.c_str(),
                static_cast<unsigned long long>(target), name.c_str());
    return 0;
  }
  const bool draw = ::isatty(STDOUT_FILENO);
  bool drawn = false;
  for (;;) {
    auto st = c->Status(name);
    if (!st.ok()) return Fail(st.status());
    if (st->empty()) return Fail(absl::NotFoundError(absl::StrCat("model '", name, "' is gone")));
    const ModelInfo& m = st->front();
    const std::optional<UpdateStatus>& u = m.update;
    const bool ours = u && u->generation == target;
    if (ours && u->state == "failed") {
      if (drawn) std::printf("\033[1A\033[2K");
      std::fprintf(stderr, "weightctl: update of %s to generation %llu failed: %s\n", name.c_str(),
                   static_cast<unsigned long long>(target), u->error.c_str());
      return 1;
    }
    if (m.generation >= target || (ours && u->state == "done")) {
      if (drawn) std::printf("\033[1A\033[2K");
      std::string line = absl::StrFormat("%s: generation %d published", name, target);
      if (ours) {
        absl::StrAppendFormat(&line, " in %.3f s (%s read, %.2f GB/s)", u->seconds,
                              HumanBytes(u->bytes_done),
                              u->seconds > 0 ? u->bytes_done / u->seconds / 1e9 : 0.0);
      }
      std::printf("%s\n", line.c_str());
      return 0;
    }
    if (draw && ours) {
      if (drawn) std::printf("\033[1A\033[2K");
      std::printf("%-20s updating  %s\n", name.c_str(),
                  Bar(u->bytes_done, u->bytes_total, u->seconds).c_str());
      std::fflush(stdout);
      drawn = true;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(draw ? 250 : 100));
  }
}

int RollbackMain(int argc, char** argv) {
  std::string name, socket;
  ArgParser p("weightctl rollback",
              "Re-publishes the model's previous generation's weights as a new generation "
              "(numbers only grow, so waiting workers wake; a second rollback undoes the first). "
              "Needs the daemon to keep the previous generation (config "
              "keep_previous_generation).");
  p.Positional("NAME", &name, "model name");
  AddSocket(p, &socket);
  if (int rc = ParseOrExit(p, argc, argv); rc >= 0) return rc;
  auto c = Client::Connect(socket);
  if (!c.ok()) return Fail(c.status());
  auto r = c->Rollback(name);
  if (!r.ok()) return Fail(r.status());
  std::printf("%s: generation %llu serves the weights of generation %llu\n", name.c_str(),
              static_cast<unsigned long long>(r->generation),
              static_cast<unsigned long long>(r->restored));
  return 0;
}

int WaitGenerationMain(int argc, char** argv) {
  std::string name, socket, after_text, timeout_text;
  ArgParser p("weightctl wait-generation",
              "Waits until the model's generation is above N and prints it (one number).");
  p.Positional("NAME", &name, "model name");
  p.Option("--after", "N", &after_text, "the generation to wait past (required)");
  p.Option("--timeout", "SECONDS", &timeout_text,
           "give up after this long (fractions allowed; default: wait as long as it takes)");
  AddSocket(p, &socket);
  p.Epilog(
      "exit status: 0 when the generation went above N, 1 on timeout (the current generation\n"
      "is still printed) or on an error (model unloaded: NOT_FOUND), 2 on a usage error.\n\n"
      "example, in a worker's script:\n"
      "  gen=$(weightctl wait-generation llama --after \"$gen\" --timeout 600) && reload\n");
  if (int rc = ParseOrExit(p, argc, argv); rc >= 0) return rc;
  if (after_text.empty()) {
    std::fprintf(stderr,
                 "weightctl: --after N is required (see weightctl wait-generation "
                 "--help)\n");
    return 2;
  }
  uint64_t after = 0;
  if (!absl::SimpleAtoi(after_text, &after)) {
    std::fprintf(stderr, "weightctl: --after needs a generation number >= 0, got '%s'\n",
                 after_text.c_str());
    return 2;
  }
  std::optional<absl::Time> deadline;
  if (!timeout_text.empty()) {
    double seconds = 0;
    if (!absl::SimpleAtod(timeout_text, &seconds) || !(seconds >= 0) || seconds > 1e9) {
      std::fprintf(stderr, "weightctl: --timeout needs a number of seconds >= 0, got '%s'\n",
                   timeout_text.c_str());
      return 2;
    }
    deadline = absl::Now() + absl::Seconds(seconds);
  }
  auto c = Client::Connect(socket);
  if (!c.ok()) return Fail(c.status());
  // The daemon answers one wait after at most kMaxWaitGenerationMs: longer waits are several.
  for (;;) {
    const absl::Duration left = deadline ? std::max(*deadline - absl::Now(), absl::ZeroDuration())
                                         : absl::Milliseconds(kMaxWaitGenerationMs);
    auto w = c->WaitGeneration(name, after, left);
    if (!w.ok()) return Fail(w.status());
    if (!w->timed_out) {
      std::printf("%llu\n", static_cast<unsigned long long>(w->generation));
      return 0;
    }
    if (deadline && absl::Now() >= *deadline) {
      std::printf("%llu\n", static_cast<unsigned long long>(w->generation));
      std::fprintf(stderr, "weightctl: %s is still at generation %llu after %s s\n", name.c_str(),
                   static_cast<unsigned long long>(w->generation), timeout_text.c_str());
      return 1;
    }
  }
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
