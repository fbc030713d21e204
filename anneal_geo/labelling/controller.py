"""The labelling controller: one person's place in a session, shared by every front end.

The terminal labeller, the Jupyter widget and the web page all drive a
:class:`LabellingController`; none of them talks to SQLite or to the engine itself. The
controller asks the engine for the round's pairs (``round_pairs`` / ``unanswered``), commits
each answer through it (``engine.answer``, committed before the call returns), undoes
answers of the current round, trains a finished round (``finish_round``) and chooses the
next one, and says where the session stands (:meth:`LabellingController.state`, a
JSON-ready dictionary every front end renders the same way).

Nothing about the session is cached between calls: every call reads the engine and its
PairStore, so a controller rebuilt after a restart, or two front ends over one engine,
agree on where the session stands. Answers and undos can name the pair they mean
(``pair=(i, j)``): a front end that shows a stale pair (a second view, a retried request)
gets a :class:`LabellingConflict` instead of answering a pair it did not show, and an answer
repeated for a pair that already has that answer is acknowledged again without a second
row (idempotent).

Pictures come from one renderer (:class:`~anneal_geo.annotators.render.PatchRenderer`, a
pool-wide stretch) per band combination, cached; rendering reads only the pool, so front
ends may render on other threads while the engine's thread answers.

The controller never takes the session's writer lock: the engine it is given holds it.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from anneal_geo.annotators.base import DISSIMILAR, SIMILAR, SKIP
from anneal_geo.errors import ConfigError, SessionError

if TYPE_CHECKING:
    from anneal_geo.annotators.render import PatchRenderer
    from anneal_geo.engine import Engine

__all__ = [
    "ANSWER_CODES",
    "ANSWER_WORDS",
    "Answered",
    "LabellingConflict",
    "LabellingController",
    "Progress",
    "round_summary",
    "training_state",
]

#: Stored answer code -> the word shown for it.
ANSWER_WORDS: dict[int, str] = {SIMILAR: "similar", DISSIMILAR: "dissimilar", SKIP: "skipped"}
#: What a front end may send -> the stored answer code.
ANSWER_CODES: dict[str, int] = {
    "similar": SIMILAR,
    "y": SIMILAR,
    "1": SIMILAR,
    "dissimilar": DISSIMILAR,
    "n": DISSIMILAR,
    "0": DISSIMILAR,
    "skip": SKIP,
    "skipped": SKIP,
    "s": SKIP,
    "-1": SKIP,
}

#: Band presets a front end offers, with the words shown for them.
PRESET_LABELS: dict[str, str] = {
    "true": "true colour (B04, B03, B02)",
    "false": "false colour (B08, B04, B03)",
}


#: Patch pictures kept in memory (a 64 px PNG is about 10 kB).
_PNG_CACHE = 4096
#: Pairs of the round a state lists beyond the next ones, so pages can load them ahead.
_AHEAD = 200


class LabellingConflict(SessionError):
    """An answer or undo for a pair that is not the one the session is at (stale view)."""


@dataclass(frozen=True)
class Progress:
    """Counters a labelling front end shows.

    Attributes:
        round: the round being answered (0 = the initial set).
        total_rounds: rounds in the session (initial set included).
        round_pairs: pairs asked in this round.
        left_in_round: pairs of this round without an answer.
        budget_used: pairs answered in the session (skips included, undone ones not).
        budget_total: pairs the session asks in all (initial + rounds x budget).
        rounds_done: rounds trained so far.
    """

    round: int
    total_rounds: int
    round_pairs: int
    left_in_round: int
    budget_used: int
    budget_total: int
    rounds_done: int = 0

    @property
    def answered_in_round(self) -> int:
        return self.round_pairs - self.left_in_round


@dataclass(frozen=True)
class Answered:
    """An acknowledged answer.

    Attributes:
        seq: its sequence number in the store (None when it repeated a stored answer).
        i: one patch of the pair.
        j: the other patch.
        value: 1 similar, 0 dissimilar, -1 skipped.
        repeated: True when the pair already had this answer (nothing was written).
    """

    seq: int | None
    i: int
    j: int
    value: int
    repeated: bool = False

    @property
    def word(self) -> str:
        return ANSWER_WORDS[self.value]

    def message(self) -> str:
        if self.repeated:
            return f"already saved: patches {self.i} and {self.j} {self.word}"
        return f"saved answer {self.seq}: patches {self.i} and {self.j} {self.word}"


def round_summary(record: dict[str, Any]) -> str:
    """One line about a finished round for people (metrics only when the pool has labels)."""
    parts = [
        f"round {record['round']} done in {float(record.get('seconds', 0.0)):.1f} s",
        f"{record.get('queried_pairs', 0)} answered pairs",
        f"{record.get('implied_pairs', 0)} implied",
    ]
    if record.get("contradictions"):
        parts.append(f"{record['contradictions']} contradictions")
    if "map@20" in record:
        parts.append(f"mAP@20 {float(record['map@20']):.4f}")
    return ", ".join(parts)


def training_state(
    base: dict[str, Any], round: int, elapsed: float, estimate: float | None, labelled: int
) -> dict[str, Any]:
    """A state (from :meth:`LabellingController.state`) turned into the training phase.

    Front ends that train on another thread, or block while training, show this while
    :meth:`LabellingController.finish_round` runs.
    """
    state = dict(base)
    state.update(
        phase="training",
        pair=None,
        upcoming=[],
        training={
            "round": int(round),
            "elapsed": round_to(elapsed),
            "estimate": estimate,
            "labelled": int(labelled),
        },
    )
    return state


def round_to(seconds: float) -> float:
    """Seconds rounded to milliseconds."""
    return float(f"{seconds:.3f}")


def answer_code(value: int | str) -> int:
    """1, 0 or -1 from a code or a word (``"similar"``, ``"n"``, ``"skip"``, ...)."""
    if isinstance(value, bool):
        raise ConfigError(f"answer {value!r} must be similar, dissimilar or skip")
    if isinstance(value, int | np.integer):
        code = int(value)
        if code in ANSWER_WORDS:
            return code
    elif isinstance(value, str) and value.strip().lower() in ANSWER_CODES:
        return ANSWER_CODES[value.strip().lower()]
    raise ConfigError(f"answer {value!r} must be similar (1), dissimilar (0) or skip (-1)")


def bands_key(bands: str | Sequence[str] | None) -> str:
    """A band setting as one string: ``"true"``, ``"false"`` or ``"B12,B8A,B04"``."""
    if bands is None:
        return "true"
    if isinstance(bands, str):
        text = bands.strip()
        if "," in text:
            return ",".join(b.strip() for b in text.split(",") if b.strip())
        return text or "true"
    return ",".join(str(b).strip() for b in bands)


def _pair(value: Sequence[int] | np.ndarray | None) -> tuple[int, int] | None:
    if value is None:
        return None
    items = [int(v) for v in value]
    if len(items) != 2:
        raise ConfigError(f"a pair is two patch ids, got {list(value)!r}")
    return items[0], items[1]


def _same_pair(a: tuple[int, int] | None, b: tuple[int, int] | None) -> bool:
    return a is not None and b is not None and sorted(a) == sorted(b)


class LabellingController:
    """A person's place in a session: next pair, answer, skip, undo, train, counters.

    Args:
        engine: the engine of the session being labelled (it holds the session's lock).
        annotator: recorded with each answer (``terminal``, ``widget``, ``web``, a name).
        bands: the default picture bands: preset ``"true"`` / ``"false"`` or three band
            names (default: the session's annotator option ``bands``, else true colour).
        size: longer side of each enlarged patch picture, in pixels (terminal PNG).

    Attributes:
        commit_ms: milliseconds each answer took to be committed to SQLite.
        train_seconds: seconds each :meth:`finish_round` took (train, embed, evaluate and
            choose the next round's pairs).
        last_record: the history record of the last round this controller finished.
        last_message: a line about the last thing that happened (saved, undone, trained).
    """

    def __init__(
        self,
        engine: Engine,
        annotator: str = "web",
        *,
        bands: str | Sequence[str] | None = None,
        size: int = 256,
    ) -> None:
        self.engine = engine
        self.annotator = str(annotator)
        self.size = int(size)
        self._renderers: dict[str, PatchRenderer] = {}
        self._render_lock = threading.RLock()
        self._pngs: OrderedDict[tuple[int, str], bytes] = OrderedDict()
        self._locator: Any = None
        self._locator_built = False
        if bands is None:
            bands = engine.config.annotator_options.get("bands")
        self.bands = bands_key(bands)
        self.renderer(self.bands)  # a bad band setting fails now, with its message
        self.commit_ms: list[float] = []
        self.train_seconds: list[float] = []
        self.last_record: dict[str, Any] | None = None
        self.last_message = ""

    # -- where the session stands --------------------------------------------------------
    @property
    def done(self) -> bool:
        """Whether every round of the session is finished."""
        return self.engine.rounds_done >= self.engine.total_rounds

    def upcoming(self, count: int = 1) -> list[tuple[int, int]]:
        """The next ``count`` unanswered pairs of the round, the current one first.

        Pairs come in the order the round chose them; a pair whose answer was undone is
        unanswered again, so it comes back before the ones not yet asked.
        """
        if self.done:
            return []
        left = self.engine.unanswered()
        return [(int(i), int(j)) for i, j in left[: max(0, int(count))].tolist()]

    def next_pair(self) -> tuple[int, int] | None:
        """The pair to ask now, or None when the round (or the session) is done."""
        pairs = self.upcoming(1)
        return pairs[0] if pairs else None

    @property
    def round_complete(self) -> bool:
        """Every pair of the current round is answered but the round is not trained yet."""
        return not self.done and self.next_pair() is None

    def progress(self, left: np.ndarray | None = None) -> Progress:
        """The counters; on a finished session the round is the last one, with 0 left.

        Args:
            left: the round's unanswered pairs when the caller has just read them.
        """
        engine = self.engine
        cfg = engine.config
        total = cfg.initial + cfg.rounds * cfg.budget
        used = len(engine.store)
        done = engine.rounds_done
        if self.done:
            return Progress(engine.total_rounds - 1, engine.total_rounds, 0, 0, used, total, done)
        pairs = engine.round_pairs()
        if left is None:
            left = engine.unanswered()
        return Progress(done, engine.total_rounds, len(pairs), len(left), used, total, done)

    def undo_target(self) -> tuple[int, int] | None:
        """The pair whose answer :meth:`undo` would take back, or None.

        Answers of finished rounds are not undone: the model has been trained on them and
        the next round's pairs were chosen from that model.
        """
        if self.done:
            return None
        store = self.engine.store
        last = store.last_round()
        if last is None or last != self.engine.rounds_done:
            return None
        queried = store.queried()  # the latest answer in effect is the last row
        if not len(queried):
            return None
        i, j = queried[-1].tolist()
        return int(i), int(j)

    def can_undo(self) -> bool:
        """Whether the current round has an answer to take back."""
        return self.undo_target() is not None

    # -- answering ---------------------------------------------------------------------
    def answer(self, value: int | str, *, pair: Sequence[int] | None = None) -> Answered:
        """Commit an answer for the current pair to SQLite before returning.

        Args:
            value: 1 / ``"similar"``, 0 / ``"dissimilar"`` or -1 / ``"skip"``.
            pair: the pair the person saw; when given and not the current pair, the answer
                is refused (:class:`LabellingConflict`), unless that pair already has this
                very answer (a repeated request: acknowledged, nothing written).

        Raises:
            LabellingConflict: nothing to answer, or ``pair`` is not the current pair.
        """
        code = answer_code(value)
        shown = _pair(pair)
        current = self.next_pair()
        if current is None:
            if shown is not None and self._has_answer(shown, code):
                a, b = sorted(shown)
                return Answered(None, a, b, code, repeated=True)
            raise LabellingConflict(self._nothing_to_answer())
        if shown is not None and not _same_pair(shown, current):
            if self._has_answer(shown, code):
                a, b = sorted(shown)
                return Answered(None, a, b, code, repeated=True)
            raise LabellingConflict(
                f"patches {shown[0]} and {shown[1]} are not the pair being asked (it is "
                f"{current[0]} and {current[1]}); the page shows the current pair again"
            )
        i, j = current
        start = time.perf_counter()
        seq = self.engine.answer(i, j, code, annotator=self.annotator)
        self.commit_ms.append((time.perf_counter() - start) * 1000.0)
        done = Answered(seq, i, j, code)
        self.last_message = done.message()
        return done

    def skip(self, *, pair: Sequence[int] | None = None) -> Answered:
        """Skip the current pair (it is not asked again)."""
        return self.answer(SKIP, pair=pair)

    def undo(self, *, pair: Sequence[int] | None = None) -> tuple[int, int] | None:
        """Undo the latest answer of the current round; its pair is asked again, next.

        Args:
            pair: the pair the front end means to undo; when given and the latest answer
                is about another pair, nothing is undone (:class:`LabellingConflict`).

        Returns:
            the pair whose answer was undone, or None when the round has none to undo.
        """
        target = self.undo_target()
        wanted = _pair(pair)
        if wanted is not None and not _same_pair(wanted, target):
            raise LabellingConflict(
                f"the latest answer is not about patches {wanted[0]} and {wanted[1]}; "
                "nothing was undone"
            )
        if target is None:
            self.last_message = (
                "nothing to undo in this round (answers of finished rounds are kept)"
            )
            return None
        undone = self.engine.store.undo(annotator=self.annotator)
        if undone is not None:
            self.last_message = f"undone: patches {undone[0]} and {undone[1]}; asked again"
        return undone

    def _has_answer(self, pair: tuple[int, int], code: int) -> bool:
        pairs, labels, _ = self.engine.store.answers(include_skipped=True)
        a, b = sorted(pair)
        hit = np.flatnonzero((pairs[:, 0] == a) & (pairs[:, 1] == b))
        return bool(hit.size) and int(labels[hit[-1]]) == code

    def _nothing_to_answer(self) -> str:
        if self.done:
            return "the session is finished: every round is answered and trained"
        return f"round {self.engine.rounds_done} is fully answered; it is being trained"

    # -- rounds ------------------------------------------------------------------------
    def finish_round(self) -> dict[str, Any]:
        """Train, embed and evaluate the answered round, then choose the next round's pairs.

        Choosing the next pairs here (not on the next question) keeps the whole wait
        between two rounds in one call, which a front end shows as one progress bar.
        """
        start = time.perf_counter()
        record = self.engine.finish_round()
        if not self.done:
            self.engine.round_pairs()
        self.train_seconds.append(time.perf_counter() - start)
        self.last_record = record
        self.last_message = round_summary(record)
        return record

    def training_estimate(self) -> float | None:
        """Seconds the next :meth:`finish_round` will probably take (None before any)."""
        if self.train_seconds:
            return float(self.train_seconds[-1])
        history = self.engine.session.history()
        if history:
            last = history[-1]
            return float(last.get("seconds", 0.0)) or None
        return None

    # -- pictures ----------------------------------------------------------------------
    def renderer(self, bands: str | Sequence[str] | None = None) -> PatchRenderer:
        """The renderer of a band combination (built once, pool-wide stretch).

        Raises:
            ConfigError: a malformed band setting.
            DataError: a band the pool lacks.
        """
        from anneal_geo.annotators.render import PatchRenderer

        key = self.bands if bands is None else bands_key(bands)
        with self._render_lock:
            found = self._renderers.get(key)
            if found is None:
                found = PatchRenderer(self.engine.pool, key, size=self.size)
                self._renderers[key] = found
            return found

    def set_bands(self, bands: str | Sequence[str] | None) -> str:
        """Make ``bands`` the default picture bands; return its key (validated)."""
        key = bands_key(bands)
        self.renderer(key)
        self.bands = key
        return key

    def patch_png(self, patch_id: int, bands: str | Sequence[str] | None = None) -> bytes:
        """PNG bytes of one patch at native resolution (front ends enlarge it sharply).

        The last few thousand pictures are kept: neighbours and prefetched pairs repeat.
        """
        renderer = self.renderer(bands)
        key = (int(patch_id), self.bands if bands is None else bands_key(bands))
        with self._render_lock:
            found = self._pngs.get(key)
            if found is not None:
                self._pngs.move_to_end(key)
                return found
        data = renderer.png(renderer.composite(int(patch_id)))
        with self._render_lock:
            self._pngs[key] = data
            while len(self._pngs) > _PNG_CACHE:
                self._pngs.popitem(last=False)
        return data

    def band_options(self) -> dict[str, Any]:
        """The presets this pool supports, its band names and the current setting."""
        from anneal_geo.annotators.render import available_presets

        presets = [
            {"value": name, "label": PRESET_LABELS.get(name, name)}
            for name in available_presets(self.engine.pool.bands)
        ]
        if not presets:
            presets = [{"value": "true", "label": "first three bands"}]
        return {"current": self.bands, "presets": presets, "bands": list(self.engine.pool.bands)}

    @property
    def locator(self) -> Any:
        """The scene locator of a tile pool (None for pools of separate patches)."""
        if not self._locator_built:
            from anneal_geo.labelling.locator import SceneLocator

            with self._render_lock:
                if not self._locator_built:
                    self._locator = SceneLocator.for_pool(self.engine.pool, self.renderer())
                    self._locator_built = True
        return self._locator

    def locator_jpeg(self, i: int, j: int) -> bytes | None:
        """A small picture of the pair's scene(s) with both patches outlined, or None."""
        locator = self.locator
        return None if locator is None else locator.jpeg(int(i), int(j))

    def neighbours(self, patch_id: int, k: int = 4) -> list[int]:
        """The ``k`` patches nearest to ``patch_id`` in the current embedding."""
        embeddings = self.engine.embeddings
        n = int(embeddings.shape[0])
        if not 0 <= int(patch_id) < n:
            raise ConfigError(f"patch id {patch_id} is out of range 0..{n - 1}")
        k = max(0, min(int(k), n - 1))
        if k == 0:
            return []
        # A finishing round rewrites the embeddings in place: read them whole, before or after.
        with self.engine.embeddings_lock:
            embeddings = self.engine.embeddings
            similarity = embeddings @ embeddings[int(patch_id)]
        similarity[int(patch_id)] = -np.inf
        top = np.argpartition(-similarity, k - 1)[:k]
        top = top[np.argsort(-similarity[top], kind="stable")]
        return [int(t) for t in top]

    def describe_patch(self, patch_id: int) -> dict[str, Any]:
        """Where a patch is and how large it is, for captions."""
        renderer = self.renderer()
        places = renderer.places
        lonlat = None
        if places is not None and np.isfinite(places[int(patch_id)]).all():
            lonlat = [
                round(float(places[int(patch_id)][0]), 6),
                round(float(places[int(patch_id)][1]), 6),
            ]
        return {"id": int(patch_id), "place": renderer.place(int(patch_id)), "lonlat": lonlat}

    # -- the whole state ---------------------------------------------------------------
    def state(self, prefetch: int = 2) -> dict[str, Any]:
        """Everything a front end shows, JSON-ready.

        Keys: ``phase`` (``answering``, ``round_complete``, ``done``), ``pair`` (the current
        pair or None), ``upcoming`` (the pairs after it, to prefetch their pictures),
        ``ahead`` (more of the round's pairs, to load while the person thinks), ``patches``
        (place of each patch named), ``progress``, ``undo`` (the pair an undo
        would take back, or None), ``bands``, ``size_text``, ``message``, ``history``
        (one short line per finished round), ``training_estimate`` (seconds) and
        ``locator`` (whether the pool has scene pictures).
        """
        engine = self.engine
        # One read of the history, the pending round and the store each: the state is
        # built after every answer, so it must stay cheap.
        records = engine.session.history()
        rounds_done = len(records)
        done = rounds_done >= engine.total_rounds
        cfg = engine.config
        budget_total = cfg.initial + cfg.rounds * cfg.budget
        used = len(engine.store)
        if done:
            left = np.zeros((0, 2), dtype=np.int64)
            last = engine.total_rounds - 1
            progress = Progress(last, engine.total_rounds, 0, 0, used, budget_total, rounds_done)
        else:
            left = engine.unanswered()
            round_size = len(engine.round_pairs())
            progress = Progress(
                rounds_done, engine.total_rounds, round_size, len(left), used, budget_total,
                rounds_done,
            )  # fmt: skip
        count = 1 + max(0, int(prefetch))
        pairs = [(int(i), int(j)) for i, j in left[:count].tolist()]
        if done:
            phase = "done"
        elif not pairs:
            phase = "round_complete"
        else:
            phase = "answering"
        current = pairs[0] if pairs else None
        named = sorted({p for pair in pairs for p in pair})
        history = [
            {
                "round": int(r.get("round", k)),
                "queried_pairs": int(r.get("queried_pairs", 0)),
                "skipped_pairs": int(r.get("skipped_pairs", 0)),
                "implied_pairs": int(r.get("implied_pairs", 0)),
                "seconds": float(r.get("seconds", 0.0)),
                **({"map@20": float(r["map@20"])} if "map@20" in r else {}),
            }
            for k, r in enumerate(records)
        ]
        undo = None
        if not done and engine.store.last_round() == rounds_done:
            queried = engine.store.queried()
            undo = [int(v) for v in queried[-1].tolist()] if len(queried) else None
        if self.train_seconds:
            estimate: float | None = float(self.train_seconds[-1])
        else:
            estimate = float(records[-1].get("seconds", 0.0)) or None if records else None
        return {
            "phase": phase,
            "session": Path(engine.session.directory).name,
            "session_dir": str(engine.session.directory),
            "annotator": self.annotator,
            "pair": None
            if current is None
            else {"round": progress.round, "i": current[0], "j": current[1]},
            "upcoming": [list(p) for p in pairs[1:]],
            # The rest of the round (up to 200 pairs), for front ends that load ahead.
            "ahead": [[int(i), int(j)] for i, j in left[count : count + _AHEAD].tolist()],
            "patches": {str(p): self.describe_patch(p) for p in named},
            "progress": {**asdict(progress), "answered_in_round": progress.answered_in_round},
            "undo": undo,
            "bands": self.band_options(),
            "size_text": self.renderer().size_text(),
            "patch_size": list(engine.pool.patch_size),
            "message": self.last_message,
            "history": history,
            "training_estimate": estimate,
            "locator": self.locator is not None,
            "locator_note": "" if self.locator is None else self.locator.note,
        }
