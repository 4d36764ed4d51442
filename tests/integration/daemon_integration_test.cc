// Integration tests: start the real weightd on a temporary socket and drive it with real client
// processes (weightctl, wd_attach_check) and raw sockets for the robustness cases.
//
// The suite owns one daemon (SetUpTestSuite) whose config allows hello within 1 s, 1010
// connections (all of them to one uid), socket mode 0666 (so the uid-65534 test reaches it; the
// model's allow list is what must refuse it) and model_roots = <tmp>/models. TearDownTestSuite
// kills the daemon and removes the directory; a gtest environment does the same if the process
// exits early, and every wait is bounded.
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <optional>
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
using json = nlohmann::json;
using testing::AsNobody;
using testing::Clock;
using testing::Slurp;
using testing::Spawn;
using testing::WaitFor;
using testing::WaitUntil;

std::string g_dir;     // temporary directory (0755)
std::string g_socket;  // daemon socket
std::string g_ckpt;    // demo checkpoint under model_roots
pid_t g_daemon = -1;

struct RunResult {
  int exit_code = -1;
  std::string out, err;
};

RunResult RunProcess(std::vector<std::string> argv,
                     std::chrono::milliseconds timeout = std::chrono::seconds(60)) {
  static int n = 0;
  const std::string base = g_dir + "/run" + std::to_string(n++);
  RunResult r;
  r.exit_code = WaitFor(Spawn(argv, base + ".out", base + ".err"), timeout);
  r.out = Slurp(base + ".out");
  r.err = Slurp(base + ".err");
  return r;
}

RunResult Ctl(std::vector<std::string> args) {
  args.insert(args.begin(), WEIGHTCTL_BIN);
  args.push_back("--socket");
  args.push_back(g_socket);
  return RunProcess(args);
}

void StopDaemon() {
  if (g_daemon > 0) {
    ::kill(g_daemon, SIGTERM);
    if (WaitFor(g_daemon, std::chrono::seconds(10)) != 0) {
      std::fprintf(stderr, "weightd did not exit cleanly\n");
    }
    g_daemon = -1;
  }
}

void RemoveDir() {
  if (!g_dir.empty()) {
    std::error_code ec;
    std::filesystem::remove_all(g_dir, ec);
    g_dir.clear();
  }
}

// Kills the daemon and removes the directory even when a fatal failure ends the process early.
class Cleanup : public ::testing::Environment {
 public:
  void TearDown() override {
    StopDaemon();
    RemoveDir();
  }
};
const auto* const kCleanup = ::testing::AddGlobalTestEnvironment(new Cleanup);

std::string ModelState(const std::string& name) {
  auto c = Client::Connect(g_socket);
  if (!c.ok()) return "connect: " + c.status().ToString();
  auto st = c->Status(name);
  if (!st.ok()) return st.status().ToString();
  return st->front().state;
}

// A raw protocol connection for the robustness tests.
class Raw {
 public:
  Raw() {
    auto fd = ConnectSeqpacket(g_socket);
    EXPECT_TRUE(fd.ok()) << fd.status();
    if (fd.ok()) fd_ = std::move(*fd);
  }
  int fd() const { return fd_.get(); }
  void Send(const std::string& s, std::vector<int> fds = {}) {
    ASSERT_TRUE(SendPacket(fd_.get(), s, fds).ok());
  }
  // The next reply, or {"eof":true} / {"timeout":true}.
  json Recv(int timeout_ms = 5000) {
    pollfd p{fd_.get(), POLLIN, 0};
    if (::poll(&p, 1, timeout_ms) <= 0) return {{"timeout", true}};
    auto pkt = RecvPacket(fd_.get(), 1 << 20);
    if (!pkt.ok() || pkt->eof) return {{"eof", true}};
    return json::parse(pkt->data, nullptr, false);
  }
  json Call(const std::string& s) {
    Send(s);
    return Recv();
  }
  void Hello() {
    json r = Call(R"({"op":"hello","version":1,"id":0})");
    ASSERT_EQ(r.value("ok", false), true) << r.dump();
  }

 private:
  UniqueFd fd_;
};

std::string ErrorCode(const json& r) {
  if (!r.contains("error")) return "(no error: " + r.dump() + ")";
  return r["error"].value("code", "");
}
std::string ErrorMessage(const json& r) {
  if (!r.contains("error")) return "";
  return r["error"].value("message", "");
}

// Writes the length prefix and header of a safetensors file of `n` U8 tensors t0..t{n-1} of
// `bytes` each, and returns the stream positioned at the data section.
std::ofstream WriteU8Header(const std::string& path, int n, uint64_t bytes) {
  std::string header = "{";
  for (int i = 0; i < n; ++i) {
    header += (i ? ",\"" : "\"") + std::string("t") + std::to_string(i) +
              "\":{\"dtype\":\"U8\",\"shape\":[" + std::to_string(bytes) + "],\"data_offsets\":[" +
              std::to_string(i * bytes) + "," + std::to_string((i + 1) * bytes) + "]}";
  }
  header += "}";
  while (header.size() % 8) header += ' ';
  std::ofstream f(path, std::ios::binary);
  const uint64_t len = header.size();
  f.write(reinterpret_cast<const char*>(&len), 8);
  f << header;
  return f;
}

class DaemonTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    char tmpl[] = "/tmp/weightd-it-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    g_dir = tmpl;
    ::chmod(g_dir.c_str(), 0755);  // reachable by the uid-65534 test
    g_socket = g_dir + "/weightd.sock";
    std::filesystem::create_directory(g_dir + "/models");
    g_ckpt = g_dir + "/models/demo";
    RunResult mk = RunProcess({PYTHON_BIN, MAKE_DEMO_CHECKPOINT, g_ckpt});
    ASSERT_EQ(mk.exit_code, 0) << mk.err;
    std::ofstream(g_dir + "/weightd.json")
        << json{{"socket", g_socket},       {"backend", "host"},
                {"hello_timeout_ms", 1000}, {"max_connections", 1010},
                {"socket_mode", "0666"},    {"model_roots", {g_dir + "/models"}},
                {"io_threads", 2},          {"max_connections_per_uid", 1010}}
               .dump();
    g_daemon = Spawn({WEIGHTD_BIN, "--config", g_dir + "/weightd.json", "--log-level", "debug"},
                     g_dir + "/weightd.out", g_dir + "/weightd.log");
    ASSERT_TRUE(WaitUntil([] { return Client::Connect(g_socket).ok(); }))
        << Slurp(g_dir + "/weightd.log");
    RunResult load = Ctl({"load", "demo", g_ckpt, "--recipe-name", "hf", "--wait"});
    ASSERT_EQ(load.exit_code, 0) << load.out << load.err;
  }
  static void TearDownTestSuite() {
    StopDaemon();
    if (::testing::UnitTest::GetInstance()->Failed()) {
      std::fprintf(stderr, "---- weightd log ----\n%s\n", Slurp(g_dir + "/weightd.log").c_str());
    }
    RemoveDir();
  }
};

TEST(DaemonCliTest, HelpAndUsageErrors) {
  char tmpl[] = "/tmp/weightd-cli-XXXXXX";
  ASSERT_NE(::mkdtemp(tmpl), nullptr);
  g_dir = tmpl;
  RunResult h = RunProcess({WEIGHTD_BIN, "--help"});
  EXPECT_EQ(h.exit_code, 0);
  EXPECT_THAT(h.out, HasSubstr("--pinned-budget BYTES"));
  EXPECT_THAT(h.out, HasSubstr("docs/CONFIG.md"));
  RunResult bad = RunProcess({WEIGHTD_BIN, "--frobnicate"});
  EXPECT_EQ(bad.exit_code, 2);
  EXPECT_THAT(bad.err, HasSubstr("unknown option '--frobnicate'"));
  RunResult be = RunProcess({WEIGHTD_BIN, "--backend", "tpu", "--socket", g_dir + "/s"});
  EXPECT_EQ(be.exit_code, 1);
  EXPECT_THAT(be.err, HasSubstr("unknown backend 'tpu'"));
  std::ofstream(g_dir + "/bad.json") << R"({"sockit": 1})";
  RunResult cfg = RunProcess({WEIGHTD_BIN, "--config", g_dir + "/bad.json"});
  EXPECT_EQ(cfg.exit_code, 1);
  EXPECT_THAT(cfg.err, HasSubstr("unknown key 'sockit'"));
  RemoveDir();
}

// With stderr connected to the journal ($JOURNAL_STREAM names it), lines carry sd-daemon
// priority prefixes.
TEST(DaemonCliTest, JournaldPrefixes) {
  char tmpl[] = "/tmp/weightd-cli-XXXXXX";
  ASSERT_NE(::mkdtemp(tmpl), nullptr);
  g_dir = tmpl;
  const std::string err = g_dir + "/stderr";
  const pid_t pid = ::fork();
  if (pid == 0) {
    const int fd = ::open(err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    struct stat st;
    ::fstat(fd, &st);
    const std::string js = std::to_string(st.st_dev) + ":" + std::to_string(st.st_ino);
    ::setenv("JOURNAL_STREAM", js.c_str(), 1);
    ::dup2(fd, 2);
    ::execl(WEIGHTD_BIN, WEIGHTD_BIN, "--backend", "cuda", "--socket", (g_dir + "/s").c_str(),
            nullptr);
    ::_exit(127);
  }
  EXPECT_EQ(WaitFor(pid, std::chrono::seconds(20)), 1);
  EXPECT_THAT(Slurp(err), HasSubstr("<3>weightd: start failed: backend 'cuda' is not available"));
  RemoveDir();
}

// The systemd side of weightd.service/weightd.socket: socket activation (the daemon serves the
// passed socket and binds nothing), READY=1, watchdog pings from the event loop, SIGHUP does not
// kill it, STOPPING=1 on SIGTERM.
TEST(DaemonCliTest, SystemdSocketActivationNotifyAndWatchdog) {
  const char* activate = "/usr/bin/systemd-socket-activate";
  if (::access(activate, X_OK) != 0) GTEST_SKIP() << "no systemd-socket-activate";
  char tmpl[] = "/tmp/weightd-cli-XXXXXX";
  ASSERT_NE(::mkdtemp(tmpl), nullptr);
  g_dir = tmpl;
  const std::string notify_path = g_dir + "/notify";
  UniqueFd notify(::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0));
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strcpy(addr.sun_path, notify_path.c_str());
  ASSERT_EQ(::bind(notify.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  const std::string sock = g_dir + "/activated.sock";
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::setenv("NOTIFY_SOCKET", notify_path.c_str(), 1);
    ::setenv("WATCHDOG_USEC", "400000", 1);
    const int e = ::open((g_dir + "/weightd.log").c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    ::dup2(e, 2);
    ::execl(activate, activate, "-E", "NOTIFY_SOCKET", "-E", "WATCHDOG_USEC", "--seqpacket",
            "--fdname=control", "-l", sock.c_str(), WEIGHTD_BIN, "--backend", "host", "--socket",
            (g_dir + "/unused.sock").c_str(), nullptr);
    ::_exit(127);
  }
  std::string messages;
  auto read_notify = [&](const std::string& want) {
    const auto deadline = Clock::now() + std::chrono::seconds(10);
    while (messages.find(want) == std::string::npos && Clock::now() < deadline) {
      pollfd p{notify.get(), POLLIN, 0};
      if (::poll(&p, 1, 100) == 1) {
        char buf[4096];
        const ssize_t n = ::recv(notify.get(), buf, sizeof(buf), 0);
        if (n > 0) messages.append(buf, n).append("\n");
      }
    }
    return messages.find(want) != std::string::npos;
  };
  // systemd-socket-activate starts the daemon at the first connection.
  ASSERT_TRUE(WaitUntil([&] { return ::access(sock.c_str(), F_OK) == 0; }));
  auto c = Client::Connect(sock);
  ASSERT_TRUE(c.ok()) << c.status() << Slurp(g_dir + "/weightd.log");
  EXPECT_TRUE(c->List().ok());
  EXPECT_TRUE(read_notify("READY=1")) << messages;
  EXPECT_TRUE(read_notify("WATCHDOG=1")) << messages;
  EXPECT_NE(::access((g_dir + "/unused.sock").c_str(), F_OK), 0) << "bound its own socket";
  ::kill(pid, SIGHUP);
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  EXPECT_TRUE(c->List().ok()) << "SIGHUP stopped the daemon";
  ::kill(pid, SIGTERM);
  EXPECT_EQ(WaitFor(pid, std::chrono::seconds(10)), 0);
  EXPECT_TRUE(read_notify("STOPPING=1")) << messages;
  EXPECT_THAT(Slurp(g_dir + "/weightd.log"), HasSubstr("socket passed by systemd"));
  EXPECT_THAT(Slurp(g_dir + "/weightd.log"), HasSubstr("SIGHUP"));
  RemoveDir();
}

TEST_F(DaemonTest, StatusAndListShowTheReadyModel) {
  RunResult st = Ctl({"status", "demo", "--json"});
  ASSERT_EQ(st.exit_code, 0) << st.err;
  json j = json::parse(st.out);
  ASSERT_EQ(j["models"].size(), 1u);
  EXPECT_EQ(j["models"][0]["state"], "ready");
  EXPECT_EQ(j["models"][0]["bytes_done"], j["models"][0]["bytes_total"]);
  EXPECT_GT(j["models"][0]["bytes_total"].get<uint64_t>(), 0u);
  RunResult plain = Ctl({"status"});
  EXPECT_THAT(plain.out, HasSubstr("demo"));
  EXPECT_THAT(plain.out, HasSubstr("ready"));
  RunResult list = Ctl({"list"});
  EXPECT_THAT(list.out, HasSubstr("demo\tready\ttp=1\tranks=0"));
  RunResult m = Ctl({"metrics"});
  EXPECT_THAT(m.out, HasSubstr("weightd_rank_ready{model=\"demo\",rank=\"0\"} 1"));
}

TEST_F(DaemonTest, SixteenConcurrentClientProcessesSeeCheckpointBytes) {
  std::vector<pid_t> pids;
  for (int i = 0; i < 16; ++i) {
    pids.push_back(Spawn({ATTACH_CHECK_BIN, g_socket, "demo", "0", g_ckpt},
                         g_dir + "/ac" + std::to_string(i) + ".out",
                         g_dir + "/ac" + std::to_string(i) + ".err"));
  }
  for (int i = 0; i < 16; ++i) {
    EXPECT_EQ(WaitFor(pids[i], std::chrono::seconds(60)), 0)
        << Slurp(g_dir + "/ac" + std::to_string(i) + ".err");
  }
  RunResult v = Ctl({"attach", "demo", "--rank", "0", "--verify"});
  EXPECT_EQ(v.exit_code, 0) << v.err;
  EXPECT_THAT(v.out, HasSubstr("verify: OK"));
}

// T=2 with the llama recipe (fused qkv / gate_up, row and column slices, padded vocab), and
// again with a dtype conversion: every rank's bytes equal what `weightctl shard` writes offline
// for the same options, compared from concurrent client processes.
TEST_F(DaemonTest, TensorParallelRanksMatchWeightctlShard) {
  for (const std::string dtype : {"", "fp32"}) {
    const std::string name = "llama2" + dtype;
    const std::string out = g_dir + "/shard-" + name;
    std::vector<std::string> shard = {WEIGHTCTL_BIN, "shard", g_ckpt, "--tp", "2", "--out", out};
    std::vector<std::string> load = {"load", name, g_ckpt, "--tp", "2", "--wait"};
    if (!dtype.empty()) {
      shard.insert(shard.end(), {"--dtype", dtype});
      load.insert(load.end(), {"--dtype", dtype});
    }
    RunResult s = RunProcess(shard);
    ASSERT_EQ(s.exit_code, 0) << s.out << s.err;
    RunResult l = Ctl(load);
    ASSERT_EQ(l.exit_code, 0) << l.out << l.err;
    std::vector<pid_t> pids;
    for (int rank = 0; rank < 2; ++rank) {
      for (int copy = 0; copy < 4; ++copy) {
        const std::string file =
            out + "/model-rank-" + std::to_string(rank) + "-part-0.safetensors";
        pids.push_back(Spawn({ATTACH_CHECK_BIN, g_socket, name, std::to_string(rank), file},
                             g_dir + "/tp" + std::to_string(pids.size()) + ".out",
                             g_dir + "/tp" + std::to_string(pids.size()) + ".err"));
      }
    }
    for (size_t i = 0; i < pids.size(); ++i) {
      EXPECT_EQ(WaitFor(pids[i], std::chrono::seconds(60)), 0)
          << name << ": " << Slurp(g_dir + "/tp" + std::to_string(i) + ".err");
    }
    if (!dtype.empty()) {
      EXPECT_EQ(Ctl({"unload", name}).exit_code, 0);
    }
  }
}

TEST_F(DaemonTest, TensorParallelLoadAttachesEveryRank) {
  RunResult load = Ctl({"load", "llama2", g_ckpt, "--tp", "2", "--wait"});
  if (load.err.find("ALREADY_EXISTS") == std::string::npos) {
    ASSERT_EQ(load.exit_code, 0) << load.out << load.err;
  }
  for (const char* rank : {"0", "1"}) {
    RunResult v = Ctl({"attach", "llama2", "--rank", rank, "--verify"});
    EXPECT_EQ(v.exit_code, 0) << v.err;
    EXPECT_THAT(v.out, HasSubstr("verify: OK"));
  }
  auto c = Client::Connect(g_socket);
  ASSERT_TRUE(c.ok());
  auto a = c->Attach("llama2", 1);
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_NE(a->Find("model.layers.0.self_attn.qkv_proj.weight"), nullptr);
  EXPECT_EQ(c->Attach("llama2", 2).status().code(), absl::StatusCode::kNotFound);
  ASSERT_TRUE(a->Detach().ok());
  EXPECT_TRUE(c->Unload("llama2").ok());
}

TEST_F(DaemonTest, SigkilledClientLosesItsLease) {
  const pid_t holder =
      Spawn({WEIGHTCTL_BIN, "attach", "demo", "--rank", "0", "--hold", "60", "--socket", g_socket},
            g_dir + "/hold.out", g_dir + "/hold.err");
  auto leases_of = [&](pid_t pid) {
    auto c = Client::Connect(g_socket);
    if (!c.ok()) return -1;
    auto st = c->Status(std::string("demo"));
    if (!st.ok()) return -1;
    int n = 0;
    for (const auto& r : st->front().ranks) {
      for (const auto& l : r.leases) n += l.pid == pid;
    }
    return n;
  };
  ASSERT_TRUE(WaitUntil([&] { return leases_of(holder) == 1; })) << Slurp(g_dir + "/hold.err");
  ::kill(holder, SIGKILL);
  WaitFor(holder, std::chrono::seconds(5));
  EXPECT_TRUE(WaitUntil([&] { return leases_of(holder) == 0; }, std::chrono::seconds(5)));
}

TEST_F(DaemonTest, UnloadRefusedWhileAttachedThenForced) {
  RunResult load = Ctl({"load", "victim", g_ckpt, "--recipe-name", "hf", "--wait"});
  ASSERT_EQ(load.exit_code, 0) << load.err;
  const pid_t holder =
      Spawn({WEIGHTCTL_BIN, "attach", "victim", "--hold", "60", "--socket", g_socket},
            g_dir + "/v.out", g_dir + "/v.err");
  ASSERT_TRUE(
      WaitUntil([&] { return Slurp(g_dir + "/v.out").find("lease") != std::string::npos; }));
  RunResult refused = Ctl({"unload", "victim"});
  EXPECT_EQ(refused.exit_code, 1);
  EXPECT_THAT(refused.err, HasSubstr("FAILED_PRECONDITION"));
  EXPECT_THAT(refused.err, HasSubstr("pid " + std::to_string(holder)));
  RunResult forced = Ctl({"unload", "victim", "--force"});
  EXPECT_EQ(forced.exit_code, 0) << forced.err;
  EXPECT_THAT(ModelState("victim"), HasSubstr("NOT_FOUND"));
  ::kill(holder, SIGKILL);
  WaitFor(holder, std::chrono::seconds(5));
}

TEST_F(DaemonTest, OtherUidIsDeniedAttach) {
  const std::optional<std::string> other = AsNobody({}, [] {
    auto c = Client::Connect(g_socket);
    if (!c.ok()) return "connect: " + c.status().ToString();
    auto a = c->Attach("demo", 0);
    std::string msg = a.ok() ? std::string("attached!") : a.status().ToString();
    return msg + "\n" + c->Load("x", g_ckpt).ToString();
  });
  if (!other) GTEST_SKIP() << "needs root to switch uid";
  const std::string& msg = *other;
  EXPECT_THAT(msg, HasSubstr("PERMISSION_DENIED"));
  EXPECT_THAT(msg, HasSubstr("uid 65534"));
  EXPECT_THAT(msg, HasSubstr("'demo'"));
  EXPECT_THAT(msg, HasSubstr("may not load"));
}

TEST_F(DaemonTest, SupplementaryGroupGrantsAttach) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root to switch uid and groups";
  auto c = Client::Connect(g_socket);
  ASSERT_TRUE(c.ok()) << c.status();
  LoadOptions o;
  o.recipe = "hf";
  o.allow_gids = std::vector<uint32_t>{4242};
  ASSERT_TRUE(c->Load("grouped", g_ckpt, o).ok());
  ASSERT_TRUE(WaitUntil([&] { return ModelState("grouped").find("ready") != std::string::npos; }));
  auto attach = [] {
    auto cc = Client::Connect(g_socket);
    if (!cc.ok()) return "connect: " + cc.status().ToString();
    auto a = cc->Attach("grouped", 0);
    return a.ok() ? std::string("attached ") + std::to_string(a->tensors().size())
                  : a.status().ToString();
  };
  // 4242 only as a supplementary group (primary gid 65534): allowed.
  std::optional<std::string> member = AsNobody({4242}, attach);
  ASSERT_TRUE(member.has_value());
  EXPECT_THAT(*member, HasSubstr("attached "));
  // Without it: refused, naming the uid and the model.
  std::optional<std::string> outsider = AsNobody({}, attach);
  ASSERT_TRUE(outsider.has_value());
  EXPECT_THAT(*outsider, HasSubstr("PERMISSION_DENIED"));
  EXPECT_THAT(*outsider, HasSubstr("uid 65534"));
  EXPECT_THAT(*outsider, HasSubstr("'grouped'"));
  EXPECT_EQ(Ctl({"unload", "grouped"}).exit_code, 0);
}

TEST_F(DaemonTest, MalformedRequestsGetErrorsAndTheConnectionSurvives) {
  Raw r;
  json j = r.Call(R"({"op":"list","id":1})");
  EXPECT_EQ(ErrorCode(j), "FAILED_PRECONDITION");  // hello first
  r.Hello();
  j = r.Call(std::string(70 * 1024, ' '));
  EXPECT_EQ(ErrorCode(j), "RESOURCE_EXHAUSTED");
  EXPECT_THAT(ErrorMessage(j), HasSubstr("65536"));
  j = r.Call(R"({"op":"hel)");
  EXPECT_EQ(ErrorCode(j), "INVALID_ARGUMENT");
  j = r.Call(std::string("\x00\xff\x13garbage", 10));
  EXPECT_EQ(ErrorCode(j), "INVALID_ARGUMENT");
  j = r.Call(R"({"op":"explode","id":"x"})");
  EXPECT_EQ(ErrorCode(j), "INVALID_ARGUMENT");
  EXPECT_THAT(ErrorMessage(j), HasSubstr("unknown op 'explode'"));
  j = r.Call(R"({"op":"attach","name":"demo","rank":"zero","id":2})");
  EXPECT_EQ(ErrorCode(j), "INVALID_ARGUMENT");
  EXPECT_THAT(ErrorMessage(j), HasSubstr("'rank'"));
  j = r.Call(R"({"op":"attach","name":"nope","rank":0,"id":3})");
  EXPECT_EQ(ErrorCode(j), "NOT_FOUND");
  EXPECT_EQ(j["id"], 3);
  j = r.Call(R"({"op":"list","id":4})");
  EXPECT_EQ(j.value("ok", false), true) << j.dump();
  EXPECT_EQ(j["id"], 4);
}

TEST_F(DaemonTest, FdsSentByClientsAreClosed) {
  Raw r;
  r.Hello();
  int p[2];
  ASSERT_EQ(::pipe(p), 0);
  r.Send(R"({"op":"list","id":9})", {p[1], p[1], p[1]});
  json j = r.Recv();
  EXPECT_EQ(ErrorCode(j), "INVALID_ARGUMENT");
  EXPECT_THAT(ErrorMessage(j), HasSubstr("3 received and closed"));
  ::close(p[1]);
  // EOF on the read end proves the daemon holds no copy of the write end.
  pollfd pf{p[0], POLLIN, 0};
  ASSERT_EQ(::poll(&pf, 1, 5000), 1);
  char c;
  EXPECT_EQ(::read(p[0], &c, 1), 0);
  ::close(p[0]);
}

TEST_F(DaemonTest, SilentClientBlocksNobodyAndTimesOut) {
  Raw silent;
  const auto t0 = Clock::now();
  Raw other;
  other.Hello();
  json j = other.Call(R"({"op":"status","id":1})");
  EXPECT_EQ(j.value("ok", false), true);
  EXPECT_LT(Clock::now() - t0, std::chrono::milliseconds(500));
  // The silent connection is closed after hello_timeout_ms (1 s in this suite).
  json e = silent.Recv(5000);
  EXPECT_TRUE(e.value("eof", false)) << e.dump();
}

TEST_F(DaemonTest, ThousandConnectionsAndTheCap) {
  rlimit rl{};
  ::getrlimit(RLIMIT_NOFILE, &rl);
  rl.rlim_cur = rl.rlim_max;
  ::setrlimit(RLIMIT_NOFILE, &rl);
  if (rl.rlim_cur < 1100) GTEST_SKIP() << "RLIMIT_NOFILE hard limit " << rl.rlim_max;
  std::vector<UniqueFd> socks;
  for (int i = 0; i < 1000; ++i) {
    auto fd = ConnectSeqpacket(g_socket);
    ASSERT_TRUE(fd.ok()) << i << ": " << fd.status();
    socks.push_back(std::move(*fd));
  }
  for (auto& s : socks) {
    ASSERT_TRUE(SendPacket(s.get(), R"({"op":"hello","version":1})").ok());
  }
  int ok = 0;
  for (auto& s : socks) {
    pollfd p{s.get(), POLLIN, 0};
    if (::poll(&p, 1, 10000) != 1) continue;
    auto pkt = RecvPacket(s.get(), 1 << 16);
    ok += pkt.ok() && pkt->data.find("\"ok\":true") != std::string::npos;
  }
  EXPECT_EQ(ok, 1000);
  // Beyond max_connections (1010) a connection gets one refusal and is closed.
  std::vector<UniqueFd> extra;
  bool refused = false;
  std::string seen;
  for (int i = 0; i < 20 && !refused; ++i) {
    auto fd = ConnectSeqpacket(g_socket);
    if (!fd.ok()) {
      seen += fd.status().ToString() + "\n";
      continue;
    }
    // Say hello at once: a silent connection would be dropped by the hello timeout.
    (void)SendPacket(fd->get(), R"({"op":"hello","version":1})");
    pollfd p{fd->get(), POLLIN, 0};
    if (::poll(&p, 1, 2000) == 1) {
      auto pkt = RecvPacket(fd->get(), 1 << 16);
      refused = pkt.ok() && pkt->data.find("RESOURCE_EXHAUSTED") != std::string::npos &&
                pkt->data.find("max_connections") != std::string::npos;
      seen += (pkt.ok() ? pkt->data : pkt.status().ToString()) + "\n";
    }
    extra.push_back(std::move(*fd));
  }
  EXPECT_TRUE(refused) << seen;
  // Leave the daemon as we found it: wait until it has noticed the closed connections.
  socks.clear();
  extra.clear();
  EXPECT_TRUE(WaitUntil([] {
    auto c = Client::Connect(g_socket);
    if (!c.ok()) return false;
    auto m = c->Metrics();
    return m.ok() && m->find("weightd_connections 1\n") != std::string::npos;
  }));
}

TEST_F(DaemonTest, LoadErrors) {
  auto c = Client::Connect(g_socket);
  ASSERT_TRUE(c.ok());
  absl::Status s = c->Load("demo", g_ckpt);
  EXPECT_EQ(s.code(), absl::StatusCode::kAlreadyExists);
  s = c->Load("outside", "/tmp");
  EXPECT_EQ(s.code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(std::string(s.message()), HasSubstr("model_roots"));

  // A shard truncated inside its data: the model fails with the reader's message, memory freed.
  const std::string bad = g_dir + "/models/truncated";
  std::filesystem::copy(g_ckpt, bad);
  const std::string shard = bad + "/model-00002-of-00003.safetensors";
  std::filesystem::resize_file(shard, std::filesystem::file_size(shard) - 1000);
  LoadOptions hf;
  hf.recipe = "hf";
  ASSERT_TRUE(c->Load("truncated", bad, hf).ok());
  ASSERT_TRUE(WaitUntil([] { return ModelState("truncated") != "loading"; }));
  auto st = c->Status(std::string("truncated"));
  ASSERT_TRUE(st.ok());
  EXPECT_EQ(st->front().state, "failed");
  EXPECT_THAT(st->front().error, HasSubstr("model-00002-of-00003.safetensors"));
  EXPECT_EQ(st->front().ranks[0].arena_bytes, 0u);

  // Unknown tensors under the llama recipe: the planner's message.
  const std::string odd = g_dir + "/models/odd";
  std::filesystem::copy(g_ckpt, odd);
  {
    std::ifstream in(odd + "/model.safetensors.index.json");
    json idx = json::parse(in);
    std::string shard1 = idx["weight_map"]["lm_head.weight"];
    // Rename a tensor in the shard header and the index (same length keeps offsets valid).
    std::string bytes = Slurp(odd + "/" + shard1);
    const size_t at = bytes.find("lm_head.weight");
    ASSERT_NE(at, std::string::npos);
    bytes.replace(at, 14, "lm_hexd.weight");
    std::ofstream(odd + "/" + shard1, std::ios::binary) << bytes;
    idx["weight_map"].erase("lm_head.weight");
    idx["weight_map"]["lm_hexd.weight"] = shard1;
    std::ofstream(odd + "/model.safetensors.index.json") << idx.dump();
  }
  ASSERT_TRUE(c->Load("odd", odd).ok());
  ASSERT_TRUE(WaitUntil([] { return ModelState("odd") != "loading"; }));
  st = c->Status(std::string("odd"));
  ASSERT_TRUE(st.ok());
  EXPECT_EQ(st->front().state, "failed");
  EXPECT_THAT(st->front().error, HasSubstr("lm_hexd.weight"));

  // Other models are untouched.
  EXPECT_EQ(ModelState("demo"), "ready");
  EXPECT_TRUE(c->Unload("truncated").ok());
  EXPECT_TRUE(c->Unload("odd").ok());
}

// Loads run on background threads: the daemon answers status while one runs, and the progress
// counters move from 0 to the total.
TEST_F(DaemonTest, StatusAnswersDuringALoadWithProgress) {
  const std::string dir = g_dir + "/models/big";
  std::filesystem::create_directory(dir);
  {
    constexpr int kTensors = 64;
    constexpr size_t kBytes = 4 << 20;
    std::ofstream f = WriteU8Header(dir + "/model.safetensors", kTensors, kBytes);
    const std::string chunk(kBytes, '\x5a');
    for (int i = 0; i < kTensors; ++i) f << chunk;
  }
  auto c = Client::Connect(g_socket);
  ASSERT_TRUE(c.ok());
  LoadOptions hf;
  hf.recipe = "hf";
  ASSERT_TRUE(c->Load("big", dir, hf).ok());
  int loading_seen = 0;
  uint64_t total = 0, done = 0;
  ASSERT_TRUE(WaitUntil(
      [&] {
        auto st = c->Status(std::string("big"));
        if (!st.ok()) return false;
        loading_seen += st->front().state == "loading";
        total = st->front().bytes_total;
        done = st->front().bytes_done;
        return st->front().state == "ready";
      },
      std::chrono::seconds(60)));
  EXPECT_GT(loading_seen, 0) << "status never saw the load running";
  EXPECT_EQ(total, 64u << 22);
  EXPECT_EQ(done, total);
  auto a = c->Attach("big", 0);
  ASSERT_TRUE(a.ok());
  EXPECT_TRUE(a->Verify().ok());
  EXPECT_EQ(static_cast<const char*>(a->Find("t63")->data)[12345], '\x5a');
  ASSERT_TRUE(a->Detach().ok());
  EXPECT_TRUE(c->Unload("big").ok());
}

// A checkpoint of a few KB on disk whose headers claim 256 GiB (a sparse file): the load is
// refused before anything is allocated, naming the bytes needed and available, and the daemon
// and its other models carry on. Without admission the daemon was OOM-killed filling the memfd.
TEST_F(DaemonTest, ALoadLargerThanMemoryIsRefusedBeforeAllocating) {
  const std::string dir = g_dir + "/models/sparse";
  std::filesystem::create_directory(dir);
  constexpr uint64_t kTensor = 64ull << 30;
  const std::string path = dir + "/model.safetensors";
  WriteU8Header(path, 4, kTensor).close();
  const uint64_t data_start = std::filesystem::file_size(path);
  if (::truncate(path.c_str(), static_cast<off_t>(data_start + 4 * kTensor)) != 0) {
    GTEST_SKIP() << "this filesystem cannot hold a 256 GiB sparse file: " << std::strerror(errno);
  }
  auto c = Client::Connect(g_socket);
  ASSERT_TRUE(c.ok());
  LoadOptions hf;
  hf.recipe = "hf";
  ASSERT_TRUE(c->Load("sparse", dir, hf).ok());
  ASSERT_TRUE(WaitUntil([] { return ModelState("sparse") != "loading"; }));
  auto st = c->Status(std::string("sparse"));
  ASSERT_TRUE(st.ok());
  EXPECT_EQ(st->front().state, "failed");
  EXPECT_THAT(st->front().error, HasSubstr("of host memory"));
  EXPECT_THAT(st->front().error, HasSubstr("needs 274877906944 bytes"));
  EXPECT_THAT(st->front().error, HasSubstr("available"));
  EXPECT_EQ(st->front().bytes_done, 0u);
  EXPECT_EQ(ModelState("demo"), "ready");
  auto a = c->Attach("demo", 0);
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_TRUE(a->Verify().ok());
  EXPECT_TRUE(c->Unload("sparse").ok());
  std::filesystem::remove_all(dir);
}

// Untrusted files named by a load: a FIFO as config.json used to block the load thread in open()
// forever (unload --force then lied, and SIGTERM hung); a shard symlinked out of model_roots
// used to load. Both now fail the load at once with the file named, and the name is reusable.
TEST_F(DaemonTest, FifosAndSymlinksOutOfTheRootsFailTheLoadCleanly) {
  auto c = Client::Connect(g_socket);
  ASSERT_TRUE(c.ok());
  LoadOptions hf;
  hf.recipe = "hf";
  const std::string fifo = g_dir + "/models/fifo";
  std::filesystem::copy(g_ckpt, fifo);
  std::filesystem::remove(fifo + "/config.json");
  ASSERT_EQ(::mkfifo((fifo + "/config.json").c_str(), 0600), 0);
  ASSERT_TRUE(c->Load("fifo", fifo, hf).ok());
  ASSERT_TRUE(WaitUntil([] { return ModelState("fifo") != "loading"; }, std::chrono::seconds(10)))
      << "the load is stuck on the FIFO";
  auto st = c->Status(std::string("fifo"));
  ASSERT_TRUE(st.ok());
  EXPECT_EQ(st->front().state, "failed");
  EXPECT_THAT(st->front().error, HasSubstr("config.json"));
  EXPECT_THAT(st->front().error, HasSubstr("a FIFO"));
  RunResult un = Ctl({"unload", "fifo"});
  EXPECT_EQ(un.exit_code, 0) << un.err;
  EXPECT_THAT(un.out, HasSubstr("unloaded fifo"));
  EXPECT_EQ(c->Status(std::string("fifo")).status().code(), absl::StatusCode::kNotFound);

  const std::string outside = g_dir + "/outside";
  std::filesystem::create_directory(outside);
  const std::string escape = g_dir + "/models/escape";
  std::filesystem::copy(g_ckpt, escape);
  const std::string shard = "model-00002-of-00003.safetensors";
  std::filesystem::rename(escape + "/" + shard, outside + "/" + shard);
  std::filesystem::create_symlink(outside + "/" + shard, escape + "/" + shard);
  ASSERT_TRUE(c->Load("escape", escape, hf).ok());
  ASSERT_TRUE(WaitUntil([] { return ModelState("escape") != "loading"; }));
  st = c->Status(std::string("escape"));
  ASSERT_TRUE(st.ok());
  EXPECT_EQ(st->front().state, "failed");
  EXPECT_THAT(st->front().error, HasSubstr(shard));
  EXPECT_THAT(st->front().error, HasSubstr("outside the configured model_roots"));
  EXPECT_TRUE(c->Unload("escape").ok());
  EXPECT_EQ(ModelState("demo"), "ready");
  std::filesystem::remove_all(fifo);
  std::filesystem::remove_all(escape);
  std::filesystem::remove_all(outside);
}

TEST_F(DaemonTest, ClientsSurviveDaemonDisappearingMidAttach) {
  // An attachment's memory stays valid when the model is force-unloaded under it.
  auto c = Client::Connect(g_socket);
  ASSERT_TRUE(c.ok());
  LoadOptions hf;
  hf.recipe = "hf";
  ASSERT_TRUE(c->Load("ephemeral", g_ckpt, hf).ok());
  ASSERT_TRUE(WaitUntil([] { return ModelState("ephemeral") == "ready"; }));
  auto a = c->Attach("ephemeral", 0);
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(c->Unload("ephemeral", true).ok());
  EXPECT_TRUE(a->Verify().ok());
}

}  // namespace
}  // namespace weightd
