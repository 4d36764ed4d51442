// Server: the daemon's socket front end (protocol v1, docs/PROTOCOL.md).
//
//   WD_ASSIGN_OR_RETURN(std::unique_ptr<Server> s, Server::Create(options, &registry));
//   std::thread stopper([&] { WaitForSignal(); s->Stop(); });
//   WD_RETURN_IF_ERROR(s->Run());   // returns after Stop()
//
// One thread runs an epoll loop over the listening socket and every connection (all
// non-blocking), so a client that never speaks, or stops reading, delays nobody. Connections
// that send no `hello` within hello_timeout are closed; beyond max_connections, or beyond
// max_connections_per_uid for its peer's uid, a new connection gets one RESOURCE_EXHAUSTED
// packet and is closed. When accept() fails for want of a file descriptor (RLIMIT_NOFILE),
// pending connections are shed: accepted through a descriptor held in reserve for this and
// closed at once (metric weightd_connections_shed_total); after any accept() failure the
// listener rests, 20 ms doubling up to 1 s while failures go on, so the loop never spins. Every
// request is answered (or the connection closed): oversized, truncated, non-JSON and malformed
// requests get INVALID_ARGUMENT/RESOURCE_EXHAUSTED replies; fds sent by a client are closed unread.
// Leases belong to their connection: when it closes (even by SIGKILL of the client) they are
// released.
//
// Takeover (docs/PROTOCOL.md): on `takeover` from the daemon's own uid the server stops calling
// accept(), freezes the registry and sends every model's fds and a duplicate of the listening
// socket; on `takeover_done` it answers, serves the connections it already has for
// handover_drain, and Run() returns with handed_over() true. If the successor's connection
// closes (or takeover_timeout passes) first, the server accepts again and the registry thaws.
//
// HTTP (optional, ServerOptions::metrics_listen; http_endpoint.h): the same loop serves
// GET /metrics (the `metrics` request's text, `text/plain; version=0.0.4`), /healthz (200 while
// the loop runs: liveness) and /readyz (200 once ServerOptions::ready says so, the condition of
// sd_notify READY=1; 503 before, and after a handover).
//
// Thread-safety: Run() on one thread; Stop() from any thread (also async-signal-safe);
// ClaimSocketPath() and metrics_address() before Run(); handed_over() after Run() returned.
#ifndef WEIGHTD_SERVER_H_
#define WEIGHTD_SERVER_H_

#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "weightd/registry.h"

namespace weightd {

struct ServerOptions {
  std::string socket_path;
  uint32_t socket_mode = 0660;
  // An already-listening SOCK_SEQPACKET socket to serve instead of binding socket_path (systemd
  // socket activation, or one received by `--takeover`); the Server takes ownership and leaves
  // the socket file alone unless ClaimSocketPath() is called.
  int adopted_listen_fd = -1;
  // How long a daemon that handed over to a successor keeps answering the connections it had
  // accepted before it exits.
  absl::Duration handover_drain = absl::Seconds(2);
  // How long the successor may take between `takeover` and `takeover_done` before the
  // takeover is aborted and this daemon accepts again.
  absl::Duration takeover_timeout = absl::Seconds(30);
  int max_connections = 1024;
  // Of max_connections, the most that peers of one uid may hold at once.
  int max_connections_per_uid = 256;
  size_t max_request_bytes = kDefaultMaxRequestBytes;
  absl::Duration hello_timeout = absl::Seconds(10);
  // Called from the event loop at least every 200 ms while it runs (the systemd watchdog ping
  // belongs here: it then proves the loop is alive). Must not block.
  std::function<void()> on_tick;
  // The HTTP listener's address (ParseListenAddress: "127.0.0.1:9464", "[::]:9464", a bare
  // port for loopback); empty = no HTTP listener. Errors name `metrics_listen`.
  std::string metrics_listen;
  // A `--takeover` successor: its predecessor may still listen on metrics_listen (both set
  // SO_REUSEPORT), so the check that nothing answers there is skipped.
  bool metrics_listen_takeover = false;
  // /readyz answers 200 once this returns true; null = at once. Called on the loop's thread;
  // must not block.
  std::function<bool()> ready;
  // After a handover, Run() does not return: it closes the remaining connections once drained
  // and keeps answering HTTP (/healthz 200, /readyz and /metrics 503) until Stop(), for
  // supervisors that restart a process that exits (a Kubernetes pod's container).
  bool linger_after_handover = false;
  // Called once, on the loop's thread, when a successor has confirmed the takeover (the models
  // and the socket are its from then on). Must not block.
  std::function<void()> on_handed_over;
};

class Server {
 public:
  // Binds and listens (a stale socket file of a dead daemon is replaced; a live daemon on the
  // path is FAILED_PRECONDITION). The parent directory is created (0755) when missing. With
  // adopted_listen_fd, serves that socket instead.
  static absl::StatusOr<std::unique_ptr<Server>> Create(const ServerOptions& options,
                                                        Registry* registry);
  ~Server();  // closes every connection and removes the socket file (unless adopted)

  absl::Status Run();
  void Stop();
  // True once Run() returned because a successor (`weightd --takeover`) took over: the socket
  // file and the models are the successor's now.
  bool handed_over() const;
  // Makes socket_path this server's to remove at exit although its listener was adopted: a
  // successor calls it once the old daemon has confirmed the takeover. Before that the file is
  // the old daemon's, which serves on if the takeover fails. Call before Run().
  void ClaimSocketPath();
  // The HTTP listener's bound address ("127.0.0.1:41234", with the kernel's port when 0 was
  // asked), or "" without one.
  std::string metrics_address() const;

 private:
  struct Impl;
  explicit Server(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Raises RLIMIT_NOFILE's soft limit to the hard limit; returns the new soft limit.
uint64_t RaiseFileLimit();

}  // namespace weightd

#endif  // WEIGHTD_SERVER_H_
