#include "weightd/protocol.h"

#include <limits>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "detail/json_cursor.h"
#include "detail/json_text.h"
#include "nlohmann/json.hpp"

namespace weightd {
namespace {

using json = nlohmann::json;

constexpr std::pair<Op, absl::string_view> kOps[] = {
    {Op::kHello, "hello"},       {Op::kList, "list"},
    {Op::kLoad, "load"},         {Op::kStatus, "status"},
    {Op::kAttach, "attach"},     {Op::kDetach, "detach"},
    {Op::kUnload, "unload"},     {Op::kMetrics, "metrics"},
    {Op::kTakeover, "takeover"}, {Op::kTakeoverDone, "takeover_done"},
    {Op::kUpdate, "update"},     {Op::kWaitGeneration, "wait_generation"},
    {Op::kRollback, "rollback"}, {Op::kRefresh, "refresh"},
};

absl::Status FieldError(absl::string_view ctx, absl::string_view field, absl::string_view want) {
  return absl::InvalidArgumentError(absl::StrCat(ctx, "field '", field, "' must be ", want));
}

absl::StatusOr<int64_t> GetInt(const json& j, absl::string_view ctx, const char* field, int64_t lo,
                               int64_t hi) {
  const json& v = j.at(field);
  if (!v.is_number_integer()) {
    return FieldError(ctx, field, absl::StrCat("an integer in [", lo, ", ", hi, "]"));
  }
  // Unsigned values above int64 max come as number_unsigned.
  if (v.is_number_unsigned() && v.get<uint64_t>() > static_cast<uint64_t>(hi)) {
    return FieldError(ctx, field, absl::StrCat("an integer in [", lo, ", ", hi, "]"));
  }
  const int64_t x = v.get<int64_t>();
  if (x < lo || x > hi) {
    return FieldError(ctx, field, absl::StrCat("an integer in [", lo, ", ", hi, "]"));
  }
  return x;
}

absl::StatusOr<std::string> GetString(const json& j, absl::string_view ctx, const char* field,
                                      size_t max_len = 4096) {
  const json& v = j.at(field);
  if (!v.is_string()) return FieldError(ctx, field, "a string");
  const auto& s = v.get_ref<const std::string&>();
  if (s.size() > max_len) {
    return FieldError(ctx, field, absl::StrCat("a string of at most ", max_len, " bytes"));
  }
  return s;
}

absl::StatusOr<bool> GetBool(const json& j, absl::string_view ctx, const char* field) {
  const json& v = j.at(field);
  if (!v.is_boolean()) return FieldError(ctx, field, "true or false");
  return v.get<bool>();
}

template <typename T>
absl::StatusOr<std::vector<T>> GetIntList(const json& j, absl::string_view ctx, const char* field,
                                          int64_t lo, int64_t hi, size_t max_items = 4096) {
  const json& v = j.at(field);
  const std::string want = absl::StrCat("an array of integers in [", lo, ", ", hi, "]");
  if (!v.is_array() || v.size() > max_items) return FieldError(ctx, field, want);
  std::vector<T> out;
  for (const json& e : v) {
    if (!e.is_number_integer()) return FieldError(ctx, field, want);
    if (e.is_number_unsigned() && e.get<uint64_t>() > static_cast<uint64_t>(hi)) {
      return FieldError(ctx, field, want);
    }
    const int64_t x = e.get<int64_t>();
    if (x < lo || x > hi) return FieldError(ctx, field, want);
    out.push_back(static_cast<T>(x));
  }
  return out;
}

absl::StatusOr<LoadSpec> ParseLoadSpecObject(const json& j, absl::string_view ctx,
                                             const std::vector<std::string>& also_allowed) {
  LoadSpec s;
  bool have_checkpoint = false;
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& k = it.key();
    if (k == "checkpoint") {
      auto v = GetString(j, ctx, "checkpoint");
      if (!v.ok()) return v.status();
      s.checkpoint = *v;
      have_checkpoint = !s.checkpoint.empty();
    } else if (k == "tp") {
      auto v = GetInt(j, ctx, "tp", 1, 1024);
      if (!v.ok()) return v.status();
      s.tp = static_cast<int>(*v);
    } else if (k == "ranks") {
      auto v = GetIntList<int>(j, ctx, "ranks", 0, 1023);
      if (!v.ok()) return v.status();
      s.ranks = *v;
    } else if (k == "devices") {
      auto v = GetIntList<int>(j, ctx, "devices", -1, 1023);
      if (!v.ok()) return v.status();
      s.devices = *v;
    } else if (k == "dtype") {
      auto v = GetString(j, ctx, "dtype", 32);
      if (!v.ok()) return v.status();
      s.dtype = *v;
    } else if (k == "skip") {
      const json& v = j.at("skip");
      if (!v.is_array() || v.size() > 1024) return FieldError(ctx, "skip", "an array of strings");
      for (const json& e : v) {
        if (!e.is_string()) return FieldError(ctx, "skip", "an array of strings");
        s.skip.push_back(e.get<std::string>());
      }
    } else if (k == "recipe_file") {
      auto v = GetString(j, ctx, "recipe_file");
      if (!v.ok()) return v.status();
      s.recipe_file = *v;
    } else if (k == "recipe") {
      auto v = GetString(j, ctx, "recipe", 256);
      if (!v.ok()) return v.status();
      s.recipe = *v;
    } else if (k == "expert_parallel") {
      auto v = GetBool(j, ctx, "expert_parallel");
      if (!v.ok()) return v.status();
      s.expert_parallel = *v;
    } else if (k == "allow_uids") {
      auto v = GetIntList<uint32_t>(j, ctx, "allow_uids", 0, 0xFFFFFFFEll);
      if (!v.ok()) return v.status();
      s.allow_uids = *v;
    } else if (k == "allow_gids") {
      auto v = GetIntList<uint32_t>(j, ctx, "allow_gids", 0, 0xFFFFFFFEll);
      if (!v.ok()) return v.status();
      s.allow_gids = *v;
    } else if (std::find(also_allowed.begin(), also_allowed.end(), k) == also_allowed.end()) {
      return absl::InvalidArgumentError(absl::StrCat(ctx, "unknown field '", k, "'"));
    }
  }
  if (!have_checkpoint) {
    return FieldError(ctx, "checkpoint", "a non-empty string (the checkpoint path)");
  }
  if (!s.devices.empty() && !s.ranks.empty() && s.devices.size() != s.ranks.size()) {
    return absl::InvalidArgumentError(absl::StrCat(ctx, "'devices' has ", s.devices.size(),
                                                   " entries but 'ranks' has ", s.ranks.size()));
  }
  for (int r : s.ranks) {
    if (r >= s.tp) {
      return absl::InvalidArgumentError(
          absl::StrCat(ctx, "rank ", r, " in 'ranks' is not below tp ", s.tp));
    }
  }
  return s;
}

json LoadSpecToJsonObject(const LoadSpec& s) {
  json j;
  j["checkpoint"] = s.checkpoint;
  j["tp"] = s.tp;
  if (!s.ranks.empty()) j["ranks"] = s.ranks;
  if (!s.devices.empty()) j["devices"] = s.devices;
  if (!s.dtype.empty()) j["dtype"] = s.dtype;
  if (!s.skip.empty()) j["skip"] = s.skip;
  if (!s.recipe_file.empty()) j["recipe_file"] = s.recipe_file;
  if (!s.recipe.empty()) j["recipe"] = s.recipe;
  if (s.expert_parallel) j["expert_parallel"] = true;
  if (s.allow_uids) j["allow_uids"] = *s.allow_uids;
  if (s.allow_gids) j["allow_gids"] = *s.allow_gids;
  return j;
}

absl::StatusOr<Request> ParseRequestObject(const json& j) {
  if (!j.is_object()) {
    return absl::InvalidArgumentError("a request must be a JSON object");
  }
  Request r;
  if (auto it = j.find("id"); it != j.end()) {
    if (!it->is_primitive()) {
      return absl::InvalidArgumentError("field 'id' must be a string, number, boolean or null");
    }
    r.id_json = it->dump();
    if (r.id_json.size() > 256) {
      return absl::InvalidArgumentError("field 'id' must be at most 256 bytes of JSON");
    }
  }
  auto op_it = j.find("op");
  if (op_it == j.end() || !op_it->is_string()) {
    return absl::InvalidArgumentError("field 'op' (a string) is missing");
  }
  const std::string& op = op_it->get_ref<const std::string&>();
  bool found = false;
  for (const auto& [o, n] : kOps) {
    if (n == op) {
      r.op = o;
      found = true;
    }
  }
  if (!found) {
    std::vector<absl::string_view> names;
    for (const auto& [o, n] : kOps) names.push_back(n);
    return absl::InvalidArgumentError(absl::StrCat("unknown op '", op.substr(0, 64),
                                                   "'; known ops: ", absl::StrJoin(names, ", ")));
  }
  const std::string ctx = absl::StrCat(op, ": ");
  std::vector<std::string> allowed = {"op", "id"};
  auto need_name = [&]() -> absl::Status {
    if (!r.name) return FieldError(ctx, "name", "a non-empty string (the model name)");
    return absl::OkStatus();
  };
  if (auto it = j.find("name"); it != j.end()) {
    auto v = GetString(j, ctx, "name", 255);
    if (!v.ok()) return v.status();
    if (v->empty()) return FieldError(ctx, "name", "a non-empty string (the model name)");
    for (char c : *v) {
      if (static_cast<unsigned char>(c) < 0x20) {
        return FieldError(ctx, "name", "free of control characters");
      }
    }
    r.name = *v;
  }
  switch (r.op) {
    case Op::kHello: {
      allowed.insert(allowed.end(), {"version", "client"});
      if (!j.contains("version")) return FieldError(ctx, "version", "an integer >= 1");
      auto v = GetInt(j, ctx, "version", 1, std::numeric_limits<int32_t>::max());
      if (!v.ok()) return v.status();
      r.version = static_cast<int>(*v);
      if (j.contains("client")) {
        auto c = GetString(j, ctx, "client", 256);
        if (!c.ok()) return c.status();
        r.client = *c;
      }
      break;
    }
    case Op::kList:
    case Op::kMetrics:
    case Op::kTakeover:
    case Op::kTakeoverDone:
      break;
    case Op::kStatus:
      allowed.push_back("name");
      break;
    case Op::kLoad: {
      allowed.insert(allowed.end(), {"name", "wait"});
      if (auto s = need_name(); !s.ok()) return s;
      if (j.contains("wait")) {
        auto w = GetBool(j, ctx, "wait");
        if (!w.ok()) return w.status();
        r.wait = *w;
      }
      auto spec = ParseLoadSpecObject(j, ctx, allowed);
      if (!spec.ok()) return spec.status();
      r.load = std::move(*spec);
      return r;  // ParseLoadSpecObject checked every field
    }
    case Op::kUpdate: {
      allowed.insert(allowed.end(), {"name", "checkpoint", "wait"});
      if (auto s = need_name(); !s.ok()) return s;
      if (j.contains("checkpoint")) {
        auto v = GetString(j, ctx, "checkpoint");
        if (!v.ok()) return v.status();
        if (v->empty()) return FieldError(ctx, "checkpoint", "a non-empty path when given");
        r.checkpoint = *v;
      }
      if (j.contains("wait")) {
        auto w = GetBool(j, ctx, "wait");
        if (!w.ok()) return w.status();
        r.wait = *w;
      }
      break;
    }
    case Op::kWaitGeneration: {
      allowed.insert(allowed.end(), {"name", "after", "timeout_ms"});
      if (auto s = need_name(); !s.ok()) return s;
      if (!j.contains("after")) return FieldError(ctx, "after", "an integer >= 0");
      auto a = GetInt(j, ctx, "after", 0, std::numeric_limits<int64_t>::max());
      if (!a.ok()) return a.status();
      r.after = static_cast<uint64_t>(*a);
      if (j.contains("timeout_ms")) {
        auto t = GetInt(j, ctx, "timeout_ms", 0, kMaxWaitGenerationMs);
        if (!t.ok()) return t.status();
        r.timeout_ms = *t;
      }
      break;
    }
    case Op::kRollback:
      allowed.push_back("name");
      if (auto s = need_name(); !s.ok()) return s;
      break;
    case Op::kAttach:
    case Op::kDetach:
    case Op::kRefresh: {
      allowed.insert(allowed.end(), {"name", "rank"});
      if (auto s = need_name(); !s.ok()) return s;
      if (!j.contains("rank")) return FieldError(ctx, "rank", "an integer >= 0");
      auto v = GetInt(j, ctx, "rank", 0, 1023);
      if (!v.ok()) return v.status();
      r.rank = static_cast<int>(*v);
      if (r.op == Op::kRefresh && !j.contains("lease")) {
        return FieldError(ctx, "lease", "an integer >= 1 (the lease to refresh)");
      }
      if (r.op == Op::kDetach || r.op == Op::kRefresh) {
        allowed.push_back("lease");
        if (j.contains("lease")) {
          auto l = GetInt(j, ctx, "lease", 1, std::numeric_limits<int64_t>::max());
          if (!l.ok()) return l.status();
          r.lease = static_cast<uint64_t>(*l);
        }
      }
      break;
    }
    case Op::kUnload: {
      allowed.insert(allowed.end(), {"name", "force"});
      if (auto s = need_name(); !s.ok()) return s;
      if (j.contains("force")) {
        auto f = GetBool(j, ctx, "force");
        if (!f.ok()) return f.status();
        r.force = *f;
      }
      break;
    }
  }
  for (auto it = j.begin(); it != j.end(); ++it) {
    if (std::find(allowed.begin(), allowed.end(), it.key()) == allowed.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat(ctx, "unknown field '", it.key().substr(0, 64), "'"));
    }
  }
  return r;
}

}  // namespace

absl::string_view OpName(Op op) {
  for (const auto& [o, n] : kOps) {
    if (o == op) return n;
  }
  return "?";
}

absl::StatusOr<Request> ParseRequest(absl::string_view text) {
  // Parse without exceptions; depth is bounded by nlohmann's recursion only, so a cap on nesting
  // keeps a hostile "[[[[..." from exhausting the stack.
  int depth = 0, max_depth = 0;
  bool in_string = false, escape = false;
  for (char c : text) {
    if (in_string) {
      if (escape) {
        escape = false;
      } else if (c == '\\') {
        escape = true;
      } else if (c == '"') {
        in_string = false;
      }
      continue;
    }
    if (c == '"') in_string = true;
    if (c == '[' || c == '{') max_depth = std::max(max_depth, ++depth);
    if (c == ']' || c == '}') --depth;
  }
  if (max_depth > 16) {
    return absl::InvalidArgumentError("request is nested deeper than 16 levels");
  }
  json j = json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) {
    return absl::InvalidArgumentError("request is not valid JSON (one JSON object per packet)");
  }
  try {
    return ParseRequestObject(j);
  } catch (const json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("malformed request: ", e.what()));
  }
}

absl::StatusOr<std::string> EncodeRequest(const Request& r) {
  // JSON is UTF-8 text; a path or name in another encoding is refused here, naming the field,
  // rather than thrown from the JSON writer.
  const std::string ctx = absl::StrCat(OpName(r.op), ": ");
  std::vector<std::pair<const char*, const std::string*>> texts = {{"client", &r.client}};
  if (r.name) texts.emplace_back("name", &*r.name);
  if (r.op == Op::kUpdate) texts.emplace_back("checkpoint", &r.checkpoint);
  if (r.op == Op::kLoad) {
    texts.insert(texts.end(), {{"checkpoint", &r.load.checkpoint},
                               {"dtype", &r.load.dtype},
                               {"recipe_file", &r.load.recipe_file},
                               {"recipe", &r.load.recipe}});
    for (const std::string& s : r.load.skip) texts.emplace_back("skip", &s);
  }
  for (const auto& [field, text] : texts) {
    const char* why = nullptr;
    const size_t valid = detail::ValidUtf8Prefix(text->data(), text->size(), &why);
    if (valid != text->size()) {
      return absl::InvalidArgumentError(
          absl::StrCat(ctx, "field '", field, "' is not UTF-8 text: byte ", valid, " starts ", why,
                       " (the protocol carries JSON, which is UTF-8)"));
    }
  }
  json j = json::object();
  if (r.op == Op::kLoad) j = LoadSpecToJsonObject(r.load);
  j["op"] = std::string(OpName(r.op));
  j["id"] = json::parse(r.id_json, nullptr, false);
  if (j["id"].is_discarded()) j["id"] = nullptr;
  if (r.name) j["name"] = *r.name;
  switch (r.op) {
    case Op::kHello:
      j["version"] = r.version;
      if (!r.client.empty()) j["client"] = r.client;
      break;
    case Op::kAttach:
    case Op::kDetach:
    case Op::kRefresh:
      j["rank"] = r.rank;
      if (r.op != Op::kAttach && r.lease) j["lease"] = *r.lease;
      break;
    case Op::kUpdate:
      if (!r.checkpoint.empty()) j["checkpoint"] = r.checkpoint;
      if (r.wait) j["wait"] = true;
      break;
    case Op::kWaitGeneration:
      j["after"] = r.after;
      j["timeout_ms"] = r.timeout_ms;
      break;
    case Op::kUnload:
      j["force"] = r.force;
      break;
    case Op::kLoad:
      if (r.wait) j["wait"] = true;
      break;
    default:
      break;
  }
  return detail::DumpJsonText(j, -1, absl::StrCat("the '", OpName(r.op), "' request"));
}

absl::StatusOr<LoadSpec> ParseLoadSpecJson(absl::string_view text, absl::string_view context) {
  json j = json::parse(text.begin(), text.end(), nullptr, false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(context, "expected a JSON object"));
  }
  try {
    return ParseLoadSpecObject(j, context, {});
  } catch (const json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(context, e.what()));
  }
}

std::string LoadSpecToJson(const LoadSpec& spec) { return LoadSpecToJsonObject(spec).dump(); }

namespace {
constexpr std::pair<absl::StatusCode, absl::string_view> kCodes[] = {
    {absl::StatusCode::kPermissionDenied, "PERMISSION_DENIED"},
    {absl::StatusCode::kNotFound, "NOT_FOUND"},
    {absl::StatusCode::kAlreadyExists, "ALREADY_EXISTS"},
    {absl::StatusCode::kInvalidArgument, "INVALID_ARGUMENT"},
    {absl::StatusCode::kFailedPrecondition, "FAILED_PRECONDITION"},
    {absl::StatusCode::kResourceExhausted, "RESOURCE_EXHAUSTED"},
    {absl::StatusCode::kInternal, "INTERNAL"},
    {absl::StatusCode::kUnavailable, "UNAVAILABLE"},
    {absl::StatusCode::kCancelled, "CANCELLED"},
    {absl::StatusCode::kDataLoss, "DATA_LOSS"},
};
}  // namespace

absl::string_view StatusCodeWireName(absl::StatusCode code) {
  for (const auto& [c, n] : kCodes) {
    if (c == code) return n;
  }
  return "INTERNAL";
}

absl::StatusCode StatusCodeFromWireName(absl::string_view name) {
  for (const auto& [c, n] : kCodes) {
    if (n == name) return c;
  }
  return absl::StatusCode::kUnknown;
}

std::string EncodeErrorReply(absl::string_view id_json, const absl::Status& status) {
  json j;
  j["ok"] = false;
  json id = json::parse(id_json.begin(), id_json.end(), nullptr, false);
  j["id"] = id.is_discarded() ? json(nullptr) : id;
  j["error"] = {{"code", std::string(StatusCodeWireName(status.code()))},
                {"message", std::string(status.message())}};
  return j.dump(-1, ' ', false, json::error_handler_t::replace);
}

}  // namespace weightd
