"""Models for the step-time benchmarks: torchvision's ResNets when torchvision is installed
(a compact equivalent otherwise), and a GPT-style decoder (about 100M parameters at the default)."""

import torch
from torch import nn


class _Basic(nn.Module):
    expansion = 1

    def __init__(self, cin, width, stride):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, width, 3, stride, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, 1, 1, bias=False),
            nn.BatchNorm2d(width),
        )
        self.skip = _shortcut(cin, width, stride)

    def forward(self, x):
        return torch.relu(self.body(x) + self.skip(x))


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, width, stride):
        super().__init__()
        out = width * 4
        self.body = nn.Sequential(
            nn.Conv2d(cin, width, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, out, 1, bias=False),
            nn.BatchNorm2d(out),
        )
        self.skip = _shortcut(cin, out, stride)

    def forward(self, x):
        return torch.relu(self.body(x) + self.skip(x))


def _shortcut(cin, cout, stride):
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class _ResNet(nn.Module):
    def __init__(self, block, layers, classes=1000):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
        )
        stages, cin = [], 64
        for i, (width, count) in enumerate(zip((64, 128, 256, 512), layers)):
            for j in range(count):
                stages.append(block(cin, width, 2 if (j == 0 and i > 0) else 1))
                cin = width * block.expansion
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(cin, classes)

    def forward(self, x):
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(self.stages(self.stem(x)), 1), 1))


def resnet(depth: int, classes: int = 1000) -> nn.Module:
    """torchvision's resnet18/50 if available, else the same architecture defined here."""
    try:
        import torchvision

        return getattr(torchvision.models, f"resnet{depth}")(num_classes=classes)
    except ImportError:
        block, layers = {18: (_Basic, (2, 2, 2, 2)), 50: (_Bottleneck, (3, 4, 6, 3))}[depth]
        return _ResNet(block, layers, classes)


class GPT(nn.Module):
    """A GPT-style decoder: token + position embeddings, pre-norm blocks, tied output head."""

    def __init__(self, layers=12, width=768, heads=12, vocab=32000, context=256):
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(context, width)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, ids):
        t = ids.shape[1]
        mask = torch.triu(torch.full((t, t), float("-inf"), device=ids.device), 1)
        x = self.tokens(ids) + self.positions(torch.arange(t, device=ids.device))
        return self.norm(self.blocks(x, mask=mask, is_causal=True)) @ self.tokens.weight.T


NAMES = ("resnet50", "resnet18", "gpt")


def build(name: str, batch: int, size: str = "full"):
    """(model, inputs, targets, loss_fn) for ``resnet18``, ``resnet50`` or ``gpt``.
    ``size="cifar"``: 10 classes on 32x32 input (ResNets); ``size="tiny"``: small versions for
    smoke tests (ResNets at 16x16 input, a 2-layer GPT)."""
    if size not in ("full", "cifar", "tiny"):
        raise ValueError(f"size must be full, cifar or tiny, got {size!r}")
    g = torch.Generator().manual_seed(0)
    if name.startswith("resnet"):
        depth = int(name[6:])
        model = resnet(depth, classes=1000 if size == "full" else 10)
        res = {"full": 224, "cifar": 32, "tiny": 16}[size]
        x = torch.randn(batch, 3, res, res, generator=g)
        y = torch.randint(0, 10, (batch,), generator=g)
        return model, x, y, nn.functional.cross_entropy
    if name == "gpt":
        kw = dict(layers=2, width=64, heads=4, vocab=512, context=32) if size == "tiny" else {}
        model = GPT(**kw)
        ctx = 32 if size == "tiny" else 128
        vocab = model.tokens.num_embeddings
        x = torch.randint(0, vocab, (batch, ctx), generator=g)
        y = torch.randint(0, vocab, (batch, ctx), generator=g)
        return model, x, y, lambda logits, t: nn.functional.cross_entropy(logits.flatten(0, 1), t.flatten())
    raise ValueError(f"model must be resnet18, resnet50 or gpt, got {name!r}")
