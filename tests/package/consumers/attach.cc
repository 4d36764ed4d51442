// A C++ program built against the packaged weightd/client.h and libweightd_client_cpp.a
// (pkg-config weightd-client-cpp): attaches rank 0 of a model, verifies it, prints its size.
#include <cstdio>

#include "weightd/client.h"

int main(int argc, char** argv) {
  if (argc != 3) return 2;
  auto c = weightd::Client::Connect(argv[1]);
  if (!c.ok()) {
    std::fprintf(stderr, "connect: %s\n", c.status().ToString().c_str());
    return 1;
  }
  auto a = c->Attach(argv[2], 0);
  if (!a.ok() || !a->Verify().ok()) {
    std::fprintf(stderr, "attach: %s\n", a.ok() ? "verify failed" : a.status().ToString().c_str());
    return 1;
  }
  std::printf("c++: %zu tensors, %llu bytes\n", a->tensors().size(),
              static_cast<unsigned long long>(a->total_bytes()));
  return 0;
}
