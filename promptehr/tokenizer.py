"""Tokenizer: one token per diagnosis code, plus the special tokens of the patient format.

A patient is encoded as `<s> <v> c c c </v> <v> c c </v> </s>`; `<mask>` stands for an infilled span
or a hidden next visit. Built from the training split only and saved as JSON beside a checkpoint.
Unknown codes: `encode_code` maps them to `<unk>` (counted by the caller) unless `strict=True`,
which raises a `KeyError` naming the code.
"""

from __future__ import annotations

import json
from pathlib import Path

PAD, BOS, EOS, UNK, MASK, VISIT_OPEN, VISIT_CLOSE = "<pad>", "<s>", "</s>", "<unk>", "<mask>", "<v>", "</v>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, MASK, VISIT_OPEN, VISIT_CLOSE)


class DiagnosisCodeTokenizer:
    """Maps codes to ids and back; ids below `n_special` are special tokens."""

    def __init__(self, codes: list[str]):
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

    def __len__(self) -> int:
        return len(self.id_to_token)

    @property
    def vocab_size(self) -> int:
        return len(self.id_to_token)

    @property
    def n_codes(self) -> int:
        return len(self.codes)

    def is_code_id(self, token_id: int) -> bool:
        return token_id >= self.n_special

    def encode_code(self, code: str, strict: bool = False) -> int:
        token_id = self.token_to_id.get(code)
        if token_id is None or token_id < self.n_special:
            if strict:
                raise KeyError(f"code {code!r} is not in the vocabulary ({self.n_codes} codes)")
            return self.unk_token_id
        return token_id

    def encode_visits(self, visits: list[list[str]], strict: bool = False) -> list[int]:
        """`<s> <v> c.. </v> ... </s>` for a list of visits."""
        ids = [self.bos_token_id]
        for visit in visits:
            ids.append(self.visit_open_id)
            ids.extend(self.encode_code(c, strict) for c in visit)
            ids.append(self.visit_close_id)
        ids.append(self.eos_token_id)
        return ids

    def decode_visits(self, ids) -> list[list[str]]:
        """Visits of codes from token ids; specials other than visit delimiters are skipped, a
        missing final `</v>` closes the last visit, tokens after `</s>` are ignored."""
        visits: list[list[str]] = []
        current: list[str] | None = None
        for token_id in ids:
            token_id = int(token_id)
            if token_id == self.eos_token_id:
                break
            if token_id == self.visit_open_id:
                if current is not None:
                    visits.append(current)
                current = []
            elif token_id == self.visit_close_id:
                if current is not None:
                    visits.append(current)
                current = None
            elif token_id >= self.n_special:
                if current is None:
                    current = []
                current.append(self.id_to_token[token_id])
        if current:
            visits.append(current)
        return visits

    def save(self, path: str | Path) -> None:
        data = {"special_tokens": list(SPECIAL_TOKENS), "codes": self.codes}
        Path(path).write_text(json.dumps(data, indent=0))

    @classmethod
    def load(cls, path: str | Path) -> "DiagnosisCodeTokenizer":
        data = json.loads(Path(path).read_text())
        if tuple(data.get("special_tokens", ())) != SPECIAL_TOKENS:
            raise ValueError(f"{path}: special tokens {data.get('special_tokens')} differ from this version's {SPECIAL_TOKENS}")
        return cls(data["codes"])

    @classmethod
    def from_patients(cls, patients) -> "DiagnosisCodeTokenizer":
        """Vocabulary of the codes occurring in `patients` (pass the training split only)."""
        return cls(sorted({c for p in patients for v in p.visits for c in v}))
