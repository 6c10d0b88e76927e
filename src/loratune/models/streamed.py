"""Building a model from its safetensors checkpoint one tensor at a time, so that the whole model in full
precision never exists in memory: in 4 bits (QLoRA), or with each transformer block sharded across the
processes as soon as it is complete (FSDP2).

The model is built with its parameters on the meta device (no memory); the Linear layers to quantize become
empty ``Linear4bit`` modules; then the safetensors files are read one tensor at a time (see
``quant.safetensors_stream``): each such Linear weight is quantized as it arrives and its full-precision copy
dropped, every other tensor is cast to the model dtype and put in place. Peak memory is about the 4-bit model
plus the unquantized modules plus the largest single Linear weight and bitsandbytes' working memory while it
quantizes it. With ``on_block``, each transformer block is handed over as soon as its last weight is in place
(to be sharded, which frees the other processes' shares): a process then holds its share of the blocks read so
far, the weights outside the blocks, and the block being read.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from loratune.errors import LoratuneError
from loratune.layers.experts import expert_weight_names, run_grouped
from loratune.memory import release_freed_memory
from loratune.models.expert_checkpoint import ExpertPieces, Piece
from loratune.models.quantized import (
    DEFAULT_UNQUANTIZED,
    expert_blocks_to_quantize,
    modules_to_quantize,
    modules_to_quantize_in,
)
from loratune.models.structure import transformer_blocks
from loratune.quant import Linear4bit, QuantSpec, checkpoint_files, iter_tensors, read_header
from loratune.quant.experts4bit import Experts4bit


@contextlib.contextmanager
def _parameters_on_meta():
    """Inside the block, new parameters are created on the meta device (no memory); buffers stay real, since
    modules compute some in ``__init__`` (rotary frequencies) and checkpoints do not carry them."""
    original = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def load_streamed(
    model_dir: str | Path,
    spec: QuantSpec | None,
    dtype: torch.dtype,
    device: str = "cpu",
    unquantized: Sequence[str] = DEFAULT_UNQUANTIZED,
    trust_remote_code: bool = False,
    on_block: Callable[[nn.Module], None] | None = None,
) -> nn.Module:
    """Build the causal LM of ``model_dir``, streaming its safetensors weights: with 4-bit Linear layers as
    ``spec`` says (None: none, unless the checkpoint is stored in 4 bits), each transformer block (the model's
    ``_no_split_modules``) given to ``on_block`` once all its weights are in place.

    Non-quantized tensors are cast to ``dtype``; everything is placed on ``device`` as it is read. Returns the
    model in eval mode. Raises ``ModelNotFoundError`` without safetensors weights, ``ConfigError`` for a tensor
    that cannot be quantized, and ``LoratuneError`` when checkpoint and model disagree (missing or unknown
    tensors, wrong shapes).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    model_dir = Path(model_dir)
    files = checkpoint_files(model_dir)
    # A checkpoint written in 4 bits (bitsandbytes format) names its quantized layers by their state tensors.
    names = [name for file in files for name in read_header(file)[1]]
    prequantized = sorted(n[: -len(_PACKED_MARK)] for n in names if n.endswith(_PACKED_MARK))
    config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code, local_files_only=True)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # we do the quantizing; transformers must not try bitsandbytes' own
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    for path in prequantized or (modules_to_quantize(model, unquantized) if spec else []):
        meta = model.get_submodule(path)
        model.set_submodule(path, Linear4bit(meta.in_features, meta.out_features, meta.bias is not None, spec, device))
    quantized = {path + ".weight": model.get_submodule(path) for path in modules_to_quantize_in(model)}
    for path in expert_blocks_to_quantize(model, unquantized) if spec and not prequantized else []:
        experts = model.get_submodule(path)
        for name in expert_weight_names(experts):
            setattr(experts, name, Experts4bit.empty(tuple(getattr(experts, name).shape), spec, device))
        run_grouped(experts)
    pieces, stacks = ExpertPieces(model), _StacksInProgress(model, dtype, device)
    # packed data + state tensors of each pre-quantized layer, gathered until all of them have been read
    expected = {
        p + ".weight": {n for n in names if n == p + ".weight" or n.startswith(p + ".weight.")} for p in prequantized
    }
    pending: dict[str, dict[str, torch.Tensor]] = {}
    blocks = _BlocksInProgress(model, on_block)

    unknown, mismatched = [], []
    for file in files:
        for stored_name, tensor in iter_tensors(file):
            name, piece = pieces.locate(stored_name)
            if piece is not None:  # one expert's projection (or part of it), merged into its fused stack
                problem = stacks.place(piece, tensor.to(device), stored_name)
                if problem:
                    mismatched.append(problem)
                elif stacks.complete(piece.target):
                    release_freed_memory()
                    blocks.placed(piece.target)
                del tensor
                continue
            owner = _owner_of(name, expected)
            if owner is not None:
                pending.setdefault(owner, {})[name[len(owner) + 1 :] if name != owner else ""] = tensor.to(device)
                if len(pending[owner]) == len(expected[owner]):
                    parts = pending.pop(owner)
                    quantized.pop(owner).set_packed(parts.pop(""), parts, owner)
                    blocks.placed(owner)
                continue
            if stacks.is_4bit(name):  # a fused stack as the checkpoint stores it (gpt-oss), quantized per expert
                problem = stacks.place_stack(name, tensor.to(device))
                if problem:
                    mismatched.append(problem)
                else:
                    blocks.placed(name)
                del tensor
                continue
            if name in quantized:
                quantized.pop(name).set_weight(tensor.to(device), name)
                del tensor
                release_freed_memory()  # or heap holes left by quantizing add up to hundreds of MB
                blocks.placed(name)
                continue
            problem = _place_tensor(model, name, tensor.to(device), dtype)
            if problem == "unknown":
                unknown.append(name)
            elif problem:
                mismatched.append(problem)
            else:
                blocks.placed(name)
            del tensor
    model.tie_weights()  # shares the output head with the embeddings when the config says so
    missing = [n for n, p in model.named_parameters(remove_duplicate=False) if p.device.type == "meta"]
    missing += list(quantized) + stacks.incomplete()
    missing += [n for n, p in model.named_parameters() if isinstance(p, Experts4bit) and not p.complete]
    missing = list(dict.fromkeys(missing))  # a partly read stack is in both lists
    problems = []
    if mismatched:
        problems.append(f"shapes differ from config.json: {', '.join(mismatched[:3])}")
    if missing:
        problems.append(f"tensors missing from the checkpoint: {', '.join(missing[:5])}")
    if unknown:
        problems.append(f"tensors the model has no place for: {', '.join(unknown[:5])}")
    if problems:
        how = " in 4 bits" if spec or prequantized else ""
        raise LoratuneError(f"cannot load {model_dir}{how}: {'; '.join(problems)}")
    generation = model_dir / "generation_config.json"
    if generation.is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(model_dir))
    model.to(device)
    model.eval()
    return model


def _place_tensor(model: nn.Module, name: str, tensor: torch.Tensor, dtype: torch.dtype) -> str | None:
    """Put checkpoint tensor ``name`` (cast to ``dtype`` if floating) in place of the model's parameter or
    buffer of that name. Returns None when done, "unknown" when the model has no such tensor, else what differs."""
    module_path, _, leaf = name.rpartition(".")
    try:
        module = model.get_submodule(module_path)
    except AttributeError:
        return "unknown"
    holder = module._parameters if leaf in module._parameters else module._buffers
    current = holder.get(leaf)
    if current is None:
        return "unknown"
    if tuple(current.shape) != tuple(tensor.shape):
        return f"{name} {tuple(tensor.shape)} vs {tuple(current.shape)}"
    value = tensor.to(dtype) if tensor.is_floating_point() else tensor
    holder[leaf] = nn.Parameter(value, requires_grad=current.requires_grad) if holder is module._parameters else value
    return None


_PACKED_MARK = ".weight.absmax"  # present for every layer bitsandbytes stored in 4 bits


def _owner_of(name: str, expected: dict[str, set[str]]) -> str | None:
    """The ``<path>.weight`` of the pre-quantized layer tensor ``name`` belongs to, or None."""
    if name in expected:
        return name
    head, sep, _ = name.partition(".weight.")
    return head + ".weight" if sep and head + ".weight" in expected else None


class _BlocksInProgress:
    """The transformer blocks of a model being streamed in, each handed to ``on_block`` when its last parameter
    arrives (a no-op without ``on_block``)."""

    def __init__(self, model: nn.Module, on_block: Callable[[nn.Module], None] | None):
        self.on_block = on_block
        self.block_of: dict[str, str] = {}  # parameter name -> block path
        self.missing: dict[str, set[str]] = {}  # block path -> parameters not read yet
        self.modules: dict[str, nn.Module] = {}
        if on_block is None:
            return
        self.modules = transformer_blocks(model)
        for path, module in self.modules.items():
            self.missing[path] = {f"{path}.{name}" for name, _ in module.named_parameters()}
            self.block_of.update(dict.fromkeys(self.missing[path], path))

    def placed(self, name: str) -> None:
        """Parameter ``name`` is in place; hand its block over if it was the last one."""
        path = self.block_of.get(name)
        if path is None or name not in self.missing[path]:
            return
        self.missing[path].discard(name)
        if not self.missing[path]:
            self.on_block(self.modules.pop(path))
            release_freed_memory()  # the whole block's weights, now freed: or the heap keeps them resident


class _StacksInProgress:
    """Fused expert stacks filled from a checkpoint's per-expert tensors (``Piece``s) as they arrive: a float
    stack row by row, a 4-bit stack one expert at a time (quantized once all its pieces are in)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, device: str):
        self.model, self.dtype, self.device = model, dtype, device
        self.filled: dict[str, int] = {}  # stack key -> pieces placed
        self.expected: dict[str, int] = {}
        self.waiting: dict[tuple[str, int], dict[int, torch.Tensor]] = {}  # a 4-bit expert's pieces so far

    def _stack(self, key: str) -> tuple[nn.Module, str, torch.Tensor]:
        path, _, leaf = key.rpartition(".")
        module = self.model.get_submodule(path)
        return module, leaf, module._parameters[leaf]

    def place(self, piece: Piece, tensor: torch.Tensor, stored_name: str) -> str | None:
        """Put ``tensor`` where ``piece`` says; None when done, else what does not fit."""
        try:
            module, leaf, stack = self._stack(piece.target)
        except (AttributeError, KeyError):
            return f"{stored_name} (the model has no {piece.target})"
        shape = stack.expert_shape if isinstance(stack, Experts4bit) else tuple(stack.shape)
        rows = shape[1] // piece.chunks
        if piece.expert >= shape[0] or tuple(tensor.shape) != (rows, shape[2]):
            return f"{stored_name} {tuple(tensor.shape)} vs expert {piece.expert} of {piece.target} {shape}"
        self.expected[piece.target] = shape[0] * piece.chunks
        self.filled[piece.target] = self.filled.get(piece.target, 0) + 1
        if isinstance(stack, Experts4bit):
            parts = self.waiting.setdefault((piece.target, piece.expert), {})
            parts[piece.chunk] = tensor
            if len(parts) == piece.chunks:
                del self.waiting[(piece.target, piece.expert)]
                weight = torch.cat([parts[c] for c in range(piece.chunks)]) if piece.chunks > 1 else parts[0]
                stack.set_expert(piece.expert, weight, f"{piece.target}[{piece.expert}]")
            return None
        if stack.device.type == "meta":
            stack = nn.Parameter(torch.empty(shape, dtype=self.dtype, device=self.device), stack.requires_grad)
            module._parameters[leaf] = stack
        with torch.no_grad():
            stack[piece.expert, piece.chunk * rows : (piece.chunk + 1) * rows].copy_(tensor)
        return None

    def is_4bit(self, key: str) -> bool:
        """Whether ``key`` names a 4-bit expert stack of the model."""
        path, _, leaf = key.rpartition(".")
        try:
            return isinstance(self.model.get_submodule(path)._parameters.get(leaf), Experts4bit)
        except AttributeError:
            return False

    def place_stack(self, key: str, tensor: torch.Tensor) -> str | None:
        """Quantize a whole fused stack ``tensor`` into the 4-bit stack ``key``; None when done, else what differs."""
        stack = self._stack(key)[2]
        if tuple(tensor.shape) != stack.expert_shape:
            return f"{key} {tuple(tensor.shape)} vs {stack.expert_shape}"
        for e in range(tensor.shape[0]):
            stack.set_expert(e, tensor[e], f"{key}[{e}]")
        self.expected[key] = self.filled[key] = 1
        return None

    def complete(self, key: str) -> bool:
        """Whether every piece of stack ``key`` is in place."""
        return self.filled.get(key, 0) == self.expected.get(key)

    def incomplete(self) -> list[str]:
        """Keys of the stacks that got some pieces but not all."""
        return [key for key in self.filled if not self.complete(key)]
