// Unit tests: manifest encode/decode (including hostile manifests), request parsing, CRC32C.
#include "weightd/protocol.h"

#include <cstring>
#include <random>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "weightd/crc32c.h"
#include "weightd/manifest.h"

namespace weightd {
namespace {

using ::testing::HasSubstr;

Manifest Sample() {
  Manifest m;
  m.model = "llama";
  m.rank = 1;
  m.device = -1;
  m.arenas.push_back({4096, ArenaKind::kHostMemfd});
  m.tensors.push_back({"a.weight", DType::kBF16, {16, 8}, {8, 1}, 0, 0, 256, 0x1234});
  m.tensors.push_back({"b.bias", DType::kF32, {8}, {1}, 0, 256, 32, 0x99});
  m.tensors.push_back({"scalar", DType::kF32, {}, {}, 0, 512, 4, 7});
  return m;
}

template <typename T>
void Poke(std::string& s, size_t at, T v) {
  std::memcpy(s.data() + at, &v, sizeof(T));
}

constexpr size_t kT0 = kManifestHeaderSize + kManifestArenaEntrySize;  // first tensor entry

TEST(Crc32cTest, KnownVectors) {
  EXPECT_EQ(Crc32c("123456789", 9), 0xE3069283u);
  EXPECT_EQ(Crc32c("", 0), 0u);
  std::string zeros(32, '\0');
  EXPECT_EQ(Crc32c(zeros.data(), zeros.size()), 0x8A9136AAu);
  // Extending equals hashing the concatenation, at every split point and alignment.
  std::string data(1000, '\0');
  std::mt19937 rng(1);
  for (char& c : data) c = static_cast<char>(rng());
  const uint32_t whole = Crc32c(data.data(), data.size());
  for (size_t split : {0, 1, 7, 8, 9, 500, 999, 1000}) {
    EXPECT_EQ(Crc32cExtend(Crc32c(data.data(), split), data.data() + split, data.size() - split),
              whole);
  }
}

// Bit-at-a-time reference, independent of the library's tables and instructions.
uint32_t ReferenceCrc32c(const unsigned char* p, size_t n) {
  uint32_t c = ~0u;
  for (size_t i = 0; i < n; ++i) {
    c ^= p[i];
    for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
  }
  return ~c;
}

TEST(Crc32cTest, LargeBuffersMatchTheBitwiseReference) {
  std::vector<unsigned char> data(100000);
  std::mt19937 rng(7);
  for (auto& b : data) b = static_cast<unsigned char>(rng());
  for (size_t off : {0, 1, 5}) {
    for (size_t len : {12287, 12288, 12289, 24576 + 13, 99990}) {
      ASSERT_EQ(Crc32c(data.data() + off, len), ReferenceCrc32c(data.data() + off, len))
          << off << " " << len;
    }
  }
}

TEST(Crc32cTest, CombineEqualsConcatenation) {
  std::vector<unsigned char> data(70000);
  std::mt19937 rng(9);
  for (auto& b : data) b = static_cast<unsigned char>(rng());
  for (size_t split : {0, 1, 8, 4096, 12289, 69999, 70000}) {
    const uint32_t a = Crc32c(data.data(), split);
    const uint32_t b = Crc32c(data.data() + split, data.size() - split);
    EXPECT_EQ(Crc32cCombine(a, b, data.size() - split), Crc32c(data.data(), data.size())) << split;
  }
}

TEST(ManifestTest, RoundTrip) {
  const Manifest m = Sample();
  auto back = DecodeManifest(EncodeManifest(m));
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->model, "llama");
  EXPECT_EQ(back->rank, 1u);
  EXPECT_EQ(back->device, -1);
  ASSERT_EQ(back->arenas.size(), 1u);
  EXPECT_EQ(back->arenas[0].size, 4096u);
  ASSERT_EQ(back->tensors.size(), 3u);
  EXPECT_EQ(back->tensors[0].name, "a.weight");
  EXPECT_EQ(back->tensors[0].dtype, DType::kBF16);
  EXPECT_EQ(back->tensors[0].shape, (std::vector<int64_t>{16, 8}));
  EXPECT_EQ(back->tensors[0].strides, (std::vector<int64_t>{8, 1}));
  EXPECT_EQ(back->tensors[0].crc32c, 0x1234u);
  EXPECT_EQ(back->tensors[1].offset, 256u);
  EXPECT_TRUE(back->tensors[2].shape.empty());
}

TEST(ManifestTest, EmptyManifest) {
  Manifest m;
  m.model = "x";
  auto back = DecodeManifest(EncodeManifest(m));
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_TRUE(back->tensors.empty());
}

TEST(ManifestTest, ContiguousStrides) {
  EXPECT_EQ(ContiguousStrides({2, 3, 4}), (std::vector<int64_t>{12, 4, 1}));
  EXPECT_TRUE(ContiguousStrides({}).empty());
}

void ExpectBad(const std::string& bytes, const std::string& substr) {
  auto r = DecodeManifest(bytes);
  ASSERT_FALSE(r.ok()) << "accepted a hostile manifest (" << substr << ")";
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
  EXPECT_THAT(std::string(r.status().message()), HasSubstr(substr));
}

TEST(ManifestTest, HostileHeaders) {
  const std::string good = EncodeManifest(Sample());
  ExpectBad(good.substr(0, 10), "shorter than");
  ExpectBad(good.substr(0, good.size() - 1), "total_size");
  std::string s = good;
  s[0] = 'X';
  ExpectBad(s, "magic");
  s = good;
  Poke<uint32_t>(s, 12, 64);
  ExpectBad(s, "header_size");
  s = good;
  Poke<uint32_t>(s, 28, 0xFFFFFFFF);  // num_tensors
  ExpectBad(s, "tensor table");
  s = good;
  Poke<uint64_t>(s, 48, ~0ull - 10);  // tensors_offset overflows
  ExpectBad(s, "tensor table");
  s = good;
  Poke<uint32_t>(s, 24, 1u << 30);  // num_arenas
  ExpectBad(s, "arena table");
  s = good;
  Poke<uint64_t>(s, 64, ~0ull);  // strings_size
  ExpectBad(s, "string table");
  s = good;
  Poke<uint32_t>(s, 76, 1000);  // model name length
  ExpectBad(s, "model name");
  s = good;
  Poke<int32_t>(s, 36, -7);
  ExpectBad(s, "device");
  s = good;
  Poke<uint32_t>(s, 8, 2);
  auto r = DecodeManifest(s);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("version 2"));
}

TEST(ManifestTest, HostileTensors) {
  const std::string good = EncodeManifest(Sample());
  std::string s = good;
  Poke<uint32_t>(s, kT0 + 4, 0);  // empty name
  ExpectBad(s, "empty or outside");
  s = good;
  Poke<uint32_t>(s, kT0 + 0, 1u << 31);  // name offset
  ExpectBad(s, "outside the string table");
  s = good;
  Poke<uint8_t>(s, kT0 + 8, 200);
  ExpectBad(s, "unknown dtype");
  s = good;
  Poke<uint8_t>(s, kT0 + 9, 8);
  ExpectBad(s, "ndim 8");
  s = good;
  Poke<uint32_t>(s, kT0 + 12, 1);
  ExpectBad(s, "arena 1 >= 1");
  s = good;
  Poke<uint64_t>(s, kT0 + 16, 4000);  // offset + nbytes beyond the arena
  ExpectBad(s, "exceed arena");
  s = good;
  Poke<uint64_t>(s, kT0 + 16, ~0ull - 8);  // offset overflow
  ExpectBad(s, "exceed arena");
  s = good;
  Poke<int64_t>(s, kT0 + 40, -1);
  ExpectBad(s, "negative");
  s = good;
  Poke<int64_t>(s, kT0 + 40, 17);  // shape beyond nbytes
  ExpectBad(s, "nbytes");
  s = good;
  Poke<int64_t>(s, kT0 + 96, 1000);  // stride beyond nbytes
  ExpectBad(s, "nbytes");
  s = good;
  Poke<int64_t>(s, kT0 + 40, int64_t{1} << 62);
  Poke<int64_t>(s, kT0 + 96, int64_t{1} << 62);
  ExpectBad(s, "overflow");
  // Duplicate name: point tensor 1's name at tensor 0's.
  s = good;
  std::memcpy(s.data() + kT0 + kManifestTensorEntrySize, s.data() + kT0, 8);
  ExpectBad(s, "duplicate name");
}

TEST(ManifestTest, RandomCorruptionNeverCrashes) {
  const std::string good = EncodeManifest(Sample());
  std::mt19937 rng(42);
  for (int i = 0; i < 20000; ++i) {
    std::string s = good;
    const int flips = 1 + rng() % 4;
    for (int f = 0; f < flips; ++f) s[rng() % s.size()] = static_cast<char>(rng());
    auto r = DecodeManifest(s);
    if (r.ok()) {
      for (const ManifestTensor& t : r->tensors) {
        ASSERT_LT(t.arena, r->arenas.size());
        ASSERT_LE(t.offset + t.nbytes, r->arenas[t.arena].size);
      }
    }
  }
}

TEST(RequestTest, ParsesEveryOp) {
  auto h = ParseRequest(R"({"op":"hello","version":1,"id":7,"client":"t"})");
  ASSERT_TRUE(h.ok()) << h.status();
  EXPECT_EQ(h->op, Op::kHello);
  EXPECT_EQ(h->version, 1);
  EXPECT_EQ(h->id_json, "7");
  auto a = ParseRequest(R"({"op":"attach","name":"m","rank":3,"id":"x"})");
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->rank, 3);
  EXPECT_EQ(a->id_json, "\"x\"");
  auto l = ParseRequest(
      R"({"op":"load","name":"m","checkpoint":"/c","tp":2,"ranks":[1],"devices":[3],"dtype":"bf16","skip":["x"],"expert_parallel":true,"allow_uids":[5]})");
  ASSERT_TRUE(l.ok()) << l.status();
  EXPECT_EQ(l->load.tp, 2);
  EXPECT_EQ(l->load.ranks, std::vector<int>{1});
  EXPECT_EQ(l->load.devices, std::vector<int>{3});
  EXPECT_EQ(*l->load.allow_uids, std::vector<uint32_t>{5});
  EXPECT_TRUE(l->load.expert_parallel);
  auto u = ParseRequest(R"({"op":"unload","name":"m","force":true})");
  ASSERT_TRUE(u.ok());
  EXPECT_TRUE(u->force);
  EXPECT_TRUE(ParseRequest(R"({"op":"list"})").ok());
  EXPECT_TRUE(ParseRequest(R"({"op":"metrics"})").ok());
  EXPECT_TRUE(ParseRequest(R"({"op":"status"})").ok());
  EXPECT_TRUE(ParseRequest(R"({"op":"status","name":"m"})").ok());
  EXPECT_TRUE(ParseRequest(R"({"op":"detach","name":"m","rank":0})").ok());
  auto d = ParseRequest(R"({"op":"detach","name":"m","rank":0,"lease":42})");
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ(d->lease, std::optional<uint64_t>(42));
  EXPECT_FALSE(ParseRequest(R"({"op":"detach","name":"m","rank":0})")->lease.has_value());
  EXPECT_EQ(ParseRequest(R"({"op":"detach","name":"m","rank":0,"lease":0})").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ParseRequest(R"({"op":"detach","name":"m","rank":0,"lease":"7"})").status().code(),
            absl::StatusCode::kInvalidArgument);
  // Only detach names a lease.
  EXPECT_EQ(ParseRequest(R"({"op":"attach","name":"m","rank":0,"lease":7})").status().code(),
            absl::StatusCode::kInvalidArgument);
  Request r;
  r.op = Op::kDetach;
  r.name = "m";
  r.rank = 1;
  r.lease = 9;
  auto back = ParseRequest(*EncodeRequest(r));
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->lease, std::optional<uint64_t>(9));
}

TEST(RequestTest, RoundTripsThroughEncode) {
  Request r;
  r.op = Op::kLoad;
  r.name = "m";
  r.id_json = "12";
  r.load.checkpoint = "/x";
  r.load.tp = 4;
  r.load.ranks = {0, 2};
  r.load.skip = {"a", "b"};
  absl::StatusOr<std::string> wire = EncodeRequest(r);
  ASSERT_TRUE(wire.ok()) << wire.status();
  auto back = ParseRequest(*wire);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->load.tp, 4);
  EXPECT_EQ(back->load.ranks, (std::vector<int>{0, 2}));
  EXPECT_EQ(back->load.skip, (std::vector<std::string>{"a", "b"}));
  EXPECT_EQ(back->id_json, "12");
}

void ExpectReject(const std::string& json, const std::string& substr) {
  auto r = ParseRequest(json);
  ASSERT_FALSE(r.ok()) << json;
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << json;
  EXPECT_THAT(std::string(r.status().message()), HasSubstr(substr)) << json;
}

TEST(RequestTest, GenerationOpsRoundTripAndCheckTheirFields) {
  Request u;
  u.op = Op::kUpdate;
  u.name = "m";
  u.checkpoint = "/models/b";
  u.wait = true;
  auto ub = ParseRequest(*EncodeRequest(u));
  ASSERT_TRUE(ub.ok()) << ub.status();
  EXPECT_EQ(ub->op, Op::kUpdate);
  EXPECT_EQ(ub->checkpoint, "/models/b");
  EXPECT_TRUE(ub->wait);
  // Without a checkpoint the update's tensors come as an fd (the server checks it is there).
  auto fd_update = ParseRequest(R"({"op":"update","name":"m"})");
  ASSERT_TRUE(fd_update.ok()) << fd_update.status();
  EXPECT_TRUE(fd_update->checkpoint.empty());
  ExpectReject(R"({"op":"update","name":"m","checkpoint":""})", "'checkpoint' must be a non-empty");
  ExpectReject(R"({"op":"update","checkpoint":"/x"})", "'name'");

  Request w;
  w.op = Op::kWaitGeneration;
  w.name = "m";
  w.after = 41;
  w.timeout_ms = 2500;
  auto wb = ParseRequest(*EncodeRequest(w));
  ASSERT_TRUE(wb.ok()) << wb.status();
  EXPECT_EQ(wb->after, 41u);
  EXPECT_EQ(wb->timeout_ms, 2500);
  ExpectReject(R"({"op":"wait_generation","name":"m"})", "'after'");
  ExpectReject(R"({"op":"wait_generation","name":"m","after":-1})", "'after'");
  ExpectReject(R"({"op":"wait_generation","name":"m","after":1,"timeout_ms":600001})",
               "'timeout_ms'");

  Request f;
  f.op = Op::kRefresh;
  f.name = "m";
  f.rank = 1;
  f.lease = 7;
  auto fb = ParseRequest(*EncodeRequest(f));
  ASSERT_TRUE(fb.ok()) << fb.status();
  EXPECT_EQ(fb->op, Op::kRefresh);
  EXPECT_EQ(fb->rank, 1);
  EXPECT_EQ(fb->lease, std::optional<uint64_t>(7));
  ExpectReject(R"({"op":"refresh","name":"m","rank":0})", "'lease'");

  auto rb = ParseRequest(R"({"op":"rollback","name":"m"})");
  ASSERT_TRUE(rb.ok()) << rb.status();
  EXPECT_EQ(rb->op, Op::kRollback);
  ExpectReject(R"({"op":"rollback","name":"m","force":true})", "unknown field 'force'");
}

TEST(RequestTest, EncodeRefusesTextThatIsNotUtf8) {
  // A checkpoint directory named in Latin-1 is a valid Linux path but cannot travel in JSON.
  Request r;
  r.op = Op::kLoad;
  r.name = "m";
  r.load.checkpoint = "/models/mod\xe9le";
  absl::StatusOr<std::string> wire = EncodeRequest(r);
  ASSERT_FALSE(wire.ok());
  EXPECT_EQ(wire.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(wire.status().message()),
              HasSubstr("load: field 'checkpoint' is not UTF-8 text: byte 11"));
  r.load.checkpoint = "/models/x";
  r.load.skip = {"ok", "\xc0\xaf"};
  EXPECT_THAT(std::string(EncodeRequest(r).status().message()),
              HasSubstr("field 'skip' is not UTF-8 text: byte 0 starts an overlong UTF-8 form"));
  Request a;
  a.op = Op::kAttach;
  a.name = "\xed\xa0\x80";
  EXPECT_THAT(std::string(EncodeRequest(a).status().message()),
              HasSubstr("attach: field 'name' is not UTF-8 text"));
}


TEST(RequestTest, RejectsMalformed) {
  ExpectReject("", "not valid JSON");
  ExpectReject("{\"op\":", "not valid JSON");
  ExpectReject("[1,2]", "JSON object");
  ExpectReject("{}", "'op'");
  ExpectReject(R"({"op":5})", "'op'");
  ExpectReject(R"({"op":"frobnicate"})", "unknown op 'frobnicate'; known ops: hello");
  ExpectReject(R"({"op":"hello"})", "'version'");
  ExpectReject(R"({"op":"hello","version":"1"})", "'version'");
  ExpectReject(R"({"op":"attach","name":"m"})", "'rank'");
  ExpectReject(R"({"op":"attach","name":"m","rank":-1})", "'rank'");
  ExpectReject(R"({"op":"attach","name":"m","rank":1.5})", "'rank'");
  ExpectReject(R"({"op":"attach","name":"m","rank":18446744073709551615})", "'rank'");
  ExpectReject(R"({"op":"attach","rank":0})", "'name'");
  ExpectReject(R"({"op":"attach","name":"","rank":0})", "'name'");
  ExpectReject(R"({"op":"attach","name":7,"rank":0})", "'name'");
  ExpectReject(R"({"op":"unload","name":"m","force":"yes"})", "'force'");
  ExpectReject(R"({"op":"list","bogus":1})", "unknown field 'bogus'");
  ExpectReject(R"({"op":"load","name":"m"})", "'checkpoint'");
  ExpectReject(R"({"op":"load","name":"m","checkpoint":"/c","tp":0})", "'tp'");
  ExpectReject(R"({"op":"load","name":"m","checkpoint":"/c","tp":2,"ranks":[2]})", "rank 2");
  ExpectReject(R"({"op":"load","name":"m","checkpoint":"/c","skip":[1]})", "'skip'");
  ExpectReject(R"({"op":"load","name":"m","checkpoint":"/c","ranks":"0"})", "'ranks'");
  ExpectReject(R"({"op":"load","name":"m","checkpoint":"/c","zzz":1})", "unknown field 'zzz'");
  ExpectReject(R"({"op":"list","id":{"a":1}})", "'id'");
  ExpectReject(std::string(100, '[') + std::string(100, ']'), "nested deeper");
}

TEST(RequestTest, ErrorReplyNamesCodeAndEchoesId) {
  const std::string r = EncodeErrorReply("42", absl::NotFoundError("no model 'x'"));
  EXPECT_EQ(r, R"({"error":{"code":"NOT_FOUND","message":"no model 'x'"},"id":42,"ok":false})");
  EXPECT_THAT(EncodeErrorReply("null", absl::CancelledError("c")), HasSubstr("\"CANCELLED\""));
  EXPECT_THAT(EncodeErrorReply("null", absl::DataLossError("d")), HasSubstr("\"DATA_LOSS\""));
  // Codes outside the protocol's list travel as INTERNAL.
  EXPECT_THAT(EncodeErrorReply("null", absl::AbortedError("a")), HasSubstr("\"INTERNAL\""));
  EXPECT_EQ(StatusCodeFromWireName("PERMISSION_DENIED"), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(StatusCodeFromWireName("NOPE"), absl::StatusCode::kUnknown);
}

}  // namespace
}  // namespace weightd
