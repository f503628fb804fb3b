"""Gradient shapes of real models without torchvision, and a module that has them."""

import torch
from torch import nn


def resnet50_shapes() -> list[tuple[int, ...]]:
    """Parameter shapes of a ResNet-50 (bottleneck blocks [3, 4, 6, 3], 1000 classes)."""
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    in_ch = 64
    for width, blocks in zip((64, 128, 256, 512), (3, 4, 6, 3)):
        for b in range(blocks):
            out = width * 4
            shapes += [(width, in_ch, 1, 1), (width,), (width,)]
            shapes += [(width, width, 3, 3), (width,), (width,)]
            shapes += [(out, width, 1, 1), (out,), (out,)]
            if b == 0:
                shapes += [(out, in_ch, 1, 1), (out,), (out,)]
            in_ch = out
    return shapes + [(1000, 2048), (1000,)]


def resnet18_shapes() -> list[tuple[int, ...]]:
    """Parameter shapes of a ResNet-18 (basic blocks [2, 2, 2, 2], 1000 classes)."""
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    cin = 64
    for cout, first_stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for b in range(2):
            c_in = cin if b == 0 else cout
            shapes += [(cout, c_in, 3, 3), (cout,), (cout,), (cout, cout, 3, 3), (cout,), (cout,)]
            if b == 0 and (first_stride != 1 or c_in != cout):
                shapes += [(cout, c_in, 1, 1), (cout,), (cout,)]
        cin = cout
    return shapes + [(1000, 512), (1000,)]


def gpt_shapes(layers: int = 12, width: int = 768, vocab: int = 50257, context: int = 1024) -> list[tuple[int, ...]]:
    """Parameter shapes of a GPT-2-style decoder (about 124M parameters at the defaults)."""
    shapes = [(vocab, width), (context, width)]
    for _ in range(layers):
        shapes += [(width,), (width,), (3 * width, width), (3 * width,), (width, width), (width,)]
        shapes += [(width,), (width,), (4 * width, width), (4 * width,), (width, 4 * width), (width,)]
    return shapes + [(width,), (width,)]


def tiny_shapes() -> list[tuple[int, ...]]:
    """A few small matrices and vectors, for smoke tests of the benchmark scripts."""
    return [(64, 32), (64,), (64, 32), (32, 16, 3, 3), (10, 64)]


MODELS = {"resnet50": resnet50_shapes, "resnet18": resnet18_shapes, "gpt": gpt_shapes, "tiny": tiny_shapes}


class ShapeBag(nn.Module):
    """Parameters of the given shapes; the loss sum_k <p_k, c_k> has gradient c_k."""

    def __init__(self, shapes, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weights = nn.ParameterList(nn.Parameter(torch.randn(s, generator=g) * 0.01) for s in shapes)

    def forward(self, coefficients):
        return sum((p * c).sum() for p, c in zip(self.weights, coefficients))
