// CRC32C (Castagnoli), the checksum of every tensor in a manifest.
//
//   uint32_t c = Crc32c(bytes.data(), bytes.size());
//   uint32_t c2 = Crc32cExtend(Crc32cExtend(0, a, na), b, nb);   // == Crc32c of a||b
//   uint32_t c3 = Crc32cCombine(Crc32c(a, na), Crc32c(b, nb), nb);  // == c2
//
// Uses the SSE4.2 crc32 instruction when the CPU has it (about 10-20 GB/s per core), else a
// table. Pure functions; thread-safe.
#ifndef WEIGHTD_CRC32C_H_
#define WEIGHTD_CRC32C_H_

#include <cstddef>
#include <cstdint>

namespace weightd {

// Extends `crc` (the CRC32C of earlier bytes, 0 for none) with `n` bytes at `data`.
uint32_t Crc32cExtend(uint32_t crc, const void* data, size_t n) noexcept;

inline uint32_t Crc32c(const void* data, size_t n) noexcept { return Crc32cExtend(0, data, n); }

// The CRC32C of A || B from crc_a = Crc32c(A), crc_b = Crc32c(B) and len_b = |B|, without the
// bytes (O(log len_b)), so pieces checksummed on different threads can be joined.
uint32_t Crc32cCombine(uint32_t crc_a, uint32_t crc_b, uint64_t len_b) noexcept;

}  // namespace weightd

#endif  // WEIGHTD_CRC32C_H_
