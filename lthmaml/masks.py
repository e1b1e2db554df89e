"""Masks kept beside the model, by parameter name, and the invariants they hold.

A network stays as its author wrote it (stock ``nn.Conv2d``, ``nn.Linear``, ``nn.BatchNorm2d``,
anything else). Its masks live in a :class:`MaskSet` next to it, keyed by the qualified name of
the parameter they prune (``net.features.0.0.weight``), the way open_lth keeps a ``Mask`` beside
a ``PrunedModel``. A pruned entry is *stored* as zero and kept zero without multiplying by the
mask in the forward pass, which would cost every step:

* after every optimizer step the stored entries and their optimizer state (Adam's moments, SGD's
  momentum) are zeroed (:func:`apply_masks`), and the meta-gradient is masked before the step
  (:func:`mask_gradients`), so nothing behind a mask grows;
* inside MAML's inner loops the support gradient is masked (:func:`gradient_masks`): an entry
  that is zero and receives a zero step stays zero in every adapted weight. On the kept entries
  the meta-gradient is the one a mask in the forward pass gives.

By default the weights of conv and linear layers are prunable; ``exclude`` takes parameter or
module names. Two strategies need the forward pass itself changed, and do it through
``torch.nn.utils.parametrize`` on the module they prune, which both inner loops (``higher`` and
``torch.func``) differentiate through: Powerpropagation's ``phi * |phi| ** (alpha - 1)``
(:mod:`lthmaml.nets.reparam`) and Top-KAST's forward set (:class:`ForwardMask`), whose dense
weights behind the mask must be kept rather than zeroed.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lthmaml.errors import ConfigError

Masks = dict[str, Tensor]

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
"""Module types whose ``weight`` is prunable by default."""

ATTRIBUTE = "masks"
"""Where a model keeps its :class:`MaskSet` (every lthmaml learner has one)."""


class MaskSet(nn.Module):
    """Masks by parameter name, beside the model: they follow ``.to()`` and ride in ``state_dict``.

    A module only so that they travel with the model (device, dtype, checkpoints) under the
    ``masks.`` prefix of its ``state_dict``. Loading a ``state_dict`` replaces the whole set with
    the one saved (a dense checkpoint clears it), so a checkpoint's masks are always its own. Only
    masks that prune something are kept: an absent name is dense.
    """

    def __init__(self) -> None:
        super().__init__()
        self._masks: dict[str, Tensor] = {}

    def __getitem__(self, name: str) -> Tensor:
        return self._masks[name]

    def __contains__(self, name: object) -> bool:
        return name in self._masks

    def __iter__(self) -> Iterator[str]:
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)

    def items(self):
        return self._masks.items()

    def set(self, name: str, mask: Tensor) -> None:
        """Keep ``mask`` for ``name`` (dropped when it prunes nothing)."""
        if bool(mask.all()):
            self._masks.pop(name, None)
        else:
            self._masks[name] = mask

    def clear(self) -> None:
        self._masks.clear()

    def _apply(self, fn, recurse: bool = True):
        self._masks = {name: fn(mask) for name, mask in self._masks.items()}
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        for name, mask in self._masks.items():
            destination[prefix + name] = mask if keep_vars else mask.detach()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        self._masks = {
            key[len(prefix) :]: value.detach().clone()
            for key, value in state_dict.items()
            if key.startswith(prefix)
        }

    def extra_repr(self) -> str:
        return f"{len(self)} masks"


def mask_set(model: nn.Module) -> MaskSet:
    """The :class:`MaskSet` beside ``model``: a learner's own, or one attached to a bare net on
    first use (as ``model.masks``)."""
    found = getattr(model, ATTRIBUTE, None)
    if isinstance(found, MaskSet):
        return found
    if found is not None:
        raise ConfigError(
            f"{type(model).__name__}.{ATTRIBUTE} is taken by something other than a mask set: "
            "rename that attribute to prune this model"
        )
    masks = MaskSet()
    setattr(model, ATTRIBUTE, masks)
    return masks


def masks_within(model: nn.Module, prefix: str = "") -> Masks:
    """The masks ``model`` keeps for the parameters under ``prefix`` (``"net."``), by their names
    below it; none attached, none returned (nothing is attached to ``model``)."""
    found = getattr(model, ATTRIBUTE, None)
    if not isinstance(found, MaskSet):
        return {}
    return {
        name[len(prefix) :]: mask.detach().clone() for name, mask in found.items() if name.startswith(prefix)
    }


def folded(model: nn.Module) -> nn.Module:
    """A copy of ``model`` computing the same function with stock parameters: every
    parametrisation (Powerprop, a forward mask) folded into the weight it computes, no mask set."""
    copy_ = copy.deepcopy(model)
    for module in copy_.modules():
        if isinstance(getattr(module, ATTRIBUTE, None), MaskSet):
            delattr(module, ATTRIBUTE)
    for module in list(copy_.modules()):
        unparametrize(module)
    return copy_


@torch.no_grad()
def unparametrize(module: nn.Module) -> None:
    """Turn a parametrised module back into its stock class holding the values it computes with.

    Not ``parametrize.remove_parametrizations``: that deletes the property from the class, which a
    deep copy shares with the module it was copied from."""
    if not parametrize.is_parametrized(module):
        return
    values = {name: getattr(module, name).detach().clone() for name in module.parametrizations}
    del module._modules["parametrizations"]
    module.__class__ = type(module).__bases__[0]
    for name, value in values.items():
        module.register_parameter(name, nn.Parameter(value))


# ---------------------------------------------------------------------- names and tensors
def owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module holding parameter ``name`` and the attribute it is under."""
    path, _, attribute = name.rpartition(".")
    try:
        module = model.get_submodule(path) if path else model
    except AttributeError:
        module = None
    # Looked up without computing it: a parametrised weight is recomputed on every access.
    held = module is not None and (
        module._parameters.get(attribute) is not None or parametrize.is_parametrized(module, attribute)
    )
    if not held:
        raise ConfigError(f"'{name}' is not a parameter of {type(model).__name__}")
    return module, attribute


def weight(model: nn.Module, name: str) -> Tensor:
    """The tensor the forward pass computes with (through any parametrisation)."""
    module, attribute = owner(model, name)
    return getattr(module, attribute)


def stored(model: nn.Module, name: str) -> Tensor:
    """The leaf parameter behind ``name``: itself, or a parametrisation's ``original``."""
    module, attribute = owner(model, name)
    if parametrize.is_parametrized(module, attribute):
        return module.parametrizations[attribute].original
    return getattr(module, attribute)


def prunable(model: nn.Module, exclude: Sequence[str] = ()) -> list[str]:
    """The prunable weights of ``model`` by name (conv and linear layers), without ``exclude``d
    ones (a name excludes the parameter of that name or every prunable weight of that module)."""
    names = [
        f"{module_name}.weight" if module_name else "weight"
        for module_name, module in model.named_modules()
        if isinstance(module, PRUNABLE)
    ]
    if not names:
        raise ConfigError(
            f"{type(model).__name__} has no conv or linear layer to prune (nn.Conv1d/2d/3d, nn.Linear)"
        )
    unknown = [e for e in exclude if not any(is_named(e, name) for name in names)]
    if unknown:
        raise ConfigError(
            f"exclude names {sorted(unknown)} that are not prunable weights or their layers; "
            f"choose from {names}"
        )
    return [name for name in names if not any(is_named(e, name) for e in exclude)]


def is_named(key: str, name: str) -> bool:
    """Whether option ``key`` (a parameter name, or a layer's name) names weight ``name``."""
    return name == key or name == f"{key}.weight"


def left_dense(model: nn.Module) -> list[str]:
    """Matrices and kernels the engine does not prune (embeddings, attention projections, ...):
    what a strategy's log lists once, so nobody takes them for pruned."""
    chosen = set(prunable(model))
    return [name for name, p in model.named_parameters() if p.dim() >= 2 and _weight_name(name) not in chosen]


def _weight_name(parameter_name: str) -> str:
    """``a.parametrizations.weight.original`` -> ``a.weight``: the name a mask is kept under."""
    return parameter_name.replace(".parametrizations.", ".").removesuffix(".original")


def masks_of(model: nn.Module, names: Optional[Sequence[str]] = None) -> Masks:
    """A copy of the mask of every prunable weight (ones where nothing is pruned) and of every
    other masked parameter (a pruned filter's bias and BatchNorm), or of ``names`` only."""
    kept = mask_set(model)
    wanted = list(names) if names is not None else [*prunable(model), *(n for n in kept if n)]
    masks = {}
    for name in dict.fromkeys(wanted):
        if name in kept:
            masks[name] = kept[name].detach().clone()
        else:
            masks[name] = torch.ones_like(weight(model, name).detach())
    return masks


@torch.no_grad()
def load_masks(model: nn.Module, masks: Mapping[str, Tensor]) -> None:
    """Install ``masks`` (by parameter name; others keep theirs) and zero the weights they prune."""
    kept = mask_set(model)
    for name, mask in masks.items():
        try:
            target = weight(model, name)
        except ConfigError:
            target = None
        if target is None or target.shape != mask.shape:
            raise ConfigError(
                f"mask '{name}' of shape {tuple(mask.shape)} does not fit {type(model).__name__}"
                + (
                    f": masks are keyed by parameter name ('{name}.weight'); masks keyed by layer name "
                    "predate this version's format: prune again to write them"
                    if target is None and _is_parameter(model, f"{name}.weight")
                    else ""
                )
            )
        kept.set(name, mask.detach().to(device=target.device, dtype=target.dtype).clone())
    apply_masks(model)


def _is_parameter(model: nn.Module, name: str) -> bool:
    try:
        owner(model, name)
    except ConfigError:
        return False
    return True


# ---------------------------------------------------------------------- the invariants
class ForwardMask(nn.Module):
    """A parametrisation computing with ``w * mask``: for a strategy whose dense weights behind
    the mask must survive (Top-KAST's ``theta``), so they cannot be stored as zero.

    ``backward`` (a superset of ``mask``, or None) is Top-KAST's backward set: the value stays
    ``w * mask``, but the gradient also reaches the weights of ``backward`` as if they computed.
    Both are non-persistent buffers: the strategy keeps them in its own state.
    """

    def __init__(self, mask: Tensor, backward: Optional[Tensor] = None) -> None:
        super().__init__()
        self.register_buffer("mask", mask, persistent=False)
        self.register_buffer("backward", backward, persistent=False)

    def forward(self, w: Tensor) -> Tensor:
        if self.backward is None:
            return w * self.mask
        explore = w * (self.backward - self.mask)  # value 0 below, gradient kept
        return w * self.mask + (explore - explore.detach())

    def right_inverse(self, w: Tensor) -> Tensor:
        return w


def forward_masked(model: nn.Module, name: str) -> Optional[ForwardMask]:
    """The :class:`ForwardMask` on parameter ``name``, if it has one."""
    module, attribute = owner(model, name)
    if not parametrize.is_parametrized(module, attribute):
        return None
    return next((p for p in module.parametrizations[attribute] if isinstance(p, ForwardMask)), None)


def enforced(model: nn.Module) -> list[tuple[Tensor, Tensor]]:
    """(stored parameter, mask) of every mask kept by zeros (not by a :class:`ForwardMask`)."""
    found = getattr(model, ATTRIBUTE, None)
    if not isinstance(found, MaskSet):
        return []
    return [
        (stored(model, name), mask) for name, mask in found.items() if forward_masked(model, name) is None
    ]


@torch.no_grad()
def apply_masks(model: nn.Module, optimizers: Sequence[torch.optim.Optimizer] = ()) -> None:
    """Zero the stored entries under every mask, and their state in ``optimizers``.

    Weight decay or stale momentum would otherwise grow a pruned weight again; zeroing its Adam
    moments too means a weight that is grown back later starts without another's history.
    """
    for parameter, mask in enforced(model):
        parameter.mul_(mask)
        for optimizer in optimizers:
            for value in optimizer.state.get(parameter, {}).values():
                if isinstance(value, Tensor) and value.shape == parameter.shape:
                    value.mul_(mask)


@torch.no_grad()
def mask_gradients(model: nn.Module) -> None:
    """Zero the gradient of every pruned entry before an optimizer step uses it."""
    for parameter, mask in enforced(model):
        if parameter.grad is not None:
            parameter.grad.mul_(mask)


def gradient_masks(model: nn.Module, net: nn.Module) -> dict[str, Tensor]:
    """The masks of ``net``'s parameters (a part of ``model``, which keeps the masks), keyed by
    their names in ``net.named_parameters()``: what an inner loop multiplies its steps by."""
    by_id = {id(parameter): mask for parameter, mask in enforced(model)}
    return {name: by_id[id(p)] for name, p in net.named_parameters() if id(p) in by_id}
