// A stand-in for systemd in tests that run the real weightd: FakeSystemd plays PID 1's part with
// real sockets. A datagram socket as NOTIFY_SOCKET records every message and keeps the fds sent
// with FDSTORE=1 in this process (FDSTOREREMOVE=1 drops them), so the store outlives any daemon,
// SIGKILL included; a launcher starts the daemon the way systemd does: fds dup'ed to 3..,
// LISTEN_FDS, LISTEN_FDNAMES and LISTEN_PID set to the child's own pid (fork, setenv, exec). The
// first fd is a pre-bound listening SOCK_SEQPACKET socket named "control" (ListenOn).
//
// The daemon's sd_notify blocks once the socket's queue is full (net.unix.max_dgram_qlen, often
// only 10 datagrams), so a test that makes the daemon store and remove many fds without calling
// Pump/WaitFor itself has StartPumping() read the socket on a thread, as PID 1 does.
//
// Thread-safety: the methods may be called from any thread (one mutex guards the log and the
// store), except store(), whose reference is for a test that does not pump on a thread.
// Header-only, gtest assertions.
#ifndef WEIGHTD_TESTS_SUPPORT_FAKE_SYSTEMD_H_
#define WEIGHTD_TESTS_SUPPORT_FAKE_SYSTEMD_H_

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "gtest/gtest.h"
#include "support/process.h"
#include "weightd/handoff.h"
#include "weightd/unique_fd.h"

namespace weightd::testing {

// PID 1's side of sd_notify and the fd store.
class FakeSystemd {
 public:
  explicit FakeSystemd(const std::string& dir) : path_(dir + "/notify") {
    sock_ = UniqueFd(::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0));
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strcpy(addr.sun_path, path_.c_str());
    EXPECT_EQ(::bind(sock_.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
    int on = 1;
    ::setsockopt(sock_.get(), SOL_SOCKET, SO_PASSCRED, &on, sizeof(on));
  }
  ~FakeSystemd() { StopPumping(); }
  FakeSystemd(const FakeSystemd&) = delete;
  FakeSystemd& operator=(const FakeSystemd&) = delete;
  const std::string& path() const { return path_; }

  // Reads the socket on a thread of its own until StopPumping() or destruction.
  void StartPumping() {
    if (pump_thread_.joinable()) return;
    pumping_ = true;
    pump_thread_ = std::thread([this] {
      while (pumping_.load()) Pump(20);
    });
  }
  void StopPumping() {
    if (!pump_thread_.joinable()) return;
    pumping_ = false;
    pump_thread_.join();
  }

  // Reads every pending message (waiting at most `ms` for the first). Concurrent callers (the
  // pumping thread and WaitFor) take turns per message, from recvmsg to the store, so messages
  // are applied in the order the daemon sent them, as by systemd: otherwise an FDSTOREREMOVE
  // and the FDSTORE of the same name right after it could be applied the other way round.
  void Pump(int ms = 50) {
    for (;;) {
      pollfd p{sock_.get(), POLLIN, 0};
      if (::poll(&p, 1, ms) != 1) return;
      ms = 0;
      std::lock_guard<std::mutex> turn(recv_mu_);
      char buf[4096];
      alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * 253) + CMSG_SPACE(sizeof(ucred))];
      iovec iov{buf, sizeof(buf)};
      msghdr msg{};
      msg.msg_iov = &iov;
      msg.msg_iovlen = 1;
      msg.msg_control = control;
      msg.msg_controllen = sizeof(control);
      // Another thread may have taken the message since poll() returned.
      const ssize_t n = ::recvmsg(sock_.get(), &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
      if (n < 0) return;
      std::vector<UniqueFd> fds;
      for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
          const size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
          for (size_t i = 0; i < k; ++i) {
            int fd;
            std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
            fds.emplace_back(fd);
          }
        }
      }
      const std::string text(buf, static_cast<size_t>(n));
      std::lock_guard<std::mutex> lock(mu_);
      log_ += text + "\n--\n";
      std::map<std::string, std::string> kv;
      size_t pos = 0;
      while (pos < text.size()) {
        size_t nl = text.find('\n', pos);
        if (nl == std::string::npos) nl = text.size();
        const std::string line = text.substr(pos, nl - pos);
        const size_t eq = line.find('=');
        if (eq != std::string::npos) kv[line.substr(0, eq)] = line.substr(eq + 1);
        pos = nl + 1;
      }
      if (kv["FDSTORE"] == "1") {
        EXPECT_EQ(kv["FDPOLL"], "0") << text;
        for (UniqueFd& f : fds) store_.push_back({kv["FDNAME"], std::move(f)});
      } else if (kv["FDSTOREREMOVE"] == "1") {
        std::erase_if(store_, [&](const NamedFd& f) { return f.name == kv["FDNAME"]; });
        removed_.push_back(kv["FDNAME"]);
      } else {
        EXPECT_TRUE(fds.empty()) << "fds without FDSTORE=1: " << text;
      }
    }
  }
  bool WaitFor(const std::string& want, std::chrono::milliseconds t = std::chrono::seconds(20)) {
    return WaitUntil(
        [&] {
          Pump(20);
          std::lock_guard<std::mutex> lock(mu_);
          return log_.find(want) != std::string::npos;
        },
        t);
  }
  std::string log() const {
    std::lock_guard<std::mutex> lock(mu_);
    return log_;
  }
  void ClearLog() {
    std::lock_guard<std::mutex> lock(mu_);
    log_.clear();
  }
  std::vector<std::string> StoredNames() const {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<std::string> out;
    for (const NamedFd& f : store_) out.push_back(f.name);
    return out;
  }
  std::vector<NamedFd>& store() { return store_; }
  std::vector<std::string> removed() const {
    std::lock_guard<std::mutex> lock(mu_);
    return removed_;
  }

  // Starts weightd as systemd would, passing `listener` ("control") and the stored fds plus
  // `extra`. stderr goes to `log_path`.
  pid_t Launch(int listener, const std::vector<std::string>& args, const std::string& log_path,
               const std::vector<NamedFd>& extra = {}) {
    // Held across fork() so that the stored fds stay open until the child has them.
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<std::pair<std::string, int>> fds = {{kListenerFdName, listener}};
    for (const NamedFd& f : store_) fds.push_back({f.name, f.fd.get()});
    for (const NamedFd& f : extra) fds.push_back({f.name, f.fd.get()});
    const pid_t pid = ::fork();
    if (pid == 0) {
      // Move every fd out of the way first so dup2 to 3.. never overwrites one still needed.
      std::vector<int> high;
      for (auto& [name, fd] : fds) high.push_back(::fcntl(fd, F_DUPFD, 1000));
      std::string names;
      for (size_t i = 0; i < fds.size(); ++i) {
        ::dup2(high[i], 3 + static_cast<int>(i));  // dup2 clears FD_CLOEXEC
        names += (i ? ":" : "") + fds[i].first;
      }
      for (int h : high) ::close(h);
      const int e = ::open(log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
      ::dup2(e, 2);
      ::setenv("LISTEN_FDS", std::to_string(fds.size()).c_str(), 1);
      ::setenv("LISTEN_FDNAMES", names.c_str(), 1);
      ::setenv("LISTEN_PID", std::to_string(::getpid()).c_str(), 1);
      ::setenv("NOTIFY_SOCKET", path_.c_str(), 1);
      std::vector<char*> argv;
      for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
      argv.push_back(nullptr);
      ::execv(argv[0], argv.data());
      ::_exit(127);
    }
    return pid;
  }

 private:
  std::string path_;
  UniqueFd sock_;
  std::mutex recv_mu_;  // held from recvmsg until the message is applied (before mu_)
  mutable std::mutex mu_;
  std::string log_;
  std::vector<NamedFd> store_;
  std::vector<std::string> removed_;
  std::atomic<bool> pumping_{false};
  std::thread pump_thread_;
};

// A listening SOCK_SEQPACKET socket bound to `path` (mode 0666), as weightd.socket makes it.
inline UniqueFd ListenOn(const std::string& path) {
  UniqueFd fd(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strcpy(addr.sun_path, path.c_str());
  EXPECT_EQ(::bind(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  ::chmod(path.c_str(), 0666);
  EXPECT_EQ(::listen(fd.get(), 4096), 0);
  return fd;
}

}  // namespace weightd::testing

#endif  // WEIGHTD_TESTS_SUPPORT_FAKE_SYSTEMD_H_
