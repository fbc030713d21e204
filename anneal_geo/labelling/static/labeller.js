// The anneal-geo labeller: two patches side by side, keys and buttons, counters.
//
// One ES module for both front ends. The web page (app.js) mounts it with a transport that
// talks to the local server over fetch(); the Jupyter widget (anywidget) loads this same
// file as its module and mounts it with a transport over the widget's messages (the
// default export's render()). No build step, no library, nothing loaded from elsewhere.
//
// The rule the page keeps: an answer is sent for the pair on screen, together with that
// pair; the next pair is shown only once the server has acknowledged the answer (it is in
// SQLite by then). While an answer is in flight further answer keys are ignored, so no
// answer can be given for a pair the person has not seen. The next pairs' pictures are
// loaded and decoded ahead, so the acknowledged answer is followed by the next pair at once.

const ACTIONS = {
  y: "similar",
  Y: "similar",
  ArrowRight: "similar",
  n: "dissimilar",
  N: "dissimilar",
  ArrowLeft: "dissimilar",
  s: "skip",
  S: "skip",
  u: "undo",
  U: "undo",
  Backspace: "undo",
  "?": "help",
  h: "help",
  t: "train",
  Escape: "close",
};

const HELP = [
  ["y or →", "similar"],
  ["n or ←", "dissimilar"],
  ["s", "skip (the pair is not asked again)"],
  ["u or Backspace", "undo the last answer of this round"],
  ["t", "train now (when a round is answered and waits)"],
  ["?", "this help (Esc closes it)"],
];

const TEMPLATE = `
<div class="ag-top">
  <div class="ag-title"><b>anneal-geo</b> <span class="ag-session"></span></div>
  <div class="ag-counters" aria-live="polite"></div>
  <div class="ag-budget"><div class="ag-budget-bar"><span></span></div><span class="ag-budget-text"></span></div>
</div>
<div class="ag-body">
  <div class="ag-main">
    <div class="ag-question">Are these two patches similar?</div>
    <div class="ag-pair">
      <figure class="ag-patch ag-left">
        <div class="ag-frame"><div class="ag-slot"></div></div>
        <figcaption><span class="ag-side">left</span> <span class="ag-id"></span><br><span class="ag-place"></span></figcaption>
        <div class="ag-neighbours-label">nearest in the current model</div>
        <div class="ag-neighbours" title="nearest patches in the current embedding"></div>
      </figure>
      <figure class="ag-patch ag-right">
        <div class="ag-frame"><div class="ag-slot"></div></div>
        <figcaption><span class="ag-side">right</span> <span class="ag-id"></span><br><span class="ag-place"></span></figcaption>
        <div class="ag-neighbours-label">nearest in the current model</div>
        <div class="ag-neighbours" title="nearest patches in the current embedding"></div>
      </figure>
    </div>
    <div class="ag-buttons">
      <button class="ag-btn ag-no" data-action="dissimilar"><kbd>←</kbd> Dissimilar <kbd>n</kbd></button>
      <button class="ag-btn ag-skip" data-action="skip">Skip <kbd>s</kbd></button>
      <button class="ag-btn ag-yes" data-action="similar"><kbd>y</kbd> Similar <kbd>→</kbd></button>
      <button class="ag-btn ag-undo" data-action="undo">Undo <kbd>u</kbd></button>
      <button class="ag-btn ag-help-btn" data-action="help" title="keys">?</button>
    </div>
    <div class="ag-message" role="status" aria-live="polite"></div>
    <div class="ag-focus-hint">click here to use the keys</div>
  </div>
  <aside class="ag-side-panel">
    <section class="ag-size"></section>
    <section class="ag-bands">
      <h3>Bands</h3>
      <div class="ag-presets"></div>
      <div class="ag-custom">
        <select data-channel="0" aria-label="red band"></select>
        <select data-channel="1" aria-label="green band"></select>
        <select data-channel="2" aria-label="blue band"></select>
      </div>
      <label class="ag-toggle"><input type="checkbox" class="ag-show-neighbours" checked> nearest patches</label>
    </section>
    <section class="ag-locator-box">
      <h3>Where</h3>
      <img class="ag-locator" alt="both patches on their scene">
      <div class="ag-locator-note"></div>
    </section>
    <section class="ag-history">
      <h3>Progress</h3>
      <ul class="ag-rounds"></ul>
    </section>
  </aside>
</div>
<div class="ag-overlay ag-training" hidden>
  <div class="ag-card">
    <h2 class="ag-training-title">Training</h2>
    <div class="ag-progress"><span></span></div>
    <p class="ag-training-text"></p>
  </div>
</div>
<div class="ag-overlay ag-round-wait" hidden>
  <div class="ag-card">
    <h2>Round answered</h2>
    <p class="ag-round-text"></p>
    <button class="ag-btn ag-yes" data-action="train">Train and continue <kbd>t</kbd></button>
    <button class="ag-btn ag-undo" data-action="undo">Undo the last answer <kbd>u</kbd></button>
  </div>
</div>
<div class="ag-overlay ag-done" hidden>
  <div class="ag-card"><h2>Session complete</h2><p class="ag-done-text"></p></div>
</div>
<div class="ag-overlay ag-elsewhere" hidden>
  <div class="ag-card">
    <h2>Open in another tab</h2>
    <p>This session is being labelled in another tab or window. Answers from here are refused,
    so no answer is stored twice.</p>
    <button class="ag-btn ag-yes" data-action="claim">Label in this tab instead</button>
  </div>
</div>
<div class="ag-overlay ag-offline" hidden>
  <div class="ag-card">
    <h2>The labelling server is not answering</h2>
    <p>Every answer acknowledged on this page is saved in the session. Start
    <code>anneal-geo label SESSION --web</code> again; this page reconnects by itself.</p>
  </div>
</div>
<div class="ag-overlay ag-help" hidden>
  <div class="ag-card"><h2>Keys</h2><table class="ag-keys"></table>
  <p>Keys work while the labeller has the focus (a blue outline); click it to give it the focus.</p></div>
</div>
`;

function el(root, selector) {
  return root.querySelector(selector);
}

function fmtSeconds(s) {
  return s < 10 ? s.toFixed(1) : Math.round(s).toString();
}

/** Mount the labeller in `root`, talking to the session through `transport`. */
export function mount(root, transport) {
  root.classList.add("ag-labeller");
  root.tabIndex = 0;
  // JupyterLab/Lumino: no notebook shortcut fires for keys typed in here.
  root.setAttribute("data-lm-suppress-shortcuts", "true");
  root.innerHTML = TEMPLATE;

  const timings = [];
  const images = new Map(); // url -> Promise<HTMLImageElement> (decoded)
  const neighbourCache = new Map();
  let state = null;
  let inFlight = false;
  let bands = transport.loadBands ? transport.loadBands() : null;
  let showNeighbours = true;
  let pending = null; // {action, t0}
  let trainingSeen = null; // {at, elapsed}
  let pollTimer = null;
  let stopped = false;

  const left = el(root, ".ag-left");
  const right = el(root, ".ag-right");
  const message = el(root, ".ag-message");

  // -- pictures ------------------------------------------------------------------------
  function currentBands() {
    return bands || (state && state.bands.current) || "true";
  }

  function preload(id) {
    const key = `${id}|${currentBands()}`;
    if (!images.has(key)) {
      const promise = transport.image(id, currentBands()).then(
        (url) =>
          new Promise((resolve) => {
            const img = new Image();
            img.className = "ag-img";
            img.alt = `patch ${id}`;
            img.decoding = "sync";
            img.onload = () => {
              const done = img.decode ? img.decode().catch(() => null) : Promise.resolve();
              done.then(() => resolve(img));
            };
            img.onerror = () => resolve(null);
            img.src = url;
          }),
      );
      images.set(key, promise);
      if (images.size > 600) images.delete(images.keys().next().value);
    }
    return images.get(key);
  }

  // The rest of the round is loaded a few pictures at a time, so that during the round no
  // picture has to be fetched when a key is pressed.
  const queue = [];
  let loading = 0;
  function pump() {
    // An answer in flight goes first: loading ahead waits until it is acknowledged.
    while (loading < 2 && queue.length && !inFlight) {
      const id = queue.shift();
      loading++;
      preload(id).finally(() => {
        loading--;
        pump();
      });
    }
  }

  function prefetch(s) {
    if (!s || transport.prefetch === false) return;
    for (const pair of s.upcoming || []) {
      preload(pair[0]);
      preload(pair[1]);
      if (s.locator && transport.locator) transport.locator(pair[0], pair[1], true);
    }
    queue.length = 0;
    for (const pair of s.ahead || []) {
      for (const id of pair) if (!images.has(`${id}|${currentBands()}`)) queue.push(id);
    }
    pump();
  }

  // -- rendering -----------------------------------------------------------------------
  function showOverlay(name) {
    for (const node of root.querySelectorAll(".ag-overlay")) {
      node.hidden = !node.classList.contains(`ag-${name}`);
    }
  }

  function renderCounters(s) {
    const p = s.progress;
    el(root, ".ag-session").textContent = `· ${s.session}`;
    let text;
    if (s.phase === "done") {
      text = `all ${p.total_rounds} rounds done`;
    } else {
      text =
        `round <b>${p.round}</b> of ${p.total_rounds - 1} · pair <b>${Math.min(p.answered_in_round + 1, p.round_pairs)}</b>` +
        ` of ${p.round_pairs} in this round`;
    }
    el(root, ".ag-counters").innerHTML = text;
    const share = p.budget_total ? Math.min(1, p.budget_used / p.budget_total) : 0;
    el(root, ".ag-budget-bar span").style.width = `${(100 * share).toFixed(1)}%`;
    el(root, ".ag-budget-text").textContent = `${p.budget_used} of ${p.budget_total} pairs answered`;
  }

  function renderSide(s) {
    el(root, ".ag-size").textContent = `each patch: ${s.size_text}`;
    const presets = el(root, ".ag-presets");
    const chosen = currentBands();
    if (presets.dataset.built !== "1") {
      presets.innerHTML = "";
      for (const preset of s.bands.presets) {
        const b = document.createElement("button");
        b.className = "ag-chip";
        b.dataset.bands = preset.value;
        b.textContent = preset.label;
        presets.appendChild(b);
      }
      for (const select of root.querySelectorAll(".ag-custom select")) {
        select.innerHTML = s.bands.bands.map((b) => `<option>${b}</option>`).join("");
      }
      presets.dataset.built = "1";
    }
    for (const chip of presets.querySelectorAll(".ag-chip")) {
      chip.classList.toggle("ag-on", chip.dataset.bands === chosen);
    }
    const names = chosen.includes(",")
      ? chosen.split(",")
      : { true: ["B04", "B03", "B02"], false: ["B08", "B04", "B03"] }[chosen] || [];
    root.querySelectorAll(".ag-custom select").forEach((select, k) => {
      if (names[k] && s.bands.bands.includes(names[k])) select.value = names[k];
    });
    const rounds = el(root, ".ag-rounds");
    rounds.innerHTML = s.history.length
      ? s.history
          .map((r) => {
            const metric = r["map@20"] !== undefined ? ` · mAP@20 ${r["map@20"].toFixed(3)}` : "";
            const skipped = r.skipped_pairs ? `, ${r.skipped_pairs} skipped` : "";
            return `<li>round ${r.round}: ${r.queried_pairs} answered${skipped}, ${r.implied_pairs} implied${metric}</li>`;
          })
          .join("")
      : "<li>no round trained yet</li>";
    el(root, ".ag-locator-box").hidden = !s.locator;
    el(root, ".ag-locator-note").textContent = s.locator_note || "";
  }

  function caption(figure, id, s, side) {
    const info = s.patches[String(id)] || {};
    el(figure, ".ag-id").textContent = `patch ${id}`;
    el(figure, ".ag-place").textContent = info.place || "";
    figure.dataset.patch = String(id);
    figure.setAttribute("aria-label", `${side} patch ${id}`);
  }

  async function renderNeighbours(figure, id, s) {
    const box = el(figure, ".ag-neighbours");
    el(figure, ".ag-neighbours-label").hidden = !showNeighbours;
    if (!showNeighbours || !transport.neighbours) {
      box.innerHTML = "";
      return;
    }
    const key = `${id}|${s.progress.rounds_done}`;
    if (!neighbourCache.has(key)) neighbourCache.set(key, transport.neighbours(id, s.progress.rounds_done));
    const ids = await neighbourCache.get(key).catch(() => []);
    if (figure.dataset.patch !== String(id)) return; // moved on meanwhile
    const urls = await Promise.all(ids.map((n) => transport.image(n, currentBands())));
    if (figure.dataset.patch !== String(id)) return;
    box.innerHTML = "";
    box.classList.remove("ag-stale");
    ids.forEach((n, k) => {
      const img = document.createElement("img");
      img.className = "ag-thumb";
      img.src = urls[k];
      img.title = `patch ${n}`;
      img.alt = `neighbour ${n}`;
      box.appendChild(img);
    });
  }

  async function renderPair(s) {
    const pair = s.pair;
    const [a, b] = await Promise.all([preload(pair.i), preload(pair.j)]);
    if (state !== s) return false; // a newer state arrived while decoding
    el(left, ".ag-slot").replaceChildren(...(a ? [a] : []));
    el(right, ".ag-slot").replaceChildren(...(b ? [b] : []));
    caption(left, pair.i, s, "left");
    caption(right, pair.j, s, "right");
    for (const box of root.querySelectorAll(".ag-neighbours")) box.classList.add("ag-stale");
    if (s.locator && transport.locator) {
      transport.locator(pair.i, pair.j, false).then((url) => {
        if (state === s && url) el(root, ".ag-locator").src = url;
      });
    }
    return true;
  }

  function setButtons(s) {
    const answering = s.phase === "answering" && !inFlight;
    for (const button of root.querySelectorAll(".ag-buttons [data-action]")) {
      const action = button.dataset.action;
      if (action === "help") continue;
      button.disabled = action === "undo" ? !s.undo || inFlight : !answering;
    }
    for (const button of root.querySelectorAll(".ag-round-wait [data-action=undo]")) {
      button.disabled = !s.undo;
    }
  }

  function startPolling() {
    if (pollTimer || !transport.poll) return;
    pollTimer = setInterval(async () => {
      try {
        const fresh = await transport.state();
        if (fresh.phase !== "training") {
          clearInterval(pollTimer);
          pollTimer = null;
          apply(fresh);
        } else {
          state = fresh;
        }
      } catch (err) {
        offline(err);
      }
    }, 100);
  }

  function animateTraining() {
    if (!state || state.phase !== "training" || stopped) return;
    const t = state.training || {};
    const elapsed = trainingSeen ? trainingSeen.elapsed + (performance.now() - trainingSeen.at) / 1000 : 0;
    const estimate = t.estimate || null;
    const share = estimate ? Math.min(0.95, elapsed / estimate) : (elapsed % 3) / 3;
    el(root, ".ag-training .ag-progress span").style.width = `${(100 * share).toFixed(1)}%`;
    el(root, ".ag-training-text").textContent =
      `on ${t.labelled ?? "the"} answered pairs and what they imply · ${fmtSeconds(elapsed)} s` +
      (estimate ? ` of about ${fmtSeconds(estimate)} s` : "") +
      " · the next pair comes by itself";
    requestAnimationFrame(animateTraining);
  }

  async function apply(s, painted) {
    state = s;
    renderCounters(s);
    renderSide(s);
    message.textContent = s.message || "";
    message.classList.toggle("ag-error", Boolean(s.error));
    if (s.error) message.textContent = s.error;
    setButtons(s);
    if (s.phase === "training") {
      const t = s.training || {};
      el(root, ".ag-training-title").textContent = `Training round ${t.round ?? s.progress.round}`;
      trainingSeen = { at: performance.now(), elapsed: t.elapsed || 0 };
      showOverlay("training");
      requestAnimationFrame(animateTraining);
      startPolling();
      if (painted) painted(false);
      return;
    }
    trainingSeen = null;
    if (s.phase === "done") {
      const p = s.progress;
      el(root, ".ag-done-text").textContent =
        `All ${p.total_rounds} rounds are trained; ${p.budget_used} pairs answered. ` +
        `The answers are in ${s.session_dir}. You can close this page.`;
      showOverlay("done");
      if (painted) painted(false);
      return;
    }
    if (s.phase === "round_complete") {
      el(root, ".ag-round-text").textContent =
        `All ${s.progress.round_pairs} pairs of round ${s.progress.round} are answered.`;
      showOverlay("round-wait");
      if (painted) painted(false);
      return;
    }
    showOverlay("none");
    const shown = await renderPair(s);
    prefetch(s);
    if (painted) painted(shown);
    if (shown) {
      // Neighbours come a moment later, so they never compete with the next key press.
      setTimeout(() => {
        if (state !== s) return;
        renderNeighbours(left, s.pair.i, s);
        renderNeighbours(right, s.pair.j, s);
      }, 150);
    }
  }

  function offline(err) {
    if (stopped) return;
    console.warn("anneal-geo labeller:", err);
    showOverlay("offline");
    if (transport.reconnect && !root.dataset.reconnecting) {
      root.dataset.reconnecting = "1";
      const retry = setInterval(async () => {
        try {
          const s = await transport.reconnect();
          clearInterval(retry);
          delete root.dataset.reconnecting;
          apply(s);
        } catch (e) {
          /* still down */
        }
      }, 1500);
    }
  }

  function handleReply(reply, t0, action) {
    const t1 = performance.now();
    if (reply.elsewhere) {
      inFlight = false;
      state = reply.state || state;
      showOverlay("elsewhere");
      return;
    }
    const s = reply.state || state;
    if (!reply.ok && reply.error) s.error = reply.error;
    inFlight = false;
    apply(s, (shown) => {
      requestAnimationFrame(() =>
        setTimeout(() => {
          timings.push({ action, key: t0, ack: t1, painted: performance.now(), shown, ok: !!reply.ok });
          if (transport.onTiming) transport.onTiming(timings[timings.length - 1]);
        }, 0),
      );
    });
  }

  async function act(action, t0) {
    if (!state || stopped) return;
    if (action === "help") {
      const help = el(root, ".ag-help");
      if (help.hidden) {
        el(root, ".ag-keys").innerHTML = HELP.map(([k, v]) => `<tr><td><kbd>${k}</kbd></td><td>${v}</td></tr>`).join("");
        showOverlay("help");
      } else {
        apply(state);
      }
      return;
    }
    if (action === "close") {
      if (!el(root, ".ag-help").hidden) apply(state);
      return;
    }
    if (action === "claim") {
      try {
        apply(await transport.hello());
      } catch (err) {
        offline(err);
      }
      return;
    }
    if (inFlight) return;
    let payload;
    if (action === "similar" || action === "dissimilar" || action === "skip") {
      if (state.phase !== "answering" || !state.pair) return;
      payload = { value: action, pair: [state.pair.i, state.pair.j], round: state.pair.round };
    } else if (action === "undo") {
      if (!state.undo) {
        message.textContent = "nothing to undo in this round (answers of finished rounds are kept)";
        return;
      }
      payload = { pair: state.undo };
    } else if (action === "train") {
      if (state.phase !== "round_complete") return;
      payload = {};
    } else {
      return;
    }
    inFlight = true;
    setButtons(state);
    message.textContent = "saving …";
    try {
      const reply = await transport.call(action === "similar" || action === "dissimilar" || action === "skip" ? "answer" : action, payload);
      handleReply(reply, t0, action);
    } catch (err) {
      inFlight = false;
      offline(err);
    }
  }

  // -- events --------------------------------------------------------------------------
  root.addEventListener("keydown", (event) => {
    const target = event.target;
    if (target && (target.tagName === "SELECT" || target.tagName === "INPUT")) return;
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    const action = ACTIONS[event.key];
    if (!action) return;
    event.preventDefault();
    event.stopPropagation();
    if (event.repeat && action !== "undo") return; // a held key answers once
    act(action, performance.now());
  });
  root.addEventListener("click", (event) => {
    const button = event.target.closest("[data-action]");
    if (button && root.contains(button)) {
      act(button.dataset.action, performance.now());
      root.focus({ preventScroll: true });
      return;
    }
    const chip = event.target.closest(".ag-chip");
    if (chip) {
      setBands(chip.dataset.bands);
      root.focus({ preventScroll: true });
      return;
    }
    if (!event.target.closest("select, input, label")) root.focus({ preventScroll: true });
  });
  root.addEventListener("change", (event) => {
    if (event.target.matches(".ag-custom select")) {
      const names = [...root.querySelectorAll(".ag-custom select")].map((s) => s.value);
      setBands(names.join(","));
      root.focus({ preventScroll: true });
    } else if (event.target.matches(".ag-show-neighbours")) {
      showNeighbours = event.target.checked;
      if (state && state.pair) {
        renderNeighbours(left, state.pair.i, state);
        renderNeighbours(right, state.pair.j, state);
      }
      root.focus({ preventScroll: true });
    }
  });

  function setBands(value) {
    bands = value;
    if (transport.saveBands) transport.saveBands(value);
    if (state) apply(state);
  }

  // -- start ---------------------------------------------------------------------------
  (async () => {
    try {
      const s = await transport.hello();
      await apply(s);
      root.focus({ preventScroll: true });
    } catch (err) {
      offline(err);
    }
  })();
  if (transport.onState) {
    transport.onState((s) => {
      if (!inFlight) apply(s);
    });
  }
  if (transport.onElsewhere) transport.onElsewhere(() => showOverlay("elsewhere"));

  return {
    timings,
    get state() {
      return state;
    },
    stop() {
      stopped = true;
      if (pollTimer) clearInterval(pollTimer);
    },
  };
}

// -- the Jupyter widget (anywidget) ------------------------------------------------------

function widgetTransport(model) {
  // Every view of the widget gets every reply: ids carry this view's own prefix.
  const view = Math.random().toString(36).slice(2, 10);
  let next = 1;
  const waiting = new Map();
  const urls = new Map();
  const stateListeners = [];
  model.on("msg:custom", (msg, buffers) => {
    if (msg && msg.reply !== undefined && waiting.has(msg.reply)) {
      const resolve = waiting.get(msg.reply);
      waiting.delete(msg.reply);
      resolve({ msg, buffers });
    }
  });
  model.on("change:state", () => {
    const s = model.get("state");
    for (const listener of stateListeners) listener(s);
  });
  function request(content) {
    const id = `${view}-${next++}`;
    return new Promise((resolve) => {
      waiting.set(id, resolve);
      model.send({ ...content, id });
    });
  }
  return {
    kind: "widget",
    async hello() {
      const { msg } = await request({ action: "hello" });
      return msg.state || model.get("state");
    },
    async state() {
      return model.get("state");
    },
    async call(action, payload) {
      const { msg } = await request({ action, ...payload });
      return msg;
    },
    async image(id, bands) {
      const key = `${id}|${bands}`;
      if (!urls.has(key)) {
        urls.set(
          key,
          request({ action: "image", patch: id, bands }).then(({ msg, buffers }) => {
            if (!msg.ok || !buffers || !buffers.length) return "";
            return URL.createObjectURL(new Blob([buffers[0]], { type: "image/png" }));
          }),
        );
      }
      return urls.get(key);
    },
    async locator(i, j) {
      const key = `loc|${i}|${j}`;
      if (!urls.has(key)) {
        urls.set(
          key,
          request({ action: "locator", pair: [i, j] }).then(({ msg, buffers }) => {
            if (!msg.ok || !buffers || !buffers.length) return null;
            return URL.createObjectURL(new Blob([buffers[0]], { type: "image/jpeg" }));
          }),
        );
      }
      return urls.get(key);
    },
    async neighbours(id) {
      const { msg } = await request({ action: "neighbours", patch: id });
      return msg.ids || [];
    },
    onState(listener) {
      stateListeners.push(listener);
    },
  };
}

export default {
  render({ model, el: root }) {
    const box = document.createElement("div");
    root.appendChild(box);
    box.classList.add("ag-in-widget");
    const labeller = mount(box, widgetTransport(model));
    return () => labeller.stop();
  },
};
