"""Rebuild a PyTorch checkpoint from a cxr fp32 ONNX model, e.g. to fine-tune a shipped model.

The exporter folds each BatchNorm into the convolution before it (weight ``W``, bias ``b``).
Fine-tuning needs the BatchNorm back, so this unfolds it *from data*: it runs real images
through the folded network, takes each convolution's per-channel output mean ``mu`` and
variance ``var``, and sets the BatchNorm to running stats ``mu, var``, scale
``sqrt(var + eps)`` and shift ``mu + b``. In eval mode the network is then exactly the ONNX
model; in training mode the batch statistics start close to those running statistics, so the
first steps do not scramble it. The result is proven against onnxruntime before it is written.

    python tools/onnx_to_checkpoint.py models/cxr-mnv2-224.onnx --split runs/x/split.json \
        --out runs/shipped/best.pt

``--out`` gets a cxr-train checkpoint (``cxr-export`` and ``cxr-train --test-only`` take it) and,
beside it, ``<name>.weights.pt``, a plain state dict for ``cxr-train --weights`` (all shapes
match, so the head is kept when the classes are the same).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper

from cxr.runtime.metadata import decode_props
from cxr.train.cache import decode_all
from cxr.train.augment import normalize_tensor, to_unit
from cxr.train.engine import CHECKPOINT_FORMAT
from cxr.train.models import build_model, count_parameters
from cxr.train.split import load_manifest, save_manifest, split_items


def _bn_of(name: str) -> str:
    head, _, last = name.rpartition(".")
    return f"{head}.{int(last) + 1}"


def rebuild(onnx_path: Path, pixels: np.ndarray) -> tuple[torch.nn.Module, dict]:
    proto = onnx.load(str(onnx_path))
    info = decode_props({p.key: p.value for p in proto.metadata_props})
    pp = info.preprocess
    # the classifier's tensors sit under "net." (or "base.net." in a graph with the input check and
    # the map wrapped around it); everything else (the input check's head) has other names
    weights = {}
    for i in proto.graph.initializer:
        for prefix in ("base.net.", "net."):
            if i.name.startswith(prefix):
                weights[i.name[len(prefix):]] = torch.from_numpy(numpy_helper.to_array(i).copy())
                break
    model = build_model(info.arch, num_classes=len(info.classes), in_channels=pp.channels, input_size=pp.size)
    modules = dict(model.named_modules())
    state = model.state_dict()
    convs = [n for n, m in modules.items() if isinstance(m, torch.nn.Conv2d)]
    folded = []
    for n in convs:
        state[f"{n}.weight"] = weights[f"{n}.weight"]
        bn = _bn_of(n)
        if isinstance(modules.get(bn), torch.nn.BatchNorm2d):
            b = weights[f"{n}.weight_bias"]
            eps = modules[bn].eps
            state[f"{bn}.weight"] = torch.ones_like(b)
            state[f"{bn}.bias"] = b
            state[f"{bn}.running_mean"] = torch.zeros_like(b)
            state[f"{bn}.running_var"] = torch.full_like(b, 1.0 - eps)
            folded.append(bn)
        elif f"{n}.bias" in state:
            state[f"{n}.bias"] = weights[f"{n}.bias"]
    for k in state:
        if k.startswith(("classifier.", "fc.")) and k in weights:
            state[k] = weights[k]
    model.load_state_dict(state)
    model.eval()

    # per-channel statistics of every BatchNorm's input under the folded (exact) network
    sums: dict[str, list] = {}

    def hook(name):
        def fn(_m, inp, _out):
            z = inp[0].double()
            s = sums.setdefault(name, [0.0, 0.0, 0])
            s[0] = s[0] + z.sum((0, 2, 3))
            s[1] = s[1] + (z * z).sum((0, 2, 3))
            s[2] += z.numel() // z.shape[1]
        return fn

    handles = [modules[bn].register_forward_hook(hook(bn)) for bn in folded]
    with torch.no_grad():
        for i in range(0, len(pixels), 64):
            model(normalize_tensor(to_unit(torch.from_numpy(pixels[i:i + 64])), pp))
    for h in handles:
        h.remove()
    for bn in folded:
        s0, s1, n = sums[bn]
        mu = s0 / n
        var = (s1 / n - mu * mu).clamp_min(1e-8)
        m = modules[bn]
        shift = m.bias.detach().double()
        m.running_mean.copy_(mu.float())
        m.running_var.copy_(var.float())
        m.weight.data.copy_(torch.sqrt(var + m.eps).float())
        m.bias.data.copy_((mu + shift).float())
    return model, {"info": info, "folded_bn": len(folded)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path, help="fp32 .onnx written by cxr-export")
    ap.add_argument("--split", type=Path, required=True, help="split.json whose training images give the statistics")
    ap.add_argument("--out", type=Path, required=True, help="checkpoint to write (e.g. runs/shipped/best.pt)")
    ap.add_argument("--stats-images", type=int, default=512, help="training images used for the BatchNorm statistics")
    ap.add_argument("--check-images", type=int, default=128, help="validation images for the parity check")
    args = ap.parse_args(argv)

    manifest = load_manifest(args.split)
    train = split_items(manifest, "train")
    val = split_items(manifest, "val")
    rng = np.random.default_rng(0)
    pick = lambda items, n: [items[i] for i in sorted(rng.choice(len(items), min(n, len(items)), replace=False))]  # noqa: E731
    proto_meta = onnx.load(str(args.model), load_external_data=False).metadata_props
    pp = decode_props({p.key: p.value for p in proto_meta}).preprocess
    stats_px = decode_all([p for p, _ in pick(train, args.stats_images)], pp)
    model, extra = rebuild(args.model, stats_px)
    info = extra["info"]

    check = pick(val, args.check_images)
    px = decode_all([p for p, _ in check], pp)
    x = normalize_tensor(to_unit(torch.from_numpy(px)), pp)
    # a calibrated file divides the logits by its temperature before the softmax (cxr.calibration);
    # the checkpoint keeps the plain logits, as cxr-train writes them, and cxr-export refits it
    temperature = float((info.extra.get("calibration") or {}).get("temperature") or 1.0)
    with torch.no_grad():
        p_torch = torch.softmax(model(x) / temperature, 1).numpy()
    sess = ort.InferenceSession(str(args.model), providers=["CPUExecutionProvider"])
    p_onnx = sess.run(["probabilities"], {sess.get_inputs()[0].name: x.numpy()})[0]
    diff = float(np.abs(p_torch - p_onnx).max())
    agree = float((p_torch.argmax(1) == p_onnx.argmax(1)).mean())
    print(f"parity on {len(check)} validation images: max |dp| {diff:.2e}, top-1 agreement {100 * agree:.2f} %",
          file=sys.stderr)
    if diff > 1e-4:
        print("error: the rebuilt model does not match the ONNX file; nothing written", file=sys.stderr)
        return 1

    args.out.parent.mkdir(parents=True, exist_ok=True)
    man_path = args.out.parent / "split.json"
    if man_path.resolve() != args.split.resolve():
        save_manifest(json.loads(args.split.read_text()), man_path)
    props = {p.key: p.value for p in proto_meta}
    training_data = json.loads(props.get("cxr.training_data", "{}"))
    training_data.update({"manifest": "split.json", "rebuilt_from": str(args.model)})
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    ck = {
        "format": CHECKPOINT_FORMAT,
        "arch": info.arch,
        "classes": list(info.classes),
        "preprocess": info.preprocess.to_dict(),
        "state_dict": state,
        "model_kwargs": {"num_classes": len(info.classes), "in_channels": pp.channels, "input_size": pp.size},
        "epoch": 0,
        "val_metrics": {},
        "training_data": training_data,
        "config": {"rebuilt_from_onnx": str(args.model)},
        "parameters": count_parameters(model),
        "pretrained": None,
    }
    torch.save(ck, args.out)
    weights_path = args.out.with_name(args.out.stem + ".weights.pt")
    torch.save(state, weights_path)
    print(f"wrote {args.out} and {weights_path} ({extra['folded_bn']} BatchNorms unfolded)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
