// The Prometheus text exposition (format 0.0.4) of the daemon's metrics, one family at a time,
// so that each family's HELP and TYPE lines and all its samples form one contiguous group, as
// the format requires (a family's samples may not be interleaved with another's).
//
//   MetricFamily ready("weightd_rank_ready", "gauge", "1 when the rank is ready.");
//   ready.Add(Labels({{"model", name}, {"rank", "0"}}), 1);
//   ready.AppendTo(&text);
//
// Value type; not thread-safe (build one per scrape).
#ifndef WEIGHTD_DETAIL_METRICS_TEXT_H_
#define WEIGHTD_DETAIL_METRICS_TEXT_H_

#include <initializer_list>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace weightd {

// `{k1="v1",k2="v2"}` with each value escaped (backslash, double quote, newline).
std::string Labels(std::initializer_list<std::pair<absl::string_view, absl::string_view>> labels);

class MetricFamily {
 public:
  // `type` is "counter" or "gauge"; `help` is one line of plain text.
  MetricFamily(absl::string_view name, absl::string_view type, absl::string_view help);

  // One sample of the family; `labels` is "" or what Labels() returns.
  void Add(absl::string_view labels, const absl::AlphaNum& value);

  // Appends the HELP and TYPE lines and the samples (a family without samples is still listed).
  void AppendTo(std::string* out) const;

 private:
  std::string name_;
  std::string text_;
};

}  // namespace weightd

#endif  // WEIGHTD_DETAIL_METRICS_TEXT_H_
