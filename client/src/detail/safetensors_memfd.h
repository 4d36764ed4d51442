// A safetensors file in a sealed memfd, written from tensors in host memory: what
// Client::UpdateTensors hands the daemon (docs/PROTOCOL.md "Generations": an update's one fd).
//
//   WD_ASSIGN_OR_RETURN(UniqueFd fd, WriteSafetensorsMemfd(tensors));
//   // fd: F_SEAL_WRITE|F_SEAL_SHRINK|F_SEAL_GROW|F_SEAL_SEAL, readable as /proc/self/fd/N
//
// Layout (the safetensors format): an 8-byte little-endian header length N, N bytes of JSON
// {"<name>": {"dtype": "BF16", "shape": [..], "data_offsets": [begin, end]}, ...} padded with
// spaces so that N is a multiple of 8, then the tensors' bytes back to back in the given order
// (no holes, which weightd's parser would refuse). Each tensor's bytes are copied once, from
// `data` into the memfd (pwrite); nothing else is buffered.
//
// Thread-safe (no shared state). Private to the client.
#ifndef WEIGHTD_CLIENT_DETAIL_SAFETENSORS_MEMFD_H_
#define WEIGHTD_CLIENT_DETAIL_SAFETENSORS_MEMFD_H_

#include <span>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "weightd/client.h"
#include "weightd/unique_fd.h"

namespace weightd::detail {

// INVALID_ARGUMENT naming the tensor (by index and name) when a name is empty, repeated,
// "__metadata__" or not UTF-8, a dimension is negative, the byte count overflows, nbytes !=
// product(shape) * DTypeSize(dtype), or `data` is null with nbytes > 0. Nothing is created then.
absl::Status CheckUpdateTensors(std::span<const UpdateTensor> tensors);

// CheckUpdateTensors, then the sealed memfd. Syscall failures (memfd_create, ftruncate, pwrite,
// F_ADD_SEALS) carry errno text; the memfd is closed on every error path.
absl::StatusOr<UniqueFd> WriteSafetensorsMemfd(std::span<const UpdateTensor> tensors);

}  // namespace weightd::detail

#endif  // WEIGHTD_CLIENT_DETAIL_SAFETENSORS_MEMFD_H_
