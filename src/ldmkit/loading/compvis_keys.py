"""Key tables: how the parameter names of an original CompVis checkpoint map onto ldmkit's (diffusers') names.

A component's table is a list of :class:`Rule`, each mapping one original module (``input_blocks.1.0``) onto
one of ours (``down_blocks.0.resnets.0``) with an explicit rename of its sub-modules. The same rules read
backwards name the original key of anything the checkpoint lacks, so every error names the key as it is
in the user's file.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from ..errors import LDMKitError

# The module itself: ``source.weight`` -> ``target.weight``.
WHOLE: Mapping[str, str] = {"": ""}


@dataclass(frozen=True)
class Rule:
    """``source.<module>.<param>`` -> ``target.<renames[module]>.<param>``.

    ``renames=None`` keeps the rest of the key as it is (sub-modules named alike on both sides). A tuple of
    names splits one tensor into several with ``split`` (the fused qkv projection of the ADM attention).
    ``to_linear`` turns 1x1 convolution weights ``(out, in, 1[, 1])`` into linear ones ``(out, in)``.
    """

    source: str
    target: str
    renames: Mapping[str, str | tuple[str, ...]] | None = None
    split: Callable[[torch.Tensor], tuple[torch.Tensor, ...]] | None = None
    to_linear: bool = False

    def convert(self, value: torch.Tensor, count: int) -> tuple[torch.Tensor, ...]:
        if self.to_linear and value.ndim > 2:
            value = value.flatten(1)
        if count == 1:
            return (value,)
        if self.split is None:
            raise LDMKitError(f"internal error: rule {self.source} splits a tensor but has no split function")
        return self.split(value)


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


class KeyTable:
    """The rules of one component; converts a state dict and names what is unknown or missing."""

    def __init__(self, component: str, prefix: str, rules: list[Rule]):
        self.component = component
        self.prefix = prefix  # the component's prefix in the checkpoint, for messages
        self._by_source = {r.source: r for r in rules}
        self._by_target: dict[str, list[Rule]] = {}
        for rule in rules:
            self._by_target.setdefault(rule.target, []).append(rule)

    @staticmethod
    def _longest_prefix(key: str, table: Mapping) -> tuple[str, str] | None:
        """Split ``key`` into the longest ``prefix`` found in ``table`` and the rest after its dot."""
        cut = len(key)
        while cut > 0:
            cut = key.rfind(".", 0, cut)
            if cut < 0:
                break
            if key[:cut] in table:
                return key[:cut], key[cut + 1:]
        return None

    def _targets(self, key: str) -> tuple[Rule, list[str]] | None:
        found = self._longest_prefix(key, self._by_source)
        if found is None:
            return None
        rule = self._by_source[found[0]]
        rest = found[1]
        if rule.renames is None:
            return rule, [_join(rule.target, rest)]
        module, _, param = rest.rpartition(".")
        if module not in rule.renames:
            return None
        names = rule.renames[module]
        names = (names,) if isinstance(names, str) else names
        return rule, [_join(rule.target, name, param) for name in names]

    def source_of(self, target_key: str) -> str:
        """The original key that ``target_key`` comes from (for messages)."""
        found = self._longest_prefix(target_key, self._by_target)
        if found is None:
            return self.prefix + target_key
        prefix, rest = found
        for rule in self._by_target[prefix]:
            if rule.renames is None:
                return self.prefix + _join(rule.source, rest)
            module, _, param = rest.rpartition(".")
            for source, names in rule.renames.items():
                if module == names or (isinstance(names, tuple) and module in names):
                    return self.prefix + _join(rule.source, source, param)
        return self.prefix + target_key

    def convert(self, state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
                ) -> dict[str, torch.Tensor]:
        """Rename ``state`` (keys without the component prefix) to ours and check it against ``expected``
        (the target model's state dict, e.g. on the meta device): names, then shapes."""
        converted: dict[str, torch.Tensor] = {}
        origin: dict[str, str] = {}
        unknown = []
        for key, value in state.items():
            mapped = self._targets(key)
            if mapped is None:
                unknown.append(self.prefix + key)
                continue
            rule, names = mapped
            for name, tensor in zip(names, rule.convert(value, len(names))):
                converted[name] = tensor
                origin[name] = self.prefix + key
        unknown += sorted({origin[k] for k in converted if k not in expected})
        if unknown:
            raise LDMKitError(f"{self.component}: the checkpoint has {len(unknown)} key(s) this config does not "
                              f"have: {', '.join(sorted(unknown)[:8])}. The config.yaml does not describe this "
                              "checkpoint (or the architecture is not supported).")
        missing = sorted({self.source_of(k) for k in expected if k not in converted})
        if missing:
            raise LDMKitError(f"{self.component}: the checkpoint lacks {len(missing)} key(s) that the config "
                              f"needs: {', '.join(missing[:8])}. The config.yaml does not describe this "
                              "checkpoint, or the file is incomplete.")
        for name, tensor in converted.items():
            want = tuple(expected[name].shape)
            if tuple(tensor.shape) != want:
                raise LDMKitError(f"{self.component}: {origin[name]} has shape {tuple(tensor.shape)}, but the "
                                  f"config.yaml implies {want} (as {name}). The config does not match the "
                                  "checkpoint.")
        return converted
