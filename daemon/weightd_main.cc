// weightd: the daemon. See `weightd --help`, docs/CONFIG.md and docs/PROTOCOL.md.
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "weightd/backend.h"
#include "weightd/config.h"
#include "weightd/log.h"
#include "weightd/registry.h"
#include "weightd/seqpacket.h"
#include "weightd/server.h"
#include "weightd/status_macros.h"

#if WEIGHTD_HAVE_SYSTEMD
#include <systemd/sd-daemon.h>
#endif

namespace {

constexpr char kHelp[] =
    "usage: weightd [--config FILE] [--socket PATH] [--backend auto|cuda|host]\n"
    "               [--pinned-budget BYTES] [--log-level LEVEL]\n"
    "\n"
    "Keeps model weights resident in memory in each rank's layout and lends them to worker\n"
    "processes over a Unix socket (weightctl, libweightd_client).\n"
    "\n"
    "options (each overrides the config file's key of the same meaning):\n"
    "  --config FILE         JSON configuration (docs/CONFIG.md lists every key)\n"
    "  --socket PATH         listening socket (default: /run/weightd/weightd.sock for root,\n"
    "                        else $XDG_RUNTIME_DIR/weightd.sock)\n"
    "  --backend KIND        auto (default: cuda when built and a GPU is present, else host),\n"
    "                        cuda, or host (sealed memfds in RAM)\n"
    "  --pinned-budget BYTES staging memory per load, e.g. 1GiB (default 1 GiB)\n"
    "  --log-level LEVEL     error, warning, notice, info (default) or debug\n"
    "  -h, --help            this text\n"
    "\n"
    "Stops on SIGINT/SIGTERM; SIGHUP reloads the config's log level. Logs one line per event\n"
    "to stderr (journald priorities when stderr is the journal). Under systemd: serves the\n"
    "socket of weightd.socket when socket-activated, sends READY=1 once the config's preloads\n"
    "have ended (STATUS= shows their progress) and pings the watchdog from its event loop.\n"
    "\n"
    "example:\n"
    "  weightd --socket /tmp/weightd.sock --backend host &\n"
    "  weightctl load llama /models/Llama-3-8B --tp 2 --socket /tmp/weightd.sock\n";

int Usage(const std::string& message) {
  std::fprintf(stderr, "weightd: %s\nRun 'weightd --help' for usage.\n", message.c_str());
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  using namespace weightd;
  std::string config_path, socket, backend, budget, log_level;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "-h" || a == "--help") {
      std::fputs(kHelp, stdout);
      return 0;
    }
    std::string value;
    const size_t eq = a.find('=');
    if (a.rfind("--", 0) == 0 && eq != std::string::npos) {
      value = a.substr(eq + 1);
      a = a.substr(0, eq);
    } else if (i + 1 < argc) {
      value = argv[i + 1];
      if (a == "--config" || a == "--socket" || a == "--backend" || a == "--pinned-budget" ||
          a == "--log-level") {
        ++i;
      }
    } else if (a == "--config" || a == "--socket" || a == "--backend" || a == "--pinned-budget" ||
               a == "--log-level") {
      return Usage(absl::StrCat("option ", a, " needs a value"));
    }
    if (a == "--config")
      config_path = value;
    else if (a == "--socket")
      socket = value;
    else if (a == "--backend")
      backend = value;
    else if (a == "--pinned-budget")
      budget = value;
    else if (a == "--log-level")
      log_level = value;
    else
      return Usage(absl::StrCat("unknown option '", argv[i], "'"));
  }

  DaemonConfig config;
  if (!config_path.empty()) {
    auto c = LoadConfigFile(config_path);
    if (!c.ok()) {
      std::fprintf(stderr, "weightd: %s\n", std::string(c.status().message()).c_str());
      return 1;
    }
    config = std::move(*c);
  }
  if (!socket.empty()) config.socket = socket;
  if (!backend.empty()) config.backend = backend;
  if (!log_level.empty()) config.log_level = log_level;
  if (!budget.empty()) {
    auto b = ParseByteSize(budget, "--pinned-budget");
    if (!b.ok()) return Usage(std::string(b.status().message()));
    config.pinned_budget = *b;
  }
  if (config.socket.empty()) config.socket = DefaultDaemonSocketPath();
  auto level = ParseLogLevel(config.log_level);
  if (!level.ok()) return Usage(std::string(level.status().message()));
  InitLogging(*level);

  // Block the signals handled below before any thread starts, so only the waiter receives them.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
  ::signal(SIGPIPE, SIG_IGN);

  const uint64_t nofile = RaiseFileLimit();
  auto be = MakeBackend(config.backend);
  if (!be.ok()) {
    LogError("start failed: %s", be.status().message());
    return 1;
  }
  Registry registry(be->get(), config);
  ServerOptions so;
  so.socket_path = config.socket;
#if WEIGHTD_HAVE_SYSTEMD
  // Socket activation (systemd/weightd.socket): serve the SEQPACKET socket systemd passes,
  // preferring the one named "control".
  {
    char** names = nullptr;
    const int n = sd_listen_fds_with_names(/*unset_environment=*/1, &names);
    for (int i = 0; i < n; ++i) {
      const int fd = SD_LISTEN_FDS_START + i;
      const bool named = names != nullptr && std::strcmp(names[i], "control") == 0;
      if (sd_is_socket_unix(fd, SOCK_SEQPACKET, /*listening=*/1, nullptr, 0) > 0 &&
          (so.adopted_listen_fd < 0 || named)) {
        so.adopted_listen_fd = fd;
      }
    }
    if (n > 0 && so.adopted_listen_fd < 0) {
      LogWarning("systemd passed %d fds but none is a listening SOCK_SEQPACKET socket; binding %s",
                 n, config.socket);
    } else if (n > 1) {
      LogWarning("ignoring %d other fds passed by systemd (fd store adoption is not implemented)",
                 n - 1);
    }
    if (names != nullptr) {
      for (int i = 0; i < n; ++i) free(names[i]);
      free(names);
    }
  }
  // The watchdog is pinged from the event loop, at half the interval, so a wedged loop is
  // noticed and restarted.
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
#endif
  so.socket_mode = config.socket_mode;
  so.max_connections = config.max_connections;
  so.max_request_bytes = config.max_request_bytes;
  so.hello_timeout = absl::Milliseconds(config.hello_timeout_ms);
  auto server = Server::Create(so, &registry);
  if (!server.ok()) {
    LogError("start failed: %s", server.status().message());
    return 1;
  }
  LogInfo("start: pid %d, backend %s, pinned budget %s, %d io threads, fd limit %llu", ::getpid(),
          std::string((*be)->name()), FormatBytes(config.pinned_budget), config.io_threads,
          static_cast<unsigned long long>(nofile));
  const Peer self{::getpid(), ::geteuid(), ::getegid()};
  for (const PreloadEntry& p : config.preload) {
    const absl::Status s = registry.StartLoad(p.name, p.spec, self);
    if (!s.ok()) LogError("preload %s: %s", p.name, s.message());
  }
  Server* srv = server->get();
  std::thread waiter([srv, stop_signals, config_path] {
    for (;;) {
      int sig = 0;
      sigwait(&stop_signals, &sig);
      if (sig == SIGHUP) {
        // Reload: the log level applies at once; every other key needs a restart.
        if (config_path.empty()) {
          LogInfo("SIGHUP: no --config file to reload");
          continue;
        }
        auto c = LoadConfigFile(config_path);
        auto level = c.ok() ? ParseLogLevel(c->log_level) : c.status();
        if (!level.ok()) {
          LogError("SIGHUP: reload of %s failed: %s", config_path, level.status().message());
          continue;
        }
        InitLogging(*level);
        LogInfo("SIGHUP: log level %s from %s (other keys apply at the next start)", c->log_level,
                config_path);
        continue;
      }
      LogInfo("received %s; shutting down", sig == SIGINT ? "SIGINT" : "SIGTERM");
#if WEIGHTD_HAVE_SYSTEMD
      sd_notify(0, "STOPPING=1");
#endif
      srv->Stop();
      return;
    }
  });
#if WEIGHTD_HAVE_SYSTEMD
  // READY=1 once the preloads have ended (the socket answers meanwhile), with their progress
  // in STATUS= so `systemctl status weightd` shows it.
  absl::Notification stopping;
  std::thread notifier([&registry, &stopping, self] {
    for (;;) {
      auto st = registry.Status("", self);
      uint64_t done = 0, total = 0;
      int loading = 0;
      if (st.ok()) {
        for (const ModelStatus& m : *st) {
          for (const RankStatus& r : m.ranks) loading += r.state == RankState::kLoading;
          done += m.bytes_done;
          total += m.bytes_total;
        }
      }
      if (loading == 0) {
        sd_notifyf(0, "READY=1\nSTATUS=ready: %zu models", st.ok() ? st->size() : 0);
        return;
      }
      sd_notifyf(0, "STATUS=preloading: %s of %s", FormatBytes(done).c_str(),
                 FormatBytes(total).c_str());
      if (stopping.WaitForNotificationWithTimeout(absl::Seconds(1))) return;
    }
  });
#endif
  const absl::Status run = srv->Run();
  // Wake the waiter if Run() ended on its own.
  if (!run.ok()) {
    LogError("server failed: %s", run.message());
    ::kill(::getpid(), SIGTERM);
  }
  waiter.join();
#if WEIGHTD_HAVE_SYSTEMD
  stopping.Notify();
  notifier.join();
#endif
  server->reset();
  LogInfo("stopped");
  return run.ok() ? 0 : 1;
}
