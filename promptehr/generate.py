"""Generation: synthetic visits, batched over patients with the KV cache (docs/PROMPTEHR.md section 5).

One step of `sample_visit_batch` writes one new visit per row (rows of `patient_format.generation_rows`,
the model's incremental decoder `start_decoding` / `decode_step`): codes until `</v>`, then `<v>`
(another visit follows) or `</s>` (the patient ends), under the patient format's grammar
(`patient_format.VisitGrammar`: no code twice in a visit, codes in id order for an ordered vocabulary,
delimiters where they belong).

Unconditional generation takes demographics, or draws them with `sample_demographics` from the
(sex, age bin) histogram of the training patients that `train()` stores in the checkpoint's
metadata.json (`demographics_histogram`): an aggregate, never patient records.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from promptehr.model import N_PROMPTS
from promptehr.patient_format import VisitGrammar, generation_rows, pad_prefixes, previous_visit_codes
from promptehr.schema import MAX_AGE, SEXES, Patient
from promptehr.tokenizer import DiagnosisCodeTokenizer

logger = logging.getLogger(__name__)


@dataclass
class SamplingConfig:
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    max_codes_per_visit: int = 40
    max_visits: int = 20  # a patient the model has not ended by then is ended (n_visits overrides it)

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1] (1 = off), got {self.top_p}")
        if self.max_codes_per_visit < 1 or self.max_visits < 1:
            raise ValueError("max_codes_per_visit and max_visits must be >= 1")


# ------------------------------------------------------------------ demographics

# Age bins of the demographics histogram: [0, 1) holds the neonates, [90, 91) MIMIC's cap (MAX_AGE).
AGE_BIN_EDGES = (0, 1, *range(5, 90, 5), 90, 91)


def demographics_histogram(patients) -> dict:
    """Counts of patients per (sex, age bin): what `sample_demographics` draws from. An aggregate
    that is safe to store beside a model (no record, no identifier)."""
    edges = np.asarray(AGE_BIN_EDGES, dtype=float)
    counts = np.zeros((len(SEXES), len(edges) - 1), dtype=np.int64)
    for p in patients:
        b = int(np.searchsorted(edges, min(max(p.age, 0.0), MAX_AGE), side="right")) - 1
        counts[SEXES.index(p.sex), b] += 1
    return {"age_bin_edges": list(AGE_BIN_EDGES), "sexes": list(SEXES), "counts": counts.tolist()}


def sample_demographics(histogram: dict, n: int, seed: int = 0) -> tuple[list[float], list[str]]:
    """`n` (age, sex) pairs from a `demographics_histogram`: a cell by its count, then a whole-year
    age uniformly inside the cell's bin (the neonate bin gives 0, the top bin 90)."""
    counts = np.asarray(histogram["counts"], dtype=np.float64)
    edges = np.asarray(histogram["age_bin_edges"], dtype=np.int64)
    if counts.sum() <= 0:
        raise ValueError("the demographics histogram is empty")
    rng = np.random.default_rng(seed)
    cells = rng.choice(counts.size, size=n, p=(counts / counts.sum()).ravel())
    sex_idx, bin_idx = np.divmod(cells, counts.shape[1])
    ages = rng.integers(edges[bin_idx], edges[bin_idx + 1])
    return [float(a) for a in ages], [histogram["sexes"][i] for i in sex_idx]


def _filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        cum = probs.cumsum(-1)
        drop = cum - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


@torch.no_grad()
def sample_visit_batch(
    model,
    tok: DiagnosisCodeTokenizer,
    histories: list[list[list[int]]],
    revealed: list[list[int]],
    ages: list[float],
    sexes: list[int],
    sampling: SamplingConfig,
    generator: torch.Generator,
    return_first_logits: bool = False,
):
    """Sample one new visit per row. Returns (new code ids per row, whether another visit follows), and
    with `return_first_logits` also the (n, vocab) logits of the first sampled position under the
    grammar (banned tokens at -inf, before temperature and top-k/top-p): the model's own
    distribution of the visit's next code after the revealed ones."""
    device = next(model.parameters()).device
    n = len(histories)
    enc_rows, dec_rows = zip(*(generation_rows(tok, h, r) for h, r in zip(histories, revealed)))
    longest = max(len(r) for r in dec_rows) + N_PROMPTS + sampling.max_codes_per_visit + 2
    if longest > model.max_positions or max(len(r) for r in enc_rows) + N_PROMPTS > model.max_positions:
        raise ValueError(
            f"a history of {longest} decoder positions exceeds model.max_position_embeddings={model.max_positions}; "
            "generate fewer visits (sampling.max_visits) or train with a larger max_position_embeddings"
        )
    enc_ids, enc_mask = pad_prefixes(list(enc_rows), tok.pad_token_id, device)
    dec_ids, dec_mask = pad_prefixes(list(dec_rows), tok.pad_token_id, device)
    x_num = torch.tensor(ages, dtype=torch.float32, device=device).unsqueeze(1)
    x_cat = torch.tensor(sexes, dtype=torch.long, device=device).unsqueeze(1)
    previous, _ = pad_prefixes(
        [previous_visit_codes(tok, r) or [tok.pad_token_id] for r in dec_rows], tok.pad_token_id, device
    )
    logits, state = model.start_decoding(enc_ids, enc_mask, dec_ids, dec_mask, x_num, x_cat, previous)
    grammar = VisitGrammar.start(tok, revealed, len(tok), sampling.max_codes_per_visit, device)
    new_codes: list[list[int]] = [[] for _ in range(n)]
    for step in range(sampling.max_codes_per_visit + 2):
        if step == 0 and grammar.ids["ordered"]:  # any code the visit could still hold, not only the next in order
            first_logits = logits.masked_fill(grammar.banned(ordered=False), float("-inf"))
        logits = logits.masked_fill(grammar.banned(), float("-inf"))
        if step == 0 and not grammar.ids["ordered"]:
            first_logits = logits
        logits = _filter_logits(logits / max(sampling.temperature, 1e-6), sampling.top_k, sampling.top_p)
        token = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)
        token = torch.where(grammar.done, torch.full_like(token, tok.pad_token_id), token)
        for i in torch.nonzero(grammar.advance(token)).flatten().tolist():
            new_codes[i].append(int(token[i]))
        if bool(grammar.done.all()):
            break
        logits = model.decode_step(token, state)
    if return_first_logits:
        return new_codes, grammar.more.tolist(), first_logits
    return new_codes, grammar.more.tolist()


def _encode_patient_codes(tok, visits):
    return [[tok.encode_code(c, strict=False) for c in v] for v in visits]


def reveal_codes(visit: list[str], prompt_prob: float, rng: np.random.Generator) -> list[str]:
    """A random `prompt_prob` share of a visit's codes (at least one code stays hidden)."""
    n_reveal = min(len(visit) - 1, int(round(prompt_prob * len(visit))))
    if n_reveal <= 0:
        return []
    return [visit[i] for i in sorted(rng.choice(len(visit), n_reveal, replace=False))]


def generate_conditional_batch(model, tokenizer, patients, prompt_prob=0.5, sampling=None, seed=0, batch_size=64):
    """Reveal a `prompt_prob` share of each visit's codes and generate the rest of that visit given the
    true earlier visits, batched over patients (all visits of each). Each result holds "prompts",
    "generated" and "target" (lists of code lists per visit) and "ranked": per visit, the codes the model
    finds most likely to come next after the revealed ones (by the first sampled position's distribution;
    revealed codes excluded), as many as the visit has codes, most likely first. With an ordered vocabulary
    the first position is the visit's first code in id order, before the order's constraint: a guess
    that favours frequent codes."""
    sampling = sampling or SamplingConfig()
    rng = np.random.default_rng(seed)
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    jobs = []  # (patient index, visit index, history ids, revealed codes)
    results = []
    for pi, p in enumerate(patients):
        ids = _encode_patient_codes(tokenizer, p.visits)
        prompts = [reveal_codes(v, prompt_prob, rng) for v in p.visits]
        results.append(
            {
                "prompts": prompts,
                "generated": [None] * len(p.visits),
                "ranked": [None] * len(p.visits),
                "target": [list(v) for v in p.visits],
            }
        )
        for vi in range(len(p.visits)):
            jobs.append((pi, vi, ids[:vi], [tokenizer.encode_code(c) for c in prompts[vi]], p.age, SEXES.index(p.sex)))
    was_training = model.training
    model.eval()
    try:
        for s in range(0, len(jobs), batch_size):
            chunk = jobs[s : s + batch_size]
            codes, _, first = sample_visit_batch(
                model,
                tokenizer,
                [j[2] for j in chunk],
                [j[3] for j in chunk],
                [j[4] for j in chunk],
                [j[5] for j in chunk],
                sampling,
                gen,
                return_first_logits=True,
            )
            first[:, : tokenizer.n_special] = float("-inf")  # codes only (`</v>` may be allowed there)
            order = first.argsort(dim=1, descending=True).tolist()
            n_allowed = torch.isfinite(first).sum(dim=1).tolist()
            for row, ((pi, vi, *_), new) in enumerate(zip(chunk, codes)):
                results[pi]["generated"][vi] = results[pi]["prompts"][vi] + [tokenizer.id_to_token[c] for c in new]
                n_rank = min(len(results[pi]["target"][vi]), n_allowed[row])
                results[pi]["ranked"][vi] = [tokenizer.id_to_token[c] for c in order[row][:n_rank]]
    finally:
        model.train(was_training)
    return results


def _decoder_positions_needed(tok_len_history: int, sampling: SamplingConfig) -> int:
    """Decoder positions a next visit needs: prompts, `<s>`, history, `<v>`, codes, `</v>`, `<v>`/`</s>`."""
    return N_PROMPTS + 1 + tok_len_history + 1 + sampling.max_codes_per_visit + 2


def generate_patients(model, tokenizer, ages, sexes, sampling=None, seed=0, batch_size=256, n_visits=None, progress=False):
    """Unconditional generation from demographics, batched over patients.

    Visit by visit: after each visit the model samples `<v>` (another visit) or `</s>` (the patient
    ends), so the number of visits is the model's; `n_visits[i]` (an int, or None to let the model
    decide) makes patient i have exactly that many. `sampling.max_visits` ends the patients the model
    has not ended by then. A patient whose history has grown too long for the model's position
    embeddings is ended there (counted in a warning; with an explicit `n_visits` it is an error).
    `seed` is an int or a `torch.Generator` to continue (calls over consecutive slices of the
    patients, `batch_size` each, then give the patients one call over all of them gives).
    Returns Patient records with synthetic ids `SYN0000001`, ...
    """
    from tqdm.auto import tqdm

    sampling = sampling or SamplingConfig()
    if len(ages) != len(sexes) or (n_visits is not None and len(n_visits) != len(ages)):
        raise ValueError("ages, sexes (and n_visits) must have one entry per patient")
    targets = [None if v is None else int(v) for v in (n_visits if n_visits is not None else [None] * len(ages))]
    if any(t is not None and t < 1 for t in targets):
        raise ValueError("n_visits must be >= 1")
    device = next(model.parameters()).device
    max_pos = model.max_positions
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator(device=device).manual_seed(seed)
    sex_ids = [SEXES.index(s) if isinstance(s, str) else int(s) for s in sexes]
    patients: list[Patient] = []
    ended_by_length = 0
    was_training = model.training
    model.eval()
    try:
        with tqdm(total=len(ages), disable=not progress, desc="generate", unit="patient") as bar:
            for s in range(0, len(ages), batch_size):
                idx = list(range(s, min(s + batch_size, len(ages))))
                hist = {i: [] for i in idx}
                length = dict.fromkeys(idx, 0)  # history tokens: <v> codes </v> per visit
                active = list(idx)
                while active:
                    fits = [i for i in active if _decoder_positions_needed(length[i], sampling) <= max_pos]
                    for i in set(active) - set(fits):
                        if targets[i] is not None:
                            raise ValueError(
                                f"patient {i}: {len(hist[i])} visits already fill the model's {max_pos} positions; "
                                f"n_visits={targets[i]} cannot be generated"
                            )
                        ended_by_length += 1
                    active = fits
                    if not active:
                        break
                    codes, more = sample_visit_batch(
                        model,
                        tokenizer,
                        [hist[i] for i in active],
                        [[] for _ in active],
                        [float(ages[i]) for i in active],
                        [sex_ids[i] for i in active],
                        sampling,
                        gen,
                    )
                    still = []
                    for i, new, cont in zip(active, codes, more):
                        hist[i].append(new)
                        length[i] += len(new) + 2
                        go_on = (
                            len(hist[i]) < targets[i]
                            if targets[i] is not None
                            else cont and len(hist[i]) < sampling.max_visits
                        )
                        if go_on:
                            still.append(i)
                    active = still
                for i in idx:
                    visits = [[tokenizer.id_to_token[c] for c in v] for v in hist[i]]
                    patients.append(Patient(f"SYN{i + 1:07d}", float(ages[i]), SEXES[sex_ids[i]], visits))
                bar.update(len(idx))
    finally:
        model.train(was_training)
    if ended_by_length:
        logger.warning(
            "%d generated patients were ended because their history reached the model's %d positions",
            ended_by_length,
            max_pos,
        )
    return patients
