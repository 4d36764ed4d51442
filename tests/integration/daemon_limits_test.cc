// Integration tests of the daemon's limits and of what it writes to its log: each test starts
// its own weightd (host backend, a fresh directory, stdout and stderr to weightd.log) so it can
// set the config keys, the descriptor limit and the log level it is about, and stops it with
// SIGTERM.
#include <fcntl.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "support/process.h"
#include "weightd/client.h"
#include "weightd/seqpacket.h"

namespace weightd {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;
using json = nlohmann::json;
using testing::Slurp;
using testing::WaitFor;
using testing::WaitUntil;

// One daemon for one test. The config gets "socket" and "backend": "host" added.
class OwnDaemon {
 public:
  // `nofile` > 0: RLIMIT_NOFILE soft and hard limit of the daemon (it raises its soft limit to
  // the hard one at start). `args` are added to the command line.
  explicit OwnDaemon(json config, rlim_t nofile = 0, std::vector<std::string> args = {}) {
    char tmpl[] = "/tmp/weightd-limits-XXXXXX";
    dir_ = ::mkdtemp(tmpl);
    socket_ = dir_ + "/weightd.sock";
    config["socket"] = socket_;
    config["backend"] = "host";
    std::ofstream(dir_ + "/weightd.json") << config.dump();
    args.insert(args.begin(), {WEIGHTD_BIN, "--config", dir_ + "/weightd.json"});
    const std::string log = LogPath();
    pid_ = ::fork();
    if (pid_ == 0) {
      if (nofile > 0) {
        const rlimit rl{nofile, nofile};
        if (::setrlimit(RLIMIT_NOFILE, &rl) != 0) ::_exit(126);
      }
      const int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      ::dup2(fd, 1);
      ::dup2(fd, 2);
      std::vector<char*> argv;
      for (std::string& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      ::execv(argv[0], argv.data());
      ::_exit(127);
    }
    ready_ = WaitUntil([&] { return Client::Connect(socket_).ok(); });
  }
  ~OwnDaemon() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      WaitFor(pid_, std::chrono::seconds(10));
    }
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
  OwnDaemon(const OwnDaemon&) = delete;
  OwnDaemon& operator=(const OwnDaemon&) = delete;

  bool ready() const { return ready_; }
  pid_t pid() const { return pid_; }
  const std::string& dir() const { return dir_; }
  const std::string& socket() const { return socket_; }
  std::string LogPath() const { return dir_ + "/weightd.log"; }
  std::string Log() const { return Slurp(LogPath()); }

  // SIGTERM; the exit code (128 + signal if it had to be killed after 20 s).
  int Stop() {
    ::kill(pid_, SIGTERM);
    const int rc = WaitFor(pid_, std::chrono::seconds(20));
    pid_ = -1;
    return rc;
  }

 private:
  std::string dir_, socket_;
  pid_t pid_ = -1;
  bool ready_ = false;
};

// User plus system CPU time of `pid` so far, from /proc/<pid>/stat.
double CpuSeconds(pid_t pid) {
  const std::string stat = Slurp("/proc/" + std::to_string(pid) + "/stat");
  // The command name (field 2) may hold spaces; fields from 3 on follow its ')'.
  const size_t paren = stat.rfind(')');
  if (paren == std::string::npos) return -1;
  std::istringstream in(stat.substr(paren + 1));
  std::vector<std::string> fields;
  for (std::string f; in >> f;) fields.push_back(f);
  if (fields.size() < 13) return -1;
  // fields[0] is field 3 (state); utime and stime are fields 14 and 15.
  return (std::stod(fields[11]) + std::stod(fields[12])) / ::sysconf(_SC_CLK_TCK);
}

// The value of the unlabelled sample `name` in a text exposition, or -1.
double Sample(const std::string& text, const std::string& name) {
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) {
    if (line.rfind(name + " ", 0) == 0) return std::stod(line.substr(name.size() + 1));
  }
  return -1;
}

// Under a descriptor limit far below its connections, the daemon sheds the connections it cannot
// hold instead of spinning on accept(): little CPU, a short log, a metric, and it serves a new
// client as soon as connections close.
TEST(DaemonLimitsTest, FullDescriptorTableShedsConnectionsWithoutSpinning) {
  constexpr int kLimit = 64, kConnections = 100;
  OwnDaemon d({{"hello_timeout_ms", 60000}}, kLimit);
  ASSERT_TRUE(d.ready()) << d.Log();
  std::vector<UniqueFd> socks;
  for (int i = 0; i < kConnections; ++i) {
    auto fd = ConnectSeqpacket(d.socket());
    ASSERT_TRUE(fd.ok()) << i << ": " << fd.status();
    socks.push_back(std::move(*fd));
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  const double cpu_before = CpuSeconds(d.pid());
  std::this_thread::sleep_for(std::chrono::seconds(2));
  const double cpu = CpuSeconds(d.pid()) - cpu_before;
  EXPECT_LT(cpu, 0.2) << "CPU seconds in 2 s with a full descriptor table";
  const uintmax_t log_bytes = std::filesystem::file_size(d.LogPath());
  EXPECT_LT(log_bytes, 16u << 10) << d.Log().substr(0, 4096);
  EXPECT_THAT(d.Log(), HasSubstr("Too many open files"));

  socks.clear();
  std::string why;
  ASSERT_TRUE(WaitUntil(
      [&] {
        auto c = Client::Connect(d.socket());
        if (!c.ok()) {
          why = c.status().ToString();
          return false;
        }
        auto st = c->Status();
        why = st.status().ToString();
        return st.ok();
      },
      std::chrono::seconds(10)))
      << why;
  auto c = Client::Connect(d.socket());
  ASSERT_TRUE(c.ok()) << c.status();
  auto m = c->Metrics();
  ASSERT_TRUE(m.ok()) << m.status();
  // At most kLimit descriptors, a few of them the daemon's own: the rest of the connections
  // were shed.
  const double shed = Sample(*m, "weightd_connections_shed_total");
  EXPECT_GE(shed, kConnections - kLimit) << *m << d.Log();
  EXPECT_LE(shed, kConnections) << *m;
  EXPECT_EQ(d.Stop(), 0) << d.Log();
}

}  // namespace
}  // namespace weightd
