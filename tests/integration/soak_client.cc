// wd_soak_client SOCKET SECONDS SEED MODEL=CHECKPOINT...: one worker of the soak test
// (soak_test.cc). Until SECONDS have passed it connects, calls status, attaches to a model drawn
// from the list (rank 0) and checks what it mapped against the checkpoint (the `hf` recipe at
// T=1 keeps names and bytes): the tensor count, three random tensors byte for byte, and every
// eighth attachment all checksums (Attachment::Verify). It then detaches in one of three ways
// (explicit detach; holding the mapping a while, across forced unloads, and checking it again
// before dropping it; dropping the connection first), so every path that releases a lease runs.
//
// The test driver loads and unloads the models meanwhile, so an attach may be refused: NOT_FOUND
// (not loaded), UNAVAILABLE "still loading", FAILED_PRECONDITION "being unloaded"; and a detach
// after a forced unload finds no lease (NOT_FOUND). Any other error, and any wrong byte, is a
// failure. The last line on stdout is the summary
//   soak_client: iterations=N attaches=A refused=R tensors_checked=T verifies=V errors=E
// Exit 0 when E is 0; 1 otherwise (the first errors go to stderr); 2 for bad arguments.
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "weightd/checkpoint.h"
#include "weightd/client.h"

namespace {

using Clock = std::chrono::steady_clock;

struct Model {
  std::string name;
  weightd::Checkpoint checkpoint;
};

struct Counts {
  uint64_t iterations = 0, attaches = 0, refused = 0, tensors_checked = 0, verifies = 0;
  uint64_t errors = 0;
};

void Error(Counts& c, const std::string& what) {
  if (c.errors++ < 10) std::fprintf(stderr, "soak_client %d: %s\n", ::getpid(), what.c_str());
}

// Attach refusals the driver's loads and unloads explain.
bool ExpectedRefusal(const absl::Status& s) {
  const absl::string_view m = s.message();
  switch (s.code()) {
    case absl::StatusCode::kNotFound:
      return absl::StrContains(m, "no model named");
    case absl::StatusCode::kUnavailable:
      return absl::StrContains(m, "is still loading");
    case absl::StatusCode::kFailedPrecondition:
      return absl::StrContains(m, "is being unloaded");
    default:
      return false;
  }
}

// Compares one tensor of `a` with the checkpoint; false (and an error) on any difference.
bool CheckTensor(const weightd::Attachment& a, const Model& m, const weightd::CheckpointTensor& t,
                 Counts& c) {
  const weightd::TensorView* v = a.Find(t.name);
  if (v == nullptr) {
    Error(c, absl::StrCat(m.name, ": tensor ", t.name, " missing from the attachment"));
    return false;
  }
  auto want = m.checkpoint.MapTensor(t);
  if (!want.ok()) {
    Error(c, absl::StrCat(m.name, ": checkpoint tensor ", t.name, ": ", want.status().ToString()));
    return false;
  }
  std::vector<std::byte> got(v->nbytes);
  if (auto s = a.Read(*v, 0, got.data(), got.size()); !s.ok()) {
    Error(c, absl::StrCat(m.name, ": read ", t.name, ": ", s.ToString()));
    return false;
  }
  if (v->nbytes != want->size() || v->dtype != t.dtype || v->shape != t.shape ||
      std::memcmp(got.data(), want->data(), got.size()) != 0) {
    Error(c, absl::StrCat(m.name, ": tensor ", t.name, " differs from the checkpoint"));
    return false;
  }
  ++c.tensors_checked;
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 5) {
    std::fprintf(stderr, "usage: wd_soak_client SOCKET SECONDS SEED MODEL=CHECKPOINT...\n");
    return 2;
  }
  const std::string socket = argv[1];
  const double seconds = std::atof(argv[2]);
  std::mt19937_64 rng(std::strtoull(argv[3], nullptr, 10));
  std::vector<Model> models;
  for (int i = 4; i < argc; ++i) {
    const std::string arg = argv[i];
    const size_t eq = arg.find('=');
    if (eq == std::string::npos) {
      std::fprintf(stderr, "wd_soak_client: '%s' is not MODEL=CHECKPOINT\n", argv[i]);
      return 2;
    }
    auto ckpt = weightd::Checkpoint::Open(arg.substr(eq + 1));
    if (!ckpt.ok()) {
      std::fprintf(stderr, "wd_soak_client: %s\n", ckpt.status().ToString().c_str());
      return 2;
    }
    models.push_back({arg.substr(0, eq), std::move(*ckpt)});
  }

  Counts c;
  const auto deadline = Clock::now() + std::chrono::duration<double>(seconds);
  auto pick = [&](size_t n) { return std::uniform_int_distribution<size_t>(0, n - 1)(rng); };
  while (Clock::now() < deadline) {
    ++c.iterations;
    auto client = weightd::Client::Connect(socket);
    if (!client.ok()) {
      Error(c, "connect: " + client.status().ToString());
      continue;
    }
    if (auto st = client->Status(); !st.ok()) {
      Error(c, "status: " + st.status().ToString());
      continue;
    }
    const Model& m = models[pick(models.size())];
    auto a = client->Attach(m.name, 0);
    if (!a.ok()) {
      if (ExpectedRefusal(a.status())) {
        ++c.refused;
      } else {
        Error(c, absl::StrCat("attach ", m.name, ": ", a.status().ToString()));
      }
      continue;
    }
    ++c.attaches;
    const auto& tensors = m.checkpoint.tensors();
    if (a->tensors().size() != tensors.size()) {
      Error(c, absl::StrCat(m.name, ": attached ", a->tensors().size(), " tensors, checkpoint has ",
                            tensors.size()));
      continue;
    }
    for (int k = 0; k < 3; ++k) CheckTensor(*a, m, tensors[pick(tensors.size())], c);
    if (c.attaches % 8 == 0) {
      if (auto s = a->Verify(); !s.ok()) Error(c, absl::StrCat(m.name, ": verify: ", s.ToString()));
      ++c.verifies;
    }
    switch (pick(3)) {
      case 0:
        // A forced unload drops the leases, after which detach has none to release.
        if (auto s = a->Detach();
            !s.ok() && !(absl::IsNotFound(s) && absl::StrContains(s.message(), "holds no lease"))) {
          Error(c, absl::StrCat(m.name, ": detach: ", s.ToString()));
        }
        break;
      case 1: {
        // Hold the mapping while the driver may force-unload the model: it must not change.
        std::this_thread::sleep_for(std::chrono::milliseconds(pick(50)));
        if (auto st = client->Status(); !st.ok()) Error(c, "status: " + st.status().ToString());
        CheckTensor(*a, m, tensors[pick(tensors.size())], c);
        break;
      }
      default: {
        // The attachment keeps the connection (and its lease) after the Client goes.
        client = absl::CancelledError("dropped first");
        CheckTensor(*a, m, tensors[pick(tensors.size())], c);
        break;
      }
    }
  }
  std::printf(
      "soak_client: iterations=%llu attaches=%llu refused=%llu tensors_checked=%llu "
      "verifies=%llu errors=%llu\n",
      static_cast<unsigned long long>(c.iterations), static_cast<unsigned long long>(c.attaches),
      static_cast<unsigned long long>(c.refused),
      static_cast<unsigned long long>(c.tensors_checked),
      static_cast<unsigned long long>(c.verifies), static_cast<unsigned long long>(c.errors));
  return c.errors == 0 ? 0 : 1;
}
