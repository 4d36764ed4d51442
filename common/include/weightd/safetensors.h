// Safetensors header parsing that never trusts its input.
//
// A safetensors file is: an 8-byte little-endian header length N, N bytes of JSON, then the data
// section. The JSON maps tensor names to {"dtype", "shape", "data_offsets": [begin, end]}
// (offsets relative to the data section) plus an optional "__metadata__" string map.
//
//   WD_ASSIGN_OR_RETURN(SafetensorsFile f,
//                       ReadSafetensorsFile("/m/model-00001-of-00004.safetensors"));
//   for (const TensorInfo& t : f.tensors) { ... f.data_offset + t.begin ... }
//
// Everything is checked before a value is handed out: header length against the file size and
// a 100 MiB cap, JSON syntax, field presence and types, known dtypes, offsets ordered and inside
// the data section, byte length == dtype size × element count (with 64-bit overflow detected),
// duplicate names, overlaps and holes between tensors. Error messages name the file and, where
// one exists, the tensor. All functions are thread-safe (no shared state).
#ifndef WEIGHTD_SAFETENSORS_H_
#define WEIGHTD_SAFETENSORS_H_

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "weightd/dtype.h"
#include "weightd/file_util.h"

namespace weightd {

// Largest header accepted, in bytes. Real headers are well under 10 MiB even for 100k tensors.
inline constexpr uint64_t kMaxSafetensorsHeaderBytes = 100ull << 20;

struct TensorInfo {
  std::string name;
  DType dtype = DType::kU8;
  std::vector<int64_t> shape;  // empty for a 0-d tensor
  uint64_t begin = 0;          // byte offsets relative to the start of the data section
  uint64_t end = 0;

  uint64_t nbytes() const { return end - begin; }
  // Product of `shape` (1 for 0-d). Validated not to overflow by the parser.
  uint64_t numel() const;
};

struct SafetensorsHeader {
  // Tensors in data order (sorted by `begin`, ties — empty tensors — by name).
  std::vector<TensorInfo> tensors;
  // "__metadata__" entries, in file order.
  std::vector<std::pair<std::string, std::string>> metadata;
};

// Parses and validates the JSON header `json` of a file whose data section is `data_size`
// bytes long. `file_label` (usually the path) prefixes every error message.
absl::StatusOr<SafetensorsHeader> ParseSafetensorsHeader(absl::string_view json, uint64_t data_size,
                                                         absl::string_view file_label);

struct SafetensorsFile {
  std::string path;
  uint64_t file_size = 0;
  uint64_t data_offset = 0;  // 8 + header length: absolute offset of the data section
  SafetensorsHeader header;
  FileIdentity identity;  // of the file as it was read
};

// Parses a complete in-memory file image (length prefix, header, data). Used by the fuzzer and
// by tests; the data section itself is only measured, never read.
absl::StatusOr<SafetensorsFile> ParseSafetensorsBuffer(absl::string_view bytes,
                                                       absl::string_view file_label);

// Reads the length prefix and header of `path` with pread (never the data section) and
// validates it against the file's size.
// `roots`: see OpenRegularFile (file_util.h).
absl::StatusOr<SafetensorsFile> ReadSafetensorsFile(const std::string& path,
                                                    absl::Span<const std::string> roots = {});

}  // namespace weightd

#endif  // WEIGHTD_SAFETENSORS_H_
