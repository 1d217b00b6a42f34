"""Data genpi reads at run time through importlib.resources (it ships in the wheel):
human_inputs.jsonl, everyday user messages written by people for this project (the
evaluation's human-written set), and plain_text.txt, general English prose written for this
project (the perplexity check of what an adapter costs where its prompt does not apply)."""
from __future__ import annotations

import json
from importlib.resources import files


def human_inputs() -> list[dict]:
    """The human-written user messages: [{"text": ..., "lang": ISO 639-1 code}], file order."""
    lines = files(__name__).joinpath("human_inputs.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def plain_text() -> str:
    """About three pages of general English prose (paragraphs separated by blank lines)."""
    return files(__name__).joinpath("plain_text.txt").read_text(encoding="utf-8")
