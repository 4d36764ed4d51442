// Manifest: what a client needs to turn a rank's arena fds into tensors.
//
//   Manifest m;  m.model = "llama"; m.rank = 0; m.device = -1;
//   m.arenas.push_back({.size = 1 << 20, .kind = ArenaKind::kHostMemfd});
//   m.tensors.push_back({.name = "w", .dtype = DType::kBF16, .shape = {16, 8}, .strides = {8, 1},
//                        .arena = 0, .offset = 0, .nbytes = 256, .crc32c = c});
//   std::string bytes = EncodeManifest(m);
//   WD_ASSIGN_OR_RETURN(Manifest back, DecodeManifest(bytes));   // validates everything
//
// The daemon sends the encoded manifest to an attaching client in a sealed memfd. The binary
// format (version 1, all integers little-endian, documented in docs/PROTOCOL.md):
//
//   header, 80 bytes:
//     0  u8[8] magic "WDMANIF\0"      8 u32 version (1)          12 u32 header_size (80)
//     16 u64 total_size               24 u32 num_arenas          28 u32 num_tensors
//     32 u32 rank                     36 i32 device (-1 = host)
//     40 u64 arenas_offset            48 u64 tensors_offset
//     56 u64 strings_offset           64 u64 strings_size
//     72 u32 model_name_offset        76 u32 model_name_len     (into the string table)
//   arena entry, 16 bytes:  u64 size, u32 kind (0 host memfd, 1 cuda vmm), u32 reserved (0)
//   tensor entry, 160 bytes:
//     0 u32 name_offset  4 u32 name_len  8 u8 dtype  9 u8 ndim  10 u16 reserved  12 u32 arena
//     16 u64 offset (bytes, in the arena)  24 u64 nbytes  32 u32 crc32c  36 u32 reserved
//     40 i64 shape[7]  96 i64 strides[7] (elements; entries >= ndim are 0)  152 u64 reserved
//   string table: the bytes of the names, not NUL-terminated.
//
// DecodeManifest trusts nothing: every offset, length and count is bounds-checked with overflow
// checks, names are non-empty, free of NUL and unique, dtypes known, ndim <= kMaxDims, the
// strided extent of every tensor fits in nbytes, and [offset, offset + nbytes) fits in its
// arena. A client that maps arenas must also check each arena's size against its fd (fstat).
//
// Thread-safety: plain values and pure functions.
#ifndef WEIGHTD_MANIFEST_H_
#define WEIGHTD_MANIFEST_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "weightd/dtype.h"

namespace weightd {

inline constexpr uint32_t kManifestVersion = 1;
inline constexpr int kMaxDims = 7;
inline constexpr uint64_t kManifestHeaderSize = 80;
inline constexpr uint64_t kManifestArenaEntrySize = 16;
inline constexpr uint64_t kManifestTensorEntrySize = 160;
// A manifest larger than this is refused (1 GiB; 100,000 tensors take about 20 MB).
inline constexpr uint64_t kMaxManifestBytes = 1ull << 30;

enum class ArenaKind : uint32_t { kHostMemfd = 0, kCudaVmm = 1 };

struct ManifestArena {
  uint64_t size = 0;  // bytes
  ArenaKind kind = ArenaKind::kHostMemfd;
};

struct ManifestTensor {
  std::string name;
  DType dtype = DType::kU8;
  std::vector<int64_t> shape;    // elements per dim
  std::vector<int64_t> strides;  // elements, same length as shape
  uint32_t arena = 0;            // index into Manifest::arenas
  uint64_t offset = 0;           // bytes from the arena's start
  uint64_t nbytes = 0;
  uint32_t crc32c = 0;  // of the tensor's nbytes bytes as stored in the arena
};

struct Manifest {
  std::string model;
  uint32_t rank = 0;
  int32_t device = -1;  // CUDA device ordinal; -1 for host memory
  std::vector<ManifestArena> arenas;
  std::vector<ManifestTensor> tensors;
};

// Row-major (contiguous) strides for `shape`, in elements.
std::vector<int64_t> ContiguousStrides(const std::vector<int64_t>& shape);

// Encodes `m`. The caller guarantees it is valid (the daemon builds it from a plan); an invalid
// manifest encodes but fails DecodeManifest.
std::string EncodeManifest(const Manifest& m);

// Decodes and fully validates. Errors are INVALID_ARGUMENT (or FAILED_PRECONDITION for a
// version this build does not know) naming the field, the tensor index and the values at fault.
absl::StatusOr<Manifest> DecodeManifest(absl::string_view bytes);

}  // namespace weightd

#endif  // WEIGHTD_MANIFEST_H_
