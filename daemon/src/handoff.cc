#include "weightd/handoff.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <map>
#include <optional>
#include <set>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "nlohmann/json.hpp"
#include "weightd/backend.h"
#include "weightd/seqpacket.h"
#include "weightd/status_macros.h"

namespace weightd {
namespace {

using json = nlohmann::json;

constexpr int kAllSeals = F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL;
constexpr char kPrefix[] = "wd1";
// Room left for "wd1.arena." and ".<rank>.<part>" within systemd's 255 characters.
constexpr size_t kMaxTokenChars = 200;
constexpr char kHex[] = "0123456789abcdef";

bool Plain(unsigned char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-';
}

int HexValue(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  return -1;
}

absl::Status BadName(absl::string_view name, absl::string_view why) {
  return absl::InvalidArgumentError(
      absl::StrCat("fd name '", name, "' is not a weightd fd name: ", why));
}

absl::Status BadRecord(absl::string_view field, absl::string_view want) {
  return absl::InvalidArgumentError(
      absl::StrCat("model record: field '", field, "' must be ", want));
}

// "GPU-" then 8-4-4-4-12 hex digits, as FormatGpuUuid writes it.
bool IsGpuUuid(absl::string_view s) {
  if (s.size() != 40 || !absl::StartsWith(s, "GPU-")) return false;
  for (size_t i = 4; i < s.size(); ++i) {
    const bool dash = i == 12 || i == 17 || i == 22 || i == 27;
    if (dash ? s[i] != '-' : !absl::ascii_isxdigit(static_cast<unsigned char>(s[i]))) {
      return false;
    }
  }
  return true;
}

template <typename T>
absl::StatusOr<T> Get(const json& j, const char* field, absl::string_view want) {
  auto it = j.find(field);
  if (it == j.end()) return BadRecord(field, want);
  try {
    return it->get<T>();
  } catch (const json::exception&) {
    return BadRecord(field, want);
  }
}

}  // namespace

std::string ModelToken(absl::string_view model) {
  std::string out;
  for (unsigned char c : model) {
    if (Plain(c)) {
      out += static_cast<char>(c);
    } else {
      out += '_';
      out += kHex[c >> 4];
      out += kHex[c & 15];
    }
  }
  if (out.size() <= kMaxTokenChars) return out;
  uint64_t h = 1469598103934665603ull;  // FNV-1a
  for (unsigned char c : model) {
    h ^= c;
    h *= 1099511628211ull;
  }
  out = "~";
  for (int shift = 60; shift >= 0; shift -= 4) out += kHex[(h >> shift) & 15];
  return out;
}

std::string EncodeFdName(FdKind kind, absl::string_view model, int rank, int part) {
  const std::string token = ModelToken(model);
  switch (kind) {
    case FdKind::kListener:
      return kListenerFdName;
    case FdKind::kRecord:
      return absl::StrCat(kPrefix, ".rec.", token);
    case FdKind::kManifest:
      return absl::StrCat(kPrefix, ".man.", token, ".", rank);
    case FdKind::kArena:
      return absl::StrCat(kPrefix, ".arena.", token, ".", rank, ".", part);
  }
  return "";
}

absl::StatusOr<std::string> DecodeModelToken(absl::string_view token) {
  if (!token.empty() && token[0] == '~') {
    return absl::NotFoundError("the model name is hashed; its record holds the name");
  }
  std::string out;
  for (size_t i = 0; i < token.size(); ++i) {
    const unsigned char c = token[i];
    if (Plain(c)) {
      out += static_cast<char>(c);
      continue;
    }
    if (c != '_' || i + 2 >= token.size()) {
      return absl::InvalidArgumentError(
          absl::StrCat("model token '", token, "' has a bad escape at offset ", i));
    }
    const int hi = HexValue(token[i + 1]), lo = HexValue(token[i + 2]);
    if (hi < 0 || lo < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("model token '", token, "' has a bad escape at offset ", i));
    }
    out += static_cast<char>(hi * 16 + lo);
    i += 2;
  }
  return out;
}

absl::StatusOr<FdName> ParseFdName(absl::string_view name) {
  if (name == kListenerFdName) return FdName{FdKind::kListener, "", 0, 0};
  std::vector<absl::string_view> f = absl::StrSplit(name, '.');
  if (f.size() < 3 || f[0] != kPrefix) return BadName(name, "no 'wd1.' prefix");
  if (f[2].empty()) return BadName(name, "empty model token");
  FdName out;
  out.model_token = std::string(f[2]);
  if (f[1] == "rec") {
    if (f.size() != 3) return BadName(name, "a record name has 3 fields");
    out.kind = FdKind::kRecord;
    return out;
  }
  auto number = [&](absl::string_view text, int* v) {
    return absl::SimpleAtoi(text, v) && *v >= 0 && *v < (1 << 20);
  };
  if (f[1] == "man") {
    if (f.size() != 4 || !number(f[3], &out.rank)) return BadName(name, "wd1.man.<model>.<rank>");
    out.kind = FdKind::kManifest;
    return out;
  }
  if (f[1] == "arena") {
    if (f.size() != 5 || !number(f[3], &out.rank) || !number(f[4], &out.part)) {
      return BadName(name, "wd1.arena.<model>.<rank>.<part>");
    }
    out.kind = FdKind::kArena;
    return out;
  }
  return BadName(name, absl::StrCat("unknown kind '", f[1], "' (rec, man, arena)"));
}

std::string EncodeModelRecord(const ModelRecord& r) {
  json j;
  j["version"] = 1;
  j["name"] = r.name;
  j["backend"] = r.backend;
  j["state"] = r.state;
  j["load"] = json::parse(LoadSpecToJson(r.spec));
  j["allow_uids"] = r.allow_uids;
  j["allow_gids"] = r.allow_gids;
  j["bytes_total"] = r.bytes_total;
  j["load_seconds"] = r.load_seconds;
  j["loaded_unix"] = r.loaded_unix;
  j["generation"] = r.generation;
  json ranks = json::array();
  for (const RankRecord& rr : r.ranks) {
    ranks.push_back({{"rank", rr.rank},
                     {"device", rr.device},
                     {"arena_bytes", rr.arena_bytes},
                     {"manifest_bytes", rr.manifest_bytes},
                     {"tensors", rr.tensors},
                     {"parts", rr.parts},
                     {"device_uuid", rr.device_uuid},
                     {"arena_kind", std::string(ArenaKindToken(rr.arena_kind))}});
  }
  j["ranks"] = std::move(ranks);
  return j.dump(-1, ' ', false, json::error_handler_t::replace);
}

absl::StatusOr<ModelRecord> ParseModelRecord(absl::string_view text) {
  const json j = json::parse(text.begin(), text.end(), nullptr, false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError("model record: not a JSON object");
  }
  ModelRecord r;
  WD_ASSIGN_OR_RETURN(int version, Get<int>(j, "version", "1"));
  if (version != 1) return BadRecord("version", "1");
  WD_ASSIGN_OR_RETURN(r.name, Get<std::string>(j, "name", "a string"));
  if (r.name.empty() || r.name.size() > 255) return BadRecord("name", "1..255 bytes");
  WD_ASSIGN_OR_RETURN(r.backend, Get<std::string>(j, "backend", "a string"));
  WD_ASSIGN_OR_RETURN(r.state, Get<std::string>(j, "state", "a string"));
  if (r.state != "ready") return BadRecord("state", "'ready'");
  auto load = j.find("load");
  if (load == j.end() || !load->is_object()) return BadRecord("load", "an object");
  WD_ASSIGN_OR_RETURN(r.spec, ParseLoadSpecJson(load->dump(), "model record 'load'"));
  WD_ASSIGN_OR_RETURN(r.allow_uids, Get<std::vector<uint32_t>>(j, "allow_uids", "uids"));
  WD_ASSIGN_OR_RETURN(r.allow_gids, Get<std::vector<uint32_t>>(j, "allow_gids", "gids"));
  WD_ASSIGN_OR_RETURN(r.bytes_total, Get<uint64_t>(j, "bytes_total", "an integer"));
  WD_ASSIGN_OR_RETURN(r.load_seconds, Get<double>(j, "load_seconds", "a number"));
  WD_ASSIGN_OR_RETURN(r.loaded_unix, Get<double>(j, "loaded_unix", "a number"));
  if (j.contains("generation")) {  // absent in records of daemons before generations: 1
    WD_ASSIGN_OR_RETURN(r.generation, Get<uint64_t>(j, "generation", "an integer"));
    if (r.generation == 0) return BadRecord("generation", "an integer >= 1");
  }
  auto ranks = j.find("ranks");
  if (ranks == j.end() || !ranks->is_array() || ranks->empty() || ranks->size() > 1024) {
    return BadRecord("ranks", "an array of 1..1024 ranks");
  }
  std::set<int> seen;
  for (const json& jr : *ranks) {
    if (!jr.is_object()) return BadRecord("ranks", "an array of objects");
    RankRecord rr;
    WD_ASSIGN_OR_RETURN(rr.rank, Get<int>(jr, "rank", "an integer"));
    WD_ASSIGN_OR_RETURN(rr.device, Get<int>(jr, "device", "an integer"));
    WD_ASSIGN_OR_RETURN(rr.arena_bytes, Get<uint64_t>(jr, "arena_bytes", "an integer"));
    WD_ASSIGN_OR_RETURN(rr.manifest_bytes, Get<uint64_t>(jr, "manifest_bytes", "an integer"));
    WD_ASSIGN_OR_RETURN(rr.tensors, Get<uint32_t>(jr, "tensors", "an integer"));
    WD_ASSIGN_OR_RETURN(rr.parts, Get<int>(jr, "parts", "an integer"));
    if (rr.rank < 0 || rr.rank >= (1 << 20) || !seen.insert(rr.rank).second) {
      return BadRecord("ranks[].rank", "distinct integers >= 0");
    }
    // One arena per segment (segment_plan.h); daemons before segments wrote 1.
    if (rr.parts < 1 || rr.parts > kMaxArenasPerRank) {
      return BadRecord("ranks[].parts", absl::StrCat("1..", kMaxArenasPerRank));
    }
    if (rr.manifest_bytes == 0 || rr.manifest_bytes > (1ull << 32)) {
      return BadRecord("ranks[].manifest_bytes", "1..4 GiB");
    }
    if (jr.contains("device_uuid")) {
      WD_ASSIGN_OR_RETURN(rr.device_uuid, Get<std::string>(jr, "device_uuid", "a string"));
      if (!rr.device_uuid.empty() && !IsGpuUuid(rr.device_uuid)) {
        return BadRecord("ranks[].device_uuid",
                         "empty or \"GPU-\" and 8-4-4-4-12 hex digits (nvidia-smi's form)");
      }
    }
    if (jr.contains("arena_kind")) {
      WD_ASSIGN_OR_RETURN(const std::string kind, Get<std::string>(jr, "arena_kind", "a string"));
      if (kind == ArenaKindToken(ArenaKind::kHostMemfd)) {
        rr.arena_kind = ArenaKind::kHostMemfd;
      } else if (kind == ArenaKindToken(ArenaKind::kCudaVmm)) {
        rr.arena_kind = ArenaKind::kCudaVmm;
      } else {
        return BadRecord("ranks[].arena_kind", "\"host_memfd\" or \"cuda_vmm\"");
      }
    } else if (r.backend == "host" || r.backend == "cuda") {
      // Written before arenas carried their kind: each backend had exactly one.
      rr.arena_kind = r.backend == "host" ? ArenaKind::kHostMemfd : ArenaKind::kCudaVmm;
    } else {
      return BadRecord("ranks[].arena_kind", "present when 'backend' is neither host nor cuda");
    }
    r.ranks.push_back(rr);
  }
  return r;
}

absl::StatusOr<std::string> ReadSealedMemfd(int fd, uint64_t max_bytes, absl::string_view what) {
  const int seals = ::fcntl(fd, F_GET_SEALS);
  if (seals < 0) {
    return absl::FailedPreconditionError(
        absl::StrCat(what, " is not a memfd (F_GET_SEALS: ", std::strerror(errno), ")"));
  }
  if ((seals & kAllSeals) != kAllSeals) {
    return absl::FailedPreconditionError(absl::StrCat(
        what, " lacks seals (has 0x", absl::Hex(seals), ", needs 0x", absl::Hex(kAllSeals), ")"));
  }
  struct stat st;
  if (::fstat(fd, &st) != 0) return ErrnoError(errno, absl::StrCat("fstat of ", what));
  if (static_cast<uint64_t>(st.st_size) > max_bytes) {
    return absl::FailedPreconditionError(
        absl::StrCat(what, " has ", st.st_size, " bytes, more than the ", max_bytes, " allowed"));
  }
  std::string out(static_cast<size_t>(st.st_size), '\0');
  size_t done = 0;
  while (done < out.size()) {
    const ssize_t n = ::pread(fd, out.data() + done, out.size() - done, done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return ErrnoError(n < 0 ? errno : EIO, absl::StrCat("reading ", what));
    done += static_cast<size_t>(n);
  }
  return out;
}

SortedFds SortNamedFds(std::vector<NamedFd> fds) {
  SortedFds out;
  struct Group {
    std::optional<NamedFd> record;
    std::map<int, NamedFd> manifests;
    std::map<std::pair<int, int>, NamedFd> arenas;
  };
  std::map<std::string, Group> groups;
  std::set<std::string> names;
  auto drop = [&](const std::string& name, absl::string_view why) {
    out.errors.push_back(absl::StrCat("fd '", name, "' dropped: ", why));
    if (name != kListenerFdName) out.dropped_names.push_back(name);
  };
  for (NamedFd& nf : fds) {
    if (!names.insert(nf.name).second) {
      drop(nf.name, "two fds have this name");
      continue;
    }
    auto parsed = ParseFdName(nf.name);
    if (!parsed.ok()) {
      drop(nf.name, parsed.status().message());
      continue;
    }
    switch (parsed->kind) {
      case FdKind::kListener:
        out.listener = std::move(nf.fd);
        break;
      case FdKind::kRecord:
        groups[parsed->model_token].record = std::move(nf);
        break;
      case FdKind::kManifest:
        groups[parsed->model_token].manifests[parsed->rank] = std::move(nf);
        break;
      case FdKind::kArena:
        groups[parsed->model_token].arenas[{parsed->rank, parsed->part}] = std::move(nf);
        break;
    }
  }
  for (auto& entry : groups) {
    // Named, not a structured binding: clang 14 cannot capture bindings in the lambda below.
    const auto& token = entry.first;
    auto& g = entry.second;
    std::vector<std::string> all;
    if (g.record) all.push_back(g.record->name);
    for (auto& [r, nf] : g.manifests) all.push_back(nf.name);
    for (auto& [rp, nf] : g.arenas) all.push_back(nf.name);
    auto fail = [&](absl::string_view why) {
      out.errors.push_back(
          absl::StrCat("model token '", token, "' dropped (", all.size(), " fds): ", why));
      out.dropped_names.insert(out.dropped_names.end(), all.begin(), all.end());
    };
    if (!g.record) {
      fail("no record fd (wd1.rec.<model>)");
      continue;
    }
    auto text = ReadSealedMemfd(g.record->fd.get(), kMaxRecordBytes, "the model record memfd");
    if (!text.ok()) {
      fail(text.status().message());
      continue;
    }
    auto rec = ParseModelRecord(*text);
    if (!rec.ok()) {
      fail(rec.status().message());
      continue;
    }
    if (ModelToken(rec->name) != token) {
      fail(absl::StrCat("the record names model '", rec->name, "', whose token is not '", token,
                        "'"));
      continue;
    }
    AdoptableModel m;
    m.fd_names = all;
    absl::Status s;
    size_t used = 1;
    for (const RankRecord& rr : rec->ranks) {
      AdoptableRank ar;
      ar.record = rr;
      auto mi = g.manifests.find(rr.rank);
      if (mi == g.manifests.end()) {
        s = absl::NotFoundError(absl::StrCat("no manifest fd for rank ", rr.rank));
        break;
      }
      ar.manifest = std::move(mi->second.fd);
      ++used;
      for (int p = 0; p < rr.parts; ++p) {
        auto ai = g.arenas.find({rr.rank, p});
        if (ai == g.arenas.end()) {
          s = absl::NotFoundError(absl::StrCat("no arena fd for rank ", rr.rank, " part ", p));
          break;
        }
        ar.arenas.push_back(std::move(ai->second.fd));
        ++used;
      }
      if (!s.ok()) break;
      m.ranks.push_back(std::move(ar));
    }
    if (s.ok() && used != all.size()) {
      s = absl::InvalidArgumentError(
          absl::StrCat(all.size() - used, " fds name ranks or parts the record lacks"));
    }
    if (!s.ok()) {
      fail(s.message());
      continue;
    }
    m.record = std::move(*rec);
    out.models.push_back(std::move(m));
  }
  return out;
}

namespace {

absl::StatusOr<json> Exchange(int sock, const std::string& request, Packet* packet,
                              int timeout_ms = 30000) {
  WD_RETURN_IF_ERROR(SendPacket(sock, request));
  pollfd p{sock, POLLIN, 0};
  const int r = ::poll(&p, 1, timeout_ms);
  if (r == 0) return absl::DeadlineExceededError("the running daemon did not answer in 30 s");
  if (r < 0) return ErrnoError(errno, "poll on the daemon socket");
  WD_ASSIGN_OR_RETURN(*packet, RecvPacket(sock, 4 << 20));
  if (packet->eof) return absl::UnavailableError("the running daemon closed the connection");
  json j = json::parse(packet->data, nullptr, false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InternalError("the running daemon sent a packet that is not JSON");
  }
  if (!j.value("ok", false)) {
    const json e = j.value("error", json::object());
    const std::string code = e.value("code", "UNKNOWN");
    const std::string msg = absl::StrCat("the running daemon refused: ", e.value("message", ""));
    if (code == "PERMISSION_DENIED") return absl::PermissionDeniedError(msg);
    if (code == "FAILED_PRECONDITION") return absl::FailedPreconditionError(msg);
    return absl::UnknownError(absl::StrCat(msg, " (", code, ")"));
  }
  return j;
}

}  // namespace

absl::StatusOr<std::vector<NamedFd>> RequestTakeover(int sock) {
  Packet p;
  WD_RETURN_IF_ERROR(
      Exchange(sock, R"({"op":"hello","version":1,"id":0,"client":"weightd --takeover"})", &p)
          .status());
  WD_ASSIGN_OR_RETURN(json reply, Exchange(sock, R"({"op":"takeover","id":1})", &p));
  const json res = reply.value("result", json::object());
  const uint64_t packets = res.value("packets", uint64_t{0});
  const uint64_t expected = res.value("fds", uint64_t{0});
  std::vector<NamedFd> out;
  for (uint64_t k = 0; k < packets; ++k) {
    pollfd pf{sock, POLLIN, 0};
    if (::poll(&pf, 1, 30000) != 1) {
      return absl::DeadlineExceededError("the running daemon stopped sending fds");
    }
    WD_ASSIGN_OR_RETURN(Packet pk, RecvPacket(sock, 4 << 20));
    if (pk.eof) return absl::UnavailableError("the running daemon closed during the handoff");
    const json j = json::parse(pk.data, nullptr, false);
    if (j.is_discarded() || !j.contains("names") || !j["names"].is_array() ||
        j["names"].size() != pk.fds.size()) {
      return absl::InternalError(absl::StrCat(
          "handoff packet ", k + 1, " does not name each of its ", pk.fds.size(), " fds"));
    }
    for (size_t i = 0; i < pk.fds.size(); ++i) {
      if (!j["names"][i].is_string()) return absl::InternalError("handoff fd name not a string");
      out.push_back({j["names"][i].get<std::string>(), std::move(pk.fds[i])});
    }
  }
  if (out.size() != expected) {
    return absl::InternalError(
        absl::StrCat("the running daemon announced ", expected, " fds and sent ", out.size()));
  }
  return out;
}

absl::Status ConfirmTakeover(int sock) {
  Packet p;
  return Exchange(sock, R"({"op":"takeover_done","id":2})", &p).status();
}

}  // namespace weightd
