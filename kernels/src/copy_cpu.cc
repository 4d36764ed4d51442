// Host execution of plan pieces (see copy.h and the piece semantics in plan.h).
#include <algorithm>
#include <cstring>

#include "weightd/kernels/convert.h"
#include "weightd/kernels/copy.h"

namespace weightd::kernels {

void PieceSourceRowRange(const PlanPiece& p, int64_t* first, int64_t* end) noexcept {
  const int64_t s1 = p.src_shape[1];
  *first = p.src_start[0] * s1 + p.src_start[1];
  *end = (p.src_start[0] + p.extent[0] - 1) * s1 + p.src_start[1] + p.extent[1];
}

void CopyPieceRowsHost(const PlanPiece& p, DType src_dtype, DType dst_dtype,
                       const std::byte* src_rows, int64_t row_begin, int64_t row_end,
                       std::byte* dst_target) {
  const int64_t ss = DTypeSize(src_dtype);
  const int64_t ds = DTypeSize(dst_dtype);
  const int64_t src_row_bytes = p.src_shape[2] * ss;
  const int64_t n = p.extent[2];
  for (int64_t i = 0; i < p.extent[0]; ++i) {
    const int64_t plane_row0 = (p.src_start[0] + i) * p.src_shape[1] + p.src_start[1];
    // Clip the piece's rows of this plane to the window the caller holds.
    const int64_t j_begin = std::max<int64_t>(0, row_begin - plane_row0);
    const int64_t j_end = std::min<int64_t>(p.extent[1], row_end - plane_row0);
    for (int64_t j = j_begin; j < j_end; ++j) {
      const std::byte* s =
          src_rows + (plane_row0 + j - row_begin) * src_row_bytes + p.src_start[2] * ss;
      const int64_t d_elem =
          ((p.dst_start[0] + i) * p.dst_shape[1] + p.dst_start[1] + j) * p.dst_shape[2] +
          p.dst_start[2];
      ConvertHost(src_dtype, s, dst_dtype, dst_target + d_elem * ds, n);
    }
  }
}

void ZeroFillHost(const PlanZeroFill& fill, std::byte* target_base) noexcept {
  std::memset(target_base + fill.offset, 0, fill.nbytes);
}

}  // namespace weightd::kernels
