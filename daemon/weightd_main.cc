// weightd: the daemon. See `weightd --help`, docs/CONFIG.md and docs/PROTOCOL.md.
#include <fcntl.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "weightd/args.h"
#include "weightd/backend.h"
#include "weightd/config.h"
#include "weightd/file_util.h"
#include "weightd/handoff.h"
#include "weightd/http_endpoint.h"
#include "weightd/log.h"
#include "weightd/registry.h"
#include "weightd/seqpacket.h"
#include "weightd/server.h"
#include "weightd/status_macros.h"
#include "weightd/version.h"

#if WEIGHTD_HAVE_SYSTEMD
#include <systemd/sd-daemon.h>
#endif

namespace {

// How long a stop waits for cancelled loads (well inside systemd's default TimeoutStopSec).
constexpr absl::Duration kShutdownGrace = absl::Seconds(20);
// How often --watch-config compares the config file's bytes with the last ones it saw.
constexpr absl::Duration kConfigWatchInterval = absl::Seconds(2);

constexpr char kSummary[] =
    "Keeps model weights resident in memory in each rank's layout and lends them to worker\n"
    "processes over a Unix socket (weightctl, libweightd_client). Each option overrides the\n"
    "config file's key of the same meaning.";

constexpr char kEpilog[] =
    "Stops on SIGINT/SIGTERM; SIGHUP re-reads the config (log level, new preloads start,\n"
    "removed ones are unloaded unless attached). Logs one line per event to stderr (journald\n"
    "priorities when stderr is the journal). Under systemd: serves the socket of weightd.socket\n"
    "when socket-activated, sends READY=1 once the config's preloads have ended (STATUS= shows\n"
    "their progress), pings the watchdog from its event loop, and keeps every loaded model in\n"
    "the fd store so a restart re-adopts it without reading the checkpoint\n"
    "(docs/OPERATIONS.md).\n"
    "\n"
    "example:\n"
    "  weightd --socket /tmp/weightd.sock --backend host &\n"
    "  weightctl load llama /models/Llama-3-8B --tp 2 --socket /tmp/weightd.sock\n"
    "  weightd --socket /tmp/weightd.sock --backend host --takeover &   # hot upgrade\n"
    "  weightd --config weightd.json --metrics-listen 127.0.0.1:9464 &\n"
    "  curl -s http://127.0.0.1:9464/metrics\n"
    "\n"
    "exit status: 0 after a clean shutdown or a hand-over to a successor, 1 on an error (a bad\n"
    "config, a socket in use, a failed takeover), 2 on a usage error.";

// The command line. Empty strings: not given (the config file's value, or its default, stands).
struct Flags {
  std::string config_path, socket, backend, pinned_budget, log_level, metrics_listen;
  bool takeover = false, takeover_if_running = false, linger = false, watch_config = false;
  bool check_config = false;
};

int Usage(absl::string_view message) {
  std::fprintf(stderr, "weightd: %s\n", std::string(message).c_str());
  if (!absl::StrContains(message, "--help")) std::fputs("Run 'weightd --help' for usage.\n", stderr);
  return 2;
}

// Parses the command line into `flags`. Returns the exit status when the process must end now
// (--help, --version, a usage error), nullopt to go on.
std::optional<int> ParseFlags(int argc, char** argv, Flags& f) {
  weightd::ArgParser p("weightd", kSummary);
  p.Option("--config", "FILE", &f.config_path,
           "JSON configuration (docs/CONFIG.md lists every key)");
  p.Option("--socket", "PATH", &f.socket,
           "listening socket (default: /run/weightd/weightd.sock for root, else "
           "$XDG_RUNTIME_DIR/weightd.sock)");
  p.Option("--backend", "KIND", &f.backend,
           "auto (default: cuda when a CUDA driver reports a device, else host), cuda (VMM "
           "device arenas, exported as fds that clients map on the GPU), or host (sealed memfds "
           "in RAM)");
  p.Option("--pinned-budget", "BYTES", &f.pinned_budget,
           "pinned staging memory shared by all CUDA loads (host loads: read buffers per load), "
           "e.g. 1GiB (default 1 GiB)");
  p.Option("--log-level", "LEVEL", &f.log_level, "error, warning, notice, info (default) or debug");
  p.Option("--metrics-listen", "ADDR", &f.metrics_listen,
           "serve HTTP GET /metrics (Prometheus text), /healthz and /readyz on ADDR: "
           "127.0.0.1:9464, [::1]:9464, 0.0.0.0:9464, or a bare port (loopback); port 0 picks a "
           "free one, logged (default: none)");
  p.Flag("--takeover", &f.takeover,
         "take over the daemon running on the socket (same uid only): receive its models and "
         "listening socket, serve them, and let it exit");
  p.Flag("--takeover-if-running", &f.takeover_if_running,
         "take over as --takeover when a daemon answers on the socket, else start normally (a "
         "container that may or may not have a predecessor)");
  p.Flag("--linger-after-handover", &f.linger,
         "after handing over to a successor, keep running, serving only HTTP (/healthz 200, "
         "/readyz 503), until SIGTERM: for supervisors that restart a process that exits "
         "(Kubernetes)");
  p.Flag("--watch-config", &f.watch_config,
         "reload the config file (as on SIGHUP) when its content changes, checked every 2 s "
         "(Kubernetes updates ConfigMap volumes in place)");
  p.Flag("--check-config", &f.check_config,
         "parse and validate the config file and the flags, then exit: 0 when valid, 1 with the "
         "error (nothing is started, bound or loaded)");
  p.Version(absl::StrCat("weightd ", weightd::Version(), " (git ", weightd::GitRevision(), ")"));
  p.Epilog(kEpilog);
  if (absl::Status s = p.Parse(argc, argv); !s.ok()) return Usage(s.message());
  if (p.help_requested()) {
    std::fputs(p.Help().c_str(), stdout);
    return 0;
  }
  if (p.version_requested()) {
    std::printf("%s\n", p.version().c_str());
    return 0;
  }
  if (f.watch_config && f.config_path.empty()) return Usage("--watch-config needs --config FILE");
  if (!f.metrics_listen.empty()) {
    auto a = weightd::ParseListenAddress(f.metrics_listen, "--metrics-listen");
    if (!a.ok()) return Usage(a.status().message());
  }
  return std::nullopt;
}

// The configuration this run uses: the file's, then the flags over it. `config_text` gets the
// file's bytes when --watch-config compares against them. Returns the exit status on an error.
std::optional<int> EffectiveConfig(const Flags& f, weightd::DaemonConfig& config,
                                   std::string& config_text) {
  using namespace weightd;
  if (!f.config_path.empty()) {
    // Read before the file is parsed, so a change between the two is seen by the watcher.
    if (f.watch_config) config_text = ReadFileToString(f.config_path, 16 << 20).value_or("");
    auto c = LoadConfigFile(f.config_path);
    if (!c.ok()) {
      std::fprintf(stderr, "weightd: %s\n", std::string(c.status().message()).c_str());
      return 1;
    }
    config = std::move(*c);
  }
  if (!f.socket.empty()) config.socket = f.socket;
  if (!f.backend.empty()) config.backend = f.backend;
  if (!f.log_level.empty()) config.log_level = f.log_level;
  if (!f.metrics_listen.empty()) config.metrics_listen = f.metrics_listen;
  if (!f.pinned_budget.empty()) {
    auto b = ParseByteSize(f.pinned_budget, "--pinned-budget");
    if (!b.ok()) return Usage(b.status().message());
    config.pinned_budget = *b;
  }
  if (config.socket.empty()) config.socket = DefaultDaemonSocketPath();
  if (auto level = ParseLogLevel(config.log_level); !level.ok()) {
    return Usage(level.status().message());
  }
  return std::nullopt;
}

#if WEIGHTD_HAVE_SYSTEMD
// Stores each fd in systemd's fd store under its name (FDPOLL=0: systemd must not drop an arena
// when it sees POLLHUP/POLLERR on it). A no-op without NOTIFY_SOCKET.
void StoreFds(const std::vector<weightd::NamedFd>& fds) {
  for (const weightd::NamedFd& f : fds) {
    const std::string msg = absl::StrCat("FDSTORE=1\nFDNAME=", f.name, "\nFDPOLL=0");
    const int fd = f.fd.get();
    const int r = sd_pid_notify_with_fds(0, 0, msg.c_str(), &fd, 1);
    if (r < 0) {
      weightd::LogWarning("fd store: storing %s failed: %s", f.name, std::strerror(-r));
    }
  }
}

void RemoveStoredFds(const std::vector<std::string>& names) {
  for (const std::string& n : names) {
    sd_notifyf(0, "FDSTOREREMOVE=1\nFDNAME=%s", n.c_str());
  }
}
#endif

// A message to systemd's notification socket (a no-op without systemd or NOTIFY_SOCKET).
void Notify(const std::string& message) {
#if WEIGHTD_HAVE_SYSTEMD
  sd_notify(0, message.c_str());
#else
  (void)message;
#endif
}

// Adopts the models in `fds`; logs (and, for the fd store, removes) whatever is invalid.
void AdoptAll(weightd::SortedFds& sorted, weightd::Registry& registry, const char* origin) {
  using namespace weightd;
  for (const std::string& e : sorted.errors) LogWarning("%s: %s", origin, e);
  std::vector<std::string> drop = sorted.dropped_names;
  for (AdoptableModel& m : sorted.models) {
    const std::string name = m.record.name;
    const std::vector<std::string> names = m.fd_names;
    const absl::Status s = registry.Adopt(std::move(m), origin);
    if (s.ok()) {
      LogInfo("%s: model %s is ready again (no checkpoint read)", origin, name);
    } else {
      LogError("%s: dropped: %s", origin, s.message());
      drop.insert(drop.end(), names.begin(), names.end());
    }
  }
#if WEIGHTD_HAVE_SYSTEMD
  if (std::strcmp(origin, "fdstore") == 0) RemoveStoredFds(drop);
#endif
}

// SIGHUP: re-reads the config. The log level applies at once; preloads added since start (or
// the last reload) are loaded, removed ones unloaded unless attached. Every other key needs a
// restart. An invalid file is refused and the running configuration stays.
void Reload(const std::string& config_path, weightd::Registry& registry,
            std::vector<weightd::PreloadEntry>& preloads, const weightd::Peer& self) {
  using namespace weightd;
  if (config_path.empty()) {
    LogInfo("SIGHUP: no --config file to reload");
    return;
  }
  auto c = LoadConfigFile(config_path);
  absl::StatusOr<LogLevel> level = c.ok() ? ParseLogLevel(c->log_level) : c.status();
  if (!level.ok()) {
    LogError("SIGHUP: rejected %s, keeping the running configuration: %s", config_path,
             level.status().message());
    return;
  }
  InitLogging(*level);
  for (const std::string& w : c->warnings) LogWarning("SIGHUP: %s", w);
  auto listed = [](const std::vector<PreloadEntry>& v, const std::string& name) {
    return std::find_if(v.begin(), v.end(), [&](const PreloadEntry& p) { return p.name == name; });
  };
  int started = 0, unloaded = 0;
  for (const PreloadEntry& p : c->preload) {
    auto old = listed(preloads, p.name);
    if (old != preloads.end()) {
      if (LoadSpecToJson(old->spec) != LoadSpecToJson(p.spec)) {
        LogWarning("SIGHUP: preload %s changed; unload it to load the new options", p.name);
      }
      continue;
    }
    const absl::Status s = registry.StartLoad(p.name, p.spec, self);
    if (s.ok()) {
      ++started;
    } else {
      LogError("SIGHUP: preload %s: %s", p.name, s.message());
    }
  }
  std::vector<PreloadEntry> kept = c->preload;
  for (const PreloadEntry& p : preloads) {
    if (listed(c->preload, p.name) != c->preload.end()) continue;
    const absl::Status s = registry.Unload(p.name, /*force=*/false, self);
    if (s.ok() || absl::IsNotFound(s)) {
      ++unloaded;
    } else {
      LogWarning("SIGHUP: %s left the preload list but stays loaded: %s", p.name, s.message());
      kept.push_back(p);  // retried at the next SIGHUP
    }
  }
  preloads = std::move(kept);
  LogInfo(
      "SIGHUP: reloaded %s: log level %s, %d preloads started, %d unloaded (other keys "
      "apply at the next start)",
      config_path, c->log_level, started, unloaded);
}

#if WEIGHTD_HAVE_SYSTEMD
// Socket activation (systemd/weightd.socket): serves the SEQPACKET socket systemd passes,
// preferring the one named "control". Every other fd comes from our fd store: the models of the
// previous run, re-adopted here.
void AdoptFromSystemd(weightd::Registry& registry, weightd::ServerOptions& so,
                      const std::string& socket_path, absl::Time t_start) {
  using namespace weightd;
  char** names = nullptr;
  const int n = sd_listen_fds_with_names(/*unset_environment=*/1, &names);
  std::vector<NamedFd> stored;
  for (int i = 0; i < n; ++i) {
    const int fd = SD_LISTEN_FDS_START + i;
    const std::string name = names != nullptr && names[i] != nullptr ? names[i] : "";
    const bool listening = sd_is_socket_unix(fd, SOCK_SEQPACKET, /*listening=*/1, nullptr, 0) > 0;
    if (listening && (so.adopted_listen_fd < 0 || name == kListenerFdName)) {
      if (so.adopted_listen_fd >= 0) ::close(so.adopted_listen_fd);
      so.adopted_listen_fd = fd;
    } else if (listening && name != kListenerFdName && name.rfind("wd1.", 0) != 0) {
      LogWarning("ignoring a second listening socket from systemd (fd %d, name '%s')", fd, name);
      ::close(fd);
    } else {
      ::fcntl(fd, F_SETFD, FD_CLOEXEC);
      stored.push_back({name, UniqueFd(fd)});
    }
  }
  if (n > 0 && so.adopted_listen_fd < 0) {
    LogWarning("systemd passed %d fds but none is a listening SOCK_SEQPACKET socket; binding %s",
               n, socket_path);
  }
  if (names != nullptr) {
    for (int i = 0; i < n; ++i) free(names[i]);
    free(names);
  }
  if (!stored.empty()) {
    const size_t count = stored.size();
    SortedFds sorted = SortNamedFds(std::move(stored));
    AdoptAll(sorted, registry, "fdstore");
    LogInfo("fd store: %zu fds from systemd, %zu models re-adopted in %.3f s", count,
            registry.ModelNames().size(), absl::ToDoubleSeconds(absl::Now() - t_start));
  }
}

// Keeps every ready model in systemd's fd store, and pings the watchdog from the event loop at
// half its interval, so that a wedged loop is noticed and restarted.
void HookSystemd(weightd::Registry& registry, weightd::ServerOptions& so) {
  registry.SetHooks({.on_ready = [](std::vector<weightd::NamedFd> fds) { StoreFds(fds); },
                     .on_removed = [](std::vector<std::string> n) { RemoveStoredFds(n); }});
  uint64_t watchdog_usec = 0;
  if (sd_watchdog_enabled(/*unset_environment=*/0, &watchdog_usec) > 0 && watchdog_usec > 0) {
    const absl::Duration half = absl::Microseconds(watchdog_usec / 2);
    auto last = std::make_shared<absl::Time>(absl::InfinitePast());
    so.on_tick = [half, last] {
      const absl::Time now = absl::Now();
      if (now - *last >= half) {
        sd_notify(0, "WATCHDOG=1");
        *last = now;
      }
    };
  }
}
#endif

// --takeover / --takeover-if-running, first half: the running daemon hands over its models
// (adopted here) and its listening socket (into `so`), and stops accepting; connections arriving
// meanwhile wait in the socket's backlog. Returns the connection to confirm on once this
// daemon's server exists, or an empty fd when there is nothing to take over; sets `takeover` to
// whether a takeover happens.
absl::StatusOr<weightd::UniqueFd> TakeOverPredecessor(const std::string& socket_path,
                                                      bool if_running, bool& takeover,
                                                      weightd::Registry& registry,
                                                      weightd::ServerOptions& so,
                                                      absl::Time t_start) {
  using namespace weightd;
  UniqueFd sock;
  if (if_running && !takeover) {
    // A stale socket file (its daemon died) refuses the connection: start without a
    // predecessor, replacing it.
    if (so.adopted_listen_fd >= 0) {
      LogInfo("takeover: systemd passed the socket; starting without a takeover");
    } else if (auto s = ConnectSeqpacket(socket_path); s.ok()) {
      LogInfo("takeover: a daemon answers on %s; taking it over", socket_path);
      takeover = true;
      sock = std::move(*s);
    } else {
      LogInfo("takeover: no daemon answers on %s (%s); starting without one", socket_path,
              s.status().message());
    }
  }
  if (!takeover) return UniqueFd();
  if (so.adopted_listen_fd >= 0) {
    return absl::FailedPreconditionError("--takeover with a socket passed by systemd");
  }
  if (!sock) {
    auto s = ConnectSeqpacket(socket_path);
    if (!s.ok()) {
      return absl::UnavailableError(absl::StrCat("takeover: no daemon to take over on ",
                                                 socket_path, ": ", s.status().message()));
    }
    sock = std::move(*s);
  }
  auto fds = RequestTakeover(sock.get());
  if (!fds.ok()) {
    return absl::Status(fds.status().code(),
                        absl::StrCat("takeover failed: ", fds.status().message()));
  }
  const size_t count = fds->size();
  SortedFds sorted = SortNamedFds(std::move(*fds));
  if (!sorted.listener) {
    return absl::FailedPreconditionError(
        "takeover failed: the running daemon sent no listening socket");
  }
  AdoptAll(sorted, registry, "takeover");
  so.adopted_listen_fd = sorted.listener.Release();
  LogInfo("takeover: received %zu fds, %zu models adopted in %.3f s", count,
          registry.ModelNames().size(), absl::ToDoubleSeconds(absl::Now() - t_start));
  return sock;
}

void ApplyServerConfig(const weightd::DaemonConfig& config, weightd::ServerOptions& so) {
  so.socket_path = config.socket;
  so.socket_mode = config.socket_mode;
  so.max_connections = config.max_connections;
  so.max_connections_per_uid = config.max_connections_per_uid;
  so.max_request_bytes = config.max_request_bytes;
  so.hello_timeout = absl::Milliseconds(config.hello_timeout_ms);
  so.metrics_listen = config.metrics_listen;
}

// Starts the config's preloads, except the models adopted from a predecessor or the fd store.
void StartPreloads(weightd::Registry& registry, const std::vector<weightd::PreloadEntry>& preloads,
                   const weightd::Peer& self) {
  using namespace weightd;
  const std::vector<std::string> have = registry.ModelNames();
  for (const PreloadEntry& p : preloads) {
    if (std::find(have.begin(), have.end(), p.name) != have.end()) {
      LogInfo("preload %s: kept the adopted model", p.name);
      continue;
    }
    const absl::Status s = registry.StartLoad(p.name, p.spec, self);
    if (!s.ok()) LogError("preload %s: %s", p.name, s.message());
  }
}

// What the daemon's helper threads share with main.
struct RunState {
  std::atomic<bool> run_ended{false};   // Run() returned on its own (an error, a handover)
  std::atomic<bool> stop_asked{false};  // SIGINT/SIGTERM stopped it
  std::atomic<bool> handed_over{false}; // the models are a successor's now
  std::atomic<bool> ready{false};       // the preloads have ended: /readyz, READY=1
  absl::Notification stopping;          // the helper threads end
};

// Handles SIGHUP (reload) and SIGINT/SIGTERM (stop the server) for as long as the server runs.
// The signals are blocked in every thread (main blocks them first), so this one receives them.
std::thread StartSignalWaiter(sigset_t signals, weightd::Server* server,
                              const std::string& config_path, weightd::Registry& registry,
                              std::vector<weightd::PreloadEntry>& preloads,
                              const weightd::Peer& self, RunState& state) {
  return std::thread([signals, server, config_path, &registry, &preloads, self, &state] {
    using namespace weightd;
    for (;;) {
      int sig = 0;
      sigwait(&signals, &sig);
      if (sig == SIGHUP) {
        if (state.handed_over.load()) {
          LogInfo("SIGHUP: handed over to a successor; nothing to reload");
        } else {
          Reload(config_path, registry, preloads, self);
        }
        continue;
      }
      if (state.run_ended.load()) return;
      state.stop_asked.store(true);
      LogInfo("received %s; shutting down", sig == SIGINT ? "SIGINT" : "SIGTERM");
      Notify("STOPPING=1");
      server->Stop();
      return;
    }
  });
}

// Ready (/readyz; READY=1 under systemd) once the preloads have ended (the socket answers
// meanwhile), with their progress in STATUS= so `systemctl status weightd` shows it.
std::thread StartReadinessNotifier(weightd::Registry& registry, const weightd::Peer& self,
                                   RunState& state) {
  return std::thread([&registry, self, &state] {
    using namespace weightd;
    for (;;) {
      auto st = registry.Status("", self);
      uint64_t done = 0, total = 0;
      int loading = 0, adopted = 0;
      if (st.ok()) {
        for (const ModelStatus& m : *st) {
          for (const RankStatus& r : m.ranks) loading += r.state == RankState::kLoading;
          adopted += m.origin != "load";
          done += m.bytes_done;
          total += m.bytes_total;
        }
      }
      if (loading == 0) {
        state.ready.store(true);
        Notify(absl::StrCat("READY=1\nSTATUS=ready: ", st.ok() ? st->size() : 0, " models (",
                            adopted, " re-adopted without reading)"));
        return;
      }
      Notify(absl::StrCat("STATUS=preloading: ", FormatBytes(done), " of ", FormatBytes(total)));
      if (state.stopping.WaitForNotificationWithTimeout(absl::Seconds(1))) return;
    }
  });
}

// --watch-config: a change of the file's bytes raises SIGHUP, so the reload is SIGHUP's own.
// Polled, not inotify: Kubernetes updates a ConfigMap volume by swapping a symlink to a new
// directory, which a watch on the file (or on its directory) does not see as a write.
std::thread StartConfigWatcher(const std::string& config_path, std::string last,
                               RunState& state) {
  return std::thread([config_path, last = std::move(last), &state]() mutable {
    using namespace weightd;
    bool readable = true;
    while (!state.stopping.WaitForNotificationWithTimeout(kConfigWatchInterval)) {
      if (state.handed_over.load()) return;
      absl::StatusOr<std::string> now = ReadFileToString(config_path, 16 << 20);
      if (!now.ok()) {
        if (readable) {
          LogWarning("config watch: %s: %s; keeping the running configuration", config_path,
                     now.status().message());
        }
        readable = false;
        continue;
      }
      readable = true;
      if (*now == last) continue;
      last = std::move(*now);
      LogInfo("config watch: %s changed; reloading as on SIGHUP", config_path);
      ::kill(::getpid(), SIGHUP);
    }
  });
}

// Ends the running loads, so that their last lines come before "stopped". A load blocked in the
// kernel (a read from a hung network filesystem) cannot be cancelled: after the grace period the
// process exits without it instead of hanging the stop. Returns the exit status.
int FinishShutdown(weightd::Registry& registry, const absl::Status& run, bool handed_over) {
  using namespace weightd;
  const std::vector<std::string> stuck = registry.Shutdown(kShutdownGrace);
  if (!stuck.empty()) {
    LogError(
        "stopped: %zu loads did not stop within %s of being cancelled (%s), exiting "
        "without them",
        stuck.size(), absl::FormatDuration(kShutdownGrace), absl::StrJoin(stuck, ", "));
    std::fflush(stderr);
    ::_exit(run.ok() ? 0 : 1);
  }
  LogInfo("%s", handed_over ? "stopped: handed over to the successor" : "stopped");
  return run.ok() ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  using namespace weightd;
  Flags flags;
  if (std::optional<int> exit = ParseFlags(argc, argv, flags)) return *exit;
  DaemonConfig config;
  std::string config_text;
  if (std::optional<int> exit = EffectiveConfig(flags, config, config_text)) return *exit;
  if (flags.check_config) {
    for (const std::string& w : config.warnings) {
      std::fprintf(stderr, "weightd: warning: %s\n", w.c_str());
    }
    std::printf("weightd: %s: valid (%zu preloads)\n",
                flags.config_path.empty() ? "no config file" : flags.config_path.c_str(),
                config.preload.size());
    return 0;
  }
  InitLogging(*ParseLogLevel(config.log_level));
  for (const std::string& w : config.warnings) LogWarning("%s", w);
  const absl::Time t_start = absl::Now();

  // Block the signals handled below before any thread starts, so only the waiter receives them.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
  ::signal(SIGPIPE, SIG_IGN);

  const uint64_t nofile = RaiseFileLimit();
  std::string backend_reason;
  auto be = MakeBackend(config.backend,
                        {.device_memory_budget = config.device_memory_budget,
                         .host_memory_budget = config.host_memory_budget},
                        &backend_reason);
  if (!be.ok()) {
    LogError("start failed: %s", be.status().message());
    return 1;
  }
  LogInfo("start: %s", backend_reason);
  // Destroyed before the backend (reverse order of declaration), so every arena goes first;
  // CUDA contexts are shared by a backend and its arenas and released with the last of them
  // (cuda_backend.h), so this order is a convenience, not a requirement.
  Registry registry(be->get(), config);
  ServerOptions so;
  ApplyServerConfig(config, so);
#if WEIGHTD_HAVE_SYSTEMD
  AdoptFromSystemd(registry, so, config.socket, t_start);
  HookSystemd(registry, so);
#endif
  bool takeover = flags.takeover;
  auto takeover_sock = TakeOverPredecessor(config.socket, flags.takeover_if_running, takeover,
                                           registry, so, t_start);
  if (!takeover_sock.ok()) {
    LogError("start failed: %s", takeover_sock.status().message());
    return 1;
  }
  so.metrics_listen_takeover = takeover;
  so.linger_after_handover = flags.linger;
  RunState state;
  // After a handover the models are the successor's: SIGHUP (and --watch-config) leave them be.
  so.on_handed_over = [&state] { state.handed_over.store(true); };
  so.ready = [&state] { return state.ready.load(); };
  auto server = Server::Create(so, &registry);
  if (!server.ok()) {
    LogError("start failed: %s", server.status().message());
    return 1;
  }
  if (takeover) {
    const absl::Status s = ConfirmTakeover(takeover_sock->get());
    takeover_sock->Reset();
    if (!s.ok()) {
      // The socket file stays: it is the old daemon's until it confirms. Whether that one still
      // runs (it gave up waiting) or died meanwhile is not ours to tell from here.
      LogError(
          "takeover failed at the confirmation; the socket and the models stay with the old "
          "daemon, if it still runs: %s",
          s.message());
      return 1;
    }
    (*server)->ClaimSocketPath();
    LogNotice("takeover: confirmed; serving");
  }
  LogInfo("start: pid %d, backend %s, pinned budget %s, %d io threads, fd limit %llu", ::getpid(),
          std::string((*be)->name()), FormatBytes(config.pinned_budget), config.io_threads,
          static_cast<unsigned long long>(nofile));
  const Peer self{::getpid(), ::geteuid(), ::getegid()};
  std::vector<PreloadEntry> preloads = config.preload;
  StartPreloads(registry, preloads, self);

  Server* srv = server->get();
  std::thread waiter = StartSignalWaiter(stop_signals, srv, flags.config_path, registry,
                                         preloads, self, state);
  std::thread notifier = StartReadinessNotifier(registry, self, state);
  std::thread watcher;
  if (flags.watch_config) watcher = StartConfigWatcher(flags.config_path, config_text, state);

  const absl::Status run = srv->Run();
  const bool handed_over = srv->handed_over();
  if (!run.ok()) LogError("server failed: %s", run.message());
  if (!state.stop_asked.load()) {
    // Wake the waiter: Run() ended on its own (an error, or a handover).
    state.run_ended.store(true);
    ::kill(::getpid(), SIGTERM);
  }
  waiter.join();
  state.stopping.Notify();
  notifier.join();
  if (watcher.joinable()) watcher.join();
  server->reset();
  return FinishShutdown(registry, run, handed_over);
}
