#include "weightd/args.h"

#include <algorithm>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"

namespace weightd {

ArgParser::ArgParser(std::string command, std::string summary)
    : command_(std::move(command)), summary_(std::move(summary)) {}

void ArgParser::Flag(std::string name, bool* out, std::string help) {
  *out = false;
  opts_.push_back(Opt{std::move(name), "", std::move(help), nullptr, out});
}

void ArgParser::Option(std::string name, std::string metavar, std::string* out,
                       std::string help) {
  opts_.push_back(Opt{std::move(name), std::move(metavar), std::move(help),
                      [out](std::string v) { *out = std::move(v); }, nullptr});
}

void ArgParser::Repeated(std::string name, std::string metavar, std::vector<std::string>* out,
                         std::string help) {
  opts_.push_back(Opt{std::move(name), std::move(metavar), std::move(help),
                      [out](std::string v) { out->push_back(std::move(v)); }, nullptr});
}

void ArgParser::Positional(std::string name, std::string* out, std::string help) {
  positionals_.push_back(Pos{std::move(name), out, std::move(help)});
}

absl::Status ArgParser::Parse(int argc, char** argv) {
  size_t next_pos = 0;
  bool only_positionals = false;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (!only_positionals && arg == "--") {
      only_positionals = true;
      continue;
    }
    if (!only_positionals && (arg == "-h" || arg == "--help")) {
      help_ = true;
      return absl::OkStatus();
    }
    if (!only_positionals && !version_.empty() && arg == "--version") {
      version_requested_ = true;
      return absl::OkStatus();
    }
    if (!only_positionals && arg.size() > 1 && arg[0] == '-') {
      std::string name = arg, value;
      bool inline_value = false;
      if (auto eq = arg.find('='); eq != std::string::npos) {
        name = arg.substr(0, eq);
        value = arg.substr(eq + 1);
        inline_value = true;
      }
      auto it = std::find_if(opts_.begin(), opts_.end(),
                             [&](const Opt& o) { return o.name == name; });
      if (it == opts_.end()) {
        return absl::InvalidArgumentError(
            absl::StrCat("unknown option '", name, "' (see '", command_, " --help')"));
      }
      if (it->flag != nullptr) {
        if (inline_value) {
          return absl::InvalidArgumentError(absl::StrCat("option ", name, " takes no value"));
        }
        *it->flag = true;
        continue;
      }
      if (!inline_value) {
        if (i + 1 >= argc) {
          return absl::InvalidArgumentError(
              absl::StrCat("option ", name, " needs a value (", it->metavar, ")"));
        }
        value = argv[++i];
      }
      it->set(std::move(value));
      continue;
    }
    if (next_pos >= positionals_.size()) {
      return absl::InvalidArgumentError(
          absl::StrCat("unexpected argument '", arg, "' (see '", command_, " --help')"));
    }
    *positionals_[next_pos++].out = arg;
  }
  if (next_pos < positionals_.size()) {
    return absl::InvalidArgumentError(absl::StrCat("missing ", positionals_[next_pos].name,
                                                   " (see '", command_, " --help')"));
  }
  return absl::OkStatus();
}

namespace {

constexpr size_t kHelpWidth = 79;
constexpr size_t kHelpIndent = 27;  // "  " + a 24-column option column + " "

// Appends `text` word-wrapped to kHelpWidth, its first line after `lhs` (padded to the help
// column, or alone on its line when longer), later lines indented to the help column.
void AppendOption(std::string* out, absl::string_view lhs, absl::string_view text) {
  std::string line = absl::StrCat("  ", lhs);
  if (line.size() + 1 > kHelpIndent) {
    absl::StrAppend(out, line, "\n");
    line.clear();
  }
  auto pad = [&] { line.resize(std::max(line.size(), kHelpIndent), ' '); };
  pad();
  bool line_has_words = false;
  for (absl::string_view paragraph : absl::StrSplit(text, '\n')) {
    for (absl::string_view word : absl::StrSplit(paragraph, ' ', absl::SkipEmpty())) {
      if (line_has_words && line.size() + 1 + word.size() > kHelpWidth) {
        absl::StrAppend(out, line, "\n");
        line.clear();
        pad();
        line_has_words = false;
      }
      if (line_has_words) line.push_back(' ');
      absl::StrAppend(&line, word);
      line_has_words = true;
    }
    absl::StrAppend(out, line, "\n");
    line.clear();
    pad();
    line_has_words = false;
  }
}

}  // namespace

std::string ArgParser::Help() const {
  std::string usage = absl::StrCat("usage: ", command_);
  for (const Pos& p : positionals_) absl::StrAppend(&usage, " ", p.name);
  if (!opts_.empty()) absl::StrAppend(&usage, " [options]");
  std::string out = absl::StrCat(usage, "\n\n", summary_, "\n");
  if (!positionals_.empty()) {
    absl::StrAppend(&out, "\narguments:\n");
    for (const Pos& p : positionals_) AppendOption(&out, p.name, p.help);
  }
  absl::StrAppend(&out, "\noptions:\n");
  for (const Opt& o : opts_) {
    const std::string lhs = o.metavar.empty() ? o.name : absl::StrCat(o.name, " ", o.metavar);
    AppendOption(&out, lhs, o.help);
  }
  AppendOption(&out, "-h, --help", "show this help");
  if (!version_.empty()) AppendOption(&out, "--version", "print the version and git revision");
  if (!epilog_.empty()) absl::StrAppend(&out, "\n", epilog_, "\n");
  return out;
}

absl::StatusOr<int64_t> ParseInt(const std::string& option, const std::string& value) {
  int64_t v = 0;
  if (!absl::SimpleAtoi(value, &v) || v < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(option, " expects a non-negative integer, got '", value, "'"));
  }
  return v;
}

absl::StatusOr<std::vector<int64_t>> ParseIntList(const std::string& option,
                                                  const std::string& value) {
  std::vector<int64_t> out;
  for (absl::string_view part : absl::StrSplit(value, ',')) {
    auto v = ParseInt(option, std::string(part));
    if (!v.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(
          option, " expects a comma-separated list of non-negative integers, got '", value, "'"));
    }
    out.push_back(*v);
  }
  return out;
}

std::string HumanBytes(uint64_t bytes) {
  const double b = static_cast<double>(bytes);
  if (bytes >= 1000ull * 1000 * 1000) return absl::StrFormat("%.2f GB", b / 1e9);
  if (bytes >= 1000ull * 1000) return absl::StrFormat("%.2f MB", b / 1e6);
  if (bytes >= 1000ull) return absl::StrFormat("%.2f kB", b / 1e3);
  return absl::StrCat(bytes, " B");
}

}  // namespace weightd
