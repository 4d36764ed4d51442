// libFuzzer target: a recipe file, a config.json and a small synthetic checkpoint through
// ParseRecipe and BuildPlan. Errors are fine; crashes, sanitizer reports, hangs and exceptions
// are not. When BuildPlan says yes, the plan must hold what executors rely on:
//   - it survives PlanToJson and PlanFromJson (whose checker puts every piece box inside its
//     source and target, every target inside the arena, every zero fill inside its target);
//   - the pieces and zero fills of each target cover its bytes exactly once (checked element by
//     element for targets of up to 2^16 elements, by count for larger ones).
// Violations trap, so libFuzzer records them like crashes.
//
// Input: sections separated by a line "%%":
//   recipe JSON
//   %%
//   config.json text (the section absent or empty: no config.json)
//   %%
//   one tensor per line: NAME DTYPE DIM,DIM,...  (safetensors dtype spelling; no dims: a scalar)
//   %%
//   options: tp=N rank=R ep dtype=bf16|fp16|fp32 skip=SUBSTR
// The tensors become one safetensors file whose header this target writes (names JSON-escaped)
// and whose data section is sparse, so the parser sees well-formed files and the fuzzer's
// effort goes into recipes, configs and shapes. With WD_FUZZ_VERBOSE set, each input's outcome
// is printed (to see how far seeds get: `fuzz_recipe_plan corpus/recipe_plan/*`).
#include <fcntl.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"
#include "weightd/checkpoint.h"
#include "weightd/dtype.h"
#include "weightd/plan.h"
#include "weightd/recipe.h"

namespace {

void Check(bool ok) {
  if (!ok) __builtin_trap();
}

void Report(absl::string_view what) {
  static const bool verbose = getenv("WD_FUZZ_VERBOSE") != nullptr;
  if (verbose)
    fprintf(stderr, "fuzz_recipe_plan: %.*s\n", static_cast<int>(what.size()), what.data());
}

// The whole data section stays sparse, but ftruncate on some file systems caps the size.
constexpr uint64_t kMaxDataBytes = uint64_t{1} << 50;
constexpr size_t kMaxTensors = 64;

constexpr const char* kFiles[] = {"recipe.json", "config.json", "model.safetensors"};

// A directory of this process for the files of one input, removed at exit.
const std::string& WorkDir() {
  static const std::string* dir = [] {
    std::string tmpl =
        access("/dev/shm", W_OK) == 0 ? "/dev/shm/wd_fuzz_plan_XXXXXX" : "/tmp/wd_fuzz_plan_XXXXXX";
    if (mkdtemp(tmpl.data()) == nullptr) std::abort();
    return new std::string(tmpl);
  }();
  static const bool cleanup = [] {
    return std::atexit([] {
             for (const char* f : kFiles) unlink((*dir + "/" + f).c_str());
             rmdir(dir->c_str());
           }) == 0;
  }();
  (void)cleanup;
  return *dir;
}

bool WriteFile(const std::string& path, absl::string_view bytes) {
  const int fd = open(path.c_str(), O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0644);
  if (fd < 0) return false;
  const bool ok = write(fd, bytes.data(), bytes.size()) == static_cast<ssize_t>(bytes.size());
  close(fd);
  return ok;
}

std::string JsonString(absl::string_view s) {
  std::string out = "\"";
  for (const char ch : s) {
    const unsigned char c = static_cast<unsigned char>(ch);
    if (c == '"' || c == '\\') {
      out.push_back('\\');
      out.push_back(ch);
    } else if (c < 0x20) {
      absl::StrAppendFormat(&out, "\\u%04x", c);
    } else {
      out.push_back(ch);  // bytes >= 0x80 verbatim: the parser judges the UTF-8
    }
  }
  return out + "\"";
}

// The safetensors file for the tensor lines, or "" when a line is not usable.
std::string SafetensorsFile(absl::string_view lines, uint64_t* data_size) {
  std::string header = "{";
  uint64_t offset = 0;
  size_t count = 0;
  for (absl::string_view line : absl::StrSplit(lines, '\n', absl::SkipWhitespace())) {
    if (++count > kMaxTensors) break;
    std::vector<absl::string_view> f = absl::StrSplit(line, ' ', absl::SkipEmpty());
    if (f.size() < 2 || f.size() > 3) return "";
    const std::optional<weightd::DType> dtype = weightd::ParseDType(f[1]);
    if (!dtype) return "";
    std::vector<int64_t> shape;
    uint64_t nbytes = weightd::DTypeSize(*dtype);
    bool zero = false;
    if (f.size() == 3) {
      for (absl::string_view d : absl::StrSplit(f[2], ',')) {
        int64_t v = 0;
        if (!absl::SimpleAtoi(d, &v) || v < 0) return "";
        shape.push_back(v);
        zero = zero || v == 0;
      }
    }
    if (!zero) {
      for (int64_t d : shape) {
        if (__builtin_mul_overflow(nbytes, static_cast<uint64_t>(d), &nbytes)) return "";
      }
    } else {
      nbytes = 0;
    }
    if (nbytes > kMaxDataBytes - offset) return "";
    if (header.size() > 1) header += ",";
    absl::StrAppend(&header, JsonString(f[0]), ":{\"dtype\":\"", weightd::DTypeName(*dtype),
                    "\",\"shape\":[", absl::StrJoin(shape, ","), "],\"data_offsets\":[", offset,
                    ",", offset + nbytes, "]}");
    offset += nbytes;
  }
  header += "}";
  std::string file(8, '\0');
  for (int i = 0; i < 8; ++i) file[i] = static_cast<char>((header.size() >> (8 * i)) & 0xFF);
  *data_size = offset;
  return file + header;
}

weightd::PlanOptions Options(absl::string_view text) {
  weightd::PlanOptions o;
  for (absl::string_view w : absl::StrSplit(text, absl::ByAnyChar(" \n"), absl::SkipEmpty())) {
    int v = 0;
    if (absl::ConsumePrefix(&w, "tp=") && absl::SimpleAtoi(w, &v) && v >= 1 && v <= 16) {
      o.tp = v;
    } else if (absl::ConsumePrefix(&w, "rank=") && absl::SimpleAtoi(w, &v)) {
      o.rank = v;
    } else if (w == "ep") {
      o.expert_parallel = true;
    } else if (absl::ConsumePrefix(&w, "dtype=")) {
      o.dtype = weightd::ParseDTypeAlias(w);
    } else if (absl::ConsumePrefix(&w, "skip=")) {
      o.skip_substrings.emplace_back(w);
    }
  }
  return o;
}

// Each byte of each target is written by exactly one piece or zero fill.
void CheckCoverage(const weightd::Plan& plan) {
  for (const weightd::RankPlan& r : plan.ranks) {
    std::vector<uint64_t> covered(r.targets.size(), 0);
    std::vector<std::vector<uint8_t>> hits(r.targets.size());
    for (size_t t = 0; t < r.targets.size(); ++t) {
      const uint64_t esize = weightd::DTypeSize(r.targets[t].dtype);
      if (r.targets[t].nbytes / esize <= (1u << 16)) hits[t].assign(r.targets[t].nbytes / esize, 0);
    }
    for (const weightd::PlanPiece& p : r.pieces) {
      const weightd::PlanTarget& t = r.targets[p.target];
      covered[p.target] += static_cast<uint64_t>(p.extent[0] * p.extent[1] * p.extent[2]) *
                           weightd::DTypeSize(t.dtype);
      if (hits[p.target].empty()) continue;
      for (int64_t i = 0; i < p.extent[0]; ++i) {
        for (int64_t j = 0; j < p.extent[1]; ++j) {
          for (int64_t k = 0; k < p.extent[2]; ++k) {
            const int64_t e =
                ((p.dst_start[0] + i) * p.dst_shape[1] + p.dst_start[1] + j) * p.dst_shape[2] +
                p.dst_start[2] + k;
            Check(++hits[p.target][e] == 1);
          }
        }
      }
    }
    for (const weightd::PlanZeroFill& z : r.zero_fills) {
      covered[z.target] += z.nbytes;
      const uint64_t esize = weightd::DTypeSize(r.targets[z.target].dtype);
      Check(z.offset % esize == 0 && z.nbytes % esize == 0);
      if (hits[z.target].empty()) continue;
      for (uint64_t e = z.offset / esize; e < (z.offset + z.nbytes) / esize; ++e) {
        Check(++hits[z.target][e] == 1);
      }
    }
    for (size_t t = 0; t < r.targets.size(); ++t) {
      Check(covered[t] == r.targets[t].nbytes);
      for (uint8_t h : hits[t]) Check(h == 1);
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const absl::string_view input(reinterpret_cast<const char*>(data), size);
  std::vector<absl::string_view> part = absl::StrSplit(input, "\n%%\n");
  part.resize(4);
  const std::string& dir = WorkDir();
  const std::string recipe_path = dir + "/" + kFiles[0];
  const std::string config_path = dir + "/" + kFiles[1];
  const std::string shard_path = dir + "/" + kFiles[2];

  // The recipe alone, as `weightctl plan --recipe` reads it before any checkpoint.
  (void)weightd::ParseRecipe(part[0], "fuzz.json", nullptr);

  uint64_t data_size = 0;
  const std::string file = SafetensorsFile(part[2], &data_size);
  if (file.empty() || !WriteFile(shard_path, file) ||
      truncate(shard_path.c_str(), static_cast<off_t>(file.size() + data_size)) != 0 ||
      !WriteFile(recipe_path, part[0])) {
    Report("tensor lines not usable");
    return 0;
  }
  unlink(config_path.c_str());
  if (!part[1].empty() && !WriteFile(config_path, part[1])) return 0;

  absl::StatusOr<weightd::Checkpoint> ckpt = weightd::Checkpoint::Open(dir);
  if (!ckpt.ok()) {
    Report(ckpt.status().message());
    return 0;
  }
  weightd::PlanOptions o = Options(part[3]);
  o.recipe_file = recipe_path;
  absl::StatusOr<weightd::Plan> plan = weightd::BuildPlan(*ckpt, o);
  if (!plan.ok()) {
    Check(!plan.status().message().empty());
    Report(plan.status().message());
    return 0;
  }
  Report(
      absl::StrCat("plan of ", plan->ranks.size(), " rank(s), ", plan->sources.size(), " sources"));
  absl::StatusOr<std::string> json = weightd::PlanToJson(*plan);
  Check(json.ok());
  absl::StatusOr<weightd::Plan> back = weightd::PlanFromJson(*json);
  Check(back.ok());
  Check(weightd::PlanToJson(*back).value_or("") == *json);
  CheckCoverage(*plan);
  return 0;
}
