// What a process holds, read from /proc/<pid> by another process of the same uid: descriptors
// (and how many of them are memfds), threads, resident memory, and memfd mappings. The
// reliability tests compare a daemon's figures before and after a soak. Header-only.
#ifndef WEIGHTD_TESTS_SUPPORT_PROC_RESOURCES_H_
#define WEIGHTD_TESTS_SUPPORT_PROC_RESOURCES_H_

#include <sys/types.h>
#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include "absl/strings/str_format.h"

namespace weightd::testing {

struct ProcResources {
  int fds = -1;         // entries of /proc/<pid>/fd
  int memfd_fds = -1;   // of which link to "/memfd:..."
  int memfd_maps = -1;  // lines of /proc/<pid>/maps mapping a memfd
  int threads = -1;     // "Threads:" of /proc/<pid>/status
  int64_t rss_kib = -1, rss_anon_kib = -1, rss_shmem_kib = -1;  // VmRSS, RssAnon, RssShmem

  bool ok() const { return fds >= 0 && threads >= 0 && rss_kib >= 0; }
  std::string ToString() const {
    return absl::StrFormat(
        "fds=%d memfd_fds=%d memfd_maps=%d threads=%d rss=%d KiB (anon %d, shmem %d)", fds,
        memfd_fds, memfd_maps, threads, rss_kib, rss_anon_kib, rss_shmem_kib);
  }
};

// The figures of `pid`; fields stay -1 when the process is gone or /proc cannot be read.
inline ProcResources ReadProcResources(pid_t pid) {
  ProcResources r;
  const std::string base = "/proc/" + std::to_string(pid);
  std::error_code ec;
  int fds = 0, memfds = 0;
  for (std::filesystem::directory_iterator it(base + "/fd", ec), end; !ec && it != end;
       it.increment(ec)) {
    ++fds;
    std::error_code lec;
    const std::string target = std::filesystem::read_symlink(it->path(), lec).string();
    if (!lec && target.rfind("/memfd:", 0) == 0) ++memfds;
  }
  if (ec) return r;
  r.fds = fds;
  r.memfd_fds = memfds;
  std::ifstream maps(base + "/maps");
  int memfd_maps = 0;
  for (std::string line; std::getline(maps, line);) {
    if (line.find("/memfd:") != std::string::npos) ++memfd_maps;
  }
  r.memfd_maps = memfd_maps;
  std::ifstream status(base + "/status");
  for (std::string line; std::getline(status, line);) {
    std::istringstream in(line);
    std::string key;
    int64_t value = -1;
    in >> key >> value;
    if (key == "Threads:") r.threads = static_cast<int>(value);
    if (key == "VmRSS:") r.rss_kib = value;
    if (key == "RssAnon:") r.rss_anon_kib = value;
    if (key == "RssShmem:") r.rss_shmem_kib = value;
  }
  return r;
}

}  // namespace weightd::testing

#endif  // WEIGHTD_TESTS_SUPPORT_PROC_RESOURCES_H_
