// Process helpers for tests that run the real weightd and client programs: spawn with output
// to files, wait with a deadline (killing what overruns), poll a condition. Header-only.
#ifndef WEIGHTD_TESTS_SUPPORT_PROCESS_H_
#define WEIGHTD_TESTS_SUPPORT_PROCESS_H_

#include <fcntl.h>
#include <grp.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <functional>
#include <iterator>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace weightd::testing {

using Clock = std::chrono::steady_clock;

// The whole file, or "" when it cannot be read.
inline std::string Slurp(const std::string& path) {
  std::ifstream f(path);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

// fork + execv of argv[0] with stdout to `out` and stderr to `err` (the same file when equal),
// with `env` added to this process's environment (e.g. fault injection for one child only).
inline pid_t Spawn(const std::vector<std::string>& argv, const std::string& out,
                   const std::string& err,
                   const std::vector<std::pair<std::string, std::string>>& env = {}) {
  const pid_t pid = ::fork();
  if (pid == 0) {
    for (const auto& [k, v] : env) ::setenv(k.c_str(), v.c_str(), 1);
    const int o = ::open(out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    const int e = err == out ? o : ::open(err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    ::dup2(o, 1);
    ::dup2(e, 2);
    std::vector<char*> args;
    for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    ::execv(args[0], args.data());
    ::_exit(127);
  }
  return pid;
}

// Waits for `pid` at most `timeout`; kills it if it runs longer. Returns the exit code (or
// 128 + signal).
inline int WaitFor(pid_t pid, std::chrono::milliseconds timeout) {
  const auto deadline = Clock::now() + timeout;
  int status = 0;
  for (;;) {
    const pid_t r = ::waitpid(pid, &status, WNOHANG);
    if (r == pid) break;
    if (Clock::now() > deadline) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, &status, 0);
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  return 128 + WTERMSIG(status);
}

// Polls `pred` every 10 ms until it holds or `timeout` passes; its last value.
template <typename Pred>
bool WaitUntil(Pred pred, std::chrono::milliseconds timeout = std::chrono::seconds(20)) {
  const auto deadline = Clock::now() + timeout;
  while (Clock::now() < deadline) {
    if (pred()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return pred();
}

// Runs `body` in a forked child that switched to uid/gid 65534 with `groups` as supplementary
// groups, and returns what it reported ("setuid failed" when the switch failed). nullopt when
// this process cannot switch uid (not root).
inline std::optional<std::string> AsNobody(const std::vector<gid_t>& groups,
                                           const std::function<std::string()>& body) {
  if (::geteuid() != 0) return std::nullopt;
  int pipefd[2];
  if (::pipe(pipefd) != 0) return std::string("pipe failed");
  const pid_t child = ::fork();
  if (child == 0) {
    ::close(pipefd[0]);
    std::string msg;
    if (::setgroups(groups.size(), groups.data()) != 0 || ::setgid(65534) != 0 ||
        ::setuid(65534) != 0) {
      msg = "setuid failed";
    } else {
      msg = body();
    }
    (void)!::write(pipefd[1], msg.data(), msg.size());
    ::_exit(0);
  }
  ::close(pipefd[1]);
  std::string msg;
  char buf[4096];
  for (ssize_t n; (n = ::read(pipefd[0], buf, sizeof(buf))) > 0;) msg.append(buf, n);
  ::close(pipefd[0]);
  WaitFor(child, std::chrono::seconds(20));
  return msg;
}

}  // namespace weightd::testing

#endif  // WEIGHTD_TESTS_SUPPORT_PROCESS_H_
