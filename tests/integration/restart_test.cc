// Restarts without reloading (issue 6): the real weightd under a stand-in for systemd
// (support/fake_systemd.h), and `weightd --takeover`.
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "support/fake_systemd.h"
#include "support/process.h"
#include "weightd/backend.h"
#include "weightd/client.h"
#include "weightd/handoff.h"
#include "weightd/seqpacket.h"

namespace weightd {
namespace {

using ::testing::HasSubstr;
using json = nlohmann::json;
using testing::Clock;
using testing::FakeSystemd;
using testing::ListenOn;
using testing::Slurp;
using testing::WaitFor;
using testing::WaitUntil;

int CountOpenFds() {
  int n = 0;
  for (const auto& e : std::filesystem::directory_iterator("/proc/self/fd")) {
    (void)e;
    ++n;
  }
  return n;
}

int RunCmd(std::vector<std::string> argv, std::string* out = nullptr) {
  int p[2];
  if (::pipe(p) != 0) return -1;
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::dup2(p[1], 1);
    ::dup2(p[1], 2);
    std::vector<char*> args;
    for (std::string& a : argv) args.push_back(a.data());
    args.push_back(nullptr);
    ::execv(args[0], args.data());
    ::_exit(127);
  }
  ::close(p[1]);
  std::string text;
  char buf[4096];
  for (ssize_t n; (n = ::read(p[0], buf, sizeof(buf))) > 0;) text.append(buf, n);
  ::close(p[0]);
  if (out != nullptr) *out = text;
  return WaitFor(pid, std::chrono::seconds(60));
}

std::string Metric(const std::string& socket, const std::string& name) {
  auto c = Client::Connect(socket);
  if (!c.ok()) return "connect failed";
  auto m = c->Metrics();
  if (!m.ok()) return "metrics failed";
  const size_t p = m->find("\n" + name + " ");
  if (p == std::string::npos) return "absent";
  const size_t b = p + name.size() + 2;
  return m->substr(b, m->find('\n', b) - b);
}

// The daemon's own status JSON for `model` (raw protocol: it shows `origin`); {} if absent.
json StatusOf(const std::string& socket, const std::string& model) {
  auto fd = ConnectSeqpacket(socket);
  if (!fd.ok()) return json::object();
  for (const std::string& req : {std::string(R"({"op":"hello","version":1})"),
                                 json{{"op", "status"}, {"name", model}}.dump()}) {
    if (!SendPacket(fd->get(), req).ok()) return json::object();
    pollfd p{fd->get(), POLLIN, 0};
    if (::poll(&p, 1, 5000) != 1) return json::object();
    auto pkt = RecvPacket(fd->get(), 1 << 20);
    if (!pkt.ok() || pkt->eof) return json::object();
    json j = json::parse(pkt->data, nullptr, false);
    if (j.is_discarded() || !j.value("ok", false)) return json::object();
    if (j["result"].contains("models") && !j["result"]["models"].empty()) {
      return j["result"]["models"][0];
    }
  }
  return json::object();
}

class RestartTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/weightd-restart-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    ::chmod(dir_.c_str(), 0755);
    std::filesystem::create_directory(dir_ + "/models");
    ckpt_ = dir_ + "/models/demo";
    std::string out;
    ASSERT_EQ(RunCmd({PYTHON_BIN, MAKE_DEMO_CHECKPOINT, ckpt_}, &out), 0) << out;
    socket_ = dir_ + "/weightd.sock";
    WriteConfig(json::array());
  }
  void TearDown() override {
    for (pid_t p : pids_) {
      ::kill(p, SIGKILL);
      ::waitpid(p, nullptr, 0);
    }
    if (HasFailure()) {
      std::fprintf(stderr, "---- weightd log ----\n%s\n", Slurp(log_).c_str());
    }
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
  // The backend under test: host, or cuda where ctest registers this binary a second time
  // against the simulated driver (WEIGHTD_TEST_BACKEND=cuda, WEIGHTD_CUDA_DRIVER=...).
  static std::string Backend() {
    const char* b = std::getenv("WEIGHTD_TEST_BACKEND");
    return b != nullptr && *b != '\0' ? b : "host";
  }
  void WriteConfig(const json& preload, bool valid = true) {
    json c = {{"socket", socket_},     {"backend", Backend()},
              {"socket_mode", "0666"}, {"model_roots", {dir_ + "/models"}},
              {"io_threads", 2},       {"hello_timeout_ms", 2000},
              {"preload", preload}};
    if (!valid) c["sockit"] = 1;
    std::ofstream(dir_ + "/weightd.json") << c.dump();
  }
  std::vector<std::string> DaemonArgs() {
    return {WEIGHTD_BIN, "--config", dir_ + "/weightd.json", "--log-level", "debug"};
  }
  pid_t Spawn(std::vector<std::string> args) {
    const pid_t pid = ::fork();
    if (pid == 0) {
      const int e = ::open(log_.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
      ::dup2(e, 2);
      std::vector<char*> argv;
      for (std::string& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      ::execv(argv[0], argv.data());
      ::_exit(127);
    }
    pids_.push_back(pid);
    return pid;
  }
  int Stop(pid_t pid) {
    ::kill(pid, SIGTERM);
    const int rc = WaitFor(pid, std::chrono::seconds(20));
    std::erase(pids_, pid);
    return rc;
  }
  bool LoadDemo() {
    std::string out;
    const int rc = RunCmd({WEIGHTCTL_BIN, "load", "demo", ckpt_, "--recipe-name", "hf", "--wait",
                           "--socket", socket_},
                          &out);
    EXPECT_EQ(rc, 0) << out;
    return rc == 0;
  }
  int AttachCheck(const std::string& ckpt) {
    std::string out;
    const int rc = RunCmd({ATTACH_CHECK_BIN, socket_, "demo", "0", ckpt}, &out);
    EXPECT_EQ(rc, 0) << out;
    return rc;
  }

  std::string dir_, ckpt_, socket_;
  std::string log_ = "/dev/null";
  std::vector<pid_t> pids_;
};

// Load, stop, move the checkpoint away, start with the stored fds: the model is ready at once,
// nothing is read, the same bytes are served, and a client attached across the restart still
// verifies its mapping.
TEST_F(RestartTest, FdStoreRestartServesTheSameBytesWithoutReading) {
  log_ = dir_ + "/weightd.log";
  FakeSystemd systemd(dir_);
  UniqueFd listener = ListenOn(socket_);
  const int fds_before = CountOpenFds();
  pid_t d1 = systemd.Launch(listener.get(), DaemonArgs(), log_);
  pids_.push_back(d1);
  ASSERT_TRUE(systemd.WaitFor("READY=1")) << systemd.log();
  ASSERT_TRUE(LoadDemo());
  ASSERT_TRUE(systemd.WaitFor("FDNAME=wd1.rec.demo")) << systemd.log();
  EXPECT_THAT(systemd.StoredNames(), ::testing::UnorderedElementsAre(
                                         "wd1.arena.demo.0.0", "wd1.man.demo.0", "wd1.rec.demo"));
  EXPECT_NE(Metric(socket_, "weightd_checkpoint_bytes_read_total"), "0");

  auto held_client = Client::Connect(socket_);
  ASSERT_TRUE(held_client.ok()) << held_client.status();
  auto held = held_client->Attach("demo", 0);
  ASSERT_TRUE(held.ok()) << held.status();

  EXPECT_EQ(Stop(d1), 0);
  systemd.Pump();
  EXPECT_THAT(systemd.log(), HasSubstr("STOPPING=1"));
  EXPECT_EQ(systemd.StoredNames().size(), 3u) << "a stop must leave the store alone";

  const std::string moved = dir_ + "/moved";
  std::filesystem::rename(dir_ + "/models", moved);
  systemd.ClearLog();
  const auto t0 = Clock::now();
  pid_t d2 = systemd.Launch(listener.get(), DaemonArgs(), log_);
  pids_.push_back(d2);
  ASSERT_TRUE(systemd.WaitFor("READY=1")) << systemd.log() << Slurp(log_);
  const double ready_ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
  std::printf("fd-store restart to READY=1: %.1f ms\n", ready_ms);
  EXPECT_THAT(systemd.log(), HasSubstr("1 re-adopted"));
  json st = StatusOf(socket_, "demo");
  EXPECT_EQ(st.value("state", ""), "ready") << st.dump();
  EXPECT_EQ(st.value("origin", ""), "fdstore") << st.dump();
  EXPECT_EQ(Metric(socket_, "weightd_checkpoint_bytes_read_total"), "0");
  EXPECT_EQ(Metric(socket_, "weightd_models_adopted_total"), "1");
  AttachCheck(moved + "/demo");
  EXPECT_TRUE(held->Verify().ok()) << "the mapping held across the restart changed";

  // Unloading removes the model from the store.
  auto c = Client::Connect(socket_);
  ASSERT_TRUE(c.ok());
  ASSERT_TRUE(c->Unload("demo", /*force=*/true).ok());
  ASSERT_TRUE(systemd.WaitFor("FDSTOREREMOVE=1\nFDNAME=wd1.rec.demo")) << systemd.log();
  EXPECT_TRUE(systemd.StoredNames().empty());
  EXPECT_EQ(Stop(d2), 0);
  held = absl::CancelledError("released");
  held_client = absl::CancelledError("released");
  c = absl::CancelledError("released");
  EXPECT_EQ(CountOpenFds(), fds_before) << "the test or the store leaked fds";
}

// Bad sets from the store are logged, dropped (and FDSTOREREMOVE'd), and never crash the daemon.
TEST_F(RestartTest, BadAdoptedFdsAreDroppedAndTheDaemonServes) {
  log_ = dir_ + "/weightd.log";
  FakeSystemd systemd(dir_);
  UniqueFd listener = ListenOn(socket_);
  std::vector<NamedFd> bad;
  auto sealed = [](const std::string& text) { return *MakeSealedMemfd("test", text); };
  // 1: a record that is not JSON.
  bad.push_back({EncodeFdName(FdKind::kRecord, "junk"), sealed("{not json")});
  // 2: a well-formed record whose manifest is garbage and whose arena is not sealed.
  ModelRecord rec;
  rec.name = "forged";
  rec.backend = "host";
  rec.spec.checkpoint = "/nonexistent";
  rec.ranks.push_back({0, -1, 4096, 16, 1, 1});
  bad.push_back({EncodeFdName(FdKind::kRecord, "forged"), sealed(EncodeModelRecord(rec))});
  bad.push_back({EncodeFdName(FdKind::kManifest, "forged", 0), sealed(std::string(16, 'x'))});
  UniqueFd unsealed(::memfd_create("unsealed", MFD_CLOEXEC));
  ASSERT_EQ(::ftruncate(unsealed.get(), 4096), 0);
  bad.push_back({EncodeFdName(FdKind::kArena, "forged", 0, 0), std::move(unsealed)});
  // 3: an arena without a record, and 4: a name that is not ours.
  bad.push_back({EncodeFdName(FdKind::kArena, "orphan", 0, 0), sealed("abc")});
  bad.push_back({"junkname", sealed("abc")});
  const pid_t d = systemd.Launch(listener.get(), DaemonArgs(), log_, bad);
  pids_.push_back(d);
  ASSERT_TRUE(systemd.WaitFor("READY=1")) << systemd.log() << Slurp(log_);
  auto c = Client::Connect(socket_);
  ASSERT_TRUE(c.ok()) << c.status();
  auto list = c->List();
  ASSERT_TRUE(list.ok());
  EXPECT_TRUE(list->empty());
  const std::string log = Slurp(log_);
  EXPECT_THAT(log, HasSubstr("model record: not a JSON object"));
  EXPECT_THAT(log, HasSubstr("adopting model 'forged'"));
  EXPECT_THAT(log, HasSubstr("no record fd"));
  EXPECT_THAT(log, HasSubstr("'junkname' dropped"));
  EXPECT_TRUE(systemd.WaitFor("FDNAME=wd1.arena.orphan.0.0")) << systemd.log();
  EXPECT_TRUE(systemd.WaitFor("FDNAME=wd1.arena.forged.0.0")) << systemd.log();
  // The daemon still loads and serves.
  ASSERT_TRUE(LoadDemo());
  AttachCheck(ckpt_);
  EXPECT_EQ(Stop(d), 0);
}

// A client attaching in a loop during a takeover never fails: the listening socket moves to
// the successor with its backlog, and the old daemon stops accepting before it hands over.
TEST_F(RestartTest, TakeoverServesWithoutAGap) {
  log_ = dir_ + "/weightd.log";
  const pid_t old_pid = Spawn(DaemonArgs());
  ASSERT_TRUE(WaitUntil([&] { return Client::Connect(socket_).ok(); })) << Slurp(log_);
  ASSERT_TRUE(LoadDemo());
  auto held_client = Client::Connect(socket_);
  ASSERT_TRUE(held_client.ok());
  auto held = held_client->Attach("demo", 0);
  ASSERT_TRUE(held.ok());

  std::atomic<bool> stop{false};
  std::atomic<int> ok{0}, failed{0};
  std::string first_failure;
  std::thread loop([&] {
    while (!stop.load()) {
      auto c = Client::Connect(socket_);
      absl::Status s = c.status();
      if (c.ok()) {
        auto a = c->Attach("demo", 0);
        s = a.ok() ? a->Verify() : a.status();
      }
      if (s.ok()) {
        ++ok;
      } else if (failed++ == 0) {
        first_failure = s.ToString();
      }
    }
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  const int ok_before = ok.load();
  // The successor must not need the checkpoint: everything comes over the socket.
  std::filesystem::rename(dir_ + "/models", dir_ + "/moved");
  const auto t0 = Clock::now();
  std::vector<std::string> args = DaemonArgs();
  args.push_back("--takeover");
  const pid_t new_pid = Spawn(args);
  EXPECT_EQ(WaitFor(old_pid, std::chrono::seconds(20)), 0) << "the old daemon did not exit";
  std::erase(pids_, old_pid);
  const double handoff_ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  stop = true;
  loop.join();
  std::printf(
      "takeover: old daemon exited %.1f ms after the successor started; %d attaches "
      "before, %d in all\n",
      handoff_ms, ok_before, ok.load());
  EXPECT_EQ(failed.load(), 0) << first_failure;
  EXPECT_GT(ok.load(), ok_before);
  json st = StatusOf(socket_, "demo");
  EXPECT_EQ(st.value("origin", ""), "takeover") << st.dump();
  EXPECT_EQ(Metric(socket_, "weightd_checkpoint_bytes_read_total"), "0");
  EXPECT_TRUE(held->Verify().ok());
  EXPECT_EQ(AttachCheck(dir_ + "/moved/demo"), 0);
  const std::string log = Slurp(log_);
  EXPECT_THAT(log, HasSubstr("stopped: handed over to the successor"));
  EXPECT_THAT(log, HasSubstr("takeover: confirmed; serving"));
  EXPECT_EQ(Stop(new_pid), 0);
  EXPECT_NE(::access(socket_.c_str(), F_OK), 0) << "the successor left its socket file";
}

// The old daemon keeps serving when the successor dies mid-handoff, and refuses other uids.
TEST_F(RestartTest, TakeoverAbortedOrUnauthorizedKeepsTheOldDaemon) {
  log_ = dir_ + "/weightd.log";
  const pid_t d = Spawn(DaemonArgs());
  ASSERT_TRUE(WaitUntil([&] { return Client::Connect(socket_).ok(); })) << Slurp(log_);
  ASSERT_TRUE(LoadDemo());
  const int fds_before = CountOpenFds();
  {
    // A successor that receives everything and dies before takeover_done.
    auto sock = ConnectSeqpacket(socket_);
    ASSERT_TRUE(sock.ok());
    auto fds = RequestTakeover(sock->get());
    ASSERT_TRUE(fds.ok()) << fds.status();
    EXPECT_EQ(fds->size(), 4u);  // arena, manifest, record, listener
    // Meanwhile nobody accepts: a connect lands in the backlog and waits.
    auto pending = ConnectSeqpacket(socket_);
    ASSERT_TRUE(pending.ok());
  }
  EXPECT_EQ(CountOpenFds(), fds_before);
  ASSERT_TRUE(WaitUntil([&] { return Slurp(log_).find("takeover aborted") != std::string::npos; }));
  AttachCheck(ckpt_);
  auto c = Client::Connect(socket_);
  ASSERT_TRUE(c.ok());
  EXPECT_TRUE(c->Unload("demo").ok()) << "the registry stayed frozen";
  ASSERT_TRUE(LoadDemo());

  // takeover_done without takeover is refused.
  {
    auto sock = ConnectSeqpacket(socket_);
    ASSERT_TRUE(sock.ok());
    ASSERT_TRUE(SendPacket(sock->get(), R"({"op":"hello","version":1})").ok());
    ASSERT_TRUE(RecvPacket(sock->get(), 1 << 16).ok());
    EXPECT_THAT(ConfirmTakeover(sock->get()).message(), HasSubstr("no takeover is in progress"));
  }

  const std::optional<std::string> other = testing::AsNobody({}, [&] {
    auto sock = ConnectSeqpacket(socket_);
    return sock.ok() ? RequestTakeover(sock->get()).status().ToString() : sock.status().ToString();
  });
  if (other) {
    EXPECT_THAT(*other, HasSubstr("PERMISSION_DENIED"));
    EXPECT_THAT(*other, HasSubstr("only to the daemon's own uid"));
  }
  // A successor that cannot reach a daemon fails cleanly.
  std::string out;
  EXPECT_EQ(
      RunCmd({WEIGHTD_BIN, "--socket", dir_ + "/nobody.sock", "--backend", "host", "--takeover"},
             &out),
      1);
  EXPECT_THAT(out, HasSubstr("no daemon to take over"));
  AttachCheck(ckpt_);
  EXPECT_EQ(Stop(d), 0);
}

// A successor whose confirmation fails leaves the socket file alone: until the old daemon has
// confirmed, the file is the old daemon's, which serves on (here a stand-in that hands over its
// listener and then closes the connection at `takeover_done` unanswered, as a daemon whose
// takeover_timeout passed does).
TEST_F(RestartTest, SuccessorFailingToConfirmLeavesTheSocketFile) {
  UniqueFd listener = ListenOn(socket_);
  std::thread old([&] {
    UniqueFd c(::accept4(listener.get(), nullptr, nullptr, SOCK_CLOEXEC));
    ASSERT_TRUE(c);
    auto hello = RecvPacket(c.get(), 1 << 16);
    ASSERT_TRUE(hello.ok() && !hello->eof);
    ASSERT_TRUE(SendPacket(c.get(), R"({"ok":true,"id":0,"result":{"version":1}})").ok());
    auto takeover = RecvPacket(c.get(), 1 << 16);
    ASSERT_TRUE(takeover.ok() && !takeover->eof);
    ASSERT_THAT(takeover->data, HasSubstr(R"("op":"takeover")"));
    ASSERT_TRUE(
        SendPacket(c.get(), R"({"ok":true,"id":1,"result":{"fds":1,"packets":1,"pid":1}})").ok());
    const int fds[] = {listener.get()};
    ASSERT_TRUE(
        SendPacket(c.get(), R"({"ok":true,"id":1,"continuation":1,"names":["control"]})", fds)
            .ok());
    auto done = RecvPacket(c.get(), 1 << 16);
    ASSERT_TRUE(done.ok() && !done->eof);
    EXPECT_THAT(done->data, HasSubstr("takeover_done"));
  });
  std::vector<std::string> args = DaemonArgs();
  args.push_back("--takeover");
  std::string out;
  EXPECT_EQ(RunCmd(args, &out), 1) << out;
  old.join();
  EXPECT_THAT(out, HasSubstr("takeover failed at the confirmation"));
  struct stat st;
  EXPECT_EQ(::lstat(socket_.c_str(), &st), 0) << "the successor removed the old daemon's socket";
  EXPECT_TRUE(ConnectSeqpacket(socket_).ok()) << "the old daemon's socket no longer reachable";
}

// SIGHUP: new preloads start, removed ones are unloaded unless attached, an invalid config is
// rejected and the running one stays.
TEST_F(RestartTest, SighupReloadsPreloads) {
  log_ = dir_ + "/weightd.log";
  const pid_t d = Spawn(DaemonArgs());
  ASSERT_TRUE(WaitUntil([&] { return Client::Connect(socket_).ok(); })) << Slurp(log_);
  WriteConfig(json::array({{{"name", "demo"}, {"checkpoint", ckpt_}, {"recipe", "hf"}}}));
  ::kill(d, SIGHUP);
  ASSERT_TRUE(WaitUntil([&] { return StatusOf(socket_, "demo").value("state", "") == "ready"; }))
      << Slurp(log_);
  AttachCheck(ckpt_);

  WriteConfig(json::array(), /*valid=*/false);
  ::kill(d, SIGHUP);
  ASSERT_TRUE(WaitUntil([&] { return Slurp(log_).find("SIGHUP: rejected") != std::string::npos; }));
  EXPECT_THAT(Slurp(log_), HasSubstr("unknown key 'sockit'"));
  EXPECT_EQ(StatusOf(socket_, "demo").value("state", ""), "ready");

  auto held_client = Client::Connect(socket_);
  ASSERT_TRUE(held_client.ok());
  auto held = held_client->Attach("demo", 0);
  ASSERT_TRUE(held.ok());
  WriteConfig(json::array());
  ::kill(d, SIGHUP);
  ASSERT_TRUE(WaitUntil([&] { return Slurp(log_).find("stays loaded") != std::string::npos; }));
  EXPECT_EQ(StatusOf(socket_, "demo").value("state", ""), "ready");
  held = absl::CancelledError("released");
  held_client = absl::CancelledError("released");
  ASSERT_TRUE(WaitUntil([&] { return StatusOf(socket_, "demo")["ranks"][0]["leases"].empty(); }));
  ::kill(d, SIGHUP);
  ASSERT_TRUE(WaitUntil([&] { return StatusOf(socket_, "demo").empty(); })) << Slurp(log_);
  EXPECT_EQ(Stop(d), 0);
}

TEST(FdNameTest, EncodingIsReversibleAndWithinSystemdRules) {
  for (const std::string& model : {std::string("llama"), std::string("Llama-3.1 8B:v2/ü"),
                                   std::string(255, '.'), std::string("a_b")}) {
    const std::string n = EncodeFdName(FdKind::kArena, model, 7, 0);
    EXPECT_LE(n.size(), 255u);
    for (char ch : n) {
      EXPECT_TRUE(ch > 32 && ch < 127 && ch != ':') << n;
    }
    auto parsed = ParseFdName(n);
    ASSERT_TRUE(parsed.ok()) << parsed.status();
    EXPECT_EQ(parsed->kind, FdKind::kArena);
    EXPECT_EQ(parsed->rank, 7);
    auto back = DecodeModelToken(parsed->model_token);
    if (model.size() < 60) {
      ASSERT_TRUE(back.ok()) << back.status();
      EXPECT_EQ(*back, model);
    } else {
      EXPECT_TRUE(absl::IsNotFound(back.status()));  // hashed; the record holds the name
    }
  }
  EXPECT_FALSE(ParseFdName("wd1.arena.x.1").ok());
  EXPECT_FALSE(ParseFdName("wd2.rec.x").ok());
  EXPECT_THAT(std::string(ParseFdName("wd1.blob.x").status().message()),
              HasSubstr("unknown kind 'blob'"));
  EXPECT_FALSE(DecodeModelToken("a_4").ok());
}

}  // namespace
}  // namespace weightd
