// Numbers for people: sizes, rates, durations.  Pure functions.

const UNITS = ["B", "KiB", "MiB", "GiB", "TiB"];

export function bytes(n) {
  let value = Number(n) || 0;
  let unit = 0;
  while (Math.abs(value) >= 1024 && unit < UNITS.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${unit === 0 ? Math.round(value) : value.toFixed(value < 10 ? 1 : 0)} ${UNITS[unit]}`;
}

export function rate(n) {
  return `${bytes(n)}/s`;
}

export function duration(seconds) {
  let s = Math.max(0, Math.floor(Number(seconds) || 0));
  const parts = [];
  for (const [size, unit] of [[86400, "d"], [3600, "h"], [60, "m"]]) {
    if (s >= size) {
      parts.push(`${Math.floor(s / size)}${unit}`);
      s %= size;
    }
  }
  if (parts.length < 2) parts.push(`${s}s`);
  return parts.slice(0, 2).join(" ");
}

export function ping(ms) {
  return ms === null || ms === undefined ? "—" : `${Number(ms).toFixed(ms < 10 ? 2 : 0)} ms`;
}

export function tags(object) {
  return Object.entries(object || {}).map(([k, v]) => (v === "" ? k : `${k}=${v}`));
}

export function clock(date) {
  return date.toTimeString().slice(0, 8);
}
