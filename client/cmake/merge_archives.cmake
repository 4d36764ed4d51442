# Merges the static archives INPUTS (a ;-list) into OUT with `ar -M` (an MRI script), so that a
# program links one archive instead of the project's internal ones.
set(script "CREATE ${OUT}\n")
foreach(in IN LISTS INPUTS)
  string(APPEND script "ADDLIB ${in}\n")
endforeach()
string(APPEND script "SAVE\nEND\n")
file(WRITE "${OUT}.mri" "${script}")
execute_process(COMMAND ${AR} -M INPUT_FILE "${OUT}.mri" RESULT_VARIABLE rc ERROR_VARIABLE err
                OUTPUT_QUIET)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "ar -M failed (${rc}): ${err}")
endif()
