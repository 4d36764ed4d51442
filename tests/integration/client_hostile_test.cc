// The C++ client against a fake daemon that lies: unsealed or resizable memfds, manifests that
// do not parse, fd counts and sizes that disagree with the manifest. Every case must end in an
// error naming the problem, never in a crash, a SIGBUS or a pointer outside a mapping.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>
#include <functional>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "weightd/client.h"
#include "weightd/manifest.h"
#include "weightd/seqpacket.h"

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
// id)`, when given, sees every request first and returns true when it answered it.
class FakeDaemon {
 public:
  using Custom = std::function<bool(int, const std::string&, const std::string&)>;
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
      if (custom_ && custom_(c.get(), d, id)) continue;
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
  FakeDaemon d([](int) {},
               [&](int sock, const std::string& request, const std::string& id) {
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

}  // namespace
}  // namespace weightd
