// Tests of Checkpoint::Open over hand-built shard directories, and of the data accessors.
#include "weightd/checkpoint.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "test_util.h"
#include "weightd/file_util.h"
#include "weightd/mapped_file.h"

namespace weightd {
namespace {

using ::testing::ElementsAre;
using ::testing::Pair;
using ::weightd::testing::SafetensorsBuilder;
using ::weightd::testing::StatusIs;
using ::weightd::testing::Subs;
using ::weightd::testing::TempDir;

constexpr absl::StatusCode kInvalid = absl::StatusCode::kInvalidArgument;
constexpr char kIndex[] = "model.safetensors.index.json";
constexpr char kShard1[] = "model-00001-of-00002.safetensors";
constexpr char kShard2[] = "model-00002-of-00002.safetensors";

// model.safetensors.index.json text for `weight_map` (tensor -> shard file name).
std::string IndexJson(const std::map<std::string, std::string>& weight_map) {
  std::vector<std::string> entries;
  for (const auto& [tensor, file] : weight_map) {
    entries.push_back(absl::StrCat("\"", tensor, "\": \"", file, "\""));
  }
  return absl::StrCat(R"({"metadata": {"total_size": 0}, "weight_map": {)",
                      absl::StrJoin(entries, ", "), "}}");
}

// Two shards: shard 1 holds a (F32 [2,2]) and b (BF16 [3]); shard 2 holds c (U8 [5]).
struct TwoShards {
  SafetensorsBuilder s1, s2;
  TwoShards() {
    s1.Metadata("format", "pt").Add("a", "F32", {2, 2}).Add("b", "BF16", {3});
    s2.Add("c", "U8", {5});
  }
  void Write(const TempDir& dir) const {
    dir.Write(kShard1, s1.Bytes());
    dir.Write(kShard2, s2.Bytes());
  }
};

TEST(CheckpointTest, OpensDirectoryWithIndex) {
  TempDir dir;
  TwoShards shards;
  shards.Write(dir);
  dir.Write(kIndex, IndexJson({{"a", kShard1}, {"b", kShard1}, {"c", kShard2}}));
  absl::StatusOr<Checkpoint> ckpt = Checkpoint::Open(dir.path());
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  EXPECT_EQ(ckpt->dir(), dir.path());
  ASSERT_EQ(ckpt->files().size(), 2u);
  EXPECT_EQ(ckpt->files()[0].name, kShard1);
  EXPECT_EQ(ckpt->files()[0].path, dir.Path(kShard1));
  EXPECT_EQ(ckpt->files()[0].file_size, shards.s1.Bytes().size());
  EXPECT_EQ(ckpt->files()[0].data_offset, 8 + shards.s1.Json().size());
  EXPECT_THAT(ckpt->files()[0].metadata, ElementsAre(Pair("format", "pt")));
  EXPECT_EQ(ckpt->files()[1].name, kShard2);

  ASSERT_EQ(ckpt->tensors().size(), 3u);
  const CheckpointTensor& b = ckpt->tensors()[1];
  EXPECT_EQ(b.name, "b");
  EXPECT_EQ(b.dtype, DType::kBF16);
  EXPECT_THAT(b.shape, ElementsAre(3));
  EXPECT_EQ(b.file, 0u);
  EXPECT_EQ(b.offset, 8 + shards.s1.Json().size() + 16);  // after a's 16 bytes
  EXPECT_EQ(b.nbytes, 6u);
  const CheckpointTensor* c = ckpt->Find("c");
  ASSERT_NE(c, nullptr);
  EXPECT_EQ(c->file, 1u);
  EXPECT_EQ(c->offset, 8 + shards.s2.Json().size());
  EXPECT_EQ(ckpt->Find("d"), nullptr);
  EXPECT_EQ(ckpt->total_bytes(), 16u + 6u + 5u);
  EXPECT_FALSE(ckpt->config().has_value());
  EXPECT_THAT(
      ckpt->RequireConfig("tensor-parallel sharding"),
      StatusIs(kInvalid, Subs({dir.path().c_str(), "config.json", "tensor-parallel sharding"})));
}

TEST(CheckpointTest, IndexNamesMissingFile) {
  TempDir dir;
  TwoShards shards;
  dir.Write(kShard1, shards.s1.Bytes());
  dir.Write(kIndex, IndexJson({{"a", kShard1}, {"b", kShard1}, {"c", kShard2}}));
  EXPECT_THAT(Checkpoint::Open(dir.path()),
              StatusIs(absl::StatusCode::kNotFound,
                       Subs({kIndex, absl::StrCat("'", kShard2, "'").c_str(), "does not exist"})));
}

TEST(CheckpointTest, IndexTensorAbsentFromItsShard) {
  TempDir dir;
  TwoShards shards;
  shards.Write(dir);
  dir.Write(kIndex,
            IndexJson({{"a", kShard1}, {"b", kShard1}, {"c", kShard2}, {"ghost", kShard2}}));
  EXPECT_THAT(Checkpoint::Open(dir.path()),
              StatusIs(kInvalid, Subs({kIndex, "'ghost'", kShard2, "does not contain"})));
}

TEST(CheckpointTest, IndexPointsToTheWrongShard) {
  TempDir dir;
  TwoShards shards;
  shards.Write(dir);
  dir.Write(kIndex, IndexJson({{"a", kShard1}, {"b", kShard2}, {"c", kShard2}}));
  EXPECT_THAT(Checkpoint::Open(dir.path()),
              StatusIs(kInvalid, Subs({kIndex, "'b'", kShard1, kShard2})));
}

TEST(CheckpointTest, TensorInTwoShards) {
  for (bool with_index : {true, false}) {
    SCOPED_TRACE(with_index ? "with index" : "without index");
    TempDir dir;
    SafetensorsBuilder s1, s2;
    s1.Add("a", "U8", {4}).Add("dup", "U8", {2});
    s2.Add("dup", "U8", {2}).Add("z", "U8", {1});
    dir.Write(kShard1, s1.Bytes());
    dir.Write(kShard2, s2.Bytes());
    if (with_index) {
      // The index can only name one shard per tensor; the other copy is still an error.
      dir.Write(kIndex, IndexJson({{"a", kShard1}, {"dup", kShard1}, {"z", kShard2}}));
    }
    EXPECT_THAT(Checkpoint::Open(dir.path()),
                StatusIs(kInvalid, Subs({"'dup'", "two shards", kShard1, kShard2})));
  }
}

TEST(CheckpointTest, ShardTensorNotListedInIndex) {
  TempDir dir;
  TwoShards shards;
  shards.Write(dir);
  dir.Write(kIndex, IndexJson({{"a", kShard1}, {"c", kShard2}}));
  EXPECT_THAT(Checkpoint::Open(dir.path()),
              StatusIs(kInvalid, Subs({"'b'", kShard1, kIndex, "does not list it"})));
}

TEST(CheckpointTest, BadIndexFiles) {
  TempDir dir;
  TwoShards shards;
  shards.Write(dir);
  const std::string index = dir.Path(kIndex);
  dir.Write(kIndex, "{\"weight_map\": ");
  EXPECT_THAT(Checkpoint::Open(dir.path()),
              StatusIs(kInvalid, Subs({index.c_str(), "not a valid JSON object"})));
  dir.Write(kIndex, R"({"metadata": {}})");
  EXPECT_THAT(Checkpoint::Open(dir.path()),
              StatusIs(kInvalid, Subs({index.c_str(), "missing 'weight_map'"})));
  dir.Write(kIndex, R"({"weight_map": [], "metadata": {}})");
  EXPECT_THAT(Checkpoint::Open(dir.path()),
              StatusIs(kInvalid, Subs({index.c_str(), "'weight_map' is not an object"})));
  dir.Write(kIndex, R"({"weight_map": {}} x)");
  EXPECT_THAT(Checkpoint::Open(dir.path()),
              StatusIs(kInvalid, Subs({index.c_str(), "not a valid JSON object"})));
  dir.Write(kIndex, R"({"weight_map": {"a": 3}})");
  EXPECT_THAT(Checkpoint::Open(dir.path()),
              StatusIs(kInvalid, Subs({index.c_str(), "'a'", "not a file name"})));
  dir.Write(kIndex, R"({"weight_map": {"a": "../model-00001-of-00002.safetensors"}})");
  EXPECT_THAT(Checkpoint::Open(dir.path()),
              StatusIs(kInvalid, Subs({index.c_str(), "'a'", "not a plain file name"})));
}

TEST(CheckpointTest, IndexListsATensorTwice) {
  TempDir dir;
  TwoShards shards;
  shards.Write(dir);
  // Raw text: a JSON object with a repeated key, which a map-building parser would hide.
  dir.Write(kIndex, absl::StrCat(R"({"weight_map": {"a": ")", kShard1, R"(", "b": ")", kShard1,
                                 R"(", "c": ")", kShard2, R"(", "a": ")", kShard1, R"("}})"));
  EXPECT_THAT(Checkpoint::Open(dir.path()),
              StatusIs(kInvalid, Subs({kIndex, "'a'", "listed twice"})));
}

TEST(CheckpointTest, IndexMetadataIsIgnored) {
  TempDir dir;
  TwoShards shards;
  shards.Write(dir);
  dir.Write(kIndex, absl::StrCat(R"({"metadata": {"total_size": 27, "x": [1, {"y": null}]},)",
                                 R"("weight_map": {"a": ")", kShard1, R"(", "b": ")", kShard1,
                                 R"(", "c": ")", kShard2, R"("}})"));
  absl::StatusOr<Checkpoint> ckpt = Checkpoint::Open(dir.path());
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  EXPECT_EQ(ckpt->tensors().size(), 3u);
}

TEST(CheckpointTest, BadShardHeaderNamesTheShard) {
  TempDir dir;
  TwoShards shards;
  dir.Write(kShard1, shards.s1.Bytes());
  std::string broken = shards.s2.Bytes();
  broken.resize(broken.size() - 1);
  dir.Write(kShard2, broken);
  EXPECT_THAT(Checkpoint::Open(dir.path()),
              StatusIs(kInvalid, Subs({dir.Path(kShard2).c_str(), "'c'"})));
}

TEST(CheckpointTest, DirectoryWithoutIndexUsesEverySafetensorsFile) {
  TempDir dir;
  TwoShards shards;
  shards.Write(dir);
  dir.Write("notes.txt", "not a shard");
  dir.Write("model.safetensors.bak", "not a shard either");
  absl::StatusOr<Checkpoint> ckpt = Checkpoint::Open(dir.path());
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  ASSERT_EQ(ckpt->files().size(), 2u);
  EXPECT_EQ(ckpt->files()[0].name, kShard1);
  EXPECT_EQ(ckpt->files()[1].name, kShard2);
  std::vector<std::string> names;
  for (const CheckpointTensor& t : ckpt->tensors()) names.push_back(t.name);
  EXPECT_THAT(names, ElementsAre("a", "b", "c"));
}

TEST(CheckpointTest, DirectoryWithNoShards) {
  TempDir dir;
  dir.Write("config.json", "{}");
  EXPECT_THAT(
      Checkpoint::Open(dir.path()),
      StatusIs(absl::StatusCode::kNotFound, Subs({dir.path().c_str(), "no *.safetensors files"})));
}

TEST(CheckpointTest, SingleFilePath) {
  TempDir dir;
  TwoShards shards;
  shards.Write(dir);
  dir.Write("config.json", R"({"hidden_size": 64, "num_attention_heads": 4})");
  absl::StatusOr<Checkpoint> ckpt = Checkpoint::Open(dir.Path(kShard2));
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  EXPECT_EQ(ckpt->dir(), dir.path());
  ASSERT_EQ(ckpt->files().size(), 1u);
  EXPECT_EQ(ckpt->files()[0].name, kShard2);
  ASSERT_EQ(ckpt->tensors().size(), 1u);
  EXPECT_EQ(ckpt->tensors()[0].name, "c");
  ASSERT_TRUE(ckpt->config().has_value());
  EXPECT_EQ(ckpt->config()->hidden_size(), 64);
}

TEST(CheckpointTest, NonexistentPath) {
  TempDir dir;
  const std::string missing = dir.Path("no-such-model");
  EXPECT_THAT(Checkpoint::Open(missing),
              StatusIs(absl::StatusCode::kNotFound, Subs({missing.c_str(), "does not exist"})));
}

TEST(CheckpointTest, BadConfigJsonFailsOpen) {
  TempDir dir;
  TwoShards shards;
  shards.Write(dir);
  dir.Write("config.json", "{ nope");
  EXPECT_THAT(Checkpoint::Open(dir.path()),
              StatusIs(kInvalid, Subs({dir.Path("config.json").c_str(), "not valid JSON"})));
}

// The bytes the builder put in shard `b` for the tensor at data offset `begin`, length `n`.
std::string Expected(const SafetensorsBuilder& b, uint64_t begin, uint64_t n) {
  return b.Data().substr(begin, n);
}

std::string AsString(std::span<const std::byte> s) {
  return std::string(reinterpret_cast<const char*>(s.data()), s.size());
}

TEST(CheckpointDataTest, MapTensorAndReadAtReturnTheExactBytes) {
  TempDir dir;
  TwoShards shards;
  shards.Write(dir);
  absl::StatusOr<Checkpoint> ckpt = Checkpoint::Open(dir.path());
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  struct Want {
    const char* name;
    const SafetensorsBuilder* shard;
    uint64_t begin, n;
  };
  const Want kWant[] = {
      {"a", &shards.s1, 0, 16}, {"b", &shards.s1, 16, 6}, {"c", &shards.s2, 0, 5}};
  for (const Want& w : kWant) {
    SCOPED_TRACE(w.name);
    const CheckpointTensor* t = ckpt->Find(w.name);
    ASSERT_NE(t, nullptr);
    const std::string expected = Expected(*w.shard, w.begin, w.n);
    ASSERT_EQ(expected.size(), w.n);
    absl::StatusOr<std::span<const std::byte>> mapped = ckpt->MapTensor(*t);
    ASSERT_TRUE(mapped.ok()) << mapped.status();
    EXPECT_EQ(AsString(*mapped), expected);
    std::string read(t->nbytes, '\0');
    ASSERT_TRUE(ckpt->ReadAt(t->file, t->offset, t->nbytes, read.data()).ok());
    EXPECT_EQ(read, expected);
  }
  // A partial read in the middle of a tensor.
  const CheckpointTensor* a = ckpt->Find("a");
  std::string part(5, '\0');
  ASSERT_TRUE(ckpt->ReadAt(a->file, a->offset + 3, 5, part.data()).ok());
  EXPECT_EQ(part, Expected(shards.s1, 3, 5));
  EXPECT_THAT(ckpt->ReadAt(7, 0, 1, part.data()), StatusIs(kInvalid, Subs({"no file #7"})));
}

TEST(CheckpointDataTest, ReadAtAfterTruncationIsDataLoss) {
  TempDir dir;
  TwoShards shards;
  shards.Write(dir);
  absl::StatusOr<Checkpoint> ckpt = Checkpoint::Open(dir.path());
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  const CheckpointTensor* b = ckpt->Find("b");
  ASSERT_NE(b, nullptr);
  const std::string shard_path = dir.Path(kShard1);
  ASSERT_EQ(::truncate(shard_path.c_str(), static_cast<off_t>(b->offset + 2)), 0);
  std::string buf(b->nbytes, '\0');
  EXPECT_THAT(ckpt->ReadAt(b->file, b->offset, b->nbytes, buf.data()),
              StatusIs(absl::StatusCode::kDataLoss, Subs({shard_path.c_str(), "truncated"})));
  // The mapping is created after the truncation here, so it sees the short size and refuses.
  EXPECT_THAT(ckpt->MapTensor(*b), StatusIs(absl::StatusCode::kDataLoss,
                                            Subs({shard_path.c_str(), "'b'", "truncated"})));
}

// Paths from a client are untrusted: a FIFO must not block open() (before, a load thread
// waited forever for a writer), and the error says what the file is.
TEST(UntrustedFilesTest, FifosAndDevicesAreRefusedWithoutBlocking) {
  TempDir dir;
  const std::string fifo = dir.Path("fifo");
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  EXPECT_THAT(OpenRegularFile(fifo).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, Subs({fifo.c_str(), "a FIFO"})));
  EXPECT_THAT(OpenRegularFile("/dev/null").status(),
              StatusIs(absl::StatusCode::kInvalidArgument, Subs({"a character device"})));
  EXPECT_THAT(OpenRegularFile(dir.path()).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, Subs({"a directory"})));
  EXPECT_THAT(ReadFileToString(fifo, 1 << 20).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, Subs({"a FIFO"})));
  EXPECT_THAT(MappedFile::Open(fifo).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, Subs({"a FIFO"})));

  // config.json, a shard, and a shard named by the index as FIFOs.
  TwoShards shards;
  shards.Write(dir);
  ASSERT_EQ(::mkfifo(dir.Path("config.json").c_str(), 0600), 0);
  EXPECT_THAT(Checkpoint::Open(dir.path()).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, Subs({"config.json", "a FIFO"})));
  ASSERT_EQ(::unlink(dir.Path("config.json").c_str()), 0);
  ASSERT_EQ(::mkfifo(dir.Path("model-00003-of-00003.safetensors").c_str(), 0600), 0);
  EXPECT_THAT(Checkpoint::Open(dir.path()).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, Subs({"a FIFO"})));
  ASSERT_EQ(::unlink(dir.Path("model-00003-of-00003.safetensors").c_str()), 0);
  ASSERT_EQ(::mkfifo(dir.Path("extra.safetensors").c_str(), 0600), 0);
  dir.Write(
      kIndex,
      IndexJson({{"a", kShard1}, {"b", kShard1}, {"c", kShard2}, {"d", "extra.safetensors"}}));
  EXPECT_THAT(Checkpoint::Open(dir.path()).status(),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       Subs({"extra.safetensors", "not a regular file"})));
}

// With model roots, every file read must resolve inside one after symlinks; the content of a
// file outside is never read (so never echoed in an error).
TEST(UntrustedFilesTest, SymlinksOutOfTheModelRootsAreRefused) {
  TempDir root, outside;
  const std::string model = root.Path("m");
  ASSERT_EQ(::mkdir(model.c_str(), 0755), 0);
  TwoShards shards;
  const std::string secret = outside.Write(kShard1, shards.s1.Bytes());
  const std::string real_root = std::filesystem::canonical(root.path()).string();
  const std::vector<std::string> roots = {real_root};
  std::ofstream(model + "/" + kShard2, std::ios::binary) << shards.s2.Bytes();
  ASSERT_EQ(::symlink(secret.c_str(), (model + "/" + kShard1).c_str()), 0);
  EXPECT_THAT(Checkpoint::Open(model, roots).status(),
              StatusIs(absl::StatusCode::kPermissionDenied,
                       Subs({kShard1, "outside the configured model_roots", real_root.c_str()})));
  // Without roots (weightctl), the same checkpoint opens.
  EXPECT_TRUE(Checkpoint::Open(model).ok());

  // A symlink that stays inside the root (a hub cache's snapshot -> blob) is fine.
  ASSERT_EQ(::unlink((model + "/" + kShard1).c_str()), 0);
  root.Write("blob1", shards.s1.Bytes());
  ASSERT_EQ(::symlink("../blob1", (model + "/" + kShard1).c_str()), 0);
  EXPECT_TRUE(Checkpoint::Open(model, roots).ok()) << Checkpoint::Open(model, roots).status();

  // config.json linked to a file outside: refused before it is read.
  const std::string outside_config = outside.Write("config.json", "{\"top secret\": 1}");
  ASSERT_EQ(::symlink(outside_config.c_str(), (model + "/config.json").c_str()), 0);
  absl::Status s = Checkpoint::Open(model, roots).status();
  EXPECT_THAT(s, StatusIs(absl::StatusCode::kPermissionDenied,
                          Subs({"config.json", "outside the configured model_roots"})));
  EXPECT_THAT(std::string(s.message()), ::testing::Not(::testing::HasSubstr("top secret")));
}

TEST(UntrustedFilesTest, AFileRewrittenAfterItsHeaderWasReadIsDataLoss) {
  TempDir dir;
  TwoShards shards;
  shards.Write(dir);
  absl::StatusOr<Checkpoint> ckpt = Checkpoint::Open(dir.path());
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  const CheckpointTensor* c = ckpt->Find("c");
  ASSERT_NE(c, nullptr);
  // Same size, new bytes: only the times tell.
  const std::string path = dir.Path(kShard2);
  ::usleep(10000);
  {
    std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(static_cast<std::streamoff>(c->offset));
    f.put('\x7f');
  }
  std::string buf(c->nbytes, '\0');
  EXPECT_THAT(ckpt->ReadAt(c->file, c->offset, c->nbytes, buf.data()),
              StatusIs(absl::StatusCode::kDataLoss,
                       Subs({path.c_str(), "changed while weightd was reading it"})));
  EXPECT_THAT(ckpt->MapTensor(*c).status(),
              StatusIs(absl::StatusCode::kDataLoss, Subs({"'c'", "modification time changed"})));
}

}  // namespace
}  // namespace weightd
