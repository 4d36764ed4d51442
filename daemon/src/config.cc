#include "weightd/config.h"

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"
#include "weightd/executor.h"
#include "weightd/file_util.h"
#include "weightd/http_endpoint.h"
#include "weightd/log.h"
#include "weightd/status_macros.h"

namespace weightd {
namespace {

using json = nlohmann::json;

absl::Status KeyError(absl::string_view source, absl::string_view key, absl::string_view want) {
  return absl::InvalidArgumentError(absl::StrCat(source, ": key '", key, "' must be ", want));
}

absl::StatusOr<std::vector<uint32_t>> IdList(const json& v, absl::string_view source,
                                             absl::string_view key) {
  std::vector<uint32_t> out;
  if (!v.is_array()) return KeyError(source, key, "an array of numeric ids");
  for (const json& e : v) {
    if (!e.is_number_unsigned() || e.get<uint64_t>() > 0xFFFFFFFEull) {
      return KeyError(source, key, "an array of numeric ids");
    }
    out.push_back(e.get<uint32_t>());
  }
  return out;
}

absl::StatusOr<int64_t> PositiveInt(const json& v, absl::string_view source, absl::string_view key,
                                    int64_t max) {
  if (!v.is_number_integer() || v.get<int64_t>() < 1 || v.get<int64_t>() > max) {
    return KeyError(source, key, absl::StrCat("an integer in [1, ", max, "]"));
  }
  return v.get<int64_t>();
}

// An integer, or a string with a unit ("1GiB"); `example` completes the error message.
absl::StatusOr<uint64_t> ByteCount(const json& v, absl::string_view source, absl::string_view key,
                                   absl::string_view example) {
  if (v.is_number_unsigned()) return v.get<uint64_t>();
  if (v.is_string()) return ParseByteSize(v.get<std::string>(), absl::StrCat(source, ": ", key));
  return KeyError(source, key,
                  absl::StrCat("a byte count (integer, or a string such as ", example, ")"));
}

absl::StatusOr<DaemonConfig> ParseConfigObject(const json& j, absl::string_view source) {
  if (!j.is_object())
    return absl::InvalidArgumentError(absl::StrCat(source, ": not a JSON object"));
  DaemonConfig c;
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& k = it.key();
    const json& v = it.value();
    if (k == "socket") {
      if (!v.is_string()) return KeyError(source, k, "a string");
      c.socket = v.get<std::string>();
    } else if (k == "backend") {
      if (!v.is_string()) return KeyError(source, k, "\"auto\", \"cuda\" or \"host\"");
      c.backend = v.get<std::string>();
      if (c.backend != "auto" && c.backend != "cuda" && c.backend != "host") {
        return KeyError(source, k, "\"auto\", \"cuda\" or \"host\"");
      }
    } else if (k == "pinned_budget") {
      WD_ASSIGN_OR_RETURN(c.pinned_budget, ByteCount(v, source, k, "\"1GiB\""));
      if (c.pinned_budget < (1u << 20)) return KeyError(source, k, "at least 1 MiB");
    } else if (k == "device_memory_budget") {
      WD_ASSIGN_OR_RETURN(c.device_memory_budget,
                          ByteCount(v, source, k, "\"40GiB\"; 0 = no budget"));
    } else if (k == "host_memory_budget") {
      WD_ASSIGN_OR_RETURN(c.host_memory_budget,
                          ByteCount(v, source, k, "\"64GiB\"; 0 = no budget"));
    } else if (k == "allow_uids") {
      WD_ASSIGN_OR_RETURN(c.allow_uids, IdList(v, source, k));
    } else if (k == "allow_gids") {
      WD_ASSIGN_OR_RETURN(c.allow_gids, IdList(v, source, k));
    } else if (k == "model_roots") {
      if (!v.is_array()) return KeyError(source, k, "an array of directory paths");
      for (const json& e : v) {
        if (!e.is_string() || e.get<std::string>().empty()) {
          return KeyError(source, k, "an array of directory paths");
        }
        c.model_roots.push_back(e.get<std::string>());
      }
    } else if (k == "preload") {
      if (!v.is_array()) return KeyError(source, k, "an array of {\"name\":..,\"checkpoint\":..}");
      for (size_t i = 0; i < v.size(); ++i) {
        const json& e = v[i];
        const std::string ctx = absl::StrCat(source, ": preload[", i, "]: ");
        if (!e.is_object() || !e.contains("name") || !e["name"].is_string() ||
            e["name"].get<std::string>().empty()) {
          return absl::InvalidArgumentError(absl::StrCat(ctx, "needs a non-empty string 'name'"));
        }
        json spec = e;
        spec.erase("name");
        WD_ASSIGN_OR_RETURN(LoadSpec s, ParseLoadSpecJson(spec.dump(), ctx));
        c.preload.push_back({e["name"].get<std::string>(), std::move(s)});
      }
    } else if (k == "max_connections") {
      WD_ASSIGN_OR_RETURN(int64_t n, PositiveInt(v, source, k, 1 << 20));
      c.max_connections = static_cast<int>(n);
    } else if (k == "max_connections_per_uid") {
      WD_ASSIGN_OR_RETURN(int64_t n, PositiveInt(v, source, k, 1 << 20));
      c.max_connections_per_uid = static_cast<int>(n);
    } else if (k == "max_leases_per_connection") {
      WD_ASSIGN_OR_RETURN(int64_t n, PositiveInt(v, source, k, 1 << 20));
      c.max_leases_per_connection = static_cast<int>(n);
    } else if (k == "keep_previous_generation") {
      if (!v.is_boolean()) return KeyError(source, k, "true or false");
      c.keep_previous_generation = v.get<bool>();
    } else if (k == "arena_segment_bytes") {
      WD_ASSIGN_OR_RETURN(c.arena_segment_bytes,
                          ByteCount(v, source, k, "\"256MiB\"; 0 = one arena per rank"));
    } else if (k == "max_request_bytes") {
      WD_ASSIGN_OR_RETURN(int64_t n, PositiveInt(v, source, k, 16 << 20));
      if (n < 1024) return KeyError(source, k, "at least 1024");
      c.max_request_bytes = static_cast<uint64_t>(n);
    } else if (k == "hello_timeout_ms") {
      WD_ASSIGN_OR_RETURN(int64_t n, PositiveInt(v, source, k, 3600 * 1000));
      c.hello_timeout_ms = static_cast<int>(n);
    } else if (k == "io_threads") {
      WD_ASSIGN_OR_RETURN(int64_t n, PositiveInt(v, source, k, 256));
      c.io_threads = static_cast<int>(n);
    } else if (k == "io_mode") {
      if (!v.is_string() || !ParseIoMode(v.get<std::string>()).ok()) {
        return KeyError(source, k, "one of auto, pread, uring");
      }
      c.io_mode = v.get<std::string>();
    } else if (k == "host_prefault") {
      // Accepted so that files written for 0.1.0 still load.
      if (!v.is_boolean()) return KeyError(source, k, "true or false");
      c.warnings.push_back(absl::StrCat(
          source, ": key 'host_prefault' is obsolete and ignored: host arenas are written with "
                  "pwrite, which faults no pages"));
    } else if (k == "log_level") {
      if (!v.is_string()) return KeyError(source, k, "error|warning|notice|info|debug");
      c.log_level = v.get<std::string>();
      if (!ParseLogLevel(c.log_level).ok()) {
        return KeyError(source, k, "one of error, warning, notice, info, debug");
      }
    } else if (k == "metrics_listen") {
      if (!v.is_string()) {
        return KeyError(source, k, "a string such as \"127.0.0.1:9464\" (or \"\" for none)");
      }
      c.metrics_listen = v.get<std::string>();
      if (!c.metrics_listen.empty()) {
        WD_RETURN_IF_ERROR(
            ParseListenAddress(c.metrics_listen, absl::StrCat(source, ": key 'metrics_listen'"))
                .status());
      }
    } else if (k == "socket_mode") {
      if (!v.is_string()) return KeyError(source, k, "an octal string such as \"0660\"");
      const std::string s = v.get<std::string>();
      char* end = nullptr;
      const unsigned long mode = std::strtoul(s.c_str(), &end, 8);
      if (s.empty() || *end != '\0' || mode > 0777) {
        return KeyError(source, k, "an octal string such as \"0660\"");
      }
      c.socket_mode = static_cast<uint32_t>(mode);
    } else {
      return absl::InvalidArgumentError(absl::StrCat(
          source, ": unknown key '", k,
          "' (known: socket, backend, pinned_budget, device_memory_budget, host_memory_budget, "
          "allow_uids, allow_gids, model_roots, "
          "preload, max_connections, max_connections_per_uid, max_leases_per_connection, "
          "keep_previous_generation, arena_segment_bytes, max_request_bytes, hello_timeout_ms, "
          "io_threads, io_mode, log_level, metrics_listen, socket_mode)"));
    }
  }
  return c;
}

}  // namespace

absl::StatusOr<DaemonConfig> ParseConfig(absl::string_view text, absl::string_view source) {
  json j = json::parse(text.begin(), text.end(), nullptr, false);
  if (j.is_discarded()) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": not valid JSON"));
  }
  try {
    return ParseConfigObject(j, source);
  } catch (const json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": ", e.what()));
  }
}

absl::StatusOr<DaemonConfig> LoadConfigFile(const std::string& path) {
  WD_ASSIGN_OR_RETURN(std::string text, ReadFileToString(path, 16 << 20));
  return ParseConfig(text, path);
}

absl::StatusOr<uint64_t> ParseByteSize(absl::string_view text, absl::string_view what) {
  absl::string_view t = absl::StripAsciiWhitespace(text);
  size_t i = 0;
  while (i < t.size() && absl::ascii_isdigit(t[i])) ++i;
  uint64_t n = 0;
  if (i == 0 || !absl::SimpleAtoi(t.substr(0, i), &n)) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": '", text, "' is not a byte count (e.g. 1073741824, 1GiB, 512M)"));
  }
  const std::string suffix = absl::AsciiStrToLower(t.substr(i));
  uint64_t mul = 1;
  if (suffix.empty() || suffix == "b")
    mul = 1;
  else if (suffix == "k" || suffix == "kb")
    mul = 1000ull;
  else if (suffix == "m" || suffix == "mb")
    mul = 1000ull * 1000;
  else if (suffix == "g" || suffix == "gb")
    mul = 1000ull * 1000 * 1000;
  else if (suffix == "t" || suffix == "tb")
    mul = 1000ull * 1000 * 1000 * 1000;
  else if (suffix == "kib")
    mul = 1ull << 10;
  else if (suffix == "mib")
    mul = 1ull << 20;
  else if (suffix == "gib")
    mul = 1ull << 30;
  else if (suffix == "tib")
    mul = 1ull << 40;
  else {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": unknown unit '", t.substr(i), "' in '", text, "'"));
  }
  uint64_t out;
  if (__builtin_mul_overflow(n, mul, &out)) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": '", text, "' overflows 64 bits"));
  }
  return out;
}

}  // namespace weightd
