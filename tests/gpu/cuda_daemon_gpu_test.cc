// `weightd --backend cuda` end to end: the real daemon and client processes over a real socket,
// with device arenas. Runs on a real GPU (label gpu) and, in CI, on the simulated driver of
// tests/sim_cuda (label sim; ctest sets WEIGHTD_CUDA_DRIVER, WDSIM_DEVICES and WDSIM_STATS_DIR).
//
// What it shows:
//   - a T=2 load with an fp32 -> bf16 cast onto two devices, attached from this process (a
//     second process next to the daemon): every tensor read back through the driver equals what
//     `weightctl shard --dtype bf16` writes, and the manifest checksums hold;
//   - a write through a client's mapping fails and the weights stay unchanged;
//   - a client that does not see the daemon's GPU gets an error naming the UUID;
//   - out of device memory on the 3rd arena of a load, a copy failing mid-load, and a device lost
//     mid-load each fail that model with a clear error, release every allocation, stream, event
//     and pinned buffer (the simulation's counters), and leave the other models serving;
//   - `--backend auto` picks cuda when a device is present;
//   - pinned staging memory stays within --pinned-budget over concurrent loads.
// Fault injection and the counters exist only in the simulation: those tests skip on a real GPU,
// saying so. Devices: a real machine with one GPU puts both ranks on device 0.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "sim_cuda/sim_stats.h"
#include "support/process.h"
#include "weightd/checkpoint.h"
#include "weightd/client.h"
#include "weightd/cuda_backend.h"
#include "weightd/detail/cuda_driver.h"

namespace weightd {
namespace {

using ::testing::HasSubstr;
using testing::Slurp;

bool Simulated() {
  absl::StatusOr<const CudaDriver*> cu = CudaDriver::Get();
  return cu.ok() && (*cu)->simulated;
}

int DeviceCount() {
  absl::StatusOr<const CudaDriver*> cu = CudaDriver::Get();
  int n = 0;
  if (!cu.ok() || (*cu)->DeviceGetCount(&n) != CUDA_SUCCESS) return 0;
  return n;
}

using Env = std::vector<std::pair<std::string, std::string>>;

// stdout and stderr of the child to `log` (truncated), `env` added to its environment.
pid_t SpawnWithEnv(const std::vector<std::string>& argv, const std::string& log,
                   const Env& env = {}) {
  return testing::Spawn(argv, log, log, env);
}

int Wait(pid_t pid) { return testing::WaitFor(pid, std::chrono::minutes(2)); }

class CudaDaemonTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!CudaDeviceAvailable()) {
      GTEST_SKIP() << "no CUDA device: " << CudaDriver::Get().status();
    }
    char tmpl[] = "/tmp/weightd-cuda-daemon-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    socket_ = dir_ + "/weightd.sock";
    std::filesystem::create_directory(dir_ + "/models");
    // The daemon's counters go to a directory of this test's own (the simulation writes
    // <dir>/<pid>.stats); this process keeps the one ctest gave it.
    stats_dir_ = dir_ + "/stats";
    std::filesystem::create_directory(stats_dir_);
    two_devices_ = DeviceCount() >= 2 ? std::vector<int>{0, 1} : std::vector<int>{0, 0};
  }
  void TearDown() override {
    StopDaemon();
    if (HasFailure()) std::fprintf(stderr, "---- weightd log ----\n%s\n", Slurp(log()).c_str());
    if (!dir_.empty()) std::filesystem::remove_all(dir_);
  }
  std::string log() const { return dir_ + "/weightd.log"; }

  std::string MakeCheckpoint(const std::string& name, bool f32) {
    const std::string path = dir_ + "/models/" + name;
    std::vector<std::string> argv = {PYTHON_BIN, MAKE_DEMO_CHECKPOINT, path};
    if (f32) argv.push_back("--f32");
    EXPECT_EQ(Wait(SpawnWithEnv(argv, dir_ + "/mk.log")), 0) << Slurp(dir_ + "/mk.log");
    return path;
  }

  // Starts weightd with `backend`, `extra` flags and `env` added (fault injection).
  void StartDaemon(const std::string& backend, std::vector<std::string> extra = {},
                   Env env = {}) {
    std::ofstream(dir_ + "/weightd.json")
        << "{\"socket\":\"" << socket_ << "\",\"backend\":\"" << backend
        << "\",\"io_threads\":2,\"model_roots\":[\"" << dir_
        << "/models\"],"
        // One arena per rank: the fault tests count cuMemCreate calls per rank.
        << "\"arena_segment_bytes\":0}";
    std::vector<std::string> argv = {WEIGHTD_BIN, "--config", dir_ + "/weightd.json"};
    argv.insert(argv.end(), extra.begin(), extra.end());
    env.emplace_back("WDSIM_STATS_DIR", stats_dir_);
    daemon_ = SpawnWithEnv(argv, log(), env);
    ASSERT_TRUE(testing::WaitUntil([&] { return Client::Connect(socket_).ok(); }))
        << Slurp(log());
  }
  void StopDaemon() {
    if (daemon_ <= 0) return;
    ::kill(daemon_, SIGTERM);
    EXPECT_EQ(Wait(daemon_), 0) << "weightd did not stop cleanly";
    daemon_ = -1;
  }

  // The daemon's simulation counters (a live view), or nullptr on a real GPU.
  const sim::SimStats* DaemonStats() {
    if (!Simulated() || daemon_ <= 0) return nullptr;
    if (stats_ == nullptr) {
      stats_ = sim::MapStats(stats_dir_ + "/" + std::to_string(daemon_) + ".stats");
    }
    return stats_;
  }

  // Loads and waits; returns the final ModelInfo (state "ready" or "failed").
  ModelInfo LoadAndWait(Client& c, const std::string& name, const std::string& ckpt,
                        const LoadOptions& o) {
    absl::Status s = c.Load(name, ckpt, o);
    EXPECT_TRUE(s.ok()) << s;
    return WaitDone(c, name);
  }
  ModelInfo WaitDone(Client& c, const std::string& name) {
    ModelInfo info;
    EXPECT_TRUE(testing::WaitUntil(
        [&] {
          auto st = c.Status(name);
          if (!st.ok() || st->empty()) return false;
          info = (*st)[0];
          return info.state == "ready" || info.state == "failed";
        },
        std::chrono::minutes(2)))
        << info.state;
    return info;
  }

  // Every tensor of `rank`, read back through the client's mapping, equals the shard file.
  void ExpectRankEqualsShard(Client& c, const std::string& model, int rank,
                             const std::string& shard_dir, int want_device) {
    auto a = c.Attach(model, rank);
    ASSERT_TRUE(a.ok()) << a.status();
    auto shard = Checkpoint::Open(shard_dir + "/model-rank-" + std::to_string(rank) +
                                  "-part-0.safetensors");
    ASSERT_TRUE(shard.ok()) << shard.status();
    ASSERT_EQ(a->tensors().size(), shard->tensors().size());
    for (const CheckpointTensor& t : shard->tensors()) {
      const TensorView* v = a->Find(t.name);
      ASSERT_NE(v, nullptr) << t.name;
      EXPECT_EQ(v->device, want_device) << t.name;
      EXPECT_EQ(v->dtype, t.dtype) << t.name;
      EXPECT_EQ(v->shape, t.shape) << t.name;
      auto want = shard->MapTensor(t);
      ASSERT_TRUE(want.ok()) << want.status();
      ASSERT_EQ(v->nbytes, want->size()) << t.name;
      std::vector<std::byte> got(v->nbytes);
      ASSERT_TRUE(a->Read(*v, 0, got.data(), got.size()).ok()) << t.name;
      EXPECT_EQ(std::memcmp(got.data(), want->data(), v->nbytes), 0) << t.name;
    }
    EXPECT_TRUE(a->Verify().ok()) << a->Verify();
  }

  std::string dir_, socket_, stats_dir_;
  std::vector<int> two_devices_;
  pid_t daemon_ = -1;
  const sim::SimStats* stats_ = nullptr;
};

TEST_F(CudaDaemonTest, TwoDevicesT2CastMatchesWeightctlShard) {
  const std::string ckpt = MakeCheckpoint("f32", /*f32=*/true);
  const std::string out = dir_ + "/shard";
  ASSERT_EQ(Wait(SpawnWithEnv({WEIGHTCTL_BIN, "shard", ckpt, "--tp", "2", "--dtype", "bf16",
                               "--out", out},
                              dir_ + "/shard.log")),
            0)
      << Slurp(dir_ + "/shard.log");
  StartDaemon("cuda");
  auto c = Client::Connect(socket_);
  ASSERT_TRUE(c.ok()) << c.status();
  LoadOptions o;
  o.tp = 2;
  o.devices = two_devices_;
  o.dtype = "bf16";
  const ModelInfo info = LoadAndWait(*c, "m", ckpt, o);
  ASSERT_EQ(info.state, "ready") << info.error;
  EXPECT_EQ(info.backend, "cuda");
  for (int rank = 0; rank < 2; ++rank) {
    ExpectRankEqualsShard(*c, "m", rank, out, two_devices_[rank]);
  }
  if (const sim::SimStats* s = DaemonStats()) {
    EXPECT_EQ(s->races, 0u) << "a staging slot was reused before its DMA finished";
    EXPECT_EQ(s->misuse, 0u) << "the daemon made a call the driver refused as misuse";
    EXPECT_GT(s->kernel_launches, 0u) << "the cast did not run as a device kernel";
  }
}

TEST_F(CudaDaemonTest, WritesThroughAClientMappingFailAndChangeNothing) {
  const std::string ckpt = MakeCheckpoint("demo", false);
  StartDaemon("cuda");
  auto c = Client::Connect(socket_);
  ASSERT_TRUE(c.ok()) << c.status();
  LoadOptions hf;
  hf.recipe = "hf";  // names and bytes as in the checkpoint, for wd_attach_check
  ASSERT_EQ(LoadAndWait(*c, "m", ckpt, hf).state, "ready");
  auto a = c->Attach("m", 0);
  ASSERT_TRUE(a.ok()) << a.status();
  const CudaDriver& cu = **CudaDriver::Get();
  const TensorView& v = a->tensors()[0];
  CUdevice dev = 0;
  ASSERT_EQ(cu.DeviceGet(&dev, v.device), CUDA_SUCCESS);
  CUcontext ctx = nullptr;
  ASSERT_EQ(cu.DevicePrimaryCtxRetain(&ctx, dev), CUDA_SUCCESS);
  ASSERT_EQ(cu.CtxSetCurrent(ctx), CUDA_SUCCESS);
  EXPECT_NE(cu.MemsetD8(reinterpret_cast<CUdeviceptr>(v.data), 0xAB, v.nbytes), CUDA_SUCCESS);
  std::vector<unsigned char> host(v.nbytes, 0xCD);
  EXPECT_NE(cu.MemcpyHtoD(reinterpret_cast<CUdeviceptr>(v.data), host.data(), v.nbytes),
            CUDA_SUCCESS);
  (void)cu.CtxSetCurrent(nullptr);
  (void)cu.DevicePrimaryCtxRelease(dev);
  EXPECT_TRUE(a->Verify().ok()) << "the weights changed: " << a->Verify();
  // Another process sees the same, unchanged bytes.
  EXPECT_EQ(Wait(SpawnWithEnv({ATTACH_CHECK_BIN, socket_, "m", "0", ckpt}, dir_ + "/check.log")),
            0)
      << Slurp(dir_ + "/check.log");
}

TEST_F(CudaDaemonTest, AClientWithoutTheDaemonsGpuGetsAnErrorNamingItsUuid) {
  if (!Simulated()) GTEST_SKIP() << "needs the simulated driver to give the client other GPUs";
  const std::string ckpt = MakeCheckpoint("demo", false);
  StartDaemon("cuda");
  auto c = Client::Connect(socket_);
  ASSERT_TRUE(c.ok()) << c.status();
  LoadOptions hf;
  hf.recipe = "hf";
  ASSERT_EQ(LoadAndWait(*c, "m", ckpt, hf).state, "ready");
  const std::string check_log = dir_ + "/check.log";
  EXPECT_EQ(Wait(SpawnWithEnv({ATTACH_CHECK_BIN, socket_, "m", "0", ckpt}, check_log,
                              {{"WDSIM_UUID_SALT", "another-machine"}})),
            1);
  EXPECT_THAT(Slurp(check_log), HasSubstr("no local GPU with UUID"));
  EXPECT_THAT(Slurp(check_log), HasSubstr("CUDA_VISIBLE_DEVICES"));
  // The refused attach left no lease behind.
  auto st = c->Status("m");
  ASSERT_TRUE(st.ok());
  EXPECT_TRUE((*st)[0].ranks[0].leases.empty());
}

// The counters that must come back after a failed load: device memory and mappings per device,
// pinned bytes, streams and events.
struct Snapshot {
  uint64_t pinned = 0;
  std::vector<uint64_t> allocated, allocations, mappings, reserved, streams, events, contexts;
};
Snapshot Take(const sim::SimStats& s) {
  Snapshot n;
  n.pinned = s.pinned_bytes;
  for (uint64_t d = 0; d < s.device_count; ++d) {
    n.allocated.push_back(s.device[d].allocated_bytes);
    n.allocations.push_back(s.device[d].allocations);
    n.mappings.push_back(s.device[d].mappings);
    n.reserved.push_back(s.device[d].reserved_ranges);
    n.streams.push_back(s.device[d].streams);
    n.events.push_back(s.device[d].events);
    n.contexts.push_back(s.device[d].primary_ctx_refs);
  }
  return n;
}
void ExpectSame(const Snapshot& a, const Snapshot& b) {
  EXPECT_EQ(a.pinned, b.pinned) << "pinned host memory leaked";
  EXPECT_EQ(a.allocated, b.allocated) << "device memory leaked";
  EXPECT_EQ(a.allocations, b.allocations) << "physical allocations leaked";
  EXPECT_EQ(a.mappings, b.mappings) << "mappings leaked";
  EXPECT_EQ(a.reserved, b.reserved) << "reserved address ranges leaked";
  EXPECT_EQ(a.streams, b.streams) << "streams leaked";
  EXPECT_EQ(a.events, b.events) << "events leaked";
  // The backend retains a device's primary context once, when it first uses the device, and
  // keeps it; a failed load adds no reference of its own.
  for (size_t d = 0; d < b.contexts.size(); ++d) {
    EXPECT_LE(b.contexts[d], std::max<uint64_t>(a.contexts[d], 1)) << "device " << d;
  }
}

// A failure injected into the second model's load: that model fails with `want_error`, the
// first one keeps serving the same bytes, and every counter returns to its value before.
class CudaDaemonFaultTest : public CudaDaemonTest {
 protected:
  void Run(const Env& env, const LoadOptions& victim,
           const std::vector<std::string>& want_error, bool device_lost = false) {
    if (!Simulated()) GTEST_SKIP() << "fault injection needs the simulated driver";
    const std::string keep_ckpt = MakeCheckpoint("keep", false);
    const std::string victim_ckpt = MakeCheckpoint("victim", /*f32=*/true);
    StartDaemon("cuda", {}, env);
    auto c = Client::Connect(socket_);
    ASSERT_TRUE(c.ok()) << c.status();
    LoadOptions hf;
    hf.recipe = "hf";  // names and bytes as in the checkpoint, for wd_attach_check
    ASSERT_EQ(LoadAndWait(*c, "keep", keep_ckpt, hf).state, "ready");
    const sim::SimStats* s = DaemonStats();
    ASSERT_NE(s, nullptr);
    const Snapshot before = Take(*s);
    const ModelInfo info = LoadAndWait(*c, "victim", victim_ckpt, victim);
    ASSERT_EQ(info.state, "failed");
    for (const std::string& w : want_error) EXPECT_THAT(info.error, HasSubstr(w));
    ASSERT_TRUE(c->Unload("victim").ok());
    Snapshot after;
    // Teardown of a failed load may finish just after the state changes.
    testing::WaitUntil([&] {
      after = Take(*s);
      return after.allocated == before.allocated && after.pinned == before.pinned;
    });
    if (device_lost) {
      // A lost device keeps nothing of the failed load; the survivor is on device 0.
      EXPECT_EQ(after.allocated[1], 0u);
      EXPECT_EQ(after.mappings[1], 0u);
      EXPECT_EQ(after.streams[1], 0u);
      EXPECT_EQ(after.events[1], 0u);
      EXPECT_EQ(after.allocated[0], before.allocated[0]);
      EXPECT_EQ(after.pinned, before.pinned);
    } else {
      ExpectSame(before, after);
    }
    EXPECT_EQ(s->races, 0u);
    // The survivor still serves, from another process, the same bytes.
    EXPECT_EQ(
        Wait(SpawnWithEnv({ATTACH_CHECK_BIN, socket_, "keep", "0", keep_ckpt}, dir_ + "/c.log")),
        0)
        << Slurp(dir_ + "/c.log");
    // And the daemon still loads.
    LoadOptions again;
    again.recipe = "hf";
    EXPECT_EQ(LoadAndWait(*c, "again", keep_ckpt, again).state, "ready");
    // A load retains no primary context of its own beyond its run: the backend holds one
    // reference per device it uses, whatever the number of arenas and loads.
    EXPECT_EQ(Take(*s).contexts[0], before.contexts[0]) << "a load leaked a context reference";
  }
};

TEST_F(CudaDaemonFaultTest, OutOfMemoryOnTheThirdArenaReleasesEverything) {
  // "keep" makes one arena (cuMemCreate call 1); the victim's ranks are calls 2..5, its third
  // arena is call 4.
  LoadOptions o;
  o.tp = 4;
  o.devices = {0, 1, 0, 1};
  Run({{"WDSIM_FAIL", "cuMemCreate:4:CUDA_ERROR_OUT_OF_MEMORY"}}, o,
      {"victim/rank2", "bytes", "free"});
}

TEST_F(CudaDaemonFaultTest, ACopyFailingMidLoadFailsOnlyThatModel) {
  // "keep" (T=1, same dtype) copies whole tensors; the victim's T=2 slices are 2-D copies, so
  // the 5th cuMemcpy2DAsync is the victim's.
  LoadOptions o;
  o.tp = 2;
  o.devices = {0, 1};
  Run({{"WDSIM_FAIL", "cuMemcpy2DAsync:5:CUDA_ERROR_ILLEGAL_ADDRESS"}}, o,
      {"victim", "CUDA_ERROR_ILLEGAL_ADDRESS"});
}

TEST_F(CudaDaemonFaultTest, ADeviceLostMidLoadFailsOnlyThatModel) {
  LoadOptions o;
  o.devices = {1};
  o.dtype = "bf16";
  Run({{"WDSIM_LOSE_DEVICE", "1:40"}}, o, {"victim", "device 1"}, /*device_lost=*/true);
}

TEST_F(CudaDaemonTest, BackendAutoChoosesCudaWhenADeviceIsPresent) {
  const std::string ckpt = MakeCheckpoint("demo", false);
  StartDaemon("auto");
  auto c = Client::Connect(socket_);
  ASSERT_TRUE(c.ok()) << c.status();
  const ModelInfo info = LoadAndWait(*c, "m", ckpt, {});
  ASSERT_EQ(info.state, "ready") << info.error;
  EXPECT_EQ(info.backend, "cuda");
  EXPECT_EQ(info.ranks[0].device, 0);
}

TEST_F(CudaDaemonTest, PinnedStagingStaysWithinTheBudgetOverConcurrentLoads) {
  if (!Simulated()) GTEST_SKIP() << "reads the simulated driver's pinned-memory counter";
  std::vector<std::string> ckpts;
  for (int i = 0; i < 3; ++i) ckpts.push_back(MakeCheckpoint("m" + std::to_string(i), i == 2));
  constexpr uint64_t kBudget = 4 << 20;
  StartDaemon("cuda", {"--pinned-budget", "4MiB"});
  auto c = Client::Connect(socket_);
  ASSERT_TRUE(c.ok()) << c.status();
  for (int i = 0; i < 3; ++i) {
    LoadOptions o;
    o.tp = 2;
    o.devices = two_devices_;
    if (i == 2) o.dtype = "bf16";
    ASSERT_TRUE(c->Load("m" + std::to_string(i), ckpts[i], o).ok());
  }
  for (int i = 0; i < 3; ++i) WaitDone(*c, "m" + std::to_string(i));
  auto st = c->Status();
  ASSERT_TRUE(st.ok());
  for (const ModelInfo& m : *st) EXPECT_EQ(m.state, "ready") << m.name << ": " << m.error;
  const sim::SimStats* s = DaemonStats();
  ASSERT_NE(s, nullptr);
  EXPECT_GT(s->pinned_peak, 0u) << "staging did not use pinned memory";
  EXPECT_LE(s->pinned_peak, kBudget) << "pinned staging exceeded --pinned-budget";
  EXPECT_EQ(s->races, 0u);
}

}  // namespace
}  // namespace weightd
