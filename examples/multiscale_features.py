"""Multi-scale features for a detection or segmentation neck.

``create_model(name, features_only=True)`` returns the four stage outputs of a Pyramid ViG (strides 4, 8,
16, 32), at any input size, non-square included: the kNN graphs are built per forward pass on whatever grid
the image gives. An isotropic ViG keeps one resolution (stride 16); ``forward_intermediates`` returns the
output of any of its blocks.

    python examples/multiscale_features.py --quick
    python examples/multiscale_features.py            # pvig_s_224_gelu and vig_ti_224_gelu
"""

from __future__ import annotations

import argparse

import torch

import vig_pyg


def describe_pyramid(name: str, sizes: list[tuple[int, int]]) -> None:
    """Print every feature level's channels, stride and shape for each input size."""
    model = vig_pyg.create_model(name, features_only=True).eval()
    print(f"{name} features_only: {len(model.feature_info)} levels")
    for h, w in sizes:
        with torch.no_grad():
            feats = model(torch.randn(1, 3, h, w))
        print(f"  input {h}x{w}")
        for info, f in zip(model.feature_info, feats):
            stride = h / f.shape[-2]  # measured, to check against the declared reduction
            print(
                f"    {info['module']:<9} channels {info['num_chs']:>4}  reduction {info['reduction']:>2}  "
                f"stride {stride:>4.0f}  shape {tuple(f.shape)}"
            )


def describe_isotropic(name: str, size: int) -> None:
    """Print the shapes ``forward_intermediates`` returns for the last three blocks of an isotropic ViG."""
    model = vig_pyg.create_model(name).eval()
    with torch.no_grad():
        final, inter = model.forward_intermediates(torch.randn(1, 3, size, size), indices=3)
    print(f"{name} forward_intermediates (last 3 blocks), input {size}x{size}")
    for i, f in enumerate(inter):
        print(f"    block -{len(inter) - i}: shape {tuple(f.shape)}")
    print(f"    final features: shape {tuple(final.shape)}")


def main(argv: list[str] | None = None) -> None:
    """Show the feature pyramid at two input sizes and an isotropic model's intermediates."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny models and inputs: about a second")
    args = p.parse_args(argv)
    if args.quick:
        torch.set_num_threads(1)  # a smoke run: do not oversubscribe a shared CPU
        describe_pyramid("pvig_test", [(96, 96), (96, 128)])
        describe_isotropic("vig_test", 96)
    else:
        describe_pyramid("pvig_s_224_gelu", [(224, 224), (256, 320)])
        describe_isotropic("vig_ti_224_gelu", 224)


if __name__ == "__main__":
    main()
