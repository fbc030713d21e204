// The web labeller's page: the shared labeller (labeller.js) over the local server's API.
//
// Every request goes to the server that served this page (same origin): nothing is loaded
// from anywhere else. Each page load asks the server for a client token (/api/hello); the
// newest page load is the one that may answer, so a second tab on the same session takes
// over and the first one says so instead of storing answers twice.

import { mount } from "./labeller.js";

const BANDS_KEY = "anneal-geo-bands";

async function readJSON(response) {
  let body = null;
  try {
    body = await response.json();
  } catch (err) {
    body = { ok: false, error: `the server answered ${response.status} without a message` };
  }
  return body;
}

const transport = {
  kind: "web",
  token: null,
  poll: true,
  // ?prefetch=0 turns off loading the next pairs' pictures ahead (the benchmark's baseline).
  prefetch: new URLSearchParams(window.location.search).get("prefetch") !== "0",
  elsewhereListeners: [],
  async hello() {
    const response = await fetch("/api/hello", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: "{}",
    });
    const body = await readJSON(response);
    if (!response.ok) throw new Error(body.error || "hello failed");
    this.token = body.token;
    return body.state;
  },
  async reconnect() {
    return this.hello();
  },
  async state() {
    const response = await fetch(`/api/state?token=${encodeURIComponent(this.token || "")}`);
    const body = await readJSON(response);
    if (!response.ok) throw new Error(body.error || "state failed");
    if (body.active === false) for (const cb of this.elsewhereListeners) cb();
    return body.state;
  },
  async call(action, payload) {
    const response = await fetch(`/api/${action}`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ ...payload, token: this.token }),
    });
    return readJSON(response);
  },
  image(id, bands) {
    return Promise.resolve(`/api/patch/${id}.png?bands=${encodeURIComponent(bands)}`);
  },
  locator(i, j, ahead) {
    const url = `/api/locator/${i}/${j}.jpg`;
    if (ahead) {
      const img = new Image();
      img.src = url;
    }
    return Promise.resolve(url);
  },
  async neighbours(id, round) {
    const response = await fetch(`/api/neighbours/${id}?k=4&round=${round}`);
    const body = await readJSON(response);
    return body.ids || [];
  },
  loadBands() {
    try {
      return window.localStorage.getItem(BANDS_KEY);
    } catch (err) {
      return null;
    }
  },
  saveBands(value) {
    try {
      window.localStorage.setItem(BANDS_KEY, value);
    } catch (err) {
      /* private mode: the choice lasts for this page only */
    }
  },
  onElsewhere(callback) {
    this.elsewhereListeners.push(callback);
  },
};

const root = document.getElementById("labeller");
const labeller = mount(root, transport);
window.annealLabeller = labeller; // timings for tests and benchmarks

document.addEventListener("visibilitychange", () => {
  if (document.visibilityState === "visible" && transport.token) {
    transport.state().catch(() => null);
  }
});
// Keys work anywhere on the page, not only inside the labeller's box.
document.addEventListener("keydown", (event) => {
  if (event.target === document.body) {
    root.focus({ preventScroll: true });
    root.dispatchEvent(new KeyboardEvent("keydown", event));
    event.preventDefault();
  }
});
