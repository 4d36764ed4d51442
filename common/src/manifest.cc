#include "weightd/manifest.h"

#include <cstring>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"

namespace weightd {
namespace {

constexpr char kMagic[8] = {'W', 'D', 'M', 'A', 'N', 'I', 'F', '\0'};

template <typename T>
void Put(std::string& out, size_t at, T v) {
  static_assert(std::is_trivially_copyable_v<T>);
  // Little-endian hosts only (x86-64, aarch64): the in-memory form is the wire form.
  std::memcpy(out.data() + at, &v, sizeof(T));
}

template <typename T>
T Get(absl::string_view in, size_t at) {
  T v;
  std::memcpy(&v, in.data() + at, sizeof(T));
  return v;
}

bool MulOverflow(uint64_t a, uint64_t b, uint64_t* out) {
  return __builtin_mul_overflow(a, b, out);
}
bool AddOverflow(uint64_t a, uint64_t b, uint64_t* out) {
  return __builtin_add_overflow(a, b, out);
}

absl::Status Bad(absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat("invalid manifest: ", what));
}

// Checks that [off, off + len) lies within [0, total).
bool InBounds(uint64_t off, uint64_t len, uint64_t total) {
  uint64_t end;
  return !AddOverflow(off, len, &end) && end <= total;
}

}  // namespace

std::vector<int64_t> ContiguousStrides(const std::vector<int64_t>& shape) {
  std::vector<int64_t> s(shape.size());
  int64_t acc = 1;
  for (size_t i = shape.size(); i-- > 0;) {
    s[i] = acc;
    acc *= shape[i];
  }
  return s;
}

std::string EncodeManifest(const Manifest& m) {
  std::string strings = m.model;
  const uint64_t arenas_off = kManifestHeaderSize;
  const uint64_t tensors_off = arenas_off + m.arenas.size() * kManifestArenaEntrySize;
  const uint64_t strings_off = tensors_off + m.tensors.size() * kManifestTensorEntrySize;
  std::vector<uint32_t> name_offsets;
  name_offsets.reserve(m.tensors.size());
  for (const ManifestTensor& t : m.tensors) {
    name_offsets.push_back(static_cast<uint32_t>(strings.size()));
    strings += t.name;
  }
  std::string out(strings_off + strings.size(), '\0');
  std::memcpy(out.data(), kMagic, 8);
  Put<uint32_t>(out, 8, kManifestVersion);
  Put<uint32_t>(out, 12, kManifestHeaderSize);
  Put<uint64_t>(out, 16, out.size());
  Put<uint32_t>(out, 24, static_cast<uint32_t>(m.arenas.size()));
  Put<uint32_t>(out, 28, static_cast<uint32_t>(m.tensors.size()));
  Put<uint32_t>(out, 32, m.rank);
  Put<int32_t>(out, 36, m.device);
  Put<uint64_t>(out, 40, arenas_off);
  Put<uint64_t>(out, 48, tensors_off);
  Put<uint64_t>(out, 56, strings_off);
  Put<uint64_t>(out, 64, strings.size());
  Put<uint32_t>(out, 72, 0);
  Put<uint32_t>(out, 76, static_cast<uint32_t>(m.model.size()));
  for (size_t i = 0; i < m.arenas.size(); ++i) {
    const size_t at = arenas_off + i * kManifestArenaEntrySize;
    Put<uint64_t>(out, at, m.arenas[i].size);
    Put<uint32_t>(out, at + 8, static_cast<uint32_t>(m.arenas[i].kind));
  }
  for (size_t i = 0; i < m.tensors.size(); ++i) {
    const ManifestTensor& t = m.tensors[i];
    const size_t at = tensors_off + i * kManifestTensorEntrySize;
    Put<uint32_t>(out, at, name_offsets[i]);
    Put<uint32_t>(out, at + 4, static_cast<uint32_t>(t.name.size()));
    Put<uint8_t>(out, at + 8, static_cast<uint8_t>(t.dtype));
    Put<uint8_t>(out, at + 9, static_cast<uint8_t>(t.shape.size()));
    Put<uint32_t>(out, at + 12, t.arena);
    Put<uint64_t>(out, at + 16, t.offset);
    Put<uint64_t>(out, at + 24, t.nbytes);
    Put<uint32_t>(out, at + 32, t.crc32c);
    for (size_t d = 0; d < t.shape.size() && d < kMaxDims; ++d) {
      Put<int64_t>(out, at + 40 + 8 * d, t.shape[d]);
      Put<int64_t>(out, at + 96 + 8 * d, d < t.strides.size() ? t.strides[d] : 0);
    }
  }
  std::memcpy(out.data() + strings_off, strings.data(), strings.size());
  return out;
}

absl::StatusOr<Manifest> DecodeManifest(absl::string_view in) {
  if (in.size() < kManifestHeaderSize) {
    return Bad(absl::StrCat("", in.size(), " bytes is shorter than the ", kManifestHeaderSize,
                            "-byte header"));
  }
  if (in.size() > kMaxManifestBytes) {
    return Bad(absl::StrCat("size ", in.size(), " exceeds the cap of ", kMaxManifestBytes));
  }
  if (std::memcmp(in.data(), kMagic, 8) != 0) return Bad("bad magic (expected \"WDMANIF\\0\")");
  const uint32_t version = Get<uint32_t>(in, 8);
  if (version != kManifestVersion) {
    return absl::FailedPreconditionError(
        absl::StrCat("manifest version ", version, " is not supported (this client reads version ",
                     kManifestVersion, ")"));
  }
  if (Get<uint32_t>(in, 12) != kManifestHeaderSize) {
    return Bad(absl::StrCat("header_size ", Get<uint32_t>(in, 12), " != ", kManifestHeaderSize));
  }
  const uint64_t total = Get<uint64_t>(in, 16);
  if (total != in.size()) {
    return Bad(absl::StrCat("total_size ", total, " != received size ", in.size()));
  }
  const uint32_t num_arenas = Get<uint32_t>(in, 24);
  const uint32_t num_tensors = Get<uint32_t>(in, 28);
  const uint64_t arenas_off = Get<uint64_t>(in, 40);
  const uint64_t tensors_off = Get<uint64_t>(in, 48);
  const uint64_t strings_off = Get<uint64_t>(in, 56);
  const uint64_t strings_size = Get<uint64_t>(in, 64);
  uint64_t arenas_len, tensors_len;
  if (MulOverflow(num_arenas, kManifestArenaEntrySize, &arenas_len) ||
      arenas_off < kManifestHeaderSize || !InBounds(arenas_off, arenas_len, total)) {
    return Bad(absl::StrCat("arena table (offset ", arenas_off, ", ", num_arenas,
                            " entries) lies outside the manifest"));
  }
  if (MulOverflow(num_tensors, kManifestTensorEntrySize, &tensors_len) ||
      tensors_off < kManifestHeaderSize || !InBounds(tensors_off, tensors_len, total)) {
    return Bad(absl::StrCat("tensor table (offset ", tensors_off, ", ", num_tensors,
                            " entries) lies outside the manifest"));
  }
  if (strings_off < kManifestHeaderSize || !InBounds(strings_off, strings_size, total)) {
    return Bad(absl::StrCat("string table (offset ", strings_off, ", ", strings_size,
                            " bytes) lies outside the manifest"));
  }
  const absl::string_view strings = in.substr(strings_off, strings_size);
  Manifest m;
  m.rank = Get<uint32_t>(in, 32);
  m.device = Get<int32_t>(in, 36);
  if (m.device < -1) return Bad(absl::StrCat("device ", m.device, " < -1"));
  {
    const uint32_t off = Get<uint32_t>(in, 72), len = Get<uint32_t>(in, 76);
    if (!InBounds(off, len, strings.size())) return Bad("model name lies outside the string table");
    m.model = std::string(strings.substr(off, len));
  }
  m.arenas.resize(num_arenas);
  for (uint32_t i = 0; i < num_arenas; ++i) {
    const size_t at = arenas_off + i * kManifestArenaEntrySize;
    m.arenas[i].size = Get<uint64_t>(in, at);
    const uint32_t kind = Get<uint32_t>(in, at + 8);
    if (kind > 1) return Bad(absl::StrCat("arena ", i, " has unknown kind ", kind));
    m.arenas[i].kind = static_cast<ArenaKind>(kind);
  }
  m.tensors.resize(num_tensors);
  absl::flat_hash_set<absl::string_view> names;
  names.reserve(num_tensors);
  for (uint32_t i = 0; i < num_tensors; ++i) {
    const size_t at = tensors_off + i * kManifestTensorEntrySize;
    ManifestTensor& t = m.tensors[i];
    const uint32_t name_off = Get<uint32_t>(in, at), name_len = Get<uint32_t>(in, at + 4);
    if (name_len == 0 || !InBounds(name_off, name_len, strings.size())) {
      return Bad(absl::StrCat("tensor ", i, ": name (offset ", name_off, ", length ", name_len,
                              ") is empty or outside the string table of ", strings.size(),
                              " bytes"));
    }
    const absl::string_view name = strings.substr(name_off, name_len);
    if (name.find('\0') != absl::string_view::npos) {
      return Bad(absl::StrCat("tensor ", i, ": name contains a NUL byte"));
    }
    if (!names.insert(name).second) {
      return Bad(absl::StrCat("tensor ", i, ": duplicate name '", name, "'"));
    }
    t.name = std::string(name);
    const uint8_t dtype = Get<uint8_t>(in, at + 8);
    if (dtype >= kNumDTypes) {
      return Bad(absl::StrCat("tensor '", name, "': unknown dtype code ", dtype));
    }
    t.dtype = static_cast<DType>(dtype);
    const uint8_t ndim = Get<uint8_t>(in, at + 9);
    if (ndim > kMaxDims) {
      return Bad(absl::StrCat("tensor '", name, "': ndim ", ndim, " > ", kMaxDims));
    }
    t.arena = Get<uint32_t>(in, at + 12);
    t.offset = Get<uint64_t>(in, at + 16);
    t.nbytes = Get<uint64_t>(in, at + 24);
    t.crc32c = Get<uint32_t>(in, at + 32);
    if (t.arena >= num_arenas) {
      return Bad(
          absl::StrCat("tensor '", name, "': arena ", t.arena, " >= ", num_arenas, " arenas"));
    }
    if (!InBounds(t.offset, t.nbytes, m.arenas[t.arena].size)) {
      return Bad(absl::StrCat("tensor '", name, "': bytes [", t.offset, ", +", t.nbytes,
                              ") exceed arena ", t.arena, " of ", m.arenas[t.arena].size,
                              " bytes"));
    }
    t.shape.resize(ndim);
    t.strides.resize(ndim);
    uint64_t numel = 1, max_index = 0;
    bool empty = false;
    for (int d = 0; d < ndim; ++d) {
      t.shape[d] = Get<int64_t>(in, at + 40 + 8 * d);
      t.strides[d] = Get<int64_t>(in, at + 96 + 8 * d);
      if (t.shape[d] < 0 || t.strides[d] < 0) {
        return Bad(absl::StrCat("tensor '", name, "': negative shape or stride in dim ", d));
      }
      if (t.shape[d] == 0) empty = true;
      uint64_t span;
      if (MulOverflow(numel, static_cast<uint64_t>(t.shape[d]), &numel) ||
          (t.shape[d] > 0 && (MulOverflow(static_cast<uint64_t>(t.shape[d] - 1),
                                          static_cast<uint64_t>(t.strides[d]), &span) ||
                              AddOverflow(max_index, span, &max_index)))) {
        return Bad(absl::StrCat("tensor '", name, "': shape/strides overflow 64 bits"));
      }
    }
    const uint64_t esize = static_cast<uint64_t>(DTypeSize(t.dtype));
    uint64_t need = 0;
    if (!empty && (AddOverflow(max_index, 1, &need) || MulOverflow(need, esize, &need))) {
      return Bad(absl::StrCat("tensor '", name, "': extent overflows 64 bits"));
    }
    if (need > t.nbytes) {
      return Bad(absl::StrCat("tensor '", name, "': shape and strides reach ", need,
                              " bytes but nbytes is ", t.nbytes));
    }
    uint64_t dense;
    if (MulOverflow(numel, esize, &dense) || dense > t.nbytes) {
      return Bad(absl::StrCat("tensor '", name, "': ", numel, " elements of ", esize,
                              " bytes exceed nbytes ", t.nbytes));
    }
  }
  return m;
}

}  // namespace weightd
