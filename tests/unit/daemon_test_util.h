// Helpers for the daemon/protocol tests: a temporary directory and a safetensors writer.
#ifndef WEIGHTD_TESTS_UNIT_DAEMON_TEST_UTIL_H_
#define WEIGHTD_TESTS_UNIT_DAEMON_TEST_UTIL_H_

#include <stdlib.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

namespace weightd::testing {

class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/weightd-test-XXXXXX";
    path_ = ::mkdtemp(tmpl);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }
  std::string operator/(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

struct FakeTensor {
  std::string name;
  std::string dtype;  // safetensors spelling
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;
};

inline FakeTensor RandomTensor(const std::string& name, std::vector<int64_t> shape, int esize,
                               const std::string& dtype, uint32_t seed) {
  int64_t n = esize;
  for (int64_t d : shape) n *= d;
  std::mt19937 rng(seed);
  FakeTensor t{name, dtype, std::move(shape), std::vector<uint8_t>(n)};
  for (auto& b : t.bytes) b = static_cast<uint8_t>(rng());
  return t;
}

// Writes a safetensors file with `tensors` in order.
inline void WriteSafetensors(const std::string& path, const std::vector<FakeTensor>& tensors) {
  std::string header = "{";
  uint64_t off = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const FakeTensor& t = tensors[i];
    std::string shape;
    for (size_t d = 0; d < t.shape.size(); ++d) {
      shape += (d ? "," : "") + std::to_string(t.shape[d]);
    }
    header += (i ? "," : "") + std::string("\"") + t.name + "\":{\"dtype\":\"" + t.dtype +
              "\",\"shape\":[" + shape + "],\"data_offsets\":[" + std::to_string(off) + "," +
              std::to_string(off + t.bytes.size()) + "]}";
    off += t.bytes.size();
  }
  header += "}";
  while (header.size() % 8 != 0) header += ' ';
  std::ofstream f(path, std::ios::binary);
  const uint64_t n = header.size();
  f.write(reinterpret_cast<const char*>(&n), 8);
  f.write(header.data(), header.size());
  for (const FakeTensor& t : tensors) {
    f.write(reinterpret_cast<const char*>(t.bytes.data()), t.bytes.size());
  }
}

}  // namespace weightd::testing

#endif  // WEIGHTD_TESTS_UNIT_DAEMON_TEST_UTIL_H_
