// The command-line parser shared by weightd and weightctl (common/include/weightd/args.h).
#include "weightd/args.h"

#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace weightd {
namespace {

using ::testing::HasSubstr;

// Parses `args` (argv[0] included) with `p`.
absl::Status Parse(ArgParser& p, std::vector<std::string> args) {
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  return p.Parse(static_cast<int>(argv.size()), argv.data());
}

TEST(ArgParserTest, OptionsFlagsPositionalsAndRepeats) {
  std::string name, socket;
  std::vector<std::string> skip;
  bool wait = false;
  ArgParser p("weightctl load", "Loads.");
  p.Positional("NAME", &name, "model name");
  p.Option("--socket", "PATH", &socket, "socket");
  p.Repeated("--skip", "SUBSTR", &skip, "skip");
  p.Flag("--wait", &wait, "wait");
  ASSERT_TRUE(Parse(p, {"load", "--socket=/s", "m", "--skip", "a", "--wait", "--skip=b"}).ok());
  EXPECT_EQ(name, "m");
  EXPECT_EQ(socket, "/s");
  EXPECT_EQ(skip, (std::vector<std::string>{"a", "b"}));
  EXPECT_TRUE(wait);
  EXPECT_FALSE(p.help_requested());
}

TEST(ArgParserTest, ErrorsNameTheOptionAndPointToHelp) {
  std::string v, pos;
  bool f = false;
  ArgParser p("weightd", "Serves.");
  p.Option("--config", "FILE", &v, "config");
  p.Flag("--takeover", &f, "take over");
  EXPECT_THAT(Parse(p, {"weightd", "--frob"}).message(),
              HasSubstr("unknown option '--frob' (see 'weightd --help')"));
  EXPECT_THAT(Parse(p, {"weightd", "--config"}).message(),
              HasSubstr("option --config needs a value (FILE)"));
  EXPECT_THAT(Parse(p, {"weightd", "--takeover=yes"}).message(),
              HasSubstr("option --takeover takes no value"));
  EXPECT_THAT(Parse(p, {"weightd", "extra"}).message(), HasSubstr("unexpected argument 'extra'"));
  ArgParser q("weightctl inspect", "Lists.");
  q.Positional("PATH", &pos, "checkpoint");
  EXPECT_THAT(Parse(q, {"inspect"}).message(), HasSubstr("missing PATH"));
  // "--version" is an option only where a version text is set.
  EXPECT_THAT(Parse(q, {"inspect", "--version"}).message(), HasSubstr("unknown option"));
}

TEST(ArgParserTest, HelpAndVersionStopParsing) {
  std::string v;
  ArgParser p("weightd", "Serves.");
  p.Option("--config", "FILE", &v, "config");
  p.Version("weightd 1.2.3 (git abc)");
  ASSERT_TRUE(Parse(p, {"weightd", "--version", "--frob"}).ok());
  EXPECT_TRUE(p.version_requested());
  EXPECT_EQ(p.version(), "weightd 1.2.3 (git abc)");
  ArgParser h("weightd", "Serves.");
  ASSERT_TRUE(Parse(h, {"weightd", "-h", "--frob"}).ok());
  EXPECT_TRUE(h.help_requested());
}

TEST(ArgParserTest, HelpWrapsLongTextsUnderTheHelpColumn) {
  std::string v;
  ArgParser p("weightd", "Serves weights.");
  p.Option("--backend", "KIND", &v,
           "auto (default: cuda when a CUDA driver reports a device, else host), cuda (VMM "
           "device arenas), or host (sealed memfds in RAM)");
  p.Option("--metrics-listen-address", "ADDR", &v, "keep running\nuntil SIGTERM");
  p.Version("weightd 1");
  p.Epilog("exit status: 0, 1 or 2");
  const std::string help = p.Help();
  EXPECT_THAT(help, HasSubstr("usage: weightd [options]\n\nServes weights.\n"));
  std::vector<std::string> lines;
  for (size_t at = 0; at < help.size();) {
    const size_t nl = help.find('\n', at);
    lines.push_back(help.substr(at, nl - at));
    at = nl + 1;
  }
  for (const std::string& l : lines) EXPECT_LE(l.size(), 79u) << l;
  // The first line of a help text starts in the help column; continuation lines too.
  EXPECT_THAT(help, HasSubstr("  --backend KIND           auto (default: cuda when"));
  EXPECT_THAT(help, HasSubstr("\n                           device, else host), cuda (VMM device arenas), or\n"
                              "                           host (sealed memfds in RAM)\n"));
  // An option wider than its column gets a line of its own; "\n" starts a new line.
  EXPECT_THAT(help, HasSubstr("  --metrics-listen-address ADDR\n                           keep running\n"
                              "                           until SIGTERM\n"));
  EXPECT_THAT(help, HasSubstr("  --version                print the version"));
  EXPECT_THAT(help, HasSubstr("\nexit status: 0, 1 or 2\n"));
}

}  // namespace
}  // namespace weightd
