"""Built-in architectures for `.safetensors` uploads, described by a small JSON spec.

They are plain `nn.Sequential` stacks, so the state-dict keys are what a user's own `nn.Sequential`
of the same layers produces ("0.weight", "0.bias", "2.weight", ...):

- {"type": "mlp", "input_size": 64, "hidden_sizes": [32], "num_classes": 10, "activation": "relu"}
  -> Linear, act, Linear, act, ..., Linear
- {"type": "cnn", "input_shape": [1, 8, 8], "channels": [8, 16], "kernel_size": 3, "hidden_sizes": [],
   "num_classes": 10, "activation": "relu"}
  -> Conv2d(padding=same), act, ..., Flatten, Linear, act, ..., Linear
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "sigmoid": nn.Sigmoid}
Size = Annotated[int, Field(ge=1, le=65_536)]


class _Spec(BaseModel):
    # strict: "input_size": "2" or an unknown field is a mistake worth a 422, not something to guess at
    model_config = ConfigDict(extra="forbid", strict=True)

    def _plan(self) -> list[tuple]:
        """The layers, in order, as ("linear", in, out) / ("conv", in, out, kernel) / ("act",) / ("flatten",)."""
        raise NotImplementedError

    def state_shapes(self) -> dict[str, list[int]]:
        """The state-dict keys and shapes build() would produce, computed without allocating anything, so
        that an upload is compared with its architecture before a (possibly huge) model is built."""
        shapes = {}
        for index, step in enumerate(self._plan()):
            if step[0] == "linear":
                shapes[f"{index}.weight"], shapes[f"{index}.bias"] = [step[2], step[1]], [step[2]]
            elif step[0] == "conv":
                shapes[f"{index}.weight"] = [step[2], step[1], step[3], step[3]]
                shapes[f"{index}.bias"] = [step[2]]
        return shapes

    def build(self) -> nn.Sequential:
        layers: list[nn.Module] = []
        for step in self._plan():
            if step[0] == "linear":
                layers.append(nn.Linear(step[1], step[2]))
            elif step[0] == "conv":
                layers.append(nn.Conv2d(step[1], step[2], step[3], padding="same"))
            elif step[0] == "flatten":
                layers.append(nn.Flatten())
            else:
                layers.append(ACTIVATIONS[self.activation]())
        return nn.Sequential(*layers)


class MLPSpec(_Spec):
    type: Literal["mlp"]
    input_size: Size
    hidden_sizes: list[Size] = Field(default_factory=list, max_length=32)
    num_classes: Size
    activation: Literal["relu", "tanh", "gelu", "sigmoid"] = "relu"

    @property
    def input_shape(self) -> list[int]:
        return [self.input_size]

    def _plan(self) -> list[tuple]:
        plan, width = [], self.input_size
        for hidden in self.hidden_sizes:
            plan += [("linear", width, hidden), ("act",)]
            width = hidden
        return plan + [("linear", width, self.num_classes)]


class CNNSpec(_Spec):
    type: Literal["cnn"]
    input_shape: list[Size] = Field(min_length=3, max_length=3, description="[channels, height, width]")
    channels: list[Size] = Field(min_length=1, max_length=16)
    kernel_size: Annotated[int, Field(ge=1, le=15)] = 3
    hidden_sizes: list[Size] = Field(default_factory=list, max_length=8)
    num_classes: Size
    activation: Literal["relu", "tanh", "gelu", "sigmoid"] = "relu"

    def _plan(self) -> list[tuple]:
        plan = []
        in_channels, height, width = self.input_shape
        for out_channels in self.channels:
            plan += [("conv", in_channels, out_channels, self.kernel_size), ("act",)]
            in_channels = out_channels
        plan.append(("flatten",))
        features = in_channels * height * width
        for hidden in self.hidden_sizes:
            plan += [("linear", features, hidden), ("act",)]
            features = hidden
        return plan + [("linear", features, self.num_classes)]


ArchitectureSpec = Annotated[MLPSpec | CNNSpec, Field(discriminator="type")]
architecture_adapter: TypeAdapter = TypeAdapter(ArchitectureSpec)
