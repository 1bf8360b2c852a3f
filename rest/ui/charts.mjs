// The results page's charts, as Vega-Lite specs. Each draws the rows the page hands it as the
// dataset "values". `make ui` compiles them to Vega (build.mjs), so the page loads only Vega and
// its first render does not wait for Vega-Lite to load and compile them.

export const OUTCOME_COLORS = { better: "#1a7f37", worse: "#cf222e", flat: "#6e7781" };
const values = { name: "values" };

// Each lift with its interval, one row per variant and metric.
function forest() {
  const color = { field: "outcome", type: "nominal", legend: null,
                  scale: { domain: Object.keys(OUTCOME_COLORS), range: Object.values(OUTCOME_COLORS) } };
  const y = { field: "row", type: "nominal", title: null, sort: null };
  const x = { type: "quantitative", title: "relative lift", axis: { format: "+.1%" } };
  return {
    width: "container",
    height: { step: 26 },
    layer: [
      { data: { values: [{ zero: 0 }] }, mark: { type: "rule", strokeDash: [4, 4], color: "#8c959f" },
        encoding: { x: { field: "zero", ...x } } },
      { data: values, mark: { type: "rule", strokeWidth: 2 },
        encoding: { y, x: { field: "low", ...x }, x2: { field: "high" }, color } },
      { data: values, mark: { type: "point", filled: true, size: 70 },
        encoding: { y, x: { field: "estimate", ...x }, color,
                    tooltip: [{ field: "row" }, { field: "estimate", format: "+.2%" }, { field: "low", format: "+.2%" },
                              { field: "high", format: "+.2%" }] } },
    ],
  };
}

// Buckets are UTC, as everywhere else on the page: the browser's own time zone would put a day's
// bucket on the day before west of Greenwich, and give an hour's the same date as every other.
const bucket = { field: "bucket", type: "temporal", title: null, scale: { type: "utc" } };
const bucketTip = { field: "bucket", type: "temporal", title: "from (UTC)", format: "%Y-%m-%d %H:%M",
                    scale: { type: "utc" } };

// A cumulative metric per variant over time.
function series(field, title, format) {
  return {
    width: "container",
    height: 220,
    data: values,
    mark: { type: "line", interpolate: "step-after", point: false },
    encoding: {
      x: bucket,
      y: { field, type: "quantitative", title, axis: { format } },
      color: { field: "variant", type: "nominal", legend: { orient: "bottom", title: null } },
      tooltip: [bucketTip, { field: "variant" }, { field, format }],
    },
  };
}

// Conversion rate per segment and variant, the segments in the order of their `rank`.
function segments() {
  return {
    width: "container",
    height: { step: 14 },
    data: values,
    mark: "bar",
    encoding: {
      y: { field: "segment", type: "nominal", title: null, sort: { field: "rank", op: "min" } },
      yOffset: { field: "variant" },
      x: { field: "conversion_rate", type: "quantitative", title: "conversion rate", axis: { format: ".1%" } },
      color: { field: "variant", type: "nominal", legend: { orient: "bottom", title: null } },
      tooltip: [{ field: "segment" }, { field: "variant" }, { field: "users" }, { field: "conversion_rate", format: ".2%" }],
    },
  };
}

// Each day's cumulative lift with its confidence sequence.
function lift() {
  const x = bucket;
  const color = { field: "series", type: "nominal", legend: { orient: "bottom", title: null } };
  return {
    width: "container",
    height: 220,
    data: values,
    layer: [
      { mark: { type: "area", opacity: 0.15, interpolate: "step-after" },
        encoding: { x, y: { field: "low", type: "quantitative", title: "relative lift", axis: { format: "+.0%" } },
                    y2: { field: "high" }, color } },
      { mark: { type: "line", interpolate: "step-after" },
        encoding: { x, y: { field: "estimate", type: "quantitative" }, color,
                    tooltip: [bucketTip, { field: "series" },
                              { field: "estimate", format: "+.2%" }, { field: "low", format: "+.2%" },
                              { field: "high", format: "+.2%" }] } },
    ],
  };
}

export const CHARTS = {
  forest: forest(),
  conversion: series("conversion_rate", "conversion rate", ".1%"),
  revenue: series("revenue_per_user", "revenue per user", ",.2f"),
  segments: segments(),
  lift: lift(),
};
