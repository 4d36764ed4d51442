// weightd::ToTorch against the real daemon (host backend): every tensor equals the attached
// bytes, zero-copy, and the tensors hold the lease after the caller's Attachment is gone.
// Built only with -DWEIGHTD_BUILD_TORCH=ON.
#include "weightd/torch_adapter.h"

#include <ATen/ATen.h>
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

#include "gtest/gtest.h"
#include "weightd/client.h"

namespace weightd {
namespace {

size_t Leases(const std::string& socket) {
  auto c = Client::Connect(socket);
  if (!c.ok()) return 999;
  auto st = c->Status("demo");
  if (!st.ok()) return 999;
  size_t n = 0;
  for (const RankStatusInfo& r : st->front().ranks) n += r.leases.size();
  return n;
}

TEST(TorchAdapterTest, TensorsAreZeroCopyAndHoldTheLease) {
  char tmpl[] = "/tmp/weightd-torch-XXXXXX";
  ASSERT_NE(::mkdtemp(tmpl), nullptr);
  const std::string dir = tmpl, socket = dir + "/weightd.sock", ckpt = dir + "/demo";
  ASSERT_EQ(std::system(
                (std::string(PYTHON_BIN) + " " + MAKE_DEMO_CHECKPOINT + " " + ckpt + " >/dev/null")
                    .c_str()),
            0);
  const pid_t daemon = ::fork();
  if (daemon == 0) {
    ::execl(WEIGHTD_BIN, WEIGHTD_BIN, "--socket", socket.c_str(), "--backend", "host",
            static_cast<char*>(nullptr));
    ::_exit(127);
  }
  absl::StatusOr<Client> c = absl::UnavailableError("not yet");
  for (int i = 0; i < 1000 && !c.ok(); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    c = Client::Connect(socket);
  }
  ASSERT_TRUE(c.ok()) << c.status();
  LoadOptions o;
  o.recipe = "hf";
  ASSERT_TRUE(c->Load("demo", ckpt, o).ok());
  for (int i = 0; i < 1000; ++i) {
    auto st = c->Status("demo");
    if (st.ok() && st->front().state == "ready") break;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  auto a = c->Attach("demo", 0);
  ASSERT_TRUE(a.ok()) << a.status();
  auto att = std::make_shared<Attachment>(std::move(*a));
  auto tensors = ToTorch(att);
  ASSERT_TRUE(tensors.ok()) << tensors.status();
  ASSERT_EQ(tensors->size(), att->tensors().size());
  for (const TensorView& v : att->tensors()) {
    const at::Tensor& t = tensors->at(v.name);
    EXPECT_EQ(t.data_ptr(), v.data) << v.name;
    EXPECT_EQ(t.scalar_type(), at::kBFloat16) << v.name;
    EXPECT_EQ(t.sizes().vec(), v.shape) << v.name;
    EXPECT_EQ(t.nbytes(), v.nbytes) << v.name;
    EXPECT_TRUE(t.device().is_cpu());
  }
  const std::vector<uint8_t> before(
      static_cast<const uint8_t*>(att->Find("lm_head.weight")->data),
      static_cast<const uint8_t*>(att->Find("lm_head.weight")->data) + 64);
  at::Tensor keep = tensors->at("lm_head.weight");
  att.reset();
  tensors->clear();
  EXPECT_EQ(Leases(socket), 1u);
  EXPECT_EQ(std::memcmp(keep.data_ptr(), before.data(), before.size()), 0);
  EXPECT_EQ(keep.to(at::kFloat).numel(), 1000 * 256);  // LibTorch reads the mapping
  keep = at::Tensor();
  for (int i = 0; i < 250 && Leases(socket) != 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_EQ(Leases(socket), 0u);
  EXPECT_FALSE(ToTorch(nullptr).ok());

  ::kill(daemon, SIGTERM);
  int status = 0;
  ::waitpid(daemon, &status, 0);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
}

}  // namespace
}  // namespace weightd
