"""Where a checkpoint's per-expert tensors go in a model whose experts are fused, for loading one tensor at a time.

Mixture-of-experts checkpoints on the Hub store each expert's projections as their own tensors
(``mlp.experts.3.gate_proj.weight``, Mixtral's ``block_sparse_moe.experts.3.w1.weight``); transformers 5 models
hold one 3-D stack per projection (``mlp.experts.gate_up_proj``: expert e's gate rows, then its up rows). transformers
declares that mapping for each architecture (``conversion_mapping``: renamings, then converters that stack the
experts and concatenate the pieces) and applies it to a whole state dict. ``ExpertPieces`` reads the same
declarations to place each tensor as it arrives: the name it has in the model, and for an expert piece the stack,
the expert and the rows it fills.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from loratune.errors import LoratuneError


@dataclass(frozen=True)
class Piece:
    """Rows ``chunk`` of ``chunks`` (equal parts along the expert's first axis) of expert ``expert`` in the fused
    stack ``target`` (a parameter key of the model)."""

    target: str
    expert: int
    chunk: int
    chunks: int


class ExpertPieces:
    """The renamings and expert-merging converters transformers declares for ``model``'s architecture."""

    def __init__(self, model: nn.Module):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming

        try:
            mapping = get_model_conversion_mapping(model, add_legacy=False)
        except (AttributeError, TypeError, ValueError):
            mapping = []  # not a transformers PreTrainedModel: names are taken as they are
        self.renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
        self.converters = [m for m in mapping if isinstance(m, WeightConverter) and _stacks_experts(m)]
        # a source pattern such as "mlp.experts.*.gate_proj.weight" with the expert number captured
        self._patterns = {
            source: re.compile(re.escape(source).replace(r"\*", r"(\d+)"))
            for converter in self.converters
            for source in converter.source_patterns
        }

    def locate(self, name: str) -> tuple[str, Piece | None]:
        """(the model's name for checkpoint tensor ``name``, the expert piece it is or None)."""
        from transformers.core_model_loading import rename_source_key

        renamed = name
        if self.renamings or self.converters:
            renamed, source = rename_source_key(name, self.renamings, self.converters)
            if source is not None:
                converter = next(c for c in self.converters if source in c.source_patterns)
                before = rename_source_key(name, self.renamings, [])[0]
                found = self._patterns[source].search(before)
                if found is None:
                    raise LoratuneError(f"cannot tell which expert checkpoint tensor {name} belongs to")
                chunks = len(converter.source_patterns)
                return renamed, Piece(renamed, int(found.group(1)), converter.source_patterns.index(source), chunks)
        return renamed, None


def _stacks_experts(converter) -> bool:
    """Whether ``converter`` only stacks experts (and concatenates their pieces along their rows): the merge a
    streamed load can do piece by piece."""
    from transformers.core_model_loading import Concatenate, MergeModulelist

    ops = converter.operations
    if not ops or not isinstance(ops[0], MergeModulelist) or ops[0].dim != 0:
        return False
    if len(ops) == 1:
        return len(converter.source_patterns) == 1
    return len(ops) == 2 and isinstance(ops[1], Concatenate) and ops[1].dim == 1
