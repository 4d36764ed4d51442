// The C++ client against a fake daemon that lies: unsealed or resizable memfds, manifests that
// do not parse, fd counts and sizes that disagree with the manifest. Every case must end in an
// error naming the problem, never in a crash, a SIGBUS or a pointer outside a mapping.
#include <dirent.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <functional>
#include <optional>
#include <chrono>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/time/time.h"
#include "detail/reply.h"
#include "detail/safetensors_memfd.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "weightd/client.h"
#include "weightd/crc32c.h"
#include "weightd/manifest.h"
#include "weightd/safetensors.h"
#include "weightd/seqpacket.h"

#if WEIGHTD_HAVE_CUDA_DRIVER
#include "weightd/detail/cuda_driver.h"
#include "weightd/detail/cuda_resources.h"
#endif

namespace weightd {
namespace {

using ::testing::HasSubstr;

UniqueFd Memfd(const std::string& bytes, size_t size, int seals) {
  UniqueFd fd(::memfd_create("fake", MFD_CLOEXEC | MFD_ALLOW_SEALING));
  EXPECT_EQ(::ftruncate(fd.get(), static_cast<off_t>(size)), 0);
  EXPECT_EQ(::pwrite(fd.get(), bytes.data(), bytes.size(), 0), static_cast<ssize_t>(bytes.size()));
  if (seals) {
    EXPECT_EQ(::fcntl(fd.get(), F_ADD_SEALS, seals), 0);
  }
  return fd;
}

constexpr int kSeals = F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL;

std::string GoodManifest(uint64_t arena_size = 4096) {
  Manifest m;
  m.model = "m";
  m.rank = 0;
  m.arenas.push_back({arena_size, ArenaKind::kHostMemfd});
  m.tensors.push_back({"w", DType::kF32, {4}, {1}, 0, 0, 16, 0});
  return EncodeManifest(m);
}

// Answers hello and detach like weightd; answers attach with `attach(fd)`. `custom(fd, request,
// id, fds)`, when given, sees every request (and the fds it carried) first and returns true when
// it answered it.
class FakeDaemon {
 public:
  using Custom =
      std::function<bool(int, const std::string&, const std::string&, std::vector<UniqueFd>&)>;
  explicit FakeDaemon(std::function<void(int)> attach, Custom custom = nullptr)
      : attach_(std::move(attach)), custom_(std::move(custom)) {
    char tmpl[] = "/tmp/weightd-fake-XXXXXX";
    dir_ = ::mkdtemp(tmpl);
    path_ = dir_ + "/s";
    listen_ = UniqueFd(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    std::strcpy(a.sun_path, path_.c_str());
    EXPECT_EQ(::bind(listen_.get(), reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
    EXPECT_EQ(::listen(listen_.get(), 4), 0);
    thread_ = std::thread([this] { Serve(); });
  }
  ~FakeDaemon() {
    ::shutdown(listen_.get(), SHUT_RDWR);
    thread_.join();
    ::unlink(path_.c_str());
    ::rmdir(dir_.c_str());
  }
  const std::string& path() const { return path_; }

 private:
  void Serve() {
    UniqueFd c(::accept4(listen_.get(), nullptr, nullptr, SOCK_CLOEXEC));
    if (!c) return;
    for (;;) {
      auto p = RecvPacket(c.get(), 1 << 16);
      if (!p.ok() || p->eof) return;
      const std::string& d = p->data;
      const std::string id = d.substr(
          d.find("\"id\":") + 5, d.find_first_of(",}", d.find("\"id\":")) - d.find("\"id\":") - 5);
      if (custom_ && custom_(c.get(), d, id, p->fds)) continue;
      if (d.find("\"hello\"") != std::string::npos) {
        (void)SendPacket(c.get(), "{\"ok\":true,\"id\":" + id + ",\"result\":{\"version\":1}}");
      } else if (d.find("\"attach\"") != std::string::npos) {
        attach_id_ = id;
        attach_(c.get());
      } else {
        (void)SendPacket(c.get(), "{\"ok\":true,\"id\":" + id + ",\"result\":{}}");
      }
    }
  }
  std::function<void(int)> attach_;
  Custom custom_;
  std::string dir_, path_;
  UniqueFd listen_;
  std::thread thread_;

 public:
  std::string attach_id_;
};

std::string Reply(uint64_t manifest_bytes, int id = 2) {
  return "{\"ok\":true,\"id\":" + std::to_string(id) +
         ",\"result\":{\"lease\":1,\"manifest_bytes\":" + std::to_string(manifest_bytes) +
         ",\"arenas\":1,\"fd_messages\":0}}";
}

absl::Status AttachTo(const std::function<void(int)>& behaviour) {
  FakeDaemon d(behaviour);
  auto c = Client::Connect(d.path());
  if (!c.ok()) return c.status();
  return c->Attach("m", 0).status();
}

TEST(ClientHostileTest, GoodFakeWorksAndMemoryIsReadOnly) {
  const std::string man = GoodManifest();
  float vals[4] = {1, 2, 3, 4};
  FakeDaemon d([&](int s) {
    UniqueFd mf = Memfd(man, man.size(), kSeals);
    UniqueFd arena = Memfd(std::string(reinterpret_cast<char*>(vals), 16), 4096, kSeals);
    int fds[] = {mf.get(), arena.get()};
    (void)SendPacket(s, Reply(man.size()), fds);
  });
  auto c = Client::Connect(d.path());
  ASSERT_TRUE(c.ok()) << c.status();
  auto a = c->Attach("m", 0);
  ASSERT_TRUE(a.ok()) << a.status();
  const TensorView* w = a->Find("w");
  ASSERT_NE(w, nullptr);
  EXPECT_EQ(static_cast<const float*>(w->data)[2], 3.0f);
  EXPECT_EQ(a->Find("nope"), nullptr);
}

TEST(ClientHostileTest, UnsealedManifest) {
  const std::string man = GoodManifest();
  absl::Status s = AttachTo([&](int sock) {
    UniqueFd mf = Memfd(man, man.size(), 0);
    UniqueFd arena = Memfd("", 4096, kSeals);
    int fds[] = {mf.get(), arena.get()};
    (void)SendPacket(sock, Reply(man.size()), fds);
  });
  EXPECT_THAT(std::string(s.message()), HasSubstr("not sealed"));
}

TEST(ClientHostileTest, GarbageManifest) {
  const std::string junk(200, 'x');
  absl::Status s = AttachTo([&](int sock) {
    UniqueFd mf = Memfd(junk, junk.size(), kSeals);
    UniqueFd arena = Memfd("", 4096, kSeals);
    int fds[] = {mf.get(), arena.get()};
    (void)SendPacket(sock, Reply(junk.size()), fds);
  });
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("magic"));
}

TEST(ClientHostileTest, ManifestSizeDisagreesWithReply) {
  const std::string man = GoodManifest();
  absl::Status s = AttachTo([&](int sock) {
    UniqueFd mf = Memfd(man, man.size(), kSeals);
    UniqueFd arena = Memfd("", 4096, kSeals);
    int fds[] = {mf.get(), arena.get()};
    (void)SendPacket(sock, Reply(man.size() + 100), fds);
  });
  EXPECT_THAT(std::string(s.message()), HasSubstr("announced"));
}

TEST(ClientHostileTest, ShrinkableArena) {
  const std::string man = GoodManifest();
  absl::Status s = AttachTo([&](int sock) {
    UniqueFd mf = Memfd(man, man.size(), kSeals);
    UniqueFd arena = Memfd("", 4096, F_SEAL_WRITE);  // could be truncated under the mapping
    int fds[] = {mf.get(), arena.get()};
    (void)SendPacket(sock, Reply(man.size()), fds);
  });
  EXPECT_THAT(std::string(s.message()), HasSubstr("arena 0 memfd is not sealed"));
}

TEST(ClientHostileTest, ArenaSmallerThanManifest) {
  const std::string man = GoodManifest(1 << 20);
  absl::Status s = AttachTo([&](int sock) {
    UniqueFd mf = Memfd(man, man.size(), kSeals);
    UniqueFd arena = Memfd("", 4096, kSeals);
    int fds[] = {mf.get(), arena.get()};
    (void)SendPacket(sock, Reply(man.size()), fds);
  });
  EXPECT_THAT(std::string(s.message()), HasSubstr("the manifest says 1048576"));
}

TEST(ClientHostileTest, MissingArenaFdAndNoFds) {
  const std::string man = GoodManifest();
  absl::Status s = AttachTo([&](int sock) {
    UniqueFd mf = Memfd(man, man.size(), kSeals);
    int fds[] = {mf.get()};
    (void)SendPacket(sock, Reply(man.size()), fds);
  });
  EXPECT_THAT(std::string(s.message()), HasSubstr("sent 0 arena fds"));
  s = AttachTo([&](int sock) { (void)SendPacket(sock, Reply(100)); });
  EXPECT_THAT(std::string(s.message()), HasSubstr("no manifest fd"));
  s = AttachTo([&](int sock) { (void)SendPacket(sock, "{\"ok\":true,\"id\":2,\"result\":{}}"); });
  EXPECT_THAT(std::string(s.message()), HasSubstr("lacks manifest_bytes"));
  s = AttachTo([&](int sock) { (void)SendPacket(sock, "not json"); });
  EXPECT_THAT(std::string(s.message()), HasSubstr("not a JSON object"));
}

TEST(ClientHostileTest, DaemonHangsUpMidRequest) {
  FakeDaemon d([](int sock) { ::shutdown(sock, SHUT_RDWR); });
  auto c = Client::Connect(d.path());
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->Attach("m", 0).status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(c->List().status().code(), absl::StatusCode::kUnavailable);
}

// A rank with more arenas than one SCM_RIGHTS message carries: the reply brings the manifest and
// 252 arena fds, one continuation packet the other 48 (docs/PROTOCOL.md).
TEST(ClientHostileTest, ArenaFdsSplitAcrossContinuationPackets) {
  constexpr int kArenas = 300;
  Manifest m;
  m.model = "m";
  for (int i = 0; i < kArenas; ++i) {
    m.arenas.push_back({4096, ArenaKind::kHostMemfd});
    m.tensors.push_back(
        {"t" + std::to_string(i), DType::kU8, {1}, {1}, static_cast<uint32_t>(i), 0, 1, 0});
  }
  const std::string man = EncodeManifest(m);
  FakeDaemon d([&](int sock) {
    std::vector<UniqueFd> owned;
    owned.push_back(Memfd(man, man.size(), kSeals));
    for (int i = 0; i < kArenas; ++i) {
      owned.push_back(Memfd(std::string(1, static_cast<char>(i)), 4096, kSeals));
    }
    std::vector<int> first, rest;
    for (size_t i = 0; i < owned.size(); ++i) (i < 253 ? first : rest).push_back(owned[i].get());
    (void)SendPacket(sock,
                     "{\"ok\":true,\"id\":2,\"result\":{\"lease\":1,\"manifest_bytes\":" +
                         std::to_string(man.size()) + ",\"arenas\":300,\"fd_messages\":1}}",
                     first);
    (void)SendPacket(sock, "{\"ok\":true,\"id\":2,\"continuation\":1}", rest);
  });
  auto c = Client::Connect(d.path());
  ASSERT_TRUE(c.ok());
  auto a = c->Attach("m", 0);
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_EQ(a->tensors().size(), 300u);
  for (int i : {0, 251, 252, 299}) {
    EXPECT_EQ(*static_cast<const unsigned char*>(a->Find("t" + std::to_string(i))->data), i % 256)
        << i;
  }
}

TEST(ClientHostileTest, ManifestForAnotherModel) {
  Manifest m;
  m.model = "other";
  m.arenas.push_back({4096, ArenaKind::kHostMemfd});
  const std::string man = EncodeManifest(m);
  absl::Status s = AttachTo([&](int sock) {
    UniqueFd mf = Memfd(man, man.size(), kSeals);
    UniqueFd arena = Memfd("", 4096, kSeals);
    int fds[] = {mf.get(), arena.get()};
    (void)SendPacket(sock, Reply(man.size()), fds);
  });
  EXPECT_THAT(std::string(s.message()), HasSubstr("'other'"));
}

// A device arena (daemon `--backend cuda`) on a machine where this process cannot map it: no
// CUDA driver here, or (on a GPU machine) no local GPU with the fake UUID. The attach must fail
// UNAVAILABLE naming the model, the rank and the reason, without touching the fd.
std::string DeviceManifest() {
  Manifest m;
  m.model = "m";
  m.rank = 0;
  m.device = 0;
  m.arenas.push_back({4096, ArenaKind::kCudaVmm});
  m.tensors.push_back({"w", DType::kF32, {4}, {1}, 0, 0, 16, 0});
  return EncodeManifest(m);
}

std::string DeviceReply(uint64_t manifest_bytes, const std::string& arena_info) {
  return "{\"ok\":true,\"id\":2,\"result\":{\"lease\":1,\"manifest_bytes\":" +
         std::to_string(manifest_bytes) + ",\"arenas\":1," + arena_info + "\"fd_messages\":0}}";
}

absl::Status AttachDevice(const std::string& arena_info) {
  const std::string man = DeviceManifest();
  return AttachTo([&](int sock) {
    UniqueFd mf = Memfd(man, man.size(), kSeals);
    UniqueFd arena = Memfd("", 4096, kSeals);  // stands in for a cuMemExportToShareableHandle fd
    int fds[] = {mf.get(), arena.get()};
    (void)SendPacket(sock, DeviceReply(man.size(), arena_info), fds);
  });
}

TEST(ClientHostileTest, DeviceArenaWithoutMatchingGpuIsUnavailable) {
  const absl::Status s = AttachDevice(
      "\"arena_info\":[{\"kind\":\"cuda\",\"device_uuid\":"
      "\"00112233445566778899aabbccddeeff\"}],");
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
  const std::string msg(s.message());
  EXPECT_THAT(msg, HasSubstr("model 'm' rank 0"));
  EXPECT_THAT(msg, HasSubstr("00112233445566778899aabbccddeeff"));
  // Which reason depends on the machine: this CI has no driver, a GPU machine has other UUIDs.
  EXPECT_TRUE(msg.find("no CUDA driver") != std::string::npos ||
              msg.find("no local GPU with UUID 00112233445566778899aabbccddeeff") !=
                  std::string::npos)
      << msg;
}

TEST(ClientHostileTest, DeviceArenaWithoutUuidIsUnavailable) {
  const absl::Status s = AttachDevice("");
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("sent no device_uuid"));
}

TEST(ClientHostileTest, DeviceArenaWithBadUuidOrArenaInfo) {
  absl::Status s = AttachDevice("\"arena_info\":[{\"kind\":\"cuda\",\"device_uuid\":\"GPU-12\"}],");
  EXPECT_EQ(s.code(), absl::StatusCode::kInternal) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("not 32 hex digits"));
  s = AttachDevice("\"arena_info\":[],");
  EXPECT_EQ(s.code(), absl::StatusCode::kInternal) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("arena_info is not an array of 1 entries"));
}

// Replies whose JSON is well-formed but whose fields have the wrong types. nlohmann's value()
// throws on a type mismatch; such a reply used to throw out of Client::Connect, List or Attach.
absl::Status ConnectAnd(const std::string& op_in_request, const std::string& reply_result,
                        const std::function<absl::Status(Client&)>& call) {
  FakeDaemon d(
      [](int) {},
      [&](int sock, const std::string& request, const std::string& id, std::vector<UniqueFd>&) {
        if (request.find(op_in_request) == std::string::npos) return false;
        (void)SendPacket(sock, absl::StrReplaceAll(reply_result, {{"$ID", id}}));
        return true;
      });
  absl::StatusOr<Client> c = Client::Connect(d.path());
  if (!c.ok()) return c.status();
  return call(*c);
}

absl::Status HelloReply(const std::string& reply) {
  return ConnectAnd("\"hello\"", reply, [](Client&) { return absl::OkStatus(); });
}

TEST(ClientHostileTest, MistypedReplyFieldsAreErrorsNotExceptions) {
  for (const char* reply : {
           R"({"ok":1,"id":$ID,"result":{"version":1}})",
           R"({"ok":"true","id":$ID,"result":{"version":1}})",
           R"({"id":$ID,"result":{"version":1}})",
           R"({"ok":true,"id":$ID,"result":{"version":"1"}})",
           R"({"ok":true,"id":$ID,"result":{"version":1.5}})",
           R"({"ok":true,"id":$ID,"result":[1]})",
           R"({"ok":true,"id":$ID,"result":"x"})",
       }) {
    absl::Status s;
    EXPECT_NO_THROW(s = HelloReply(reply)) << reply;
    EXPECT_EQ(s.code(), absl::StatusCode::kInternal) << reply << ": " << s;
    EXPECT_THAT(std::string(s.message()), HasSubstr("malformed reply from weightd")) << reply;
  }
  // An error reply with fields of the wrong type is still an error, never a success.
  for (const char* reply : {
           R"({"ok":false,"id":$ID,"error":{"code":5,"message":"m"}})",
           R"({"ok":false,"id":$ID,"error":{"code":"NOT_FOUND","message":[1]}})",
           R"({"ok":false,"id":$ID,"error":{"code":"OK","message":"m"}})",
           R"({"ok":false,"id":$ID,"error":7})",
       }) {
    absl::Status s;
    EXPECT_NO_THROW(s = HelloReply(reply)) << reply;
    EXPECT_FALSE(s.ok()) << reply;
    EXPECT_NE(s.code(), absl::StatusCode::kUnknown) << reply << ": " << s;
  }
  absl::Status s =
      HelloReply(R"({"ok":false,"id":$ID,"error":{"code":"NOT_FOUND","message":"m"}})");
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound) << s;
  EXPECT_EQ(s.message(), "m");
}

TEST(ClientHostileTest, MistypedAttachAndStatusFieldsAreErrorsNotExceptions) {
  auto attach = [](Client& c) { return c.Attach("m", 0).status(); };
  absl::Status s;
  EXPECT_NO_THROW(s = ConnectAnd("\"attach\"",
                                 R"({"ok":true,"id":$ID,"result":{"lease":1,"manifest_bytes":80,)"
                                 R"("fd_messages":"2"}})",
                                 attach));
  EXPECT_EQ(s.code(), absl::StatusCode::kInternal) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("fd_messages"));
  EXPECT_NO_THROW(s = ConnectAnd("\"attach\"",
                                 R"({"ok":true,"id":$ID,"result":{"lease":1,"manifest_bytes":80,)"
                                 R"("arena_info":[{"device_uuid":5}]}})",
                                 attach));
  EXPECT_EQ(s.code(), absl::StatusCode::kInternal) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("device_uuid"));
  auto list = [](Client& c) { return c.List().status(); };
  EXPECT_NO_THROW(
      s = ConnectAnd("\"list\"", R"({"ok":true,"id":$ID,"result":{"models":[{"tp":"2"}]}})", list));
  EXPECT_EQ(s.code(), absl::StatusCode::kInternal) << s;
  // Entries of the wrong kind inside arrays are skipped; the rest decodes.
  auto status = [](Client& c) -> absl::Status {
    absl::StatusOr<std::vector<ModelInfo>> m = c.Status();
    if (!m.ok()) return m.status();
    if (m->size() != 1 || (*m)[0].ranks.size() != 1 || !(*m)[0].ranks[0].leases.empty()) {
      return absl::InternalError("unexpected decode");
    }
    return absl::OkStatus();
  };
  EXPECT_NO_THROW(s = ConnectAnd("\"status\"",
                                 R"({"ok":true,"id":$ID,"result":{"models":[3,)"
                                 R"({"name":"m","ranks":[{"rank":0,"leases":[5]}]}]}})",
                                 status));
  EXPECT_TRUE(s.ok()) << s;
}

// Found by fuzz_client_reply: a number too large for uint64 arrives as a double, and nlohmann's
// conversion of 4.18e23 to uint64_t was undefined behaviour (UBSan stops the process). Numbers
// that do not fit the field are malformed replies.
TEST(ClientHostileTest, NumbersOutsideTheFieldsRangeAreErrors) {
  auto status = [](Client& c) { return c.Status().status(); };
  for (const char* models : {
           R"([{"name":"m","ranks":[{"rank":0,"arena_bytes":418446744073709551615096}]}])",
           R"([{"name":"m","tp":1e10}])",
           R"([{"name":"m","tp":4294967297}])",
           R"([{"name":"m","bytes_done":-1}])",
           R"([{"name":"m","ranks":[1099511627776]}])",
           R"([{"name":"m","ranks":[{"leases":[{"uid":-5}]}]}])",
       }) {
    absl::Status s;
    EXPECT_NO_THROW(
        s = ConnectAnd("\"status\"",
                       absl::StrCat(R"({"ok":true,"id":$ID,"result":{"models":)", models, "}}"),
                       status));
    EXPECT_EQ(s.code(), absl::StatusCode::kInternal) << models << ": " << s;
    EXPECT_THAT(std::string(s.message()), HasSubstr("wrong type or range")) << models;
  }
}

// ---- Generations: refresh, update, wait_generation, rollback (docs/PROTOCOL.md) ----

int OpenFds() {
  int n = 0;
  DIR* d = ::opendir("/proc/self/fd");
  while (::readdir(d) != nullptr) ++n;
  ::closedir(d);
  return n;
}

// OpenFds() once it equals `want`, or after 5 s: Refresh() closes the old generation's fds on a
// thread of its own (freeing gigabytes of pages must not delay it).
int OpenFdsSettled(int want) {
  for (int i = 0; i < 500 && OpenFds() != want; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return OpenFds();
}

// A host rank of two tensors in one 8192-byte arena: w (F32 [4], offset 0) and v (U8 [8],
// offset 4096). `seed` makes each generation's bytes different.
constexpr uint64_t kArenaBytes = 8192;

std::string ArenaBytes(int seed) {
  std::string a(kArenaBytes, '\0');
  const float w[4] = {float(seed), float(seed) + 1, float(seed) + 2, float(seed) + 3};
  std::memcpy(a.data(), w, sizeof(w));
  std::memset(a.data() + 4096, seed, 8);
  return a;
}

Manifest TwoTensorManifest(const std::string& arena) {
  Manifest m;
  m.model = "m";
  m.rank = 0;
  m.arenas.push_back({kArenaBytes, ArenaKind::kHostMemfd});
  m.tensors.push_back({"w", DType::kF32, {4}, {1}, 0, 0, 16, Crc32c(arena.data(), 16)});
  m.tensors.push_back({"v", DType::kU8, {8}, {1}, 0, 4096, 8, Crc32c(arena.data() + 4096, 8)});
  return m;
}

std::string AttachReplyText(const std::string& id, uint64_t manifest_bytes, uint64_t generation,
                            const std::string& extra = "", uint64_t lease = 1) {
  return absl::StrCat(R"({"ok":true,"id":)", id, R"(,"result":{"name":"m","rank":0,"lease":)",
                      lease, R"(,"generation":)", generation, R"(,"manifest_bytes":)",
                      manifest_bytes, R"(,"arenas":1,"fd_messages":0)", extra, "}}");
}

// A fake daemon whose attach serves generation 1 and whose refresh does what the test sets in
// `refresh` (sock, id). The daemon side keeps every fd it sent in `kept`, so that the test's fd
// counts see only what the client holds.
struct RefreshFake {
  std::function<void(int, const std::string&)> refresh;
  std::string attach_extra;  // more fields of the attach reply, e.g. R"(,"arena_ids":[5])"
  std::vector<std::string> requests;
  std::vector<UniqueFd> kept;
  FakeDaemon daemon;

  RefreshFake()
      : daemon(
            [this](int sock) {
              const std::string arena = ArenaBytes(1);
              const std::string man = EncodeManifest(TwoTensorManifest(arena));
              Send(sock, AttachReplyText("2", man.size(), 1, attach_extra), man, {arena});
            },
            [this](int sock, const std::string& request, const std::string& id,
                   std::vector<UniqueFd>&) {
              if (request.find("\"refresh\"") == std::string::npos) return false;
              requests.push_back(request);
              refresh(sock, id);
              return true;
            }) {}

  // Sends `reply` with a sealed manifest memfd holding `man` and one sealed memfd per arena.
  void Send(int sock, const std::string& reply, const std::string& man,
            const std::vector<std::string>& arenas, int arena_seals = kSeals) {
    std::vector<int> fds;
    kept.push_back(Memfd(man, man.size(), kSeals));
    fds.push_back(kept.back().get());
    for (const std::string& a : arenas) {
      kept.push_back(Memfd(a, a.size(), arena_seals));
      fds.push_back(kept.back().get());
    }
    (void)SendPacket(sock, reply, fds);
  }
  // Generation `gen` with the bytes of ArenaBytes(seed), laid out by `m` (TwoTensorManifest of
  // those bytes unless the test changes it).
  void SendGeneration(int sock, const std::string& id, uint64_t gen, const Manifest& m,
                      const std::string& arena) {
    const std::string man = EncodeManifest(m);
    Send(sock, AttachReplyText(id, man.size(), gen, R"(,"unchanged":false)"), man, {arena});
  }
};

float FloatAt(const TensorView* t, int i) { return static_cast<const float*>(t->data)[i]; }

TEST(ClientRefreshTest, MapsTheNewGenerationAtTheSameAddresses) {
  RefreshFake f;
  f.refresh = [&](int sock, const std::string& id) {
    const std::string arena = ArenaBytes(7);
    f.SendGeneration(sock, id, 2, TwoTensorManifest(arena), arena);
  };
  auto c = Client::Connect(f.daemon.path());
  ASSERT_TRUE(c.ok()) << c.status();
  auto a = c->Attach("m", 0);
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->generation(), 1u);
  const TensorView* w = a->Find("w");
  const TensorView* v = a->Find("v");
  ASSERT_NE(w, nullptr);
  const void* w_data = w->data;
  const TensorView* views = a->tensors().data();
  const uint32_t old_crc = w->crc32c;
  EXPECT_EQ(FloatAt(w, 0), 1.0f);
  const int fds_before = OpenFds();

  absl::StatusOr<bool> changed = a->Refresh();
  ASSERT_TRUE(changed.ok()) << changed.status();
  EXPECT_TRUE(*changed);
  EXPECT_EQ(a->generation(), 2u);
  // The same objects, the same addresses, the new bytes.
  EXPECT_EQ(a->Find("w"), w);
  EXPECT_EQ(a->tensors().data(), views);
  EXPECT_EQ(w->data, w_data);
  EXPECT_EQ(FloatAt(w, 0), 7.0f);
  EXPECT_EQ(FloatAt(w, 3), 10.0f);
  EXPECT_EQ(static_cast<const unsigned char*>(v->data)[7], 7);
  const std::string seven = ArenaBytes(7);
  EXPECT_EQ(w->crc32c, Crc32c(seven.data(), 16));
  EXPECT_NE(w->crc32c, old_crc);
  EXPECT_EQ(v->crc32c, Crc32c(seven.data() + 4096, 8));
  EXPECT_TRUE(a->Verify().ok()) << a->Verify();
  // The old manifest and arena fds were closed, the new ones adopted (the fake keeps its own
  // two copies of the new ones).
  EXPECT_EQ(OpenFdsSettled(fds_before + 2), fds_before + 2);
  ASSERT_EQ(f.requests.size(), 1u);
  EXPECT_THAT(f.requests[0], HasSubstr(R"("lease":1)"));
  EXPECT_THAT(f.requests[0], HasSubstr(R"("rank":0)"));
  EXPECT_THAT(f.requests[0], HasSubstr(R"("name":"m")"));

  // Moving the attachment keeps the views too.
  Attachment moved = *std::move(a);
  EXPECT_EQ(moved.Find("w"), w);
  EXPECT_EQ(FloatAt(moved.Find("w"), 1), 8.0f);
}

// arena_ids (docs/PROTOCOL.md "attach"): an arena whose id is unchanged keeps its mapping, but
// only when it is the very memfd mapped (a daemon bug or a forged reply reusing an id for new
// memory must not leave the worker on stale bytes); a malformed list is refused and the old
// mapping stays.
TEST(ClientRefreshTest, ArenaIdsKeepOnlyTheSameMemory) {
  RefreshFake f;
  f.attach_extra = R"(,"arena_ids":[5])";
  int step = 0;
  f.refresh = [&](int sock, const std::string& id) {
    ++step;
    if (step == 1) {  // id 5 again, but other memory: remapped
      const std::string arena = ArenaBytes(7);
      const std::string man = EncodeManifest(TwoTensorManifest(arena));
      f.Send(sock, AttachReplyText(id, man.size(), 2, R"(,"unchanged":false,"arena_ids":[5])"), man,
             {arena});
    } else if (step == 2) {  // id 5, the memfd mapped now (the fake's copy of it): kept
      const std::string arena = ArenaBytes(7);
      const std::string man = EncodeManifest(TwoTensorManifest(arena));
      UniqueFd mf = Memfd(man, man.size(), kSeals);
      const int arena_fd = f.kept.back().get();  // sent with step 1
      (void)SendPacket(sock,
                       AttachReplyText(id, man.size(), 3, R"(,"unchanged":false,"arena_ids":[5])"),
                       std::vector<int>{mf.get(), arena_fd});
      f.kept.push_back(std::move(mf));
    } else {  // two ids for one arena
      const std::string arena = ArenaBytes(9);
      const std::string man = EncodeManifest(TwoTensorManifest(arena));
      f.Send(sock, AttachReplyText(id, man.size(), 4, R"(,"unchanged":false,"arena_ids":[6,7])"),
             man, {arena});
    }
  };
  auto c = Client::Connect(f.daemon.path());
  ASSERT_TRUE(c.ok()) << c.status();
  auto a = c->Attach("m", 0);
  ASSERT_TRUE(a.ok()) << a.status();
  const TensorView* w = a->Find("w");
  ASSERT_NE(w, nullptr);
  const void* w_data = w->data;
  EXPECT_EQ(FloatAt(w, 0), 1.0f);

  absl::StatusOr<bool> changed = a->Refresh();
  ASSERT_TRUE(changed.ok()) << changed.status();
  EXPECT_TRUE(*changed);
  EXPECT_EQ(w->data, w_data);
  EXPECT_EQ(FloatAt(w, 0), 7.0f) << "an unchanged id with another memfd must be remapped";
  EXPECT_TRUE(a->Verify().ok()) << a->Verify();

  changed = a->Refresh();
  ASSERT_TRUE(changed.ok()) << changed.status();
  EXPECT_TRUE(*changed);
  EXPECT_EQ(a->generation(), 3u);
  EXPECT_EQ(w->data, w_data);
  EXPECT_EQ(FloatAt(w, 0), 7.0f);
  EXPECT_TRUE(a->Verify().ok()) << a->Verify();

  changed = a->Refresh();
  ASSERT_FALSE(changed.ok());
  EXPECT_EQ(changed.status().code(), absl::StatusCode::kInternal) << changed.status();
  EXPECT_THAT(std::string(changed.status().message()),
              HasSubstr("arena_ids is not an array of 1 entries"));
  EXPECT_EQ(a->generation(), 3u);
  EXPECT_EQ(FloatAt(w, 0), 7.0f);
  EXPECT_TRUE(a->Verify().ok()) << a->Verify();
}

TEST(ClientRefreshTest, UnchangedChangesNothing) {
  RefreshFake f;
  uint64_t answer_generation = 1;
  f.refresh = [&](int sock, const std::string& id) {
    (void)SendPacket(
        sock,
        absl::StrCat(R"({"ok":true,"id":)", id, R"(,"result":{"name":"m","rank":0,"lease":1,)",
                     R"("generation":)", answer_generation, R"(,"unchanged":true}})"));
  };
  auto c = Client::Connect(f.daemon.path());
  ASSERT_TRUE(c.ok()) << c.status();
  auto a = c->Attach("m", 0);
  ASSERT_TRUE(a.ok()) << a.status();
  const TensorView* w = a->Find("w");
  const uint32_t crc = w->crc32c;
  absl::StatusOr<bool> changed = a->Refresh();
  ASSERT_TRUE(changed.ok()) << changed.status();
  EXPECT_FALSE(*changed);
  EXPECT_EQ(a->generation(), 1u);
  EXPECT_EQ(w->crc32c, crc);
  EXPECT_EQ(FloatAt(w, 0), 1.0f);

  // The daemon has the lease on a generation this attachment does not map: say so.
  answer_generation = 3;
  changed = a->Refresh();
  EXPECT_EQ(changed.status().code(), absl::StatusCode::kFailedPrecondition) << changed.status();
  EXPECT_THAT(std::string(changed.status().message()),
              HasSubstr("weightd counts the lease on generation 3 but this attachment maps "
                        "generation 1"));
  EXPECT_THAT(std::string(changed.status().message()), HasSubstr("model 'm' rank 0"));
  EXPECT_EQ(FloatAt(w, 0), 1.0f);
}

// Each case answers the refresh with generation 2 laid out differently: refused, naming the
// difference, and the old generation stays mapped and readable.
TEST(ClientRefreshTest, ADifferentLayoutIsRefusedAndTheOldBytesStay) {
  struct Case {
    const char* expect;
    std::function<void(Manifest&, std::string&)> change;
  };
  const std::vector<Case> cases = {
      {"tensor 'v' offset 2048 instead of 4096",
       [](Manifest& m, std::string&) { m.tensors[1].offset = 2048; }},
      {"arena 0 size 12288 bytes instead of 8192",
       [](Manifest& m, std::string& arena) {
         m.arenas[0].size = 12288;
         arena.resize(12288);
       }},
      {"tensor 1 is 'u' instead of 'v'",
       [](Manifest& m, std::string&) { m.tensors[1].name = "u"; }},
      {"tensor 'w' dtype I32 instead of F32",
       [](Manifest& m, std::string&) { m.tensors[0].dtype = DType::kI32; }},
      {"tensor 'w' shape [2,2] instead of [4]",
       [](Manifest& m, std::string&) {
         m.tensors[0].shape = {2, 2};
         m.tensors[0].strides = {2, 1};
       }},
      {"3 tensors instead of 2",
       [](Manifest& m, std::string&) {
         m.tensors.push_back({"x", DType::kU8, {1}, {1}, 0, 100, 1, 0});
       }},
  };
  for (const Case& tc : cases) {
    RefreshFake f;
    f.refresh = [&](int sock, const std::string& id) {
      std::string arena = ArenaBytes(9);
      Manifest m = TwoTensorManifest(arena);
      tc.change(m, arena);
      f.SendGeneration(sock, id, 2, m, arena);
    };
    auto c = Client::Connect(f.daemon.path());
    ASSERT_TRUE(c.ok()) << c.status();
    auto a = c->Attach("m", 0);
    ASSERT_TRUE(a.ok()) << a.status();
    const TensorView* w = a->Find("w");
    const uint32_t crc = w->crc32c;
    const int fds_before = OpenFds();
    absl::StatusOr<bool> changed = a->Refresh();
    EXPECT_EQ(changed.status().code(), absl::StatusCode::kFailedPrecondition)
        << tc.expect << ": " << changed.status();
    EXPECT_THAT(std::string(changed.status().message()), HasSubstr(tc.expect));
    EXPECT_THAT(std::string(changed.status().message()), HasSubstr("model 'm' rank 0"));
    EXPECT_EQ(a->generation(), 1u);
    EXPECT_EQ(FloatAt(w, 2), 3.0f) << tc.expect;
    EXPECT_EQ(static_cast<const unsigned char*>(a->Find("v")->data)[0], 1) << tc.expect;
    EXPECT_EQ(w->crc32c, crc);
    EXPECT_TRUE(a->Verify().ok()) << tc.expect;
    EXPECT_EQ(OpenFds(), fds_before + 2) << tc.expect << ": the refused fds were not closed";
  }
}

// Broken refresh replies: errors naming the problem, the old mapping untouched.
TEST(ClientRefreshTest, BadFdsOrRepliesKeepTheOldMapping) {
  struct Case {
    const char* expect;
    absl::StatusCode code;
    std::function<void(RefreshFake&, int, const std::string&)> answer;
  };
  const std::string arena = ArenaBytes(5);
  const std::string man = EncodeManifest(TwoTensorManifest(arena));
  const std::string reply2 = R"(,"unchanged":false)";
  const std::vector<Case> cases = {
      {"sent 0 arena fds", absl::StatusCode::kInternal,
       [&](RefreshFake& f, int sock, const std::string& id) {
         f.Send(sock, AttachReplyText(id, man.size(), 2, reply2), man, {});
       }},
      {"no manifest fd", absl::StatusCode::kInternal,
       [&](RefreshFake&, int sock, const std::string& id) {
         (void)SendPacket(sock, AttachReplyText(id, man.size(), 2, reply2));
       }},
      {"arena 0 memfd is not sealed", absl::StatusCode::kInternal,
       [&](RefreshFake& f, int sock, const std::string& id) {
         f.Send(sock, AttachReplyText(id, man.size(), 2, reply2), man, {arena}, F_SEAL_WRITE);
       }},
      {"arena 0 memfd has 4096 bytes; the manifest says 8192", absl::StatusCode::kInternal,
       [&](RefreshFake& f, int sock, const std::string& id) {
         f.Send(sock, AttachReplyText(id, man.size(), 2, reply2), man, {arena.substr(0, 4096)});
       }},
      {"weightd answered for lease 2", absl::StatusCode::kInternal,
       [&](RefreshFake& f, int sock, const std::string& id) {
         f.Send(sock, AttachReplyText(id, man.size(), 2, reply2, 2), man, {arena});
       }},
      {"announced", absl::StatusCode::kInternal,
       [&](RefreshFake& f, int sock, const std::string& id) {
         f.Send(sock, AttachReplyText(id, man.size() + 8, 2, reply2), man, {arena});
       }},
      {"not found here", absl::StatusCode::kNotFound,
       [&](RefreshFake&, int sock, const std::string& id) {
         (void)SendPacket(
             sock, absl::StrCat(R"({"ok":false,"id":)", id, R"(,"error":{"code":"NOT_FOUND",)",
                                R"("message":"not found here"}})"));
       }},
      {"refresh 'unchanged' is not true or false", absl::StatusCode::kInternal,
       [&](RefreshFake&, int sock, const std::string& id) {
         (void)SendPacket(
             sock, absl::StrCat(R"({"ok":true,"id":)", id, R"(,"result":{"unchanged":"yes"}})"));
       }},
      {"'unchanged' without an unsigned 'lease' and 'generation'", absl::StatusCode::kInternal,
       [&](RefreshFake&, int sock, const std::string& id) {
         (void)SendPacket(sock, absl::StrCat(R"({"ok":true,"id":)", id,
                                             R"(,"result":{"unchanged":true,"lease":1}})"));
       }},
  };
  for (const Case& tc : cases) {
    RefreshFake f;
    f.refresh = [&](int sock, const std::string& id) { tc.answer(f, sock, id); };
    auto c = Client::Connect(f.daemon.path());
    ASSERT_TRUE(c.ok()) << c.status();
    auto a = c->Attach("m", 0);
    ASSERT_TRUE(a.ok()) << a.status();
    const TensorView* w = a->Find("w");
    absl::StatusOr<bool> changed;
    EXPECT_NO_THROW(changed = a->Refresh()) << tc.expect;
    EXPECT_EQ(changed.status().code(), tc.code) << tc.expect << ": " << changed.status();
    EXPECT_THAT(std::string(changed.status().message()), HasSubstr(tc.expect));
    EXPECT_EQ(a->generation(), 1u);
    EXPECT_EQ(FloatAt(w, 1), 2.0f) << tc.expect;
    EXPECT_TRUE(a->Verify().ok()) << tc.expect;
  }
}

// A refresh reply's fds split over continuation packets are collected like an attach's.
TEST(ClientRefreshTest, ContinuationPacketsAreCollected) {
  constexpr int kArenas = 300;
  auto manifest = [](int seed) {
    Manifest m;
    m.model = "m";
    for (int i = 0; i < kArenas; ++i) {
      m.arenas.push_back({4096, ArenaKind::kHostMemfd});
      const unsigned char b = static_cast<unsigned char>(i + seed);
      m.tensors.push_back({"t" + std::to_string(i),
                           DType::kU8,
                           {1},
                           {1},
                           static_cast<uint32_t>(i),
                           0,
                           1,
                           Crc32c(&b, 1)});
    }
    return EncodeManifest(m);
  };
  auto send = [&](int sock, const std::string& id, int seed, const std::string& extra) {
    const std::string man = manifest(seed);
    std::vector<UniqueFd> owned;
    owned.push_back(Memfd(man, man.size(), kSeals));
    for (int i = 0; i < kArenas; ++i) {
      owned.push_back(Memfd(std::string(1, static_cast<char>(i + seed)), 4096, kSeals));
    }
    std::vector<int> first, rest;
    for (size_t i = 0; i < owned.size(); ++i) (i < 253 ? first : rest).push_back(owned[i].get());
    (void)SendPacket(
        sock,
        absl::StrCat(R"({"ok":true,"id":)", id, R"(,"result":{"lease":1,"generation":)", seed + 1,
                     R"(,"manifest_bytes":)", man.size(), R"(,"arenas":300,"fd_messages":1)", extra,
                     "}}"),
        first);
    (void)SendPacket(sock, absl::StrCat(R"({"ok":true,"id":)", id, R"(,"continuation":1})"), rest);
  };
  FakeDaemon d(
      [&](int sock) { send(sock, "2", 0, ""); },
      [&](int sock, const std::string& request, const std::string& id, std::vector<UniqueFd>&) {
        if (request.find("\"refresh\"") == std::string::npos) return false;
        send(sock, id, 1, R"(,"unchanged":false)");
        return true;
      });
  auto c = Client::Connect(d.path());
  ASSERT_TRUE(c.ok());
  auto a = c->Attach("m", 0);
  ASSERT_TRUE(a.ok()) << a.status();
  absl::StatusOr<bool> changed = a->Refresh();
  ASSERT_TRUE(changed.ok()) << changed.status();
  EXPECT_TRUE(*changed);
  EXPECT_EQ(a->generation(), 2u);
  for (int i : {0, 251, 252, 299}) {
    EXPECT_EQ(*static_cast<const unsigned char*>(a->Find("t" + std::to_string(i))->data),
              (i + 1) % 256)
        << i;
  }
  EXPECT_TRUE(a->Verify().ok()) << a->Verify();
}

TEST(ClientRefreshTest, AfterDetachIsFailedPrecondition) {
  RefreshFake f;
  f.refresh = [](int, const std::string&) { ADD_FAILURE() << "no refresh may be sent"; };
  auto c = Client::Connect(f.daemon.path());
  ASSERT_TRUE(c.ok());
  auto a = c->Attach("m", 0);
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(a->Detach().ok());
  EXPECT_EQ(a->Refresh().status().code(), absl::StatusCode::kFailedPrecondition);
}

// The update fake: checks the one fd an update carries like the daemon must (sealed, a
// safetensors file) and keeps what it parsed.
struct UpdateFake {
  std::vector<std::string> requests;
  std::vector<int> fd_counts;
  int seals = 0;
  std::string file;  // the memfd's bytes
  std::string reply_result = R"({"name":"m","generation":2,"state":"ready","seconds":0.25,)"
                             R"("bytes_read":64,"ranks_rewritten":1,"targets_rewritten":3,)"
                             R"("targets_copied":4,"segments_rewritten":2,)"
                             R"("bytes_allocated":4096,"bytes_copied":1024})";
  FakeDaemon daemon;

  UpdateFake()
      : daemon([](int) {},
               [this](int sock, const std::string& request, const std::string& id,
                      std::vector<UniqueFd>& fds) {
                 if (request.find("\"update\"") == std::string::npos) return false;
                 requests.push_back(request);
                 fd_counts.push_back(static_cast<int>(fds.size()));
                 if (fds.size() == 1) {
                   seals = ::fcntl(fds[0].get(), F_GET_SEALS);
                   struct stat st;
                   if (::fstat(fds[0].get(), &st) == 0) {
                     file.assign(static_cast<size_t>(st.st_size), '\0');
                     if (::pread(fds[0].get(), file.data(), file.size(), 0) != st.st_size) {
                       file = "short read";
                     }
                   }
                 }
                 (void)SendPacket(sock, absl::StrCat(R"({"ok":true,"id":)", id, R"(,"result":)",
                                                     reply_result, "}"));
                 return true;
               }) {}
};

// The tensors of the UpdateTensors tests: several dtypes, a 2-D one, a scalar, an empty one.
struct SampleTensors {
  float f32[6] = {1.5f, -2, 3, 4, 5, 6};
  uint16_t bf16[4] = {0x3f80, 0x4000, 0xc040, 0x0000};  // 1, 2, -3, 0
  int64_t i64[3] = {-1, 1LL << 40, 7};
  float scalar = 42;
  std::vector<UpdateTensor> tensors{
      {"model.layers.0.mlp.up_proj.weight", DType::kF32, {2, 3}, f32, sizeof(f32)},
      {"model.norm.weight", DType::kBF16, {4}, bf16, sizeof(bf16)},
      {"ids", DType::kI64, {3}, i64, sizeof(i64)},
      {"scale", DType::kF32, {}, &scalar, sizeof(scalar)},
      {"empty", DType::kU8, {0, 5}, nullptr, 0},
  };
};

// What weightd's own safetensors parser reads back from a written file, checked against `in`.
void ExpectSafetensorsHolds(const std::string& file, const std::vector<UpdateTensor>& in) {
  absl::StatusOr<SafetensorsFile> parsed = ParseSafetensorsBuffer(file, "update memfd");
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(parsed->data_offset % 8, 0u);
  EXPECT_EQ(parsed->file_size, file.size());
  ASSERT_EQ(parsed->header.tensors.size(), in.size());
  for (const UpdateTensor& t : in) {
    const TensorInfo* got = nullptr;
    for (const TensorInfo& i : parsed->header.tensors) {
      if (i.name == t.name) got = &i;
    }
    ASSERT_NE(got, nullptr) << t.name;
    EXPECT_EQ(got->dtype, t.dtype) << t.name;
    EXPECT_EQ(got->shape, t.shape) << t.name;
    ASSERT_EQ(got->nbytes(), t.nbytes) << t.name;
    EXPECT_EQ(file.substr(parsed->data_offset + got->begin, t.nbytes),
              std::string(static_cast<const char*>(t.data), t.nbytes))
        << t.name;
  }
}

TEST(ClientUpdateTest, SafetensorsMemfdParsesWithWeightdsParser) {
  SampleTensors s;
  absl::StatusOr<UniqueFd> fd = detail::WriteSafetensorsMemfd(s.tensors);
  ASSERT_TRUE(fd.ok()) << fd.status();
  EXPECT_EQ(::fcntl(fd->get(), F_GET_SEALS),
            F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL);
  EXPECT_EQ(::fcntl(fd->get(), F_GETFD) & FD_CLOEXEC, FD_CLOEXEC);
  struct stat st;
  ASSERT_EQ(::fstat(fd->get(), &st), 0);
  std::string file(static_cast<size_t>(st.st_size), '\0');
  ASSERT_EQ(::pread(fd->get(), file.data(), file.size(), 0), st.st_size);
  ExpectSafetensorsHolds(file, s.tensors);
  // The header is the JSON object padded with spaces; the tensors follow it back to back in
  // the given order.
  absl::StatusOr<SafetensorsFile> parsed = ParseSafetensorsBuffer(file, "update memfd");
  ASSERT_TRUE(parsed.ok());
  const std::string header = file.substr(8, parsed->data_offset - 8);
  EXPECT_EQ(header.substr(header.rfind('}') + 1).find_first_not_of(' '), std::string::npos);
  EXPECT_LT(header.size() - header.rfind('}'), 9u);
  uint64_t at = 0;
  for (const UpdateTensor& t : s.tensors) {
    for (const TensorInfo& i : parsed->header.tensors) {
      if (i.name == t.name) {
        EXPECT_EQ(i.begin, at) << t.name;
      }
    }
    at += t.nbytes;
  }
  // The file as a file: weightd's path-based reader (what the daemon's checkpoint code uses).
  absl::StatusOr<SafetensorsFile> by_path =
      ReadSafetensorsFile(absl::StrCat("/proc/self/fd/", fd->get()));
  ASSERT_TRUE(by_path.ok()) << by_path.status();
  EXPECT_EQ(by_path->header.tensors.size(), s.tensors.size());
  // The memory cannot be changed any more.
  EXPECT_EQ(::pwrite(fd->get(), "x", 1, 0), -1);
  EXPECT_EQ(::ftruncate(fd->get(), 1), -1);
  // No tensors: a valid empty file.
  fd = detail::WriteSafetensorsMemfd({});
  ASSERT_TRUE(fd.ok()) << fd.status();
  ASSERT_TRUE(ReadSafetensorsFile(absl::StrCat("/proc/self/fd/", fd->get())).ok());
}

TEST(ClientUpdateTest, UpdateTensorsSendsExactlyOneSealedSafetensorsMemfd) {
  UpdateFake f;
  auto c = Client::Connect(f.daemon.path());
  ASSERT_TRUE(c.ok()) << c.status();
  SampleTensors s;
  const int fds_before = OpenFds();
  absl::StatusOr<UpdateResult> r = c->UpdateTensors("m", s.tensors);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(OpenFds(), fds_before) << "the memfd (or its duplicate) leaked";
  EXPECT_EQ(r->generation, 2u);
  EXPECT_EQ(r->state, "ready");
  EXPECT_DOUBLE_EQ(r->seconds, 0.25);
  EXPECT_EQ(r->bytes_read, 64u);
  EXPECT_EQ(r->ranks_rewritten, 1u);
  EXPECT_EQ(r->targets_rewritten, 3u);
  EXPECT_EQ(r->targets_copied, 4u);
  EXPECT_EQ(r->segments_rewritten, 2u);
  EXPECT_EQ(r->bytes_allocated, 4096u);
  EXPECT_EQ(r->bytes_copied, 1024u);
  ASSERT_EQ(f.requests.size(), 1u);
  EXPECT_THAT(f.requests[0], HasSubstr(R"("wait":true)"));
  EXPECT_THAT(f.requests[0], HasSubstr(R"("name":"m")"));
  EXPECT_THAT(f.requests[0], ::testing::Not(HasSubstr("checkpoint")));
  EXPECT_EQ(f.fd_counts, std::vector<int>{1});
  EXPECT_EQ(f.seals, kSeals);
  ExpectSafetensorsHolds(f.file, s.tensors);
  EXPECT_EQ(UpdateResultToJson("m", *r),
            R"({"bytes_allocated":4096,"bytes_copied":1024,"bytes_read":64,"generation":2,)"
            R"("name":"m","ranks_rewritten":1,"seconds":0.25,"segments_rewritten":2,)"
            R"("state":"ready","targets_copied":4,"targets_rewritten":3})");
}

TEST(ClientUpdateTest, UpdateTensorsRefusesBadInputWithoutSending) {
  float x[4] = {};
  struct Case {
    std::vector<UpdateTensor> tensors;
    const char* expect;
  };
  const std::vector<Case> cases = {
      {{{"a", DType::kF32, {4}, x, 15}},
       "update tensor 0 'a': nbytes is 15 but its shape and dtype F32 make 16 bytes"},
      {{{"a", DType::kF32, {2}, x, 8}, {"a", DType::kF32, {2}, x, 8}},
       "update tensor 1 'a': the name appears twice"},
      {{{"", DType::kF32, {2}, x, 8}}, "update tensor 0 has an empty name"},
      {{{"a", DType::kF32, {-2}, x, 8}}, "update tensor 0 'a': dimension -2 is negative"},
      {{{"a", DType::kF32, {2}, nullptr, 8}}, "update tensor 0 'a': data is null"},
      {{{"__metadata__", DType::kU8, {1}, x, 1}}, "reserved by the safetensors format"},
      {{{"a\xff", DType::kU8, {1}, x, 1}}, "update tensor 0: the name is not UTF-8 text"},
      {{{"a", DType::kU8, {int64_t{1} << 40, int64_t{1} << 40}, x, 0}}, "the byte count overflows"},
  };
  UpdateFake f;
  auto c = Client::Connect(f.daemon.path());
  ASSERT_TRUE(c.ok()) << c.status();
  for (const Case& tc : cases) {
    absl::StatusOr<UpdateResult> r = c->UpdateTensors("m", tc.tensors);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << tc.expect;
    EXPECT_THAT(std::string(r.status().message()), HasSubstr(tc.expect));
    EXPECT_THAT(std::string(r.status().message()), HasSubstr("update of model 'm'"));
  }
  EXPECT_TRUE(f.requests.empty());
}

TEST(ClientUpdateTest, UpdateFromCheckpointAndFromFd) {
  UpdateFake f;
  f.reply_result = R"({"name":"m","generation":5,"state":"updating"})";
  auto c = Client::Connect(f.daemon.path());
  ASSERT_TRUE(c.ok()) << c.status();
  absl::StatusOr<UpdateResult> r = c->Update("m", "/models/new", /*wait=*/false);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->generation, 5u);
  EXPECT_EQ(r->state, "updating");
  EXPECT_EQ(r->bytes_read, 0u);
  EXPECT_EQ(r->seconds, 0);
  ASSERT_EQ(f.requests.size(), 1u);
  EXPECT_THAT(f.requests[0], HasSubstr(R"("checkpoint":"/models/new")"));
  EXPECT_THAT(f.requests[0], ::testing::Not(HasSubstr("wait")));
  EXPECT_EQ(f.fd_counts, std::vector<int>{0});

  EXPECT_EQ(c->Update("m", "").status().code(), absl::StatusCode::kInvalidArgument);

  // An fd the daemon could see change is refused before sending.
  UniqueFd unsealed = Memfd("x", 1, F_SEAL_WRITE);
  r = c->UpdateFromFd("m", unsealed.get());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(r.status().message()),
              HasSubstr("lacks the seals F_SEAL_SHRINK|F_SEAL_GROW"));
  int pipe_fds[2];
  ASSERT_EQ(::pipe2(pipe_fds, O_CLOEXEC), 0);
  r = c->UpdateFromFd("m", pipe_fds[0]);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("MFD_ALLOW_SEALING"));
  ::close(pipe_fds[0]);
  ::close(pipe_fds[1]);
  EXPECT_EQ(c->UpdateFromFd("m", -1).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(f.requests.size(), 1u);

  // A sealed one goes out as the request's one fd; the caller's fd stays open and its own.
  UniqueFd sealed = Memfd("safetensors bytes", 17, F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW);
  const int fds_before = OpenFds();
  r = c->UpdateFromFd("m", sealed.get(), /*wait=*/true);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(OpenFds(), fds_before);
  EXPECT_NE(::fcntl(sealed.get(), F_GETFD), -1);
  ASSERT_EQ(f.requests.size(), 2u);
  EXPECT_THAT(f.requests[1], HasSubstr(R"("wait":true)"));
  EXPECT_EQ(f.fd_counts[1], 1);
  EXPECT_EQ(f.file, "safetensors bytes");
}

// Requests as the fake saw them, answering each with `result`.
absl::Status CallWith(const std::string& op, const std::string& result,
                      const std::function<absl::Status(Client&)>& call,
                      std::vector<std::string>* requests = nullptr) {
  FakeDaemon d(
      [](int) {},
      [&](int sock, const std::string& request, const std::string& id, std::vector<UniqueFd>&) {
        if (request.find("\"" + op + "\"") == std::string::npos) return false;
        if (requests != nullptr) requests->push_back(request);
        (void)SendPacket(sock,
                         absl::StrCat(R"({"ok":true,"id":)", id, R"(,"result":)", result, "}"));
        return true;
      });
  absl::StatusOr<Client> c = Client::Connect(d.path());
  if (!c.ok()) return c.status();
  return call(*c);
}

TEST(ClientUpdateTest, WaitGenerationClampsTheTimeoutAndDecodes) {
  std::vector<std::string> requests;
  GenerationWait got;
  auto wait = [&](absl::Duration timeout) {
    return [&, timeout](Client& c) -> absl::Status {
      absl::StatusOr<GenerationWait> w = c.WaitGeneration("m", 3, timeout);
      if (w.ok()) got = *w;
      return w.status();
    };
  };
  const std::string result = R"({"name":"m","generation":4,"timed_out":false})";
  ASSERT_TRUE(CallWith("wait_generation", result, wait(absl::Hours(1)), &requests).ok());
  EXPECT_EQ(got.generation, 4u);
  EXPECT_FALSE(got.timed_out);
  ASSERT_TRUE(CallWith("wait_generation", R"({"name":"m","generation":3,"timed_out":true})",
                       wait(absl::Microseconds(10)), &requests)
                  .ok());
  EXPECT_EQ(got.generation, 3u);
  EXPECT_TRUE(got.timed_out);
  ASSERT_TRUE(CallWith("wait_generation", result, wait(-absl::Seconds(1)), &requests).ok());
  ASSERT_TRUE(CallWith("wait_generation", result, wait(absl::InfiniteDuration()), &requests).ok());
  ASSERT_EQ(requests.size(), 4u);
  EXPECT_THAT(requests[0], HasSubstr(R"("after":3)"));
  EXPECT_THAT(requests[0], HasSubstr(R"("timeout_ms":600000)"));
  EXPECT_THAT(requests[1], HasSubstr(R"("timeout_ms":1)"));
  EXPECT_THAT(requests[2], HasSubstr(R"("timeout_ms":0)"));
  EXPECT_THAT(requests[3], HasSubstr(R"("timeout_ms":600000)"));
}

TEST(ClientUpdateTest, RollbackDecodes) {
  RollbackResult got;
  ASSERT_TRUE(CallWith("rollback", R"({"name":"m","generation":6,"restored":4})",
                       [&](Client& c) -> absl::Status {
                         absl::StatusOr<RollbackResult> r = c.Rollback("m");
                         if (r.ok()) got = *r;
                         return r.status();
                       })
                  .ok());
  EXPECT_EQ(got.generation, 6u);
  EXPECT_EQ(got.restored, 4u);
}

TEST(ClientUpdateTest, MistypedGenerationRepliesAreErrorsNotExceptions) {
  struct Case {
    const char* op;
    const char* result;
    std::function<absl::Status(Client&)> call;
  };
  auto update = [](Client& c) { return c.Update("m", "/x").status(); };
  auto wait = [](Client& c) { return c.WaitGeneration("m", 0, absl::Seconds(1)).status(); };
  auto rollback = [](Client& c) { return c.Rollback("m").status(); };
  auto attach = [](Client& c) { return c.Attach("m", 0).status(); };
  const std::vector<Case> cases = {
      {"update", R"({"generation":"2","state":"ready"})", update},
      {"update", R"({"state":"ready"})", update},
      {"update", R"({"generation":2})", update},
      {"update", R"({"generation":-2,"state":"ready"})", update},
      {"update", R"({"generation":2,"state":"ready","bytes_read":-1})", update},
      {"update", R"({"generation":2,"state":"ready","targets_copied":1e300})", update},
      {"update", R"({"generation":2,"state":"ready","seconds":"1"})", update},
      {"wait_generation", R"({"generation":1})", wait},
      {"wait_generation", R"({"generation":1,"timed_out":"no"})", wait},
      {"wait_generation", R"({"generation":1.5,"timed_out":false})", wait},
      {"wait_generation", R"({"generation":418446744073709551615096,"timed_out":false})", wait},
      {"rollback", R"({"generation":2})", rollback},
      {"rollback", R"({"generation":2,"restored":1.5})", rollback},
      {"rollback", R"({"generation":null,"restored":1})", rollback},
      {"attach", R"({"lease":1,"manifest_bytes":80,"generation":"2"})", attach},
      {"attach", R"({"lease":1,"manifest_bytes":80,"generation":-1})", attach},
  };
  for (const Case& tc : cases) {
    absl::Status s;
    EXPECT_NO_THROW(s = CallWith(tc.op, tc.result, tc.call)) << tc.result;
    EXPECT_EQ(s.code(), absl::StatusCode::kInternal) << tc.op << " " << tc.result << ": " << s;
    EXPECT_THAT(std::string(s.message()), HasSubstr("malformed reply from weightd")) << tc.result;
  }
}

TEST(ClientUpdateTest, StatusDecodesGenerationsAndUpdateProgress) {
  std::vector<ModelInfo> got;
  auto status = [&](Client& c) -> absl::Status {
    absl::StatusOr<std::vector<ModelInfo>> m = c.Status();
    if (m.ok()) got = *m;
    return m.status();
  };
  ASSERT_TRUE(CallWith("status",
                       R"({"models":[{"name":"m","state":"ready","generation":3,)"
                       R"("previous_generation":2,"update":{"state":"running","generation":4,)"
                       R"("bytes_total":100,"bytes_done":40,"seconds":1.5},)"
                       R"("ranks":[{"rank":0,"arenas":3,"leases":[{"lease":9,"pid":1,"uid":2,)"
                       R"("generation":3}]}]},{"name":"old","state":"ready","update":null}]})",
                       status)
                  .ok());
  ASSERT_EQ(got.size(), 2u);
  EXPECT_EQ(got[0].generation, 3u);
  EXPECT_EQ(got[0].previous_generation, 2u);
  ASSERT_TRUE(got[0].update.has_value());
  EXPECT_EQ(got[0].update->state, "running");
  EXPECT_EQ(got[0].update->generation, 4u);
  EXPECT_EQ(got[0].update->bytes_total, 100u);
  EXPECT_EQ(got[0].update->bytes_done, 40u);
  EXPECT_DOUBLE_EQ(got[0].update->seconds, 1.5);
  ASSERT_EQ(got[0].ranks.size(), 1u);
  ASSERT_EQ(got[0].ranks[0].leases.size(), 1u);
  EXPECT_EQ(got[0].ranks[0].leases[0].generation, 3u);
  EXPECT_EQ(got[0].ranks[0].arenas, 3u);
  // An older daemon: no generations, no update.
  EXPECT_EQ(got[1].generation, 0u);
  EXPECT_EQ(got[1].previous_generation, 0u);
  EXPECT_FALSE(got[1].update.has_value());
  const std::string text = ModelsToJson(got);
  EXPECT_THAT(text, HasSubstr(R"("generation":3)"));
  EXPECT_THAT(text, HasSubstr(R"("previous_generation":2)"));
  EXPECT_THAT(text, HasSubstr(R"("update":{"bytes_done":40,"bytes_total":100,"generation":4,)"
                              R"("seconds":1.5,"state":"running"})"));
  EXPECT_THAT(text, HasSubstr(R"("generation":3,"lease":9)"));
  EXPECT_THAT(text, HasSubstr(R"("arenas":3)"));

  for (const char* models : {
           R"([{"name":"m","generation":-1}])",
           R"([{"name":"m","previous_generation":"2"}])",
           R"([{"name":"m","update":5}])",
           R"([{"name":"m","update":{"state":3}}])",
           R"([{"name":"m","update":{"bytes_done":-4}}])",
           R"([{"name":"m","update":{"error":[]}}])",
           R"([{"name":"m","ranks":[{"leases":[{"generation":"x"}]}]}])",
       }) {
    absl::Status s;
    EXPECT_NO_THROW(s = CallWith("status", absl::StrCat(R"({"models":)", models, "}"), status));
    EXPECT_EQ(s.code(), absl::StatusCode::kInternal) << models << ": " << s;
    EXPECT_THAT(std::string(s.message()), HasSubstr("wrong type or range")) << models;
  }
}

// CheckSameLayout directly: a manifest has its own layout; a CRC may differ; anything else not.
TEST(ClientRefreshTest, CheckSameLayoutComparesEverythingButTheCrcs) {
  const Manifest a = TwoTensorManifest(ArenaBytes(1));
  Manifest b = TwoTensorManifest(ArenaBytes(2));
  EXPECT_NE(a.tensors[0].crc32c, b.tensors[0].crc32c);
  EXPECT_TRUE(detail::CheckSameLayout(a, a, "m", 0).ok());
  EXPECT_TRUE(detail::CheckSameLayout(a, b, "m", 0).ok());
  const std::vector<std::pair<std::function<void(Manifest&)>, const char*>> changes = {
      {[](Manifest& m) { m.model = "n"; }, "the manifest is for model 'n' rank 0"},
      {[](Manifest& m) { m.rank = 1; }, "the manifest is for model 'm' rank 1"},
      {[](Manifest& m) {
         m.arenas.push_back({1, ArenaKind::kHostMemfd});
       },
       "2 arenas instead of 1"},
      {[](Manifest& m) { m.arenas[0].kind = ArenaKind::kCudaVmm; }, "arena 0 kind 1 instead of 0"},
      {[](Manifest& m) { m.tensors[1].strides = {2}; }, "tensor 'v' strides [2] instead of [1]"},
      {[](Manifest& m) { m.tensors[1].arena = 1; }, "tensor 'v' arena 1 instead of 0"},
      {[](Manifest& m) { m.tensors[1].nbytes = 9; }, "tensor 'v' nbytes 9 instead of 8"},
      {[](Manifest& m) { m.tensors.pop_back(); }, "1 tensors instead of 2"},
  };
  for (const auto& [change, expect] : changes) {
    Manifest c = b;
    change(c);
    const absl::Status s = detail::CheckSameLayout(a, c, "m", 0);
    EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << expect;
    EXPECT_THAT(std::string(s.message()), HasSubstr(expect));
    EXPECT_THAT(std::string(s.message()), HasSubstr("refresh of model 'm' rank 0"));
  }
}

#if WEIGHTD_HAVE_CUDA_DRIVER

// ---- Refresh of device arenas: the new allocation mapped at the same device address ----
// Runs on the driver WEIGHTD_CUDA_DRIVER names (ctest's sim:client_device_refresh sets the
// simulated one of tests/sim_cuda) or on a real GPU; skips without either. The test plays the
// daemon itself: VMM allocations exported as POSIX fds, like the cuda backend's arenas.

// One exported device allocation holding given bytes, as the daemon's cuda backend makes them.
// The export fd keeps the memory alive after this owner releases its handle and mapping.
class ExportedDeviceArena {
 public:
  ExportedDeviceArena(const CudaDriver& cu, CUdevice dev, size_t size, const std::string& bytes)
      : cu_(cu), size_(size) {
    CUmemAllocationProp prop{};
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id = dev;
    prop.requestedHandleTypes = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
    EXPECT_EQ(cu.MemCreate(&handle_, size, &prop, 0), CUDA_SUCCESS);
    EXPECT_EQ(cu.MemAddressReserve(&va_, size, 0, 0, 0), CUDA_SUCCESS);
    EXPECT_EQ(cu.MemMap(va_, size, 0, handle_, 0), CUDA_SUCCESS);
    CUmemAccessDesc access{};
    access.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    access.location.id = dev;
    access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    EXPECT_EQ(cu.MemSetAccess(va_, size, &access, 1), CUDA_SUCCESS);
    EXPECT_EQ(cu.MemcpyHtoD(va_, bytes.data(), bytes.size()), CUDA_SUCCESS);
    int fd = -1;
    EXPECT_EQ(
        cu.MemExportToShareableHandle(&fd, handle_, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0),
        CUDA_SUCCESS);
    fd_ = UniqueFd(fd);
  }
  ExportedDeviceArena(const ExportedDeviceArena&) = delete;
  ExportedDeviceArena& operator=(const ExportedDeviceArena&) = delete;
  ~ExportedDeviceArena() {
    (void)cu_.MemUnmap(va_, size_);
    (void)cu_.MemAddressFree(va_, size_);
    (void)cu_.MemRelease(handle_);
  }
  int fd() const { return fd_.get(); }

 private:
  const CudaDriver& cu_;
  size_t size_;
  CUmemGenericAllocationHandle handle_ = 0;
  CUdeviceptr va_ = 0;
  UniqueFd fd_;
};

class ClientDeviceRefreshTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<const CudaDriver*> cu = CudaDriver::Get();
    if (!cu.ok()) GTEST_SKIP() << "no CUDA driver: " << cu.status();
    cu_ = *cu;
    absl::StatusOr<CudaPrimaryContext> ctx = CudaPrimaryContext::Retain(*cu_, 0);
    ASSERT_TRUE(ctx.ok()) << ctx.status();
    ctx_ = *std::move(ctx);
    guard_.emplace(*cu_);
    ASSERT_TRUE(guard_->Use(ctx_.get()).ok());
    ASSERT_EQ(cu_->DeviceGet(&dev_, 0), CUDA_SUCCESS);
    CUuuid u{};
    ASSERT_EQ(cu_->DeviceGetUuid(&u, dev_), CUDA_SUCCESS);
    static constexpr char kHex[] = "0123456789abcdef";
    for (const char c : u.bytes) {
      uuid_.push_back(kHex[static_cast<unsigned char>(c) >> 4]);
      uuid_.push_back(kHex[static_cast<unsigned char>(c) & 15]);
    }
    CUmemAllocationProp prop{};
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id = dev_;
    prop.requestedHandleTypes = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
    ASSERT_EQ(cu_->MemGetAllocationGranularity(&gran_, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM),
              CUDA_SUCCESS);
  }
  void TearDown() override {
    arenas_.clear();
    guard_.reset();
  }

  // `n` device arenas of 4096 bytes (the allocation rounded up to the granularity), arena i
  // holding tensor "t<i>", F32 [4] = {seed + i, ...}.
  static std::string TensorBytes(int seed, int i) {
    const float v[4] = {float(seed + i), float(seed + i) + 0.5f, float(seed + i) + 1, -1};
    return std::string(reinterpret_cast<const char*>(v), sizeof(v));
  }
  static std::string DeviceManifestOf(int n, int seed) {
    Manifest m;
    m.model = "m";
    m.device = 0;
    for (int i = 0; i < n; ++i) {
      const std::string b = TensorBytes(seed, i);
      m.arenas.push_back({4096, ArenaKind::kCudaVmm});
      m.tensors.push_back({"t" + std::to_string(i),
                           DType::kF32,
                           {4},
                           {1},
                           static_cast<uint32_t>(i),
                           0,
                           16,
                           Crc32c(b.data(), 16)});
    }
    return EncodeManifest(m);
  }
  // The reply and fds of generation `gen` (seed `gen * 10`); arena `bad` (if >= 0) is a plain
  // memfd the driver cannot import instead of an exported allocation.
  void SendDeviceGeneration(int sock, const std::string& id, int n, uint64_t gen, int bad = -1) {
    // The fake daemon's thread allocates: the driver calls need the context current there too.
    CudaContextGuard guard(*cu_);
    EXPECT_TRUE(guard.Use(ctx_.get()).ok());
    const int seed = static_cast<int>(gen) * 10;
    const std::string man = DeviceManifestOf(n, seed);
    std::string info;
    for (int i = 0; i < n; ++i) {
      absl::StrAppend(&info, i ? "," : "", R"({"kind":"cuda","device_uuid":")", uuid_, R"("})");
    }
    kept_.push_back(Memfd(man, man.size(), kSeals));
    std::vector<int> fds = {kept_.back().get()};
    for (int i = 0; i < n; ++i) {
      if (i == bad) {
        kept_.push_back(Memfd("", gran_, kSeals));
        fds.push_back(kept_.back().get());
        continue;
      }
      arenas_.push_back(
          std::make_unique<ExportedDeviceArena>(*cu_, dev_, gran_, TensorBytes(seed, i)));
      fds.push_back(arenas_.back()->fd());
    }
    (void)SendPacket(
        sock,
        AttachReplyText(id, man.size(), gen,
                        absl::StrCat(R"(,"unchanged":false,"arena_info":[)", info, "]")),
        fds);
  }
  std::string ReadTensor(const Attachment& a, int i) {
    std::string out(16, '\0');
    const TensorView* t = a.Find("t" + std::to_string(i));
    if (t == nullptr) return "no tensor";
    const absl::Status s = a.Read(*t, 0, out.data(), 16);
    return s.ok() ? out : std::string(s.message());
  }

  const CudaDriver* cu_ = nullptr;
  CudaPrimaryContext ctx_;
  std::optional<CudaContextGuard> guard_;
  CUdevice dev_ = 0;
  std::string uuid_;
  size_t gran_ = 0;
  std::vector<std::unique_ptr<ExportedDeviceArena>> arenas_;
  std::vector<UniqueFd> kept_;
};

TEST_F(ClientDeviceRefreshTest, RemapsAtTheSameDeviceAddress) {
  int refresh_gen = 2, bad = -1;
  FakeDaemon d(
      [&](int sock) { SendDeviceGeneration(sock, "2", 1, 1); },
      [&](int sock, const std::string& request, const std::string& id, std::vector<UniqueFd>&) {
        if (request.find("\"refresh\"") == std::string::npos) return false;
        SendDeviceGeneration(sock, id, 1, refresh_gen, bad);
        return true;
      });
  auto c = Client::Connect(d.path());
  ASSERT_TRUE(c.ok()) << c.status();
  auto a = c->Attach("m", 0);
  ASSERT_TRUE(a.ok()) << a.status();
  const TensorView* t = a->Find("t0");
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(t->device, 0);
  const void* va = t->data;
  EXPECT_EQ(ReadTensor(*a, 0), TensorBytes(10, 0));

  absl::StatusOr<bool> changed = a->Refresh();
  ASSERT_TRUE(changed.ok()) << changed.status();
  EXPECT_TRUE(*changed);
  EXPECT_EQ(a->generation(), 2u);
  EXPECT_EQ(a->Find("t0"), t);
  EXPECT_EQ(t->data, va);
  EXPECT_EQ(ReadTensor(*a, 0), TensorBytes(20, 0));
  EXPECT_EQ(t->crc32c, Crc32c(TensorBytes(20, 0).data(), 16));
  EXPECT_TRUE(a->Verify().ok()) << a->Verify();
  // Through the driver at the same address, not only through the attachment's own mapping.
  float first = 0;
  ASSERT_EQ(cu_->MemcpyDtoH(&first, reinterpret_cast<CUdeviceptr>(va), sizeof(first)),
            CUDA_SUCCESS);
  EXPECT_EQ(first, 20.0f);

  // A new arena the driver cannot import: the error names the arena, generation 2 stays mapped.
  refresh_gen = 3;
  bad = 0;
  changed = a->Refresh();
  EXPECT_FALSE(changed.ok());
  EXPECT_THAT(std::string(changed.status().message()),
              HasSubstr("refresh of model 'm' rank 0 (lease 1): arena 0 (GPU memory): "
                        "cuMemImportFromShareableHandle failed"));
  EXPECT_EQ(a->generation(), 2u);
  EXPECT_EQ(t->data, va);
  EXPECT_EQ(ReadTensor(*a, 0), TensorBytes(20, 0));
  EXPECT_TRUE(a->Verify().ok()) << a->Verify();
}

// Arena 1 of 3 fails after arena 0 was already replaced: arena 0 gets its old memory back, so
// the attachment maps generation 1 whole, never a mix.
TEST_F(ClientDeviceRefreshTest, AFailedArenaPutsTheReplacedOnesBack) {
  FakeDaemon d(
      [&](int sock) { SendDeviceGeneration(sock, "2", 3, 1); },
      [&](int sock, const std::string& request, const std::string& id, std::vector<UniqueFd>&) {
        if (request.find("\"refresh\"") == std::string::npos) return false;
        SendDeviceGeneration(sock, id, 3, 2, /*bad=*/1);
        return true;
      });
  auto c = Client::Connect(d.path());
  ASSERT_TRUE(c.ok()) << c.status();
  auto a = c->Attach("m", 0);
  ASSERT_TRUE(a.ok()) << a.status();
  std::vector<const void*> vas;
  for (const TensorView& t : a->tensors()) vas.push_back(t.data);
  absl::StatusOr<bool> changed = a->Refresh();
  EXPECT_FALSE(changed.ok());
  EXPECT_THAT(std::string(changed.status().message()), HasSubstr("arena 1 (GPU memory)"));
  EXPECT_THAT(std::string(changed.status().message()), ::testing::Not(HasSubstr("restoring")));
  EXPECT_EQ(a->generation(), 1u);
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(a->tensors()[i].data, vas[i]) << i;
    EXPECT_EQ(ReadTensor(*a, i), TensorBytes(10, i)) << i;
  }
  EXPECT_TRUE(a->Verify().ok()) << a->Verify();
}

// cuMemMap failing after cuMemUnmap, through the simulated driver's WDSIM_FAIL: the 4th cuMemMap
// of the process is the client's map of the new memory (1: the fake's generation 1, 2: the
// client's attach, 3: the fake's generation 2). The ctest entries sim:client_device_refresh_*
// set it; elsewhere these tests skip.
class ClientDeviceRemapFailureTest : public ClientDeviceRefreshTest {
 protected:
  // `out` must die before the fixture: its connection keeps the fake daemon's thread serving.
  absl::Status AttachAndRefresh(std::optional<Attachment>* out) {
    daemon_ = std::make_unique<FakeDaemon>(
        [&](int sock) { SendDeviceGeneration(sock, "2", 1, 1); },
        [&](int sock, const std::string& request, const std::string& id, std::vector<UniqueFd>&) {
          if (request.find("\"refresh\"") == std::string::npos) return false;
          SendDeviceGeneration(sock, id, 1, 2);
          return true;
        });
    auto c = Client::Connect(daemon_->path());
    if (!c.ok()) return c.status();
    auto a = c->Attach("m", 0);
    if (!a.ok()) return a.status();
    out->emplace(*std::move(a));
    return (*out)->Refresh().status();
  }
  static bool FailSet(const char* value) {
    const char* env = std::getenv("WDSIM_FAIL");
    return env != nullptr && std::string(env) == value;
  }
  std::unique_ptr<FakeDaemon> daemon_;
};

TEST_F(ClientDeviceRemapFailureTest, MapFailsAndTheOldMemoryIsMappedBack) {
  if (!FailSet("cuMemMap:4:CUDA_ERROR_OUT_OF_MEMORY")) {
    GTEST_SKIP()
        << "needs the simulated driver with WDSIM_FAIL=cuMemMap:4:CUDA_ERROR_OUT_OF_MEMORY";
  }
  std::optional<Attachment> a;
  const absl::Status s = AttachAndRefresh(&a);
  ASSERT_TRUE(a.has_value()) << s;
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("arena 0 (GPU memory): cuMemMap failed"));
  EXPECT_THAT(std::string(s.message()), ::testing::Not(HasSubstr("back failed")));
  EXPECT_EQ(a->generation(), 1u);
  EXPECT_EQ(ReadTensor(*a, 0), TensorBytes(10, 0));
  EXPECT_TRUE(a->Verify().ok()) << a->Verify();
}

TEST_F(ClientDeviceRemapFailureTest, MapAndRestoreFailAndTheRangeIsReportedUnmapped) {
  if (!FailSet("cuMemMap:4:CUDA_ERROR_OUT_OF_MEMORY,cuMemMap:5:CUDA_ERROR_OUT_OF_MEMORY")) {
    GTEST_SKIP() << "needs the simulated driver with WDSIM_FAIL=cuMemMap:4:...,cuMemMap:5:...";
  }
  std::optional<Attachment> a;
  const absl::Status s = AttachAndRefresh(&a);
  ASSERT_TRUE(a.has_value()) << s;
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
  EXPECT_THAT(std::string(s.message()),
              HasSubstr("mapping the old memory back failed too, the range is unmapped"));
  EXPECT_EQ(a->generation(), 1u);
  // Defined, not silent: reads fail saying why, another refresh is refused, detach works.
  EXPECT_THAT(ReadTensor(*a, 0), HasSubstr("unmapped"));
  EXPECT_FALSE(a->Verify().ok());
  EXPECT_THAT(std::string(a->Refresh().status().message()), HasSubstr("unmapped"));
  EXPECT_TRUE(a->Detach().ok());
}

#endif  // WEIGHTD_HAVE_CUDA_DRIVER

}  // namespace
}  // namespace weightd
