"""DIMSE status codes we answer with, by name (PS3.4 Annex B, PS3.7 Annex C)."""

from __future__ import annotations

SUCCESS = 0x0000
PROCESSING_FAILURE = 0x0110
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
