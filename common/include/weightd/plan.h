// Plan: the complete, deterministic description of how a checkpoint becomes per-rank arenas.
//
// A plan is pure data. For each rank it lists the target tensors (what the engine holds), the
// pieces that fill them from checkpoint tensors, the zero-fills (vocab padding) and the
// post-load transforms. Executors (`weightctl shard`, the daemon's host and CUDA backends)
// follow it without consulting the recipe or config again, so a plan can be stored, re-run for
// a refit or a restart, and compared.
//
//   WD_ASSIGN_OR_RETURN(Checkpoint ckpt, Checkpoint::Open(dir));
//   PlanOptions opts; opts.tp = 4;
//   WD_ASSIGN_OR_RETURN(Plan plan, BuildPlan(ckpt, opts));
//   for (const RankPlan& r : plan.ranks) for (const PlanPiece& p : r.pieces) ...
//
// Semantics of a piece (every executor must implement exactly this):
//   Source tensor S (dtype plan.sources[p.source].dtype) is viewed as a row-major 3-d array of
//   shape p.src_shape (leading dims collapsed; unused leading dims are 1). Target tensor D
//   (dtype targets[p.target].dtype) is viewed likewise with shape p.dst_shape. For every index
//   (i, j, k) < p.extent:
//     D[p.dst_start + (i, j, k)] = Convert<S.dtype -> D.dtype>(S[p.src_start + (i, j, k)])
//   Convert is the identity when the dtypes match, else round-to-nearest-even as torch's copy_
//   (NaN stays NaN, Inf stays Inf, fp32 -> fp16 overflow gives +-Inf).
//   Pieces of one rank never overlap in the destination; together with the zero-fills they
//   cover every byte of every target exactly once. Bytes of the arena outside targets (alignment
//   padding) are zero.
//
// Thread-safety: plain value types; BuildPlan and the JSON functions are thread-safe.
#ifndef WEIGHTD_PLAN_H_
#define WEIGHTD_PLAN_H_

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "weightd/checkpoint.h"
#include "weightd/dtype.h"
#include "weightd/file_util.h"

namespace weightd {

// Byte alignment of every target inside a rank's arena.
inline constexpr uint64_t kTargetAlignment = 256;

enum class ParallelStyle : uint8_t {
  kReplicated,    // whole tensor on every rank
  kColumn,        // dim 0 split in T equal parts
  kRow,           // dim 1 split (weights); 1-d bias replicated
  kQkv,           // q/k/v fused with GQA head arithmetic
  kMergedColumn,  // gate/up fused, each split along dim 0
  kVocab,         // dim 0 padded to a multiple of 64, split, tail rows zero
  kMoeW13,        // experts' gate/up fused into [E, 2*Ie/T, H]
  kMoeW2,         // experts' down fused into [E, H, Ie/T]
};

absl::string_view ParallelStyleName(ParallelStyle s);

// One checkpoint tensor that the plan reads (a copy of its location, so the plan stands alone).
struct PlanSource {
  std::string name;
  DType dtype = DType::kU8;
  std::vector<int64_t> shape;
  uint32_t file = 0;    // index into Plan::files
  uint64_t offset = 0;  // absolute byte offset in the file
  uint64_t nbytes = 0;
};

struct PlanTarget {
  std::string name;  // the engine's parameter name, e.g. "model.layers.0.self_attn.qkv_proj.weight"
  DType dtype = DType::kU8;
  std::vector<int64_t> shape;
  uint64_t offset = 0;  // byte offset in the rank's arena, a multiple of kTargetAlignment
  uint64_t nbytes = 0;
  ParallelStyle style = ParallelStyle::kReplicated;
};

using Index3 = std::array<int64_t, 3>;

struct PlanPiece {
  uint32_t source = 0;  // index into Plan::sources
  uint32_t target = 0;  // index into RankPlan::targets
  Index3 src_shape{1, 1, 1};
  Index3 src_start{0, 0, 0};
  Index3 dst_shape{1, 1, 1};
  Index3 dst_start{0, 0, 0};
  Index3 extent{1, 1, 1};  // elements per dim
};

// Bytes [offset, offset + nbytes) of a target that are set to zero (vocab padding rows).
struct PlanZeroFill {
  uint32_t target = 0;
  uint64_t offset = 0;  // relative to the target's start
  uint64_t nbytes = 0;
};

// A post-load transform applied to a whole target. Today only dtype casts exist; they are
// performed while pieces are copied (see the piece semantics) and are listed so that executors
// and people can see which targets change dtype.
struct PlanTransform {
  enum class Kind : uint8_t { kCast };
  Kind kind = Kind::kCast;
  uint32_t target = 0;
  DType from = DType::kU8;
  DType to = DType::kU8;
};

struct RankPlan {
  int rank = 0;
  std::vector<PlanTarget> targets;  // sorted by name; offsets increase in this order
  std::vector<PlanPiece> pieces;    // ordered by (source file, source offset) for streaming reads
  std::vector<PlanZeroFill> zero_fills;
  std::vector<PlanTransform> transforms;
  uint64_t arena_bytes = 0;  // end of the last target, rounded up to kTargetAlignment
};

struct PlanFile {
  std::string path;
  uint64_t file_size = 0;
  uint64_t read_bytes = 0;  // bytes of this file the plan reads, each counted once for all ranks
  // The checkpoint's record of the file (not in the plan's JSON); the executors refuse a file
  // that no longer matches it. Unset (nullopt) in plans read back from JSON.
  std::optional<FileIdentity> identity;
};

struct Plan {
  std::string checkpoint;  // the directory or file the plan was made from
  std::string recipe;      // recipe name, e.g. "llama"
  std::string architecture;
  int tp = 1;
  bool expert_parallel = false;
  std::vector<PlanFile> files;
  std::vector<PlanSource> sources;  // sorted by (file, offset)
  std::vector<RankPlan> ranks;      // all ranks, or only the requested one
  uint64_t checkpoint_bytes = 0;    // all tensor bytes in the checkpoint
  uint64_t read_bytes = 0;          // sum of files[].read_bytes
};

struct PlanOptions {
  int tp = 1;
  std::optional<int> rank;     // plan only this rank
  std::optional<DType> dtype;  // target dtype for floating-point tensors; nullopt = checkpoint's
  bool expert_parallel = false;
  std::vector<std::string> skip_substrings;  // extra skip rules (--skip)
  std::optional<std::string> recipe_file;    // --recipe FILE: extends or overrides a recipe
  std::optional<std::string> recipe_name;    // force a recipe instead of choosing from config
};

// Builds the plan. Errors name the tensor, rule or config field at fault (see issue text and
// docs/RECIPES.md).
absl::StatusOr<Plan> BuildPlan(const Checkpoint& ckpt, const PlanOptions& options);

// Deterministic JSON form (stable key order, no whitespace differences between runs). JSON
// carries UTF-8 text only: a path or name in the plan that is not UTF-8 (a checkpoint directory
// named in another encoding) is an INVALID_ARGUMENT error naming the bad byte.
absl::StatusOr<std::string> PlanToJson(const Plan& plan);
absl::StatusOr<Plan> PlanFromJson(absl::string_view json);

}  // namespace weightd

#endif  // WEIGHTD_PLAN_H_
