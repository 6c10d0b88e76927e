"""A decoding step of a Llama-family model as a few kernel calls per block, with a KV cache that grows in place.

One token per sequence through a 135M-parameter model reads 541 MB of weights: about 20 ms at a laptop's memory
rate. Run as transformers' modules, the same step also makes some twenty Python-level operations per block —
module calls, the attention's cache concatenation and mask, the residual adds — which cost about as much again.
``BlockStep`` runs each block as its kernel calls alone, on buffers it keeps between steps, the whole step one
compiled program (``kernels._cpu.run_program``) that releases the GIL once — around each call, a server's HTTP
thread would take it and the step wait for it back:

    RMSNorm → q, k, v (a LoRA layer's whole output in one call) → [Qwen3's q/k norms] → RoPE → attention over
    the cache, appending the step's key and value to it → o → residual → RMSNorm → gate, up → silu·up → down →
    residual

and then the final norm and the output head. Each projection takes the few-row kernel where its layer's
prepared plan allows (``layers.execution.Plan.whole_call``: plain Linear bases, any routing of unweighted
adapters, or none), else the module's own forward (4-bit bases, DoRA, weighted mixes). The calls' arguments are
bound once per batch and checked before each step (``_Program.valid``), except where the caller vouches that
nothing changed since the step's own previous step (``unchanged``: the serving engine, between two steps of an
unchanged batch). The KV cache stays transformers' ``DynamicCache``, whose layers' keys and values become views
into buffers with room to grow: a step writes one column instead of copying the whole cache
(``DynamicLayer.update`` concatenates), and the engine's row surgery (``inference.kv``) and any forward of the
model keep working on it.

It takes the models whose blocks are exactly transformers' Llama, Mistral, Qwen2 or Qwen3 ones (no sliding
window in reach, no hooks, norms and SiLU MLPs of the family's classes), in float32 or bf16 on a CPU with the
kernels built; ``step`` returns None for anything else and the caller runs the model's forward
(``LORATUNE_BLOCK_STEP=0`` makes it always do so). The arithmetic is
the modules' (the same kernels ``inference.lean`` patches in), except the attention, which sums in another order
than PyTorch's: logits agree to float32 rounding.
"""

from __future__ import annotations

import array
import importlib
import operator
import os
import struct
import weakref

import torch
from torch import nn
from transformers.cache_utils import DynamicLayer

from loratune.adapters.mixed_batch import adapter_names_hooks
from loratune.inference import kv
from loratune.kernels import rows as rows_kernel
from loratune.kernels.loader import compiled as _cpu
from loratune.kernels.loader import kernel_available
from loratune.layers import execution
from loratune.layers.lora import LoraLayer
from loratune.models.devices import model_device
from loratune.models.structure import has_silu_activation

_FAMILIES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
_VERSION = operator.attrgetter("_version")
_MAX_HEAD_DIM = 1024
_GROWTH = 128  # most columns of room a cache buffer gets beyond what it holds (plus an eighth of it)
_steps: weakref.WeakKeyDictionary[nn.Module, BlockStep | None] = weakref.WeakKeyDictionary()


def decode_logits(
    model: nn.Module,
    input_ids,
    attention_mask,
    position_ids,
    cache,
    *,
    unchanged: bool = False,
    room: int | None = None,
) -> tuple[torch.Tensor, object]:
    """(The next-token logits, rows × vocab; the KV cache) of one decoding step — ``input_ids`` (rows × 1),
    ``attention_mask`` (rows × columns, the new token's column included), ``position_ids`` (rows × 1) — by
    ``BlockStep`` where it takes the model (``cache`` updated in place), else by the model's forward.
    ``unchanged``: the caller vouches that since its previous call for this cache nothing touched the model or
    the cache; ``room``: the most columns any row may append after this one (see ``BlockStep.step``)."""
    stepper = _steps.get(model, False)
    if stepper is False:
        stepper = _steps[model] = BlockStep.build(model)
    enabled = os.environ.get("LORATUNE_BLOCK_STEP", "1") != "0"
    stepped = stepper and enabled
    logits = (
        stepper.step(input_ids, attention_mask, position_ids, cache, unchanged=unchanged, room=room)
        if stepped
        else None
    )
    if logits is not None:
        return logits, cache
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        cache=cache,
        use_cache=True,
    )
    return out.logits[:, -1, :], out.cache


class _Buffers:
    """A step's tensors for ``rows`` rows: its input and intermediates (rows × width), the RoPE angles, the norms'
    scratch; kept while the batch keeps its size, so the kernel calls' addresses stay the same."""

    def __init__(self, rows: int, hidden: int, heads: tuple[int, int, int], inner: int, dtype):
        q_heads, kv_heads, head_dim = heads

        def new(width: int) -> torch.Tensor:
            return torch.empty(rows, width, dtype=dtype)

        self.hidden, self.normed, self.o, self.down = new(hidden), new(hidden), new(hidden), new(hidden)
        self.q, self.q_normed, self.q_rotated, self.attended = (new(q_heads * head_dim) for _ in range(4))
        self.k, self.k_normed, self.k_rotated, self.v = (new(kv_heads * head_dim) for _ in range(4))
        self.gate, self.up, self.act = new(inner), new(inner), new(inner)
        self.cos, self.sin = new(head_dim), new(head_dim)
        self.rstd = torch.empty(rows * q_heads, dtype=torch.float32)


class _Program:
    """One step's kernel calls with their arguments bound (addresses of the buffers, weights and factors) as rows
    of operations for ``kernels._cpu.run_program``, and what they were bound to: ``valid`` tells whether they still
    compute what the modules would (the same modules, weights, adapters' plans and routing, no hooks).

    ``segments``: the step in order, each a run of operation rows (``(first, last)``) or a module's own forward
    (``(module, x, out)``, where no kernel takes it); ``attention``: per block, the row of its attention, whose
    cache addresses, mask and length change from step to step."""

    def __init__(self, key: tuple, buffers: _Buffers):
        self.key, self.buffers = key, buffers
        self.ops = array.array("q")
        self.segments: list[tuple] = []
        self.attention: list[int] = []
        self.checks: list = []  # callables, each True while what it checks is as bound
        self.plans: list = []  # the LoRA layers' plans it holds the factors of (kept alive with it)
        self.factors: list[torch.Tensor] = []  # their factors, whose versions change when they are trained
        self.stamp: int | None = None
        self.backends: list[str] = []  # the LoRA backends its calls stand for (recorded in an open trace())

    def valid(self) -> bool:
        return self.stamp == sum(map(_VERSION, self.factors)) and all(check() for check in self.checks)

    def add(self, entry: tuple) -> None:
        """Append ``(name, arguments)``: a kernel's call (``_OPERATIONS``'s name, the arguments its Python function
        takes) or a module's forward (``"module"``, ``_into``'s arguments)."""
        name, arguments = entry
        if name == "module":
            self.segments.append(arguments)
            return
        code, float_at = _OPERATIONS[name]
        values = [a for i, a in enumerate(arguments[:-1]) if i != float_at]  # (the last one: the thread count)
        bits = 0 if float_at is None else struct.unpack("<i", struct.pack("<f", arguments[float_at]))[0]
        row = [code, bits, *values]
        self.ops.extend(row + [0] * (_cpu.PROGRAM_WIDTH - len(row)))
        rows = len(self.ops) // _cpu.PROGRAM_WIDTH
        if self.segments and len(self.segments[-1]) == 2:
            self.segments[-1] = (self.segments[-1][0], rows)
        else:
            self.segments.append((rows - 1, rows))

    def run(self, threads: int) -> None:
        address = self.ops.buffer_info()[0]
        for segment in self.segments:
            if len(segment) == 2:
                _cpu.run_program(address, segment[0], segment[1], threads)
            else:
                _into(*segment)


# kernel -> (its operation code in run_program, the index of its float argument or None); add_rows: out += x
# (out, x, n, is_bf16, threads), the residual, which exists only there
_OPERATIONS = {
    "linear_rows": (1, None),
    "lora_rows": (2, None),
    "rms_norm": (3, 6),
    "rope": (4, None),
    "decode_attention": (5, 13),
    "silu_mul": (6, None),
    "add_rows": (7, None),
}
# the slots of a decode_attention row that change from step to step: (operation, float bits, then its arguments)
_KEYS, _VALUES, _MASK, _COLS, _CAPACITY = (2 + argument for argument in (2, 3, 6, 11, 12))


class BlockStep:
    """A Llama-family model's decoding step as kernel calls (see the module docstring); ``build`` says whether
    the model's structure allows it, ``step`` runs one (or returns None where this step cannot)."""

    def __init__(self, model: nn.Module, blocks: list[nn.Module], norm_class: type, heads: tuple[int, int, int]):
        self._model = weakref.ref(model)  # (kept per model in a weak dictionary: no reference back to it)
        self.blocks = blocks
        self.norm_class = norm_class
        self.heads = heads
        self.q_heads, self.kv_heads, self.head_dim = heads
        self._program: _Program | None = None
        self._last: tuple | None = None  # (a weak reference to the cache, rows, columns) of the last step it ran

    @classmethod
    def build(cls, model: nn.Module) -> BlockStep | None:
        """A ``BlockStep`` for ``model`` when its blocks are exactly those of a Llama, Mistral, Qwen2 or Qwen3 model
        of transformers; None otherwise."""
        config = getattr(model, "config", None)
        prefix = _FAMILIES.get(getattr(config, "model_type", None))
        inner = getattr(model, "model", None)
        if prefix is None or inner is None or not isinstance(getattr(inner, "layers", None), nn.ModuleList):
            return None
        try:
            modeling = importlib.import_module(f"transformers.models.{config.model_type}.modeling_{config.model_type}")
        except ImportError:
            return None
        kinds = {name: getattr(modeling, f"{prefix}{name}", None) for name in ("DecoderLayer", "RMSNorm", "MLP")}
        attention = getattr(modeling, f"{prefix}Attention", None)
        blocks = list(inner.layers)
        if (
            None in kinds.values()
            or attention is None
            or not blocks
            or len(blocks) != config.num_hidden_layers
            or type(inner.norm) is not kinds["RMSNorm"]
            or (getattr(config, "sliding_window", None) is not None and config.model_type == "mistral")
        ):
            return None
        for block in blocks:
            attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
            if (
                type(block) is not kinds["DecoderLayer"]
                or type(attn) is not attention
                or type(mlp) is not kinds["MLP"]
                or not has_silu_activation(mlp)
                or type(block.input_layernorm) is not kinds["RMSNorm"]
                or type(block.post_attention_layernorm) is not kinds["RMSNorm"]
                or getattr(attn, "sliding_window", None) is not None
                or hasattr(attn, "q_norm") != hasattr(blocks[0].self_attn, "q_norm")
            ):
                return None
        attn = blocks[0].self_attn
        q_heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or q_heads
        head_dim = attn.head_dim
        if q_heads % kv_heads or head_dim > _MAX_HEAD_DIM or head_dim % 2:
            return None
        return cls(model, blocks, kinds["RMSNorm"], (q_heads, kv_heads, head_dim))

    # --- one step ---------------------------------------------------------------------------------------------
    def step(
        self, input_ids, attention_mask, position_ids, cache, *, unchanged: bool = False, room: int | None = None
    ) -> torch.Tensor | None:
        """The next-token logits (rows × vocab) for one new token per row, the cache updated; None (nothing done)
        where this step cannot run here: no kernels, another device or dtype, hooks, a cache of another kind or
        length, autograd on.

        ``unchanged``: the caller vouches that nothing but this object's own previous step touched the model
        (modules, hooks, weights, adapters, their routing) or ``cache`` since that step — as the serving engine
        can between two steps of the same batch. Where that previous step was this one's predecessor (the same
        cache, rows, one column fewer), the checks of the model's structure and of the bound arguments are
        skipped: they cost a tenth of a step of a small model. ``room``: the most columns any row may still
        append after this step (its tokens left to generate), so the cache's buffers grow no larger than that.
        """
        self._last, last = None, self._last
        model = self._model()
        if model is None:
            return None
        inner = model.model
        rows = input_ids.shape[0]
        dtype = inner.norm.weight.dtype
        cols = attention_mask.shape[-1]
        layers = getattr(cache, "layers", None)
        vouched = unchanged and last is not None and last[0]() is cache and last[1:] == (rows, cols - 1)
        if (
            torch.is_grad_enabled()
            or not kernel_available()
            or not rows_kernel.active()
            or dtype not in _DTYPES
            or model_device(model).type != "cpu"
            or input_ids.shape != (rows, 1)
            or attention_mask.shape != (rows, cols)
            or layers is None
            or len(layers) != len(self.blocks)
        ):
            return None
        if not vouched and (
            set(model._forward_pre_hooks) | set(model._forward_hooks) > adapter_names_hooks(model)
            or "forward" in model.__dict__
            or any(_replaced(m) for m in (inner, *self.blocks))
            or any(_hooked(m) for block in self.blocks for m in _bypassed(block))
            or not all(self._cached_fits(layer, rows, cols, dtype) for layer in layers)
        ):
            return None
        embedded = inner.embed_tokens(input_ids)  # (rows, 1, hidden): any embedding module, LoRA's included
        if embedded.dtype != dtype:
            return None
        program = self._program_for(model, rows, embedded.shape[-1], dtype, vouched)
        b, ops = program.buffers, program.ops
        b.hidden.copy_(embedded.view(rows, -1))
        cos, sin = inner.rotary_emb(embedded, position_ids)
        b.cos.copy_(cos.view(rows, -1))
        b.sin.copy_(sin.view(rows, -1))
        mask = attention_mask.to(torch.int64).contiguous()
        grown = [self._grown(layer, rows, cols, room) for layer in layers]
        for at, (keys, values) in zip(program.attention, grown):
            ops[at + _KEYS], ops[at + _VALUES], ops[at + _CAPACITY] = keys.data_ptr(), values.data_ptr(), keys.shape[2]
            ops[at + _MASK], ops[at + _COLS] = mask.data_ptr(), cols
        program.run(program.key[-1])
        for layer, (keys, values) in zip(layers, grown):
            layer.keys, layer.values = keys[:, :, :cols], values[:, :, :cols]
        logits, backend = self._head(model, b.normed, rows, dtype)
        if execution.tracing():
            for traced in [*program.backends, *([backend] if backend else [])]:
                execution.record(traced)
        self._last = (weakref.ref(cache), rows, cols)
        return logits

    def _head(self, model: nn.Module, x: torch.Tensor, rows: int, dtype) -> tuple[torch.Tensor, str | None]:
        """(The output head's logits for ``x``, the LoRA backend its kernel call stands for or None): the few-row
        kernel's where it takes the head (a Linear, or a LoRA layer around one, without hooks), else the head's
        own forward, whose output is the logits as they are (modules_to_save's copies, a hooked head)."""
        head = model.get_output_embeddings()
        width = getattr(head, "out_features", None)
        if width is not None:
            logits = torch.empty(rows, width, dtype=dtype)
            name, arguments, _, backend, _ = self._bind(head, model, x, logits)
            if name != "module":
                getattr(_cpu, name)(*arguments)
                return logits, backend
        return head(x), None

    # --- the program ------------------------------------------------------------------------------------------
    def _program_for(self, model: nn.Module, rows: int, hidden: int, dtype, vouched: bool) -> _Program:
        """The step's kernel calls for ``rows`` rows: the last ones while still valid (``vouched``: known to be),
        else bound anew."""
        key = (rows, hidden, dtype, torch.get_num_threads())
        program = self._program
        if program is not None and program.key == key and (vouched or program.valid()):
            return program
        buffers = program.buffers if program is not None and program.key[:3] == key[:3] else None
        program = self._program = _Program(key, buffers or _Buffers(rows, hidden, self.heads, self._inner(), dtype))
        b, flag, threads = program.buffers, _DTYPES[dtype], key[-1]

        def project(module, parent, x, out) -> None:
            name, arguments, check, backend, plan = self._bind(module, parent, x, out)
            program.checks.append(check)
            if plan is not None:
                program.factors.extend(plan.factors)
                program.plans.append(plan)
            if backend is not None and name != "module":  # (a module's own forward records itself)
                program.backends.append(backend)
            program.add((name, arguments))

        def norm(module, x, out, count, width) -> None:
            weight, parameters = module.weight, module._parameters
            program.checks.append(lambda: parameters.get("weight") is weight and not _hooked(module))
            if type(module) is not self.norm_class or _hooked(module):
                program.add(("module", (module, x.view(count, width), out.view(count, width))))
                return
            arguments = (out.data_ptr(), b.rstd.data_ptr(), x.data_ptr(), weight.data_ptr(), count, width)
            program.add(("rms_norm", (*arguments, float(module.variance_epsilon), flag, threads)))

        def tensors(*values) -> tuple:
            return tuple(v.data_ptr() if isinstance(v, torch.Tensor) else v for v in values)

        for block in self.blocks:
            attn, mlp = block.self_attn, block.mlp
            q, k = b.q, b.k
            norm(block.input_layernorm, b.hidden, b.normed, rows, hidden)
            project(attn.q_proj, attn, b.normed, b.q)
            project(attn.k_proj, attn, b.normed, b.k)
            project(attn.v_proj, attn, b.normed, b.v)
            if hasattr(attn, "q_norm"):  # Qwen3: each head's query and key normed before RoPE
                norm(attn.q_norm, b.q, b.q_normed, rows * self.q_heads, self.head_dim)
                norm(attn.k_norm, b.k, b.k_normed, rows * self.kv_heads, self.head_dim)
                q, k = b.q_normed, b.k_normed
            rope = tensors(b.q_rotated, q, self.q_heads, b.k_rotated, k, self.kv_heads, b.cos, b.sin, rows)
            program.add(("rope", (*rope, self.head_dim, flag, threads)))
            program.attention.append(len(program.ops))  # its cache, mask and length: set at each step
            attention = tensors(b.attended, b.q_rotated, 0, 0, b.k_rotated, b.v, 0, rows * self.q_heads)
            attention += (self.q_heads, self.kv_heads, self.head_dim, 0, 0, float(attn.scaling), flag, threads)
            program.add(("decode_attention", attention))
            project(attn.o_proj, attn, b.attended, b.o)
            program.add(("add_rows", (*tensors(b.hidden, b.o), b.hidden.numel(), flag, threads)))
            norm(block.post_attention_layernorm, b.hidden, b.normed, rows, hidden)
            project(mlp.gate_proj, mlp, b.normed, b.gate)
            project(mlp.up_proj, mlp, b.normed, b.up)
            program.add(("silu_mul", (*tensors(b.act, b.gate, b.up), b.act.numel(), flag, threads)))
            project(mlp.down_proj, mlp, b.act, b.down)
            program.add(("add_rows", (*tensors(b.hidden, b.down), b.hidden.numel(), flag, threads)))
        norm(model.model.norm, b.hidden, b.normed, rows, hidden)
        program.stamp = sum(map(_VERSION, program.factors))
        return program

    def _inner(self) -> int:
        return self.blocks[0].mlp.down_proj.in_features

    @staticmethod
    def _bind(module: nn.Module, parent: nn.Module, x: torch.Tensor, out: torch.Tensor) -> tuple:
        """(name, arguments, check, backend, plan) computing ``module(x)`` for x (rows × in) into ``out``: a LoRA
        layer's prepared plan — its whole output (``"lora_rows"``), or its base alone where no adapter acts —
        or a plain Linear in the few-row kernel where it takes them (``"linear_rows"``), else the module's own
        forward (``"module"``: ``_into``'s arguments). ``check()`` is True while the arguments still hold (the
        same module in ``parent``, weights and plan, no hooks); ``backend``: the LoRA backend it stands for (what
        ``execution.trace`` records), or None; ``plan``: the LoRA layer's plan it was bound from, or None."""
        name = next((n for n, m in parent._modules.items() if m is module), None)

        def same_module() -> bool:
            return parent._modules.get(name) is module and not _hooked(module)

        fallback = ("module", (module, x, out), same_module, None, None)
        if _hooked(module):
            return fallback
        if type(module) is nn.Linear:
            weights, plan, backend = (module.weight, module.bias), None, None
        elif isinstance(module, LoraLayer) and getattr(module.state.routing, "n_rows", x.shape[0]) == x.shape[0]:
            backend, plan = execution.select(module, x)
            weights = module.plain_weights()
        else:
            return fallback
        if weights is None or not rows_kernel.plain(weights[0]):
            return fallback
        weight, bias = weights
        if plan is not None and backend is execution.KERNEL:
            call = plan.whole_call(x, out, plan.routing_rows(x))
            bound = None if call is None else ("lora_rows", call[1])
        elif plan is None or backend is execution.BASE:
            bound = None
            if rows_kernel.takes(x.shape[0], x.dtype) and rows_kernel.weights_fit(weight, bias, x.dtype):
                arguments = (out.data_ptr(), x.data_ptr(), weight.data_ptr(), 0 if bias is None else bias.data_ptr())
                arguments += (x.shape[0], weight.shape[1], weight.shape[0], _DTYPES[x.dtype], torch.get_num_threads())
                bound = ("linear_rows", arguments)
        else:
            bound = None
        if bound is None:
            return fallback
        # What the arguments hold, checked before each step by dictionary lookups (no module attribute access,
        # which costs a microsecond each, hundreds of times per step): the module in its place, its weights and
        # their storage; for a LoRA layer also its state (adapters, routing) and mode, which with the factors'
        # versions (``_Program.valid``) make its plan the one ``plan_for`` would give.
        parameters = (module if plan is None else module._modules["base_layer"])._parameters
        pointer, siblings = weight.data_ptr(), parent._modules
        state, training = (None, None) if plan is None else (module.state, module.training)

        def same_weights() -> bool:
            return (
                siblings.get(name) is module
                and not (module._forward_hooks or module._forward_pre_hooks)
                and parameters.get("weight") is weight
                and parameters.get("bias") is bias
                and weight.data_ptr() == pointer
                and (plan is None or (module.state is state and module.training is training and module.fast_paths))
            )

        return (*bound, same_weights, None if backend is None else backend.name, plan)

    # --- the KV cache -----------------------------------------------------------------------------------------
    def _cached_fits(self, layer, rows: int, cols: int, dtype) -> bool:
        """Whether cache ``layer`` holds ``cols - 1`` columns of ``rows`` rows in ``dtype``, transformers' growing
        kind (which the step can extend)."""
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        shape = (rows, self.kv_heads, cols - 1, self.head_dim)
        return (
            type(layer) is DynamicLayer
            and keys is not None
            and values is not None
            and keys.shape == shape
            and values.shape == shape
            and keys.dtype == dtype
            and values.dtype == dtype
        )

    def _grown(self, layer, rows: int, cols: int, room: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The buffers (rows × kv heads × capacity × head dim) holding ``layer``'s cached columns, with room for
        column ``cols - 1``: the ones it already is a view of, else new ones it is copied into, with room for
        ``room`` more columns (None: unknown; a growth step, an eighth of the columns and ``_GROWTH``, bounds it)."""
        kept = kv.held(layer)
        keys, values = layer.keys, layer.values
        if kept is not None:
            kb, vb = kept
            if (
                cols <= kb.shape[2]
                and keys.data_ptr() == kb.data_ptr()
                and values.data_ptr() == vb.data_ptr()
                and keys.stride() == kb.stride()
                and values.stride() == vb.stride()
                and kb.shape[0] == rows
            ):
                return kb, vb
        growth = _GROWTH + cols // 8
        capacity = cols + (growth if room is None else max(0, min(room, growth)))
        kb = keys.new_empty(rows, self.kv_heads, capacity, self.head_dim)
        vb = values.new_empty(rows, self.kv_heads, capacity, self.head_dim)
        kb[:, :, : cols - 1].copy_(keys)
        vb[:, :, : cols - 1].copy_(values)
        kv.hold(layer, kb, vb)
        return kb, vb


def _into(module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> None:
    """``module(x)`` (its own forward, hooks included) written into ``out``."""
    out.copy_(module(x).view(out.shape))


def _hooked(module: nn.Module) -> bool:
    """Whether hooks run around ``module``'s forward (the step would skip them)."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _replaced(module: nn.Module) -> bool:
    """Whether ``module`` has hooks or a forward of its own instance (someone changed what it computes)."""
    return _hooked(module) or "forward" in module.__dict__


def _bypassed(block: nn.Module) -> tuple[nn.Module, ...]:
    """The modules of a block whose forward the step does not call (it runs their arithmetic itself). Their own
    forwards may be replaced by loratune's kernels for the same arithmetic (``inference.lean``, ``train.fused_ops``),
    so only hooks count."""
    attn, mlp = block.self_attn, block.mlp
    return (block.input_layernorm, block.post_attention_layernorm, attn, mlp)
