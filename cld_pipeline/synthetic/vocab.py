"""Generator vocabularies, derived from the specification: nothing here restates a code value.

Coded values are handled as integer positions in a code list's Release 2 values; the wording is
looked up only when files are written. Semantic choices (which value means "reablement") go through
the stable `key`s in code_lists.yaml.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from cld_pipeline.spec import CLDSpec, CodeList, load_spec


@dataclass(frozen=True)
class Vocab:
    """One code list as the generator sees it."""

    codes: CodeList

    @property
    def name(self) -> str:
        return self.codes.name

    @cached_property
    def values(self) -> tuple[str, ...]:
        return self.codes.value_strings

    def idx(self, key: str) -> int:
        """Position of the value with this key."""
        return self.values.index(self.codes.value(key))

    def idx_of(self, value: str) -> int:
        return self.values.index(value)

    def where(self, predicate) -> np.ndarray:
        """Positions of values whose CodeValue satisfies `predicate`."""
        return np.array([i for i, v in enumerate(self.codes.values) if predicate(v)], dtype=np.int16)

    @cached_property
    def weights(self) -> np.ndarray:
        """Synthetic prevalence from `attrs.weight` (uniform when a list gives none)."""
        w = np.array([float(v.attrs.get("weight", 1.0)) for v in self.codes.values])
        return w / w.sum()

    def sample(self, rng: np.random.Generator, size: int, among: np.ndarray | None = None,
               weights: np.ndarray | None = None) -> np.ndarray:
        """Weighted draw of value positions, optionally restricted to `among` positions."""
        if among is None:
            return rng.choice(len(self.values), size=size, p=self.weights).astype(np.int16)
        w = self.weights[among] if weights is None else np.asarray(weights, dtype=float)
        if w.sum() == 0:
            w = np.ones(len(among))
        return among[rng.choice(len(among), size=size, p=w / w.sum())].astype(np.int16)

    def release1_for(self) -> dict[int, list[str]]:
        """Release 2 position -> the Release 1 spellings that map to it (for R1-value defects)."""
        out: dict[int, list[str]] = {}
        for raw, cleaned in self.codes.release1.items():
            if cleaned in self.values:
                out.setdefault(self.values.index(cleaned), []).append(raw)
        return out


class Vocabularies:
    """Every code list of the spec, by list name and by field name."""

    def __init__(self, spec: CLDSpec | None = None):
        self.spec = spec or load_spec()
        self._by_list = {name: Vocab(cl) for name, cl in self.spec.code_lists.items()}

    def __getitem__(self, list_name: str) -> Vocab:
        return self._by_list[list_name]

    def for_field(self, field_name: str) -> Vocab:
        return self._by_list[self.spec.codes_for(field_name).name]
