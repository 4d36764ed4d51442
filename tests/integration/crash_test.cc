// Crashes (issue 10): SIGKILL of the daemon at random points, then a restart that must come up
// clean with every model that had been handed over, byte for byte.
//
// The daemon runs under FakeSystemd (support/fake_systemd.h): this process holds the listening
// socket and the fd store, as PID 1 would, so what the daemon stored survives its SIGKILL and
// comes back through LISTEN_FDS at the next start. Successors started with `--takeover` get
// NOTIFY_SOCKET too (they store what they load), so both carriers of docs/OPERATIONS.md run in
// one timeline. Models: `demo` (3 MB) stays loaded; `big` (256 MiB of pseudo-random bytes, a
// load of a few tenths of a second) comes and goes.
//
// Each round kills at one of four points, in an order and with delays drawn from a seeded RNG
// (printed; WEIGHTD_CRASH_SEED replays it, WEIGHTD_CRASH_ROUNDS sets the number of rounds):
//   idle           the daemon serves; a client holds a mapping of `demo` across the kill;
//   mid-load       `big` is loading (or just finished: the delay spans the whole load);
//   takeover-old   a successor is taking over; the old daemon is killed;
//   takeover-new   a successor is taking over; the successor is killed.
// Whichever process is left serving keeps serving; when none is, FakeSystemd starts a new one
// with the stored fds. Then, whatever the round: the daemon answers on the socket path; it lists
// `demo` ready, and `big` ready if it was ready before the kill, ready or absent after a kill
// mid-load (absent: it loads again cleanly), nothing else; every listed model attaches and
// equals its checkpoint (wd_attach_check); the fd store holds exactly the listed models' fds;
// the daemon holds exactly two memfds per model (arena and manifest), so nothing dropped at
// adoption was kept.
//
// PlainRestartsReplaceTheStaleSocketFile does the same without systemd: a daemon bound to its own
// socket file and SIGKILLed leaves the file behind, which the next daemon must replace.
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "support/fake_systemd.h"
#include "support/proc_resources.h"
#include "support/process.h"
#include "support/synthetic_checkpoint.h"
#include "weightd/client.h"
#include "weightd/handoff.h"
#include "weightd/seqpacket.h"

namespace weightd {
namespace {

using json = nlohmann::json;
using testing::Clock;
using testing::FakeSystemd;
using testing::Slurp;
using testing::WaitFor;
using testing::WaitUntil;

enum class Kill { kIdle, kMidLoad, kTakeoverOld, kTakeoverNew };
const char* KillName(Kill k) {
  switch (k) {
    case Kill::kIdle:
      return "idle";
    case Kill::kMidLoad:
      return "mid-load";
    case Kill::kTakeoverOld:
      return "takeover-old";
    case Kill::kTakeoverNew:
      return "takeover-new";
  }
  return "?";
}

// The models the daemon lists ({name: state}), asked over a raw connection that gives up after
// `timeout_ms` (a connection in the backlog of a socket nobody accepts from would wait forever).
// `arenas`, when given, gets each model's arenas of rank 0 (its segments; 1 from daemons that
// do not say).
std::optional<std::map<std::string, std::string>> ListModels(
    const std::string& socket, int timeout_ms = 1000,
    std::map<std::string, int>* arenas = nullptr) {
  auto fd = ConnectSeqpacket(socket);
  if (!fd.ok()) return std::nullopt;
  std::map<std::string, std::string> out;
  for (const std::string req :
       {R"({"op":"hello","version":1,"id":0})", R"({"op":"status","id":1})"}) {
    if (!SendPacket(fd->get(), req).ok()) return std::nullopt;
    pollfd p{fd->get(), POLLIN, 0};
    if (::poll(&p, 1, timeout_ms) != 1) return std::nullopt;
    auto pkt = RecvPacket(fd->get(), 1 << 20);
    if (!pkt.ok() || pkt->eof) return std::nullopt;
    const json j = json::parse(pkt->data, nullptr, false);
    if (j.is_discarded() || !j.value("ok", false)) return std::nullopt;
    if (j.contains("result") && j["result"].contains("models")) {
      for (const json& m : j["result"]["models"]) {
        std::string state = "ready";
        for (const json& r : m.value("ranks", json::array())) {
          if (r.value("state", "") != "ready") state = r.value("state", "?");
          if (arenas != nullptr && r.value("rank", -1) == 0) {
            (*arenas)[m.value("name", "")] = r.value("arenas", 1);
          }
        }
        out[m.value("name", "")] = state;
      }
    }
  }
  return out;
}

std::vector<std::string> FdNamesOf(const std::map<std::string, std::string>& models,
                                   const std::map<std::string, int>& arenas) {
  std::vector<std::string> names;
  for (const auto& [m, state] : models) {
    const auto it = arenas.find(m);
    for (int part = 0; part < (it == arenas.end() ? 1 : it->second); ++part) {
      names.push_back(EncodeFdName(FdKind::kArena, m, 0, part));
    }
    names.push_back(EncodeFdName(FdKind::kManifest, m, 0));
    names.push_back(EncodeFdName(FdKind::kRecord, m));
  }
  std::sort(names.begin(), names.end());
  return names;
}

bool Exited(pid_t pid, int* rc) {
  int status = 0;
  if (::waitpid(pid, &status, WNOHANG) != pid) return false;
  *rc = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return true;
}

class CrashTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/weightd-crash-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    socket_ = dir_ + "/weightd.sock";
    std::filesystem::create_directory(dir_ + "/models");
    const std::string mk = dir_ + "/mk.log";
    ASSERT_EQ(WaitFor(testing::Spawn({PYTHON_BIN, MAKE_DEMO_CHECKPOINT, Ckpt("demo")}, mk, mk),
                      std::chrono::seconds(60)),
              0)
        << Slurp(mk);
    // 16 tensors of 16 MiB: the load takes long enough to be killed in the middle.
    std::vector<testing::SyntheticTensor> big;
    big.reserve(16);
    for (int i = 0; i < 16; ++i) {
      big.push_back({"layers." + std::to_string(i) + ".weight", "BF16", {4096, 2048}});
    }
    ASSERT_TRUE(testing::WriteSyntheticCheckpoint(Ckpt("big"), big, 2, "{}"));
    ASSERT_TRUE(testing::FillSyntheticCheckpoint(Ckpt("big"), 7));
    std::ofstream(dir_ + "/weightd.json") << json{
        {"socket", socket_},
        {"backend", "host"},
        {"model_roots", {dir_ + "/models"}},
        {"io_threads", 2},
        {"hello_timeout_ms", 2000}}.dump();
  }
  void TearDown() override {
    for (pid_t p : {daemon_, successor_}) {
      if (p > 0) {
        ::kill(p, SIGKILL);
        ::waitpid(p, nullptr, 0);
      }
    }
    if (HasFailure()) {
      for (const std::string& log : logs_) {
        const std::string text = Slurp(log);
        std::fprintf(stderr, "---- %s (tail) ----\n%s\n", log.c_str(),
                     text.substr(text.size() > 6000 ? text.size() - 6000 : 0).c_str());
      }
    }
    systemd_.reset();
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
  std::string Ckpt(const std::string& name) const { return dir_ + "/models/" + name; }
  std::string NextLog() {
    logs_.push_back(dir_ + "/weightd." + std::to_string(logs_.size()) + ".log");
    return logs_.back();
  }
  std::vector<std::string> DaemonArgs() const {
    return {WEIGHTD_BIN, "--config", dir_ + "/weightd.json"};
  }

  // Starts a daemon the way systemd restarts one, with the stored fds; waits until it answers.
  void Relaunch() {
    systemd_->Pump(50);  // whatever the dead daemon sent before it died
    daemon_ = systemd_->Launch(listener_.get(), DaemonArgs(), NextLog());
    ASSERT_TRUE(WaitUntil([&] { return ListModels(socket_).has_value(); }))
        << "the restarted daemon does not answer on " << socket_;
  }

  std::string WaitSettled(const std::string& name) {
    std::string state = "absent";
    WaitUntil(
        [&] {
          auto models = ListModels(socket_);
          if (!models) return false;
          auto it = models->find(name);
          state = it == models->end() ? "absent" : it->second;
          return state != "loading" && state != "unloading";
        },
        std::chrono::seconds(60));
    return state;
  }

  absl::Status Load(const std::string& name) {
    auto c = Client::Connect(socket_);
    if (!c.ok()) return c.status();
    LoadOptions o;
    o.recipe = "hf";
    return c->Load(name, Ckpt(name), o);
  }
  absl::Status Unload(const std::string& name) {
    auto c = Client::Connect(socket_);
    if (!c.ok()) return c.status();
    return c->Unload(name, /*force=*/true);
  }

  int AttachCheck(const std::string& model) {
    const std::string out = dir_ + "/check.log";
    const int rc =
        WaitFor(testing::Spawn({ATTACH_CHECK_BIN, socket_, model, "0", Ckpt(model)}, out, out),
                std::chrono::seconds(60));
    EXPECT_EQ(rc, 0) << model << ": " << Slurp(out);
    return rc;
  }

  // Kills a successor or the daemon during a takeover; leaves daemon_ on the process that
  // serves afterwards (-1 if none does). Counts the daemons started meanwhile in `restarts`.
  void KillDuringTakeover(bool kill_old, std::chrono::microseconds delay, int& restarts) {
    const std::string log = NextLog();
    std::vector<std::string> args = DaemonArgs();
    args.push_back("--takeover");
    successor_ = testing::Spawn(args, log, log, {{"NOTIFY_SOCKET", systemd_->path()}});
    std::this_thread::sleep_for(delay);
    ::kill(kill_old ? daemon_ : successor_, SIGKILL);
    int rc = 0;
    bool exited = false;
    auto serving = [&] {
      return Slurp(log).find("takeover: confirmed; serving") != std::string::npos;
    };
    if (kill_old) {
      // 0: it had handed over and exited before the signal came.
      const int old_rc = WaitFor(daemon_, std::chrono::seconds(10));
      EXPECT_THAT(old_rc, ::testing::AnyOf(0, 128 + SIGKILL));
      daemon_ = -1;
      WaitUntil(
          [&] {
            exited = Exited(successor_, &rc);
            return exited || serving();
          },
          std::chrono::seconds(3));
      if (!exited && !serving()) {
        // Its connection waits in the backlog of the socket this process holds, as it would
        // under systemd, which would start the service for it: it takes over from that one.
        std::printf("  the successor waits in the backlog; a daemon is started for it\n");
        Relaunch();
        ASSERT_FALSE(HasFatalFailure());
        ++restarts;
        ASSERT_TRUE(WaitUntil([&] {
          exited = Exited(successor_, &rc);
          return exited || serving();
        }));
        if (!exited) {
          EXPECT_EQ(WaitFor(daemon_, std::chrono::seconds(10)), 0) << "handed over and exited";
          daemon_ = -1;
        }
      }
      if (exited) {
        // It must give up cleanly: exit 1 with a message, no crash, no hang.
        EXPECT_EQ(rc, 1) << Slurp(log);
        std::printf("  the successor gave up: %s\n", LastLine(Slurp(log)).c_str());
      } else {
        std::printf("  the successor serves\n");
        daemon_ = successor_;
      }
      successor_ = -1;
      return;
    }
    // 1: it had given up before the signal came (it found a load running, say).
    EXPECT_THAT(WaitFor(successor_, std::chrono::seconds(10)), ::testing::AnyOf(1, 128 + SIGKILL));
    successor_ = -1;
    // The old daemon serves again unless it had handed over (then it exits 0 once its
    // connections are answered).
    ASSERT_TRUE(WaitUntil([&] {
      exited = Exited(daemon_, &rc);
      return exited || ListModels(socket_, 200).has_value();
    }));
    if (exited) {
      EXPECT_EQ(rc, 0) << "the old daemon after handing over";
      std::printf("  the old daemon had handed over; it exited\n");
      daemon_ = -1;
    } else {
      std::printf("  the old daemon serves again\n");
    }
  }

  static std::string LastLine(const std::string& text) {
    const size_t end = text.find_last_not_of('\n');
    if (end == std::string::npos) return "(nothing logged)";
    const size_t begin = text.rfind('\n', end);
    return text.substr(begin == std::string::npos ? 0 : begin + 1, end - begin);
  }

  // What every round ends with (see the file comment). `big` is "ready", "absent" or "either".
  void CheckClean(const std::string& big) {
    struct stat st {};
    ASSERT_EQ(::lstat(socket_.c_str(), &st), 0) << "the socket file is gone";
    ASSERT_TRUE(S_ISSOCK(st.st_mode));
    std::map<std::string, int> arenas;
    auto models = ListModels(socket_, 5000, &arenas);
    ASSERT_TRUE(models.has_value()) << "the daemon does not answer";
    std::map<std::string, std::string> want = {{"demo", "ready"}};
    if (big == "ready" || (big == "either" && models->count("big") != 0)) want["big"] = "ready";
    EXPECT_EQ(*models, want);
    for (const auto& [m, state] : *models) AttachCheck(m);
    // Sets dropped at adoption are removed from the store by the daemon: give it a moment.
    const std::vector<std::string> names = FdNamesOf(*models, arenas);
    std::vector<std::string> stored;
    WaitUntil(
        [&] {
          stored = systemd_->StoredNames();
          std::sort(stored.begin(), stored.end());
          return stored == names;
        },
        std::chrono::seconds(5));
    EXPECT_EQ(stored, names) << "the fd store";
    const testing::ProcResources r = testing::ReadProcResources(daemon_);
    int memfds = 0;  // a manifest and the arenas of each model
    for (const auto& [m, state] : *models) memfds += 1 + arenas[m];
    EXPECT_EQ(r.memfd_fds, memfds) << r.ToString();
  }

  std::string dir_, socket_;
  std::vector<std::string> logs_;
  std::unique_ptr<FakeSystemd> systemd_;
  UniqueFd listener_;
  pid_t daemon_ = -1, successor_ = -1;
};

// WEIGHTD_CRASH_SEED, else a fresh one (printed by each test).
uint64_t CrashSeed() {
  const char* env = std::getenv("WEIGHTD_CRASH_SEED");
  return env != nullptr && *env != '\0' ? std::strtoull(env, nullptr, 10) : std::random_device{}();
}

// WEIGHTD_CRASH_ROUNDS, else `fallback`.
int CrashRounds(int fallback) {
  const char* env = std::getenv("WEIGHTD_CRASH_ROUNDS");
  return env != nullptr && *env != '\0' ? std::atoi(env) : fallback;
}

TEST_F(CrashTest, SigkillAtRandomPointsRestartsClean) {
  const uint64_t seed = CrashSeed();
  const int rounds = CrashRounds(12);
  std::printf("crash: %d rounds, seed %llu (rerun with WEIGHTD_CRASH_SEED=%llu)\n", rounds,
              static_cast<unsigned long long>(seed), static_cast<unsigned long long>(seed));
  std::mt19937_64 rng(seed);
  double takeover_s = 0;
  auto uniform = [&](double lo, double hi) {
    return std::uniform_real_distribution<double>(lo, hi)(rng);
  };

  systemd_ = std::make_unique<FakeSystemd>(dir_);
  systemd_->StartPumping();
  listener_ = testing::ListenOn(socket_);
  daemon_ = systemd_->Launch(listener_.get(), DaemonArgs(), NextLog());
  ASSERT_TRUE(WaitUntil([&] { return ListModels(socket_).has_value(); }));
  ASSERT_TRUE(Load("demo").ok());
  ASSERT_EQ(WaitSettled("demo"), "ready");
  // The length of a load of `big` (page cache warm from here on) sets the window of mid-load.
  const auto t0 = Clock::now();
  ASSERT_TRUE(Load("big").ok());
  ASSERT_EQ(WaitSettled("big"), "ready");
  const double load_s = std::chrono::duration<double>(Clock::now() - t0).count();
  std::printf("crash: a load of big takes %.3f s\n", load_s);
  bool big_ready = true;
  // So does one whole takeover (successor started to old daemon gone) for the takeover rounds.
  {
    const std::string log = NextLog();
    std::vector<std::string> args = DaemonArgs();
    args.push_back("--takeover");
    const auto t1 = Clock::now();
    successor_ = testing::Spawn(args, log, log, {{"NOTIFY_SOCKET", systemd_->path()}});
    ASSERT_EQ(WaitFor(daemon_, std::chrono::seconds(20)), 0) << Slurp(log);
    daemon_ = std::exchange(successor_, -1);
    takeover_s = std::chrono::duration<double>(Clock::now() - t1).count();
    std::printf("crash: a takeover takes %.3f s\n", takeover_s);
  }

  const auto t_rounds = Clock::now();
  std::vector<Kill> order;
  int restarts = 0, big_reloads = 0, big_survived = 0;
  for (int round = 0; round < rounds; ++round) {
    if (order.empty()) {
      order = {Kill::kIdle, Kill::kMidLoad, Kill::kTakeoverOld, Kill::kTakeoverNew};
      std::shuffle(order.begin(), order.end(), rng);
    }
    const Kill kill = order.back();
    order.pop_back();
    std::string big_after = big_ready ? "ready" : "absent";
    std::optional<Client> held_client;
    std::optional<Attachment> held;
    switch (kill) {
      case Kill::kIdle: {
        auto c = Client::Connect(socket_);
        ASSERT_TRUE(c.ok()) << c.status();
        auto a = c->Attach("demo", 0);
        ASSERT_TRUE(a.ok()) << a.status();
        held_client.emplace(std::move(*c));
        held.emplace(std::move(*a));
        const double d = uniform(0, 0.2);
        std::printf("round %d: %s, SIGKILL after %.0f ms\n", round, KillName(kill), d * 1e3);
        std::this_thread::sleep_for(std::chrono::duration<double>(d));
        ::kill(daemon_, SIGKILL);
        ASSERT_EQ(WaitFor(daemon_, std::chrono::seconds(10)), 128 + SIGKILL);
        daemon_ = -1;
        break;
      }
      case Kill::kMidLoad: {
        if (big_ready) {
          ASSERT_TRUE(Unload("big").ok());
          ASSERT_EQ(WaitSettled("big"), "absent");
        }
        const double d = uniform(0, 1.2 * load_s);
        std::printf("round %d: %s, SIGKILL %.0f ms into a %.0f ms load\n", round, KillName(kill),
                    d * 1e3, load_s * 1e3);
        ASSERT_TRUE(Load("big").ok());
        std::this_thread::sleep_for(std::chrono::duration<double>(d));
        ::kill(daemon_, SIGKILL);
        ASSERT_EQ(WaitFor(daemon_, std::chrono::seconds(10)), 128 + SIGKILL);
        daemon_ = -1;
        big_after = "either";
        break;
      }
      case Kill::kTakeoverOld:
      case Kill::kTakeoverNew: {
        const double d = uniform(0, 1.2 * takeover_s);
        std::printf("round %d: %s, SIGKILL %.0f ms after the successor started\n", round,
                    KillName(kill), d * 1e3);
        KillDuringTakeover(kill == Kill::kTakeoverOld,
                           std::chrono::microseconds(static_cast<int64_t>(d * 1e6)), restarts);
        ASSERT_FALSE(HasFatalFailure());
        break;
      }
    }
    if (daemon_ < 0) {
      Relaunch();
      ASSERT_FALSE(HasFatalFailure());
      ++restarts;
    }
    CheckClean(big_after);
    ASSERT_FALSE(HasFatalFailure());
    if (held) {
      EXPECT_TRUE(held->Verify().ok()) << "a mapping held across the kill changed";
      held.reset();
      held_client.reset();
    }
    const bool big_listed = ListModels(socket_, 5000)->count("big") != 0;
    if (big_after == "either") {
      std::printf("  big %s after the restart\n", big_listed ? "ready" : "absent");
      big_survived += big_listed;
    }
    if (!big_listed) {
      // A load that was killed leaves nothing behind: the model loads again cleanly.
      ASSERT_TRUE(Load("big").ok());
      ASSERT_EQ(WaitSettled("big"), "ready");
      AttachCheck("big");
      ++big_reloads;
    }
    big_ready = true;
    // Half the time `big` goes again, so that idle and takeover rounds see one model or two.
    if (rng() % 2 == 0) {
      ASSERT_TRUE(Unload("big").ok());
      ASSERT_EQ(WaitSettled("big"), "absent");
      big_ready = false;
    }
  }
  std::printf(
      "crash: %d rounds in %.1f s: %d daemons started from the fd store; big loaded again %d "
      "times, ready after a kill mid-load %d times\n",
      rounds, std::chrono::duration<double>(Clock::now() - t_rounds).count(), restarts, big_reloads,
      big_survived);
  ::kill(daemon_, SIGTERM);
  EXPECT_EQ(WaitFor(daemon_, std::chrono::seconds(20)), 0);
  daemon_ = -1;
}

// Without systemd: a daemon that binds its own socket file and is SIGKILLed (at random while it
// starts and preloads, or idle) leaves the file behind; the next one replaces it, preloads again
// and serves the checkpoints' bytes. A second daemon while one lives is refused, and a SIGTERM
// removes the file. WEIGHTD_CRASH_ROUNDS / 3 rounds (4 by default).
TEST_F(CrashTest, PlainRestartsReplaceTheStaleSocketFile) {
  const uint64_t seed = CrashSeed();
  const int rounds = std::max(1, CrashRounds(12) / 3);
  std::printf("crash (plain): %d rounds, seed %llu (rerun with WEIGHTD_CRASH_SEED=%llu)\n", rounds,
              static_cast<unsigned long long>(seed), static_cast<unsigned long long>(seed));
  std::mt19937_64 rng(seed);
  json config = json::parse(Slurp(dir_ + "/weightd.json"));
  config["preload"] = json::array();
  for (const char* m : {"demo", "big"}) {
    config["preload"].push_back({{"name", m}, {"checkpoint", Ckpt(m)}, {"recipe", "hf"}});
  }
  std::ofstream(dir_ + "/weightd.json") << config.dump();
  auto start = [&] {
    const std::string log = NextLog();
    daemon_ = testing::Spawn(DaemonArgs(), log, log);
  };
  auto ready = [&] {
    auto models = ListModels(socket_);
    return models.has_value() &&
           *models == std::map<std::string, std::string>{{"demo", "ready"}, {"big", "ready"}};
  };
  auto kill = [&] {
    ::kill(daemon_, SIGKILL);
    EXPECT_EQ(WaitFor(daemon_, std::chrono::seconds(10)), 128 + SIGKILL);
    daemon_ = -1;
  };
  // The time from start to both preloads ready bounds the random kills.
  const auto t0 = Clock::now();
  start();
  ASSERT_TRUE(WaitUntil(ready, std::chrono::seconds(60))) << Slurp(logs_.back());
  const double start_s = std::chrono::duration<double>(Clock::now() - t0).count();
  std::printf("crash (plain): start to preloads ready %.3f s\n", start_s);
  kill();
  int stale = 0;
  for (int round = 0; round < rounds; ++round) {
    struct stat st {};
    stale += ::lstat(socket_.c_str(), &st) == 0 && S_ISSOCK(st.st_mode);
    start();
    const double d = std::uniform_real_distribution<double>(0, 1.2 * start_s)(rng);
    std::printf("round %d: SIGKILL %.0f ms after the start\n", round, d * 1e3);
    std::this_thread::sleep_for(std::chrono::duration<double>(d));
    kill();
    start();
    ASSERT_TRUE(WaitUntil(ready, std::chrono::seconds(60)))
        << "the daemon after a SIGKILL did not come up: " << Slurp(logs_.back());
    AttachCheck("demo");
    AttachCheck("big");
    kill();
  }
  std::printf("crash (plain): %d of %d restarts found a stale socket file and replaced it\n", stale,
              rounds);
  EXPECT_GT(stale, 0);
  start();
  ASSERT_TRUE(WaitUntil(ready, std::chrono::seconds(60))) << Slurp(logs_.back());
  const std::string second = NextLog();
  EXPECT_EQ(WaitFor(testing::Spawn(DaemonArgs(), second, second), std::chrono::seconds(20)), 1);
  EXPECT_THAT(Slurp(second), ::testing::HasSubstr("another weightd is already listening"));
  AttachCheck("demo");
  ::kill(daemon_, SIGTERM);
  EXPECT_EQ(WaitFor(daemon_, std::chrono::seconds(20)), 0);
  daemon_ = -1;
  EXPECT_NE(::access(socket_.c_str(), F_OK), 0) << "a stopped daemon left its socket file";
}

}  // namespace
}  // namespace weightd
