#include "weightd/http_endpoint.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/epoll.h>
#include <sys/time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "weightd/log.h"
#include "weightd/status_macros.h"
#include "weightd/unique_fd.h"

namespace weightd {
namespace {

constexpr uint64_t kTag = 1ull << 62;
constexpr uint64_t kListenerTag = kTag;  // connections are kTag | id, id >= 1
constexpr int kAcceptsPerWakeup = 64;
// After a response, how long the connection may stay open while its unread input (a request
// body nobody asked for) is drained, so that closing it does not reset the peer before it has
// read the response.
constexpr absl::Duration kLingerAfterResponse = absl::Seconds(1);
constexpr size_t kMaxDrainedBytes = 64 << 10;
// An accept() failure (out of descriptors) takes the listener out of the epoll set this long.
constexpr absl::Duration kAcceptPause = absl::Seconds(1);

absl::Status AddressError(absl::string_view what, absl::string_view text, absl::string_view why) {
  return absl::InvalidArgumentError(absl::StrCat(
      what, ": '", text, "' ", why,
      "; give IPv4:PORT (127.0.0.1:9464; 0.0.0.0:9464 for every interface), [IPv6]:PORT "
      "([::1]:9464, [::]:9464) or a bare PORT (9464 = 127.0.0.1:9464)"));
}

absl::string_view Reason(int status) {
  switch (status) {
    case 200:
      return "OK";
    case 400:
      return "Bad Request";
    case 404:
      return "Not Found";
    case 405:
      return "Method Not Allowed";
    case 408:
      return "Request Timeout";
    case 431:
      return "Request Header Fields Too Large";
    case 503:
      return "Service Unavailable";
    case 505:
      return "HTTP Version Not Supported";
    default:
      return "Error";
  }
}

bool IsToken(absl::string_view s) {
  if (s.empty() || s.size() > 32) return false;
  return std::all_of(s.begin(), s.end(), [](char c) { return absl::ascii_isupper(c); });
}

}  // namespace

std::string ListenAddress::ToString() const {
  char host[INET6_ADDRSTRLEN] = {};
  if (storage.ss_family == AF_INET6) {
    const auto* a = reinterpret_cast<const sockaddr_in6*>(&storage);
    ::inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof(host));
    return absl::StrCat("[", host, "]:", port());
  }
  const auto* a = reinterpret_cast<const sockaddr_in*>(&storage);
  ::inet_ntop(AF_INET, &a->sin_addr, host, sizeof(host));
  return absl::StrCat(host, ":", port());
}

uint16_t ListenAddress::port() const {
  if (storage.ss_family == AF_INET6) {
    return ntohs(reinterpret_cast<const sockaddr_in6*>(&storage)->sin6_port);
  }
  return ntohs(reinterpret_cast<const sockaddr_in*>(&storage)->sin_port);
}

absl::StatusOr<ListenAddress> ParseListenAddress(absl::string_view text, absl::string_view what) {
  absl::string_view host = "127.0.0.1";
  absl::string_view port_text = text;
  bool v6 = false;
  if (text.empty()) return AddressError(what, text, "is empty");
  if (text.front() == '[') {
    const size_t close = text.find(']');
    if (close == absl::string_view::npos || close + 1 >= text.size() || text[close + 1] != ':') {
      return AddressError(what, text, "is not [IPv6]:PORT");
    }
    host = text.substr(1, close - 1);
    port_text = text.substr(close + 2);
    v6 = true;
  } else if (const size_t colon = text.rfind(':'); colon != absl::string_view::npos) {
    if (text.find(':') != colon) {
      return AddressError(what, text, "looks like an IPv6 address without brackets");
    }
    if (colon == 0) {
      return AddressError(what, text,
                          "has no host (weightd does not guess between loopback and every "
                          "interface)");
    }
    host = text.substr(0, colon);
    port_text = text.substr(colon + 1);
  }
  uint32_t port = 0;
  if (port_text.empty() ||
      !std::all_of(port_text.begin(), port_text.end(),
                   [](char c) { return absl::ascii_isdigit(c); }) ||
      port_text.size() > 5 || !absl::SimpleAtoi(port_text, &port) || port > 65535) {
    return AddressError(what, text, "has no port in 0..65535");
  }
  ListenAddress out;
  const std::string h(host);
  if (v6) {
    auto* a = reinterpret_cast<sockaddr_in6*>(&out.storage);
    a->sin6_family = AF_INET6;
    a->sin6_port = htons(static_cast<uint16_t>(port));
    if (::inet_pton(AF_INET6, h.c_str(), &a->sin6_addr) != 1) {
      return AddressError(what, text, absl::StrCat("has '", h, "', not a numeric IPv6 address"));
    }
    out.length = sizeof(sockaddr_in6);
  } else {
    auto* a = reinterpret_cast<sockaddr_in*>(&out.storage);
    a->sin_family = AF_INET;
    a->sin_port = htons(static_cast<uint16_t>(port));
    if (::inet_pton(AF_INET, h.c_str(), &a->sin_addr) != 1) {
      return AddressError(what, text,
                          absl::StrCat("has '", h,
                                       "', not a numeric IPv4 address (weightd resolves no host "
                                       "names: use 127.0.0.1 or [::1] for loopback)"));
    }
    out.length = sizeof(sockaddr_in);
  }
  return out;
}

size_t FindHttpHeadEnd(absl::string_view buffer) {
  const size_t crlf = buffer.find("\r\n\r\n");
  const size_t lf = buffer.find("\n\n");
  if (crlf == absl::string_view::npos && lf == absl::string_view::npos) {
    return absl::string_view::npos;
  }
  if (lf == absl::string_view::npos || (crlf != absl::string_view::npos && crlf < lf)) {
    return crlf + 4;
  }
  return lf + 2;
}

absl::StatusOr<HttpRequestLine> ParseHttpRequestLine(absl::string_view head) {
  absl::string_view line = head.substr(0, head.find('\n'));
  if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
  const std::vector<absl::string_view> parts = absl::StrSplit(line, ' ');
  if (parts.size() != 3) {
    return absl::InvalidArgumentError("the request line is not 'METHOD TARGET HTTP/1.x'");
  }
  if (!IsToken(parts[0])) return absl::InvalidArgumentError("the method is not a token");
  const absl::string_view target = parts[1];
  if (target.empty() || target.front() != '/') {
    return absl::InvalidArgumentError("the target is not a path starting with '/'");
  }
  if (std::any_of(target.begin(), target.end(),
                  [](char c) { return static_cast<unsigned char>(c) <= 0x20 || c == 0x7f; })) {
    return absl::InvalidArgumentError("the target has control characters");
  }
  const absl::string_view version = parts[2];
  if (!absl::StartsWith(version, "HTTP/")) {
    return absl::InvalidArgumentError("the request line does not end with HTTP/1.x");
  }
  if (version != "HTTP/1.1" && version != "HTTP/1.0") {
    return absl::UnimplementedError(absl::StrCat(version, " is not supported; use HTTP/1.1"));
  }
  HttpRequestLine out;
  out.method = std::string(parts[0]);
  out.path = std::string(target.substr(0, target.find_first_of("?#")));
  return out;
}

std::string HttpResponseText(const HttpResponse& response, bool head_only) {
  std::string out = absl::StrCat("HTTP/1.1 ", response.status, " ", Reason(response.status),
                                 "\r\nContent-Type: ", response.content_type,
                                 "\r\nContent-Length: ", response.body.size(),
                                 "\r\nCache-Control: no-store\r\nConnection: close\r\n");
  if (response.status == 405) out += "Allow: GET, HEAD\r\n";
  out += "\r\n";
  if (!head_only) out += response.body;
  return out;
}

struct HttpEndpoint::Impl {
  enum class Phase { kReading, kWriting, kDraining };
  struct Conn {
    UniqueFd fd;
    absl::Time deadline;
    Phase phase = Phase::kReading;
    std::string in;
    std::string out;
    size_t sent = 0;
    size_t drained = 0;
    uint32_t events = 0;
  };

  Options options;
  int epoll_fd = -1;
  Routes routes;
  UniqueFd listen_fd;
  ListenAddress bound;
  std::map<uint64_t, Conn> conns;  // by id: the oldest first
  uint64_t next_id = 1;
  bool listener_paused = false;
  absl::Time listener_resume;

  absl::Status Listen();
  void Accept();
  void OnReadable(uint64_t id, Conn& c);
  void Respond(uint64_t id, Conn& c, const HttpResponse& r, bool head_only);
  void Write(uint64_t id, Conn& c);
  void Drain(uint64_t id, Conn& c);
  void SetInterest(uint64_t id, Conn& c, uint32_t events);
  void Close(uint64_t id);
  HttpResponse Route(const HttpRequestLine& req) const;
};

absl::Status HttpEndpoint::Impl::Listen() {
  const std::string where = options.address.ToString();
  const int family = options.address.storage.ss_family;
  if (options.check_in_use && options.address.port() != 0) {
    // What answers on the address (on loopback for a wildcard address)? A connect() to a local
    // address completes or fails at once.
    ListenAddress probe = options.address;
    if (family == AF_INET) {
      auto* a = reinterpret_cast<sockaddr_in*>(&probe.storage);
      if (a->sin_addr.s_addr == htonl(INADDR_ANY)) a->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    } else {
      auto* a = reinterpret_cast<sockaddr_in6*>(&probe.storage);
      if (IN6_IS_ADDR_UNSPECIFIED(&a->sin6_addr)) a->sin6_addr = in6addr_loopback;
    }
    UniqueFd s(::socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0));
    // Bounds connect() should a firewall drop the SYN instead of refusing it.
    const timeval one_second{.tv_sec = 1, .tv_usec = 0};
    if (s) ::setsockopt(s.get(), SOL_SOCKET, SO_SNDTIMEO, &one_second, sizeof(one_second));
    if (s &&
        ::connect(s.get(), reinterpret_cast<const sockaddr*>(&probe.storage), probe.length) == 0) {
      return absl::FailedPreconditionError(
          absl::StrCat("metrics listener: something already accepts connections on ", where,
                       " (another weightd? pick another metrics_listen port)"));
    }
  }
  listen_fd = UniqueFd(::socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!listen_fd) {
    const int err = errno;
    return ErrnoError(
        err, absl::StrCat("metrics listener: socket() for ", where,
                          err == EAFNOSUPPORT ? " (under systemd, RestrictAddressFamilies= must "
                                                "allow AF_INET and AF_INET6; docs/OPERATIONS.md)"
                                              : ""));
  }
  const int one = 1;
  ::setsockopt(listen_fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  // A `--takeover` successor binds the same address while this daemon still listens there.
  WD_SYSCALL_OR_RETURN(::setsockopt(listen_fd.get(), SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)),
                       "metrics listener: SO_REUSEPORT");
  if (family == AF_INET6) {
    // [::] serves IPv4 too whatever net.ipv6.bindv6only says; [::1] is IPv6 only anyway.
    const int zero = 0;
    ::setsockopt(listen_fd.get(), IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof(zero));
  }
  if (::bind(listen_fd.get(), reinterpret_cast<const sockaddr*>(&options.address.storage),
             options.address.length) != 0) {
    return ErrnoError(errno, absl::StrCat("metrics listener: bind to ", where));
  }
  WD_SYSCALL_OR_RETURN(::listen(listen_fd.get(), 128),
                       absl::StrCat("metrics listener: listen on ", where));
  bound = options.address;
  socklen_t len = sizeof(bound.storage);
  if (::getsockname(listen_fd.get(), reinterpret_cast<sockaddr*>(&bound.storage), &len) == 0) {
    bound.length = len;
  }
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.u64 = kListenerTag;
  WD_SYSCALL_OR_RETURN(::epoll_ctl(epoll_fd, EPOLL_CTL_ADD, listen_fd.get(), &ev),
                       "metrics listener: epoll_ctl");
  return absl::OkStatus();
}

void HttpEndpoint::Impl::Accept() {
  for (int i = 0; i < kAcceptsPerWakeup; ++i) {
    UniqueFd fd(::accept4(listen_fd.get(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC));
    if (!fd) {
      const int err = errno;
      if (err == EINTR || err == ECONNABORTED) continue;
      if (err == EAGAIN || err == EWOULDBLOCK) return;
      WD_LOG_LIMITED(LogLevel::kWarning,
                     "metrics listener: accept failed: %s; not accepting for %.0f ms",
                     std::strerror(err), absl::ToDoubleMilliseconds(kAcceptPause));
      ::epoll_ctl(epoll_fd, EPOLL_CTL_DEL, listen_fd.get(), nullptr);
      listener_paused = true;
      listener_resume = absl::Now() + kAcceptPause;
      return;
    }
    // The oldest connection has had the most time to send its request: it makes room.
    while (!conns.empty() && conns.size() >= static_cast<size_t>(options.max_connections)) {
      Close(conns.begin()->first);
    }
    const uint64_t id = next_id++;
    epoll_event ev{};
    ev.events = EPOLLIN | EPOLLRDHUP;
    ev.data.u64 = kTag | id;
    if (::epoll_ctl(epoll_fd, EPOLL_CTL_ADD, fd.get(), &ev) != 0) {
      WD_LOG_LIMITED(LogLevel::kWarning, "metrics listener: epoll_ctl failed: %s",
                     std::strerror(errno));
      continue;
    }
    Conn& c = conns[id];
    c.fd = std::move(fd);
    c.deadline = absl::Now() + options.request_timeout;
    c.events = ev.events;
  }
}

HttpResponse HttpEndpoint::Impl::Route(const HttpRequestLine& req) const {
  auto it = routes.find(req.path);
  if (it == routes.end()) {
    std::string known;
    for (const auto& [path, handler] : routes)
      absl::StrAppend(&known, known.empty() ? "" : ", ", path);
    return {404, absl::StrCat("not found: ", req.path, " (this endpoint serves ", known, ")\n")};
  }
  if (req.method != "GET" && req.method != "HEAD") {
    return {405, absl::StrCat("method ", req.method, " is not allowed on ", req.path,
                              " (GET or HEAD)\n")};
  }
  return it->second();
}

void HttpEndpoint::Impl::OnReadable(uint64_t id, Conn& c) {
  char buf[4096];
  for (;;) {
    const ssize_t n = ::recv(c.fd.get(), buf, sizeof(buf), MSG_DONTWAIT);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return;
      Close(id);  // ECONNRESET and the like: nobody to answer
      return;
    }
    if (n == 0) {
      Close(id);  // the peer closed before its request was complete
      return;
    }
    // Room for the blank line to arrive just past the cap is not needed: a head of exactly the
    // cap is accepted, one byte more is not.
    const size_t room = options.max_request_bytes + 1 - c.in.size();
    c.in.append(buf, std::min(static_cast<size_t>(n), room));
    const size_t end = FindHttpHeadEnd(c.in);
    if (end != absl::string_view::npos && end <= options.max_request_bytes) {
      absl::StatusOr<HttpRequestLine> req = ParseHttpRequestLine(c.in.substr(0, end));
      if (!req.ok()) {
        const int status = absl::IsUnimplemented(req.status()) ? 505 : 400;
        Respond(id, c, {status, absl::StrCat(req.status().message(), "\n")}, false);
      } else {
        Respond(id, c, Route(*req), req->method == "HEAD");
      }
      return;
    }
    if (c.in.size() > options.max_request_bytes) {
      Respond(
          id, c,
          {431, absl::StrCat("the request head exceeds ", options.max_request_bytes, " bytes\n")},
          false);
      return;
    }
  }
}

void HttpEndpoint::Impl::Respond(uint64_t id, Conn& c, const HttpResponse& r, bool head_only) {
  c.out = HttpResponseText(r, head_only);
  c.in.clear();
  c.in.shrink_to_fit();
  c.phase = Phase::kWriting;
  Write(id, c);
}

void HttpEndpoint::Impl::Write(uint64_t id, Conn& c) {
  while (c.sent < c.out.size()) {
    const ssize_t n = ::send(c.fd.get(), c.out.data() + c.sent, c.out.size() - c.sent,
                             MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) {
        SetInterest(id, c, EPOLLOUT | EPOLLRDHUP);
        return;
      }
      Close(id);
      return;
    }
    c.sent += static_cast<size_t>(n);
  }
  // Sent: end our side, then read (and drop) what the peer still sends until it closes, so that
  // the close does not reset a peer that has not read the response yet.
  ::shutdown(c.fd.get(), SHUT_WR);
  c.out.clear();
  c.out.shrink_to_fit();
  c.phase = Phase::kDraining;
  c.deadline = std::min(c.deadline, absl::Now() + kLingerAfterResponse);
  SetInterest(id, c, EPOLLIN | EPOLLRDHUP);
  Drain(id, c);
}

void HttpEndpoint::Impl::Drain(uint64_t id, Conn& c) {
  char buf[4096];
  for (;;) {
    const ssize_t n = ::recv(c.fd.get(), buf, sizeof(buf), MSG_DONTWAIT);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
    if (n <= 0) break;  // closed, or an error
    c.drained += static_cast<size_t>(n);
    if (c.drained > kMaxDrainedBytes) break;
  }
  Close(id);
}

void HttpEndpoint::Impl::SetInterest(uint64_t id, Conn& c, uint32_t events) {
  if (c.events == events) return;
  c.events = events;
  epoll_event ev{};
  ev.events = events;
  ev.data.u64 = kTag | id;
  ::epoll_ctl(epoll_fd, EPOLL_CTL_MOD, c.fd.get(), &ev);
}

void HttpEndpoint::Impl::Close(uint64_t id) {
  auto it = conns.find(id);
  if (it == conns.end()) return;
  ::epoll_ctl(epoll_fd, EPOLL_CTL_DEL, it->second.fd.get(), nullptr);
  conns.erase(it);
}

absl::StatusOr<std::unique_ptr<HttpEndpoint>> HttpEndpoint::Create(const Options& options,
                                                                   int epoll_fd, Routes routes) {
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  impl->epoll_fd = epoll_fd;
  impl->routes = std::move(routes);
  WD_RETURN_IF_ERROR(impl->Listen());
  return std::unique_ptr<HttpEndpoint>(new HttpEndpoint(std::move(impl)));
}

HttpEndpoint::HttpEndpoint(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

HttpEndpoint::~HttpEndpoint() {
  for (auto& [id, c] : impl_->conns) {
    ::epoll_ctl(impl_->epoll_fd, EPOLL_CTL_DEL, c.fd.get(), nullptr);
  }
  if (impl_->listen_fd && !impl_->listener_paused) {
    ::epoll_ctl(impl_->epoll_fd, EPOLL_CTL_DEL, impl_->listen_fd.get(), nullptr);
  }
}

const ListenAddress& HttpEndpoint::address() const { return impl_->bound; }

size_t HttpEndpoint::connections() const { return impl_->conns.size(); }

void HttpEndpoint::OnEvent(uint64_t epoll_data, uint32_t events) {
  Impl& s = *impl_;
  if (epoll_data == kListenerTag) {
    if (!s.listener_paused) s.Accept();
    return;
  }
  const uint64_t id = epoll_data & ~kTag;
  auto it = s.conns.find(id);
  if (it == s.conns.end()) return;
  Impl::Conn& c = it->second;
  switch (c.phase) {
    case Impl::Phase::kReading:
      s.OnReadable(id, c);
      return;
    case Impl::Phase::kWriting:
      if (events & (EPOLLERR | EPOLLHUP)) {
        s.Close(id);
      } else if (events & EPOLLOUT) {
        s.Write(id, c);
      }
      return;
    case Impl::Phase::kDraining:
      s.Drain(id, c);
      return;
  }
}

void HttpEndpoint::Expire(absl::Time now) {
  Impl& s = *impl_;
  if (s.listener_paused && now >= s.listener_resume) {
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u64 = kListenerTag;
    if (::epoll_ctl(s.epoll_fd, EPOLL_CTL_ADD, s.listen_fd.get(), &ev) == 0) {
      s.listener_paused = false;
    } else {
      s.listener_resume = now + kAcceptPause;
    }
  }
  std::vector<uint64_t> expired;
  for (const auto& [id, c] : s.conns) {
    if (now >= c.deadline) expired.push_back(id);
  }
  for (uint64_t id : expired) {
    Impl::Conn& c = s.conns[id];
    if (c.phase == Impl::Phase::kReading) {
      // Best effort, one non-blocking send: the client gets a reason if it is listening.
      const std::string text = HttpResponseText(
          {408, absl::StrCat("no complete request within ",
                             absl::FormatDuration(s.options.request_timeout), "\n")},
          false);
      (void)!::send(c.fd.get(), text.data(), text.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
    }
    s.Close(id);
  }
}

absl::Time HttpEndpoint::NextDeadline() const {
  absl::Time next = impl_->listener_paused ? impl_->listener_resume : absl::InfiniteFuture();
  for (const auto& [id, c] : impl_->conns) next = std::min(next, c.deadline);
  return next;
}

}  // namespace weightd
