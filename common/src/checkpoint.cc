#include "weightd/checkpoint.h"

#include <fcntl.h>
#include <sys/stat.h>

#include <algorithm>
#include <atomic>
#include <filesystem>
#include <numeric>
#include <thread>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "detail/json_cursor.h"
#include "weightd/file_util.h"
#include "weightd/mapped_file.h"
#include "weightd/safetensors.h"
#include "weightd/status_macros.h"
#include "weightd/unique_fd.h"

namespace weightd {

namespace fs = std::filesystem;

namespace {

constexpr absl::string_view kIndexName = "model.safetensors.index.json";
constexpr uint64_t kMaxIndexBytes = 256ull << 20;

// model.safetensors.index.json: each listed tensor with the shard that holds it.
struct Index {
  std::vector<std::string> files;                         // distinct shard names, first-seen order
  std::vector<std::pair<std::string, uint32_t>> entries;  // tensor name -> index into `files`
};

// Parses the index with the strict cursor rather than nlohmann: a DeepSeek-size index lists
// ~100k tensors, and building a DOM of it cost more than reading all shard headers together.
absl::StatusOr<Index> ParseIndex(const std::string& path, absl::Span<const std::string> roots) {
  WD_ASSIGN_OR_RETURN(std::string text, ReadFileToString(path, kMaxIndexBytes, roots));
  auto not_json = [&](const absl::Status& s) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": not a valid JSON object (", s.message(), ")"));
  };
  detail::JsonCursor cur(text);
  if (absl::Status s = cur.Expect('{'); !s.ok()) return not_json(s);
  Index index;
  absl::flat_hash_map<std::string, uint32_t> file_ids;
  bool have_map = false;
  std::string key, file;
  if (!cur.Consume('}')) {
    do {
      if (absl::Status s = cur.ParseString(&key); !s.ok()) return not_json(s);
      if (absl::Status s = cur.Expect(':'); !s.ok()) return not_json(s);
      if (key != "weight_map") {
        if (absl::Status s = cur.SkipValue(1); !s.ok()) return not_json(s);
        continue;
      }
      if (have_map) {
        return absl::InvalidArgumentError(absl::StrCat(path, ": 'weight_map' appears twice"));
      }
      have_map = true;
      if (cur.Peek() != '{') {
        if (absl::Status s = cur.SkipValue(1); !s.ok()) return not_json(s);
        return absl::InvalidArgumentError(
            absl::StrCat(path, ": 'weight_map' is not an object (tensor name -> shard file)"));
      }
      cur.Expect('{').IgnoreError();
      if (cur.Consume('}')) continue;
      do {
        std::string tensor;
        if (absl::Status s = cur.ParseString(&tensor); !s.ok()) return not_json(s);
        if (absl::Status s = cur.Expect(':'); !s.ok()) return not_json(s);
        if (cur.Peek() != '"') {
          if (absl::Status s = cur.SkipValue(1); !s.ok()) return not_json(s);
          return absl::InvalidArgumentError(absl::StrCat(path, ": weight_map entry for tensor '",
                                                         tensor, "' is not a file name string"));
        }
        if (absl::Status s = cur.ParseString(&file); !s.ok()) return not_json(s);
        auto it = file_ids.find(file);
        if (it == file_ids.end()) {
          // The shard must live in the checkpoint directory: no path components.
          if (file.empty() || absl::StrContains(file, "/") || file == "." || file == "..") {
            return absl::InvalidArgumentError(absl::StrCat(path, ": weight_map entry for tensor '",
                                                           tensor, "' names '", file,
                                                           "', which is not a plain file name"));
          }
          it = file_ids.emplace(file, static_cast<uint32_t>(index.files.size())).first;
          index.files.push_back(file);
        }
        index.entries.emplace_back(std::move(tensor), it->second);
      } while (cur.Consume(','));
      if (absl::Status s = cur.Expect('}'); !s.ok()) return not_json(s);
    } while (cur.Consume(','));
    if (absl::Status s = cur.Expect('}'); !s.ok()) return not_json(s);
  }
  cur.SkipWhitespace();
  if (!cur.AtEnd()) {
    return not_json(cur.Error("unexpected content after the JSON object"));
  }
  if (!have_map) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": missing 'weight_map' object (tensor name -> shard file)"));
  }
  return index;
}

// Parses the headers of `paths` on a few threads. Results are in input order; the first error
// in input order wins so that messages are deterministic.
absl::StatusOr<std::vector<SafetensorsFile>> ReadHeaders(const std::vector<std::string>& paths,
                                                         absl::Span<const std::string> roots) {
  std::vector<absl::StatusOr<SafetensorsFile>> results(paths.size(),
                                                       absl::UnknownError("not read"));
  const unsigned hw = std::max(1u, std::thread::hardware_concurrency());
  const size_t nthreads = std::min<size_t>({paths.size(), static_cast<size_t>(hw), 16});
  std::atomic<size_t> next{0};
  auto work = [&]() {
    for (size_t i = next.fetch_add(1); i < paths.size(); i = next.fetch_add(1)) {
      results[i] = ReadSafetensorsFile(paths[i], roots);
    }
  };
  if (nthreads <= 1) {
    work();
  } else {
    std::vector<std::thread> threads;
    threads.reserve(nthreads - 1);
    for (size_t i = 0; i + 1 < nthreads; ++i) threads.emplace_back(work);
    work();
    for (std::thread& t : threads) t.join();
  }
  std::vector<SafetensorsFile> out;
  out.reserve(paths.size());
  for (auto& r : results) {
    if (!r.ok()) return std::move(r).status();
    out.push_back(*std::move(r));
  }
  return out;
}

}  // namespace

struct Checkpoint::State {
  std::string dir;
  std::vector<CheckpointFile> files;
  std::vector<CheckpointTensor> tensors;
  absl::flat_hash_map<absl::string_view, uint32_t> by_name;
  uint64_t total_bytes = 0;
  std::optional<ModelConfig> config;

  mutable absl::Mutex map_mu;
  mutable std::vector<std::unique_ptr<MappedFile>> maps ABSL_GUARDED_BY(map_mu);
  mutable std::vector<UniqueFd> fds ABSL_GUARDED_BY(map_mu);
};

Checkpoint::Checkpoint(std::unique_ptr<State> state) : state_(std::move(state)) {}
Checkpoint::Checkpoint(Checkpoint&&) noexcept = default;
Checkpoint& Checkpoint::operator=(Checkpoint&&) noexcept = default;
Checkpoint::~Checkpoint() = default;

const std::string& Checkpoint::dir() const { return state_->dir; }
const std::vector<CheckpointFile>& Checkpoint::files() const { return state_->files; }
const std::vector<CheckpointTensor>& Checkpoint::tensors() const { return state_->tensors; }
uint64_t Checkpoint::total_bytes() const { return state_->total_bytes; }
const std::optional<ModelConfig>& Checkpoint::config() const { return state_->config; }

const CheckpointTensor* Checkpoint::Find(absl::string_view name) const {
  auto it = state_->by_name.find(name);
  return it == state_->by_name.end() ? nullptr : &state_->tensors[it->second];
}

absl::StatusOr<const ModelConfig*> Checkpoint::RequireConfig(absl::string_view needed_for) const {
  if (state_->config) return &*state_->config;
  return absl::InvalidArgumentError(
      absl::StrCat("checkpoint '", state_->dir, "' has no config.json, needed for ", needed_for));
}

absl::StatusOr<Checkpoint> Checkpoint::Open(const std::string& path,
                                            absl::Span<const std::string> roots) {
  auto state = std::make_unique<State>();
  std::error_code ec;
  const fs::file_status st = fs::status(path, ec);
  if (ec || !fs::exists(st)) {
    return absl::NotFoundError(absl::StrCat("checkpoint path '", path, "' does not exist"));
  }

  std::vector<std::string> shard_names;
  Index index;
  bool have_index = false;
  std::string index_path;
  if (fs::is_directory(st)) {
    state->dir = path;
    index_path = (fs::path(path) / std::string(kIndexName)).string();
    if (fs::exists(index_path, ec)) {
      have_index = true;
      WD_ASSIGN_OR_RETURN(index, ParseIndex(index_path, roots));
      shard_names = index.files;
      std::sort(shard_names.begin(), shard_names.end());
      for (const std::string& f : shard_names) {
        const fs::file_status fst = fs::status(fs::path(path) / f, ec);
        if (!fs::exists(fst)) {
          return absl::NotFoundError(absl::StrCat(index_path, ": names shard '", f,
                                                  "', which does not exist in '", path, "'"));
        }
        if (!fs::is_regular_file(fst)) {
          return absl::InvalidArgumentError(
              absl::StrCat(index_path, ": names shard '", f, "', which is ",
                           fs::is_directory(fst) ? "a directory" : "not a regular file",
                           " (a FIFO, device or socket)"));
        }
      }
    } else {
      for (const auto& entry : fs::directory_iterator(path, ec)) {
        const std::string name = entry.path().filename().string();
        if (!absl::EndsWith(name, ".safetensors")) continue;
        std::error_code kind_ec;
        if (!entry.is_regular_file(kind_ec)) {
          // Skipping it would load a checkpoint without its tensors; opening it could block.
          return absl::InvalidArgumentError(
              absl::StrCat("'", entry.path().string(), "' is ",
                           entry.is_fifo(kind_ec) ? "a FIFO" : "not a regular file",
                           ", in checkpoint directory '", path, "'"));
        }
        shard_names.push_back(name);
      }
      if (ec) return ErrnoError(ec.value(), absl::StrCat("list directory '", path, "'"));
      std::sort(shard_names.begin(), shard_names.end());
      if (shard_names.empty()) {
        return absl::NotFoundError(absl::StrCat("'", path,
                                                "' contains no *.safetensors files and "
                                                "no ",
                                                kIndexName));
      }
    }
  } else {
    const fs::path p(path);
    state->dir = p.has_parent_path() ? p.parent_path().string() : std::string(".");
    shard_names.push_back(p.filename().string());
  }

  std::vector<std::string> paths;
  paths.reserve(shard_names.size());
  for (const std::string& n : shard_names) paths.push_back((fs::path(state->dir) / n).string());
  WD_ASSIGN_OR_RETURN(std::vector<SafetensorsFile> headers, ReadHeaders(paths, roots));

  size_t count = 0;
  for (const SafetensorsFile& h : headers) count += h.header.tensors.size();
  std::vector<CheckpointTensor> unsorted;
  unsorted.reserve(count);
  for (uint32_t fi = 0; fi < headers.size(); ++fi) {
    SafetensorsFile& h = headers[fi];
    CheckpointFile& cf = state->files.emplace_back();
    cf.path = h.path;
    cf.name = shard_names[fi];
    cf.file_size = h.file_size;
    cf.data_offset = h.data_offset;
    cf.identity = h.identity;
    cf.metadata = std::move(h.header.metadata);
    for (TensorInfo& t : h.header.tensors) {
      CheckpointTensor& ct = unsorted.emplace_back();
      ct.name = std::move(t.name);
      ct.dtype = t.dtype;
      ct.shape = std::move(t.shape);
      ct.file = fi;
      ct.offset = h.data_offset + t.begin;
      ct.nbytes = t.end - t.begin;
      state->total_bytes += ct.nbytes;
    }
  }
  // Sorting a permutation instead of the tensors themselves: moving ~100-byte records with
  // strings and vectors inside dominated the sort for 100k tensors.
  std::vector<uint32_t> order(unsorted.size());
  std::iota(order.begin(), order.end(), 0u);
  std::sort(order.begin(), order.end(),
            [&](uint32_t a, uint32_t b) { return unsorted[a].name < unsorted[b].name; });
  state->tensors.reserve(unsorted.size());
  for (uint32_t i : order) state->tensors.push_back(std::move(unsorted[i]));
  unsorted = std::vector<CheckpointTensor>();
  for (size_t i = 1; i < state->tensors.size(); ++i) {
    const CheckpointTensor& a = state->tensors[i - 1];
    const CheckpointTensor& b = state->tensors[i];
    if (a.name == b.name) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor '", a.name, "' is stored in two shards: '",
                       state->files[a.file].path, "' and '", state->files[b.file].path, "'"));
    }
  }
  state->by_name.reserve(state->tensors.size());
  for (uint32_t i = 0; i < state->tensors.size(); ++i) {
    state->by_name.emplace(state->tensors[i].name, i);
  }

  if (have_index) {
    // Position in state->files of each shard the index names (files are in shard_names order).
    std::vector<uint32_t> file_pos(index.files.size());
    for (size_t i = 0; i < index.files.size(); ++i) {
      file_pos[i] = static_cast<uint32_t>(
          std::lower_bound(shard_names.begin(), shard_names.end(), index.files[i]) -
          shard_names.begin());
    }
    std::vector<bool> listed(state->tensors.size(), false);
    for (const auto& [tensor, file_id] : index.entries) {
      const std::string& file = index.files[file_id];
      auto it = state->by_name.find(tensor);
      if (it == state->by_name.end()) {
        return absl::InvalidArgumentError(absl::StrCat(index_path, ": tensor '", tensor,
                                                       "' is listed in shard '", file,
                                                       "' but that shard does not contain it"));
      }
      const CheckpointTensor& t = state->tensors[it->second];
      if (t.file != file_pos[file_id]) {
        return absl::InvalidArgumentError(
            absl::StrCat(index_path, ": tensor '", tensor, "' is listed in shard '", file,
                         "' but is stored in '", state->files[t.file].name, "'"));
      }
      if (listed[it->second]) {
        return absl::InvalidArgumentError(
            absl::StrCat(index_path, ": tensor '", tensor, "' is listed twice in weight_map"));
      }
      listed[it->second] = true;
    }
    // Every entry is distinct and found, so equal counts mean every tensor is listed.
    if (index.entries.size() != state->tensors.size()) {
      for (uint32_t i = 0; i < state->tensors.size(); ++i) {
        if (listed[i]) continue;
        const CheckpointTensor& t = state->tensors[i];
        return absl::InvalidArgumentError(absl::StrCat("tensor '", t.name, "' is stored in '",
                                                       state->files[t.file].path, "' but ",
                                                       index_path, " does not list it"));
      }
    }
  }

  const std::string config_path = (fs::path(state->dir) / "config.json").string();
  if (fs::exists(config_path, ec)) {
    WD_ASSIGN_OR_RETURN(ModelConfig cfg, ModelConfig::Load(config_path, roots));
    state->config = std::move(cfg);
  }
  {
    absl::MutexLock lock(&state->map_mu);
    state->maps.resize(state->files.size());
    state->fds.resize(state->files.size());
  }
  return Checkpoint(std::move(state));
}

absl::StatusOr<std::span<const std::byte>> Checkpoint::MapTensor(const CheckpointTensor& t) const {
  if (t.file >= state_->files.size()) {
    return absl::InvalidArgumentError(absl::StrCat("tensor '", t.name, "' has no such file"));
  }
  const MappedFile* m = nullptr;
  {
    absl::MutexLock lock(&state_->map_mu);
    std::unique_ptr<MappedFile>& slot = state_->maps[t.file];
    if (!slot) {
      WD_ASSIGN_OR_RETURN(MappedFile mf, MappedFile::Open(state_->files[t.file].path));
      const absl::Status same =
          CheckUnchanged(state_->files[t.file].path, state_->files[t.file].identity, mf.identity());
      if (!same.ok()) return Annotate(same, absl::StrCat("tensor '", t.name, "'"));
      slot = std::make_unique<MappedFile>(std::move(mf));
    }
    m = slot.get();
  }
  if (t.offset + t.nbytes > m->size()) {
    return absl::DataLossError(absl::StrCat("'", state_->files[t.file].path, "' is ", m->size(),
                                            " bytes, too short for tensor '", t.name,
                                            "' at offset ", t.offset, " (file truncated?)"));
  }
  return m->bytes().subspan(t.offset, t.nbytes);
}

absl::Status Checkpoint::ReadAt(uint32_t file, uint64_t offset, uint64_t len, void* dst) const {
  if (file >= state_->files.size()) {
    return absl::InvalidArgumentError(absl::StrCat("no file #", file, " in the checkpoint"));
  }
  int fd = -1;
  {
    absl::MutexLock lock(&state_->map_mu);
    UniqueFd& slot = state_->fds[file];
    if (!slot) {
      WD_ASSIGN_OR_RETURN(UniqueFd fd, OpenRegularFile(state_->files[file].path));
      WD_ASSIGN_OR_RETURN(FileIdentity now, IdentityOfFd(fd.get(), state_->files[file].path));
      WD_RETURN_IF_ERROR(
          CheckUnchanged(state_->files[file].path, state_->files[file].identity, now));
      slot = std::move(fd);
    }
    fd = slot.get();
  }
  return PreadExact(fd, dst, len, offset, state_->files[file].path);
}

}  // namespace weightd
