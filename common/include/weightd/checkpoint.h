// Checkpoint: a Hugging Face checkpoint as an index of tensors located in safetensors shards.
//
//   WD_ASSIGN_OR_RETURN(Checkpoint ckpt, Checkpoint::Open("/models/Llama-3-8B"));
//   const CheckpointTensor* t = ckpt.Find("model.norm.weight");
//   ckpt.files()[t->file].path, t->offset (absolute), t->nbytes
//   WD_ASSIGN_OR_RETURN(std::span<const std::byte> bytes, ckpt.MapTensor(*t));
//
// Open accepts a directory (with `model.safetensors.index.json`, or else every `*.safetensors`
// in it) or a single `.safetensors` file. Only headers are read; tensor data is reached later
// through mmap (MapTensor) or pread (ReadAt), never by copying whole shards. Headers of several
// shards are parsed in parallel.
//
// Validation beyond each header (see safetensors.h): the index must name existing files, every
// tensor it lists must be in the shard it names, no tensor may be in two shards, and every tensor
// of a listed shard must be in the index. Errors name the file and tensor.
//
// Thread-safety: const methods may be called concurrently (MapTensor maps each file at most
// once, under a lock).
#ifndef WEIGHTD_CHECKPOINT_H_
#define WEIGHTD_CHECKPOINT_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "weightd/dtype.h"
#include "weightd/file_util.h"
#include "weightd/model_config.h"

namespace weightd {

struct CheckpointFile {
  std::string path;  // absolute or as given
  std::string name;  // file name relative to the checkpoint directory
  uint64_t file_size = 0;
  uint64_t data_offset = 0;  // absolute offset of the data section
  std::vector<std::pair<std::string, std::string>> metadata;
  FileIdentity identity;  // when its header was read; readers check the file is still that one
};

struct CheckpointTensor {
  std::string name;
  DType dtype = DType::kU8;
  std::vector<int64_t> shape;
  uint32_t file = 0;    // index into Checkpoint::files()
  uint64_t offset = 0;  // absolute byte offset of the data in its file
  uint64_t nbytes = 0;
};

class Checkpoint {
 public:
  Checkpoint(Checkpoint&&) noexcept;
  Checkpoint& operator=(Checkpoint&&) noexcept;
  ~Checkpoint();

  // Opens a checkpoint directory or a single .safetensors file (see the file comment).
  // `config.json` beside the shards is parsed if present; its absence is not an error here
  // (operations that need it report that).
  // With `roots` (absolute, resolved directories: the daemon's model_roots), every file read
  // (index, shards, config.json) must resolve inside one, after symlinks (OpenRegularFile).
  static absl::StatusOr<Checkpoint> Open(const std::string& path,
                                         absl::Span<const std::string> roots = {});

  // The directory holding the shards.
  const std::string& dir() const;
  const std::vector<CheckpointFile>& files() const;
  // All tensors, sorted by name.
  const std::vector<CheckpointTensor>& tensors() const;
  // nullptr when absent.
  const CheckpointTensor* Find(absl::string_view name) const;
  // Sum of the tensors' data bytes.
  uint64_t total_bytes() const;
  // Parsed config.json, if the directory has one.
  const std::optional<ModelConfig>& config() const;
  // The config, or an error naming the missing file and `needed_for`.
  absl::StatusOr<const ModelConfig*> RequireConfig(absl::string_view needed_for) const;

  // The tensor's bytes through a shared read-only mapping of its file, valid while this
  // Checkpoint lives.
  absl::StatusOr<std::span<const std::byte>> MapTensor(const CheckpointTensor& t) const;
  // pread of `len` bytes at absolute `offset` of file `file` into `dst`; a short file is an
  // error naming the file (it was truncated after Open).
  absl::Status ReadAt(uint32_t file, uint64_t offset, uint64_t len, void* dst) const;

 private:
  struct State;
  explicit Checkpoint(std::unique_ptr<State> state);
  std::unique_ptr<State> state_;
};

}  // namespace weightd

#endif  // WEIGHTD_CHECKPOINT_H_
