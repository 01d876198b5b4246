"""The patient format: how visits become token rows, how rows are padded, and the grammar that the
model's probabilities and the sampler both obey (docs/PROMPTEHR.md sections 2-3 and 5).

Rows. A patient's labels are `<v> c c </v> <v> c </v> </s>` and its encoder row `<s> <v> c c </v> ...
</s>`. A row that hides visit k shows `visits[:k]` and a `<v> <mask> </v>` placeholder; its labels are
`visits[:k + 1]` and the token after visit k (`<v>` if more come, `</s>` if not). Generation feeds the
encoder `<s> history <v> revealed <mask> </v> </s>` and the decoder `<s> history <v> revealed`.

Grammar. Inside a visit only codes and `</v>` may come, `</v>` only after a code, a code only once
per visit; after `</v>` only `<v>` or `</s>`. With an ordered vocabulary (`tokenizer.ordered`: codes
numbered most frequent first) a visit's codes come in increasing id order: after code c only codes
above c (or `</v>`), so each code set has exactly one token sequence and its probability is the set's
(no order to sum over). `grammar_mask` applies these rules to teacher-forced label rows at once
(training, validation); `VisitGrammar` applies them token by token while a visit is sampled. Both live
here so they cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

BANNED_LOGIT = -1e9  # finite: x * 0 stays 0 where ignored positions are multiplied out


# ------------------------------------------------------------------ rows


def arrange_visits(tok, visits, rng: np.random.Generator) -> list[np.ndarray]:
    """The visits (arrays of code ids) as a row writes them: in id order for an ordered vocabulary,
    else each visit's codes in a random order."""
    if getattr(tok, "ordered", False):
        return [np.sort(v) for v in visits]
    return [rng.permutation(v) for v in visits]


def visit_tokens(tok, visits) -> list[int]:
    """`<v> codes </v>` for each visit (code ids), concatenated."""
    out: list[int] = []
    for v in visits:
        out += [tok.visit_open_id, *v, tok.visit_close_id]
    return out


def sequence(tok, visits, bos: bool, tail: list[int]) -> np.ndarray:
    """`[<s>] <v> codes </v> ... tail` as an id array (`visits`: arrays of code ids)."""
    parts = [[tok.bos_token_id]] if bos else []
    for v in visits:
        parts += [[tok.visit_open_id], v, [tok.visit_close_id]]
    parts.append(tail)
    return np.concatenate(parts).astype(np.int64)


def whole_patient_row(tok, visits, encoder_visits=None) -> tuple[np.ndarray, np.ndarray]:
    """(encoder ids, label ids) of a whole-patient row; `encoder_visits`: what the encoder sees
    instead of the clean visits (a denoising row's corrupted visits). Labels are always clean."""
    labels = sequence(tok, visits, bos=False, tail=[tok.eos_token_id])
    shown = visits if encoder_visits is None else encoder_visits
    return sequence(tok, shown, bos=True, tail=[tok.eos_token_id]), labels


def hidden_visit_row(tok, visits, k: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The row that hides visit k: (encoder ids: visits[:k] and a `<v> <mask> </v>` placeholder;
    label ids: visits[:k + 1] and the token after visit k; label position of visit k's first code).
    k >= 1: a next-visit row; k = 0: a first-visit row."""
    placeholder = [np.array([tok.mask_token_id], dtype=np.int64)]
    enc = sequence(tok, list(visits[:k]) + placeholder, bos=True, tail=[tok.eos_token_id])
    after = tok.visit_open_id if k + 1 < len(visits) else tok.eos_token_id
    labels = sequence(tok, visits[: k + 1], bos=False, tail=[after])
    return enc, labels, sum(len(v) + 2 for v in visits[:k]) + 1


def first_fitting_visit(visits, max_length: int) -> int:
    """How many of the earliest visits a row of `max_length` tokens must drop so that `<s>`, the rest
    (`<v> codes </v>` each) and `</s>` fit; the last visit is never dropped (it may still not fit)."""
    tokens = sum(len(v) + 2 for v in visits) + 2
    start = 0
    while tokens > max_length and start < len(visits) - 1:
        tokens -= len(visits[start]) + 2
        start += 1
    return start


def row_lengths(visit_lengths: np.ndarray, k: int) -> tuple[int, int]:
    """(encoder, label) length of a whole-patient row (k < 0) or of the row hiding visit k, from its
    visits' code counts (before corruption)."""
    tokens = visit_lengths + 2  # <v> codes </v>
    if k < 0:  # <s> visits </s> / visits </s>
        total = int(tokens.sum())
        return total + 2, total + 1
    return int(tokens[:k].sum()) + 5, int(tokens[: k + 1].sum()) + 1


def generation_rows(tok, history, revealed) -> tuple[list[int], list[int]]:
    """(encoder ids, decoder prefix) for writing the next visit after `history` (visits of code ids)
    with the codes `revealed` in it. Unordered vocabulary: the decoder prefix holds the revealed codes
    and the sampler continues after them; ordered: they come in id order among the sampled ones, so the
    prefix stops at `<v>` and `VisitGrammar` writes them where they belong."""
    ordered = getattr(tok, "ordered", False)
    if ordered:
        history, revealed = [np.sort(v) for v in history], sorted(revealed)
    h = visit_tokens(tok, history)
    enc = [tok.bos_token_id, *h, tok.visit_open_id, *revealed, tok.mask_token_id, tok.visit_close_id, tok.eos_token_id]
    return enc, [tok.bos_token_id, *h, tok.visit_open_id, *([] if ordered else revealed)]


def unseen_labels(tok, enc: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per label position: True for a code that the encoder's version of the same visit does not hold
    (infilled, deleted or replaced, or a hidden visit behind its `<mask>` placeholder); False for
    codes the encoder shows and for every special token."""
    enc_visits, current = [], None
    for t in enc.tolist():
        if t == tok.visit_open_id:
            current = set()
        elif t == tok.visit_close_id and current is not None:
            enc_visits.append(current)
            current = None
        elif current is not None:
            current.add(t)
    out = np.zeros(len(labels), dtype=bool)
    j = -1
    for pos, t in enumerate(labels.tolist()):
        if t == tok.visit_open_id:
            j += 1
        elif t >= tok.n_special:
            out[pos] = j >= len(enc_visits) or t not in enc_visits[j]
    return out


# ------------------------------------------------------------------ padding


# previous_visit's width is a multiple of this: fewer distinct shapes, and never a width of 1, on which
# torch.compile (dynamic=True) specialises and compiles the training step a second time
PREVIOUS_VISIT_WIDTH = 8


def pad_batch(tok, enc_rows, label_rows, starts, tasks, ages, sexes, unseen_rows=None) -> dict[str, torch.Tensor]:
    """Rows padded to the longest of the batch, as the model's inputs: input_ids, attention_mask,
    labels (-100 = pad), target_mask (the hidden visit's codes of rows with a start >= 0), previous_visit
    (the codes of the visit before the hidden one, padded with `<pad>` to a multiple of
    `PREVIOUS_VISIT_WIDTH`; all `<pad>` for a row without a hidden visit or without a visit before it),
    x_num (age), x_cat (sex), task_type; with `unseen_rows` also unseen_mask (see `unseen_labels`)."""
    n = len(enc_rows)
    enc_len = max(len(r) for r in enc_rows)
    dec_len = max(len(r) for r in label_rows)
    input_ids = np.full((n, enc_len), tok.pad_token_id, dtype=np.int64)
    attention_mask = np.zeros((n, enc_len), dtype=np.int64)
    labels = np.full((n, dec_len), -100, dtype=np.int64)
    target_mask = np.zeros((n, dec_len), dtype=bool)
    previous = []
    for i, (enc, lab, start) in enumerate(zip(enc_rows, label_rows, starts)):
        input_ids[i, : len(enc)] = enc
        attention_mask[i, : len(enc)] = 1
        labels[i, : len(lab)] = lab
        previous.append(previous_visit_codes(tok, lab[: start - 1]) if start >= 0 else [])
        if start >= 0:  # codes of the hidden visit k: from its first code up to its </v>
            stop = start + int(np.argmax(lab[start:] == tok.visit_close_id))
            target_mask[i, start:stop] = True
    width = -(-max(1, max(len(v) for v in previous)) // PREVIOUS_VISIT_WIDTH) * PREVIOUS_VISIT_WIDTH
    previous_visit = np.full((n, width), tok.pad_token_id, dtype=np.int64)
    for i, v in enumerate(previous):
        previous_visit[i, : len(v)] = v
    batch = {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention_mask),
        "labels": torch.from_numpy(labels),
        "target_mask": torch.from_numpy(target_mask),
        "previous_visit": torch.from_numpy(previous_visit),
        "x_num": torch.tensor(ages, dtype=torch.float32).unsqueeze(1),
        "x_cat": torch.tensor(sexes, dtype=torch.long).unsqueeze(1),
        "task_type": torch.tensor(tasks, dtype=torch.long),
    }
    if unseen_rows is not None:
        unseen = np.zeros((n, dec_len), dtype=bool)
        for i, row in enumerate(unseen_rows):
            unseen[i, : len(row)] = row
        batch["unseen_mask"] = torch.from_numpy(unseen)
    return batch


def previous_visit_codes(tok, tokens) -> list[int]:
    """The codes of the last complete visit (`<v> codes </v>`) in `tokens`, a row's labels or decoder
    prefix before the `<v>` that opens the next visit; [] when there is none."""
    tokens = np.asarray(tokens)
    closes = np.flatnonzero(tokens == tok.visit_close_id)
    if len(closes) == 0:
        return []
    opens = np.flatnonzero(tokens[: closes[-1]] == tok.visit_open_id)
    return [int(t) for t in tokens[opens[-1] + 1 : closes[-1]] if t >= tok.n_special]


def with_closing_token(target_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: the hidden visit's codes (`target_mask`) and the `</v>` that closes it, what a
    visit's likelihood scores (the `<v>` before it and the token after it are not)."""
    out = target_mask.clone()
    out[:, 1:] |= target_mask[:, :-1]
    return out


def pad_prefixes(rows: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (ids, attention mask) of token rows of different lengths."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)


# ------------------------------------------------------------------ grammar


def grammar_token_ids(tok) -> dict[str, int]:
    """The token ids the grammar needs (a model keeps them, so its forward needs no tokenizer)."""
    return {
        "pad": tok.pad_token_id,
        "visit_open": tok.visit_open_id,
        "visit_close": tok.visit_close_id,
        "eos": tok.eos_token_id,
        "unk": tok.unk_token_id,
        "n_special": tok.n_special,
        "ordered": bool(getattr(tok, "ordered", False)),
    }


def grammar_mask(labels: torch.Tensor, tok, vocab_size: int) -> torch.Tensor:
    """(B, T, V) bool, True where the patient format forbids token v at label position t, given the
    label tokens before t (teacher forcing). Labels are `<v> codes </v> ... (<v> | </s>)`, -100 = pad;
    `tok`: a tokenizer or `grammar_token_ids(tokenizer)`.

    The rules of the module docstring; an `<unk>` label counts as a code for `</v>`. The label itself
    is never banned, so a record that breaks them (an `<unk>` code of a validation patient) costs a
    finite loss, not an infinite one.
    """
    ids = tok if isinstance(tok, dict) else grammar_token_ids(tok)
    b, t = labels.shape
    dev = labels.device
    is_open = labels == ids["visit_open"]
    is_close = labels == ids["visit_close"]
    is_code = labels >= ids["n_special"]
    opens_before = torch.cumsum(is_open.long(), 1) - is_open.long()  # <v> strictly before t
    closes_before = torch.cumsum(is_close.long(), 1) - is_close.long()
    inside = opens_before > closes_before  # position t lies in a visit
    visit_of = torch.cumsum(is_open.long(), 1)  # visit index of a code at s
    earlier = torch.ones(t, t, dtype=torch.bool, device=dev).tril(-1)  # s < t
    same = (visit_of.unsqueeze(1) == opens_before.unsqueeze(2)) & earlier & inside.unsqueeze(2)  # (B, t, s)
    emitted = same & is_code.unsqueeze(1)
    special = torch.arange(vocab_size, device=dev) < ids["n_special"]
    in_visit_ban = special.clone()
    in_visit_ban[ids["visit_close"]] = False
    out_visit_ban = torch.ones(vocab_size, dtype=torch.bool, device=dev)
    out_visit_ban[[ids["visit_open"], ids["eos"]]] = False
    mask = torch.where(inside.unsqueeze(-1), in_visit_ban, out_visit_ban)  # (B, T, V), a new tensor
    mask[..., ids["visit_close"]] |= inside & ~(emitted | (same & (labels == ids["unk"]).unsqueeze(1))).any(-1)
    # codes already in the visit: scatter labels[s] into row t; where s was no code, scatter <pad>, which
    # is banned at every position anyway
    mask.scatter_(2, torch.where(emitted, labels.clamp(min=0).unsqueeze(1), ids["pad"]), True)
    if ids.get("ordered"):  # after code c only codes above c: c is the label before t, inside the visit
        before = torch.cat([labels.new_full((b, 1), -100), labels[:, :-1]], dim=1)
        after_code = inside & (before >= ids["n_special"])
        last = torch.where(after_code, before, torch.zeros_like(before))  # 0: no ban
        codes = torch.arange(vocab_size, device=dev)
        mask |= (codes <= last.unsqueeze(-1)) & (codes >= ids["n_special"])
    return mask.scatter_(2, labels.clamp(min=0).unsqueeze(-1), False)  # (ignored positions: unbans pad)


@dataclass
class VisitGrammar:
    """The same rules, token by token, for n rows each writing one visit with its revealed codes:
    `banned()` is the (n, V) mask of the next token, `advance(token)` takes the sampled tokens.

    Unordered vocabulary: the revealed codes are in the decoder's prefix and banned from the rest of the
    visit. Ordered: the visit is written in id order from its start, the revealed codes at their places:
    the next code lies above the last one written and at or below the next revealed code not yet written
    (`</v>` only once every revealed code is written), so the sampled visit always holds them."""

    banned_codes: torch.Tensor  # (n, V) specials and the codes already in the visit
    n_in_visit: torch.Tensor  # (n,) codes in the visit so far
    in_visit: torch.Tensor  # (n,) still inside the visit
    done: torch.Tensor  # (n,) the token after `</v>` was sampled
    more: torch.Tensor  # (n,) that token was `<v>`: another visit follows
    max_codes: int
    ids: dict
    last: torch.Tensor  # (n,) ordered: the last code written (0: none yet)
    pending: torch.Tensor  # (n, R + 1) ordered: revealed codes in id order, then the vocabulary size
    written: torch.Tensor  # (n,) ordered: revealed codes written so far

    @classmethod
    def start(cls, tok, revealed: list[list[int]], vocab: int, max_codes: int, device) -> VisitGrammar:
        n = len(revealed)
        ids = grammar_token_ids(tok)
        banned = torch.zeros((n, vocab), dtype=torch.bool, device=device)
        banned[:, : tok.n_special] = True
        width = max((len(r) for r in revealed), default=0)
        pending = torch.full((n, width + 1), vocab, dtype=torch.long, device=device)
        for i, rev in enumerate(revealed):
            if not rev:
                continue
            if ids["ordered"]:  # an `<unk>` revealed code has no place in the order: the encoder shows it
                known = sorted(c for c in rev if c >= tok.n_special)
                pending[i, : len(known)] = torch.tensor(known, dtype=torch.long, device=device)
            else:
                banned[i, torch.tensor(rev, device=device)] = True
        flags = torch.zeros(n, dtype=torch.bool, device=device)
        counts = torch.zeros(n, dtype=torch.long, device=device)
        return cls(
            banned,
            counts if ids["ordered"] else torch.tensor([len(r) for r in revealed], device=device),
            ~flags,
            flags.clone(),
            flags.clone(),
            max_codes,
            ids,
            counts.clone(),
            pending,
            counts.clone(),
        )

    def _next_revealed(self) -> torch.Tensor:
        return self.pending.gather(1, self.written.unsqueeze(1)).squeeze(1)  # the vocabulary size: none left

    def banned(self, ordered: bool = True) -> torch.Tensor:
        """`ordered=False`: an ordered vocabulary's rules without the order (a revealed code banned, any
        other code allowed): which codes the visit could still hold, for ranking them."""
        close = self.ids["visit_close"]
        visit_ban = self.banned_codes.clone()
        n_written = self.n_in_visit
        if self.ids["ordered"]:
            vocab = visit_ban.shape[1]
            nxt = self._next_revealed()
            left = (self.pending < vocab).sum(1) - self.written  # revealed codes still to write
            if ordered:
                codes = torch.arange(vocab, device=visit_ban.device)
                visit_ban |= (codes <= self.last.unsqueeze(1)) | (codes > nxt.unsqueeze(1))
            else:
                revealed = torch.zeros((visit_ban.shape[0], vocab + 1), dtype=torch.bool, device=visit_ban.device)
                visit_ban |= revealed.scatter_(1, self.pending, True)[:, :vocab]  # padding lands in the extra column
            n_written = self.n_in_visit + left  # the revealed codes count toward max_codes
            visit_ban[:, close] = ~(self.in_visit & (self.n_in_visit > 0) & (left == 0))
        else:
            visit_ban[:, close] = ~(self.in_visit & (self.n_in_visit > 0))
        full = self.in_visit & (n_written >= self.max_codes)  # a visit of max_codes codes must close
        if self.ids["ordered"] and ordered:
            visit_ban[full] |= torch.arange(visit_ban.shape[1], device=visit_ban.device) != nxt[full].unsqueeze(1)
            visit_ban[full & (left == 0), close] = False
        else:
            visit_ban[full] = True
            visit_ban[full, close] = False
        after_visit = torch.ones(visit_ban.shape[1], dtype=torch.bool, device=visit_ban.device)
        after_visit[[self.ids["visit_open"], self.ids["eos"]]] = False
        return torch.where(self.in_visit.unsqueeze(1), visit_ban, after_visit.unsqueeze(0))

    def advance(self, token: torch.Tensor) -> torch.Tensor:
        """Take the sampled `token` (n,); returns which rows wrote a new code with it (a revealed code
        that an ordered visit writes at its place is not new)."""
        is_code = self.in_visit & ~self.done & (token >= self.ids["n_special"])
        new = is_code
        if self.ids["ordered"]:
            revealed = is_code & (token == self._next_revealed())
            self.written = self.written + revealed.long()
            self.last = torch.where(is_code, token, self.last)
            new = is_code & ~revealed
        self.banned_codes[is_code, token[is_code]] = True
        self.n_in_visit = self.n_in_visit + is_code.long()
        closing = self.in_visit & (token == self.ids["visit_close"])
        finishing = ~self.in_visit & ~self.done
        self.more = torch.where(finishing, token == self.ids["visit_open"], self.more)
        self.done = self.done | finishing
        self.in_visit = self.in_visit & ~closing
        return new
