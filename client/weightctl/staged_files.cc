#include "weightctl/staged_files.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <iostream>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "weightd/status_macros.h"

namespace weightd::cli {

StagedFiles::StagedFiles(std::string dir) : dir_(std::move(dir)) {}

StagedFiles::~StagedFiles() {
  if (absl::Status s = Abort(); !s.ok()) std::cerr << "weightctl: " << s.message() << "\n";
}

absl::StatusOr<const StagedFile*> StagedFiles::Create(const std::string& name) {
  if (done_) {
    return absl::FailedPreconditionError(
        absl::StrCat("cannot stage ", name, " in ", dir_, ": already committed or rolled back"));
  }
  if (name.empty() || name.find('/') != std::string::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot stage '", name, "' in ", dir_, ": not a plain file name"));
  }
  const std::string final_path = absl::StrCat(dir_, "/", name);
  for (const Entry& e : entries_) {
    if (e.file.final_path == final_path) {
      return absl::InvalidArgumentError(absl::StrCat(final_path, " is written twice"));
    }
  }
  Entry e;
  e.name = name;
  e.file.final_path = final_path;
  e.file.temp_path = absl::StrCat(dir_, "/.", name, ".tmp-", getpid());
  // O_EXCL: a temporary of this name can only be another process's (or a crashed run's with the
  // same pid); rollback must never remove a file this object did not create.
  const int fd = open(e.file.temp_path.c_str(), O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0644);
  if (fd < 0) return ErrnoError(errno, absl::StrCat("creating ", e.file.temp_path));
  e.fd = UniqueFd(fd);
  e.file.fd = fd;
  entries_.push_back(std::move(e));
  return &entries_.back().file;
}

absl::Status StagedFiles::SyncDir() const {
  const int fd = open(dir_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return ErrnoError(errno, absl::StrCat("opening the directory ", dir_));
  UniqueFd dir(fd);
  WD_SYSCALL_OR_RETURN(fsync(dir.get()), absl::StrCat("fsync of the directory ", dir_));
  return dir.Close();
}

absl::Status StagedFiles::Commit() {
  if (done_) {
    return absl::FailedPreconditionError(
        absl::StrCat("committing the files of ", dir_, ": already committed or rolled back"));
  }
  auto install = [&]() -> absl::Status {
    for (Entry& e : entries_) {
      WD_SYSCALL_OR_RETURN(fsync(e.fd.get()), absl::StrCat("fsync of ", e.file.temp_path));
      e.file.fd = -1;
      WD_RETURN_IF_ERROR(Annotate(e.fd.Close(), absl::StrCat("closing ", e.file.temp_path)));
    }
    for (Entry& e : entries_) {
      struct stat st = {};
      if (lstat(e.file.final_path.c_str(), &st) == 0) {
        // A directory is left for rename() to refuse (EISDIR), with a message naming it.
        if (!S_ISDIR(st.st_mode)) {
          const std::string backup = absl::StrCat(dir_, "/.", e.name, ".old-", getpid());
          // flags 0: a symlink is kept as the symlink, not as the file it points to.
          if (linkat(AT_FDCWD, e.file.final_path.c_str(), AT_FDCWD, backup.c_str(), 0) == 0) {
            e.backup_path = backup;
          } else if (errno != EPERM && errno != EOPNOTSUPP) {
            return ErrnoError(
                errno, absl::StrCat("keeping the previous ", e.file.final_path, " as ", backup));
          }
          // EPERM, EOPNOTSUPP: a filesystem without hard links (vfat, some FUSE). The previous
          // file is then replaced with nothing to put back on rollback.
        }
      } else if (errno != ENOENT) {
        return ErrnoError(errno, absl::StrCat("stat of ", e.file.final_path));
      }
      WD_SYSCALL_OR_RETURN(rename(e.file.temp_path.c_str(), e.file.final_path.c_str()),
                           absl::StrCat("renaming ", e.file.temp_path, " to ", e.file.final_path));
      e.renamed = true;
    }
    return SyncDir();
  };
  if (absl::Status s = install(); !s.ok()) {
    const absl::Status rollback = Abort();
    if (rollback.ok()) return s;
    return absl::Status(s.code(), absl::StrCat(s.message(), "; ", rollback.message()));
  }
  done_ = true;
  for (const Entry& e : entries_) {
    if (!e.backup_path.empty() && unlink(e.backup_path.c_str()) != 0) {
      std::cerr << "weightctl: "
                << ErrnoError(errno, absl::StrCat("removing ", e.backup_path)).message() << "\n";
    }
  }
  return absl::OkStatus();
}

absl::Status StagedFiles::Abort() {
  if (done_) return absl::OkStatus();
  done_ = true;
  std::vector<std::string> problems;
  auto note = [&](const std::string& what) {
    problems.push_back(std::string(ErrnoError(errno, what).message()));
  };
  // Newest first: the reverse of Commit()'s renames.
  for (auto it = entries_.rbegin(); it != entries_.rend(); ++it) {
    Entry& e = *it;
    e.file.fd = -1;
    e.fd.Reset();
    if (e.renamed) {
      if (!e.backup_path.empty()) {
        if (rename(e.backup_path.c_str(), e.file.final_path.c_str()) != 0) {
          note(absl::StrCat("putting back ", e.file.final_path, " from ", e.backup_path));
        }
      } else if (unlink(e.file.final_path.c_str()) != 0 && errno != ENOENT) {
        note(absl::StrCat("removing ", e.file.final_path));
      }
      continue;
    }
    if (unlink(e.file.temp_path.c_str()) != 0 && errno != ENOENT) {
      note(absl::StrCat("removing ", e.file.temp_path));
    }
    if (!e.backup_path.empty() && unlink(e.backup_path.c_str()) != 0 && errno != ENOENT) {
      note(absl::StrCat("removing ", e.backup_path));
    }
  }
  if (!entries_.empty()) {
    if (absl::Status s = SyncDir(); !s.ok()) problems.push_back(std::string(s.message()));
  }
  if (problems.empty()) return absl::OkStatus();
  return absl::InternalError(
      absl::StrCat("rolling back the output in ", dir_, ": ", absl::StrJoin(problems, "; ")));
}

}  // namespace weightd::cli
