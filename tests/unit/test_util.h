// Test helpers: builds safetensors files byte by byte, independently of the parser under test,
// and manages scratch directories.
//
//   SafetensorsBuilder b;
//   b.Add("w", "BF16", {2, 3});              // laid out after the previous tensor
//   std::string file = b.Bytes();            // length prefix + header JSON + data
//
// The dtype sizes below are written out here on purpose: taking them from weightd/dtype.h would
// let a wrong size in the library agree with itself.
#ifndef WEIGHTD_TESTS_UNIT_TEST_UTIL_H_
#define WEIGHTD_TESTS_UNIT_TEST_UTIL_H_

#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace weightd::testing {

inline uint64_t SizeOfDtype(absl::string_view dtype) {
  static const std::pair<const char*, uint64_t> kSizes[] = {
      {"F64", 8}, {"F32", 4}, {"F16", 2},  {"BF16", 2},    {"I64", 8},
      {"I32", 4}, {"I16", 2}, {"I8", 1},   {"U64", 8},     {"U32", 4},
      {"U16", 2}, {"U8", 1},  {"BOOL", 1}, {"F8_E4M3", 1}, {"F8_E5M2", 1}};
  for (const auto& [name, size] : kSizes) {
    if (dtype == name) return size;
  }
  throw std::invalid_argument(absl::StrCat("test bug: unknown dtype ", dtype));
}

// The 8-byte little-endian length prefix, written without relying on host byte order.
inline std::string LengthPrefix(uint64_t n) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xFF);
  return out;
}

inline std::string FileBytes(absl::string_view header_json, absl::string_view data) {
  return absl::StrCat(LengthPrefix(header_json.size()), header_json, data);
}

inline std::string JsonEscape(absl::string_view s) {
  std::string out;
  for (char c : s) {
    if (c == '"' || c == '\\') out.push_back('\\');
    out.push_back(c);
  }
  return out;
}

class SafetensorsBuilder {
 public:
  // A well-formed entry whose bytes follow the previous tensor's. Data bytes are a pattern that
  // depends on the tensor's position, so that reading the wrong range shows.
  SafetensorsBuilder& Add(absl::string_view name, absl::string_view dtype,
                          std::vector<int64_t> shape) {
    uint64_t numel = 1;
    for (int64_t d : shape) numel *= static_cast<uint64_t>(d);
    const uint64_t n = numel * SizeOfDtype(dtype);
    const uint64_t begin = data_.size();
    for (uint64_t i = 0; i < n; ++i) {
      data_.push_back(static_cast<char>((begin + i * 7 + entries_.size() * 31) & 0xFF));
    }
    return AddEntry(name, dtype, shape, begin, begin + n);
  }

  // An entry with explicit offsets; the data section is not grown (see SetDataSize).
  SafetensorsBuilder& AddEntry(absl::string_view name, absl::string_view dtype,
                               const std::vector<int64_t>& shape, uint64_t begin, uint64_t end) {
    return AddRaw(name,
                  absl::StrCat(R"({"dtype":")", dtype, R"(","shape":[)", absl::StrJoin(shape, ","),
                               R"(],"data_offsets":[)", begin, ",", end, "]}"));
  }

  // `value_json` is written verbatim as the entry's value.
  SafetensorsBuilder& AddRaw(absl::string_view name, absl::string_view value_json) {
    return AddRawKey(JsonEscape(name), value_json);
  }

  // `key_json` is written verbatim between the key's quotes (to test escapes in names).
  SafetensorsBuilder& AddRawKey(absl::string_view key_json, absl::string_view value_json) {
    entries_.push_back(absl::StrCat("\"", key_json, "\":", value_json));
    return *this;
  }

  SafetensorsBuilder& Metadata(absl::string_view key, absl::string_view value) {
    metadata_.push_back(absl::StrCat("\"", JsonEscape(key), "\":\"", JsonEscape(value), "\""));
    return *this;
  }

  SafetensorsBuilder& SetDataSize(uint64_t n) {
    data_.resize(n, '\x5a');
    return *this;
  }

  std::string Json() const {
    std::vector<std::string> parts;
    if (!metadata_.empty()) {
      parts.push_back(absl::StrCat(R"("__metadata__":{)", absl::StrJoin(metadata_, ","), "}"));
    }
    parts.insert(parts.end(), entries_.begin(), entries_.end());
    std::string json = absl::StrCat("{", absl::StrJoin(parts, ","), "}");
    // Real writers pad the header to 8 bytes with spaces so the data section is aligned.
    while (json.size() % 8 != 0) json.push_back(' ');
    return json;
  }
  const std::string& Data() const { return data_; }
  std::string Bytes() const { return FileBytes(Json(), data_); }

 private:
  std::vector<std::string> entries_;
  std::vector<std::string> metadata_;
  std::string data_;
};

// A fresh directory under TEST_TMPDIR (or /tmp), removed with its contents on destruction.
class TempDir {
 public:
  TempDir() {
    const char* base = std::getenv("TEST_TMPDIR");
    std::string tmpl = absl::StrCat(base != nullptr ? base : "/tmp", "/weightd_test_XXXXXX");
    if (::mkdtemp(tmpl.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
    path_ = tmpl;
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }

  const std::string& path() const { return path_; }
  std::string Path(absl::string_view name) const { return absl::StrCat(path_, "/", name); }

  std::string Write(absl::string_view name, absl::string_view contents) const {
    const std::string p = Path(name);
    std::ofstream f(p, std::ios::binary | std::ios::trunc);
    f.write(contents.data(), static_cast<std::streamsize>(contents.size()));
    f.close();
    if (!f) throw std::runtime_error(absl::StrCat("could not write ", p));
    return p;
  }

 private:
  std::string path_;
};

inline const absl::Status& StatusOf(const absl::Status& s) { return s; }
template <typename T>
absl::Status StatusOf(const absl::StatusOr<T>& s) {
  return s.status();
}

// Status matcher: code and every substring of the message.
MATCHER_P2(StatusIs, code, substrings,
           absl::StrCat("has code ", absl::StatusCodeToString(code), " and a message containing \"",
                        absl::StrJoin(substrings, "\", \""), "\"")) {
  const absl::Status& s = StatusOf(arg);
  if (s.code() != code) {
    *result_listener << "code is " << absl::StatusCodeToString(s.code()) << ": " << s.message();
    return false;
  }
  for (const auto& sub : substrings) {
    if (s.message().find(sub) == absl::string_view::npos) {
      *result_listener << "message \"" << s.message() << "\" lacks \"" << sub << "\"";
      return false;
    }
  }
  return true;
}

inline std::vector<std::string> Subs(std::initializer_list<const char*> l) {
  return std::vector<std::string>(l.begin(), l.end());
}

}  // namespace weightd::testing

#endif  // WEIGHTD_TESTS_UNIT_TEST_UTIL_H_
