// StagedFiles: writes a set of files into one directory so that no reader ever sees a partial
// file under its final name, and a run that fails leaves the directory as it found it.
//
//   StagedFiles staged("/models/Llama-3-8B-tp4");
//   WD_ASSIGN_OR_RETURN(const StagedFile* f, staged.Create("model-rank-0-part-0.safetensors"));
//   ... pwrite(f->fd, ...), errors naming f->temp_path ...
//   WD_RETURN_IF_ERROR(staged.Commit());  // or return early: the destructor rolls back
//
// Each file is written under a temporary name beside its final one, DIR/.NAME.tmp-<pid>,
// created with O_EXCL. Commit() fsyncs and closes every temporary, renames each into place in
// the order of Create(), then fsyncs the directory. A previous file at a final name is kept
// as DIR/.NAME.old-<pid> (a hard link) until every rename has succeeded, and is removed
// only then; on a filesystem without hard links (vfat, some FUSE) it is replaced with no copy
// kept.
//
// Rollback (a failed Commit(), Abort(), or destruction before Commit()) removes every
// temporary, removes every file this object renamed into place and renames the kept previous
// files back, so each final name is as it was before the run: absent, or the old file. A crash
// (SIGKILL, power loss) can leave .NAME.tmp-<pid> and .NAME.old-<pid> files behind, but a final
// name only ever holds a complete, fsynced file.
//
// Not thread-safe. The descriptors belong to this object: valid until Commit() or rollback.
#ifndef WEIGHTD_CLIENT_WEIGHTCTL_STAGED_FILES_H_
#define WEIGHTD_CLIENT_WEIGHTCTL_STAGED_FILES_H_

#include <deque>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "weightd/unique_fd.h"

namespace weightd::cli {

struct StagedFile {
  std::string final_path;  // DIR/NAME
  std::string temp_path;   // DIR/.NAME.tmp-<pid>: name this one in write errors
  int fd = -1;             // open read-write on temp_path, owned by the StagedFiles
};

class StagedFiles {
 public:
  // `dir` must exist; it is not created.
  explicit StagedFiles(std::string dir);
  StagedFiles(const StagedFiles&) = delete;
  StagedFiles& operator=(const StagedFiles&) = delete;
  // Rolls back unless Commit() succeeded; cleanup failures are printed on stderr, each naming
  // the file left behind.
  ~StagedFiles();

  // Creates the empty temporary for DIR/`name` (mode 0644 less the umask). `name` is a plain
  // file name without '/'. The pointer stays valid for the life of this object. Errors name the
  // temporary and the errno text; creating the same name twice is INVALID_ARGUMENT.
  absl::StatusOr<const StagedFile*> Create(const std::string& name);

  // Makes every created file durable under its final name (see the file comment). On error the
  // whole set is rolled back and the returned status names the file and the errno text, plus
  // any file the rollback could not restore. Call at most once.
  absl::Status Commit();

  // Rolls back now. Returns an error naming every file that could not be removed or restored.
  // A no-op after Commit() or a previous rollback.
  absl::Status Abort();

 private:
  struct Entry {
    std::string name;
    StagedFile file;
    UniqueFd fd;
    std::string backup_path;  // DIR/.NAME.old-<pid>, once the previous file is linked there
    bool renamed = false;     // temp_path is now final_path
  };
  absl::Status SyncDir() const;

  std::string dir_;
  std::deque<Entry> entries_;  // a deque: Create() hands out pointers into it
  bool done_ = false;          // committed or rolled back
};

}  // namespace weightd::cli

#endif  // WEIGHTD_CLIENT_WEIGHTCTL_STAGED_FILES_H_
