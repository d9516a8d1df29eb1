"""How far action's 3D sliding window is from MONAI's sliding_window_inference on real volumes (needs MONAI: pip
install monai): the ACDC test volumes (min-max HDF5 images resized in-plane to the config's size), a seeded random
UNet3D of the acdc-3d-cpu preset, its patch, a half-patch stride (MONAI's overlap 0.5), MONAI averaging the softmax;
constant weights and MONAI's Gaussian (action's --sliding-window gaussian-monai). Prints the argmax agreement on
volumes thinner than the patch and on the others, and the largest probability difference.

    python tools/monai_agreement.py --data ../shared/data/acdc [--max-volumes 4]
"""
from __future__ import annotations

import argparse
import os


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=os.environ.get("ACTION_ACDC", "../shared/data/acdc"), help="ACDC HDF5 folder")
    ap.add_argument("--max-volumes", type=int, help="only the first N test volumes")
    args = ap.parse_args(argv)
    import torch
    import torch.nn.functional as F
    from monai.inferers import sliding_window_inference

    from action.config import build_config
    from action.data import AcdcLayout, AcdcVolumes
    from action.engine.inference import sliding_window_probabilities
    from action.models import build_network

    torch.set_num_threads(1)
    cfg = build_config("acdc-3d-cpu", overrides={"out": "unused", "data": args.data})
    torch.manual_seed(0)
    net = build_network(cfg).eval()
    patch = tuple(cfg.patch)
    acdc = AcdcLayout(args.data)
    volumes = AcdcVolumes(acdc.root, acdc.test_volumes[:args.max_volumes])
    print(f"{len(volumes)} test volumes, patch {patch}, in-plane size {cfg.size}")
    for ours, theirs in (("constant", "constant"), ("gaussian-monai", "gaussian")):
        agree, worst = {True: [0, 0], False: [0, 0]}, 0.0
        for i in range(len(volumes)):
            vol = volumes[i]["image"].float()
            vol = F.interpolate(vol[:, None], size=(cfg.size, cfg.size), mode="bilinear", align_corners=False)[:, 0]
            with torch.no_grad():
                mine = sliding_window_probabilities(net, vol, patch, cfg.num_classes, mode=ours)
                ref = sliding_window_inference(vol[None, None], patch, 2, lambda x: net(x).softmax(1), overlap=0.5,
                                               mode=theirs, sigma_scale=0.125)[0]
            thin = vol.shape[0] < patch[0]
            agree[thin][0] += int((mine.argmax(0) == ref.argmax(0)).sum())
            agree[thin][1] += ref[0].numel()
            worst = max(worst, float((mine - ref).abs().max()))
        for thin, (same, total) in agree.items():
            if total:
                print(f"{ours}: {'thinner than the patch' if thin else 'at least the patch deep'}: argmax agreement "
                      f"{same / total:.6%} of {total} voxels")
        print(f"{ours}: largest |p - p_monai| {worst:.3g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
