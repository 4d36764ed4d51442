// Integration tests of the daemon's limits and of what it writes to its log: each test starts
// its own weightd (host backend, a fresh directory, stdout and stderr to weightd.log) so it can
// set the config keys, the descriptor limit and the log level it is about, and stops it with
// SIGTERM.
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <memory>
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

using ::testing::EndsWith;
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

constexpr char kHello[] = R"({"op":"hello","version":1,"id":0})";
constexpr char kAttachDemo[] = R"({"op":"attach","name":"demo","rank":0,"id":1})";

// A protocol connection without the client library. Fds that come with a reply are closed at
// once (the daemon's lease stays until detach or until the connection closes).
class Raw {
 public:
  explicit Raw(const std::string& socket) {
    auto fd = ConnectSeqpacket(socket);
    if (fd.ok()) fd_ = std::move(*fd);
  }
  // The reply, or {"eof":true} / {"timeout":true} / {"send_failed":true}.
  json Call(const std::string& request) {
    if (!SendPacket(fd_.get(), request).ok()) return {{"send_failed", true}};
    pollfd p{fd_.get(), POLLIN, 0};
    if (::poll(&p, 1, 10000) != 1) return {{"timeout", true}};
    auto packet = RecvPacket(fd_.get(), 8 << 20);
    if (!packet.ok() || packet->eof) return {{"eof", true}};
    return json::parse(packet->data, nullptr, false);
  }

 private:
  UniqueFd fd_;
};

// Writes the demo checkpoint (tests/python/make_demo_checkpoint.py) to `dir`; "" or the error.
std::string MakeDemoCheckpoint(const std::string& dir) {
  const std::string out = dir + ".out";
  const int rc = WaitFor(testing::Spawn({PYTHON_BIN, MAKE_DEMO_CHECKPOINT, dir}, out, out),
                         std::chrono::seconds(60));
  return rc == 0 ? "" : "make_demo_checkpoint.py failed: " + Slurp(out);
}

// Loads `name` from `checkpoint` and waits until it is ready; "" or what went wrong.
std::string LoadAndWait(const std::string& socket, const std::string& name,
                        const std::string& checkpoint) {
  auto c = Client::Connect(socket);
  if (!c.ok()) return c.status().ToString();
  LoadOptions o;
  o.recipe = "hf";
  if (absl::Status s = c->Load(name, checkpoint, o); !s.ok()) return s.ToString();
  std::string state;
  WaitUntil([&] {
    auto st = c->Status(name);
    state = st.ok() ? st->front().state + " " + st->front().error : st.status().ToString();
    return st.ok() && st->front().state != "loading";
  });
  return state == "ready " ? "" : state;
}

// Under a descriptor limit far below its connections, the daemon sheds the connections it cannot
// hold instead of spinning on accept(): little CPU, a short log, a metric, and it serves a new
// client as soon as connections close.
TEST(DaemonLimitsTest, FullDescriptorTableShedsConnectionsWithoutSpinning) {
  constexpr int kLimit = 64, kConnections = 100;
  OwnDaemon d(json{{"hello_timeout_ms", 60000}}, kLimit);
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

// At the default log level attaches and detaches leave no line in the log (they are counted
// in the metrics); loads still log their state changes.
TEST(DaemonLogTest, AttachAndDetachAreNotLoggedAtInfo) {
  constexpr int kAttaches = 40, kClosedConnections = 10;
  OwnDaemon d(json{{"io_threads", 2}});
  ASSERT_TRUE(d.ready()) << d.Log();
  const std::string ckpt = d.dir() + "/demo";
  ASSERT_EQ(MakeDemoCheckpoint(ckpt), "");
  ASSERT_EQ(LoadAndWait(d.socket(), "demo", ckpt), "") << d.Log();
  auto c = Client::Connect(d.socket());
  ASSERT_TRUE(c.ok()) << c.status();
  for (int i = 0; i < kAttaches; ++i) {
    auto a = c->Attach("demo", 0);
    ASSERT_TRUE(a.ok()) << a.status();
    ASSERT_TRUE(a->Detach().ok());
  }
  // Leases released by their connection closing.
  for (int i = 0; i < kClosedConnections; ++i) {
    Raw raw(d.socket());
    ASSERT_EQ(raw.Call(kHello).value("ok", false), true);
    const json reply = raw.Call(kAttachDemo);
    ASSERT_EQ(reply.value("ok", false), true) << reply.dump();
  }
  std::string metrics;
  EXPECT_TRUE(WaitUntil([&] {
    auto m = c->Metrics();
    metrics = m.ok() ? *m : m.status().ToString();
    return Sample(metrics, "weightd_detaches_total") == kAttaches + kClosedConnections;
  })) << metrics;
  EXPECT_EQ(Sample(metrics, "weightd_attaches_total"), kAttaches + kClosedConnections);
  const std::string log = d.Log();
  EXPECT_THAT(log, HasSubstr("load demo: done"));
  EXPECT_THAT(log, Not(HasSubstr("attach demo")));
  EXPECT_THAT(log, Not(HasSubstr("detach demo")));
  EXPECT_THAT(log, Not(HasSubstr("lease")));
  EXPECT_EQ(d.Stop(), 0) << d.Log();
}

// One connection holds at most max_leases_per_connection leases; the refusal names the key,
// and a detach makes room again.
TEST(DaemonLimitsTest, LeaseCapPerConnection) {
  OwnDaemon d(json{{"max_leases_per_connection", 5}, {"io_threads", 2}});
  ASSERT_TRUE(d.ready()) << d.Log();
  const std::string ckpt = d.dir() + "/demo";
  ASSERT_EQ(MakeDemoCheckpoint(ckpt), "");
  ASSERT_EQ(LoadAndWait(d.socket(), "demo", ckpt), "") << d.Log();
  Raw raw(d.socket());
  ASSERT_EQ(raw.Call(kHello).value("ok", false), true);
  for (int i = 0; i < 5; ++i) {
    const json reply = raw.Call(kAttachDemo);
    ASSERT_EQ(reply.value("ok", false), true) << i << ": " << reply.dump();
  }
  json refused = raw.Call(kAttachDemo);
  ASSERT_TRUE(refused.contains("error")) << refused.dump();
  EXPECT_EQ(refused["error"].value("code", ""), "RESOURCE_EXHAUSTED");
  EXPECT_THAT(refused["error"].value("message", ""), HasSubstr("max_leases_per_connection"));
  // Other connections are not limited by this one's leases.
  auto c = Client::Connect(d.socket());
  ASSERT_TRUE(c.ok()) << c.status();
  auto a = c->Attach("demo", 0);
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(a->Detach().ok());
  auto st = c->Status(std::string("demo"));
  ASSERT_TRUE(st.ok()) << st.status();
  EXPECT_EQ(st->front().ranks[0].lease_count, 5u);
  ASSERT_EQ(raw.Call(R"({"op":"detach","name":"demo","rank":0,"id":2})").value("ok", false), true);
  EXPECT_EQ(raw.Call(kAttachDemo).value("ok", false), true);
  EXPECT_EQ(d.Stop(), 0) << d.Log();
}

// With many leases the status reply lists a bounded number and counts them all; the client
// library and weightctl show the count.
TEST(DaemonLimitsTest, StatusReplyStaysBoundedWithManyLeases) {
  constexpr int kLeases = 1500;
  OwnDaemon d(json{{"io_threads", 2}});
  ASSERT_TRUE(d.ready()) << d.Log();
  const std::string ckpt = d.dir() + "/demo";
  ASSERT_EQ(MakeDemoCheckpoint(ckpt), "");
  ASSERT_EQ(LoadAndWait(d.socket(), "demo", ckpt), "") << d.Log();
  Raw raw(d.socket());
  ASSERT_EQ(raw.Call(kHello).value("ok", false), true);
  for (int i = 0; i < kLeases; ++i) {
    const json reply = raw.Call(kAttachDemo);
    ASSERT_EQ(reply.value("ok", false), true) << i << ": " << reply.dump();
  }
  const json status = raw.Call(R"({"op":"status","id":3})");
  ASSERT_EQ(status.value("ok", false), true) << status.dump().substr(0, 2000);
  const json& rank = status["result"]["models"][0]["ranks"][0];
  EXPECT_EQ(rank.value("lease_count", 0), kLeases);
  EXPECT_EQ(rank["leases"].size(), 64u);
  EXPECT_LT(status.dump().size(), 8u << 10);

  auto c = Client::Connect(d.socket());
  ASSERT_TRUE(c.ok()) << c.status();
  auto st = c->Status(std::string("demo"));
  ASSERT_TRUE(st.ok()) << st.status();
  EXPECT_EQ(st->front().ranks[0].lease_count, static_cast<uint64_t>(kLeases));
  EXPECT_EQ(st->front().ranks[0].leases.size(), 64u);
  const std::string out = d.dir() + "/status.out";
  ASSERT_EQ(
      WaitFor(testing::Spawn({WEIGHTCTL_BIN, "status", "demo", "--socket", d.socket()}, out, out),
              std::chrono::seconds(30)),
      0)
      << Slurp(out);
  EXPECT_THAT(Slurp(out), HasSubstr("1500 leases pids "));
  const std::string json_out = d.dir() + "/status.json";
  ASSERT_EQ(
      WaitFor(testing::Spawn({WEIGHTCTL_BIN, "status", "demo", "--json", "--socket", d.socket()},
                             json_out, json_out),
              std::chrono::seconds(30)),
      0);
  EXPECT_THAT(Slurp(json_out), HasSubstr("\"lease_count\": 1500"));
  EXPECT_EQ(d.Stop(), 0) << d.Log();
}

// Of max_connections, one uid holds at most max_connections_per_uid; another uid still gets in,
// and a closed connection makes room again.
TEST(DaemonLimitsTest, ConnectionCapPerUid) {
  OwnDaemon d(json{{"max_connections_per_uid", 3}, {"socket_mode", "0666"}});
  ASSERT_TRUE(d.ready()) << d.Log();
  ::chmod(d.dir().c_str(), 0755);  // reachable by the uid-65534 child
  // Client::Connect in OwnDaemon's wait closed its connections; the daemon may not have seen it.
  std::vector<std::unique_ptr<Raw>> held;
  ASSERT_TRUE(WaitUntil([&] {
    held.clear();
    for (int i = 0; i < 3; ++i) {
      held.push_back(std::make_unique<Raw>(d.socket()));
      if (held.back()->Call(kHello).value("ok", false) != true) return false;
    }
    return true;
  }));
  Raw extra(d.socket());
  const json refused = extra.Call(kHello);
  ASSERT_TRUE(refused.contains("error")) << refused.dump();
  EXPECT_EQ(refused["error"].value("code", ""), "RESOURCE_EXHAUSTED");
  EXPECT_THAT(refused["error"].value("message", ""), HasSubstr("max_connections_per_uid"));
  EXPECT_THAT(refused["error"].value("message", ""),
              HasSubstr("uid " + std::to_string(::geteuid())));
  const std::optional<std::string> other =
      testing::AsNobody({}, [&] { return Raw(d.socket()).Call(kHello).dump(); });
  if (other) {
    EXPECT_THAT(*other, HasSubstr("\"ok\":true")) << "uid 65534 was refused";
  }
  held.pop_back();
  EXPECT_TRUE(WaitUntil([&] { return Raw(d.socket()).Call(kHello).value("ok", false) == true; }));
  EXPECT_EQ(d.Stop(), 0) << d.Log();
}

// SIGTERM during a load: the load is cancelled for the shutdown (not "unload --force"), and its
// last line comes before the daemon's "stopped".
TEST(DaemonLogTest, SigtermCancelsARunningLoadBeforeStopped) {
  OwnDaemon d(json{{"io_threads", 1}, {"pinned_budget", "1MiB"}});
  ASSERT_TRUE(d.ready()) << d.Log();
  // 1 GiB of tensors in a sparse file: quick to write, long enough to read that the load is
  // still running when SIGTERM arrives.
  const std::string dir = d.dir() + "/big";
  std::filesystem::create_directory(dir);
  {
    constexpr int kTensors = 16;
    constexpr uint64_t kBytes = 64ull << 20;
    std::string header = "{";
    for (int i = 0; i < kTensors; ++i) {
      header += (i ? ",\"t" : "\"t") + std::to_string(i) + "\":{\"dtype\":\"U8\",\"shape\":[" +
                std::to_string(kBytes) + "],\"data_offsets\":[" + std::to_string(i * kBytes) + "," +
                std::to_string((i + 1) * kBytes) + "]}";
    }
    header += "}";
    while (header.size() % 8) header += ' ';
    const uint64_t n = header.size();
    {
      std::ofstream f(dir + "/model.safetensors", std::ios::binary);
      f.write(reinterpret_cast<const char*>(&n), 8);
      f << header;
    }
    std::filesystem::resize_file(dir + "/model.safetensors", 8 + n + kTensors * kBytes);
  }
  auto c = Client::Connect(d.socket());
  ASSERT_TRUE(c.ok()) << c.status();
  LoadOptions o;
  o.recipe = "hf";
  ASSERT_TRUE(c->Load("big", dir, o).ok());
  // Reading has begun (the plan is made and the arena allocated).
  ASSERT_TRUE(WaitUntil([&] {
    auto st = c->Status(std::string("big"));
    return st.ok() && (st->front().bytes_done > 0 || st->front().state != "loading");
  })) << d.Log();
  EXPECT_EQ(d.Stop(), 0) << d.Log();
  const std::string log = d.Log();
  if (log.find("load big: done") != std::string::npos) {
    GTEST_SKIP() << "the load finished before SIGTERM arrived:\n" << log;
  }
  EXPECT_THAT(log, HasSubstr("load big: cancelled after "));
  EXPECT_THAT(log, HasSubstr("weightd is shutting down"));
  EXPECT_THAT(log, Not(HasSubstr("unload --force")));
  EXPECT_THAT(log, Not(HasSubstr("failed")));
  // "stopped" is the last line.
  std::string last = log.substr(0, log.find_last_not_of('\n') + 1);
  last = last.substr(last.rfind('\n') + 1);
  EXPECT_THAT(last, EndsWith("weightd: stopped")) << log;
  EXPECT_LT(log.find("load big: cancelled"), log.find("weightd: stopped")) << log;
}

}  // namespace
}  // namespace weightd
