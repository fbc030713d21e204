"""How fast a person can label in the web labeller: key press -> committed -> next pair painted.

Runs the real ``anneal-geo label SESSION --web`` server (a subprocess) on the 4,000-patch
development pool and drives the real page in Chromium (Playwright) as a scripted "person"
who answers from the class labels and presses the next key as soon as the next pair is
painted. The page itself records, for every key press, when the key was pressed, when the
server acknowledged the answer (committed to SQLite) and when the next pair was painted.

Reported: median and p90 of key -> acknowledged and key -> next pair painted over the
measured answers; the wait between rounds (the key that ends a round -> the next round's
first pair painted: training, embedding, evaluation and the next selection); answers per
minute the scripted person sustains, with and without the round waits (the floor the UI
sets: a person is slower). The baseline in the same run is the same page with prefetching
turned off (``?prefetch=0``): each next pair's pictures are fetched after the answer.

Targets: next pair painted in <= 100 ms at p90; round wait <= 2 s on 4,000 patches.

    flock /tmp/anneal-bench.lock .venv/bin/python benchmarks/labelling_latency.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from anneal_geo.data.pool import PatchPool
from anneal_geo.session import Session, SessionConfig

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "eurosat_rgb"
LAUNCH = "import sys\nfrom anneal_geo.cli import main\nsys.argv[0] = 'anneal-geo'\nmain()\n"
URL = re.compile(r"open (http://127\.0\.0\.1:\d+/) in a browser")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def start_server(session_dir: Path) -> tuple[subprocess.Popen[str], str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            LAUNCH,
            "label",
            str(session_dir),
            "--web",
            "--no-browser",
            "--port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    log = []
    while True:
        line = lines.get(timeout=600)
        if line is None:
            raise SystemExit("the server ended:\n" + "\n".join(log))
        log.append(line)
        match = URL.search(line)
        if match:
            return proc, match[1]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else float("nan")


#: The scripted person, run inside the page: it reads the pair on screen, dispatches the key
#: a person would press (the labeller's own keydown handler takes it), waits until the next
#: pair is painted and presses again at once. Running in the page keeps the harness's own
#: round trips (Playwright, CDP) out of the measured times.
PERSON = """
async ({labels, count}) => {
  const labeller = window.annealLabeller;
  const root = document.getElementById("labeller");
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  const painted = (s) => s && s.phase === "answering"
    && document.querySelector(".ag-left").dataset.patch == String(s.pair.i)
    && document.querySelector(".ag-right").dataset.patch == String(s.pair.j);
  const waits = [];
  const start = performance.now();
  for (let k = 0; k < count; k++) {
    while (!painted(labeller.state)) await sleep(1);
    const s = labeller.state;
    const lastInRound = s.progress.left_in_round === 1;
    const before = labeller.timings.length;
    const key = labels[s.pair.i] === labels[s.pair.j] ? "y" : "n";
    const t0 = performance.now();
    root.dispatchEvent(new KeyboardEvent("keydown", {key, bubbles: true}));
    while (labeller.timings.length <= before) await sleep(1);
    if (lastInRound) {
      while (!(labeller.state && labeller.state.phase === "done") && !painted(labeller.state)) {
        await sleep(5);
      }
      waits.push((performance.now() - t0) / 1000);
    }
  }
  const seconds = (performance.now() - start) / 1000;
  return {timings: labeller.timings.slice(-count), waits, seconds};
}
"""


def label(page: Any, labels: np.ndarray, count: int) -> dict[str, Any]:
    """Answer ``count`` pairs as fast as the page allows; return the timings."""
    page.wait_for_function("() => window.annealLabeller && window.annealLabeller.state")
    out = page.evaluate(PERSON, {"labels": labels.tolist(), "count": count})
    timings, waits, elapsed = out["timings"], out["waits"], out["seconds"]
    # The answer that ends a round is followed by training: its time is a round wait.
    answers = [t for t in timings if t["shown"]]
    painted_ms = [t["painted"] - t["key"] for t in answers]
    ack_ms = [t["ack"] - t["key"] for t in timings]
    return {
        "answers": count,
        "measured": len(painted_ms),
        "ack_ms_median": round(percentile(ack_ms, 50), 2),
        "ack_ms_p90": round(percentile(ack_ms, 90), 2),
        "painted_ms_median": round(percentile(painted_ms, 50), 2),
        "painted_ms_p90": round(percentile(painted_ms, 90), 2),
        "painted_ms_max": round(max(painted_ms), 2) if painted_ms else None,
        "round_waits_s": [round(w, 3) for w in waits],
        "seconds": round(elapsed, 2),
        "answers_per_minute": round(60.0 * count / elapsed, 1),
        "answers_per_minute_without_round_waits": round(
            60.0 * count / max(elapsed - sum(waits), 1e-9), 1
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--answers", type=int, default=200, help="measured with prefetching")
    parser.add_argument("--baseline", type=int, default=100, help="measured without it")
    parser.add_argument("--budget", type=int, default=50, help="pairs per round")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    load_before = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="anneal-labelling-"))
    t0 = time.perf_counter()
    pool = PatchPool.load(args.data)
    pool.save(work / "pool")
    pool_seconds = time.perf_counter() - t0
    labels = pool.single_labels()
    total = args.answers + args.baseline
    rounds = -(-total // args.budget) - 1
    config = SessionConfig(
        data=str(work / "pool"),
        annotator="widget",
        initial=args.budget,
        budget=args.budget,
        rounds=rounds,
        seed=0,
    )
    session = Session.create(work / "session", config, {"pool_dir": str(work / "pool")})
    t0 = time.perf_counter()
    proc, url = start_server(session.directory)
    server_seconds = time.perf_counter() - t0
    runs: dict[str, Any] = {}
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(url)
            runs["prefetch"] = label(page, labels, args.answers)
            page.goto(url + "?prefetch=0")
            runs["no prefetch (baseline)"] = label(page, labels, args.baseline)
            browser.close()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()

    waits = [w for run in runs.values() for w in run["round_waits_s"]]
    # The engine's own share of each wait (train, embed, evaluate, select), from the history.
    engine_seconds = [
        round(float(r["seconds"]), 3) for r in Session.open(session.directory).history()
    ]
    header = ("page", "answers", "ack p50", "ack p90", "painted p50", "painted p90", "ans/min")
    print(
        f"pool {args.data.name}: {len(pool)} patches, {pool.n_bands} bands "
        f"(loaded in {pool_seconds:.1f} s); server ready in {server_seconds:.1f} s"
    )
    print("  ".join(f"{h:>12}" for h in header))
    for name, run in runs.items():
        cells = (
            name,
            run["answers"],
            run["ack_ms_median"],
            run["ack_ms_p90"],
            run["painted_ms_median"],
            run["painted_ms_p90"],
            run["answers_per_minute"],
        )
        print("  ".join(f"{c:>12}" for c in cells))
    print(f"round waits (s): {waits}; max {max(waits):.2f}, median {np.median(waits):.2f}")
    print(f"of which the engine's round (train, embed, evaluate, select), s: {engine_seconds}")
    result = {
        "benchmark": "labelling_latency",
        "data": str(args.data),
        "patches": len(pool),
        "bands": pool.n_bands,
        "budget_per_round": args.budget,
        "pool_load_seconds": round(pool_seconds, 2),
        "server_ready_seconds": round(server_seconds, 2),
        "runs": runs,
        "round_wait_s_max": round(max(waits), 3),
        "round_wait_s_median": round(float(np.median(waits)), 3),
        "engine_round_seconds": engine_seconds,
        "driver": "a scripted person inside the page: keydown events on the labeller, the next "
        "key as soon as the next pair is painted",
        "targets": {"painted_ms_p90": 100, "round_wait_s": 2.0},
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            # Other work on the machine slows every figure: the 1-minute load average.
            "load_average_before": round(load_before, 2),
            "load_average_after": round(os.getloadavg()[0], 2),
        },
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "labelling_latency.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
