#include "weightd/detail/metrics_text.h"

namespace weightd {

std::string Labels(std::initializer_list<std::pair<absl::string_view, absl::string_view>> labels) {
  std::string out = "{";
  bool first = true;
  for (const auto& [key, value] : labels) {
    absl::StrAppend(&out, first ? "" : ",", key, "=\"");
    first = false;
    for (const char c : value) {
      if (c == '\\' || c == '"') {
        out += '\\';
        out += c;
      } else if (c == '\n') {
        out += "\\n";
      } else {
        out += c;
      }
    }
    out += '"';
  }
  out += '}';
  return out;
}

MetricFamily::MetricFamily(absl::string_view name, absl::string_view type, absl::string_view help)
    : name_(name),
      text_(absl::StrCat("# HELP ", name, " ", help, "\n# TYPE ", name, " ", type, "\n")) {}

void MetricFamily::Add(absl::string_view labels, const absl::AlphaNum& value) {
  absl::StrAppend(&text_, name_, labels, " ", value, "\n");
}

void MetricFamily::AppendTo(std::string* out) const { out->append(text_); }

}  // namespace weightd
