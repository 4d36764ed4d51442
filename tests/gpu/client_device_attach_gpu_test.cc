// The C++ client attaching device arenas for real: weightd with `--backend cuda` loads the demo
// checkpoint at T=2; this test process (a second process, distinct from the daemon) attaches
// each rank, copies every tensor to the host and compares it byte for byte with what
// `weightctl shard` writes offline, runs Attachment::Verify (device read-back + CRC32C), and
// checks that a write through the read-only mapping fails. Skips without a device.
#include <cuda.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "support/process.h"
#include "weightd/checkpoint.h"
#include "weightd/client.h"
#include "weightd/cuda_backend.h"
#include "weightd/detail/cuda_driver.h"
#include "weightd/detail/cuda_resources.h"

namespace weightd {
namespace {

using testing::Slurp;

pid_t Spawn(const std::vector<std::string>& argv, const std::string& log) {
  return testing::Spawn(argv, log, log);
}

// Helpers and the daemon get 2 minutes; a hang fails the test instead of the whole run.
int Wait(pid_t pid) { return testing::WaitFor(pid, std::chrono::minutes(2)); }

class ClientDeviceAttachGpuTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!CudaDeviceAvailable()) {
      GTEST_SKIP() << "no CUDA device: " << CudaDriver::Get().status();
    }
    char tmpl[] = "/tmp/weightd-gpu-client-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    socket_ = dir_ + "/weightd.sock";
    std::filesystem::create_directory(dir_ + "/models");
    ckpt_ = dir_ + "/models/demo";
    ASSERT_EQ(Wait(Spawn({PYTHON_BIN, MAKE_DEMO_CHECKPOINT, ckpt_}, dir_ + "/mk.log")), 0)
        << Slurp(dir_ + "/mk.log");
    std::ofstream(dir_ + "/weightd.json")
        << "{\"socket\":\"" << socket_ << "\",\"backend\":\"cuda\",\"model_roots\":[\"" << dir_
        << "/models\"]}";
    daemon_ = Spawn({WEIGHTD_BIN, "--config", dir_ + "/weightd.json", "--backend", "cuda"},
                    dir_ + "/weightd.log");
    for (int i = 0; i < 1000 && !Client::Connect(socket_).ok(); ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  }
  void TearDown() override {
    if (daemon_ > 0) {
      ::kill(daemon_, SIGTERM);
      Wait(daemon_);
    }
    if (HasFailure()) std::fprintf(stderr, "---- weightd log ----\n%s\n", Slurp(log()).c_str());
    if (!dir_.empty()) std::filesystem::remove_all(dir_);
  }
  std::string log() const { return dir_ + "/weightd.log"; }

  std::string dir_, socket_, ckpt_;
  pid_t daemon_ = -1;
};

TEST_F(ClientDeviceAttachGpuTest, TensorParallelRanksMatchWeightctlShardOnTheDevice) {
  const std::string out = dir_ + "/shard";
  ASSERT_EQ(
      Wait(Spawn({WEIGHTCTL_BIN, "shard", ckpt_, "--tp", "2", "--out", out}, dir_ + "/shard.log")),
      0)
      << Slurp(dir_ + "/shard.log");
  auto c = Client::Connect(socket_);
  ASSERT_TRUE(c.ok()) << c.status();
  LoadOptions o;
  o.tp = 2;
  o.devices = {0, 0};  // one GPU is enough: both ranks on device 0
  ASSERT_TRUE(c->Load("demo", ckpt_, o).ok());
  std::string state;
  for (int i = 0; i < 3000 && state != "ready" && state != "failed"; ++i) {
    auto st = c->Status("demo");
    ASSERT_TRUE(st.ok()) << st.status();
    state = (*st)[0].state;
    if (state == "failed") FAIL() << (*st)[0].error;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  ASSERT_EQ(state, "ready");
  ASSERT_EQ((*c->Status("demo"))[0].backend, "cuda");
  // The client maps arenas in the device's primary context; the copies below run in it too.
  const CudaDriver& cu = **CudaDriver::Get();
  auto ctx = CudaPrimaryContext::Retain(cu, 0);
  ASSERT_TRUE(ctx.ok()) << ctx.status();
  CudaContextGuard guard(cu);
  ASSERT_TRUE(guard.Use(ctx->get()).ok());

  for (int rank = 0; rank < 2; ++rank) {
    auto a = c->Attach("demo", rank);
    ASSERT_TRUE(a.ok()) << a.status();
    auto shard =
        Checkpoint::Open(out + "/model-rank-" + std::to_string(rank) + "-part-0.safetensors");
    ASSERT_TRUE(shard.ok()) << shard.status();
    ASSERT_EQ(a->tensors().size(), shard->tensors().size());
    for (const CheckpointTensor& t : shard->tensors()) {
      const TensorView* v = a->Find(t.name);
      ASSERT_NE(v, nullptr) << t.name;
      ASSERT_EQ(v->device, 0) << t.name;
      ASSERT_NE(v->data, nullptr) << t.name;
      EXPECT_EQ(v->dtype, t.dtype) << t.name;
      EXPECT_EQ(v->shape, t.shape) << t.name;
      auto want = shard->MapTensor(t);
      ASSERT_TRUE(want.ok()) << want.status();
      ASSERT_EQ(v->nbytes, want->size()) << t.name;
      std::vector<std::byte> got(v->nbytes);
      ASSERT_EQ(cu.MemcpyDtoH(got.data(), reinterpret_cast<CUdeviceptr>(v->data), v->nbytes),
                CUDA_SUCCESS)
          << t.name;
      EXPECT_EQ(std::memcmp(got.data(), want->data(), v->nbytes), 0) << t.name;
    }
    EXPECT_TRUE(a->Verify().ok()) << a->Verify();

    if (rank == 1) {
      // The mapping is PROT_READ: a write through it must fail (last, in case the failure is
      // sticky for this context).
      const TensorView& v = a->tensors()[0];
      EXPECT_NE(cu.MemsetD8(reinterpret_cast<CUdeviceptr>(v.data), 0, v.nbytes), CUDA_SUCCESS);
    }
    EXPECT_TRUE(a->Detach().ok());
  }
}

}  // namespace
}  // namespace weightd
