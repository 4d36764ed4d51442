// Restarts without reloading (issue 6): the real weightd under a stand-in for systemd
// (support/fake_systemd.h), and `weightd --takeover`; a model updated to a newer generation keeps
// it across both.
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
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "support/fake_systemd.h"
#include "support/process.h"
#include "weightd/backend.h"
#include "weightd/checkpoint.h"
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

  // ---- Generations across restarts ----
  // The demo checkpoint drawn from `seed` (same names and shapes as ckpt_) in dir_/models/NAME.
  std::string MakeDemo(const std::string& name, int seed) {
    std::string path = dir_ + "/models/" + name;
    std::string out;
    EXPECT_EQ(
        RunCmd({PYTHON_BIN, MAKE_DEMO_CHECKPOINT, path, "--seed", std::to_string(seed)}, &out), 0)
        << out;
    return path;
  }
  // `weightctl shard CKPT --tp 2` into dir_/shards/NAME (outside model_roots, so it survives the
  // checkpoints being moved away): the reference for what each rank of a T=2 load serves.
  std::string ShardTp2(const std::string& ckpt, const std::string& name) {
    std::string out_dir = dir_ + "/shards/" + name;
    std::string out;
    EXPECT_EQ(RunCmd({WEIGHTCTL_BIN, "shard", ckpt, "--tp", "2", "--out", out_dir}, &out), 0)
        << out;
    return out_dir;
  }
  bool LoadDemoTp2() {
    std::string out;
    const int rc = RunCmd(
        {WEIGHTCTL_BIN, "load", "demo", ckpt_, "--tp", "2", "--wait", "--socket", socket_}, &out);
    EXPECT_EQ(rc, 0) << out;
    return rc == 0;
  }
  // `weightctl update demo CKPT --wait`: its one output line, or "" when it failed.
  std::string UpdateDemo(const std::string& ckpt) {
    std::string out;
    const int rc =
        RunCmd({WEIGHTCTL_BIN, "update", "demo", ckpt, "--wait", "--socket", socket_}, &out);
    EXPECT_EQ(rc, 0) << out;
    return rc == 0 ? out : "";
  }
  // Both ranks of "demo" equal, byte for byte and checksums verified, `weightctl shard`'s rank
  // files in `shards` (vLLM names: fused qkv_proj and gate_up_proj, vocab-padded embeddings).
  void CheckBothRanks(const std::string& shards) {
    for (int rank : {0, 1}) {
      std::string out;
      const int rc =
          RunCmd({ATTACH_CHECK_BIN, socket_, "demo", std::to_string(rank),
                  shards + "/model-rank-" + std::to_string(rank) + "-part-0.safetensors"},
                 &out);
      EXPECT_EQ(rc, 0) << "rank " << rank << ": " << out;
    }
  }
  // Rank `rank` of "demo" after generation B was updated with C's layer-0 q_proj alone: every
  // tensor equals B's shard but layer 0's fused qkv_proj, whose q rows (the first half of the
  // q_proj's bytes, T = 2) are C's and whose k and v rows are still B's.
  void CheckQOnlyUpdate(int rank, const std::string& shards_b, const std::string& shards_c,
                        uint64_t q_bytes_per_rank) {
    const std::string file = "/model-rank-" + std::to_string(rank) + "-part-0.safetensors";
    auto b = Checkpoint::Open(shards_b + file);
    auto c = Checkpoint::Open(shards_c + file);
    ASSERT_TRUE(b.ok() && c.ok()) << b.status() << c.status();
    auto client = Client::Connect(socket_);
    ASSERT_TRUE(client.ok()) << client.status();
    auto a = client->Attach("demo", rank);
    ASSERT_TRUE(a.ok()) << a.status();
    ASSERT_EQ(a->tensors().size(), b->tensors().size());
    EXPECT_TRUE(a->Verify().ok()) << "rank " << rank << ": " << a->Verify();
    const std::string fused = "model.layers.0.self_attn.qkv_proj.weight";
    for (const CheckpointTensor& t : b->tensors()) {
      const TensorView* v = a->Find(t.name);
      ASSERT_NE(v, nullptr) << t.name;
      ASSERT_EQ(v->nbytes, t.nbytes) << t.name;
      std::string got(v->nbytes, '\0');
      ASSERT_TRUE(a->Read(*v, 0, got.data(), got.size()).ok()) << t.name;
      auto old_bytes = b->MapTensor(t);
      ASSERT_TRUE(old_bytes.ok()) << old_bytes.status();
      std::string want(reinterpret_cast<const char*>(old_bytes->data()), old_bytes->size());
      if (t.name == fused) {
        auto new_bytes = c->MapTensor(*c->Find(fused));
        ASSERT_TRUE(new_bytes.ok()) << new_bytes.status();
        std::memcpy(want.data(), new_bytes->data(), q_bytes_per_rank);
        EXPECT_NE(std::memcmp(old_bytes->data(), want.data(), q_bytes_per_rank), 0)
            << "B and C must differ for this check to mean anything";
      }
      EXPECT_TRUE(got == want) << "rank " << rank << " tensor " << t.name << " differs";
    }
  }
  static std::vector<std::string> Tp2StoreNames() {
    // Two arenas per rank at the default arena_segment_bytes: embeddings/norm/lm_head, and the
    // two decoder layers.
    return {"wd1.arena.demo.0.0", "wd1.arena.demo.0.1", "wd1.man.demo.0", "wd1.arena.demo.1.0",
            "wd1.arena.demo.1.1", "wd1.man.demo.1",     "wd1.rec.demo"};
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
  EXPECT_THAT(systemd.StoredNames(),
              ::testing::UnorderedElementsAre("wd1.arena.demo.0.0", "wd1.arena.demo.0.1",
                                              "wd1.man.demo.0", "wd1.rec.demo"));
  EXPECT_NE(Metric(socket_, "weightd_checkpoint_bytes_read_total"), "0");

  auto held_client = Client::Connect(socket_);
  ASSERT_TRUE(held_client.ok()) << held_client.status();
  auto held = held_client->Attach("demo", 0);
  ASSERT_TRUE(held.ok()) << held.status();

  EXPECT_EQ(Stop(d1), 0);
  systemd.Pump();
  EXPECT_THAT(systemd.log(), HasSubstr("STOPPING=1"));
  EXPECT_EQ(systemd.StoredNames().size(), 4u) << "a stop must leave the store alone";

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

// A restart through the fd store after an update serves the newest generation under its number
// without reading a checkpoint byte; the store held exactly one set of fds for the model (the
// update replaced generation 1's with generation 2's), and an update on the restarted daemon,
// which rebuilds the adopted model's plan from the checkpoint headers, publishes generation 3.
TEST_F(RestartTest, FdStoreRestartKeepsTheNewestGeneration) {
  log_ = dir_ + "/weightd.log";
  const std::string ckpt_b = MakeDemo("demo-b", 1);
  const std::string ckpt_c = MakeDemo("demo-c", 2);
  const std::string shards_a = ShardTp2(ckpt_, "a");
  const std::string shards_b = ShardTp2(ckpt_b, "b");
  const std::string shards_c = ShardTp2(ckpt_c, "c");
  FakeSystemd systemd(dir_);
  systemd.StartPumping();  // 7 fds per store, 14 messages per update: more than a dgram queue
  UniqueFd listener = ListenOn(socket_);
  pid_t d1 = systemd.Launch(listener.get(), DaemonArgs(), log_);
  pids_.push_back(d1);
  ASSERT_TRUE(systemd.WaitFor("READY=1")) << systemd.log();
  ASSERT_TRUE(LoadDemoTp2());
  ASSERT_TRUE(systemd.WaitFor("FDSTORE=1\nFDNAME=wd1.rec.demo")) << systemd.log();
  EXPECT_THAT(systemd.StoredNames(), ::testing::UnorderedElementsAreArray(Tp2StoreNames()));
  CheckBothRanks(shards_a);

  systemd.ClearLog();
  const std::string line = UpdateDemo(ckpt_b);
  EXPECT_THAT(line, HasSubstr("generation 2 published")) << line;
  // The record is stored last: once it is there the update's store traffic is complete.
  ASSERT_TRUE(systemd.WaitFor("FDSTORE=1\nFDNAME=wd1.rec.demo")) << systemd.log();
  EXPECT_THAT(systemd.StoredNames(), ::testing::UnorderedElementsAreArray(Tp2StoreNames()))
      << "the store must hold one set of fds per model, not one per generation";
  std::vector<std::string> removed = systemd.removed();
  EXPECT_THAT(removed, ::testing::UnorderedElementsAreArray(Tp2StoreNames()))
      << "the update must remove generation 1's fds, each once";
  CheckBothRanks(shards_b);
  EXPECT_EQ(StatusOf(socket_, "demo").value("generation", 0), 2);

  EXPECT_EQ(Stop(d1), 0);
  EXPECT_EQ(systemd.StoredNames().size(), 7u) << "a stop must leave the store alone";

  // The new daemon must not need any checkpoint: move them all away.
  std::filesystem::rename(dir_ + "/models", dir_ + "/moved");
  systemd.ClearLog();
  pid_t d2 = systemd.Launch(listener.get(), DaemonArgs(), log_);
  pids_.push_back(d2);
  ASSERT_TRUE(systemd.WaitFor("READY=1")) << systemd.log() << Slurp(log_);
  EXPECT_THAT(systemd.log(), HasSubstr("1 re-adopted"));
  json st = StatusOf(socket_, "demo");
  EXPECT_EQ(st.value("state", ""), "ready") << st.dump();
  EXPECT_EQ(st.value("origin", ""), "fdstore") << st.dump();
  EXPECT_EQ(st.value("generation", 0), 2) << st.dump();
  EXPECT_EQ(Metric(socket_, "weightd_checkpoint_bytes_read_total"), "0");
  EXPECT_EQ(Metric(socket_, "weightd_model_generation{model=\"demo\"}"), "2");
  CheckBothRanks(shards_b);

  // An update of the adopted model rebuilds its plan from the headers of the checkpoint it was
  // loaded from. With that checkpoint gone, an update from memory fails and says why; the
  // generation serves on.
  const std::string q0 = "model.layers.0.self_attn.q_proj.weight";
  auto c_ckpt = Checkpoint::Open(dir_ + "/moved/demo-c");
  ASSERT_TRUE(c_ckpt.ok()) << c_ckpt.status();
  const CheckpointTensor* q0_c = c_ckpt->Find(q0);
  ASSERT_NE(q0_c, nullptr);
  auto q0_bytes = c_ckpt->MapTensor(*q0_c);
  ASSERT_TRUE(q0_bytes.ok()) << q0_bytes.status();
  const UpdateTensor q0_update{q0, q0_c->dtype, q0_c->shape, q0_bytes->data(), q0_bytes->size()};
  auto trainer = Client::Connect(socket_);
  ASSERT_TRUE(trainer.ok()) << trainer.status();
  auto failed = trainer->UpdateTensors("demo", std::span(&q0_update, 1));
  EXPECT_FALSE(failed.ok());
  EXPECT_THAT(std::string(failed.status().message()),
              HasSubstr("updating it rebuilds its plan from the headers of checkpoint"))
      << failed.status();
  EXPECT_EQ(StatusOf(socket_, "demo").value("generation", 0), 2);
  CheckBothRanks(shards_b);

  // With it back, the same update from memory publishes generation 3: layer 0's q rows of the
  // fused qkv_proj are new on both ranks, everything else is generation 2's, copied.
  std::filesystem::rename(dir_ + "/moved", dir_ + "/models");
  systemd.ClearLog();
  auto u3 = trainer->UpdateTensors("demo", std::span(&q0_update, 1));
  ASSERT_TRUE(u3.ok()) << u3.status() << Slurp(log_);
  EXPECT_EQ(u3->generation, 3u);
  EXPECT_EQ(u3->state, "ready");
  EXPECT_EQ(u3->bytes_read, q0_c->nbytes);
  EXPECT_EQ(u3->ranks_rewritten, 2u);
  EXPECT_EQ(u3->targets_rewritten, 2u);  // qkv_proj of layer 0, once per rank
  ASSERT_TRUE(systemd.WaitFor("FDSTORE=1\nFDNAME=wd1.rec.demo")) << systemd.log();
  st = StatusOf(socket_, "demo");
  EXPECT_EQ(st.value("generation", 0), 3) << st.dump();
  EXPECT_EQ(st.value("origin", ""), "fdstore") << st.dump();
  for (int rank : {0, 1}) {
    CheckQOnlyUpdate(rank, shards_b, shards_c, q0_c->nbytes / 2);
  }
  EXPECT_THAT(systemd.StoredNames(), ::testing::UnorderedElementsAreArray(Tp2StoreNames()));

  // A full update from a checkpoint: generation 4 is C.
  const std::string line4 = UpdateDemo(ckpt_c);
  EXPECT_THAT(line4, HasSubstr("generation 4 published")) << line4 << Slurp(log_);
  CheckBothRanks(shards_c);

  // And generation 4 is what the store hands to the next daemon.
  EXPECT_EQ(Stop(d2), 0);
  EXPECT_THAT(systemd.StoredNames(), ::testing::UnorderedElementsAreArray(Tp2StoreNames()));
  std::filesystem::rename(dir_ + "/models", dir_ + "/moved");
  systemd.ClearLog();
  pid_t d3 = systemd.Launch(listener.get(), DaemonArgs(), log_);
  pids_.push_back(d3);
  ASSERT_TRUE(systemd.WaitFor("READY=1")) << systemd.log() << Slurp(log_);
  EXPECT_EQ(StatusOf(socket_, "demo").value("generation", 0), 4);
  EXPECT_EQ(Metric(socket_, "weightd_checkpoint_bytes_read_total"), "0");
  CheckBothRanks(shards_c);
  EXPECT_EQ(Stop(d3), 0);
}

// Registry::FdNames: the record goes last when storing and first when removing, so a record in
// the store always has its fds, also while an update swaps a model's fds.
TEST_F(RestartTest, UpdateRemovesTheRecordBeforeItsFds) {
  log_ = dir_ + "/weightd.log";
  const std::string ckpt_b = MakeDemo("demo-b", 1);
  FakeSystemd systemd(dir_);
  systemd.StartPumping();
  UniqueFd listener = ListenOn(socket_);
  pid_t d = systemd.Launch(listener.get(), DaemonArgs(), log_);
  pids_.push_back(d);
  ASSERT_TRUE(systemd.WaitFor("READY=1")) << systemd.log();
  ASSERT_TRUE(LoadDemoTp2());
  ASSERT_TRUE(systemd.WaitFor("FDSTORE=1\nFDNAME=wd1.rec.demo")) << systemd.log();
  systemd.ClearLog();
  EXPECT_THAT(UpdateDemo(ckpt_b), HasSubstr("generation 2 published"));
  ASSERT_TRUE(systemd.WaitFor("FDSTORE=1\nFDNAME=wd1.rec.demo")) << systemd.log();
  const std::vector<std::string> removed = systemd.removed();
  ASSERT_FALSE(removed.empty());
  EXPECT_EQ(removed.front(), "wd1.rec.demo") << ::testing::PrintToString(removed);
  EXPECT_EQ(Stop(d), 0);
}

// `weightd --takeover` after an update hands over the newest generation with its number (not a
// kept previous one: rollback has nothing to restore), reads no checkpoint byte, and the
// successor updates the adopted model to generation 3.
TEST_F(RestartTest, TakeoverKeepsTheNewestGeneration) {
  log_ = dir_ + "/weightd.log";
  {
    json c = json::parse(Slurp(dir_ + "/weightd.json"));
    c["keep_previous_generation"] = true;
    std::ofstream(dir_ + "/weightd.json") << c.dump();
  }
  const std::string ckpt_b = MakeDemo("demo-b", 1);
  const std::string ckpt_c = MakeDemo("demo-c", 2);
  const std::string shards_b = ShardTp2(ckpt_b, "b");
  const std::string shards_c = ShardTp2(ckpt_c, "c");
  const pid_t old_pid = Spawn(DaemonArgs());
  ASSERT_TRUE(WaitUntil([&] { return Client::Connect(socket_).ok(); })) << Slurp(log_);
  ASSERT_TRUE(LoadDemoTp2());
  const std::string line = UpdateDemo(ckpt_b);
  EXPECT_THAT(line, HasSubstr("generation 2 published")) << line;
  json st = StatusOf(socket_, "demo");
  EXPECT_EQ(st.value("generation", 0), 2) << st.dump();
  EXPECT_EQ(st.value("previous_generation", 0), 1) << st.dump();
  CheckBothRanks(shards_b);

  std::filesystem::rename(dir_ + "/models", dir_ + "/moved");
  std::vector<std::string> args = DaemonArgs();
  args.push_back("--takeover");
  const pid_t new_pid = Spawn(args);
  EXPECT_EQ(WaitFor(old_pid, std::chrono::seconds(20)), 0) << "the old daemon did not exit";
  std::erase(pids_, old_pid);
  st = StatusOf(socket_, "demo");
  EXPECT_EQ(st.value("origin", ""), "takeover") << st.dump();
  EXPECT_EQ(st.value("state", ""), "ready") << st.dump();
  EXPECT_EQ(st.value("generation", 0), 2) << st.dump();
  EXPECT_EQ(st.value("previous_generation", -1), 0) << st.dump();
  EXPECT_EQ(Metric(socket_, "weightd_checkpoint_bytes_read_total"), "0");
  CheckBothRanks(shards_b);
  {
    auto c = Client::Connect(socket_);
    ASSERT_TRUE(c.ok()) << c.status();
    auto rb = c->Rollback("demo");
    EXPECT_EQ(rb.status().code(), absl::StatusCode::kFailedPrecondition) << rb.status();
    EXPECT_THAT(std::string(rb.status().message()), HasSubstr("keeps no previous generation"));
  }

  std::filesystem::rename(dir_ + "/moved", dir_ + "/models");
  const std::string line3 = UpdateDemo(ckpt_c);
  EXPECT_THAT(line3, HasSubstr("generation 3 published")) << line3 << Slurp(log_);
  st = StatusOf(socket_, "demo");
  EXPECT_EQ(st.value("generation", 0), 3) << st.dump();
  EXPECT_EQ(st.value("previous_generation", 0), 2) << st.dump();
  CheckBothRanks(shards_c);
  // The successor keeps generation 2 as the previous one now: a rollback brings B back.
  {
    auto c = Client::Connect(socket_);
    ASSERT_TRUE(c.ok()) << c.status();
    auto rb = c->Rollback("demo");
    ASSERT_TRUE(rb.ok()) << rb.status();
    EXPECT_EQ(rb->generation, 4u);
    EXPECT_EQ(rb->restored, 2u);
  }
  CheckBothRanks(shards_b);
  EXPECT_EQ(Stop(new_pid), 0);
}

// Segments across a takeover: the old daemon splits each rank into three arenas (embeddings/
// norm/lm_head, layer 0, layer 1); the successor, configured for one arena per rank, keeps the
// segments it adopted (the manifests say where each target is), serves them, and an update of
// layer 0's q_proj from memory replaces exactly one arena per rank.
TEST_F(RestartTest, TakeoverKeepsTheSegmentsItAdopted) {
  log_ = dir_ + "/weightd.log";
  auto set_segments = [&](int bytes) {
    json c = json::parse(Slurp(dir_ + "/weightd.json"));
    c["arena_segment_bytes"] = bytes;
    std::ofstream(dir_ + "/weightd.json") << c.dump();
  };
  set_segments(1);
  const std::string ckpt_c = MakeDemo("demo-c", 2);
  const std::string shards_a = ShardTp2(ckpt_, "a");
  const std::string shards_c = ShardTp2(ckpt_c, "c");
  const pid_t old_pid = Spawn(DaemonArgs());
  ASSERT_TRUE(WaitUntil([&] { return Client::Connect(socket_).ok(); })) << Slurp(log_);
  ASSERT_TRUE(LoadDemoTp2());
  for (int rank : {0, 1}) {
    EXPECT_EQ(Metric(socket_,
                     "weightd_rank_arenas{model=\"demo\",rank=\"" + std::to_string(rank) + "\"}"),
              "3");
  }
  CheckBothRanks(shards_a);

  set_segments(0);
  std::vector<std::string> args = DaemonArgs();
  args.push_back("--takeover");
  const pid_t new_pid = Spawn(args);
  EXPECT_EQ(WaitFor(old_pid, std::chrono::seconds(20)), 0) << "the old daemon did not exit";
  std::erase(pids_, old_pid);
  json st = StatusOf(socket_, "demo");
  EXPECT_EQ(st.value("origin", ""), "takeover") << st.dump();
  EXPECT_EQ(st.value("state", ""), "ready") << st.dump();
  for (int rank : {0, 1}) {
    EXPECT_EQ(Metric(socket_,
                     "weightd_rank_arenas{model=\"demo\",rank=\"" + std::to_string(rank) + "\"}"),
              "3");
  }
  CheckBothRanks(shards_a);

  const std::string q0 = "model.layers.0.self_attn.q_proj.weight";
  auto c_ckpt = Checkpoint::Open(ckpt_c);
  ASSERT_TRUE(c_ckpt.ok()) << c_ckpt.status();
  const CheckpointTensor* q0_c = c_ckpt->Find(q0);
  ASSERT_NE(q0_c, nullptr);
  auto q0_bytes = c_ckpt->MapTensor(*q0_c);
  ASSERT_TRUE(q0_bytes.ok()) << q0_bytes.status();
  const UpdateTensor q0_update{q0, q0_c->dtype, q0_c->shape, q0_bytes->data(), q0_bytes->size()};
  auto trainer = Client::Connect(socket_);
  ASSERT_TRUE(trainer.ok()) << trainer.status();
  auto u = trainer->UpdateTensors("demo", std::span(&q0_update, 1));
  ASSERT_TRUE(u.ok()) << u.status() << Slurp(log_);
  EXPECT_EQ(u->generation, 2u);
  EXPECT_EQ(u->ranks_rewritten, 2u);
  EXPECT_EQ(u->segments_rewritten, 2u);  // layer 0's arena of each rank, nothing else
  EXPECT_EQ(u->targets_rewritten, 2u);
  uint64_t rank_bytes = 0;
  st = StatusOf(socket_, "demo");
  for (const json& r : st["ranks"]) {
    EXPECT_EQ(r.value("arenas", 0), 3) << st.dump();
    rank_bytes += r.value("arena_bytes", 0ull);
  }
  EXPECT_GT(u->bytes_allocated, 0u);
  EXPECT_LT(u->bytes_allocated, rank_bytes / 2);
  for (int rank : {0, 1}) CheckQOnlyUpdate(rank, shards_a, shards_c, q0_c->nbytes / 2);
  EXPECT_EQ(Stop(new_pid), 0);
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
    EXPECT_EQ(fds->size(), 5u);  // 2 arenas (rest, layers), manifest, record, listener
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
