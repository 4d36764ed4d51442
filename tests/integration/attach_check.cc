// wd_attach_check SOCKET MODEL RANK CHECKPOINT: attaches to MODEL's RANK with the C++ client and
// checks (host or device memory) that every tensor equals the checkpoint tensor of the same name byte for byte (the
// `hf` recipe at T=1 keeps names and bytes), and that the manifest checksums hold. Exit 0 when
// all match; 1 with a message otherwise. Used by the integration tests from many processes.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "weightd/checkpoint.h"
#include "weightd/client.h"

int main(int argc, char** argv) {
  if (argc != 5) {
    std::fprintf(stderr, "usage: wd_attach_check SOCKET MODEL RANK CHECKPOINT\n");
    return 2;
  }
  auto ckpt = weightd::Checkpoint::Open(argv[4]);
  if (!ckpt.ok()) {
    std::fprintf(stderr, "checkpoint: %s\n", ckpt.status().ToString().c_str());
    return 1;
  }
  auto client = weightd::Client::Connect(argv[1]);
  if (!client.ok()) {
    std::fprintf(stderr, "connect: %s\n", client.status().ToString().c_str());
    return 1;
  }
  auto a = client->Attach(argv[2], std::atoi(argv[3]));
  if (!a.ok()) {
    std::fprintf(stderr, "attach: %s\n", a.status().ToString().c_str());
    return 1;
  }
  if (a->tensors().size() != ckpt->tensors().size()) {
    std::fprintf(stderr, "attached %zu tensors, checkpoint has %zu\n", a->tensors().size(),
                 ckpt->tensors().size());
    return 1;
  }
  for (const weightd::CheckpointTensor& t : ckpt->tensors()) {
    const weightd::TensorView* v = a->Find(t.name);
    if (v == nullptr) {
      std::fprintf(stderr, "tensor %s missing from the attachment\n", t.name.c_str());
      return 1;
    }
    auto bytes = ckpt->MapTensor(t);
    // Read() copies device tensors back through the client's own mapping, host ones by memcpy.
    std::vector<std::byte> got(v->nbytes);
    if (auto s = a->Read(*v, 0, got.data(), got.size()); !s.ok()) {
      std::fprintf(stderr, "read %s: %s\n", t.name.c_str(), s.ToString().c_str());
      return 1;
    }
    if (!bytes.ok() || v->nbytes != bytes->size() || v->dtype != t.dtype || v->shape != t.shape ||
        std::memcmp(got.data(), bytes->data(), v->nbytes) != 0) {
      std::fprintf(stderr, "tensor %s differs from the checkpoint\n", t.name.c_str());
      return 1;
    }
  }
  if (auto s = a->Verify(); !s.ok()) {
    std::fprintf(stderr, "verify: %s\n", s.ToString().c_str());
    return 1;
  }
  std::printf("ok %zu tensors\n", a->tensors().size());
  return 0;
}
