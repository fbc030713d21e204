"""Labelling pairs by hand in a terminal: `anneal-geo label SESSION` and the `terminal` plugin.

Two ways in, one prompt:

* :class:`TerminalLabeller` drives an :class:`~anneal_geo.engine.Engine` through its
  interactive API (``unanswered`` / ``answer`` / ``finish_round``), so it can undo within
  the round, train when a round's pairs are all answered and go on to the next round. This
  is ``anneal-geo label SESSION``.
* :class:`TerminalAnnotator` is the ``terminal`` annotator plugin: a generator the engine
  pulls answers from (``anneal-geo run --annotator terminal``). The contract gives it no
  access to the answers already committed, so it cannot undo; it says so and points at
  ``anneal-geo label``.

Both write the current pair as a side-by-side PNG and print its path (no installed
library shows images inline in terminals, and none is added for it), read one line per
answer (``y``/``n``/``s``/``u``/``q``; end of input means quit, so piped scripts work) and
print ``saved answer N`` only once the answer is committed to SQLite.

:class:`LabellingCursor` is the front-end-neutral part (next pair, counters, undo within
the round) shared with the Jupyter widget.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TextIO

import numpy as np

from anneal_geo.annotators.base import DISSIMILAR, SIMILAR, SKIP, Annotator
from anneal_geo.errors import ConfigError

if TYPE_CHECKING:
    from anneal_geo.annotators.render import PatchRenderer
    from anneal_geo.data.pool import PatchPool
    from anneal_geo.engine import Engine

__all__ = [
    "ANSWER_WORDS",
    "LabellingCursor",
    "Progress",
    "TerminalAnnotator",
    "TerminalLabeller",
    "TerminalPrompt",
]

#: Stored answer code -> the word printed for it.
ANSWER_WORDS: dict[int, str] = {SIMILAR: "similar", DISSIMILAR: "dissimilar", SKIP: "skipped"}

#: What a person may type -> the command letter.
_COMMANDS: dict[str, str] = {
    "y": "y",
    "yes": "y",
    "similar": "y",
    "n": "n",
    "no": "n",
    "dissimilar": "n",
    "s": "s",
    "skip": "s",
    "u": "u",
    "undo": "u",
    "q": "q",
    "quit": "q",
    "exit": "q",
}
_ANSWER_OF: dict[str, int] = {"y": SIMILAR, "n": DISSIMILAR, "s": SKIP}
_PROMPT = "similar? [y]es [n]o [s]kip [u]ndo [q]uit: "
_HELP = "type y (similar), n (dissimilar), s (skip), u (undo the last answer) or q (quit)"


# -- the front-end-neutral part --------------------------------------------------------------


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
    """

    round: int
    total_rounds: int
    round_pairs: int
    left_in_round: int
    budget_used: int
    budget_total: int

    @property
    def answered_in_round(self) -> int:
        return self.round_pairs - self.left_in_round


class LabellingCursor:
    """A person's place in a session: the next pair, counters, and undo within the round.

    Every call goes straight to the engine and its PairStore (nothing is cached), so two
    cursors over the same session, or a cursor rebuilt after a restart, agree on where the
    session stands.

    Args:
        engine: the engine of the session being labelled.
        annotator: recorded with each answer (``terminal``, ``widget``, a user name).
    """

    def __init__(self, engine: Engine, annotator: str) -> None:
        self.engine = engine
        self.annotator = annotator

    @property
    def done(self) -> bool:
        """Whether every round of the session is finished."""
        return self.engine.rounds_done >= self.engine.total_rounds

    def next_pair(self) -> tuple[int, int] | None:
        """The next unanswered pair of the round, or None when the round (or session) is done.

        Pairs come in the order the round chose them; a pair whose answer was undone is
        unanswered again, so it comes back before the ones not yet asked.
        """
        if self.done:
            return None
        left = self.engine.unanswered()
        if not len(left):
            return None
        i, j = left[0].tolist()
        return int(i), int(j)

    def progress(self) -> Progress:
        """The counters; on a finished session the round is the last one, with 0 left."""
        engine = self.engine
        cfg = engine.config
        total = cfg.initial + cfg.rounds * cfg.budget
        used = len(engine.store)
        if self.done:
            return Progress(engine.total_rounds - 1, engine.total_rounds, 0, 0, used, total)
        pairs = engine.round_pairs()
        left = engine.unanswered()
        return Progress(engine.rounds_done, engine.total_rounds, len(pairs), len(left), used, total)

    def answer(self, i: int, j: int, value: int) -> int:
        """Commit one answer (1, 0 or -1) to SQLite; return its sequence number."""
        return self.engine.answer(i, j, value, annotator=self.annotator)

    def can_undo(self) -> bool:
        """Whether the latest answer in effect belongs to the current round.

        Answers of finished rounds are not undone: the model has been trained on them and
        the next round's pairs were chosen from that model.
        """
        last = self.engine.store.last_round()
        return last is not None and not self.done and last == self.engine.rounds_done

    def undo(self) -> tuple[int, int] | None:
        """Undo the latest answer of the current round; the pair is asked again.

        Returns:
            the pair whose answer was undone, or None when the round has none to undo.
        """
        if not self.can_undo():
            return None
        return self.engine.store.undo(annotator=self.annotator)

    def finish_round(self) -> dict[str, Any]:
        """Train, embed and evaluate the round whose pairs are all answered."""
        return self.engine.finish_round()


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


# -- the prompt ------------------------------------------------------------------------------


class TerminalPrompt:
    """Shows one pair (PNG file + text) and reads one command per line.

    Args:
        renderer: draws the pair.
        png_path: where the current pair's picture is written (overwritten each time).
        input: where answers are read from (default: ``sys.stdin`` at call time).
        output: where questions go (default: ``sys.stdout`` at call time).
    """

    def __init__(
        self,
        renderer: PatchRenderer,
        png_path: str | Path,
        *,
        input: TextIO | None = None,
        output: TextIO | None = None,
    ) -> None:
        self.renderer = renderer
        self.png_path = Path(png_path)
        self._input = input
        self._output = output

    @property
    def input(self) -> TextIO:
        return self._input if self._input is not None else sys.stdin

    @property
    def output(self) -> TextIO:
        return self._output if self._output is not None else sys.stdout

    def say(self, text: str) -> None:
        """Print a line and flush it: a script reading our output sees it at once."""
        self.output.write(text + "\n")
        self.output.flush()

    def show(self, i: int, j: int, header: str) -> None:
        """Write the pair's picture, then print the question's header and the two patches."""
        path = self.renderer.write_pair(i, j, self.png_path)
        self.say(f"{header} · patches {i} and {j}")
        self.say(f"  left  {self.renderer.describe(i)}")
        self.say(f"  right {self.renderer.describe(j)}")
        self.say(f"  image: {path}")

    def read(self) -> str:
        """One command letter: ``y``, ``n``, ``s``, ``u`` or ``q`` (end of input is ``q``)."""
        stream = self.input
        interactive = stream.isatty()
        while True:
            self.output.write(_PROMPT)
            self.output.flush()
            line = stream.readline()
            if not line:  # end of input: a script ran out of answers, or Ctrl-D
                if not interactive:
                    self.output.write("\n")
                return "q"
            text = line.strip().lower()
            if not interactive:
                # Echo piped answers so a log of the session reads like a dialogue.
                self.output.write(text + "\n")
            command = _COMMANDS.get(text)
            if command is not None:
                return command
            self.say(_HELP)


def _renderer(pool: PatchPool, bands: str | Sequence[str] | None) -> PatchRenderer:
    from anneal_geo.annotators.render import PatchRenderer

    return PatchRenderer(pool, bands)


# -- anneal-geo label ------------------------------------------------------------------------


@dataclass
class LabelSummary:
    """What a labelling sitting did."""

    answered: int = 0
    undone: int = 0
    rounds_finished: int = 0
    quit: bool = False


class TerminalLabeller:
    """Asks a session's pairs in a terminal until its rounds are done or the person quits.

    Each answer is committed to the session's SQLite store before ``saved answer N`` is
    printed and before the next pair is shown; when a round's pairs are all answered the
    round is trained and evaluated and the next round's pairs are chosen.

    Args:
        engine: the session's engine.
        bands: picture bands (preset ``true``/``false`` or three band names).
        png_path: where the current pair's picture goes (default SESSION/current_pair.png).
        input: answers (default ``sys.stdin``).
        output: questions and acknowledgements (default ``sys.stdout``).
        annotator: the name recorded with each answer.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        bands: str | Sequence[str] | None = None,
        png_path: str | Path | None = None,
        input: TextIO | None = None,
        output: TextIO | None = None,
        annotator: str = "terminal",
    ) -> None:
        self.engine = engine
        self.cursor = LabellingCursor(engine, annotator)
        path = png_path if png_path is not None else engine.session.directory / "current_pair.png"
        self.prompt = TerminalPrompt(
            _renderer(engine.pool, bands), path, input=input, output=output
        )

    def _header(self) -> str:
        p = self.cursor.progress()
        return (
            f"round {p.round} of {p.total_rounds - 1} · pair {p.answered_in_round + 1} of "
            f"{p.round_pairs} · budget {p.budget_used} of {p.budget_total} used"
        )

    def run(self) -> LabelSummary:
        """Ask until the session is done or the person quits; return what happened."""
        say = self.prompt.say
        summary = LabelSummary()
        session_dir = self.engine.session.directory
        if self.cursor.done:
            say(
                f"session {session_dir} has finished all {self.engine.total_rounds} rounds; "
                f"add rounds with `anneal-geo label {session_dir} --rounds N`"
            )
            return summary
        while not self.cursor.done:
            pair = self.cursor.next_pair()
            if pair is None:
                p = self.cursor.progress()
                say(f"round {p.round}: all {p.round_pairs} pairs answered; training ...")
                record = self.cursor.finish_round()
                summary.rounds_finished += 1
                say(round_summary(record))
                continue
            i, j = pair
            self.prompt.show(i, j, self._header())
            command = self.prompt.read()
            if command == "q":
                summary.quit = True
                say(
                    f"quit: {len(self.engine.store)} answers are saved in "
                    f"{self.engine.session.store_path}; continue with "
                    f"`anneal-geo label {session_dir}`"
                )
                return summary
            if command == "u":
                undone = self.cursor.undo()
                if undone is None:
                    say("nothing to undo in this round (finished rounds are kept)")
                else:
                    summary.undone += 1
                    say(f"undone: patches {undone[0]} and {undone[1]}; asking it again")
                continue
            value = _ANSWER_OF[command]
            seq = self.cursor.answer(i, j, value)
            summary.answered += 1
            say(f"saved answer {seq}: patches {i} and {j} {ANSWER_WORDS[value]}")
        say(
            f"session finished: {self.engine.total_rounds} rounds, "
            f"{len(self.engine.store)} answered pairs in {self.engine.session.store_path}"
        )
        return summary


# -- the annotator plugin --------------------------------------------------------------------


class TerminalAnnotator(Annotator):
    """A person answers in the terminal, pair by pair (y/n/s/q; a PNG shows the pair).

    Used by ``anneal-geo run --annotator terminal``. Undo is not possible through the
    annotator contract (the engine owns the answers); ``anneal-geo label SESSION`` offers it.

    Args:
        seed: unused (a person is not seeded), kept for the plugin contract.
        png: where to write the current pair's picture (default: the temp folder).
        bands: picture bands: preset ``true`` / ``false`` or three comma-separated names.
    """

    interactive: ClassVar[bool] = True
    needs_labels: ClassVar[bool] = False

    def __init__(
        self, seed: int = 0, png: str | None = None, bands: str | None = None, **options: Any
    ) -> None:
        if options:
            raise ConfigError(
                f"terminal annotator: unknown option(s) {', '.join(sorted(options))}; "
                "known: png, bands"
            )
        super().__init__(seed=seed)
        self.png = Path(png) if png else Path(tempfile.gettempdir()) / "anneal-geo-pair.png"
        self.bands = bands
        self.input: TextIO | None = None
        self.output: TextIO | None = None

    def annotate(self, pairs: np.ndarray, pool: PatchPool) -> Iterator[int]:
        """Ask each pair in turn; stop at ``q`` or end of input.

        Args:
            pairs: (M, 2) patch ids.
            pool: the pool they refer to.

        Returns:
            a generator of answers, 1 similar, 0 dissimilar, -1 skipped.
        """
        prompt = TerminalPrompt(
            _renderer(pool, self.bands), self.png, input=self.input, output=self.output
        )
        total = len(pairs)
        for k, (i, j) in enumerate(np.asarray(pairs, dtype=np.int64).tolist()):
            while True:
                prompt.show(i, j, f"pair {k + 1} of {total}")
                command = prompt.read()
                if command != "u":
                    break
                prompt.say(
                    "undo needs the session's answers: quit (q), then run "
                    "`anneal-geo label SESSION` to undo and continue"
                )
            if command == "q":
                prompt.say("quit: the answers given so far are saved")
                return
            value = _ANSWER_OF[command]
            yield value
            # The engine commits an answer before asking for the next one, so reaching
            # this line means the answer just yielded is in SQLite.
            prompt.say(f"saved: patches {i} and {j} {ANSWER_WORDS[value]}")
