// The master's seed API (docs/api.md) from the page: JSON requests with the key, and the
// event stream read through fetch (EventSource cannot send a header, and the key must
// never go in a URL).

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export class Api {
  constructor(base, key) {
    this.base = base;
    this.key = key;
  }

  headers(extra = {}) {
    return this.key ? { "X-API-Key": this.key, ...extra } : { ...extra };
  }

  async request(method, path, body) {
    const init = { method, headers: this.headers(), cache: "no-store" };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(this.base + path, init);
    } catch (e) {
      throw new ApiError(0, "UNREACHABLE", "the master cannot be reached");
    }
    let envelope = null;
    try {
      envelope = await response.json();
    } catch (e) {
      envelope = null;
    }
    if (!response.ok || !envelope || envelope.success === false) {
      const error = (envelope && envelope.error) || {};
      throw new ApiError(response.status, error.code || "HTTP_" + response.status,
                         error.message || `the master answered ${response.status}`);
    }
    return envelope.data;
  }

  // Follows the event stream until stop(); calls onEvent(name, data) for each event and
  // onState("live" | "reconnecting" | "unauthorized").  Resumes with Last-Event-ID.
  follow(onEvent, onState) {
    const control = { stopped: false, abort: null };
    const run = async () => {
      let lastId = null;
      let delay = 1000;
      while (!control.stopped) {
        const aborter = new AbortController();
        control.abort = () => aborter.abort();
        try {
          const headers = this.headers({ Accept: "text/event-stream" });
          if (lastId !== null) headers["Last-Event-ID"] = lastId;
          const response = await fetch(this.base + "/events",
                                       { headers, cache: "no-store", signal: aborter.signal });
          if (response.status === 401) {
            onState("unauthorized");
            return;
          }
          if (!response.ok || !response.body) throw new Error(String(response.status));
          onState("live");
          delay = 1000;
          lastId = await readEvents(response.body, onEvent, lastId);
        } catch (e) {
          if (control.stopped) return;
        }
        if (control.stopped) return;
        onState("reconnecting");
        await new Promise((resolve) => setTimeout(resolve, delay));
        delay = Math.min(delay * 2, 15000);
      }
    };
    run();
    return {
      stop() {
        control.stopped = true;
        if (control.abort) control.abort();
      },
    };
  }
}

// Reads Server-Sent Events from a byte stream; returns the last event id seen.
async function readEvents(body, onEvent, lastId) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return lastId;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
    const blocks = buffer.split("\n\n");
    buffer = blocks.pop(); // the part of an event still on its way
    for (const block of blocks) {
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith(":")) continue;  // a keep-alive comment
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "event") name = text;
        else if (field === "data") data.push(text);
        else if (field === "id") lastId = text;
      }
      if (data.length) {
        let parsed;
        try {
          parsed = JSON.parse(data.join("\n"));
        } catch (e) {
          continue;
        }
        onEvent(name, parsed);
      }
    }
  }
}
