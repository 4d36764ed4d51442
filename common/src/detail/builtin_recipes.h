// The recipe JSON files of common/recipes/, embedded at build time (see
// common/cmake/embed_recipes.cmake). Immutable; thread-safe.
#ifndef WEIGHTD_COMMON_SRC_DETAIL_BUILTIN_RECIPES_H_
#define WEIGHTD_COMMON_SRC_DETAIL_BUILTIN_RECIPES_H_

#include <vector>

namespace weightd::detail {

struct EmbeddedRecipe {
  const char* file;  // e.g. "llama.json"
  const char* json;
};

const std::vector<EmbeddedRecipe>& BuiltinRecipeFiles();

}  // namespace weightd::detail

#endif  // WEIGHTD_COMMON_SRC_DETAIL_BUILTIN_RECIPES_H_
