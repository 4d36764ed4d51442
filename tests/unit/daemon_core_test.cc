// Unit tests of weightd::daemon_core: config parsing, host backend, executor, registry states.
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <set>
#include <sstream>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "daemon_test_util.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "weightd/checkpoint.h"
#include "weightd/config.h"
#include "weightd/crc32c.h"
#include "weightd/detail/metrics_text.h"
#include "weightd/detail/page_cache.h"
#include "weightd/detail/work_units.h"
#include "weightd/executor.h"
#include "weightd/file_util.h"
#include "weightd/handoff.h"
#include "weightd/host_backend.h"
#include "weightd/kernels/copy.h"
#include "weightd/log.h"
#include "weightd/manifest.h"
#include "weightd/plan.h"
#include "weightd/registry.h"
#include "weightd/segment_plan.h"
#ifdef WEIGHTD_HAVE_CUDA_BACKEND
#include "weightd/cuda_backend.h"
#endif

namespace weightd {
namespace {

using testing::FakeTensor;
using ::testing::HasSubstr;
using ::testing::Not;
using testing::RandomTensor;
using testing::TempDir;
using testing::WriteSafetensors;

// How many of this process's mappings (/proc/self/maps) name `what` (a memfd's name).
size_t MappingsOf(absl::string_view what) {
  std::ifstream maps("/proc/self/maps");
  size_t n = 0;
  for (std::string line; std::getline(maps, line);) n += absl::StrContains(line, what) ? 1 : 0;
  return n;
}

TEST(ConfigTest, DefaultsAndEveryKey) {
  auto c = ParseConfig("{}", "t.json");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->backend, "auto");
  EXPECT_EQ(c->pinned_budget, 1ull << 30);
  EXPECT_EQ(c->max_connections, 1024);
  EXPECT_EQ(c->max_connections_per_uid, 256);
  EXPECT_EQ(c->max_leases_per_connection, 4096);
  EXPECT_EQ(c->max_request_bytes, 65536u);
  EXPECT_EQ(c->socket_mode, 0660u);
  EXPECT_TRUE(c->warnings.empty());
  c = ParseConfig(R"({"socket":"/tmp/s","backend":"host","pinned_budget":"2GiB",
      "allow_uids":[1000],"allow_gids":[27],"model_roots":["/models"],"max_connections":10,
      "max_request_bytes":4096,"hello_timeout_ms":500,"io_threads":2,"log_level":"debug",
      "host_prefault":false,"socket_mode":"0600","max_connections_per_uid":3,"max_leases_per_connection":5,
      "preload":[{"name":"llama","checkpoint":"/models/l","tp":2,"allow_uids":[7]}]})",
                  "t.json");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->socket, "/tmp/s");
  EXPECT_EQ(c->pinned_budget, 2ull << 30);
  EXPECT_EQ(c->allow_uids, std::vector<uint32_t>{1000});
  EXPECT_EQ(c->allow_gids, std::vector<uint32_t>{27});
  EXPECT_EQ(c->model_roots, std::vector<std::string>{"/models"});
  EXPECT_EQ(c->max_connections, 10);
  EXPECT_EQ(c->max_connections_per_uid, 3);
  EXPECT_EQ(c->max_leases_per_connection, 5);
  EXPECT_EQ(c->hello_timeout_ms, 500);
  EXPECT_EQ(c->socket_mode, 0600u);
  // The obsolete key still loads, with a warning naming it and the file.
  ASSERT_EQ(c->warnings.size(), 1u);
  EXPECT_THAT(c->warnings[0], HasSubstr("t.json: key 'host_prefault' is obsolete and ignored"));
  ASSERT_EQ(c->preload.size(), 1u);
  EXPECT_EQ(c->preload[0].name, "llama");
  EXPECT_EQ(c->preload[0].spec.tp, 2);
  EXPECT_EQ(*c->preload[0].spec.allow_uids, std::vector<uint32_t>{7});
}

void ExpectConfigError(const std::string& json, const std::string& substr) {
  auto c = ParseConfig(json, "weightd.json");
  ASSERT_FALSE(c.ok()) << json;
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(c.status().message()), HasSubstr(substr)) << c.status();
  EXPECT_THAT(std::string(c.status().message()), HasSubstr("weightd.json"));
}

TEST(ConfigTest, Errors) {
  ExpectConfigError("{", "not valid JSON");
  ExpectConfigError(R"({"sockit":"/x"})", "unknown key 'sockit'");
  ExpectConfigError(R"({"backend":"gpu"})", "'backend'");
  ExpectConfigError(R"({"pinned_budget":"lots"})", "not a byte count");
  ExpectConfigError(R"({"pinned_budget":10})", "at least 1 MiB");
  ExpectConfigError(R"({"allow_uids":["root"]})", "'allow_uids'");
  ExpectConfigError(R"({"host_prefault":"yes"})", "'host_prefault'");
  ExpectConfigError(R"({"max_connections":0})", "'max_connections'");
  ExpectConfigError(R"({"max_connections_per_uid":0})", "'max_connections_per_uid'");
  ExpectConfigError(R"({"max_leases_per_connection":-1})", "'max_leases_per_connection'");
  ExpectConfigError(R"({"socket_mode":"0999"})", "'socket_mode'");
  ExpectConfigError(R"({"log_level":"loud"})", "'log_level'");
  ExpectConfigError(R"({"preload":[{"checkpoint":"/x"}]})", "preload[0]");
  ExpectConfigError(R"({"preload":[{"name":"a"}]})", "'checkpoint'");
  ExpectConfigError(R"({"preload":[{"name":"a","checkpoint":"/x","tpp":2}]})", "'tpp'");
}

TEST(ConfigTest, ByteSizes) {
  EXPECT_EQ(*ParseByteSize("123", "x"), 123u);
  EXPECT_EQ(*ParseByteSize("1k", "x"), 1000u);
  EXPECT_EQ(*ParseByteSize("1MiB", "x"), 1u << 20);
  EXPECT_EQ(*ParseByteSize("3G", "x"), 3000000000u);
  EXPECT_FALSE(ParseByteSize("1XB", "x").ok());
  EXPECT_FALSE(ParseByteSize("99999999999999999999", "x").ok());
  EXPECT_FALSE(ParseByteSize("100000000000TiB", "x").ok());
}

TEST(HostBackendTest, SealedArenaRefusesWrites) {
  HostBackend b;
  auto a = b.Allocate({8192, -1, "t/rank0"});
  ASSERT_TRUE(a.ok()) << a.status();
  std::span<std::byte> w = (*a)->writable();
  ASSERT_EQ(w.size(), 8192u);
  w[100] = std::byte{42};
  EXPECT_FALSE((*a)->Export().ok());  // not before Seal
  ASSERT_TRUE((*a)->Seal().ok());
  EXPECT_TRUE((*a)->writable().empty());
  ASSERT_EQ((*a)->readable().size(), 8192u);
  EXPECT_EQ((*a)->readable()[100], std::byte{42});
  auto fd = (*a)->Export();
  ASSERT_TRUE(fd.ok());
  EXPECT_EQ(::mmap(nullptr, 8192, PROT_READ | PROT_WRITE, MAP_SHARED, fd->get(), 0), MAP_FAILED);
  EXPECT_EQ(errno, EPERM);
  EXPECT_EQ(::ftruncate(fd->get(), 10), -1);
  EXPECT_EQ(::pwrite(fd->get(), "x", 1, 0), -1);
  void* p = ::mmap(nullptr, 8192, PROT_READ, MAP_SHARED, fd->get(), 0);
  ASSERT_NE(p, MAP_FAILED);
  EXPECT_EQ(static_cast<const uint8_t*>(p)[100], 42);
  ::munmap(p, 8192);
}

bool DeviceAvailable() {
#ifdef WEIGHTD_HAVE_CUDA_BACKEND
  return CudaDeviceAvailable();
#else
  return false;
#endif
}

TEST(HostBackendTest, MakeBackend) {
  std::string why;
  auto host = MakeBackend("host", {}, &why);
  ASSERT_TRUE(host.ok()) << host.status();
  EXPECT_EQ((*host)->name(), "host");
  EXPECT_THAT(why, HasSubstr("asked for"));
  EXPECT_EQ(MakeBackend("tpu").status().code(), absl::StatusCode::kInvalidArgument);
}

// auto is cuda exactly when a device is present (a real or simulated driver), and says why.
TEST(HostBackendTest, MakeBackendAutoFollowsTheDevice) {
  std::string why;
  auto b = MakeBackend("auto", {}, &why);
  ASSERT_TRUE(b.ok()) << b.status();
  auto cuda = MakeBackend("cuda");
  if (DeviceAvailable()) {
    EXPECT_EQ((*b)->name(), "cuda");
    EXPECT_THAT(why, HasSubstr("auto found"));
    EXPECT_TRUE(cuda.ok()) << cuda.status();
  } else {
    EXPECT_EQ((*b)->name(), "host");
    EXPECT_EQ((*b)->arena_kind(), ArenaKind::kHostMemfd);
    EXPECT_THAT(why, HasSubstr("backend host: auto"));
    EXPECT_EQ(cuda.status().code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_THAT(std::string(cuda.status().message()), HasSubstr("backend 'cuda' is not available"));
  }
}

TEST(ConfigTest, DeviceMemoryBudget) {
  EXPECT_EQ(ParseConfig("{}", "t.json")->device_memory_budget, 0u);
  EXPECT_EQ(ParseConfig(R"({"device_memory_budget":"40GiB"})", "t.json")->device_memory_budget,
            40ull << 30);
  EXPECT_EQ(ParseConfig(R"({"device_memory_budget":123})", "t.json")->device_memory_budget, 123u);
  ExpectConfigError(R"({"device_memory_budget":"much"})", "device_memory_budget");
  ExpectConfigError(R"({"device_memory_budget":-1})", "'device_memory_budget'");
  ExpectConfigError(R"({"device_memory_budet":1})", "device_memory_budget");  // in the known list
}

TEST(ConfigTest, HostMemoryBudget) {
  EXPECT_EQ(ParseConfig("{}", "t.json")->host_memory_budget, 0u);
  EXPECT_EQ(ParseConfig(R"({"host_memory_budget":"64GiB"})", "t.json")->host_memory_budget,
            64ull << 30);
  ExpectConfigError(R"({"host_memory_budget":"lots"})", "host_memory_budget");
  ExpectConfigError(R"({"host_memory_budget":-5})", "'host_memory_budget'");
}

// A fake /proc and cgroup tree for host-memory admission.
class HostMemoryTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/wd_hostmem_XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    src_.meminfo = dir_ + "/meminfo";
    src_.self_cgroup = dir_ + "/cgroup";
    src_.cgroup_root = dir_ + "/sys";
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  void Write(const std::string& rel, const std::string& text) {
    const std::filesystem::path p = dir_ + "/" + rel;
    std::filesystem::create_directories(p.parent_path());
    std::ofstream(p) << text;
  }
  std::string dir_;
  HostMemorySources src_;
};

TEST_F(HostMemoryTest, MemAvailableAndTheTightestCgroupV2Ancestor) {
  Write("meminfo", "MemTotal:  99999 kB\nMemFree: 5 kB\nMemAvailable:    1048576 kB\n");
  Write("cgroup", "0::/a/b\n");
  Write("sys/memory.max", "max\n");  // the namespace's root: no limit
  Write("sys/memory.current", "123\n");
  Write("sys/a/memory.max", "3000000000\n");
  Write("sys/a/memory.current", "1000000000\n");
  Write("sys/a/b/memory.max", "max\n");
  Write("sys/a/b/memory.current", "5\n");
  HostMemoryState st = ReadHostMemory(src_);
  ASSERT_TRUE(st.mem_available.has_value());
  EXPECT_EQ(*st.mem_available, 1ull << 30);
  ASSERT_TRUE(st.cgroup_left.has_value());
  EXPECT_EQ(*st.cgroup_left, 2000000000u);
  EXPECT_EQ(st.cgroup, dir_ + "/sys/a");
  // The leaf's own limit, tighter still.
  Write("sys/a/b/memory.max", "1000\n");
  st = ReadHostMemory(src_);
  EXPECT_EQ(*st.cgroup_left, 995u);
  EXPECT_EQ(st.cgroup, dir_ + "/sys/a/b");
  // Usage over the limit leaves nothing, not a wrapped-around huge number.
  Write("sys/a/b/memory.current", "5000\n");
  EXPECT_EQ(*ReadHostMemory(src_).cgroup_left, 0u);
}

TEST_F(HostMemoryTest, CgroupV1AndMissingFiles) {
  Write("cgroup", "7:cpu,cpuacct:/x\n5:memory:/x\n");
  Write("sys/memory/memory.limit_in_bytes", "500\n");
  Write("sys/memory/memory.usage_in_bytes", "100\n");
  Write("sys/memory/x/memory.limit_in_bytes", "9223372036854771712\n");  // v1's "no limit"
  Write("sys/memory/x/memory.usage_in_bytes", "90\n");
  HostMemoryState st = ReadHostMemory(src_);
  EXPECT_FALSE(st.mem_available.has_value()) << "no meminfo file was written";
  ASSERT_TRUE(st.cgroup_left.has_value());
  EXPECT_EQ(*st.cgroup_left, 400u);
  // Nothing readable: no limits, and admission falls back to the budget alone.
  HostMemorySources none{dir_ + "/no", dir_ + "/no", dir_ + "/no"};
  st = ReadHostMemory(none);
  EXPECT_FALSE(st.mem_available.has_value());
  EXPECT_FALSE(st.cgroup_left.has_value());
}

TEST_F(HostMemoryTest, AdmissionAgainstTheBudgetCountsHeldArenas) {
  Write("meminfo", "MemAvailable: 1073741824 kB\n");  // 1 TiB: the budget decides
  HostBackend b(10 << 20, src_);
  const ArenaRequest eight{8 << 20, -1, "m/rank0"};
  ASSERT_TRUE(b.Admit("m", {&eight, 1}).ok());
  auto a = b.Allocate(eight);
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(b.held_bytes(), 8u << 20);
  const ArenaRequest four{4 << 20, -1, "n/rank0"};
  const absl::Status s = b.Admit("n", {&four, 1});
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("model 'n' needs 4194304 bytes"));
  EXPECT_THAT(std::string(s.message()), HasSubstr("2097152 bytes"));  // what is left
  EXPECT_THAT(std::string(s.message()), HasSubstr("host_memory_budget"));
  a->reset();
  EXPECT_EQ(b.held_bytes(), 0u);
  EXPECT_TRUE(b.Admit("n", {&four, 1}).ok());
}

TEST_F(HostMemoryTest, ArenasStillBeingFilledCountAgainstMemAvailable) {
  Write("meminfo", "MemAvailable: 102400 kB\n");  // 100 MiB
  HostBackend b(0, src_);
  auto a = b.Allocate({80 << 20, -1, "m/rank0"});
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(b.pending_bytes(), 80u << 20);  // ftruncate'd, nothing resident yet
  const ArenaRequest thirty{30 << 20, -1, "n/rank0"};
  const absl::Status s = b.Admit("n", {&thirty, 1});
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("still being filled"));
  EXPECT_THAT(std::string(s.message()), HasSubstr("MemAvailable"));
  // Once filled, the kernel's figure (here: fixed) is what counts.
  std::span<std::byte> w = (*a)->writable();
  std::memset(w.data(), 1, w.size());
  EXPECT_EQ(b.pending_bytes(), 0u);
  EXPECT_TRUE(b.Admit("n", {&thirty, 1}).ok());
  ASSERT_TRUE((*a)->Seal().ok());
  EXPECT_EQ(b.pending_bytes(), 0u);
}

// A sealed host arena, as an earlier daemon would have handed it over.
UniqueFd ExportedHostArena(uint64_t bytes, uint8_t fill) {
  HostBackend b;
  auto a = b.Allocate({bytes, -1, "old/rank0"});
  EXPECT_TRUE(a.ok()) << a.status();
  std::memset((*a)->writable().data(), fill, bytes);
  EXPECT_TRUE((*a)->Seal().ok());
  auto fd = (*a)->Export();
  EXPECT_TRUE(fd.ok()) << fd.status();
  return std::move(*fd);
}

AdoptRequest HostRequest(uint64_t bytes) {
  AdoptRequest r;
  r.bytes = bytes;
  r.kind = ArenaKind::kHostMemfd;
  r.label = "llama/rank1";
  return r;
}

TEST(HostBackendTest, AdoptsASealedArenaOfTheRecordedSize) {
  HostBackend b;
  auto a = b.Adopt(ExportedHostArena(8192, 7), HostRequest(8192));
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ((*a)->kind(), ArenaKind::kHostMemfd);
  ASSERT_EQ((*a)->readable().size(), 8192u);
  EXPECT_EQ((*a)->readable()[8191], std::byte{7});
  EXPECT_TRUE((*a)->Export().ok());
  auto wrong = b.Adopt(ExportedHostArena(8192, 7), HostRequest(4096));
  EXPECT_EQ(wrong.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(wrong.status().message()), HasSubstr("llama/rank1 has 8192 bytes"));
}

// A device arena offered to the host backend, by its record or by its fd, is refused with a
// message naming both kinds and the backend that adopts it.
TEST(HostBackendTest, AdoptRefusesDeviceArenasNamingBothKinds) {
  HostBackend b;
  AdoptRequest device = HostRequest(8192);
  device.kind = ArenaKind::kCudaVmm;
  device.device = 0;
  device.device_uuid = "GPU-01234567-89ab-cdef-0123-456789abcdef";
  auto by_record = b.Adopt(ExportedHostArena(8192, 1), device);
  ASSERT_EQ(by_record.status().code(), absl::StatusCode::kFailedPrecondition);
  const std::string m1(by_record.status().message());
  EXPECT_THAT(m1, HasSubstr("arena llama/rank1 is CUDA VMM device memory"));
  EXPECT_THAT(m1, HasSubstr("backend 'host' keeps its arenas in a host memfd"));
  EXPECT_THAT(m1, HasSubstr("--backend cuda"));
  // A device fd is no memfd; a pipe stands in for one (F_GET_SEALS fails the same way).
  int p[2];
  ASSERT_EQ(::pipe2(p, O_CLOEXEC), 0);
  UniqueFd keep(p[1]);
  auto by_fd = b.Adopt(UniqueFd(p[0]), HostRequest(8192));
  ASSERT_EQ(by_fd.status().code(), absl::StatusCode::kFailedPrecondition);
  const std::string m2(by_fd.status().message());
  EXPECT_THAT(m2, HasSubstr("arena llama/rank1 is not a memfd"));
  EXPECT_THAT(m2, HasSubstr("a host memfd"));
  EXPECT_THAT(m2, HasSubstr("CUDA VMM device memory"));
  EXPECT_THAT(m2, HasSubstr("--backend cuda"));
}

ModelRecord TwoRankRecord() {
  ModelRecord r;
  r.name = "llama";
  r.backend = "cuda";
  r.spec.checkpoint = "/models/llama";
  r.spec.tp = 2;
  RankRecord r0{0, 1, 4 << 20, 100, 3, 1};
  r0.device_uuid = "GPU-01234567-89ab-cdef-0123-456789abcdef";
  r0.arena_kind = ArenaKind::kCudaVmm;
  RankRecord r1{1, 0, 4 << 20, 100, 3, 1};
  r1.device_uuid = "GPU-fedcba98-7654-3210-fedc-ba9876543210";
  r1.arena_kind = ArenaKind::kCudaVmm;
  r.ranks = {r0, r1};
  return r;
}

TEST(HandoffTest, RecordKeepsDeviceUuidAndArenaKind) {
  const std::string text = EncodeModelRecord(TwoRankRecord());
  EXPECT_THAT(text, HasSubstr(R"("arena_kind":"cuda_vmm")"));
  auto r = ParseModelRecord(text);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->ranks.size(), 2u);
  EXPECT_EQ(r->ranks[0].device, 1);
  EXPECT_EQ(r->ranks[0].device_uuid, "GPU-01234567-89ab-cdef-0123-456789abcdef");
  EXPECT_EQ(r->ranks[1].device_uuid, "GPU-fedcba98-7654-3210-fedc-ba9876543210");
  EXPECT_EQ(r->ranks[1].arena_kind, ArenaKind::kCudaVmm);

  ModelRecord host;
  host.name = "small";
  host.backend = "host";
  host.spec.checkpoint = "/models/small";
  host.ranks.push_back({0, -1, 4096, 16, 1, 1});
  auto h = ParseModelRecord(EncodeModelRecord(host));
  ASSERT_TRUE(h.ok()) << h.status();
  EXPECT_EQ(h->ranks[0].device_uuid, "");
  EXPECT_EQ(h->ranks[0].arena_kind, ArenaKind::kHostMemfd);
}

// Records written before device_uuid and arena_kind existed still parse: no UUID (the ordinal
// is used), and the kind follows the model's backend.
TEST(HandoffTest, RecordsWithoutUuidOrKindStillParse) {
  for (const char* backend : {"cuda", "host"}) {
    const std::string old = absl::StrCat(
        R"({"version":1,"name":"llama","backend":")", backend,
        R"(","state":"ready","load":{"checkpoint":"/m"},"allow_uids":[],"allow_gids":[],)",
        R"("bytes_total":10,"load_seconds":1.5,"loaded_unix":1700000000,)",
        R"("ranks":[{"rank":0,"device":2,"arena_bytes":4096,"manifest_bytes":64,)",
        R"("tensors":1,"parts":1}]})");
    auto r = ParseModelRecord(old);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->ranks[0].device, 2);
    EXPECT_EQ(r->ranks[0].device_uuid, "");
    EXPECT_EQ(r->ranks[0].arena_kind,
              std::string(backend) == "cuda" ? ArenaKind::kCudaVmm : ArenaKind::kHostMemfd);
  }
}

TEST(HandoffTest, RecordRejectsBadUuidAndKind) {
  std::string text = EncodeModelRecord(TwoRankRecord());
  auto expect_bad = [](const std::string& t, const std::string& field) {
    auto r = ParseModelRecord(t);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(r.status().message()), HasSubstr(field)) << r.status();
  };
  std::string bad_uuid = text;
  bad_uuid.replace(bad_uuid.find("GPU-0123"), 8, "GPU-0z23");
  expect_bad(bad_uuid, "ranks[].device_uuid");
  std::string bad_kind = text;
  bad_kind.replace(bad_kind.find("cuda_vmm"), 8, "tpu_hbm0");
  expect_bad(bad_kind, "ranks[].arena_kind");
  ModelRecord other = TwoRankRecord();
  other.backend = "tpu";
  std::string no_kind = EncodeModelRecord(other);
  for (size_t at; (at = no_kind.find(R"(,"arena_kind":"cuda_vmm")")) != std::string::npos;) {
    no_kind.erase(at, std::string(R"(,"arena_kind":"cuda_vmm")").size());
  }
  expect_bad(no_kind, "ranks[].arena_kind");
}

// A hand-built two-rank plan over one file: a source split by rows between the ranks, each rank
// viewing it with a different row width, a replicated source cast to BF16 on rank 1, and a
// zero-filled target. Small chunks force several row-aligned reads per source.
class ExecutorTest : public ::testing::Test {
 protected:
  void SetUp() override {
    s0_ = RandomTensor("s0", {512, 256}, 2, "U16", 5);
    s1_ = RandomTensor("s1", {1000}, 4, "F32", 6);
    for (size_t i = 0; i < s1_.bytes.size(); i += 4) s1_.bytes[i + 3] = 0x3f;  // finite floats
    WriteSafetensors(dir_ / "m.safetensors", {s0_, s1_});
    auto ckpt = Checkpoint::Open(dir_ / "m.safetensors");
    ASSERT_TRUE(ckpt.ok()) << ckpt.status();
    plan_.files.push_back({dir_ / "m.safetensors", 0, 0});
    for (const CheckpointTensor& t : ckpt->tensors()) {
      plan_.sources.push_back({t.name, t.dtype, t.shape, 0, t.offset, t.nbytes});
    }
    // Rank 0: rows 0..255 of s0 as [256, 256]; s1 as F32; a 4 KiB zero-filled target.
    RankPlan r0;
    r0.rank = 0;
    r0.targets = {{"a", DType::kU16, {256, 256}, 0, 131072},
                  {"b", DType::kF32, {1000}, 131072, 4000},
                  {"z", DType::kU8, {4096}, 135168, 4096},
                  {"c", DType::kU16, {512, 256}, 139264, 262144}};
    // "c" is a verbatim copy of s0, read in several chunks; "a" of both ranks slices the same
    // source bytes.
    r0.pieces = {{0, 0, {1, 512, 256}, {0, 0, 0}, {1, 256, 256}, {0, 0, 0}, {1, 256, 256}},
                 {1, 1, {1, 1, 1000}, {0, 0, 0}, {1, 1, 1000}, {0, 0, 0}, {1, 1, 1000}},
                 {0, 3, {1, 512, 256}, {0, 0, 0}, {1, 512, 256}, {0, 0, 0}, {1, 512, 256}}};
    r0.zero_fills = {{2, 0, 4096}};
    r0.arena_bytes = 401408;
    // Rank 1: rows 256..511 of s0 viewed as [256, 512] rows (two source rows per view row);
    // s1 cast to BF16.
    RankPlan r1;
    r1.rank = 1;
    r1.targets = {{"a", DType::kU16, {128, 512}, 0, 131072},
                  {"b", DType::kBF16, {1000}, 131072, 2000}};
    r1.pieces = {{0, 0, {1, 256, 512}, {0, 128, 0}, {1, 128, 512}, {0, 0, 0}, {1, 128, 512}},
                 {1, 1, {1, 1, 1000}, {0, 0, 0}, {1, 1, 1000}, {0, 0, 0}, {1, 1, 1000}}};
    r1.arena_bytes = 133376;
    plan_.ranks = {r0, r1};
  }

  // Expected target bytes: each piece applied to its whole source at once.
  std::vector<std::byte> Expected(size_t r) {
    std::vector<std::byte> out(plan_.ranks[r].arena_bytes);
    const FakeTensor* src[] = {&s0_, &s1_};
    for (const PlanPiece& p : plan_.ranks[r].pieces) {
      const PlanTarget& t = plan_.ranks[r].targets[p.target];
      kernels::CopyPieceRowsHost(p, plan_.sources[p.source].dtype, t.dtype,
                                 reinterpret_cast<const std::byte*>(src[p.source]->bytes.data()), 0,
                                 p.src_shape[0] * p.src_shape[1], out.data() + t.offset);
    }
    return out;
  }

  // One host arena per rank of `plan`, owned by `owned`; with `fill`, every byte set to it
  // (so that a zero-fill must really write).
  std::vector<Arena*> HostArenas(const Plan& plan, std::vector<std::unique_ptr<Arena>>& owned,
                                 std::optional<std::byte> fill = std::nullopt) {
    std::vector<Arena*> raw;
    for (const RankPlan& r : plan.ranks) {
      owned.push_back(*backend_.Allocate({r.arena_bytes, -1, "x"}));
      if (fill) {
        std::span<std::byte> w = owned.back()->writable();
        std::fill(w.begin(), w.end(), *fill);
      }
      raw.push_back(owned.back().get());
    }
    return raw;
  }

  TempDir dir_;
  FakeTensor s0_, s1_;
  Plan plan_;
  HostBackend backend_;
};

TEST_F(ExecutorTest, ChunkedReadsMatchWholeSourceCopies) {
  for (IoMode mode : {IoMode::kPread, IoMode::kUring, IoMode::kAuto})
    for (int threads : {1, 3}) {
      SCOPED_TRACE(absl::StrCat("io_mode ", IoModeName(mode), " threads ", threads));
      std::vector<std::unique_ptr<Arena>> arenas;
      std::vector<Arena*> raw = HostArenas(plan_, arenas, std::byte{0xEE});
      LoadProgress progress;
      ExecutorOptions o;
      o.threads = threads;
      o.chunk_bytes = 64 << 10;
      o.io_mode = mode;
      TargetChecksums crcs;
      ASSERT_TRUE(ExecutePlanHost(plan_, raw, o, &progress, &crcs).ok());
      if (mode == IoMode::kUring) {
        EXPECT_EQ(progress.bytes_uring.load(), progress.bytes_total.load());
      }
      if (mode == IoMode::kPread) {
        EXPECT_EQ(progress.bytes_pread.load(), progress.bytes_total.load());
      }
      // Checksummed while written: every target, slices, casts and zero-fills included.
      ASSERT_EQ(crcs.crc.size(), 2u);
      EXPECT_EQ(crcs.crc[0][3], Crc32c(s0_.bytes.data(), s0_.bytes.size()));
      EXPECT_EQ(crcs.crc[0][1], Crc32c(s1_.bytes.data(), s1_.bytes.size()));
      for (size_t r = 0; r < 2; ++r) {
        for (size_t t = 0; t < plan_.ranks[r].targets.size(); ++t) {
          const PlanTarget& pt = plan_.ranks[r].targets[t];
          EXPECT_EQ(crcs.crc[r][t], Crc32c(raw[r]->writable().data() + pt.offset, pt.nbytes))
              << "rank " << r << " target " << pt.name;
        }
      }
      // Each source byte read once, for both ranks together.
      EXPECT_EQ(progress.bytes_total.load(), s0_.bytes.size() + s1_.bytes.size());
      EXPECT_EQ(progress.bytes_done.load(), progress.bytes_total.load());
      for (size_t r = 0; r < 2; ++r) {
        const std::vector<std::byte> want = Expected(r);
        std::span<std::byte> got = raw[r]->writable();
        for (const PlanTarget& t : plan_.ranks[r].targets) {
          if (t.name == "z") {
            EXPECT_TRUE(std::all_of(got.begin() + t.offset, got.begin() + t.offset + t.nbytes,
                                    [](std::byte b) { return b == std::byte{0}; }));
            continue;
          }
          EXPECT_EQ(std::memcmp(got.data() + t.offset, want.data() + t.offset, t.nbytes), 0)
              << "rank " << r << " target " << t.name << " threads " << threads;
        }
      }
      ASSERT_TRUE(raw[1]->Seal().ok());
      auto m = BuildRankManifest(plan_, 1, *raw[1], "m", -1, threads, &crcs.crc[1]);
      ASSERT_TRUE(m.ok());
      EXPECT_EQ(m->tensors[1].dtype, DType::kBF16);
      EXPECT_EQ(m->tensors[1].crc32c, Crc32c(raw[1]->readable().data() + 131072, 2000));
      ASSERT_TRUE(raw[0]->Seal().ok());
      auto m0 = BuildRankManifest(plan_, 0, *raw[0], "m", -1, threads, &crcs.crc[0]);
      ASSERT_TRUE(m0.ok());
      for (const ManifestTensor& t : m0->tensors) {
        EXPECT_EQ(t.crc32c, Crc32c(raw[0]->readable().data() + t.offset, t.nbytes)) << t.name;
      }
    }
}

// PwritevExact writes every iovec, empty ones included (nothing to write is not "no progress"),
// and names the label and offset with the errno text when the write fails.
TEST(FileUtilTest, PwritevExactWritesEveryIovecAndNamesFailures) {
  UniqueFd fd(::memfd_create("t", MFD_CLOEXEC));
  ASSERT_TRUE(fd);
  std::string a = "abc", b = "defg";
  std::vector<iovec> iov = {{nullptr, 0}, {a.data(), a.size()}, {nullptr, 0}, {b.data(), b.size()},
                            {nullptr, 0}};
  ASSERT_TRUE(PwritevExact(fd.get(), iov, 5, "m").ok());
  EXPECT_TRUE(PwriteExact(fd.get(), nullptr, 0, 0, "m").ok());
  std::string got(12, '?');
  ASSERT_TRUE(PreadExact(fd.get(), got.data(), got.size(), 0, "m").ok());
  EXPECT_EQ(got, std::string("\0\0\0\0\0abcdefg", 12));
  UniqueFd ro(::open(absl::StrCat("/proc/self/fd/", fd.get()).c_str(), O_RDONLY | O_CLOEXEC));
  ASSERT_TRUE(ro);
  const absl::Status s = PwriteExact(ro.get(), a.data(), a.size(), 7, "the memfd of arena x");
  EXPECT_THAT(std::string(s.message()), HasSubstr("writing the memfd of arena x at offset 7: "));
}

// Workers start far apart (lanes of equal bytes), a worker whose lane is done takes the second
// half of the fullest lane, and every unit is handed out exactly once, also under contention.
TEST(UnitQueueTest, LanesOfEqualBytesStealingAndEveryUnitOnce) {
  detail::WorkPlan work;
  for (uint64_t i = 0; i < 10; ++i) work.units.push_back({0, i * 100, i * 100 + 100});
  {
    detail::UnitQueue q(work, 2);
    std::optional<size_t> ahead;
    EXPECT_EQ(q.Take(0, &ahead), 0u);
    EXPECT_EQ(ahead, 1u);
    EXPECT_EQ(q.Take(1, &ahead), 5u);
    EXPECT_EQ(ahead, 6u);
    // Worker 1 drains its lane, then steals [3, 5) from worker 0's [1, 5), leaving it [1, 3).
    for (size_t want = 6; want < 10; ++want) EXPECT_EQ(q.Take(1, &ahead), want);
    EXPECT_EQ(ahead, std::nullopt);
    EXPECT_EQ(q.Take(1, &ahead), 3u);
    EXPECT_EQ(ahead, 4u);
    EXPECT_EQ(q.Take(0, &ahead), 1u);
    EXPECT_EQ(ahead, 2u);
    EXPECT_EQ(q.Take(0, &ahead), 2u);
    EXPECT_EQ(ahead, std::nullopt);
    EXPECT_EQ(q.Take(0, &ahead), 4u);  // the rest of worker 1's stolen lane
    EXPECT_EQ(q.Take(1, &ahead), std::nullopt);
    EXPECT_EQ(q.Take(0, &ahead), std::nullopt);
  }
  {
    // Lanes split bytes, not units: one large unit is a lane of its own.
    detail::WorkPlan uneven;
    uneven.units.push_back({0, 0, 900});
    for (uint64_t i = 0; i < 9; ++i) uneven.units.push_back({1, i * 100, i * 100 + 100});
    detail::UnitQueue q(uneven, 2);
    std::optional<size_t> ahead;
    EXPECT_EQ(q.Take(1, &ahead), 1u);
    EXPECT_EQ(q.Take(0, &ahead), 0u);
    EXPECT_EQ(ahead, std::nullopt);
  }
  for (int workers : {1, 3, 4, 16}) {
    SCOPED_TRACE(absl::StrCat(workers, " workers"));
    detail::WorkPlan many;
    for (uint64_t i = 0; i < 1000; ++i) many.units.push_back({0, i * 10, i * 10 + 1 + i % 7});
    detail::UnitQueue q(many, workers);
    std::vector<std::atomic<int>> seen(many.units.size());
    std::vector<std::thread> pool;
    for (int w = 0; w < workers; ++w) {
      pool.emplace_back([&, w] {
        std::optional<size_t> ahead;
        while (std::optional<size_t> i = q.Take(w, &ahead)) seen[*i].fetch_add(1);
      });
    }
    for (std::thread& t : pool) t.join();
    for (size_t i = 0; i < seen.size(); ++i) ASSERT_EQ(seen[i].load(), 1) << "unit " << i;
  }
}

// Tensor-parallel slices and fused targets are written into the arenas' memfds (no mapping of
// them is touched), and each one's CRC32C is taken while it is written. Column slices of `o`
// make a row run per rank per row, more than one pwritev takes (IOV_MAX), in units of 1 MiB.
TEST(ExecutorFdSinkTest, SlicesAndFusedTargetsAreWrittenThroughTheMemfdAndChecksummed) {
  TempDir dir;
  const FakeTensor q = RandomTensor("q", {64, 32}, 2, "U16", 11);
  const FakeTensor k = RandomTensor("k", {32, 32}, 2, "U16", 12);
  const FakeTensor o = RandomTensor("o", {2048, 512}, 2, "U16", 13);
  WriteSafetensors(dir / "m.safetensors", {q, k, o});
  auto ckpt = Checkpoint::Open(dir / "m.safetensors");
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  Plan plan;
  plan.files.push_back({dir / "m.safetensors", 0, 0});
  for (const CheckpointTensor& t : ckpt->tensors()) {
    plan.sources.push_back({t.name, t.dtype, t.shape, 0, t.offset, t.nbytes});
  }
  auto index_of = [&](const std::string& name) {
    return static_cast<uint32_t>(
        std::find_if(plan.sources.begin(), plan.sources.end(),
                     [&](const PlanSource& s) { return s.name == name; }) -
        plan.sources.begin());
  };
  const uint32_t sq = index_of("q"), sk = index_of("k"), so = index_of("o");
  ASSERT_EQ(plan.sources.size(), 3u);
  for (int r = 0; r < 2; ++r) {
    RankPlan rp;
    rp.rank = r;
    // qkv: q rows [32r, 32r + 32) then k rows [16r, 16r + 16); o: columns [256r, 256r + 256).
    rp.targets = {{"qkv", DType::kU16, {48, 32}, 0, 48 * 32 * 2},
                  {"o", DType::kU16, {2048, 256}, 4096, 2048 * 256 * 2}};
    rp.pieces = {{sq, 0, {1, 64, 32}, {0, 32 * r, 0}, {1, 48, 32}, {0, 0, 0}, {1, 32, 32}},
                 {sk, 0, {1, 32, 32}, {0, 16 * r, 0}, {1, 48, 32}, {0, 32, 0}, {1, 16, 32}},
                 {so, 1, {1, 2048, 512}, {0, 0, 256 * r}, {1, 2048, 256}, {0, 0, 0},
                  {1, 2048, 256}}};
    rp.arena_bytes = 4096 + 2048 * 256 * 2;
    plan.ranks.push_back(rp);
  }
  HostBackend backend;
  for (int threads : {1, 2}) {
    SCOPED_TRACE(absl::StrCat("threads ", threads));
    std::vector<std::unique_ptr<Arena>> arenas;
    std::vector<Arena*> raw;
    for (const RankPlan& r : plan.ranks) {
      arenas.push_back(*backend.Allocate({r.arena_bytes, -1, "fdsink-test"}));
      raw.push_back(arenas.back().get());
    }
    LoadProgress progress;
    TargetChecksums crcs;
    ExecutorOptions eo{.threads = threads, .chunk_bytes = 1 << 20};
    ASSERT_TRUE(ExecutePlanHost(plan, raw, eo, &progress, &crcs).ok());
    // Written through the memfds, never through a mapping: the daemon holds no mapping of them,
    // so sealing has no page table to tear down.
    EXPECT_EQ(MappingsOf("memfd:weightd:fdsink-test"), 0u);
    EXPECT_EQ(progress.bytes_total.load(), q.bytes.size() + k.bytes.size() + o.bytes.size());
    std::vector<const FakeTensor*> src(3);
    src[sq] = &q;
    src[sk] = &k;
    src[so] = &o;
    for (size_t r = 0; r < 2; ++r) {
      std::vector<std::byte> want(plan.ranks[r].arena_bytes);
      for (const PlanPiece& p : plan.ranks[r].pieces) {
        kernels::CopyPieceRowsHost(p, DType::kU16, DType::kU16,
                                   reinterpret_cast<const std::byte*>(src[p.source]->bytes.data()),
                                   0, p.src_shape[0] * p.src_shape[1],
                                   want.data() + plan.ranks[r].targets[p.target].offset);
      }
      const std::span<std::byte> got = raw[r]->writable();
      for (size_t t = 0; t < plan.ranks[r].targets.size(); ++t) {
        const PlanTarget& pt = plan.ranks[r].targets[t];
        EXPECT_EQ(std::memcmp(got.data() + pt.offset, want.data() + pt.offset, pt.nbytes), 0)
            << "rank " << r << " " << pt.name;
        EXPECT_EQ(crcs.crc[r][t], Crc32c(want.data() + pt.offset, pt.nbytes))
            << "rank " << r << " " << pt.name;
      }
    }
  }
}

// The output-file sink writes exactly the bytes the host sink puts in an arena (slices, a
// strided view, a cast, a zero-fill left to the pre-sized file), with any number of workers.
TEST_F(ExecutorTest, FileSinkWritesTheBytesOfTheHostSink) {
  std::vector<std::unique_ptr<Arena>> arenas;
  std::vector<Arena*> raw = HostArenas(plan_, arenas);
  LoadProgress host_progress;
  ASSERT_TRUE(ExecutePlanHost(plan_, raw, {.threads = 2}, &host_progress).ok());
  for (int threads : {1, 3}) {
    SCOPED_TRACE(absl::StrCat("threads ", threads));
    std::vector<UniqueFd> fds;
    std::vector<OutputFile> outs;
    for (size_t r = 0; r < plan_.ranks.size(); ++r) {
      const std::string path = dir_ / absl::StrCat("out-", threads, "-", r);
      fds.emplace_back(open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0644));
      ASSERT_GE(fds.back().get(), 0);
      // 8 bytes of header before the data: offsets are absolute.
      ASSERT_EQ(ftruncate(fds.back().get(), 8 + plan_.ranks[r].arena_bytes), 0);
      OutputFile f{.fd = fds.back().get(), .path = path};
      for (const PlanTarget& t : plan_.ranks[r].targets) f.target_offset.push_back(8 + t.offset);
      outs.push_back(std::move(f));
    }
    LoadProgress progress;
    uint64_t written = 0;
    ASSERT_TRUE(ExecutePlanToFiles(plan_, outs,
                                   {.threads = threads, .chunk_bytes = 64 << 10}, &progress,
                                   &written)
                    .ok());
    EXPECT_EQ(progress.bytes_done.load(), s0_.bytes.size() + s1_.bytes.size());
    uint64_t want_written = 0;
    for (size_t r = 0; r < plan_.ranks.size(); ++r) {
      std::vector<std::byte> file(plan_.ranks[r].arena_bytes);
      ASSERT_TRUE(PreadExact(outs[r].fd, file.data(), file.size(), 8, outs[r].path).ok());
      for (const PlanTarget& t : plan_.ranks[r].targets) {
        if (t.name != "z") want_written += t.nbytes;
        EXPECT_EQ(std::memcmp(file.data() + t.offset, raw[r]->writable().data() + t.offset,
                              t.nbytes),
                  0)
            << "rank " << r << " target " << t.name;
      }
    }
    EXPECT_EQ(written, want_written);
  }
}

// A write that fails (a full disk: /dev/full answers ENOSPC) fails the run naming the output
// file and the errno text; the first error stops every worker.
TEST_F(ExecutorTest, FileSinkWriteErrorNamesTheFile) {
  UniqueFd full(open("/dev/full", O_WRONLY));
  if (full.get() < 0) GTEST_SKIP() << "no /dev/full";
  const std::string ok_path = dir_ / "rank1";
  UniqueFd ok(open(ok_path.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0644));
  ASSERT_GE(ok.get(), 0);
  std::vector<OutputFile> outs(2);
  outs[0] = {.fd = full.get(), .path = "/dev/full (rank 0)"};
  outs[1] = {.fd = ok.get(), .path = ok_path};
  for (size_t r = 0; r < 2; ++r) {
    for (const PlanTarget& t : plan_.ranks[r].targets) outs[r].target_offset.push_back(t.offset);
  }
  for (int threads : {1, 3}) {
    LoadProgress progress;
    const absl::Status s = ExecutePlanToFiles(plan_, outs, {.threads = threads}, &progress);
    EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
    EXPECT_THAT(s.message(), HasSubstr("/dev/full (rank 0)"));
    EXPECT_THAT(s.message(), HasSubstr("No space left on device"));
  }
  // A descriptor that refuses writes fails the in-kernel copies (whole blocks) and the writes
  // (slices, casts) alike, naming that file.
  UniqueFd read_only(open(ok_path.c_str(), O_RDONLY));
  ASSERT_GE(read_only.get(), 0);
  outs[0] = {.fd = read_only.get(), .path = ok_path + " (read-only)",
             .target_offset = outs[0].target_offset};
  for (int threads : {1, 2}) {
    LoadProgress progress;
    const absl::Status s = ExecutePlanToFiles(plan_, outs, {.threads = threads}, &progress);
    EXPECT_FALSE(s.ok());
    EXPECT_THAT(s.message(), HasSubstr("(read-only)"));
    EXPECT_THAT(s.message(), HasSubstr("Bad file descriptor"));
  }
  // An output list that does not match the plan is refused before anything is read.
  outs.pop_back();
  LoadProgress progress;
  const absl::Status s = ExecutePlanToFiles(plan_, outs, {}, &progress);
  EXPECT_EQ(s.code(), absl::StatusCode::kInternal);
  EXPECT_THAT(s.message(), HasSubstr("1 output files for 2 ranks"));
  EXPECT_EQ(progress.bytes_done.load(), 0u);
}

TEST_F(ExecutorTest, AutoModeReadsColdChunksWithUring) {
  std::vector<std::unique_ptr<Arena>> arenas;
  std::vector<Arena*> raw = HostArenas(plan_, arenas);
  ASSERT_TRUE(DropFileFromPageCache(dir_ / "m.safetensors").ok());
  UniqueFd fd(::open((dir_ / "m.safetensors").c_str(), O_RDONLY | O_CLOEXEC));
  auto f = ResidentFraction(fd.get(), 0, plan_.sources[1].offset, "m");
  ASSERT_TRUE(f.ok());
  if (*f >= kCachedThreshold) GTEST_SKIP() << "the page cache kept the file after DONTNEED";
  ExecutorOptions o;
  o.chunk_bytes = 64 << 10;
  o.io_mode = IoMode::kAuto;
  LoadProgress p;
  ASSERT_TRUE(ExecutePlanHost(plan_, raw, o, &p).ok());
  EXPECT_GT(p.bytes_uring.load(), 0u);
  EXPECT_EQ(p.bytes_uring.load() + p.bytes_pread.load(), p.bytes_total.load());
  for (size_t r = 0; r < 2; ++r) {
    const std::vector<std::byte> want = Expected(r);
    for (const PlanTarget& t : plan_.ranks[r].targets) {
      if (t.name == "z") continue;
      EXPECT_EQ(std::memcmp(raw[r]->writable().data() + t.offset, want.data() + t.offset, t.nbytes),
                0)
          << t.name;
    }
  }
}

// A shard rewritten in place between planning and reading, or while it is read, fails the load
// with DATA_LOSS naming it: before, the mixed snapshot was served as ready and verified.
TEST_F(ExecutorTest, AShardRewrittenDuringTheLoadIsDataLoss) {
  auto ckpt = Checkpoint::Open(dir_ / "m.safetensors");
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  PlanOptions po;
  po.recipe_name = "hf";
  auto plan = BuildPlan(*ckpt, po);
  ASSERT_TRUE(plan.ok()) << plan.status();
  ASSERT_TRUE(plan->files[0].identity.has_value());
  std::vector<std::unique_ptr<Arena>> arenas;
  std::vector<Arena*> raw = HostArenas(*plan, arenas);
  auto rewrite = [&] {
    ::usleep(10000);  // a new modification time even on coarse-grained clocks
    UniqueFd fd(::open((dir_ / "m.safetensors").c_str(), O_WRONLY | O_CLOEXEC));
    ASSERT_TRUE(fd);
    const char x = 0x11;
    ASSERT_EQ(::pwrite(fd.get(), &x, 1, static_cast<off_t>(plan->sources[0].offset)), 1);
  };
  for (IoMode mode : {IoMode::kPread, IoMode::kUring}) {
    // Opened after the rewrite: the plan's record no longer matches.
    rewrite();
    LoadProgress p;
    ExecutorOptions o;
    o.io_mode = mode;
    absl::Status s = ExecutePlanHost(*plan, raw, o, &p);
    EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
    EXPECT_THAT(std::string(s.message()), HasSubstr("m.safetensors"));
    EXPECT_THAT(std::string(s.message()), HasSubstr("changed while weightd was reading it"));
  }
  // Rewritten while open: the check after the last read catches it.
  plan->files[0].identity.reset();
  auto files = detail::PlanFiles::Open(*plan, IoMode::kPread);
  ASSERT_TRUE(files.ok()) << files.status();
  EXPECT_TRUE(files->CheckUnchanged().ok());
  rewrite();
  absl::Status s = files->CheckUnchanged();
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("modification time changed"));
}

TEST_F(ExecutorTest, CancelAndShortFileAndBadPlan) {
  std::vector<std::unique_ptr<Arena>> arenas;
  std::vector<Arena*> raw = HostArenas(plan_, arenas);
  LoadProgress cancelled;
  cancelled.cancel = true;
  EXPECT_EQ(ExecutePlanHost(plan_, raw, {}, &cancelled).code(), absl::StatusCode::kCancelled);

  ASSERT_EQ(::truncate((dir_ / "m.safetensors").c_str(), plan_.sources[1].offset + 10), 0);
  LoadProgress p;
  absl::Status s = ExecutePlanHost(plan_, raw, {}, &p);
  EXPECT_FALSE(s.ok());
  EXPECT_THAT(std::string(s.message()), HasSubstr("m.safetensors"));
  EXPECT_THAT(std::string(s.message()), HasSubstr("'s1'"));

  // The io_uring path reports the same: file, tensor, DATA_LOSS.
  ExecutorOptions uring;
  uring.io_mode = IoMode::kUring;
  LoadProgress pu;
  s = ExecutePlanHost(plan_, raw, uring, &pu);
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("m.safetensors"));
  EXPECT_THAT(std::string(s.message()), HasSubstr("'s1'"));
  EXPECT_THAT(std::string(s.message()), HasSubstr("file truncated"));

  Plan bad = plan_;
  bad.ranks[0].pieces[0].extent = {1, 300, 256};  // beyond the target
  s = ExecutePlanHost(bad, raw, {}, &p);
  EXPECT_EQ(s.code(), absl::StatusCode::kInternal);
  EXPECT_THAT(std::string(s.message()), HasSubstr("target 'a' of rank 0"));
  EXPECT_EQ(ExecutePlanHost(plan_, std::span<Arena* const>(raw.data(), 1), {}, &p).code(),
            absl::StatusCode::kInternal);
  // A sealed arena takes no writes, and the load says which arena.
  ASSERT_TRUE(raw[1]->Seal().ok());
  s = ExecutePlanHost(plan_, raw, {}, &p);
  EXPECT_EQ(s.code(), absl::StatusCode::kInternal);
  EXPECT_THAT(std::string(s.message()), HasSubstr("arena x of rank 1 is not a writable host memfd"));
}

// A registry over a checkpoint written by the test.
class RegistryTest : public ::testing::Test {
 protected:
  void SetUp() override {
    tensors_ = {RandomTensor("a.weight", {64, 32}, 2, "BF16", 1),
                RandomTensor("b.weight", {300, 7}, 4, "F32", 2),
                RandomTensor("c.bias", {5}, 2, "F16", 3)};
    WriteSafetensors(dir_ / "model.safetensors", tensors_);
    config_.io_threads = 2;
  }

  LoadSpec Spec(const std::string& ckpt, int tp = 1) {
    LoadSpec s;
    s.checkpoint = ckpt;
    s.tp = tp;
    s.recipe = "hf";
    return s;
  }

  static std::string StateOf(Registry& r, const std::string& name) {
    auto st = r.Status(name, Self());
    if (!st.ok()) return std::string(st.status().message());
    return std::string(RankStateName(st->front().ranks.front().state));
  }

  static Peer Self() { return {::getpid(), ::geteuid(), ::getegid()}; }

  TempDir dir_;
  std::vector<FakeTensor> tensors_;
  DaemonConfig config_;
  HostBackend backend_;
};

TEST_F(RegistryTest, LoadReadyAttachDetachUnload) {
  Registry reg(&backend_, config_);
  ASSERT_TRUE(reg.StartLoad("m", Spec(dir_.path(), 2), Self()).ok());
  reg.WaitForLoads();
  auto st = reg.Status("m", Self());
  ASSERT_TRUE(st.ok()) << st.status();
  ASSERT_EQ(st->front().ranks.size(), 2u);
  EXPECT_EQ(st->front().error, "");
  for (const RankStatus& r : st->front().ranks) EXPECT_EQ(r.state, RankState::kReady);
  // Read once whatever T: two replicated ranks, the checkpoint's bytes counted once.
  uint64_t ckpt_bytes = 0;
  for (const FakeTensor& t : tensors_) ckpt_bytes += t.bytes.size();
  EXPECT_EQ(st->front().bytes_total, ckpt_bytes);
  EXPECT_EQ(st->front().bytes_done, ckpt_bytes);

  auto g = reg.Attach("m", 1, Self(), /*connection=*/7);
  ASSERT_TRUE(g.ok()) << g.status();
  std::string bytes(g->manifest_bytes, '\0');
  ASSERT_TRUE(PreadExact(g->manifest.get(), bytes.data(), bytes.size(), 0, "manifest").ok());
  auto m = DecodeManifest(bytes);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->model, "m");
  EXPECT_EQ(m->rank, 1u);
  ASSERT_EQ(m->tensors.size(), 3u);
  ASSERT_EQ(g->arenas.size(), 1u);
  void* p = ::mmap(nullptr, m->arenas[0].size, PROT_READ, MAP_SHARED, g->arenas[0].get(), 0);
  ASSERT_NE(p, MAP_FAILED);
  for (const ManifestTensor& t : m->tensors) {
    const FakeTensor* src = nullptr;
    for (const FakeTensor& f : tensors_) {
      if (f.name == t.name) src = &f;
    }
    ASSERT_NE(src, nullptr) << t.name;
    ASSERT_EQ(t.nbytes, src->bytes.size());
    EXPECT_EQ(std::memcmp(static_cast<const char*>(p) + t.offset, src->bytes.data(), t.nbytes), 0)
        << t.name;
    EXPECT_EQ(t.crc32c, Crc32c(src->bytes.data(), t.nbytes));
  }
  ::munmap(p, m->arenas[0].size);

  // Unload refused while attached, naming the pid; allowed after the lease goes.
  absl::Status u = reg.Unload("m", false, Self());
  EXPECT_EQ(u.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(u.message()), HasSubstr(absl::StrCat("pid ", ::getpid())));
  EXPECT_EQ(reg.Detach("m", 0, 7).code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(reg.Detach("m", 1, 7).ok());
  ASSERT_TRUE(reg.Attach("m", 0, Self(), 8).ok());
  reg.ReleaseConnection(8);
  EXPECT_EQ(reg.Status("m", Self())->front().ranks[0].leases.size(), 0u);
  EXPECT_TRUE(reg.Unload("m", false, Self()).ok());
  EXPECT_EQ(reg.Status("m", Self()).status().code(), absl::StatusCode::kNotFound);
}

// A forced unload drops the old attachment's lease; after a reload under the same name, that
// attachment's late detach names its own lease and must not release the new attachment's.
TEST_F(RegistryTest, ADetachByLeaseNeverReleasesANewerAttachmentsLease) {
  Registry reg(&backend_, config_);
  ASSERT_TRUE(reg.StartLoad("m", Spec(dir_.path()), Self()).ok());
  reg.WaitForLoads();
  auto old_grant = reg.Attach("m", 0, Self(), /*connection=*/7);
  ASSERT_TRUE(old_grant.ok()) << old_grant.status();
  ASSERT_TRUE(reg.Unload("m", /*force=*/true, Self()).ok());
  ASSERT_TRUE(reg.StartLoad("m", Spec(dir_.path()), Self()).ok());
  reg.WaitForLoads();
  auto new_grant = reg.Attach("m", 0, Self(), 7);
  ASSERT_TRUE(new_grant.ok()) << new_grant.status();
  ASSERT_NE(new_grant->lease, old_grant->lease);
  const absl::Status s = reg.Detach("m", 0, 7, old_grant->lease);
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr(absl::StrCat("lease ", old_grant->lease)));
  auto st = reg.Status("m", Self());
  ASSERT_TRUE(st.ok());
  ASSERT_EQ(st->front().ranks[0].leases.size(), 1u) << "the newer attachment lost its lease";
  EXPECT_EQ(st->front().ranks[0].leases[0].id, new_grant->lease);
  EXPECT_TRUE(reg.Detach("m", 0, 7, new_grant->lease).ok());
  EXPECT_EQ(reg.Status("m", Self())->front().ranks[0].leases.size(), 0u);
}

TEST_F(RegistryTest, ForceUnloadWhileAttached) {
  Registry reg(&backend_, config_);
  ASSERT_TRUE(reg.StartLoad("m", Spec(dir_.path()), Self()).ok());
  reg.WaitForLoads();
  auto g = reg.Attach("m", 0, Self(), 1);
  ASSERT_TRUE(g.ok());
  EXPECT_TRUE(reg.Unload("m", true, Self()).ok());
  // The client's fd still maps valid memory after the forced unload.
  void* p = ::mmap(nullptr, 4096, PROT_READ, MAP_SHARED, g->arenas[0].get(), 0);
  ASSERT_NE(p, MAP_FAILED);
  EXPECT_EQ(std::memcmp(p, tensors_[0].bytes.data(), 64), 0);
  ::munmap(p, 4096);
}

TEST_F(RegistryTest, LeaseCapPerConnection) {
  config_.max_leases_per_connection = 3;
  Registry reg(&backend_, config_);
  ASSERT_TRUE(reg.StartLoad("m", Spec(dir_.path(), 2), Self()).ok());
  ASSERT_TRUE(reg.StartLoad("n", Spec(dir_.path()), Self()).ok());
  reg.WaitForLoads();
  // The cap counts the connection's leases on every model and rank.
  ASSERT_TRUE(reg.Attach("m", 0, Self(), 1).ok());
  ASSERT_TRUE(reg.Attach("m", 1, Self(), 1).ok());
  ASSERT_TRUE(reg.Attach("n", 0, Self(), 1).ok());
  auto refused = reg.Attach("m", 0, Self(), 1);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(refused.status().message()), HasSubstr("max_leases_per_connection"));
  EXPECT_THAT(std::string(refused.status().message()), HasSubstr("holds 3 leases"));
  EXPECT_TRUE(reg.Attach("m", 0, Self(), 2).ok()) << "another connection has its own count";
  // A detach, a forced unload and a closed connection each give the slots back.
  ASSERT_TRUE(reg.Detach("m", 1, 1).ok());
  EXPECT_TRUE(reg.Attach("m", 1, Self(), 1).ok());
  EXPECT_FALSE(reg.Attach("m", 1, Self(), 1).ok());
  ASSERT_TRUE(reg.Unload("n", /*force=*/true, Self()).ok());
  EXPECT_TRUE(reg.Attach("m", 1, Self(), 1).ok());
  EXPECT_FALSE(reg.Attach("m", 1, Self(), 1).ok());
  reg.ReleaseConnection(1);
  for (int i = 0; i < 3; ++i) EXPECT_TRUE(reg.Attach("m", 0, Self(), 1).ok()) << i;
}

// However many leases there are, Status lists a bounded number and counts the rest, and the
// refusal of an unload names a bounded number of holders.
TEST_F(RegistryTest, StatusAndUnloadRefusalStayBoundedWithManyLeases) {
  Registry reg(&backend_, config_);
  ASSERT_TRUE(reg.StartLoad("m", Spec(dir_.path(), 2), Self()).ok());
  reg.WaitForLoads();
  constexpr int kLeases = 5000;
  for (int i = 0; i < kLeases; ++i) {
    Peer p = Self();
    p.pid = 100000 + i;  // a distinct holder each time
    ASSERT_TRUE(reg.Attach("m", i % 2, p, 1 + i % 3).ok()) << i;
  }
  auto st = reg.Status("m", Self());
  ASSERT_TRUE(st.ok()) << st.status();
  const std::vector<RankStatus>& ranks = st->front().ranks;
  ASSERT_EQ(ranks.size(), 2u);
  EXPECT_EQ(ranks[0].lease_count, kLeases / 2);
  EXPECT_EQ(ranks[1].lease_count, kLeases / 2);
  EXPECT_EQ(ranks[0].leases.size() + ranks[1].leases.size(), kStatusMaxListedLeases);
  EXPECT_EQ(ranks[0].leases.front().peer.pid, 100000) << "the oldest lease first";
  absl::Status u = reg.Unload("m", false, Self());
  EXPECT_EQ(u.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(u.message()), HasSubstr("pid 100000 (rank 0)"));
  EXPECT_THAT(std::string(u.message()), HasSubstr("and others (5000 leases)"));
  EXPECT_LT(u.message().size(), 1000u);
}

TEST_F(RegistryTest, NoLoadStartsAfterShutdown) {
  Registry reg(&backend_, config_);
  reg.Shutdown();
  const absl::Status s = reg.StartLoad("m", Spec(dir_.path()), Self());
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(s.message()), HasSubstr("shutting down"));
}

TEST_F(RegistryTest, DuplicateNameAndBadRequests) {
  Registry reg(&backend_, config_);
  ASSERT_TRUE(reg.StartLoad("m", Spec(dir_.path()), Self()).ok());
  absl::Status s = reg.StartLoad("m", Spec(dir_.path()), Self());
  EXPECT_EQ(s.code(), absl::StatusCode::kAlreadyExists);
  EXPECT_THAT(std::string(s.message()), HasSubstr("'m'"));
  reg.WaitForLoads();
  EXPECT_EQ(reg.Attach("m", 3, Self(), 1).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(reg.Attach("nope", 0, Self(), 1).status().code(), absl::StatusCode::kNotFound);
  LoadSpec bad = Spec(dir_.path());
  bad.dtype = "int3";
  EXPECT_EQ(reg.StartLoad("x", bad, Self()).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(reg.StartLoad("y", Spec(dir_ / "missing"), Self()).code(), absl::StatusCode::kNotFound);
}

TEST_F(RegistryTest, TruncatedShardFailsAndFreesOthersUntouched) {
  TempDir bad;
  WriteSafetensors(bad / "model.safetensors", tensors_);
  Registry reg(&backend_, config_);
  ASSERT_TRUE(reg.StartLoad("good", Spec(dir_.path()), Self()).ok());
  reg.WaitForLoads();
  // Truncate after Open would validate... truncate before: the reader reports it.
  ASSERT_EQ(::truncate((bad / "model.safetensors").c_str(), 200), 0);
  ASSERT_TRUE(reg.StartLoad("bad", Spec(bad.path()), Self()).ok());
  reg.WaitForLoads();
  auto st = reg.Status("bad", Self());
  ASSERT_TRUE(st.ok());
  EXPECT_EQ(st->front().ranks[0].state, RankState::kFailed);
  EXPECT_THAT(st->front().error, HasSubstr("model.safetensors"));
  EXPECT_EQ(st->front().ranks[0].arena_bytes, 0u);
  EXPECT_EQ(reg.Attach("bad", 0, Self(), 1).status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(StateOf(reg, "good"), "ready");
  EXPECT_TRUE(reg.Attach("good", 0, Self(), 1).ok());
  EXPECT_EQ(reg.StartLoad("bad", Spec(dir_.path()), Self()).code(),
            absl::StatusCode::kAlreadyExists);
  EXPECT_TRUE(reg.Unload("bad", false, Self()).ok());
}

TEST_F(RegistryTest, UnknownTensorsFailWithPlannerMessage) {
  TempDir d;
  WriteSafetensors(d / "model.safetensors",
                   {RandomTensor("model.embed_tokens.weight", {16, 8}, 2, "BF16", 1),
                    RandomTensor("model.layers.0.mystery.weight", {8, 8}, 2, "BF16", 2)});
  std::ofstream(d / "config.json")
      << R"({"architectures":["LlamaForCausalLM"],"hidden_size":8,"num_attention_heads":2,
            "num_key_value_heads":2,"intermediate_size":16,"vocab_size":16,
            "num_hidden_layers":1})";
  Registry reg(&backend_, config_);
  LoadSpec s = Spec(d.path());
  s.recipe.clear();
  ASSERT_TRUE(reg.StartLoad("llama", s, Self()).ok());
  reg.WaitForLoads();
  auto st = reg.Status("llama", Self());
  ASSERT_TRUE(st.ok());
  EXPECT_EQ(st->front().ranks[0].state, RankState::kFailed);
  EXPECT_THAT(st->front().error, HasSubstr("mystery"));
}

TEST_F(RegistryTest, Authorization) {
  Registry reg(&backend_, config_);
  const Peer stranger{4242, 65534, 65534};
  absl::Status s = reg.StartLoad("m", Spec(dir_.path()), stranger);
  EXPECT_EQ(s.code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(std::string(s.message()), HasSubstr("uid 65534"));
  LoadSpec open = Spec(dir_.path());
  open.allow_gids = std::vector<uint32_t>{65534};
  ASSERT_TRUE(reg.StartLoad("m", Spec(dir_.path()), Self()).ok());
  ASSERT_TRUE(reg.StartLoad("shared", open, Self()).ok());
  reg.WaitForLoads();
  auto a = reg.Attach("m", 0, stranger, 1);
  EXPECT_EQ(a.status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(std::string(a.status().message()), HasSubstr("uid 65534"));
  EXPECT_THAT(std::string(a.status().message()), HasSubstr("'m'"));
  EXPECT_TRUE(reg.Attach("shared", 0, stranger, 1).ok());
  // The stranger sees only what it may attach.
  auto all = reg.Status("", stranger);
  ASSERT_TRUE(all.ok());
  ASSERT_EQ(all->size(), 1u);
  EXPECT_EQ(all->front().name, "shared");
  EXPECT_EQ(reg.Unload("shared", true, stranger).code(), absl::StatusCode::kPermissionDenied);
  // Listed uids may administer.
  DaemonConfig c = config_;
  c.allow_uids = {65534};
  Registry reg2(&backend_, c);
  EXPECT_TRUE(reg2.StartLoad("m", Spec(dir_.path()), stranger).ok());
  reg2.WaitForLoads();
}

TEST_F(RegistryTest, ModelRoots) {
  DaemonConfig c = config_;
  TempDir root;
  c.model_roots = {root.path()};
  Registry reg(&backend_, c);
  absl::Status s = reg.StartLoad("m", Spec(dir_.path()), Self());
  EXPECT_EQ(s.code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(std::string(s.message()), HasSubstr("model_roots"));
  std::filesystem::create_directory(root / "ok");
  WriteSafetensors(root / "ok/model.safetensors", tensors_);
  EXPECT_TRUE(reg.StartLoad("m", Spec(root / "ok"), Self()).ok());
  // A symlink inside the root that points outside is resolved and refused.
  std::filesystem::create_directory_symlink(dir_.path(), root / "escape");
  EXPECT_EQ(reg.StartLoad("n", Spec(root / "escape"), Self()).code(),
            absl::StatusCode::kPermissionDenied);
  reg.WaitForLoads();
}

// A host backend whose admission refuses every load, counting allocations.
class RefusingBackend final : public Backend {
 public:
  absl::string_view name() const override { return "host"; }
  ArenaKind arena_kind() const override { return ArenaKind::kHostMemfd; }
  absl::Status Admit(absl::string_view model, absl::Span<const ArenaRequest> arenas) override {
    admitted_arenas = arenas.size();
    return absl::ResourceExhaustedError(absl::StrCat("model '", model, "' does not fit"));
  }
  absl::StatusOr<std::unique_ptr<Arena>> Allocate(const ArenaRequest& request) override {
    ++allocations;
    return host_.Allocate(request);
  }
  size_t admitted_arenas = 0;
  int allocations = 0;

 private:
  HostBackend host_;
};

// A backend whose admission blocks until released: a load stuck where cancellation cannot
// reach it (as a read from a hung network filesystem would be).
class BlockingBackend final : public Backend {
 public:
  absl::string_view name() const override { return "host"; }
  ArenaKind arena_kind() const override { return ArenaKind::kHostMemfd; }
  absl::Status Admit(absl::string_view, absl::Span<const ArenaRequest>) override {
    entered.Notify();
    release.WaitForNotification();
    return absl::OkStatus();
  }
  absl::StatusOr<std::unique_ptr<Arena>> Allocate(const ArenaRequest& request) override {
    return host_.Allocate(request);
  }
  absl::Notification entered, release;

 private:
  HostBackend host_;
};

TEST_F(RegistryTest, ShutdownIsBoundedWhenALoadCannotBeCancelled) {
  BlockingBackend backend;
  Registry reg(&backend, config_);
  ASSERT_TRUE(reg.StartLoad("stuck", Spec(dir_.path()), Self()).ok());
  backend.entered.WaitForNotification();
  const std::vector<std::string> stuck = reg.Shutdown(absl::Milliseconds(200));
  EXPECT_THAT(stuck, ::testing::ElementsAre("stuck"));
  // Once the load can move again it sees the cancel and ends; the registry then joins it.
  backend.release.Notify();
  EXPECT_TRUE(reg.Shutdown().empty());
}

TEST_F(RegistryTest, AdmissionRefusalFailsTheLoadBeforeAnyAllocation) {
  RefusingBackend backend;
  Registry reg(&backend, config_);
  ASSERT_TRUE(reg.StartLoad("m", Spec(dir_.path(), 2), Self()).ok());
  reg.WaitForLoads();
  auto st = reg.Status("m", Self());
  ASSERT_TRUE(st.ok()) << st.status();
  EXPECT_THAT(st->front().error, HasSubstr("model 'm' does not fit"));
  EXPECT_EQ(backend.admitted_arenas, 2u);  // both ranks' arenas in one check
  EXPECT_EQ(backend.allocations, 0);
}

// A ready model's fds (as the fd store gets them) are adopted by a second registry; its record
// carries the arena kind, and a record claiming device arenas is refused naming both kinds.
TEST_F(RegistryTest, AdoptsStoredFdsAndRefusesTheOtherKind) {
  std::vector<NamedFd> stored;
  {
    Registry reg(&backend_, config_);
    reg.SetHooks({.on_ready = [&](std::vector<NamedFd> fds) { stored = std::move(fds); },
                  .on_removed = nullptr});
    ASSERT_TRUE(reg.StartLoad("m", Spec(dir_.path(), 2), Self()).ok());
    reg.WaitForLoads();
  }
  ASSERT_EQ(stored.size(), 5u);  // 2 arenas, 2 manifests, 1 record
  auto sorted = [&] {
    std::vector<NamedFd> copy;
    for (const NamedFd& f : stored) {
      copy.push_back({f.name, UniqueFd(::fcntl(f.fd.get(), F_DUPFD_CLOEXEC, 0))});
    }
    return SortNamedFds(std::move(copy));
  };
  SortedFds good = sorted();
  ASSERT_EQ(good.models.size(), 1u) << ::testing::PrintToString(good.errors);
  EXPECT_EQ(good.models[0].record.ranks[0].arena_kind, ArenaKind::kHostMemfd);
  Registry next(&backend_, config_);
  ASSERT_TRUE(next.Adopt(std::move(good.models[0]), "takeover").ok());
  EXPECT_EQ(StateOf(next, "m"), "ready");

  SortedFds forged = sorted();
  ASSERT_EQ(forged.models.size(), 1u);
  for (AdoptableRank& r : forged.models[0].ranks) r.record.arena_kind = ArenaKind::kCudaVmm;
  Registry third(&backend_, config_);
  const absl::Status s = third.Adopt(std::move(forged.models[0]), "fdstore");
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(s.message()), HasSubstr("adopting model 'm'"));
  EXPECT_THAT(std::string(s.message()), HasSubstr("a host memfd"));
  EXPECT_THAT(std::string(s.message()), HasSubstr("CUDA VMM device memory"));
}

// The fd store sees a model's changes in the order the registry made them: an unload that comes
// while the load thread is still storing the fds of the model it just made ready removes them
// after they were stored, not before (which would leave an unloaded model in the store, to be
// re-adopted at the next start).
TEST_F(RegistryTest, FdStoreHooksRunInTheOrderOfTheChanges) {
  absl::Mutex mu;
  std::vector<std::string> events;
  absl::Notification storing, release;
  Registry reg(&backend_, config_);
  reg.SetHooks({.on_ready =
                    [&](std::vector<NamedFd>) {
                      storing.Notify();
                      release.WaitForNotification();  // a slow sd_notify
                      absl::MutexLock l(&mu);
                      events.push_back("stored");
                    },
                .on_removed =
                    [&](std::vector<std::string>) {
                      absl::MutexLock l(&mu);
                      events.push_back("removed");
                    }});
  ASSERT_TRUE(reg.StartLoad("m", Spec(dir_.path()), Self()).ok());
  storing.WaitForNotification();
  ASSERT_EQ(StateOf(reg, "m"), "ready");  // a client may unload it now
  std::thread unloader([&] { EXPECT_TRUE(reg.Unload("m", false, Self()).ok()); });
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  release.Notify();
  unloader.join();
  reg.WaitForLoads();
  absl::MutexLock l(&mu);
  EXPECT_THAT(events, ::testing::ElementsAre("stored", "removed"));
}

TEST(LogTest, RateLimitAdmitsABurstPerIntervalAndCountsTheRest) {
  LogRateLimit limit(3, absl::Seconds(10));
  const absl::Time t0 = absl::FromUnixSeconds(1000);
  uint64_t suppressed = 99;
  for (int i = 0; i < 3; ++i) {
    EXPECT_TRUE(limit.Admit(t0 + absl::Seconds(i), &suppressed));
    EXPECT_EQ(suppressed, 0u);
  }
  for (int i = 0; i < 1000; ++i) EXPECT_FALSE(limit.Admit(t0 + absl::Seconds(9), &suppressed));
  // A new window: the first line admitted carries the count of the dropped ones.
  EXPECT_TRUE(limit.Admit(t0 + absl::Seconds(10), &suppressed));
  EXPECT_EQ(suppressed, 1000u);
  EXPECT_TRUE(limit.Admit(t0 + absl::Seconds(11), &suppressed));
  EXPECT_EQ(suppressed, 0u);
}

// stderr goes to a file while the object lives; Text() is what was written.
class CaptureStderr {
 public:
  explicit CaptureStderr(const std::string& path) : path_(path), saved_(::dup(STDERR_FILENO)) {
    const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    ::dup2(fd, STDERR_FILENO);
    ::close(fd);
  }
  ~CaptureStderr() { Restore(); }
  std::string Text() {
    Restore();
    auto text = ReadFileToString(path_, 1 << 24);
    return text.ok() ? *text : std::string(text.status().message());
  }

 private:
  void Restore() {
    if (saved_ < 0) return;
    ::dup2(saved_, STDERR_FILENO);
    ::close(std::exchange(saved_, -1));
  }
  std::string path_;
  int saved_;
};

TEST(LogTest, LimitedLinesHaveABudgetPerCallSite) {
  TempDir dir;
  InitLogging(LogLevel::kInfo);
  CaptureStderr capture(dir / "log");
  for (int i = 0; i < 10000; ++i) WD_LOG_LIMITED(LogLevel::kWarning, "flood %d", i);
  for (int i = 0; i < 3; ++i) WD_LOG_LIMITED(LogLevel::kWarning, "another site %d", i);
  // Below the threshold: neither written nor counted.
  for (int i = 0; i < 10; ++i) WD_LOG_LIMITED(LogLevel::kDebug, "debug %d", i);
  const std::string text = capture.Text();
  size_t flood = 0, other = 0;
  for (size_t at = 0; (at = text.find("flood ", at)) != std::string::npos; ++at) ++flood;
  for (size_t at = 0; (at = text.find("another site ", at)) != std::string::npos; ++at) ++other;
  EXPECT_EQ(flood, static_cast<size_t>(kLogLimitLines)) << text;
  EXPECT_EQ(other, 3u) << text;
  EXPECT_THAT(text, Not(HasSubstr("debug")));
  EXPECT_LT(text.size(), 2000u);
}

// Each family of a text exposition must be one group: its HELP line, its TYPE line, then all
// its samples, with no line of another family in between (Prometheus text format 0.0.4).
void ExpectContiguousFamilies(const std::string& text) {
  std::vector<std::string> groups;  // family of each run of consecutive lines
  std::set<std::string> helped, typed;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) {
    ASSERT_FALSE(line.empty());
    std::string family;
    if (line.rfind("# HELP ", 0) == 0 || line.rfind("# TYPE ", 0) == 0) {
      family = line.substr(7, line.find(' ', 7) - 7);
      if (line[2] == 'H') {
        EXPECT_TRUE(helped.insert(family).second) << "second HELP line of " << family;
      } else {
        EXPECT_TRUE(helped.count(family)) << "TYPE before HELP for " << family;
        EXPECT_TRUE(typed.insert(family).second) << "second TYPE line of " << family;
      }
    } else {
      family = line.substr(0, line.find_first_of("{ "));
      EXPECT_TRUE(typed.count(family)) << "sample before its TYPE line: " << line;
    }
    if (groups.empty() || groups.back() != family) groups.push_back(family);
  }
  const std::set<std::string> distinct(groups.begin(), groups.end());
  EXPECT_EQ(distinct.size(), groups.size()) << "a family is split into several groups:\n"
                                            << absl::StrJoin(groups, "\n");
}

TEST(MetricsTextTest, FamiliesAndLabelEscaping) {
  MetricFamily f("weightd_x", "gauge", "An example.");
  f.Add("", 1);
  f.Add(Labels({{"model", "a\"b\\c\nd"}, {"rank", "0"}}), uint64_t{18446744073709551615ull});
  std::string out;
  f.AppendTo(&out);
  EXPECT_EQ(out,
            "# HELP weightd_x An example.\n# TYPE weightd_x gauge\nweightd_x 1\n"
            "weightd_x{model=\"a\\\"b\\\\c\\nd\",rank=\"0\"} 18446744073709551615\n");
  ExpectContiguousFamilies(out);
}

TEST_F(RegistryTest, MetricsFamiliesAreContiguous) {
  Registry reg(&backend_, config_);
  ASSERT_TRUE(reg.StartLoad("m", Spec(dir_.path(), 2), Self()).ok());
  ASSERT_TRUE(reg.StartLoad("n", Spec(dir_.path(), 2), Self()).ok());
  reg.WaitForLoads();
  ASSERT_TRUE(reg.Attach("n", 1, Self(), 3).ok());
  const std::string m = reg.Metrics();
  ExpectContiguousFamilies(m);
  EXPECT_THAT(m, HasSubstr("weightd_rank_leases{model=\"n\",rank=\"1\"} 1\n"));
  EXPECT_THAT(m, HasSubstr("weightd_load_bytes_done{model=\"m\"} "));
  EXPECT_THAT(m, HasSubstr("weightd_load_bytes_total{model=\"n\"} "));
}

TEST_F(RegistryTest, MetricsText) {
  Registry reg(&backend_, config_);
  ASSERT_TRUE(reg.StartLoad("m", Spec(dir_.path()), Self()).ok());
  reg.WaitForLoads();
  const std::string m = reg.Metrics();
  EXPECT_THAT(m, HasSubstr("weightd_models 1\n"));
  EXPECT_THAT(m, HasSubstr("weightd_rank_ready{model=\"m\",rank=\"0\"} 1\n"));
  EXPECT_THAT(m, HasSubstr("weightd_loads_total 1\n"));
}

// ---- segments (segment_plan.h) ----

TEST(SegmentPlanTest, LayerOfFindsTheDecoderLayer) {
  EXPECT_EQ(LayerOf("model.layers.0.self_attn.qkv_proj.weight"), 0u);
  EXPECT_EQ(LayerOf("model.layers.31.mlp.down_proj.weight"), 31u);
  EXPECT_EQ(LayerOf("layers.7.attention.wq.weight"), 7u);
  EXPECT_EQ(LayerOf("model.language_model.layers.12.mlp.w2"), 12u);
  EXPECT_EQ(LayerOf("model.embed_tokens.weight"), std::nullopt);
  EXPECT_EQ(LayerOf("lm_head.weight"), std::nullopt);
  EXPECT_EQ(LayerOf("model.norm.weight"), std::nullopt);
  EXPECT_EQ(LayerOf("model.sublayers.3.w"), std::nullopt);  // not a '.layers.' component
  EXPECT_EQ(LayerOf("model.layers.x.w"), std::nullopt);
  EXPECT_EQ(LayerOf("model.layers.3"), std::nullopt);
}

// A hand-made plan of one rank: names sorted, offsets laid out as BuildPlan does, a piece per
// target (source i -> target i) and a zero-fill and a cast on lm_head.
Plan SegmentTestPlan() {
  Plan plan;
  plan.files.push_back({"/x.safetensors", 1 << 20, 1 << 20, std::nullopt});
  const std::vector<std::pair<std::string, uint64_t>> targets = {
      {"lm_head.weight", 1000},         {"model.embed_tokens.weight", 1000},
      {"model.layers.0.a.weight", 300}, {"model.layers.0.b.weight", 100},
      {"model.layers.1.a.weight", 300}, {"model.layers.10.a.weight", 300},
      {"model.layers.2.a.weight", 300}, {"model.norm.weight", 10},
  };
  RankPlan rp;
  rp.rank = 3;
  uint64_t offset = 0, src = 0;
  for (uint32_t i = 0; i < targets.size(); ++i) {
    PlanTarget t;
    t.name = targets[i].first;
    t.dtype = DType::kU8;
    t.shape = {static_cast<int64_t>(targets[i].second)};
    t.offset = offset;
    t.nbytes = targets[i].second;
    offset = (offset + t.nbytes + kTargetAlignment - 1) / kTargetAlignment * kTargetAlignment;
    rp.targets.push_back(t);
    plan.sources.push_back({t.name, DType::kU8, t.shape, 0, src, t.nbytes});
    src += t.nbytes;
    PlanPiece p;
    p.source = i;
    p.target = i;
    p.src_shape = p.dst_shape = p.extent = {1, 1, t.shape[0]};
    rp.pieces.push_back(p);
  }
  rp.arena_bytes = offset;
  rp.zero_fills.push_back({0, 900, 100});
  rp.transforms.push_back({PlanTransform::Kind::kCast, 0, DType::kU8, DType::kU8});
  plan.ranks.push_back(rp);
  return plan;
}

TEST(SegmentPlanTest, ConsecutiveLayersShareASegmentUpToTheTarget) {
  const Plan plan = SegmentTestPlan();
  // Aligned layer sizes: layer 0 768 bytes, layers 1, 2 and 10 512 each.
  SegmentAssignment a = ChooseSegments(plan, 1024);
  ASSERT_EQ(a.size(), 1u);
  // Names in plan order: lm_head, embed, L0.a, L0.b, L1, L10, L2, norm.
  EXPECT_EQ(a[0], (std::vector<uint32_t>{0, 0, 1, 1, 2, 3, 2, 0}));
  // A target below one layer: one layer per segment.
  EXPECT_EQ(ChooseSegments(plan, 1)[0], (std::vector<uint32_t>{0, 0, 1, 1, 2, 4, 3, 0}));
  // Large enough for every layer: one segment of layers.
  EXPECT_EQ(ChooseSegments(plan, 1 << 20)[0], (std::vector<uint32_t>{0, 0, 1, 1, 1, 1, 1, 0}));
  // 0: one arena per rank.
  EXPECT_EQ(ChooseSegments(plan, 0)[0], (std::vector<uint32_t>(8, 0)));
}

TEST(SegmentPlanTest, SplitRelaysTargetsAndRemapsPiecesPerSegment) {
  const Plan plan = SegmentTestPlan();
  absl::StatusOr<SegmentedPlan> sp = SplitPlan(plan, ChooseSegments(plan, 1024));
  ASSERT_TRUE(sp.ok()) << sp.status();
  ASSERT_EQ(sp->plan.ranks.size(), 4u);
  EXPECT_EQ(sp->segments_of, (std::vector<std::vector<size_t>>{{0, 1, 2, 3}}));
  EXPECT_EQ(sp->rank_of, (std::vector<size_t>{0, 0, 0, 0}));
  EXPECT_EQ(sp->segment_in_rank, (std::vector<uint32_t>{0, 1, 2, 3}));
  EXPECT_EQ(sp->input_target[0], (std::vector<uint32_t>{0, 1, 7}));
  EXPECT_EQ(sp->input_target[2], (std::vector<uint32_t>{4, 6}));
  EXPECT_EQ(sp->plan.sources.size(), plan.sources.size());
  uint64_t total = 0;
  for (size_t s = 0; s < sp->plan.ranks.size(); ++s) {
    const RankPlan& seg = sp->plan.ranks[s];
    EXPECT_EQ(seg.rank, 3);
    uint64_t end = 0;
    for (size_t t = 0; t < seg.targets.size(); ++t) {
      EXPECT_EQ(seg.targets[t].offset, end) << seg.targets[t].name;  // laid out from 0
      end = (end + seg.targets[t].nbytes + 255) / 256 * 256;
      const uint32_t in = sp->input_target[s][t];
      EXPECT_EQ(seg.targets[t].name, plan.ranks[0].targets[in].name);
      EXPECT_EQ(sp->where[0][in], (std::pair<size_t, uint32_t>{s, static_cast<uint32_t>(t)}));
    }
    EXPECT_EQ(seg.arena_bytes, end);
    total += seg.arena_bytes;
    // Each piece feeds the target of its own source, re-numbered within the segment.
    ASSERT_EQ(seg.pieces.size(), seg.targets.size());
    for (const PlanPiece& p : seg.pieces) {
      EXPECT_EQ(sp->plan.sources[p.source].name, seg.targets[p.target].name);
    }
  }
  EXPECT_EQ(total, 2 * 1024u + 256u + 768u + 2 * 512u + 512u);
  EXPECT_EQ(sp->plan.ranks[1].targets[0].name, "model.layers.0.a.weight");
  ASSERT_EQ(sp->plan.ranks[0].zero_fills.size(), 1u);
  EXPECT_EQ(sp->plan.ranks[0].zero_fills[0].target, 0u);
  ASSERT_EQ(sp->plan.ranks[0].transforms.size(), 1u);
  EXPECT_TRUE(sp->plan.ranks[1].zero_fills.empty());

  // One segment: the layout of a daemon before segments, offset for offset.
  absl::StatusOr<SegmentedPlan> one = SplitPlan(plan, ChooseSegments(plan, 0));
  ASSERT_TRUE(one.ok()) << one.status();
  ASSERT_EQ(one->plan.ranks.size(), 1u);
  EXPECT_EQ(one->plan.ranks[0].arena_bytes, plan.ranks[0].arena_bytes);
  for (size_t t = 0; t < plan.ranks[0].targets.size(); ++t) {
    EXPECT_EQ(one->plan.ranks[0].targets[t].offset, plan.ranks[0].targets[t].offset);
  }
}

TEST(SegmentPlanTest, SplitRefusesAnAssignmentThatDoesNotFit) {
  const Plan plan = SegmentTestPlan();
  absl::StatusOr<SegmentedPlan> sp = SplitPlan(plan, {});
  ASSERT_FALSE(sp.ok());
  EXPECT_EQ(sp.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(sp.status().message()), HasSubstr("plan has 1"));
  sp = SplitPlan(plan, {{0, 0, 2, 2, 2, 2, 2, 0}});
  ASSERT_FALSE(sp.ok());
  EXPECT_THAT(std::string(sp.status().message()),
              HasSubstr("rank 3: segment numbers 0..2 leave a gap"));
  sp = SplitPlan(plan, {{0, 0}});
  ASSERT_FALSE(sp.ok());
  EXPECT_THAT(std::string(sp.status().message()),
              HasSubstr("rank 3: segments are given for 2 targets"));
}

TEST(ConfigTest, ArenaSegmentBytes) {
  auto c = ParseConfig("{}", "t.json");
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->arena_segment_bytes, 256ull << 20);
  c = ParseConfig(R"({"arena_segment_bytes":"64MiB"})", "t.json");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->arena_segment_bytes, 64ull << 20);
  c = ParseConfig(R"({"arena_segment_bytes":0})", "t.json");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->arena_segment_bytes, 0u);
  ExpectConfigError(R"({"arena_segment_bytes":"lots"})", "arena_segment_bytes");
}

TEST(HandoffTest, RecordsCarrySeveralArenasPerRank) {
  ModelRecord rec;
  rec.name = "m";
  rec.backend = "host";
  rec.spec.checkpoint = "/models/m";
  rec.ranks.push_back({0, -1, 4096, 100, 7, 5});
  absl::StatusOr<ModelRecord> back = ParseModelRecord(EncodeModelRecord(rec));
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->ranks[0].parts, 5);
  rec.ranks[0].parts = 0;
  back = ParseModelRecord(EncodeModelRecord(rec));
  ASSERT_FALSE(back.ok());
  EXPECT_THAT(std::string(back.status().message()), HasSubstr("ranks[].parts"));
}

}  // namespace
}  // namespace weightd
