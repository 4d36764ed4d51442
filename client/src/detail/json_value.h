// Checked conversion of an nlohmann_json value to a C++ type, for JSON the client did not write
// (daemon replies, the C API's load options).
//
//   int tp = 1;
//   if (!JsonTo(j["tp"], &tp)) return Malformed("'tp' must be an integer");
//
// nlohmann's get<T>() throws on a value of the wrong kind and, worse, converts a number of the
// wrong kind silently: get<int>() of 2.5 is 2, of 4294967297 is 1, and of 1e300 is undefined
// behaviour (an out-of-range float-to-integer conversion). JsonTo accepts a value only when it
// has T's kind and, for integers, fits T. Thread-safe; never throws.
#ifndef WEIGHTD_CLIENT_DETAIL_JSON_VALUE_H_
#define WEIGHTD_CLIENT_DETAIL_JSON_VALUE_H_

#include <cstdint>
#include <limits>
#include <nlohmann/json.hpp>
#include <string>
#include <type_traits>
#include <vector>

namespace weightd::detail {

template <typename T>
struct IsVector : std::false_type {};
template <typename E>
struct IsVector<std::vector<E>> : std::true_type {};

// Sets `*out` and returns true when `v` is a T (a string, a boolean, a number for floating T, an
// integer in T's range, or an array of such for std::vector); otherwise returns false and leaves
// `*out` unspecified (it may hold part of an array).
template <typename T>
bool JsonTo(const nlohmann::json& v, T* out) {
  if constexpr (std::is_same_v<T, std::string>) {
    if (!v.is_string()) return false;
    *out = v.get_ref<const std::string&>();
  } else if constexpr (std::is_same_v<T, bool>) {
    if (!v.is_boolean()) return false;
    *out = v.get<bool>();
  } else if constexpr (std::is_floating_point_v<T>) {
    if (!v.is_number()) return false;
    *out = v.get<T>();
  } else if constexpr (IsVector<T>::value) {
    if (!v.is_array()) return false;
    out->clear();
    out->reserve(v.size());
    for (const nlohmann::json& e : v) {
      typename T::value_type x{};
      if (!JsonTo(e, &x)) return false;
      out->push_back(std::move(x));
    }
  } else {
    static_assert(std::is_integral_v<T>);
    if (!v.is_number_integer()) return false;
    if (v.is_number_unsigned()) {
      const uint64_t x = v.get<uint64_t>();
      if (x > static_cast<uint64_t>(std::numeric_limits<T>::max())) return false;
      *out = static_cast<T>(x);
    } else {
      const int64_t x = v.get<int64_t>();
      if (x < 0 ? x < static_cast<int64_t>(std::numeric_limits<T>::min())
                : static_cast<uint64_t>(x) > static_cast<uint64_t>(std::numeric_limits<T>::max())) {
        return false;
      }
      *out = static_cast<T>(x);
    }
  }
  return true;
}

// Field `key` of object `j` into `*out` when present; absent leaves `*out` as it was (true).
template <typename T>
bool JsonField(const nlohmann::json& j, const char* key, T* out) {
  const auto it = j.find(key);
  return it == j.end() || JsonTo(*it, out);
}

}  // namespace weightd::detail

#endif  // WEIGHTD_CLIENT_DETAIL_JSON_VALUE_H_
