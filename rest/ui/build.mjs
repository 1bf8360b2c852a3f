// Compiles the page's Vega-Lite charts (charts.mjs) to Vega, into build/charts.json, which the
// server serves to the page beside Vega itself.
import { mkdirSync, writeFileSync } from "node:fs";
import { compile } from "vega-lite";
import { CHARTS } from "./charts.mjs";

// Vega-Lite warns that a chart whose height is a step per row is not fitted to its height, as meant.
const quiet = { level() { return this; }, warn() {}, info() {}, debug() {}, error(...message) { throw new Error(message.join(" ")); } };
const compiled = Object.fromEntries(Object.entries(CHARTS).map(([name, spec]) => [name, compile(spec, { logger: quiet }).spec]));
mkdirSync(new URL("./build/", import.meta.url), { recursive: true });
writeFileSync(new URL("./build/charts.json", import.meta.url), JSON.stringify(compiled));
