"""Classification heads: read from a state dict's key positions or from modules, built, and a single
logit made into two.

batchcam runs heads of ``Linear`` layers with ``ReLU`` between them and ``Dropout`` anywhere (an
identity at inference): a bare ``Linear``, ``Sequential(Dropout, Linear)``, or an MLP such as
``Sequential(Linear(512, 256), ReLU, Dropout, Linear(256, 2))``. A state dict holds only the layers
with weights, so the parameterless ones are read from the gaps in the positions (``fc.0``,
``fc.3``): one empty position before the first Linear is a Dropout, one between two Linears is a
ReLU, two are a ReLU and a Dropout. Anything longer is ambiguous and refused. A module (a pickled
or TorchScript model, ``import-model``) names its layers' types, so nothing is assumed there.

A head with one output is a single logit z (trained with BCEWithLogitsLoss): P(second class) =
sigmoid(z). ``as_two_logits`` rewrites its last Linear as two rows (-w/2, +w/2) and biases
(-b/2, +b/2): softmax of (-z/2, z/2) is exactly (1 - sigmoid(z), sigmoid(z)) at any temperature, so
everything downstream handles two classes as usual, and Grad-CAM of either class is defined
(explaining the first class explains -z).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

LINEAR, RELU, DROPOUT, IDENTITY = "linear", "relu", "dropout", "identity"
LAYER_NAMES = {LINEAR: "Linear", RELU: "ReLU", DROPOUT: "Dropout", IDENTITY: "Identity"}
# Module types (their class names: a TorchScript module keeps them as ``original_name``) -> kind.
MODULE_KINDS = {"Linear": LINEAR, "ReLU": RELU, "Dropout": DROPOUT, "Dropout1d": DROPOUT, "AlphaDropout": DROPOUT,
                "Identity": IDENTITY, "Flatten": IDENTITY}
# A last layer turning logits into probabilities: dropped, since batchcam applies its own softmax.
OUTPUT_ACTIVATIONS = {"Softmax": "softmax", "Sigmoid": "sigmoid", "LogSoftmax": "log-softmax"}
POSITION_KEY = re.compile(r"(\d+)\.(weight|bias)")
IMPORT_WHOLE_MODEL = ("import the whole model, whose modules name their layers (batchcam import-model with "
                      "--trust-pickle, or a TorchScript file)")
# Between two Linears: how many parameterless layers a gap of that many positions stands for.
GAP_LAYERS = {0: (), 1: (RELU,), 2: (RELU, DROPOUT)}


class HeadError(Exception):
    """A head batchcam cannot run, or cannot read unambiguously; a one-line reason."""


@dataclass(frozen=True)
class HeadLayout:
    """The head's layers in order: one kind per position of its Sequential, or a bare Linear."""

    layers: tuple[str, ...]
    sequential: bool = True

    @classmethod
    def bare_linear(cls) -> "HeadLayout":
        return cls((LINEAR,), sequential=False)

    @property
    def linear_positions(self) -> list[int]:
        return [i for i, kind in enumerate(self.layers) if kind == LINEAR]

    @property
    def is_one_linear(self) -> bool:
        """One Linear after identities only (Dropout at inference): the exact Grad-CAM path's head."""
        positions = self.linear_positions
        return len(positions) == 1 and all(kind in (DROPOUT, IDENTITY) for kind in self.layers[:positions[0]])

    def prefix(self, position: int) -> str:
        """The key prefix of the layer at ``position`` inside the head ("" for a bare Linear)."""
        return f"{position}." if self.sequential else ""

    def describe(self, head_state: dict[str, torch.Tensor]) -> str:
        """'Linear(512, 2)' or 'Sequential(Linear(512, 256), ReLU, Dropout, Linear(256, 2))'."""
        parts = []
        for position, kind in enumerate(self.layers):
            if kind == LINEAR:
                out_features, in_features = head_state[f"{self.prefix(position)}weight"].shape
                parts.append(f"Linear({in_features}, {out_features})")
            else:
                parts.append(LAYER_NAMES[kind])
        return f"Sequential({', '.join(parts)})" if self.sequential else parts[0]

    def to_checkpoint(self) -> dict:
        return {"layers": list(self.layers), "sequential": self.sequential}

    @classmethod
    def from_checkpoint(cls, raw: object) -> "HeadLayout":
        """Raises HeadError on anything malformed."""
        if not isinstance(raw, dict) or not isinstance(raw.get("layers"), list) or not raw["layers"]:
            raise HeadError("the recorded head is malformed")
        layers = tuple(str(kind) for kind in raw["layers"])
        if not set(layers) <= set(LAYER_NAMES) or layers[-1] != LINEAR:
            raise HeadError(f"the recorded head has layers batchcam does not build ({', '.join(layers)})")
        sequential = bool(raw.get("sequential", True))
        if not sequential and layers != (LINEAR,):
            raise HeadError("the recorded head is malformed")
        return cls(layers, sequential)


def read_head_keys(head_state: dict[str, torch.Tensor], name: str,
                   leading_is_known: bool) -> tuple[HeadLayout, tuple[str, ...]]:
    """The layout of the head whose weights are ``head_state`` (keys relative to it), and what was assumed.

    ``leading_is_known``: one parameterless layer before the first Linear needs no assumption,
    because the pooled features are >= 0 (a ReLU'd backbone: Dropout, ReLU or Identity compute the
    same there) or because the architecture's own head starts with that Dropout (EfficientNet).
    """
    if not head_state:
        raise HeadError(f"no classification head ({name}) in the weights")
    if set(head_state) <= {"weight", "bias"} and "weight" in head_state:
        _check_linear_weights(head_state, "", name)
        return HeadLayout.bare_linear(), ()
    positions: dict[int, set[str]] = {}
    for key in head_state:
        match = POSITION_KEY.fullmatch(key)
        if match is None:
            raise HeadError(_not_a_linear(name, key))
        positions.setdefault(int(match.group(1)), set()).add(match.group(2))
    layers: list[str] = []
    linears = sorted(positions)
    for position in linears:
        _check_linear_weights(head_state, f"{position}.", f"{name}.{position}")
    if linears[0] > 1:
        raise HeadError(f"{linears[0]} layers without weights before the first Linear of {name}: which ones is "
                        f"ambiguous; {IMPORT_WHOLE_MODEL}")
    layers += [DROPOUT] * linears[0]
    for before, after in zip(linears, linears[1:]):
        gap = after - before - 1
        if gap not in GAP_LAYERS:
            raise HeadError(f"{gap} layers without weights between {name}.{before} and {name}.{after}: which ones "
                            f"is ambiguous; {IMPORT_WHOLE_MODEL}")
        layers += [LINEAR, *GAP_LAYERS[gap]]
    layers.append(LINEAR)
    layout = HeadLayout(tuple(layers))
    guessed = len(linears) > 1 and any(after - before > 1 for before, after in zip(linears, linears[1:]))
    guessed = guessed or (linears[0] == 1 and not leading_is_known)
    assumed = (f"the head {name} = {layout.describe(head_state)} (its layers without weights read from the key "
               "positions)",)
    return layout, assumed if guessed else ()


def _check_linear_weights(head_state: dict[str, torch.Tensor], prefix: str, where: str) -> None:
    weight = head_state.get(f"{prefix}weight")
    if weight is None:
        raise HeadError(f"{where} has a bias but no weight: not a Linear layer")
    if weight.ndim != 2:
        kind = "a normalisation layer (BatchNorm1d or LayerNorm)" if weight.ndim == 1 else "not a Linear layer"
        raise HeadError(f"{where} is {kind}; batchcam runs heads of Linear, ReLU and Dropout layers")
    bias = head_state.get(f"{prefix}bias")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise HeadError(f"{where}: its bias does not fit its weight")


def _not_a_linear(name: str, key: str) -> str:
    if re.fullmatch(r"\d+\.(running_mean|running_var|num_batches_tracked)", key):
        return (f"{name}.{key.split('.')[0]} is a BatchNorm1d layer; batchcam runs heads of Linear, ReLU and "
                "Dropout layers")
    return f"the head {name} holds '{key}', which is not a Linear layer's; batchcam runs heads of Linear, ReLU " \
           "and Dropout layers"


def module_kind(module: nn.Module) -> str:
    """A module's class name; a TorchScript module keeps it as ``original_name``."""
    return getattr(module, "original_name", None) or type(module).__name__


def read_head_module(head: nn.Module, name: str) -> tuple[HeadLayout, str | None]:
    """The layout of a head module and the output activation at its end (dropped), if any."""
    kind = module_kind(head)
    if kind == "Linear":
        return HeadLayout.bare_linear(), None
    if kind != "Sequential":
        raise HeadError(f"the head {name} is a {kind}; batchcam runs a Linear or a Sequential of Linear, ReLU and "
                        "Dropout layers")
    children = list(head.named_children())
    if [child for child, _ in children] != [str(i) for i in range(len(children))]:
        raise HeadError(f"the head {name} is a Sequential with named layers; batchcam runs numbered ones")
    kinds = [module_kind(module) for _, module in children]
    activation = OUTPUT_ACTIVATIONS.get(kinds[-1]) if kinds else None
    if activation is not None:
        kinds = kinds[:-1]
    unknown = [(i, k) for i, k in enumerate(kinds) if k not in MODULE_KINDS]
    if unknown:
        position, found = unknown[0]
        raise HeadError(f"{name}.{position} is a {found}; batchcam runs heads of Linear, ReLU and Dropout layers")
    layers = tuple(MODULE_KINDS[k] for k in kinds)
    if LINEAR not in layers:
        raise HeadError(f"the head {name} has no Linear layer")
    if layers[-1] != LINEAR:
        raise HeadError(f"the head {name} ends with a {kinds[-1]} after its last Linear; batchcam reads the last "
                        "Linear's outputs as logits")
    return HeadLayout(layers), activation


def build_head(layout: HeadLayout, head_state: dict[str, torch.Tensor], in_features: int, name: str) -> nn.Module:
    """The head module for ``layout``, sized by its weights; HeadError when the widths do not chain."""
    modules: list[nn.Module] = []
    width = in_features
    for position, kind in enumerate(layout.layers):
        if kind == LINEAR:
            prefix = layout.prefix(position)
            out_features, linear_in = head_state[f"{prefix}weight"].shape
            if linear_in != width:
                raise HeadError(f"{name}{'.' + str(position) if layout.sequential else ''} takes {linear_in} features "
                                f"where {width} arrive")
            modules.append(nn.Linear(linear_in, out_features, bias=f"{prefix}bias" in head_state))
            width = out_features
        else:
            modules.append({RELU: nn.ReLU, DROPOUT: nn.Dropout, IDENTITY: nn.Identity}[kind]())
    return nn.Sequential(*modules) if layout.sequential else modules[0]


def outputs_of(layout: HeadLayout, head_state: dict[str, torch.Tensor]) -> int:
    return int(head_state[f"{layout.prefix(layout.linear_positions[-1])}weight"].shape[0])


def last_linear(head: nn.Module) -> nn.Linear:
    return head if isinstance(head, nn.Linear) else [m for m in head.modules() if isinstance(m, nn.Linear)][-1]


def as_two_logits(linear: nn.Linear) -> nn.Linear:
    """A one-output Linear (logit z) as two outputs (-z/2, +z/2): softmax gives (1 - sigmoid(z), sigmoid(z)).

    Halving is exact in floating point, so the two outputs differ by exactly z.
    """
    if linear.out_features != 1:
        raise ValueError("only a single-logit Linear is rewritten")
    two = nn.Linear(linear.in_features, 2, bias=linear.bias is not None)
    with torch.no_grad():
        two.weight.copy_(torch.cat([-linear.weight / 2, linear.weight / 2]))
        if linear.bias is not None:
            two.bias.copy_(torch.cat([-linear.bias / 2, linear.bias / 2]))
    return two.to(linear.weight.device)
