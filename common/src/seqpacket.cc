#include "weightd/seqpacket.h"

#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "weightd/protocol.h"
#include "weightd/status_macros.h"

namespace weightd {

absl::Status SendPacket(int sock, absl::string_view data, std::span<const int> fds) {
  if (fds.size() > static_cast<size_t>(kMaxFdsPerMessage)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "cannot send ", fds.size(), " fds in one message (max ", kMaxFdsPerMessage, ")"));
  }
  iovec iov{const_cast<char*>(data.data()), data.size()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  std::vector<char> control;
  if (!fds.empty()) {
    control.resize(CMSG_SPACE(sizeof(int) * fds.size()));
    msg.msg_control = control.data();
    msg.msg_controllen = control.size();
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
    std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
  }
  for (;;) {
    const ssize_t n = ::sendmsg(sock, &msg, MSG_NOSIGNAL);
    if (n >= 0) return absl::OkStatus();
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      return absl::UnavailableError("socket send buffer full");
    }
    return ErrnoError(errno, "sendmsg on the weightd socket");
  }
}

absl::StatusOr<Packet> RecvPacket(int sock, size_t max_bytes) {
  Packet p;
  p.data.resize(max_bytes);
  iovec iov{p.data.data(), p.data.size()};
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxFdsPerMessage)];
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control;
  msg.msg_controllen = sizeof(control);
  ssize_t n;
  for (;;) {
    n = ::recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
    if (n >= 0) break;
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      p.data.clear();
      p.would_block = true;
      return p;
    }
    if (errno == ECONNRESET) {
      p.data.clear();
      p.eof = true;
      return p;
    }
    return ErrnoError(errno, "recvmsg on the weightd socket");
  }
  // Take ownership of every descriptor first, so each is closed whatever happens next.
  for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
      const size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      for (size_t i = 0; i < count; ++i) {
        int fd;
        std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
        p.fds.emplace_back(fd);
      }
    }
  }
  if (msg.msg_flags & MSG_CTRUNC) p.truncated = true;
  if (msg.msg_flags & MSG_TRUNC) p.truncated = true;
  p.data.resize(static_cast<size_t>(n));
  // A zero-length packet on SEQPACKET is indistinguishable from EOF only when no fds came; an
  // empty packet is never a valid request, so treat both the same.
  if (n == 0 && p.fds.empty() && !p.truncated) p.eof = true;
  return p;
}

absl::StatusOr<sockaddr_un> UnixAddress(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof(addr.sun_path)) {
    return absl::InvalidArgumentError(absl::StrCat("socket path '", path, "' is longer than ",
                                                   sizeof(addr.sun_path) - 1, " bytes"));
  }
  std::memcpy(addr.sun_path, path.data(), path.size());
  return addr;
}

absl::StatusOr<UniqueFd> ConnectSeqpacket(const std::string& path) {
  WD_ASSIGN_OR_RETURN(sockaddr_un addr, UnixAddress(path));
  UniqueFd fd(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
  if (!fd) return ErrnoError(errno, "socket(AF_UNIX, SOCK_SEQPACKET)");
  for (;;) {
    if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) break;
    if (errno == EINTR) continue;
    const int err = errno;
    absl::Status s = ErrnoError(err, absl::StrCat("connect to weightd at ", path));
    if (err == ENOENT || err == ECONNREFUSED) {
      return absl::UnavailableError(
          absl::StrCat(s.message(), " (is weightd running? pass --socket or set WEIGHTD_SOCKET)"));
    }
    return s;
  }
  return fd;
}

std::string DefaultDaemonSocketPath() {
  if (::geteuid() == 0) return "/run/weightd/weightd.sock";
  const char* xdg = std::getenv("XDG_RUNTIME_DIR");
  if (xdg == nullptr || *xdg == '\0') return "";
  return absl::StrCat(xdg, "/weightd.sock");
}

std::string DefaultSocketPath() {
  if (const char* env = std::getenv("WEIGHTD_SOCKET"); env != nullptr && *env != '\0') return env;
  if (const char* xdg = std::getenv("XDG_RUNTIME_DIR"); xdg != nullptr && *xdg != '\0') {
    std::string p = absl::StrCat(xdg, "/weightd.sock");
    struct stat st;
    if (::stat(p.c_str(), &st) == 0) return p;
  }
  return "/run/weightd/weightd.sock";
}

}  // namespace weightd
