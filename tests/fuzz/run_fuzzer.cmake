# Runs one libFuzzer target for a bounded time on a fresh copy of its seed corpus, so that the
# inputs libFuzzer adds land in the build tree, never in the source tree.
#   cmake -DFUZZER=... -DSEEDS=... -DWORK=... -DSECONDS=... [-DDICT=...] -P run_fuzzer.cmake
file(REMOVE_RECURSE "${WORK}")
file(MAKE_DIRECTORY "${WORK}")
file(COPY "${SEEDS}/" DESTINATION "${WORK}/corpus")
set(args -max_total_time=${SECONDS} -timeout=10 -rss_limit_mb=2048 -max_len=4096
         -print_final_stats=1 -artifact_prefix=${WORK}/)
if(DICT)
  list(APPEND args -dict=${DICT})
endif()
execute_process(COMMAND "${FUZZER}" ${args} "${WORK}/corpus" RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "${FUZZER} failed (${rc}); the crashing input is under ${WORK}/")
endif()
