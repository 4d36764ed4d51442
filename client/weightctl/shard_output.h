// The output of `weightctl shard`: vLLM's sharded-state layout, DIR/model-rank-{r}-part-0
// .safetensors plus the checkpoint's config and tokenizer files, written all or nothing.
//
//   LoadProgress progress;   // progress.cancel stops the run (a signal handler may set it)
//   ShardStats stats;
//   WD_RETURN_IF_ERROR(WriteShardedCheckpoint(ckpt, plan, "/models/x-tp4", {.threads = 2},
//                                             &progress, &stats));
//
// The tensor bytes go through the daemon's read pipeline (ExecutePlanToFiles in executor.h:
// the same units, reads, row windows, casts and checks as a load), into rank files whose
// safetensors header is written first and whose size is set (ftruncate) up front after a check
// of the filesystem's free space, so that a disk too small fails at once and vocab padding reads
// as zeros. Every file
// is written under a temporary name and renamed into place only once all of them are complete
// and fsynced (StagedFiles): a failed or cancelled run removes what it wrote and leaves DIR as it
// found it (a directory the run created is removed again). Peak memory is the pipeline's
// (threads x chunk_bytes), whatever the model size.
//
// Errors name the file and offset with the errno text (ENOSPC, EFBIG under RLIMIT_FSIZE), or the
// reader's; CANCELLED once progress->cancel is set. Not thread-safe: one run at a time.
#ifndef WEIGHTD_CLIENT_WEIGHTCTL_SHARD_OUTPUT_H_
#define WEIGHTD_CLIENT_WEIGHTCTL_SHARD_OUTPUT_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "weightd/checkpoint.h"
#include "weightd/executor.h"
#include "weightd/plan.h"

namespace weightd::cli {

struct ShardStats {
  uint64_t read = 0;     // checkpoint tensor bytes read
  uint64_t written = 0;  // tensor bytes written (zero-fills excluded)
};

absl::Status WriteShardedCheckpoint(const Checkpoint& ckpt, const Plan& plan,
                                    const std::string& out_dir, const ExecutorOptions& options,
                                    LoadProgress* progress, ShardStats* stats);

}  // namespace weightd::cli

#endif  // WEIGHTD_CLIENT_WEIGHTCTL_SHARD_OUTPUT_H_
