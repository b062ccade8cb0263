"""A network read off its weights (backbone + head), and the eval-mode module batchcam runs.

``read_network`` decides the architecture from the backbone's keys and shapes, the input channels
from the first convolution, and the head from its keys (or from a module's layer types, or from a
checkpoint's record). ``build_network`` builds that module on the meta device and assigns the
weights to it, so a large backbone costs no random initialisation; a single logit becomes two
(``heads.as_two_logits``).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch
from torch import nn

from batchcam.model.architectures import (
    ARCHITECTURES,
    Architecture,
    NotRecognised,
    build_backbone,
    recognise_backbone,
    remap_old_densenet_keys,
    replace_module,
)
from batchcam.model.heads import (
    DROPOUT,
    HeadError,
    HeadLayout,
    as_two_logits,
    build_head,
    last_linear,
    outputs_of,
    read_head_keys,
    read_head_module,
)

# Backbones whose pooled features are >= 0 (they end with a ReLU): a parameterless layer before
# the head's first Linear (Dropout, ReLU, Identity) computes the same whatever it is.
NONNEGATIVE_FAMILIES = ("resnet", "densenet")


class NetworkError(Exception):
    """The weights are not a network batchcam can run; a one-line reason (the caller names the file)."""


@dataclass(frozen=True)
class Network:
    """What the weights are: the architecture, its input channels, its head and the head's outputs."""

    arch: str
    channels: int
    head: HeadLayout
    outputs: int             # the last Linear's outputs: 1 is a single logit
    head_description: str    # e.g. "fc = Sequential(Dropout, Linear(512, 2))"

    @property
    def architecture(self) -> Architecture:
        return ARCHITECTURES[self.arch]

    @property
    def single_logit(self) -> bool:
        return self.outputs == 1

    @property
    def classes(self) -> int:
        """How many classes batchcam reports: a single logit gives two."""
        return 2 if self.single_logit else self.outputs

    @property
    def target_layer(self) -> str:
        return self.architecture.target_layer

    def describe(self) -> str:
        """'weights of a resnet50, 2 outputs', '... 1 input channel, 1 output (a single logit)'."""
        channels = ", 1 input channel" if self.channels == 1 else ""
        outputs = "1 output (a single logit)" if self.single_logit else f"{self.outputs} outputs"
        return f"weights of {article(self.arch)} {self.arch}{channels}, {outputs}"


def article(word: str) -> str:
    return "an" if word[:1].lower() in "aeio" else "a"


def canonical_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keys torchvision's modules have today (old DenseNet names remapped)."""
    return remap_old_densenet_keys(state)


def read_network(state: dict[str, torch.Tensor], *, declared_arch: str | None = None,
                 head_of: Callable[[str], nn.Module] | None = None,
                 recorded_head: HeadLayout | None = None) -> tuple[Network, tuple[str, ...], str | None]:
    """The network ``state`` holds, what was assumed to read it, and the head's dropped output activation.

    The head comes from ``recorded_head`` (a batchcam checkpoint's), else from ``head_of(name)`` (the
    head module of a pickled or TorchScript model, whose layer types say what it is), else from the
    key positions. NetworkError otherwise.
    """
    try:
        backbone = recognise_backbone(state, declared_arch)
    except NotRecognised as e:
        raise NetworkError(str(e)) from None
    arch = backbone.architecture
    head_state = {k[len(arch.head) + 1:]: v for k, v in state.items() if k.startswith(arch.head + ".")}
    activation: str | None = None
    assumed: tuple[str, ...] = ()
    try:
        if recorded_head is not None:
            layout = recorded_head
        elif head_of is not None:
            layout, activation = read_head_module(head_of(arch.head), arch.head)
        else:
            leading_is_known = arch.family in NONNEGATIVE_FAMILIES or native_head(arch.name).layers[0] == DROPOUT
            layout, assumed = read_head_keys(head_state, arch.head, leading_is_known)
        _check_head_keys(layout, head_state, arch.head)
        build_head_on_meta(layout, head_state, backbone.width, arch.head)
    except HeadError as e:
        raise NetworkError(f"weights of {article(arch.name)} {arch.name} with a head batchcam cannot run: {e}"
                           ) from None
    outputs = outputs_of(layout, head_state)
    if activation == "sigmoid" and outputs > 1:
        raise NetworkError(f"weights of {article(arch.name)} {arch.name} whose head ends with a Sigmoid over "
                           f"{outputs} outputs: a multi-label model (one probability per finding); batchcam runs "
                           "single-label classifiers")
    network = Network(arch.name, backbone.channels, layout, outputs,
                      f"{arch.head} = {layout.describe(head_state)}")
    return network, assumed, activation


@cache
def native_head(name: str) -> HeadLayout:
    """The layout of the architecture's own (ImageNet) head: EfficientNet's is Sequential(Dropout, Linear)."""
    arch = ARCHITECTURES[name]
    with torch.device("meta"):
        return read_head_module(arch.factory().get_submodule(arch.head), arch.head)[0]


def _check_head_keys(layout: HeadLayout, head_state: dict[str, torch.Tensor], name: str) -> None:
    expected = set()
    for position in layout.linear_positions:
        expected.add(f"{layout.prefix(position)}weight")
    optional = {f"{layout.prefix(position)}bias" for position in layout.linear_positions}
    found = set(head_state)
    if not expected <= found or not found <= expected | optional:
        raise HeadError(f"the weights of {name} do not fit its recorded layers")


def build_head_on_meta(layout: HeadLayout, head_state: dict[str, torch.Tensor], width: int, name: str) -> None:
    with torch.device("meta"):
        build_head(layout, head_state, width, name)


def build_network(network: Network, state: dict[str, torch.Tensor], *, plain: bool = False) -> nn.Module:
    """The eval-mode module with ``state``'s weights (float32): batchcam's, or with ``plain`` torchvision's own
    class and the single logit kept (the reference a user's own code would build)."""
    arch = network.architecture
    head_state = {k[len(arch.head) + 1:]: v for k, v in state.items() if k.startswith(arch.head + ".")}
    with torch.device("meta"):
        model = build_backbone(arch, network.channels, arch.plain if plain else None)
        replace_module(model, arch.head, build_head(network.head, head_state, _in_features(model, arch), arch.head))
    weights = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    try:
        model.load_state_dict(weights, strict=True, assign=True)
    except RuntimeError:  # torch's message lists every key: read_network's checks should leave nothing here
        raise NetworkError(f"the weights do not fit {article(arch.name)} {arch.name} with this head") from None
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{arch.name}: no weights for {', '.join(left[:3])}")
    if network.single_logit and not plain:
        head = model.get_submodule(arch.head)
        two = as_two_logits(last_linear(head))
        if isinstance(head, nn.Sequential):  # network.head.sequential: build_head made a Sequential
            head[network.head.linear_positions[-1]] = two
        else:
            replace_module(model, arch.head, two)
    return model.eval()


def _in_features(model: nn.Module, arch: Architecture) -> int:
    head = model.get_submodule(arch.head)
    first = head if isinstance(head, nn.Linear) else next(m for m in head.modules() if isinstance(m, nn.Linear))
    return int(first.in_features)
