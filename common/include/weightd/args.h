// The command-line parser of weightd and of weightctl's sub-commands.
//
//   ArgParser p("weightctl inspect", "Lists the tensors of a checkpoint.");
//   p.Positional("PATH", &path, "checkpoint directory or .safetensors file");
//   p.Flag("--json", &json, "print JSON instead of a table");
//   WD_RETURN_IF_ERROR(p.Parse(argc, argv));   // argv[0] is the sub-command name
//   if (p.help_requested()) { std::cout << p.Help(); return 0; }
//
// Accepts "--opt value" and "--opt=value". Unknown options, missing values and missing
// positionals are errors that name the option and point to --help. Help texts are wrapped to
// 79 columns, so they may be written as one line; "\n" in a help text starts a new line. With
// Version(text), "--version" is recognized and version_requested() says it was given. Not
// thread-safe.
#ifndef WEIGHTD_ARGS_H_
#define WEIGHTD_ARGS_H_

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace weightd {

class ArgParser {
 public:
  ArgParser(std::string command, std::string summary);

  void Flag(std::string name, bool* out, std::string help);
  void Option(std::string name, std::string metavar, std::string* out, std::string help);
  void Repeated(std::string name, std::string metavar, std::vector<std::string>* out,
                std::string help);
  void Positional(std::string name, std::string* out, std::string help);
  // Extra text printed after the options (examples, notes), as written (not wrapped).
  void Epilog(std::string text) { epilog_ = std::move(text); }
  // Makes "--version" an option; Parse() stops at it as at "--help".
  void Version(std::string text) { version_ = std::move(text); }

  absl::Status Parse(int argc, char** argv);
  bool help_requested() const { return help_; }
  bool version_requested() const { return version_requested_; }
  std::string Help() const;
  const std::string& version() const { return version_; }
  const std::string& command() const { return command_; }

 private:
  struct Opt {
    std::string name;
    std::string metavar;  // empty for a flag
    std::string help;
    std::function<void(std::string)> set;
    bool* flag = nullptr;
  };
  struct Pos {
    std::string name;
    std::string* out;
    std::string help;
  };
  std::string command_, summary_, epilog_, version_;
  std::vector<Opt> opts_;
  std::vector<Pos> positionals_;
  bool help_ = false;
  bool version_requested_ = false;
};

// Parses a non-negative integer option value; errors name the option.
absl::StatusOr<int64_t> ParseInt(const std::string& option, const std::string& value);
// Parses a comma-separated list of non-negative integers ("0,1,2,3").
absl::StatusOr<std::vector<int64_t>> ParseIntList(const std::string& option,
                                                  const std::string& value);
// Formats a byte count for people: "16.06 GB" (decimal units, as disk vendors and GB/s use).
std::string HumanBytes(uint64_t bytes);

}  // namespace weightd

#endif  // WEIGHTD_ARGS_H_
