#include "detail/reply.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "detail/json_value.h"
#include "weightd/protocol.h"

namespace weightd::detail {
namespace {

using json = nlohmann::json;

absl::Status Malformed(absl::string_view what) {
  return absl::InternalError(absl::StrCat("malformed reply from weightd: ", what));
}

// Runs `decode`, turning nlohmann's type errors (value() on a field of another type, get<>() on
// the wrong kind of value) into INTERNAL.
template <typename F>
auto Guarded(absl::string_view what, F&& decode) -> decltype(decode()) {
  try {
    return decode();
  } catch (const json::exception& e) {
    return Malformed(absl::StrCat(what, ": ", e.what()));
  }
}

absl::StatusOr<ModelInfo> DecodeModel(const json& j) {
  ModelInfo m;
  auto bad = [](const char* field) {
    return Malformed(absl::StrCat("model field '", field, "' has the wrong type or range"));
  };
  if (!JsonField(j, "name", &m.name)) return bad("name");
  if (!JsonField(j, "state", &m.state)) return bad("state");
  if (!JsonField(j, "checkpoint", &m.checkpoint)) return bad("checkpoint");
  if (!JsonField(j, "backend", &m.backend)) return bad("backend");
  if (!JsonField(j, "error", &m.error)) return bad("error");
  if (!JsonField(j, "tp", &m.tp)) return bad("tp");
  if (!JsonField(j, "bytes_total", &m.bytes_total)) return bad("bytes_total");
  if (!JsonField(j, "bytes_done", &m.bytes_done)) return bad("bytes_done");
  if (!JsonField(j, "seconds", &m.seconds)) return bad("seconds");
  if (!JsonField(j, "generation", &m.generation)) return bad("generation");
  if (!JsonField(j, "previous_generation", &m.previous_generation)) {
    return bad("previous_generation");
  }
  // `update` appears once the model was ever updated; null is taken as absent.
  if (const auto u = j.find("update"); u != j.end() && !u->is_null()) {
    if (!u->is_object()) return bad("update");
    UpdateStatus us;
    if (!JsonField(*u, "state", &us.state)) return bad("update.state");
    if (!JsonField(*u, "generation", &us.generation)) return bad("update.generation");
    if (!JsonField(*u, "bytes_total", &us.bytes_total)) return bad("update.bytes_total");
    if (!JsonField(*u, "bytes_done", &us.bytes_done)) return bad("update.bytes_done");
    if (!JsonField(*u, "seconds", &us.seconds)) return bad("update.seconds");
    if (!JsonField(*u, "error", &us.error)) return bad("update.error");
    m.update = std::move(us);
  }
  const auto ranks = j.find("ranks");
  if (ranks == j.end() || !ranks->is_array()) return m;
  for (const json& r : *ranks) {
    RankStatusInfo ri;
    if (r.is_number_integer()) {  // `list` gives rank numbers only
      if (!JsonTo(r, &ri.rank)) return bad("ranks");
      ri.state = m.state;
    } else if (r.is_object()) {
      if (!JsonField(r, "rank", &ri.rank)) return bad("rank");
      if (!JsonField(r, "device", &ri.device)) return bad("device");
      if (!JsonField(r, "state", &ri.state)) return bad("state");
      if (!JsonField(r, "arena_bytes", &ri.arena_bytes)) return bad("arena_bytes");
      if (!JsonField(r, "tensors", &ri.tensors)) return bad("tensors");
      if (!JsonField(r, "arenas", &ri.arenas)) return bad("arenas");
      const auto leases = r.find("leases");
      if (leases != r.end() && leases->is_array()) {
        for (const json& l : *leases) {
          if (!l.is_object()) continue;
          LeaseStatus ls;
          if (!JsonField(l, "lease", &ls.lease) || !JsonField(l, "pid", &ls.pid) ||
              !JsonField(l, "uid", &ls.uid) || !JsonField(l, "generation", &ls.generation)) {
            return bad("leases");
          }
          ri.leases.push_back(ls);
        }
      }
      // A daemon that lists every lease sends no count.
      ri.lease_count = ri.leases.size();
      if (!JsonField(r, "lease_count", &ri.lease_count)) return bad("lease_count");
    }
    m.ranks.push_back(std::move(ri));
  }
  return m;
}

}  // namespace

absl::StatusOr<json> DecodeReplyPacket(absl::string_view packet, uint64_t id) {
  json j = json::parse(packet.begin(), packet.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InternalError("weightd sent a reply that is not a JSON object");
  }
  return Guarded("reply", [&]() -> absl::StatusOr<json> {
    if (j.contains("id") && j["id"].is_number_unsigned() && j["id"].get<uint64_t>() != id) {
      return absl::InternalError(
          absl::StrCat("reply id ", j["id"].get<uint64_t>(), " != request id ", id));
    }
    if (!j.contains("ok") || !j["ok"].is_boolean()) return Malformed("'ok' is not true or false");
    if (!j["ok"].get<bool>()) {
      const json& e = j.contains("error") && j["error"].is_object() ? j["error"] : json::object();
      const std::string code = e.value("code", "INTERNAL");
      const std::string msg = e.value("message", "weightd sent an error without a message");
      absl::StatusCode c = StatusCodeFromWireName(code);
      // An OK code would turn a refusal into success; unknown codes are not the client's to use.
      if (c == absl::StatusCode::kUnknown || c == absl::StatusCode::kOk) {
        c = absl::StatusCode::kInternal;
      }
      return absl::Status(c, msg);
    }
    if (!j.contains("result")) return json::object();
    if (!j["result"].is_object()) return Malformed("'result' is not an object");
    return std::move(j["result"]);
  });
}

absl::StatusOr<int64_t> DecodeHelloResult(const json& result) {
  if (!result.contains("version") || !result["version"].is_number_integer()) {
    return Malformed("hello result without an integer 'version'");
  }
  if (result["version"].is_number_unsigned() &&
      result["version"].get<uint64_t>() > static_cast<uint64_t>(INT64_MAX)) {
    return Malformed("hello 'version' out of range");
  }
  return result["version"].get<int64_t>();
}

absl::StatusOr<std::vector<ModelInfo>> DecodeModelsResult(const json& result) {
  return Guarded("models", [&]() -> absl::StatusOr<std::vector<ModelInfo>> {
    if (!result.contains("models") || !result["models"].is_array()) {
      return Malformed("no 'models' array");
    }
    std::vector<ModelInfo> out;
    for (const json& m : result["models"]) {
      if (!m.is_object()) continue;
      absl::StatusOr<ModelInfo> info = DecodeModel(m);
      if (!info.ok()) return info.status();
      out.push_back(*std::move(info));
    }
    return out;
  });
}

absl::StatusOr<std::string> DecodeMetricsResult(const json& result) {
  if (!result.contains("text") || !result["text"].is_string()) {
    return Malformed("metrics result without 'text'");
  }
  return result["text"].get<std::string>();
}

absl::StatusOr<int64_t> DecodeFdMessages(const json& result) {
  if (!result.contains("fd_messages")) return 0;
  const json& n = result["fd_messages"];
  if (!n.is_number_integer() || (n.is_number_unsigned() && n.get<uint64_t>() > 1024) ||
      n.get<int64_t>() < 0 || n.get<int64_t>() > 1024) {
    return Malformed("attach 'fd_messages' is not an integer in [0, 1024]");
  }
  return n.get<int64_t>();
}

absl::StatusOr<AttachResult> DecodeAttachResult(const json& result) {
  AttachResult r;
  if (!result.contains("manifest_bytes") || !result["manifest_bytes"].is_number_unsigned() ||
      !result.contains("lease") || !result["lease"].is_number_unsigned()) {
    return absl::InternalError("attach reply lacks manifest_bytes or lease");
  }
  r.lease = result["lease"].get<uint64_t>();
  r.manifest_bytes = result["manifest_bytes"].get<uint64_t>();
  if (!JsonField(result, "generation", &r.generation)) {
    return Malformed("attach 'generation' is not an unsigned integer");
  }
  if (result.contains("arena_ids")) {
    const json& ids = result["arena_ids"];
    if (!ids.is_array()) return Malformed("attach 'arena_ids' is not an array");
    for (const json& id : ids) {
      if (!id.is_number_unsigned()) {
        return Malformed("attach 'arena_ids' holds something other than unsigned integers");
      }
      r.arena_ids.push_back(id.get<uint64_t>());
    }
  }
  if (result.contains("arena_info")) {
    const json& info = result["arena_info"];
    if (!info.is_array()) return Malformed("attach 'arena_info' is not an array");
    r.has_arena_info = true;
    for (const json& a : info) {
      std::string uuid;
      if (a.is_object() && a.contains("device_uuid")) {
        if (!a["device_uuid"].is_string()) {
          return Malformed("attach 'arena_info' has a device_uuid that is not a string");
        }
        uuid = a["device_uuid"].get<std::string>();
      }
      r.device_uuids.push_back(std::move(uuid));
    }
  }
  return r;
}

absl::StatusOr<RefreshResult> DecodeRefreshResult(const json& result) {
  RefreshResult r;
  if (!JsonField(result, "unchanged", &r.unchanged)) {
    return Malformed("refresh 'unchanged' is not true or false");
  }
  if (!r.unchanged) {
    absl::StatusOr<AttachResult> a = DecodeAttachResult(result);
    if (!a.ok()) return a.status();
    r.attach = *std::move(a);
    return r;
  }
  const auto lease = result.find("lease");
  const auto generation = result.find("generation");
  if (lease == result.end() || !JsonTo(*lease, &r.lease) || generation == result.end() ||
      !JsonTo(*generation, &r.generation)) {
    return Malformed("refresh reply 'unchanged' without an unsigned 'lease' and 'generation'");
  }
  return r;
}

absl::StatusOr<UpdateResult> DecodeUpdateResult(const json& result) {
  UpdateResult r;
  const auto generation = result.find("generation");
  const auto state = result.find("state");
  if (generation == result.end() || !JsonTo(*generation, &r.generation) || state == result.end() ||
      !JsonTo(*state, &r.state)) {
    return Malformed("update reply without an unsigned 'generation' and a string 'state'");
  }
  for (const auto& [key, out] : {std::pair<const char*, uint64_t*>{"bytes_read", &r.bytes_read},
                                 {"ranks_rewritten", &r.ranks_rewritten},
                                 {"targets_rewritten", &r.targets_rewritten},
                                 {"targets_copied", &r.targets_copied},
                                 {"segments_rewritten", &r.segments_rewritten},
                                 {"bytes_allocated", &r.bytes_allocated},
                                 {"bytes_copied", &r.bytes_copied}}) {
    if (!JsonField(result, key, out)) {
      return Malformed(absl::StrCat("update '", key, "' is not an unsigned integer"));
    }
  }
  if (!JsonField(result, "seconds", &r.seconds))
    return Malformed("update 'seconds' is not a number");
  return r;
}

absl::StatusOr<GenerationWait> DecodeGenerationWaitResult(const json& result) {
  GenerationWait w;
  const auto generation = result.find("generation");
  const auto timed_out = result.find("timed_out");
  if (generation == result.end() || !JsonTo(*generation, &w.generation) ||
      timed_out == result.end() || !JsonTo(*timed_out, &w.timed_out)) {
    return Malformed(
        "wait_generation reply without an unsigned 'generation' and a boolean 'timed_out'");
  }
  return w;
}

absl::StatusOr<RollbackResult> DecodeRollbackResult(const json& result) {
  RollbackResult r;
  const auto generation = result.find("generation");
  const auto restored = result.find("restored");
  if (generation == result.end() || !JsonTo(*generation, &r.generation) ||
      restored == result.end() || !JsonTo(*restored, &r.restored)) {
    return Malformed("rollback reply without an unsigned 'generation' and 'restored'");
  }
  return r;
}

absl::StatusOr<std::vector<std::string>> CheckAttachManifest(const Manifest& m,
                                                             const AttachResult& reply,
                                                             size_t arena_fds,
                                                             absl::string_view model, int rank) {
  if (m.arenas.size() != arena_fds) {
    return absl::InternalError(absl::StrCat("manifest lists ", m.arenas.size(),
                                            " arenas but weightd sent ", arena_fds, " arena fds"));
  }
  if (m.model != model || static_cast<int64_t>(m.rank) != rank) {
    return absl::InternalError(absl::StrCat("manifest is for model '", m.model, "' rank ", m.rank,
                                            ", not '", model, "' rank ", rank));
  }
  if (!reply.arena_ids.empty() && reply.arena_ids.size() != m.arenas.size()) {
    return absl::InternalError(
        absl::StrCat("attach reply's arena_ids is not an array of ", m.arenas.size(), " entries"));
  }
  if (reply.has_arena_info && reply.device_uuids.size() != m.arenas.size()) {
    return absl::InternalError(
        absl::StrCat("attach reply's arena_info is not an array of ", m.arenas.size(), " entries"));
  }
  std::vector<std::string> uuids(m.arenas.size());
  for (size_t i = 0; i < m.arenas.size(); ++i) {
    if (m.arenas[i].kind == ArenaKind::kHostMemfd) continue;
    if (m.arenas[i].kind != ArenaKind::kCudaVmm) {
      return absl::UnimplementedError(absl::StrCat("model '", model, "' rank ", rank, ": arena ", i,
                                                   " has a kind this client does not know (",
                                                   static_cast<uint32_t>(m.arenas[i].kind), ")"));
    }
    const std::string where =
        absl::StrCat("model '", model, "' rank ", rank, ": arena ", i, " is in GPU memory");
    const std::string uuid = reply.has_arena_info ? reply.device_uuids[i] : std::string();
    if (uuid.empty()) {
      return absl::UnavailableError(absl::StrCat(
          where, " but weightd sent no device_uuid for it (a daemon older than this client)"));
    }
    if (uuid.size() != 32 || uuid.find_first_not_of("0123456789abcdef") != std::string::npos) {
      return absl::InternalError(
          absl::StrCat(where, " with device_uuid '", uuid, "', which is not 32 hex digits"));
    }
    uuids[i] = uuid;
  }
  return uuids;
}

absl::Status CheckSameLayout(const Manifest& current, const Manifest& next, absl::string_view model,
                             int rank) {
  auto differs = [&](const std::string& what) {
    return absl::FailedPreconditionError(
        absl::StrCat("refresh of model '", model, "' rank ", rank,
                     ": the new generation's layout differs from the mapped one (", what,
                     "); detach and attach again"));
  };
  auto dims = [](const std::vector<int64_t>& v) {
    return absl::StrCat("[", absl::StrJoin(v, ","), "]");
  };
  if (next.model != current.model || next.rank != current.rank) {
    return differs(absl::StrCat("the manifest is for model '", next.model, "' rank ", next.rank));
  }
  if (next.arenas.size() != current.arenas.size()) {
    return differs(absl::StrCat(next.arenas.size(), " arenas instead of ", current.arenas.size()));
  }
  for (size_t i = 0; i < current.arenas.size(); ++i) {
    const ManifestArena& a = current.arenas[i];
    const ManifestArena& b = next.arenas[i];
    if (a.kind != b.kind) {
      return differs(absl::StrCat("arena ", i, " kind ", static_cast<uint32_t>(b.kind),
                                  " instead of ", static_cast<uint32_t>(a.kind)));
    }
    if (a.size != b.size) {
      return differs(absl::StrCat("arena ", i, " size ", b.size, " bytes instead of ", a.size));
    }
  }
  if (next.tensors.size() != current.tensors.size()) {
    return differs(
        absl::StrCat(next.tensors.size(), " tensors instead of ", current.tensors.size()));
  }
  for (size_t i = 0; i < current.tensors.size(); ++i) {
    const ManifestTensor& a = current.tensors[i];
    const ManifestTensor& b = next.tensors[i];
    if (a.name != b.name) {
      return differs(absl::StrCat("tensor ", i, " is '", b.name, "' instead of '", a.name, "'"));
    }
    const std::string t = absl::StrCat("tensor '", a.name, "' ");
    if (a.dtype != b.dtype) {
      return differs(
          absl::StrCat(t, "dtype ", DTypeName(b.dtype), " instead of ", DTypeName(a.dtype)));
    }
    if (a.shape != b.shape) {
      return differs(absl::StrCat(t, "shape ", dims(b.shape), " instead of ", dims(a.shape)));
    }
    if (a.strides != b.strides) {
      return differs(absl::StrCat(t, "strides ", dims(b.strides), " instead of ", dims(a.strides)));
    }
    if (a.arena != b.arena) {
      return differs(absl::StrCat(t, "arena ", b.arena, " instead of ", a.arena));
    }
    if (a.offset != b.offset) {
      return differs(absl::StrCat(t, "offset ", b.offset, " instead of ", a.offset));
    }
    if (a.nbytes != b.nbytes) {
      return differs(absl::StrCat(t, "nbytes ", b.nbytes, " instead of ", a.nbytes));
    }
  }
  return absl::OkStatus();
}

}  // namespace weightd::detail
