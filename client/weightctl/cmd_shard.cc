// weightctl shard CKPT --tp T --out DIR: executes a plan on the host and writes vLLM's
// sharded-state layout (DIR/model-rank-{r}-part-0.safetensors plus config and tokenizer files).
//
// Streaming design: sources are visited in (file, offset) order and read once, in chunks of
// whole rows no larger than kChunkBytes, for all ranks together. Every piece of every rank that
// uses the chunk is converted into a small staging buffer and written with pwrite straight to
// its place in the pre-sized output file, so memory stays at a few chunks whatever the model
// size. Output files are created with ftruncate, so vocab padding rows (the plan's zero-fills)
// and alignment gaps are already zero.
//
// All or nothing: every output file is written under a temporary name and renamed into place
// only once all of them are complete and fsynced (StagedFiles). A run that fails (a full disk,
// a bad source, SIGINT/SIGTERM/SIGHUP) removes what it wrote and leaves the directory as it
// found it, so no truncated or unwritten file with a valid header is left for a reader to map.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "weightd/args.h"
#include "weightctl/commands.h"
#include "weightctl/plan_args.h"
#include "weightctl/staged_files.h"
#include "weightd/checkpoint.h"
#include "weightd/file_util.h"
#include "weightd/kernels/convert.h"
#include "weightd/kernels/copy.h"
#include "weightd/plan.h"
#include "weightd/status_macros.h"
#include "weightd/unique_fd.h"

namespace weightd::cli {
namespace {

constexpr uint64_t kChunkBytes = 64ull << 20;

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

// The stop signal that arrived during a shard run (see StopSignalScope), 0 if none.
volatile std::sig_atomic_t g_stop_signal = 0;

void RecordStopSignal(int sig) { g_stop_signal = sig; }

// While it lives, SIGINT, SIGTERM and SIGHUP only set g_stop_signal; the copy loops poll it
// (CheckStop) so that an interrupted run unwinds through StagedFiles' rollback instead of
// leaving its temporaries behind. A signal the caller ignores (nohup) stays ignored. The
// previous actions come back on destruction. Process-wide state: one at a time.
class StopSignalScope {
 public:
  StopSignalScope() {
    struct sigaction sa = {};
    sa.sa_handler = RecordStopSignal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    for (size_t i = 0; i < std::size(kSignals); ++i) {
      sigaction(kSignals[i], nullptr, &old_[i]);
      if (old_[i].sa_handler != SIG_IGN) sigaction(kSignals[i], &sa, nullptr);
    }
  }
  StopSignalScope(const StopSignalScope&) = delete;
  StopSignalScope& operator=(const StopSignalScope&) = delete;
  ~StopSignalScope() {
    for (size_t i = 0; i < std::size(kSignals); ++i) sigaction(kSignals[i], &old_[i], nullptr);
  }

 private:
  static constexpr int kSignals[] = {SIGINT, SIGTERM, SIGHUP};
  struct sigaction old_[std::size(kSignals)] = {};
};

const char* SignalName(int sig) {
  switch (sig) {
    case SIGINT:
      return "SIGINT";
    case SIGTERM:
      return "SIGTERM";
    case SIGHUP:
      return "SIGHUP";
    default:
      return "a signal";
  }
}

absl::Status CheckStop() {
  if (g_stop_signal == 0) return absl::OkStatus();
  return absl::CancelledError(absl::StrCat("interrupted by ", SignalName(g_stop_signal)));
}

absl::Status PwriteAll(int fd, const void* buf, uint64_t len, uint64_t off,
                       const std::string& path) {
  const auto* p = static_cast<const char*>(buf);
  while (len > 0) {
    const ssize_t n = pwrite(fd, p, std::min<uint64_t>(len, 1ull << 30), static_cast<off_t>(off));
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoError(errno, absl::StrCat("writing ", path, " at offset ", off));
    }
    if (n == 0) {
      // Not expected of a regular file; without this the loop would spin.
      return absl::DataLossError(
          absl::StrCat("writing ", path, " at offset ", off, ": the write made no progress"));
    }
    p += n;
    len -= n;
    off += n;
  }
  return absl::OkStatus();
}

// Allocates the file's blocks up front, so that a disk too small for the output fails here, in
// milliseconds, instead of after most of the data has been written. Filesystems without
// fallocate skip this (the writes still report ENOSPC).
absl::Status Reserve(int fd, uint64_t size, const std::string& path) {
  if (size == 0) return absl::OkStatus();
  int rc;
  do {
    rc = fallocate(fd, 0, 0, static_cast<off_t>(size));
  } while (rc != 0 && errno == EINTR);
  if (rc == 0 || errno == EOPNOTSUPP || errno == ENOSYS) return absl::OkStatus();
  return ErrnoError(errno, absl::StrCat("reserving ", size, " bytes for ", path));
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
                                     const RankPlan& r) {
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
  WD_RETURN_IF_ERROR(Reserve(fd, out.size, path));
  WD_SYSCALL_OR_RETURN(ftruncate(fd, static_cast<off_t>(out.size)),
                       absl::StrCat("sizing ", path, " to ", out.size, " bytes"));
  unsigned char len[8];
  for (int i = 0; i < 8; ++i)
    len[i] = static_cast<unsigned char>((header.size() >> (8 * i)) & 0xFF);
  WD_RETURN_IF_ERROR(PwriteAll(fd, len, 8, 0, path));
  WD_RETURN_IF_ERROR(PwriteAll(fd, header.data(), header.size(), 8, path));
  uint64_t o = data_start;
  for (const PlanTarget& t : r.targets) {
    out.target_offset.push_back(o);
    o += t.nbytes;
  }
  return out;
}

struct Use {
  uint32_t rank_index;
  const PlanPiece* piece;
};

struct Stats {
  uint64_t read = 0;
  uint64_t written = 0;
};

// Applies the rows [a, b) of one source, held in `rows`, to one piece.
absl::Status ApplyChunk(const Plan& plan, const RankPlan& rp, OutFile& out, const PlanPiece& p,
                        const std::byte* rows, int64_t a, int64_t b,
                        std::vector<std::byte>& staging, Stats& stats) {
  const PlanSource& src = plan.sources[p.source];
  const PlanTarget& t = rp.targets[p.target];
  const int64_t ss = DTypeSize(src.dtype), ds = DTypeSize(t.dtype);
  for (int64_t i = 0; i < p.extent[0]; ++i) {
    const int64_t plane_row0 = (p.src_start[0] + i) * p.src_shape[1] + p.src_start[1];
    const int64_t ja = std::max<int64_t>(0, a - plane_row0);
    const int64_t jb = std::min<int64_t>(p.extent[1], b - plane_row0);
    if (jb <= ja) continue;
    const int64_t n = jb - ja;
    const int64_t d2 = p.dst_shape[2];
    const uint64_t dst_elem = ((p.dst_start[0] + i) * p.dst_shape[1] + p.dst_start[1] + ja) * d2;
    const uint64_t file_off = out.target_offset[p.target] + dst_elem * ds;
    const uint64_t span = static_cast<uint64_t>(n * d2 * ds);
    const bool full_rows = p.extent[2] == d2;
    if (full_rows && src.dtype == t.dtype && p.extent[2] == p.src_shape[2]) {
      // Whole rows on both sides, same dtype: the chunk's bytes are the output's bytes.
      const std::byte* s = rows + (plane_row0 + ja - a) * p.src_shape[2] * ss;
      WD_RETURN_IF_ERROR(PwriteAll(out.fd, s, span, file_off, out.path));
      stats.written += span;
      continue;
    }
    if (staging.size() < span) staging.resize(span);
    if (!full_rows) {
      // The piece fills only some columns of these rows: keep the others' bytes.
      WD_RETURN_IF_ERROR(PreadExact(out.fd, staging.data(), span, file_off, out.path));
    }
    PlanPiece sub = p;
    sub.src_start = {p.src_start[0] + i, p.src_start[1] + ja, p.src_start[2]};
    sub.extent = {1, n, p.extent[2]};
    sub.dst_shape = {1, n, d2};
    sub.dst_start = {0, 0, p.dst_start[2]};
    kernels::CopyPieceRowsHost(sub, src.dtype, t.dtype, rows, a, b, staging.data());
    WD_RETURN_IF_ERROR(PwriteAll(out.fd, staging.data(), span, file_off, out.path));
    stats.written += static_cast<uint64_t>(n * p.extent[2] * ds);
  }
  return absl::OkStatus();
}

// Copies `from`, if it exists, into a staged file `name` with the same permission bits.
absl::Status CopySideFile(const std::string& from, const std::string& name, StagedFiles& staged) {
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
    WD_RETURN_IF_ERROR(CheckStop());
    const ssize_t n = read(in.get(), buf.data(), buf.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoError(errno, absl::StrCat("reading ", from, " at offset ", off));
    }
    if (n == 0) return absl::OkStatus();
    WD_RETURN_IF_ERROR(
        PwriteAll(out->fd, buf.data(), static_cast<uint64_t>(n), off, out->temp_path));
    off += static_cast<uint64_t>(n);
  }
}

// Writes every output file into `staged`; the caller commits or rolls back.
absl::Status WriteOutputs(const Checkpoint& ckpt, const Plan& plan, StagedFiles& staged,
                          Stats& stats) {
  // The small side files first: a disk that cannot hold them fails before the long part.
  for (const char* name : kSideFiles) {
    WD_RETURN_IF_ERROR(
        CopySideFile((std::filesystem::path(ckpt.dir()) / name).string(), name, staged));
  }
  std::vector<OutFile> outs;
  for (const RankPlan& r : plan.ranks) {
    WD_ASSIGN_OR_RETURN(
        OutFile f,
        CreateOutput(staged, absl::StrCat("model-rank-", r.rank, "-part-0.safetensors"), r));
    outs.push_back(std::move(f));
  }
  std::vector<std::vector<Use>> uses(plan.sources.size());
  for (uint32_t ri = 0; ri < plan.ranks.size(); ++ri) {
    for (const PlanPiece& p : plan.ranks[ri].pieces) uses[p.source].push_back({ri, &p});
  }
  std::vector<std::byte> buf, staging;
  for (uint32_t s = 0; s < plan.sources.size(); ++s) {
    if (uses[s].empty()) continue;
    const PlanSource& src = plan.sources[s];
    const PlanPiece& first = *uses[s][0].piece;
    const uint64_t row_bytes = static_cast<uint64_t>(first.src_shape[2]) * DTypeSize(src.dtype);
    int64_t lo = INT64_MAX, hi = 0;
    for (const Use& u : uses[s]) {
      int64_t b, e;
      kernels::PieceSourceRowRange(*u.piece, &b, &e);
      lo = std::min(lo, b);
      hi = std::max(hi, e);
    }
    const int64_t chunk_rows =
        std::max<int64_t>(1, static_cast<int64_t>(kChunkBytes / std::max<uint64_t>(row_bytes, 1)));
    for (int64_t a = lo; a < hi; a += chunk_rows) {
      const int64_t b = std::min(hi, a + chunk_rows);
      const uint64_t len = static_cast<uint64_t>(b - a) * row_bytes;
      WD_RETURN_IF_ERROR(CheckStop());
      if (buf.size() < len) buf.resize(len);
      WD_RETURN_IF_ERROR(ckpt.ReadAt(src.file, src.offset + a * row_bytes, len, buf.data()));
      stats.read += len;
      for (const Use& u : uses[s]) {
        WD_RETURN_IF_ERROR(ApplyChunk(plan, plan.ranks[u.rank_index], outs[u.rank_index], *u.piece,
                                      buf.data(), a, b, staging, stats));
      }
    }
  }
  return CheckStop();
}

absl::Status Shard(const Checkpoint& ckpt, const Plan& plan, const std::string& out_dir,
                   Stats& stats) {
  std::error_code ec;
  const bool created_dir = std::filesystem::create_directories(out_dir, ec);
  if (ec) return absl::InternalError(absl::StrCat("creating ", out_dir, ": ", ec.message()));
  absl::Status s;
  {
    StagedFiles staged(out_dir);
    s = WriteOutputs(ckpt, plan, staged, stats);
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

}  // namespace

int ShardMain(int argc, char** argv) {
  // Under RLIMIT_FSIZE a write past the limit raises SIGXFSZ, whose default action kills the
  // process with its temporaries on disk; ignored, the write fails with EFBIG and the run rolls
  // back like on a full disk.
  std::signal(SIGXFSZ, SIG_IGN);
  PlanArgs a;
  std::string out_dir;
  ArgParser p("weightctl shard",
              "Writes per-rank safetensors in vLLM's sharded-state layout, on the host.");
  AddPlanArgs(p, &a);
  p.Option("--out", "DIR", &out_dir, "output directory (required)");
  p.Epilog(
      "example: weightctl shard /models/Llama-3-8B --tp 4 --out /models/Llama-3-8B-tp4\n"
      "Loads with: vllm serve /models/Llama-3-8B-tp4 -tp 4 --load-format sharded_state\n"
      "Files are written under temporary names and renamed into place once all are complete;\n"
      "a failed or interrupted run leaves DIR as it was.");
  if (absl::Status s = p.Parse(argc, argv); !s.ok()) {
    std::cerr << "weightctl shard: " << s.message() << "\n";
    return 2;
  }
  if (p.help_requested()) {
    std::cout << p.Help();
    return 0;
  }
  absl::StatusOr<PlanOptions> o = ToPlanOptions(a);
  if (!o.ok() || out_dir.empty()) {
    std::cerr << "weightctl shard: " << (o.ok() ? "--out DIR is required" : o.status().message())
              << "\n";
    return 2;
  }
  absl::StatusOr<Checkpoint> ckpt = Checkpoint::Open(a.checkpoint);
  if (!ckpt.ok()) {
    std::cerr << "weightctl shard: " << ckpt.status().message() << "\n";
    return 1;
  }
  const auto t0 = std::chrono::steady_clock::now();
  absl::StatusOr<Plan> plan = BuildPlan(*ckpt, *o);
  if (!plan.ok()) {
    std::cerr << "weightctl shard: " << plan.status().message() << "\n";
    return 1;
  }
  Stats stats;
  absl::Status s;
  {
    StopSignalScope stop_signals;
    s = Shard(*ckpt, *plan, out_dir, stats);
  }
  if (!s.ok()) {
    std::cerr << "weightctl shard: " << s.message() << "\n";
    if (const int sig = g_stop_signal; sig != 0) {
      // The output is rolled back: now die of the signal, as a shell expects of a command it
      // interrupted.
      std::signal(sig, SIG_DFL);
      std::raise(sig);
    }
    return 1;
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::cout << absl::StrFormat(
      "wrote %d rank file(s) to %s\nread %s of %s checkpoint tensor bytes, wrote %s, in %.2f s: "
      "%.2f GB/s read, %.2f GB/s written\n",
      plan->ranks.size(), out_dir, HumanBytes(stats.read), HumanBytes(plan->checkpoint_bytes),
      HumanBytes(stats.written), secs, stats.read / secs / 1e9, stats.written / secs / 1e9);
  return 0;
}

}  // namespace weightd::cli
