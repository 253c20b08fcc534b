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

from pydantic import BaseModel, Field, TypeAdapter
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "sigmoid": nn.Sigmoid}
Size = Annotated[int, Field(ge=1, le=65_536)]


class MLPSpec(BaseModel):
    type: Literal["mlp"]
    input_size: Size
    hidden_sizes: list[Size] = Field(default_factory=list, max_length=32)
    num_classes: Size
    activation: Literal["relu", "tanh", "gelu", "sigmoid"] = "relu"

    @property
    def input_shape(self) -> list[int]:
        return [self.input_size]

    def build(self) -> nn.Sequential:
        layers: list[nn.Module] = []
        width = self.input_size
        for hidden in self.hidden_sizes:
            layers += [nn.Linear(width, hidden), ACTIVATIONS[self.activation]()]
            width = hidden
        layers.append(nn.Linear(width, self.num_classes))
        return nn.Sequential(*layers)


class CNNSpec(BaseModel):
    type: Literal["cnn"]
    input_shape: list[Size] = Field(min_length=3, max_length=3, description="[channels, height, width]")
    channels: list[Size] = Field(min_length=1, max_length=16)
    kernel_size: Annotated[int, Field(ge=1, le=15)] = 3
    hidden_sizes: list[Size] = Field(default_factory=list, max_length=8)
    num_classes: Size
    activation: Literal["relu", "tanh", "gelu", "sigmoid"] = "relu"

    def build(self) -> nn.Sequential:
        layers: list[nn.Module] = []
        in_channels, height, width = self.input_shape
        for out_channels in self.channels:
            layers += [nn.Conv2d(in_channels, out_channels, self.kernel_size, padding="same"),
                       ACTIVATIONS[self.activation]()]
            in_channels = out_channels
        layers.append(nn.Flatten())
        features = in_channels * height * width
        for hidden in self.hidden_sizes:
            layers += [nn.Linear(features, hidden), ACTIVATIONS[self.activation]()]
            features = hidden
        layers.append(nn.Linear(features, self.num_classes))
        return nn.Sequential(*layers)


ArchitectureSpec = Annotated[MLPSpec | CNNSpec, Field(discriminator="type")]
architecture_adapter: TypeAdapter = TypeAdapter(ArchitectureSpec)
