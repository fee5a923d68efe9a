"""``ditaccel metrics``: PSNR, SSIM and Fréchet distance between two folders of images."""

from __future__ import annotations

HELP = "compare two folders of images (same names): PSNR, SSIM, Fréchet distance"


def add_arguments(p) -> None:
    p.add_argument("--ref", required=True, help="folder of reference images (e.g. the full model)")
    p.add_argument("--test", required=True, help="folder of images to score, same file names")
    p.add_argument("--no-fd", action="store_true", help="skip the Fréchet distance (faster)")
    p.add_argument("--json", default=None, help="also write the numbers as JSON")


def run(args) -> int:
    from .. import io
    from ..metrics import summarize
    from ..viz import load_images

    ref_names, ref = load_images(args.ref)
    test_names, test = load_images(args.test)
    if ref_names != test_names:
        missing = sorted(set(ref_names) ^ set(test_names))[:3]
        raise ValueError(f"--ref and --test hold different file names (e.g. {missing}); "
                         "pair images made with the same seeds")
    if ref.shape != test.shape:
        raise ValueError(f"image shapes differ: {tuple(ref.shape[1:])} vs {tuple(test.shape[1:])}")
    if not args.no_fd and len(ref) < 2:
        raise ValueError("Fréchet distance needs at least 2 images per folder; add images or pass --no-fd")
    result = {"images": len(ref), **summarize(ref, test, fd=not args.no_fd)}
    width = max(len(k) for k in result)
    print(f"{'metric':<{width}}  value")
    for k, v in result.items():
        print(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    if args.json:
        io.write_json(args.json, result)
    return 0
