#include "weightd/server.h"

#include <fcntl.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <deque>
#include <map>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "nlohmann/json.hpp"
#include "weightd/detail/metrics_text.h"
#include "weightd/handoff.h"
#include "weightd/http_endpoint.h"
#include "weightd/log.h"
#include "weightd/protocol.h"
#include "weightd/seqpacket.h"
#include "weightd/status_macros.h"
#include "weightd/version.h"

namespace weightd {
namespace {

// The peer's supplementary groups as the kernel recorded them at connect(). An empty list when
// the kernel cannot say (pre-4.13); authorization then falls back to uid and primary gid.
std::vector<gid_t> PeerGroups(int fd) {
  std::vector<gid_t> groups(64);
  for (int attempt = 0; attempt < 2; ++attempt) {
    socklen_t len = static_cast<socklen_t>(groups.size() * sizeof(gid_t));
    if (::getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS, groups.data(), &len) == 0) {
      groups.resize(len / sizeof(gid_t));
      return groups;
    }
    if (errno != ERANGE) break;
    groups.resize(len / sizeof(gid_t) + 1);
  }
  return {};
}

using json = nlohmann::json;

constexpr int kSendBufferBytes = 8 << 20;
constexpr size_t kMaxQueuedReplies = 256;
constexpr int kPacketsPerWakeup = 16;
// After accept() fails for want of a descriptor (or any other reason), the listening socket is
// left out of the epoll set for a while, doubling from the first to the last value while the
// failures go on, so a full fd table cannot make the loop spin.
constexpr absl::Duration kAcceptPauseFirst = absl::Milliseconds(20);
constexpr absl::Duration kAcceptPauseMax = absl::Seconds(1);
// epoll data of the registry's event fd (the wake-up eventfd is ~0, connections count from 1).
constexpr uint64_t kRegistryEvent = ~0ull - 1;
// Most pending connections shed in one wakeup; the rest wait for the next.
constexpr int kMaxShedPerWakeup = 256;
// /readyz and /metrics of a daemon that handed over and lingers (linger_after_handover).
constexpr char kHandedOverText[] =
    "weightd handed over to a successor; this process serves nothing\n";

struct Outgoing {
  std::string data;
  std::vector<UniqueFd> fds;
};

// A request answered later: wait_generation, or update with `wait`. While one is pending the
// connection's further requests stay unread (replies go in request order).
struct Pending {
  Op op = Op::kWaitGeneration;
  std::string id_json;
  std::string name;
  uint64_t after = 0;                             // wait_generation
  absl::Time deadline = absl::InfiniteFuture();  // wait_generation
  uint64_t update = 0;                            // update: its id
};

struct Connection {
  uint64_t id = 0;
  UniqueFd fd;
  Peer peer;
  bool hello = false;
  std::string client;
  absl::Time accepted;
  std::deque<Outgoing> out;
  uint32_t events = EPOLLIN | EPOLLRDHUP;  // as registered with epoll
  std::optional<Pending> pending;
};

std::string OkReply(absl::string_view id_json, json result) {
  json j;
  j["ok"] = true;
  json id = json::parse(id_json.begin(), id_json.end(), nullptr, false);
  j["id"] = id.is_discarded() ? json(nullptr) : id;
  j["result"] = std::move(result);
  return j.dump(-1, ' ', false, json::error_handler_t::replace);
}

RankState Summary(const ModelStatus& m) {
  bool any_loading = false, any_unloading = false;
  for (const RankStatus& r : m.ranks) {
    if (r.state == RankState::kFailed) return RankState::kFailed;
    any_loading |= r.state == RankState::kLoading;
    any_unloading |= r.state == RankState::kUnloading;
  }
  if (any_unloading) return RankState::kUnloading;
  if (any_loading) return RankState::kLoading;
  return RankState::kReady;
}

json StatusJson(const ModelStatus& m) {
  json j;
  j["name"] = m.name;
  j["state"] = std::string(RankStateName(Summary(m)));
  j["checkpoint"] = m.checkpoint;
  j["backend"] = m.backend;
  j["tp"] = m.tp;
  if (!m.error.empty()) j["error"] = m.error;
  j["bytes_total"] = m.bytes_total;
  j["bytes_done"] = m.bytes_done;
  j["seconds"] = m.load_seconds;
  j["started_unix"] = m.started_unix;
  j["origin"] = m.origin;
  j["generation"] = m.generation;
  j["previous_generation"] = m.previous_generation;
  if (m.update) {
    json u;
    u["state"] = m.update->state;
    u["generation"] = m.update->generation;
    u["bytes_total"] = m.update->bytes_total;
    u["bytes_done"] = m.update->bytes_done;
    u["seconds"] = m.update->seconds;
    if (!m.update->error.empty()) u["error"] = m.update->error;
    j["update"] = std::move(u);
  }
  json ranks = json::array();
  for (const RankStatus& r : m.ranks) {
    json jr;
    jr["rank"] = r.rank;
    jr["device"] = r.device;
    jr["state"] = std::string(RankStateName(r.state));
    jr["arena_bytes"] = r.arena_bytes;
    jr["arenas"] = r.arenas;
    jr["tensors"] = r.tensors;
    jr["lease_count"] = r.lease_count;
    json leases = json::array();
    for (const LeaseInfo& li : r.leases) {
      leases.push_back({{"lease", li.id},
                        {"pid", li.peer.pid},
                        {"uid", li.peer.uid},
                        {"generation", li.generation}});
    }
    jr["leases"] = std::move(leases);
    ranks.push_back(std::move(jr));
  }
  j["ranks"] = std::move(ranks);
  return j;
}

}  // namespace

struct Server::Impl {
  ServerOptions options;
  Registry* registry = nullptr;
  UniqueFd listen_fd;
  UniqueFd epoll_fd;
  UniqueFd wake_fd;  // eventfd written by Stop()
  // The optional HTTP listener; after epoll_fd, so that it is destroyed first.
  std::unique_ptr<HttpEndpoint> http;
  // /dev/null, held so that one descriptor is free when the table is full: closed to accept
  // (and at once close) a connection that would otherwise wait in the backlog (ShedBacklog).
  UniqueFd reserve_fd;
  std::map<uint64_t, Connection> conns;  // owned by the Run() thread only
  std::map<uid_t, int> conns_per_uid;    // of conns
  uint64_t next_id = 1;
  std::atomic<bool> stop{false};
  // Connections refused at the cap, kept open briefly: closing a unix socket with unread data
  // (the client's hello) resets the peer before it can read the refusal.
  std::deque<std::pair<UniqueFd, absl::Time>> refused;
  uint64_t requests_total = 0, errors_total = 0, refused_total = 0, shed_total = 0;
  // Takeover state (docs/PROTOCOL.md "takeover").
  bool accepting = true;
  // accept() back-off: the listener is out of the epoll set until accept_resume.
  bool accept_paused = false;
  absl::Time accept_resume;
  absl::Duration accept_pause = kAcceptPauseFirst;
  bool listener_in_epoll = true;
  uint64_t takeover_conn = 0;  // the successor's connection while a takeover is in progress
  absl::Time takeover_deadline;
  bool handed_over = false;
  absl::Time drain_deadline;
  // linger_after_handover: the drain ended, only HTTP is served until Stop().
  bool lingering = false;
  bool claimed_path = false;  // ClaimSocketPath(): an adopted listener's socket file is ours

  void StartTakeover(Connection& c, const Request& r);
  void AbortTakeover(absl::string_view why);
  void SetAccepting(bool on);
  // Adds or removes the listener from the epoll set: it is watched while accepting and not
  // paused.
  void UpdateListener();
  void PauseAccepting(absl::string_view why, int err);
  // Accepts and closes pending connections through the reserved descriptor; returns how many.
  int ShedBacklog();

  void Accept();
  // Sends `why` as the connection's only packet and keeps it open briefly (see `refused`).
  void Refuse(UniqueFd fd, const absl::Status& why);
  void Close(uint64_t id, absl::string_view why);
  void OnReadable(Connection& c);
  void Flush(Connection& c);
  void Queue(Connection& c, std::string data, std::vector<UniqueFd> fds = {});
  // Answers request `r` (or makes it pending); an error becomes the error reply. `fd`: the one
  // descriptor an `update` request may carry (else empty).
  void Handle(Connection& c, const Request& r, UniqueFd fd = UniqueFd());
  absl::Status Dispatch(Connection& c, const Request& r, UniqueFd fd);
  // One per request kind (docs/PROTOCOL.md): each queues its reply, or returns the error.
  absl::Status OnHello(Connection& c, const Request& r);
  absl::Status OnStatus(Connection& c, const Request& r);
  absl::Status OnLoad(Connection& c, const Request& r);
  absl::Status OnAttach(Connection& c, const Request& r);
  absl::Status OnDetach(Connection& c, const Request& r);
  absl::Status OnUnload(Connection& c, const Request& r);
  absl::Status OnUpdate(Connection& c, const Request& r, UniqueFd fd);
  absl::Status OnRollback(Connection& c, const Request& r);
  absl::Status OnRefresh(Connection& c, const Request& r);
  absl::Status OnTakeoverDone(Connection& c, const Request& r);
  // Queues an attach (or refresh) reply with the grant's fds and continuation packets.
  void QueueGrant(Connection& c, const Request& r, AttachGrant& g);
  // Answers c's pending request if it can be answered now; true when it was.
  bool Resolve(Connection& c);
  // Resolve() for every connection with a pending request (the registry's event, timeouts).
  void ResolvePending();
  std::string Metrics();
  // The HTTP routes (ServerOptions::metrics_listen).
  HttpEndpoint::Routes HttpRoutes();
  void UpdateInterest(Connection& c);
  absl::Status Bind();
  static void Drain(int fd) {
    for (int i = 0; i < 64; ++i) {
      auto p = RecvPacket(fd, 256);
      if (!p.ok() || p->would_block || p->eof) return;
    }
  }
};

uint64_t RaiseFileLimit() {
  rlimit rl{};
  if (::getrlimit(RLIMIT_NOFILE, &rl) != 0) return 0;
  if (rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    ::setrlimit(RLIMIT_NOFILE, &rl);
  }
  return rl.rlim_cur;
}

absl::Status Server::Impl::Bind() {
  const std::string& path = options.socket_path;
  if (path.empty()) {
    return absl::InvalidArgumentError(
        "no socket path: pass --socket, set 'socket' in the config, or set XDG_RUNTIME_DIR");
  }
  WD_ASSIGN_OR_RETURN(sockaddr_un addr, UnixAddress(path));
  if (const size_t slash = path.rfind('/'); slash != std::string::npos && slash > 0) {
    const std::string dir = path.substr(0, slash);
    if (::mkdir(dir.c_str(), 0755) != 0 && errno != EEXIST) {
      return ErrnoError(errno, absl::StrCat("creating the socket directory ", dir));
    }
  }
  struct stat st;
  if (::lstat(path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode)) {
      return absl::FailedPreconditionError(
          absl::StrCat("'", path, "' exists and is not a socket; refusing to replace it"));
    }
    if (ConnectSeqpacket(path).ok()) {
      return absl::FailedPreconditionError(
          absl::StrCat("another weightd is already listening on ", path));
    }
    ::unlink(path.c_str());
  }
  listen_fd = UniqueFd(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!listen_fd) return ErrnoError(errno, "socket(AF_UNIX, SOCK_SEQPACKET)");
  // A restrictive umask while binding: the socket file never exists with looser permissions
  // than socket_mode, not even between bind and chmod.
  const mode_t old_umask = ::umask(0177);
  const int bound = ::bind(listen_fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  const int bind_errno = errno;
  ::umask(old_umask);
  if (bound != 0) return ErrnoError(bind_errno, absl::StrCat("bind to ", path));
  WD_SYSCALL_OR_RETURN(::chmod(path.c_str(), options.socket_mode), absl::StrCat("chmod of ", path));
  WD_SYSCALL_OR_RETURN(::listen(listen_fd.get(), 4096), absl::StrCat("listen on ", path));
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Server>> Server::Create(const ServerOptions& options,
                                                       Registry* registry) {
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  impl->registry = registry;
  if (options.adopted_listen_fd >= 0) {
    impl->listen_fd = UniqueFd(options.adopted_listen_fd);
    const int flags = ::fcntl(impl->listen_fd.get(), F_GETFL);
    if (flags < 0 || ::fcntl(impl->listen_fd.get(), F_SETFL, flags | O_NONBLOCK) != 0) {
      return ErrnoError(errno, "making the socket-activated listener non-blocking");
    }
    ::fcntl(impl->listen_fd.get(), F_SETFD, FD_CLOEXEC);
  } else {
    WD_RETURN_IF_ERROR(impl->Bind());
  }
  impl->reserve_fd = UniqueFd(::open("/dev/null", O_RDONLY | O_CLOEXEC));
  if (!impl->reserve_fd) return ErrnoError(errno, "opening /dev/null (the reserved descriptor)");
  impl->epoll_fd = UniqueFd(::epoll_create1(EPOLL_CLOEXEC));
  if (!impl->epoll_fd) return ErrnoError(errno, "epoll_create1");
  impl->wake_fd = UniqueFd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!impl->wake_fd) return ErrnoError(errno, "eventfd");
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.u64 = 0;  // listening socket
  WD_SYSCALL_OR_RETURN(::epoll_ctl(impl->epoll_fd.get(), EPOLL_CTL_ADD, impl->listen_fd.get(), &ev),
                       "epoll_ctl");
  ev.data.u64 = ~0ull;  // wake-up
  epoll_event reg{};
  reg.events = EPOLLIN;
  reg.data.u64 = kRegistryEvent;
  WD_SYSCALL_OR_RETURN(
      ::epoll_ctl(impl->epoll_fd.get(), EPOLL_CTL_ADD, registry->event_fd(), &reg),
      "epoll_ctl(registry events)");
  WD_SYSCALL_OR_RETURN(::epoll_ctl(impl->epoll_fd.get(), EPOLL_CTL_ADD, impl->wake_fd.get(), &ev),
                       "epoll_ctl");
  if (!options.metrics_listen.empty()) {
    absl::StatusOr<ListenAddress> address =
        ParseListenAddress(options.metrics_listen, "metrics_listen");
    absl::StatusOr<std::unique_ptr<HttpEndpoint>> http =
        address.ok() ? HttpEndpoint::Create(
                           {.address = *address, .check_in_use = !options.metrics_listen_takeover},
                           impl->epoll_fd.get(), impl->HttpRoutes())
                     : address.status();
    if (!http.ok()) {
      // The socket file bound above is ours: a daemon that does not start leaves none behind.
      if (options.adopted_listen_fd < 0) ::unlink(options.socket_path.c_str());
      return http.status();
    }
    impl->http = std::move(*http);
  }
  return std::unique_ptr<Server>(new Server(std::move(impl)));
}

Server::Server(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Server::~Server() {
  for (auto& [id, c] : impl_->conns) impl_->registry->ReleaseConnection(id);
  impl_->conns.clear();
  // A socket-activated listener belongs to systemd, which may pass it to our successor; a
  // received one is ours once the takeover is confirmed (ClaimSocketPath); after we handed over
  // the socket file is the successor's.
  const bool owns_path = impl_->options.adopted_listen_fd < 0 || impl_->claimed_path;
  if (owns_path && !impl_->handed_over && !impl_->options.socket_path.empty()) {
    ::unlink(impl_->options.socket_path.c_str());
  }
}

bool Server::handed_over() const { return impl_->handed_over; }

void Server::ClaimSocketPath() { impl_->claimed_path = true; }

std::string Server::metrics_address() const {
  return impl_->http ? impl_->http->address().ToString() : std::string();
}

HttpEndpoint::Routes Server::Impl::HttpRoutes() {
  HttpEndpoint::Routes routes;
  routes["/metrics"] = [this]() -> HttpResponse {
    if (handed_over) return {503, kHandedOverText};
    return {200, Metrics(), "text/plain; version=0.0.4; charset=utf-8"};
  };
  // Answered by the event loop itself: a wedged loop does not answer (liveness).
  routes["/healthz"] = [] { return HttpResponse{200, "ok\n"}; };
  routes["/readyz"] = [this]() -> HttpResponse {
    if (handed_over) return {503, kHandedOverText};
    if (options.ready && !options.ready()) return {503, "not ready: preloads are loading\n"};
    return {200, "ready\n"};
  };
  return routes;
}

void Server::Impl::SetAccepting(bool on) {
  accepting = on;
  UpdateListener();
}

void Server::Impl::UpdateListener() {
  const bool want = accepting && !accept_paused;
  if (want == listener_in_epoll) return;
  if (want) {
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u64 = 0;
    if (::epoll_ctl(epoll_fd.get(), EPOLL_CTL_ADD, listen_fd.get(), &ev) != 0) {
      WD_LOG_LIMITED(LogLevel::kError, "epoll_ctl re-adding the listening socket failed: %s",
                     std::strerror(errno));
      return;
    }
  } else {
    ::epoll_ctl(epoll_fd.get(), EPOLL_CTL_DEL, listen_fd.get(), nullptr);
  }
  listener_in_epoll = want;
}

int Server::Impl::ShedBacklog() {
  int shed = 0;
  while (shed < kMaxShedPerWakeup) {
    if (!reserve_fd) {
      // Another thread (a load opening its checkpoint) may hold the slot it left.
      reserve_fd = UniqueFd(::open("/dev/null", O_RDONLY | O_CLOEXEC));
      if (!reserve_fd) break;
    }
    reserve_fd.Reset();
    UniqueFd fd(::accept4(listen_fd.get(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC));
    const bool accepted = static_cast<bool>(fd);
    if (accepted) {
      // Usually lost: a peer that already sent its hello sees the connection reset instead.
      (void)SendPacket(
          fd.get(), EncodeErrorReply("null", absl::ResourceExhaustedError(
                                                 "weightd has no file descriptor left for "
                                                 "this connection (RLIMIT_NOFILE); retry later")));
      fd.Reset();
      ++shed;
    }
    reserve_fd = UniqueFd(::open("/dev/null", O_RDONLY | O_CLOEXEC));
    if (!accepted) break;  // the backlog is empty, or the slot was taken before accept4
  }
  shed_total += shed;
  return shed;
}

void Server::Impl::PauseAccepting(absl::string_view why, int err) {
  int shed = 0;
  if (err == EMFILE || err == ENFILE) shed = ShedBacklog();
  WD_LOG_LIMITED(LogLevel::kWarning,
                 "accept failed: %s (%s); %d pending connections shed, %zu open; not accepting "
                 "for %.0f ms",
                 std::strerror(err), std::string(why), shed, conns.size(),
                 absl::ToDoubleMilliseconds(accept_pause));
  accept_paused = true;
  accept_resume = absl::Now() + accept_pause;
  accept_pause = std::min(accept_pause * 2, kAcceptPauseMax);
  UpdateListener();
}

void Server::Impl::StartTakeover(Connection& c, const Request& r) {
  auto fail = [&](const absl::Status& s) {
    ++errors_total;
    WD_LOG_LIMITED(LogLevel::kWarning, "takeover: refused for pid %d uid %u: %s", c.peer.pid,
                   c.peer.uid, s.message());
    Queue(c, EncodeErrorReply(r.id_json, s));
  };
  if (c.peer.uid != ::geteuid()) {
    return fail(absl::PermissionDeniedError(
        absl::StrCat("takeover is allowed only to the daemon's own uid ", ::geteuid(),
                     "; this peer is uid ", c.peer.uid)));
  }
  if (takeover_conn != 0 || handed_over) {
    return fail(absl::FailedPreconditionError("another takeover is already in progress"));
  }
  registry->Freeze(true);
  auto fds = registry->ExportAll();
  if (!fds.ok()) {
    registry->Freeze(false);
    return fail(fds.status());
  }
  // The successor must be the only one to accept from now on: connections that arrive wait in
  // the listening socket's backlog, which the successor receives.
  SetAccepting(false);
  UniqueFd listener(::fcntl(listen_fd.get(), F_DUPFD_CLOEXEC, 0));
  if (!listener) {
    const absl::Status s = ErrnoError(errno, "dup of the listening socket");
    SetAccepting(true);
    registry->Freeze(false);
    return fail(s);
  }
  fds->push_back({kListenerFdName, std::move(listener)});
  const size_t total = fds->size();
  const size_t packets = (total + kMaxFdsPerMessage - 1) / kMaxFdsPerMessage;
  json res;
  res["fds"] = total;
  res["packets"] = packets;
  res["pid"] = ::getpid();
  Queue(c, OkReply(r.id_json, std::move(res)));
  size_t next = 0;
  for (size_t k = 0; k < packets; ++k) {
    json names = json::array();
    std::vector<UniqueFd> batch;
    while (next < total && batch.size() < static_cast<size_t>(kMaxFdsPerMessage)) {
      names.push_back((*fds)[next].name);
      batch.push_back(std::move((*fds)[next].fd));
      ++next;
    }
    json cont;
    cont["ok"] = true;
    cont["id"] = json::parse(r.id_json, nullptr, false);
    cont["continuation"] = k + 1;
    cont["names"] = std::move(names);
    Queue(c, cont.dump(), std::move(batch));
  }
  takeover_conn = c.id;
  takeover_deadline = absl::Now() + options.takeover_timeout;
  LogNotice("takeover: pid %d asked; stopped accepting and sent %zu fds in %zu packets", c.peer.pid,
            total, packets);
}

void Server::Impl::AbortTakeover(absl::string_view why) {
  if (takeover_conn == 0) return;
  takeover_conn = 0;
  registry->Freeze(false);
  SetAccepting(true);
  LogWarning("takeover aborted (%s); accepting connections again", std::string(why));
}

void Server::Stop() {
  impl_->stop.store(true);
  const uint64_t one = 1;
  (void)!::write(impl_->wake_fd.get(), &one, sizeof(one));
}

absl::Status Server::Run() {
  Impl& s = *impl_;
  if (s.options.adopted_listen_fd >= 0) {
    LogInfo("listening on the socket passed by systemd (fd %d), max %d connections",
            s.options.adopted_listen_fd, s.options.max_connections);
  } else {
    LogInfo("listening on %s (mode %04o, max %d connections)", s.options.socket_path,
            s.options.socket_mode, s.options.max_connections);
  }
  if (s.http) {
    LogInfo("listening for HTTP on %s (/metrics, /healthz, /readyz)", s.http->address().ToString());
  }
  std::vector<epoll_event> events(256);
  while (!s.stop.load()) {
    int timeout_ms = s.handed_over && !s.lingering ? 10 : 200;
    for (const auto& [id, c] : s.conns) {
      if (c.pending && c.pending->deadline != absl::InfiniteFuture()) {
        const int64_t until = absl::ToInt64Milliseconds(c.pending->deadline - absl::Now()) + 1;
        timeout_ms = static_cast<int>(std::clamp<int64_t>(until, 0, timeout_ms));
      }
    }
    if (s.accept_paused) {
      const int64_t until = absl::ToInt64Milliseconds(s.accept_resume - absl::Now()) + 1;
      timeout_ms = static_cast<int>(std::clamp<int64_t>(until, 0, timeout_ms));
    }
    if (s.http) {
      const absl::Time next = s.http->NextDeadline();
      if (next != absl::InfiniteFuture()) {
        const int64_t until = absl::ToInt64Milliseconds(next - absl::Now()) + 1;
        timeout_ms = static_cast<int>(std::clamp<int64_t>(until, 0, timeout_ms));
      }
    }
    const int n =
        ::epoll_wait(s.epoll_fd.get(), events.data(), static_cast<int>(events.size()), timeout_ms);
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoError(errno, "epoll_wait");
    }
    if (s.options.on_tick) s.options.on_tick();
    for (int i = 0; i < n; ++i) {
      const uint64_t id = events[i].data.u64;
      if (id == 0) {
        // A takeover earlier in this batch may have stopped accepting.
        if (s.accepting && !s.accept_paused) s.Accept();
        continue;
      }
      if (id == ~0ull) continue;
      if (id == kRegistryEvent) {
        uint64_t n;
        while (::read(s.registry->event_fd(), &n, sizeof(n)) > 0) {
        }
        s.ResolvePending();
        continue;
      }
      if (HttpEndpoint::IsTag(id)) {
        if (s.http) s.http->OnEvent(id, events[i].events);
        continue;
      }
      auto it = s.conns.find(id);
      if (it == s.conns.end()) continue;
      if (events[i].events & EPOLLOUT) s.Flush(it->second);
      it = s.conns.find(id);
      if (it == s.conns.end()) continue;
      if (it->second.pending) {
        // Not read while a reply is pending; its peer closing ends it (and cancels an update
        // it waits for).
        if (events[i].events & (EPOLLHUP | EPOLLERR | EPOLLRDHUP)) {
          s.Close(id, "peer closed the connection while waiting for a reply");
        }
        continue;
      }
      if (events[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR | EPOLLRDHUP)) {
        s.OnReadable(it->second);
      }
    }
    // wait_generation timeouts.
    s.ResolvePending();
    // Clients that never said hello must not hold a connection slot forever.
    const absl::Time now = absl::Now();
    if (s.http) s.http->Expire(now);
    if (s.accept_paused && now >= s.accept_resume) {
      s.accept_paused = false;
      s.UpdateListener();
    }
    std::vector<uint64_t> expired;
    for (const auto& [id, c] : s.conns) {
      if (!c.hello && now - c.accepted > s.options.hello_timeout) expired.push_back(id);
    }
    for (uint64_t id : expired) s.Close(id, "no hello before the timeout");
    while (!s.refused.empty() && now - s.refused.front().second > absl::Milliseconds(250)) {
      Impl::Drain(s.refused.front().first.get());
      s.refused.pop_front();
    }
    if (s.takeover_conn != 0 && now > s.takeover_deadline) {
      s.Close(s.takeover_conn, "the successor did not confirm the takeover in time");
    }
    if (s.handed_over && !s.lingering && (s.conns.empty() || now > s.drain_deadline)) {
      if (!s.options.linger_after_handover) {
        LogNotice("handed over to the successor; exiting");
        break;
      }
      std::vector<uint64_t> open;
      for (const auto& [id, c] : s.conns) open.push_back(id);
      for (uint64_t id : open) s.Close(id, "handed over to the successor");
      s.lingering = true;
      LogNotice(
          "handed over to the successor; holding no connection%s until SIGTERM "
          "(--linger-after-handover)",
          s.http ? ", answering HTTP (/readyz 503)," : "");
    }
  }
  LogInfo("stopping: closing %zu connections", s.conns.size());
  return absl::OkStatus();
}

void Server::Impl::Accept() {
  for (;;) {
    UniqueFd fd(::accept4(listen_fd.get(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC));
    if (!fd) {
      const int err = errno;
      if (err == EINTR || err == ECONNABORTED) continue;
      if (err != EAGAIN && err != EWOULDBLOCK) {
        PauseAccepting(
            err == EMFILE || err == ENFILE ? "the descriptor table is full" : "unexpected error",
            err);
      }
      return;
    }
    accept_pause = kAcceptPauseFirst;
    if (conns.size() >= static_cast<size_t>(options.max_connections)) {
      Refuse(std::move(fd), absl::ResourceExhaustedError(absl::StrCat(
                                "weightd is at its connection limit (", options.max_connections,
                                " connections; config max_connections)")));
      continue;
    }
    ucred cred{};
    socklen_t len = sizeof(cred);
    if (::getsockopt(fd.get(), SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) {
      WD_LOG_LIMITED(LogLevel::kWarning, "SO_PEERCRED failed: %s", std::strerror(errno));
      continue;
    }
    if (auto held = conns_per_uid.find(cred.uid);
        held != conns_per_uid.end() && held->second >= options.max_connections_per_uid) {
      WD_LOG_LIMITED(LogLevel::kWarning,
                     "connection of pid %d uid %u refused: the uid holds %d connections "
                     "(max_connections_per_uid)",
                     cred.pid, cred.uid, held->second);
      Refuse(std::move(fd), absl::ResourceExhaustedError(absl::StrCat(
                                "uid ", cred.uid, " already holds ", held->second,
                                " connections to weightd, the most one uid may hold (config "
                                "max_connections_per_uid)")));
      continue;
    }
    // Forced (root) or capped by wmem_max; a larger buffer lets big status replies fit.
    if (::setsockopt(fd.get(), SOL_SOCKET, SO_SNDBUFFORCE, &kSendBufferBytes,
                     sizeof(kSendBufferBytes)) != 0) {
      ::setsockopt(fd.get(), SOL_SOCKET, SO_SNDBUF, &kSendBufferBytes, sizeof(kSendBufferBytes));
    }
    const uint64_t id = next_id++;
    epoll_event ev{};
    ev.events = EPOLLIN | EPOLLRDHUP;
    ev.data.u64 = id;
    if (::epoll_ctl(epoll_fd.get(), EPOLL_CTL_ADD, fd.get(), &ev) != 0) {
      WD_LOG_LIMITED(LogLevel::kWarning, "epoll_ctl failed: %s", std::strerror(errno));
      continue;
    }
    Connection& c = conns[id];
    c.id = id;
    c.fd = std::move(fd);
    c.peer = {cred.pid, cred.uid, cred.gid, PeerGroups(c.fd.get())};
    c.accepted = absl::Now();
    ++conns_per_uid[cred.uid];
    LogDebug("connection %llu: pid %d uid %u", static_cast<unsigned long long>(id), cred.pid,
             cred.uid);
  }
}

void Server::Impl::Refuse(UniqueFd fd, const absl::Status& why) {
  ++refused_total;
  (void)SendPacket(fd.get(), EncodeErrorReply("null", why));
  if (refused.size() >= 256) {
    Drain(refused.front().first.get());
    refused.pop_front();
  }
  refused.emplace_back(std::move(fd), absl::Now());
}

void Server::Impl::Close(uint64_t id, absl::string_view why) {
  auto it = conns.find(id);
  if (it == conns.end()) return;
  Connection& c = it->second;
  if (auto held = conns_per_uid.find(c.peer.uid);
      held != conns_per_uid.end() && --held->second <= 0) {
    conns_per_uid.erase(held);
  }
  registry->ReleaseConnection(id);
  if (id == takeover_conn) AbortTakeover(why);
  LogDebug("connection %llu (pid %d): closed: %s", static_cast<unsigned long long>(id), c.peer.pid,
           std::string(why));
  ::epoll_ctl(epoll_fd.get(), EPOLL_CTL_DEL, c.fd.get(), nullptr);
  conns.erase(it);
}

void Server::Impl::UpdateInterest(Connection& c) {
  // A connection with a pending reply is not read (EPOLLRDHUP still reports its closing).
  const uint32_t events = EPOLLRDHUP | (c.pending ? 0u : static_cast<uint32_t>(EPOLLIN)) |
                          (c.out.empty() ? 0u : static_cast<uint32_t>(EPOLLOUT));
  if (events == c.events) return;
  c.events = events;
  epoll_event ev{};
  ev.events = events;
  ev.data.u64 = c.id;
  ::epoll_ctl(epoll_fd.get(), EPOLL_CTL_MOD, c.fd.get(), &ev);
}

bool Server::Impl::Resolve(Connection& c) {
  const Pending& p = *c.pending;
  if (p.op == Op::kWaitGeneration) {
    absl::StatusOr<uint64_t> gen = registry->CurrentGeneration(p.name, c.peer);
    if (!gen.ok()) {
      ++errors_total;
      Queue(c, EncodeErrorReply(p.id_json, gen.status()));
    } else if (*gen > p.after || absl::Now() >= p.deadline) {
      Queue(c, OkReply(p.id_json, {{"name", p.name},
                                   {"generation", *gen},
                                   {"timed_out", *gen <= p.after}}));
    } else {
      return false;
    }
  } else {
    std::optional<absl::StatusOr<UpdateReport>> outcome = registry->UpdateOutcome(p.update);
    if (!outcome) return false;
    if (!outcome->ok()) {
      ++errors_total;
      Queue(c, EncodeErrorReply(p.id_json, outcome->status()));
    } else {
      const UpdateReport& u = **outcome;
      Queue(c, OkReply(p.id_json, {{"name", p.name},
                                   {"generation", u.generation},
                                   {"state", "ready"},
                                   {"seconds", u.seconds},
                                   {"bytes_read", u.bytes_read},
                                   {"ranks_rewritten", u.ranks_rewritten},
                                   {"targets_rewritten", u.targets_rewritten},
                                   {"targets_copied", u.targets_copied},
                                   {"segments_rewritten", u.segments_rewritten},
                                   {"bytes_allocated", u.bytes_allocated},
                                   {"bytes_copied", u.bytes_copied}}));
    }
  }
  c.pending.reset();
  return true;
}

void Server::Impl::ResolvePending() {
  std::vector<uint64_t> done;
  for (auto& [id, c] : conns) {
    if (c.pending && Resolve(c)) done.push_back(id);
  }
  // Flushing may close a connection, so it comes after the walk; reading resumes with it.
  for (uint64_t id : done) {
    auto it = conns.find(id);
    if (it != conns.end()) Flush(it->second);
  }
}

void Server::Impl::QueueGrant(Connection& c, const Request& r, AttachGrant& g) {
  // First packet: reply + manifest fd + as many arena fds as fit; then continuation packets of
  // up to kMaxFdsPerMessage fds each.
  std::vector<UniqueFd> first;
  first.push_back(std::move(g.manifest));
  size_t next = 0;
  while (next < g.arenas.size() && first.size() < static_cast<size_t>(kMaxFdsPerMessage)) {
    first.push_back(std::move(g.arenas[next++]));
  }
  const size_t remaining = g.arenas.size() - next;
  const size_t extra = (remaining + kMaxFdsPerMessage - 1) / kMaxFdsPerMessage;
  json res;
  res["name"] = r.name.value_or("");
  res["rank"] = r.rank;
  res["lease"] = g.lease;
  res["generation"] = g.generation;
  if (r.op == Op::kRefresh) res["unchanged"] = false;
  res["manifest_bytes"] = g.manifest_bytes;
  res["arenas"] = g.arenas.size();
  // Which arenas are the same memory as before (a refresh keeps their mappings).
  res["arena_ids"] = g.arena_ids;
  // Device arenas only: an old client ignores the key, and host-only replies keep their
  // earlier shape.
  json arena_info = json::array();
  bool any_device = false;
  for (const std::string& uuid : g.arena_device_uuids) {
    if (uuid.empty()) {
      arena_info.push_back({{"kind", "host"}});
    } else {
      arena_info.push_back({{"kind", "cuda"}, {"device_uuid", uuid}});
      any_device = true;
    }
  }
  if (any_device) res["arena_info"] = std::move(arena_info);
  res["fd_messages"] = extra;
  Queue(c, OkReply(r.id_json, std::move(res)), std::move(first));
  for (size_t part = 0; part < extra; ++part) {
    std::vector<UniqueFd> fds;
    while (next < g.arenas.size() && fds.size() < static_cast<size_t>(kMaxFdsPerMessage)) {
      fds.push_back(std::move(g.arenas[next++]));
    }
    json cont;
    cont["ok"] = true;
    cont["id"] = json::parse(r.id_json, nullptr, false);
    cont["continuation"] = part + 1;
    Queue(c, cont.dump(), std::move(fds));
  }
}

void Server::Impl::Queue(Connection& c, std::string data, std::vector<UniqueFd> fds) {
  c.out.push_back({std::move(data), std::move(fds)});
}

void Server::Impl::Flush(Connection& c) {
  while (!c.out.empty()) {
    Outgoing& o = c.out.front();
    std::vector<int> raw;
    for (const UniqueFd& f : o.fds) raw.push_back(f.get());
    const absl::Status s = SendPacket(c.fd.get(), o.data, raw);
    if (absl::IsUnavailable(s)) break;  // EAGAIN: wait for EPOLLOUT
    if (!s.ok()) {
      Close(c.id, s.message());
      return;
    }
    c.out.pop_front();
  }
  if (c.out.size() > kMaxQueuedReplies) {
    Close(c.id, "client does not read its replies");
    return;
  }
  UpdateInterest(c);
}

void Server::Impl::OnReadable(Connection& c) {
  const uint64_t id = c.id;
  for (int i = 0; i < kPacketsPerWakeup; ++i) {
    auto packet = RecvPacket(c.fd.get(), options.max_request_bytes);
    if (!packet.ok()) {
      Close(id, packet.status().message());
      return;
    }
    if (packet->would_block) break;
    if (packet->eof) {
      Close(id, "peer closed the connection");
      return;
    }
    ++requests_total;
    if (packet->truncated) {
      ++errors_total;
      Queue(c,
            EncodeErrorReply("null", absl::ResourceExhaustedError(absl::StrCat(
                                         "request exceeds the cap of ", options.max_request_bytes,
                                         " bytes (config max_request_bytes)"))));
      continue;
    }
    absl::StatusOr<Request> req = ParseRequest(packet->data);
    // Only `update` may carry a descriptor (its tensors' memfd); any other is closed unread
    // (Packet owns them).
    const bool fd_allowed = req.ok() && req->op == Op::kUpdate && packet->fds.size() == 1;
    if (!packet->fds.empty() && !fd_allowed) {
      ++errors_total;
      Queue(c, EncodeErrorReply(req.ok() ? req->id_json : "null",
                                absl::InvalidArgumentError(absl::StrCat(
                                    "requests must not carry file descriptors, except 'update' "
                                    "with one memfd (",
                                    packet->fds.size(), " received and closed)"))));
      continue;
    }
    if (!req.ok()) {
      ++errors_total;
      Queue(c, EncodeErrorReply("null", req.status()));
      continue;
    }
    Handle(c, *req, fd_allowed ? std::move(packet->fds[0]) : UniqueFd());
    if (conns.find(id) == conns.end()) return;
    if (c.pending) break;  // the next request waits for this one's reply
  }
  Flush(c);
}

std::string Server::Impl::Metrics() {
  std::string out = registry->Metrics();
  MetricFamily connections("weightd_connections", "gauge", "Open client connections.");
  connections.Add("", conns.size());
  MetricFamily requests("weightd_requests_total", "counter", "Requests received.");
  requests.Add("", requests_total);
  MetricFamily errors("weightd_request_errors_total", "counter",
                      "Requests answered with an error.");
  errors.Add("", errors_total);
  MetricFamily refused("weightd_connections_refused_total", "counter",
                       "Connections refused at max_connections or max_connections_per_uid.");
  refused.Add("", refused_total);
  MetricFamily shed("weightd_connections_shed_total", "counter",
                    "Connections closed as soon as accepted because the daemon had no file "
                    "descriptor left.");
  shed.Add("", shed_total);
  for (const MetricFamily* f : {&connections, &requests, &errors, &refused, &shed}) {
    f->AppendTo(&out);
  }
  return out;
}

void Server::Impl::Handle(Connection& c, const Request& r, UniqueFd fd) {
  const absl::Status s = Dispatch(c, r, std::move(fd));
  if (!s.ok()) {
    ++errors_total;
    Queue(c, EncodeErrorReply(r.id_json, s));
  }
}

absl::Status Server::Impl::Dispatch(Connection& c, const Request& r, UniqueFd fd) {
  if (!c.hello && r.op != Op::kHello) {
    return absl::FailedPreconditionError("the first request on a connection must be 'hello'");
  }
  switch (r.op) {
    case Op::kHello: return OnHello(c, r);
    case Op::kList:
    case Op::kStatus: return OnStatus(c, r);
    case Op::kLoad: return OnLoad(c, r);
    case Op::kAttach: return OnAttach(c, r);
    case Op::kDetach: return OnDetach(c, r);
    case Op::kUnload: return OnUnload(c, r);
    case Op::kMetrics:
      Queue(c, OkReply(r.id_json, {{"text", Metrics()}}));
      return absl::OkStatus();
    case Op::kUpdate: return OnUpdate(c, r, std::move(fd));
    case Op::kWaitGeneration:
      c.pending = Pending{Op::kWaitGeneration, r.id_json, r.name.value_or(""), r.after,
                          absl::Now() + absl::Milliseconds(r.timeout_ms), 0};
      if (!Resolve(c)) UpdateInterest(c);
      return absl::OkStatus();
    case Op::kRollback: return OnRollback(c, r);
    case Op::kRefresh: return OnRefresh(c, r);
    case Op::kTakeover:
      StartTakeover(c, r);
      return absl::OkStatus();
    case Op::kTakeoverDone: return OnTakeoverDone(c, r);
  }
  return absl::InternalError("unhandled request");
}

absl::Status Server::Impl::OnHello(Connection& c, const Request& r) {
  if (r.version < 1) {
    return absl::FailedPreconditionError(absl::StrCat(
        "protocol version ", r.version, " is not supported; this daemon speaks 1..",
        kProtocolVersion));
  }
  c.hello = true;
  c.client = r.client;
  json res;
  res["version"] = std::min(r.version, kProtocolVersion);
  res["server"] = absl::StrCat("weightd ", Version());
  res["uid"] = c.peer.uid;
  res["pid"] = c.peer.pid;
  res["max_request_bytes"] = options.max_request_bytes;
  Queue(c, OkReply(r.id_json, std::move(res)));
  return absl::OkStatus();
}

// `list` (one line per model) and `status` (everything, for one model or all).
absl::Status Server::Impl::OnStatus(Connection& c, const Request& r) {
  WD_ASSIGN_OR_RETURN(std::vector<ModelStatus> st,
                      registry->Status(r.op == Op::kStatus ? r.name.value_or("") : "", c.peer));
  json models = json::array();
  for (const ModelStatus& m : st) {
    if (r.op == Op::kStatus) {
      models.push_back(StatusJson(m));
      continue;
    }
    json ranks = json::array();
    for (const RankStatus& rs : m.ranks) ranks.push_back(rs.rank);
    models.push_back({{"name", m.name},
                      {"state", std::string(RankStateName(Summary(m)))},
                      {"tp", m.tp},
                      {"ranks", std::move(ranks)}});
  }
  Queue(c, OkReply(r.id_json, {{"models", std::move(models)}}));
  return absl::OkStatus();
}

absl::Status Server::Impl::OnLoad(Connection& c, const Request& r) {
  const std::string name = r.name.value_or("");
  if (const absl::Status s = registry->StartLoad(name, r.load, c.peer); !s.ok()) {
    WD_LOG_LIMITED(LogLevel::kWarning, "load %s: refused for pid %d uid %u: %s", name,
                   c.peer.pid, c.peer.uid, s.message());
    return s;
  }
  Queue(c, OkReply(r.id_json, {{"name", name}, {"state", "loading"}}));
  return absl::OkStatus();
}

absl::Status Server::Impl::OnAttach(Connection& c, const Request& r) {
  const std::string name = r.name.value_or("");
  auto g = registry->Attach(name, r.rank, c.peer, c.id);
  if (!g.ok()) {
    WD_LOG_LIMITED(LogLevel::kWarning, "attach %s rank %d: refused for pid %d uid %u: %s", name,
                   r.rank, c.peer.pid, c.peer.uid, g.status().message());
    return g.status();
  }
  QueueGrant(c, r, *g);
  // Attaches and detaches are routine and can be frequent: counted in the metrics, logged only
  // at debug level.
  LogDebug("attach %s rank %d: pid %d uid %u lease %llu", name, r.rank, c.peer.pid, c.peer.uid,
           static_cast<unsigned long long>(g->lease));
  return absl::OkStatus();
}

absl::Status Server::Impl::OnDetach(Connection& c, const Request& r) {
  const std::string name = r.name.value_or("");
  WD_RETURN_IF_ERROR(registry->Detach(name, r.rank, c.id, r.lease));
  LogDebug("detach %s rank %d: pid %d", name, r.rank, c.peer.pid);
  Queue(c, OkReply(r.id_json, json::object()));
  return absl::OkStatus();
}

absl::Status Server::Impl::OnUnload(Connection& c, const Request& r) {
  const std::string name = r.name.value_or("");
  WD_RETURN_IF_ERROR(registry->Unload(name, r.force, c.peer));
  Queue(c, OkReply(r.id_json, {{"name", name}}));
  return absl::OkStatus();
}

// An update from a checkpoint or from one sealed memfd (`fd`). With `wait`, the reply is pending
// until the update ends (Resolve).
absl::Status Server::Impl::OnUpdate(Connection& c, const Request& r, UniqueFd fd) {
  const std::string name = r.name.value_or("");
  if (r.checkpoint.empty() && !fd) {
    return absl::InvalidArgumentError(
        "update: give 'checkpoint', or send the new tensors as one sealed memfd with the "
        "request");
  }
  UpdateSource source;
  source.checkpoint = r.checkpoint;
  source.memfd = std::move(fd);
  auto t = registry->StartUpdate(name, std::move(source), c.peer, r.wait ? c.id : 0);
  if (!t.ok()) {
    WD_LOG_LIMITED(LogLevel::kWarning, "update %s: refused for pid %d uid %u: %s", name,
                   c.peer.pid, c.peer.uid, t.status().message());
    return t.status();
  }
  if (!r.wait) {
    Queue(c, OkReply(r.id_json,
                     {{"name", name}, {"generation", t->generation}, {"state", "updating"}}));
    return absl::OkStatus();
  }
  c.pending = Pending{Op::kUpdate, r.id_json, name, 0, absl::InfiniteFuture(), t->id};
  if (!Resolve(c)) UpdateInterest(c);
  return absl::OkStatus();
}

absl::Status Server::Impl::OnRollback(Connection& c, const Request& r) {
  const std::string name = r.name.value_or("");
  WD_ASSIGN_OR_RETURN(auto rb, registry->Rollback(name, c.peer));
  Queue(c, OkReply(r.id_json,
                   {{"name", name}, {"generation", rb.generation}, {"restored", rb.restored}}));
  return absl::OkStatus();
}

absl::Status Server::Impl::OnRefresh(Connection& c, const Request& r) {
  const std::string name = r.name.value_or("");
  WD_ASSIGN_OR_RETURN(AttachGrant g, registry->Refresh(name, r.rank, c.id, r.lease.value_or(0)));
  if (g.unchanged) {
    Queue(c, OkReply(r.id_json, {{"name", name},
                                 {"rank", r.rank},
                                 {"lease", g.lease},
                                 {"generation", g.generation},
                                 {"unchanged", true}}));
    return absl::OkStatus();
  }
  QueueGrant(c, r, g);
  LogDebug("refresh %s rank %d: pid %d lease %llu now on generation %llu", name, r.rank,
           c.peer.pid, static_cast<unsigned long long>(g.lease),
           static_cast<unsigned long long>(g.generation));
  return absl::OkStatus();
}

absl::Status Server::Impl::OnTakeoverDone(Connection& c, const Request& r) {
  if (c.id != takeover_conn) {
    return absl::FailedPreconditionError(
        "no takeover is in progress on this connection (send 'takeover' first)");
  }
  takeover_conn = 0;
  handed_over = true;
  if (options.on_handed_over) options.on_handed_over();
  drain_deadline = absl::Now() + options.handover_drain;
  LogNotice("takeover: pid %d serves now; answering the %zu open connections for at most %.1f s",
            c.peer.pid, conns.size() - 1, absl::ToDoubleSeconds(options.handover_drain));
  Queue(c, OkReply(r.id_json, json::object()));
  return absl::OkStatus();
}

}  // namespace weightd
