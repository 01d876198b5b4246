"""Tokenizer: one token per diagnosis code, plus the special tokens of the patient format.

How codes become rows of these tokens is `promptehr.patient_format`'s. Built from the training split
only and saved as JSON beside a checkpoint.
Unknown codes: `encode_code` maps them to `<unk>` (counted by the caller) unless `strict=True`,
which raises a `KeyError` naming the code.
Visit order: an `ordered` vocabulary numbers its codes by descending training frequency (ties by code),
and every visit is written with its codes in id order, so the grammar admits exactly one token order per
code set (`patient_format`); an unordered one (alphabetical) writes a visit's codes in random order.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

PAD, BOS, EOS, UNK, MASK, VISIT_OPEN, VISIT_CLOSE = "<pad>", "<s>", "</s>", "<unk>", "<mask>", "<v>", "</v>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, MASK, VISIT_OPEN, VISIT_CLOSE)
VISIT_ORDERS = ("frequency", "random")


class DiagnosisCodeTokenizer:
    """Maps codes to ids and back; ids below `n_special` are special tokens. `ordered`: visits are
    written with their codes in id order (see the module docstring)."""

    def __init__(self, codes: list[str], ordered: bool = False):
        codes = [str(c) for c in codes]
        clash = [c for c in codes if c in SPECIAL_TOKENS]
        if clash:
            raise ValueError(f"code {clash[0]!r} collides with a special token")
        if len(set(codes)) != len(codes):
            raise ValueError("the code vocabulary holds duplicates")
        self.codes = codes
        self.id_to_token = list(SPECIAL_TOKENS) + codes
        self.token_to_id = {tok: i for i, tok in enumerate(self.id_to_token)}
        self.pad_token_id = self.token_to_id[PAD]
        self.bos_token_id = self.token_to_id[BOS]
        self.eos_token_id = self.token_to_id[EOS]
        self.unk_token_id = self.token_to_id[UNK]
        self.mask_token_id = self.token_to_id[MASK]
        self.visit_open_id = self.token_to_id[VISIT_OPEN]
        self.visit_close_id = self.token_to_id[VISIT_CLOSE]
        self.n_special = len(SPECIAL_TOKENS)
        self.ordered = bool(ordered)

    @property
    def visit_order(self) -> str:
        return "frequency" if self.ordered else "random"

    def __len__(self) -> int:
        return len(self.id_to_token)

    @property
    def n_codes(self) -> int:
        return len(self.codes)

    def encode_code(self, code: str, strict: bool = False) -> int:
        token_id = self.token_to_id.get(code)
        if token_id is None or token_id < self.n_special:
            if strict:
                raise KeyError(f"code {code!r} is not in the vocabulary ({self.n_codes} codes)")
            return self.unk_token_id
        return token_id

    def save(self, path: str | Path) -> None:
        data = {"special_tokens": list(SPECIAL_TOKENS), "codes": self.codes, "visit_order": self.visit_order}
        Path(path).write_text(json.dumps(data, indent=0))

    @classmethod
    def load(cls, path: str | Path) -> DiagnosisCodeTokenizer:
        data = json.loads(Path(path).read_text())
        if tuple(data.get("special_tokens", ())) != SPECIAL_TOKENS:
            raise ValueError(
                f"{path}: special tokens {data.get('special_tokens')} differ from this version's {SPECIAL_TOKENS}"
            )
        order = data.get("visit_order", "random")  # saved before the option: random order
        if order not in VISIT_ORDERS:
            raise ValueError(f"{path}: visit_order must be one of {VISIT_ORDERS}, got {order!r}")
        return cls(data["codes"], ordered=order == "frequency")

    @classmethod
    def from_patients(cls, patients, visit_order: str = "random") -> DiagnosisCodeTokenizer:
        """Vocabulary of the codes occurring in `patients` (pass the training split only): in
        alphabetical order for `visit_order="random"`, by descending frequency in `patients` (ties
        alphabetical) and `ordered` for "frequency"."""
        if visit_order not in VISIT_ORDERS:
            raise ValueError(f"visit_order must be one of {VISIT_ORDERS}, got {visit_order!r}")
        counts = Counter(c for p in patients for v in p.visits for c in v)
        if visit_order == "random":
            return cls(sorted(counts))
        return cls(sorted(counts, key=lambda c: (-counts[c], c)), ordered=True)
