"""Batched generation: left-padded, length-grouped, seeded sampling or greedy, stop strings.

With `work_dir`, generation is resumable: every `save_every` batches the finished completions
go to a shard file in `work_dir` (written atomically), and a re-run with the same model, inputs
and settings reads them back and generates only the batches no shard holds. A kill therefore
costs at most one shard's batches, and the result is the one an uninterrupted run gives: each
batch's samples depend only on (seed, batch index), never on where a run started. The caller
writes its final output and then removes `work_dir` (see `persona.generate`).

`decode` picks how each batch's tokens are generated, all through transformers' `generate`:
"eager" grows a dynamic KV cache step by step; "compiled" gives each batch a static KV cache
sized to that batch (rows x (prompt width + new tokens)) and lets `generate` run its decode steps
through `torch.compile` (one compile with dynamic shapes serves every batch shape). The eager
decode step costs about as much on a 4-layer model as on the 8B shape (per-step work that does
not scale with the model, not weight reads); on the 4-layer model the compiled step cut it 3.5x
(benchmarks/RESULTS.md). The compile is paid once per process.

An eager, unsteered batch whose prompts differ much in length is prefilled in length-sorted
row chunks (llmlab.prefill): each chunk is padded only to its own longest prompt, the chunks'
keys and values are merged into one cache, and `generate` decodes all rows of the batch from
it, so a memory-sized batch no longer computes its prefill at the longest prompt's width.

On CUDA the same batches (eager, unsteered, full attention) decode from a static KV cache sized
to the batch, with the decode step captured once per batch as a CUDA graph and replayed for
every later step (torch.cuda.CUDAGraph, no torch.compile). The eager step on the 8B shape took
31-39 ms against about 5 ms of weight reads: the host issuing about a thousand kernels one by one,
and the dynamic cache rewriting all keys and values at every step (torch.cat). Sampling, logits
processors and stop strings still run in `generate` between the steps, outside the graph.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from llmlab.chat import (
    DEFAULT_TOKENS_PER_BATCH,
    Message,
    balanced_token_budget_batches,
    collate,
    encode_chat,
)
from llmlab.io import atomic_path
from llmlab.models import LoadedModel, cache_keyword, unwrap
from llmlab.prefill import length_sorted_prefill, merged_cache_supported

log = logging.getLogger(__name__)
WORK_META = "meta.json"  # in a work dir: the fingerprint of the run its shards belong to
SHARD_PREFIX = "shard-"

# Devices where a long-tailed batch is prefilled in length-sorted chunks. CUDA only: that is
# where prefill is compute-bound and padding was measured to cost half of a memory-sized
# evaluation run (benchmarks/RESULTS.md); on a shared 2-core CPU one timing was faster and one
# slower, so the embedded CPU runs keep one prefill forward per batch.
CHUNKED_PREFILL_DEVICES: tuple[str, ...] = ("cuda",)
# Devices where those batches decode from a static cache with the step replayed as a CUDA graph
# (GraphedDecode). On other devices the static-cache path runs each step eagerly, which the
# CPU tests use to check it gives the dynamic cache's tokens; the CPU default keeps the latter.
GRAPHED_DECODE_DEVICES: tuple[str, ...] = ("cuda",)
SteerFactory = Callable[[list[int], torch.Tensor], contextlib.AbstractContextManager[Any]]
Decode = Literal["eager", "compiled"]
DECODES: tuple[str, ...] = ("eager", "compiled")


def compiled_decode_config() -> Any:
    """Return the torch.compile settings of the compiled decode step (decode="compiled").

    dynamic=True: one compilation serves every batch's row count and cache length (batches are
    sized by memory, so their shapes differ); "reduce-overhead" replays each shape's decode step
    as a CUDA graph, which removes the per-step kernel-launch cost that bounds the eager step.
    """
    from transformers import CompileConfig

    return CompileConfig(dynamic=True, mode="reduce-overhead", fullgraph=False)


def decode_attention(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Return the SDPA backend choice for generation: cuDNN attention excluded on CUDA.

    torch's SDPA dispatcher tries cuDNN attention first for bf16 on Hopper, and cuDNN builds
    one execution plan per problem shape, key length included. An eager decode's key length
    grows by one every step, so every step paid a plan build on the host: 68 ms per decode step
    on the Llama-3.1-8B shape, against about 30 ms with flash / memory-efficient attention,
    which need no plan (1,970 -> 3,481 output tokens/s, one H100, benchmarks/RESULTS.md
    2026-12-06). On CPU the dispatcher never picks cuDNN, so nothing changes there.
    """
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(
        [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    )


def truncate_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """Return text cut at the earliest stop string (exclusive)."""
    cut = len(text)
    for s in stop_strings:
        i = text.find(s)
        if i >= 0:
            cut = min(cut, i)
    return text[:cut]


def _eos_ids(loaded: LoadedModel) -> list[int]:
    ids = set()
    gen_eos = getattr(getattr(loaded.model, "generation_config", None), "eos_token_id", None)
    for v in (loaded.tokenizer.eos_token_id, gen_eos):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, list | tuple):
            ids.update(int(x) for x in v)
    return sorted(ids)


# Share of the accelerator's free memory a generation batch may fill (KV cache plus the prefill's
# transient activations); the rest absorbs allocator fragmentation and the sampling buffers.
AUTO_MEMORY_FRACTION = 0.8


def bytes_per_generated_token(model: Any) -> int:
    """Return the accelerator bytes one token of a generation batch needs at its peak.

    The key/value cache of every layer (2 x layers x KV heads x head size), plus the
    prefill's largest transient per token: one MLP's gate, up and product activations
    (3 x intermediate size) and a few hidden-size buffers, which are freed layer by layer.
    """
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = int(text.num_attention_heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
    size = next(model.parameters()).element_size()
    kv = 2 * int(text.num_hidden_layers) * kv_heads * head_dim * size
    intermediate = int(getattr(text, "intermediate_size", 4 * text.hidden_size))
    transient = (3 * intermediate + 4 * int(text.hidden_size)) * size
    return kv + transient


def auto_token_budget(loaded: LoadedModel, fraction: float = AUTO_MEMORY_FRACTION) -> int | None:
    """Return how many (prompt + new) tokens one generation batch may hold on this device.

    Sized by memory rather than by a row count: on a CUDA device, `fraction` of the free
    memory divided by bytes_per_generated_token; None on other devices (no bound known).
    """
    device = torch.device(loaded.device)
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return max(1, int(free * fraction) // bytes_per_generated_token(loaded.model))


@torch.no_grad()
def generate(
    loaded: LoadedModel,
    conversations: Sequence[Sequence[Message]],
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
    max_tokens_per_batch: int | Literal["auto"] | None = DEFAULT_TOKENS_PER_BATCH,
    stop_strings: Sequence[str] = (),
    steer: SteerFactory | None = None,
    progress: bool = True,
    work_dir: str | os.PathLike[str] | None = None,
    save_every: int = 1,
    resume_key: Any = None,
    decode: Decode | None = None,
    **generate_kwargs: Any,
) -> list[str]:
    """Return one completion per conversation, in input order.

    batch_size caps the rows of a batch and max_tokens_per_batch its (prompt + new) tokens,
    padding included; "auto" sizes the token budget by the free accelerator memory
    (auto_token_budget; DEFAULT_TOKENS_PER_BATCH off CUDA), which with a large batch_size gives the
    largest batches that fit: a decode step reads all weights once whatever the batch, so
    throughput grows with the batch until the KV-cache reads dominate.

    temperature 0 is greedy. Batches are grouped by prompt length (longest first) and each
    batch is seeded with seed + its index, so a re-run with the same inputs gives the same
    samples. `steer(rows, attention_mask)` may return a context manager (e.g. steering.steer
    with per-row vectors) entered around each batch's generate call. Extra keyword arguments
    go to `model.generate` unchanged.

    work_dir: make the run resumable (module docstring): completions are saved there every
    `save_every` batches and a re-run reuses them. Shards are reused only when the model
    name and path, dtype, device type, the encoded prompts, every setting above and
    `resume_key` are unchanged (otherwise the work dir is cleared and the run starts fresh);
    put in `resume_key` what the fingerprint cannot see, e.g. an adapter's digest or
    which steering a `steer` factory applies.

    decode: "eager" or "compiled" (module docstring); None (default) takes the model's
    runtime.decode for unsteered calls and "eager" for steered ones. Greedy rows give the same tokens
    either way (up to float rounding), stop strings and work_dir behave alike, and a shard is
    reused only by a run of the same decode. "compiled" compiles on CUDA only (on other devices
    the static cache runs eagerly); a `compile_config` in generate_kwargs replaces
    compiled_decode_config(). Steering is refused with "compiled": its per-batch hooks change the
    traced module, so each batch would be compiled again (or silently run eagerly once
    torch.compile's recompile limit is hit).

    Prefill: with decode="eager", no steering and a model whose cache is full attention in
    every layer (llmlab.prefill.merged_cache_supported), a batch whose prompts differ much in
    length is prefilled in length-sorted chunks and decoded from the merged cache
    (llmlab.prefill.length_sorted_prefill); the tokens are those of one prefill forward up to
    float rounding. Steering hooks are keyed to the full batch's rows, a static cache is
    allocated by `generate` itself and sliding-window caches keep other states, so those
    batches are prefilled in one forward as before.
    """
    if save_every < 1:
        raise ValueError(f"save_every must be >= 1, got {save_every}")
    if decode is None:
        # The runtime's choice (runtime.decode) applies to unsteered generation; steering hooks
        # change per batch, so a steered call decodes eagerly (same tokens, no recompiles).
        decode = "eager" if steer is not None else getattr(loaded, "decode", "eager")
    if decode not in DECODES:
        raise ValueError(f"decode must be one of {DECODES}, got {decode!r}")
    if decode != "eager" and steer is not None:
        raise ValueError(f"steer: steering needs decode='eager', got decode={decode!r}")
    # Compile settings change speed, not tokens: kept out of the resume fingerprint.
    compile_config = generate_kwargs.pop("compile_config", None) if decode == "compiled" else None
    device_type = torch.device(loaded.device).type
    if decode == "compiled" and compile_config is None and device_type == "cuda":
        compile_config = compiled_decode_config()
    # Chunked prefill where it is safe (see above). Left out of the resume fingerprint: it is
    # no setting but a per-batch choice made from what the fingerprint already holds (prompts,
    # model, decode, steering, generate keywords), so a resumed run chooses the same for every
    # batch. What it can change is float rounding, as another GPU model of the same device type
    # can, which the fingerprint also leaves out; a key for it would only discard the shards of
    # every run begun before this code, which are as valid as the ones it writes.
    chunked_prefill = (
        decode == "eager"
        and device_type in CHUNKED_PREFILL_DEVICES
        and steer is None
        and merged_cache_supported(loaded.model, generate_kwargs)
    )
    graphed_decode = chunked_prefill and device_type in GRAPHED_DECODE_DEVICES
    tok = loaded.tokenizer
    encoded = [encode_chat(tok, conv, chat=loaded.chat) for conv in conversations]
    lengths = [len(e.input_ids) for e in encoded]
    if max_tokens_per_batch == "auto":
        budget = auto_token_budget(loaded) or DEFAULT_TOKENS_PER_BATCH
    elif max_tokens_per_batch is None:
        budget = None
    elif isinstance(max_tokens_per_batch, int):
        budget = max(1, max_tokens_per_batch)
    else:
        raise ValueError(
            f"max_tokens_per_batch must be an int, 'auto' or None, got {max_tokens_per_batch!r}"
        )
    # As many batches as the greedy plan, cut for the fewest padded tokens: each batch costs
    # max_new_tokens decode steps whatever its rows, and each step reads every padded key and
    # value, so greedy's small tail batch and its full batch of the longest prompts both waste.
    batches = balanced_token_budget_batches(
        [n + max_new_tokens for n in lengths], batch_size, budget
    )
    eos = _eos_ids(loaded)
    outputs: list[str] = [""] * len(encoded)
    done: dict[int, list[str]] = {}
    work = Path(work_dir) if work_dir is not None else None
    if work is not None:
        settings = {
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "seed": seed,
            "batch_size": batch_size,
            # "auto" as asked, not the budget it gave: free memory differs between runs, and
            # shards whose batches still match this run's batches are reused (_open_work_dir).
            "max_tokens_per_batch": "auto" if max_tokens_per_batch == "auto" else budget,
            "stop_strings": list(stop_strings),
            "steer": steer is not None,
            "generate_kwargs": generate_kwargs,
            "resume_key": resume_key,
            "decode": decode,
        }
        fingerprint = _fingerprint(loaded, [e.input_ids for e in encoded], settings)
        done = _open_work_dir(work, fingerprint, batches)
        for b, texts in done.items():
            for row, text in zip(batches[b], texts, strict=True):
                outputs[row] = text
        if done:
            log.info("%s: %d of %d batches already generated", work, len(done), len(batches))
    pending: dict[int, dict[str, list]] = {}
    bar = tqdm(total=len(encoded), disable=not progress, desc="generate")
    bar.update(sum(len(batches[b]) for b in done))
    for b, rows in enumerate(batches):
        if b in done:
            continue
        batch = collate([encoded[i] for i in rows], tok.pad_token_id, padding_side="left").to(
            loaded.device
        )
        cache = None
        if chunked_prefill:
            with decode_attention(loaded.device):
                cache = length_sorted_prefill(loaded.model, batch.input_ids, batch.attention_mask)
        # Seeded after the prefill: the batch's samples depend on (seed, b) whichever prefill ran.
        torch.manual_seed(seed + b)
        kwargs: dict[str, Any] = dict(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            max_new_tokens=max_new_tokens,
            pad_token_id=tok.pad_token_id,
            eos_token_id=eos or None,
        )
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if stop_strings:
            kwargs.update(stop_strings=list(stop_strings), tokenizer=tok)
        graph = None
        if graphed_decode:
            static = static_cache_from(
                loaded.model, cache, batch.input_ids.shape[0],
                batch.input_ids.shape[1] + max_new_tokens,
            )  # fmt: skip
            if static is not None:
                cache = static
                graph = GraphedDecode(loaded.model, static, capture=device_type == "cuda")
                kwargs["disable_compile"] = True  # the graph replaces generate's auto-compile
        if cache is not None:
            kwargs[cache_keyword(loaded.model)] = cache
        if decode == "compiled":
            kwargs.update(_static_cache_kwargs(loaded, batch.input_ids.shape[1] + max_new_tokens))
            if compile_config is not None:
                kwargs["compile_config"] = compile_config
        ctx = steer(rows, batch.attention_mask) if steer else contextlib.nullcontext()
        if graph is not None:
            ctx = graph
        with ctx, decode_attention(loaded.device):
            out = loaded.model.generate(**kwargs, **generate_kwargs)
        # the batch's KV cache (and graph) is freed before the next batch is prefilled
        del cache, kwargs, graph
        new = out[:, batch.input_ids.shape[1] :]
        for row, seq in zip(rows, new, strict=True):
            text = tok.decode(seq, skip_special_tokens=True)
            outputs[row] = truncate_at_stop(text, stop_strings).strip()
        bar.update(len(rows))
        if work is not None:
            pending[b] = {"rows": list(rows), "texts": [outputs[row] for row in rows]}
            if len(pending) >= save_every or b == len(batches) - 1:
                _write_shard(work, pending)
                pending = {}
    if work is not None and pending:  # the last batch was reused, an earlier one was not
        _write_shard(work, pending)
    bar.close()
    return outputs


def static_cache_from(model: Any, cache: Any, rows: int, length: int) -> Any | None:
    """Return a StaticCache of `length` positions for `rows` rows, holding `cache`'s states.

    `cache`: the merged DynamicCache of a length-sorted prefill (its positions are copied to the
    front of the static one, layer by layer, each dynamic layer freed once copied, so the peak is
    the cache plus one layer), or None (`generate` then prefills the static cache itself).
    None where the model's static cache is not one full-attention StaticLayer per dynamic layer.
    """
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer

    base = unwrap(model)
    static = StaticCache(config=base.config, max_cache_len=length)
    if not all(type(layer) is StaticLayer for layer in static.layers):
        return None
    if cache is None:
        return static
    if len(cache.layers) != len(static.layers) or any(
        dyn.keys is None or dyn.keys.shape[0] != rows or dyn.keys.shape[2] >= length
        for dyn in cache.layers
    ):
        return None
    for dyn, layer in zip(cache.layers, static.layers, strict=True):
        keys, values = dyn.keys, dyn.values
        layer.lazy_initialization(keys, values)  # zeros of [rows, KV heads, length, head size]
        layer.keys[:, :, : keys.shape[2]].copy_(keys)
        layer.values[:, :, : values.shape[2]].copy_(values)
        layer.cumulative_length.fill_(keys.shape[2])
        dyn.keys = dyn.values = None
        del keys, values
    return static


class GraphedDecode:
    """Replay a batch's decode step as one CUDA graph over its static KV cache.

    Entered around `model.generate` (with `disable_compile=True` and `static` as its cache), it
    puts itself in place of the transformers model's `forward`. A call with one new token per
    row on `static` is a decode step: the first runs eagerly (warm-up), the second is captured
    into a graph with its tensor inputs (input ids, positions, the 4-D mask `generate` builds
    for a static cache) copied into fixed buffers, and every later step copies its inputs into
    those buffers and replays the graph. The cache's keys, values and length counter live on the
    device and are updated in place by the graph, so the replayed steps write where eager ones
    would. Any other call (the prefill, another cache, inputs of another shape or settings) runs
    the model's own forward. capture=False runs the buffered step eagerly instead of replaying
    (the CPU tests check that path's tokens against the dynamic cache's).
    """

    WARMUP_STEPS = 1

    def __init__(self, model: Any, static: Any, *, capture: bool = True) -> None:
        self.base = unwrap(model)
        self.static = static
        self.capture = capture
        self.keyword = cache_keyword(model)
        self.graph: Any = None
        self.inputs: dict[str, torch.Tensor] = {}
        self.settings: dict[str, Any] = {}
        self.output: Any = None
        self.steps = 0
        self.replays = 0
        self._forward: Any = None
        self._own: Any = None

    def __enter__(self) -> GraphedDecode:
        self._own = self.base.__dict__.get("forward")  # e.g. a hook wrapper set on the instance
        self._forward = forward = self.base.forward

        # functools.wraps keeps forward's signature visible (inspect follows __wrapped__):
        # `generate` reads it to decide which inputs (position ids among them) it passes.
        @functools.wraps(forward)
        def graphed_forward(*args: Any, **kwargs: Any) -> Any:
            return self(*args, **kwargs)

        self.base.forward = graphed_forward
        return self

    def __exit__(self, *exc: object) -> None:
        if self._own is None:
            del self.base.forward  # the class's forward again
        else:
            self.base.forward = self._own
        self.graph = self.output = None
        self.inputs = {}

    def _split(self, kwargs: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
        others = {k: v for k, v in kwargs.items() if k not in tensors and k != self.keyword}
        return tensors, others

    def _is_decode_step(self, args: tuple, kwargs: dict[str, Any]) -> bool:
        ids = kwargs.get("input_ids")
        return (
            not args
            and kwargs.get(self.keyword) is self.static
            and isinstance(ids, torch.Tensor)
            and ids.dim() == 2
            and ids.shape[1] == 1
            and kwargs.get("inputs_embeds") is None
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self._is_decode_step(args, kwargs):
            return self._forward(*args, **kwargs)
        tensors, others = self._split(kwargs)
        self.steps += 1
        if not self.inputs:
            if self.steps <= self.WARMUP_STEPS:
                return self._forward(*args, **kwargs)
            self._record(tensors, others)
        elif not self._matches(tensors, others):
            return self._forward(*args, **kwargs)  # not the captured step: run it as is
        for name, t in tensors.items():
            self.inputs[name].copy_(t)
        if self.graph is not None:
            self.graph.replay()
            self.replays += 1
            return self.output
        return self._forward(**self.inputs, **others, **{self.keyword: self.static})

    def _matches(self, tensors: dict[str, torch.Tensor], others: dict[str, Any]) -> bool:
        """Return whether a step's inputs have the recorded step's names, shapes and settings."""
        if others != self.settings or tensors.keys() != self.inputs.keys():
            return False
        return all(
            t.shape == self.inputs[n].shape and t.dtype == self.inputs[n].dtype
            for n, t in tensors.items()
        )

    def _record(self, tensors: dict[str, torch.Tensor], others: dict[str, Any]) -> None:
        """Allocate the input buffers and, with capture, record the step into a CUDA graph."""
        self.inputs = {name: t.clone() for name, t in tensors.items()}
        self.settings = dict(others)
        if not self.capture:
            return
        # capture records kernels without running them: the cache is not advanced here
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                output = self._forward(**self.inputs, **others, **{self.keyword: self.static})
        except RuntimeError as e:  # an op that cannot be captured: decode eagerly instead
            log.warning("decode step not captured as a CUDA graph (%s); running it eagerly", e)
            torch.cuda.synchronize()
            return
        self.graph, self.output = graph, output


def _static_cache_kwargs(loaded: LoadedModel, length: int) -> dict[str, Any]:
    """Return generate's keyword for a static KV cache of `length` positions per row.

    Built per batch rather than by cache_implementation="static": generate then keeps the
    longest length any earlier call used, so after the first (longest-prompt) batch every
    batch would read a cache as long as the longest prompt at every step.
    """
    from transformers import StaticCache

    cache = StaticCache(config=loaded.model.config, max_cache_len=length)
    return {cache_keyword(loaded.model): cache}


def _fingerprint(loaded: LoadedModel, input_ids: list[list[int]], settings: dict) -> str:
    """Return the digest of what a run's completions depend on (see generate)."""
    config = getattr(loaded.model, "config", None)
    try:
        dtype = str(next(loaded.model.parameters()).dtype)
    except (StopIteration, AttributeError, TypeError):
        dtype = None
    prompts = hashlib.sha256(json.dumps(input_ids).encode()).hexdigest()
    doc = {
        "model": loaded.name,
        "path": str(getattr(config, "_name_or_path", "")),
        "dtype": dtype,
        "device": torch.device(loaded.device).type,
        "prompts_sha256": prompts,
        "n_prompts": len(input_ids),
        **settings,
    }
    text = json.dumps(doc, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()


def _open_work_dir(work: Path, fingerprint: str, batches: list[list[int]]) -> dict[int, list[str]]:
    """Prepare a work dir; return {batch index: completions} of the shards it already holds.

    A work dir of another run (other fingerprint) is cleared; a shard that cannot be read or
    does not fit this run's batches is ignored (its batches are generated again).
    """
    remove_trash(work)
    meta = work / WORK_META
    try:
        same = json.loads(meta.read_text(encoding="utf-8")).get("fingerprint") == fingerprint
    except (OSError, ValueError, AttributeError):
        same = False
    if not same:
        if work.exists():
            log.warning("%s: generated with other inputs or settings; starting fresh", work)
            discard_work_dir(work)
        work.mkdir(parents=True)
        with atomic_path(meta) as tmp:
            tmp.write_text(json.dumps({"fingerprint": fingerprint, "n_batches": len(batches)}))
        return {}
    done: dict[int, list[str]] = {}
    for path in sorted(work.glob(f"{SHARD_PREFIX}*.json")):
        try:
            shard = json.loads(path.read_text(encoding="utf-8"))
            for key, entry in shard.items():
                b = int(key)
                texts = entry["texts"]
                if entry["rows"] != batches[b] or len(texts) != len(batches[b]):
                    raise ValueError(f"batch {b} does not match")
                if not all(isinstance(t, str) for t in texts):
                    raise ValueError(f"batch {b}: texts are not strings")
                done[b] = texts
        except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
            log.warning("%s: ignored (%s); its batches are generated again", path, e)
    return done


TRASH_SUFFIX = ".trash"


def discard_work_dir(work_dir: str | os.PathLike[str]) -> None:
    """Remove a work dir: renamed aside first, so a kill never leaves a half-deleted one.

    (A half-deleted work dir without its meta file would make the next run start afresh.)
    """
    work = Path(work_dir)
    if not work.exists():
        return
    trash = tempfile.mkdtemp(prefix=f".{work.name}.", suffix=TRASH_SUFFIX, dir=work.parent)
    os.replace(work, trash)
    shutil.rmtree(trash, ignore_errors=True)


def remove_trash(work_dir: str | os.PathLike[str]) -> None:
    """Remove what a killed discard_work_dir(work_dir) left beside it."""
    work = Path(work_dir)
    if work.parent.is_dir():
        for p in work.parent.glob(f".{work.name}.*{TRASH_SUFFIX}"):
            shutil.rmtree(p, ignore_errors=True)


def _write_shard(work: Path, pending: dict[int, dict[str, list]]) -> None:
    """Write finished batches to a new shard file (atomically: whole or absent)."""
    first = min(pending)
    doc = {str(b): entry for b, entry in sorted(pending.items())}
    path = work / f"{SHARD_PREFIX}{first:06d}.json"
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")


def saved_batches(work_dir: str | os.PathLike[str]) -> dict[int, int]:
    """Return {batch index: rows} of the shards in a work dir (for progress reports and tests)."""
    out: dict[int, int] = {}
    for path in sorted(Path(work_dir).glob(f"{SHARD_PREFIX}*.json")):
        for key, entry in json.loads(path.read_text(encoding="utf-8")).items():
            out[int(key)] = len(entry["texts"])
    return out


def repeat_for_samples(
    conversations: Sequence[Sequence[Message]], n_samples: int
) -> list[Sequence[Message]]:
    """Return each conversation repeated n_samples times (sample j of item i at i*n + j)."""
    return [c for c in conversations for _ in range(n_samples)]
