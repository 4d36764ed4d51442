// The sub-commands of weightctl. Each takes argv with argv[0] = the sub-command name and
// returns the process exit code: 0 on success, 1 on an error it reported, 2 on a usage error.
#ifndef WEIGHTD_CLIENT_WEIGHTCTL_COMMANDS_H_
#define WEIGHTD_CLIENT_WEIGHTCTL_COMMANDS_H_

namespace weightd::cli {

int InspectMain(int argc, char** argv);
int PlanMain(int argc, char** argv);
int ShardMain(int argc, char** argv);

// Daemon commands (cmd_daemon.cc).
int LoadMain(int argc, char** argv);
int StatusMain(int argc, char** argv);
int ListMain(int argc, char** argv);
int AttachMain(int argc, char** argv);
int UnloadMain(int argc, char** argv);
int MetricsMain(int argc, char** argv);
// Generations (cmd_daemon.cc).
int UpdateMain(int argc, char** argv);
int RollbackMain(int argc, char** argv);
int WaitGenerationMain(int argc, char** argv);

}  // namespace weightd::cli

#endif  // WEIGHTD_CLIENT_WEIGHTCTL_COMMANDS_H_
