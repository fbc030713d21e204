"""Annotators: who answers "are these two patches similar?" (a person or a simulated oracle)."""

from anneal_geo.annotators.base import DISSIMILAR, SIMILAR, SKIP, Annotator
from anneal_geo.annotators.oracle import OracleAnnotator

__all__ = ["DISSIMILAR", "SIMILAR", "SKIP", "Annotator", "OracleAnnotator"]
