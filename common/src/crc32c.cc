#include "weightd/crc32c.h"

#include <array>
#include <cstring>

#if defined(__x86_64__)
#include <nmmintrin.h>
#endif

namespace weightd {
namespace {

constexpr uint32_t kPoly = 0x82F63B78u;  // reflected Castagnoli polynomial

constexpr std::array<uint32_t, 256> MakeTable() {
  std::array<uint32_t, 256> t{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ kPoly : c >> 1;
    t[i] = c;
  }
  return t;
}
constexpr std::array<uint32_t, 256> kTable = MakeTable();

uint32_t ExtendTable(uint32_t crc, const unsigned char* p, size_t n) {
  uint32_t c = ~crc;
  for (size_t i = 0; i < n; ++i) c = kTable[(c ^ p[i]) & 0xFF] ^ (c >> 8);
  return ~c;
}

#if defined(__x86_64__)
// Bytes per stream and round of the three-stream loop below.
constexpr size_t kStripe = 4096;

// The linear map "append kStripe zero bytes" on a raw (non-inverted) CRC state, as four byte
// tables: raw(s, A || B) = ShiftStripe(raw(s, A)) ^ raw(0, B) when |B| = kStripe.
struct StripeShift {
  uint32_t t[4][256];
  StripeShift() {
    uint32_t basis[32];
    for (int i = 0; i < 32; ++i) {
      uint32_t v = 1u << i;
      for (size_t k = 0; k < kStripe; ++k) v = kTable[v & 0xFF] ^ (v >> 8);
      basis[i] = v;
    }
    for (int k = 0; k < 4; ++k) {
      for (int b = 0; b < 256; ++b) {
        uint32_t v = 0;
        for (int j = 0; j < 8; ++j) {
          if (b & (1 << j)) v ^= basis[8 * k + j];
        }
        t[k][b] = v;
      }
    }
  }
  uint32_t operator()(uint32_t c) const {
    return t[0][c & 0xFF] ^ t[1][(c >> 8) & 0xFF] ^ t[2][(c >> 16) & 0xFF] ^ t[3][c >> 24];
  }
};

__attribute__((target("sse4.2"))) uint32_t ExtendSse42(uint32_t crc, const unsigned char* p,
                                                       size_t n) {
  uint64_t c = ~crc;
  while (n > 0 && (reinterpret_cast<uintptr_t>(p) & 7) != 0) {
    c = _mm_crc32_u8(static_cast<uint32_t>(c), *p++);
    --n;
  }
  // Three independent streams hide the crc32 instruction's 3-cycle latency (about 3x the
  // single-stream throughput); their states are joined with the stripe shift.
  if (n >= 3 * kStripe) {
    static const StripeShift shift;
    while (n >= 3 * kStripe) {
      uint64_t c1 = 0, c2 = 0;
      for (size_t i = 0; i < kStripe; i += 8) {
        uint64_t a, b, d;
        std::memcpy(&a, p + i, 8);
        std::memcpy(&b, p + kStripe + i, 8);
        std::memcpy(&d, p + 2 * kStripe + i, 8);
        c = _mm_crc32_u64(c, a);
        c1 = _mm_crc32_u64(c1, b);
        c2 = _mm_crc32_u64(c2, d);
      }
      c = shift(shift(static_cast<uint32_t>(c)) ^ static_cast<uint32_t>(c1)) ^
          static_cast<uint32_t>(c2);
      p += 3 * kStripe;
      n -= 3 * kStripe;
    }
  }
  while (n >= 8) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    c = _mm_crc32_u64(c, v);
    p += 8;
    n -= 8;
  }
  while (n > 0) {
    c = _mm_crc32_u8(static_cast<uint32_t>(c), *p++);
    --n;
  }
  return ~static_cast<uint32_t>(c);
}
#endif

// 32x32 matrices over GF(2), as the images of the 32 basis vectors (zlib's crc32_combine).
uint32_t MatrixTimes(const uint32_t* m, uint32_t v) {
  uint32_t out = 0;
  for (int i = 0; v != 0; ++i, v >>= 1) {
    if (v & 1) out ^= m[i];
  }
  return out;
}

void MatrixSquare(uint32_t* out, const uint32_t* m) {
  for (int i = 0; i < 32; ++i) out[i] = MatrixTimes(m, m[i]);
}

}  // namespace

uint32_t Crc32cCombine(uint32_t crc_a, uint32_t crc_b, uint64_t len_b) noexcept {
  // crc(A || B) = Z(crc_a) ^ crc_b, where Z appends len_b zero bytes to a raw CRC state (the
  // pre- and post-inversions cancel out). Z is built from the one-zero-byte operator by
  // repeated squaring.
  uint32_t op[32], sq[32];
  for (int i = 0; i < 32; ++i) {
    const uint32_t v = 1u << i;
    op[i] = kTable[v & 0xFF] ^ (v >> 8);
  }
  uint32_t v = crc_a;
  while (len_b != 0) {
    if (len_b & 1) v = MatrixTimes(op, v);
    len_b >>= 1;
    if (len_b == 0) break;
    MatrixSquare(sq, op);
    std::memcpy(op, sq, sizeof(op));
  }
  return v ^ crc_b;
}

uint32_t Crc32cExtend(uint32_t crc, const void* data, size_t n) noexcept {
  const auto* p = static_cast<const unsigned char*>(data);
#if defined(__x86_64__)
  static const bool has_sse42 = __builtin_cpu_supports("sse4.2");
  if (has_sse42) return ExtendSse42(crc, p, n);
#endif
  return ExtendTable(crc, p, n);
}

}  // namespace weightd
