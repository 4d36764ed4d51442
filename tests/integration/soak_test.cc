// Soak (issue 10): client processes attach, check and detach in a loop while the test loads,
// unloads and force-unloads models under them; afterwards the daemon must hold exactly what it
// held before.
//
// The daemon runs under FakeSystemd (support/fake_systemd.h), so its fd store is checked too.
// Models: `stable` stays loaded throughout; `churn-a` and `churn-b` (same shapes, other bytes)
// are loaded and unloaded by the driver: a plain unload, a forced unload when a client holds
// them (the client's mapping must stay intact), now and then a forced unload right after the
// load started (which cancels it if it is still running). WEIGHTD_SOAK_CLIENTS processes of
// wd_soak_client (soak_client.cc) run for WEIGHTD_SOAK_SECONDS, each checking every attachment's
// bytes against the checkpoint.
//
// Baseline: after a warm-up round of the same work (so that lazily made things exist: malloc
// arenas, the first load's structures), with only `stable` loaded and no client connected.
// The end state, taken the same way, must equal it in descriptors, memfd descriptors, memfd
// mappings, threads, leases and fd-store names; resident anonymous memory may exceed it by
// kRssSlackKiB (see there). Waits are bounded: a connection closed by a client is released by
// the daemon's event loop shortly after, so each figure gets a few seconds to settle.
//
//   WEIGHTD_SOAK_SECONDS=600 WEIGHTD_SOAK_CLIENTS=8 build/tests/integration/soak_test
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <regex>
#include <string>
#include <thread>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "support/fake_systemd.h"
#include "support/proc_resources.h"
#include "support/process.h"
#include "weightd/client.h"

namespace weightd {
namespace {

using json = nlohmann::json;
using testing::Clock;
using testing::FakeSystemd;
using testing::ProcResources;
using testing::ReadProcResources;
using testing::Slurp;
using testing::WaitFor;
using testing::WaitUntil;

// Resident anonymous memory may end this much above the baseline without counting as a leak:
// glibc keeps freed heap memory in its arenas (one per thread that allocated, and load threads
// come and go) and returns it to the kernel only when the top of a heap is free, so RssAnon
// moves by a few MiB with allocation order alone. A per-request leak of even a few hundred
// bytes over the thousands of requests of a soak exceeds it; a leaked arena or mapping shows in
// the exact memfd counts instead.
[[maybe_unused]] constexpr int64_t kRssSlackKiB = int64_t{16} * 1024;

double EnvDouble(const char* name, double fallback) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? std::atof(v) : fallback;
}

int RunCmd(const std::vector<std::string>& argv, const std::string& out) {
  return WaitFor(testing::Spawn(argv, out, out), std::chrono::seconds(60));
}

// Leases on every model, from a status call; -1 when the daemon does not answer.
int64_t LeaseCount(const std::string& socket) {
  auto c = Client::Connect(socket);
  if (!c.ok()) return -1;
  auto st = c->Status();
  if (!st.ok()) return -1;
  int64_t n = 0;
  for (const ModelInfo& m : *st) {
    for (const RankStatusInfo& r : m.ranks) n += static_cast<int64_t>(r.lease_count);
  }
  return n;
}

std::vector<std::string> ModelNames(const std::string& socket) {
  std::vector<std::string> out;
  auto c = Client::Connect(socket);
  if (!c.ok()) return {"(no answer)"};
  auto st = c->Status();
  if (!st.ok()) return {"(no answer)"};
  for (const ModelInfo& m : *st) out.push_back(m.name + ":" + m.state);
  return out;
}

// The value of the unlabelled sample `name`, or -1.
double Sample(const std::string& socket, const std::string& name) {
  auto c = Client::Connect(socket);
  if (!c.ok()) return -1;
  auto m = c->Metrics();
  if (!m.ok()) return -1;
  const size_t p = m->find("\n" + name + " ");
  if (p == std::string::npos) return -1;
  return std::atof(m->c_str() + p + name.size() + 2);
}

// The driver's side of the churn: what it did, for the summary.
struct Churn {
  int loads = 0, unloads = 0, forced_attached = 0, cancels = 0;
};

class SoakTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/weightd-soak-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    socket_ = dir_ + "/weightd.sock";
    std::filesystem::create_directory(dir_ + "/models");
    const std::vector<std::pair<std::string, std::vector<std::string>>> models = {
        {"stable", {}}, {"churn-a", {"--seed", "1"}}, {"churn-b", {"--seed", "2", "--f32"}}};
    for (const auto& [name, extra] : models) {
      std::vector<std::string> argv = {PYTHON_BIN, MAKE_DEMO_CHECKPOINT, Ckpt(name)};
      argv.insert(argv.end(), extra.begin(), extra.end());
      ASSERT_EQ(RunCmd(argv, dir_ + "/mk.log"), 0) << Slurp(dir_ + "/mk.log");
    }
    std::ofstream(dir_ + "/weightd.json") << json{
        {"socket", socket_},
        {"backend", "host"},
        {"model_roots", {dir_ + "/models"}},
        {"io_threads", 2},
        {"log_level", "info"}}.dump();
  }
  void TearDown() override {
    for (pid_t p : clients_) {
      ::kill(p, SIGKILL);
      ::waitpid(p, nullptr, 0);
    }
    if (daemon_ > 0) {
      ::kill(daemon_, SIGKILL);
      ::waitpid(daemon_, nullptr, 0);
    }
    if (HasFailure()) {
      std::fprintf(stderr, "---- weightd log (tail) ----\n%s\n", Tail(Slurp(log_)).c_str());
    }
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
  static std::string Tail(const std::string& s) {
    return s.size() > 8000 ? s.substr(s.size() - 8000) : s;
  }
  std::string Ckpt(const std::string& name) const { return dir_ + "/models/" + name; }

  absl::Status Load(const std::string& name) {
    auto c = Client::Connect(socket_);
    if (!c.ok()) return c.status();
    LoadOptions o;
    o.recipe = "hf";
    return c->Load(name, Ckpt(name), o);
  }
  // "ready", "failed: ...", "absent", or the state after 20 s.
  std::string WaitLoaded(const std::string& name) {
    std::string state;
    WaitUntil([&] {
      auto c = Client::Connect(socket_);
      if (!c.ok()) return false;
      auto st = c->Status(name);
      if (!st.ok()) {
        state = absl::IsNotFound(st.status()) ? "absent" : st.status().ToString();
        return absl::IsNotFound(st.status());
      }
      state = st->front().state;
      if (state == "failed") state += ": " + st->front().error;
      return state != "loading" && state != "unloading";
    });
    return state;
  }
  absl::Status Unload(const std::string& name, bool force) {
    auto c = Client::Connect(socket_);
    if (!c.ok()) return c.status();
    return c->Unload(name, force);
  }

  // One round of churn on `name`: load, hold a little, unload (forced when attached). Now and
  // then the load is force-unloaded at once instead (a cancel if it still runs).
  void ChurnOnce(const std::string& name, std::mt19937_64& rng, Churn& churn) {
    ASSERT_TRUE(Load(name).ok()) << name;
    ++churn.loads;
    if (rng() % 5 == 0) {
      const absl::Status s = Unload(name, /*force=*/true);
      ASSERT_TRUE(s.ok()) << s;
      ++churn.cancels;
      ASSERT_TRUE(WaitUntil([&] { return WaitLoaded(name) == "absent"; })) << name;
      return;
    }
    ASSERT_EQ(WaitLoaded(name), "ready") << name;
    std::this_thread::sleep_for(std::chrono::milliseconds(20 + rng() % 200));
    absl::Status s = Unload(name, /*force=*/false);
    if (s.code() == absl::StatusCode::kFailedPrecondition &&
        s.message().find("is attached by") != std::string::npos) {
      s = Unload(name, /*force=*/true);
      ++churn.forced_attached;
    }
    ASSERT_TRUE(s.ok()) << s;
    ++churn.unloads;
  }

  // Runs `n` clients for `seconds` while churning; returns when they all exited. Their summary
  // lines are added to `summaries`.
  void RunRound(int n, double seconds, uint64_t seed, Churn& churn,
                std::vector<std::string>& summaries) {
    for (int i = 0; i < n; ++i) {
      const std::string out = dir_ + "/client" + std::to_string(clients_started_++);
      clients_.push_back(testing::Spawn(
          {SOAK_CLIENT_BIN, socket_, std::to_string(seconds), std::to_string(seed + i),
           "stable=" + Ckpt("stable"), "churn-a=" + Ckpt("churn-a"), "churn-b=" + Ckpt("churn-b")},
          out + ".out", out + ".err"));
      outputs_.push_back(out);
    }
    std::mt19937_64 rng(seed);
    const auto deadline = Clock::now() + std::chrono::duration<double>(seconds + 30);
    std::vector<pid_t> running = clients_;
    while (!running.empty() && Clock::now() < deadline) {
      ChurnOnce(rng() % 2 ? "churn-a" : "churn-b", rng, churn);
      if (HasFatalFailure()) return;
      std::erase_if(running, [&](pid_t p) {
        int status = 0;
        if (::waitpid(p, &status, WNOHANG) != p) return false;
        EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0)
            << "a soak client failed (status " << status << ")";
        return true;
      });
    }
    ASSERT_TRUE(running.empty()) << "soak clients still running 30 s after their time";
    clients_.clear();
    for (const std::string& out : outputs_) {
      const std::string text = Slurp(out + ".out");
      EXPECT_THAT(text, ::testing::HasSubstr("errors=0")) << Slurp(out + ".err");
      summaries.push_back(text);
    }
    outputs_.clear();
  }

  // Only `stable` listed, no lease, no load running, no connection but the one asking.
  void Quiesce() {
    for (const char* name : {"churn-a", "churn-b"}) {
      const absl::Status s = Unload(name, /*force=*/true);
      ASSERT_TRUE(s.ok() || absl::IsNotFound(s)) << s;
    }
    ASSERT_TRUE(WaitUntil([&] {
      return ModelNames(socket_) == std::vector<std::string>{"stable:ready"} &&
             LeaseCount(socket_) == 0 && Sample(socket_, "weightd_loads_running") == 0 &&
             Sample(socket_, "weightd_connections") == 1;
    })) << ::testing::PrintToString(ModelNames(socket_))
        << " leases " << LeaseCount(socket_);
    systemd_->Pump();
  }

  // The daemon's figures once they hold still (two reads 200 ms apart agree on the counts).
  ProcResources Settled() {
    ProcResources last = ReadProcResources(daemon_);
    for (int i = 0; i < 25; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
      const ProcResources now = ReadProcResources(daemon_);
      if (now.fds == last.fds && now.threads == last.threads && now.memfd_maps == last.memfd_maps) {
        return now;
      }
      last = now;
    }
    return last;
  }

  std::string dir_, socket_, log_;
  std::unique_ptr<FakeSystemd> systemd_;
  pid_t daemon_ = -1;
  std::vector<pid_t> clients_;
  std::vector<std::string> outputs_;
  int clients_started_ = 0;
};

TEST_F(SoakTest, ClientsAndModelChurnLeaveTheDaemonAsTheyFoundIt) {
  const double seconds = EnvDouble("WEIGHTD_SOAK_SECONDS", 20);
  const int clients = static_cast<int>(EnvDouble("WEIGHTD_SOAK_CLIENTS", 4));
  const uint64_t seed = static_cast<uint64_t>(EnvDouble("WEIGHTD_SOAK_SEED", 20261207));
  std::printf("soak: %d clients for %.0f s, seed %llu (WEIGHTD_SOAK_SECONDS, _CLIENTS, _SEED)\n",
              clients, seconds, static_cast<unsigned long long>(seed));

  log_ = dir_ + "/weightd.log";
  systemd_ = std::make_unique<FakeSystemd>(dir_);
  systemd_->StartPumping();
  UniqueFd listener = testing::ListenOn(socket_);
  daemon_ =
      systemd_->Launch(listener.get(), {WEIGHTD_BIN, "--config", dir_ + "/weightd.json"}, log_);
  ASSERT_TRUE(systemd_->WaitFor("READY=1")) << systemd_->log() << Slurp(log_);
  ASSERT_TRUE(Load("stable").ok());
  ASSERT_EQ(WaitLoaded("stable"), "ready");

  Churn warm, churn;
  std::vector<std::string> warm_summaries, summaries;
  RunRound(clients, std::min(seconds, 3.0), seed + 1000, warm, warm_summaries);
  ASSERT_FALSE(HasFatalFailure());
  Quiesce();
  ASSERT_FALSE(HasFatalFailure());
  const ProcResources base = Settled();
  const std::vector<std::string> base_store = systemd_->StoredNames();
  ASSERT_TRUE(base.ok());
  // stable's arenas (embeddings/norm/lm_head, and its decoder layers), manifest and record.
  EXPECT_EQ(base_store.size(), 4u) << "stable's 2 arenas, manifest and record";

  const auto t0 = Clock::now();
  RunRound(clients, seconds, seed, churn, summaries);
  ASSERT_FALSE(HasFatalFailure());
  const double took = std::chrono::duration<double>(Clock::now() - t0).count();
  Quiesce();
  ASSERT_FALSE(HasFatalFailure());

  // Figures that must return exactly get a few seconds to do so (connections closing).
  ProcResources end;
  WaitUntil(
      [&] {
        end = Settled();
        return end.fds == base.fds && end.memfd_fds == base.memfd_fds &&
               end.memfd_maps == base.memfd_maps && end.threads == base.threads;
      },
      std::chrono::seconds(5));

  uint64_t iterations = 0, attaches = 0, refused = 0, checked = 0, verifies = 0;
  const std::regex line(
      R"(iterations=(\d+) attaches=(\d+) refused=(\d+) tensors_checked=(\d+) verifies=(\d+))");
  for (const std::string& s : summaries) {
    std::smatch m;
    if (!std::regex_search(s, m, line)) continue;
    iterations += std::stoull(m[1]);
    attaches += std::stoull(m[2]);
    refused += std::stoull(m[3]);
    checked += std::stoull(m[4]);
    verifies += std::stoull(m[5]);
  }
  std::printf(
      "soak: %.1f s, %d clients: %llu iterations, %llu attaches (%llu refused), %llu tensors "
      "checked byte for byte, %llu full verifies; driver: %d loads, %d unloads, %d forced while "
      "attached, %d forced right after the load\n",
      took, clients, static_cast<unsigned long long>(iterations),
      static_cast<unsigned long long>(attaches), static_cast<unsigned long long>(refused),
      static_cast<unsigned long long>(checked), static_cast<unsigned long long>(verifies),
      churn.loads, churn.unloads, churn.forced_attached, churn.cancels);
  std::printf("soak: baseline %s\nsoak: end      %s\n", base.ToString().c_str(),
              end.ToString().c_str());

  EXPECT_EQ(summaries.size(), static_cast<size_t>(clients));
  EXPECT_GT(attaches, 0u);
  EXPECT_GE(checked, 3 * attaches);
  EXPECT_GT(churn.unloads, 0);
  EXPECT_GT(churn.forced_attached, 0) << "no unload met an attached client";
  EXPECT_EQ(Sample(socket_, "weightd_loads_failed_total"), 0);
  EXPECT_EQ(LeaseCount(socket_), 0);
  EXPECT_EQ(end.fds, base.fds) << "descriptors";
  EXPECT_EQ(end.memfd_fds, base.memfd_fds) << "memfd descriptors (arenas, manifests)";
  EXPECT_EQ(end.memfd_maps, base.memfd_maps) << "memfd mappings";
  EXPECT_EQ(end.threads, base.threads) << "threads";
#ifndef WEIGHTD_SOAK_SKIP_RSS
  EXPECT_LE(end.rss_anon_kib, base.rss_anon_kib + kRssSlackKiB) << "anonymous resident memory";
  EXPECT_LE(end.rss_shmem_kib, base.rss_shmem_kib + 64) << "resident shared memory (arenas)";
#else
  std::printf("soak: RSS not compared (sanitizer build: ASan's quarantine keeps freed memory)\n");
#endif
  EXPECT_THAT(systemd_->StoredNames(), ::testing::UnorderedElementsAreArray(base_store))
      << "the fd store must hold stable's fds and nothing else";

  ::kill(daemon_, SIGTERM);
  EXPECT_EQ(WaitFor(daemon_, std::chrono::seconds(20)), 0);
  daemon_ = -1;
}

}  // namespace
}  // namespace weightd
