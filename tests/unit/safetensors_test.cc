// Tests of the safetensors header parser against hand-built files (see test_util.h).
// Every rejection is checked by code and by the substrings a user needs: the file and the tensor.
#include "weightd/safetensors.h"

#include <ostream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "test_util.h"

namespace weightd {
namespace {

using ::testing::ElementsAre;
using ::testing::IsEmpty;
using ::testing::Pair;
using ::weightd::testing::FileBytes;
using ::weightd::testing::LengthPrefix;
using ::weightd::testing::SafetensorsBuilder;
using ::weightd::testing::StatusIs;
using ::weightd::testing::Subs;
using ::weightd::testing::TempDir;

constexpr char kFile[] = "/models/x/model-00001-of-00002.safetensors";
constexpr absl::StatusCode kInvalid = absl::StatusCode::kInvalidArgument;

absl::StatusOr<SafetensorsFile> Parse(const std::string& bytes) {
  return ParseSafetensorsBuffer(bytes, kFile);
}

// A file whose header is `json` verbatim and whose data section is `data_size` bytes.
absl::StatusOr<SafetensorsFile> ParseJson(const std::string& json, uint64_t data_size = 0) {
  return Parse(FileBytes(json, std::string(data_size, '\0')));
}

// --- length prefix ---------------------------------------------------------------------------

TEST(SafetensorsLengthTest, FileShorterThanEightBytes) {
  for (size_t n = 0; n < 8; ++n) {
    EXPECT_THAT(Parse(std::string(n, '\0')),
                StatusIs(kInvalid, Subs({kFile, "shorter than the 8-byte length prefix"})))
        << n << " bytes";
  }
}

TEST(SafetensorsLengthTest, HeaderLengthLargerThanFile) {
  const std::string json = R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}})";
  std::string bytes = absl::StrCat(LengthPrefix(json.size() + 2), json, "x");
  EXPECT_THAT(
      Parse(bytes),
      StatusIs(kInvalid, Subs({kFile, absl::StrCat("header length ", json.size() + 2).c_str(),
                               "larger than"})));
  // A header length of exactly what follows (no data section) is fine as far as length goes.
  EXPECT_THAT(Parse(LengthPrefix(1000)), StatusIs(kInvalid, Subs({kFile, "larger than"})));
}

TEST(SafetensorsLengthTest, HeaderLengthOverCap) {
  const uint64_t just_over = kMaxSafetensorsHeaderBytes + 1;
  EXPECT_THAT(Parse(absl::StrCat(LengthPrefix(just_over), "{}")),
              StatusIs(kInvalid, Subs({kFile, "100 MiB cap"})));
  EXPECT_THAT(Parse(absl::StrCat(LengthPrefix(~uint64_t{0}), "{}")),
              StatusIs(kInvalid, Subs({kFile, "MiB cap"})));
  // Reading the 8 bytes big-endian would turn this into 2^56 + ...: it must read as 2.
  ASSERT_TRUE(Parse(absl::StrCat(LengthPrefix(2), "{}")).ok());
}

TEST(SafetensorsLengthTest, EmptyHeaderIsNotJson) {
  EXPECT_THAT(Parse(LengthPrefix(0)), StatusIs(kInvalid, Subs({kFile, "not a JSON object"})));
}

// --- JSON syntax -----------------------------------------------------------------------------

struct BadJson {
  BadJson(const char* l, std::string j) : label(l), json(std::move(j)) {}
  const char* label;
  std::string json;
};
// Keeps test names short: ctest's discovered names include the printed parameter.
void PrintTo(const BadJson& c, std::ostream* os) { *os << c.label; }

class SafetensorsBadJsonTest : public ::testing::TestWithParam<BadJson> {};

TEST_P(SafetensorsBadJsonTest, IsRejectedWithFileName) {
  EXPECT_THAT(ParseJson(GetParam().json, 4), StatusIs(kInvalid, Subs({kFile})));
}

const char kGood[] = R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})";

std::string Nest(int depth, char open, char close, const std::string& inner) {
  return std::string(depth, open) + inner + std::string(depth, close);
}

INSTANTIATE_TEST_SUITE_P(
    Variants, SafetensorsBadJsonTest,
    ::testing::Values(BadJson("truncated_in_object", std::string(kGood).substr(0, 30)),
                      BadJson("truncated_in_string", std::string(R"({"a":{"dty)")),
                      BadJson("truncated_after_brace", std::string("{")),
                      BadJson("trailing_garbage", std::string(kGood) + "x"),
                      BadJson("two_objects", std::string(kGood) + "{}"),
                      BadJson("trailing_comma", std::string(R"({"a":{"dtype":"F32","shape":[1],)"
                                                            R"("data_offsets":[0,4]},})")),
                      BadJson("array_top_level", std::string("[]")),
                      BadJson("string_top_level", std::string(R"("abc")")),
                      BadJson("number_top_level", std::string("4")),
                      BadJson("null_top_level", std::string("null")),
                      BadJson("unquoted_key", std::string(R"({a:{}})")),
                      BadJson("single_quotes", std::string(R"({'a':{}})")),
                      BadJson("bad_escape", std::string(R"({"a\q":{"dtype":"F32","shape":[1],)"
                                                        R"("data_offsets":[0,4]}})")),
                      BadJson("short_u_escape", std::string(R"({"a\u12":{}})")),
                      BadJson("non_hex_u_escape", std::string(R"({"a\uZZZZ":{}})")),
                      BadJson("unpaired_high_surrogate", std::string(R"({"a\ud800":{}})")),
                      BadJson("lone_low_surrogate", std::string(R"({"a\udc00":{}})")),
                      BadJson("escape_at_end", std::string("{\"a\\")),
                      BadJson("control_char_in_string", std::string("{\"a\nb\":{}}")),
                      BadJson("bad_literal", std::string(R"({"a":{"x":tru,"dtype":"F32"}})")),
                      BadJson("bad_number", std::string(R"({"a":{"x":1.,"dtype":"F32"}})")),
                      BadJson("nul_byte", std::string("{\0}", 3)),
                      BadJson("deep_arrays_top_level", Nest(10000, '[', ']', "")),
                      BadJson("deep_objects_top_level", Nest(10000, '{', '}', "")),
                      BadJson("deep_arrays_as_tensor", "{\"a\":" + Nest(10000, '[', ']', "") + "}"),
                      BadJson("deep_arrays_in_unknown_key",
                              R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":)" +
                                  Nest(10000, '[', ']', "") + "}}"),
                      BadJson(
                          "deep_objects_in_unknown_key", R"({"a":{"x":)" +
                                                             [] {
                                                               std::string s;
                                                               for (int i = 0; i < 10000; ++i)
                                                                 s += R"({"k":)";
                                                               s += "1";
                                                               s += std::string(10000, '}');
                                                               return s;
                                                             }() +
                                                             "}}"),
                      BadJson("deep_unterminated", "{\"a\":{\"x\":" + std::string(10000, '['))),
    [](const auto& info) { return std::string(info.param.label); });

TEST(SafetensorsJsonTest, ModerateNestingInUnknownKeysIsAccepted) {
  // Unknown keys are tolerated so the format can grow; nesting within the cap must not fail.
  const std::string json = R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":)" +
                           Nest(30, '[', ']', R"({"y":[true,false,null,-1.5e3,"s"]})") + "}}";
  ASSERT_TRUE(ParseJson(json, 4).ok()) << ParseJson(json, 4).status();
}

// --- entries ---------------------------------------------------------------------------------

TEST(SafetensorsEntryTest, DuplicateTensorName) {
  SafetensorsBuilder b;
  b.Add("model.w", "U8", {4}).Add("model.w", "U8", {4});
  EXPECT_THAT(Parse(b.Bytes()), StatusIs(kInvalid, Subs({kFile, "'model.w'", "twice"})));
}

TEST(SafetensorsEntryTest, EmptyTensorName) {
  SafetensorsBuilder b;
  b.Add("", "U8", {4});
  EXPECT_THAT(Parse(b.Bytes()), StatusIs(kInvalid, Subs({kFile, "empty name"})));
}

TEST(SafetensorsEntryTest, EntryNotAnObject) {
  SafetensorsBuilder b;
  b.AddRaw("layer.w", "[1,2]").SetDataSize(0);
  EXPECT_THAT(Parse(b.Bytes()),
              StatusIs(kInvalid, Subs({kFile, "'layer.w'", "not a JSON object"})));
}

struct FieldCase {
  const char* label;
  const char* value;  // entry value JSON for tensor "t.w" with 4 data bytes
  const char* expected;
};

void PrintTo(const FieldCase& c, std::ostream* os) { *os << c.label; }

class SafetensorsFieldTest : public ::testing::TestWithParam<FieldCase> {};

TEST_P(SafetensorsFieldTest, IsRejectedNamingFileAndTensor) {
  SafetensorsBuilder b;
  b.AddRaw("t.w", GetParam().value).SetDataSize(4);
  EXPECT_THAT(Parse(b.Bytes()), StatusIs(kInvalid, Subs({kFile, "'t.w'", GetParam().expected})));
}

INSTANTIATE_TEST_SUITE_P(
    Fields, SafetensorsFieldTest,
    ::testing::Values(
        FieldCase{"missing_dtype", R"({"shape":[4],"data_offsets":[0,4]})", "missing 'dtype'"},
        FieldCase{"missing_shape", R"({"dtype":"U8","data_offsets":[0,4]})", "missing 'shape'"},
        FieldCase{"missing_offsets", R"({"dtype":"U8","shape":[4]})", "missing 'data_offsets'"},
        FieldCase{"empty_entry", R"({})", "missing"},
        FieldCase{"dtype_number", R"({"dtype":1,"shape":[4],"data_offsets":[0,4]})",
                  "'dtype' must be a string"},
        FieldCase{"dtype_null", R"({"dtype":null,"shape":[4],"data_offsets":[0,4]})",
                  "'dtype' must be a string"},
        FieldCase{"dtype_twice", R"({"dtype":"U8","dtype":"U8","shape":[4],"data_offsets":[0,4]})",
                  "twice"},
        FieldCase{"unknown_dtype", R"({"dtype":"F128","shape":[4],"data_offsets":[0,4]})",
                  "unknown dtype 'F128'"},
        FieldCase{"lowercase_dtype", R"({"dtype":"u8","shape":[4],"data_offsets":[0,4]})",
                  "unknown dtype 'u8'"},
        FieldCase{"shape_string", R"({"dtype":"U8","shape":"4","data_offsets":[0,4]})",
                  "'shape' must be an array"},
        FieldCase{"shape_object", R"({"dtype":"U8","shape":{},"data_offsets":[0,4]})",
                  "'shape' must be an array"},
        FieldCase{"shape_float", R"({"dtype":"U8","shape":[4.0],"data_offsets":[0,4]})",
                  "must be an integer"},
        FieldCase{"shape_negative", R"({"dtype":"U8","shape":[-4],"data_offsets":[0,4]})",
                  "must not be negative"},
        FieldCase{"shape_string_dim", R"({"dtype":"U8","shape":["4"],"data_offsets":[0,4]})",
                  "shape dimension"},
        FieldCase{"shape_dim_over_int64",
                  R"({"dtype":"U8","shape":[9223372036854775808],)"
                  R"("data_offsets":[0,4]})",
                  "exceeds 2^63-1"},
        FieldCase{"shape_dim_over_uint64",
                  R"({"dtype":"U8","shape":[18446744073709551616],)"
                  R"("data_offsets":[0,4]})",
                  "does not fit in 64 bits"},
        FieldCase{"shape_unterminated", R"({"dtype":"U8","shape":[4,"data_offsets":[0,4]})",
                  "invalid JSON"},
        FieldCase{"offsets_string", R"({"dtype":"U8","shape":[4],"data_offsets":"0,4"})",
                  "'data_offsets' must be an array of two integers"},
        FieldCase{"offsets_null", R"({"dtype":"U8","shape":[4],"data_offsets":null})",
                  "'data_offsets' must be an array of two integers"},
        FieldCase{"offsets_one_entry", R"({"dtype":"U8","shape":[4],"data_offsets":[4]})",
                  "exactly two entries"},
        FieldCase{"offsets_three_entries", R"({"dtype":"U8","shape":[4],"data_offsets":[0,4,4]})",
                  "exactly two entries"},
        FieldCase{"offsets_empty", R"({"dtype":"U8","shape":[4],"data_offsets":[]})",
                  "data_offsets[0]"},
        FieldCase{"offsets_negative", R"({"dtype":"U8","shape":[4],"data_offsets":[-0,4]})",
                  "must not be negative"},
        FieldCase{"offsets_negative_end", R"({"dtype":"U8","shape":[4],"data_offsets":[0,-4]})",
                  "must not be negative"},
        FieldCase{"offsets_float", R"({"dtype":"U8","shape":[4],"data_offsets":[0,4.0]})",
                  "must be an integer"},
        FieldCase{"offsets_exponent", R"({"dtype":"U8","shape":[4],"data_offsets":[0,4e0]})",
                  "must be an integer"},
        FieldCase{"offsets_leading_zero", R"({"dtype":"U8","shape":[4],"data_offsets":[00,4]})",
                  "leading zero"},
        FieldCase{"offsets_over_uint64",
                  R"({"dtype":"U8","shape":[4],"data_offsets":[0,18446744073709551616]})",
                  "does not fit in 64 bits"},
        FieldCase{"offsets_twice",
                  R"({"dtype":"U8","shape":[4],"data_offsets":[0,4],"data_offsets":[0,4]})",
                  "twice"},
        FieldCase{"reversed_offsets", R"({"dtype":"U8","shape":[0],"data_offsets":[4,0]})",
                  "reversed"},
        FieldCase{"offsets_past_data", R"({"dtype":"U8","shape":[8],"data_offsets":[0,8]})",
                  "past the end of the data section (4 bytes)"},
        FieldCase{"offsets_far_past_data",
                  R"({"dtype":"U8","shape":[4],"data_offsets":[18446744073709551610,)"
                  R"(18446744073709551614]})",
                  "past the end"},
        FieldCase{"bytes_fewer_than_shape", R"({"dtype":"F32","shape":[2],"data_offsets":[0,4]})",
                  "needs 8"},
        FieldCase{"bytes_more_than_shape", R"({"dtype":"U8","shape":[2],"data_offsets":[0,4]})",
                  "needs 2"},
        FieldCase{"numel_overflow",
                  R"({"dtype":"U8","shape":[4294967296,4294967296],"data_offsets":[0,4]})",
                  "element count"},
        FieldCase{"numel_overflow_wraps_to_small",
                  // 2^32 * 2^32 + ... would wrap to 4 with unchecked multiplication.
                  R"({"dtype":"U8","shape":[4,4611686018427387904],"data_offsets":[0,4]})",
                  "overflows 64 bits"},
        FieldCase{"bytes_overflow",
                  // 2^62 elements fit in 64 bits; 2^62 * 4 bytes wrap to 0.
                  R"({"dtype":"F32","shape":[4611686018427387904],"data_offsets":[0,0]})",
                  "byte size"},
        FieldCase{"bytes_overflow_wraps_to_match",
                  // (2^62 + 1) * 4 wraps to exactly 4, the span written here.
                  R"({"dtype":"F32","shape":[4611686018427387905],"data_offsets":[0,4]})",
                  "overflows 64 bits"}),
    [](const auto& info) { return std::string(info.param.label); });

TEST(SafetensorsEntryTest, UnknownKeysInEntryAreTolerated) {
  SafetensorsBuilder b;
  b.AddRaw("w", R"({"extra":{"a":[1,2]},"dtype":"U8","shape":[4],"data_offsets":[0,4],"z":"q"})")
      .SetDataSize(4);
  absl::StatusOr<SafetensorsFile> f = Parse(b.Bytes());
  ASSERT_TRUE(f.ok()) << f.status();
  ASSERT_EQ(f->header.tensors.size(), 1u);
  EXPECT_EQ(f->header.tensors[0].nbytes(), 4u);
}

// --- layout of the data section --------------------------------------------------------------

TEST(SafetensorsLayoutTest, OverlappingTensors) {
  SafetensorsBuilder b;
  b.AddEntry("first", "U8", {8}, 0, 8).AddEntry("second", "U8", {8}, 4, 12).SetDataSize(12);
  EXPECT_THAT(Parse(b.Bytes()),
              StatusIs(kInvalid, Subs({kFile, "'second'", "overlap", "'first'"})));
}

TEST(SafetensorsLayoutTest, TensorsWithTheSameRange) {
  SafetensorsBuilder b;
  b.AddEntry("a", "U8", {8}, 0, 8).AddEntry("b", "U8", {8}, 0, 8).SetDataSize(8);
  EXPECT_THAT(Parse(b.Bytes()), StatusIs(kInvalid, Subs({kFile, "'b'", "overlap", "'a'"})));
}

TEST(SafetensorsLayoutTest, TensorContainedInAnother) {
  SafetensorsBuilder b;
  b.AddEntry("outer", "U8", {16}, 0, 16).AddEntry("inner", "U8", {4}, 4, 8).SetDataSize(16);
  EXPECT_THAT(Parse(b.Bytes()), StatusIs(kInvalid, Subs({kFile, "overlap"})));
}

TEST(SafetensorsLayoutTest, HoleBetweenTensors) {
  SafetensorsBuilder b;
  b.AddEntry("a", "U8", {4}, 0, 4).AddEntry("b", "U8", {4}, 8, 12).SetDataSize(12);
  EXPECT_THAT(Parse(b.Bytes()), StatusIs(kInvalid, Subs({kFile, "'b'", "'a'", "hole of 4 bytes"})));
}

TEST(SafetensorsLayoutTest, HoleAtStart) {
  SafetensorsBuilder b;
  b.AddEntry("a", "U8", {4}, 4, 8).SetDataSize(8);
  EXPECT_THAT(Parse(b.Bytes()), StatusIs(kInvalid, Subs({kFile, "'a'", "hole of 4 bytes"})));
}

TEST(SafetensorsLayoutTest, TrailingBytesAfterLastTensor) {
  SafetensorsBuilder b;
  b.Add("a", "U8", {4}).SetDataSize(7);
  EXPECT_THAT(Parse(b.Bytes()), StatusIs(kInvalid, Subs({kFile, "3 trailing bytes"})));
}

TEST(SafetensorsLayoutTest, EmptyHeaderWithData) {
  EXPECT_THAT(ParseJson("{}", 8), StatusIs(kInvalid, Subs({kFile, "8 trailing bytes"})));
  absl::StatusOr<SafetensorsFile> f = ParseJson("{}", 0);
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_THAT(f->header.tensors, IsEmpty());
}

TEST(SafetensorsLayoutTest, TensorsAreReturnedInDataOrder) {
  SafetensorsBuilder b;
  // Written in an order unrelated to both names and offsets.
  b.AddEntry("m", "U8", {2}, 4, 6).AddEntry("z", "U8", {4}, 0, 4).AddEntry("a", "U8", {2}, 6, 8);
  b.SetDataSize(8);
  absl::StatusOr<SafetensorsFile> f = Parse(b.Bytes());
  ASSERT_TRUE(f.ok()) << f.status();
  std::vector<std::string> names;
  for (const TensorInfo& t : f->header.tensors) names.push_back(t.name);
  EXPECT_THAT(names, ElementsAre("z", "m", "a"));
}

// --- accepted content ------------------------------------------------------------------------

TEST(SafetensorsAcceptTest, AllFifteenDtypes) {
  struct Expect {
    const char* name;
    DType dtype;
    uint64_t size;
  };
  const Expect kAll[] = {
      {"F64", DType::kF64, 8},   {"F32", DType::kF32, 4},        {"F16", DType::kF16, 2},
      {"BF16", DType::kBF16, 2}, {"I64", DType::kI64, 8},        {"I32", DType::kI32, 4},
      {"I16", DType::kI16, 2},   {"I8", DType::kI8, 1},          {"U64", DType::kU64, 8},
      {"U32", DType::kU32, 4},   {"U16", DType::kU16, 2},        {"U8", DType::kU8, 1},
      {"BOOL", DType::kBool, 1}, {"F8_E4M3", DType::kF8E4M3, 1}, {"F8_E5M2", DType::kF8E5M2, 1},
  };
  SafetensorsBuilder b;
  for (const Expect& e : kAll) b.Add(absl::StrCat("t_", e.name), e.name, {3, 2});
  absl::StatusOr<SafetensorsFile> f = Parse(b.Bytes());
  ASSERT_TRUE(f.ok()) << f.status();
  ASSERT_EQ(f->header.tensors.size(), 15u);
  uint64_t offset = 0;
  for (size_t i = 0; i < 15; ++i) {
    const TensorInfo& t = f->header.tensors[i];
    SCOPED_TRACE(kAll[i].name);
    EXPECT_EQ(t.name, absl::StrCat("t_", kAll[i].name));
    EXPECT_EQ(t.dtype, kAll[i].dtype);
    EXPECT_EQ(DTypeName(t.dtype), kAll[i].name);
    EXPECT_EQ(static_cast<uint64_t>(DTypeSize(t.dtype)), kAll[i].size);
    EXPECT_THAT(t.shape, ElementsAre(3, 2));
    EXPECT_EQ(t.begin, offset);
    EXPECT_EQ(t.nbytes(), 6 * kAll[i].size);
    EXPECT_EQ(t.numel(), 6u);
    offset += 6 * kAll[i].size;
  }
  EXPECT_EQ(f->file_size, 8 + b.Json().size() + offset);
  EXPECT_EQ(f->data_offset, 8 + b.Json().size());
}

TEST(SafetensorsAcceptTest, ZeroDimensionalTensor) {
  SafetensorsBuilder b;
  b.Add("scalar", "F64", {}).Add("scalar8", "U8", {});
  absl::StatusOr<SafetensorsFile> f = Parse(b.Bytes());
  ASSERT_TRUE(f.ok()) << f.status();
  ASSERT_EQ(f->header.tensors.size(), 2u);
  EXPECT_THAT(f->header.tensors[0].shape, IsEmpty());
  EXPECT_EQ(f->header.tensors[0].numel(), 1u);
  EXPECT_EQ(f->header.tensors[0].nbytes(), 8u);
  EXPECT_EQ(f->header.tensors[1].begin, 8u);
  EXPECT_EQ(f->header.tensors[1].nbytes(), 1u);
  // A 0-d tensor still needs one element's bytes.
  SafetensorsBuilder bad;
  bad.AddEntry("scalar", "F32", {}, 0, 0);
  EXPECT_THAT(Parse(bad.Bytes()), StatusIs(kInvalid, Subs({kFile, "'scalar'", "needs 4"})));
}

TEST(SafetensorsAcceptTest, EmptyTensors) {
  SafetensorsBuilder b;
  b.Add("e_first", "F32", {0}).Add("a", "U8", {4}).Add("e_mid", "BF16", {3, 0, 7});
  b.Add("b", "U16", {2}).Add("e_last", "I64", {0, 0});
  absl::StatusOr<SafetensorsFile> f = Parse(b.Bytes());
  ASSERT_TRUE(f.ok()) << f.status();
  std::vector<std::string> names;
  for (const TensorInfo& t : f->header.tensors) {
    names.push_back(t.name);
    if (t.name[0] == 'e') {
      EXPECT_EQ(t.nbytes(), 0u) << t.name;
      EXPECT_EQ(t.numel(), 0u) << t.name;
    }
  }
  EXPECT_THAT(names, ::testing::UnorderedElementsAre("e_first", "a", "e_mid", "b", "e_last"));
  EXPECT_EQ(f->file_size - f->data_offset, 8u);
  // An empty tensor that points past the data section is still out of bounds.
  SafetensorsBuilder bad;
  bad.Add("a", "U8", {4}).AddEntry("e", "U8", {0}, 9, 9);
  EXPECT_THAT(Parse(bad.Bytes()), StatusIs(kInvalid, Subs({kFile, "'e'", "past the end"})));
}

TEST(SafetensorsAcceptTest, Metadata) {
  SafetensorsBuilder b;
  b.Metadata("format", "pt").Metadata("z_note", "quote \" and \\ backslash").Add("w", "U8", {2});
  absl::StatusOr<SafetensorsFile> f = Parse(b.Bytes());
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_THAT(f->header.metadata,
              ElementsAre(Pair("format", "pt"), Pair("z_note", "quote \" and \\ backslash")));
  ASSERT_EQ(f->header.tensors.size(), 1u);
  EXPECT_EQ(f->header.tensors[0].name, "w");
}

TEST(SafetensorsAcceptTest, EmptyMetadataAndMetadataAfterTensors) {
  const std::string json =
      R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"__metadata__":{}})";
  absl::StatusOr<SafetensorsFile> f = ParseJson(json, 1);
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_THAT(f->header.metadata, IsEmpty());
  EXPECT_EQ(f->header.tensors.size(), 1u);
}

TEST(SafetensorsRejectTest, NonStringMetadataValue) {
  for (const char* v : {"1", "true", "null", "[\"a\"]", "{\"a\":\"b\"}"}) {
    const std::string json = absl::StrCat(R"({"__metadata__":{"format":"pt","total":)", v, "}}");
    EXPECT_THAT(ParseJson(json),
                StatusIs(kInvalid, Subs({kFile, "__metadata__", "'total'", "must be a string"})))
        << v;
  }
}

TEST(SafetensorsRejectTest, MetadataNotAnObjectOrTwice) {
  EXPECT_THAT(ParseJson(R"({"__metadata__":"pt"})"),
              StatusIs(kInvalid, Subs({kFile, "'__metadata__' must be an object"})));
  EXPECT_THAT(ParseJson(R"({"__metadata__":{},"__metadata__":{}})"),
              StatusIs(kInvalid, Subs({kFile, "'__metadata__' appears twice"})));
}

TEST(SafetensorsAcceptTest, UnicodeEscapesInNames) {
  SafetensorsBuilder b;
  // \u00e9 is é (2 UTF-8 bytes), \u4e2d is 中 (3), the surrogate pair is U+1F600 (4), \u0041 is A.
  b.AddRawKey(R"(caf\u00e9.\u4e2d.\ud83d\ude00.\u0041\n\"\/)",
              R"({"dtype":"U8","shape":[1],"data_offsets":[0,1]})");
  b.AddRaw("raw.\xc3\xa9", R"({"dtype":"U8","shape":[1],"data_offsets":[1,2]})");
  b.SetDataSize(2);
  absl::StatusOr<SafetensorsFile> f = Parse(b.Bytes());
  ASSERT_TRUE(f.ok()) << f.status();
  ASSERT_EQ(f->header.tensors.size(), 2u);
  EXPECT_EQ(f->header.tensors[0].name, "caf\xc3\xa9.\xe4\xb8\xad.\xf0\x9f\x98\x80.A\n\"/");
  EXPECT_EQ(f->header.tensors[1].name, "raw.\xc3\xa9");
}

// --- UTF-8 ----------------------------------------------------------------------------------

struct BadUtf8 {
  const char* label;
  const char* bytes;  // placed in a tensor name right after "ab"
  const char* why;
};
void PrintTo(const BadUtf8& c, std::ostream* os) { *os << c.label; }

class SafetensorsBadUtf8Test : public ::testing::TestWithParam<BadUtf8> {};

// Names reach JSON writers (plans, shard headers) and other languages' strings: a name that is
// not well-formed UTF-8 is refused at the byte where it goes wrong.
TEST_P(SafetensorsBadUtf8Test, IsRejectedAtItsByteOffset) {
  const std::string json = absl::StrCat(R"({"ab)", GetParam().bytes,
                                        R"(cd":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}})");
  // The bad sequence starts at header byte 4: after `{"ab`.
  EXPECT_THAT(ParseJson(json, 1),
              StatusIs(kInvalid, Subs({kFile, GetParam().why, "at byte 4 (found byte 0x"})));
}

INSTANTIATE_TEST_SUITE_P(
    Variants, SafetensorsBadUtf8Test,
    ::testing::Values(BadUtf8{"byte_ff", "\xff", "never occurs in UTF-8"},
                      BadUtf8{"byte_f5", "\xf5\x80\x80\x80", "never occurs in UTF-8"},
                      BadUtf8{"lone_continuation", "\x80", "continuation byte without a lead byte"},
                      BadUtf8{"overlong_c0", "\xc0\xaf", "overlong"},
                      BadUtf8{"overlong_c1", "\xc1\xbf", "overlong"},
                      BadUtf8{"overlong_3_byte", "\xe0\x80\xaf", "overlong"},
                      BadUtf8{"overlong_4_byte", "\xf0\x80\x80\xaf", "overlong"},
                      BadUtf8{"surrogate_d800", "\xed\xa0\x80", "surrogate"},
                      BadUtf8{"surrogate_dfff", "\xed\xbf\xbf", "surrogate"},
                      BadUtf8{"above_10ffff", "\xf4\x90\x80\x80", "above U+10FFFF"},
                      BadUtf8{"truncated_2_byte", "\xc3", "truncated"},
                      BadUtf8{"truncated_3_byte", "\xe4\xb8", "truncated"},
                      BadUtf8{"truncated_4_byte", "\xf0\x9f\x98", "truncated"},
                      BadUtf8{"lead_then_ascii",
                              "\xe4"
                              "a"
                              "\xad",
                              "truncated"}),
    [](const auto& info) { return std::string(info.param.label); });

TEST(SafetensorsUtf8Test, BadSequenceAtTheEndOfAStringBeforeTheQuote) {
  // The sequence is cut short by the closing quote, 8-byte chunks before it are plain ASCII.
  const std::string name = "model.layers.0.mlp.weight\xe4\xb8";
  const std::string json =
      absl::StrCat("{\"", name, R"(":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}})");
  EXPECT_THAT(ParseJson(json, 1), StatusIs(kInvalid, Subs({kFile, "truncated", "at byte 27"})));
}

TEST(SafetensorsUtf8Test, BadBytesInMetadataAndUnknownKeysAreRejected) {
  EXPECT_THAT(ParseJson("{\"__metadata__\":{\"format\":\"p\xfft\"}}"),
              StatusIs(kInvalid, Subs({kFile, "UTF-8", "at byte 28"})));
  EXPECT_THAT(ParseJson("{\"a\":{\"x\":[\"\xc0\x80\"],\"dtype\":\"U8\",\"shape\":[1],"
                        "\"data_offsets\":[0,1]}}",
                        1),
              StatusIs(kInvalid, Subs({kFile, "overlong", "at byte 12"})));
  EXPECT_THAT(ParseJson("{\"a\":{\"\xed\xa0\x80\":1,\"dtype\":\"U8\",\"shape\":[1],"
                        "\"data_offsets\":[0,1]}}",
                        1),
              StatusIs(kInvalid, Subs({kFile, "surrogate", "at byte 7"})));
}

TEST(SafetensorsUtf8Test, EveryBoundaryCodePointIsAccepted) {
  // U+0080, U+07FF, U+0800, U+D7FF, U+E000, U+FFFF, U+10000, U+10FFFF, at every alignment of
  // the 8-byte scan.
  const std::string chars[] = {"\xc2\x80",         "\xdf\xbf",        "\xe0\xa0\x80",
                               "\xed\x9f\xbf",     "\xee\x80\x80",    "\xef\xbf\xbf",
                               "\xf0\x90\x80\x80", "\xf4\x8f\xbf\xbf"};
  for (size_t pad = 0; pad < 8; ++pad) {
    for (const std::string& c : chars) {
      const std::string name = std::string(pad, 'x') + c + "y";
      SafetensorsBuilder b;
      b.AddRaw(name, R"({"dtype":"U8","shape":[1],"data_offsets":[0,1]})");
      b.SetDataSize(1);
      absl::StatusOr<SafetensorsFile> f = Parse(b.Bytes());
      ASSERT_TRUE(f.ok()) << f.status();
      EXPECT_EQ(f->header.tensors[0].name, name);
    }
  }
}

TEST(SafetensorsAcceptTest, EscapesAndControlCharactersAtEveryPositionOfALongName) {
  // The string scanner skips plain characters several bytes at a time; a special character
  // must be seen wherever it falls within such a chunk.
  const std::string base = "model.layers.17.mlp.experts.203.gate_proj.weight";
  for (size_t i = 0; i <= base.size(); ++i) {
    SCOPED_TRACE(i);
    SafetensorsBuilder esc;
    esc.AddRawKey(base.substr(0, i) + "\\t" + base.substr(i),
                  R"({"dtype":"U8","shape":[1],"data_offsets":[0,1]})");
    esc.SetDataSize(1);
    absl::StatusOr<SafetensorsFile> f = Parse(esc.Bytes());
    ASSERT_TRUE(f.ok()) << f.status();
    EXPECT_EQ(f->header.tensors[0].name, base.substr(0, i) + "\t" + base.substr(i));
    for (char bad : {'\x01', '\x1f', '\n'}) {
      SafetensorsBuilder ctl;
      ctl.AddRawKey(base.substr(0, i) + bad + base.substr(i),
                    R"({"dtype":"U8","shape":[1],"data_offsets":[0,1]})");
      ctl.SetDataSize(1);
      EXPECT_THAT(Parse(ctl.Bytes()), StatusIs(kInvalid, Subs({kFile, "control character"})));
    }
    SafetensorsBuilder quote;
    quote.AddRawKey(base.substr(0, i) + "\\\"" + base.substr(i),
                    R"({"dtype":"U8","shape":[1],"data_offsets":[0,1]})");
    quote.SetDataSize(1);
    f = Parse(quote.Bytes());
    ASSERT_TRUE(f.ok()) << f.status();
    EXPECT_EQ(f->header.tensors[0].name, base.substr(0, i) + "\"" + base.substr(i));
  }
}

TEST(SafetensorsAcceptTest, EscapedNamesAreComparedDecodedForDuplicates) {
  SafetensorsBuilder b;
  b.AddRaw("w", R"({"dtype":"U8","shape":[1],"data_offsets":[0,1]})");
  b.AddRawKey(R"(\u0077)", R"({"dtype":"U8","shape":[1],"data_offsets":[1,2]})");
  b.SetDataSize(2);
  EXPECT_THAT(Parse(b.Bytes()), StatusIs(kInvalid, Subs({kFile, "'w'", "twice"})));
}

TEST(SafetensorsAcceptTest, WhitespaceAndPaddingAreAllowed) {
  const std::string json =
      " \t\r\n{ \"w\" : { \"dtype\" : \"U8\" , \"shape\" : [ 2 ] , "
      "\"data_offsets\" : [ 0 , 2 ] } }      ";
  absl::StatusOr<SafetensorsFile> f = ParseJson(json, 2);
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(f->header.tensors[0].nbytes(), 2u);
}

// --- files on disk ---------------------------------------------------------------------------

TEST(SafetensorsFileTest, ReadsHeaderFromDisk) {
  TempDir dir;
  SafetensorsBuilder b;
  b.Metadata("format", "pt").Add("a", "BF16", {2, 3}).Add("b", "F32", {5});
  const std::string path = dir.Write("m.safetensors", b.Bytes());
  absl::StatusOr<SafetensorsFile> f = ReadSafetensorsFile(path);
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(f->path, path);
  EXPECT_EQ(f->file_size, b.Bytes().size());
  EXPECT_EQ(f->data_offset, 8 + b.Json().size());
  ASSERT_EQ(f->header.tensors.size(), 2u);
  EXPECT_EQ(f->header.tensors[1].begin, 12u);
  EXPECT_EQ(f->header.tensors[1].end, 32u);
}

TEST(SafetensorsFileTest, ErrorsNameThePath) {
  TempDir dir;
  const std::string short_path = dir.Write("short.safetensors", "abc");
  EXPECT_THAT(ReadSafetensorsFile(short_path),
              StatusIs(kInvalid, Subs({short_path.c_str(), "shorter than the 8-byte"})));
  const std::string long_header = dir.Write("long.safetensors", LengthPrefix(64) + "{}");
  EXPECT_THAT(ReadSafetensorsFile(long_header),
              StatusIs(kInvalid, Subs({long_header.c_str(), "larger than"})));
  SafetensorsBuilder b;
  b.Add("w", "F32", {4});
  std::string truncated = b.Bytes();
  truncated.resize(truncated.size() - 4);
  const std::string trunc_path = dir.Write("trunc.safetensors", truncated);
  EXPECT_THAT(ReadSafetensorsFile(trunc_path),
              StatusIs(kInvalid, Subs({trunc_path.c_str(), "'w'", "past the end"})));
  EXPECT_THAT(ReadSafetensorsFile(dir.Path("absent.safetensors")),
              StatusIs(absl::StatusCode::kNotFound, Subs({"absent.safetensors"})));
  EXPECT_THAT(ReadSafetensorsFile(dir.path()), StatusIs(kInvalid, Subs({"not a regular file"})));
}

}  // namespace
}  // namespace weightd
