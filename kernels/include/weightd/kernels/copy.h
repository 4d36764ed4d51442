// Host executors of plan pieces: the one copy primitive that `weightctl shard` and the daemon's
// host backend share, so both produce the same bytes (see plan.h for the piece semantics).
//
//   // Whole source tensor in memory at `src`, target tensor at `dst`:
//   CopyPieceRowsHost(piece, src_dtype, dst_dtype, src, 0, piece.src_shape[0] * piece.src_shape[1],
//                     dst);
//   // Streaming: rows [a, b) of the source were just read into `buf`:
//   CopyPieceRowsHost(piece, src_dtype, dst_dtype, buf, a, b, dst);
//
// A source tensor is viewed as R = src_shape[0] * src_shape[1] rows of src_shape[2] elements
// (row (i, j) is row i * src_shape[1] + j). Thread-safe: no shared state; concurrent calls may
// write distinct pieces of one target (pieces of a rank never overlap in the destination).
#ifndef WEIGHTD_KERNELS_COPY_H_
#define WEIGHTD_KERNELS_COPY_H_

#include <cstddef>
#include <cstdint>

#include "weightd/dtype.h"
#include "weightd/plan.h"

namespace weightd::kernels {

// Copies, converting src_dtype -> dst_dtype (ConvertHost semantics), every element of `piece`
// whose source row lies in [row_begin, row_end). `src_rows` points at the first byte of source
// row `row_begin` (rows are contiguous up to row_end); `dst_target` at the first byte of the
// target tensor. Rows outside the piece are ignored, so a caller may pass any row window.
// Preconditions: kernels::IsConvertible(src_dtype, dst_dtype); the piece is valid for the
// shapes (BuildPlan and PlanFromJson guarantee it).
void CopyPieceRowsHost(const PlanPiece& piece, DType src_dtype, DType dst_dtype,
                       const std::byte* src_rows, int64_t row_begin, int64_t row_end,
                       std::byte* dst_target);

// Applies a zero-fill: `target_base` is the first byte of the zero-fill's target.
void ZeroFillHost(const PlanZeroFill& fill, std::byte* target_base) noexcept;

// Number of source rows of a piece's source view (src_shape[0] * src_shape[1]).
inline int64_t SourceRows(const PlanPiece& p) { return p.src_shape[0] * p.src_shape[1]; }

// The source rows a piece reads, as [first, last + 1); a piece with ext0 > 1 reads a strided
// subset of this range.
void PieceSourceRowRange(const PlanPiece& p, int64_t* first, int64_t* end) noexcept;

}  // namespace weightd::kernels

#endif  // WEIGHTD_KERNELS_COPY_H_
