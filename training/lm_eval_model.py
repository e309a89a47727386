"""The lm-eval-harness model type ``twotower`` (registered when this module is imported).

Stage: evaluation. ``lm_eval.simple_evaluate(model="twotower", model_args="hf=DIR,decoder=diffusion,
gamma=0.8")`` after ``import twotower.training.lm_eval_model`` (``twotower-eval`` does it), or
``TwoTowerLM(...)`` passed as the model object. Model arguments:

    run / checkpoint / hf / backbone   the source (training/inference_model.py's load_for_inference)
    tokenizer                          override the recorded tokenizer ("byte", a folder, a tokenizer.json)
    decoder=diffusion|ar|mock_ar       generate_until's decoder (model/decoding.py)
    gamma (0.8), block_size (the training block), steps_per_block (= block size)   diffusion only
    batch_size (1)                     requests decoded / scored together
    max_gen_toks (256), max_length (4096)

``loglikelihood`` / ``loglikelihood_rolling`` go through the context tower (the AR model), as the
release does for likelihood tasks, whatever the decoder. ``generate_until`` decodes with the chosen
decoder, stops once every row of a batch emitted eos or an ``until`` string (checked after every
block / token), and returns the text cut before the first ``until`` string and after at most
``max_gen_toks`` tokens. :attr:`TwoTowerLM.stats` accumulates the decoders' own counters.
"""

from __future__ import annotations

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from twotower.training.eval_model import (
    EvalModel,
    EvalUsageError,
    check_decoder_args,
    decode,
    finished,
    length_batches,
    needed_tokens,
    open_model,
    text_until,
    warn_block_size,
)

#: what lm-eval's evaluator adds to every model's arguments; the model runs where it was loaded
_HARNESS_ARGS = ("max_batch_size", "device")


@register_model("twotower")
class TwoTowerLM(TemplateLM):
    """A TwoTower behind lm-eval's ``TemplateLM`` interface (module docstring)."""

    def __init__(self, run: str | None = None, checkpoint: str | None = None, hf: str | None = None,
                 backbone: str | None = None, tokenizer: str | None = None, decoder: str = "diffusion",
                 gamma: float = 0.8, block_size: int | None = None, steps_per_block: int | None = None,
                 batch_size: int | str = 1, max_gen_toks: int = 256, max_length: int = 4096,
                 model: EvalModel | None = None, **extra) -> None:
        super().__init__()
        unknown = sorted(k for k, v in extra.items() if k not in _HARNESS_ARGS and v is not None)
        if unknown:  # a typo (gama=0.5) must not silently evaluate the default
            raise EvalUsageError(f"twotower model args: unknown {', '.join(unknown)}; known: run, checkpoint, hf, "
                                 "backbone, tokenizer, decoder, gamma, block_size, steps_per_block, batch_size, "
                                 "max_gen_toks, max_length")
        kw = dict(block_size=block_size, steps_per_block=steps_per_block, max_gen_toks=max_gen_toks,
                  max_length=max_length)
        try:
            kw = {k: (int(v) if v is not None else None) for k, v in kw.items()}
            gamma = float(gamma)
            batch_size = int(batch_size)
        except (TypeError, ValueError) as e:
            raise EvalUsageError(f"twotower model args: {e} (block_size, steps_per_block, max_gen_toks, max_length "
                                 "and batch_size are integers, gamma a number)") from None
        check_decoder_args(decoder, gamma, kw["block_size"], kw["steps_per_block"])
        if batch_size < 1 or kw["max_gen_toks"] < 1 or kw["max_length"] < 2:
            raise EvalUsageError(f"batch_size={batch_size}, max_gen_toks={kw['max_gen_toks']}, max_length="
                                 f"{kw['max_length']}: must be >= 1 (max_length >= 2)")
        self.em = model if model is not None else open_model(run, checkpoint, hf, backbone, tokenizer)
        self.decoder, self.gamma, self.batch_size = decoder, gamma, batch_size
        self.block_size = kw["block_size"] or self.em.training_block
        self.steps_per_block = kw["steps_per_block"]
        self.max_gen_toks, self.max_length = kw["max_gen_toks"], kw["max_length"]
        if decoder == "diffusion":
            warn_block_size(self.block_size, self.em.training_block)
        self.stats = {"requests": 0, "tokens": 0, "nfe": 0, "seconds": 0.0, "kept_tokens": 0}
        """Decoder counters over every ``generate_until`` batch, from the decoder's own counts and
        summed over sequences: ``tokens`` generated, ``nfe`` forwards of the generating tower (a
        batch's forward counts once per row, so tokens / nfe is tokens per forward of one sequence),
        ``seconds`` of decoding,
        ``kept_tokens`` the tokens each answer needed (up to the token that completed eos or
        the first ``until`` string: what AR generates; diffusion's rest of the block is not counted)."""

    # ------------------------------------------------------------------ tokenization
    @property
    def eot_token_id(self) -> int:
        return self.em.tokenizer.eos_id

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.em.tokenizer, "name", "twotower")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.em.tokenizer.encode(string)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.em.tokenizer.decode(tokens)

    # ------------------------------------------------------------------ likelihood (context tower)
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """``requests``: ``((context, continuation), context ids, continuation ids)``. Each sequence
        is ``(context + continuation)[:-1]`` (left-truncated to ``max_length``), scored causally;
        right padding cannot change earlier positions of a causal tower."""
        import torch

        out: list[tuple[float, bool] | None] = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        for k in range(0, len(order), self.batch_size):
            idx = order[k:k + self.batch_size]
            seqs, conts = [], []
            for i in idx:
                _, ctx, cont = requests[i]
                whole = (list(ctx) + list(cont))[-(self.max_length + 1):]
                seqs.append(whole[:-1])
                conts.append(list(cont)[len(cont) - min(len(cont), len(whole) - 1):])
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), self.em.tokenizer.pad_id, dtype=torch.long)
            for r, s in enumerate(seqs):
                ids[r, :len(s)] = torch.tensor(s)
            with torch.no_grad(), torch.compiler.set_stance("force_eager"):
                logits, _ = self.em.model.context_forward(ids, return_logits=True)
            logp = logits[..., :self.em.vocab_size].float().log_softmax(-1)
            for r, i in enumerate(idx):
                n, end = len(conts[r]), len(seqs[r])
                target = torch.tensor(conts[r])
                lp = logp[r, end - n:end]
                ll = lp.gather(-1, target[:, None]).sum().item()
                out[i] = (ll, bool((lp.argmax(-1) == target).all()))
                self.cache_hook.add_partial("loglikelihood", requests[i][0], out[i])
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-string log-likelihood in disjoint windows of ``max_length`` (lm-eval's recipe)."""
        from lm_eval import utils

        out = []
        for req in requests:
            (string,) = req.args
            windows = [utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            scores = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows])
            total = sum(ll for ll, _ in scores)
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
        return out

    # ------------------------------------------------------------------ generation (the chosen decoder)
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        jobs = []
        for req in requests:
            context, gen_kwargs = req.args
            until, max_new, temperature = self._gen_settings(gen_kwargs)
            prompt = self.tok_encode(context) or [self.prefix_token_id]
            prompt = prompt[-max(1, self.max_length - max_new):]
            jobs.append((prompt, tuple(until), max_new, temperature))
        results: list[str | None] = [None] * len(jobs)
        by_settings: dict[tuple, list[int]] = {}
        for i, (_, until, max_new, temp) in enumerate(jobs):
            by_settings.setdefault((until, max_new, temp), []).append(i)
        for (until, max_new, temp), members in by_settings.items():
            for group in length_batches([jobs[i][0] for i in members], self.batch_size):
                idx = [members[g] for g in group]
                texts = self._generate([jobs[i][0] for i in idx], list(until), max_new, temp)
                for i, text in zip(idx, texts, strict=True):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return results

    def _gen_settings(self, gen_kwargs: dict) -> tuple[list[str], int, float]:
        kw = dict(gen_kwargs or {})
        until = kw.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(kw.pop("max_gen_toks", self.max_gen_toks))
        temperature = float(kw.pop("temperature", 0.0)) if kw.pop("do_sample", False) else 0.0
        if max_new < 1:
            raise EvalUsageError(f"max_gen_toks={max_new}: must be >= 1")
        return until, max_new, temperature

    def _generate(self, prompts: list[list[int]], until: list[str], max_new: int, temperature: float) -> list[str]:
        rows, out = decode(self.em, self.decoder, prompts, max_new, gamma=self.gamma, block_size=self.block_size,
                           steps_per_block=self.steps_per_block, temperature=temperature,
                           stop=lambda gen: all(finished(self.em, g[:max_new], until) for g in gen))
        texts = [text_until(self.em, row, until) for row in rows]
        kept = sum(needed_tokens(self.em, row, until) for row in rows)
        self.stats["requests"] += len(prompts)
        self.stats["tokens"] += out.new_tokens * len(prompts)
        self.stats["nfe"] += out.nfe * len(prompts)  # per sequence: tokens / nfe is the decoder's tokens_per_nfe
        self.stats["seconds"] += out.seconds
        self.stats["kept_tokens"] += kept
        return texts

    def get_model_info(self) -> dict:
        return {"model_source": self.em.source, "decoder": self.decoder, "gamma": self.gamma,
                "block_size": self.block_size, "batch_size": self.batch_size}
