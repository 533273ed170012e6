// The create form's URL, built from its fields as nodepass reads URLs (docs/usage.md):
// scheme://[key@]tunnel/targets?only=what-differs-from-the-defaults

function hostPort(text) {
  const value = text.trim();
  const match = /^(.*):(\d*)$/.exec(value);
  if (!match) return value;
  const host = match[1];
  if (host.includes(":") && !host.startsWith("[")) return `[${host}]:${match[2]}`;
  return value;
}

export function buildUrl(fields) {
  const scheme = fields.scheme === "client" ? "client" : "server";
  const key = fields.key ? `${encodeURIComponent(fields.key)}@` : "";
  const targets = (fields.targets || "").split(",").map(hostPort).filter(Boolean).join(",");
  const query = [];
  for (const name of ["tls", "mode", "type", "path", "rate", "slot", "read", "proxy"]) {
    const value = (fields[name] || "").trim();
    if (value !== "") query.push(`${name}=${encodeURIComponent(value)}`);
  }
  const tail = query.length ? `?${query.join("&")}` : "";
  return `${scheme}://${key}${hostPort(fields.tunnel || "")}/${targets}${tail}`;
}

// "site=paris, team=ops" -> {site: "paris", team: "ops"}; a bare word is a tag with "".
export function parseTags(text) {
  const tags = {};
  for (const item of (text || "").split(/[,\n]/)) {
    const trimmed = item.trim();
    if (!trimmed) continue;
    const at = trimmed.indexOf("=");
    if (at < 0) tags[trimmed] = "";
    else tags[trimmed.slice(0, at).trim()] = trimmed.slice(at + 1).trim();
  }
  return tags;
}

export function masked(url) {
  return url.replace(/^([a-z]+:\/\/)[^@/]*@/, "$1****@");
}
