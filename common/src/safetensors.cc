#include "weightd/safetensors.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "detail/json_cursor.h"
#include "weightd/file_util.h"
#include "weightd/status_macros.h"
#include "weightd/unique_fd.h"

namespace weightd {
namespace {

using detail::JsonCursor;

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

absl::Status FileError(absl::string_view file, absl::string_view msg) {
  return absl::InvalidArgumentError(absl::StrCat(file, ": ", msg));
}

absl::Status TensorError(absl::string_view file, absl::string_view tensor, absl::string_view msg) {
  return absl::InvalidArgumentError(absl::StrCat(file, ": tensor '", tensor, "': ", msg));
}

// Parses the value of one tensor entry: {"dtype": ..., "shape": [...], "data_offsets": [b, e]}.
absl::Status ParseTensorEntry(JsonCursor& cur, absl::string_view file, TensorInfo* t) {
  if (cur.Peek() != '{') {
    return TensorError(file, t->name, absl::StrCat("entry is not a JSON object ", cur.Where()));
  }
  cur.Expect('{').IgnoreError();
  bool have_dtype = false, have_shape = false, have_offsets = false;
  std::string key, value;
  auto field_error = [&](const absl::Status& s) { return TensorError(file, t->name, s.message()); };
  if (!cur.Consume('}')) {
    do {
      if (absl::Status s = cur.ParseString(&key); !s.ok()) return field_error(s);
      if (absl::Status s = cur.Expect(':'); !s.ok()) return field_error(s);
      if (key == "dtype") {
        if (have_dtype) return TensorError(file, t->name, "'dtype' appears twice");
        if (cur.Peek() != '"') {
          return TensorError(file, t->name, absl::StrCat("'dtype' must be a string ", cur.Where()));
        }
        if (absl::Status s = cur.ParseString(&value); !s.ok()) return field_error(s);
        std::optional<DType> dt = ParseDType(value);
        if (!dt) {
          return TensorError(
              file, t->name,
              absl::StrCat("unknown dtype '", value,
                           "' (known: F64 F32 F16 BF16 I64 I32 I16 I8 U64 U32 U16 U8 BOOL "
                           "F8_E4M3 F8_E5M2)"));
        }
        t->dtype = *dt;
        have_dtype = true;
      } else if (key == "shape") {
        if (have_shape) return TensorError(file, t->name, "'shape' appears twice");
        if (cur.Peek() != '[') {
          return TensorError(file, t->name,
                             absl::StrCat("'shape' must be an array of integers ", cur.Where()));
        }
        cur.Expect('[').IgnoreError();
        t->shape.clear();
        if (!cur.Consume(']')) {
          do {
            uint64_t d = 0;
            if (absl::Status s = cur.ParseUint64(&d, "a shape dimension"); !s.ok()) {
              return field_error(s);
            }
            if (d > static_cast<uint64_t>(INT64_MAX)) {
              return TensorError(file, t->name, "a shape dimension exceeds 2^63-1");
            }
            t->shape.push_back(static_cast<int64_t>(d));
          } while (cur.Consume(','));
          if (absl::Status s = cur.Expect(']'); !s.ok()) return field_error(s);
        }
        have_shape = true;
      } else if (key == "data_offsets") {
        if (have_offsets) return TensorError(file, t->name, "'data_offsets' appears twice");
        if (cur.Peek() != '[') {
          return TensorError(
              file, t->name,
              absl::StrCat("'data_offsets' must be an array of two integers ", cur.Where()));
        }
        cur.Expect('[').IgnoreError();
        uint64_t b = 0, e = 0;
        if (absl::Status s = cur.ParseUint64(&b, "data_offsets[0]"); !s.ok()) return field_error(s);
        if (!cur.Consume(',')) {
          return TensorError(file, t->name, "'data_offsets' must have exactly two entries");
        }
        if (absl::Status s = cur.ParseUint64(&e, "data_offsets[1]"); !s.ok()) return field_error(s);
        if (!cur.Consume(']')) {
          return TensorError(file, t->name, "'data_offsets' must have exactly two entries");
        }
        t->begin = b;
        t->end = e;
        have_offsets = true;
      } else {
        // Unknown keys are tolerated (the format may grow), but must still be valid JSON.
        if (absl::Status s = cur.SkipValue(1); !s.ok()) return field_error(s);
      }
    } while (cur.Consume(','));
    if (absl::Status s = cur.Expect('}'); !s.ok()) return field_error(s);
  }
  if (!have_dtype) return TensorError(file, t->name, "missing 'dtype'");
  if (!have_shape) return TensorError(file, t->name, "missing 'shape'");
  if (!have_offsets) return TensorError(file, t->name, "missing 'data_offsets'");
  return absl::OkStatus();
}

absl::Status ParseMetadata(JsonCursor& cur, absl::string_view file,
                           std::vector<std::pair<std::string, std::string>>* out) {
  if (cur.Peek() != '{') {
    return FileError(file, absl::StrCat("'__metadata__' must be an object of strings ",
                                        cur.Where()));
  }
  cur.Expect('{').IgnoreError();
  if (cur.Consume('}')) return absl::OkStatus();
  std::string key, value;
  do {
    if (absl::Status s = cur.ParseString(&key); !s.ok()) {
      return FileError(file, absl::StrCat("in '__metadata__': ", s.message()));
    }
    if (absl::Status s = cur.Expect(':'); !s.ok()) {
      return FileError(file, absl::StrCat("in '__metadata__': ", s.message()));
    }
    if (cur.Peek() != '"') {
      return FileError(file, absl::StrCat("'__metadata__' value of '", key,
                                          "' must be a string ", cur.Where()));
    }
    if (absl::Status s = cur.ParseString(&value); !s.ok()) {
      return FileError(file, absl::StrCat("in '__metadata__': ", s.message()));
    }
    out->emplace_back(key, value);
  } while (cur.Consume(','));
  if (absl::Status s = cur.Expect('}'); !s.ok()) {
    return FileError(file, absl::StrCat("in '__metadata__': ", s.message()));
  }
  return absl::OkStatus();
}

// Checks one tensor's byte range against its dtype and shape and the data section size.
absl::Status ValidateTensor(const TensorInfo& t, uint64_t data_size, absl::string_view file) {
  uint64_t numel = 1;
  for (int64_t d : t.shape) {
    if (__builtin_mul_overflow(numel, static_cast<uint64_t>(d), &numel)) {
      return TensorError(file, t.name,
                         absl::StrCat("element count of shape ", ShapeString(t.shape),
                                      " overflows 64 bits"));
    }
  }
  uint64_t expected = 0;
  if (__builtin_mul_overflow(numel, static_cast<uint64_t>(DTypeSize(t.dtype)), &expected)) {
    return TensorError(file, t.name,
                       absl::StrCat("byte size of shape ", ShapeString(t.shape), " ",
                                    DTypeName(t.dtype), " overflows 64 bits"));
  }
  if (t.end < t.begin) {
    return TensorError(file, t.name,
                       absl::StrCat("data_offsets [", t.begin, ", ", t.end, "] are reversed"));
  }
  if (t.end > data_size) {
    return TensorError(file, t.name,
                       absl::StrCat("data_offsets [", t.begin, ", ", t.end,
                                    "] reach past the end of the data section (", data_size,
                                    " bytes)"));
  }
  if (t.end - t.begin != expected) {
    return TensorError(file, t.name,
                       absl::StrCat("data_offsets [", t.begin, ", ", t.end, "] span ",
                                    t.end - t.begin, " bytes but ", DTypeName(t.dtype), " ",
                                    ShapeString(t.shape), " needs ", expected));
  }
  return absl::OkStatus();
}

}  // namespace

uint64_t TensorInfo::numel() const {
  uint64_t n = 1;
  for (int64_t d : shape) n *= static_cast<uint64_t>(d);
  return n;
}

absl::StatusOr<SafetensorsHeader> ParseSafetensorsHeader(absl::string_view json,
                                                         uint64_t data_size,
                                                         absl::string_view file_label) {
  SafetensorsHeader header;
  JsonCursor cur(json);
  if (cur.Peek() != '{') {
    return FileError(file_label,
                     absl::StrCat("header is not a JSON object: ", cur.Error("expected '{'").message()));
  }
  cur.Expect('{').IgnoreError();
  absl::flat_hash_set<absl::string_view> seen;
  bool have_metadata = false;
  std::string key;
  if (!cur.Consume('}')) {
    do {
      if (absl::Status s = cur.ParseString(&key); !s.ok()) {
        return FileError(file_label, absl::StrCat("header: ", s.message()));
      }
      if (absl::Status s = cur.Expect(':'); !s.ok()) {
        return FileError(file_label, absl::StrCat("header: ", s.message()));
      }
      if (key == "__metadata__") {
        if (have_metadata) return FileError(file_label, "'__metadata__' appears twice");
        have_metadata = true;
        WD_RETURN_IF_ERROR(ParseMetadata(cur, file_label, &header.metadata));
        continue;
      }
      if (key.empty()) return FileError(file_label, "a tensor has an empty name");
      TensorInfo& t = header.tensors.emplace_back();
      t.name = std::move(key);
      key = std::string();
      WD_RETURN_IF_ERROR(ParseTensorEntry(cur, file_label, &t));
      WD_RETURN_IF_ERROR(ValidateTensor(t, data_size, file_label));
    } while (cur.Consume(','));
    if (absl::Status s = cur.Expect('}'); !s.ok()) {
      return FileError(file_label, absl::StrCat("header: ", s.message()));
    }
  }
  cur.SkipWhitespace();
  if (!cur.AtEnd()) {
    return FileError(file_label,
                     absl::StrCat("header: unexpected content after the JSON object ", cur.Where()));
  }

  // Names are unique. Checked after parsing so that the strings no longer move.
  seen.reserve(header.tensors.size());
  for (const TensorInfo& t : header.tensors) {
    if (!seen.insert(t.name).second) {
      return TensorError(file_label, t.name, "name appears twice in the header");
    }
  }

  auto data_order = [](const TensorInfo& a, const TensorInfo& b) {
    if (a.begin != b.begin) return a.begin < b.begin;
    if (a.end != b.end) return a.end < b.end;
    return a.name < b.name;
  };
  // Writers usually emit tensors in data order already; checking is cheaper than sorting.
  if (!std::is_sorted(header.tensors.begin(), header.tensors.end(), data_order)) {
    std::sort(header.tensors.begin(), header.tensors.end(), data_order);
  }
  // The data section must be covered exactly: no overlaps, no holes, nothing after the end.
  uint64_t cursor = 0;
  const TensorInfo* prev = nullptr;
  for (const TensorInfo& t : header.tensors) {
    if (t.begin < cursor) {
      return TensorError(file_label, t.name,
                         absl::StrCat("bytes [", t.begin, ", ", t.end, ") overlap tensor '",
                                      prev->name, "' [", prev->begin, ", ", prev->end, ")"));
    }
    if (t.begin > cursor) {
      return TensorError(
          file_label, t.name,
          absl::StrCat("starts at data byte ", t.begin, " but the previous tensor",
                       prev ? absl::StrCat(" '", prev->name, "'") : std::string(" (none)"),
                       " ends at ", cursor, ": a hole of ", t.begin - cursor, " bytes"));
    }
    cursor = t.end;
    if (t.end > t.begin) prev = &t;
  }
  if (cursor != data_size) {
    return FileError(file_label,
                     absl::StrCat("data section is ", data_size, " bytes but tensors cover only ",
                                  cursor, ": ", data_size - cursor,
                                  " trailing bytes belong to no tensor (truncated header or "
                                  "corrupted file?)"));
  }
  return header;
}

namespace {

absl::StatusOr<uint64_t> DecodeHeaderLength(const unsigned char prefix[8], uint64_t file_size,
                                            absl::string_view file) {
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | prefix[i];
  if (n > kMaxSafetensorsHeaderBytes) {
    return FileError(file, absl::StrCat("header length ", n, " bytes exceeds the ",
                                        kMaxSafetensorsHeaderBytes >> 20,
                                        " MiB cap (not a safetensors file, or corrupted)"));
  }
  if (n > file_size - 8) {
    return FileError(file, absl::StrCat("header length ", n, " bytes is larger than the ",
                                        file_size - 8, " bytes that follow the length prefix "
                                        "(truncated file?)"));
  }
  return n;
}

}  // namespace

absl::StatusOr<SafetensorsFile> ParseSafetensorsBuffer(absl::string_view bytes,
                                                       absl::string_view file_label) {
  SafetensorsFile f;
  f.path = std::string(file_label);
  f.file_size = bytes.size();
  if (bytes.size() < 8) {
    return FileError(file_label, absl::StrCat("file is ", bytes.size(),
                                              " bytes, shorter than the 8-byte length prefix"));
  }
  unsigned char prefix[8];
  std::memcpy(prefix, bytes.data(), 8);
  WD_ASSIGN_OR_RETURN(uint64_t n, DecodeHeaderLength(prefix, bytes.size(), file_label));
  f.data_offset = 8 + n;
  WD_ASSIGN_OR_RETURN(f.header, ParseSafetensorsHeader(bytes.substr(8, n),
                                                       bytes.size() - f.data_offset, file_label));
  return f;
}

absl::StatusOr<SafetensorsFile> ReadSafetensorsFile(const std::string& path,
                                                    absl::Span<const std::string> roots) {
  WD_ASSIGN_OR_RETURN(UniqueFd fd, OpenRegularFile(path, roots));
  struct stat st {};
  WD_SYSCALL_OR_RETURN(::fstat(fd.get(), &st), absl::StrCat("fstat '", path, "'"));
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  if (size < 8) {
    return FileError(path, absl::StrCat("file is ", size,
                                        " bytes, shorter than the 8-byte length prefix"));
  }
  unsigned char prefix[8];
  WD_RETURN_IF_ERROR(PreadExact(fd.get(), prefix, 8, 0, path));
  WD_ASSIGN_OR_RETURN(uint64_t n, DecodeHeaderLength(prefix, size, path));
  std::string json(n, '\0');
  WD_RETURN_IF_ERROR(PreadExact(fd.get(), json.data(), n, 8, path));
  SafetensorsFile f;
  f.path = path;
  f.file_size = size;
  f.data_offset = 8 + n;
  f.identity = IdentityOf(st);
  WD_ASSIGN_OR_RETURN(f.header, ParseSafetensorsHeader(json, size - f.data_offset, path));
  return f;
}

}  // namespace weightd
