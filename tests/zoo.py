"""Models shaped like the ones users bring, small enough for tests and CPU benchmarks: a residual CNN with
BatchNorm (ResNet's basic blocks), a text classifier on token ids, and a transformer encoder on token ids
with a padding mask (two graph inputs). Used by the tests and by bench/."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 conv + BatchNorm, a projection shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + self.shortcut(x))


class ResidualCNN(nn.Module):
    """A ResNet in miniature on 3xHxW images: stem, one basic block per stage (widths w, 2w, 4w; the
    later stages halve the resolution), global average pooling, a linear head."""

    def __init__(self, classes: int = 10, width: int = 8, in_channels: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.stages = nn.Sequential(BasicBlock(width, width, 1), BasicBlock(width, 2 * width, 2),
                                    BasicBlock(2 * width, 4 * width, 2))
        self.head = nn.Linear(4 * width, classes)

    def forward(self, x):
        return self.head(self.stages(self.stem(x)).mean((2, 3)))


class TextClassifier(nn.Module):
    """Token and position embeddings, LayerNorm, mean pooling, a linear head, on int64 token ids."""

    def __init__(self, vocab: int = 50, length: int = 12, dim: int = 16, classes: int = 3):
        super().__init__()
        self.tokens, self.positions = nn.Embedding(vocab, dim), nn.Embedding(length, dim)
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)
        self.register_buffer("index", torch.arange(length))

    def forward(self, ids):
        return self.head(self.norm(self.tokens(ids.long()) + self.positions(self.index)).mean(1))


class SharedBlockMLP(nn.Module):
    """One hidden layer applied twice (weight sharing across depth): the exported graph reads its weight
    from two nodes, which must stay one audited weight."""

    def __init__(self, width: int = 16, classes: int = 3):
        super().__init__()
        self.inp, self.shared, self.head = nn.Linear(8, width), nn.Linear(width, width), nn.Linear(width, classes)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        return self.head(torch.relu(self.shared(torch.relu(self.shared(h)))))


class TiedTokenModel(nn.Module):
    """Next-token-style classifier whose output layer is its embedding table (weight tying): classes =
    vocabulary. One weight used by a lookup and by a linear map."""

    def __init__(self, vocab: int = 20, dim: int = 16):
        super().__init__()
        self.tokens, self.mix = nn.Embedding(vocab, dim), nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.tokens.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.tokens(ids.long()).mean(1))))


class TinyTransformer(nn.Module):
    """A BERT-shaped text classifier: token + position embeddings, pre-norm blocks of multi-head
    self-attention under a padding mask and a GELU feed-forward, masked mean pooling, a linear head.
    forward(input_ids, attention_mask): two int64 graph inputs once exported."""

    def __init__(self, vocab: int = 64, length: int = 16, dim: int = 32, heads: int = 2, layers: int = 1,
                 classes: int = 3):
        super().__init__()
        self.tokens, self.positions = nn.Embedding(vocab, dim), nn.Embedding(length, dim)
        self.blocks = nn.ModuleList(_EncoderBlock(dim, heads) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)
        self.register_buffer("index", torch.arange(length))

    def forward(self, input_ids, attention_mask):
        h = self.tokens(input_ids) + self.positions(self.index)
        keep = attention_mask.to(h.dtype)
        for block in self.blocks:
            h = block(h, keep)
        h = self.norm(h)
        pooled = (h * keep.unsqueeze(-1)).sum(1) / keep.sum(1, keepdim=True).clamp(min=1)
        return self.head(pooled)


class TorchEncoderClassifier(nn.Module):
    """A text classifier built from torch's own nn.TransformerEncoderLayer (batch_first, GELU, dropout,
    nested tensors off): exported, its attention projections run sequence-first, on (L, B, d) and
    (L*B, d) rows, not batch-first. forward(input_ids): one int64 graph input."""

    def __init__(self, vocab: int = 50, length: int = 12, dim: int = 16, heads: int = 2, layers: int = 1,
                 classes: int = 3):
        super().__init__()
        self.tokens, self.positions = nn.Embedding(vocab, dim), nn.Embedding(length, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.1, activation="gelu", batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, classes)
        self.register_buffer("index", torch.arange(length))

    def forward(self, input_ids):
        h = self.encoder(self.tokens(input_ids) + self.positions(self.index))
        return self.head(h.mean(1))


class _EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.qkv, self.proj = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, h, keep):
        batch, length, dim = h.shape
        q, k, v = (t.reshape(batch, length, self.heads, dim // self.heads).transpose(1, 2)
                   for t in self.qkv(self.norm1(h)).chunk(3, dim=-1))
        scores = q @ k.transpose(-1, -2) / math.sqrt(dim // self.heads)
        scores = scores + (1.0 - keep[:, None, None, :]) * -1e4  # padded positions get no attention
        attended = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, dim)
        h = h + self.proj(attended)
        return h + self.ff(self.norm2(h))


def distinct_weights(model: nn.Module, scale: float = 0.05, seed: int = 0) -> nn.Module:
    """Perturb every parameter, as training would: exporters merge initializers with identical values
    (two untrained LayerNorms share one tensor), which would hide a dropped weight behind a shared one."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5, generator=generator)
                m.running_var.uniform_(0.5, 2.0, generator=generator)
    return model.eval()


def exported_learned_parameters(model: nn.Module, batchnorm_folded: bool) -> int:
    """How many learned values an exported graph holds: the model's parameters, except that an eval-mode
    BatchNorm that an exporter folds into the convolution before it leaves only one weight and one bias
    per channel (its scale multiplies into the conv weight, its shift and the conv's own bias become the
    conv's bias); likewise a BatchNorm1d after a Linear. Assumes, as in this zoo, that every BatchNorm
    directly follows its Conv2d or Linear."""
    count = sum(p.numel() for p in model.parameters())
    if not batchnorm_folded:
        return count
    previous = None
    for module in model.modules():
        if (isinstance(module, nn.BatchNorm2d) and isinstance(previous, nn.Conv2d)) or \
                (isinstance(module, nn.BatchNorm1d) and isinstance(previous, nn.Linear)):
            count -= module.weight.numel() + (previous.bias.numel() if previous.bias is not None else 0)
        if isinstance(module, (nn.Conv2d, nn.BatchNorm2d, nn.Linear)):
            previous = module
    return count


def token_classification(n: int, length: int = 16, vocab: int = 64, classes: int = 3, seed: int = 0):
    """Synthetic text: each class owns a band of the vocabulary and its sentences draw about half their
    tokens from it, the rest at random; sentences have random lengths (padding id 0, attention mask 0).
    Returns int64 input_ids, attention_mask (N, length) and labels (N,)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=n)
    band = (vocab - 1) // classes
    own = 1 + labels[:, None] * band + rng.integers(0, band, size=(n, length))
    noise = rng.integers(1, vocab, size=(n, length))
    ids = np.where(rng.random((n, length)) < 0.5, own, noise)
    lengths = rng.integers(length // 2, length + 1, size=n)
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int64)
    return (ids * mask).astype(np.int64), mask, labels.astype(np.int64)


def train(model: nn.Module, inputs: tuple[torch.Tensor, ...], labels: torch.Tensor, epochs: int = 100,
          lr: float = 0.01, batch_size: int | None = None, seed: int = 0) -> nn.Module:
    """Adam on cross-entropy, full batch or minibatches, then eval mode."""
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    n = labels.shape[0]
    step = batch_size or n
    model.train()
    for _ in range(epochs):
        order = torch.randperm(n)
        for start in range(0, n, step):
            index = order[start : start + step]
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(*(t[index] for t in inputs)), labels[index]).backward()
            optimizer.step()
    return model.eval()


class SharedKernelTwoDilations(nn.Module):
    """One convolution kernel applied at two dilations (TridentNet-style weight sharing): the exported
    graph has two Conv nodes with different attributes reading one weight."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(4, 2, 3, 3) * 0.3)
        self.head = nn.Linear(4 * 8 * 8, classes)

    def forward(self, x):
        near = nn.functional.conv2d(x, self.kernel, padding=1)
        far = nn.functional.conv2d(x, self.kernel, padding=2, dilation=2)
        return self.head(torch.relu(near + far).flatten(1))
