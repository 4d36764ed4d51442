// weightctl shard CKPT --tp T --out DIR: executes a plan on the host and writes vLLM's
// sharded-state layout (DIR/model-rank-{r}-part-0.safetensors plus config and tokenizer files).
//
// Streaming design: sources are visited in (file, offset) order and read once, in chunks of
// whole rows no larger than kChunkBytes, for all ranks together. Every piece of every rank that
// uses the chunk is converted into a small staging buffer and written with pwrite straight to
// its place in the pre-sized output file, so memory stays at a few chunks whatever the model
// size. Output files are created with ftruncate, so vocab padding rows (the plan's zero-fills)
// and alignment gaps are already zero.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "weightctl/args.h"
#include "weightctl/commands.h"
#include "weightctl/plan_args.h"
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

absl::Status PwriteAll(int fd, const void* buf, uint64_t len, uint64_t off,
                       const std::string& path) {
  const auto* p = static_cast<const char*>(buf);
  while (len > 0) {
    const ssize_t n = pwrite(fd, p, std::min<uint64_t>(len, 1ull << 30), static_cast<off_t>(off));
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoError(errno, absl::StrCat("pwrite of ", path, " at offset ", off));
    }
    p += n;
    len -= n;
    off += n;
  }
  return absl::OkStatus();
}

struct OutFile {
  std::string path;
  UniqueFd fd;
  std::vector<uint64_t> target_offset;  // absolute file offset of each target's data
  uint64_t size = 0;
};

// Writes the safetensors header (targets in plan order, data packed densely) and sizes the file.
absl::StatusOr<OutFile> CreateOutput(const std::string& path, const RankPlan& r) {
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
        absl::StrCat("writing the safetensors header of ", path, ": ", e.what()));
  }
  // The data section must start 8-byte aligned, as the safetensors writer pads it.
  header.append((8 - header.size() % 8) % 8, ' ');
  OutFile out;
  out.path = path;
  const int fd = open(path.c_str(), O_CREAT | O_TRUNC | O_RDWR | O_CLOEXEC, 0644);
  if (fd < 0) return ErrnoError(errno, absl::StrCat("creating ", path));
  out.fd = UniqueFd(fd);
  const uint64_t data_start = 8 + header.size();
  out.size = data_start + off;
  WD_SYSCALL_OR_RETURN(ftruncate(fd, static_cast<off_t>(out.size)),
                       absl::StrCat("ftruncate of ", path));
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
      WD_RETURN_IF_ERROR(PwriteAll(out.fd.get(), s, span, file_off, out.path));
      stats.written += span;
      continue;
    }
    if (staging.size() < span) staging.resize(span);
    if (!full_rows) {
      // The piece fills only some columns of these rows: keep the others' bytes.
      WD_RETURN_IF_ERROR(PreadExact(out.fd.get(), staging.data(), span, file_off, out.path));
    }
    PlanPiece sub = p;
    sub.src_start = {p.src_start[0] + i, p.src_start[1] + ja, p.src_start[2]};
    sub.extent = {1, n, p.extent[2]};
    sub.dst_shape = {1, n, d2};
    sub.dst_start = {0, 0, p.dst_start[2]};
    kernels::CopyPieceRowsHost(sub, src.dtype, t.dtype, rows, a, b, staging.data());
    WD_RETURN_IF_ERROR(PwriteAll(out.fd.get(), staging.data(), span, file_off, out.path));
    stats.written += static_cast<uint64_t>(n * p.extent[2] * ds);
  }
  return absl::OkStatus();
}

absl::Status Shard(const Checkpoint& ckpt, const Plan& plan, const std::string& out_dir,
                   Stats& stats) {
  std::error_code ec;
  std::filesystem::create_directories(out_dir, ec);
  if (ec) return absl::InternalError(absl::StrCat("creating ", out_dir, ": ", ec.message()));
  std::vector<OutFile> outs;
  for (const RankPlan& r : plan.ranks) {
    WD_ASSIGN_OR_RETURN(
        OutFile f,
        CreateOutput(absl::StrCat(out_dir, "/model-rank-", r.rank, "-part-0.safetensors"), r));
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
      if (buf.size() < len) buf.resize(len);
      WD_RETURN_IF_ERROR(ckpt.ReadAt(src.file, src.offset + a * row_bytes, len, buf.data()));
      stats.read += len;
      for (const Use& u : uses[s]) {
        WD_RETURN_IF_ERROR(ApplyChunk(plan, plan.ranks[u.rank_index], outs[u.rank_index], *u.piece,
                                      buf.data(), a, b, staging, stats));
      }
    }
  }
  for (OutFile& f : outs) {
    WD_SYSCALL_OR_RETURN(fsync(f.fd.get()), absl::StrCat("fsync of ", f.path));
  }
  for (const char* name : kSideFiles) {
    const std::filesystem::path from = std::filesystem::path(ckpt.dir()) / name;
    if (!std::filesystem::exists(from)) continue;
    std::filesystem::copy_file(from, std::filesystem::path(out_dir) / name,
                               std::filesystem::copy_options::overwrite_existing, ec);
    if (ec) return absl::InternalError(absl::StrCat("copying ", from.string(), ": ", ec.message()));
  }
  return absl::OkStatus();
}

}  // namespace

int ShardMain(int argc, char** argv) {
  PlanArgs a;
  std::string out_dir;
  ArgParser p("weightctl shard",
              "Writes per-rank safetensors in vLLM's sharded-state layout, on the host.");
  AddPlanArgs(p, &a);
  p.Option("--out", "DIR", &out_dir, "output directory (required)");
  p.Epilog(
      "example: weightctl shard /models/Llama-3-8B --tp 4 --out /models/Llama-3-8B-tp4\n"
      "Loads with: vllm serve /models/Llama-3-8B-tp4 -tp 4 --load-format sharded_state");
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
  if (absl::Status s = Shard(*ckpt, *plan, out_dir, stats); !s.ok()) {
    std::cerr << "weightctl shard: " << s.message() << "\n";
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
