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
print ``saved answer N`` only once the answer is committed to SQLite. Both start by saying
that ``anneal-geo label SESSION --web`` shows the pairs in a browser instead.

The labeller drives a :class:`~anneal_geo.labelling.controller.LabellingController`, the
part shared with the web page and the Jupyter widget (next pair, counters, undo across the
round, training). ``LabellingCursor`` is its former name, kept for existing code.
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
from anneal_geo.labelling.controller import (
    ANSWER_WORDS,
    LabellingController,
    Progress,
    round_summary,
)

if TYPE_CHECKING:
    from anneal_geo.annotators.render import PatchRenderer
    from anneal_geo.data.pool import PatchPool
    from anneal_geo.engine import Engine

__all__ = [
    "ANSWER_WORDS",
    "WEB_TIP",
    "LabellingCursor",
    "Progress",
    "TerminalAnnotator",
    "TerminalLabeller",
    "TerminalPrompt",
    "round_summary",
]

#: The former name of the controller (it was the terminal's and the widget's cursor).
LabellingCursor = LabellingController

#: Said when a terminal labeller starts: the browser shows the pairs without an image viewer.
WEB_TIP = (
    "tip: `anneal-geo label {session} --web` shows the pairs in your browser "
    "(keys y/n/s/u, no image viewer needed)"
)

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
    """The pool-wide-stretch renderer of ``bands``."""
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
        self.controller = LabellingController(engine, annotator, bands=bands)
        path = png_path if png_path is not None else engine.session.directory / "current_pair.png"
        self.prompt = TerminalPrompt(self.controller.renderer(), path, input=input, output=output)
        self.records: list[dict[str, Any]] = []

    @property
    def cursor(self) -> LabellingController:
        """The controller (its former name)."""
        return self.controller

    def _header(self) -> str:
        p = self.controller.progress()
        return (
            f"round {p.round} of {p.total_rounds - 1} · pair {p.answered_in_round + 1} of "
            f"{p.round_pairs} · budget {p.budget_used} of {p.budget_total} used"
        )

    def run(self, rounds: int | None = None) -> LabelSummary:
        """Ask until the session is done (or ``rounds`` more rounds are trained) or the
        person quits; return what happened."""
        say = self.prompt.say
        controller = self.controller
        summary = LabelSummary()
        session_dir = self.engine.session.directory
        if controller.done:
            say(
                f"session {session_dir} has finished all {self.engine.total_rounds} rounds; "
                f"add rounds with `anneal-geo label {session_dir} --rounds N`"
            )
            return summary
        say(WEB_TIP.format(session=session_dir))
        while not controller.done and (rounds is None or summary.rounds_finished < rounds):
            pair = controller.next_pair()
            if pair is None:
                p = controller.progress()
                say(f"round {p.round}: all {p.round_pairs} pairs answered; training ...")
                record = controller.finish_round()
                self.records.append(record)
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
                undone = controller.undo()
                if undone is None:
                    say("nothing to undo in this round (finished rounds are kept)")
                else:
                    summary.undone += 1
                    say(f"undone: patches {undone[0]} and {undone[1]}; asking it again")
                continue
            done = controller.answer(_ANSWER_OF[command], pair=pair)
            summary.answered += 1
            say(done.message())
        if controller.done:
            say(
                f"session finished: {self.engine.total_rounds} rounds, "
                f"{len(self.engine.store)} answered pairs in {self.engine.session.store_path}"
            )
        return summary


# -- the annotator plugin --------------------------------------------------------------------


class TerminalAnnotator(Annotator):
    """A person answers in the terminal, pair by pair (y/n/s/u/q; a PNG shows the pair).

    ``anneal-geo run --annotator terminal`` hands the session to :meth:`label_session`,
    which is ``anneal-geo label``'s labeller: undo across the round, the picture in the
    session directory. Pulled through the plain annotator contract (:meth:`annotate`,
    e.g. by ``Engine.run`` in a script) it cannot undo, since the engine owns the answers;
    it says so and points at ``anneal-geo label``.

    Args:
        seed: unused (a person is not seeded), kept for the plugin contract.
        png: where to write the current pair's picture (default: SESSION/current_pair.png
            with :meth:`label_session`, else a private temporary folder).
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
        self.png = Path(png) if png else None
        self.bands = bands
        self.input: TextIO | None = None
        self.output: TextIO | None = None

    def label_session(self, engine: Engine, rounds: int | None = None) -> list[dict[str, Any]]:
        """Label the engine's session as ``anneal-geo label`` does; return finished rounds.

        Args:
            engine: the session's engine (this annotator is its annotator).
            rounds: stop after this many rounds are trained (default: finish the session).
        """
        labeller = TerminalLabeller(
            engine, bands=self.bands, png_path=self.png, input=self.input, output=self.output
        )
        labeller.run(rounds)
        return labeller.records

    def _png_path(self) -> Path:
        if self.png is None:
            # Private to this process: two people on one machine never share a picture.
            self.png = Path(tempfile.mkdtemp(prefix="anneal-geo-")) / "current_pair.png"
        return self.png

    def annotate(self, pairs: np.ndarray, pool: PatchPool) -> Iterator[int]:
        """Ask each pair in turn; stop at ``q`` or end of input.

        Args:
            pairs: (M, 2) patch ids.
            pool: the pool they refer to.

        Returns:
            a generator of answers, 1 similar, 0 dissimilar, -1 skipped.
        """
        prompt = TerminalPrompt(
            _renderer(pool, self.bands), self._png_path(), input=self.input, output=self.output
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
