// WriteShardedCheckpoint (shard_output.h).
#include "weightctl/shard_output.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "weightctl/staged_files.h"
#include "weightd/file_util.h"
#include "weightd/status_macros.h"
#include "weightd/unique_fd.h"

namespace weightd::cli {
namespace {

// Files copied beside the shards so the output directory loads as a model on its own.
constexpr const char* kSideFiles[] = {"config.json",
                                      "generation_config.json",
                                      "tokenizer.json",
                                      "tokenizer_config.json",
                                      "tokenizer.model",
                                      "special_tokens_map.json",
                                      "vocab.json",
                                      "merges.txt",
                                      "added_tokens.json",
                                      "chat_template.jinja",
                                      "preprocessor_config.json"};

absl::Status CheckCancel(const LoadProgress& progress) {
  if (!progress.cancel.load()) return absl::OkStatus();
  return absl::CancelledError("shard run cancelled");
}

// Checks that the filesystem of `fd` has room for `needed` bytes (this file and the ones staged
// before it, which are sparse until written), so that a disk too small for the output fails
// here, in milliseconds, instead of after most of the data has been written. The blocks are not
// reserved with fallocate: buffered writes into ext4's unwritten extents cost 2-3x the time of
// the whole run on the development VM (3.3-4.4 s against 1.1-1.9 s for 2.5 GB). A disk that
// fills up meanwhile still fails the writes with ENOSPC, and the run rolls back.
absl::Status CheckFreeSpace(int fd, uint64_t needed, const std::string& path) {
  struct statvfs st = {};
  if (fstatvfs(fd, &st) != 0) return absl::OkStatus();  // unknown: the writes will tell
  const uint64_t free_bytes = static_cast<uint64_t>(st.f_bavail) * st.f_frsize;
  if (needed <= free_bytes) return absl::OkStatus();
  return absl::ResourceExhaustedError(absl::StrCat("writing ", path, ": the output needs ", needed,
                                                   " bytes but its filesystem has ", free_bytes,
                                                   " bytes free (No space left on device)"));
}

struct OutFile {
  std::string path;                     // the temporary being written, named in errors
  int fd = -1;                          // owned by the StagedFiles
  std::vector<uint64_t> target_offset;  // absolute file offset of each target's data
  uint64_t size = 0;
};

// Stages `name`, writes the safetensors header (targets in plan order, data packed densely) and
// sizes the file.
absl::StatusOr<OutFile> CreateOutput(StagedFiles& staged, const std::string& name,
                                     const RankPlan& r, uint64_t* needed) {
  nlohmann::ordered_json h;
  h["__metadata__"] = {{"format", "pt"}};
  uint64_t off = 0;
  for (const PlanTarget& t : r.targets) {
    h[t.name] = {{"dtype", std::string(DTypeName(t.dtype))},
                 {"shape", t.shape},
                 {"data_offsets", {off, off + t.nbytes}}};
    off += t.nbytes;
  }
  std::string header;
  try {
    header = h.dump();
  } catch (const nlohmann::json::exception& e) {
    // dump() throws on a string that is not UTF-8; plan targets are checked names, but the
    // writer's exception must not escape a command either way.
    return absl::InvalidArgumentError(
        absl::StrCat("writing the safetensors header of ", name, ": ", e.what()));
  }
  // The data section must start 8-byte aligned, as the safetensors writer pads it.
  header.append((8 - header.size() % 8) % 8, ' ');
  WD_ASSIGN_OR_RETURN(const StagedFile* staged_file, staged.Create(name));
  OutFile out;
  out.path = staged_file->temp_path;
  out.fd = staged_file->fd;
  const std::string& path = out.path;
  const int fd = out.fd;
  const uint64_t data_start = 8 + header.size();
  out.size = data_start + off;
  *needed += out.size;
  WD_RETURN_IF_ERROR(CheckFreeSpace(fd, *needed, path));
  WD_SYSCALL_OR_RETURN(ftruncate(fd, static_cast<off_t>(out.size)),
                       absl::StrCat("sizing ", path, " to ", out.size, " bytes"));
  unsigned char len[8];
  for (int i = 0; i < 8; ++i)
    len[i] = static_cast<unsigned char>((header.size() >> (8 * i)) & 0xFF);
  WD_RETURN_IF_ERROR(PwriteExact(fd, len, 8, 0, path));
  WD_RETURN_IF_ERROR(PwriteExact(fd, header.data(), header.size(), 8, path));
  uint64_t o = data_start;
  for (const PlanTarget& t : r.targets) {
    out.target_offset.push_back(o);
    o += t.nbytes;
  }
  return out;
}

// Copies `from`, if it exists, into a staged file `name` with the same permission bits.
absl::Status CopySideFile(const std::string& from, const std::string& name, StagedFiles& staged,
                          const LoadProgress& progress) {
  struct stat st = {};
  if (stat(from.c_str(), &st) != 0) {
    if (errno == ENOENT) return absl::OkStatus();
    return ErrnoError(errno, absl::StrCat("stat of ", from));
  }
  WD_ASSIGN_OR_RETURN(UniqueFd in, OpenRegularFile(from));
  WD_ASSIGN_OR_RETURN(const StagedFile* out, staged.Create(name));
  WD_SYSCALL_OR_RETURN(fchmod(out->fd, st.st_mode & 07777),
                       absl::StrCat("setting the mode of ", out->temp_path));
  std::vector<char> buf(1 << 20);
  uint64_t off = 0;
  for (;;) {
    WD_RETURN_IF_ERROR(CheckCancel(progress));
    const ssize_t n = read(in.get(), buf.data(), buf.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoError(errno, absl::StrCat("reading ", from, " at offset ", off));
    }
    if (n == 0) return absl::OkStatus();
    WD_RETURN_IF_ERROR(
        PwriteExact(out->fd, buf.data(), static_cast<uint64_t>(n), off, out->temp_path));
    off += static_cast<uint64_t>(n);
  }
}

// Writes every output file into `staged`; the caller commits or rolls back.
absl::Status WriteOutputs(const Checkpoint& ckpt, const Plan& plan, StagedFiles& staged,
                          const ExecutorOptions& options, LoadProgress* progress,
                          ShardStats* stats) {
  // The small side files first: a disk that cannot hold them fails before the long part.
  for (const char* name : kSideFiles) {
    WD_RETURN_IF_ERROR(
        CopySideFile((std::filesystem::path(ckpt.dir()) / name).string(), name, staged, *progress));
  }
  std::vector<OutputFile> outs;
  uint64_t needed = 0;
  for (const RankPlan& r : plan.ranks) {
    WD_ASSIGN_OR_RETURN(
        OutFile f, CreateOutput(staged, absl::StrCat("model-rank-", r.rank, "-part-0.safetensors"),
                                r, &needed));
    outs.push_back({.fd = f.fd, .path = f.path, .target_offset = std::move(f.target_offset)});
  }
  absl::Status s = ExecutePlanToFiles(plan, outs, options, progress, &stats->written);
  stats->read = progress->bytes_pread.load() + progress->bytes_uring.load();
  WD_RETURN_IF_ERROR(s);
  return CheckCancel(*progress);
}

}  // namespace

absl::Status WriteShardedCheckpoint(const Checkpoint& ckpt, const Plan& plan,
                                    const std::string& out_dir, const ExecutorOptions& options,
                                    LoadProgress* progress, ShardStats* stats) {
  std::error_code ec;
  const bool created_dir = std::filesystem::create_directories(out_dir, ec);
  if (ec) return absl::InternalError(absl::StrCat("creating ", out_dir, ": ", ec.message()));
  absl::Status s;
  {
    StagedFiles staged(out_dir);
    s = WriteOutputs(ckpt, plan, staged, options, progress, stats);
    if (s.ok()) {
      s = staged.Commit();
    } else if (absl::Status rollback = staged.Abort(); !rollback.ok()) {
      s = absl::Status(s.code(), absl::StrCat(s.message(), "; ", rollback.message()));
    }
  }
  // A directory this run created goes too; it is empty after a rollback, and rmdir leaves it
  // alone otherwise (another writer's file).
  if (!s.ok() && created_dir) rmdir(out_dir.c_str());
  return s;
}

}  // namespace weightd::cli
