"""The annotator contract: answer "are these two patches similar?" for a list of pairs."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from anneal_geo._options import check_options
from anneal_geo._validate import plugin_label
from anneal_geo.errors import AnnealError, PluginError

if TYPE_CHECKING:
    from anneal_geo.data.pool import PatchPool

__all__ = ["CONTRACT_VERSION", "DISSIMILAR", "SIMILAR", "SKIP", "Annotator"]

SIMILAR = 1
DISSIMILAR = 0
SKIP = -1


#: Version of this contract; a plugin declaring another version is refused at load time.
CONTRACT_VERSION = 1


class Annotator(ABC):
    """Answers pair questions, one at a time.

    :meth:`annotate` yields one answer per pair, in order: ``1`` similar, ``0``
    dissimilar, ``-1`` skipped. It may stop early (a human quitting). The engine commits
    each answer to the session's PairStore as soon as it is yielded, before asking for
    the next one, so an answer once given survives a crash or Ctrl-C.

    Args:
        seed: seed of every random source the annotator uses.
        **options: the annotator's own options: the keyword parameters of the subclass's
            ``__init__`` and its ``declared_options``; any other name is refused with a
            ConfigError listing the accepted ones (see :mod:`anneal_geo._options`).

    Capabilities (class attributes):
        interactive: a person answers (the engine then never retries a pair silently).
        needs_labels: the annotator reads the pool's labels (a simulated oracle).
    """

    interactive: ClassVar[bool] = False
    needs_labels: ClassVar[bool] = False
    contract_version: ClassVar[int] = CONTRACT_VERSION
    plugin_name: ClassVar[str] = ""
    plugin_origin: ClassVar[str] = ""
    #: Options read from ``**options`` rather than named in ``__init__`` (name -> default).
    declared_options: ClassVar[Mapping[str, Any]] = {}
    _contract_base: ClassVar[bool] = True

    def __init__(self, seed: int = 0, **options: Any) -> None:
        cls = type(self)
        check_options(cls, options, "annotator", cls.__dict__.get("plugin_name", ""))
        self.seed = int(seed)
        self.options = options

    def prepare(self, pool: PatchPool) -> None:  # noqa: B027 - optional hook
        """Check the pool once before the first question (e.g. that labels exist)."""

    @abstractmethod
    def annotate(self, pairs: np.ndarray, pool: PatchPool) -> Iterable[int]:
        """Answer each pair.

        Args:
            pairs: (M, 2) int64 patch ids.
            pool: the pool the ids refer to.

        Returns:
            an iterable (typically a generator) of at most M answers in {1, 0, -1}.
        """

    def checked_annotate(self, pairs: np.ndarray, pool: PatchPool) -> Iterator[int]:
        """:meth:`annotate`, validating each answer as it arrives."""
        prs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        try:
            answers = iter(self.annotate(prs, pool))
        except AnnealError:
            raise  # already a one-line message naming what is wrong
        except Exception as exc:
            raise PluginError(
                f"{plugin_label(self)}: annotate() raised {type(exc).__name__}: {exc}".splitlines()[
                    0
                ]
            ) from exc
        count = 0
        while True:
            try:
                answer = next(answers)
            except StopIteration:
                return
            except (AnnealError, KeyboardInterrupt):
                raise
            except Exception as exc:
                raise PluginError(
                    f"{plugin_label(self)}: annotate() raised {type(exc).__name__} at pair "
                    f"{count}: {exc}".splitlines()[0]
                ) from exc
            count += 1
            if count > prs.shape[0]:
                raise PluginError(
                    f"{plugin_label(self)}: annotate() gave more answers than the "
                    f"{prs.shape[0]} pairs asked"
                )
            value = int(answer) if isinstance(answer, (int, np.integer, bool, np.bool_)) else None
            if value not in (SIMILAR, DISSIMILAR, SKIP):
                raise PluginError(
                    f"{plugin_label(self)}: annotate() answered {answer!r} for pair {count - 1}; "
                    "expected 1 (similar), 0 (dissimilar) or -1 (skip)"
                )
            yield value
