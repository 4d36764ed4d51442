// The C ABI (weightd/c_api.h) over the C++ client. Every entry point converts absl::Status to an
// int code plus a thread-local message, and catches every exception (nlohmann_json,
// std::bad_alloc) so that none crosses the C boundary.
#include "weightd/c_api.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <new>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "detail/dlpack.h"
#include "detail/json_value.h"
#include "nlohmann/json.hpp"
#include "weightd/client.h"
#include "weightd/dtype.h"

struct wd_client {
  weightd::Client client;
};

struct wd_attachment {
  explicit wd_attachment(weightd::Attachment a) : att(std::move(a)) {}
  std::atomic<int64_t> refs{1};
  weightd::Attachment att;
};

namespace {

using json = nlohmann::json;

thread_local std::string t_last_error;

int Fail(const absl::Status& s) {
  t_last_error = std::string(s.message());
  return static_cast<int>(s.code());
}
int Fail(int code, std::string message) {
  t_last_error = std::move(message);
  return code;
}

// Runs `f` (returning an int code), converting exceptions to WD_INTERNAL / WD_RESOURCE_EXHAUSTED.
template <typename F>
int Guard(F&& f) noexcept {
  t_last_error.clear();
  try {
    return f();
  } catch (const std::bad_alloc&) {
    return Fail(WD_RESOURCE_EXHAUSTED, "out of memory in libweightd_client");
  } catch (const std::exception& e) {
    return Fail(WD_INTERNAL, absl::StrCat("libweightd_client: unexpected exception: ", e.what()));
  } catch (...) {
    return Fail(WD_INTERNAL, "libweightd_client: unexpected exception");
  }
}

char* CopyString(const std::string& s) {
  char* p = static_cast<char*>(std::malloc(s.size() + 1));
  if (p == nullptr) throw std::bad_alloc();
  std::memcpy(p, s.data(), s.size() + 1);
  return p;
}

int ModelsOut(const absl::StatusOr<std::vector<weightd::ModelInfo>>& models, char** out) {
  if (!models.ok()) return Fail(models.status());
  *out = CopyString(weightd::ModelsToJson(*models));
  return WD_OK;
}

// Reads one optional key of the load options, naming the key and the expected type on error.
// Numbers must have the field's kind and range (2.5 or 4294967297 is not a tp).
template <typename T>
absl::Status Get(const json& o, const char* key, const char* type, T* out) {
  if (weightd::detail::JsonField(o, key, out)) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat("load options: '", key, "' must be ", type, ", got ", o.at(key).dump()));
}

absl::Status ParseLoadOptions(const char* text, weightd::LoadOptions* o) {
  if (text == nullptr || *text == '\0') return absl::OkStatus();
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat("load options must be a JSON object, got: ",
                                                   std::string(text).substr(0, 200)));
  }
  static const char* const kKeys[] = {"tp",         "ranks",     "devices",     "dtype",
                                      "skip",       "recipe",    "recipe_file", "expert_parallel",
                                      "allow_uids", "allow_gids"};
  for (auto it = j.begin(); it != j.end(); ++it) {
    bool known = false;
    for (const char* k : kKeys) known |= it.key() == k;
    if (!known) {
      return absl::InvalidArgumentError(absl::StrCat(
          "load options: unknown key '", it.key(),
          "' (known: tp, ranks, devices, dtype, skip, recipe, recipe_file, expert_parallel, "
          "allow_uids, allow_gids)"));
    }
  }
  absl::Status s;
  s.Update(Get(j, "tp", "an integer", &o->tp));
  s.Update(Get(j, "ranks", "an array of integers", &o->ranks));
  s.Update(Get(j, "devices", "an array of integers", &o->devices));
  s.Update(Get(j, "dtype", "a string", &o->dtype));
  s.Update(Get(j, "skip", "an array of strings", &o->skip));
  s.Update(Get(j, "recipe", "a string", &o->recipe));
  s.Update(Get(j, "recipe_file", "a string", &o->recipe_file));
  s.Update(Get(j, "expert_parallel", "a boolean", &o->expert_parallel));
  std::vector<uint32_t> ids;
  if (j.contains("allow_uids")) {
    s.Update(Get(j, "allow_uids", "an array of uids", &ids));
    o->allow_uids = ids;
  }
  if (j.contains("allow_gids")) {
    ids.clear();
    s.Update(Get(j, "allow_gids", "an array of gids", &ids));
    o->allow_gids = ids;
  }
  return s;
}

void FillInfo(const weightd::TensorView& t, wd_tensor_info* out) {
  out->name = t.name.c_str();
  // DTypeName views a string literal, so it is NUL-terminated.
  out->dtype = weightd::DTypeName(t.dtype).data();
  out->itemsize = weightd::DTypeSize(t.dtype);
  out->ndim = static_cast<int32_t>(t.shape.size());
  out->shape = t.shape.data();
  out->strides = t.strides.data();
  out->data = t.data;
  out->device = t.device;
  out->crc32c = t.crc32c;
  out->nbytes = t.nbytes;
}

#define WD_REQUIRE(cond, what)                           \
  do {                                                   \
    if (!(cond)) return Fail(WD_INVALID_ARGUMENT, what); \
  } while (0)

// ---- DLPack (unversioned ABI, DLPack 0.5-0.8); defined here so the header needs no dlpack.h.
using namespace weightd::dlpack;  // NOLINT(google-build-using-namespace): DLPack constants

// The struct, its shape and strides in one allocation so the deleter frees it all at once.
struct ExportedTensor {
  DLManagedTensor managed;
  wd_attachment* attachment;  // one reference
  std::vector<int64_t> shape, strides;
};

void DeleteExported(DLManagedTensor* self) {
  if (self == nullptr) return;
  auto* e = static_cast<ExportedTensor*>(self->manager_ctx);
  wd_attachment* a = e->attachment;
  delete e;
  wd_attachment_release(a);
}

DLDataType DLType(weightd::DType t) {
  using weightd::DType;
  const uint8_t bits = static_cast<uint8_t>(8 * weightd::DTypeSize(t));
  switch (t) {
    case DType::kF64:
    case DType::kF32:
    case DType::kF16:
      return {kDLFloat, bits, 1};
    case DType::kBF16:
      return {kDLBfloat, bits, 1};
    case DType::kI64:
    case DType::kI32:
    case DType::kI16:
    case DType::kI8:
      return {kDLInt, bits, 1};
    case DType::kBool:
      return {kDLBool, 8, 1};
    case DType::kU64:
    case DType::kU32:
    case DType::kU16:
    case DType::kU8:
    case DType::kF8E4M3:
    case DType::kF8E5M2:
      break;
  }
  return {kDLUInt, bits, 1};
}

}  // namespace

extern "C" {

int wd_abi_version(void) { return WD_ABI_VERSION; }

const char* wd_last_error(void) { return t_last_error.c_str(); }

void wd_string_free(char* s) { std::free(s); }

int wd_connect(const char* socket_path, wd_client** out) {
  return Guard([&]() -> int {
    WD_REQUIRE(out != nullptr, "wd_connect: out is NULL");
    auto c = weightd::Client::Connect(socket_path == nullptr ? "" : socket_path);
    if (!c.ok()) return Fail(c.status());
    *out = new wd_client{std::move(*c)};
    return WD_OK;
  });
}

void wd_client_free(wd_client* c) { delete c; }

int wd_client_version(const wd_client* c) { return c == nullptr ? -1 : c->client.version(); }

int wd_list_json(wd_client* c, char** out_json) {
  return Guard([&]() -> int {
    WD_REQUIRE(c != nullptr && out_json != nullptr, "wd_list_json: client or out_json is NULL");
    return ModelsOut(c->client.List(), out_json);
  });
}

int wd_status_json(wd_client* c, const char* name, char** out_json) {
  return Guard([&]() -> int {
    WD_REQUIRE(c != nullptr && out_json != nullptr, "wd_status_json: client or out_json is NULL");
    std::optional<std::string> n;
    if (name != nullptr) n = name;
    return ModelsOut(c->client.Status(n), out_json);
  });
}

int wd_load(wd_client* c, const char* name, const char* checkpoint, const char* options_json) {
  return Guard([&]() -> int {
    WD_REQUIRE(c != nullptr, "wd_load: client is NULL");
    WD_REQUIRE(name != nullptr && checkpoint != nullptr, "wd_load: name or checkpoint is NULL");
    weightd::LoadOptions o;
    if (absl::Status s = ParseLoadOptions(options_json, &o); !s.ok()) return Fail(s);
    return Fail(c->client.Load(name, checkpoint, o));
  });
}

int wd_unload(wd_client* c, const char* name, int force) {
  return Guard([&]() -> int {
    WD_REQUIRE(c != nullptr && name != nullptr, "wd_unload: client or name is NULL");
    return Fail(c->client.Unload(name, force != 0));
  });
}

int wd_metrics(wd_client* c, char** out_text) {
  return Guard([&]() -> int {
    WD_REQUIRE(c != nullptr && out_text != nullptr, "wd_metrics: client or out_text is NULL");
    auto m = c->client.Metrics();
    if (!m.ok()) return Fail(m.status());
    *out_text = CopyString(*m);
    return WD_OK;
  });
}

namespace {

int UpdateOut(const std::string& name, const absl::StatusOr<weightd::UpdateResult>& r,
              char** out_json) {
  if (!r.ok()) return Fail(r.status());
  if (out_json != nullptr) *out_json = CopyString(weightd::UpdateResultToJson(name, *r));
  return WD_OK;
}

}  // namespace

int wd_update(wd_client* c, const char* name, const char* checkpoint, int wait, char** out_json) {
  return Guard([&]() -> int {
    WD_REQUIRE(c != nullptr, "wd_update: client is NULL");
    WD_REQUIRE(name != nullptr && checkpoint != nullptr, "wd_update: name or checkpoint is NULL");
    return UpdateOut(name, c->client.Update(name, checkpoint, wait != 0), out_json);
  });
}

int wd_update_fd(wd_client* c, const char* name, int memfd, int wait, char** out_json) {
  return Guard([&]() -> int {
    WD_REQUIRE(c != nullptr && name != nullptr, "wd_update_fd: client or name is NULL");
    return UpdateOut(name, c->client.UpdateFromFd(name, memfd, wait != 0), out_json);
  });
}

int wd_wait_generation(wd_client* c, const char* name, uint64_t after, int64_t timeout_ms,
                       uint64_t* generation, int* timed_out) {
  return Guard([&]() -> int {
    WD_REQUIRE(c != nullptr && name != nullptr && generation != nullptr,
               "wd_wait_generation: client, name or generation is NULL");
    if (timeout_ms < 0) {
      return Fail(WD_INVALID_ARGUMENT,
                  absl::StrCat("wd_wait_generation: timeout_ms ", timeout_ms, " is negative"));
    }
    auto w = c->client.WaitGeneration(name, after, absl::Milliseconds(timeout_ms));
    if (!w.ok()) return Fail(w.status());
    *generation = w->generation;
    if (timed_out != nullptr) *timed_out = w->timed_out ? 1 : 0;
    return WD_OK;
  });
}

int wd_rollback(wd_client* c, const char* name, uint64_t* generation) {
  return Guard([&]() -> int {
    WD_REQUIRE(c != nullptr && name != nullptr, "wd_rollback: client or name is NULL");
    auto r = c->client.Rollback(name);
    if (!r.ok()) return Fail(r.status());
    if (generation != nullptr) *generation = r->generation;
    return WD_OK;
  });
}

int wd_attach(wd_client* c, const char* name, int rank, wd_attachment** out) {
  return Guard([&]() -> int {
    WD_REQUIRE(c != nullptr && name != nullptr && out != nullptr,
               "wd_attach: client, name or out is NULL");
    auto a = c->client.Attach(name, rank);
    if (!a.ok()) return Fail(a.status());
    *out = new wd_attachment(std::move(*a));
    return WD_OK;
  });
}

wd_attachment* wd_attachment_retain(wd_attachment* a) {
  if (a != nullptr) a->refs.fetch_add(1, std::memory_order_relaxed);
  return a;
}

void wd_attachment_release(wd_attachment* a) {
  if (a == nullptr) return;
  if (a->refs.fetch_sub(1, std::memory_order_acq_rel) == 1) {
    // The destructor detaches: a failure there (daemon gone) is harmless, the lease dies with
    // the connection.
    delete a;
  }
}

int64_t wd_attachment_refcount(const wd_attachment* a) {
  return a == nullptr ? 0 : a->refs.load(std::memory_order_acquire);
}

const char* wd_attachment_model(const wd_attachment* a) {
  return a == nullptr ? "" : a->att.model().c_str();
}
int wd_attachment_rank(const wd_attachment* a) { return a == nullptr ? -1 : a->att.rank(); }
uint64_t wd_attachment_lease(const wd_attachment* a) { return a == nullptr ? 0 : a->att.lease(); }
uint64_t wd_attachment_total_bytes(const wd_attachment* a) {
  return a == nullptr ? 0 : a->att.total_bytes();
}
uint64_t wd_attachment_generation(const wd_attachment* a) {
  return a == nullptr ? 0 : a->att.generation();
}

int wd_attachment_refresh(wd_attachment* a, int* changed) {
  return Guard([&]() -> int {
    WD_REQUIRE(a != nullptr, "wd_attachment_refresh: attachment is NULL");
    // Exported DLPack tensors hold references; they keep working, the addresses do not move.
    auto r = a->att.Refresh();
    if (!r.ok()) return Fail(r.status());
    if (changed != nullptr) *changed = *r ? 1 : 0;
    return WD_OK;
  });
}

size_t wd_attachment_num_tensors(const wd_attachment* a) {
  return a == nullptr ? 0 : a->att.tensors().size();
}

int wd_attachment_tensor(const wd_attachment* a, size_t index, wd_tensor_info* out) {
  return Guard([&]() -> int {
    WD_REQUIRE(a != nullptr && out != nullptr, "wd_attachment_tensor: attachment or out is NULL");
    const auto& ts = a->att.tensors();
    if (index >= ts.size()) {
      return Fail(WD_OUT_OF_RANGE,
                  absl::StrCat("tensor index ", index, " out of range: model '", a->att.model(),
                               "' rank ", a->att.rank(), " has ", ts.size(), " tensors"));
    }
    FillInfo(ts[index], out);
    return WD_OK;
  });
}

int wd_attachment_tensors(const wd_attachment* a, wd_tensor_info* out, size_t n) {
  return Guard([&]() -> int {
    WD_REQUIRE(a != nullptr && (out != nullptr || n == 0),
               "wd_attachment_tensors: attachment or out is NULL");
    const auto& ts = a->att.tensors();
    if (n > ts.size()) {
      return Fail(WD_OUT_OF_RANGE,
                  absl::StrCat("asked for ", n, " tensors but model '", a->att.model(), "' rank ",
                               a->att.rank(), " has ", ts.size()));
    }
    for (size_t i = 0; i < n; ++i) FillInfo(ts[i], &out[i]);
    return WD_OK;
  });
}

int wd_attachment_find(const wd_attachment* a, const char* name, size_t* index) {
  return Guard([&]() -> int {
    WD_REQUIRE(a != nullptr && name != nullptr && index != nullptr,
               "wd_attachment_find: attachment, name or index is NULL");
    const weightd::TensorView* t = a->att.Find(name);
    if (t == nullptr) {
      return Fail(WD_NOT_FOUND, absl::StrCat("no tensor '", name, "' in model '", a->att.model(),
                                             "' rank ", a->att.rank()));
    }
    *index = static_cast<size_t>(t - a->att.tensors().data());
    return WD_OK;
  });
}

int wd_attachment_verify(const wd_attachment* a) {
  return Guard([&]() -> int {
    WD_REQUIRE(a != nullptr, "wd_attachment_verify: attachment is NULL");
    return Fail(a->att.Verify());
  });
}

int wd_attachment_read(const wd_attachment* a, size_t index, uint64_t offset, void* dst,
                       uint64_t n) {
  return Guard([&]() -> int {
    WD_REQUIRE(a != nullptr && (dst != nullptr || n == 0),
               "wd_attachment_read: attachment or dst is NULL");
    const auto& ts = a->att.tensors();
    if (index >= ts.size()) {
      return Fail(WD_OUT_OF_RANGE, absl::StrCat("wd_attachment_read: tensor index ", index,
                                                " >= ", ts.size(), " tensors"));
    }
    return Fail(a->att.Read(ts[index], offset, dst, n));
  });
}

int wd_attachment_detach(wd_attachment* a) {
  return Guard([&]() -> int {
    WD_REQUIRE(a != nullptr, "wd_attachment_detach: attachment is NULL");
    const int64_t refs = a->refs.load(std::memory_order_acquire);
    if (refs > 1) {
      return Fail(
          WD_FAILED_PRECONDITION,
          absl::StrCat("cannot detach model '", a->att.model(), "' rank ", a->att.rank(), ": ",
                       refs - 1, " other references (exported tensors) still use its memory"));
    }
    return Fail(a->att.Detach());
  });
}

int wd_attachment_export_dlpack(wd_attachment* a, size_t index, void** out) {
  return Guard([&]() -> int {
    WD_REQUIRE(a != nullptr && out != nullptr,
               "wd_attachment_export_dlpack: attachment or out is NULL");
    const auto& ts = a->att.tensors();
    if (index >= ts.size()) {
      return Fail(WD_OUT_OF_RANGE,
                  absl::StrCat("tensor index ", index, " out of range: model '", a->att.model(),
                               "' rank ", a->att.rank(), " has ", ts.size(), " tensors"));
    }
    const weightd::TensorView& t = ts[index];
    if (t.data == nullptr && t.nbytes > 0) {
      return Fail(WD_UNIMPLEMENTED, absl::StrCat("tensor '", t.name, "' of model '", a->att.model(),
                                                 "' is in memory of device ", t.device,
                                                 " that this client did not map"));
    }
    auto* e = new ExportedTensor;
    e->shape = t.shape;
    e->strides = t.strides;
    DLTensor& d = e->managed.dl_tensor;
    // DLPack wants a non-NULL data pointer even for empty tensors on some consumers.
    static const char kEmpty[1] = {0};
    d.data = const_cast<void*>(t.data != nullptr ? t.data : kEmpty);
    d.device = t.device < 0 ? DLDevice{kDLCPU, 0} : DLDevice{kDLCUDA, t.device};
    d.ndim = static_cast<int32_t>(t.shape.size());
    d.dtype = DLType(t.dtype);
    d.shape = e->shape.data();
    d.strides = e->strides.data();
    d.byte_offset = 0;
    e->attachment = wd_attachment_retain(a);
    e->managed.manager_ctx = e;
    e->managed.deleter = &DeleteExported;
    *out = &e->managed;
    return WD_OK;
  });
}

}  // extern "C"
