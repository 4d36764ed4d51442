// The C ABI (weightd/c_api.h) through libweightd_client.so, against the real weightd (host
// backend) on a temporary socket. The first tests need no daemon (argument and transport
// errors); the suite's daemon serves the demo checkpoint under the name "demo" (hf recipe).
#include "weightd/c_api.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "detail/dlpack.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace {

using ::testing::HasSubstr;
using Clock = std::chrono::steady_clock;

struct ClientDeleter {
  void operator()(wd_client* c) const { wd_client_free(c); }
};
using ClientPtr = std::unique_ptr<wd_client, ClientDeleter>;
struct AttachmentDeleter {
  void operator()(wd_attachment* a) const { wd_attachment_release(a); }
};
using AttachmentPtr = std::unique_ptr<wd_attachment, AttachmentDeleter>;

std::string TakeString(char* s) {
  std::string out = s == nullptr ? "" : s;
  wd_string_free(s);
  return out;
}

TEST(CApiNoDaemon, ConnectToMissingSocketIsUnavailableAndNamesThePath) {
  wd_client* c = nullptr;
  EXPECT_EQ(wd_connect("/nonexistent/weightd-c-api.sock", &c), WD_UNAVAILABLE);
  EXPECT_EQ(c, nullptr);
  EXPECT_THAT(wd_last_error(), HasSubstr("/nonexistent/weightd-c-api.sock"));
}

TEST(CApiNoDaemon, NullArgumentsAreInvalidAndNameTheFunction) {
  EXPECT_EQ(wd_connect(nullptr, nullptr), WD_INVALID_ARGUMENT);
  EXPECT_THAT(wd_last_error(), HasSubstr("wd_connect: out is NULL"));
  char* s = nullptr;
  EXPECT_EQ(wd_list_json(nullptr, &s), WD_INVALID_ARGUMENT);
  EXPECT_THAT(wd_last_error(), HasSubstr("wd_list_json"));
  EXPECT_EQ(wd_attachment_verify(nullptr), WD_INVALID_ARGUMENT);
  EXPECT_EQ(wd_attachment_num_tensors(nullptr), 0u);
  EXPECT_EQ(wd_attachment_refcount(nullptr), 0);
  EXPECT_EQ(wd_client_version(nullptr), -1);
  wd_attachment_release(nullptr);
  wd_client_free(nullptr);
  wd_string_free(nullptr);
  EXPECT_EQ(wd_abi_version(), WD_ABI_VERSION);
}

TEST(CApiNoDaemon, LastErrorIsPerThread) {
  wd_client* c = nullptr;
  ASSERT_EQ(wd_connect("/nonexistent/a.sock", &c), WD_UNAVAILABLE);
  std::string other;
  std::thread([&] { other = wd_last_error(); }).join();
  EXPECT_EQ(other, "");
  EXPECT_THAT(wd_last_error(), HasSubstr("/nonexistent/a.sock"));
}

TEST(CApiNoDaemon, GenerationFunctionsRefuseNullArguments) {
  EXPECT_EQ(WD_ABI_VERSION, 2);
  char* s = nullptr;
  uint64_t gen = 0;
  int changed = 0;
  EXPECT_EQ(wd_update(nullptr, "m", "/c", 1, &s), WD_INVALID_ARGUMENT);
  EXPECT_THAT(wd_last_error(), HasSubstr("wd_update: client is NULL"));
  EXPECT_EQ(wd_update_fd(nullptr, "m", 0, 1, &s), WD_INVALID_ARGUMENT);
  EXPECT_THAT(wd_last_error(), HasSubstr("wd_update_fd"));
  EXPECT_EQ(wd_wait_generation(nullptr, "m", 0, 0, &gen, nullptr), WD_INVALID_ARGUMENT);
  EXPECT_THAT(wd_last_error(), HasSubstr("wd_wait_generation"));
  EXPECT_EQ(wd_rollback(nullptr, "m", &gen), WD_INVALID_ARGUMENT);
  EXPECT_THAT(wd_last_error(), HasSubstr("wd_rollback"));
  EXPECT_EQ(wd_attachment_refresh(nullptr, &changed), WD_INVALID_ARGUMENT);
  EXPECT_THAT(wd_last_error(), HasSubstr("wd_attachment_refresh"));
  EXPECT_EQ(wd_attachment_generation(nullptr), 0u);
  EXPECT_EQ(s, nullptr);
}

// A fake daemon for the generation functions: one connection, canned results per op, and the
// fds each request carried (counted, the first one kept open for inspection).
class FakeGenerationsDaemon {
 public:
  FakeGenerationsDaemon() {
    char tmpl[] = "/tmp/weightd-capi-fake-XXXXXX";
    dir_ = ::mkdtemp(tmpl);
    path_ = dir_ + "/s";
    listen_ = ::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    std::strcpy(a.sun_path, path_.c_str());
    EXPECT_EQ(::bind(listen_, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
    EXPECT_EQ(::listen(listen_, 1), 0);
    thread_ = std::thread([this] { Serve(); });
  }
  ~FakeGenerationsDaemon() {
    ::shutdown(listen_, SHUT_RDWR);
    thread_.join();
    ::close(listen_);
    if (update_fd >= 0) ::close(update_fd);
    ::unlink(path_.c_str());
    ::rmdir(dir_.c_str());
  }
  const std::string& path() const { return path_; }

  std::vector<std::string> requests;
  std::vector<int> fd_counts;
  int update_fd = -1;

 private:
  void Serve() {
    const int c = ::accept4(listen_, nullptr, nullptr, SOCK_CLOEXEC);
    if (c < 0) return;
    for (;;) {
      char buf[65536];
      alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * 4)];
      iovec iov{buf, sizeof(buf)};
      msghdr msg{};
      msg.msg_iov = &iov;
      msg.msg_iovlen = 1;
      msg.msg_control = control;
      msg.msg_controllen = sizeof(control);
      const ssize_t n = ::recvmsg(c, &msg, MSG_CMSG_CLOEXEC);
      if (n <= 0) break;
      std::vector<int> fds;
      for (cmsghdr* h = CMSG_FIRSTHDR(&msg); h != nullptr; h = CMSG_NXTHDR(&msg, h)) {
        if (h->cmsg_level != SOL_SOCKET || h->cmsg_type != SCM_RIGHTS) continue;
        const size_t k = (h->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < k; ++i) {
          int fd;
          std::memcpy(&fd, CMSG_DATA(h) + i * sizeof(int), sizeof(int));
          fds.push_back(fd);
        }
      }
      const std::string req(buf, static_cast<size_t>(n));
      requests.push_back(req);
      fd_counts.push_back(static_cast<int>(fds.size()));
      for (size_t i = 0; i < fds.size(); ++i) {
        if (i == 0 && update_fd < 0) {
          update_fd = fds[i];
        } else {
          ::close(fds[i]);
        }
      }
      const size_t at = req.find("\"id\":") + 5;
      const std::string id = req.substr(at, req.find_first_of(",}", at) - at);
      std::string result = "{}";
      if (req.find("\"hello\"") != std::string::npos) {
        result = R"({"version":1})";
      } else if (req.find("\"update\"") != std::string::npos) {
        result = R"({"name":"m","generation":7,"state":"ready","seconds":1.5,"bytes_read":10,)"
                 R"("ranks_rewritten":1,"targets_rewritten":2,"targets_copied":3})";
      } else if (req.find("\"wait_generation\"") != std::string::npos) {
        result = R"({"name":"m","generation":7,"timed_out":true})";
      } else if (req.find("\"rollback\"") != std::string::npos) {
        result = R"({"name":"m","generation":8,"restored":6})";
      }
      const std::string reply = R"({"ok":true,"id":)" + id + R"(,"result":)" + result + "}";
      if (::send(c, reply.data(), reply.size(), MSG_NOSIGNAL) < 0) break;
    }
    ::close(c);
  }

  std::string dir_, path_;
  int listen_ = -1;
  std::thread thread_;
};

TEST(CApiGenerations, UpdateWaitAndRollbackAgainstAFakeDaemon) {
  FakeGenerationsDaemon d;
  wd_client* raw = nullptr;
  ASSERT_EQ(wd_connect(d.path().c_str(), &raw), WD_OK) << wd_last_error();
  ClientPtr c(raw);

  char* s = nullptr;
  ASSERT_EQ(wd_update(c.get(), "m", "/models/new", 1, &s), WD_OK) << wd_last_error();
  EXPECT_EQ(TakeString(s),
            R"({"bytes_allocated":0,"bytes_copied":0,"bytes_read":10,"generation":7,"name":"m",)"
            R"("ranks_rewritten":1,"seconds":1.5,"segments_rewritten":0,"state":"ready",)"
            R"("targets_copied":3,"targets_rewritten":2})");
  EXPECT_EQ(wd_update(c.get(), "m", "/models/new", 0, nullptr), WD_OK) << wd_last_error();

  // The memfd goes out as the request's one fd and stays the caller's.
  const int memfd = ::memfd_create("update", MFD_CLOEXEC | MFD_ALLOW_SEALING);
  ASSERT_GE(memfd, 0);
  ASSERT_EQ(::write(memfd, "abc", 3), 3);
  ASSERT_EQ(::fcntl(memfd, F_ADD_SEALS, F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW), 0);
  s = nullptr;
  ASSERT_EQ(wd_update_fd(c.get(), "m", memfd, 1, &s), WD_OK) << wd_last_error();
  EXPECT_THAT(TakeString(s), HasSubstr(R"("generation":7)"));
  EXPECT_NE(::fcntl(memfd, F_GETFD), -1) << "wd_update_fd closed the caller's fd";
  ::close(memfd);
  // Unsealed: refused before sending.
  const int unsealed = ::memfd_create("update", MFD_CLOEXEC | MFD_ALLOW_SEALING);
  EXPECT_EQ(wd_update_fd(c.get(), "m", unsealed, 1, nullptr), WD_INVALID_ARGUMENT);
  EXPECT_THAT(wd_last_error(), HasSubstr("lacks the seals F_SEAL_WRITE|F_SEAL_SHRINK|F_SEAL_GROW"));
  ::close(unsealed);

  uint64_t gen = 0;
  int timed_out = 0;
  ASSERT_EQ(wd_wait_generation(c.get(), "m", 6, 250, &gen, &timed_out), WD_OK) << wd_last_error();
  EXPECT_EQ(gen, 7u);
  EXPECT_EQ(timed_out, 1);
  EXPECT_EQ(wd_wait_generation(c.get(), "m", 6, 9999999, &gen, nullptr), WD_OK);
  gen = 0;
  EXPECT_EQ(wd_wait_generation(c.get(), "m", 6, -1, &gen, &timed_out), WD_INVALID_ARGUMENT);
  EXPECT_THAT(wd_last_error(), HasSubstr("timeout_ms -1 is negative"));
  EXPECT_EQ(gen, 0u);
  ASSERT_EQ(wd_rollback(c.get(), "m", &gen), WD_OK) << wd_last_error();
  EXPECT_EQ(gen, 8u);
  EXPECT_EQ(wd_rollback(c.get(), "m", nullptr), WD_OK);
  c.reset();  // closes the connection: the fake's thread ends

  ASSERT_EQ(d.requests.size(), 8u);
  EXPECT_THAT(d.requests[1], HasSubstr(R"("checkpoint":"/models/new")"));
  EXPECT_THAT(d.requests[1], HasSubstr(R"("wait":true)"));
  EXPECT_THAT(d.requests[2], ::testing::Not(HasSubstr("wait")));
  EXPECT_EQ(d.fd_counts, (std::vector<int>{0, 0, 0, 1, 0, 0, 0, 0}));
  EXPECT_THAT(d.requests[4], HasSubstr(R"("after":6)"));
  EXPECT_THAT(d.requests[4], HasSubstr(R"("timeout_ms":250)"));
  EXPECT_THAT(d.requests[5], HasSubstr(R"("timeout_ms":600000)"));
  // The daemon's reference is the same file.
  char got[4] = {};
  ASSERT_GE(d.update_fd, 0);
  EXPECT_EQ(::pread(d.update_fd, got, 3, 0), 3);
  EXPECT_STREQ(got, "abc");
}

std::string g_dir, g_socket, g_ckpt;
pid_t g_daemon = -1;

class CApiTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    char tmpl[] = "/tmp/weightd-capi-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    g_dir = tmpl;
    g_socket = g_dir + "/weightd.sock";
    g_ckpt = g_dir + "/demo";
    const std::string mk =
        std::string(PYTHON_BIN) + " " + MAKE_DEMO_CHECKPOINT + " " + g_ckpt + " >/dev/null";
    ASSERT_EQ(std::system(mk.c_str()), 0);
    std::ofstream(g_dir + "/weightd.json")
        << R"({"socket": ")" << g_socket << R"(", "backend": "host", "io_threads": 2})";
    g_daemon = ::fork();
    if (g_daemon == 0) {
      const std::string log = g_dir + "/weightd.log";
      if (std::freopen(log.c_str(), "w", stderr) == nullptr) ::_exit(126);
      const std::string cfg = g_dir + "/weightd.json";
      ::execl(WEIGHTD_BIN, WEIGHTD_BIN, "--config", cfg.c_str(), static_cast<char*>(nullptr));
      ::_exit(127);
    }
    const auto deadline = Clock::now() + std::chrono::seconds(20);
    wd_client* c = nullptr;
    while (wd_connect(g_socket.c_str(), &c) != WD_OK && Clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    ASSERT_NE(c, nullptr) << "weightd did not come up: " << wd_last_error();
    ClientPtr client(c);
    ASSERT_EQ(wd_load(c, "demo", g_ckpt.c_str(), R"({"recipe": "hf", "tp": 1})"), WD_OK)
        << wd_last_error();
    ASSERT_TRUE(WaitForState("demo", "ready")) << wd_last_error();
  }

  static void TearDownTestSuite() {
    if (g_daemon > 0) {
      ::kill(g_daemon, SIGTERM);
      int status = 0;
      ::waitpid(g_daemon, &status, 0);
      EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "weightd exit " << status;
      g_daemon = -1;
    }
    std::error_code ec;
    std::filesystem::remove_all(g_dir, ec);
  }

  static ClientPtr Connect() {
    wd_client* c = nullptr;
    EXPECT_EQ(wd_connect(g_socket.c_str(), &c), WD_OK) << wd_last_error();
    return ClientPtr(c);
  }

  static std::string StatusJson(const char* name) {
    ClientPtr c = Connect();
    char* s = nullptr;
    if (wd_status_json(c.get(), name, &s) != WD_OK) return std::string("error: ") + wd_last_error();
    return TakeString(s);
  }

  static bool WaitForState(const char* name, const std::string& state) {
    const auto deadline = Clock::now() + std::chrono::seconds(30);
    while (Clock::now() < deadline) {
      if (StatusJson(name).find("\"state\":\"" + state + "\"") != std::string::npos) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    return false;
  }
};

TEST_F(CApiTest, ListStatusAndMetricsAsStrings) {
  ClientPtr c = Connect();
  EXPECT_EQ(wd_client_version(c.get()), 1);
  char* s = nullptr;
  ASSERT_EQ(wd_list_json(c.get(), &s), WD_OK) << wd_last_error();
  const std::string list = TakeString(s);
  EXPECT_THAT(list, HasSubstr(R"("name":"demo")"));
  EXPECT_THAT(list, HasSubstr(R"("ranks":[{)"));
  s = nullptr;
  ASSERT_EQ(wd_status_json(c.get(), nullptr, &s), WD_OK) << wd_last_error();
  const std::string all = TakeString(s);
  EXPECT_THAT(all, HasSubstr(R"("backend":"host")"));
  EXPECT_THAT(all, HasSubstr(R"("tensors":21)"));

  s = nullptr;
  EXPECT_EQ(wd_status_json(c.get(), "no-such-model", &s), WD_NOT_FOUND);
  EXPECT_EQ(s, nullptr);
  EXPECT_THAT(wd_last_error(), HasSubstr("no-such-model"));

  ASSERT_EQ(wd_metrics(c.get(), &s), WD_OK) << wd_last_error();
  EXPECT_THAT(TakeString(s), HasSubstr("weightd_models"));
}

TEST_F(CApiTest, LoadOptionsErrorsNameTheKey) {
  ClientPtr c = Connect();
  EXPECT_EQ(wd_load(c.get(), "x", g_ckpt.c_str(), R"({"tpp": 2})"), WD_INVALID_ARGUMENT);
  EXPECT_THAT(wd_last_error(), HasSubstr("unknown key 'tpp'"));
  EXPECT_EQ(wd_load(c.get(), "x", g_ckpt.c_str(), R"({"tp": "two"})"), WD_INVALID_ARGUMENT);
  EXPECT_THAT(wd_last_error(), HasSubstr("'tp' must be an integer"));
  EXPECT_EQ(wd_load(c.get(), "x", g_ckpt.c_str(), "[1,"), WD_INVALID_ARGUMENT);
  EXPECT_THAT(wd_last_error(), HasSubstr("must be a JSON object"));
  EXPECT_EQ(wd_load(c.get(), "demo", g_ckpt.c_str(), nullptr), WD_ALREADY_EXISTS);
  EXPECT_THAT(wd_last_error(), HasSubstr("demo"));
  // Numbers of the wrong kind or range were converted by nlohmann: 2.5 became tp 2, 4294967297
  // tp 1, -1 uid 4294967295, and 1e300 was an undefined float-to-integer conversion.
  for (const char* bad : {R"({"tp": 2.5})", R"({"tp": 4294967297})", R"({"tp": 1e300})"}) {
    EXPECT_EQ(wd_load(c.get(), "x", g_ckpt.c_str(), bad), WD_INVALID_ARGUMENT) << bad;
    EXPECT_THAT(wd_last_error(), HasSubstr("'tp' must be an integer")) << bad;
  }
  EXPECT_EQ(wd_load(c.get(), "x", g_ckpt.c_str(), R"({"ranks": [0, 1e300]})"), WD_INVALID_ARGUMENT);
  EXPECT_THAT(wd_last_error(), HasSubstr("'ranks' must be an array of integers"));
  EXPECT_EQ(wd_load(c.get(), "x", g_ckpt.c_str(), R"({"allow_uids": [-1]})"), WD_INVALID_ARGUMENT);
  EXPECT_THAT(wd_last_error(), HasSubstr("'allow_uids' must be an array of uids"));
}

TEST_F(CApiTest, AttachIteratesTensorsAndVerifies) {
  ClientPtr c = Connect();
  wd_attachment* raw = nullptr;
  EXPECT_EQ(wd_attach(c.get(), "demo", 7, &raw), WD_NOT_FOUND) << wd_last_error();
  EXPECT_EQ(raw, nullptr);
  ASSERT_EQ(wd_attach(c.get(), "demo", 0, &raw), WD_OK) << wd_last_error();
  AttachmentPtr a(raw);
  c.reset();  // the attachment outlives its client
  EXPECT_STREQ(wd_attachment_model(a.get()), "demo");
  EXPECT_EQ(wd_attachment_rank(a.get()), 0);
  EXPECT_NE(wd_attachment_lease(a.get()), 0u);
  const size_t n = wd_attachment_num_tensors(a.get());
  ASSERT_EQ(n, 21u);  // 2 layers x 9 + embed, norm, lm_head

  std::vector<wd_tensor_info> all(n);
  ASSERT_EQ(wd_attachment_tensors(a.get(), all.data(), n), WD_OK);
  uint64_t sum = 0;
  for (const wd_tensor_info& t : all) sum += t.nbytes;
  EXPECT_EQ(sum, wd_attachment_total_bytes(a.get()));
  EXPECT_EQ(wd_attachment_tensors(a.get(), all.data(), n + 1), WD_OUT_OF_RANGE);

  size_t i = 0;
  ASSERT_EQ(wd_attachment_find(a.get(), "model.embed_tokens.weight", &i), WD_OK);
  wd_tensor_info t;
  ASSERT_EQ(wd_attachment_tensor(a.get(), i, &t), WD_OK);
  EXPECT_STREQ(t.name, "model.embed_tokens.weight");
  EXPECT_STREQ(t.dtype, "BF16");
  EXPECT_EQ(t.itemsize, 2);
  ASSERT_EQ(t.ndim, 2);
  EXPECT_EQ(t.shape[0], 1000);
  EXPECT_EQ(t.shape[1], 256);
  EXPECT_EQ(t.strides[0], 256);
  EXPECT_EQ(t.strides[1], 1);
  EXPECT_EQ(t.device, -1);
  EXPECT_EQ(t.nbytes, 1000u * 256 * 2);
  ASSERT_NE(t.data, nullptr);

  EXPECT_EQ(wd_attachment_find(a.get(), "model.embed_tokens.weigth", &i), WD_NOT_FOUND);
  EXPECT_THAT(wd_last_error(), HasSubstr("no tensor 'model.embed_tokens.weigth'"));
  EXPECT_EQ(wd_attachment_tensor(a.get(), n, &t), WD_OUT_OF_RANGE);
  EXPECT_THAT(wd_last_error(), HasSubstr("has 21 tensors"));

  EXPECT_EQ(wd_attachment_verify(a.get()), WD_OK) << wd_last_error();
  EXPECT_THAT(StatusJson("demo"), HasSubstr(R"("leases":[{)"));
  EXPECT_EQ(wd_attachment_detach(a.get()), WD_OK) << wd_last_error();
  EXPECT_EQ(wd_attachment_num_tensors(a.get()), 0u);
  EXPECT_THAT(StatusJson("demo"), HasSubstr(R"("leases":[])"));
}

TEST_F(CApiTest, DlpackExportHoldsTheLeaseUntilTheDeleterRuns) {
  ClientPtr c = Connect();
  wd_attachment* a = nullptr;
  ASSERT_EQ(wd_attach(c.get(), "demo", 0, &a), WD_OK) << wd_last_error();
  size_t i = 0;
  ASSERT_EQ(wd_attachment_find(a, "model.norm.weight", &i), WD_OK);
  wd_tensor_info t;
  ASSERT_EQ(wd_attachment_tensor(a, i, &t), WD_OK);
  void* out = nullptr;
  ASSERT_EQ(wd_attachment_export_dlpack(a, i, &out), WD_OK) << wd_last_error();
  auto* m = static_cast<DLManagedTensor*>(out);
  EXPECT_EQ(wd_attachment_refcount(a), 2);
  EXPECT_EQ(m->dl_tensor.data, t.data);
  EXPECT_EQ(m->dl_tensor.device.device_type, 1);  // kDLCPU
  EXPECT_EQ(m->dl_tensor.ndim, 1);
  EXPECT_EQ(m->dl_tensor.dtype.code, 4);  // kDLBfloat
  EXPECT_EQ(m->dl_tensor.dtype.bits, 16);
  EXPECT_EQ(m->dl_tensor.dtype.lanes, 1);
  EXPECT_EQ(m->dl_tensor.shape[0], 256);
  EXPECT_EQ(m->dl_tensor.strides[0], 1);
  EXPECT_EQ(wd_attachment_export_dlpack(a, 999, &out), WD_OUT_OF_RANGE);

  // Detaching while an exported tensor uses the memory is refused.
  EXPECT_EQ(wd_attachment_detach(a), WD_FAILED_PRECONDITION);
  EXPECT_THAT(wd_last_error(), HasSubstr("1 other references"));

  // The handle's own reference goes first: the export still keeps the lease and the bytes.
  wd_attachment_release(a);
  EXPECT_THAT(StatusJson("demo"), HasSubstr(R"("leases":[{)"));
  volatile uint8_t first = static_cast<const uint8_t*>(m->dl_tensor.data)[0];
  (void)first;
  m->deleter(m);  // last reference: unmaps and detaches
  EXPECT_TRUE(WaitForState("demo", "ready"));
  const auto deadline = Clock::now() + std::chrono::seconds(5);
  while (StatusJson("demo").find(R"("leases":[])") == std::string::npos &&
         Clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_THAT(StatusJson("demo"), HasSubstr(R"("leases":[])"));
}

TEST_F(CApiTest, UnloadRefusedWhileAttachedThenSucceeds) {
  ClientPtr c = Connect();
  ASSERT_EQ(wd_load(c.get(), "demo2", g_ckpt.c_str(), R"({"recipe": "llama", "tp": 2})"), WD_OK)
      << wd_last_error();
  ASSERT_TRUE(WaitForState("demo2", "ready"));
  wd_attachment* a = nullptr;
  ASSERT_EQ(wd_attach(c.get(), "demo2", 1, &a), WD_OK) << wd_last_error();
  EXPECT_EQ(wd_attachment_rank(a), 1);
  EXPECT_EQ(wd_attachment_verify(a), WD_OK) << wd_last_error();
  EXPECT_EQ(wd_unload(c.get(), "demo2", 0), WD_FAILED_PRECONDITION);
  EXPECT_THAT(wd_last_error(), HasSubstr("demo2"));
  wd_attachment_release(a);
  EXPECT_EQ(wd_unload(c.get(), "demo2", 0), WD_OK) << wd_last_error();
  EXPECT_EQ(wd_unload(c.get(), "demo2", 0), WD_NOT_FOUND);
}

// The generation of a fresh load's lease is 1 (also from a daemon that sends none).
TEST_F(CApiTest, AttachmentGenerationIsOneAfterTheLoad) {
  ClientPtr c = Connect();
  wd_attachment* raw = nullptr;
  ASSERT_EQ(wd_attach(c.get(), "demo", 0, &raw), WD_OK) << wd_last_error();
  AttachmentPtr a(raw);
  EXPECT_EQ(wd_attachment_generation(a.get()), 1u);
}

}  // namespace
