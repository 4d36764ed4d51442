// Live weight updates end to end (docs/PROTOCOL.md "Generations: update, wait_generation,
// refresh, rollback"): the real weightd on a temporary socket, driven by the C++ client,
// `weightctl` and raw protocol connections, with real child processes where a peer must die or
// run as another uid.
//
// Checkpoints are written once per run (UpdateEnvironment) under <tmp>/models, the daemons'
// model_roots: a small Llama with GQA (8 query heads, 2 KV heads, vocab 2000 padded at T=2) and a
// small Mixtral (4 experts), each twice with different random values (tests/python/
// hf_checkpoints.py, seeds 1/2 and 3/4), "moeA2" (moeA with one layer's q/k/v and one expert's
// w1/w2/w3 taken from moeB), "moeA3" (moeA with one expert of moeB), "llamaAB1" (llamaA with the
// tensors of llamaB's first shard file), "llamaAL1" (llamaA with llamaB's layer 1), and "big", a
// 200 MiB synthetic Llama (support/ synthetic_checkpoint.h) whose updates take long enough to be
// caught running. What a rank must hold is what `weightctl shard --tp 2` writes offline for the
// same checkpoint, read back with weightd's own safetensors reader (Checkpoint).
//
// Every test starts a daemon of its own (UpdateTest::StartDaemon, --backend host unless it says
// otherwise) and stops it with SIGTERM, which must exit 0. Every wait is bounded. Races that a
// fast machine can win (an update finishing before it is cancelled, a load before the update
// that should find it loading) are retried up to three times, each outcome checked in full, and
// the case under test must be seen at least once. The *OnDeviceArenas tests run with
// `--backend cuda` on the simulated driver (ctest sim:update_test_cuda) or a GPU, and skip
// otherwise.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "support/proc_resources.h"
#include "support/process.h"
#include "support/synthetic_checkpoint.h"
#include "weightd/checkpoint.h"
#include "weightd/client.h"
#include "weightd/seqpacket.h"
#include "weightd/unique_fd.h"

namespace weightd {
namespace {

using ::testing::HasSubstr;
using ::testing::IsEmpty;
using ::testing::Not;
using json = nlohmann::json;
using std::chrono::milliseconds;
using std::chrono::seconds;
using testing::Clock;
using testing::Slurp;
using testing::Spawn;
using testing::WaitFor;
using testing::WaitUntil;

// One rank's tensors: name -> bytes.
using RankBytes = std::map<std::string, std::string>;

std::string g_root;  // the run's directory: models/ (model_roots) and shards/

std::string Model(const std::string& name) { return g_root + "/models/" + name; }

// The tensors of the big synthetic model, read with the `hf` recipe at T=1 (names and bytes as
// stored). 200 MiB in BF16.
std::vector<testing::SyntheticTensor> BigTensors() {
  return testing::LlamaTensors(/*h=*/2048, /*nh=*/16, /*nkv=*/4, /*hd=*/128, /*inter=*/4096,
                               /*vocab=*/8192, /*layers=*/2);
}

// The tensors moeA2 takes from moeB (PartialUpdateRewritesOnlyTheAffectedSlices).
const std::vector<std::string>& PartialNames() {
  static const std::vector<std::string> names = {
      "model.layers.1.self_attn.q_proj.weight",
      "model.layers.1.self_attn.k_proj.weight",
      "model.layers.1.self_attn.v_proj.weight",
      "model.layers.0.block_sparse_moe.experts.2.w1.weight",
      "model.layers.0.block_sparse_moe.experts.2.w2.weight",
      "model.layers.0.block_sparse_moe.experts.2.w3.weight",
  };
  return names;
}

// Writes the small checkpoints with tests/python/hf_checkpoints.py (argv[1]: its directory,
// argv[2]: the models directory, argv[3..]: the names moeA2 takes from moeB). moeA3 takes layer
// 0's expert 3 from moeB, which expert parallelism at T=2 places on rank 1 only. llamaAB1 is
// llamaA with the tensors of llamaB's first shard file.
constexpr const char kMakeCheckpoints[] = R"py(
import json
import sys
sys.path.insert(0, sys.argv[1])
import hf_checkpoints as hf
root = sys.argv[2]
llama = dict(H=256, nH=8, nKV=2, I=512, V=2000, layers=2)
la, lcfg = hf.make(root + "/llamaA", "llama", seed=1, **llama)
lb, _ = hf.make(root + "/llamaB", "llama", seed=2, **llama)
with open(root + "/llamaB/model.safetensors.index.json") as f:
    weight_map = json.load(f)["weight_map"]
ab1 = dict(la)
for name, file in weight_map.items():
    if file == "model-00001-of-00003.safetensors":
        ab1[name] = lb[name]
hf.write(root + "/llamaAB1", ab1, lcfg)
al1 = dict(la)
for name in lb:
    if name.startswith("model.layers.1."):
        al1[name] = lb[name]
hf.write(root + "/llamaAL1", al1, lcfg)
moe = dict(H=128, nH=4, nKV=2, E=4, Ie=128, V=1000, layers=2)
a, cfg = hf.make(root + "/moeA", "mixtral", seed=3, **moe)
b, _ = hf.make(root + "/moeB", "mixtral", seed=4, **moe)
a2 = dict(a)
for name in sys.argv[3:]:
    assert name in a, name
    a2[name] = b[name]
hf.write(root + "/moeA2", a2, cfg)
a3 = dict(a)
for w in ("w1", "w2", "w3"):
    name = "model.layers.0.block_sparse_moe.experts.3.%s.weight" % w
    a3[name] = b[name]
hf.write(root + "/moeA3", a3, cfg)
)py";

struct RunResult {
  int exit_code = -1;
  std::string out, err;
};

RunResult RunProcess(const std::vector<std::string>& argv,
                     std::chrono::milliseconds timeout = seconds(120)) {
  static std::atomic<int> n{0};
  const std::string base = g_root + "/run" + std::to_string(n++);
  RunResult r;
  r.exit_code = WaitFor(Spawn(argv, base + ".out", base + ".err"), timeout);
  r.out = Slurp(base + ".out");
  r.err = Slurp(base + ".err");
  return r;
}

// Every rank's tensors as `weightctl shard CKPT --tp 2 FLAGS...` writes them, read with
// weightd's own safetensors reader. Computed once per checkpoint and flags.
const std::vector<RankBytes>& Shard(const std::string& ckpt,
                                    const std::vector<std::string>& flags = {}) {
  static std::mutex mu;
  static std::map<std::string, std::vector<RankBytes>> cache;
  std::lock_guard<std::mutex> l(mu);
  const std::string key = absl::StrJoin(flags, "", [](std::string* out, const std::string& f) {
    absl::StrAppend(out, "-", f.substr(f.find_first_not_of('-')));
  });
  auto it = cache.find(ckpt + key);
  if (it != cache.end()) return it->second;
  std::vector<RankBytes>& ranks = cache[ckpt + key];
  const std::string out = g_root + "/shards/" + ckpt + key;
  std::vector<std::string> argv = {WEIGHTCTL_BIN, "shard", Model(ckpt), "--tp", "2", "--out", out};
  argv.insert(argv.end(), flags.begin(), flags.end());
  const RunResult s = RunProcess(argv);
  EXPECT_EQ(s.exit_code, 0) << s.out << s.err;
  for (int r = 0; r < 2; ++r) {
    const std::string file = out + "/model-rank-" + std::to_string(r) + "-part-0.safetensors";
    absl::StatusOr<Checkpoint> c = Checkpoint::Open(file);
    EXPECT_TRUE(c.ok()) << c.status();
    RankBytes rb;
    if (c.ok()) {
      for (const CheckpointTensor& t : c->tensors()) {
        absl::StatusOr<std::span<const std::byte>> b = c->MapTensor(t);
        EXPECT_TRUE(b.ok()) << b.status();
        if (b.ok()) rb[t.name].assign(reinterpret_cast<const char*>(b->data()), b->size());
      }
    }
    EXPECT_FALSE(rb.empty()) << file;
    ranks.push_back(std::move(rb));
  }
  return ranks;
}

// Names of the tensors of `a` whose bytes differ from `want`, or that only one side has. Reads
// through Attachment::Read (a memcpy for host arenas, cuMemcpyDtoH for device ones).
std::vector<std::string> Differences(const Attachment& a, const RankBytes& want) {
  std::vector<std::string> out;
  std::set<std::string> seen;
  std::string got;
  for (const TensorView& t : a.tensors()) {
    seen.insert(t.name);
    auto it = want.find(t.name);
    if (it == want.end()) {
      out.push_back(t.name + " (not expected)");
      continue;
    }
    got.assign(t.nbytes, '\0');
    const absl::Status s = a.Read(t, 0, got.data(), t.nbytes);
    if (!s.ok()) {
      out.push_back(absl::StrCat(t.name, " (", s.ToString(), ")"));
    } else if (got != it->second) {
      out.push_back(t.name);
    }
  }
  for (const auto& [name, bytes] : want) {
    if (seen.count(name) == 0) out.push_back(name + " (missing)");
  }
  return out;
}

// Tensors whose bytes differ between two ranks' expectations.
std::vector<std::string> ChangedNames(const RankBytes& a, const RankBytes& b) {
  std::vector<std::string> out;
  for (const auto& [name, bytes] : a) {
    auto it = b.find(name);
    if (it == b.end() || it->second != bytes) out.push_back(name);
  }
  return out;
}

// A sealed memfd (F_SEAL_WRITE|SHRINK|GROW|SEAL) holding a safetensors file of `tensors`, every
// data byte `fill`. Invalid on failure (the test then fails on its use).
UniqueFd PatternMemfd(const std::vector<testing::SyntheticTensor>& tensors, uint8_t fill) {
  json header = json::object();
  uint64_t off = 0;
  for (const testing::SyntheticTensor& t : tensors) {
    const uint64_t n = testing::SyntheticBytes(t);
    header[t.name] = {{"dtype", t.dtype}, {"shape", t.shape}, {"data_offsets", {off, off + n}}};
    off += n;
  }
  std::string h = header.dump();
  h.append((8 - h.size() % 8) % 8, ' ');
  UniqueFd fd(::memfd_create("wd-update-test", MFD_CLOEXEC | MFD_ALLOW_SEALING));
  if (!fd) return fd;
  const uint64_t len = h.size();
  std::string head(reinterpret_cast<const char*>(&len), 8);
  head += h;
  if (::write(fd.get(), head.data(), head.size()) != static_cast<ssize_t>(head.size())) {
    return UniqueFd();
  }
  const std::string chunk(8 << 20, static_cast<char>(fill));
  for (uint64_t done = 0; done < off;) {
    const size_t n = static_cast<size_t>(std::min<uint64_t>(chunk.size(), off - done));
    if (::write(fd.get(), chunk.data(), n) != static_cast<ssize_t>(n)) return UniqueFd();
    done += n;
  }
  if (::fcntl(fd.get(), F_ADD_SEALS, F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) !=
      0) {
    return UniqueFd();
  }
  return fd;
}

// A raw protocol connection (requests the C++ client cannot send).
class Raw {
 public:
  explicit Raw(const std::string& socket) {
    auto fd = ConnectSeqpacket(socket);
    EXPECT_TRUE(fd.ok()) << fd.status();
    if (fd.ok()) fd_ = std::move(*fd);
  }
  bool Send(const json& request, std::vector<int> fds = {}) {
    return SendPacket(fd_.get(), request.dump(), fds).ok();
  }
  // The reply, or {"eof":true} / {"timeout":true}.
  json Call(const json& request, std::vector<int> fds = {}, int timeout_ms = 10000) {
    if (!Send(request, std::move(fds))) return {{"send_failed", true}};
    pollfd p{fd_.get(), POLLIN, 0};
    if (::poll(&p, 1, timeout_ms) <= 0) return {{"timeout", true}};
    auto pkt = RecvPacket(fd_.get(), 1 << 20);
    if (!pkt.ok() || pkt->eof) return {{"eof", true}};
    return json::parse(pkt->data, nullptr, false);
  }
  bool Hello() { return Call({{"op", "hello"}, {"version", 1}}).value("ok", false); }

 private:
  UniqueFd fd_;
};

std::string Code(const json& r) {
  return r.contains("error") ? r["error"].value("code", "") : "(no error: " + r.dump() + ")";
}
std::string Message(const json& r) {
  return r.contains("error") ? r["error"].value("message", "") : "";
}

// Writes the checkpoints once for the whole run and removes everything at the end.
class UpdateEnvironment : public ::testing::Environment {
 public:
  void SetUp() override {
    char tmpl[] = "/tmp/weightd-update-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    g_root = tmpl;
    ::chmod(g_root.c_str(), 0755);  // the uid-65534 child reaches the sockets below it
    std::filesystem::create_directories(g_root + "/models");
    std::filesystem::create_directories(g_root + "/shards");
    std::vector<std::string> argv = {PYTHON_BIN, "-c", kMakeCheckpoints, HF_CHECKPOINTS_DIR,
                                     g_root + "/models"};
    argv.insert(argv.end(), PartialNames().begin(), PartialNames().end());
    const RunResult mk = RunProcess(argv);
    ASSERT_EQ(mk.exit_code, 0) << mk.out << mk.err;
    const std::string big = Model("big");
    ASSERT_TRUE(testing::WriteSyntheticCheckpoint(
        big, BigTensors(), 2, testing::LlamaConfig(2048, 16, 4, 4096, 8192, 2)));
    ASSERT_TRUE(testing::FillSyntheticCheckpoint(big, 7));
  }
  void TearDown() override {
    if (g_root.empty()) return;
    std::error_code ec;
    std::filesystem::remove_all(g_root, ec);
  }
};
const auto* const kEnvironment = ::testing::AddGlobalTestEnvironment(new UpdateEnvironment);

class UpdateTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_FALSE(g_root.empty());
    static int n = 0;
    dir_ = g_root + "/t" + std::to_string(n++);
    std::filesystem::create_directories(dir_);
    ::chmod(dir_.c_str(), 0755);
    socket_ = dir_ + "/weightd.sock";
  }
  void TearDown() override {
    StopDaemon();
    if (HasFailure()) {
      const std::string log = Slurp(dir_ + "/weightd.log");
      std::fprintf(stderr, "---- weightd log (last 8000 bytes) ----\n%s\n",
                   log.substr(log.size() > 8000 ? log.size() - 8000 : 0).c_str());
    }
  }

  // Starts weightd with `backend`, the run's model_roots, a 0666 socket and the `extra` config
  // keys. False when it exits before serving (its log says why).
  bool StartDaemon(const json& extra = json::object(), const std::string& backend = "host") {
    json cfg = {{"socket", socket_},
                {"backend", backend},
                {"io_threads", 2},
                {"socket_mode", "0666"},
                {"model_roots", {g_root + "/models"}}};
    cfg.update(extra);
    std::ofstream(dir_ + "/weightd.json") << cfg.dump();
    daemon_ = Spawn({WEIGHTD_BIN, "--config", dir_ + "/weightd.json", "--log-level", "debug"},
                    dir_ + "/weightd.out", dir_ + "/weightd.log");
    const bool up = WaitUntil([&] {
      int status = 0;
      if (::waitpid(daemon_, &status, WNOHANG) == daemon_) {
        daemon_ = -1;
        return true;
      }
      return Client::Connect(socket_).ok();
    });
    return up && daemon_ > 0;
  }
  void StopDaemon() {
    if (daemon_ <= 0) return;
    ::kill(daemon_, SIGTERM);
    EXPECT_EQ(WaitFor(daemon_, seconds(30)), 0) << "weightd did not exit cleanly";
    daemon_ = -1;
  }

  absl::StatusOr<Client> Connect() const { return Client::Connect(socket_); }

  // Loads `ckpt` (a name under models/) as `name` and waits for the load to end; "" when the
  // model is ready, else what went wrong.
  std::string Load(const std::string& name, const std::string& ckpt, int tp = 1,
                   const std::string& recipe = "", LoadOptions o = {}) {
    absl::StatusOr<Client> c = Connect();
    if (!c.ok()) return c.status().ToString();
    o.tp = tp;
    o.recipe = recipe;
    if (absl::Status s = c->Load(name, Model(ckpt), o); !s.ok()) return s.ToString();
    std::string state, error;
    WaitUntil(
        [&] {
          auto st = c->Status(name);
          if (!st.ok()) {
            state = st.status().ToString();
            return true;
          }
          state = st->front().state;
          error = st->front().error;
          return state != "loading";
        },
        seconds(60));
    return state == "ready" ? "" : state + ": " + error;
  }

  // The model as `status` shows it (name empty when it cannot be had).
  ModelInfo Info(const std::string& name) const {
    absl::StatusOr<Client> c = Connect();
    if (!c.ok()) return {};
    auto st = c->Status(name);
    if (!st.ok() || st->empty()) return {};
    return st->front();
  }

  // The value of the metric line `key` (with its labels), "absent" when missing.
  std::string Metric(const std::string& key) const {
    absl::StatusOr<Client> c = Connect();
    if (!c.ok()) return "connect failed";
    auto m = c->Metrics();
    if (!m.ok()) return "metrics failed";
    const size_t p = m->find("\n" + key + " ");
    if (p == std::string::npos) return "absent";
    const size_t b = p + key.size() + 2;
    return m->substr(b, m->find('\n', b) - b);
  }
  std::string Held(const std::string& model) const {
    return Metric("weightd_model_generations_held{model=\"" + model + "\"}");
  }

  // Attaches every rank of `name` (T=2) on `c` and checks each against `want`.
  void ExpectServes(const std::string& name, uint64_t generation,
                    const std::vector<RankBytes>& want, const std::string& what) {
    SCOPED_TRACE(what);
    absl::StatusOr<Client> c = Connect();
    ASSERT_TRUE(c.ok()) << c.status();
    EXPECT_EQ(Info(name).generation, generation);
    for (int r = 0; r < static_cast<int>(want.size()); ++r) {
      absl::StatusOr<Attachment> a = c->Attach(name, r);
      ASSERT_TRUE(a.ok()) << a.status();
      EXPECT_EQ(a->generation(), generation) << "rank " << r;
      EXPECT_TRUE(a->Verify().ok()) << a->Verify();
      EXPECT_THAT(Differences(*a, want[r]), IsEmpty()) << "rank " << r;
      EXPECT_TRUE(a->Detach().ok());
    }
  }

  // The full update at T=2 (FullUpdateAtT2MatchesShardOfB and its variants).
  void FullUpdate(bool with_weightctl);
  // Attaches `big` (T=1, `hf` recipe) and checks that it serves `generation`, whose bytes are
  // all `fill`, or the checkpoint's when `fill` is 0; and its checksums.
  void ExpectBigServes(uint64_t generation, uint8_t fill) {
    absl::StatusOr<Checkpoint> ckpt = Checkpoint::Open(Model("big"));
    ASSERT_TRUE(ckpt.ok()) << ckpt.status();
    absl::StatusOr<Client> c = Connect();
    ASSERT_TRUE(c.ok());
    absl::StatusOr<Attachment> a = c->Attach("big", 0);
    ASSERT_TRUE(a.ok()) << a.status();
    EXPECT_EQ(a->generation(), generation);
    ASSERT_EQ(a->tensors().size(), BigTensors().size());
    EXPECT_TRUE(a->Verify().ok()) << a->Verify();
    const std::string pattern(1 << 20, static_cast<char>(fill));
    for (const TensorView& t : a->tensors()) {
      const char* p = static_cast<const char*>(t.data);
      if (fill == 0) {
        const CheckpointTensor* ct = ckpt->Find(t.name);
        ASSERT_NE(ct, nullptr) << t.name;
        absl::StatusOr<std::span<const std::byte>> want = ckpt->MapTensor(*ct);
        ASSERT_TRUE(want.ok());
        ASSERT_EQ(want->size(), t.nbytes);
        EXPECT_EQ(std::memcmp(p, want->data(), t.nbytes), 0) << t.name;
        continue;
      }
      for (uint64_t off = 0; off < t.nbytes; off += pattern.size()) {
        const size_t n = static_cast<size_t>(std::min<uint64_t>(pattern.size(), t.nbytes - off));
        ASSERT_EQ(std::memcmp(p + off, pattern.data(), n), 0) << t.name << " at byte " << off;
      }
    }
  }

  // The partial Mixtral update (PartialUpdateRewritesOnlyTheAffectedSlices and its variant).
  void PartialUpdate();
  // Update, rollback, rollback again (RollbackRestoresThePreviousGeneration and its variant);
  // the daemon keeps the previous generation.
  void Rollback();
  // A one-layer update of a model whose ranks are three arenas each
  // (OneLayerUpdateReplacesOnlyThatLayersArenas and its variant).
  void OneLayerUpdate();

  std::string dir_;
  std::string socket_;
  pid_t daemon_ = -1;
};

void UpdateTest::FullUpdate(bool with_weightctl) {
  const std::vector<RankBytes>& want_a = Shard("llamaA");
  const std::vector<RankBytes>& want_b = Shard("llamaB");
  ASSERT_EQ(want_a.size(), 2u);
  ASSERT_EQ(want_b.size(), 2u);
  ASSERT_EQ(Load("m", "llamaA", 2), "");
  absl::StatusOr<Client> c = Connect();
  ASSERT_TRUE(c.ok()) << c.status();
  std::vector<Attachment> att;
  std::vector<std::vector<const TensorView*>> views(2);
  std::vector<std::vector<const void*>> data(2);
  size_t targets = 0;
  for (int r = 0; r < 2; ++r) {
    absl::StatusOr<Attachment> a = c->Attach("m", r);
    ASSERT_TRUE(a.ok()) << a.status();
    EXPECT_EQ(a->generation(), 1u);
    EXPECT_THAT(Differences(*a, want_a[r]), IsEmpty()) << "rank " << r << " before the update";
    for (const TensorView& t : a->tensors()) {
      views[r].push_back(&t);
      data[r].push_back(t.data);
    }
    targets += a->tensors().size();
    att.push_back(std::move(*a));
  }
  // A second client's attachment, never refreshed.
  absl::StatusOr<Client> other = Connect();
  ASSERT_TRUE(other.ok());
  absl::StatusOr<Attachment> stale = other->Attach("m", 0);
  ASSERT_TRUE(stale.ok()) << stale.status();
  const void* stale_data = stale->tensors().front().data;
  // Sanity: the two checkpoints differ in every tensor of every rank (else nothing is shown).
  for (int r = 0; r < 2; ++r) {
    EXPECT_EQ(ChangedNames(want_a[r], want_b[r]).size(), want_a[r].size()) << "rank " << r;
  }

  if (with_weightctl) {
    const RunResult u =
        RunProcess({WEIGHTCTL_BIN, "update", "m", Model("llamaB"), "--wait", "--socket", socket_});
    ASSERT_EQ(u.exit_code, 0) << u.out << u.err;
    EXPECT_THAT(u.out, HasSubstr("m: generation 2 published"));
    const RunResult w = RunProcess({WEIGHTCTL_BIN, "wait-generation", "m", "--after", "1",
                                    "--timeout", "10", "--socket", socket_});
    EXPECT_EQ(w.exit_code, 0) << w.err;
    EXPECT_EQ(w.out, "2\n");
  } else {
    absl::StatusOr<UpdateResult> u = c->Update("m", Model("llamaB"), /*wait=*/true);
    ASSERT_TRUE(u.ok()) << u.status();
    EXPECT_EQ(u->generation, 2u);
    EXPECT_EQ(u->state, "ready");
    EXPECT_EQ(u->ranks_rewritten, 2u);
    // Every target of both ranks is covered by the new tensors: none is copied.
    EXPECT_EQ(u->targets_rewritten, targets);
    EXPECT_EQ(u->targets_copied, 0u);
    absl::StatusOr<Checkpoint> b = Checkpoint::Open(Model("llamaB"));
    ASSERT_TRUE(b.ok());
    EXPECT_GT(u->bytes_read, 0u);
    EXPECT_LE(u->bytes_read, b->total_bytes());  // the rotary_emb.inv_freq buffers are ignored
  }
  const ModelInfo st = Info("m");
  EXPECT_EQ(st.generation, 2u);
  EXPECT_EQ(st.previous_generation, 0u);
  ASSERT_TRUE(st.update.has_value());
  EXPECT_EQ(st.update->state, "done");
  EXPECT_EQ(st.update->generation, 2u);
  EXPECT_EQ(st.update->error, "");
  EXPECT_EQ(Metric("weightd_model_generation{model=\"m\"}"), "2");
  EXPECT_EQ(Held("m"), "2");  // generation 1 is mapped by the leases

  // Until refreshed, the attachments read generation 1, unchanged.
  for (int r = 0; r < 2; ++r) {
    EXPECT_EQ(att[r].generation(), 1u);
    EXPECT_THAT(Differences(att[r], want_a[r]), IsEmpty()) << "rank " << r << " before refresh";
  }
  for (int r = 0; r < 2; ++r) {
    absl::StatusOr<bool> moved = att[r].Refresh();
    ASSERT_TRUE(moved.ok()) << moved.status();
    EXPECT_TRUE(*moved);
    EXPECT_EQ(att[r].generation(), 2u);
    ASSERT_EQ(att[r].tensors().size(), views[r].size());
    for (size_t i = 0; i < views[r].size(); ++i) {
      EXPECT_EQ(&att[r].tensors()[i], views[r][i]) << "rank " << r << " tensor " << i;
      EXPECT_EQ(att[r].tensors()[i].data, data[r][i]) << att[r].tensors()[i].name;
    }
    EXPECT_TRUE(att[r].Verify().ok()) << att[r].Verify();
    EXPECT_THAT(Differences(att[r], want_b[r]), IsEmpty()) << "rank " << r << " after refresh";
    // Through the very pointers kept from generation 1 (host memory only: device pointers are
    // read with Read() above).
    if (views[r][0]->device < 0) {
      const TensorView& t = *views[r][0];
      EXPECT_EQ(std::memcmp(data[r][0], want_b[r].at(t.name).data(), t.nbytes), 0) << t.name;
    }
    absl::StatusOr<bool> again = att[r].Refresh();
    ASSERT_TRUE(again.ok()) << again.status();
    EXPECT_FALSE(*again);
  }
  // The attachment that was not refreshed still maps generation 1, byte for byte.
  EXPECT_EQ(stale->generation(), 1u);
  EXPECT_EQ(stale->tensors().front().data, stale_data);
  EXPECT_TRUE(stale->Verify().ok()) << stale->Verify();
  EXPECT_THAT(Differences(*stale, want_a[0]), IsEmpty()) << "the attachment never refreshed";
  // status lists each lease with the generation it maps.
  const ModelInfo leases = Info("m");
  std::multiset<uint64_t> gens;
  for (const RankStatusInfo& r : leases.ranks) {
    for (const LeaseStatus& l : r.leases) gens.insert(l.generation);
  }
  EXPECT_EQ(gens, (std::multiset<uint64_t>{1, 2, 2}));
  // A new attachment gets generation 2.
  ExpectServes("m", 2, want_b, "new attachments after the update");
  // The last lease on generation 1 goes: its memory with it.
  ASSERT_TRUE(stale->Detach().ok());
  EXPECT_TRUE(WaitUntil([&] { return Held("m") == "1"; }, seconds(5))) << Held("m");
}

TEST_F(UpdateTest, FullUpdateAtT2MatchesShardOfB) {
  ASSERT_TRUE(StartDaemon()) << Slurp(dir_ + "/weightd.log");
  FullUpdate(/*with_weightctl=*/false);
}

TEST_F(UpdateTest, FullUpdateWithWeightctlAtT2MatchesShardOfB) {
  ASSERT_TRUE(StartDaemon()) << Slurp(dir_ + "/weightd.log");
  FullUpdate(/*with_weightctl=*/true);
}

// Mixtral at T=2: one layer's q/k/v (fused into qkv_proj, column slices) and one expert's
// w1/w2/w3 (fused into the layer's w13/w2 of all experts) from host memory. Exactly those
// slices change; every other byte of both ranks stays generation 1's.
TEST_F(UpdateTest, PartialUpdateRewritesOnlyTheAffectedSlices) {
  ASSERT_TRUE(StartDaemon()) << Slurp(dir_ + "/weightd.log");
  PartialUpdate();
}

void UpdateTest::PartialUpdate() {
  const std::vector<RankBytes>& want_a = Shard("moeA");
  const std::vector<RankBytes>& want_a2 = Shard("moeA2");
  ASSERT_EQ(want_a.size(), 2u);
  ASSERT_EQ(want_a2.size(), 2u);
  // What the update must change: per rank, the layer-1 qkv_proj and the layer-0 w13/w2 targets.
  size_t changed = 0;
  for (int r = 0; r < 2; ++r) {
    const std::vector<std::string> names = ChangedNames(want_a[r], want_a2[r]);
    EXPECT_EQ(names.size(), 3u) << absl::StrJoin(names, ", ");
    for (const std::string& n : names) {
      EXPECT_TRUE(
          (n.find("layers.1.") != std::string::npos && n.find("qkv_proj") != std::string::npos) ||
          (n.find("layers.0.") != std::string::npos &&
           (n.find("w13") != std::string::npos || n.find("w2") != std::string::npos)))
          << n;
    }
    changed += names.size();
  }
  ASSERT_EQ(Load("moe", "moeA", 2), "");
  absl::StatusOr<Client> c = Connect();
  ASSERT_TRUE(c.ok()) << c.status();
  std::vector<Attachment> att;
  size_t targets = 0;
  for (int r = 0; r < 2; ++r) {
    absl::StatusOr<Attachment> a = c->Attach("moe", r);
    ASSERT_TRUE(a.ok()) << a.status();
    EXPECT_THAT(Differences(*a, want_a[r]), IsEmpty()) << "rank " << r;
    targets += a->tensors().size();
    att.push_back(std::move(*a));
  }

  absl::StatusOr<Checkpoint> b = Checkpoint::Open(Model("moeB"));
  ASSERT_TRUE(b.ok()) << b.status();
  std::vector<UpdateTensor> tensors;
  uint64_t bytes = 0;
  for (const std::string& name : PartialNames()) {
    const CheckpointTensor* t = b->Find(name);
    ASSERT_NE(t, nullptr) << name;
    absl::StatusOr<std::span<const std::byte>> d = b->MapTensor(*t);
    ASSERT_TRUE(d.ok()) << d.status();
    tensors.push_back({t->name, t->dtype, t->shape, d->data(), d->size()});
    bytes += d->size();
  }
  absl::StatusOr<UpdateResult> u = c->UpdateTensors("moe", tensors);
  ASSERT_TRUE(u.ok()) << u.status();
  EXPECT_EQ(u->generation, 2u);
  EXPECT_EQ(u->state, "ready");
  EXPECT_EQ(u->bytes_read, bytes);
  EXPECT_EQ(u->ranks_rewritten, 2u);
  EXPECT_EQ(u->targets_rewritten, changed);
  EXPECT_GT(u->targets_copied, 0u);
  EXPECT_EQ(u->targets_rewritten + u->targets_copied, targets);

  for (int r = 0; r < 2; ++r) {
    absl::StatusOr<bool> moved = att[r].Refresh();
    ASSERT_TRUE(moved.ok()) << moved.status();
    EXPECT_TRUE(*moved);
    EXPECT_EQ(att[r].generation(), 2u);
    EXPECT_TRUE(att[r].Verify().ok()) << att[r].Verify();
    EXPECT_THAT(Differences(att[r], want_a2[r]), IsEmpty()) << "rank " << r;
  }
  ExpectServes("moe", 2, want_a2, "new attachments after the partial update");
}

// /proc/self/maps: the inode of the file mapped at `p` (0 when none is).
uint64_t MappedInode(const void* p) {
  std::ifstream maps("/proc/self/maps");
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  for (std::string line; std::getline(maps, line);) {
    unsigned long long lo = 0, hi = 0, inode = 0;
    char perms[8] = {}, dev[16] = {};
    unsigned long long off = 0;
    if (std::sscanf(line.c_str(), "%llx-%llx %7s %llx %15s %llu", &lo, &hi, perms, &off, dev,
                    &inode) != 6) {
      continue;
    }
    if (a >= lo && a < hi) return inode;
  }
  return 0;
}

uint64_t AlignedBytes(uint64_t n) { return (n + 255) / 256 * 256; }

// Segments (docs/PROTOCOL.md "attach"): with arena_segment_bytes 1 every decoder layer of the
// small Llama has an arena of its own, and embeddings/norm/lm_head one more, so each rank is
// three arenas. An update of layer 1's tensors allocates a new arena for that layer's segment
// of each rank only, copies nothing, and shares the other arenas with generation 1 (the model's
// memory grows by exactly those two arenas while generation 1 is still mapped). After
// refresh(), the tensors of the other segments are still mapped from the very same memfds (no
// remap), layer 1's from new ones at the same addresses, and every rank equals `weightctl shard`
// of the new checkpoint.
TEST_F(UpdateTest, OneLayerUpdateReplacesOnlyThatLayersArenas) {
  ASSERT_TRUE(StartDaemon({{"arena_segment_bytes", 1}})) << Slurp(dir_ + "/weightd.log");
  OneLayerUpdate();
}

void UpdateTest::OneLayerUpdate() {
  const std::vector<RankBytes>& want_a = Shard("llamaA");
  const std::vector<RankBytes>& want_new = Shard("llamaAL1");
  ASSERT_EQ(want_a.size(), 2u);
  ASSERT_EQ(want_new.size(), 2u);
  auto in_layer1 = [](const std::string& name) {
    return name.find("layers.1.") != std::string::npos;
  };
  // Sanity: the new checkpoint differs from llamaA in exactly layer 1's targets, all of them.
  for (int r = 0; r < 2; ++r) {
    size_t layer1 = 0;
    for (const auto& [name, bytes] : want_a[r]) layer1 += in_layer1(name) ? 1 : 0;
    const std::vector<std::string> changed = ChangedNames(want_a[r], want_new[r]);
    EXPECT_EQ(changed.size(), layer1) << absl::StrJoin(changed, ", ");
    for (const std::string& n : changed) EXPECT_TRUE(in_layer1(n)) << n;
  }
  ASSERT_EQ(Load("m", "llamaA", 2), "");
  for (int r = 0; r < 2; ++r) {
    EXPECT_EQ(Metric("weightd_rank_arenas{model=\"m\",rank=\"" + std::to_string(r) + "\"}"), "3");
  }
  // Status shows them too: in the reply, and in weightctl's listing and its --json.
  for (const RankStatusInfo& r : Info("m").ranks) EXPECT_EQ(r.arenas, 3u) << "rank " << r.rank;
  const RunResult st = RunProcess({WEIGHTCTL_BIN, "status", "m", "--socket", socket_});
  EXPECT_THAT(st.out, HasSubstr("rank 0: ready     device "));
  EXPECT_THAT(st.out, HasSubstr(" in 3 arenas, 15 tensors"));
  const RunResult js = RunProcess({WEIGHTCTL_BIN, "status", "m", "--json", "--socket", socket_});
  EXPECT_THAT(js.out, HasSubstr(R"("arenas": 3)"));
  const ModelInfo before = Info("m");
  uint64_t model_bytes = 0;
  for (const RankStatusInfo& r : before.ranks) model_bytes += r.arena_bytes;
  EXPECT_EQ(Metric("weightd_model_arena_bytes{model=\"m\"}"), std::to_string(model_bytes));

  absl::StatusOr<Client> c = Connect();
  ASSERT_TRUE(c.ok()) << c.status();
  std::vector<Attachment> att;
  std::vector<std::vector<const void*>> data(2);
  std::vector<std::vector<uint64_t>> inode(2);
  uint64_t layer1_bytes = 0;  // the new arenas: layer 1's targets of both ranks, aligned
  size_t layer1_targets = 0, targets = 0;
  for (int r = 0; r < 2; ++r) {
    absl::StatusOr<Attachment> a = c->Attach("m", r);
    ASSERT_TRUE(a.ok()) << a.status();
    EXPECT_THAT(Differences(*a, want_a[r]), IsEmpty()) << "rank " << r;
    std::set<uint64_t> files;
    for (const TensorView& t : a->tensors()) {
      data[r].push_back(t.data);
      if (t.device < 0) {
        inode[r].push_back(MappedInode(t.data));
        EXPECT_NE(inode[r].back(), 0u) << t.name;
        files.insert(inode[r].back());
      }
      if (in_layer1(t.name)) {
        layer1_bytes += AlignedBytes(t.nbytes);
        ++layer1_targets;
      }
      ++targets;
    }
    if (a->tensors().front().device < 0) {
      EXPECT_EQ(files.size(), 3u) << "rank " << r << " is not mapped from three memfds";
    }
    att.push_back(std::move(*a));
  }
  ASSERT_GT(layer1_bytes, 0u);
  ASSERT_LT(layer1_bytes, model_bytes / 2);

  absl::StatusOr<Checkpoint> b = Checkpoint::Open(Model("llamaB"));
  ASSERT_TRUE(b.ok()) << b.status();
  std::vector<UpdateTensor> tensors;
  for (const CheckpointTensor& t : b->tensors()) {
    if (!in_layer1(t.name) || t.name.find("rotary_emb") != std::string::npos) continue;
    absl::StatusOr<std::span<const std::byte>> d = b->MapTensor(t);
    ASSERT_TRUE(d.ok()) << d.status();
    tensors.push_back({t.name, t.dtype, t.shape, d->data(), d->size()});
  }
  absl::StatusOr<UpdateResult> u = c->UpdateTensors("m", tensors);
  ASSERT_TRUE(u.ok()) << u.status();
  EXPECT_EQ(u->generation, 2u);
  EXPECT_EQ(u->ranks_rewritten, 2u);
  EXPECT_EQ(u->segments_rewritten, 2u);  // one arena per rank
  EXPECT_EQ(u->bytes_allocated, layer1_bytes);
  EXPECT_EQ(u->bytes_copied, 0u);  // layer 1's targets are all new: nothing comes from gen 1
  EXPECT_EQ(u->targets_rewritten, layer1_targets);
  EXPECT_EQ(u->targets_copied, targets - layer1_targets);
  // Generation 1 is still mapped by the attachments: the model holds its arenas plus the two
  // new ones, not a second copy of the ranks.
  EXPECT_EQ(Metric("weightd_model_arena_bytes{model=\"m\"}"),
            std::to_string(model_bytes + layer1_bytes));
  EXPECT_EQ(Held("m"), "2");

  for (int r = 0; r < 2; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r));
    EXPECT_THAT(Differences(att[r], want_a[r]), IsEmpty()) << "before refresh";
    absl::StatusOr<bool> moved = att[r].Refresh();
    ASSERT_TRUE(moved.ok()) << moved.status();
    EXPECT_TRUE(*moved);
    EXPECT_EQ(att[r].generation(), 2u);
    EXPECT_TRUE(att[r].Verify().ok()) << att[r].Verify();
    EXPECT_THAT(Differences(att[r], want_new[r]), IsEmpty()) << "after refresh";
    const std::vector<TensorView>& views = att[r].tensors();
    for (size_t i = 0; i < views.size(); ++i) {
      EXPECT_EQ(views[i].data, data[r][i]) << views[i].name;
      if (views[i].device >= 0) continue;
      const uint64_t now = MappedInode(views[i].data);
      if (in_layer1(views[i].name)) {
        EXPECT_NE(now, inode[r][i]) << views[i].name << " still maps generation 1's memfd";
      } else {
        EXPECT_EQ(now, inode[r][i]) << views[i].name << " was remapped";
      }
    }
  }
  ExpectServes("m", 2, want_new, "new attachments after the one-layer update");
  // Nothing maps generation 1 any more: only its layer-1 arenas go, the rest is generation 2's.
  EXPECT_TRUE(WaitUntil([&] { return Held("m") == "1"; }, seconds(5))) << Held("m");
  EXPECT_TRUE(WaitUntil(
      [&] {
        return Metric("weightd_model_arena_bytes{model=\"m\"}") == std::to_string(model_bytes);
      },
      seconds(5)))
      << Metric("weightd_model_arena_bytes{model=\"m\"}");

  // A second update, of layer 0's q_proj only: one arena per rank again, and what it copies
  // from generation 2 is that segment, layer 0 (its other targets, and the fused qkv_proj
  // whole before q's rows are written over it), nothing of the other segments.
  const CheckpointTensor* q = b->Find("model.layers.0.self_attn.q_proj.weight");
  ASSERT_NE(q, nullptr);
  absl::StatusOr<std::span<const std::byte>> qd = b->MapTensor(*q);
  ASSERT_TRUE(qd.ok());
  const UpdateTensor q_update{q->name, q->dtype, q->shape, qd->data(), qd->size()};
  absl::StatusOr<UpdateResult> u3 = c->UpdateTensors("m", std::span(&q_update, 1));
  ASSERT_TRUE(u3.ok()) << u3.status();
  EXPECT_EQ(u3->generation, 3u);
  EXPECT_EQ(u3->segments_rewritten, 2u);
  EXPECT_EQ(u3->bytes_copied, u3->bytes_allocated);
  EXPECT_LT(u3->bytes_allocated, model_bytes / 2);
  for (int r = 0; r < 2; ++r) {
    absl::StatusOr<bool> moved = att[r].Refresh();
    ASSERT_TRUE(moved.ok()) << moved.status();
    EXPECT_TRUE(*moved);
    EXPECT_TRUE(att[r].Verify().ok()) << att[r].Verify();
    const std::vector<std::string> diff = Differences(att[r], want_new[r]);
    ASSERT_EQ(diff.size(), 1u) << absl::StrJoin(diff, ", ");
    EXPECT_THAT(diff[0], HasSubstr("layers.0.self_attn.qkv_proj")) << "rank " << r;
  }
}

TEST_F(UpdateTest, FailedUpdatesLeaveGenerationNServing) {
  ASSERT_TRUE(StartDaemon()) << Slurp(dir_ + "/weightd.log");
  const std::vector<RankBytes>& want_a = Shard("llamaA");
  ASSERT_EQ(Load("m", "llamaA", 2), "");
  absl::StatusOr<Client> c = Connect();
  ASSERT_TRUE(c.ok()) << c.status();
  absl::StatusOr<Checkpoint> b = Checkpoint::Open(Model("llamaB"));
  ASSERT_TRUE(b.ok()) << b.status();
  auto tensor_of_b = [&](const std::string& name) {
    const CheckpointTensor* t = b->Find(name);
    EXPECT_NE(t, nullptr) << name;
    absl::StatusOr<std::span<const std::byte>> d = b->MapTensor(*t);
    EXPECT_TRUE(d.ok());
    return UpdateTensor{t->name, t->dtype, t->shape, d->data(), d->size()};
  };
  auto after_failure = [&](const std::string& what, const std::string& error_part) {
    const ModelInfo st = Info("m");
    EXPECT_EQ(st.state, "ready") << what;
    EXPECT_EQ(st.generation, 1u) << what;
    ASSERT_TRUE(st.update.has_value()) << what;
    EXPECT_EQ(st.update->state, "failed") << what;
    EXPECT_THAT(st.update->error, HasSubstr(error_part)) << what;
    ExpectServes("m", 1, want_a, what);
  };

  // (a) A shape that differs (same byte count): the tensor and both shapes are named.
  {
    UpdateTensor k = tensor_of_b("model.layers.0.self_attn.k_proj.weight");
    ASSERT_EQ(k.shape, (std::vector<int64_t>{64, 256}));
    k.shape = {256, 64};
    absl::StatusOr<UpdateResult> u = c->UpdateTensors("m", {&k, 1});
    ASSERT_FALSE(u.ok());
    EXPECT_EQ(u.status().code(), absl::StatusCode::kInvalidArgument) << u.status();
    EXPECT_THAT(u.status().message(), HasSubstr("'model.layers.0.self_attn.k_proj.weight'"));
    EXPECT_THAT(u.status().message(), HasSubstr("[256, 64] in the update"));
    EXPECT_THAT(u.status().message(), HasSubstr("[64, 256] in the loaded checkpoint"));
    after_failure("wrong shape", "[256, 64]");
  }
  // ... and a dtype that differs.
  {
    UpdateTensor q = tensor_of_b("model.layers.1.self_attn.q_proj.weight");
    q.dtype = DType::kF16;
    absl::StatusOr<UpdateResult> u = c->UpdateTensors("m", {&q, 1});
    ASSERT_FALSE(u.ok());
    EXPECT_EQ(u.status().code(), absl::StatusCode::kInvalidArgument) << u.status();
    EXPECT_THAT(u.status().message(), HasSubstr("'model.layers.1.self_attn.q_proj.weight' is F16"));
    EXPECT_THAT(u.status().message(), HasSubstr("BF16"));
    after_failure("wrong dtype", "F16");
  }
  // (b) A name the checkpoint lacks: the nearest real name is offered. A valid tensor beside it
  // does not make the update partly happen.
  {
    UpdateTensor good = tensor_of_b("model.layers.1.self_attn.v_proj.weight");
    UpdateTensor bad = tensor_of_b("model.layers.1.self_attn.q_proj.weight");
    bad.name = "model.layers.1.self_attn.q_prj.weight";
    const UpdateTensor both[] = {good, bad};
    absl::StatusOr<UpdateResult> u = c->UpdateTensors("m", both);
    ASSERT_FALSE(u.ok());
    EXPECT_EQ(u.status().code(), absl::StatusCode::kInvalidArgument) << u.status();
    EXPECT_THAT(u.status().message(),
                HasSubstr("no tensor named 'model.layers.1.self_attn.q_prj.weight'"));
    EXPECT_THAT(u.status().message(),
                HasSubstr("nearest names it has: 'model.layers.1.self_attn.q_proj.weight'"));
    after_failure("unknown name", "q_prj");
  }
  // Only tensors the recipe skips: nothing to do, refused.
  {
    UpdateTensor inv = tensor_of_b("model.layers.0.self_attn.rotary_emb.inv_freq");
    absl::StatusOr<UpdateResult> u = c->UpdateTensors("m", {&inv, 1});
    ASSERT_FALSE(u.ok());
    EXPECT_EQ(u.status().code(), absl::StatusCode::kInvalidArgument) << u.status();
    EXPECT_THAT(u.status().message(), HasSubstr("the recipe skips them all"));
    after_failure("skipped tensors only", "skips them all");
  }
  // A checkpoint outside model_roots is refused before the update starts.
  {
    absl::StatusOr<UpdateResult> u = c->Update("m", "/etc", /*wait=*/true);
    ASSERT_FALSE(u.ok());
    EXPECT_EQ(u.status().code(), absl::StatusCode::kPermissionDenied) << u.status();
    EXPECT_EQ(Info("m").generation, 1u);
  }
  // Nothing leaked into the counters or the generation numbers: the next update publishes 2.
  EXPECT_EQ(Metric("weightd_updates_failed_total"), "4");
  EXPECT_EQ(Held("m"), "1");

  // (c) An update that does not fit the host_memory_budget: a daemon whose budget is just above
  // the model's arenas (an update needs a second copy of the ranks it rewrites).
  uint64_t arena_bytes = 0;
  for (const RankStatusInfo& r : Info("m").ranks) arena_bytes += r.arena_bytes;
  ASSERT_GT(arena_bytes, 0u);
  StopDaemon();
  ASSERT_TRUE(StartDaemon({{"host_memory_budget", arena_bytes + 65536}}))
      << Slurp(dir_ + "/weightd.log");
  ASSERT_EQ(Load("m", "llamaA", 2), "");
  absl::StatusOr<Client> c2 = Connect();
  ASSERT_TRUE(c2.ok());
  absl::StatusOr<UpdateResult> u = c2->Update("m", Model("llamaB"), /*wait=*/true);
  ASSERT_FALSE(u.ok());
  EXPECT_EQ(u.status().code(), absl::StatusCode::kResourceExhausted) << u.status();
  EXPECT_THAT(u.status().message(), HasSubstr(absl::StrCat("needs ", arena_bytes, " bytes")));
  EXPECT_THAT(u.status().message(), HasSubstr("host_memory_budget"));
  after_failure("over the memory budget", "bytes");
}

// An update sent with `wait` belongs to its connection: a trainer that dies after sending it
// cancels it. The daemon may have finished first (a fast machine), so each round accepts either
// outcome, checked in full, and at least one of three rounds must show the cancellation. Without
// `wait` the update outlives the connection.
TEST_F(UpdateTest, ClosingTheRequestingConnectionCancelsTheUpdate) {
  ASSERT_TRUE(StartDaemon()) << Slurp(dir_ + "/weightd.log");
  ASSERT_EQ(Load("big", "big", 1, "hf"), "");
  const std::vector<testing::SyntheticTensor> tensors = BigTensors();
  uint8_t serving_fill = 0;  // 0: the checkpoint's bytes; else every byte is this
  uint64_t generation = 1;
  auto expect_serving = [&](const std::string& what) {
    SCOPED_TRACE(what);
    ExpectBigServes(generation, serving_fill);
  };
  // Sends the whole model as an update with bytes `fill` from a child process, which is
  // SIGKILLed as soon as the request is out; waits for the update to end.
  auto trainer_dies = [&](uint8_t fill, bool wait) {
    UniqueFd memfd = PatternMemfd(tensors, fill);
    ASSERT_TRUE(memfd) << "memfd";
    int sent[2];
    ASSERT_EQ(::pipe(sent), 0);
    const pid_t child = ::fork();
    if (child == 0) {
      ::close(sent[0]);
      Raw raw(socket_);
      if (!raw.Hello()) ::_exit(3);
      const json req = {{"op", "update"}, {"id", 1}, {"name", "big"}, {"wait", wait}};
      if (!raw.Send(req, {memfd.get()})) ::_exit(4);
      (void)!::write(sent[1], "s", 1);
      for (;;) ::pause();
    }
    ::close(sent[1]);
    pollfd p{sent[0], POLLIN, 0};
    char byte = 0;
    const bool ok = ::poll(&p, 1, 20000) == 1 && ::read(sent[0], &byte, 1) == 1;
    ::kill(child, SIGKILL);
    const int rc = WaitFor(child, seconds(10));
    ::close(sent[0]);
    ASSERT_TRUE(ok) << "the trainer did not send its update (exit " << rc << ")";
    ASSERT_TRUE(WaitUntil(
        [&] {
          const ModelInfo st = Info("big");
          return st.update.has_value() && st.update->generation == generation + 1 &&
                 st.update->state != "running";
        },
        seconds(60)))
        << "the update did not end";
  };

  int cancelled = 0;
  for (int round = 0; round < 3 && cancelled == 0; ++round) {
    const uint8_t fill = static_cast<uint8_t>(0x31 + round);
    trainer_dies(fill, /*wait=*/true);
    if (HasFatalFailure()) return;
    const ModelInfo st = Info("big");
    ASSERT_TRUE(st.update.has_value());
    if (st.update->state == "failed") {
      ++cancelled;
      EXPECT_THAT(st.update->error, HasSubstr("cancelled"));
      EXPECT_THAT(st.update->error, HasSubstr("the connection that asked for it closed"));
      EXPECT_EQ(st.generation, generation);
      expect_serving(absl::StrCat("round ", round, ": cancelled"));
    } else {
      // The daemon published before it saw the connection close: a complete generation.
      EXPECT_EQ(st.update->state, "done");
      EXPECT_EQ(st.generation, generation + 1);
      ++generation;
      serving_fill = fill;
      expect_serving(absl::StrCat("round ", round, ": published before the close"));
    }
    if (HasFatalFailure()) return;
  }
  EXPECT_EQ(cancelled, 1) << "no cancellation observed in three rounds";
  EXPECT_THAT(Slurp(dir_ + "/weightd.log"),
              HasSubstr("cancelled: the connection that asked for it closed"));

  // Without `wait` nobody waits for the reply: the update goes on and publishes.
  trainer_dies(0x7e, /*wait=*/false);
  if (HasFatalFailure()) return;
  const ModelInfo st = Info("big");
  ASSERT_TRUE(st.update.has_value());
  EXPECT_EQ(st.update->state, "done") << st.update->error;
  EXPECT_EQ(st.generation, generation + 1);
  ++generation;
  serving_fill = 0x7e;
  expect_serving("published after the requester died (no wait)");
}

// A cancellation that comes after the new generation is built (while its checksums and
// manifests are made) leaves a whole generation to free, which takes a while for 200 MiB. An
// update accepted meanwhile replaces the model's update record; the cancelled update's thread
// must not touch its old record after that (a use-after-free, reported by the sanitizer builds:
// weightd then aborts and this test fails). Each round kills the trainer once status shows all
// bytes read, and sends a small update in a tight loop until it is accepted; up to 8 rounds, until
// 3 of them cancelled the big update once built (skipped, saying so, when none did).
TEST_F(UpdateTest, AnUpdateAcceptedWhileACancelledOneIsFreedIsSafe) {
  ASSERT_TRUE(StartDaemon()) << Slurp(dir_ + "/weightd.log");
  ASSERT_EQ(Load("big", "big", 1, "hf"), "");
  const std::vector<testing::SyntheticTensor> tensors = BigTensors();
  UniqueFd big_update = PatternMemfd(tensors, 0x3c);
  ASSERT_TRUE(big_update);
  const testing::SyntheticTensor norm = {"model.norm.weight", "BF16", {2048}};
  UniqueFd small_update = PatternMemfd({norm}, 0x5a);
  ASSERT_TRUE(small_update);
  absl::StatusOr<Client> poll = Connect();
  ASSERT_TRUE(poll.ok());
  absl::StatusOr<Client> next = Connect();
  ASSERT_TRUE(next.ok());
  // Big builds that finished (weightd logs each at debug level): a round in which one more
  // finished and the big update published nothing cancelled it once built, the case under test.
  const std::string built_line = absl::StrCat("update big: ", tensors.size(), " tensors (");
  auto builds = [&] {
    const std::string log = Slurp(dir_ + "/weightd.log");
    int n = 0;
    for (size_t at = log.find(built_line); at != std::string::npos;
         at = log.find(built_line, at + 1)) {
      ++n;
    }
    return n;
  };
  int rounds = 0, late_cancels = 0;
  for (; rounds < 8 && late_cancels < 3; ++rounds) {
    const uint64_t gen = Info("big").generation;
    const int builds_before = builds();
    int sent[2];
    ASSERT_EQ(::pipe(sent), 0);
    const pid_t child = ::fork();
    if (child == 0) {
      ::close(sent[0]);
      Raw raw(socket_);
      if (!raw.Hello()) ::_exit(3);
      if (!raw.Send({{"op", "update"}, {"name", "big"}, {"wait", true}}, {big_update.get()})) {
        ::_exit(4);
      }
      (void)!::write(sent[1], "s", 1);
      for (;;) ::pause();
    }
    ::close(sent[1]);
    pollfd p{sent[0], POLLIN, 0};
    char byte = 0;
    const bool ok = ::poll(&p, 1, 20000) == 1 && ::read(sent[0], &byte, 1) == 1;
    ::close(sent[0]);
    // All bytes read: the generation is being sealed. Kill the trainer now.
    const auto deadline = Clock::now() + seconds(30);
    while (ok && Clock::now() < deadline) {
      auto st = poll->Status(std::string("big"));
      if (!st.ok() || !st->front().update) break;
      const UpdateStatus& u = *st->front().update;
      if (u.generation == gen + 1 &&
          (u.state != "running" || (u.bytes_total > 0 && u.bytes_done >= u.bytes_total))) {
        break;
      }
    }
    ::kill(child, SIGKILL);
    WaitFor(child, seconds(10));
    ASSERT_TRUE(ok) << "the trainer did not send its update";
    // The next update, as soon as the daemon takes one.
    absl::StatusOr<UpdateResult> u = absl::UnknownError("not sent");
    const auto until = Clock::now() + seconds(30);
    do {
      u = next->UpdateFromFd("big", small_update.get(), /*wait=*/false);
    } while (!u.ok() && u.status().code() == absl::StatusCode::kFailedPrecondition &&
             Clock::now() < until);
    ASSERT_TRUE(u.ok()) << u.status();
    ASSERT_EQ(::kill(daemon_, 0), 0) << "weightd died";
    absl::StatusOr<GenerationWait> w =
        next->WaitGeneration("big", u->generation - 1, absl::Seconds(30));
    ASSERT_TRUE(w.ok()) << w.status() << Slurp(dir_ + "/weightd.log");
    EXPECT_EQ(w->generation, u->generation);
    // The big update published nothing (the small one is the next generation) but was built.
    late_cancels += u->generation == gen + 1 && builds() > builds_before;
  }
  std::printf("%d of %d big updates cancelled once built\n", late_cancels, rounds);
  EXPECT_EQ(::kill(daemon_, 0), 0) << "weightd died";
  absl::StatusOr<Attachment> a = next->Attach("big", 0);
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_TRUE(a->Verify().ok()) << a->Verify();
  const TensorView* n = a->Find("model.norm.weight");
  ASSERT_NE(n, nullptr);
  EXPECT_EQ(std::string(static_cast<const char*>(n->data), n->nbytes),
            std::string(n->nbytes, '\x5a'));
  if (late_cancels == 0) {
    GTEST_SKIP() << "no round cancelled the big update once built (it published, or was "
                    "cancelled while read): the path under test was not reached on this machine";
  }
}

// A checkpoint file that changes while the update reads it fails the update (DATA_LOSS naming
// the file); generation 1 serves on. The files are touched (same bytes, new mtime) once status
// shows the update running; a round in which the update finished first is retried.
TEST_F(UpdateTest, ACheckpointChangedWhileReadFailsTheUpdate) {
  ASSERT_TRUE(StartDaemon()) << Slurp(dir_ + "/weightd.log");
  ASSERT_EQ(Load("big", "big", 1, "hf"), "");
  absl::StatusOr<Client> c = Connect();
  ASSERT_TRUE(c.ok());
  std::vector<std::string> shards;
  for (const auto& e : std::filesystem::directory_iterator(Model("big"))) {
    if (e.path().extension() == ".safetensors") shards.push_back(e.path().string());
  }
  ASSERT_EQ(shards.size(), 2u);
  uint64_t generation = 1;
  bool failed = false;
  for (int round = 0; round < 3 && !failed; ++round) {
    absl::StatusOr<UpdateResult> u = c->Update("big", Model("big"), /*wait=*/false);
    ASSERT_TRUE(u.ok()) << u.status();
    ASSERT_EQ(u->generation, generation + 1);
    WaitUntil(
        [&] {
          const ModelInfo st = Info("big");
          return st.update.has_value() && st.update->bytes_done > 0;
        },
        seconds(20));
    for (const std::string& f : shards) {
      ASSERT_EQ(::utimensat(AT_FDCWD, f.c_str(), nullptr, 0), 0) << f;
    }
    ASSERT_TRUE(WaitUntil(
        [&] {
          const ModelInfo st = Info("big");
          return st.update.has_value() && st.update->state != "running";
        },
        seconds(60)));
    const ModelInfo st = Info("big");
    if (st.update->state == "failed") {
      failed = true;
      EXPECT_THAT(st.update->error, HasSubstr("big/model-0000"));
      EXPECT_THAT(st.update->error, HasSubstr("changed while weightd was reading it"));
      EXPECT_EQ(st.generation, generation);
    } else {
      EXPECT_EQ(st.generation, ++generation);
    }
    ExpectBigServes(generation, 0);
  }
  EXPECT_TRUE(failed) << "the update finished before the files changed, three times";
}

// An update needs a model that serves a generation, one update at a time.
TEST_F(UpdateTest, UpdatesOfALoadingOrFailedModelAndConcurrentUpdatesAreRefused) {
  ASSERT_TRUE(StartDaemon()) << Slurp(dir_ + "/weightd.log");
  absl::StatusOr<Client> c = Connect();
  ASSERT_TRUE(c.ok()) << c.status();
  LoadOptions hf;
  hf.recipe = "hf";
  // Still loading: the 200 MiB load takes longer than the next request on the same connection;
  // a round the load wins is retried.
  bool refused = false;
  for (int round = 0; round < 3 && !refused; ++round) {
    ASSERT_TRUE(c->Load("big", Model("big"), hf).ok());
    absl::StatusOr<UpdateResult> u = c->Update("big", Model("big"), /*wait=*/true);
    if (!u.ok() && u.status().code() == absl::StatusCode::kFailedPrecondition) {
      refused = true;
      EXPECT_THAT(u.status().message(), HasSubstr("'big' is still loading"));
    } else {
      EXPECT_TRUE(u.ok()) << u.status();  // the load had finished: a plain update
    }
    ASSERT_TRUE(WaitUntil([&] { return Info("big").state != "loading"; }, seconds(60)));
    EXPECT_EQ(Info("big").state, "ready");
    if (!refused) {
      ASSERT_TRUE(c->Unload("big", /*force=*/true).ok());
    }
  }
  EXPECT_TRUE(refused) << "the load finished before the update arrived, three times";
  EXPECT_EQ(Info("big").generation, 1u);
  EXPECT_FALSE(Info("big").update.has_value()) << "a refused update is not shown as one";

  // Failed: the model has no generation to update.
  const std::string broken = Model("broken");
  std::filesystem::remove_all(broken);
  std::filesystem::copy(Model("llamaA"), broken);
  for (const auto& e : std::filesystem::directory_iterator(broken)) {
    if (e.path().extension() == ".safetensors") {
      std::filesystem::resize_file(e.path(), std::filesystem::file_size(e.path()) - 1000);
      break;
    }
  }
  EXPECT_THAT(Load("broken", "broken", 2), HasSubstr("failed"));
  absl::StatusOr<UpdateResult> ub = c->Update("broken", Model("llamaB"), /*wait=*/true);
  EXPECT_EQ(ub.status().code(), absl::StatusCode::kFailedPrecondition) << ub.status();
  EXPECT_THAT(ub.status().message(), HasSubstr("'broken' failed to load"));
  EXPECT_TRUE(c->Unload("broken").ok());
  std::filesystem::remove_all(broken);
  // Unknown model.
  EXPECT_EQ(c->Update("nope", Model("llamaB")).status().code(), absl::StatusCode::kNotFound);

  // Two updates at once: the second is refused while the first runs (200 MiB from a memfd);
  // meanwhile rollback and a plain unload are refused too. A round in which the first update
  // ended before the second arrived is retried.
  absl::StatusOr<Client> c2 = Connect();
  ASSERT_TRUE(c2.ok());
  const std::vector<testing::SyntheticTensor> tensors = BigTensors();
  bool concurrent = false;
  for (int round = 0; round < 3 && !concurrent; ++round) {
    const uint64_t gen = Info("big").generation;
    UniqueFd memfd = PatternMemfd(tensors, static_cast<uint8_t>(0x41 + round));
    ASSERT_TRUE(memfd);
    absl::StatusOr<UpdateResult> first = c->UpdateFromFd("big", memfd.get(), /*wait=*/false);
    ASSERT_TRUE(first.ok()) << first.status();
    EXPECT_EQ(first->state, "updating");
    EXPECT_EQ(first->generation, gen + 1);
    absl::StatusOr<UpdateResult> second = c2->UpdateFromFd("big", memfd.get(), /*wait=*/false);
    absl::StatusOr<RollbackResult> rb = c2->Rollback("big");
    absl::Status un = c2->Unload("big");
    if (!second.ok()) {
      concurrent = true;
      EXPECT_EQ(second.status().code(), absl::StatusCode::kFailedPrecondition) << second.status();
      EXPECT_THAT(
          second.status().message(),
          HasSubstr(absl::StrCat("'big' is already being updated to generation ", gen + 1)));
    }
    // The first update publishes, whatever happened to the others.
    absl::StatusOr<GenerationWait> w = c->WaitGeneration("big", gen, absl::Seconds(60));
    ASSERT_TRUE(w.ok()) << w.status();
    ASSERT_FALSE(w->timed_out);
    if (second.ok()) {
      ASSERT_TRUE(c->WaitGeneration("big", gen + 1, absl::Seconds(60)).ok());
      continue;
    }
    if (!rb.ok()) {
      EXPECT_EQ(rb.status().code(), absl::StatusCode::kFailedPrecondition) << rb.status();
    }
    if (un.ok()) {
      // The update had ended before the unload came: load again for the next checks.
      ASSERT_EQ(Load("big", "big", 1, "hf"), "");
      continue;
    }
    EXPECT_EQ(un.code(), absl::StatusCode::kFailedPrecondition) << un;
    EXPECT_THAT(un.message(), HasSubstr("use force"));
  }
  EXPECT_TRUE(concurrent) << "the first update ended before the second arrived, three times";
  EXPECT_EQ(Info("big").state, "ready");
}

// update and rollback need the authorization of load; wait_generation that of attach.
TEST_F(UpdateTest, UnauthorizedPeersAreRefused) {
  ASSERT_TRUE(StartDaemon()) << Slurp(dir_ + "/weightd.log");
  ASSERT_EQ(Load("m", "llamaA", 2), "");
  const std::string socket = socket_;
  const std::string ckpt = Model("llamaB");
  const std::optional<std::string> got = testing::AsNobody({}, [&] {
    absl::StatusOr<Client> c = Client::Connect(socket);
    if (!c.ok()) return "connect: " + c.status().ToString();
    std::vector<std::string> out;
    out.push_back(c->Update("m", ckpt, /*wait=*/true).status().ToString());
    const uint16_t zero[64 * 256] = {};
    const UpdateTensor k{
        "model.layers.0.self_attn.k_proj.weight", DType::kBF16, {64, 256}, zero, sizeof(zero)};
    out.push_back(c->UpdateTensors("m", {&k, 1}).status().ToString());
    out.push_back(c->Rollback("m").status().ToString());
    out.push_back(c->WaitGeneration("m", 0, absl::Seconds(1)).status().ToString());
    return absl::StrJoin(out, "\n");
  });
  if (!got) GTEST_SKIP() << "needs root to run a child as uid 65534";
  EXPECT_THAT(*got, Not(HasSubstr("setuid failed")));
  EXPECT_THAT(*got, Not(HasSubstr("connect:")));
  EXPECT_THAT(*got, HasSubstr("PERMISSION_DENIED: uid 65534 (gid 65534) may not update models"));
  EXPECT_THAT(*got, HasSubstr("PERMISSION_DENIED: uid 65534 (gid 65534) may not roll models back"));
  EXPECT_THAT(*got, HasSubstr("PERMISSION_DENIED: uid 65534 may not see model 'm'"));
  EXPECT_EQ(std::count(got->begin(), got->end(), '\n'), 3) << *got;
  EXPECT_THAT(*got, Not(HasSubstr("OK"))) << *got;
  EXPECT_EQ(Info("m").generation, 1u);
  EXPECT_FALSE(Info("m").update.has_value());
  ExpectServes("m", 1, Shard("llamaA"), "after the refusals");
}

// Only `update` may carry a descriptor, exactly one, a sealed memfd, and never beside a
// checkpoint. Every refused descriptor is closed; the connection and the daemon serve on.
TEST_F(UpdateTest, StrayFileDescriptorsAreRefused) {
  ASSERT_TRUE(StartDaemon()) << Slurp(dir_ + "/weightd.log");
  ASSERT_EQ(Load("m", "llamaA", 2), "");
  const std::vector<testing::SyntheticTensor> k = {
      {"model.layers.0.self_attn.k_proj.weight", "BF16", {64, 256}}};
  UniqueFd sealed = PatternMemfd(k, 0x11);
  ASSERT_TRUE(sealed);
  UniqueFd unsealed(::memfd_create("unsealed", MFD_CLOEXEC | MFD_ALLOW_SEALING));
  ASSERT_TRUE(unsealed);
  ASSERT_EQ(::ftruncate(unsealed.get(), 4096), 0);
  Raw raw(socket_);
  ASSERT_TRUE(raw.Hello());
  // Settle the daemon's descriptors (its first status and metrics) before the baseline.
  ASSERT_TRUE(raw.Call({{"op", "status"}, {"name", "m"}}).value("ok", false));
  const int fds_before = testing::ReadProcResources(daemon_).fds;
  ASSERT_GT(fds_before, 0);

  json r = raw.Call({{"op", "status"}, {"id", 1}}, {sealed.get()});
  EXPECT_EQ(Code(r), "INVALID_ARGUMENT");
  EXPECT_EQ(r.value("id", json()), 1);
  EXPECT_THAT(Message(r), HasSubstr("requests must not carry file descriptors, except 'update'"));
  EXPECT_THAT(Message(r), HasSubstr("1 received and closed"));
  r = raw.Call({{"op", "attach"}, {"id", 2}, {"name", "m"}, {"rank", 0}}, {sealed.get()});
  EXPECT_EQ(Code(r), "INVALID_ARGUMENT");
  EXPECT_THAT(Message(r), HasSubstr("must not carry file descriptors"));
  r = raw.Call({{"op", "update"}, {"id", 3}, {"name", "m"}, {"wait", true}},
               {sealed.get(), sealed.get()});
  EXPECT_EQ(Code(r), "INVALID_ARGUMENT");
  EXPECT_THAT(Message(r), HasSubstr("2 received and closed"));
  r = raw.Call({{"op", "update"}, {"id", 4}, {"name", "m"}, {"checkpoint", Model("llamaB")}},
               {sealed.get()});
  EXPECT_EQ(Code(r), "INVALID_ARGUMENT");
  EXPECT_THAT(Message(r), HasSubstr("not both"));
  r = raw.Call({{"op", "update"}, {"id", 5}, {"name", "m"}}, {unsealed.get()});
  EXPECT_EQ(Code(r), "INVALID_ARGUMENT");
  EXPECT_THAT(Message(r), HasSubstr("F_SEAL_WRITE"));
  r = raw.Call({{"op", "update"}, {"id", 6}, {"name", "m"}});
  EXPECT_EQ(Code(r), "INVALID_ARGUMENT");
  EXPECT_THAT(Message(r), HasSubstr("checkpoint"));
  // Descriptors sent with a packet that is not even JSON are closed too.
  r = raw.Call(json("not a request"), {sealed.get()});
  EXPECT_EQ(Code(r), "INVALID_ARGUMENT");

  // The same connection serves on, and nothing was published.
  r = raw.Call({{"op", "status"}, {"id", 7}, {"name", "m"}});
  ASSERT_TRUE(r.value("ok", false)) << r.dump();
  EXPECT_EQ(r["result"]["models"][0].value("generation", 0), 1);
  EXPECT_TRUE(
      WaitUntil([&] { return testing::ReadProcResources(daemon_).fds == fds_before; }, seconds(5)))
      << "the daemon holds " << testing::ReadProcResources(daemon_).fds << " fds, had "
      << fds_before;
  // A valid memfd update on the same connection works.
  r = raw.Call({{"op", "update"}, {"id", 8}, {"name", "m"}, {"wait", true}}, {sealed.get()}, 60000);
  ASSERT_TRUE(r.value("ok", false)) << r.dump();
  EXPECT_EQ(r["result"].value("generation", 0), 2);
  EXPECT_EQ(r["result"].value("state", ""), "ready");
  EXPECT_EQ(r.value("id", json()), 8);
  EXPECT_EQ(Info("m").generation, 2u);
  // Requests sent behind an update with `wait` are answered after it, in order.
  ASSERT_TRUE(raw.Send({{"op", "update"},
                        {"id", 9},
                        {"name", "m"},
                        {"checkpoint", Model("llamaB")},
                        {"wait", true}}));
  r = raw.Call({{"op", "status"}, {"id", 10}, {"name", "m"}}, {}, 60000);
  EXPECT_EQ(r.value("id", json()), 9) << r.dump();
  EXPECT_EQ(r["result"].value("state", ""), "ready") << r.dump();
  r = raw.Call({{"op", "list"}, {"id", 11}});
  EXPECT_EQ(r.value("id", json()), 10) << r.dump();
  EXPECT_EQ(r["result"]["models"][0].value("generation", 0), 3) << r.dump();
}

// wait_generation: a blocked waiter wakes when the update publishes; a timeout answers with the
// current generation; an unload ends a wait with NOT_FOUND.
TEST_F(UpdateTest, WaitGenerationWakesOnPublicationAndTimesOut) {
  ASSERT_TRUE(StartDaemon()) << Slurp(dir_ + "/weightd.log");
  ASSERT_EQ(Load("m", "llamaA", 2), "");
  absl::StatusOr<Client> c = Connect();
  ASSERT_TRUE(c.ok());

  std::atomic<bool> woke{false};
  absl::StatusOr<GenerationWait> waited = absl::UnknownError("not run");
  Clock::time_point woke_at;
  std::thread waiter([&] {
    absl::StatusOr<Client> w = Connect();
    if (!w.ok()) {
      waited = w.status();
      woke = true;
      return;
    }
    waited = w->WaitGeneration("m", 1, absl::Seconds(10));
    woke_at = Clock::now();
    woke = true;
  });
  // The waiter is blocked: nothing answers it while the generation is 1.
  std::this_thread::sleep_for(milliseconds(500));
  EXPECT_FALSE(woke.load()) << "wait_generation returned before any update";
  const Clock::time_point sent = Clock::now();
  absl::StatusOr<UpdateResult> u = c->Update("m", Model("llamaB"), /*wait=*/true);
  const Clock::time_point published = Clock::now();
  waiter.join();
  ASSERT_TRUE(u.ok()) << u.status();
  ASSERT_TRUE(waited.ok()) << waited.status();
  EXPECT_EQ(waited->generation, 2u);
  EXPECT_FALSE(waited->timed_out);
  EXPECT_GE(woke_at, sent);
  // Woken by the publication (before or after the update's own reply), not by the timeout.
  EXPECT_LT(std::chrono::abs(woke_at - published), milliseconds(1000))
      << "woke " << std::chrono::duration_cast<milliseconds>(woke_at - published).count()
      << " ms after the update's reply";

  // Already past: at once. Timeout: timed_out with the current generation.
  Clock::time_point t0 = Clock::now();
  absl::StatusOr<GenerationWait> now = c->WaitGeneration("m", 0, absl::Seconds(10));
  ASSERT_TRUE(now.ok()) << now.status();
  EXPECT_EQ(now->generation, 2u);
  EXPECT_FALSE(now->timed_out);
  EXPECT_LT(Clock::now() - t0, milliseconds(1000));
  t0 = Clock::now();
  absl::StatusOr<GenerationWait> late = c->WaitGeneration("m", 2, absl::Milliseconds(300));
  const auto took = Clock::now() - t0;
  ASSERT_TRUE(late.ok()) << late.status();
  EXPECT_TRUE(late->timed_out);
  EXPECT_EQ(late->generation, 2u);
  EXPECT_GE(took, milliseconds(280));
  EXPECT_LT(took, milliseconds(3000));
  EXPECT_EQ(c->WaitGeneration("nope", 0, absl::Seconds(1)).status().code(),
            absl::StatusCode::kNotFound);

  // Unloaded while waited for: NOT_FOUND, promptly.
  absl::Status gone = absl::UnknownError("not run");
  Clock::time_point gone_at;
  std::thread waiter2([&] {
    absl::StatusOr<Client> w = Connect();
    if (!w.ok()) {
      gone = w.status();
      return;
    }
    gone = w->WaitGeneration("m", 2, absl::Seconds(10)).status();
    gone_at = Clock::now();
  });
  std::this_thread::sleep_for(milliseconds(300));
  const Clock::time_point unloaded = Clock::now();
  ASSERT_TRUE(c->Unload("m").ok());
  waiter2.join();
  EXPECT_EQ(gone.code(), absl::StatusCode::kNotFound) << gone;
  EXPECT_LT(gone_at - unloaded, milliseconds(1000));
}

// With keep_previous_generation, rollback publishes the previous weights as the next number,
// and a second rollback undoes the first; without it rollback is refused, naming the key.
TEST_F(UpdateTest, RollbackRestoresThePreviousGeneration) {
  ASSERT_TRUE(StartDaemon({{"keep_previous_generation", true}})) << Slurp(dir_ + "/weightd.log");
  Rollback();
}

void UpdateTest::Rollback() {
  const std::vector<RankBytes>& want_a = Shard("llamaA");
  const std::vector<RankBytes>& want_b = Shard("llamaB");
  ASSERT_EQ(Load("m", "llamaA", 2), "");
  absl::StatusOr<Client> c = Connect();
  ASSERT_TRUE(c.ok());
  absl::StatusOr<RollbackResult> none = c->Rollback("m");
  EXPECT_EQ(none.status().code(), absl::StatusCode::kFailedPrecondition) << none.status();
  EXPECT_THAT(none.status().message(), HasSubstr("keeps no previous generation"));

  std::vector<Attachment> att;
  for (int r = 0; r < 2; ++r) {
    absl::StatusOr<Attachment> a = c->Attach("m", r);
    ASSERT_TRUE(a.ok()) << a.status();
    att.push_back(std::move(*a));
  }
  // An attachment left on generation 1 until the rollback republishes generation 1's memory.
  absl::StatusOr<Attachment> old = c->Attach("m", 1);
  ASSERT_TRUE(old.ok()) << old.status();
  ASSERT_TRUE(c->Update("m", Model("llamaB"), /*wait=*/true).ok());
  ModelInfo st = Info("m");
  EXPECT_EQ(st.generation, 2u);
  EXPECT_EQ(st.previous_generation, 1u);
  for (Attachment& a : att) {
    ASSERT_TRUE(a.Refresh().ok());
    EXPECT_EQ(a.generation(), 2u);
  }
  EXPECT_EQ(Held("m"), "2");  // generation 1: kept as the previous one, and leased

  absl::StatusOr<RollbackResult> rb = c->Rollback("m");
  ASSERT_TRUE(rb.ok()) << rb.status();
  EXPECT_EQ(rb->generation, 3u);
  EXPECT_EQ(rb->restored, 1u);
  st = Info("m");
  EXPECT_EQ(st.generation, 3u);
  EXPECT_EQ(st.previous_generation, 2u);
  for (int r = 0; r < 2; ++r) {
    absl::StatusOr<bool> moved = att[r].Refresh();
    ASSERT_TRUE(moved.ok()) << moved.status();
    EXPECT_TRUE(*moved);
    EXPECT_EQ(att[r].generation(), 3u);
    EXPECT_TRUE(att[r].Verify().ok()) << att[r].Verify();
    EXPECT_THAT(Differences(att[r], want_a[r]), IsEmpty()) << "rank " << r << " after rollback";
  }
  // From generation 1 to 3: the same memory mapped again at the same addresses.
  const void* old_data = old->tensors().front().data;
  absl::StatusOr<bool> old_moved = old->Refresh();
  ASSERT_TRUE(old_moved.ok()) << old_moved.status();
  EXPECT_TRUE(*old_moved);
  EXPECT_EQ(old->generation(), 3u);
  EXPECT_EQ(old->tensors().front().data, old_data);
  EXPECT_TRUE(old->Verify().ok()) << old->Verify();
  EXPECT_THAT(Differences(*old, want_a[1]), IsEmpty()) << "generation 1's attachment at 3";
  ASSERT_TRUE(old->Detach().ok());
  ExpectServes("m", 3, want_a, "attachments after the rollback");
  EXPECT_EQ(Metric("weightd_rollbacks_total"), "1");

  absl::StatusOr<RollbackResult> rb2 = c->Rollback("m");
  ASSERT_TRUE(rb2.ok()) << rb2.status();
  EXPECT_EQ(rb2->generation, 4u);
  EXPECT_EQ(rb2->restored, 2u);
  for (int r = 0; r < 2; ++r) {
    ASSERT_TRUE(att[r].Refresh().ok());
    EXPECT_EQ(att[r].generation(), 4u);
    EXPECT_TRUE(att[r].Verify().ok()) << att[r].Verify();
    EXPECT_THAT(Differences(att[r], want_b[r]), IsEmpty()) << "rank " << r << " after rollback 2";
  }
  // A waiter past 3 sees the rollback's number at once.
  absl::StatusOr<GenerationWait> w = c->WaitGeneration("m", 3, absl::Seconds(5));
  ASSERT_TRUE(w.ok());
  EXPECT_EQ(w->generation, 4u);
  EXPECT_EQ(Info("m").previous_generation, 3u);
  EXPECT_EQ(Held("m"), "2");
  // An update after rollbacks continues the numbers and keeps the rolled-back weights as previous.
  absl::StatusOr<UpdateResult> u = c->Update("m", Model("llamaA"), /*wait=*/true);
  ASSERT_TRUE(u.ok()) << u.status();
  EXPECT_EQ(u->generation, 5u);
  absl::StatusOr<RollbackResult> rb3 = c->Rollback("m");
  ASSERT_TRUE(rb3.ok()) << rb3.status();
  EXPECT_EQ(rb3->generation, 6u);
  EXPECT_EQ(rb3->restored, 4u);
  ExpectServes("m", 6, want_b, "after update 5 and its rollback");
}

TEST_F(UpdateTest, RollbackWithoutKeepPreviousGenerationIsRefused) {
  ASSERT_TRUE(StartDaemon()) << Slurp(dir_ + "/weightd.log");
  ASSERT_EQ(Load("m", "llamaA", 2), "");
  absl::StatusOr<Client> c = Connect();
  ASSERT_TRUE(c.ok());
  ASSERT_TRUE(c->Update("m", Model("llamaB"), /*wait=*/true).ok());
  absl::StatusOr<RollbackResult> rb = c->Rollback("m");
  EXPECT_EQ(rb.status().code(), absl::StatusCode::kFailedPrecondition) << rb.status();
  EXPECT_THAT(rb.status().message(), HasSubstr("keep_previous_generation"));
  const RunResult ctl = RunProcess({WEIGHTCTL_BIN, "rollback", "m", "--socket", socket_});
  EXPECT_NE(ctl.exit_code, 0);
  EXPECT_THAT(ctl.err, HasSubstr("keep_previous_generation"));
  const ModelInfo st = Info("m");
  EXPECT_EQ(st.generation, 2u);
  EXPECT_EQ(st.previous_generation, 0u);
  EXPECT_EQ(Held("m"), "1");
  ExpectServes("m", 2, Shard("llamaB"), "after the refused rollback");
}

// Readers attach, check and detach (or refresh one attachment) in a loop while the main thread
// publishes ten updates alternating B and A: every attachment maps one generation whole, whose
// checksums and bytes are that generation's (odd: A, even: B).
TEST_F(UpdateTest, ConcurrentClientsNeverSeeAHalfWrittenGeneration) {
  ASSERT_TRUE(StartDaemon()) << Slurp(dir_ + "/weightd.log");
  const std::vector<RankBytes>& want_a = Shard("llamaA");
  const std::vector<RankBytes>& want_b = Shard("llamaB");
  ASSERT_EQ(Load("m", "llamaA", 2), "");
  auto want = [&](uint64_t gen, int rank) -> const RankBytes& {
    return gen % 2 == 1 ? want_a[rank] : want_b[rank];
  };
  std::atomic<bool> stop{false};
  std::atomic<int> checks{0};
  std::mutex mu;
  std::vector<std::string> errors;
  std::set<uint64_t> seen;
  auto report = [&](std::string e) {
    std::lock_guard<std::mutex> l(mu);
    if (errors.size() < 20) errors.push_back(std::move(e));
  };
  const auto deadline = Clock::now() + seconds(60);
  auto check = [&](const Attachment& a, const std::string& who) {
    const uint64_t g = a.generation();
    if (absl::Status v = a.Verify(); !v.ok())
      report(absl::StrCat(who, " gen ", g, ": ", v.ToString()));
    const std::vector<std::string> d = Differences(a, want(g, a.rank()));
    if (!d.empty()) {
      report(absl::StrCat(who, " gen ", g, " rank ", a.rank(), ": ", d.size(),
                          " tensors differ, first ", d.front()));
    }
    ++checks;
    std::lock_guard<std::mutex> l(mu);
    seen.insert(g);
  };
  std::vector<std::thread> readers;
  readers.reserve(4);
  for (int k = 0; k < 3; ++k) {
    readers.emplace_back([&, k] {
      absl::StatusOr<Client> c = Connect();
      if (!c.ok()) return report("connect: " + c.status().ToString());
      for (int i = 0; !stop.load() && Clock::now() < deadline; ++i) {
        const int rank = (k + i) % 2;
        absl::StatusOr<Attachment> a = c->Attach("m", rank);
        if (!a.ok()) return report("attach: " + a.status().ToString());
        check(*a, absl::StrCat("reader ", k));
        if (absl::Status s = a->Detach(); !s.ok()) report("detach: " + s.ToString());
        if (i % 4 == 0) {
          auto st = c->Status(std::string("m"));
          if (!st.ok() || st->front().state != "ready") report("status not ready");
        }
      }
    });
  }
  // One worker that keeps its attachments and refreshes them between steps.
  readers.emplace_back([&] {
    absl::StatusOr<Client> c = Connect();
    if (!c.ok()) return report("connect: " + c.status().ToString());
    std::vector<Attachment> att;
    for (int r = 0; r < 2; ++r) {
      absl::StatusOr<Attachment> a = c->Attach("m", r);
      if (!a.ok()) return report("attach: " + a.status().ToString());
      att.push_back(std::move(*a));
    }
    while (!stop.load() && Clock::now() < deadline) {
      for (Attachment& a : att) {
        absl::StatusOr<bool> moved = a.Refresh();
        if (!moved.ok()) return report("refresh: " + moved.status().ToString());
        check(a, "refresher");
      }
    }
  });

  absl::StatusOr<Client> c = Connect();
  ASSERT_TRUE(c.ok());
  const auto started = Clock::now();
  for (int i = 0; i < 10; ++i) {
    absl::StatusOr<UpdateResult> u =
        c->Update("m", Model(i % 2 == 0 ? "llamaB" : "llamaA"), /*wait=*/true);
    ASSERT_TRUE(u.ok()) << u.status();
    EXPECT_EQ(u->generation, static_cast<uint64_t>(i + 2));
    std::this_thread::sleep_for(milliseconds(100));
  }
  const auto took = Clock::now() - started;
  stop = true;
  for (std::thread& t : readers) t.join();
  EXPECT_THAT(errors, IsEmpty());
  EXPECT_GE(checks.load(), 40);
  EXPECT_GE(seen.size(), 5u) << "the readers saw too few generations to show anything";
  EXPECT_LT(took, seconds(30));
  EXPECT_EQ(Info("m").generation, 11u);
  ExpectServes("m", 11, want_a, "after the ten updates");
  EXPECT_TRUE(WaitUntil([&] { return Held("m") == "1"; }, seconds(5))) << Held("m");
}

// A generation is held while it is the newest or a lease maps it, and then released: the
// generations_held gauge, the daemon's memfds, and the host_memory_budget's admission (an update
// needs room for a second copy: with 2.5 models of budget, one lease left on an old generation
// is enough to refuse the next update, and detaching it makes room again).
TEST_F(UpdateTest, OldGenerationsAreReleasedOnceNoLeaseMapsThem) {
  ASSERT_TRUE(StartDaemon()) << Slurp(dir_ + "/weightd.log");
  ASSERT_EQ(Load("probe", "llamaA", 2), "");
  uint64_t model_bytes = 0;
  for (const RankStatusInfo& r : Info("probe").ranks) model_bytes += r.arena_bytes;
  ASSERT_GT(model_bytes, 0u);
  StopDaemon();
  ASSERT_TRUE(StartDaemon({{"host_memory_budget", model_bytes * 5 / 2}}))
      << Slurp(dir_ + "/weightd.log");
  ASSERT_EQ(Load("m", "llamaA", 2), "");
  const int memfds = testing::ReadProcResources(daemon_).memfd_fds;
  ASSERT_GE(memfds, 4);  // an arena and a manifest per rank
  absl::StatusOr<Client> c = Connect();
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(Held("m"), "1");

  absl::StatusOr<Attachment> a = c->Attach("m", 0);
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(c->Update("m", Model("llamaB"), /*wait=*/true).ok());
  EXPECT_EQ(Held("m"), "2");  // the lease keeps generation 1
  EXPECT_GT(testing::ReadProcResources(daemon_).memfd_fds, memfds);
  // Generations 1 and 2 are held: a third copy does not fit the budget.
  absl::StatusOr<UpdateResult> refused = c->Update("m", Model("llamaA"), /*wait=*/true);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted) << refused.status();
  EXPECT_EQ(Info("m").generation, 2u);
  // The lease moves to generation 2: generation 1 is released, and the update fits.
  ASSERT_TRUE(a->Refresh().ok());
  EXPECT_TRUE(WaitUntil([&] { return Held("m") == "1"; }, seconds(5))) << Held("m");
  EXPECT_TRUE(WaitUntil([&] { return testing::ReadProcResources(daemon_).memfd_fds == memfds; },
                        seconds(5)))
      << testing::ReadProcResources(daemon_).ToString();
  absl::StatusOr<UpdateResult> u3 = c->Update("m", Model("llamaA"), /*wait=*/true);
  ASSERT_TRUE(u3.ok()) << u3.status();
  EXPECT_EQ(Held("m"), "2");  // the lease is on 2
  ASSERT_TRUE(a->Detach().ok());
  EXPECT_TRUE(WaitUntil([&] { return Held("m") == "1"; }, seconds(5))) << Held("m");
  // Many more updates with no lease: each releases its predecessor, so all fit the budget.
  // (Each waits for the daemon's memfds to settle: the reply may come before the replaced
  // generation is freed, which BackToBackUpdatesFitABudgetOfTwoCopies is about.)
  for (int i = 0; i < 6; ++i) {
    absl::StatusOr<UpdateResult> u =
        c->Update("m", Model(i % 2 == 0 ? "llamaB" : "llamaA"), /*wait=*/true);
    ASSERT_TRUE(u.ok()) << "update " << i << ": " << u.status();
    EXPECT_EQ(Held("m"), "1");
    EXPECT_TRUE(WaitUntil([&] { return testing::ReadProcResources(daemon_).memfd_fds == memfds; },
                          seconds(5)))
        << "update " << i << ": " << testing::ReadProcResources(daemon_).ToString();
  }
  EXPECT_EQ(Info("m").generation, 9u);
  EXPECT_TRUE(WaitUntil([&] { return testing::ReadProcResources(daemon_).memfd_fds == memfds; },
                        seconds(5)))
      << testing::ReadProcResources(daemon_).ToString();
  // A connection that closes releases its lease's generation as well.
  {
    absl::StatusOr<Client> holder = Connect();
    ASSERT_TRUE(holder.ok());
    absl::StatusOr<Attachment> h = holder->Attach("m", 1);
    ASSERT_TRUE(h.ok());
    ASSERT_TRUE(c->Update("m", Model("llamaA"), /*wait=*/true).ok());
    EXPECT_EQ(Held("m"), "2");
  }
  EXPECT_TRUE(WaitUntil([&] { return Held("m") == "1"; }, seconds(5))) << Held("m");
  ExpectServes("m", 10, Shard("llamaA"), "after the releases");
}

// Expert parallelism at T=2: layer 0's expert 3 lives on rank 1 only, so an update of its
// w1/w2/w3 rewrites rank 1 and leaves rank 0's arena as it is (shared by both generations: the
// daemon holds one new arena and manifest, not two).
TEST_F(UpdateTest, PartialUpdateOfOneExpertKeepsTheOtherRanksArena) {
  ASSERT_TRUE(StartDaemon()) << Slurp(dir_ + "/weightd.log");
  const std::vector<RankBytes>& want_a = Shard("moeA", {"--expert-parallel"});
  const std::vector<RankBytes>& want_a3 = Shard("moeA3", {"--expert-parallel"});
  ASSERT_EQ(want_a3.size(), 2u);
  EXPECT_THAT(ChangedNames(want_a[0], want_a3[0]), IsEmpty());
  EXPECT_EQ(ChangedNames(want_a[1], want_a3[1]).size(), 2u);  // w13 and w2 of layer 0
  LoadOptions ep;
  ep.expert_parallel = true;
  ASSERT_EQ(Load("ep", "moeA", 2, "", ep), "");
  absl::StatusOr<Client> c = Connect();
  ASSERT_TRUE(c.ok());
  std::vector<Attachment> att;
  for (int r = 0; r < 2; ++r) {
    absl::StatusOr<Attachment> a = c->Attach("ep", r);
    ASSERT_TRUE(a.ok()) << a.status();
    EXPECT_THAT(Differences(*a, want_a[r]), IsEmpty()) << "rank " << r;
    att.push_back(std::move(*a));
  }
  const int memfds = testing::ReadProcResources(daemon_).memfd_fds;
  const size_t rank0_targets = att[0].tensors().size();
  const size_t rank1_targets = att[1].tensors().size();

  absl::StatusOr<Checkpoint> b = Checkpoint::Open(Model("moeB"));
  ASSERT_TRUE(b.ok());
  std::vector<UpdateTensor> tensors;
  for (const char* w : {"w1", "w2", "w3"}) {
    const CheckpointTensor* t =
        b->Find(absl::StrCat("model.layers.0.block_sparse_moe.experts.3.", w, ".weight"));
    ASSERT_NE(t, nullptr);
    absl::StatusOr<std::span<const std::byte>> d = b->MapTensor(*t);
    ASSERT_TRUE(d.ok());
    tensors.push_back({t->name, t->dtype, t->shape, d->data(), d->size()});
  }
  absl::StatusOr<UpdateResult> u = c->UpdateTensors("ep", tensors);
  ASSERT_TRUE(u.ok()) << u.status();
  EXPECT_EQ(u->generation, 2u);
  EXPECT_EQ(u->ranks_rewritten, 1u);
  EXPECT_EQ(u->targets_rewritten, 2u);
  EXPECT_EQ(u->targets_copied, rank0_targets + rank1_targets - 2);
  // Generation 1 stays mapped by the leases: one new arena and one new manifest, for rank 1
  // (once the copies exported for the fd store right after the publication are closed).
  EXPECT_TRUE(WaitUntil([&] { return testing::ReadProcResources(daemon_).memfd_fds == memfds + 2; },
                        seconds(5)))
      << testing::ReadProcResources(daemon_).ToString() << ", " << memfds << " before";
  for (int r = 0; r < 2; ++r) {
    absl::StatusOr<bool> moved = att[r].Refresh();
    ASSERT_TRUE(moved.ok()) << moved.status();
    EXPECT_TRUE(*moved) << "rank " << r << ": the generation number moved on for every rank";
    EXPECT_EQ(att[r].generation(), 2u);
    EXPECT_TRUE(att[r].Verify().ok()) << att[r].Verify();
    EXPECT_THAT(Differences(att[r], want_a3[r]), IsEmpty()) << "rank " << r;
  }
  // Rank 1's generation 1 arena goes with its last lease; rank 0's arena serves both.
  EXPECT_TRUE(WaitUntil([&] { return testing::ReadProcResources(daemon_).memfd_fds == memfds; },
                        seconds(5)))
      << testing::ReadProcResources(daemon_).ToString();
  ExpectServes("ep", 2, want_a3, "new attachments");
}

// A forced unload and a shutdown cancel a running update; its requester gets CANCELLED, and the
// daemon exits cleanly.
TEST_F(UpdateTest, ForcedUnloadAndShutdownCancelARunningUpdate) {
  ASSERT_TRUE(StartDaemon()) << Slurp(dir_ + "/weightd.log");
  ASSERT_EQ(Load("big", "big", 1, "hf"), "");
  const std::vector<testing::SyntheticTensor> tensors = BigTensors();
  UniqueFd memfd = PatternMemfd(tensors, 0x55);
  ASSERT_TRUE(memfd);
  // The update waits on a connection of its own; the unload comes as soon as status shows it
  // running. A round in which the update published first is retried.
  bool cancelled = false;
  for (int round = 0; round < 3 && !cancelled; ++round) {
    absl::StatusOr<UpdateResult> result = absl::UnknownError("not run");
    std::thread trainer([&] {
      absl::StatusOr<Client> t = Connect();
      result = t.ok() ? t->UpdateFromFd("big", memfd.get(), /*wait=*/true) : t.status();
    });
    WaitUntil(
        [&] {
          const ModelInfo st = Info("big");
          return st.update.has_value() && st.update->state == "running";
        },
        seconds(20));
    absl::StatusOr<Client> c = Connect();
    ASSERT_TRUE(c.ok());
    ASSERT_TRUE(c->Unload("big", /*force=*/true).ok());
    trainer.join();
    EXPECT_EQ(c->Status(std::string("big")).status().code(), absl::StatusCode::kNotFound);
    if (!result.ok()) {
      cancelled = true;
      EXPECT_EQ(result.status().code(), absl::StatusCode::kCancelled) << result.status();
      EXPECT_THAT(result.status().message(), HasSubstr("cancelled by a forced unload"));
    }
    ASSERT_EQ(Load("big", "big", 1, "hf"), "");
  }
  EXPECT_TRUE(cancelled) << "the update published before the unload, three times";

  // SIGTERM while an update runs: it is cancelled and the daemon exits 0 (StopDaemon checks).
  absl::StatusOr<Client> c = Connect();
  ASSERT_TRUE(c.ok());
  ASSERT_TRUE(c->UpdateFromFd("big", memfd.get(), /*wait=*/false).ok());
  const auto t0 = Clock::now();
  StopDaemon();
  EXPECT_LT(Clock::now() - t0, seconds(10));
}

// A takeover hands the newest generation over with its number; the successor rebuilds each
// plan from the checkpoint's headers and the load options of the record (here a T=2 Mixtral, and
// rank 1 only of a Llama cast to FP32) and updates on from there. The kept previous generation is
// not handed over. While an update runs the takeover is refused and the old daemon serves on.
TEST_F(UpdateTest, UpdatesContinueAfterATakeover) {
  ASSERT_TRUE(StartDaemon({{"keep_previous_generation", true}})) << Slurp(dir_ + "/weightd.log");
  const std::vector<RankBytes>& want_a = Shard("moeA");
  const std::vector<RankBytes>& want_a2 = Shard("moeA2");
  const std::vector<RankBytes>& want_b = Shard("moeB");
  const std::vector<RankBytes>& cast_a = Shard("llamaA", {"--dtype", "fp32"});
  const std::vector<RankBytes>& cast_b = Shard("llamaB", {"--dtype", "fp32"});
  ASSERT_EQ(Load("moe", "moeA", 2), "");
  LoadOptions rank1_fp32;
  rank1_fp32.ranks = {1};
  rank1_fp32.dtype = "fp32";
  ASSERT_EQ(Load("cast", "llamaA", 2, "", rank1_fp32), "");
  ASSERT_EQ(Load("big", "big", 1, "hf"), "");
  {
    absl::StatusOr<Client> c = Connect();
    ASSERT_TRUE(c.ok());
    absl::StatusOr<UpdateResult> u = c->Update("moe", Model("moeB"), /*wait=*/true);
    ASSERT_TRUE(u.ok()) << u.status();
    EXPECT_EQ(u->generation, 2u);
    ASSERT_TRUE(c->Update("cast", Model("llamaB"), /*wait=*/true).ok());
  }
  // Takeovers while `big` is being updated: refused (a round in which the update ended first
  // takes over, and the rest of the test goes on with the successor).
  UniqueFd memfd = PatternMemfd(BigTensors(), 0x66);
  ASSERT_TRUE(memfd);
  bool refused = false, handed_over = false;
  for (int round = 0; round < 3 && !refused && !handed_over; ++round) {
    absl::StatusOr<Client> c = Connect();
    ASSERT_TRUE(c.ok());
    const uint64_t gen = Info("big").generation;
    ASSERT_TRUE(c->UpdateFromFd("big", memfd.get(), /*wait=*/false).ok());
    const std::string log = absl::StrCat(dir_, "/successor", round, ".log");
    const pid_t successor = Spawn(
        {WEIGHTD_BIN, "--config", dir_ + "/weightd.json", "--log-level", "debug", "--takeover"},
        log, log);
    int rc = -1, old_rc = -1;
    ASSERT_TRUE(WaitUntil(
        [&] {
          int status = 0;
          if (::waitpid(successor, &status, WNOHANG) == successor) {
            rc = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
            return true;
          }
          if (::waitpid(daemon_, &status, WNOHANG) == daemon_) {
            old_rc = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
            return true;
          }
          return false;
        },
        seconds(30)))
        << Slurp(log);
    if (old_rc >= 0) {
      EXPECT_EQ(old_rc, 0);
      daemon_ = successor;
      handed_over = true;
      break;
    }
    refused = true;
    EXPECT_EQ(rc, 1) << Slurp(log);
    EXPECT_THAT(Slurp(log), HasSubstr("updates are running; retry the takeover"));
    absl::StatusOr<GenerationWait> w = c->WaitGeneration("big", gen, absl::Seconds(60));
    ASSERT_TRUE(w.ok()) << w.status();
    EXPECT_EQ(w->generation, gen + 1) << "the update published on the old daemon";
    EXPECT_EQ(Info("big").update->state, "done");
  }
  EXPECT_TRUE(refused) << "the update ended before the successor asked, three times";
  if (!handed_over) {
    const pid_t old_daemon = daemon_;
    daemon_ = Spawn(
        {WEIGHTD_BIN, "--config", dir_ + "/weightd.json", "--log-level", "debug", "--takeover"},
        dir_ + "/successor.out", dir_ + "/successor.log");
    EXPECT_EQ(WaitFor(old_daemon, seconds(30)), 0) << "the old daemon did not hand over";
  }
  ASSERT_TRUE(WaitUntil([&] { return Info("moe").generation > 0; }, seconds(20)))
      << Slurp(dir_ + "/successor.log");
  ModelInfo st = Info("moe");
  EXPECT_EQ(st.generation, 2u);
  EXPECT_EQ(st.previous_generation, 0u);
  EXPECT_FALSE(st.update.has_value());
  ExpectServes("moe", 2, want_b, "after the takeover");
  absl::StatusOr<Client> c = Connect();
  ASSERT_TRUE(c.ok());
  absl::StatusOr<RollbackResult> rb = c->Rollback("moe");
  EXPECT_EQ(rb.status().code(), absl::StatusCode::kFailedPrecondition) << rb.status();
  EXPECT_THAT(rb.status().message(), HasSubstr("handed over"));

  // The plan is rebuilt from the original checkpoint's headers: without them, the update fails
  // naming the checkpoint, and generation 2 serves on.
  {
    const std::string moved = Model("moeA.moved");
    std::filesystem::rename(Model("moeA"), moved);
    struct Restore {
      std::string from, to;
      ~Restore() { std::filesystem::rename(from, to); }
    } restore{moved, Model("moeA")};
    absl::StatusOr<UpdateResult> u = c->Update("moe", Model("moeA2"), /*wait=*/true);
    ASSERT_FALSE(u.ok());
    EXPECT_THAT(u.status().message(), HasSubstr("was handed over by an earlier daemon"));
    EXPECT_THAT(u.status().message(), HasSubstr(Model("moeA")));
    EXPECT_EQ(Info("moe").generation, 2u);
  }
  // A partial update on the successor (one expert's w1 of moeA over generation 2's B): only
  // layer 0's w13 changes on each rank.
  absl::StatusOr<Checkpoint> a = Checkpoint::Open(Model("moeA"));
  ASSERT_TRUE(a.ok());
  const CheckpointTensor* w1 = a->Find("model.layers.0.block_sparse_moe.experts.2.w1.weight");
  ASSERT_NE(w1, nullptr);
  absl::StatusOr<std::span<const std::byte>> w1_bytes = a->MapTensor(*w1);
  ASSERT_TRUE(w1_bytes.ok());
  const UpdateTensor one{w1->name, w1->dtype, w1->shape, w1_bytes->data(), w1_bytes->size()};
  absl::StatusOr<UpdateResult> part = c->UpdateTensors("moe", {&one, 1});
  ASSERT_TRUE(part.ok()) << part.status();
  EXPECT_EQ(part->generation, 3u);
  EXPECT_EQ(part->targets_rewritten, 2u);  // layer 0's w13 on each rank
  for (int r = 0; r < 2; ++r) {
    absl::StatusOr<Attachment> att = c->Attach("moe", r);
    ASSERT_TRUE(att.ok());
    EXPECT_TRUE(att->Verify().ok()) << att->Verify();
    const std::vector<std::string> changed = ChangedNames(want_b[r], [&] {
      RankBytes now;
      for (const TensorView& t : att->tensors()) {
        now[t.name].assign(static_cast<const char*>(t.data), t.nbytes);
      }
      return now;
    }());
    ASSERT_EQ(changed.size(), 1u) << absl::StrJoin(changed, ", ");
    EXPECT_THAT(changed[0], HasSubstr("layers.0.")) << changed[0];
    EXPECT_THAT(changed[0], HasSubstr("w13")) << changed[0];
  }
  // Full updates and rollbacks on the successor.
  absl::StatusOr<UpdateResult> u = c->Update("moe", Model("moeA2"), /*wait=*/true);
  ASSERT_TRUE(u.ok()) << u.status() << Slurp(dir_ + "/successor.log");
  EXPECT_EQ(u->generation, 4u);
  ExpectServes("moe", 4, want_a2, "updated on the successor");
  absl::StatusOr<RollbackResult> rb2 = c->Rollback("moe");
  ASSERT_TRUE(rb2.ok()) << rb2.status();
  EXPECT_EQ(rb2->generation, 5u);
  EXPECT_EQ(rb2->restored, 3u);
  ASSERT_TRUE(c->Update("moe", Model("moeA"), /*wait=*/true).ok());
  ExpectServes("moe", 6, want_a, "back to A");

  // The rank-1-only FP32 model: handed over at generation 2 (B), updated to A on the successor.
  EXPECT_EQ(Info("cast").generation, 2u);
  absl::StatusOr<UpdateResult> cu = c->Update("cast", Model("llamaA"), /*wait=*/true);
  ASSERT_TRUE(cu.ok()) << cu.status();
  EXPECT_EQ(cu->generation, 3u);
  EXPECT_EQ(cu->ranks_rewritten, 1u);
  absl::StatusOr<Attachment> ca = c->Attach("cast", 1);
  ASSERT_TRUE(ca.ok()) << ca.status();
  EXPECT_EQ(ca->generation(), 3u);
  EXPECT_TRUE(ca->Verify().ok()) << ca->Verify();
  EXPECT_THAT(Differences(*ca, cast_a[1]), IsEmpty());
  EXPECT_EQ(c->Attach("cast", 0).status().code(), absl::StatusCode::kNotFound);
  (void)cast_b;
}

// An update from one .safetensors file of a checkpoint: the tensors it holds, a third of the
// model, some of them parts of fused targets (q of qkv_proj, gate of gate_up_proj), whose other
// parts keep generation 1's bytes.
TEST_F(UpdateTest, UpdateFromOneShardFileMixesFusedTargets) {
  ASSERT_TRUE(StartDaemon()) << Slurp(dir_ + "/weightd.log");
  const std::vector<RankBytes>& want_a = Shard("llamaA");
  const std::vector<RankBytes>& want = Shard("llamaAB1");
  size_t changed = 0, total = 0;
  for (int r = 0; r < 2; ++r) {
    changed += ChangedNames(want_a[r], want[r]).size();
    total += want[r].size();
  }
  ASSERT_GT(changed, 0u);
  ASSERT_LT(changed, total);
  ASSERT_EQ(Load("m", "llamaA", 2), "");
  absl::StatusOr<Client> c = Connect();
  ASSERT_TRUE(c.ok());
  absl::StatusOr<UpdateResult> u =
      c->Update("m", Model("llamaB") + "/model-00001-of-00003.safetensors", /*wait=*/true);
  ASSERT_TRUE(u.ok()) << u.status();
  EXPECT_EQ(u->generation, 2u);
  EXPECT_EQ(u->targets_rewritten, changed);
  EXPECT_EQ(u->targets_copied, total - changed);
  ExpectServes("m", 2, want, "after the one-file update");
}

// A model loaded with a dtype conversion (BF16 checkpoint, FP32 arenas): the update brings
// checkpoint-dtype tensors, which go through the same casts as the load did.
TEST_F(UpdateTest, UpdateOfACastModelCastsTheNewTensors) {
  ASSERT_TRUE(StartDaemon()) << Slurp(dir_ + "/weightd.log");
  const std::vector<RankBytes>& want_a = Shard("llamaA", {"--dtype", "fp32"});
  const std::vector<RankBytes>& want_b = Shard("llamaB", {"--dtype", "fp32"});
  LoadOptions fp32;
  fp32.dtype = "fp32";
  ASSERT_EQ(Load("m", "llamaA", 2, "", fp32), "");
  ExpectServes("m", 1, want_a, "loaded as fp32");
  absl::StatusOr<Client> c = Connect();
  ASSERT_TRUE(c.ok());
  // FP32 tensors are refused: the update speaks the checkpoint's dtypes.
  absl::StatusOr<Attachment> a = c->Attach("m", 0);
  ASSERT_TRUE(a.ok());
  const TensorView* norm = a->Find("model.norm.weight");
  ASSERT_NE(norm, nullptr);
  ASSERT_EQ(norm->dtype, DType::kF32);
  const UpdateTensor f32{"model.norm.weight", DType::kF32, norm->shape, norm->data, norm->nbytes};
  absl::StatusOr<UpdateResult> bad = c->UpdateTensors("m", {&f32, 1});
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument) << bad.status();
  EXPECT_THAT(bad.status().message(), HasSubstr("is F32 [256] in the update but BF16 [256]"));
  absl::StatusOr<UpdateResult> u = c->Update("m", Model("llamaB"), /*wait=*/true);
  ASSERT_TRUE(u.ok()) << u.status();
  EXPECT_EQ(u->generation, 2u);
  absl::StatusOr<bool> moved = a->Refresh();
  ASSERT_TRUE(moved.ok()) << moved.status();
  EXPECT_TRUE(a->Verify().ok()) << a->Verify();
  EXPECT_THAT(Differences(*a, want_b[0]), IsEmpty());
  ExpectServes("m", 2, want_b, "updated as fp32");
}

// An Attachment keeps its connection when its Client goes: it still refreshes and detaches.
TEST_F(UpdateTest, AnAttachmentOutlivingItsClientRefreshes) {
  ASSERT_TRUE(StartDaemon()) << Slurp(dir_ + "/weightd.log");
  ASSERT_EQ(Load("m", "llamaA", 2), "");
  std::optional<Attachment> a;
  {
    absl::StatusOr<Client> c = Connect();
    ASSERT_TRUE(c.ok());
    absl::StatusOr<Attachment> att = c->Attach("m", 0);
    ASSERT_TRUE(att.ok());
    a.emplace(std::move(*att));
  }
  absl::StatusOr<Client> c = Connect();
  ASSERT_TRUE(c.ok());
  ASSERT_TRUE(c->Update("m", Model("llamaB"), /*wait=*/true).ok());
  absl::StatusOr<bool> moved = a->Refresh();
  ASSERT_TRUE(moved.ok()) << moved.status();
  EXPECT_TRUE(*moved);
  EXPECT_EQ(a->generation(), 2u);
  EXPECT_THAT(Differences(*a, Shard("llamaB")[0]), IsEmpty());
  EXPECT_EQ(Held("m"), "1");
  ASSERT_TRUE(a->Detach().ok());
  EXPECT_EQ(Info("m").ranks[0].lease_count, 0u);
}

// A lease dropped by a forced unload cannot be refreshed, even onto a model loaded again under
// the same name; the attachment keeps mapping what it had, intact.
TEST_F(UpdateTest, RefreshAfterAForcedUnloadFailsAndKeepsTheMapping) {
  ASSERT_TRUE(StartDaemon()) << Slurp(dir_ + "/weightd.log");
  const std::vector<RankBytes>& want_a = Shard("llamaA");
  ASSERT_EQ(Load("m", "llamaA", 2), "");
  absl::StatusOr<Client> c = Connect();
  ASSERT_TRUE(c.ok());
  absl::StatusOr<Attachment> a = c->Attach("m", 1);
  ASSERT_TRUE(a.ok());
  ASSERT_TRUE(c->Unload("m", /*force=*/true).ok());
  ASSERT_EQ(Load("m", "llamaB", 2), "");
  ASSERT_TRUE(c->Update("m", Model("llamaB"), /*wait=*/true).ok());
  absl::StatusOr<bool> moved = a->Refresh();
  EXPECT_EQ(moved.status().code(), absl::StatusCode::kNotFound) << moved.status();
  EXPECT_THAT(moved.status().message(), HasSubstr("a forced unload releases them"));
  EXPECT_EQ(a->generation(), 1u);
  EXPECT_TRUE(a->Verify().ok()) << a->Verify();
  EXPECT_THAT(Differences(*a, want_a[1]), IsEmpty());
}

// A trainer publishing one update after another, each sent once the previous one is published,
// with no lease on the old generations: each replaced generation is no longer needed when the
// update's reply comes, so a host_memory_budget of two copies (and a bit) is enough for every
// update. (The reaper frees a replaced generation after the update's reply; admission counted
// it as held until then, so the next update could be refused with RESOURCE_EXHAUSTED.)
TEST_F(UpdateTest, BackToBackUpdatesFitABudgetOfTwoCopies) {
  ASSERT_TRUE(StartDaemon()) << Slurp(dir_ + "/weightd.log");
  ASSERT_EQ(Load("probe", "big", 1, "hf"), "");
  const uint64_t model_bytes = Info("probe").ranks.at(0).arena_bytes;
  ASSERT_GT(model_bytes, 100u << 20);
  StopDaemon();
  ASSERT_TRUE(StartDaemon({{"host_memory_budget", 2 * model_bytes + (16 << 20)}}))
      << Slurp(dir_ + "/weightd.log");
  ASSERT_EQ(Load("big", "big", 1, "hf"), "");
  const std::vector<testing::SyntheticTensor> tensors = BigTensors();
  UniqueFd fills[2] = {PatternMemfd(tensors, 0x21), PatternMemfd(tensors, 0x42)};
  ASSERT_TRUE(fills[0] && fills[1]);
  absl::StatusOr<Client> c = Connect();
  ASSERT_TRUE(c.ok());
  for (int i = 0; i < 8; ++i) {
    absl::StatusOr<UpdateResult> u = c->UpdateFromFd("big", fills[i % 2].get(), /*wait=*/true);
    ASSERT_TRUE(u.ok()) << "update " << i << ": " << u.status();
    EXPECT_EQ(u->generation, static_cast<uint64_t>(i + 2));
  }
  ExpectBigServes(9, 0x42);
}

// The full update with device arenas: `--backend cuda` on the simulated driver (ctest's
// sim:update_test_cuda sets WEIGHTD_CUDA_DRIVER) or a real GPU. The TensorViews' device
// pointers stay the same across Refresh, and Read() through them gives B's bytes.
TEST_F(UpdateTest, FullUpdateOnDeviceArenas) {
  if (std::getenv("WEIGHTD_CUDA_DRIVER") == nullptr && ::access("/dev/nvidiactl", F_OK) != 0) {
    GTEST_SKIP() << "no CUDA driver: runs as sim:update_test_cuda or on a GPU";
  }
  if (!StartDaemon(json::object(), "cuda")) {
    GTEST_SKIP() << "weightd --backend cuda does not start here: " << Slurp(dir_ + "/weightd.log");
  }
  FullUpdate(/*with_weightctl=*/false);
  absl::StatusOr<Client> c = Connect();
  ASSERT_TRUE(c.ok());
  absl::StatusOr<Attachment> a = c->Attach("m", 1);
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_GE(a->tensors().front().device, 0) << "host memory on the cuda backend";
}

// Rollbacks with device arenas: refresh maps memory that the attachment mapped before (a
// generation republished) at the same device addresses.
TEST_F(UpdateTest, RollbackOnDeviceArenas) {
  if (std::getenv("WEIGHTD_CUDA_DRIVER") == nullptr && ::access("/dev/nvidiactl", F_OK) != 0) {
    GTEST_SKIP() << "no CUDA driver: runs as sim:update_test_cuda or on a GPU";
  }
  if (!StartDaemon({{"keep_previous_generation", true}}, "cuda")) {
    GTEST_SKIP() << "weightd --backend cuda does not start here: " << Slurp(dir_ + "/weightd.log");
  }
  Rollback();
}

// The one-layer update of a three-arena model with device arenas: refresh remaps layer 1's
// arena only, at the same device addresses.
TEST_F(UpdateTest, OneLayerUpdateReplacesOnlyThatLayersArenasOnDeviceArenas) {
  if (std::getenv("WEIGHTD_CUDA_DRIVER") == nullptr && ::access("/dev/nvidiactl", F_OK) != 0) {
    GTEST_SKIP() << "no CUDA driver: runs as sim:update_test_cuda or on a GPU";
  }
  if (!StartDaemon({{"arena_segment_bytes", 1}}, "cuda")) {
    GTEST_SKIP() << "weightd --backend cuda does not start here: " << Slurp(dir_ + "/weightd.log");
  }
  OneLayerUpdate();
}

// The partial update with device arenas: the copies of generation N's bytes and the checksums
// of partly new targets are device work here.
TEST_F(UpdateTest, PartialUpdateOnDeviceArenas) {
  if (std::getenv("WEIGHTD_CUDA_DRIVER") == nullptr && ::access("/dev/nvidiactl", F_OK) != 0) {
    GTEST_SKIP() << "no CUDA driver: runs as sim:update_test_cuda or on a GPU";
  }
  if (!StartDaemon(json::object(), "cuda")) {
    GTEST_SKIP() << "weightd --backend cuda does not start here: " << Slurp(dir_ + "/weightd.log");
  }
  PartialUpdate();
}

}  // namespace
}  // namespace weightd
