"""Model: BART encoder-decoder with age/sex prompts and auxiliary demographic heads.

Built from our `ModelConfig` (random init, never a hub download). The age (numeric) and sex
(categorical) prompts are reparameterised in a `prompt_hidden_size` space, mapped to d_model and
prepended to the encoder and decoder input embeddings (masks extended by two positions).
The auxiliary heads read the mean embedding of the encoder's CODE tokens only: they never see
the prompts, so they cannot copy the answer (docs/PROMPTEHR.md section 3).
`forward` returns loss, lm_loss, age_loss, sex_loss and logits aligned with `labels`.

The model's distribution is the one generation samples from: the forward bans, at every label
position, what the patient format rules out there (`patient_format.grammar_mask`), and generation
applies the same rules token by token, so the likelihood a run reports is that of the sampler it
ships. `start_decoding` / `decode_step` are the incremental decoder generation uses (encoder states,
KV cache, each row's true positions), so nothing outside this module reaches into BART.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BartConfig, BartForConditionalGeneration
from transformers.models.bart.modeling_bart import BartDecoder, shift_tokens_right

from promptehr.patient_format import BANNED_LOGIT, grammar_mask, grammar_token_ids, with_closing_token
from promptehr.schema import MAX_AGE, SEXES
from promptehr.tokenizer import DiagnosisCodeTokenizer

# transformers 5 calls the decoder's key/value cache `cache` (argument and output field); 4.x called it
# `past_key_values`, which 5.x still accepts with a FutureWarning until its removal.
_CACHE = "cache" if "cache" in inspect.signature(BartDecoder.forward).parameters else "past_key_values"

N_PROMPTS = 2  # age, sex


def bart_config(cfg, tokenizer: DiagnosisCodeTokenizer) -> BartConfig:
    """`BartConfig` from our ModelConfig and vocabulary."""
    return BartConfig(
        vocab_size=len(tokenizer),
        d_model=cfg.d_model,
        encoder_layers=cfg.encoder_layers,
        decoder_layers=cfg.decoder_layers,
        encoder_attention_heads=cfg.encoder_attention_heads,
        decoder_attention_heads=cfg.decoder_attention_heads,
        encoder_ffn_dim=cfg.encoder_ffn_dim,
        decoder_ffn_dim=cfg.decoder_ffn_dim,
        dropout=cfg.dropout,
        attention_dropout=cfg.attention_dropout,
        activation_dropout=cfg.activation_dropout,
        max_position_embeddings=cfg.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.bos_token_id,
        forced_eos_token_id=None,
        scale_embedding=cfg.scale_embedding,
        tie_word_embeddings=cfg.tie_embeddings,
    )


class DemographicPrompt(nn.Module):
    """Age and sex -> two prompt vectors (B, 2, d_model): numeric `w*x+b` and categorical embedding
    in a `hidden`-wide space, each followed by a linear map to d_model."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        # unit-scale init: the projections' biases are ~1/sqrt(hidden), so prompts initialised at 0.02
        # would start out almost identical for every patient
        self.age_weight = nn.Parameter(torch.randn(hidden))
        self.age_bias = nn.Parameter(torch.zeros(hidden))
        self.sex_embedding = nn.Embedding(len(SEXES), hidden)
        nn.init.normal_(self.sex_embedding.weight, std=1.0)
        self.age_proj = nn.Linear(hidden, d_model)
        self.sex_proj = nn.Linear(hidden, d_model)

    def forward(self, x_num: torch.Tensor, x_cat: torch.Tensor) -> torch.Tensor:
        age = (x_num[:, :1].float() / MAX_AGE) * self.age_weight + self.age_bias  # (B, hidden)
        sex = self.sex_embedding(x_cat[:, 0].long())  # (B, hidden)
        return torch.stack([self.age_proj(age), self.sex_proj(sex)], dim=1)  # (B, 2, d_model)


class RecurrenceBonus(nn.Module):
    """A learned logit bonus for the codes of the visit before the one being written: b + u.E_c + w.h_t
    for each code c of the previous visit (E_c its token embedding, h_t the decoder state), added at the
    positions of a hidden visit (next-visit rows, and every visit generation writes).

    A code recurs from one visit to the next (chronic conditions, repeated procedures); through the tied
    output layer the decoder can raise one copied code at a time (reconstruction), but not a dozen
    arbitrary codes of the last visit at once without raising their neighbours in embedding space, so
    next visits under-predicted recurrences (bench/LOG.md, 2026-12-07). This is the repeat baseline's
    form, p = a [c in visit k-1] + (1 - a) q, inside the model: b is shared by all codes, u reads how
    recurrent a code is from its embedding (no per-code parameter to overfit), w lets the context decide.
    All start at 0: the model starts as without the bonus."""

    def __init__(self, d_model: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(()))
        self.code = nn.Parameter(torch.zeros(d_model))
        self.gate = nn.Linear(d_model, 1)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)

    def forward(self, logits, hidden, previous_visit, previous_embeds, n_special: int, where=None):
        """`logits` (B, T, V) plus the bonus; `hidden` (B, T, d) the decoder states the logits come from,
        `previous_visit` (B, M) code ids (ids below `n_special`, i.e. `<pad>`, get nothing),
        `previous_embeds` (B, M, d) their embeddings, `where` (B, T) bool: the positions that get it
        (None: all)."""
        per_code = self.bias + previous_embeds.float() @ self.code.float()  # (B, M)
        bonus = per_code.unsqueeze(1) + self.gate(hidden).float()  # (B, T, M)
        keep = (previous_visit >= n_special).unsqueeze(1)
        if where is not None:
            keep = keep & where.unsqueeze(-1)
        bonus = bonus * keep
        index = previous_visit.unsqueeze(1).expand(-1, logits.shape[1], -1)
        return logits.scatter_add(-1, index, bonus.to(logits.dtype))


class PromptBartWithDemographicPrediction(nn.Module):
    def __init__(self, tokenizer: DiagnosisCodeTokenizer, config):
        """`config` is the project's Config (uses config.model) or a ModelConfig."""
        super().__init__()
        mcfg = getattr(config, "model", config)
        self.model_config = mcfg
        self.n_special = tokenizer.n_special
        self.pad_token_id = tokenizer.pad_token_id
        self.bos_token_id = tokenizer.bos_token_id
        self.grammar_ids = grammar_token_ids(tokenizer)
        self.bart = BartForConditionalGeneration(bart_config(mcfg, tokenizer))
        d = mcfg.d_model
        self.encoder_prompt = DemographicPrompt(d, mcfg.prompt_hidden_size)
        self.decoder_prompt = DemographicPrompt(d, mcfg.prompt_hidden_size)
        self.age_head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, 1))
        self.sex_head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, len(SEXES)))
        self.age_loss_weight = mcfg.age_loss_weight
        self.sex_loss_weight = mcfg.sex_loss_weight
        if mcfg.target_visit_loss_weight < 0:
            raise ValueError(f"model.target_visit_loss_weight must be >= 0, got {mcfg.target_visit_loss_weight}")
        self.target_visit_loss_weight = mcfg.target_visit_loss_weight
        self.output_bias = nn.Parameter(torch.zeros(len(tokenizer))) if mcfg.output_bias else None
        self.recurrence = RecurrenceBonus(d) if mcfg.recurrence_bonus else None

    def init_output_bias(self, code_counts) -> None:
        """Start the learned output bias at the log frequency of each code (special tokens at the
        mean), so the first steps need not write the code frequencies into the embeddings."""
        if self.output_bias is None:
            return
        counts = torch.as_tensor(code_counts, dtype=torch.float32) + 1.0
        log_q = (counts / counts.sum()).log()
        with torch.no_grad():
            self.output_bias[self.n_special :] = log_q - log_q.mean()

    # ------------------------------------------------------------------ pieces used by generation

    @property
    def max_positions(self) -> int:
        """Decoder (and encoder) positions, the two prompts included."""
        return self.bart.config.max_position_embeddings

    def encode(self, input_ids, attention_mask, x_num, x_cat):
        """Encoder states with the prompts prepended: (hidden (B, 2+L, d), mask (B, 2+L))."""
        embeds = self.bart.model.encoder.embed_tokens(input_ids)
        embeds = torch.cat([self.encoder_prompt(x_num, x_cat).to(embeds.dtype), embeds], dim=1)
        mask = torch.cat([attention_mask.new_ones(attention_mask.shape[0], N_PROMPTS), attention_mask], dim=1)
        hidden = self.bart.model.encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        return hidden, mask

    def decoder_prompt_embeds(self, decoder_input_ids, x_num, x_cat):
        embeds = self.bart.model.decoder.embed_tokens(decoder_input_ids)
        return torch.cat([self.decoder_prompt(x_num, x_cat).to(embeds.dtype), embeds], dim=1)

    def with_recurrence(self, logits, hidden, previous_visit, where=None):
        """`logits` plus the recurrence bonus (`RecurrenceBonus`) of the codes in `previous_visit`;
        unchanged for a model without it."""
        if self.recurrence is None:
            return logits
        embeds = self.bart.model.decoder.embed_tokens(previous_visit)
        return self.recurrence(logits, hidden, previous_visit, embeds, self.n_special, where)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.bart.lm_head(hidden) + self.bart.final_logits_bias.to(hidden.dtype)
        return logits if self.output_bias is None else logits + self.output_bias.to(hidden.dtype)

    # ------------------------------------------------------------------ incremental decoding (generation)

    @torch.no_grad()
    def start_decoding(
        self, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, x_num, x_cat, previous_visit=None
    ):
        """Encode, and run the decoder over right-padded prefixes (one per row, each ending inside the
        visit being written) into a KV cache. Returns the logits after each row's last prefix token
        (n, V), before any grammar, and the state `decode_step` continues from. `previous_visit` (n, M):
        the codes of the visit before the one being written (`<pad>`-padded; `patient_format.
        previous_visit_codes`), for the recurrence bonus; required by a model that has one."""
        if self.recurrence is not None and previous_visit is None:
            raise ValueError("this model has a recurrence bonus: start_decoding needs previous_visit")
        hidden, hidden_mask = self.encode(input_ids, attention_mask, x_num, x_cat)
        n = decoder_input_ids.shape[0]
        attn = torch.cat([decoder_attention_mask.new_ones(n, N_PROMPTS), decoder_attention_mask], dim=1)
        out = self.bart.model.decoder(
            inputs_embeds=self.decoder_prompt_embeds(decoder_input_ids, x_num, x_cat),
            attention_mask=attn,
            encoder_hidden_states=hidden,
            encoder_attention_mask=hidden_mask,
            use_cache=True,
        )
        lengths = decoder_attention_mask.sum(1) + N_PROMPTS  # each row's true length, prompts included
        last = out.last_hidden_state[torch.arange(n, device=hidden.device), lengths - 1]
        state = DecodeState(hidden, hidden_mask, getattr(out, _CACHE), attn, lengths, attn.shape[1], previous_visit)
        return self.next_logits(last, state), state

    def next_logits(self, last: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """(n, V) logits from the decoder's last states (n, d), with the recurrence bonus."""
        logits = self.lm_logits(last).float()
        if state.previous_visit is None:
            return logits
        return self.with_recurrence(logits.unsqueeze(1), last.unsqueeze(1), state.previous_visit).squeeze(1)

    @torch.no_grad()
    def decode_step(self, token: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """Feed one token per row (n,) and return the next logits (n, V). Rows of different prefix
        lengths share one right-padded cache: the token goes into cache slot `width + step`, with the
        position embedding of its row's true position instead (BART's table is offset by 2)."""
        decoder = self.bart.model.decoder
        positions = decoder.embed_positions.weight
        correction = positions[state.lengths + state.step + 2] - positions[state.width + state.step + 2]
        embeds = (decoder.embed_tokens(token) + correction.to(state.hidden.dtype)).unsqueeze(1)
        state.attn = torch.cat([state.attn, state.attn.new_ones(token.shape[0], 1)], dim=1)
        out = decoder(
            inputs_embeds=embeds,
            attention_mask=state.attn,
            encoder_hidden_states=state.hidden,
            encoder_attention_mask=state.hidden_mask,
            use_cache=True,
            **{_CACHE: state.past},
        )
        state.past = getattr(out, _CACHE)
        state.step += 1
        return self.next_logits(out.last_hidden_state[:, -1], state)

    def demographic_features(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean embedding of the code tokens of each row (B, d) and whether the row has any code."""
        code_mask = (input_ids >= self.n_special).unsqueeze(-1)
        embeds = self.bart.model.encoder.embed_tokens(input_ids) * code_mask
        count = code_mask.sum(dim=1)
        return embeds.sum(dim=1) / count.clamp(min=1), count.squeeze(-1) > 0

    # ------------------------------------------------------------------ training forward

    def forward(
        self,
        input_ids,
        attention_mask,
        labels,
        x_num,
        x_cat,
        decoder_input_ids=None,
        target_mask=None,
        previous_visit=None,
        **_batch_extras,
    ):
        """Denoising loss on `labels` (clean ids, -100 = ignore) plus weighted auxiliary losses.

        `lm_loss` is the mean NLL over label tokens. With `target_visit_loss_weight` w != 1 and a
        `target_mask`, the objective `loss` weighs the hidden visit of next-visit and first-visit rows
        (its codes and its closing `</v>`) w times the other label tokens. A model with a recurrence bonus
        adds it at the hidden visit's positions (`target_mask` and its `</v>`) for the codes of
        `previous_visit` (`patient_format.pad_batch` gives both). Extra batch keys
        (task_type) are accepted and ignored, so `model(**batch)` works.
        """
        hidden, enc_mask = self.encode(input_ids, attention_mask, x_num, x_cat)
        if decoder_input_ids is None:
            decoder_input_ids = shift_tokens_right(labels, self.pad_token_id, self.bos_token_id)
        dec_embeds = self.decoder_prompt_embeds(decoder_input_ids, x_num, x_cat)
        dec = self.bart.model.decoder(
            inputs_embeds=dec_embeds, encoder_hidden_states=hidden, encoder_attention_mask=enc_mask, use_cache=False
        ).last_hidden_state
        logits = self.lm_logits(dec[:, N_PROMPTS:]).float()  # (B, T, V), aligned with labels
        if self.recurrence is not None and target_mask is not None:
            if previous_visit is None:
                raise ValueError("this model has a recurrence bonus: a batch with target_mask needs previous_visit")
            logits = self.with_recurrence(logits, dec[:, N_PROMPTS:], previous_visit, with_closing_token(target_mask))
        logits = logits.masked_fill(grammar_mask(labels, self.grammar_ids, logits.shape[-1]), BANNED_LOGIT)
        token_nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")  # (B, T)
        valid = (labels != -100).float()
        lm_loss = token_nll.sum() / valid.sum().clamp(min=1.0)
        lm_objective = lm_loss
        if self.target_visit_loss_weight != 1.0 and target_mask is not None:
            hidden_visit = with_closing_token(target_mask)
            weight = valid + (self.target_visit_loss_weight - 1.0) * (hidden_visit.float() * valid)
            lm_objective = (token_nll * weight).sum() / weight.sum().clamp(min=1e-6)

        features, has_codes = self.demographic_features(input_ids)
        age_pred = self.age_head(features).squeeze(-1).float()
        sex_logits = self.sex_head(features).float()
        age_target = x_num[:, 0].float() / MAX_AGE
        # means over the rows that have codes (placeholder rows have nothing to read; none at all: 0),
        # as masked sums: no data-dependent branch or boolean indexing, so no host sync per step on a
        # GPU and no graph break under torch.compile
        reads = has_codes.float()
        n_reads = reads.sum().clamp(min=1.0)
        age_loss = (reads * (age_pred - age_target) ** 2).sum() / n_reads
        sex_loss = (reads * F.cross_entropy(sex_logits, x_cat[:, 0].long(), reduction="none")).sum() / n_reads
        loss = lm_objective + self.age_loss_weight * age_loss + self.sex_loss_weight * sex_loss
        return {"loss": loss, "lm_loss": lm_loss, "age_loss": age_loss, "sex_loss": sex_loss, "logits": logits}


@dataclass
class DecodeState:
    """What `decode_step` continues from: the encoder's states, the decoder's KV cache and mask, each
    row's true length and the padded width the cache started at."""

    hidden: torch.Tensor  # (n, 2 + L, d) encoder states, prompts first
    hidden_mask: torch.Tensor  # (n, 2 + L)
    past: object  # the decoder's KV cache
    attn: torch.Tensor  # (n, width + step) decoder attention mask
    lengths: torch.Tensor  # (n,) each row's prefix length, prompts included
    width: int  # padded prefix width, prompts included
    previous_visit: torch.Tensor | None = None  # (n, M) codes of the visit before the one being written
    step: int = 0  # tokens fed since
