"""The task types a spec can name, at the bottom of the layers: the spec and the metrics both read them."""

from typing import Literal

LABEL_TASKS = frozenset({"classification", "sentiment"})
GENERATION_TASKS = frozenset({"qa", "summarization", "translation", "style", "instruction"})
TaskType = Literal["classification", "sentiment", "qa", "summarization", "translation", "style", "instruction"]
